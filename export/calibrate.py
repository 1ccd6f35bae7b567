"""Training-free width profiles for DiTs without DyDiT routers.

Score every attention head and MLP group per timestep bucket, then keep the best units per bucket within a FLOPs
budget. The result has the same form as DyDiT's router masks (per timestep, per block: heads on, groups on), so
profiles, engines and the runtime are shared with routed models.

* Calibration inputs are the latents the model itself visits: a short CFG sampling run with the bundle's
  scheduler from seeded noise, so no dataset is needed.
* A unit's score is the mean norm of what it adds to the residual stream (gate x its slice of proj / fc2 applied
  to its own output), relative to the norm of the stream entering the block — comparable across blocks.
* Selection is a greedy knapsack on score per FLOP (DyDiT's cost model, :class:`UnitFlops`), keeping each block's
  best head and best group (a block never goes empty), until the kept FLOPs reach ``target`` x dense.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from keystep.runtime.schedulers import make_scheduler

from .dit_model import DiT
from keystep.runtime.width import UnitFlops


class _UnitScores:
    """Forward hooks that accumulate per-bucket head/group contribution norms while the model runs."""

    def __init__(self, model: DiT, buckets: int):
        cfg = model.config
        self.sums = np.zeros((buckets, cfg.depth, 2, cfg.num_heads))
        self.count = np.zeros(buckets)
        self.bucket = 0
        self._inputs: dict[int, tuple] = {}
        self._handles = []
        for i, block in enumerate(model.blocks):
            self._handles += [
                block.register_forward_pre_hook(lambda m, args, i=i: self._inputs.__setitem__(i, args[:2])),
                block.proj.register_forward_pre_hook(lambda m, args, i=i, b=block: self._add(i, b, 0, args[0])),
                block.fc2.register_forward_pre_hook(lambda m, args, i=i, b=block: self._add(i, b, 1, args[0])),
            ]

    def _add(self, index: int, block, kind: int, unit_out: torch.Tensor) -> None:
        x, c = self._inputs[index]
        gates = block.ada(F.silu(c)).chunk(6, dim=-1)
        gate = gates[2 if kind == 0 else 5]  # gate_msa / gate_mlp
        weight = block.proj.weight if kind == 0 else block.fc2.weight  # (hidden, units * unit_size)
        units = block.heads
        per_unit = unit_out.unflatten(-1, (units, -1))  # (n, t, units, size)
        contrib = torch.einsum("ntuk,duk->ntud", per_unit, weight.unflatten(1, (units, -1)))
        norm = (contrib * gate[:, None, None, :]).norm(dim=-1).mean(dim=(0, 1))
        self.sums[self.bucket, index, kind] += (norm / x.norm(dim=-1).mean()).numpy()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def calibrate_masks(
    model: DiT,
    target: float,
    scheduler_config: dict,
    images: int = 8,
    steps: int = 50,
    buckets: int = 10,
    guidance: float = 4.0,
    seed: int = 0,
) -> np.ndarray:
    """bool (num_train_timesteps, depth, 2, heads) masks keeping about ``target`` of the blocks' FLOPs."""
    if not 0 < target <= 1:
        raise ValueError(f"calibrated width target must be in (0, 1], got {target}")
    cfg = model.config
    scheduler = make_scheduler(scheduler_config, "ddim")
    train_steps = scheduler.num_train_timesteps
    scheduler.set_timesteps(steps)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((images, cfg.in_channels, cfg.input_size, cfg.input_size), dtype=np.float32)
    labels = torch.as_tensor(np.concatenate([rng.integers(0, cfg.num_classes, images), np.full(images, cfg.num_classes)]))
    scores = _UnitScores(model, buckets)
    try:
        for t in scheduler.timesteps:
            scores.bucket = min(int(t) * buckets // train_steps, buckets - 1)
            scores.count[scores.bucket] += 1
            x = torch.from_numpy(np.concatenate([z, z]))
            out = model(x, torch.full((2 * images,), float(t)), labels)[:, : cfg.in_channels].numpy()
            eps = out[images:] + guidance * (out[:images] - out[images:])
            z = scheduler.step(eps, t, z, rng=rng).astype(np.float32)
    finally:
        scores.remove()
    flops = UnitFlops.of(cfg)
    per_bucket = [_select(s / max(n, 1), flops, target) for s, n in zip(scores.sums, scores.count)]
    # buckets no calibration step landed in borrow the nearest visited bucket's choice
    visited = np.flatnonzero(scores.count)
    table = np.zeros((train_steps, cfg.depth, 2, cfg.num_heads), dtype=bool)
    for t in range(train_steps):
        b = min(t * buckets // train_steps, buckets - 1)
        table[t] = per_bucket[visited[np.argmin(np.abs(visited - b))]]
    return table


def _select(score: np.ndarray, flops: UnitFlops, target: float) -> np.ndarray:
    """Greedy knapsack over (blocks, 2, heads) scores: each block's best head and group, then best score/FLOP."""
    cost = np.empty_like(score)
    cost[:, 0], cost[:, 1] = flops.head, flops.group_per_token * flops.tokens
    keep = np.zeros(score.shape, dtype=bool)
    for b in range(score.shape[0]):
        keep[b, 0, np.argmax(score[b, 0])] = keep[b, 1, np.argmax(score[b, 1])] = True
    budget = target * cost.sum() - cost[keep].sum()
    for flat in np.argsort(-(score / cost), axis=None):
        unit = np.unravel_index(flat, score.shape)
        if not keep[unit] and cost[unit] <= budget:
            keep[unit] = True
            budget -= cost[unit]
    return keep
