"""DyDiT width benchmark: dense vs width profiles vs profiles + key steps, and gather vs dense token selection.

    python -m keystep.tools.bench.dydit [--model random:dydit-s2] [--backend onnxruntime] [--steps 50]
                                        [--repeats 5] [--work DIR] [--markdown FILE]

Builds (or reuses, under ``--work``) three bundles of one DyDiT-format model: dense (``--width none``: the full-width
network, token routers ignored), width profiles with gathered token selection, and width profiles with dense token
masking. Rows run interleaved, one image, CFG 4. FLOPs are what each run executed: graph-counted per call, with
gathered token selection counted at the token numbers the graphs report.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import numpy as np

from .common import cpu_name, emit

# row -> (bundle, key-step spec)
ROWS = {
    "dense, baseline": ("dense", "all"),
    "dense, key-step": ("dense", "default"),
    "profiles (gather tokens)": ("gather", "all"),
    "profiles (gather tokens) + key-step": ("gather", "default"),
    "profiles (dense token mask)": ("masked", "all"),
    "profiles (dense token mask) + key-step": ("masked", "default"),
}
BUILDS = {"dense": {"width": "none"}, "gather": {"token_skip": "gather"}, "masked": {"token_skip": "dense"}}


def build_bundles(model: str, work: Path, steps: int) -> dict[str, Path]:
    from keystep.export.build import build_dit_bundle

    paths = {}
    for name, options in BUILDS.items():
        paths[name] = work / name
        if not (paths[name] / "manifest.json").is_file():
            build_dit_bundle(model, str(paths[name]), steps=steps, progress=lambda m: None, **options)
    return paths


def run(model: str, backend: str, steps: int, repeats: int, work: Path) -> dict:
    from keystep.runtime.backends.base import get_backend
    from keystep.runtime.bundle import Bundle
    from keystep.runtime.dit_sampler import DiTSampler
    from keystep.runtime.sampler import SamplingOptions

    paths = build_bundles(model, work, steps)
    runtime = get_backend(backend)
    samplers = {name: DiTSampler(Bundle.load(path), runtime) for name, path in paths.items()}
    z_T = samplers["dense"].initial_noise(1, seed=0)
    times = {row: [] for row in ROWS}
    flops, latents = {}, {}
    for i in range(repeats + 1):  # round 0 warms up every engine
        for row, (bundle, spec) in ROWS.items():
            sampler = samplers[bundle]
            options = SamplingOptions.from_bundle(sampler.bundle, num_steps=steps, key_steps=spec, parallel=False)
            result = sampler.sample([1], options, init_noise=z_T)
            if i:
                times[row].append(result.total_seconds)
            flops[row] = sum(result.call_flops)
            latents[row] = result.latents
    median = {row: statistics.median(v) for row, v in times.items()}
    return {
        "model": model, "backend": backend, "steps": steps, "repeats": repeats, "median": median,
        "spread": {row: (min(v), max(v)) for row, v in times.items()}, "flops": flops,
        "diff_vs_gather": {row: float(np.abs(latents[row] - latents["profiles (gather tokens)"]).max())
                           for row in ROWS if ROWS[row][0] == "masked" and ROWS[row][1] == "all"},
        "width": samplers["gather"].bundle.manifest["width"]["spec"],
    }


def to_markdown(r: dict, command: str) -> str:
    base_t, base_f = r["median"]["dense, baseline"], r["flops"]["dense, baseline"]
    lines = [
        f"`{command}` — {cpu_name()}, {os.cpu_count()} cores; {r['model']} ({r['width']} widths), backend "
        f"{r['backend']}, DDIM {r['steps']} steps, CFG 4, batch 1, median of {r['repeats']} interleaved runs",
        "",
        "| row | s/image (median) | min–max | speedup vs dense baseline | GFLOP executed | FLOP bound | speedup / bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, t in r["median"].items():
        lo, hi = r["spread"][row]
        speedup, bound = base_t / t, base_f / r["flops"][row]
        lines.append(f"| {row} | {t:.3f} | {lo:.3f}–{hi:.3f} | {speedup:.2f}× | {r['flops'][row] / 1e9:.1f} | "
                     f"{bound:.2f}× | {speedup / bound:.2f} |")
    for row, diff in r["diff_vs_gather"].items():
        lines.append(f"\n{row} vs gather latents after sampling: max |diff| {diff:.1e} (the same computation in two graph "
                     "forms; a token whose router logit is within float rounding of 0 can flip between them, and "
                     "sampling carries the difference on).")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:dydit-s2")
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "openvino"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", default="keystep-bench-dydit", help="bundles are built here once and reused")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    r = run(args.model, args.backend, args.steps, args.repeats, Path(args.work))
    command = (f"python -m keystep.tools.bench.dydit --model {args.model} --backend {args.backend} "
               f"--steps {args.steps} --repeats {args.repeats}")
    text = to_markdown(r, command)
    emit(text, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
