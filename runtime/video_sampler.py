"""Text-to-video for UNet3D bundles (family ``unet3d``; diffusers TextToVideoSDPipeline semantics).

Latents are ``(videos, C, frames, H, W)``; a stage row is one video, so the plan executor's CFG halves, decoder
tiling (a call over S steps repeats each half S times) and scheduler steps work unchanged on the 5-D arrays — every
scheduler keystep ships is elementwise over the latent, as diffusers' are over the pipeline's ``(b*f, C, H, W)``
reshaping. CFG rows follow the pipeline: [negative prompt, prompt]. The VAE decodes frames as rows, a few at a time.
"""

from __future__ import annotations

import numpy as np

from .sampler import SampleResult, SamplingError, SamplingOptions, to_uint8
from .unet_sampler import TextToImageContext, UNetSampler

VAE_FRAMES_PER_CALL = 8  # bounds the VAE's activation memory (its cost is per frame anyway)


class VideoSampler(UNetSampler):
    family = "unet3d"
    latent_layout = "videos, C, frames, H, W"

    def __init__(self, bundle, backend):
        super().__init__(bundle, backend)
        self.default_frames = int(bundle.model_config["num_frames"])

    def noise_shape(self, images: int, height: int, width: int, frames: int | None = None) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return images, self.latent_channels, frames or self.default_frames, height // f, width // f

    def initial_noise(self, images: int, height: int, width: int, seed: int, frames: int | None = None,
                      generator: np.random.Generator | None = None) -> np.ndarray:
        return self.start_noise(images, None, seed, generator, height=height, width=width, frames=frames)

    def sample(
        self,
        prompts: list[str],
        options: SamplingOptions,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        init_noise: np.ndarray | None = None,
        seed: int = 0,
        num_frames: int | None = None,
        control_image=None,
        control_scale: float = 1.0,
        generator: np.random.Generator | None = None,
    ) -> SampleResult:
        """One video per prompt, ``num_frames`` frames (default: the bundle's, TextToVideoSDPipeline's 16)."""
        if not prompts:
            raise SamplingError("no prompt given")
        if control_image is not None:
            raise SamplingError("text-to-video bundles have no ControlNet stage")
        frames = self.default_frames if num_frames is None else num_frames
        if frames < 1:
            raise SamplingError(f"the number of frames must be at least 1, got {frames}")
        height, width = self.checked_size(height, width)
        videos = len(prompts)
        noise = self.start_noise(videos, init_noise, seed, generator, height=height, width=width, frames=frames)
        text = self.encode_text(list(prompts))
        if options.guidance > 1:
            negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * videos
            if len(negatives) != videos:
                raise SamplingError(f"{len(negatives)} negative prompts for {videos} prompts")
            text = np.concatenate([self.encode_text(negatives), text])
        return self.run_plan(noise, options, TextToImageContext(text, None, 1.0), seed=seed, generator=generator)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Frames as uint8 ``(videos, frames, H, W, 3)`` through the VAE, ``VAE_FRAMES_PER_CALL`` frames a call."""
        videos, channels, frames, h, w = latents.shape
        rows = np.ascontiguousarray(latents.transpose(0, 2, 1, 3, 4).reshape(videos * frames, channels, h, w),
                                    dtype=np.float32)
        vae = self.runner("vae_decoder")
        images = np.concatenate([vae.run({"latent": rows[i: i + VAE_FRAMES_PER_CALL]})["image"]
                                 for i in range(0, len(rows), VAE_FRAMES_PER_CALL)])
        pixels = to_uint8(images)
        return pixels.reshape(videos, frames, *pixels.shape[1:])
