"""DPM-Solver++ multistep ("DPM++ 2M") scheduler in numpy, matching diffusers'
``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"`` (solver_order 1, 2 or 3)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import (F32, PREDICTION_TYPES, TIMESTEP_SPACINGS, SchedulerConfigError, SigmaScheduler, as_float,
                   sigma_alpha, sigma_to_t, threshold_sample)


class DPMSolverMultistepScheduler(SigmaScheduler):
    class_name = "DPMSolverMultistepScheduler"
    _missing_timestep_is_last = True
    defaults = {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
        "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
        "use_lu_lambdas": False, "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"), "variance_type": None, "timestep_spacing": "linspace",
        "steps_offset": 0, "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    # flow_shift / use_dynamic_shifting / time_shift_type only act with use_flow_sigmas or set_timesteps(mu=...),
    # neither of which is implemented, so any value is accepted and has no effect (as in diffusers).
    choices = {
        "solver_order": (1, 2, 3),
        "prediction_type": PREDICTION_TYPES,
        "algorithm_type": ("dpmsolver++", "deis"),  # diffusers maps "deis" to "dpmsolver++"
        "solver_type": ("midpoint", "heun", "logrho", "bh1", "bh2"),  # the last three map to "midpoint"
        "use_beta_sigmas": (False,),  # needs scipy.stats.beta.ppf
        "use_flow_sigmas": (False,),
        "final_sigmas_type": ("zero", "sigma_min"),
        "timestep_spacing": TIMESTEP_SPACINGS,
    }

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        c = self._config
        if c["algorithm_type"] == "deis":
            if c["final_sigmas_type"] == "zero":  # diffusers rejects this combination too
                raise SchedulerConfigError(
                    f"{self.class_name}: final_sigmas_type='zero' is not supported with algorithm_type='deis'; "
                    "use 'sigma_min'", field="final_sigmas_type", value="zero")
            self._set(algorithm_type="dpmsolver++")
        if c["solver_type"] in ("logrho", "bh1", "bh2"):
            self._set(solver_type="midpoint")
        self.alpha_t = np.sqrt(self.alphas_cumprod)
        self.sigma_t = np.sqrt(F32(1.0) - self.alphas_cumprod)
        self.lambda_t = np.log(self.alpha_t) - np.log(self.sigma_t)
        self.sigmas = self._train_sigmas()
        T = self.num_train_timesteps
        self.timesteps = np.linspace(0, T - 1, T)[::-1].astype(F32)
        self._reset_state()

    def _reset_state(self) -> None:
        super()._reset_state()
        self.model_outputs: list[np.ndarray | None] = [None] * int(self._config["solver_order"])
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self._config
        n, T = int(num_inference_steps), self.num_train_timesteps
        clipped_idx = int(np.searchsorted(self.lambda_t[::-1], F32(c["lambda_min_clipped"]), side="left"))
        last = T - clipped_idx
        if c["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif c["timestep_spacing"] == "leading":
            ratio = last // (n + 1)
            timesteps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + int(c["steps_offset"])
        else:  # trailing
            timesteps = np.arange(last, 0, -T / n).round().astype(np.int64) - 1

        train_sigmas = self._train_sigmas()
        log_sigmas = np.log(train_sigmas)
        round_t = c["beta_schedule"] != "squaredcos_cap_v2"
        # diffusers' precedence: karras, then lu lambdas, then exponential; only karras/lu round the timesteps.
        if c["use_lu_lambdas"] and not c["use_karras_sigmas"]:
            lo, hi = float(log_sigmas[0]), float(log_sigmas[-1])
            sigmas = np.exp(hi + np.linspace(0, 1, n) * (lo - hi))
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if round_t:
                timesteps = timesteps.round()
        elif (explicit := self._explicit_sigmas(train_sigmas[::-1], n)) is not None:
            sigmas = explicit
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if c["use_karras_sigmas"] and round_t:
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        self.sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(F32)
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self._reset_state()

    def _asl(self, i: int) -> tuple[np.float32, np.float32, np.float32]:
        """(alpha_t, sigma_t, lambda_t) at sigma table index i (lambda = +inf for sigma = 0)."""
        alpha, sigma = sigma_alpha(self.sigmas[i])
        with np.errstate(divide="ignore"):
            return alpha, sigma, np.log(alpha) - np.log(sigma)

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """Model output -> predicted x0 (data prediction, as dpmsolver++ needs)."""
        c = self._config
        pt = c["prediction_type"]
        if pt == "sample":
            x0 = model_output
        else:
            alpha_t, sigma_t = sigma_alpha(self.sigmas[self._step_index])
            if pt == "epsilon":
                if c["variance_type"] in ("learned", "learned_range"):
                    model_output = model_output[:, :3]  # diffusers assumes 3 (RGB) eps channels here
                    if model_output.shape[1] != sample.shape[1]:
                        raise ValueError(
                            f"variance_type={c['variance_type']!r} makes DPMSolverMultistepScheduler keep only "
                            f"model_output[:, :3] (as diffusers does), which does not fit a sample with "
                            f"{sample.shape[1]} channels; drop variance_type from the config")
                x0 = (sample - sigma_t * model_output) / alpha_t
            else:  # v_prediction
                x0 = alpha_t * sample - sigma_t * model_output
        if c["thresholding"]:
            x0 = threshold_sample(x0, c["dynamic_thresholding_ratio"], c["sample_max_value"])
        return x0

    def _first_order(self, m0: np.ndarray, sample: np.ndarray) -> np.ndarray:
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._asl(i + 1)
        _, sigma_s, lambda_s = self._asl(i)
        h = lambda_t - lambda_s
        return (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - F32(1.0))) * m0

    def _second_order(self, sample: np.ndarray) -> np.ndarray:
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._asl(i + 1)
        _, sigma_s0, lambda_s0 = self._asl(i)
        _, _, lambda_s1 = self._asl(i - 1)
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (F32(1.0) / r0) * (m0 - m1)
        em1 = np.exp(-h) - F32(1.0)
        if self._config["solver_type"] == "midpoint":
            return (sigma_t / sigma_s0) * sample - (alpha_t * em1) * D0 - (F32(0.5) * (alpha_t * em1)) * D1
        return (sigma_t / sigma_s0) * sample - (alpha_t * em1) * D0 + (alpha_t * (em1 / h + F32(1.0))) * D1

    def _third_order(self, sample: np.ndarray) -> np.ndarray:
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._asl(i + 1)
        _, sigma_s0, lambda_s0 = self._asl(i)
        _, _, lambda_s1 = self._asl(i - 1)
        _, _, lambda_s2 = self._asl(i - 2)
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D1_0, D1_1 = (F32(1.0) / r0) * (m0 - m1), (F32(1.0) / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (F32(1.0) / (r0 + r1)) * (D1_0 - D1_1)
        em1 = np.exp(-h) - F32(1.0)
        return ((sigma_t / sigma_s0) * sample - (alpha_t * em1) * m0 + (alpha_t * (em1 / h + F32(1.0))) * D1
                - (alpha_t * ((em1 + h) / (h * h) - F32(0.5))) * D2)

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None,
             rng: np.random.Generator | None = None) -> np.ndarray:
        """One multistep update; keeps the last ``solver_order`` x0 predictions. ``noise``/``rng`` are
        accepted for interface parity and unused (dpmsolver++ is deterministic)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")
        c = self._config
        if self._step_index is None:
            self._init_step_index(timestep)
        n_ts = len(self.timesteps)
        lower_order_final = self._step_index == n_ts - 1 and (
            c["euler_at_final"] or (c["lower_order_final"] and n_ts < 15) or c["final_sigmas_type"] == "zero")
        lower_order_second = self._step_index == n_ts - 2 and c["lower_order_final"] and n_ts < 15

        model_output = self.convert_model_output(as_float(model_output), as_float(sample))
        self.model_outputs = self.model_outputs[1:] + [model_output]
        sample = as_float(sample).astype(F32)

        order = int(c["solver_order"])
        if order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self._first_order(model_output, sample)
        elif order == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev_sample = self._second_order(sample)
        else:
            prev_sample = self._third_order(sample)
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        self._step_index += 1
        return prev_sample.astype(model_output.dtype)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        original = as_float(original)
        alpha_t, sigma_t = sigma_alpha(self._noise_sigmas(timesteps, original))
        return alpha_t * original + sigma_t * as_float(noise)
