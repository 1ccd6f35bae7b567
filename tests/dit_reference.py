"""Independent reference implementations for DiT tests.

This module deliberately does NOT import ``keystep``.  It only depends on
torch / numpy / diffusers and exists so that keystep's exporters and runtimes
can be checked against code that was written separately from them.

Contents
--------
``OriginalDiT``
    Plain-PyTorch re-implementation of ``facebookresearch/DiT`` ``models.py``
    (class ``DiT``) with exactly the same state-dict key names
    (``x_embedder.proj.*``, ``pos_embed``, ``t_embedder.mlp.{0,2}.*``,
    ``y_embedder.embedding_table.weight``, ``blocks.{i}.attn.qkv.*``,
    ``blocks.{i}.attn.proj.*``, ``blocks.{i}.mlp.fc{1,2}.*``,
    ``blocks.{i}.adaLN_modulation.1.*``, ``final_layer.linear.*``,
    ``final_layer.adaLN_modulation.1.*``).  Attention is written by hand
    (``softmax(q @ k^T * scale) @ v``), not via ``F.scaled_dot_product_attention``.

``random_original_dit(seed, **cfg)``
    Builds an ``OriginalDiT`` with *all* weights random (DiT zero-inits the
    adaLN modulations and the final layer, which would make every test
    vacuous), in eval mode.  ``pos_embed`` stays the fixed 2-D sin-cos table.

``original_to_diffusers_state_dict(sd, depth)`` / ``make_diffusers_dit(model)``
    Key mapping of diffusers' ``scripts/convert_dit_to_diffusers.py``
    (the shared t/y embedder weights are copied into every block's
    ``norm1.emb``; qkv is split into ``to_q/to_k/to_v``; ``pos_embed`` is
    dropped because diffusers recomputes it as a non-persistent buffer).

``encoder_propagation_sample(...)`` / ``baseline_sample(...)``
    Sequential FasterDiffusion-style (encoder propagation) sampling loop with
    DiTPipeline-style classifier-free guidance, as the reference for a batched
    implementation.

``DiTDDIM(num_steps, ...)``
    The original DiT's DDIM sampler in plain PyTorch/numpy, written from
    facebookresearch/DiT's ``diffusion/respace.py`` (``space_timesteps``,
    ``SpacedDiffusion``) and ``diffusion/gaussian_diffusion.py`` (``ddim_sample``):
    respaced timesteps, float64 tables, steps to the previous kept timestep,
    ``clip_denoised=False`` as DiT's sample.py passes it.  Shaped like a diffusers
    scheduler (``timesteps``, ``step(eps, t, z).prev_sample``) so the loops above
    take it.

Known numerical differences: original DiT vs. diffusers DiTTransformer2DModel
---------------------------------------------------------------------------
Even with a strictly loaded, correctly converted state dict, diffusers'
``DiTTransformer2DModel`` does NOT compute the same function as the original
DiT.  There are exactly two sources of difference.  Numbers below were measured
by ``tests/test_dit_reference.py::test_diffusers_vs_original_differences``
(run with ``-s`` to print them) on ``random_original_dit(0)`` with TINY_CFG
(input 8, patch 2, C=4, hidden 64, depth 4, heads 4, 10 classes), 6 samples with
t in {0, 1, 50, 250, 600, 999}; output std ~1.07:

1. Timestep frequencies (dominant).  Original DiT:
   ``freqs = exp(-ln(10000) * arange(half) / half)``.  diffusers'
   ``CombinedTimestepLabelEmbeddings`` uses
   ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)``, i.e.
   ``/ (half - 1)`` (both use the ``[cos, sin]`` order).  The 256-d sinusoidal
   embeddings then differ by max |diff| 0 / 2.7e-3 / 0.14 / 0.70 / 1.5 / 1.9 at
   t = 0 / 1 / 50 / 250 / 600 / 999 (the error grows linearly with t; it is
   zero at t = 0).  Model output max |diff|: 1e-6 / 2.6e-3 / 0.12 / 0.58 / 1.68
   / 1.77 for those t; overall max 1.77, mean |diff| 0.16, relative Frobenius
   error 27 %.  (With random weights; trained DiT weights may be less sensitive,
   but the difference is real and not round-off.)
2. LayerNorm eps of the MLP-branch norm (minor).  Original DiT ``norm2`` uses
   eps=1e-6; in diffusers this norm is ``BasicTransformerBlock.norm3`` and uses
   ``config.norm_eps`` (default 1e-5; the official conversion script does not
   set it, so converted hub checkpoints run with 1e-5).  ``norm1`` (inside
   ``AdaLayerNormZero``) and ``norm_out`` are hard-coded to 1e-6 and match.
   Alone (frequencies patched) it gives max |diff| 1.4e-5.
   ``make_diffusers_dit`` defaults to ``norm_eps=1e-6`` so it is removed.

With ``norm_eps=1e-6`` AND every diffusers ``norm1.emb.time_proj.downscale_freq_shift``
monkeypatched to 0, outputs agree to float32 round-off: max |diff| 1.2e-6
(asserted < 1e-4).  So these two items explain the entire difference; the
residual is SDPA vs. hand-written attention and the float32 pos-embed table.
Consequence for tests: a converted diffusers model is NOT a drop-in oracle for
the original DiT at t > 0 unless ``downscale_freq_shift`` is patched.

Other behavioural notes
-----------------------
* The original DiT ``forward_with_cfg`` applies guidance to the first 3
  channels only (a known quirk); diffusers' ``DiTPipeline`` applies it to the
  first ``in_channels`` (=4) channels.  ``encoder_propagation_sample`` follows
  diffusers.
* diffusers' ``DiTPipeline`` hard-codes the null class as 1000; here it is
  ``model.num_classes`` (identical for ImageNet models).
"""

