"""Train ``digits-sd``, the Stable-Diffusion-shaped demo model, from scratch on the digits (CPU, seeded, one command).

    python -m keystep.tools.train.sd --out models/digits-sd [--iters 1200] [--seed 0]

Three parts, as in Stable Diffusion, except that it works in pixel space (16x16x1, no VAE; see docs/models.md):

* a byte-level BPE tokenizer in CLIP's format, trained on the prompt corpus (tools/train/digit_prompts.py: ten phrasings
  per digit, "a handwritten 7", "the digit seven", ...);
* a CLIPTextModel (hidden 64, 2 layers, 4 heads, 16 positions) and
* a UNet2DConditionModel (pixel space, channels 32/64/64, cross-attention at 8x8 and 4x4 and in the mid block),

the text encoder and UNet trained jointly: DDPM with linear betas over 1000 steps (models.DDPM_LINEAR), epsilon MSE,
10 % of the prompts replaced by the empty prompt (classifier-free guidance's unconditional text), AdamW, an EMA of
both (what is saved). The timestep sampler is SpeeDiT's by default (docs/models.md: it trained the digits DiT ~3x
faster than uniform sampling). Saved as a diffusers-style directory (model_index.json, unet/, text_encoder/,
tokenizer/, scheduler/; safetensors weights) written to a temp directory and renamed into place, with
``training.json`` (iterations, seed, seconds, final loss).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from .digit_prompts import UNCONDITIONAL, all_prompts
from .timestep_sampling import SAMPLERS, TimestepSampler, linear_alphas_cumprod

TEXT_LEN = 16  # context length: the longest prompt is 8 tokens with bos/eos
TEXT_ENCODER = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=TEXT_LEN)
UNET = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_ENCODER["hidden_size"], attention_head_dim=8, norm_num_groups=8,
)
PROMPT_DROPOUT = 0.1
EMA_DECAY = 0.995  # ~200-iteration horizon: a 0.999 EMA would still lag the short run (see docs/models.md)
MODEL_INDEX = {
    # diffusers has no pixel-space SD pipeline class: the parts load with their own from_pretrained
    "_class_name": "PixelSpaceStableDiffusion",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
}


def new_models(vocab: dict[str, int], seed: int):
    """(CLIPTextModel, UNet2DConditionModel) with their default initialisation, seeded."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .clip_bpe import ENDOFTEXT, STARTOFTEXT

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), bos_token_id=vocab[STARTOFTEXT], eos_token_id=vocab[ENDOFTEXT],
        pad_token_id=vocab[ENDOFTEXT], **TEXT_ENCODER))
    return text_encoder, UNet2DConditionModel(**UNET)


def save_sd_dir(out: Path, text_encoder, unet, tokenizer_dir: Path, info: dict) -> None:
    """The diffusers-style directory, written next to ``out`` and renamed into place (never half a model)."""
    from keystep.models import DDPM_LINEAR

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    (tmp / "scheduler").mkdir()
    scheduler = {"_class_name": "DDIMScheduler", **DDPM_LINEAR}
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def train(out: Path, iters: int, batch: int = 64, lr: float = 1e-3, seed: int = 0, sampler: str = "speedit",
          threads: int | None = 1, progress=print) -> dict:
    import copy
    import tempfile

    import torch

    from keystep.runtime.tokenizer import ClipTokenizer

    from .clip_bpe import save_clip_tokenizer, train_merges
    from .digits import load_digit_images
    from .dit import update_ema

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    corpus = all_prompts()  # [digit][template]
    templates = len(corpus[0])
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = Path(scratch) / "tokenizer"
        vocab = save_clip_tokenizer(tokenizer_dir, train_merges(p for row in corpus for p in row), TEXT_LEN)
        tokenizer = ClipTokenizer.from_dir(tokenizer_dir)
        prompt_ids = torch.from_numpy(tokenizer.encode([p for row in corpus for p in row]))  # row = digit*T + template
        empty_ids = torch.from_numpy(tokenizer.encode([UNCONDITIONAL]))[0]

        images, labels = load_digit_images()
        x0_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
        text_encoder, unet = new_models(vocab, seed)
        text_encoder.train(), unet.train()
        params = [*text_encoder.parameters(), *unet.parameters()]
        ema_text, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
        alphas = linear_alphas_cumprod()
        sqrt_a = torch.from_numpy(np.sqrt(alphas)).float()
        sqrt_1ma = torch.from_numpy(np.sqrt(1 - alphas)).float()
        timesteps = TimestepSampler(sampler, alphas)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        warmup = min(100, iters // 10 + 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
        losses, start = [], time.perf_counter()
        for it in range(1, iters + 1):
            idx = torch.from_numpy(rng.integers(0, len(x0_all), batch))
            x0 = x0_all[idx]
            ids = prompt_ids[y_all[idx] * templates + torch.from_numpy(rng.integers(0, templates, batch))]
            ids[torch.from_numpy(rng.random(batch) < PROMPT_DROPOUT)] = empty_ids
            t, weights = timesteps.sample(batch, rng)
            t = torch.from_numpy(np.asarray(t))
            noise = torch.randn_like(x0)
            xt = sqrt_a[t].view(-1, 1, 1, 1) * x0 + sqrt_1ma[t].view(-1, 1, 1, 1) * noise
            text = text_encoder(ids).last_hidden_state
            per_sample = ((unet(xt, t, text).sample - noise) ** 2).mean(dim=(1, 2, 3))
            loss = (torch.from_numpy(weights).float() * per_sample).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            schedule.step()
            update_ema(ema_text, text_encoder, it, EMA_DECAY)
            update_ema(ema_unet, unet, it, EMA_DECAY)
            losses.append(float(per_sample.detach().mean()))
            if it % 50 == 0 or it == iters:
                progress(f"iter {it}/{iters}  loss {np.mean(losses[-50:]):.4f}  {time.perf_counter() - start:.0f} s")
        seconds = time.perf_counter() - start
        info = {"iters": iters, "batch": batch, "lr": lr, "seed": seed, "sampler": sampler, "threads": threads,
                "seconds": round(seconds, 1), "final_loss": float(np.mean(losses[-50:])),
                "command": f"python -m keystep.tools.train.sd --out {out} --iters {iters} --seed {seed}"}
        save_sd_dir(out, ema_text, ema_unet, tokenizer_dir, info)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the diffusers-style directory to write")
    parser.add_argument("--iters", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default="speedit", choices=SAMPLERS, help="training timestep sampler")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default; more than the idle cores slows it down a lot)")
    args = parser.parse_args(argv)
    info = train(Path(args.out), args.iters, args.batch, args.lr, args.seed, args.sampler, args.threads)
    print(f"trained in {info['seconds']:.0f} s, final loss {info['final_loss']:.4f} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
