"""Text-to-video benchmark: diffusers' TextToVideoSDPipeline (eager PyTorch) vs keystep's baseline and key-step
plans on ONNX Runtime, each engine in its own process (their thread pools disturb each other in one).

    python -m keystep.tools.bench.video [--dir D] [--frames 16] [--size 256] [--steps 50] [--repeats 3]
                                        [--prepare] [--markdown FILE]

A random-weight reduced ModelScope-style UNet3D (block_out_channels 32/64/128, 2 layers per block, cross-attention
and temporal layers as in ModelScope's config; 2.6 GFLOP per 32x32 frame) with a small CLIP text encoder and VAE, saved as a diffusers
directory in ``--dir`` and built by the normal ``build`` path (both kept there: a re-run reuses them;
``--prepare`` only makes them, so the build can run outside the timed window). Then one process times the eager
pipeline (``output_type="latent"``, after one warm-up run) and one times keystep's plans (rounds interleaved, after
a 4-step warm-up of every plan), from the same z_T; the table reports medians, FLOPs and the key-step plan's speedup
against its FLOP bound. Decoders run one step per call, the CPU default (batched calls do not fit in memory here:
see ``PLANS``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .common import EAGER, report, save_random_sd_pipeline

# row -> (key-step spec, batch decoders, --max-decoder-batch). Only the CPU default (one decoder call per step) is
# timed: ONNX Runtime's CPU arena peaks at ~9 GB for the sequential key-step plan and ~15 GB once the full graph has
# run too (attention scores of 32 frame rows at 32x32 latents); a decoder call of two steps (64 frame rows) on top
# exceeds the machine's 24 GB, and an unbounded group (up to 480 frame rows) far more.
PLANS = {"baseline": ("all", True, None), "key-step, sequential": ("default", False, None)}
PROMPT = "a corgi running on the beach"
GUIDANCE = 9.0  # TextToVideoSDPipeline's default
UNET3D = dict(
    block_out_channels=(32, 64, 128), layers_per_block=2, attention_head_dim=4, cross_attention_dim=512,
    down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
)


def make_video_dir(path: Path, size: int, seed: int = 0) -> Path:
    import torch
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    torch.manual_seed(seed)
    unet = UNet3DConditionModel(sample_size=size // 8, **UNET3D)
    with torch.no_grad():  # ModelScope's temporal convs are trained; zero-initialised they would be identities
        for module in unet.modules():
            if type(module).__name__ == "TemporalConvLayer":
                module.conv4[-1].weight.normal_(0, 0.02)
    return save_random_sd_pipeline(TextToVideoSDPipeline, path, unet, text_width=512)


def prepare(work: Path, size: int, frames: int, steps: int) -> dict:
    """The model directory, the bundle and z_T in ``work`` (made once; their build time is recorded)."""
    from keystep.export.build import build_bundle

    info_path = work / "prepared.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if (info["size"], info["frames"], info["steps"]) == (size, frames, steps):
            return info
    work.mkdir(parents=True, exist_ok=True)
    model = make_video_dir(work / "model", size)
    t0 = time.perf_counter()
    build_bundle(str(model), str(work / "bundle"), steps=steps, frames=frames, progress=lambda m: print(m, file=sys.stderr))
    info = {"size": size, "frames": frames, "steps": steps, "build_seconds": time.perf_counter() - t0}
    rng = np.random.default_rng(0)
    np.save(work / "z_T.npy", rng.standard_normal((1, 4, frames, size // 8, size // 8), dtype=np.float32))
    info_path.write_text(json.dumps(info))
    return info


def run_eager(work: Path, info: dict, repeats: int) -> dict:
    import torch
    from diffusers import TextToVideoSDPipeline

    torch.set_num_threads(os.cpu_count() or 1)
    pipe = TextToVideoSDPipeline.from_pretrained(work / "model")
    pipe.set_progress_bar_config(disable=True)
    z_T = torch.from_numpy(np.load(work / "z_T.npy"))
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.inference_mode():
            latents = pipe(PROMPT, num_frames=info["frames"], height=info["size"], width=info["size"],
                           num_inference_steps=info["steps"], guidance_scale=GUIDANCE, latents=z_T.clone(),
                           output_type="latent").frames.numpy()
        if i:
            times.append(time.perf_counter() - t0)
    np.save(work / "latents-eager.npy", latents)
    return {EAGER: times}


def run_keystep(work: Path, info: dict, repeats: int) -> dict:
    from keystep.runtime.backends.base import get_backend
    from keystep.runtime.bundle import Bundle
    from keystep.runtime.sampler import SamplingOptions
    from keystep.runtime.video_sampler import VideoSampler

    sampler = VideoSampler(Bundle.load(work / "bundle"), get_backend("onnxruntime"))
    z_T = np.load(work / "z_T.npy")
    options = {name: SamplingOptions.from_bundle(sampler.bundle, num_steps=info["steps"], key_steps=spec,
                                                 guidance=GUIDANCE, parallel=batched, max_decoder_batch=most)
               for name, (spec, batched, most) in PLANS.items()}
    for o in options.values():  # warm-up: every session and call shape once, on a 4-step plan (a full round is minutes)
        sampler.sample([PROMPT], replace(o, num_steps=4, key_steps="all" if o.key_steps == "all" else "0"),
                       init_noise=z_T, num_frames=info["frames"])
    times = {name: [] for name in PLANS}
    host = {name: [] for name in PLANS}
    for _ in range(repeats):
        for name in PLANS:
            result = sampler.sample([PROMPT], options[name], init_noise=z_T, num_frames=info["frames"])
            times[name].append(result.total_seconds)
            host[name].append(result.host_seconds / result.total_seconds)
            np.save(work / f"latents-{name}.npy", result.latents)
    prepared = {name: sampler.prepare(o, 1) for name, o in options.items()}
    return {"times": times, "host": host,
            "flops": {name: sampler.plan_flops(p) for name, p in prepared.items()},
            "calls": {name: len(p.calls) for name, p in prepared.items()},
            "key_steps": len(prepared["key-step, sequential"].plan.key_steps),
            "evaluations": prepared["key-step, sequential"].plan.num_steps}


def engine_process(engine: str, work: Path, repeats: int) -> dict:
    """Run one engine in a fresh interpreter; it writes its results as JSON."""
    out = work / f"result-{engine}.json"
    out.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "keystep.tools.bench.video", "--dir", str(work), "--engine", engine,
                    "--repeats", str(repeats)], check=True)
    return json.loads(out.read_text())


def combine(info: dict, eager: dict, ours: dict, work: Path, repeats: int) -> dict:
    times = {**eager, **ours["times"]}
    flops = {**ours["flops"], EAGER: ours["flops"]["baseline"]}
    baseline, reference = np.load(work / "latents-baseline.npy"), np.load(work / "latents-eager.npy")
    return {
        "steps": info["steps"], "repeats": repeats, "guidance": GUIDANCE,
        "median": {k: statistics.median(v) for k, v in times.items()},
        "spread": {k: (min(v), max(v)) for k, v in times.items()},
        "host_fraction": {k: statistics.median(v) for k, v in ours["host"].items()},
        "calls": ours["calls"], "key_steps": ours["key_steps"], "evaluations": ours["evaluations"], "flops": flops,
        "max_abs_diff_baseline_vs_eager": float(np.abs(baseline - reference).max()),
        "build_seconds": info["build_seconds"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="where the model, bundle and results live (default: a new temp dir)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="frame height = width in pixels")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prepare", action="store_true", help="only make the model directory and the bundle")
    parser.add_argument("--reuse-eager", action="store_true",
                        help="keep the eager results already in --dir (same model and settings) and time keystep only")
    parser.add_argument("--engine", choices=["eager", "keystep"], help=argparse.SUPPRESS)  # the child processes
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="keystep-bench-video-"))
    if args.engine:
        info = json.loads((work / "prepared.json").read_text())
        run = run_eager if args.engine == "eager" else run_keystep
        (work / f"result-{args.engine}.json").write_text(json.dumps(run(work, info, args.repeats)))
        return 0
    info = prepare(work, args.size, args.frames, args.steps)
    if args.prepare:
        print(f"prepared {work} (bundle build {info['build_seconds']:.0f} s)")
        return 0
    kept = work / "result-eager.json"
    eager = json.loads(kept.read_text()) if args.reuse_eager and kept.is_file() else engine_process(
        "eager", work, args.repeats)
    ours = engine_process("keystep", work, args.repeats)
    r = combine(info, eager, ours, work, min(len(v) for v in (*eager.values(), *ours["times"].values())))
    command = (f"python -m keystep.tools.bench.video --frames {args.frames} --size {args.size} --steps {args.steps} "
               f"--repeats {args.repeats}")
    what = (f"reduced UNet3D 32/64/128 (2 layers/block, temporal conv + attention), {args.frames} frames of "
            f"{args.size}×{args.size} px, DDIM; eager and keystep rows each in their own process")
    report(r, command, what, args.markdown, unit="video")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
