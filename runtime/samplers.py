"""The sampler of a bundle's model family."""

from __future__ import annotations

from .backends.base import Backend
from .bundle import Bundle


def sampler_for(bundle: Bundle, backend: Backend):
    if bundle.family == "unet":
        from .unet_sampler import UNetSampler

        return UNetSampler(bundle, backend)
    from .dit_sampler import DiTSampler

    return DiTSampler(bundle, backend)
