"""One validation layer for what a caller asks of a bundle: the Python API, the CLI and the Triton model all pass
their inputs through :func:`validate_request` before any stage runs, so they refuse the same things with the same
messages.

Errors are :class:`RequestError` and name the argument in the Python API's vocabulary (diffusers' names:
``num_inference_steps``, ``guidance_scale``, ...); the CLI translates the name into its flag (``--steps``) with
:data:`CLI_FLAGS`, the server into its input tensor's name.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import numpy as np

from .bundle import Bundle
from .errors import KeystepError
from .plan import PlanError, parse_cache, parse_key_steps
from .sampler import SamplingOptions
from .schedulers import SCHEDULERS, make_scheduler
from .sdxl import SizeConditioning

MAX_IMAGES = 64  # per call: every image's rows run through every stage at once
MAX_PROMPT_CHARS = 10_000
MAX_GUIDANCE = 100.0
MAX_SEED = 2**63 - 1  # fits Triton's INT64 seed input
MAX_THREADS = 1024
MAX_PIXELS = 8192
OUTPUT_TYPES = ("pil", "np", "latent")
TEXT_FAMILIES = ("unet", "unet3d", "if", "cascade")  # prompt-conditioned (text-to-image, text-to-video, IF)
UNET_FAMILIES = ("unet", "unet3d", "if")  # one UNet whose size is free (multiples of what its down path divides)
MAX_SIZE_CONDITIONING = 1 << 16  # SDXL's size/crop time ids (pixels)
MAX_FRAMES = 1024

# the API's argument -> the CLI flag that sets it (for CLI error messages)
CLI_FLAGS = {
    "prompt": "--prompt", "negative_prompt": "--negative-prompt", "class_labels": "--class",
    "num_images_per_prompt": "--images", "num_inference_steps": "--steps", "guidance_scale": "--guidance",
    "height": "--height", "width": "--width", "seed": "--seed", "latents": "--init-noise",
    "key_steps": "--key-steps", "cache": "--cache", "scheduler": "--scheduler", "max_decoder_batch":
    "--max-decoder-batch", "control_image": "--control-image", "controlnet_conditioning_scale": "--control-scale",
    "threads": "--threads", "output_type": "--out", "num_frames": "--frames", "fps": "--fps",
    "prompt_2": "--prompt-2", "negative_prompt_2": "--negative-prompt-2", "original_size": "--original-size",
    "crops_coords_top_left": "--crops-coords-top-left", "target_size": "--target-size", "noise_level": "--noise-level",
    "stage_plans": "--stage",
}


class RequestError(KeystepError, ValueError):
    """A bad argument: ``field`` is the API's name for it, the message says what is wrong with it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def for_cli(self) -> str:
        return f"{CLI_FLAGS.get(self.field, self.field)}: {self.message}"


# eq=False: the fields may be arrays and lists, which compare elementwise and do not hash
@dataclass(frozen=True, kw_only=True, eq=False)
class PlanArguments:
    """How a call samples, in diffusers' vocabulary; an unset (None) argument takes the bundle's default plan. The
    CLI's plan flags and a cascade's ``stage_plans`` entries set these same names."""

    num_inference_steps: int | None = None
    guidance_scale: float | None = None  # classifier-free guidance; 1 or below: no unconditional rows
    key_steps: str | Sequence[int] | None = None  # "all" (baseline), "default", "uniform:M" or step indices
    cache: str | None = None  # feature caching, "VARIANT:SCHEDULE[@START]" (see plan.parse_cache), or "none"
    scheduler: str | None = None  # a name in SCHEDULERS; None: the bundle's scheduler class
    parallel: bool | None = None  # batch a group's decoders into one call; None: the backend's preference
    max_decoder_batch: int | None = None  # at most this many rows per batched decoder call
    noise_injection: bool | None = None  # None: on for key-step plans, off for the baseline and cache plans


