"""Independent reference implementation of DyDiT (Dynamic Diffusion Transformer) inference.

Like ``dit_reference.py`` this module deliberately does NOT import ``keystep``; it
re-implements the official DyDiT code (ICLR 2025, Zhao et al., "Dynamic Diffusion
Transformer"; NUS-HPC-AI-Lab/Dynamic-Diffusion-Transformer, ``models.py`` +
``dynamic_model.py``, Mar-2025 version) in plain PyTorch on top of ``OriginalDiT``.

What DyDiT adds to every DiT block ``i`` (state-dict keys as in the official code)
---------------------------------------------------------------------------------
* ``blocks.{i}.attn_rate.router.{weight,bias}`` -- ``nn.Linear(D, H - 1)``: head router
  ("timestep-wise dynamic width", TDW) for the attention heads.
* ``blocks.{i}.mlp_rate.router.{weight,bias}`` -- ``nn.Linear(D, H - 1)``: the same for the
  MLP hidden units, grouped into H groups of ``mlp_hidden // H`` consecutive units.
* ``blocks.{i}.token_selection.mlp_head.{0,2}.{weight,bias}`` -- ``Linear(D, D // 16)``,
  ReLU, ``Linear(D // 16, 1)``: per-token router ("spatial-wise dynamic token", SDT) that
  decides which tokens go through the MLP.

Inference semantics (``model.eval()``)
--------------------------------------
* The head / group routers read the timestep embedding ONLY: ``t_emb = t_embedder(t)``
  (not ``c = t_emb + y_emb``).  So the masks are a function of t alone.
* Head / group 0 is always active::

      attn_mask = cat([ones(N, 1), (attn_rate.router(t_emb) > 0).float()], 1)   # (N, H)
      mlp_mask  = cat([ones(N, 1), (mlp_rate.router(t_emb)  > 0).float()], 1)   # (N, H)

  (The official code computes ``hard = (sigmoid(logit) > 0.5)`` and returns the
  straight-through value ``hard - sigmoid.detach() + sigmoid``; in eval mode that is the
  0/1 mask up to float round-off of ~1 ulp, and ``sigmoid(l) > 0.5`` equals ``l > 0``
  except for |l| < ~3e-8, where float32 sigmoid rounds to exactly 0.5.)
* Attention: standard DiT attention; after ``attn @ v`` the (B, T, D) output is
  multiplied by the head mask expanded over ``head_dim`` channels, then ``proj``.
* MLP: ``fc1`` -> multiply by the group mask expanded over ``mlp_hidden // H`` units
  (group g = units [g*gs, (g+1)*gs)) -> GELU(tanh) -> ``fc2``.
* Block::

      shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaLN_modulation(c).chunk(6, 1)
      x = x + gate_msa[:, None] * attn(modulate(norm1(x), shift_msa, scale_msa), attn_mask)
      token_select = (token_selection.mlp_head(x) > 0).float()     # (B, T, 1), post-attention x
      mlp_x = gate_mlp[:, None] * mlp(modulate(norm2(x), shift_mlp, scale_mlp), mlp_mask)
      x = x + token_select * mlp_x

  A deselected token's MLP branch is simply dropped (the official code still computes it
  densely and multiplies by 0).  With ``token_select=False`` the token router is skipped
  (``x = x + mlp_x``).  ``complete_model=True`` (official name) is plain DiT: no masks at all.
* Everything else (patch/pos embed, t/y embedders, final layer, unpatchify, learned sigma)
  is exactly ``OriginalDiT``.

Note: an older published revision of the official code used ``Linear(D, H)`` routers
with no forced-on head 0 (class ``DiffRate``); this module follows the ``H - 1`` +
forced-head-0 revision (class ``Router``), which is what the released checkpoints use.

Public API
----------
``DyDiTReference(OriginalDiT)``, ``random_dydit``, ``dydit_checkpoint``, ``dydit_sample``,
``dydit_flops``, ``mask_patterns``, ``DYDIT_ROUTER_INIT`` -- see the docstrings.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from dit_reference import TINY_CFG, OriginalDiT, _DiTBlock, _modulate, random_original_dit

__all__ = [
    "DyDiTReference",
    "random_dydit",
    "dydit_checkpoint",
    "dydit_sample",
    "dydit_flops",
    "mask_patterns",
    "set_dydit_training_init_biases",
    "DYDIT_ROUTER_INIT",
]

# Biases DyDiT's ``initialize_weights`` gives the routers before fine-tuning: every head,
# MLP group and token is active, so the model starts out as the dense DiT.
DYDIT_ROUTER_INIT = dict(rate_bias=15.0, token_bias=35.0)

Masks = tuple[torch.Tensor, torch.Tensor]  # (attn_mask, mlp_mask), each (N, depth, H) float 0/1


# --------------------------------------------------------------------------- #
# Modules
# --------------------------------------------------------------------------- #
class _Router(nn.Module):
    """Official ``Router`` (a.k.a. ``DiffRate``): only the ``router`` Linear holds weights."""

    def __init__(self, dim: int, channel_number: int):
        super().__init__()
        self.router = nn.Linear(dim, channel_number)

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        """Eval-mode hard mask with head/group 0 forced on: (N, channel_number + 1) float 0/1."""
        on = (self.router(t_emb) > 0).to(t_emb.dtype)
        return torch.cat([torch.ones_like(on[:, :1]), on], dim=1)


class _TokenSelect(nn.Module):
    """Official ``TokenSelect``: ``mlp_head`` = Linear(D, D//16), ReLU, Linear(D//16, 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp_head = nn.Sequential(nn.Linear(dim, dim // 16), nn.ReLU(), nn.Linear(dim // 16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, 1) float 0/1: 1 = the token goes through the MLP."""
        return (self.mlp_head(x) > 0).to(x.dtype)


def _expand_mask(mask: torch.Tensor, group: int) -> torch.Tensor:
    """(N, H) -> (N, 1, H*group): unit j belongs to head/group j // group (official ``repeat``)."""
    return mask.unsqueeze(2).repeat(1, 1, group).flatten(1).unsqueeze(1)


class _DyDiTBlock(_DiTBlock):
    """DiT block + DyDiT routers.  Inherits norm1/attn/norm2/mlp/adaLN_modulation (same keys)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.attn_rate = _Router(hidden_size, num_heads - 1)
        self.mlp_rate = _Router(hidden_size, num_heads - 1)
        self.token_selection = _TokenSelect(hidden_size)

    def _attention(self, x: torch.Tensor, head_mask: torch.Tensor | None) -> torch.Tensor:
        a = self.attn
        B, T, D = x.shape
        qkv = a.qkv(x).reshape(B, T, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, T, hd)
        attn = ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, T, D)
        if head_mask is not None:
            x = x * _expand_mask(head_mask, a.head_dim)
        return a.proj(x)

    def _mlp(self, x: torch.Tensor, group_mask: torch.Tensor | None) -> torch.Tensor:
        m = self.mlp
        h = m.fc1(x)
        if group_mask is not None:
            h = h * _expand_mask(group_mask, h.shape[-1] // group_mask.shape[1])
        return m.fc2(m.act(h))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        attn_mask: torch.Tensor | None,
        mlp_mask: torch.Tensor | None,
        token_select: bool = True,
    ) -> torch.Tensor:
        """``attn_mask``/``mlp_mask``: (N, H) or None (= dense, i.e. the official complete_model path)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self._attention(_modulate(self.norm1(x), shift_msa, scale_msa), attn_mask)
        mlp_x = gate_mlp.unsqueeze(1) * self._mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp), mlp_mask)
        if token_select:
            # Routed on the post-attention residual stream, before the MLP residual is added.
            x = x + self.token_selection(x) * mlp_x
        else:
            x = x + mlp_x
        return x


