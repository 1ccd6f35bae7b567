"""Static execution plans: which stage runs at which step, at which batch — computed before sampling starts.

Step indices run 0..N-1 in sampling order (0 = noisiest). A *group* is a key step and the non-key steps after it.
The plan is a list of :class:`StageCall`; the executor walks it, ``inspect`` prints it, ``profile`` attributes time
to it, and GPU backends derive their optimisation profiles and CUDA-graph keys from the distinct call shapes.

Decoder batch layout (one call covering steps s_0..s_{S-1} of a group, B images, CFG on)::

    rows [0, S*B)      conditional half:   step s_0 images 0..B-1, step s_1 images 0..B-1, ...
    rows [S*B, 2*S*B)  unconditional half: the same order, class label = the null class

Every per-row input (cached hidden tokens, timestep, class label) is tiled with this one layout, per CFG half
(the DiT reference code tiles the label embedding whole-batch and so swaps cond/uncond labels at odd sub-steps).
A call split by ``max_decoder_batch`` keeps the same layout over its subset of steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import KeystepError


class PlanError(KeystepError, ValueError):
    """A plan that does not fit the step count or is otherwise malformed."""


def dit_default_key_steps(num_steps: int) -> list[int]:
    """DiT-FasterDiffusion's rule: key if i == 0, i >= 0.92 N, or i mod 10 >= 6 (its 250-step list)."""
    return [i for i in range(num_steps) if i == 0 or i >= 0.92 * num_steps or i % 10 >= 6]


def unet_default_key_steps(num_steps: int) -> list[int]:
    """FasterDiffusion's hand-picked 50-step list for UNets, cut to the step count."""
    return [i for i in (0, 1, 2, 3, 5, 10, 15, 25, 35) if i < num_steps]


def if_default_key_steps(num_steps: int) -> list[int]:
    """FasterDiffusion's DeepFloyd-IF stage-I rule (its release's ``100ls``: key if i < 10, i > 85 or i mod 5 == 0 of
    100 steps), relative to the step count. Its release runs IF's super-resolution stage without propagation (every
    step key): keystep builds that stage with the baseline as its default plan."""
    return [i for i in range(num_steps) if i < 0.1 * num_steps or i > 0.85 * num_steps or i % 5 == 0]


DEFAULT_KEY_STEPS = {"dit": dit_default_key_steps, "unet": unet_default_key_steps, "if": if_default_key_steps}
DEFAULT_KEY_STEPS["unet3d"] = unet_default_key_steps  # FasterDiffusion applies the SD list to video UNets too