@dataclass(frozen=True, kw_only=True, eq=False)
class RequestArguments(PlanArguments):
    """What a caller asks of a bundle, not yet checked: the one list of the Python API's arguments (the keywords of
    ``Pipeline.__call__`` are these fields, with their defaults), which the CLI and the Triton model fill too.
    :func:`validate_request` turns it into a :class:`GenerationRequest`."""

    prompt: str | Sequence[str] | None = None  # text-to-image/video bundles
    negative_prompt: str | Sequence[str] | None = None  # one, or one per prompt; None: the empty prompt
    class_labels: int | Sequence[int] | None = None  # class-conditional bundles (DiTs)
    num_images_per_prompt: int = 1
    height: int | None = None  # pixels; None: the bundle's size (a cascade: stage I's)
    width: int | None = None
    seed: int | np.random.Generator | None = None  # draws the initial noise (None: 0), unless latents give it
    generator: np.random.Generator | None = None  # instead of a seed
    latents: np.ndarray | None = None  # the initial noise itself
    output_type: str = "pil"  # one of OUTPUT_TYPES
    control_image: np.ndarray | None = None  # ControlNet bundles: (3, H, W) or (N, 3, H, W) floats in [0, 1]
    controlnet_conditioning_scale: float = 1.0
    num_frames: int | None = None  # text-to-video: frames per video (None: the bundle's)
    prompt_2: str | Sequence[str] | None = None  # SDXL: the second text encoder's prompts (None: prompt)
    negative_prompt_2: str | Sequence[str] | None = None
    original_size: Sequence[int] | None = None  # SDXL's size/crop conditioning, (height, width) / (y, x) pixels
    crops_coords_top_left: Sequence[int] | None = None
    target_size: Sequence[int] | None = None
    negative_original_size: Sequence[int] | None = None
    negative_crops_coords_top_left: Sequence[int] | None = None
    negative_target_size: Sequence[int] | None = None
    noise_level: int | None = None  # IF super-resolution stages (None: each stage's default)
    stage_plans: dict[str, dict] | None = None  # a cascade: {stage name: {plan argument: value}}, over the above


PLAN_ARGUMENTS = tuple(f.name for f in fields(PlanArguments))


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: every field checked against the bundle, ready for the sampler."""

    options: SamplingOptions
    images: int
    prompts: list[str] | None = None  # text-to-image: one per image
    negative_prompts: list[str] | None = None  # one per image, or None (the empty prompt)
    class_labels: list[int] | None = None  # class-conditional: one per image
    height: int | None = None
    width: int | None = None
    seed: int = 0
    generator: np.random.Generator | None = None
    latents: np.ndarray | None = None
    output_type: str = "pil"
    control_image: np.ndarray | None = None
    control_scale: float = 1.0
    num_frames: int | None = None  # text-to-video: frames per video
    prompts_2: list[str] | None = None  # SDXL: the second text encoder's prompts, one per image (None: prompts)
    negative_prompts_2: list[str] | None = None
    size_conditioning: SizeConditioning | None = None  # SDXL's size/crop time ids (None: the pipeline's defaults)
    noise_level: int | None = None  # IF super-resolution stages (None: each stage's default)
    stage_options: tuple[SamplingOptions, ...] | None = None  # a cascade: each diffusion stage's plan, in order


def check_int(field: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RequestError(field, f"must be an integer, got {_show(value)}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"in {low}..{high}"
        raise RequestError(field, f"must be {bound}, got {value}")
    return value


def check_float(field: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RequestError(field, f"must be a number, got {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise RequestError(field, f"must be a finite number, got {value}")
    if not low <= value <= high:
        raise RequestError(field, f"must be in [{low:g}, {high:g}], got {value:g}")
    return value


def check_threads(threads: Any) -> int | None:
    return None if threads is None else check_int("threads", threads, 1, MAX_THREADS)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_list(field: str, value: Any, item_type: type | tuple) -> list:
    items = [value] if isinstance(value, item_type) or not isinstance(value, (list, tuple, np.ndarray)) else list(value)
    if not items:
        raise RequestError(field, "is empty")
    if len(items) > MAX_IMAGES:
        raise RequestError(field, f"{len(items)} entries; at most {MAX_IMAGES} images per call")
    return items


def check_prompts(field: str, value: Any, allow_empty: bool) -> list[str]:
    prompts = _as_list(field, value, str)
    for p in prompts:
        if not isinstance(p, str):
            raise RequestError(field, f"must be text, got {_show(p)}")
        if not allow_empty and not p.strip():
            raise RequestError(field, "is empty (an empty prompt is the unconditional text; say what to draw)")
        if len(p) > MAX_PROMPT_CHARS:
            raise RequestError(field, f"has {len(p)} characters; at most {MAX_PROMPT_CHARS}")
    return prompts


def check_steps(bundle: Bundle, steps: Any, scheduler: str | None) -> int:
    """Within what the bundle's scheduler can space: the scheduler itself says (DDIM at most its training steps)."""
    steps = check_int("num_inference_steps", steps, 1)
    sched = make_scheduler(bundle.scheduler_config, scheduler)
    if steps > sched.num_train_timesteps:  # no scheduler spaces more steps than it was trained with usefully
        raise RequestError("num_inference_steps", f"{steps} steps; this scheduler has {sched.num_train_timesteps} "
                           f"training timesteps, the most a plan can use")
    try:
        sched.set_timesteps(steps)
    except (ValueError, ZeroDivisionError) as exc:
        raise RequestError("num_inference_steps", f"{steps} steps do not fit the scheduler: {exc}") from None
    return steps


