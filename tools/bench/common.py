"""What every benchmark shares: the plans compared, interleaved timing rounds, and the markdown table."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from keystep.runtime.sampler import SamplingOptions

# row name -> (key-step spec, batch a group's decoders into one call)
PLANS = {"baseline": ("all", True), "key-step": ("default", True), "key-step, sequential": ("default", False)}
EAGER = "diffusers eager"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def measure(sampler, sample, eager, steps: int, guidance: float, repeats: int, images: int) -> dict:
    """Interleaved rounds (eager, then every plan), the first a warm-up. ``sample(options)`` runs the keystep
    sampler, ``eager()`` the diffusers loop; both return final latents."""
    options = {
        name: SamplingOptions.from_bundle(sampler.bundle, num_steps=steps, key_steps=spec, guidance=guidance,
                                          parallel=batched)
        for name, (spec, batched) in PLANS.items()
    }
    times: dict[str, list[float]] = {EAGER: [], **{name: [] for name in PLANS}}
    host: dict[str, list[float]] = {name: [] for name in PLANS}
    latents = {}
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        latents[EAGER] = eager()
        if i:
            times[EAGER].append(time.perf_counter() - t0)
        for name in PLANS:
            result = sample(options[name])
            latents[name] = result.latents
            if i:
                times[name].append(result.total_seconds)
                host[name].append(result.host_seconds / result.total_seconds)
    prepared = {name: sampler.prepare(options[name], images) for name in PLANS}
    flops = {name: sampler.plan_flops(p) for name, p in prepared.items()}
    flops[EAGER] = flops["baseline"]
    return {
        "steps": steps,
        "repeats": repeats,
        "guidance": guidance,
        "median": {k: statistics.median(v) for k, v in times.items()},
        "spread": {k: (min(v), max(v)) for k, v in times.items()},
        "host_fraction": {k: statistics.median(v) for k, v in host.items()},
        "calls": {name: len(p.calls) for name, p in prepared.items()},
        "key_steps": len(prepared["key-step"].plan.key_steps),
        "evaluations": prepared["key-step"].plan.num_steps,
        "flops": flops,
        "max_abs_diff_baseline_vs_eager": float(np.abs(latents["baseline"] - latents[EAGER]).max()),
    }


def to_markdown(r: dict, command: str, what: str, unit: str = "image") -> str:
    eager, base = r["median"][EAGER], r["median"]["baseline"]
    lines = [
        f"`{command}` — {cpu_name()}, {os.cpu_count()} cores; {what}; {r['steps']} steps, CFG {r['guidance']}, "
        f"batch 1, median of {r['repeats']} interleaved runs",
        "",
        f"| row | s/{unit} (median) | min–max | vs diffusers | vs baseline | GFLOP | FLOP bound vs baseline | host share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in r["median"]:
        t, (lo, hi) = r["median"][name], r["spread"][name]
        bound = r["flops"]["baseline"] / r["flops"][name]
        host = r["host_fraction"].get(name)
        lines.append(
            f"| {name} | {t:.3f} | {lo:.3f}–{hi:.3f} | {eager / t:.2f}× | {base / t:.2f}× | "
            f"{r['flops'][name] / 1e9:.1f} | {bound:.3f}× | {'—' if host is None else f'{100 * host:.2f} %'} |"
        )
    lines.append("")
    for name in [n for n in ("key-step", "key-step, sequential") if n in r["median"]]:
        speedup = base / r["median"][name]
        bound = r["flops"]["baseline"] / r["flops"][name]
        lines.append(
            f"{name}: {r['key_steps']} key steps of {r['evaluations']} model evaluations, {r['calls'][name]} stage "
            f"calls (baseline {r['calls']['baseline']}); speedup {speedup:.3f}× = {speedup / bound:.3f} × the FLOP "
            f"bound {bound:.3f}×."
        )
    lines.append(f"Baseline vs diffusers eager latents: max |diff| {r['max_abs_diff_baseline_vs_eager']:.2e}.")
    return "\n".join(lines)


def report(r: dict, command: str, what: str, markdown: str | None, unit: str = "image") -> None:
    """Print the table (and the build time) and write it to ``markdown`` when given."""
    emit(to_markdown(r, command, what, unit) + f"\nBundle build: {r['build_seconds']:.1f} s.", markdown)


def emit(text: str, markdown: str | None) -> None:
    """Print a benchmark's report and, when asked, write it to a Markdown file too."""
    print(text)
    if markdown:
        Path(markdown).write_text(text + "\n")
