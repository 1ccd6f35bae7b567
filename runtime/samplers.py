"""The sampler of a bundle's model family."""

from __future__ import annotations

from .backends.base import Backend
from .bundle import Bundle


def sampler_class(bundle: Bundle) -> type:
    if bundle.family == "unet3d":
        from .video_sampler import VideoSampler

        return VideoSampler
    if bundle.family == "unet":
        from .unet_sampler import UNetSampler

        return UNetSampler
    if bundle.family in ("if", "cascade"):
        from .if_sampler import CascadeSampler, IFStageSampler

        return IFStageSampler if bundle.family == "if" else CascadeSampler
    from .dit_sampler import DiTSampler

    return DiTSampler


def sampler_for(bundle: Bundle, backend: Backend):
    return sampler_class(bundle)(bundle, backend)
