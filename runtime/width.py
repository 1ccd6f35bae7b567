"""Width profiles at run time: which compiled engine serves each step, and the mask rows of merged engines.

A width bundle stores the per-timestep masks (``width/masks.npy``: bool (num_train_timesteps, depth, 2, heads);
``[..., 0, :]`` attention heads, ``[..., 1, :]`` MLP groups) and, per stage, a list of engines, each built on a set
of kept units. An engine *without* a mask input computes exactly its kept units, so it serves the steps whose mask
equals them; an engine *with* mask inputs (a merged profile) serves any step whose mask it covers, the mask zeroing
the rest. Steps of a schedule the bundle was not built for use the same rule; a step no engine covers is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .plan import PlanError

WIDTH_STAGES = ("encoder", "decoder")


@dataclass(frozen=True)
class UnitFlops:
    """DyDiT's cost model, per image: a block's attention costs ``head`` per active head, its MLP ``group`` per
    active group and token (in FLOPs = 2 x MACs; embeddings, adaLN and the final layer are not counted)."""

    head: int
    group_per_token: int
    tokens: int

    @classmethod
    def of(cls, cfg) -> "UnitFlops":
        """From a DiTConfig (or anything with its fields)."""
        t, d, h = cfg.num_tokens, cfg.hidden_size, cfg.num_heads
        hd, gs = d // h, cfg.mlp_hidden // h
        # qkv (T·D·3hd) + scores (T·T·hd) + attn·v (T·T·hd) + proj (T·hd·D), per head
        head = 2 * (t * d * 3 * hd + 2 * t * t * hd + t * hd * d)
        return cls(head=head, group_per_token=2 * 2 * d * gs, tokens=t)

    def of_masks(self, masks: np.ndarray, token_fraction: float | np.ndarray = 1.0) -> np.ndarray:
        """FLOPs of (..., blocks, 2, heads) masks summed over blocks; ``token_fraction`` per block or scalar."""
        heads = masks[..., 0, :].sum(-1)
        groups = masks[..., 1, :].sum(-1)
        return (heads * self.head + groups * self.group_per_token * self.tokens * token_fraction).sum(-1)

    def dense(self, depth: int, heads: int) -> int:
        return int(depth * heads * (self.head + self.group_per_token * self.tokens))

    def to_manifest(self) -> dict:
        return {"head": self.head, "group_per_token": self.group_per_token, "tokens": self.tokens}


@dataclass(frozen=True)
class WidthEngine:
    name: str  # the bundle stage name, e.g. "decoder.w2"
    stage: str  # "encoder" | "decoder"
    units: np.ndarray  # bool (stage blocks, 2, heads): kept heads / MLP groups per block
    masked: bool  # has head_mask/group_mask inputs

    def serves(self, mask: np.ndarray) -> bool:
        return bool(np.array_equal(mask, self.units)) if not self.masked else not np.any(mask & ~self.units)

    def mask_rows(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The head_mask / group_mask input row for a step with ``mask``: each block's kept units in order."""
        heads = np.concatenate([m[0][u[0]] for m, u in zip(mask, self.units)]).astype(np.float32)
        groups = np.concatenate([m[1][u[1]] for m, u in zip(mask, self.units)]).astype(np.float32)
        return heads, groups

    @classmethod
    def from_manifest(cls, entry: dict, heads: int) -> "WidthEngine":
        units = np.zeros((len(entry["heads"]), 2, heads), dtype=bool)
        for b, (kept_heads, kept_groups) in enumerate(zip(entry["heads"], entry["groups"])):
            units[b, 0, kept_heads] = True
            units[b, 1, kept_groups] = True
        return cls(entry["name"], entry["stage"], units, bool(entry["masked"]))

    def to_manifest(self) -> dict:
        return {
            "name": self.name,
            "stage": self.stage,
            "masked": self.masked,
            "heads": [np.flatnonzero(u[0]).tolist() for u in self.units],
            "groups": [np.flatnonzero(u[1]).tolist() for u in self.units],
        }


class WidthTable:
    """The masks of every training timestep and the engines that implement them."""

    def __init__(self, masks: np.ndarray, split: int, engines: list[WidthEngine], flops: dict[str, int]):
        self.masks = masks
        self.split = split
        self.engines = engines
        self.flops = flops  # engine name -> FLOPs per image (picks the cheapest covering engine)
        self.by_name = {e.name: e for e in engines}

    def blocks(self, stage: str) -> slice:
        return slice(0, self.split) if stage == "encoder" else slice(self.split, self.masks.shape[1])

    def step_masks(self, timesteps: np.ndarray) -> np.ndarray:
        """(steps, depth, 2, heads). The table is indexed by integer timestep; fractional ones (Karras-style
        schedulers) take the nearest, an approximation only where a router logit changes sign in between."""
        index = np.clip(np.rint(np.asarray(timesteps, dtype=np.float64)).astype(int), 0, len(self.masks) - 1)
        return self.masks[index]

    def engine_for(self, stage: str, mask: np.ndarray) -> WidthEngine:
        """The engine of ``stage`` for one step's full-model ``mask``: an exact narrowed engine if there is one,
        else the cheapest merged engine that covers it."""
        part = mask[self.blocks(stage)]
        candidates = [e for e in self.engines if e.stage == stage and e.serves(part)]
        if not candidates:
            raise PlanError(
                f"no {stage} engine of this bundle covers the width mask of this step (heads/groups on per block: "
                f"{[(int(b[0].sum()), int(b[1].sum())) for b in part]}); rebuild the bundle with this step count "
                f"and scheduler (--steps/--scheduler) or a smaller --max-profiles")
        return min(candidates, key=lambda e: (e.masked, self.flops.get(e.name, 0)))

    def assign(self, timesteps: np.ndarray) -> dict[str, list[WidthEngine]]:
        masks = self.step_masks(timesteps)
        return {stage: [self.engine_for(stage, m) for m in masks] for stage in WIDTH_STAGES}
