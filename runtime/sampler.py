"""The plan executor shared by every model family.

It walks a plan's :class:`StageCall` list: the encoder (or full model) at a key step's latent, then the group's
decoder calls, then the guided prediction of each step through the scheduler in step order, with prior noise
injection. A family subclass says only how to build each stage's feeds and read its outputs.

CFG batch layout: a stage's rows are two halves, ``first`` and ``second`` (which is the conditional one is the
family's convention: DiT puts the conditional half first like diffusers' DiTPipeline, UNets put it second like
StableDiffusionPipeline). A decoder call over S steps repeats each half S times, step-major inside the half.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .backends.base import Backend, StageRunner
from .bundle import Bundle
from .errors import KeystepError
from .plan import CachePlan, KeyStepPlan, PlanError, StageCall, build_calls, parse_cache, parse_key_steps, plan_flops
from .schedulers import make_scheduler

CACHE_VARIANT = re.compile(r"^(deep\d+|blocks\d+-\d+):")  # the names build gives cache variants


class SamplingError(KeystepError, ValueError):
    """Bad sampling input: unknown class, wrong noise shape, and the like."""


@dataclass
class SamplingOptions:
    num_steps: int = 50
    guidance: float = 4.0
    key_steps: str | list[int] | None = "default"
    cache: str | None = None  # feature caching, "VARIANT:SCHEDULE[@START]" (see plan.parse_cache)
    scheduler: str | None = None  # None: the bundle's scheduler class
    parallel: bool | None = None  # batch a group's decoders into one call; None: the backend's preference
    max_decoder_batch: int | None = None
    noise_injection: bool | None = None  # None: on for key-step plans, off for the baseline and cache plans
    noise_alpha: float = 0.003
    noise_tau: float = 0.3

    @classmethod
    def from_bundle(cls, bundle: Bundle, **overrides) -> "SamplingOptions":
        defaults = {k: v for k, v in bundle.default_plan.items() if k in cls.__dataclass_fields__}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "key_steps" in overrides and "cache" not in overrides:
            defaults.pop("cache", None)  # an explicit key-step plan is that plan, without the default's caching
        defaults.update(overrides)
        return cls(**defaults)

    @property
    def plan_spec(self) -> str:
        """The plan these options run, in :meth:`with_plan`'s notation."""
        key_steps = self.key_steps if isinstance(self.key_steps, str) or self.key_steps is None else \
            ",".join(map(str, self.key_steps))
        key_steps = key_steps or "default"
        return key_steps if not self.cache or self.cache == "none" else f"{key_steps}+{self.cache}"

    def with_plan(self, spec: str) -> "SamplingOptions":
        """These options running one plan, written ``KEY_STEPS``, ``CACHE`` or ``KEY_STEPS+CACHE``: e.g. ``all``,
        ``uniform:6``, ``deep0:uniform:3`` (caching from step 0), ``0,2+deep1:uniform:3@4`` (key steps 0 and 2,
        caching from step 4). A part naming a cache variant (``deep<id>``, ``blocks<a>-<b>``) is the cache plan."""
        key_steps, cache = "all", None
        for part in spec.split("+"):
            if CACHE_VARIANT.match(part):
                cache = part
            else:
                key_steps = part
        return replace(self, key_steps=key_steps, cache=cache)


@dataclass
class PreparedRun:
    plan: KeyStepPlan
    calls: list[StageCall]
    cfg: bool
    noise_injection: bool
    scheduler: object  # a fresh scheduler with its timesteps set: one per run (schedulers carry state)
    timesteps: np.ndarray
    step_masks: np.ndarray | None = None  # width bundles: (steps, depth, 2, heads)
    cache: CachePlan | None = None


@dataclass
class SampleResult:
    latents: np.ndarray
    prepared: PreparedRun
    call_seconds: list[float] = field(default_factory=list)
    total_seconds: float = 0.0
    call_flops: list[int | None] = field(default_factory=list)  # what each call computed (token selection counted)
    mlp_tokens: list[tuple[int, ...]] = field(default_factory=list)  # per call, per block: tokens that ran the MLP

    @property
    def host_seconds(self) -> float:
        """Time outside stage calls: CFG, noise injection, scheduler steps, tiling."""
        return self.total_seconds - sum(self.call_seconds)


