"""Torch stage modules for Stable-Diffusion-style pipelines: the UNet split FasterDiffusion-style, ControlNet, the
CLIP text encoder and the VAE decoder.

FasterDiffusion's split of a ``UNet2DConditionModel``: the *encoder* is time embedding + ``conv_in`` + down blocks +
mid block and returns the skip tensors (exactly diffusers' ``down_block_res_samples``: ``conv_in``'s output first,
then every down-block residual) and the mid-block output; the *decoder* is up blocks + ``conv_norm_out`` /
``conv_act`` / ``conv_out`` and recomputes the time embedding for its own per-row timesteps, so one decoder call can
hold several steps. Everything reuses diffusers' own modules and ``UNet2DConditionModel`` methods; only the loop
over the blocks is re-written, branch-free:

* diffusers forwards ``upsample_size`` to the up blocks only when the latent is not a multiple of
  ``2 ** num_upsamplers`` (a Python branch on the traced size). Nearest upsampling to the skip's size is identical
  to ``scale_factor=2`` whenever the skip is twice as large, so the stages always forward it.
* ``Upsample2D.forward`` branches on ``batch >= 64`` and on ``numel * scale > 2**31`` only to call
  ``.contiguous()``; :func:`with_branch_free_upsamplers` gives a view of a model whose ``Upsample2D`` modules skip
  those branches (same parameters, the original model is untouched).

Some UNets take per-row conditioning besides (sample, timestep, encoder_hidden_states); every stage takes it as extra
inputs after its own (:func:`conditioning_inputs`) and builds the time embedding from it exactly as diffusers'
forward does: SDXL's ``addition_embed_type="text_time"`` (``text_embeds`` = the pooled text embedding,
``time_ids`` = original size, crop top-left and target size — or the refiner's aesthetic score — through
``add_time_proj``) and a ``class_embed_type="timestep"`` class embedding (``class_labels``: DeepFloyd-IF stage II's
noise level, a float timestep). The decoder recomputes the embedding from its own rows, so a batched decoder call
over several steps carries each row's conditioning, tiled like the text.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair


class BranchFreeUpsample2D(nn.Module):
    """diffusers ``Upsample2D.forward`` without the shape-dependent ``.contiguous()`` branches (numerically equal)."""

    def __init__(self, upsample: nn.Module):
        super().__init__()
        self.upsample = upsample

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        up = self.upsample
        if up.norm is not None:
            hidden_states = up.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if up.use_conv_transpose:
            return up.conv(hidden_states)
        if up.interpolate:
            if output_size is None:
                hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
            else:
                hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        if up.use_conv:
            hidden_states = up.conv(hidden_states) if up.name == "conv" else up.Conv2d_0(hidden_states)
        return hidden_states


def with_branch_free_upsamplers(module: nn.Module) -> nn.Module:
    """A view of ``module`` in which every diffusers ``Upsample2D`` is wrapped in :class:`BranchFreeUpsample2D`.

    Modules on the path to an ``Upsample2D`` are shallow copies with their own ``_modules`` dict; everything else
    (parameters, buffers, configs, other submodules) is shared with ``module``, which is not modified.
    """
    from diffusers.models.upsampling import Upsample2D

    if type(module) is Upsample2D:
        return BranchFreeUpsample2D(module)
    swapped = {name: with_branch_free_upsamplers(child) for name, child in module._modules.items() if child is not None}
    changed = {name: child for name, child in swapped.items() if child is not module._modules[name]}
    if not changed:
        return module
    view = copy.copy(module)
    view._modules = dict(module._modules)
    view._modules.update(changed)
    return view


# --- the UNet's skip layout -----------------------------------------------------------------------------------------


def skip_layout(model: nn.Module) -> list[tuple[int, int]]:
    """(channels, level) of every skip tensor in diffusers' ``down_block_res_samples`` order; level l is the spatial
    size after l downsamplers. Works for ``UNet2DConditionModel`` and ``ControlNetModel`` (same down path)."""
    layout = [(model.conv_in.out_channels, 0)]
    level = 0
    for block in model.down_blocks:
        layout += [(resnet.out_channels, level) for resnet in block.resnets]
        if block.downsamplers is not None:
            level += len(block.downsamplers)
            layout.append((block.downsamplers[-1].out_channels, level))
    return layout


def _downsampled(size: int, downsampler: nn.Module, axis: int) -> int:
    """Output size of a diffusers ``Downsample2D`` along ``axis`` (0 = height, 1 = width)."""
    conv = downsampler.conv
    if isinstance(conv, nn.Conv2d):
        if downsampler.use_conv and downsampler.padding == 0:
            size += 1  # Downsample2D pads (0, 1, 0, 1) before an unpadded conv
        k, s, p, d = (_pair(v)[axis] for v in (conv.kernel_size, conv.stride, conv.padding, conv.dilation))
        return (size + 2 * p - d * (k - 1) - 1) // s + 1
    k, s = _pair(conv.kernel_size)[axis], _pair(conv.stride or conv.kernel_size)[axis]  # AvgPool2d
    return (size - k) // s + 1


def level_sizes(model: nn.Module, height: int, width: int) -> list[tuple[int, int]]:
    """(height, width) at every level for a latent of ``height`` x ``width`` (level 0 = the latent itself).
    With diffusers' default Downsample2D (3x3 conv, stride 2, padding 1) level l+1 = ceil(level l / 2); a
    ResnetBlock2D downsampler (DeepFloyd-IF's ``Resnet*`` / ``SimpleCrossAttn*`` blocks) pools 2x2: floor."""
    sizes = [(height, width)]
    for block in model.down_blocks:
        for downsampler in block.downsamplers or []:
            downsampler = getattr(downsampler, "downsample", None) or downsampler  # ResnetBlock2D(down=True)
            h, w = sizes[-1]
            sizes.append((_downsampled(h, downsampler, 0), _downsampled(w, downsampler, 1)))
    return sizes


def fixed_factor_upsampling(model: nn.Module) -> bool:
    """Whether the up path upsamples by a fixed 2x (ResnetBlock2D upsamplers ignore ``upsample_size``): then every
    level must be exactly twice the next, i.e. the sample size a multiple of ``2 ** downsamplers``."""
    return any(type(u).__name__ == "ResnetBlock2D" for b in model.up_blocks for u in (b.upsamplers or []))


# --- per-row conditioning besides the text ---------------------------------------------------------------------------

TEXT_TIME_INPUTS = ("text_embeds", "time_ids")  # SDXL's added_cond_kwargs
CLASS_LABEL_INPUT = "class_labels"


def conditioning_inputs(config) -> tuple[str, ...]:
    """The extra per-row inputs a UNet (or ControlNet) config needs, in stage input order."""
    names = ()
    if config.get("class_embed_type") is not None:
        names += (CLASS_LABEL_INPUT,)
    if config.get("addition_embed_type") == "text_time":
        names += TEXT_TIME_INPUTS
    return names


# --- UNet stages ----------------------------------------------------------------------------------------------------


def unet_embedding(unet, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   conditioning: dict[str, torch.Tensor] | None = None):
    """The final time embedding ``emb`` and the processed encoder hidden states, exactly as
    ``UNet2DConditionModel.forward`` builds them; ``conditioning`` holds the :func:`conditioning_inputs` by name
    (no timestep_cond: unet_export rejects LCM-style UNets). ``sample`` only gives the batch size and dtype."""
    conditioning = conditioning or {}
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    class_emb = unet.get_class_embed(sample=sample, class_labels=conditioning.get(CLASS_LABEL_INPUT))
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    added = {k: v for k, v in conditioning.items() if k in TEXT_TIME_INPUTS}
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs={})
    return emb, encoder_hidden_states


