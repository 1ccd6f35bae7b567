"""DDPM (ancestral) scheduler in numpy, numerically matching diffusers' ``DDPMScheduler``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import (BETA_SCHEDULES, F32, PREDICTION_TYPES, TIMESTEP_SPACINGS, VPScheduler, as_float, clip_x0,
                   draw_noise, vp_predict)

# "fixed_large_log" is left out on purpose: diffusers' step() takes sqrt(log(beta)) for it, i.e. NaN.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


class DDPMScheduler(VPScheduler):
    class_name = "DDPMScheduler"
    defaults = {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
        "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0,
        "sample_max_value": 1.0, "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
    }
    choices = {"prediction_type": PREDICTION_TYPES, "timestep_spacing": TIMESTEP_SPACINGS,
               "variance_type": VARIANCE_TYPES}
    beta_schedules = BETA_SCHEDULES + ("sigmoid", "laplace")

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.variance_type = self._config["variance_type"]

    def previous_timestep(self, timestep: int) -> int:
        if not self.num_inference_steps:
            return int(timestep) - 1
        idx = np.flatnonzero(self.timesteps == timestep)
        if idx.size == 0:
            raise ValueError(f"timestep {timestep} is not in scheduler.timesteps")
        i = int(idx[0])
        return -1 if i == len(self.timesteps) - 1 else int(self.timesteps[i + 1])

    def _get_variance(self, t: int, predicted_variance: np.ndarray | None = None) -> Any:
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else F32(1.0)
        current_beta_t = F32(1.0) - alpha_prod_t / alpha_prod_t_prev
        variance = (F32(1.0) - alpha_prod_t_prev) / (F32(1.0) - alpha_prod_t) * current_beta_t
        variance = np.maximum(variance, F32(1e-20))
        vt = self.variance_type
        if vt == "fixed_small":
            return variance
        if vt == "fixed_small_log":
            return np.exp(F32(0.5) * np.log(variance))
        if vt == "fixed_large":
            return current_beta_t
        if predicted_variance is None:
            raise ValueError(f"variance_type={vt!r} needs the model's variance channels: pass model_var=, or a "
                             "model_output with twice the sample's channels")
        if vt == "learned":
            return predicted_variance
        min_log, max_log = np.log(variance), np.log(current_beta_t)  # learned_range
        frac = (predicted_variance + F32(1.0)) / F32(2.0)
        return frac * max_log + (F32(1.0) - frac) * min_log

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None,
             rng: np.random.Generator | None = None, model_var: np.ndarray | None = None) -> np.ndarray:
        """x_{t-1} from x_t. Noise (only used when t > 0) is ``noise`` if given, else drawn from ``rng``.

        ``model_var`` is the model's raw variance channels (learned / learned_range only); like diffusers,
        a model_output with twice the sample's channels is split into (output, variance) instead."""
        c = self._config
        model_output, sample = as_float(model_output), as_float(sample)
        t = int(timestep)
        prev_t = self.previous_timestep(t)

        predicted_variance = None if model_var is None else as_float(model_var)
        if (model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ("learned", "learned_range")):
            model_output, split_var = np.split(model_output, 2, axis=1)
            if predicted_variance is None:
                predicted_variance = split_var

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else F32(1.0)
        beta_prod_t = F32(1.0) - alpha_prod_t
        beta_prod_t_prev = F32(1.0) - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = F32(1.0) - current_alpha_t

        pred_x0 = clip_x0(vp_predict(c["prediction_type"], model_output, sample, alpha_prod_t)[0], c)

        x0_coeff = (np.sqrt(alpha_prod_t_prev) * current_beta_t) / beta_prod_t
        xt_coeff = np.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t
        prev_sample = x0_coeff * pred_x0 + xt_coeff * sample

        if t > 0:
            eps = draw_noise(model_output.shape, noise, rng)
            variance = self._get_variance(t, predicted_variance)
            if self.variance_type == "fixed_small_log":
                prev_sample = prev_sample + variance * eps
            elif self.variance_type == "learned_range":
                prev_sample = prev_sample + np.exp(F32(0.5) * variance) * eps
            else:
                prev_sample = prev_sample + np.sqrt(variance) * eps
        return prev_sample
