"""Torch stage modules for diffusers' ``UNet3DConditionModel`` (ModelScope text-to-video / VideoFusion,
TextToVideoSDPipeline): the FasterDiffusion split and DeepCache's shallow branch, with frames as a dynamic axis.

diffusers runs a video UNet as a 2-D UNet over ``batch * frames`` rows (``b`` outer, ``f`` inner) whose temporal
layers reshape to ``(b, c, f, h, w)`` and back. Every *layer* of a 3-D block is ``resnet -> temp_conv [-> attention
-> temp_attention]`` (the mid block interleaves them in its own order and is called whole); ``conv_in`` is followed
by ``transformer_in``, a temporal transformer over the frames. The stages keep that row layout inside and expose:

* ``sample`` / ``noise_pred`` as ``(batch, C, frames, height, width)`` — the pipeline's latent layout;
* the cached features (skips, mid, DeepCache's deep feature) as ``(batch, frames, C_i, h_i, w_i)`` — a free reshape
  of the ``(batch * frames)`` rows, so CFG halves and decoder tiling work on axis 0 exactly as for 2-D UNets;
* one ``timestep`` and one text embedding per video row (the time embedding and text are repeated over its frames,
  as ``UNet3DConditionModel.forward`` does with ``repeat_interleave``).

The encoder is time embedding + ``conv_in`` + ``transformer_in`` + down blocks + mid block; the decoder is up blocks +
output head and computes the time embedding of its own per-row timesteps, so one decoder call can hold several
steps. DeepCache's ``cache_branch_id`` means what the ``deepcache`` package's ``DeepCacheSDHelper`` makes of it on a
video pipeline: the helper caches resnet and spatial-attention outputs, and the temporal layers after them recompute
the same values from the cached inputs, so a skipped layer yields its last full step's output — the branch point,
the skips consumed and the cached tensor are the 2-D UNet's (:mod:`keystep.export.unet_cache`), with each layer
including its temporal parts and ``transformer_in`` in the shallow path.
"""

from __future__ import annotations

import torch
from torch import nn

from .unet_cache import DeepCacheBranch
from .unet_model import with_branch_free_upsamplers


def to_rows(video: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) -> (b*f, c, h, w), frames inner (UNet3DConditionModel's layout)."""
    b, c, f, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def to_video(rows: torch.Tensor, frames) -> torch.Tensor:
    """(b*f, c, h, w) -> (b, c, f, h, w)."""
    return rows.reshape(-1, frames, *rows.shape[1:]).permute(0, 2, 1, 3, 4)


def per_frame(rows: torch.Tensor, frames) -> torch.Tensor:
    """Repeat every row ``frames`` times, consecutively (``repeat_interleave`` written as expand + reshape, which
    exports with a symbolic frame count)."""
    return rows[:, None].expand(rows.shape[0], frames, *rows.shape[1:]).reshape(-1, *rows.shape[1:])


def video_embedding(unet, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, frames):
    """Per-row time embedding and text, repeated over the frames (``UNet3DConditionModel.forward``, no
    ``timestep_cond``: the loader rejects ``time_cond_proj_dim``)."""
    t_emb = unet.time_proj(timestep).to(dtype=encoder_hidden_states.dtype)
    emb = unet.time_embedding(t_emb, None)
    return per_frame(emb, frames), per_frame(encoder_hidden_states, frames)


def _layer(block, j: int, hidden, emb, ehs, frames):
    """Layer ``j`` of a 3-D down/up block: resnet, temporal conv, then (cross-attention blocks) spatial and
    temporal attention — the order of ``CrossAttn{Down,Up}Block3D`` / ``{Down,Up}Block3D.forward``."""
    hidden = block.resnets[j](hidden, emb)
    hidden = block.temp_convs[j](hidden, num_frames=frames)
    if getattr(block, "attentions", None) is not None:
        hidden = block.attentions[j](hidden, encoder_hidden_states=ehs, return_dict=False)[0]
        hidden = block.temp_attentions[j](hidden, num_frames=frames, return_dict=False)[0]
    return hidden


def down_path(unet, rows, emb, ehs, frames, stop: DeepCacheBranch | None = None):
    """conv_in + transformer_in + down blocks (+ mid block when ``stop`` is None) on (b*f) rows: (hidden, skips),
    skips in diffusers' ``down_block_res_samples`` order. With ``stop`` only DeepCache's shallow part runs (blocks
    before ``stop.block``, then ``stop.layer`` layers of it) and hidden is None."""
    hidden = unet.conv_in(rows)
    hidden = unet.transformer_in(hidden, num_frames=frames, return_dict=False)[0]
    skips = [hidden]
    for i, block in enumerate(unet.down_blocks):
        layers = stop.layer if stop is not None and i == stop.block else len(block.resnets)
        for j in range(layers):
            hidden = _layer(block, j, hidden, emb, ehs, frames)
            skips.append(hidden)
        if stop is not None and i == stop.block:
            return None, skips
        for downsampler in block.downsamplers or []:
            hidden = downsampler(hidden)
            skips.append(hidden)
    hidden = unet.mid_block(hidden, emb, encoder_hidden_states=ehs, num_frames=frames)
    return hidden, skips


def up_path(unet, hidden, skips, emb, ehs, frames, start: tuple[int, int] = (0, 0), capture=()):
    """Up blocks from layer ``start`` = (block, layer) on + the output head, popping skips from the end as diffusers
    does; upsampling always to the next skip's size (see :mod:`keystep.export.unet_model`). ``capture``: (block,
    layer) points whose incoming hidden state is returned too, in that order."""
    skips = list(skips)
    captured = {}
    for u in range(start[0], len(unet.up_blocks)):
        block = unet.up_blocks[u]
        for j in range(start[1] if u == start[0] else 0, len(block.resnets)):
            if (u, j) in capture:
                captured[(u, j)] = hidden
            hidden = _layer(block, j, torch.cat([hidden, skips.pop()], dim=1), emb, ehs, frames)
        for upsampler in block.upsamplers or []:
            hidden = upsampler(hidden, skips[-1].shape[2:] if skips else None)
    if unet.conv_norm_out:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden), [captured[c] for c in capture]


