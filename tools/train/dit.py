"""Train the shipped class-conditional pixel-space DiT on the digits (CPU, seeded, one command).

    python -m keystep.tools.train.dit --out models/digits-dit.safetensors [--iters 3000] [--sampler uniform]

DDPM training as in DiT: linear betas over 1000 steps, epsilon MSE, class dropout 10 % (null class = 10) so the model
supports classifier-free guidance, AdamW, an EMA of the weights (what is saved, in the original DiT key layout with
``num_heads`` in the safetensors metadata). ``--sampler speedit|speed`` switches the timestep sampler and loss
weights (see timestep_sampling.py). ``--checkpoints 500,1000`` also saves the EMA at those iterations.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .timestep_sampling import SAMPLERS, TimestepSampler, linear_alphas_cumprod

DIGITS_DIT = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=128, depth=6, num_heads=4,
                  mlp_hidden=512, num_classes=10, learn_sigma=False)
CLASS_DROPOUT = 0.1


def new_digits_dit(seed: int):
    """DiT with its training initialisation: adaLN-Zero (modulations and the final layer start at 0)."""
    import torch

    from keystep.export.dit_model import DiT, DiTConfig
    from keystep.export.random_models import sincos_pos_embed

    torch.manual_seed(seed)
    cfg = DiTConfig(**DIGITS_DIT)
    model = DiT(cfg)
    with torch.no_grad():
        model.pos_embed.copy_(torch.from_numpy(sincos_pos_embed(cfg.hidden_size, cfg.input_size // cfg.patch_size))[None])
        for module in [*(b.ada for b in model.blocks), model.final_ada, model.final_linear]:
            module.weight.zero_()
            module.bias.zero_()
        torch.nn.init.normal_(model.y_table.weight, std=0.02)
    return model


def update_ema(ema, model, iteration: int, max_decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, the decay warming up as (1 + it) / (10 + it) to ``max_decay``."""
    import torch

    decay = min(max_decay, (1 + iteration) / (10 + iteration))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(decay).add_(p, alpha=1 - decay)


def save_checkpoint(state: dict, path: Path, metadata: dict) -> None:
    """safetensors written to a temp name, then renamed: never a half-written model file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    tmp.rename(path)


def save_dit(model, path: Path, extra_metadata: dict | None = None) -> None:
    from keystep.export.dit_loaders import original_state_dict

    save_checkpoint(original_state_dict(model), path, {"num_heads": model.config.num_heads, **(extra_metadata or {})})


def train(out: Path, iters: int, sampler: str = "uniform", batch: int = 128, lr: float = 1e-3, seed: int = 0,
          checkpoints: tuple[int, ...] = (), progress=print) -> dict:
    import copy

    import torch

    from .digits import load_digit_images

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images, labels = load_digit_images()
    x0_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    model = new_digits_dit(seed).train()
    ema = copy.deepcopy(model).eval()
    alphas = linear_alphas_cumprod()
    sqrt_a = torch.from_numpy(np.sqrt(alphas)).float()
    sqrt_1ma = torch.from_numpy(np.sqrt(1 - alphas)).float()
    timesteps = TimestepSampler(sampler, alphas)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, iters // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    losses, start = [], time.perf_counter()
    for it in range(1, iters + 1):
        idx = torch.from_numpy(rng.integers(0, len(x0_all), batch))
        x0, y = x0_all[idx], y_all[idx].clone()
        y[torch.from_numpy(rng.random(batch) < CLASS_DROPOUT)] = DIGITS_DIT["num_classes"]
        t, weights = timesteps.sample(batch, rng)
        t = torch.from_numpy(np.asarray(t))
        noise = torch.randn_like(x0)
        xt = sqrt_a[t].view(-1, 1, 1, 1) * x0 + sqrt_1ma[t].view(-1, 1, 1, 1) * noise
        per_sample = ((model(xt, t.float(), y) - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (torch.from_numpy(weights) * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        update_ema(ema, model, it, 0.999)
        losses.append(float(per_sample.detach().mean()))
        if it % 100 == 0 or it == iters:
            progress(f"iter {it}/{iters}  loss {np.mean(losses[-100:]):.4f}  {time.perf_counter() - start:.0f} s")
        if it in checkpoints:
            save_dit(ema, out.with_name(f"{out.stem}-{it}{out.suffix}"), {"iters": str(it), "sampler": sampler})
    save_dit(ema, out, {"iters": str(iters), "sampler": sampler, "seed": str(seed)})
    return {"seconds": time.perf_counter() - start, "final_loss": float(np.mean(losses[-100:]))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--sampler", default="uniform", choices=SAMPLERS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoints", default="", help="also save the EMA at these iterations (comma list)")
    args = parser.parse_args(argv)
    checkpoints = tuple(int(c) for c in args.checkpoints.split(",") if c)
    r = train(Path(args.out), args.iters, args.sampler, args.batch, args.lr, args.seed, checkpoints)
    print(f"trained in {r['seconds']:.0f} s, final loss {r['final_loss']:.4f} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
