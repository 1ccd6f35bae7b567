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

from keystep.runtime.width import WIDTH_STAGES, UnitFlops, WidthEngine

# Steps the default plan does not run a stage at still need an engine (another plan may); they weigh this little.
UNUSED_STEP_WEIGHT = 1e-3


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