def tile_per_half(rows: np.ndarray, steps: int, cfg: bool) -> np.ndarray:
    """Repeat each CFG half ``steps`` times: [a, b] -> [a x steps, b x steps] (the plan's batch layout)."""
    if steps == 1:
        return rows
    if not cfg:
        return np.concatenate([rows] * steps)
    first, second = np.split(rows, 2)
    return np.concatenate([first] * steps + [second] * steps)


def scheduler_for(bundle: Bundle, options: SamplingOptions):
    """A fresh scheduler with its timesteps set. Plans index model evaluations, one per timestep: PNDM's N steps
    take N+1 (PLMS repeats one timestep), as diffusers' pipelines run them."""
    if options.num_steps < 1:
        raise PlanError(f"the number of steps must be at least 1, got {options.num_steps}")
    scheduler = make_scheduler(bundle.scheduler_config, options.scheduler)
    try:
        scheduler.set_timesteps(options.num_steps)
    except ValueError as exc:  # a step count this scheduler cannot take (more than trained, no DDIM stride...)
        raise PlanError(str(exc)) from None
    return scheduler, np.asarray(scheduler.timesteps)


def row_values(step_t: np.ndarray, images: int, cfg: bool) -> np.ndarray:
    """Per-row values (timesteps, mask rows) of a call in the plan's layout: step-major in each CFG half."""
    rows = np.repeat(np.asarray(step_t), images, axis=0)
    return np.concatenate([rows, rows] if cfg else [rows]).astype(np.float32)


def prepare_run(bundle: Bundle, options: SamplingOptions, images: int, parallel: bool, full_usable: bool) -> PreparedRun:
    """The run's scheduler, plan and call list (with each step's width engine on width bundles)."""
    scheduler, timesteps = scheduler_for(bundle, options)
    plan = parse_key_steps(options.key_steps, len(timesteps), bundle.family)
    cache = parse_cache(options.cache, len(timesteps), list(bundle.cache_variants))
    if cache is not None and not full_usable:
        raise PlanError("cache plans need the full stage, which this run cannot use (ControlNet)")
    cfg = options.guidance > 1
    default_injection = not plan.baseline and cache is None
    injection = default_injection if options.noise_injection is None else options.noise_injection
    if plan.baseline and not full_usable:
        # every step a key step, one step per call: the same computation as the full model
        plan, parallel = KeyStepPlan(plan.num_steps, tuple(range(plan.num_steps)), spec=plan.spec), False
    width, engines, step_masks = bundle.width, None, None
    if width is not None:
        step_masks = width.step_masks(timesteps)
        engines = {stage: [e.name for e in chosen] for stage, chosen in width.assign(timesteps).items()}
    calls = build_calls(plan, images, cfg, parallel, options.max_decoder_batch, engines, cache)
    return PreparedRun(plan, calls, cfg, injection, scheduler, timesteps, step_masks, cache)