from __future__ import annotations

import copy
import math
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "OriginalDiT",
    "random_original_dit",
    "original_to_diffusers_state_dict",
    "make_diffusers_dit",
    "encoder_propagation_sample",
    "baseline_sample",
    "DiTDDIM",
    "get_2d_sincos_pos_embed",
    "TINY_CFG",
]

# A tiny config for fast tests.
TINY_CFG = dict(
    input_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=64,
    depth=4,
    num_heads=4,
    num_classes=10,
)


# --------------------------------------------------------------------------- #
# Positional embedding (numpy, float64 -- as in facebookresearch/DiT)
# --------------------------------------------------------------------------- #
def _get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    pos = pos.reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def _get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    assert embed_dim % 2 == 0
    emb_h = _get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = _get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size*grid_size, embed_dim) table, identical to DiT's numpy code."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    return _get_2d_sincos_pos_embed_from_grid(embed_dim, grid)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------- #
# Modules (names mirror DiT / timm so the state-dict keys match)
# --------------------------------------------------------------------------- #
class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class _TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        # NOTE: original DiT divides by `half` (diffusers divides by `half - 1`).
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(
            device=t.device
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class _LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        # Inference only: no random label dropout.  The null class is index num_classes.
        return self.embedding_table(labels)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, hd)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class _Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _DiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = _Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class _FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class OriginalDiT(nn.Module):
    """Re-implementation of facebookresearch/DiT ``models.DiT`` (inference)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.class_dropout_prob = class_dropout_prob
        self.num_classes = num_classes

        self.x_embedder = _PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = _TimestepEmbedder(hidden_size)
        self.y_embedder = _LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid_size = input_size // patch_size
        num_patches = grid_size * grid_size
        # Fixed sin-cos embedding, stored as a frozen Parameter like DiT (so the key is in the state dict).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(hidden_size, grid_size)).float().unsqueeze(0))
        self.blocks = nn.ModuleList([_DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = _FinalLayer(hidden_size, patch_size, self.out_channels)

    # -- pieces (used by the sampling reference) ---------------------------- #
    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c = t_embedder(t) + y_embedder(y), shape (N, D)."""
        return self.t_embedder(t) + self.y_embedder(y)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens + pos embed, shape (N, T, D)."""
        return self.x_embedder(x) + self.pos_embed

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c = self.out_channels
        p = self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(shape=(x.shape[0], c, h * p, h * p))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W); t: (N,) timesteps; y: (N,) int labels -> (N, out_channels, H, W)."""
        x = self.embed(x)
        c = self.condition(t, y)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        return self.unpatchify(x)