def unet_encode(unet, sample, emb, encoder_hidden_states) -> tuple[torch.Tensor, ...]:
    """conv_in + down blocks + mid block: (skip_0, ..., skip_{n-1}, mid)."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    sample = unet.conv_in(sample)
    skips = (sample,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res_samples = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample, res_samples = block(hidden_states=sample, temb=emb)
        skips += res_samples
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample = unet.mid_block(sample, emb)
    return (*skips, sample)


def unet_decode(unet, mid, skips, emb, encoder_hidden_states) -> torch.Tensor:
    """Up blocks + conv_norm_out / conv_act / conv_out, taking the skips as diffusers' forward does (res_samples
    sliced from the end). ``upsample_size`` is always the next skip's size (see the module docstring)."""
    sample = mid
    skips = tuple(skips)
    for i, block in enumerate(unet.up_blocks):
        is_final_block = i == len(unet.up_blocks) - 1
        res_samples, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
        upsample_size = None if is_final_block else skips[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples,
                           encoder_hidden_states=encoder_hidden_states, upsample_size=upsample_size)
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples,
                           upsample_size=upsample_size)
    if unet.conv_norm_out:
        sample = unet.conv_norm_out(sample)
        sample = unet.conv_act(sample)
    return unet.conv_out(sample)


