"""Resumable training runs: everything a training loop carries between iterations in one file, so a run can stop
after a time budget (``--max-minutes``) and continue with ``--resume`` exactly where it stopped — a resumed run
computes the same weights as an uninterrupted one (same thread count: float reductions depend on it).

The state file holds the model, EMA and optimizer state dicts, the torch and numpy RNG states, the iteration, the
recipe, the seconds spent so far and the loop's history; it is written to a temporary name and renamed, so a run
killed mid-save leaves the previous state intact.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

STATE_VERSION = 1


class StateError(Exception):
    """A training state that cannot be resumed (missing, unreadable, or from another kind of run)."""


def add_resume_arguments(parser: argparse.ArgumentParser, checkpoints_help: str) -> None:
    """The flags of a run that trains in chunks: extra checkpoints, the state file, ``--resume`` and the budget."""
    parser.add_argument("--checkpoints", default="", help=checkpoints_help)
    parser.add_argument("--state", help="training state file (default: OUT.state.pt)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in the state file")
    parser.add_argument("--max-minutes", type=float, help="stop after this long, state saved; continue with --resume")


def checkpoint_iterations(parser: argparse.ArgumentParser, text: str) -> tuple[int, ...]:
    """``--checkpoints``' iteration numbers (a comma list); anything else is the parser's usage error."""
    try:
        return tuple(int(c) for c in text.split(",") if c)
    except ValueError:
        parser.error(f"--checkpoints takes iteration numbers separated by commas, got {text!r}")


def run_chunk(train: Callable[[], dict], module: str, out: str) -> dict | int:
    """One chunk of a resumable run from its command line: the result when training finished; otherwise the command's
    exit code after one line saying why it stopped (2: a state that cannot be resumed; 0: the time budget ran out,
    with the command that continues)."""
    try:
        result = train()
    except StateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not result["done"]:
        state = f"; state in {result['state']}" if result.get("state") else ""
        print(f"stopped at iteration {result['iteration']} after {result['seconds']:.0f} s of training{state} — "
              f"continue with: python -m {module} --out {out} --resume")
        return 0
    return result


def default_state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state.pt")


def capture_rng(rng: np.random.Generator) -> dict:
    import torch

    return {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state}


def restore_rng(saved: dict, rng: np.random.Generator) -> None:
    import torch

    torch.set_rng_state(saved["torch"])
    rng.bit_generator.state = saved["numpy"]


def save_state(path: Path, kind: str, state: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"version": STATE_VERSION, "kind": kind, **state}, tmp)
    tmp.replace(path)


def load_state(path: Path, kind: str) -> dict:
    import torch

    if not path.is_file():
        raise StateError(f"no training state at {path} to resume (start without --resume, or pass --state)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a bad file
        raise StateError(f"cannot read training state {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("kind") != kind or state.get("version") != STATE_VERSION:
        found = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise StateError(f"{path} is not a {kind} training state (found {found!r})")
    return state


class Budget:
    """Wall-clock budget of one chunk of a run: ``expired()`` once ``max_minutes`` have passed (never without one)."""

    def __init__(self, max_minutes: float | None):
        self.start = time.perf_counter()
        self.limit = None if max_minutes is None else 60.0 * max_minutes

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def expired(self) -> bool:
        return self.limit is not None and self.elapsed() >= self.limit
