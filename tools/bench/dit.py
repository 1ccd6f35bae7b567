"""DiT benchmark: diffusers eager PyTorch vs keystep baseline plan vs key-step plan, in one process and one run.

    python -m keystep.tools.bench.dit [--preset dit-s2] [--steps 50] [--repeats 5] [--markdown FILE]

The model is a random-weight diffusers ``DiTTransformer2DModel`` of the preset's size, saved to a temp dir and built
into a bundle by the normal ``build`` path, so both sides run exactly the same weights. Runs are interleaved
(eager, baseline, key-step, eager, ...) so machine noise hits all rows alike; the table reports medians.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import measure, one_model_main


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


def diffusers_ddim_config(clip_sample: bool) -> dict:
    """diffusers' DDIMScheduler config on DiT's training betas: the eager rows' scheduler. DiT's own schedule also
    names keystep-only keys (``timestep_respacing`` of its respaced DDIM), which DDIMScheduler refuses."""
    from diffusers import DDIMScheduler

    from keystep.export.build import DIT_TRAINING_SCHEDULE

    accepted = DDIMScheduler.__init__.__code__.co_varnames
    return {"_class_name": "DDIMScheduler", **{k: v for k, v in DIT_TRAINING_SCHEDULE.items() if k in accepted},
            "clip_sample": clip_sample}


def run(preset: str, steps: int, repeats: int, guidance: float = 4.0) -> dict:
    import torch
    from diffusers import DDIMScheduler

    from keystep.export.build import build_dit_bundle
    from keystep.runtime.backends.base import get_backend
    from keystep.runtime.bundle import Bundle
    from keystep.runtime.dit_sampler import DiTSampler

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="keystep-bench-"))
    transformer = make_diffusers_dit(preset, seed=0)
    transformer.save_pretrained(work / "transformer")
    # bundle and eager loop sample with diffusers' DDIM on DiT's betas, clipping x0 as random weights need (their
    # unclipped samples grow to |x| ~ 1e3 and the two loops' float32 differences with them)
    config = diffusers_ddim_config(clip_sample=True)
    (work / "scheduler.json").write_text(json.dumps(config))
    reference_scheduler = DDIMScheduler.from_config(config)
    t0 = time.perf_counter()
    bundle_dir = build_dit_bundle(str(work / "transformer"), str(work / "bundle"), steps=steps,
                                  scheduler_config=str(work / "scheduler.json"), progress=lambda m: None)
    build_seconds = time.perf_counter() - t0
    sampler = DiTSampler(Bundle.load(bundle_dir), get_backend("onnxruntime"))
    labels = [207 % sampler.num_classes]
    z_T = sampler.initial_noise(1, seed=0)
    result = measure(
        sampler,
        lambda options: sampler.sample(labels, options, init_noise=z_T),
        lambda: eager_diffusers_loop(transformer, reference_scheduler, z_T, labels, guidance, steps),
        steps, guidance, repeats, images=1,
    )
    return {**result, "preset": preset, "build_seconds": build_seconds}


main = one_model_main("keystep.tools.bench.dit", __doc__, run, lambda preset: f"DiT preset {preset}, DDIM",
                      repeats=5, flag="--preset", default="dit-s2")


if __name__ == "__main__":
    raise SystemExit(main())