def validate_request(bundle: Bundle, arguments: RequestArguments, *, can_decode: bool = True) -> GenerationRequest:
    """Check every argument against ``bundle`` (its family, classes, scheduler, sizes, stages, cache variants).
    SDXL bundles also take ``prompt_2``, ``negative_prompt_2`` and the size/crop conditioning (diffusers' names);
    IF stages and cascades ``noise_level``; cascades ``stage_plans`` ({stage name: {plan argument: value}}, over
    the plan arguments given for every stage). ``can_decode``: whether the pipeline makes images (else only
    ``output_type="latent"``)."""
    a = arguments
    text = bundle.family in TEXT_FAMILIES
    num_frames = a.num_frames
    if bundle.family == "unet3d":
        num_frames = check_int("num_frames", bundle.model_config["num_frames"] if num_frames is None else num_frames,
                               1, MAX_FRAMES)
    elif num_frames is not None:
        raise RequestError("num_frames", "applies to text-to-video bundles")
    # --- what to generate --------------------------------------------------------------------------------------
    prompts = negatives = labels = None
    per_prompt = check_int("num_images_per_prompt", a.num_images_per_prompt, 1, MAX_IMAGES)
    if text:
        if a.class_labels is not None:
            raise RequestError("class_labels", "this is a text-to-image bundle: it takes a prompt, not class labels")
        if a.prompt is None:
            raise RequestError("prompt", "a text-to-image bundle needs a prompt")
        prompts = [p for p in check_prompts("prompt", a.prompt, allow_empty=False) for _ in range(per_prompt)]
        if a.negative_prompt is not None:
            negatives = check_prompts("negative_prompt", a.negative_prompt, allow_empty=True)
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            elif len(negatives) * per_prompt == len(prompts):
                negatives = [n for n in negatives for _ in range(per_prompt)]
            else:
                raise RequestError("negative_prompt", f"{len(negatives)} negative prompts for "
                                   f"{len(prompts) // per_prompt} prompts (give one, or one per prompt)")
        images = len(prompts)
    else:
        if a.prompt is not None or a.negative_prompt is not None:
            raise RequestError("prompt", "this is a class-conditional bundle: it takes class labels, not a prompt")
        if a.class_labels is None:
            raise RequestError("class_labels", "a class-conditional bundle needs class_labels")
        num_classes = bundle.model_config["num_classes"]
        labels = []
        for c in _as_list("class_labels", a.class_labels, numbers.Integral):
            if isinstance(c, bool) or not isinstance(c, numbers.Integral):
                raise RequestError("class_labels", f"class labels are integers, got {_show(c)}")
            if not 0 <= int(c) < num_classes:
                raise RequestError("class_labels", f"unknown class {int(c)}: this model has classes 0..{num_classes - 1}")
            labels.extend([int(c)] * per_prompt)
        images = len(labels)
    if images > MAX_IMAGES:
        raise RequestError("num_images_per_prompt", f"{images} images in one call; at most {MAX_IMAGES}")
    if bundle.family == "cascade":
        stage_options = validate_stage_plans(bundle, a, a.stage_plans, images)
        options = stage_options[0]
    else:
        if a.stage_plans is not None:
            raise RequestError("stage_plans", "applies to cascade bundles (DeepFloyd-IF)")
        stage_options = None
        options = check_decoder_batch(validate_options(bundle, a), images)
    extras = validate_text_extras(bundle, a, images, per_prompt)
    # --- sizes, noise, output ----------------------------------------------------------------------------------
    height, width = check_size(bundle, a.height, a.width)
    seed, generator = a.seed, a.generator
    if generator is not None and seed is not None:
        raise RequestError("generator", "give a seed or a generator, not both")
    if isinstance(seed, np.random.Generator):
        seed, generator = None, seed
    if generator is not None and not isinstance(generator, np.random.Generator):
        raise RequestError("generator", f"must be a numpy.random.Generator, got {type(generator).__name__}")
    seed = 0 if seed is None else check_int("seed", seed, 0, MAX_SEED)
    latents = None if a.latents is None else check_latents(bundle, a.latents, images, height, width, num_frames)
    if a.output_type not in OUTPUT_TYPES:
        raise RequestError("output_type", f"must be one of {', '.join(OUTPUT_TYPES)}, got {_show(a.output_type)}")
    if a.output_type != "latent" and not can_decode:
        raise RequestError("output_type", "this bundle makes latents, not images (no vae_decoder stage): "
                           "ask for output_type='latent'")
    scale = check_float("controlnet_conditioning_scale", a.controlnet_conditioning_scale, -100.0, 100.0)
    control_image = a.control_image
    if control_image is not None:
        if "controlnet" not in bundle.stages:
            raise RequestError("control_image", "this bundle has no ControlNet stage (build it with --controlnet)")
        control_image = check_control_image(control_image, images, height, width)
    return GenerationRequest(options, images, prompts, negatives, labels, height, width, seed, generator, latents,
                             a.output_type, control_image, scale, num_frames, stage_options=stage_options, **extras)


