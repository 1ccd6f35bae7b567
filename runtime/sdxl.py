"""SDXL's extra conditioning in the runtime (StableDiffusionXLPipeline semantics, no torch).

The UNet's added embedding takes the second text encoder's pooled projection (``text_embeds``) and six
``time_ids``: the original image size (h, w), the crop's top-left corner (y, x) and the target size (h, w), by
default (height, width), (0, 0) and (height, width). CFG's negative half may have its own sizes
(``negative_original_size`` ...), else it repeats the positive ones. Without a negative prompt an SDXL base model
(``force_zeros_for_empty_prompt``) uses zero embeddings, not the encoded empty string.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Size = tuple[int, int]


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning, as the pipeline's ``original_size`` / ``crops_coords_top_left`` / ``target_size``
    arguments and their ``negative_*`` counterparts (None = the pipeline's default; the request layer,
    :mod:`keystep.runtime.request`, checks the values)."""

    original_size: Size | None = None
    crops_coords_top_left: Size | None = None
    target_size: Size | None = None
    negative_original_size: Size | None = None
    negative_crops_coords_top_left: Size | None = None
    negative_target_size: Size | None = None

    def time_ids(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(positive, negative) time ids, 6 float32 values each."""
        original = self.original_size or (height, width)
        crop = self.crops_coords_top_left or (0, 0)
        target = self.target_size or (height, width)
        positive = np.array([*original, *crop, *target], np.float32)
        # the pipeline uses separate negative ids only when both negative sizes are given
        if self.negative_original_size is not None and self.negative_target_size is not None:
            negative = np.array([*self.negative_original_size, *(self.negative_crops_coords_top_left or (0, 0)),
                                 *self.negative_target_size], np.float32)
        else:
            negative = positive
        return positive, negative