class _ConditionedStage(nn.Module):
    """A UNet stage whose trailing inputs are the model's per-row conditioning (:func:`conditioning_inputs`)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = with_branch_free_upsamplers(unet)
        self.conditioning_names = conditioning_inputs(unet.config)

    def embedding(self, sample, timestep, encoder_hidden_states, conditioning):
        return unet_embedding(self.unet, sample, timestep, encoder_hidden_states,
                              dict(zip(self.conditioning_names, conditioning)))


class UNetEncoderStage(_ConditionedStage):
    """(sample, timestep, encoder_hidden_states, *conditioning) -> (skip_0, ..., skip_{n-1}, mid)."""

    def forward(self, sample, timestep, encoder_hidden_states, *conditioning):
        emb, encoder_hidden_states = self.embedding(sample, timestep, encoder_hidden_states, conditioning)
        return unet_encode(self.unet, sample, emb, encoder_hidden_states)


class UNetDecoderStage(_ConditionedStage):
    """(skip_0, ..., skip_{n-1}, mid, timestep, encoder_hidden_states, *conditioning) -> noise_pred; every row has
    its own timestep and conditioning (its time embedding is computed here)."""

    def __init__(self, unet, num_skips: int):
        super().__init__(unet)
        self.num_skips = num_skips

    def forward(self, *inputs):
        skips, (mid, timestep, encoder_hidden_states, *conditioning) = inputs[: self.num_skips], inputs[self.num_skips:]
        emb, encoder_hidden_states = self.embedding(mid, timestep, encoder_hidden_states, conditioning)
        return unet_decode(self.unet, mid, skips, emb, encoder_hidden_states)


class UNetFullStage(_ConditionedStage):
    """The whole UNet: (sample, timestep, encoder_hidden_states, *conditioning) -> noise_pred (= diffusers' forward)."""

    def forward(self, sample, timestep, encoder_hidden_states, *conditioning):
        emb, encoder_hidden_states = self.embedding(sample, timestep, encoder_hidden_states, conditioning)
        *skips, mid = unet_encode(self.unet, sample, emb, encoder_hidden_states)
        return unet_decode(self.unet, mid, skips, emb, encoder_hidden_states)


class ControlNetStage(nn.Module):
    """diffusers ``ControlNetModel`` (guess_mode False): (sample, timestep, encoder_hidden_states, controlnet_cond,
    conditioning_scale[1], *conditioning) -> (down_res_0, ..., down_res_{n-1}, mid_res), already scaled."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet
        self.conditioning_names = conditioning_inputs(controlnet.config)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, *conditioning):
        named = dict(zip(self.conditioning_names, conditioning))
        added = {k: v for k, v in named.items() if k in TEXT_TIME_INPUTS} or None
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=controlnet_cond, conditioning_scale=conditioning_scale,
                                    class_labels=named.get(CLASS_LABEL_INPUT), added_cond_kwargs=added,
                                    guess_mode=False, return_dict=False)
        return (*down, mid)


class TextEncoderStage(nn.Module):
    """transformers ``CLIPTextModel``: input_ids -> last_hidden_state (StableDiffusionPipeline, clip_skip None)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids=input_ids)[0]


class PenultimateTextEncoderStage(nn.Module):
    """A CLIP text encoder as StableDiffusionXLPipeline reads it (clip_skip None): input_ids -> the penultimate
    layer's hidden states, and for ``CLIPTextModelWithProjection`` also the projected pooled output (``text_embeds``,
    the pipeline's ``pooled_prompt_embeds``)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder
        self.pooled = type(text_encoder).__name__ == "CLIPTextModelWithProjection"

    def forward(self, input_ids):
        out = self.text_encoder(input_ids=input_ids, output_hidden_states=True)
        return (out.hidden_states[-2], out[0]) if self.pooled else out.hidden_states[-2]
