"""Random-weight DiTs of published sizes, for tests, benchmarks and the demo (no model hub here).

Addressed as ``random:<preset>`` or ``random:<preset>@<seed>`` wherever a model path is accepted.
"""

from __future__ import annotations

import numpy as np
import torch

from .dit_model import DiT, DiTConfig
from .errors import ModelLoadError

DIT_PRESETS = {
    # DiT-S/2 at 256 px (latent 32x32), as in the DiT paper
    "dit-s2": dict(input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6,
                   mlp_hidden=1536, num_classes=1000, learn_sigma=True),
    # a small model that exports in seconds
    "dit-tiny": dict(input_size=16, patch_size=2, in_channels=4, hidden_size=128, depth=8, num_heads=4,
                     mlp_hidden=512, num_classes=10, learn_sigma=True),
}


def sincos_pos_embed(hidden: int, grid: int) -> np.ndarray:
    """DiT's fixed 2-D sin-cos position embedding, (grid*grid, hidden)."""

    def one_axis(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_axis(hidden // 2, h), one_axis(hidden // 2, w)], axis=1).astype(np.float32)


def random_dit(preset: str, seed: int = 0) -> DiT:
    if preset not in DIT_PRESETS:
        raise ModelLoadError(f"unknown random preset {preset!r}; known: {', '.join([*DIT_PRESETS, *DYDIT_PRESETS])}")
    cfg = DiTConfig(**DIT_PRESETS[preset])
    torch.manual_seed(seed)
    model = DiT(cfg)  # PyTorch default init everywhere: DiT's zero-init adaLN would make the output constant
    grid = cfg.input_size // cfg.patch_size
    model.pos_embed.copy_(torch.from_numpy(sincos_pos_embed(cfg.hidden_size, grid))[None])
    return model.eval()


# DyDiT-format variants: the DiT preset plus routers whose masks keep about half of the blocks' FLOPs (DyDiT's
# lambda = 0.5 with tokens): switching units are on below one of three timestep levels, tokens kept ~85 %.
DYDIT_PRESETS = {"dydit-s2": "dit-s2", "dydit-tiny": "dit-tiny"}
DYDIT_LEVELS = (0.3, 0.5, 0.7)  # quantiles of the router's time feature (~ t / 1000) where units switch off
DYDIT_TOKEN_KEEP = 0.85


@torch.no_grad()
def random_dydit(preset: str, seed: int = 0):
    """A random DiT preset with designed DyDiT routers -> (model with token routers, WidthRouters)."""
    from .dydit import WidthRouters, token_router

    model = random_dit(DYDIT_PRESETS[preset], seed)
    cfg = model.config
    gen = torch.Generator().manual_seed(seed + 1)
    # a direction w in t-embedding space whose projection rises ~linearly with t (least squares on t = 0..999)
    t_emb = model.timestep_embedding(torch.arange(1000.0)).double()
    design = torch.cat([t_emb, torch.ones(1000, 1, dtype=torch.float64)], 1)
    ramp = torch.linspace(-1, 1, 1000, dtype=torch.float64)
    fit = torch.linalg.solve(design.T @ design + 1e-2 * torch.eye(design.shape[1], dtype=torch.float64), design.T @ ramp)
    feature = design @ fit
    levels = torch.quantile(feature, torch.tensor(DYDIT_LEVELS, dtype=torch.float64))
    routers = WidthRouters(cfg.hidden_size, cfg.depth, cfg.num_heads)
    for router in [*routers.attn, *routers.mlp]:
        level = levels[torch.randint(len(levels), (cfg.num_heads - 1,), generator=gen)]
        # logit = 4 (level - feature): positive (unit on) at low t, below the unit's level
        router.weight.copy_(-4 * fit[:-1].float().expand(cfg.num_heads - 1, -1))
        router.bias.copy_((4 * (level - fit[-1])).float())
    for block in model.blocks:
        block.token_router = token_router(cfg.hidden_size).eval()
        block.token_router[2].register_forward_pre_hook(_keep_top_tokens)
        block.token_mode = "dense"
    model.run_blocks(model.embed(torch.randn(8, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)),
                     model.condition(torch.linspace(0, 999, 8), torch.arange(8) % cfg.num_classes), 0, cfg.depth)
    for block in model.blocks:
        block.token_router[2]._forward_pre_hooks.clear()
        block.token_mode = "off"  # the build chooses the mode
    return model, routers.eval()


def _keep_top_tokens(linear, args):
    """Sets the token router's bias so DYDIT_TOKEN_KEEP of the tokens it sees score above 0."""
    logits = (args[0] @ linear.weight.T).flatten()
    linear.bias.fill_(-float(torch.quantile(logits, 1 - DYDIT_TOKEN_KEEP)))


def parse_random_spec(spec: str) -> tuple[str, int]:
    name = spec.removeprefix("random:")
    preset, _, seed = name.partition("@")
    try:
        return preset, int(seed or 0)
    except ValueError:
        raise ModelLoadError(f"bad random model spec {spec!r}: use random:PRESET or random:PRESET@SEED") from None