def check_decoder_batch(options: SamplingOptions, images: int) -> SamplingOptions:
    rows = images * (2 if options.guidance > 1 else 1)
    if options.max_decoder_batch is not None and options.max_decoder_batch < rows:
        raise RequestError("max_decoder_batch", f"{options.max_decoder_batch} is below one step's rows "
                           f"({rows} = images x CFG)")
    return options


def validate_stage_plans(bundle: Bundle, plan: PlanArguments, stage_plans: dict | None, images: int) -> tuple:
    """A cascade's plan per diffusion stage: the bundle's stage default, the plan arguments given for every stage,
    then that stage's ``stage_plans`` entry."""
    stage_plans = {} if stage_plans is None else stage_plans
    if not isinstance(stage_plans, dict):
        raise RequestError("stage_plans", f"must be a dict {{stage name: {{plan argument: value}}}}, got "
                           f"{_show(stage_plans)}")
    unknown = sorted(set(stage_plans) - set(bundle.parts), key=str)
    if unknown:
        raise RequestError("stage_plans", f"no diffusion stage {_show(unknown[0])}; the cascade's stages are "
                           f"{', '.join(bundle.parts)}")
    stage_options = []
    for name, part in bundle.parts.items():
        override = stage_plans.get(name) or {}
        if not isinstance(override, dict) or set(override) - set(PLAN_ARGUMENTS):
            raise RequestError("stage_plans", f"{name}: takes plan arguments ({', '.join(PLAN_ARGUMENTS)}), got "
                               f"{_show(override)}")
        given = {k: getattr(plan, k) for k in PLAN_ARGUMENTS if getattr(plan, k) is not None}
        try:
            stage_options.append(check_decoder_batch(validate_options(part, PlanArguments(**given, **override)),
                                                     images))
        except RequestError as exc:
            raise RequestError(exc.field, f"{name}: {exc.message}") from None
    return tuple(stage_options)


