"""DeepFloyd-IF: a cascade of pixel-space diffusion stages sharing one T5 text encoder (IFPipeline, then
IFSuperResolutionPipeline), run as one ``generate``.

A cascade bundle (family ``cascade``) holds the T5 stage, its tokenizer and the list of diffusion stages; each
diffusion stage is an ordinary bundle of family ``if`` in a sub-directory, sampled by :class:`IFStageSampler` with
the shared plan executor (key steps, DeepCache, batched decoders, ...). Pipeline semantics reproduced:

* prompts are lower-cased and stripped (IFPipeline's ``_text_preprocessing`` without ``clean_caption``, which needs
  bs4 + ftfy and is not reproduced), tokenized to 77 T5 tokens with an attention mask; CFG rows [negative, prompt],
  the negative prompt defaulting to "";
* learned variance: the UNet returns 2C channels; guidance mixes the first C (epsilon) and keeps the conditional
  half's variance channels, which a DDPM scheduler with ``variance_type`` learned/learned_range consumes (other
  schedulers get epsilon only);
* a super-resolution stage upsamples the previous stage's image (in [-1, 1]) bilinearly with aligned corners to its
  size, noises it with its image-noising DDPM schedule at ``noise_level`` (default 250) and feeds
  ``concat(sample, upscaled)`` with ``class_labels = noise_level`` to every UNet stage; the scheduler steps the
  sample channels only.

Noise: stage i draws its initial sample from ``default_rng((seed, i))`` and its scheduler / image noise from
``default_rng((seed, i, 1))`` (upscale noise first, then each stochastic step), so stages are independent; pass
``generator=`` (anything with numpy's ``standard_normal``) to reproduce another noise source.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .backends.base import Backend
from .bundle import MANIFEST_NAME, Bundle, BundleError
from .sampler import PlanSampler, SampleResult, SamplingError, SamplingOptions, SerialRunner, to_uint8
from .schedulers import make_scheduler
from .t5_tokenizer import T5Tokenizer
from .unet_sampler import SplitUNetFeeds

LEARNED_VARIANCE = ("learned", "learned_range")


def resize_bilinear_align_corners(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, C, h, w) -> (N, C, height, width) as ``F.interpolate(mode="bilinear", align_corners=True)``."""
    def weights(src: int, dst: int):
        pos = np.zeros(dst, np.float64) if dst == 1 or src == 1 else np.arange(dst) * ((src - 1) / (dst - 1))
        low = np.minimum(np.floor(pos).astype(np.int64), src - 1)
        high = np.minimum(low + 1, src - 1)
        return low, high, (pos - low).astype(np.float32)

    images = np.asarray(images, np.float32)
    y0, y1, wy = weights(images.shape[2], height)
    x0, x1, wx = weights(images.shape[3], width)
    rows = images[:, :, y0, :] * (1 - wy)[:, None] + images[:, :, y1, :] * wy[:, None]
    return (rows[:, :, :, x0] * (1 - wx) + rows[:, :, :, x1] * wx).astype(np.float32)


def preprocess_prompts(prompts: list[str]) -> list[str]:
    """IFPipeline._text_preprocessing with clean_caption False."""
    return [p.lower().strip() for p in prompts]


@dataclass
class IFContext:
    text: np.ndarray  # (rows, 77, D) T5 embeddings, [negative, prompt] with CFG
    conditioning: dict[str, np.ndarray] = field(default_factory=dict)  # class_labels rows (super-resolution)
    upscaled: np.ndarray | None = None  # (rows, C, H, W) noised upscaled previous image (super-resolution)
    scheduler: object = None  # the run's scheduler (scale_model_input also applies to the upscaled channels)


