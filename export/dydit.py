"""DyDiT checkpoints: the timestep-wise width routers and the spatial token routers of each block.

Semantics of the official code (Mar-2025 release), reproduced exactly:

* ``blocks.{i}.attn_rate.router`` / ``blocks.{i}.mlp_rate.router``: Linear(hidden -> num_heads - 1) applied to the
  **timestep embedding only** (t_embedder output, not t + class). Head / MLP group 0 is always on; unit j + 1 is on
  iff logit j > 0 (the inference-time hard Gumbel-sigmoid with threshold 0.5). So the width masks are a function of
  the timestep alone, which is what lets keystep compile them into narrower graphs before sampling.
* ``blocks.{i}.token_selection.mlp_head.{0,2}``: Linear(hidden -> hidden/16), ReLU, Linear(-> 1) on the
  post-attention residual stream; a token with logit <= 0 skips the MLP. Data-dependent, so it stays in the graph
  (see :class:`~keystep.export.dit_model.DiTBlock` for the gather and dense variants).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .dit_model import DiT
from .errors import ModelLoadError

ROUTER_KEYS = ("attn_rate.router", "mlp_rate.router", "token_selection.mlp_head.0", "token_selection.mlp_head.2")


def has_dydit_routers(sd: dict) -> bool:
    """Any router key makes it a DyDiT checkpoint, so an incomplete router set fails loudly instead of loading as
    a plain DiT."""
    return any(".attn_rate." in k or ".mlp_rate." in k or ".token_selection." in k for k in sd)


def router_heads(sd: dict) -> int | None:
    """num_heads from any width router's shape (they have num_heads - 1 outputs)."""
    router = next((v for k, v in sd.items() if k.endswith(("attn_rate.router.weight", "mlp_rate.router.weight"))), None)
    return None if router is None else router.shape[0] + 1


class WidthRouters(nn.Module):
    """The per-block attention-head and MLP-group routers (timestep embedding -> num_heads - 1 logits each)."""

    def __init__(self, hidden: int, depth: int, heads: int):
        super().__init__()
        self.attn = nn.ModuleList(nn.Linear(hidden, heads - 1) for _ in range(depth))
        self.mlp = nn.ModuleList(nn.Linear(hidden, heads - 1) for _ in range(depth))

    @torch.no_grad()
    def masks(self, model: DiT, timesteps) -> np.ndarray:
        """bool (len(timesteps), depth, 2, heads): [..., 0, :] attention heads on, [..., 1, :] MLP groups on."""
        t_emb = model.timestep_embedding(torch.as_tensor(np.asarray(timesteps), dtype=torch.float32))
        on = torch.ones(len(t_emb), 1, dtype=torch.bool)
        per_block = [
            torch.stack([torch.cat([on, attn(t_emb) > 0], 1), torch.cat([on, mlp(t_emb) > 0], 1)], 1)
            for attn, mlp in zip(self.attn, self.mlp)
        ]
        return torch.stack(per_block, 1).numpy()


def token_router(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, hidden // 16), nn.ReLU(), nn.Linear(hidden // 16, 1))


def token_routers_never_skip(sd: dict[str, torch.Tensor], depth: int) -> bool:
    """True when every block's token router is the constant "keep": last layer weight 0 and bias > 0, so the logit
    is the bias whatever the token (a width-only DyDiT, saved in the official layout)."""
    def constant_keep(i: int) -> bool:
        w, b = (sd.get(f"blocks.{i}.token_selection.mlp_head.2.{n}") for n in ("weight", "bias"))
        return w is not None and b is not None and not bool(w.any()) and bool((b > 0).all())

    return all(constant_keep(i) for i in range(depth))


def attach_dydit_routers(model: DiT, sd: dict[str, torch.Tensor]) -> WidthRouters:
    """Load the routers of an official DyDiT state dict: token routers go into the blocks (they are part of every
    graph), the width routers are returned (the compiler evaluates them per timestep). Token routers that provably
    keep every token are left out — exactly the same model, without the router and the gather in every graph."""
    cfg = model.config
    missing = [f"blocks.{i}.{k}.weight" for i in range(cfg.depth) for k in ROUTER_KEYS if f"blocks.{i}.{k}.weight" not in sd]
    if missing:
        raise ModelLoadError(f"incomplete DyDiT checkpoint: missing {missing[0]} (and {len(missing) - 1} more)")
    routers = WidthRouters(cfg.hidden_size, cfg.depth, cfg.num_heads)
    keep_all_tokens = token_routers_never_skip(sd, cfg.depth)
    try:
        for i, block in enumerate(model.blocks):
            for mine, key in ((routers.attn[i], "attn_rate.router"), (routers.mlp[i], "mlp_rate.router")):
                mine.load_state_dict({w: sd[f"blocks.{i}.{key}.{w}"].float() for w in ("weight", "bias")})
            if keep_all_tokens:
                continue
            block.token_router = token_router(cfg.hidden_size).eval()
            block.token_router.load_state_dict(
                {f"{j}.{w}": sd[f"blocks.{i}.token_selection.mlp_head.{j}.{w}"].float() for j in (0, 2) for w in ("weight", "bias")}
            )
    except (RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"DyDiT router weights do not fit the model ({cfg.num_heads} heads): {exc}") from exc
    return routers.eval()
