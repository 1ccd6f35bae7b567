"""SD-like UNet benchmark: diffusers' StableDiffusionPipeline (eager PyTorch) vs keystep's plans, one process.

    python -m keystep.tools.bench.unet [--size 256] [--steps 50] [--repeats 3] [--markdown FILE]

A random-weight reduced SD UNet (block_out_channels 160/320/640, 2 layers per block, cross-attention 768) with a
small CLIP text encoder and VAE, saved as a diffusers directory and built by the normal ``build`` path.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from .common import measure, report


def make_sd_dir(path: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from keystep.runtime.tokenizer import bytes_to_unicode

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(160, 320, 640), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
        sample_size=32, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=2, vocab_size=1000,
        max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513))
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    (path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    return path


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image height = width in pixels")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    r = run(args.size, args.steps, args.repeats)
    command = f"python -m keystep.tools.bench.unet --size {args.size} --steps {args.steps} --repeats {args.repeats}"
    report(r, command, f"reduced SD UNet 160/320/640, {args.size}×{args.size} px, DDIM", args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
