"""PNDM scheduler in numpy, numerically matching diffusers' ``PNDMScheduler``.

The default scheduler of Stable Diffusion 1.x (there with ``skip_prk_steps=True``: linear multistep (PLMS)
only). With ``skip_prk_steps=False`` the first three inference steps are Runge-Kutta (PRK) warm-up steps, each
taking four model evaluations, as in diffusers.

Like diffusers, ``timesteps`` repeats entries: with PLMS only the second timestep appears twice (the second model
call at it redoes the first step with the averaged model output, a Heun-like warm-up); with PRK the mid-points of the
last four schedule intervals appear twice. Call ``step`` once per entry of ``timesteps``, in order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import F32, TIMESTEP_SPACINGS, VPScheduler, as_float, spaced_timesteps

PNDM_PREDICTION_TYPES = ("epsilon", "v_prediction")


class PNDMScheduler(VPScheduler):
    class_name = "PNDMScheduler"
    defaults = {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "skip_prk_steps": False, "set_alpha_to_one": False, "prediction_type": "epsilon",
        "timestep_spacing": "leading", "steps_offset": 0,
    }
    choices = {"prediction_type": PNDM_PREDICTION_TYPES, "timestep_spacing": TIMESTEP_SPACINGS}

    pndm_order = 4

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.final_alpha_cumprod = F32(1.0) if self._config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.prk_timesteps: np.ndarray | None = None
        self.plms_timesteps: np.ndarray | None = None
        self._reset_state()

    # ------------------------------------------------------------------------------------------- state

    def _reset_state(self) -> None:
        self.ets: list[np.ndarray] = []  # past model outputs of the multistep formula
        self.counter = 0  # number of step() calls since set_timesteps
        self.cur_model_output: Any = 0  # running Runge-Kutta sum
        self.cur_sample: np.ndarray | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Build ``timesteps`` (int64, with PNDM's repeats) and reset all multistep / Runge-Kutta state."""
        n, T = int(num_inference_steps), self.num_train_timesteps
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if n > T:
            raise ValueError(f"num_inference_steps={n} > num_train_timesteps={T}")
        skip_prk = bool(self._config["skip_prk_steps"])
        if not skip_prk and n < self.pndm_order:
            # diffusers fails here too (a numpy broadcast error in set_timesteps)
            raise ValueError(f"skip_prk_steps=False needs num_inference_steps >= {self.pndm_order}, got {n}")
        self.num_inference_steps = n
        ts = spaced_timesteps(self._config["timestep_spacing"], T, n, self._config["steps_offset"])
        ts = ts[::-1].astype(np.int64)  # ascending, as diffusers' private `_timesteps`

        if skip_prk:
            self.prk_timesteps = np.array([], dtype=np.int64)
            # second timestep repeated: [t_{n-1}, t_{n-2}, t_{n-2}, t_{n-3}, ..., t_0]
            self.plms_timesteps = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
        else:
            half = T // n // 2
            prk = ts[-self.pndm_order:].repeat(2) + np.tile(np.array([0, half]), self.pndm_order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = ts[:-3][::-1].copy()
        self.timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._reset_state()

    # ------------------------------------------------------------------------------------------- stepping

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None,
             rng: np.random.Generator | None = None) -> np.ndarray:
        """Next sample. Deterministic: ``noise`` / ``rng`` are accepted for interface parity and ignored."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")
        model_output, sample = as_float(model_output), as_float(sample)
        if self.counter < len(self.prk_timesteps) and not self._config["skip_prk_steps"]:
            return self.step_prk(model_output, timestep, sample)
        return self.step_plms(model_output, timestep, sample)

    def step_prk(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """One of the four Runge-Kutta evaluations of a warm-up step (diffusers ``step_prk``)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")
        model_output, sample = as_float(model_output), as_float(sample)
        diff_to_prev = 0 if self.counter % 2 else self.num_train_timesteps // self.num_inference_steps // 2
        prev_t = int(timestep) - diff_to_prev
        t = int(self.prk_timesteps[self.counter // 4 * 4])

        phase = self.counter % 4
        if phase == 0:
            self.cur_model_output = self.cur_model_output + F32(1 / 6) * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif phase in (1, 2):
            self.cur_model_output = self.cur_model_output + F32(1 / 3) * model_output
        else:
            model_output = self.cur_model_output + F32(1 / 6) * model_output
            self.cur_model_output = 0

        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._get_prev_sample(cur_sample, t, prev_t, model_output)
        self.counter += 1
        return prev_sample

    def step_plms(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """A linear multistep step (diffusers ``step_plms``), order ramping 1 -> 4 when PRK is skipped."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")
        if not self._config["skip_prk_steps"] and len(self.ets) < 3:
            raise ValueError("PNDMScheduler with skip_prk_steps=False can only run PLMS steps after the "
                             "12 Runge-Kutta warm-up steps")
        model_output, sample = as_float(model_output), as_float(sample)
        stride = self.num_train_timesteps // self.num_inference_steps
        t = int(timestep)
        prev_t = t - stride

        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:  # second call: redo the first step from the stored sample with the averaged output
            prev_t = t
            t = t + stride

        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / F32(2)
            sample = self.cur_sample
            self.cur_sample = None
        elif len(ets) == 2:
            model_output = (F32(3) * ets[-1] - ets[-2]) / F32(2)
        elif len(ets) == 3:
            model_output = (F32(23) * ets[-1] - F32(16) * ets[-2] + F32(5) * ets[-3]) / F32(12)
        else:
            model_output = F32(1 / 24) * (F32(55) * ets[-1] - F32(59) * ets[-2] + F32(37) * ets[-3]
                                          - F32(9) * ets[-4])

        prev_sample = self._get_prev_sample(sample, t, prev_t, model_output)
        self.counter += 1
        return prev_sample

    def _get_prev_sample(self, sample: np.ndarray, t: int, prev_t: int, model_output: np.ndarray) -> np.ndarray:
        """x_{t-delta} from x_t, formula (9) of the PNDM paper (arXiv 2202.09778)."""
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = F32(1.0) - alpha_prod_t
        beta_prod_t_prev = F32(1.0) - alpha_prod_t_prev

        if self._config["prediction_type"] == "v_prediction":  # v -> eps
            model_output = np.sqrt(alpha_prod_t) * model_output + np.sqrt(beta_prod_t) * sample

        sample_coeff = np.sqrt(alpha_prod_t_prev / alpha_prod_t)
        denom = alpha_prod_t * np.sqrt(beta_prod_t_prev) + np.sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev)
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / denom