def random_original_dit(seed: int = 0, **cfg) -> OriginalDiT:
    """OriginalDiT with every learnable weight random (incl. adaLN and final layer), eval mode.

    All Linear/Conv weights (including adaLN modulations and the final layer)
    ~ N(0, 1/fan_in) i.e. std 1/sqrt(fan_in) (0.125 for hidden 64, 0.0625 for the
    256-wide timestep MLP input); biases ~ N(0, 0.05^2); class embeddings ~ N(0, 0.5^2).
    ``pos_embed`` keeps the fixed sin-cos table.  For TINY_CFG this gives a conditioning
    vector with std ~0.6, shift/scale/gate modulations with std ~0.35 and outputs with
    std ~1 that clearly depend on t and y.  (Note: because the highest timestep
    frequency is 1 rad/step, random weights make the output change by O(0.5) between t
    and t+1 -- pass exact integer timesteps.)
    """
    full = dict(TINY_CFG)
    full.update(cfg)
    model = OriginalDiT(**full)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            if name.endswith("embedding_table.weight"):
                std = 0.5
            elif name.endswith(".bias"):
                std = 0.05
            else:
                fan_in = p[0].numel()  # Linear: in_features; Conv2d: C*k*k
                std = 1.0 / math.sqrt(fan_in)
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


