"""``keystep build --width``: per-timestep masks (DyDiT routers or calibration) -> width engines + manifest section."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keystep.runtime.plan import parse_key_steps
from keystep.runtime.schedulers import make_scheduler
from keystep.runtime.width import WidthEngine

from .errors import ModelLoadError
from keystep.runtime.width import UnitFlops

from .width_profiles import width_engines

TOKEN_MODES = ("gather", "dense", "off")


def parse_width(spec: str) -> float | None:
    """``dydit`` -> None (router masks); ``calibrated:λ`` -> λ."""
    if spec == "dydit":
        return None
    kind, _, value = spec.partition(":")
    try:
        target = float(value) if kind == "calibrated" else None
    except ValueError:
        target = None
    if target is None or not 0 < target <= 1:
        raise ModelLoadError(f"bad --width {spec!r}: use none, dydit, or calibrated:L with 0 < L <= 1 (e.g. calibrated:0.5)")
    return target


@dataclass
class WidthPlan:
    spec: str
    masks: np.ndarray  # bool (num_train_timesteps, depth, 2, heads)
    engines: list[WidthEngine]
    token_mode: str  # "gather" | "dense" | "off"; "none" when the model has no token routers
    flops: UnitFlops

    @classmethod
    def compile(cls, loaded, spec, scheduler_config, steps, key_steps, split, max_profiles, token_skip, progress):
        model = loaded.model
        target = parse_width(spec)
        if token_skip not in TOKEN_MODES:
            raise ModelLoadError(f"bad token-skip mode {token_skip!r}: use one of {', '.join(TOKEN_MODES)}")
        if max_profiles < 1:
            raise ModelLoadError(f"--max-profiles must be at least 1, got {max_profiles}")
        scheduler = make_scheduler(scheduler_config)
        train_steps = scheduler.num_train_timesteps
        if target is None:
            if loaded.routers is None:
                raise ModelLoadError("--width dydit needs a DyDiT checkpoint (blocks.*.attn_rate.router); this model "
                                     "has no routers — use --width calibrated:L for training-free profiles")
            masks = loaded.routers.masks(model, np.arange(train_steps))
        else:
            from .calibrate import calibrate_masks

            progress(f"calibrating width profiles at {target:g} of the blocks' FLOPs ...")
            masks = calibrate_masks(model, target, scheduler_config)
        scheduler.set_timesteps(steps)
        timesteps = np.asarray(scheduler.timesteps)
        plan = parse_key_steps(key_steps, len(timesteps), "dit")
        flops = UnitFlops.of(model.config)
        step_masks = masks[np.clip(np.rint(timesteps).astype(int), 0, train_steps - 1)]
        engines = width_engines(step_masks, list(plan.key_steps), split, max_profiles, flops)
        token_mode = token_skip if model.blocks[0].token_router is not None else "none"
        return cls(spec, masks, engines, token_mode, flops)

    def save_masks(self, scratch: Path) -> Path:
        folder = scratch / "width"
        folder.mkdir()
        np.save(folder / "masks.npy", self.masks)
        return folder

    def manifest(self) -> dict:
        return {
            "spec": self.spec,
            "token_selection": self.token_mode,
            # dropping a checkpoint's token routers changes what it computes; say so wherever it is shown
            "approximation": self.token_mode == "off",
            "masks": "width/masks.npy",
            "unit_flops": self.flops.to_manifest(),
            "engines": [e.to_manifest() for e in self.engines],
        }
