"""Block caching for DiTs (the Δ-DiT / FORA family) as two static stages.

At a full step the whole DiT runs and the residual of a contiguous range of middle blocks, (output − input of
blocks[start:stop]), is cached; at a cached step those blocks are skipped and the cached residual is added to the
hidden tokens instead. The first and last blocks always run (they carry most of the step's conditioning), so
``1 <= start < stop <= depth - 1``. The full stage returns one residual per range (``cache_blocks<a>-<b>``,
blocks a..b inclusive) next to the prediction; each range gets its own cached-step stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .dit_model import DiT
from .errors import ModelLoadError


@dataclass(frozen=True)
class BlockRange:
    start: int  # first skipped block
    stop: int  # one past the last skipped block

    @property
    def name(self) -> str:
        return f"blocks{self.start}-{self.stop - 1}"

    @classmethod
    def parse(cls, text: str) -> "BlockRange":
        """``a-b``: blocks a..b inclusive."""
        try:
            a, b = (int(v) for v in text.split("-"))
        except ValueError:
            raise ModelLoadError(f"bad block range {text!r}: use FIRST-LAST, e.g. 2-9") from None
        return cls(a, b + 1)

    def check(self, depth: int) -> None:
        if not 1 <= self.start < self.stop <= depth - 1:
            raise ModelLoadError(
                f"block range {self.start}-{self.stop - 1} must lie within 1..{depth - 2}: the first and last of the "
                f"{depth} blocks always run")


class DiTCachingFullStage(nn.Module):
    """The whole DiT, also returning each range's residual: (latent, timestep, class_label) ->
    (model_output, cache_blocks<a>-<b>, ...)."""

    def __init__(self, model: DiT, ranges: list[BlockRange]):
        super().__init__()
        self.model, self.ranges = model, ranges

    def forward(self, latent, timestep, class_label):
        c = self.model.condition(timestep, class_label)
        x = self.model.embed(latent)
        states = [x]  # the hidden tokens after every block
        for i in range(self.model.config.depth):
            x, _ = self.model.run_blocks(x, c, i, i + 1)
            states.append(x)
        residuals = [states[r.stop] - states[r.start] for r in self.ranges]
        return (self.model.head(x, c), *residuals)


class DiTBlockSkipStage(nn.Module):
    """A cached step: (latent, timestep, class_label, cache_blocks<a>-<b>) -> model_output, blocks a..b replaced by
    the cached residual."""

    def __init__(self, model: DiT, skipped: BlockRange):
        super().__init__()
        self.model, self.skipped = model, skipped

    def forward(self, latent, timestep, class_label, residual):
        c = self.model.condition(timestep, class_label)
        x, _ = self.model.run_blocks(self.model.embed(latent), c, 0, self.skipped.start)
        x, _ = self.model.run_blocks(x + residual, c, self.skipped.stop, self.model.config.depth)
        return self.model.head(x, c)
