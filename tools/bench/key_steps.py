"""Which key steps for a UNet family: measure, for a bundle, how much the encoder features change from step to step
and how close candidate key-step lists stay to the baseline at what FLOP cost.

    python -m keystep.tools.bench.key_steps BUNDLE [--steps 50 30] [--seeds 2] [--prompt ...] [--height H --width W]
                                           [--markdown FILE]

Per step count: (1) one run with the encoder at every step (FasterDiffusion's motivation): the relative L2 change
of the encoder outputs between adjacent steps, averaged over the calibration runs; (2) candidate plans — the
family's ``default`` rule, FasterDiffusion's 50-step SD list cut to N and scaled to N, ``uniform:M``, and the steps
of largest feature change under the default's FLOP budget (``keystep tune --method similarity``'s rule) — each with its FLOP
ratio, FLOP bound and the PSNR of its final latents vs the baseline's (same z_T). Untimed (``cpu-shared`` is fine).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .common import cpu_name, emit

FASTERDIFFUSION_50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)


def scaled_list(num_steps: int) -> str:
    """FasterDiffusion's 50-step list stretched to ``num_steps`` (i * N / 50, rounded, distinct)."""
    return ",".join(map(str, sorted({round(i * num_steps / 50) for i in FASTERDIFFUSION_50})))


def measure(bundle_dir: str, steps: int, seeds: int, prompts: list[str], height, width) -> tuple[list, np.ndarray]:
    from keystep.runtime.backends.base import get_backend
    from keystep.runtime.bundle import Bundle
    from keystep.runtime.sampler import SamplingOptions
    from keystep.runtime.samplers import sampler_for

    from ..cli.tune import Calibration, encoder_feature_change, latent_psnr, similarity_key_steps

    bundle = Bundle.load(bundle_dir)
    sampler = sampler_for(bundle, get_backend("onnxruntime"))
    if height or width:  # calibrate at this size: wrap sample() so Calibration's calls use it
        original = sampler.sample
        sampler.sample = lambda p, o, **kw: original(p, o, height=height, width=width, **kw)
    options = SamplingOptions.from_bundle(bundle, num_steps=steps)
    calibration = Calibration(sampler, options, seeds, prompts=prompts)
    base_flops = calibration.flops(options.with_plan("all"))
    reference, _ = calibration.run(options.with_plan("all"))
    change = encoder_feature_change(calibration)
    budget = calibration.flops(options.with_plan("default"))
    cut = ",".join(str(i) for i in FASTERDIFFUSION_50 if i < steps)
    candidates = {f"the bundle family's default rule ({bundle.family})": "default",
                  "FasterDiffusion's SD list cut to N": cut,
                  "FasterDiffusion's SD list scaled to N": scaled_list(steps),
                  "largest feature change, default's FLOP budget": similarity_key_steps(calibration, budget)}
    candidates.update({f"uniform:{m}": f"uniform:{m}" for m in (2, 3, 4, 5)})
    rows = []
    for name, spec in candidates.items():
        plan = options.with_plan(spec)
        flops = calibration.flops(plan)
        latents, _ = calibration.run(plan)
        keys = sampler.prepare(plan, len(prompts)).plan.key_steps
        rows.append({"name": name, "key_steps": list(keys), "flops_ratio": flops / base_flops,
                     "psnr": latent_psnr(latents, reference)[0]})
    return rows, change


def to_markdown(bundle_dir: str, steps: int, rows: list, change: np.ndarray, seeds: int, prompts: list[str]) -> str:
    top = np.argsort(-change)[:12]
    lines = [f"`python -m keystep.tools.bench.key_steps {bundle_dir} --steps {steps}` — {cpu_name()}; {seeds} seed(s) "
             f"x {len(prompts)} prompt(s); PSNR of the final latents vs the baseline (same z_T)", "",
             "| plan | key steps | FLOP ratio | FLOP bound | PSNR vs baseline |", "|---|---|---|---|---|"]
    for r in rows:
        keys = ",".join(map(str, r["key_steps"]))
        lines.append(f"| {r['name']} | {keys} | {r['flops_ratio']:.3f} | {1 / r['flops_ratio']:.3f}× | "
                     f"{r['psnr']:.1f} dB |")
    lines.append("")
    lines.append("Encoder-feature change from the previous step (relative L2), largest first: " + ", ".join(
        f"step {i}: {change[i]:.3f}" for i in top) + ".")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--steps", type=int, nargs="+", default=[50])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--prompt", nargs="+", default=["a photo of an astronaut riding a horse"])
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args(argv)
    tables = []
    for steps in args.steps:
        rows, change = measure(args.bundle, steps, args.seeds, args.prompt, args.height, args.width)
        tables.append(to_markdown(str(Path(args.bundle)), steps, rows, change, args.seeds, args.prompt))
        print(tables[-1] + "\n", flush=True)
    if args.markdown:
        emit("\n\n".join(tables), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