# --------------------------------------------------------------------------- #
# Conversion to diffusers (mirrors diffusers/scripts/convert_dit_to_diffusers.py)
# --------------------------------------------------------------------------- #
def original_to_diffusers_state_dict(sd: dict, depth: int) -> dict:
    """Map an original DiT state dict to DiTTransformer2DModel keys (input is not mutated)."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    out["pos_embed.proj.weight"] = sd.pop("x_embedder.proj.weight")
    out["pos_embed.proj.bias"] = sd.pop("x_embedder.proj.bias")
    t0w, t0b = sd.pop("t_embedder.mlp.0.weight"), sd.pop("t_embedder.mlp.0.bias")
    t2w, t2b = sd.pop("t_embedder.mlp.2.weight"), sd.pop("t_embedder.mlp.2.bias")
    ytab = sd.pop("y_embedder.embedding_table.weight")
    for i in range(depth):
        pre = f"transformer_blocks.{i}"
        out[f"{pre}.norm1.emb.timestep_embedder.linear_1.weight"] = t0w.clone()
        out[f"{pre}.norm1.emb.timestep_embedder.linear_1.bias"] = t0b.clone()
        out[f"{pre}.norm1.emb.timestep_embedder.linear_2.weight"] = t2w.clone()
        out[f"{pre}.norm1.emb.timestep_embedder.linear_2.bias"] = t2b.clone()
        out[f"{pre}.norm1.emb.class_embedder.embedding_table.weight"] = ytab.clone()
        out[f"{pre}.norm1.linear.weight"] = sd.pop(f"blocks.{i}.adaLN_modulation.1.weight")
        out[f"{pre}.norm1.linear.bias"] = sd.pop(f"blocks.{i}.adaLN_modulation.1.bias")
        q, k, v = torch.chunk(sd.pop(f"blocks.{i}.attn.qkv.weight"), 3, dim=0)
        qb, kb, vb = torch.chunk(sd.pop(f"blocks.{i}.attn.qkv.bias"), 3, dim=0)
        out[f"{pre}.attn1.to_q.weight"], out[f"{pre}.attn1.to_q.bias"] = q.clone(), qb.clone()
        out[f"{pre}.attn1.to_k.weight"], out[f"{pre}.attn1.to_k.bias"] = k.clone(), kb.clone()
        out[f"{pre}.attn1.to_v.weight"], out[f"{pre}.attn1.to_v.bias"] = v.clone(), vb.clone()
        out[f"{pre}.attn1.to_out.0.weight"] = sd.pop(f"blocks.{i}.attn.proj.weight")
        out[f"{pre}.attn1.to_out.0.bias"] = sd.pop(f"blocks.{i}.attn.proj.bias")
        out[f"{pre}.ff.net.0.proj.weight"] = sd.pop(f"blocks.{i}.mlp.fc1.weight")
        out[f"{pre}.ff.net.0.proj.bias"] = sd.pop(f"blocks.{i}.mlp.fc1.bias")
        out[f"{pre}.ff.net.2.weight"] = sd.pop(f"blocks.{i}.mlp.fc2.weight")
        out[f"{pre}.ff.net.2.bias"] = sd.pop(f"blocks.{i}.mlp.fc2.bias")
    sd.pop("pos_embed", None)  # diffusers recomputes it (non-persistent buffer)
    out["proj_out_1.weight"] = sd.pop("final_layer.adaLN_modulation.1.weight")
    out["proj_out_1.bias"] = sd.pop("final_layer.adaLN_modulation.1.bias")
    out["proj_out_2.weight"] = sd.pop("final_layer.linear.weight")
    out["proj_out_2.bias"] = sd.pop("final_layer.linear.bias")
    if sd:
        raise KeyError(f"unconverted original DiT keys: {sorted(sd)}")
    return out


def make_diffusers_dit(original_model: OriginalDiT, norm_eps: float = 1e-6):
    """Build a diffusers DiTTransformer2DModel matching ``original_model`` and load weights strictly.

    ``norm_eps=1e-6`` makes the MLP-branch LayerNorm match the original DiT
    (diffusers default / converted hub checkpoints use 1e-5).  The timestep
    frequency difference (``/(half-1)`` vs ``/half``) remains -- see module docstring.
    """
    from diffusers import DiTTransformer2DModel

    m = original_model
    model = DiTTransformer2DModel(
        num_attention_heads=m.num_heads,
        attention_head_dim=m.hidden_size // m.num_heads,
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        num_layers=m.depth,
        sample_size=m.input_size,
        patch_size=m.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=m.num_classes,
        attention_bias=True,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=norm_eps,
    )
    if m.mlp_ratio != 4.0:
        raise ValueError("diffusers DiTTransformer2DModel only supports mlp_ratio=4")
    if m.class_dropout_prob <= 0:
        raise ValueError("diffusers CombinedTimestepLabelEmbeddings always has num_classes + 1 rows")
    sd = original_to_diffusers_state_dict(m.state_dict(), m.depth)
    model.load_state_dict(sd, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- #
# Sampling references
# --------------------------------------------------------------------------- #
@torch.no_grad()
def encoder_propagation_sample(
    model: OriginalDiT,
    z_T: torch.Tensor,
    class_labels: list[int],
    scheduler,
    guidance_scale: float,
    split: int,
    key_steps: Iterable[int],
    noise_injection: tuple[float, float] | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Sequential FasterDiffusion (encoder propagation) sampling with DiTPipeline-style CFG.

    * ``split``: blocks[:split] are the "encoder", blocks[split:] + final layer the "decoder".
    * Step index i (0 = noisiest): if ``i in key_steps`` run patch-embed + blocks[:split] on
      the current latent with the current t / labels and cache the tokens; else reuse the cache.
      The decoder always runs with the current step's own t and labels.
    * CFG (guidance_scale > 1): model batch = [z, z] with labels [class_labels, null*B];
      eps = uncond + g * (cond - uncond) on the first ``in_channels`` channels (learned sigma is
      dropped).  guidance_scale <= 1: batch = z with class_labels, no CFG.
    * ``noise_injection=(alpha, tau)``: before each scheduler step with t < tau*num_train_timesteps,
      z = z + alpha * z_T.
    * The scheduler is deep-copied (the caller's instance is not advanced), so the same
      set_timesteps()'d scheduler can be passed to several calls.  The latent stepped by the
      scheduler has batch B (DiTPipeline steps the duplicated 2B batch; identical for
      deterministic schedulers such as DDIM / DPM-Solver).

    Returns the final latent, shape (B, C, H, W).
    """
    key_steps = set(int(k) for k in key_steps)
    if 0 not in key_steps:
        raise ValueError("step 0 must be a key step (nothing cached yet)")
    if not 0 <= split <= len(model.blocks):
        raise ValueError(f"split must be in [0, {len(model.blocks)}]")
    scheduler = copy.deepcopy(scheduler)

    B = z_T.shape[0]
    assert len(class_labels) == B
    C = model.in_channels
    do_cfg = guidance_scale > 1
    labels = torch.tensor(list(class_labels), dtype=torch.long)
    if do_cfg:
        labels = torch.cat([labels, torch.full((B,), model.num_classes, dtype=torch.long)])
    n = labels.shape[0]

    z = z_T.clone()
    cached = None
    for i, t in enumerate(scheduler.timesteps):
        model_in = torch.cat([z, z]) if do_cfg else z
        model_in = scheduler.scale_model_input(model_in, t)
        t_batch = torch.full((n,), float(t), dtype=torch.float32)
        c = model.condition(t_batch, labels)

        if i in key_steps:
            h = model.embed(model_in)
            for block in model.blocks[:split]:
                h = block(h, c)
            cached = h
        h = cached
        for block in model.blocks[split:]:
            h = block(h, c)
        out = model.unpatchify(model.final_layer(h, c))

        eps = out[:, :C]
        if do_cfg:
            cond_eps, uncond_eps = eps[:B], eps[B:]
            eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)

        if noise_injection is not None:
            alpha, tau = noise_injection
            if float(t) < tau * num_train_timesteps:
                z = z + alpha * z_T
        z = scheduler.step(eps, t, z).prev_sample
    return z


