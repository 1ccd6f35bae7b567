"""Fine-tune a shipped DiT into a DyDiT at FLOPs target λ, saved in the official DyDiT checkpoint layout.

    python -m keystep.tools.train.dydit --base models/digits-dit.safetensors --target 0.5 \\
        --out models/digits-dydit-0.5.safetensors [--iters 800]

The DyDiT recipe (ICLR 2025, official code): routers on every block — width routers Linear(hidden -> heads-1) on the
timestep embedding (head / group 0 always on), a token router MLP on the post-attention stream — initialised to let
everything through (bias 15, token router 35); hard Gumbel-sigmoid (τ = 5) with a straight-through gradient while
training; loss = diffusion loss of the dynamic model + diffusion loss of the full-width model (same weights) +
2 (FLOPs ratio − target)², the target warmed up linearly from 1.0 to λ; FLOPs by DyDiT's accounting (attention ∝
active heads, MLP ∝ active groups × active tokens, per sample, averaged over the batch).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .timestep_sampling import linear_alphas_cumprod

GUMBEL_TAU = 5.0
FLOPS_LOSS_WEIGHT = 2.0
WIDTH_ROUTER_LR, TOKEN_ROUTER_LR = 0.05, 0.1


def gumbel_sigmoid_st(logits, tau: float = GUMBEL_TAU):
    """Hard 0/1 sample of sigmoid((logits + Gumbel noise difference) / tau), straight-through gradient."""
    import torch

    u1, u2 = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6), torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    noise = -torch.log(torch.log(u2) / torch.log(u1))
    soft = torch.sigmoid((logits + noise) / tau)
    hard = (soft > 0.5).to(logits.dtype)
    return hard - soft.detach() + soft


def add_routers(model):
    """Attach DyDiT routers initialised to keep every unit and token on -> WidthRouters."""
    import torch

    from keystep.export.dydit import WidthRouters, token_router

    cfg = model.config
    routers = WidthRouters(cfg.hidden_size, cfg.depth, cfg.num_heads)
    with torch.no_grad():
        for router in [*routers.attn, *routers.mlp]:
            torch.nn.init.normal_(router.weight, std=1e-3)
            router.bias.fill_(15.0)
        for block in model.blocks:
            block.token_router = token_router(cfg.hidden_size)
            torch.nn.init.normal_(block.token_router[2].weight, std=1e-3)
            block.token_router[2].bias.fill_(35.0)
    return routers


def dydit_state_dict(model, routers) -> dict:
    """Original DiT keys + the official router keys."""
    from keystep.export.dit_loaders import original_state_dict

    sd = original_state_dict(model)
    for i, block in enumerate(model.blocks):
        for w in ("weight", "bias"):
            sd[f"blocks.{i}.attn_rate.router.{w}"] = getattr(routers.attn[i], w).detach().clone()
            sd[f"blocks.{i}.mlp_rate.router.{w}"] = getattr(routers.mlp[i], w).detach().clone()
            for j in (0, 2):
                sd[f"blocks.{i}.token_selection.mlp_head.{j}.{w}"] = getattr(block.token_router[j], w).detach().clone()
    return sd


def train(base: str, target: float, out: Path, iters: int, batch: int = 128, lr: float = 2e-4, seed: int = 0,
          warmup: int | None = None, progress=print) -> dict:
    import torch

    from keystep.export.dit_loaders import load_dit
    from keystep.runtime.width import UnitFlops

    from .digits import load_digit_images
    from .dit import CLASS_DROPOUT, save_checkpoint

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = load_dit(base).model.train()
    cfg = model.config
    routers = add_routers(model).train()
    images, labels = load_digit_images()
    x0_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    alphas = linear_alphas_cumprod()
    sqrt_a = torch.from_numpy(np.sqrt(alphas)).float()
    sqrt_1ma = torch.from_numpy(np.sqrt(1 - alphas)).float()
    unit = UnitFlops.of(cfg)
    dense = unit.dense(cfg.depth, cfg.num_heads)
    token_params = [p for b in model.blocks for p in b.token_router.parameters()]
    token_ids = {id(p) for p in token_params}
    dit_params = [p for p in model.parameters() if id(p) not in token_ids]
    params = [*dit_params, *routers.parameters(), *token_params]
    # Routers start saturated (bias 15 / 35) and Adam moves a parameter ~lr per step: at the official lr they would
    # need tens of thousands of steps to reach the target, our CPU budget is ~1000, so they get larger rates.
    opt = torch.optim.AdamW([{"params": dit_params, "lr": lr}, {"params": routers.parameters(), "lr": WIDTH_ROUTER_LR},
                             {"params": token_params, "lr": TOKEN_ROUTER_LR}], weight_decay=0.0)
    warmup = warmup or max(1, iters // 2)
    selections: list = []

    def gate(logits):
        select = gumbel_sigmoid_st(logits)
        selections.append(select)
        return select

    for block in model.blocks:
        block.token_gate = gate
    history, start = [], time.perf_counter()
    for it in range(1, iters + 1):
        idx = torch.from_numpy(rng.integers(0, len(x0_all), batch))
        x0, y = x0_all[idx], y_all[idx].clone()
        y[torch.from_numpy(rng.random(batch) < CLASS_DROPOUT)] = cfg.num_classes
        t = torch.from_numpy(rng.integers(0, 1000, batch))
        noise = torch.randn_like(x0)
        xt = sqrt_a[t].view(-1, 1, 1, 1) * x0 + sqrt_1ma[t].view(-1, 1, 1, 1) * noise
        c = model.condition(t.float(), y)
        t_emb = model.timestep_embedding(t.float())
        ones = torch.ones(batch, 1)
        heads = [torch.cat([ones, gumbel_sigmoid_st(r(t_emb))], 1) for r in routers.attn]
        groups = [torch.cat([ones, gumbel_sigmoid_st(r(t_emb))], 1) for r in routers.mlp]
        selections.clear()
        for block in model.blocks:
            block.token_mode = "dense"
        hidden, _ = model.run_blocks(model.embed(xt), c, 0, cfg.depth, torch.cat(heads, 1), torch.cat(groups, 1))
        dynamic_loss = ((model.head(hidden, c) - noise) ** 2).mean()
        for block in model.blocks:
            block.token_mode = "off"
        full_loss = ((model(xt, t.float(), y) - noise) ** 2).mean()
        # DyDiT FLOPs accounting per sample, then the batch mean
        token_frac = torch.stack([s.mean(dim=(1, 2)) for s in selections], 1)  # (batch, depth)
        per_block = (torch.stack(heads, 1).sum(-1) * unit.head
                     + torch.stack(groups, 1).sum(-1) * unit.group_per_token * unit.tokens * token_frac)
        ratio = (per_block.sum(1) / dense).mean()
        flops_target = 1.0 - (1.0 - target) * min(1.0, it / warmup)
        loss = dynamic_loss + full_loss + FLOPS_LOSS_WEIGHT * (ratio - flops_target) ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append((dynamic_loss.item(), full_loss.item(), ratio.item()))
        if it % 50 == 0 or it == iters:
            d, f, r = np.mean(history[-50:], axis=0)
            progress(f"iter {it}/{iters}  dynamic {d:.4f}  full {f:.4f}  FLOPs ratio {r:.3f} "
                     f"(target {flops_target:.3f})  {time.perf_counter() - start:.0f} s")
    for block in model.blocks:
        block.token_gate, block.token_mode = None, "off"
    save_checkpoint(dydit_state_dict(model, routers), out,
                    {"num_heads": cfg.num_heads, "target": target, "iters": iters, "base": base})
    return {"seconds": time.perf_counter() - start, "final": np.mean(history[-50:], axis=0).tolist()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="digits-dit", help="the DiT to fine-tune (a shipped name or checkpoint)")
    parser.add_argument("--target", type=float, required=True, help="FLOPs target λ, e.g. 0.5")
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    r = train(args.base, args.target, Path(args.out), args.iters, seed=args.seed)
    print(f"trained in {r['seconds']:.0f} s; last 50 iters: dynamic {r['final'][0]:.4f}, full {r['final'][1]:.4f}, "
          f"FLOPs ratio {r['final'][2]:.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
