"""Train the shipped class-conditional pixel-space DiT on the digits (CPU, seeded, one command).

    python -m keystep.tools.train.dit --out models/digits-dit.safetensors [--iters 3000] [--sampler uniform]

DDPM training as in DiT: linear betas over 1000 steps, epsilon MSE, class dropout 10 % (null class = 10) so the model
supports classifier-free guidance, AdamW, an EMA of the weights (what is saved, in the original DiT key layout with
``num_heads`` in the safetensors metadata). ``--sampler speedit|speed`` switches the timestep sampler and loss
weights (see timestep_sampling.py). ``--checkpoints 500,1000`` also saves the EMA at those iterations.
``--max-minutes M`` stops after M minutes with the whole state saved; ``--resume`` continues it (resumable.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .resumable import (Budget, StateError, add_resume_arguments, capture_rng, checkpoint_iterations,
                        default_state_path, load_state, restore_rng, run_chunk, save_state)
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


STATE_KIND = "dit-train"


def train(out: Path, iters: int | None, sampler: str = "uniform", batch: int = 128, lr: float = 1e-3, seed: int = 0,
          checkpoints: tuple[int, ...] = (), progress=print, state_path: Path | None = None, resume: bool = False,
          max_minutes: float | None = None, chunk_iters: int | None = None) -> dict:
    """Train (or, with ``resume``, continue the run saved in ``state_path``) until ``iters``, the time budget or
    ``chunk_iters`` more iterations -> {"done", "iteration", "seconds", "final_loss"}. The EMA is written to ``out``
    when the run completes. With a time budget or chunks the whole state is saved (default: OUT.state.pt)."""
    import copy

    import torch

    from .digits import load_digit_images

    state_path = state_path or default_state_path(out)
    saved = load_state(state_path, STATE_KIND) if resume else None
    if saved is not None:
        recipe = saved["recipe"]
        iters = recipe["iters"] if iters is None else iters
        if iters < saved["iteration"]:
            raise StateError(f"--iters {iters} is below the {saved['iteration']} iterations already run")
        sampler, batch, lr, seed = recipe["sampler"], recipe["batch"], recipe["lr"], recipe["seed"]
        warmup = recipe["warmup"]
    else:
        warmup = min(200, iters // 10 + 1)
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
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    losses, start_it, seconds = [], 0, 0.0
    if saved is not None:
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        restore_rng(saved["rng"], rng)
        losses, start_it, seconds = saved["losses"], saved["iteration"], saved["seconds"]
    budget = Budget(max_minutes)
    stop = iters if chunk_iters is None else min(iters, start_it + chunk_iters)
    it = start_it
    for it in range(start_it + 1, stop + 1):
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
        losses = [*losses[-99:], float(per_sample.detach().mean())]
        elapsed = seconds + budget.elapsed()
        if it % 100 == 0 or it == iters:
            progress(f"iter {it}/{iters}  loss {np.mean(losses):.4f}  {elapsed:.0f} s")
        if it in checkpoints:
            save_dit(ema, out.with_name(f"{out.stem}-{it}{out.suffix}"), {"iters": str(it), "sampler": sampler})
        if budget.expired():
            break
    seconds += budget.elapsed()
    done = it >= iters
    if not done or max_minutes is not None or chunk_iters is not None or resume:
        save_state(state_path, STATE_KIND, {
            "recipe": {"iters": iters, "sampler": sampler, "batch": batch, "lr": lr, "seed": seed, "warmup": warmup},
            "iteration": it, "seconds": seconds, "losses": losses, "model": model.state_dict(),
            "ema": ema.state_dict(), "optimizer": opt.state_dict(), "schedule": schedule.state_dict(),
            "rng": capture_rng(rng)})
    if done:
        save_dit(ema, out, {"iters": str(iters), "sampler": sampler, "seed": str(seed), "batch": str(batch),
                            "lr": str(lr), "train_seconds": str(round(seconds))})
    return {"done": done, "iteration": it, "seconds": seconds, "final_loss": float(np.mean(losses))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, help="total iterations (default 3000; with --resume: the saved run's)")
    parser.add_argument("--sampler", default="uniform", choices=SAMPLERS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    add_resume_arguments(parser, checkpoints_help="also save the EMA at these iterations (comma list)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    checkpoints = checkpoint_iterations(parser, args.checkpoints)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    iters = args.iters or (None if args.resume else 3000)
    r = run_chunk(lambda: train(Path(args.out), iters, args.sampler, args.batch, args.lr, args.seed, checkpoints,
                                state_path=Path(args.state) if args.state else None, resume=args.resume,
                                max_minutes=args.max_minutes), "keystep.tools.train.dit", args.out)
    if isinstance(r, int):
        return r
    print(f"trained in {r['seconds']:.0f} s, final loss {r['final_loss']:.4f} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