class PlanSampler:
    family = ""
    cond_first = True  # which CFG half is the conditional one

    def __init__(self, bundle: Bundle, backend: Backend):
        if bundle.family != self.family:
            raise SamplingError(f"bundle family is {bundle.family!r}, this sampler runs {self.family!r} bundles")
        self.bundle = bundle
        self.backend = backend
        self._runners: dict[str, StageRunner] = {}
        self._loading = threading.Lock()

    def runner(self, stage: str) -> StageRunner:
        """The stage's runner, loaded once (under a lock: calls from several threads share one session). A runner
        that is not ``thread_safe`` is wrapped so that its calls take turns."""
        runner = self._runners.get(stage)
        if runner is None:
            with self._loading:
                runner = self._runners.get(stage)
                if runner is None:
                    runner = self.backend.load(self.bundle.stage(stage))
                    if not getattr(runner, "thread_safe", False):
                        runner = SerialRunner(runner)
                    self._runners[stage] = runner
        return runner

    @property
    def can_decode(self) -> bool:
        """Whether :meth:`decode` makes images: a VAE stage, or a pixel-space model (its samples are images)."""
        return self.bundle.pixel_space or "vae_decoder" in self.bundle.stages

    def prepare(self, options: SamplingOptions, images: int, context=None) -> PreparedRun:
        parallel = options.parallel if options.parallel is not None else self.backend.batches_decoders
        return prepare_run(self.bundle, options, images, parallel, self.full_stage_usable(context))

    def full_stage_usable(self, context) -> bool:
        """Whether the baseline plan can run the ``full`` stage (width bundles have none)."""
        return "full" in self.bundle.stages

    def plan_flops(self, prepared: PreparedRun) -> int | None:
        return plan_flops(prepared.calls, lambda stage, batch: self.bundle.stage(stage).flops(batch))

    def width_feeds(self, call: StageCall, prepared: PreparedRun, images: int) -> dict[str, np.ndarray]:
        """head_mask/group_mask rows for a merged width engine (nothing for exact ones)."""
        width = self.bundle.width
        if width is None:
            return {}
        engine = width.by_name[call.runner]
        if not engine.masked:
            return {}
        blocks = width.blocks(engine.stage)
        rows = [engine.mask_rows(prepared.step_masks[step][blocks]) for step in call.steps]
        return {
            "head_mask": row_values(np.stack([r[0] for r in rows]), images, prepared.cfg),
            "group_mask": row_values(np.stack([r[1] for r in rows]), images, prepared.cfg),
        }

    # --- family hooks -------------------------------------------------------------------------------------------
    def latent_input_feeds(self, x: np.ndarray, t, context) -> dict[str, np.ndarray]:
        """Feeds of the encoder/full stage for CFG-doubled latent rows ``x`` at timestep ``t``."""
        raise NotImplementedError

    def decoder_feeds(self, cache, step_t: np.ndarray, images: int, cfg: bool, context) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def encoder_cache(self, outputs: dict[str, np.ndarray], x: np.ndarray, t, context):
        """What the group's decoders reuse (the encoder outputs, plus e.g. ControlNet residuals)."""
        return outputs

    def prediction(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """The model prediction (epsilon / v) channels of a decoder/full output."""
        raise NotImplementedError

    def guide(self, cond: np.ndarray, uncond: np.ndarray, guidance: float) -> np.ndarray:
        """Classifier-free guidance of the rows' predictions."""
        return uncond + np.float32(guidance) * (cond - uncond)

    def scheduler_input(self, pred: np.ndarray, scheduler) -> np.ndarray:
        """What the scheduler's step takes of the guided prediction (all of it unless a family says otherwise)."""
        return pred

    # --- the loop -----------------------------------------------------------------------------------------------
    def run_plan(self, noise: np.ndarray, options: SamplingOptions, context, seed: int = 0,
                 generator=None) -> SampleResult:
        """``generator``: the noise source of stochastic schedulers (DDPM), anything with numpy's
        ``standard_normal(shape, dtype=)``; default ``np.random.default_rng(seed + 1)``."""
        images = len(noise)
        prepared = self.prepare(options, images, context)
        scheduler, timesteps = prepared.scheduler, prepared.timesteps
        rng = np.random.default_rng(seed + 1) if generator is None else generator
        cfg = prepared.cfg
        z_T = (noise * np.float32(scheduler.init_noise_sigma)).astype(np.float32)
        z = z_T
        inject_below = options.noise_tau * scheduler.num_train_timesteps
        cache = None  # what the group's decoders reuse (encoder outputs)
        features = {}  # feature caching: the last full step's cached tensors, by graph name ("cache_<variant>")
        call_seconds, call_flops, mlp_tokens = [], [], []
        start = time.perf_counter()
        for call in prepared.calls:
            step_t = timesteps[list(call.steps)]
            if call.stage == "decoder":
                feeds = self.decoder_feeds(cache, step_t, images, cfg, context)
            else:
                x = scheduler.scale_model_input(z, step_t[0]).astype(np.float32)
                x = np.concatenate([x, x]) if cfg else x
                feeds = self.latent_input_feeds(x, step_t[0], context)
                if call.stage == "cached":
                    name = "cache_" + prepared.cache.variant
                    feeds[name] = features[name]
            feeds.update(self.width_feeds(call, prepared, images))
            t0 = time.perf_counter()
            outputs = self.runner(call.runner).run(feeds)
            call_seconds.append(time.perf_counter() - t0)
            mlp_tokens.append(tuple(int(n) for n in outputs.get("mlp_tokens", ())))
            call_flops.append(self.bundle.stage(call.runner).actual_flops(call.batch, mlp_tokens[-1]))
            if call.stage == "encoder":
                cache = self.encoder_cache(outputs, x, step_t[0], context)
                continue
            if call.stage == "full" and prepared.cache is not None:
                features = {k: v for k, v in outputs.items() if k.startswith("cache_")}
            pred = self.prediction(outputs)
            steps = len(call.steps)
            if cfg:
                first, second = pred[: steps * images], pred[steps * images :]
                cond, uncond = (first, second) if self.cond_first else (second, first)
                pred = self.guide(cond, uncond, options.guidance)
            pred = self.scheduler_input(pred, scheduler)
            pred = pred.reshape(steps, images, *pred.shape[1:])
            for j, step in enumerate(call.steps):
                t = timesteps[step]
                if prepared.noise_injection and t < inject_below:
                    z = z + np.float32(options.noise_alpha) * z_T
                z = scheduler.step(pred[j], t, z, rng=rng).astype(np.float32)
        return SampleResult(z, prepared, call_seconds, time.perf_counter() - start, call_flops, mlp_tokens)

    def decode(self, latents: np.ndarray) -> np.ndarray | None:
        """Images as uint8 (N, H, W, C): through the bundle's VAE stage, or, for pixel-space models, the samples
        themselves ([-1, 1] -> [0, 255]); None if the bundle makes only latents."""
        if self.bundle.pixel_space:
            return to_uint8((latents + 1) / 2)
        if "vae_decoder" not in self.bundle.stages:
            return None
        images = self.runner("vae_decoder").run({"latent": latents.astype(np.float32)})["image"]
        return to_uint8(images)

    latent_layout = "images, C, H, W"  # z_T's axes, as a wrong-shaped initial noise's error names them

    def noise_shape(self, images: int, **size) -> tuple[int, ...]:
        """The family's hook: z_T's shape for ``images`` rows at an output size (``height``, ``width``; videos
        ``frames``)."""
        raise NotImplementedError

    def start_noise(self, images: int, init_noise: np.ndarray | None, seed: int, generator, **size) -> np.ndarray:
        """A run's z_T (:meth:`noise_shape`): the caller's ``init_noise``, checked, else drawn from ``generator``
        (anything with numpy's ``standard_normal``) or, without one, a generator seeded with ``seed``."""
        shape = self.noise_shape(images, **size)
        if init_noise is None:
            rng = generator if generator is not None else np.random.default_rng(seed)
            return rng.standard_normal(shape, dtype=np.float32)
        if np.shape(init_noise) != shape:
            raise SamplingError(f"initial noise has shape {np.shape(init_noise)}, expected {shape} "
                                f"({self.latent_layout})")
        return np.asarray(init_noise).astype(np.float32)


class SerialRunner:
    """A runner whose calls must not overlap (preallocated device buffers, IO bindings, CUDA graphs): one at a time."""

    thread_safe = True

    def __init__(self, runner: StageRunner):
        self.inner = runner
        self.spec = runner.spec
        self._lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            return self.inner.run(feeds)

    def __getattr__(self, name):  # stats() and the like of the wrapped runner
        return getattr(self.inner, name)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> (N, H, W, C) uint8, rounded like diffusers' numpy_to_pil."""
    return (np.clip(images, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)

