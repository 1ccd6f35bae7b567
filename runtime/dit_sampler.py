"""Class-conditional DiT sampling: the plan executor with DiT's stage feeds (timestep + class label per row)."""

from __future__ import annotations

import numpy as np

from .backends.base import Backend
from .bundle import Bundle
from .sampler import PlanSampler, SampleResult, SamplingError, SamplingOptions, row_values, tile_per_half


class DiTSampler(PlanSampler):
    family = "dit"
    cond_first = True  # diffusers' DiTPipeline: [class labels, null labels]

    def __init__(self, bundle: Bundle, backend: Backend):
        super().__init__(bundle, backend)
        cfg = bundle.model_config
        self.num_classes = cfg["num_classes"]
        self.latent_shape = (cfg["in_channels"], cfg["input_size"], cfg["input_size"])

    def noise_shape(self, images: int) -> tuple[int, ...]:
        return (images, *self.latent_shape)  # a DiT makes its one trained size

    def initial_noise(self, images: int, seed: int, generator: np.random.Generator | None = None) -> np.ndarray:
        return self.start_noise(images, None, seed, generator)

    def sample(
        self, class_labels: list[int], options: SamplingOptions, init_noise: np.ndarray | None = None, seed: int = 0,
        generator: np.random.Generator | None = None,
    ) -> SampleResult:
        labels = self._check_labels(class_labels)
        images = len(labels)
        noise = self.start_noise(images, init_noise, seed, generator)
        if options.guidance > 1:  # CFG rows: [class labels, null class]
            labels = np.concatenate([labels, np.full(images, self.num_classes, np.int64)])
        return self.run_plan(noise, options, labels, seed=seed, generator=generator)

    def latent_input_feeds(self, x, t, labels):
        return {"latent": x, "timestep": np.full(len(x), t, np.float32), "class_label": labels}

    def decoder_feeds(self, cache, step_t, images, cfg, labels):
        hidden = cache["hidden"]
        steps = len(step_t)
        return {
            "hidden": tile_per_half(hidden, steps, cfg),
            "timestep": row_values(step_t, images, cfg),
            "class_label": tile_per_half(labels, steps, cfg),
        }

    def prediction(self, outputs):
        # learned sigma: the first half of the channels is epsilon (as diffusers' DiTPipeline uses it)
        return outputs["model_output"][:, : self.latent_shape[0]]

    def _check_labels(self, class_labels: list[int]) -> np.ndarray:
        if not class_labels:
            raise SamplingError("no class labels given")
        bad = [c for c in class_labels if not 0 <= int(c) < self.num_classes]
        if bad:
            raise SamplingError(f"unknown class {bad[0]}: this model has classes 0..{self.num_classes - 1}")
        return np.asarray(class_labels, np.int64)
