"""The side-by-side benchmark: eager diffusers (alone and with the ``deepcache`` package) vs every keystep plan on
every CPU backend, for a DiT-S/2-sized model and an SD-like reduced UNet, in one process and one run.

    python -m keystep.tools.bench [--model dit|unet|both] [--backend onnxruntime openvino] [--size 128]
                                  [--steps 50] [--repeats 3] [--interval 3] [--branch 0] [--target-speedup 2.5]
                                  [--markdown FILE]

DiT rows: diffusers eager (a random ``DiTTransformer2DModel`` of DiT-S/2's size, DiTPipeline's loop), then per
backend keystep's baseline, key-step (FasterDiffusion), block caching of the middle blocks, the plan ``keystep tune``
picks for ``--target-speedup``, and DyDiT width profiles alone and with key steps (``random:dydit-s2``: the same
architecture with designed routers — a different model, so its PSNR column is against its own width-only run).
UNet rows: diffusers' StableDiffusionPipeline (reduced UNet 160/320/640, ``bench_unet``'s model) alone and with
``DeepCacheSDHelper`` (``--interval``/``--branch``), then per backend keystep's baseline, key-step, DeepCache at
the same interval and branch, key steps then DeepCache, and the tuned plan. All rows share z_T; rows are
interleaved per round after a warm-up round and the medians reported. "floor" = the row's FLOPs at the backend's
peak (one large MatMul through that backend); PSNR is of the final latents vs the same backend's baseline plan.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..cli.args import list_flag
from .common import cpu_name
from ..cli.tune import latent_psnr

EAGER = "diffusers eager"
BASELINE = "keystep baseline"


@dataclass
class Row:
    name: str
    run: Callable[[], np.ndarray]  # -> final latents
    backend: str = "PyTorch"
    flops: int | None = None
    reference: str | None = None  # the row whose latents PSNR is measured against
    times: list[float] = field(default_factory=list)
    latents: np.ndarray | None = None


def interleaved(rows: list[Row], repeats: int) -> None:
    """Every row once per round, the first round a warm-up (sessions, caches)."""
    for i in range(repeats + 1):
        for row in rows:
            t0 = time.perf_counter()
            row.latents = row.run()
            if i:
                row.times.append(time.perf_counter() - t0)


def plan_rows(sampler, run, plans: dict[str, str], steps: int, guidance: float, backend: str,
              flops_scale: float = 1.0) -> list[Row]:
    """``flops_scale``: the run's image area over the one the manifest counts FLOPs at (linear in the area, as
    ``keystep profile`` scales them; attention grows faster, so at other sizes the floor is approximate)."""
    from keystep.runtime.sampler import SamplingOptions

    base = SamplingOptions.from_bundle(sampler.bundle, num_steps=steps, guidance=guidance)
    rows = []
    for name, spec in plans.items():
        options = base.with_plan(spec)
        rows.append(Row(name, lambda o=options: run(o).latents, backend,
                        round(sampler.plan_flops(sampler.prepare(options, 1)) * flops_scale), f"{BASELINE}@{backend}"))
    return rows


def tuned_plan(sampler, steps: int, guidance: float, target: float, calibrate: dict) -> str:
    """``keystep tune``'s choice on one calibration seed (FLOP budget: machine-independent)."""
    from keystep.runtime.sampler import SamplingOptions

    from ..cli.tune import tune

    options = SamplingOptions.from_bundle(sampler.bundle, num_steps=steps, guidance=guidance)
    return tune(sampler.bundle, sampler, options, target_speedup=target, seeds=1, **calibrate)["chosen"]