@dataclass(frozen=True)
class KeyStepPlan:
    num_steps: int
    key_steps: tuple[int, ...]  # sorted, always contains 0
    baseline: bool = False  # run the full model at every step instead of encoder/decoder stages
    spec: str = ""  # how the user asked for it, for inspect

    @property
    def groups(self) -> list[tuple[int, ...]]:
        bounds = list(self.key_steps) + [self.num_steps]
        return [tuple(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def parse_key_steps(spec: str | list[int] | None, num_steps: int, family: str = "dit") -> KeyStepPlan:
    """``all`` (baseline), ``default``, ``uniform:M`` or an explicit list ``0,1,2,5`` of step indices."""
    if num_steps < 1:
        raise PlanError(f"the number of steps must be at least 1, got {num_steps}")
    if spec is None or spec == "default":
        return KeyStepPlan(num_steps, tuple(DEFAULT_KEY_STEPS[family](num_steps)), spec="default")
    if isinstance(spec, str):
        text = spec.strip()
        if text in ("all", "baseline"):
            return KeyStepPlan(num_steps, tuple(range(num_steps)), baseline=True, spec="all")
        if text.startswith("uniform:"):
            try:
                every = int(text.split(":", 1)[1])
            except ValueError:
                raise PlanError(f"bad key-step spec {spec!r}: uniform:M needs an integer M") from None
            if every < 1:
                raise PlanError(f"bad key-step spec {spec!r}: M must be >= 1")
            return KeyStepPlan(num_steps, tuple(range(0, num_steps, every)), spec=text)
        try:
            steps = [int(s) for s in text.replace(" ", "").split(",") if s]
        except ValueError:
            raise PlanError(
                f"bad key-step spec {spec!r}: use 'all', 'default', 'uniform:M' or a list like 0,1,2,5"
            ) from None
    else:
        steps = [int(s) for s in spec]
    if not steps:
        raise PlanError("the key-step list is empty; step 0 must be a key step")
    if len(set(steps)) != len(steps):
        raise PlanError(f"key steps {steps} contain duplicates")
    out_of_range = [s for s in steps if not 0 <= s < num_steps]
    if out_of_range:
        raise PlanError(f"key steps {out_of_range} are out of range for {num_steps} steps (valid: 0..{num_steps - 1})")
    if 0 not in steps:
        raise PlanError("step 0 must be a key step (the encoder has no features to reuse before it)")
    return KeyStepPlan(num_steps, tuple(sorted(steps)), spec=",".join(map(str, sorted(steps))))


@dataclass(frozen=True)
class CachePlan:
    """Feature caching from step ``start`` on (DeepCache for UNets, block caching for DiTs): the ``full`` stage runs
    at ``full_steps`` and refreshes the cache, every other step runs the variant's ``cached`` stage on it. Steps
    before ``start`` follow the key-step plan (encoder propagation early, caching late)."""

    variant: str  # the bundle's cache variant, e.g. "deep0" or "blocks2-9"
    full_steps: tuple[int, ...]  # sorted, always contains ``start``
    start: int = 0
    spec: str = ""

    @property
    def engine(self) -> str:
        return f"cached.{self.variant}"


def quad_center_steps(total: int, count: int, center: int, power: float) -> list[int]:
    """DeepCache's non-uniform schedule (``sample_from_quad_center`` of its research pipelines): ``count`` full
    steps, dense around ``center``. It raises a negative base to 1/power with Python's complex semantics and keeps
    the real part; this does the same so the lists agree."""
    while power > 1:
        x = np.linspace(complex(-center) ** (1 / power), complex(total - center) ** (1 / power), count + 1)
        indices = [0] + [int(v) + center for v in np.unique(np.int32((x**power).real))[1:-1]]
        if len(indices) == count:
            return indices
        power -= 0.02
    raise PlanError(f"no quad schedule of {count} full steps in {total} around step {center}: lower the interval")


def _cache_schedule(text: str, num_steps: int, start: int) -> tuple[int, ...]:
    kind, _, rest = text.partition(":")
    span = num_steps - start
    try:
        if kind in ("uniform", "quad"):
            every, *extra = rest.split(":")
            every = int(every)
            if every < 1:
                raise ValueError
        if kind == "uniform":
            return tuple(range(start, num_steps, every))
        if kind == "quad":
            center = int(extra[0]) if extra else round(0.3 * span)
            power = float(extra[1]) if len(extra) > 1 else 1.4
            return tuple(sorted(start + i for i in quad_center_steps(span, math.ceil(span / every), center, power)))
        steps = tuple(sorted(int(s) for s in text.split(",") if s))
    except ValueError:
        raise PlanError(f"bad cache schedule {text!r}: use uniform:M, quad:M[:CENTER[:POW]] or a list 0,3,6") from None
    if any(not start <= s < num_steps for s in steps) or start not in steps or len(set(steps)) != len(steps):
        raise PlanError(f"cache full steps {list(steps)} must be distinct, in {start}..{num_steps - 1}, and contain {start}")
    return steps


def parse_cache(spec: str | None, num_steps: int, variants: list[str]) -> CachePlan | None:
    """``VARIANT:SCHEDULE[@START]``: e.g. ``deep0:uniform:3``, ``blocks2-9:quad:3``, ``deep0:uniform:3@20``."""
    if spec is None or spec in ("", "none"):
        return None
    text, _, start_text = spec.strip().partition("@")
    variant, _, schedule = text.partition(":")
    if variant not in variants:
        built = ", ".join(variants) or "none (build with --cache)"
        raise PlanError(f"cache variant {variant!r} is not in this bundle; built: {built}")
    if not schedule:
        raise PlanError(f"bad cache spec {spec!r}: VARIANT:SCHEDULE[@START], e.g. {variant}:uniform:3")
    try:
        start = int(start_text) if start_text else 0
    except ValueError:
        raise PlanError(f"bad cache spec {spec!r}: @START must be a step index") from None
    if not 0 <= start < num_steps:
        raise PlanError(f"cache start {start} is out of range for {num_steps} steps")
    return CachePlan(variant, _cache_schedule(schedule, num_steps, start), start, spec.strip())


@dataclass(frozen=True)
class StageCall:
    stage: str  # "full" | "encoder" | "decoder" | "cached"
    steps: tuple[int, ...]  # the step indices this call computes (one for full/encoder)
    batch: int  # rows = len(steps) * CFG multiplier * images
    engine: str = ""  # the bundle stage that runs it when that differs from ``stage`` (a width profile)

    @property
    def runner(self) -> str:
        return self.engine or self.stage


def build_calls(
    plan: KeyStepPlan,
    images: int,
    cfg: bool,
    parallel: bool = True,
    max_decoder_batch: int | None = None,
    engines: dict[str, list[str]] | None = None,
    cache: CachePlan | None = None,
) -> list[StageCall]:
    """``engines``: per stage, the engine of every step (width bundles). A batched decoder call covers only
    consecutive steps that share an engine: a group is split where the width profile changes. ``cache``: from its
    start step on, full and cached calls replace the key-step plan."""
    rows_per_step = images * (2 if cfg else 1)
    if cache is not None:
        early = KeyStepPlan(cache.start, tuple(s for s in plan.key_steps if s < cache.start), plan.baseline)
        calls = build_calls(early, images, cfg, parallel, max_decoder_batch, engines) if cache.start else []
        return calls + [
            StageCall("full", (i,), rows_per_step) if i in cache.full_steps
            else StageCall("cached", (i,), rows_per_step, cache.engine)
            for i in range(cache.start, plan.num_steps)
        ]
    if plan.baseline:
        return [StageCall("full", (i,), rows_per_step) for i in range(plan.num_steps)]
    engine_of = engines or {"encoder": [""] * plan.num_steps, "decoder": [""] * plan.num_steps}
    if max_decoder_batch is not None and max_decoder_batch < rows_per_step:
        raise PlanError(
            f"--max-decoder-batch {max_decoder_batch} is below one step's rows ({rows_per_step} = images x CFG)"
        )
    steps_per_call = 1
    if parallel:
        steps_per_call = plan.num_steps if max_decoder_batch is None else max_decoder_batch // rows_per_step
    calls = []
    for group in plan.groups:
        calls.append(StageCall("encoder", (group[0],), rows_per_step, engine_of["encoder"][group[0]]))
        chunk: list[int] = []
        for step in group:
            if chunk and (len(chunk) == steps_per_call or engine_of["decoder"][step] != engine_of["decoder"][chunk[0]]):
                calls.append(StageCall("decoder", tuple(chunk), len(chunk) * rows_per_step, engine_of["decoder"][chunk[0]]))
                chunk = []
            chunk.append(step)
        calls.append(StageCall("decoder", tuple(chunk), len(chunk) * rows_per_step, engine_of["decoder"][chunk[0]]))
    return calls


def plan_flops(calls: list[StageCall], stage_flops) -> int | None:
    """Total FLOPs of a call list; ``stage_flops(runner, batch)`` gives one call's (None if unknown)."""
    total = 0
    for call in calls:
        flops = stage_flops(call.runner, call.batch)
        if flops is None:
            return None
        total += flops
    return total
