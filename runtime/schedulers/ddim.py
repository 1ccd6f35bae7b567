"""DDIM scheduler in numpy, numerically matching diffusers' ``DDIMScheduler``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import F32, PREDICTION_TYPES, TIMESTEP_SPACINGS, VPScheduler, as_float, clip_x0, draw_noise, vp_predict


class DDIMScheduler(VPScheduler):
    class_name = "DDIMScheduler"
    defaults = {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
        "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    choices = {"prediction_type": PREDICTION_TYPES, "timestep_spacing": TIMESTEP_SPACINGS}

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.final_alpha_cumprod = F32(1.0) if self._config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def _alpha_prod(self, t: int) -> np.float32:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None,
             rng: np.random.Generator | None = None, *, eta: float = 0.0,
             use_clipped_model_output: bool = False) -> np.ndarray:
        """x_{t-1} from x_t. ``eta > 0`` adds ``std * noise`` (``noise`` given, else drawn from ``rng``)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")
        c = self._config
        model_output, sample = as_float(model_output), as_float(sample)
        t = int(timestep)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self._alpha_prod(prev_t)
        beta_prod_t = F32(1.0) - alpha_prod_t
        pred_x0, pred_eps = vp_predict(c["prediction_type"], model_output, sample, alpha_prod_t)
        pred_x0 = clip_x0(pred_x0, c)

        beta_prod_t_prev = F32(1.0) - alpha_prod_t_prev
        variance = (beta_prod_t_prev / beta_prod_t) * (F32(1.0) - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = F32(eta) * np.sqrt(variance)

        if use_clipped_model_output:
            pred_eps = (sample - np.sqrt(alpha_prod_t) * pred_x0) / np.sqrt(beta_prod_t)

        direction = np.sqrt(F32(1.0) - alpha_prod_t_prev - std_dev_t * std_dev_t) * pred_eps
        prev_sample = np.sqrt(alpha_prod_t_prev) * pred_x0 + direction
        if eta > 0:
            prev_sample = prev_sample + std_dev_t * draw_noise(model_output.shape, noise, rng)
        return prev_sample