def _features(rows: torch.Tensor, frames) -> torch.Tensor:
    """(b*f, c, h, w) rows -> the (b, f, c, h, w) feature layout of the stage I/O (a view)."""
    return rows.reshape(-1, frames, *rows.shape[1:])


def _rows(features: torch.Tensor) -> torch.Tensor:
    return features.reshape(-1, *features.shape[2:])


class _VideoStage(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = with_branch_free_upsamplers(unet)

    def embed(self, sample, timestep, encoder_hidden_states):
        frames = sample.shape[2]
        emb, ehs = video_embedding(self.unet, timestep, encoder_hidden_states, frames)
        return to_rows(sample), frames, emb, ehs


class VideoEncoderStage(_VideoStage):
    """(sample[b,C,f,H,W], timestep[b], encoder_hidden_states[b,L,D]) -> (skip_0, ..., skip_{n-1}, mid), each
    (b, f, C_i, h_i, w_i)."""

    def forward(self, sample, timestep, encoder_hidden_states):
        rows, frames, emb, ehs = self.embed(sample, timestep, encoder_hidden_states)
        mid, skips = down_path(self.unet, rows, emb, ehs, frames)
        return (*(_features(s, frames) for s in skips), _features(mid, frames))


class VideoDecoderStage(_VideoStage):
    """(skip_0, ..., skip_{n-1}, mid, timestep, encoder_hidden_states) -> noise_pred[b,C,f,H,W]; every row (video)
    has its own timestep."""

    def __init__(self, unet, num_skips: int):
        super().__init__(unet)
        self.num_skips = num_skips

    def forward(self, *inputs):
        skips, (mid, timestep, encoder_hidden_states) = inputs[: self.num_skips], inputs[self.num_skips:]
        frames = mid.shape[1]
        emb, ehs = video_embedding(self.unet, timestep, encoder_hidden_states, frames)
        out, _ = up_path(self.unet, _rows(mid), [_rows(s) for s in skips], emb, ehs, frames)
        return to_video(out, frames)


class VideoFullStage(_VideoStage):
    """The whole video UNet: (sample, timestep, encoder_hidden_states) -> (noise_pred, cache_deep<id>, ...) — the
    deep feature of every DeepCache branch given (none: just the prediction, = diffusers' forward)."""

    def __init__(self, unet, branches: list[DeepCacheBranch] = ()):
        super().__init__(unet)
        self.points = tuple(b.resume_at(unet) for b in branches)

    def forward(self, sample, timestep, encoder_hidden_states):
        rows, frames, emb, ehs = self.embed(sample, timestep, encoder_hidden_states)
        mid, skips = down_path(self.unet, rows, emb, ehs, frames)
        out, features = up_path(self.unet, mid, skips, emb, ehs, frames, capture=self.points)
        if not self.points:
            return to_video(out, frames)
        return (to_video(out, frames), *(_features(f, frames) for f in features))


class VideoShallowStage(_VideoStage):
    """A DeepCache cached step: (sample, timestep, encoder_hidden_states, cache_deep<id>) -> noise_pred."""

    def __init__(self, unet, branch: DeepCacheBranch):
        super().__init__(unet)
        self.branch = branch
        self.start = branch.resume_at(unet)

    def forward(self, sample, timestep, encoder_hidden_states, deep_feature):
        rows, frames, emb, ehs = self.embed(sample, timestep, encoder_hidden_states)
        _, skips = down_path(self.unet, rows, emb, ehs, frames, stop=self.branch)
        out, _ = up_path(self.unet, _rows(deep_feature), skips, emb, ehs, frames, start=self.start)
        return to_video(out, frames)
