"""Shared numpy helpers for the diffusers-compatible schedulers.

Pure numpy: nothing here (or anywhere under ``runtime/``) may import torch or
diffusers. Numerics follow diffusers on CPU: schedule tables are float32, the
alpha cumulative product accumulates in float64 like ``torch.cumprod`` does on
CPU, and per-step scalars are ``np.float32`` so array math stays in float32.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

import numpy as np

from ..errors import KeystepError

F32 = np.float32

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


class SchedulerConfigError(KeystepError, ValueError):
    """A scheduler config field holds a value that is invalid or not implemented."""

    def __init__(self, message: str, field: str | None = None, value: Any = None):
        super().__init__(message)
        self.field = field
        self.value = value


def unsupported(owner: str, field: str, value: Any, supported: Any = None) -> SchedulerConfigError:
    msg = f"{owner}: unsupported value for config field {field!r}: {value!r}"
    if supported is not None:
        msg += f" (supported: {list(supported)!r})"
    return SchedulerConfigError(msg, field=field, value=value)


# --------------------------------------------------------------------------- betas / alphas


def linspace32(start: float, end: float, n: int) -> np.ndarray:
    # torch.linspace(..., dtype=float32); exact to ~1 ulp (torch's own CPU result depends on SIMD width).
    return np.linspace(start, end, n).astype(F32)


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999,
                        alpha_transform_type: str = "cosine") -> np.ndarray:
    if alpha_transform_type == "cosine":
        def alpha_bar_fn(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif alpha_transform_type == "laplace":
        def alpha_bar_fn(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    else:
        raise ValueError(f"unsupported alpha_transform_type: {alpha_transform_type}")
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return np.asarray(betas, dtype=F32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (arXiv 2305.08891, Algorithm 1), in float32 like diffusers."""
    alphas = F32(1.0) - betas
    alphas_bar_sqrt = np.sqrt(cumprod32(alphas))
    a0, aT = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * (a0 / (a0 - aT))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (F32(1.0) - alphas).astype(F32)


def cumprod32(x: np.ndarray) -> np.ndarray:
    # torch.cumprod on CPU accumulates float32 in double and rounds each output.
    return np.cumprod(x.astype(np.float64)).astype(F32)


def make_betas(owner: str, cfg: Mapping[str, Any], schedules: tuple[str, ...] = BETA_SCHEDULES) -> np.ndarray:
    """Betas from the beta_* / trained_betas / rescale_betas_zero_snr fields (float32)."""
    n = int(cfg["num_train_timesteps"])
    start, end = float(cfg["beta_start"]), float(cfg["beta_end"])
    schedule = cfg["beta_schedule"]
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64).astype(F32)
    elif schedule not in schedules:
        raise unsupported(owner, "beta_schedule", schedule, schedules)
    elif schedule == "linear":
        betas = linspace32(start, end, n)
    elif schedule == "scaled_linear":
        b = linspace32(start**0.5, end**0.5, n)
        betas = b * b
    elif schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    elif schedule == "laplace":
        betas = betas_for_alpha_bar(n, alpha_transform_type="laplace")
    else:  # sigmoid
        x = linspace32(-6.0, 6.0, n)
        betas = (F32(1.0) / (F32(1.0) + np.exp(-x))) * F32(end - start) + F32(start)
    if cfg.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas.astype(F32)


# --------------------------------------------------------------------------- timesteps / sigmas