class IFStageSampler(SplitUNetFeeds, PlanSampler):
    family = "if"
    cond_first = False  # IFPipeline: [negative, prompt]

    def __init__(self, bundle: Bundle, backend: Backend, cascade: "CascadeSampler | None" = None):
        super().__init__(bundle, backend)
        cfg = bundle.model_config
        self.role = cfg["if"]["role"]
        self.channels = cfg["if"]["image_channels"]
        self.default_size = tuple(cfg["sample_size"])  # pixels
        self.size_multiple = cfg.get("size_multiple", 1)
        self._cascade = cascade

    @property
    def super_resolution(self) -> bool:
        return self.role == "super_resolution"

    @property
    def cascade(self) -> "CascadeSampler":
        """The cascade this stage belongs to (its T5 and the stages before it): the parent directory's bundle."""
        if self._cascade is None:
            parent = self.bundle.root.resolve().parent
            try:
                top = Bundle.load(parent) if (parent / MANIFEST_NAME).is_file() else None
            except BundleError as exc:
                raise SamplingError(f"{self.bundle.root}: its cascade bundle does not load: {exc}") from None
            if top is None or top.family != "cascade":
                raise SamplingError(f"{self.bundle.root} is an IF diffusion stage outside its cascade bundle (its "
                                    f"parent directory holds the text encoder)")
            self._cascade = CascadeSampler(top, self.backend)
        return self._cascade

    @property
    def index(self) -> int:
        return self.cascade.index_of(self.bundle)

    def output_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        return height or self.default_size[0], width or self.default_size[1]

    def noise_shape(self, images: int, height: int, width: int) -> tuple[int, ...]:
        return images, self.channels, height, width  # pixel space

    def sample(
        self,
        prompts: list[str],
        options: SamplingOptions,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        init_noise: np.ndarray | None = None,
        seed: int = 0,
        image: np.ndarray | None = None,
        noise_level: int | None = None,
        generator=None,
        text: np.ndarray | None = None,
    ) -> SampleResult:
        """One diffusion stage. A super-resolution stage upscales ``image`` (N, C, h, w in [-1, 1]); without it the
        cascade's earlier stages make it from the prompts with their default plans. ``generator``: the noise source
        (anything with numpy's ``standard_normal``; default seeded per stage). ``text``: the T5 rows, if the
        cascade has encoded them already."""
        if not prompts:
            raise SamplingError("no prompt given")
        height, width = self.output_size(height, width)
        multiple = self.size_multiple
        if height < multiple or width < multiple or height % multiple or width % multiple:
            raise SamplingError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
        images = len(prompts)
        index = self.index
        source = np.random.default_rng((seed, index)) if generator is None else generator
        noise = self.start_noise(images, init_noise, seed, source, height=height, width=width)
        rng = np.random.default_rng((seed, index, 1)) if generator is None else generator
        cfg = options.guidance > 1
        context = IFContext(self.cascade.text_rows(list(prompts), negative_prompt, cfg) if text is None else text)
        if self.super_resolution:
            if image is None:
                image = self.cascade.stage_input(index, list(prompts), negative_prompt, seed)
            image = np.asarray(image, np.float32)
            if image.ndim != 4 or image.shape[:2] != (images, self.channels):
                raise SamplingError(f"the low-resolution image has shape {image.shape}, expected ({images}, "
                                    f"{self.channels}, H, W)")
            level = int(self.bundle.default_plan.get("noise_level", 250) if noise_level is None else noise_level)
            noising = make_scheduler(self.bundle.model_config["if"]["noising_scheduler"])
            if not 0 <= level < noising.num_train_timesteps:
                raise SamplingError(f"noise_level must be in 0..{noising.num_train_timesteps - 1}, got {level}")
            upscaled = resize_bilinear_align_corners(image, height, width)
            upscaled = noising.add_noise(upscaled, rng.standard_normal(upscaled.shape, dtype=np.float32),
                                         np.full(images, level)).astype(np.float32)
            rows = 2 * images if cfg else images
            context.upscaled = np.concatenate([upscaled, upscaled]) if cfg else upscaled
            context.conditioning["class_labels"] = np.full(rows, level, np.float32)
        return self.run_plan(noise, options, context, seed=seed, generator=rng)

    def prepare(self, options, images, context=None):
        prepared = super().prepare(options, images, context)
        if context is not None:
            context.scheduler = prepared.scheduler
        return prepared

    def latent_input_feeds(self, x, t, ctx: IFContext):
        if ctx.upscaled is not None:  # the pipeline scales concat(sample, upscaled); DDPM/DDIM scale by 1
            x = np.concatenate([x, ctx.scheduler.scale_model_input(ctx.upscaled, t).astype(np.float32)], axis=1)
        return {"sample": x, "timestep": np.full(len(x), t, np.float32), "encoder_hidden_states": ctx.text,
                **ctx.conditioning}

    def guide(self, cond, uncond, guidance):
        """Guidance on the epsilon channels; learned variance channels come from the conditional half (IFPipeline)."""
        c = self.channels
        guided = super().guide(cond[:, :c], uncond[:, :c], guidance)
        return np.concatenate([guided, cond[:, c:]], axis=1) if cond.shape[1] > c else guided

    def scheduler_input(self, pred, scheduler):
        if pred.shape[1] > self.channels and getattr(scheduler, "variance_type", None) not in LEARNED_VARIANCE:
            return pred[:, : self.channels]
        return pred