def validate_text_extras(bundle: Bundle, arguments: RequestArguments, images: int, per_prompt: int) -> dict:
    """SDXL's second prompts and size conditioning, IF's noise level: checked, and refused by other families."""
    sdxl = bundle.family == "unet" and bool(bundle.model_config.get("sdxl"))
    sizes = {f.name: getattr(arguments, f.name) for f in fields(SizeConditioning)}
    given = {k: v for k, v in (("prompt_2", arguments.prompt_2), ("negative_prompt_2", arguments.negative_prompt_2),
                               *sizes.items()) if v is not None}
    if given and not sdxl:
        raise RequestError(next(iter(given)), "applies to SDXL bundles only")

    def per_image(field: str, value) -> list[str] | None:
        if value is None:
            return None
        texts = check_prompts(field, value, allow_empty=True)
        if len(texts) == 1:
            return texts * images
        if len(texts) * per_prompt == images:
            return [t for t in texts for _ in range(per_prompt)]
        raise RequestError(field, f"{len(texts)} prompts for {images // per_prompt} prompts (give one, or one per "
                           f"prompt)")

    extras = {"prompts_2": per_image("prompt_2", arguments.prompt_2),
              "negative_prompts_2": per_image("negative_prompt_2", arguments.negative_prompt_2)}
    pairs = {k: check_pair(k, v) for k, v in sizes.items() if v is not None}
    extras["size_conditioning"] = SizeConditioning(**pairs) if pairs else None
    noise_level = arguments.noise_level
    extras["noise_level"] = None if noise_level is None else check_noise_level(bundle, noise_level)
    return extras


def check_pair(field: str, value: Any) -> tuple[int, int]:
    """SDXL's sizes and crop corners: (height, width) / (y, x) in pixels."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)) or len(value) != 2:
        raise RequestError(field, f"must be two integers (height/y, width/x), got {_show(value)}")
    low = 0 if "crops" in field else 1  # crop corners may be 0, sizes not
    return tuple(check_int(field, v, low, MAX_SIZE_CONDITIONING) for v in value)


def check_noise_level(bundle: Bundle, level: Any) -> int:
    """IF super-resolution: the upscaled image's noise level, a timestep of each such stage's noising scheduler."""
    stages = list(bundle.parts.values()) if bundle.family == "cascade" else [bundle]
    limits = [s.model_config["if"]["noising_scheduler"].get("num_train_timesteps", 1000) for s in stages
              if s.family == "if" and s.model_config["if"]["role"] == "super_resolution"]
    if not limits:
        raise RequestError("noise_level", "applies to DeepFloyd-IF super-resolution stages (and cascades with one)")
    return check_int("noise_level", level, 0, min(limits) - 1)


def validate_options(bundle: Bundle, plan: PlanArguments) -> SamplingOptions:
    """The plan a call runs: the bundle's default plan with these overrides, each checked (steps the scheduler can
    space, finite guidance, a key-step or cache spec that fits the steps and the bundle's cache variants)."""
    if plan.scheduler is not None and plan.scheduler not in SCHEDULERS:
        raise RequestError("scheduler", f"unknown scheduler {_show(plan.scheduler)}; available: "
                           f"{', '.join(sorted(SCHEDULERS))}")
    key_steps = plan.key_steps
    if key_steps is not None and not isinstance(key_steps, str):
        key_steps = [check_int("key_steps", s, 0) for s in _as_list("key_steps", key_steps, str)]
    if plan.cache is not None and not isinstance(plan.cache, str):
        raise RequestError("cache", f"must be a spec like deep0:uniform:3, got {_show(plan.cache)}")
    if plan.max_decoder_batch is not None:
        check_int("max_decoder_batch", plan.max_decoder_batch, 1)
    for field in ("parallel", "noise_injection"):
        value = getattr(plan, field)
        if value is not None and not isinstance(value, bool):
            raise RequestError(field, f"must be true or false, got {_show(value)}")
    options = SamplingOptions.from_bundle(
        bundle, num_steps=plan.num_inference_steps, guidance=plan.guidance_scale, key_steps=key_steps,
        cache=plan.cache, scheduler=plan.scheduler, parallel=plan.parallel, max_decoder_batch=plan.max_decoder_batch,
        noise_injection=plan.noise_injection)
    steps = check_steps(bundle, options.num_steps, options.scheduler)
    guidance = check_float("guidance_scale", options.guidance, 0.0, MAX_GUIDANCE)
    try:
        parse_key_steps(options.key_steps, steps, bundle.family)
    except PlanError as exc:
        raise RequestError("key_steps", str(exc)) from None
    try:
        parse_cache(options.cache, steps, list(bundle.cache_variants))
    except PlanError as exc:
        raise RequestError("cache", str(exc)) from None
    return replace(options, num_steps=steps, guidance=guidance)


