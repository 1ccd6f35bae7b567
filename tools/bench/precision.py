"""``python -m keystep.tools.bench.precision``: fp32 vs fp16 vs bf16 bundles of one model on one backend.

Builds (or reuses) the three bundles, then reports per stage the build-time error vs fp32 (from the manifest) and the
median time of one call at one image with CFG (interleaved rounds after a warm-up), and end to end the final latents
of each plan vs the fp32 bundle's (PSNR, relative L2) with the same noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import Bundle
from keystep.runtime.sampler import SamplingOptions
from keystep.runtime.samplers import sampler_for

from .common import cpu_name, emit
from .gpu_check import rel_l2, stage_inputs
from ..cli.tune import latent_psnr

PRECISIONS = ("fp32", "fp16", "bf16")


def stage_times(bundles: dict[str, Bundle], backend, rows: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds of one call per (stage, precision), rounds interleaved over the precisions."""
    rng = np.random.default_rng(0)
    times: dict[str, dict[str, list[float]]] = {}
    reference = bundles["fp32"]
    for stage, spec in reference.stages.items():
        if stage == "vae_decoder" or any(isinstance(d, str) and d != "batch" for io in spec.inputs for d in io.shape):
            continue  # the VAE stays fp32; spatial-axis stages need sizes (DiT stages have none)
        feeds = stage_inputs(reference, spec, {}, rows, rng)
        runners = {p: backend.load(b.stage(stage)) for p, b in bundles.items()}
        times[stage] = {p: [] for p in bundles}
        for round_ in range(repeats + 1):
            for p, runner in runners.items():
                start = time.perf_counter()
                runner.run(feeds)
                if round_:
                    times[stage][p].append(time.perf_counter() - start)
    return {stage: {p: statistics.median(v) for p, v in t.items()} for stage, t in times.items()}


def end_to_end(bundles: dict[str, Bundle], backend, plans: tuple[str, ...]) -> dict[str, dict[str, tuple]]:
    """(PSNR dB over the fp32 latents' range, rel L2) of each plan's final latents vs the fp32 bundle's, same noise."""
    out = {}
    for plan in plans:
        latents = {}
        for p, bundle in bundles.items():
            options = SamplingOptions.from_bundle(bundle)
            options = options if plan == "default" else options.with_plan(plan)
            latents[p] = sampler_for(bundle, backend).sample([1], options, seed=0).latents
        out[plan] = {p: (latent_psnr(latents[p], latents["fp32"])[0], rel_l2(latents[p], latents["fp32"]))
                     for p in bundles if p != "fp32"}
    return out


def to_markdown(command: str, bundles: dict[str, Bundle], times: dict, e2e: dict, repeats: int) -> str:
    lines = [f"`{command}` — {cpu_name()}, {os.cpu_count()} cores, onnxruntime CPU; one call = 1 image with CFG, "
             f"median of {repeats} interleaved rounds", "",
             "| stage | " + " | ".join(f"{p} ms" for p in PRECISIONS) + " | fp16 / bf16 time vs fp32 | "
             "fp16 / bf16 rel L2 vs fp32 (build) |", "|---|" + "---|" * (len(PRECISIONS) + 2)]
    for stage, t in times.items():
        errors = []
        for p in PRECISIONS[1:]:
            outputs = bundles[p].manifest["stages"][stage].get("precision", {}).get("error_vs_fp32", {}).get("outputs")
            errors.append(f"{max(o['rel_l2'] for o in outputs.values()):.1e}" if outputs else "—")
        lines.append(f"| {stage} | " + " | ".join(f"{t[p] * 1e3:.1f}" for p in PRECISIONS)
                     + f" | {t['fp16'] / t['fp32']:.2f}× / {t['bf16'] / t['fp32']:.2f}× | {' / '.join(errors)} |")
    lines += ["", "| plan | fp16 PSNR | fp16 rel L2 | bf16 PSNR | bf16 rel L2 |", "|---|---|---|---|---|"]
    for plan, r in e2e.items():
        lines.append(f"| {plan} | {r['fp16'][0]:.1f} dB | {r['fp16'][1]:.1e} | {r['bf16'][0]:.1f} dB | "
                     f"{r['bf16'][1]:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keystep.tools.bench.precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:dit-s2", help="a DiT model (shipped name, random:PRESET, path)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", default="keystep-bench-precision", help="where the bundles go (reused)")
    parser.add_argument("--markdown", help="also write the report here")
    args = parser.parse_args(argv)
    from keystep.export.build import build_bundle

    bundles = {}
    for p in PRECISIONS:
        out = Path(args.dir) / f"{args.model.replace(':', '-')}-{p}"
        if not (out / "manifest.json").is_file():
            build_bundle(args.model, str(out), steps=args.steps, precision=p, progress=lambda m: print(m, file=sys.stderr))
        bundles[p] = Bundle.load(out)
    backend = get_backend("onnxruntime")
    times = stage_times(bundles, backend, 2, args.repeats)
    e2e = end_to_end(bundles, backend, ("all", "default"))
    command = "python -m keystep.tools.bench.precision " + " ".join(argv if argv is not None else sys.argv[1:])
    emit(to_markdown(command.strip(), bundles, times, e2e, args.repeats), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
