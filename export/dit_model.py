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

import copy
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
    # blocks (other than 0) with their own timestep/class embedder: diffusers keeps one per block, and a DiT trained
    # or fine-tuned in diffusers has different ones; converted original checkpoints carry copies of one (empty here)
    own_embedder_blocks: tuple[int, ...] = ()

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
        data = dict(data)
        data["own_embedder_blocks"] = tuple(data.get("own_embedder_blocks", ()))
        data.pop("pixel_space", None)  # a bundle fact, not an architecture one
        return cls(**data)


def timestep_frequencies(dim: int, shift: int) -> torch.Tensor:
    half = dim // 2
    return torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - shift))


class DiTBlock(nn.Module):
    """One DiT block, optionally narrowed (fewer heads / MLP groups than the model) and with DyDiT's token router.

    Width masks (merged width profiles): ``head_mask`` (rows, heads) multiplies each head's output after attn·v,
    ``group_mask`` (rows, groups) the fc1 output before GELU — exactly where DyDiT applies its masks. A narrowed
    block without masks computes the same as the full block masked with its kept units, since GELU(0) = 0 and the
    dropped proj/fc2 columns would only have multiplied zeros.

    ``token_mode`` (DyDiT's spatial token router, when ``token_router`` is set): "gather" runs the MLP on the
    selected tokens only (NonZero -> Gather -> MLP -> scatter into zeros), "dense" runs it on every token and
    multiplies by the 0/1 selection, "off" ignores the router (every token takes the MLP).
    """

    def __init__(self, hidden: int, heads: int, mlp_hidden: int, mlp_norm_eps: float, head_dim: int | None = None,
                 group_size: int | None = None):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim or hidden // heads
        self.group_size = group_size or mlp_hidden // heads  # DyDiT: num_heads MLP groups
        self.mlp_norm_eps = mlp_norm_eps
        self.qkv = nn.Linear(hidden, 3 * heads * self.head_dim)
        self.proj = nn.Linear(heads * self.head_dim, hidden)
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden)
        self.ada = nn.Linear(hidden, 6 * hidden)
        self.token_router: nn.Module | None = None
        self.token_mode = "off"
        self.token_gate = None  # training: logits -> differentiable 0/1 selection (dense mode); None = logit > 0

    @property
    def groups(self) -> int:
        return self.fc1.out_features // self.group_size

    def attention(self, x: torch.Tensor, head_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, t, _ = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        out = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2)  # (n, t, heads, head_dim)
        if head_mask is not None:
            out = out * head_mask[:, None, :, None]
        return self.proj(out.reshape(n, t, self.heads * self.head_dim))

    def mlp(self, h: torch.Tensor, group_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``group_mask`` broadcasts against ``h`` without its channel axis: (rows, 1, groups) or (tokens, groups)."""
        a = self.fc1(h)
        if group_mask is not None:
            a = (a.unflatten(-1, (self.groups, self.group_size)) * group_mask.unsqueeze(-1)).flatten(-2)
        return self.fc2(F.gelu(a, approximate="tanh"))

    def forward(self, x, c, head_mask=None, group_mask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (x, number of tokens that ran the MLP, or None without token selection)."""
        n, t, d = x.shape
        mod = self.ada(F.silu(c)).unsqueeze(1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        h = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.attention(h, head_mask)
        h = F.layer_norm(x, (d,), eps=self.mlp_norm_eps) * (1 + scale_mlp) + shift_mlp
        row_groups = None if group_mask is None else group_mask.unsqueeze(1)
        if self.token_router is None or self.token_mode == "off":
            return x + gate_mlp * self.mlp(h, row_groups), None
        logits = self.token_router(x)  # DyDiT SDT: on the post-attention residual stream
        select = logits > 0
        if self.token_mode == "dense":
            weight = select.to(x.dtype) if self.token_gate is None else self.token_gate(logits)
            return x + weight * (gate_mlp * self.mlp(h, row_groups)), select.sum()
        index = torch.nonzero(select.reshape(-1)).reshape(-1)
        token_groups = None if group_mask is None else group_mask.index_select(0, torch.div(index, t, rounding_mode="floor"))
        out = self.mlp(h.reshape(n * t, d).index_select(0, index), token_groups)
        scattered = torch.zeros(n * t, d, dtype=x.dtype).index_copy(0, index, out)
        return x + gate_mlp * scattered.reshape(n, t, d), index.shape[0] * torch.ones((), dtype=torch.int64)


def narrow_block(block: DiTBlock, heads: list[int], groups: list[int]) -> DiTBlock:
    """A copy of ``block`` that physically keeps only ``heads`` and MLP ``groups`` (q/k/v rows and proj columns of
    the heads, fc1 rows and fc2 columns of the groups); the residual width stays."""
    hd, gs = block.head_dim, block.group_size
    width = block.heads * hd
    head_units = torch.tensor([h * hd + j for h in heads for j in range(hd)])
    qkv_rows = torch.cat([part * width + head_units for part in range(3)])
    group_units = torch.tensor([g * gs + j for g in groups for j in range(gs)])
    hidden = block.ada.in_features
    out = DiTBlock(hidden, len(heads), len(groups) * gs, block.mlp_norm_eps, head_dim=hd, group_size=gs)
    with torch.no_grad():
        out.qkv.weight.copy_(block.qkv.weight[qkv_rows])
        out.qkv.bias.copy_(block.qkv.bias[qkv_rows])
        out.proj.weight.copy_(block.proj.weight[:, head_units])
        out.proj.bias.copy_(block.proj.bias)
        out.fc1.weight.copy_(block.fc1.weight[group_units])
        out.fc1.bias.copy_(block.fc1.bias[group_units])
        out.fc2.weight.copy_(block.fc2.weight[:, group_units])
        out.fc2.bias.copy_(block.fc2.bias)
        out.ada.load_state_dict(block.ada.state_dict())
    out.token_router, out.token_mode = block.token_router, block.token_mode
    return out.eval()


class ConditionEmbedder(nn.Module):
    """A timestep MLP + class table: c = MLP(sinusoid(t)) + table[y] (DiT's t_embedder + y_embedder)."""

    def __init__(self, config: "DiTConfig"):
        super().__init__()
        c = config
        self.t_fc1 = nn.Linear(c.frequency_embedding_size, c.hidden_size)
        self.t_fc2 = nn.Linear(c.hidden_size, c.hidden_size)
        self.y_table = nn.Embedding(c.num_classes + 1, c.hidden_size)

    def forward(self, freq: torch.Tensor, class_label: torch.Tensor) -> torch.Tensor:
        return self.t_fc2(F.silu(self.t_fc1(freq))) + self.y_table(class_label)


class BlockConditions:
    """The conditioning of a DiT whose blocks have their own embedders: block i's vector from its embedder (the
    model's own for block 0, the final layer and every block without one). Each is computed on first use, so a
    stage traces only the embedders of its own blocks."""

    def __init__(self, model: "DiT", freq: torch.Tensor, class_label: torch.Tensor, shared: torch.Tensor):
        self.model, self.freq, self.class_label, self.shared = model, freq, class_label, shared
        self._own: dict[int, torch.Tensor] = {}

    def block(self, i: int) -> torch.Tensor:
        key = str(i)
        if key not in self.model.block_embedders:
            return self.shared
        if i not in self._own:
            self._own[i] = self.model.block_embedders[key](self.freq, self.class_label)
        return self._own[i]


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
        self.block_embedders = nn.ModuleDict({str(i): ConditionEmbedder(c) for i in c.own_embedder_blocks})

    def embed(self, latent: torch.Tensor) -> torch.Tensor:
        return self.x_proj(latent).flatten(2).transpose(1, 2) + self.pos_embed

    def timestep_frequencies(self, timestep: torch.Tensor) -> torch.Tensor:
        args = timestep.float()[:, None] * self.t_freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def timestep_embedding(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.t_fc2(F.silu(self.t_fc1(self.timestep_frequencies(timestep))))

    def condition(self, timestep: torch.Tensor, class_label: torch.Tensor) -> "torch.Tensor | BlockConditions":
        """The conditioning vector (rows, hidden) every block and the final layer share; with per-block embedders
        a :class:`BlockConditions` that gives each block its own."""
        shared = self.timestep_embedding(timestep) + self.y_table(class_label)
        if not len(self.block_embedders):
            return shared
        return BlockConditions(self, self.timestep_frequencies(timestep), class_label, shared)

    def run_blocks(self, x, c, start: int, stop: int, head_mask=None, group_mask=None):
        """blocks[start:stop] -> (x, per-block MLP token counts (int64 vector) or None without token selection).
        The masks, when given, hold each block's units side by side: (rows, sum of the blocks' heads / groups)."""
        counts, heads_at, groups_at = [], 0, 0
        for i, block in enumerate(self.blocks[start:stop], start):
            hm = gm = None
            if head_mask is not None:
                hm = head_mask[:, heads_at : heads_at + block.heads]
                gm = group_mask[:, groups_at : groups_at + block.groups]
                heads_at, groups_at = heads_at + block.heads, groups_at + block.groups
            x, count = block(x, c.block(i) if isinstance(c, BlockConditions) else c, hm, gm)
            if count is not None:
                counts.append(count)
        return x, (torch.stack(counts) if counts else None)

    def head(self, x: torch.Tensor, c: "torch.Tensor | BlockConditions") -> torch.Tensor:
        cfg = self.config
        c = c.shared if isinstance(c, BlockConditions) else c  # diffusers: the final layer uses block 0's embedder
        shift, scale = self.final_ada(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        x = self.final_linear(F.layer_norm(x, (cfg.hidden_size,), eps=1e-6) * (1 + scale) + shift)
        g, p = cfg.input_size // cfg.patch_size, cfg.patch_size
        x = x.reshape(-1, g, g, p, p, cfg.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(-1, cfg.out_channels, g * p, g * p)

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, class_label: torch.Tensor) -> torch.Tensor:
        c = self.condition(timestep, class_label)
        return self.head(self.run_blocks(self.embed(latent), c, 0, self.config.depth)[0], c)

    def with_blocks(self, blocks: list[DiTBlock]) -> "DiT":
        """A copy sharing every module except the blocks (e.g. narrowed ones for a width profile)."""
        other = copy.copy(self)
        other._modules = dict(self._modules)
        other.blocks = nn.ModuleList(blocks)
        return other


def _outputs(x: torch.Tensor, counts: torch.Tensor | None):
    return x if counts is None else (x, counts)


class EncoderStage(nn.Module):
    """Patch embedding + blocks[:split] -> hidden tokens (run at key steps only).
    Extra inputs/outputs with DyDiT widths: masks (merged profiles) and MLP token counts (token selection)."""

    def __init__(self, model: DiT, split: int):
        super().__init__()
        self.model, self.split = model, split

    def forward(self, latent, timestep, class_label, head_mask=None, group_mask=None):
        c = self.model.condition(timestep, class_label)
        return _outputs(*self.model.run_blocks(self.model.embed(latent), c, 0, self.split, head_mask, group_mask))


class DecoderStage(nn.Module):
    """blocks[split:] + final layer + unpatchify, conditioned on each row's own timestep and class."""

    def __init__(self, model: DiT, split: int):
        super().__init__()
        self.model, self.split = model, split

    def forward(self, hidden, timestep, class_label, head_mask=None, group_mask=None):
        c = self.model.condition(timestep, class_label)
        x, counts = self.model.run_blocks(hidden, c, self.split, self.model.config.depth, head_mask, group_mask)
        return _outputs(self.model.head(x, c), counts)
