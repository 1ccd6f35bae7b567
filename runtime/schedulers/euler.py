"""Euler (k-diffusion "Euler", deterministic s_churn=0) scheduler in numpy, matching diffusers'
``EulerDiscreteScheduler``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import F32, TIMESTEP_SPACINGS, SigmaScheduler, as_float, linspace32, sigma_to_t, spaced_timesteps


class EulerDiscreteScheduler(SigmaScheduler):
    class_name = "EulerDiscreteScheduler"
    defaults = {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "prediction_type": "epsilon", "interpolation_type": "linear",
        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
        "sigma_min": None, "sigma_max": None, "timestep_spacing": "linspace", "timestep_type": "discrete",
        "steps_offset": 0, "rescale_betas_zero_snr": False, "final_sigmas_type": "zero",
    }
    choices = {
        "prediction_type": ("epsilon", "v_prediction", "sample", "original_sample"),
        "interpolation_type": ("linear", "log_linear"),
        "use_beta_sigmas": (False, None),  # needs scipy.stats.beta.ppf
        "timestep_spacing": TIMESTEP_SPACINGS,
        "timestep_type": ("discrete", "continuous"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        sigmas = self._train_sigmas()[::-1]
        self.sigmas = np.concatenate([sigmas, np.zeros(1, F32)]).astype(F32)
        self.timesteps = self._timesteps_for(
            sigmas, np.linspace(0, self.num_train_timesteps - 1, self.num_train_timesteps)[::-1])

    def _timesteps_for(self, sigmas: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        if self._config["timestep_type"] == "continuous" and self._config["prediction_type"] == "v_prediction":
            return (F32(0.25) * np.log(sigmas.astype(F32))).astype(F32)
        return np.asarray(timesteps).astype(F32)

    @property
    def init_noise_sigma(self) -> float:  # type: ignore[override]
        max_sigma = self.sigmas.max()
        if self._config["timestep_spacing"] in ("linspace", "trailing"):
            return float(max_sigma)
        return float(np.sqrt(max_sigma * max_sigma + F32(1.0)))

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self._config
        n = int(num_inference_steps)
        self.num_inference_steps = n
        timesteps = spaced_timesteps(c["timestep_spacing"], self.num_train_timesteps, n, c["steps_offset"],
                                     round_linspace=False).astype(F32)
        train_sigmas = self._train_sigmas()
        log_sigmas = np.log(train_sigmas)
        if c["interpolation_type"] == "linear":
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        else:  # log_linear (diffusers yields n + 1 sigmas here, plus the final one)
            sigmas = np.exp(linspace32(np.log(train_sigmas[-1]), np.log(train_sigmas[0]), n + 1))
        explicit = self._explicit_sigmas(sigmas, n)
        if explicit is not None:
            sigmas = explicit
            timesteps = sigma_to_t(sigmas, log_sigmas)
        sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(F32)
        self.timesteps = self._timesteps_for(sigmas[:-1], timesteps)
        self.sigmas = sigmas
        self._reset_state()

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        """sample / sqrt(sigma^2 + 1) for the current step (initialises step_index like diffusers)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return as_float(sample) / np.sqrt(sigma * sigma + F32(1.0))

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None,
             rng: np.random.Generator | None = None) -> np.ndarray:
        """Deterministic Euler step (s_churn = 0); ``noise``/``rng`` are accepted for interface parity and unused.

        ``timestep`` must be a value of ``self.timesteps`` (floats); integers raise like diffusers, which
        rejects them to catch loop indices passed by mistake."""
        if isinstance(timestep, (int, np.integer)) or np.asarray(timestep).dtype.kind in "iub":
            raise ValueError("pass one of scheduler.timesteps (float) to EulerDiscreteScheduler.step(), "
                             "not an integer index")
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")
        if self._step_index is None:
            self._init_step_index(timestep)
        model_output = as_float(model_output)
        sample = as_float(sample).astype(F32)
        sigma = self.sigmas[self._step_index]
        sigma_hat = sigma  # sigma * (gamma + 1) with gamma = 0
        pt = self._config["prediction_type"]
        if pt in ("sample", "original_sample"):
            pred_x0 = model_output
        elif pt == "epsilon":
            pred_x0 = sample - sigma_hat * model_output
        else:  # v_prediction
            s2 = sigma * sigma + F32(1.0)
            pred_x0 = model_output * (-sigma / np.sqrt(s2)) + (sample / s2)
        derivative = (sample - pred_x0) / sigma_hat
        dt = self.sigmas[self._step_index + 1] - sigma_hat
        prev_sample = (sample + derivative * dt).astype(model_output.dtype)
        self._step_index += 1
        return prev_sample

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        original = as_float(original)
        return original + as_float(noise) * self._noise_sigmas(timesteps, original)