class DyDiTReference(OriginalDiT):
    """DyDiT inference model: ``OriginalDiT`` + per-block routers under the official key names.

    ``state_dict()`` = every ``OriginalDiT`` key + ``blocks.{i}.attn_rate.router.*``,
    ``blocks.{i}.mlp_rate.router.*``, ``blocks.{i}.token_selection.mlp_head.{0,2}.*``.
    Freshly constructed weights are PyTorch defaults (use ``random_dydit`` for tests).

    Masks are float 0/1 tensors of shape (N, depth, H) (``attn``: heads, ``mlp``: groups of
    ``mlp_hidden // H`` hidden units); column 0 is always 1 for router-produced masks.
    """

    def __init__(self, **cfg):
        super().__init__(**cfg)
        if self.num_heads < 2:
            raise ValueError("DyDiT needs num_heads >= 2 (routers have num_heads - 1 outputs)")
        mlp_hidden = int(self.hidden_size * self.mlp_ratio)
        if mlp_hidden % self.num_heads:
            raise ValueError("mlp hidden size must be divisible by num_heads (MLP groups)")
        if self.hidden_size // 16 < 1:
            raise ValueError("hidden_size must be >= 16 (token router width is hidden_size // 16)")
        self.blocks = nn.ModuleList(
            [_DyDiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio) for _ in range(self.depth)]
        )
        # Constructor arguments, so a fresh copy can be built with DyDiTReference(**model.config).
        self.config = dict(
            input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
            hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio, class_dropout_prob=self.class_dropout_prob,
            num_classes=self.num_classes, learn_sigma=self.learn_sigma,
        )

    # -- pieces for encoder/decoder splits ---------------------------------- #
    def t_embed(self, t: torch.Tensor) -> torch.Tensor:
        """t_emb = t_embedder(t), (N, D): the router input."""
        return self.t_embedder(t)

    def condition_from_t_emb(self, t_emb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c = t_emb + y_embedder(y), (N, D): the adaLN conditioning."""
        return t_emb + self.y_embedder(y)

    # ``embed(x)`` and ``condition(t, y)`` are inherited from OriginalDiT.

    def router_masks_from_t_emb(self, t_emb: torch.Tensor) -> Masks:
        attn = torch.stack([b.attn_rate(t_emb) for b in self.blocks], dim=1)
        mlp = torch.stack([b.mlp_rate(t_emb) for b in self.blocks], dim=1)
        return attn, mlp

    def router_masks(self, t: torch.Tensor) -> Masks:
        """t: (N,) timesteps -> (attn_mask, mlp_mask), each (N, depth, H) float 0/1."""
        return self.router_masks_from_t_emb(self.t_embed(t))

    def run_blocks(
        self,
        h: torch.Tensor,
        c: torch.Tensor,
        t_emb: torch.Tensor | None,
        start: int,
        stop: int,
        token_select: bool = True,
        masks: Masks | None = None,
    ) -> torch.Tensor:
        """Run ``blocks[start:stop]`` on tokens h (N, T, D).

        ``masks``: full-depth (attn, mlp) of shape (N, depth, H) -- block i uses ``masks[.][:, i]``;
        if None they come from the routers applied to ``t_emb``.
        """
        if masks is None:
            if t_emb is None:
                raise ValueError("need t_emb (router input) or explicit masks")
            masks = self.router_masks_from_t_emb(t_emb)
        attn, mlp = masks
        for i in range(start, stop):
            h = self.blocks[i](h, c, attn[:, i], mlp[:, i], token_select)
        return h

    def head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final layer + unpatchify: (N, T, D) -> (N, out_channels, H, W)."""
        return self.unpatchify(self.final_layer(h, c))

    # -- full forwards ------------------------------------------------------- #
    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, token_select: bool = True,
        *, complete_model: bool = False,
    ) -> torch.Tensor:
        """DyDiT forward with router masks.  ``complete_model=True``: dense DiT (no masks, no token routing)."""
        t_emb = self.t_embed(t)
        c = self.condition_from_t_emb(t_emb, y)
        h = self.embed(x)
        if complete_model:
            for block in self.blocks:
                h = block(h, c, None, None, token_select=False)
        else:
            h = self.run_blocks(h, c, t_emb, 0, self.depth, token_select)
        return self.head(h, c)

    def forward_with_masks(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
        attn_mask: torch.Tensor, mlp_mask: torch.Tensor, token_select: bool = True,
    ) -> torch.Tensor:
        """Forward with externally given masks (N, depth, H) instead of the router masks."""
        c = self.condition(t, y)
        h = self.run_blocks(self.embed(x), c, None, 0, self.depth, token_select, masks=(attn_mask, mlp_mask))
        return self.head(h, c)


