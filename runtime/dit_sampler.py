"""Executes a DiT bundle's plan: encoder at key steps, batched decoders per group, scheduler steps in order."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .backends.base import Backend, StageRunner
from .bundle import Bundle
from .plan import KeyStepPlan, PlanError, StageCall, build_calls, parse_key_steps, plan_flops
from .schedulers import make_scheduler


class SamplingError(ValueError):
    """Bad sampling input: unknown class, wrong noise shape, and the like."""


@dataclass
class SamplingOptions:
    num_steps: int = 50
    guidance: float = 4.0
    key_steps: str | list[int] | None = "default"
    scheduler: str | None = None  # None: the bundle's scheduler class
    parallel: bool = True
    max_decoder_batch: int | None = None
    noise_injection: bool | None = None  # None: on for key-step plans, off for the baseline
    noise_alpha: float = 0.003
    noise_tau: float = 0.3

    @classmethod
    def from_bundle(cls, bundle: Bundle, **overrides) -> "SamplingOptions":
        defaults = {k: v for k, v in bundle.default_plan.items() if k in cls.__dataclass_fields__}
        defaults.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**defaults)


@dataclass
class PreparedRun:
    plan: KeyStepPlan
    calls: list[StageCall]
    cfg: bool
    noise_injection: bool


@dataclass
class SampleResult:
    latents: np.ndarray
    prepared: PreparedRun
    call_seconds: list[float] = field(default_factory=list)
    total_seconds: float = 0.0

    @property
    def host_seconds(self) -> float:
        """Time outside stage calls: CFG, noise injection, scheduler steps, tiling."""
        return self.total_seconds - sum(self.call_seconds)


class DiTSampler:
    def __init__(self, bundle: Bundle, backend: Backend):
        if bundle.family != "dit":
            raise SamplingError(f"bundle family is {bundle.family!r}, this sampler runs 'dit' bundles")
        self.bundle = bundle
        self.backend = backend
        cfg = bundle.model_config
        self.num_classes = cfg["num_classes"]
        self.latent_shape = (cfg["in_channels"], cfg["input_size"], cfg["input_size"])
        self._runners: dict[str, StageRunner] = {}

    def runner(self, stage: str) -> StageRunner:
        if stage not in self._runners:
            self._runners[stage] = self.backend.load(self.bundle.stage(stage))
        return self._runners[stage]

    def prepare(self, options: SamplingOptions, images: int) -> PreparedRun:
        plan = parse_key_steps(options.key_steps, options.num_steps, "dit")
        cfg = options.guidance > 1
        calls = build_calls(plan, images, cfg, options.parallel, options.max_decoder_batch)
        injection = (not plan.baseline) if options.noise_injection is None else options.noise_injection
        return PreparedRun(plan, calls, cfg, injection)

    def plan_flops(self, prepared: PreparedRun) -> int | None:
        return plan_flops(prepared.calls, lambda stage, batch: self.bundle.stage(stage).flops(batch))

    def initial_noise(self, images: int, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((images, *self.latent_shape), dtype=np.float32)

    def sample(
        self, class_labels: list[int], options: SamplingOptions, init_noise: np.ndarray | None = None, seed: int = 0
    ) -> SampleResult:
        labels = self._check_labels(class_labels)
        images = len(labels)
        noise = self.initial_noise(images, seed) if init_noise is None else self._check_noise(init_noise, images)
        prepared = self.prepare(options, images)
        scheduler = make_scheduler(self.bundle.scheduler_config, options.scheduler)
        scheduler.set_timesteps(options.num_steps)
        timesteps = np.asarray(scheduler.timesteps)
        if len(timesteps) != options.num_steps:
            raise PlanError(f"scheduler gives {len(timesteps)} timesteps for {options.num_steps} steps")
        rng = np.random.default_rng(seed + 1)  # for stochastic schedulers (DDPM)

        z_T = (noise * np.float32(scheduler.init_noise_sigma)).astype(np.float32)
        z = z_T
        cfg_rows = np.concatenate([labels, np.full(images, self.num_classes, np.int64)]) if prepared.cfg else labels
        inject_below = options.noise_tau * scheduler.num_train_timesteps
        hidden = None
        call_seconds = []
        start = time.perf_counter()
        for call in prepared.calls:
            step_t = timesteps[list(call.steps)]
            if call.stage == "decoder":
                feeds = {
                    "hidden": _tile_per_half(hidden, len(call.steps), prepared.cfg),
                    "timestep": np.tile(np.repeat(step_t, images), 2 if prepared.cfg else 1).astype(np.float32),
                    "class_label": _tile_per_half(cfg_rows, len(call.steps), prepared.cfg),
                }
            else:
                x = scheduler.scale_model_input(z, step_t[0]).astype(np.float32)
                feeds = {
                    "latent": np.concatenate([x, x]) if prepared.cfg else x,
                    "timestep": np.full(len(cfg_rows), step_t[0], np.float32),
                    "class_label": cfg_rows,
                }
            t0 = time.perf_counter()
            out = next(iter(self.runner(call.stage).run(feeds).values()))
            call_seconds.append(time.perf_counter() - t0)
            if call.stage == "encoder":
                hidden = out
                continue
            eps = self._guided_eps(out, images, len(call.steps), options.guidance, prepared.cfg)
            for j, step in enumerate(call.steps):
                t = timesteps[step]
                if prepared.noise_injection and t < inject_below:
                    z = z + np.float32(options.noise_alpha) * z_T
                z = scheduler.step(eps[j], t, z, rng=rng).astype(np.float32)
        total = time.perf_counter() - start
        return SampleResult(z, prepared, call_seconds, total)

    def _guided_eps(self, out: np.ndarray, images: int, steps: int, guidance: float, cfg: bool) -> np.ndarray:
        # learned sigma: the first half of the channels is epsilon (as diffusers' DiTPipeline uses it)
        eps = out[:, : self.latent_shape[0]]
        if cfg:
            cond, uncond = eps[: steps * images], eps[steps * images :]
            eps = uncond + np.float32(guidance) * (cond - uncond)
        return eps.reshape(steps, images, *self.latent_shape)

    def _check_labels(self, class_labels: list[int]) -> np.ndarray:
        if not class_labels:
            raise SamplingError("no class labels given")
        bad = [c for c in class_labels if not 0 <= int(c) < self.num_classes]
        if bad:
            raise SamplingError(f"unknown class {bad[0]}: this model has classes 0..{self.num_classes - 1}")
        return np.asarray(class_labels, np.int64)

    def _check_noise(self, noise: np.ndarray, images: int) -> np.ndarray:
        expected = (images, *self.latent_shape)
        if noise.shape != expected:
            raise SamplingError(f"initial noise has shape {noise.shape}, expected {expected} (images, C, H, W)")
        return noise.astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray | None:
        """Images as uint8 (N, H, W, C) through the bundle's VAE stage; None if the bundle has none."""
        if "vae_decoder" not in self.bundle.stages:
            return None
        images = self.runner("vae_decoder").run({"latent": latents.astype(np.float32)})["image"]
        return to_uint8(images)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> (N, H, W, C) uint8, rounded like diffusers' numpy_to_pil."""
    return (np.clip(images, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def _tile_per_half(rows: np.ndarray, steps: int, cfg: bool) -> np.ndarray:
    """Repeat each CFG half ``steps`` times: [c, u] -> [c x steps, u x steps] (the plan's batch layout)."""
    if not cfg:
        return np.concatenate([rows] * steps)
    cond, uncond = np.split(rows, 2)
    return np.concatenate([cond] * steps + [uncond] * steps)
