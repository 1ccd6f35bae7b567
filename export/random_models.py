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
        raise ModelLoadError(f"unknown random preset {preset!r}; known: {', '.join(DIT_PRESETS)}")
    cfg = DiTConfig(**DIT_PRESETS[preset])
    torch.manual_seed(seed)
    model = DiT(cfg)  # PyTorch default init everywhere: DiT's zero-init adaLN would make the output constant
    grid = cfg.input_size // cfg.patch_size
    model.pos_embed.copy_(torch.from_numpy(sincos_pos_embed(cfg.hidden_size, grid))[None])
    return model.eval()


def parse_random_spec(spec: str) -> tuple[str, int]:
    name = spec.removeprefix("random:")
    preset, _, seed = name.partition("@")
    try:
        return preset, int(seed or 0)
    except ValueError:
        raise ModelLoadError(f"bad random model spec {spec!r}: use random:PRESET or random:PRESET@SEED") from None