def dit_bench(args, work: Path) -> tuple[str, list[Row]]:
    from diffusers import DDIMScheduler

    from keystep.export.build import build_dit_bundle
    from keystep.runtime.backends.base import get_backend
    from keystep.runtime.bundle import Bundle
    from keystep.runtime.dit_sampler import DiTSampler

    from .dit import diffusers_ddim_config, eager_diffusers_loop, make_diffusers_dit

    guidance, steps = 4.0, args.steps
    transformer = make_diffusers_dit(args.preset, seed=0)
    transformer.save_pretrained(work / "transformer")
    depth = transformer.config.num_layers
    long, short = f"2-{depth - 3}", f"{depth // 4 + 1}-{depth - depth // 4 - 2}"  # 2-9 and 4-7 for DiT-S/2
    scheduler = DDIMScheduler.from_config(diffusers_ddim_config(clip_sample=False))
    dense = build_dit_bundle(str(work / "transformer"), str(work / "dit"), steps=steps, scheduler="ddim",
                             cache=f"blocks:{long},{short}", progress=lambda m: None)
    width = build_dit_bundle(f"random:dydit-{args.preset.split('-', 1)[1]}", str(work / "dydit"), steps=steps,
                             scheduler="ddim", progress=lambda m: None)
    labels = [207 % transformer.config.num_embeds_ada_norm]
    rows = [Row(EAGER, lambda: eager_diffusers_loop(transformer, scheduler, z_T, labels, guidance, steps),
                reference=f"{BASELINE}@{args.backend[0]}")]
    tuned = None
    for backend in args.backend:
        sampler = DiTSampler(Bundle.load(dense), get_backend(backend))
        z_T = sampler.initial_noise(1, seed=0)
        tuned = tuned or tuned_plan(sampler, steps, guidance, args.target_speedup, {"classes": labels})
        run = lambda o, s=sampler: s.sample(labels, o, init_noise=z_T)  # noqa: E731
        rows += plan_rows(sampler, run, {
            BASELINE: "all", "key-step (FasterDiffusion)": "default",
            f"block cache blocks{long}:uniform:{args.interval}": f"blocks{long}:uniform:{args.interval}",
            f"block cache blocks{short}:uniform:{args.interval}": f"blocks{short}:uniform:{args.interval}",
            f"tuned: {tuned}": tuned}, steps, guidance, backend)
        narrow = DiTSampler(Bundle.load(width), get_backend(backend))
        run = lambda o, s=narrow: s.sample(labels, o, init_noise=z_T)  # noqa: E731
        width_rows = plan_rows(narrow, run, {"DyDiT width profiles": "all", "DyDiT width + key steps": "default"},
                               steps, guidance, backend)
        for row in width_rows:
            row.reference = f"DyDiT width profiles@{backend}"
        rows += width_rows
    return f"DiT preset {args.preset} ({depth} blocks; random weights)", rows


def unet_bench(args, work: Path) -> tuple[str, list[Row]]:
    import torch
    from DeepCache import DeepCacheSDHelper
    from diffusers import StableDiffusionPipeline

    from keystep.export.build import build_unet_bundle
    from keystep.runtime.backends.base import get_backend
    from keystep.runtime.bundle import Bundle
    from keystep.runtime.unet_sampler import UNetSampler

    from .unet import make_sd_dir

    guidance, steps, size, prompt = 7.5, args.steps, args.size, "a handwritten 7"
    sd_dir = make_sd_dir(work / "sd")
    bundle = build_unet_bundle(str(sd_dir), str(work / "unet"), steps=steps, cache=f"deep:{args.branch}",
                               progress=lambda m: None)
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=args.interval, cache_branch_id=args.branch)
    z_T = None

    def eager(cached: bool):
        if cached:
            helper.enable()
        try:
            with torch.inference_mode():
                return pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                            latents=torch.from_numpy(z_T), output_type="latent").images.numpy()
        finally:
            if cached:
                helper.disable()

    first = f"{BASELINE}@{args.backend[0]}"
    rows = [Row(EAGER, lambda: eager(False), reference=first),
            Row(f"{EAGER} + deepcache (I={args.interval}, B={args.branch})", lambda: eager(True), reference=first)]
    deep = f"deep{args.branch}:uniform:{args.interval}"
    tuned = None
    for backend in args.backend:
        sampler = UNetSampler(Bundle.load(bundle), get_backend(backend))
        z_T = sampler.initial_noise(1, size, size, seed=0) if z_T is None else z_T
        tuned = tuned or tuned_plan(sampler, steps, guidance, args.target_speedup, {"prompts": [prompt]})
        run = lambda o, s=sampler: s.sample([prompt], o, height=size, width=size, init_noise=z_T)  # noqa: E731
        default_h, default_w = sampler.default_size
        rows += plan_rows(sampler, run, {
            BASELINE: "all", "key-step (FasterDiffusion)": "default", f"DeepCache {deep}": deep,
            f"key steps, then DeepCache from step {steps // 3}": f"default+{deep}@{steps // 3}",
            f"tuned: {tuned}": tuned}, steps, guidance, backend, size * size / (default_h * default_w))
    return f"reduced SD UNet 160/320/640, {size}x{size} px (random weights)", rows


