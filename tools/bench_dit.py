"""DiT benchmark: diffusers eager PyTorch vs keystep baseline plan vs key-step plan, in one process and one run.

    python -m keystep.tools.bench_dit [--preset dit-s2] [--steps 50] [--repeats 5] [--markdown FILE]

The model is a random-weight diffusers ``DiTTransformer2DModel`` of the preset's size, saved to a temp dir and built
into a bundle by the normal ``build`` path, so both sides run exactly the same weights. Runs are interleaved
(eager, baseline, key-step, eager, ...) so machine noise hits all rows alike; the table reports medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_diffusers_dit(preset: str, seed: int):
    import torch
    from diffusers import DiTTransformer2DModel

    from keystep.export.random_models import DIT_PRESETS

    p = DIT_PRESETS[preset]
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=p["num_heads"],
        attention_head_dim=p["hidden_size"] // p["num_heads"],
        in_channels=p["in_channels"],
        out_channels=p["in_channels"] * (2 if p["learn_sigma"] else 1),
        num_layers=p["depth"],
        sample_size=p["input_size"],
        patch_size=p["patch_size"],
        num_embeds_ada_norm=p["num_classes"],
    ).eval()
    # a DiT has one timestep/class embedder; diffusers keeps a copy per block, which random init makes differ
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


def eager_diffusers_loop(transformer, scheduler, z_T, labels, guidance: float, steps: int) -> np.ndarray:
    """diffusers' DiTPipeline denoising loop (same CFG and learned-sigma handling), without the VAE."""
    import torch

    scheduler.set_timesteps(steps)
    channels = transformer.config.in_channels
    latents = torch.from_numpy(z_T)
    y = torch.tensor(labels + [transformer.config.num_embeds_ada_norm] * len(labels))
    with torch.inference_mode():
        for t in scheduler.timesteps:
            x = torch.cat([latents, latents])
            out = transformer(x, timestep=t.expand(len(x)), class_labels=y).sample[:, :channels]
            cond, uncond = out.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return latents.numpy()


def run(preset: str, steps: int, repeats: int, guidance: float = 4.0) -> dict:
    import torch
    from diffusers import DDIMScheduler

    from keystep.export.build import DIT_TRAINING_SCHEDULE, build_dit_bundle
    from keystep.runtime.backends.base import get_backend
    from keystep.runtime.bundle import Bundle
    from keystep.runtime.dit_sampler import DiTSampler
    from keystep.runtime.sampler import SamplingOptions

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="keystep-bench-"))
    transformer = make_diffusers_dit(preset, seed=0)
    transformer.save_pretrained(work / "transformer")
    fields = {k: v for k, v in DIT_TRAINING_SCHEDULE.items() if not k.startswith("_")}
    reference_scheduler = DDIMScheduler(**fields)
    t0 = time.perf_counter()
    bundle_dir = build_dit_bundle(str(work / "transformer"), str(work / "bundle"), steps=steps, scheduler="ddim",
                                  progress=lambda m: None)
    build_seconds = time.perf_counter() - t0
    bundle = Bundle.load(bundle_dir)
    sampler = DiTSampler(bundle, get_backend("onnxruntime"))
    labels = [207 % bundle.model_config["num_classes"]]
    z_T = sampler.initial_noise(1, seed=0)
    plans = {"baseline": ("all", True), "key-step": ("default", True), "key-step, sequential": ("default", False)}
    options = {
        name: SamplingOptions.from_bundle(bundle, num_steps=steps, key_steps=spec, guidance=guidance, parallel=par)
        for name, (spec, par) in plans.items()
    }

    times: dict[str, list[float]] = {"diffusers eager": [], **{name: [] for name in plans}}
    host: dict[str, list[float]] = {name: [] for name in plans}
    results = {}
    for i in range(repeats + 1):  # first round is warm-up
        t0 = time.perf_counter()
        results["diffusers eager"] = eager_diffusers_loop(transformer, reference_scheduler, z_T, labels, guidance,
                                                          steps)
        eager = time.perf_counter() - t0
        if i:
            times["diffusers eager"].append(eager)
        for name in plans:
            r = sampler.sample(labels, options[name], init_noise=z_T)
            results[name] = r.latents
            if i:
                times[name].append(r.total_seconds)
                host[name].append(r.host_seconds / r.total_seconds)
    prepared = {name: sampler.prepare(options[name], len(labels)) for name in plans}
    flops = {name: sampler.plan_flops(p) for name, p in prepared.items()}
    flops["diffusers eager"] = flops["baseline"]
    return {
        "preset": preset,
        "steps": steps,
        "repeats": repeats,
        "build_seconds": build_seconds,
        "median": {k: statistics.median(v) for k, v in times.items()},
        "spread": {k: (min(v), max(v)) for k, v in times.items()},
        "host_fraction": {k: statistics.median(v) for k, v in host.items()},
        "calls": {name: len(p.calls) for name, p in prepared.items()},
        "key_steps": len(prepared["key-step"].plan.key_steps),
        "flops": flops,
        "max_abs_diff_baseline_vs_eager": float(np.abs(results["baseline"] - results["diffusers eager"]).max()),
    }


def to_markdown(r: dict) -> str:
    eager = r["median"]["diffusers eager"]
    base = r["median"]["baseline"]
    lines = [
        f"`python -m keystep.tools.bench_dit --preset {r['preset']} --steps {r['steps']} --repeats {r['repeats']}` "
        f"— {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{r['steps']} DDIM steps, CFG 4.0, batch 1, median of {r['repeats']} interleaved runs",
        "",
        "| row | s/image (median) | min–max | vs diffusers | vs baseline | GFLOP | FLOP bound vs baseline | host share |",
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
    for name in ("key-step", "key-step, sequential"):
        speedup = base / r["median"][name]
        bound = r["flops"]["baseline"] / r["flops"][name]
        lines.append(
            f"{name}: {r['key_steps']} key steps of {r['steps']}, {r['calls'][name]} stage calls "
            f"(baseline {r['calls']['baseline']}); measured speedup {speedup:.3f}× = {speedup / bound:.3f} × the FLOP "
            f"bound {bound:.3f}×."
        )
    lines += [
        f"Baseline vs diffusers eager latents: max |diff| "
        f"{r['max_abs_diff_baseline_vs_eager']:.2e}. Bundle build: {r['build_seconds']:.1f} s.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="dit-s2")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    text = to_markdown(run(args.preset, args.steps, args.repeats))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
