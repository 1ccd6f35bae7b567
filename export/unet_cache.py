"""DeepCache for Stable-Diffusion-style UNets as two static stages.

DeepCache (Ma et al., the ``deepcache`` package's ``DeepCacheSDHelper``) runs the whole UNet at *full* steps and, at
the steps in between, only a *shallow* branch: ``conv_in``, the down path up to the chosen branch, the matching tail
of the up path and the output head, fed with the deep feature cached at the last full step. ``cache_branch_id``
picks the branch: block ``b = id // 3``, layer ``l = id % 3``. Read off the helper's ``is_skip_step``:

* down blocks ``i < b`` run whole; in down block ``b`` the layers (resnet + attention) ``j < l`` run, the rest and
  its downsampler are skipped; deeper down blocks and the mid block are skipped;
* up blocks are numbered from the output (the last up block is 0); blocks ``> b`` are skipped; in up block ``b``
  the layers whose number counted from the block's end is ``> l`` are skipped, i.e. the block resumes at layer
  ``R - 1 - l`` (R = its resnets) on the cached output of the layer before it (or of the block before it);
* every up layer that runs consumes a skip tensor the shallow down path produced fresh: up block ``b``'s layers
  take the last ``l + 1`` of them, the up blocks after it the rest, exactly as in the full forward.

So the cache is one tensor per branch: the hidden state entering that up layer. The full stage returns it next to
the prediction (``cache_deep<id>``), the shallow stage takes it as an input. The layer loops below are diffusers'
``CrossAttn{Down,Up}Block2D`` / ``{Down,Up}Block2D`` / ``SimpleCrossAttn{Down,Up}Block2D`` /
``Resnet{Downsample,Upsample}Block2D`` forwards split at layer granularity (no FreeU, no gradient checkpointing, no
adapter residuals, no attention masks — the export path does not use them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from .errors import ModelLoadError
from .unet_model import _ConditionedStage, skip_layout


@dataclass(frozen=True)
class DeepCacheBranch:
    """``cache_branch_id`` as the ``deepcache`` package reads it."""

    branch_id: int

    @property
    def block(self) -> int:
        return self.branch_id // 3

    @property
    def layer(self) -> int:
        return self.branch_id % 3

    @property
    def name(self) -> str:
        return f"deep{self.branch_id}"

    def check(self, unet) -> None:
        """The branch must name an up layer of this UNet (DeepCache's id space assumes <= 3 layers per block)."""
        blocks = len(unet.up_blocks)
        if self.block >= blocks:
            raise ModelLoadError(f"DeepCache branch {self.branch_id} is block {self.block}, the UNet has {blocks}")
        layers = len(unet.up_blocks[blocks - 1 - self.block].resnets)
        if self.layer >= layers:
            raise ModelLoadError(
                f"DeepCache branch {self.branch_id} is layer {self.layer} of block {self.block}, which has {layers}")

    def resume_at(self, unet) -> tuple[int, int]:
        """(up block index in forward order, layer index in it) where a shallow step re-enters the up path."""
        u = len(unet.up_blocks) - 1 - self.block
        return u, len(unet.up_blocks[u].resnets) - 1 - self.layer


def _attend(attention, hidden, ehs):
    """One attention layer: a Transformer2DModel (returns a tuple) or, in the SimpleCrossAttn blocks, a bare
    ``Attention`` with added K/V projections (returns the tensor)."""
    if type(attention).__name__ == "Attention":
        return attention(hidden, encoder_hidden_states=ehs)
    return attention(hidden, encoder_hidden_states=ehs, return_dict=False)[0]


def _takes_temb(sampler) -> bool:
    """A ResnetBlock2D with down/up=True (IF's Resnet*/SimpleCrossAttn* blocks) takes the time embedding and always
    scales by 2; Downsample2D / Upsample2D take the hidden state (and the output size) only."""
    return type(sampler).__name__ == "ResnetBlock2D"


def _downsample(sampler, hidden, emb):
    return sampler(hidden, emb) if _takes_temb(sampler) else sampler(hidden)


def _upsample(sampler, hidden, emb, size):
    return sampler(hidden, emb) if _takes_temb(sampler) else sampler(hidden, size)


def _down_layer(block, j: int, hidden, emb, ehs):
    hidden = block.resnets[j](hidden, emb)
    attentions = getattr(block, "attentions", None)
    if attentions is not None:
        hidden = _attend(attentions[j], hidden, ehs)
    return hidden


def _up_layer(block, j: int, hidden, res, emb, ehs):
    hidden = block.resnets[j](torch.cat([hidden, res], dim=1), emb)
    attentions = getattr(block, "attentions", None)
    if attentions is not None:
        hidden = _attend(attentions[j], hidden, ehs)
    return hidden


def _mid(unet, hidden, emb, ehs):
    if unet.mid_block is None:
        return hidden
    if getattr(unet.mid_block, "has_cross_attention", False):
        return unet.mid_block(hidden, emb, encoder_hidden_states=ehs)
    return unet.mid_block(hidden, emb)


def down_path(unet, sample, emb, ehs, stop: DeepCacheBranch | None = None):
    """conv_in + down blocks (+ mid block when ``stop`` is None): (hidden, skips). With ``stop`` only DeepCache's
    shallow part runs (blocks before ``stop.block``, then ``stop.layer`` layers of it) and hidden is None."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    hidden = unet.conv_in(sample)
    skips = [hidden]
    for i, block in enumerate(unet.down_blocks):
        if stop is not None and i == stop.block:
            for j in range(stop.layer):
                hidden = _down_layer(block, j, hidden, emb, ehs)
                skips.append(hidden)
            return None, skips
        for j in range(len(block.resnets)):
            hidden = _down_layer(block, j, hidden, emb, ehs)
            skips.append(hidden)
        for downsampler in block.downsamplers or []:
            hidden = _downsample(downsampler, hidden, emb)
            skips.append(hidden)
    return _mid(unet, hidden, emb, ehs), skips


def up_path(unet, hidden, skips, emb, ehs, start: tuple[int, int] = (0, 0), capture=()):
    """Up blocks from layer ``start`` = (block, layer) on + the output head, popping skips from the end as diffusers
    does. ``capture``: (block, layer) points whose incoming hidden state is returned too, in that order."""
    skips = list(skips)
    captured = {}
    for u in range(start[0], len(unet.up_blocks)):
        block = unet.up_blocks[u]
        for j in range(start[1] if u == start[0] else 0, len(block.resnets)):
            if (u, j) in capture:
                captured[(u, j)] = hidden
            hidden = _up_layer(block, j, hidden, skips.pop(), emb, ehs)
        if block.upsamplers is not None:
            size = skips[-1].shape[2:] if u < len(unet.up_blocks) - 1 else None  # see unet_model's docstring
            for upsampler in block.upsamplers:
                hidden = _upsample(upsampler, hidden, emb, size)
    if unet.conv_norm_out:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden), [captured[c] for c in capture]


class UNetCachingFullStage(_ConditionedStage):
    """The whole UNet, also returning the deep feature of every branch: (sample, timestep, encoder_hidden_states,
    *conditioning) -> (noise_pred, cache_deep<id>, ...)."""

    def __init__(self, unet, branches: list[DeepCacheBranch]):
        super().__init__(unet)
        self.points = [b.resume_at(unet) for b in branches]

    def forward(self, sample, timestep, encoder_hidden_states, *conditioning):
        emb, ehs = self.embedding(sample, timestep, encoder_hidden_states, conditioning)
        mid, skips = down_path(self.unet, sample, emb, ehs)
        out, features = up_path(self.unet, mid, skips, emb, ehs, capture=tuple(self.points))
        return (out, *features)


class UNetShallowStage(_ConditionedStage):
    """A DeepCache cached step: (sample, timestep, encoder_hidden_states, cache_deep<id>, *conditioning) ->
    noise_pred."""

    def __init__(self, unet, branch: DeepCacheBranch):
        super().__init__(unet)
        self.branch = branch
        self.start = branch.resume_at(unet)

    def forward(self, sample, timestep, encoder_hidden_states, deep_feature, *conditioning):
        emb, ehs = self.embedding(sample, timestep, encoder_hidden_states, conditioning)
        _, skips = down_path(self.unet, sample, emb, ehs, stop=self.branch)
        out, _ = up_path(self.unet, deep_feature, skips, emb, ehs, start=self.start)
        return out


def deep_feature_shape(unet, branch: DeepCacheBranch) -> tuple[int, int]:
    """(channels, level) of the cached hidden state: it is concatenated with the last skip the shallow down path
    produces (so it has that skip's level) and fills the rest of the resume layer's input channels."""
    u, j = branch.resume_at(unet)
    fresh = 1 + sum(len(b.resnets) + len(b.downsamplers or []) for b in unet.down_blocks[: branch.block]) + branch.layer
    skip_channels, level = skip_layout(unet)[fresh - 1]
    return unet.up_blocks[u].resnets[j].in_channels - skip_channels, level