def to_markdown(what: str, rows: list[Row], peaks: dict, command: str, repeats: int, steps: int) -> str:
    by_key = {f"{r.name}@{r.backend}": r for r in rows}
    median = {key: statistics.median(r.times) for key, r in by_key.items()}
    eager = median[f"{EAGER}@PyTorch"]
    deepcache = next((k for k in by_key if "deepcache" in k), None)
    lines = [f"`{command}` — {cpu_name()}, {os.cpu_count()} cores; {what}; {steps} DDIM steps, CFG, batch 1; "
             f"median of {repeats} interleaved rounds", "",
             "| row | backend | s/image | min–max | vs diffusers | " + ("vs diffusers+DeepCache | " if deepcache else "")
             + "vs keystep baseline (same backend) | FLOP ratio | floor s | PSNR dB |",
             "|---|---|---|---|---|" + ("---|" if deepcache else "") + "---|---|---|---|"]
    for key, row in by_key.items():
        t = median[key]
        base_key = f"{BASELINE}@{row.backend}" if row.backend != "PyTorch" else None
        base_flops = next(r.flops for r in rows if r.name == BASELINE)
        # plain eager computes the baseline's FLOPs; eager + deepcache is not counted (its graph is PyTorch's)
        flops = row.flops if row.flops is not None else (base_flops if row.name == EAGER else None)
        ratio = "—" if flops is None else f"{flops / base_flops:.3f}"
        floor = f"{flops / (peaks[row.backend] * 1e9):.2f}" if row.backend in peaks else "—"
        fidelity = latent_psnr(row.latents, by_key[row.reference].latents)[0] if row.reference else None
        quality = "—" if fidelity is None or key == row.reference else ("∞" if np.isinf(fidelity) else f"{fidelity:.1f}")
        cells = [row.name, row.backend, f"{t:.3f}", f"{min(row.times):.3f}–{max(row.times):.3f}", f"{eager / t:.2f}×"]
        if deepcache:
            cells.append(f"{median[deepcache] / t:.2f}×")
        cells += [f"{median[base_key] / t:.2f}×" if base_key in median else "—", ratio, floor, quality]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> list[str]:
    """The markdown tables, one per model kind, and the backend peak line last."""
    import torch

    from keystep.runtime.backends.base import get_backend

    from ..cli.profile import measure_peak

    torch.set_num_threads(os.cpu_count() or 1)
    command = "python -m keystep.tools.bench " + " ".join(args.argv)
    peaks = {b: measure_peak(get_backend(b))["gflops_per_s"] for b in args.backend}
    work = Path(tempfile.mkdtemp(prefix="keystep-bench-"))
    tables = []
    for kind in (["dit", "unet"] if args.model == "both" else [args.model]):
        what, rows = (dit_bench if kind == "dit" else unet_bench)(args, work / kind)
        interleaved(rows, args.repeats)
        tables.append(to_markdown(what, rows, peaks, command.strip(), args.repeats, args.steps))
        print(tables[-1] + "\n", flush=True)
    tables.append("Backend peaks (float32 MatMul 1024³): " + ", ".join(f"{b} {p:.0f} GFLOP/s" for b, p in peaks.items()))
    print(tables[-1])
    return tables


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["unet", "dit", "both"], default="both")
    list_flag(parser, "--backend", default=["onnxruntime", "openvino"], choices=["onnxruntime", "openvino"])
    parser.add_argument("--preset", default="dit-s2", choices=["dit-s2", "dit-tiny"], help="DiT size")
    parser.add_argument("--size", type=int, default=128, help="UNet image height = width in pixels")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--interval", type=int, default=3, help="cache interval (DeepCache's, and the DiT's)")
    parser.add_argument("--branch", type=int, default=0, help="DeepCache cache_branch_id")
    parser.add_argument("--target-speedup", type=float, default=2.5, help="FLOP budget of the tuned rows")
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    tables = run(args)
    if args.markdown:  # run() printed them as it went
        Path(args.markdown).write_text("\n\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
