"""DDIM as the original DiT samples it: OpenAI's respaced diffusion (``diffusion/respace.py``) and
``GaussianDiffusion.ddim_sample`` (``diffusion/gaussian_diffusion.py``) of facebookresearch/DiT, which DyDiT,
FasterDiffusion-DiT and SpeeDiT inherit. The default scheduler of bundles built from original DiT / DyDiT checkpoints.

Three things diffusers' ``DDIMScheduler`` cannot express:

* Timesteps. ``create_diffusion(str(N))`` keeps N timesteps evenly spread over [0, T-1], both ends included
  (``space_timesteps``: a fractional stride (T-1)/(N-1) accumulated in floating point, rounded half to even), e.g.
  0, 20, 41, ..., 979, 999 for N = 50 (``timestep_respacing="uniform"``). ``"ddimN"`` takes the smallest integer
  stride that gives exactly N steps from 0 (``"ddim"``).
* The step goes to the *previous kept* timestep, whatever the gap (diffusers steps back by T // N, which is only
  right for its "leading" spacing), and from the first kept timestep to alpha_bar = 1.
* x0 is clipped only with ``clip_denoised=True``, and then epsilon is re-derived from the clipped x0. DiT's
  sample.py and sample_ddp.py pass ``clip_denoised=False``: ``clip_sample`` defaults to False here.

Tables are float64 like DiT's numpy ones (betas, the respaced betas ``1 - abar_t / abar_prev`` and their cumulative
product); per-step coefficients are rounded to float32 and applied to float32 arrays, as DiT's
``_extract_into_tensor(...).float()`` does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import F32, VPScheduler, as_float, draw_noise

RESPACINGS = ("uniform", "ddim")


def respaced_timesteps(num_train_timesteps: int, num_steps: int, respacing: str = "uniform") -> list[int]:
    """The kept timesteps, ascending: DiT's ``space_timesteps(T, "N")`` (uniform) or ``space_timesteps(T, "ddimN")``."""
    T, n = int(num_train_timesteps), int(num_steps)
    if not 1 <= n <= T:
        raise ValueError(f"cannot take {n} of {T} timesteps")
    if respacing == "ddim":
        for stride in range(1, T):
            if len(range(0, T, stride)) == n:
                return list(range(0, T, stride))
        raise ValueError(f"cannot take exactly {n} of {T} timesteps with an integer stride (DDIM respacing): choose "
                         f"a step count that divides {T} evenly enough, or timestep_respacing='uniform'")
    stride = 1.0 if n == 1 else (T - 1) / (n - 1)
    kept, position = [], 0.0
    for _ in range(n):
        kept.append(round(position))  # Python's round: half to even, as DiT's
        position += stride
    return kept


def train_betas64(cfg) -> np.ndarray:
    """The training betas in float64, as DiT's ``get_named_beta_schedule`` makes them."""
    T = int(cfg["num_train_timesteps"])
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], dtype=np.float64)
    if cfg["beta_schedule"] == "linear":
        return np.linspace(float(cfg["beta_start"]), float(cfg["beta_end"]), T, dtype=np.float64)
    # "squaredcos_cap_v2" is DiT's "cosine": alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2, betas <= 0.999
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=np.float64)


class RespacedDDIMScheduler(VPScheduler):
    class_name = "RespacedDDIMScheduler"
    defaults = {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "timestep_respacing": "uniform", "clip_sample": False, "clip_sample_range": 1.0,
        "prediction_type": "epsilon",
    }
    choices = {"timestep_respacing": RESPACINGS, "prediction_type": ("epsilon", "sample")}
    beta_schedules = ("linear", "squaredcos_cap_v2")

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.train_alphas_cumprod = np.cumprod(1.0 - train_betas64(self._config))
        self._abar = self._abar_prev = None
        self._index: dict[int, int] = {}

    def set_timesteps(self, num_inference_steps: int) -> None:
        kept = respaced_timesteps(self.num_train_timesteps, num_inference_steps, self._config["timestep_respacing"])
        self.num_inference_steps = len(kept)
        self.timesteps = np.asarray(kept[::-1], dtype=np.int64)
        # the respaced process: betas 1 - abar_t / abar_prev over the kept steps, then their cumulative product
        last, betas = 1.0, []
        for t in kept:
            betas.append(1 - self.train_alphas_cumprod[t] / last)
            last = self.train_alphas_cumprod[t]
        self._abar = np.cumprod(1.0 - np.array(betas))
        self._abar_prev = np.append(1.0, self._abar[:-1])
        self._index = {t: i for i, t in enumerate(kept)}

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None,
             rng: np.random.Generator | None = None, *, eta: float = 0.0) -> np.ndarray:
        """x at the previous kept timestep. ``eta > 0`` adds ``sigma * noise`` except at the last step."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")
        try:
            i = self._index[int(timestep)]
        except KeyError:
            raise ValueError(f"timestep {timestep!r} is not in scheduler.timesteps") from None
        c = self._config
        x, out = as_float(sample), as_float(model_output)
        abar, abar_prev = F32(self._abar[i]), F32(self._abar_prev[i])
        recip = F32(np.sqrt(1.0 / self._abar[i]))
        recipm1 = F32(np.sqrt(1.0 / self._abar[i] - 1))
        x0 = recip * x - recipm1 * out if c["prediction_type"] == "epsilon" else out
        if c["clip_sample"]:
            r = c["clip_sample_range"]
            x0 = np.clip(x0, -r, r).astype(x0.dtype)
        eps = (recip * x - x0) / recipm1  # re-derived from (possibly clipped) x0, as DiT does
        sigma = F32(eta) * np.sqrt((F32(1) - abar_prev) / (F32(1) - abar)) * np.sqrt(F32(1) - abar / abar_prev)
        prev = x0 * np.sqrt(abar_prev) + np.sqrt(F32(1) - abar_prev - sigma * sigma) * eps
        if eta > 0 and i > 0:
            prev = prev + sigma * draw_noise(x.shape, noise, rng)
        return prev
