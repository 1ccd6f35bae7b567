"""The canonical DiT module every loader converts into, split into export stages.

One module for both checkpoint formats (facebookresearch DiT and diffusers' ``DiTTransformer2DModel``): the two
differ only in key names and in two numeric conventions, which live in :class:`DiTConfig` so that each loader
reproduces its own format exactly:

* ``time_freq_shift``: the sinusoidal timestep frequencies are ``exp(-ln(10000) * i / (half - shift))``; the
  original DiT uses shift 0, diffusers' ``CombinedTimestepLabelEmbeddings`` uses shift 1.
* ``mlp_norm_eps``: epsilon of the pre-MLP LayerNorm (1e-6 in the original, ``norm_eps`` in diffusers).

Attention is written with explicit MatMul/Softmax so the exported graph is plain ONNX that every backend (and the
FLOP counter) understands.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class DiTConfig:
    input_size: int  # latent height == width
    patch_size: int
    in_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_hidden: int
    num_classes: int
    learn_sigma: bool
    time_freq_shift: int = 0
    mlp_norm_eps: float = 1e-6
    frequency_embedding_size: int = 256

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def default_split(self) -> int:
        # DiT-FasterDiffusion splits DiT-XL (depth 28) after block 18.
        return round(self.depth * 18 / 28)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DiTConfig":
        return cls(**data)


def timestep_frequencies(dim: int, shift: int) -> torch.Tensor:
    half = dim // 2
    return torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - shift))


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_hidden: int, mlp_norm_eps: float):
        super().__init__()
        self.heads = heads
        self.mlp_norm_eps = mlp_norm_eps
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden)
        self.ada = nn.Linear(hidden, 6 * hidden)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(d // self.heads))
        out = torch.matmul(scores.softmax(dim=-1), v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        mod = self.ada(F.silu(c)).unsqueeze(1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        h = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.attention(h)
        h = F.layer_norm(x, (d,), eps=self.mlp_norm_eps) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class DiT(nn.Module):
    """Class-conditional DiT with original-DiT parameter names (minus the module nesting)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        c = config
        self.x_proj = nn.Conv2d(c.in_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.register_buffer("pos_embed", torch.zeros(1, c.num_tokens, c.hidden_size))
        self.register_buffer("t_freqs", timestep_frequencies(c.frequency_embedding_size, c.time_freq_shift))
        self.t_fc1 = nn.Linear(c.frequency_embedding_size, c.hidden_size)
        self.t_fc2 = nn.Linear(c.hidden_size, c.hidden_size)
        self.y_table = nn.Embedding(c.num_classes + 1, c.hidden_size)
        self.blocks = nn.ModuleList(
            DiTBlock(c.hidden_size, c.num_heads, c.mlp_hidden, c.mlp_norm_eps) for _ in range(c.depth)
        )
        self.final_ada = nn.Linear(c.hidden_size, 2 * c.hidden_size)
        self.final_linear = nn.Linear(c.hidden_size, c.patch_size**2 * c.out_channels)

    def embed(self, latent: torch.Tensor) -> torch.Tensor:
        return self.x_proj(latent).flatten(2).transpose(1, 2) + self.pos_embed

    def timestep_embedding(self, timestep: torch.Tensor) -> torch.Tensor:
        args = timestep.float()[:, None] * self.t_freqs[None]
        freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.t_fc2(F.silu(self.t_fc1(freq)))

    def condition(self, timestep: torch.Tensor, class_label: torch.Tensor) -> torch.Tensor:
        return self.timestep_embedding(timestep) + self.y_table(class_label)

    def run_blocks(self, x: torch.Tensor, c: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for block in self.blocks[start:stop]:
            x = block(x, c)
        return x

    def head(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        shift, scale = self.final_ada(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        x = self.final_linear(F.layer_norm(x, (cfg.hidden_size,), eps=1e-6) * (1 + scale) + shift)
        g, p = cfg.input_size // cfg.patch_size, cfg.patch_size
        x = x.reshape(-1, g, g, p, p, cfg.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(-1, cfg.out_channels, g * p, g * p)

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, class_label: torch.Tensor) -> torch.Tensor:
        c = self.condition(timestep, class_label)
        return self.head(self.run_blocks(self.embed(latent), c, 0, self.config.depth), c)


class EncoderStage(nn.Module):
    """Patch embedding + blocks[:split] -> hidden tokens (run at key steps only)."""

    def __init__(self, model: DiT, split: int):
        super().__init__()
        self.model, self.split = model, split

    def forward(self, latent, timestep, class_label):
        c = self.model.condition(timestep, class_label)
        return self.model.run_blocks(self.model.embed(latent), c, 0, self.split)


class DecoderStage(nn.Module):
    """blocks[split:] + final layer + unpatchify, conditioned on each row's own timestep and class."""

    def __init__(self, model: DiT, split: int):
        super().__init__()
        self.model, self.split = model, split

    def forward(self, hidden, timestep, class_label):
        c = self.model.condition(timestep, class_label)
        return self.model.head(self.model.run_blocks(hidden, c, self.split, self.model.config.depth), c)
