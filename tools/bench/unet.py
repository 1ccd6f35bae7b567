"""SD-like UNet benchmark: diffusers' StableDiffusionPipeline (eager PyTorch) vs keystep's plans, one process.

    python -m keystep.tools.bench.unet [--size 256] [--steps 50] [--repeats 3] [--markdown FILE]

A random-weight reduced SD UNet (block_out_channels 160/320/640, 2 layers per block, cross-attention 768) with a
small CLIP text encoder and VAE, saved as a diffusers directory and built by the normal ``build`` path.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from .common import measure, one_model_main, save_random_sd_pipeline


def make_sd_dir(path: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(160, 320, 640), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
        sample_size=32, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    return save_random_sd_pipeline(StableDiffusionPipeline, path, unet, text_width=768, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def run(size: int, steps: int, repeats: int, guidance: float = 7.5) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from keystep.export.build import build_unet_bundle
    from keystep.runtime.backends.base import get_backend
    from keystep.runtime.bundle import Bundle
    from keystep.runtime.unet_sampler import UNetSampler

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="keystep-bench-unet-"))
    sd_dir = make_sd_dir(work / "sd")
    t0 = time.perf_counter()
    bundle_dir = build_unet_bundle(str(sd_dir), str(work / "bundle"), steps=steps, progress=lambda m: None)
    build_seconds = time.perf_counter() - t0
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    sampler = UNetSampler(Bundle.load(bundle_dir), get_backend("onnxruntime"))
    prompt = "a handwritten 7"
    z_T = sampler.initial_noise(1, size, size, seed=0)

    def eager():
        with torch.inference_mode():
            return pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                        latents=torch.from_numpy(z_T), output_type="latent").images.numpy()

    result = measure(
        sampler,
        lambda options: sampler.sample([prompt], options, height=size, width=size, init_noise=z_T),
        eager, steps, guidance, repeats, images=1,
    )
    return {**result, "size": size, "build_seconds": build_seconds}


main = one_model_main("keystep.tools.bench.unet", __doc__, run,
                      lambda size: f"reduced SD UNet 160/320/640, {size}×{size} px, DDIM", repeats=3,
                      flag="--size", type=int, default=256, help="image height = width in pixels")


if __name__ == "__main__":
    raise SystemExit(main())