@torch.no_grad()
def baseline_sample(
    model: OriginalDiT,
    z_T: torch.Tensor,
    class_labels: list[int],
    scheduler,
    guidance_scale: float,
    noise_injection: tuple[float, float] | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Full-model sampling (every step a key step), same conventions as ``encoder_propagation_sample``.

    Written as its own loop around ``model(x, t, y)`` (not by calling
    ``encoder_propagation_sample``) so that comparing the two also checks the piecewise
    encoder/decoder evaluation against the monolithic forward.
    """
    scheduler = copy.deepcopy(scheduler)
    B = z_T.shape[0]
    assert len(class_labels) == B
    C = model.in_channels
    do_cfg = guidance_scale > 1
    labels = torch.tensor(list(class_labels), dtype=torch.long)
    if do_cfg:
        labels = torch.cat([labels, torch.full((B,), model.num_classes, dtype=torch.long)])

    z = z_T.clone()
    for t in scheduler.timesteps:
        model_in = torch.cat([z, z]) if do_cfg else z
        model_in = scheduler.scale_model_input(model_in, t)
        t_batch = torch.full((labels.shape[0],), float(t), dtype=torch.float32)
        eps = model(model_in, t_batch, labels)[:, :C]
        if do_cfg:
            eps = eps[B:] + guidance_scale * (eps[:B] - eps[B:])
        if noise_injection is not None and float(t) < noise_injection[1] * num_train_timesteps:
            z = z + noise_injection[0] * z_T
        z = scheduler.step(eps, t, z).prev_sample
    return z


class DiTDDIM:
    """facebookresearch/DiT's DDIM (``create_diffusion(str(num_steps))`` or ``"ddim<num_steps>"`` + ``ddim_sample``),
    one step at a time. Tables in float64 (numpy), per-step coefficients taken as float32 tensors, as DiT's
    ``_extract_into_tensor`` does."""

    init_noise_sigma = 1.0

    def __init__(self, num_steps: int, respacing: str = "", clip_denoised: bool = False, eta: float = 0.0,
                 beta_start: float = 0.0001, beta_end: float = 0.02, num_train_timesteps: int = 1000):
        T = num_train_timesteps
        if respacing == "ddim":  # the DDIM paper's fixed stride
            stride = next(s for s in range(1, T) if len(range(0, T, s)) == num_steps)
            kept = list(range(0, T, stride))
        else:  # one section: num_steps points from 0 to T-1, a fractional stride accumulated and rounded
            frac = 1 if num_steps <= 1 else (T - 1) / (num_steps - 1)
            kept, idx = [], 0.0
            for _ in range(num_steps):
                kept.append(round(idx))  # Python's round: half to even
                idx += frac
        base = np.cumprod(1.0 - np.linspace(beta_start, beta_end, T, dtype=np.float64))
        prev, respaced_betas = 1.0, []
        for t in kept:  # SpacedDiffusion: new betas from the kept alpha-bars, then a fresh GaussianDiffusion
            respaced_betas.append(1 - base[t] / prev)
            prev = base[t]
        alphas_cumprod = np.cumprod(1.0 - np.array(respaced_betas, dtype=np.float64))
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.sqrt_recip = np.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1 = np.sqrt(1.0 / alphas_cumprod - 1)
        self.kept = kept
        self.timesteps = torch.tensor(kept[::-1])  # the model sees the original timestep (_WrappedModel's map)
        self.clip_denoised, self.eta = clip_denoised, eta

    def scale_model_input(self, x, t):
        return x

    def step(self, eps, t, x, noise=None):
        i = self.kept.index(int(t))

        def at(table):
            return torch.tensor(table[i], dtype=torch.float64).float()

        x0 = at(self.sqrt_recip) * x - at(self.sqrt_recipm1) * eps
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        eps = (at(self.sqrt_recip) * x - x0) / at(self.sqrt_recipm1)
        abar, abar_prev = at(self.alphas_cumprod), at(self.alphas_cumprod_prev)
        sigma = self.eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        prev = x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        if i > 0 and self.eta > 0:
            prev = prev + sigma * noise
        return type("StepOutput", (), {"prev_sample": prev})()