def image_size(bundle: Bundle) -> tuple[int, int]:
    """The size a bundle's images come out at by default: (height, width) in pixels (a cascade: stage I's)."""
    if bundle.family == "cascade":
        return image_size(next(iter(bundle.parts.values())))
    cfg = bundle.model_config
    if bundle.family in UNET_FAMILIES:
        return tuple(s * cfg["vae_scale_factor"] for s in cfg["sample_size"])
    if "vae_decoder" in bundle.stages:  # a DiT's VAE stage is exported at its one latent size: static axes
        height, width = bundle.stage("vae_decoder").outputs[0].shape[-2:]
        return height, width
    return cfg["input_size"], cfg["input_size"]


def check_size(bundle: Bundle, height: Any, width: Any) -> tuple[int | None, int | None]:
    """UNets take multiples of what their down path divides by; a DiT makes exactly its trained size."""
    if bundle.family == "cascade":  # stage I's size; every later stage keeps its size ratio to it
        stages = list(bundle.parts.values())
        height, width = check_size(stages[0], height, width)
        first = image_size(stages[0])
        for name, stage in list(bundle.parts.items())[1:]:
            h, w = image_size(stage)
            try:
                check_size(stage, round(height * h / first[0]), round(width * w / first[1]))
            except RequestError as exc:
                raise RequestError(exc.field, f"{height}x{width} makes {name} {exc.message}") from None
        return height, width
    default = image_size(bundle)
    unet = bundle.family in UNET_FAMILIES
    if height is None and width is None:
        return default if unet else (None, None)
    h = default[0] if height is None else check_int("height", height, 1, MAX_PIXELS)
    w = default[1] if width is None else check_int("width", width, 1, MAX_PIXELS)
    if not unet:
        if (h, w) != default:
            field = "height" if h != default[0] else "width"
            raise RequestError(field, f"this DiT makes {default[0]}x{default[1]} images only, got {h}x{w}")
        return None, None
    cfg = bundle.model_config
    multiple = cfg["vae_scale_factor"] * 2 ** (cfg["num_levels"] - 1)
    for field, v in (("height", h), ("width", w)):
        if v % multiple:
            raise RequestError(field, f"must be a multiple of {multiple} for this UNet (its VAE and down path "
                               f"divide by that), got {v}")
    return h, w


def check_latents(bundle: Bundle, latents: Any, images: int, height: int | None, width: int | None,
                  frames: int | None = None) -> np.ndarray:
    if bundle.family == "cascade":
        raise RequestError("latents", "a cascade draws every stage's noise from the seed or generator; give latents "
                           "to one diffusion stage bundle (CASCADE/stage_1)")
    cfg = bundle.model_config
    if bundle.family in UNET_FAMILIES:
        f = cfg["vae_scale_factor"]
        channels = cfg["if"]["image_channels"] if bundle.family == "if" else cfg["in_channels"]
        shape = (images, channels, *((frames,) if frames else ()), height // f, width // f)
    else:
        shape = (images, cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    array = np.asarray(latents)
    if array.shape != shape:
        layout = "videos, channels, frames, height, width" if frames else "images, channels, height, width"
        raise RequestError("latents", f"shape {array.shape}, expected {shape} ({layout})")
    if not np.issubdtype(array.dtype, np.floating):
        raise RequestError("latents", f"must be floating point, got {array.dtype}")
    if not np.isfinite(array).all():
        raise RequestError("latents", "contains NaN or infinity")
    return array.astype(np.float32)


def check_control_image(image: Any, images: int, height: int, width: int) -> np.ndarray:
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.floating) or not np.isfinite(image).all():
        raise RequestError("control_image", "must be finite floats in [0, 1]")
    if image.ndim == 3:
        image = np.broadcast_to(image[None], (images, *image.shape))
    if image.shape != (images, 3, height, width):
        raise RequestError("control_image", f"shape {image.shape}, expected ({images}, 3, {height}, {width})")
    return np.ascontiguousarray(image, dtype=np.float32)
