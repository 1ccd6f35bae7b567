"""Training timestep samplers: uniform, SpeeDiT (asymmetric + dual sampling, P2 loss weights) and SpeeD.

Both SpeeD variants start from the same observation: d sqrt(1 - ᾱ_t)/dt is nearly 0 late in the forward process
(t ≥ ``meaningful_steps``, the "convergence area"), where the noisy image is almost pure noise, so those steps teach
little. Each sampler returns timesteps and per-sample loss weights (multiplying the per-sample MSE).
"""

from __future__ import annotations

import numpy as np

SAMPLERS = ("uniform", "speedit", "speed")


def linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    return np.cumprod(1.0 - np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64))


class TimestepSampler:
    def __init__(self, kind: str, alphas_cumprod: np.ndarray, speed_tau: int = 700, speed_k: float = 5.0,
                 speed_lambda: float = 0.6):
        if kind not in SAMPLERS:
            raise ValueError(f"unknown timestep sampler {kind!r}; known: {', '.join(SAMPLERS)}")
        self.kind = kind
        self.num_steps = len(alphas_cumprod)
        grad = np.gradient(np.sqrt(1.0 - alphas_cumprod))
        # SpeeDiT (master branch): first t whose slope drops below 1e-4; p = tanh step, ~5:1 before/after it
        self.meaningful_steps = int(np.argmax(grad < 1e-4) + 1)
        p = np.tanh(1e6 * (grad - 1e-4)) + 1.5
        self.speedit_p = p / p.sum()
        self.speedit_weights = 1.0 - alphas_cumprod  # 1 / (1 + SNR) (P2 weighting, k = γ = 1)
        # SpeeD (the authors' newer Speed_IDDPM): sampling weight k below tau, 1 above; loss weight = the normalised
        # gradient of (1 - ᾱ) mapped to [1 - λ, λ] below tau, 1 above
        t = np.arange(self.num_steps)
        speed_p = np.where(t < speed_tau, speed_k, 1.0)
        self.speed_p = speed_p / speed_p.sum()
        g = np.gradient(1.0 - alphas_cumprod)
        g = (g - g.min()) / (g.max() - g.min())
        self.speed_weights = np.where(t < speed_tau, (1 - speed_lambda) + g * (2 * speed_lambda - 1), 1.0)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """-> (timesteps int64 (n,), loss weights float32 (n,))."""
        if self.kind == "uniform":
            return rng.integers(0, self.num_steps, n), np.ones(n, np.float32)
        if self.kind == "speedit":
            t = rng.choice(self.num_steps, n // 2 + 1, p=self.speedit_p)
            ms = self.meaningful_steps
            dual = np.where(t < ms, ms - t, t - ms)  # each draw's mirror around meaningful_steps
            t = np.concatenate([t, dual])[:n]
            return t, self.speedit_weights[t].astype(np.float32)
        t = rng.choice(self.num_steps, n, p=self.speed_p)
        return t, self.speed_weights[t].astype(np.float32)
