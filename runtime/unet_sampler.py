"""Text-to-image for Stable-Diffusion-style UNet bundles (diffusers StableDiffusionPipeline and
StableDiffusionXLPipeline semantics).

Encoder = conv_in + down blocks + mid block -> ``skip_*`` + ``mid``; decoder = up blocks + output head with its own
per-row timestep. CFG rows follow diffusers: [negative prompt, prompt]. ControlNet runs only at key steps: its
residuals are added to the encoder's skip and mid features before the group's decoders reuse them. With ControlNet
the baseline plan (``all``) runs encoder + decoder at every step, which is exactly the full UNet with residuals.

SDXL bundles (``model_config.sdxl``) encode each prompt with both CLIP encoders (penultimate layers concatenated) and
pass the second one's pooled projection and the size/crop ``time_ids`` (:mod:`keystep.runtime.sdxl`) as per-row
conditioning: every stage that computes a time embedding takes them, CFG-doubled like the text and, in a batched
decoder call, tiled per half like the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .backends.base import Backend
from .bundle import Bundle
from .sampler import PlanSampler, SampleResult, SamplingError, SamplingOptions, row_values, tile_per_half
from .sdxl import SizeConditioning
from .tokenizer import ClipTokenizer


@dataclass
class TextToImageContext:
    text: np.ndarray  # (rows, L, D) text embeddings, CFG-doubled when guidance > 1
    control: np.ndarray | None  # (rows, 3, H*f, W*f) conditioning image in [0, 1]
    control_scale: float
    conditioning: dict[str, np.ndarray] = field(default_factory=dict)  # per-row extra inputs (SDXL), same rows


class SplitUNetFeeds:
    """Decoder feeds of a split UNet (SD, SDXL, IF): the key step's skip/mid features, the text and the per-row
    conditioning tiled per CFG half over the call's steps, each row with its own timestep. Contexts have ``text``
    and ``conditioning``."""

    @cached_property
    def encoder_features(self) -> list[str]:
        """What the encoder hands the decoders: skip_0..skip_{n-1}, mid (looked up once, not every step)."""
        return [o.name for o in self.bundle.stage("encoder").outputs]

    def decoder_feeds(self, cache, step_t, images, cfg, ctx):
        steps = len(step_t)
        feeds = {name: tile_per_half(cache[name], steps, cfg) for name in self.encoder_features}
        feeds["timestep"] = row_values(step_t, images, cfg)
        feeds["encoder_hidden_states"] = tile_per_half(ctx.text, steps, cfg)
        feeds.update({name: tile_per_half(rows, steps, cfg) for name, rows in ctx.conditioning.items()})
        return feeds

    def prediction(self, outputs):
        return outputs["noise_pred"]


class UNetSampler(SplitUNetFeeds, PlanSampler):
    family = "unet"
    cond_first = False  # StableDiffusionPipeline: [negative, prompt]

    def __init__(self, bundle: Bundle, backend: Backend):
        super().__init__(bundle, backend)
        cfg = bundle.model_config
        self.latent_channels = cfg["in_channels"]
        self.vae_scale_factor = cfg["vae_scale_factor"]
        self.default_size = tuple(s * self.vae_scale_factor for s in cfg["sample_size"])  # (height, width)
        self.tokenizer = ClipTokenizer.from_dir(bundle.root / "tokenizer")
        self.sdxl = cfg.get("sdxl")  # None for SD 1.x/2.x
        self.tokenizer_2 = ClipTokenizer.from_dir(bundle.root / "tokenizer_2") if self.sdxl else None
        self.skip_names = [n for n in self.encoder_features if n.startswith("skip_")]

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        """The first text encoder's embeddings (SD 1.x/2.x: the UNet's ``encoder_hidden_states``)."""
        ids = self.tokenizer.encode(prompts)
        return self.runner("text_encoder").run({"input_ids": ids})["text_embeddings"]

    def encode_prompt(self, prompts: list[str], prompts_2: list[str] | None = None) -> tuple[np.ndarray, dict]:
        """(text embeddings, per-row conditioning). SDXL: both encoders' penultimate hidden states concatenated
        (``prompts_2`` for the second, default ``prompts``) and ``text_embeds`` = the second's pooled projection."""
        first = self.encode_text(prompts)
        if not self.sdxl:
            return first, {}
        second = self.runner("text_encoder_2").run({"input_ids": self.tokenizer_2.encode(prompts_2 or prompts)})
        text = np.concatenate([first, second["text_embeddings"]], axis=-1)
        return text, {"text_embeds": second["text_embeds"]}

    def noise_shape(self, images: int, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return images, self.latent_channels, height // f, width // f

    def initial_noise(self, images: int, height: int, width: int, seed: int,
                      generator: np.random.Generator | None = None) -> np.ndarray:
        return self.start_noise(images, None, seed, generator, height=height, width=width)

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
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        size_conditioning: SizeConditioning | None = None,
        generator: np.random.Generator | None = None,
    ) -> SampleResult:
        """``prompt_2`` / ``negative_prompt_2`` (the second text encoder's) and ``size_conditioning`` apply to SDXL
        bundles, as StableDiffusionXLPipeline's arguments of those names."""
        if not prompts:
            raise SamplingError("no prompt given")
        if not self.sdxl and (prompt_2 is not None or negative_prompt_2 is not None or size_conditioning is not None):
            raise SamplingError("prompt_2, negative_prompt_2 and the size/crop conditioning apply to SDXL bundles only")
        height, width = self.checked_size(height, width)
        multiple = self.vae_scale_factor * self.bundle.model_config.get("size_multiple", 1)
        if height % multiple or width % multiple:
            raise SamplingError(f"this model needs height and width in multiples of {multiple}, got {height}x{width}")
        images = len(prompts)
        noise = self.start_noise(images, init_noise, seed, generator, height=height, width=width)
        cfg = options.guidance > 1
        text, conditioning = self.encode_prompt(list(prompts), self._per_image(prompt_2, images, "prompt_2"))
        if cfg:
            negative, negative_conditioning = self._negative(negative_prompt, negative_prompt_2, images, text,
                                                             conditioning)
            text = np.concatenate([negative, text])
            conditioning = {k: np.concatenate([negative_conditioning[k], v]) for k, v in conditioning.items()}
        if self.sdxl:
            positive, negative = (size_conditioning or SizeConditioning()).time_ids(height, width)
            rows = [np.tile(negative, (images, 1))] if cfg else []
            conditioning["time_ids"] = np.concatenate(rows + [np.tile(positive, (images, 1))])
        control = None
        if control_image is not None:
            if "controlnet" not in self.bundle.stages:
                raise SamplingError("this bundle has no ControlNet stage (build it with --controlnet)")
            control = self._check_control(control_image, images, height, width)
            control = np.concatenate([control, control]) if cfg else control
        context = TextToImageContext(text, control, control_scale, conditioning)
        return self.run_plan(noise, options, context, seed=seed, generator=generator)

    @staticmethod
    def _per_image(prompts: str | list[str] | None, images: int, what: str) -> list[str] | None:
        if prompts is None or isinstance(prompts, str):
            return None if prompts is None else [prompts] * images
        if len(prompts) != images:
            raise SamplingError(f"{len(prompts)} {what}s for {images} prompts")
        return list(prompts)

    def _negative(self, negative_prompt, negative_prompt_2, images, text, conditioning):
        """CFG's negative half: the encoded negative prompts, or for SDXL base without any negative prompt zeros
        (StableDiffusionXLPipeline's ``force_zeros_for_empty_prompt``)."""
        if self.sdxl and negative_prompt is None and self.sdxl["force_zeros_for_empty_prompt"]:
            return np.zeros_like(text), {k: np.zeros_like(v) for k, v in conditioning.items()}
        negatives = self._per_image(negative_prompt or "", images, "negative prompt")
        negatives_2 = self._per_image(negative_prompt_2, images, "negative_prompt_2") or negatives
        return self.encode_prompt(negatives, negatives_2 if self.sdxl else None)

    def full_stage_usable(self, context) -> bool:
        # the full UNet has no residual inputs: with ControlNet the baseline runs every step as a key step instead
        return (context is None or context.control is None) and super().full_stage_usable(context)

    def output_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        return height or self.default_size[0], width or self.default_size[1]

    def checked_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The output size (default: the bundle's) in pixels; the VAE needs positive multiples of its scale."""
        height, width = self.output_size(height, width)
        f = self.vae_scale_factor
        if height % f or width % f or height < f or width < f:
            raise SamplingError(f"height and width must be positive multiples of {f}, got {height}x{width}")
        return height, width

    def _check_control(self, image: np.ndarray, images: int, height: int, width: int) -> np.ndarray:
        image = np.asarray(image, np.float32)
        if image.ndim == 3:
            image = np.broadcast_to(image[None], (images, *image.shape))
        if image.shape != (images, 3, height, width):
            raise SamplingError(f"control image has shape {image.shape}, expected ({images}, 3, {height}, {width})")
        return np.ascontiguousarray(image)

    def latent_input_feeds(self, x, t, ctx: TextToImageContext):
        return {"sample": x, "timestep": np.full(len(x), t, np.float32), "encoder_hidden_states": ctx.text,
                **ctx.conditioning}

    def encoder_cache(self, outputs, x, t, ctx: TextToImageContext):
        if ctx.control is None:
            return outputs
        feeds = {**self.latent_input_feeds(x, t, ctx), "controlnet_cond": ctx.control,
                 "conditioning_scale": np.array([ctx.control_scale], np.float32)}
        residuals = self.runner("controlnet").run(feeds)
        cache = {name: outputs[name] + residuals[f"down_res_{i}"] for i, name in enumerate(self.skip_names)}
        cache["mid"] = outputs["mid"] + residuals["mid_res"]
        return cache



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