class CascadeSampler:
    """Runs a cascade bundle: T5 once per call, then every diffusion stage in order, each with its own options
    (default: that stage's default plan). Thread-safe as the plan samplers are: per-call state only (the cache of
    earlier stages' images, used when one super-resolution stage samples alone, is bounded and locked)."""

    family = "cascade"
    STAGE_INPUTS_KEPT = 4

    def __init__(self, bundle: Bundle, backend: Backend):
        if bundle.family != "cascade":
            raise SamplingError(f"bundle family is {bundle.family!r}, this sampler runs cascade bundles")
        self.bundle, self.backend = bundle, backend
        self.text_len = bundle.model_config["text_len"]
        self.tokenizer = T5Tokenizer.from_dir(bundle.root / "tokenizer")
        self.stage_names = list(bundle.parts)
        self.stages = [IFStageSampler(part, backend, cascade=self) for part in bundle.parts.values()]
        self._text_encoder = None
        self._lock = threading.Lock()
        self._inputs: OrderedDict[tuple, np.ndarray] = OrderedDict()

    can_decode = True  # IF stages sample images

    def index_of(self, stage_bundle: Bundle) -> int:
        name = stage_bundle.root.resolve().name
        if name not in self.stage_names:
            raise SamplingError(f"{stage_bundle.root} is not a diffusion stage of {self.bundle.root}")
        return self.stage_names.index(name)

    def stage(self, name: str) -> IFStageSampler:
        if name not in self.stage_names:
            raise SamplingError(f"the cascade has no diffusion stage {name!r} (stages: {', '.join(self.stage_names)})")
        return self.stages[self.stage_names.index(name)]

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        with self._lock:
            if self._text_encoder is None:
                runner = self.backend.load(self.bundle.stage("text_encoder"))
                self._text_encoder = runner if getattr(runner, "thread_safe", False) else SerialRunner(runner)
        ids, mask = self.tokenizer.encode(preprocess_prompts(prompts), self.text_len)
        return self._text_encoder.run({"input_ids": ids, "attention_mask": mask})["text_embeddings"]

    def text_rows(self, prompts: list[str], negative_prompt, cfg: bool) -> np.ndarray:
        """T5 embeddings of the prompts, with CFG [negative, prompt] (the negative prompt defaults to "")."""
        text = self.encode_text(prompts)
        if not cfg:
            return text
        negatives = [negative_prompt or ""] * len(prompts) if not isinstance(negative_prompt, list) \
            else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise SamplingError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        return np.concatenate([self.encode_text(negatives), text])

    def stage_input(self, index: int, prompts: list[str], negative_prompt, seed: int) -> np.ndarray:
        """The image entering stage ``index`` when it samples alone: the stages before it run with their default
        plans (the last few results kept, so tune/profile of one stage do not re-run the earlier ones)."""
        key = (index, tuple(prompts), str(negative_prompt), seed)
        with self._lock:
            if key in self._inputs:
                return self._inputs[key]
        image = None
        for stage in self.stages[:index]:
            options = SamplingOptions.from_bundle(stage.bundle)
            image = stage.sample(prompts, options, negative_prompt, seed=seed, image=image).latents
        with self._lock:
            self._inputs[key] = image
            while len(self._inputs) > self.STAGE_INPUTS_KEPT:
                self._inputs.popitem(last=False)
        return image

    def stage_sizes(self, height: int | None, width: int | None) -> list[tuple[int, int]]:
        """Each stage's (height, width) when stage I makes ``height`` x ``width``: later stages keep their default
        size ratio to stage I (IF-II: 4x)."""
        first = self.stages[0]
        h, w = first.output_size(height, width)
        return [(round(h * s.default_size[0] / first.default_size[0]), round(w * s.default_size[1] /
                                                                              first.default_size[1]))
                for s in self.stages]

    def sample(self, prompts: list[str], options: list[SamplingOptions] | None = None, negative_prompt=None,
               height: int | None = None, width: int | None = None, seed: int = 0, stages: int | None = None,
               noise_level: int | None = None, generator=None) -> list[SampleResult]:
        """Every diffusion stage in order (the first ``stages`` of them); ``options[i]`` for stage i (default its
        bundle's default plan). ``height``/``width`` set stage I's size (:meth:`stage_sizes`). ``generator``
        (anything with numpy's ``standard_normal``) replaces every stage's seeded noise, drawn in stage order."""
        count = len(self.stages) if stages is None else stages
        options = options or [SamplingOptions.from_bundle(s.bundle) for s in self.stages[:count]]
        text = {}  # T5 once per call: with and without CFG rows, as the stages' guidance asks
        results, image = [], None
        for stage, stage_options, (h, w) in zip(self.stages[:count], options, self.stage_sizes(height, width)):
            cfg = stage_options.guidance > 1
            if cfg not in text:
                text[cfg] = self.text_rows(list(prompts), negative_prompt, cfg)
            result = stage.sample(prompts, stage_options, negative_prompt, height=h, width=w, seed=seed, image=image,
                                  noise_level=noise_level if stage.super_resolution else None, generator=generator,
                                  text=text[cfg])
            results.append(result)
            image = result.latents
        return results

    def decode(self, images: np.ndarray) -> np.ndarray:
        return to_uint8((images + 1) / 2)
