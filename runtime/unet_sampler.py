"""Text-to-image for Stable-Diffusion-style UNet bundles (diffusers StableDiffusionPipeline semantics).

Encoder = conv_in + down blocks + mid block -> ``skip_*`` + ``mid``; decoder = up blocks + output head with its own
per-row timestep. CFG rows follow diffusers: [negative prompt, prompt]. ControlNet runs only at key steps: its
residuals are added to the encoder's skip and mid features before the group's decoders reuse them. With ControlNet
the baseline plan (``all``) runs encoder + decoder at every step, which is exactly the full UNet with residuals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backends.base import Backend
from .bundle import Bundle
from .sampler import (
    PlanSampler,
    SampleResult,
    SamplingError,
    SamplingOptions,
    check_noise,
    row_values,
    tile_per_half,
)
from .tokenizer import ClipTokenizer


@dataclass
class TextToImageContext:
    text: np.ndarray  # (rows, L, D) text embeddings, CFG-doubled when guidance > 1
    control: np.ndarray | None  # (rows, 3, H*f, W*f) conditioning image in [0, 1]
    control_scale: float


class UNetSampler(PlanSampler):
    family = "unet"
    cond_first = False  # StableDiffusionPipeline: [negative, prompt]

    def __init__(self, bundle: Bundle, backend: Backend):
        super().__init__(bundle, backend)
        cfg = bundle.model_config
        self.latent_channels = cfg["in_channels"]
        self.vae_scale_factor = cfg["vae_scale_factor"]
        self.default_size = tuple(s * self.vae_scale_factor for s in cfg["sample_size"])  # (height, width)
        self.tokenizer = ClipTokenizer.from_dir(bundle.root / "tokenizer")
        outputs = [o.name for o in bundle.stage("encoder").outputs]
        self.skip_names = [n for n in outputs if n.startswith("skip_")]

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        ids = self.tokenizer.encode(prompts)
        return self.runner("text_encoder").run({"input_ids": ids})["text_embeddings"]

    def initial_noise(self, images: int, height: int, width: int, seed: int,
                      generator: np.random.Generator | None = None) -> np.ndarray:
        shape = (images, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return self.initial_noise_from(shape, seed, generator)

    def sample(
        self,
        prompts: list[str],
        options: SamplingOptions,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        init_noise: np.ndarray | None = None,
        seed: int = 0,
        control_image: np.ndarray | None = None,
        control_scale: float = 1.0,
        generator: np.random.Generator | None = None,
    ) -> SampleResult:
        if not prompts:
            raise SamplingError("no prompt given")
        height, width = self.output_size(height, width)
        f = self.vae_scale_factor
        if height % f or width % f or height < f or width < f:
            raise SamplingError(f"height and width must be positive multiples of {f}, got {height}x{width}")
        images = len(prompts)
        expected = (images, self.latent_channels, height // f, width // f)
        noise = (self.initial_noise(images, height, width, seed, generator) if init_noise is None
                 else check_noise(init_noise, expected))
        cfg = options.guidance > 1
        text = self.encode_text(list(prompts))
        if cfg:
            negatives = [negative_prompt or ""] * images if not isinstance(negative_prompt, list) else negative_prompt
            if len(negatives) != images:
                raise SamplingError(f"{len(negatives)} negative prompts for {images} prompts")
            text = np.concatenate([self.encode_text(negatives), text])
        control = None
        if control_image is not None:
            if "controlnet" not in self.bundle.stages:
                raise SamplingError("this bundle has no ControlNet stage (build it with --controlnet)")
            control = self._check_control(control_image, images, height, width)
            control = np.concatenate([control, control]) if cfg else control
        return self.run_plan(noise, options, TextToImageContext(text, control, control_scale), seed=seed,
                             generator=generator)

    def full_stage_usable(self, context) -> bool:
        # the full UNet has no residual inputs: with ControlNet the baseline runs every step as a key step instead
        return (context is None or context.control is None) and super().full_stage_usable(context)

    def output_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        return height or self.default_size[0], width or self.default_size[1]

    def _check_control(self, image: np.ndarray, images: int, height: int, width: int) -> np.ndarray:
        image = np.asarray(image, np.float32)
        if image.ndim == 3:
            image = np.broadcast_to(image[None], (images, *image.shape))
        if image.shape != (images, 3, height, width):
            raise SamplingError(f"control image has shape {image.shape}, expected ({images}, 3, {height}, {width})")
        return np.ascontiguousarray(image)

    def latent_input_feeds(self, x, t, ctx: TextToImageContext):
        return {"sample": x, "timestep": np.full(len(x), t, np.float32), "encoder_hidden_states": ctx.text}

    def encoder_cache(self, outputs, x, t, ctx: TextToImageContext):
        if ctx.control is None:
            return outputs
        feeds = {**self.latent_input_feeds(x, t, ctx), "controlnet_cond": ctx.control,
                 "conditioning_scale": np.array([ctx.control_scale], np.float32)}
        residuals = self.runner("controlnet").run(feeds)
        cache = {name: outputs[name] + residuals[f"down_res_{i}"] for i, name in enumerate(self.skip_names)}
        cache["mid"] = outputs["mid"] + residuals["mid_res"]
        return cache

    def decoder_feeds(self, cache, step_t, images, cfg, ctx: TextToImageContext):
        steps = len(step_t)
        feeds = {name: tile_per_half(cache[name], steps, cfg) for name in (*self.skip_names, "mid")}
        feeds["timestep"] = row_values(step_t, images, cfg)
        feeds["encoder_hidden_states"] = tile_per_half(ctx.text, steps, cfg)
        return feeds

    def prediction(self, outputs):
        return outputs["noise_pred"]


def load_control_image(path: str, height: int, width: int) -> np.ndarray:
    """An RGB image resized to (width, height) as (3, H, W) float32 in [0, 1], like diffusers' ControlNet
    image preprocessing (PIL resize with LANCZOS, then /255)."""
    from PIL import Image

    try:
        image = Image.open(path).convert("RGB")
    except OSError as exc:
        raise SamplingError(f"cannot read control image {path}: {exc}") from None
    image = image.resize((width, height), resample=Image.LANCZOS)
    return (np.asarray(image, np.float32) / 255.0).transpose(2, 0, 1)