# --------------------------------------------------------------------------- #
# Random test models
# --------------------------------------------------------------------------- #
# Mask design used by random_dydit: every head/group router unit u is
#     logit_u(t) = a_u * s_u * (g(t) - thr_u),     g(t) = w . t_emb(t) + b0
# with ONE shared scalar "time feature" g (w fitted by ridge regression so that g is a
# noisy but roughly linear ramp from -1 at t=0 to +1 at t=999), a_u > 0, s_u = +-1 and
# thr_u one of a few shared levels.  Since every mask bit is then a function of which
# interval between consecutive levels g(t) falls in, the whole model has at most
# (#levels + 1) distinct mask patterns over ANY set of timesteps, while individual
# units / blocks still switch at different t.
_RAMP_RIDGE = 1e-2
_LEVEL_QUANTILES = (0.2, 0.4, 0.6, 0.8)  # shared thresholds = these quantiles of g over t in [0, 1000)
_P_ALWAYS_ON = 0.25                       # per unit; the rest switch at one of the levels
_P_ON_AT_LOW_T = 0.7                      # switching units: active at low t (clean) rather than at high t
_TOKEN_KEEP_RANGE = (0.5, 0.7)            # per-block target fraction of tokens routed through the MLP


def _time_feature(t_emb_all: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ridge fit of (w, b0) so that w . t_emb(t) + b0 ~ 2 t / 999 - 1 over t = 0..999."""
    E = t_emb_all.double()
    n = E.shape[0]
    A = torch.cat([E, torch.ones(n, 1, dtype=E.dtype)], dim=1)
    target = torch.linspace(-1.0, 1.0, n, dtype=E.dtype)
    reg = _RAMP_RIDGE * torch.eye(A.shape[1], dtype=E.dtype)
    reg[-1, -1] = 0.0  # do not shrink the intercept
    sol = torch.linalg.solve(A.T @ A + reg, A.T @ target)
    return sol[:-1].float(), float(sol[-1])


@torch.no_grad()
def random_dydit(seed: int = 0, **cfg) -> DyDiTReference:
    """DyDiT with the DiT weights of ``random_original_dit(seed, **cfg)`` plus designed routers (eval mode).

    * DiT weights: bit-identical to ``random_original_dit(seed, **cfg)`` (defaults: TINY_CFG --
      input 8, 4 latent channels, patch 2, hidden 64, depth 4, 4 heads, 10 classes, learn_sigma).
    * Head / group routers: see the comment above ``_time_feature``.  Each unit gets
      ``weight = a_u * s_u * w``, ``bias = a_u * s_u * (b0 - thr_u)`` with a_u ~ U(1, 3);
      25 % of the units are always on (threshold below min g), the others switch at one of
      4 shared levels (quantiles 0.2/0.4/0.6/0.8 of g, i.e. roughly t = 200/400/600/800),
      70 % of those being active at low t.  Every router has at least one switching unit.
      Consequence: masks vary over t in every block, blocks differ, and the whole model has
      <= 5 distinct mask patterns over any schedule.  Logits stay well inside +-15, so
      ``set_dydit_training_init_biases`` turns every unit on.
    * Token routers: random ``mlp_head`` weights (std 1/sqrt(fan_in)); the last bias of
      block i is then calibrated, block by block in order, to the (1 - f_i) quantile of the
      pre-bias logits of a calibration batch (32 N(0,1) latents, t spread over [0, 1000),
      random labels incl. null) run through the already-calibrated blocks, with
      f_i ~ U(0.5, 0.7).  Typical inputs therefore route ~50-70 % of tokens through the MLP.
    """
    full = dict(TINY_CFG)
    full.update(cfg)
    base = random_original_dit(seed, **full)
    model = DyDiTReference(**full).eval()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all(".attn_rate." in k or ".mlp_rate." in k or ".token_selection." in k for k in missing), missing

    g = torch.Generator().manual_seed(10_007 * seed + 1)
    H, depth = model.num_heads, model.depth

    # -- head / group routers --------------------------------------------- #
    w, b0 = _time_feature(model.t_embed(torch.arange(1000, dtype=torch.float32)))
    feat = model.t_embed(torch.arange(1000, dtype=torch.float32)) @ w + b0
    levels = torch.quantile(feat, torch.tensor(_LEVEL_QUANTILES))
    always_on_thr = float(feat.min()) - 1.0
    for block in model.blocks:
        for rate in (block.attn_rate, block.mlp_rate):
            n_units = H - 1
            always_on = torch.rand(n_units, generator=g) < _P_ALWAYS_ON
            always_on[torch.randint(n_units, (1,), generator=g)] = False  # >= 1 switching unit
            level_idx = torch.randint(len(levels), (n_units,), generator=g)
            low_t = torch.rand(n_units, generator=g) < _P_ON_AT_LOW_T
            a = 1.0 + 2.0 * torch.rand(n_units, generator=g)
            for u in range(n_units):
                if always_on[u]:
                    s, thr = 1.0, always_on_thr  # g - thr > 0 everywhere
                else:
                    s, thr = (-1.0 if low_t[u] else 1.0), float(levels[level_idx[u]])
                rate.router.weight[u] = a[u] * s * w
                rate.router.bias[u] = a[u] * s * (b0 - thr)

    # -- token routers ----------------------------------------------------- #
    for block in model.blocks:
        for lin in (block.token_selection.mlp_head[0], block.token_selection.mlp_head[2]):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(lin.in_features))
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.05)
    keep = _TOKEN_KEEP_RANGE[0] + (_TOKEN_KEEP_RANGE[1] - _TOKEN_KEEP_RANGE[0]) * torch.rand(depth, generator=g)

    n_cal = 32
    x = torch.randn(n_cal, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.linspace(0, 999, n_cal).round()
    y = torch.randint(model.num_classes + 1, (n_cal,), generator=g)
    t_emb = model.t_embed(t)
    c = model.condition_from_t_emb(t_emb, y)
    attn_m, mlp_m = model.router_masks_from_t_emb(t_emb)
    h = model.embed(x)
    for i, block in enumerate(model.blocks):
        # Reproduce the block up to the token router to get its input (post-attention x).
        shift_msa, scale_msa, gate_msa, *_ = block.adaLN_modulation(c).chunk(6, dim=1)
        x_post = h + gate_msa.unsqueeze(1) * block._attention(
            _modulate(block.norm1(h), shift_msa, scale_msa), attn_m[:, i])
        head = block.token_selection.mlp_head
        pre_bias = (head[2](head[1](head[0](x_post))) - head[2].bias).flatten()
        head[2].bias.fill_(-float(torch.quantile(pre_bias, 1.0 - float(keep[i]))))
        h = block(h, c, attn_m[:, i], mlp_m[:, i], token_select=True)
    return model


@torch.no_grad()
def set_dydit_training_init_biases(model: DyDiTReference, rate_bias: float = 15.0, token_bias: float = 35.0) -> None:
    """Set the router biases as DyDiT's ``initialize_weights`` does (15 / 35): all heads, groups, tokens on
    (as long as |weight . input| stays below the bias, which holds for ``random_dydit`` weights)."""
    for block in model.blocks:
        block.attn_rate.router.bias.fill_(rate_bias)
        block.mlp_rate.router.bias.fill_(rate_bias)
        block.token_selection.mlp_head[2].bias.fill_(token_bias)


def dydit_checkpoint(model: DyDiTReference, seed: int = 0) -> dict:
    """Official ``train.py`` checkpoint layout: ``{"model": ..., "ema": ...}``.

    ``"ema"`` is ``model.state_dict()`` (what sampling must load); ``"model"`` is a perturbed copy
    (every float tensor except ``pos_embed`` + N(0, (0.2 * (std + 0.05))^2) noise, router biases
    additionally shifted), so a loader that reads the wrong entry produces clearly different output.
    """
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 4242)
    raw = {}
    for k, v in ema.items():
        if not v.is_floating_point() or k == "pos_embed":
            raw[k] = v.clone()
            continue
        std = float(v.float().std()) if v.numel() > 1 else 0.0
        noisy = v + torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.2 * (std + 0.05)
        if k.endswith("rate.router.bias"):
            noisy = noisy + 1.0  # flip some head/group decisions too
        raw[k] = noisy
    return {"model": raw, "ema": ema}


# --------------------------------------------------------------------------- #
# Sampling reference
# --------------------------------------------------------------------------- #
@torch.no_grad()
def dydit_sample(
    model: DyDiTReference,
    z_T: torch.Tensor,
    class_labels: list[int],
    scheduler,
    guidance_scale: float,
    split: int,
    key_steps: Iterable[int],
    noise_injection: tuple[float, float] | None = None,
    token_select: bool = True,
    masks_fn: Callable[[torch.Tensor], Masks] | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Sequential dense-masked DyDiT sampling with encoder propagation; conventions of
    ``dit_reference.encoder_propagation_sample``.

    * Step i (0 = noisiest) has its own t, t_emb, c and masks (router masks of that t, or
      ``masks_fn(t_batch)`` -> (attn, mlp), each (n, depth, H), where t_batch is the (n,) float
      timestep vector of the model batch).
    * If ``i in key_steps``: embed + blocks[:split] on the current (scaled) latent with step i's
      c / masks, cache the tokens.  Every step: blocks[split:] + head on the cached tokens with
      step i's own c / masks.  ``key_steps=range(num_steps)`` is the dense masked baseline.
    * CFG (guidance_scale > 1): batch [z, z], labels [class_labels, null * B]; eps on the first
      ``in_channels`` channels: uncond + g * (cond - uncond).  Otherwise batch z, no CFG.
    * ``noise_injection=(alpha, tau)``: z += alpha * z_T before each scheduler step with
      t < tau * num_train_timesteps.
    * The scheduler is deep-copied.  Returns the final latent (B, C, H, W).
    """
    key_steps = set(int(k) for k in key_steps)
    if 0 not in key_steps:
        raise ValueError("step 0 must be a key step (nothing cached yet)")
    if not 0 <= split <= model.depth:
        raise ValueError(f"split must be in [0, {model.depth}]")
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
        t_emb = model.t_embed(t_batch)
        c = model.condition_from_t_emb(t_emb, labels)
        masks = masks_fn(t_batch) if masks_fn is not None else model.router_masks_from_t_emb(t_emb)

        if i in key_steps:
            cached = model.run_blocks(model.embed(model_in), c, None, 0, split, token_select, masks=masks)
        h = model.run_blocks(cached, c, None, split, model.depth, token_select, masks=masks)
        eps = model.head(h, c)[:, :C]
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
def mask_patterns(model: DyDiTReference, timesteps: Iterable) -> list[tuple]:
    """Distinct whole-model router mask patterns over ``timesteps``, in first-seen order.

    Each pattern is ``(attn bits, mlp bits)`` as nested tuples of ints, shape (depth, H) each.
    ``len(mask_patterns(model, scheduler.timesteps))`` is the number of distinct patterns.
    """
    t = torch.tensor([float(s) for s in timesteps], dtype=torch.float32)
    attn, mlp = model.router_masks(t)
    seen: dict[tuple, None] = {}
    for k in range(t.shape[0]):
        key = (tuple(map(tuple, attn[k].int().tolist())), tuple(map(tuple, mlp[k].int().tolist())))
        seen.setdefault(key, None)
    return list(seen)


# --------------------------------------------------------------------------- #
# FLOPs (DyDiT paper accounting)
# --------------------------------------------------------------------------- #
def _cfg_get(config, name: str, default=None):
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def dydit_flops(
    config,
    attn_mask_row,
    mlp_mask_row,
    token_fraction: float | Sequence[float] = 1.0,
) -> dict:
    """MACs / FLOPs of the transformer blocks for ONE sample at ONE timestep (DyDiT accounting).

    ``config``: a dict (e.g. ``model.config`` / TINY_CFG-style) or an object with attributes
    ``input_size, patch_size, hidden_size, num_heads, depth`` and optional ``mlp_ratio`` (4.0).
    ``attn_mask_row`` / ``mlp_mask_row``: (depth, H) 0/1 (tensor, array or nested lists) -- one row
    of ``router_masks``.  ``token_fraction``: fraction of tokens routed through the MLP, a scalar
    or one value per block.

    With T = (input_size / patch_size)^2 tokens, D = hidden, H heads, M = mlp_ratio * D,
    h_i = active heads of block i, m_i = active MLP groups, rho_i = token fraction::

        attn_macs_i = (T*D*3D  [qkv]  +  T*T*D  [q k^T]  +  T*T*D  [attn v]  +  T*D*D  [proj]) * h_i / H
        mlp_macs_i  = (T*D*M  [fc1]  +  T*M*D  [fc2]) * m_i / H * rho_i
        FLOPs = 2 * MACs

    Not counted (as in the paper's per-block accounting): patch embed, t/y embedders, adaLN
    modulations, LayerNorm / softmax / GELU, the routers themselves, final layer.

    Returns ``{"attn": [per-block MACs], "mlp": [per-block MACs], "attn_total", "mlp_total",
    "macs" (= attn_total + mlp_total), "flops" (= 2 * macs), "dense_macs" (all heads, groups and
    tokens on), "ratio" (= macs / dense_macs)}``.
    """
    D = int(_cfg_get(config, "hidden_size"))
    H = int(_cfg_get(config, "num_heads"))
    depth = int(_cfg_get(config, "depth"))
    M = int(D * float(_cfg_get(config, "mlp_ratio", 4.0) or 4.0))
    T = (int(_cfg_get(config, "input_size")) // int(_cfg_get(config, "patch_size"))) ** 2

    attn_rows = torch.as_tensor(attn_mask_row, dtype=torch.float64).reshape(depth, H)
    mlp_rows = torch.as_tensor(mlp_mask_row, dtype=torch.float64).reshape(depth, H)
    if isinstance(token_fraction, (int, float)):
        rho = [float(token_fraction)] * depth
    else:
        rho = [float(r) for r in token_fraction]
        if len(rho) != depth:
            raise ValueError(f"token_fraction needs {depth} values, got {len(rho)}")

    dense_attn = T * D * 3 * D + T * T * D + T * T * D + T * D * D
    dense_mlp = T * D * M + T * M * D
    attn = [dense_attn * float(attn_rows[i].sum()) / H for i in range(depth)]
    mlp = [dense_mlp * float(mlp_rows[i].sum()) / H * rho[i] for i in range(depth)]
    macs = sum(attn) + sum(mlp)
    dense = depth * (dense_attn + dense_mlp)
    return {
        "attn": attn,
        "mlp": mlp,
        "attn_total": sum(attn),
        "mlp_total": sum(mlp),
        "macs": macs,
        "flops": 2 * macs,
        "dense_macs": dense,
        "ratio": macs / dense,
    }
