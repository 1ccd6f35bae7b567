"""Compile per-step width masks into a small set of engines (width profiles) per stage.

Steps whose masks over a stage's blocks are identical share one physically narrowed engine. When there are more
distinct masks than ``max_profiles``, profiles are merged greedily: an engine built on the union of its members'
units, with mask inputs so every member step stays exact. Each merge picks the pair that adds the fewest FLOPs over
the calls the bundle's default plan makes (the encoder runs at key steps only, so merging encoder profiles that
serve non-key steps is nearly free).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keystep.runtime.width import WIDTH_STAGES, WidthEngine

from .dit_model import DiTConfig

# Steps the default plan does not run a stage at still need an engine (another plan may); they weigh this little.
UNUSED_STEP_WEIGHT = 1e-3


@dataclass(frozen=True)
class UnitFlops:
    """DyDiT's cost model, per image: a block's attention costs ``head`` per active head, its MLP ``group`` per
    active group and token (in FLOPs = 2 x MACs; embeddings, adaLN and the final layer are not counted)."""

    head: int
    group_per_token: int
    tokens: int

    @classmethod
    def of(cls, cfg: DiTConfig) -> "UnitFlops":
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

    def dense(self, cfg: DiTConfig) -> int:
        return int(cfg.depth * cfg.num_heads * (self.head + self.group_per_token * self.tokens))


@dataclass
class _Profile:
    units: np.ndarray  # bool (blocks, 2, heads)
    members: int  # distinct masks merged into it
    weight: float  # calls in the default plan

    def cost(self, flops: UnitFlops) -> float:
        return self.weight * float(flops.of_masks(self.units))


def merge_profiles(masks: np.ndarray, weights: np.ndarray, max_profiles: int, flops: UnitFlops) -> list[_Profile]:
    """Distinct masks (steps, blocks, 2, heads) -> at most ``max_profiles`` profiles, greedily by added FLOPs."""
    distinct: dict[bytes, _Profile] = {}
    for mask, weight in zip(masks, weights):
        entry = distinct.setdefault(mask.tobytes(), _Profile(mask.copy(), 1, 0.0))
        entry.weight += float(weight)
    profiles = list(distinct.values())
    while len(profiles) > max_profiles:
        best = None
        for i in range(len(profiles)):
            for j in range(i + 1, len(profiles)):
                a, b = profiles[i], profiles[j]
                union = _Profile(a.units | b.units, a.members + b.members, a.weight + b.weight)
                added = union.cost(flops) - a.cost(flops) - b.cost(flops)
                if best is None or added < best[0]:
                    best = (added, i, j, union)
        _, i, j, union = best
        profiles = [p for k, p in enumerate(profiles) if k not in (i, j)] + [union]
    return profiles


def width_engines(
    step_masks: np.ndarray, key_steps: list[int], split: int, max_profiles: int, flops: UnitFlops
) -> list[WidthEngine]:
    """The engines of both stages for a schedule's step masks (steps, depth, 2, heads)."""
    steps = len(step_masks)
    is_key = np.isin(np.arange(steps), key_steps)
    weights = {"encoder": np.where(is_key, 1.0, UNUSED_STEP_WEIGHT), "decoder": np.ones(steps)}
    blocks = {"encoder": slice(0, split), "decoder": slice(split, step_masks.shape[1])}
    engines = []
    for stage in WIDTH_STAGES:
        profiles = merge_profiles(step_masks[:, blocks[stage]], weights[stage], max_profiles, flops)
        profiles.sort(key=lambda p: -p.weight)  # w0 = the most used
        engines += [WidthEngine(f"{stage}.w{i}", stage, p.units, p.members > 1) for i, p in enumerate(profiles)]
    return engines