def spaced_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int,
                     steps_offset: int = 0, round_linspace: bool = True) -> np.ndarray:
    """Descending timesteps (float64 values) for DDIM/DDPM/Euler-style ``timestep_spacing``.

    ``round_linspace=False`` keeps the fractional linspace values (Euler)."""
    T, n = int(num_train_timesteps), int(num_inference_steps)
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n)
        if round_linspace:
            ts = ts.round()
        return ts[::-1].copy()
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1] + int(steps_offset)
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}")


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep for each sigma by log-linear interpolation (vectorised diffusers `_sigma_to_t`)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma.reshape(1, -1) - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma.reshape(-1)) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_alpha(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """VP (alpha_t, sigma_t) from the VE sigma, float32 like diffusers `_sigma_to_alpha_sigma_t`."""
    alpha_t = F32(1.0) / np.sqrt(sigma * sigma + F32(1.0))
    return alpha_t, sigma * alpha_t


# --------------------------------------------------------------------------- sample helpers


def as_float(x: Any) -> np.ndarray:
    """float32 array (float64 arrays are kept as float64)."""
    a = np.asarray(x)
    return a if a.dtype in (np.float32, np.float64) else a.astype(F32)


def threshold_sample(sample: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Dynamic thresholding (Imagen, arXiv 2205.11487), per batch item, as diffusers `_threshold_sample`."""
    b = sample.shape[0]
    flat = sample.reshape(b, -1)
    s = np.quantile(np.abs(flat), ratio, axis=1).astype(flat.dtype)
    s = np.minimum(np.maximum(s, 1), max_value).astype(flat.dtype)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(sample.shape)


def draw_noise(shape: tuple[int, ...], noise: Any = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """Explicit ``noise`` if given, else standard normal float32 from ``rng`` (a fresh unseeded one if None)."""
    if noise is not None and rng is not None:
        raise ValueError("pass either `noise` or `rng`, not both")
    if noise is not None:
        noise = as_float(noise)
        if noise.shape != tuple(shape):
            raise ValueError(f"noise shape {noise.shape} != sample shape {tuple(shape)}")
        return noise
    if rng is None:
        rng = np.random.default_rng()
    return rng.standard_normal(shape, dtype=F32)


def broadcast_to_sample(values: np.ndarray, sample: np.ndarray) -> np.ndarray:
    values = np.asarray(values).reshape(-1)
    return values.reshape(values.shape + (1,) * (sample.ndim - 1))


def vp_predict(prediction_type: str, model_output: np.ndarray, sample: np.ndarray,
               alpha_prod_t: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(pred_x0, pred_eps) of a DDPM/DDIM (variance-preserving) model at cumulative alpha ``alpha_prod_t``."""
    sqrt_a, sqrt_b = np.sqrt(alpha_prod_t), np.sqrt(F32(1.0) - alpha_prod_t)
    if prediction_type == "epsilon":
        return (sample - sqrt_b * model_output) / sqrt_a, model_output
    if prediction_type == "sample":
        return model_output, (sample - sqrt_a * model_output) / sqrt_b
    if prediction_type == "v_prediction":
        return sqrt_a * sample - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * sample
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def clip_x0(pred_x0: np.ndarray, cfg: Mapping[str, Any]) -> np.ndarray:
    """``thresholding`` / ``clip_sample`` post-processing of a predicted x0 (DDIM/DDPM)."""
    if cfg["thresholding"]:
        return threshold_sample(pred_x0, cfg["dynamic_thresholding_ratio"], cfg["sample_max_value"])
    if cfg["clip_sample"]:
        r = cfg["clip_sample_range"]
        return np.clip(pred_x0, -r, r).astype(pred_x0.dtype)
    return pred_x0


# --------------------------------------------------------------------------- base class


class BaseScheduler:
    """Config handling shared by all schedulers.

    Subclasses set ``class_name`` (the diffusers class), ``defaults`` (every
    ``__init__`` field of that class with diffusers' default) and ``choices``
    (field -> accepted values; anything else raises SchedulerConfigError)."""

    class_name: ClassVar[str] = ""
    defaults: ClassVar[Mapping[str, Any]] = {}
    choices: ClassVar[Mapping[str, tuple]] = {}
    order: ClassVar[int] = 1
    init_noise_sigma: float = 1.0

    def __init__(self, **kwargs: Any):
        unknown = sorted(set(kwargs) - set(self.defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected config fields {unknown}")
        cfg = dict(self.defaults)
        cfg.update(kwargs)
        self._config = cfg
        for field, allowed in self.choices.items():
            if cfg[field] not in allowed:
                raise unsupported(self.class_name, field, cfg[field], allowed)
        self.num_inference_steps: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "BaseScheduler":
        """Build from a diffusers ``scheduler_config.json`` dict, like diffusers' ``from_config``:
        private ``_*`` keys, keys listed in ``_use_default_values`` and fields this class does
        not have (e.g. ones of another scheduler class) are ignored."""
        used_defaults = set(config.get("_use_default_values", ()) or ())
        kwargs = {k: v for k, v in config.items()
                  if not k.startswith("_") and k not in used_defaults and k in cls.defaults}
        return cls(**kwargs)

    def _set(self, **fields: Any) -> None:
        """Rewrite fields like diffusers' ``register_to_config`` (legacy value remaps)."""
        self._config.update(fields)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    @property
    def num_train_timesteps(self) -> int:
        return int(self._config["num_train_timesteps"])

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        return sample

    def __len__(self) -> int:
        return self.num_train_timesteps

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._config!r})"


class VPScheduler(BaseScheduler):
    """Base for DDIM/DDPM: integer timesteps that index the ``alphas_cumprod`` table directly."""

    beta_schedules: ClassVar[tuple[str, ...]] = BETA_SCHEDULES

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.betas = make_betas(self.class_name, self._config, self.beta_schedules)
        self.alphas = F32(1.0) - self.betas
        self.alphas_cumprod = cumprod32(self.alphas)
        self.timesteps = np.arange(0, self.num_train_timesteps)[::-1].astype(np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        if num_inference_steps > self.num_train_timesteps:
            raise ValueError(f"num_inference_steps={num_inference_steps} > "
                             f"num_train_timesteps={self.num_train_timesteps}")
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = spaced_timesteps(self._config["timestep_spacing"], self.num_train_timesteps,
                                          num_inference_steps, self._config["steps_offset"]).astype(np.int64)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """sqrt(a_t) * x0 + sqrt(1 - a_t) * noise, one timestep per batch item (or a scalar)."""
        original = as_float(original)
        ac = self.alphas_cumprod.astype(original.dtype)[np.asarray(timesteps, dtype=np.int64)]
        return (broadcast_to_sample(np.sqrt(ac), original) * original
                + broadcast_to_sample(np.sqrt(1 - ac), original) * as_float(noise))


class SigmaScheduler(BaseScheduler):
    """Base for schedulers that walk a sigma table with a ``step_index`` (Euler, DPM-Solver).

    As in diffusers, ``step_index`` starts as None and is initialised from the first timestep passed
    to ``scale_model_input``/``step`` (or from ``set_begin_index``); ``set_timesteps`` resets it."""

    #: DPM-Solver falls back to the last index for an unknown timestep; Euler raises.
    _missing_timestep_is_last: ClassVar[bool] = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        c = self._config
        if bool(c["use_karras_sigmas"]) + bool(c["use_exponential_sigmas"]) > 1:
            raise ValueError("only one of use_karras_sigmas / use_exponential_sigmas can be set")
        self.betas = make_betas(self.class_name, c)
        self.alphas = F32(1.0) - self.betas
        self.alphas_cumprod = cumprod32(self.alphas)
        if c["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = F32(2.0**-24)  # as diffusers: keeps the terminal sigma finite
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _train_sigmas(self) -> np.ndarray:
        """VE sigmas sqrt((1 - a) / a) of every training timestep (ascending t), float32."""
        ac = self.alphas_cumprod
        return np.sqrt((F32(1.0) - ac) / ac)

    def _final_sigma(self) -> float | np.float32:
        if self._config["final_sigmas_type"] == "sigma_min":
            return self._train_sigmas()[0]
        return 0.0

    def _explicit_sigmas(self, in_sigmas: np.ndarray, n: int) -> np.ndarray | None:
        """Karras / exponential sigmas between the ends of ``in_sigmas`` (descending), or None."""
        c = self._config
        lo = c.get("sigma_min")
        hi = c.get("sigma_max")
        lo = float(in_sigmas[-1]) if lo is None else float(lo)
        hi = float(in_sigmas[0]) if hi is None else float(hi)
        if c.get("use_karras_sigmas"):
            return karras_sigmas(lo, hi, n)
        if c.get("use_exponential_sigmas"):
            return exponential_sigmas(lo, hi, n)
        return None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep: Any, schedule_timesteps: np.ndarray | None = None) -> int:
        ts = self.timesteps if schedule_timesteps is None else schedule_timesteps
        t = np.asarray(timestep)
        if ts.dtype.kind == "f":  # torch compares a Python float against a float32 table in float32
            t = t.astype(ts.dtype)
        hits = np.flatnonzero(ts == t)
        if hits.size == 0:
            if self._missing_timestep_is_last:
                return len(self.timesteps) - 1
            raise ValueError(f"timestep {timestep!r} is not in scheduler.timesteps")
        # diffusers takes the second match so img2img starting mid-schedule does not skip a sigma.
        return int(hits[1] if hits.size > 1 else hits[0])

    def _init_step_index(self, timestep: Any) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _reset_state(self) -> None:
        self._step_index = None
        self._begin_index = None

    def _noise_sigmas(self, timesteps: Any, original: np.ndarray) -> np.ndarray:
        """Per-batch-item sigma for add_noise, chosen like diffusers (begin_index / step_index aware)."""
        timesteps = np.atleast_1d(np.asarray(timesteps))
        if self._begin_index is None:
            idx = [self.index_for_timestep(t) for t in timesteps]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * len(timesteps)
        return broadcast_to_sample(self.sigmas.astype(original.dtype)[idx], original)
