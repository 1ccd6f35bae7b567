"""``keystep tune``: choose the plan that stays closest to the baseline under a FLOP or time budget.

    keystep tune BUNDLE (--target-speedup S | --budget-flops F) [--by flops|time] [--method search|similarity]
                 [--seeds 2] [--class C ...] [--prompt ...] [--dry-run] [--json]

``search`` enumerates the plans the bundle can run — key-step plans (``uniform:M``, the family default), each cache
variant with uniform and DeepCache-quad schedules, and key steps early + caching late — keeps those within the
budget, runs each on the calibration inputs (seeds x classes or prompts, the same z_T for every plan) and picks the
highest PSNR of the final latents against the baseline plan's. The budget is the plan's FLOPs (counted from the
graphs, so it is exact and machine-independent) or, with ``--by time``, the speedup measured on the calibration runs.

``similarity`` costs one run: encoder and decoder at every step, recording the encoder features; the key steps are
step 0 plus the steps whose features changed most from the previous step's (relative L2), as many as the budget
allows. It is then measured like a searched plan.

The choice is written into the bundle's manifest (``default_plan`` and a ``tuned`` record: method, budget, every
plan tried with its FLOP ratio, measured speedup and PSNR) by an atomic replace; ``keystep inspect`` shows it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace

import numpy as np

from keystep.runtime.bundle import MANIFEST_NAME, Bundle
from keystep.runtime.errors import KeystepError
from keystep.runtime.manifest import check_manifest
from keystep.runtime.plan import PlanError
from keystep.runtime.sampler import SamplingOptions

KEY_STEP_INTERVALS = (2, 3, 4, 5, 6, 8, 10, 12, 16)
CACHE_INTERVALS = (2, 3, 4, 5, 6, 8, 10)


class TuneError(KeystepError, ValueError):
    """A budget nothing meets, or a method the bundle cannot serve."""


@dataclass
class Trial:
    plan: str
    flops_ratio: float  # plan FLOPs / baseline FLOPs
    speedup: float | None = None  # measured on the calibration runs
    psnr: float | None = None
    mse: float | None = None

    def to_dict(self) -> dict:
        return {"plan": self.plan, "flops_ratio": self.flops_ratio, "speedup": self.speedup, "psnr": self.psnr,
                "mse": self.mse}


def candidate_plans(bundle: Bundle, num_steps: int) -> list[str]:
    plans = ["default", *(f"uniform:{m}" for m in KEY_STEP_INTERVALS if m < num_steps)]
    late = num_steps // 3  # combined plans: encoder propagation for the first third, caching after
    for variant in bundle.cache_variants:
        for m in CACHE_INTERVALS:
            plans += [f"{variant}:uniform:{m}", f"{variant}:quad:{m}"]
            plans.append(f"default+{variant}:uniform:{m}@{late}")
    return plans


def latent_psnr(latents: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(PSNR over the reference's peak-to-peak range, MSE) of final latents."""
    mse = float(np.mean((latents - reference) ** 2))
    peak = float(np.ptp(reference))
    return (float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)), mse


class Calibration:
    """The calibration inputs and one sampler; runs a plan on all of them with the same z_T."""

    def __init__(self, sampler, options: SamplingOptions, seeds: int, classes=None, prompts=None):
        self.sampler, self.options, self.seeds = sampler, options, seeds
        self.classes, self.prompts = classes, prompts

    def run(self, options: SamplingOptions) -> tuple[np.ndarray, float]:
        """(final latents of every calibration input, seconds spent sampling)."""
        latents, seconds = [], 0.0
        for seed in range(self.seeds):
            if self.sampler.family == "dit":
                result = self.sampler.sample(list(self.classes), options, seed=seed)
            else:
                result = self.sampler.sample(list(self.prompts), options, seed=seed)
            latents.append(result.latents)
            seconds += result.total_seconds
        return np.concatenate(latents), seconds

    def flops(self, options: SamplingOptions) -> int:
        prepared = self.sampler.prepare(options, self.images)
        total = self.sampler.plan_flops(prepared)
        if total is None:
            raise TuneError("the bundle's stages have no FLOP counts: use --by time")
        return total

    @property
    def images(self) -> int:
        return len(self.classes) if self.sampler.family == "dit" else len(self.prompts)


def encoder_feature_change(calibration: Calibration) -> np.ndarray:
    """One run per calibration input with the encoder at every step: per step i >= 1, the mean over the runs of the
    relative L2 change of the encoder outputs from step i - 1 (index 0 holds 0)."""
    sampler = calibration.sampler
    if sampler.bundle.width is not None:
        raise TuneError("--method similarity needs a dense bundle (width bundles run several encoder engines)")
    options = calibration.options
    steps = options.num_steps
    every = replace(options, key_steps=",".join(map(str, range(steps))), cache=None, noise_injection=False)
    features: list[np.ndarray] = []
    encoder = sampler.runner("encoder")
    original_run = encoder.run

    def recording_run(feeds):
        outputs = original_run(feeds)
        features.append(np.concatenate([v.reshape(len(v), -1) for k, v in sorted(outputs.items())
                                        if k != "mlp_tokens"], axis=1))
        return outputs

    encoder.run = recording_run
    try:
        calibration.run(every)
    finally:
        encoder.run = original_run
    per_seed = np.stack(features).reshape(calibration.seeds, steps, -1)  # runs are seed-major
    change = np.linalg.norm(np.diff(per_seed, axis=1), axis=2) / np.linalg.norm(per_seed[:, :-1], axis=2)
    return np.concatenate([[0.0], change.mean(axis=0)])


def similarity_key_steps(calibration: Calibration, budget_flops: float) -> str:
    """Key steps where the encoder features changed most between adjacent steps, as many as fit the budget."""
    options = calibration.options
    change = encoder_feature_change(calibration)
    order = np.argsort(-change[1:]) + 1  # step i differs from step i-1
    keys = [0]
    for step in order:
        trial = sorted(keys + [int(step)])
        if calibration.flops(replace(options, key_steps=",".join(map(str, trial)), cache=None)) > budget_flops:
            break
        keys = trial
    return ",".join(map(str, keys))


def tune(bundle: Bundle, sampler, options: SamplingOptions, target_speedup: float | None = None,
         budget_flops: float | None = None, by: str = "flops", method: str = "search", seeds: int = 2,
         classes=None, prompts=None, progress=None) -> dict:
    if (target_speedup is None) == (budget_flops is None):
        raise TuneError("give exactly one of --target-speedup and --budget-flops")
    if by == "time" and target_speedup is None:
        raise TuneError("--by time needs --target-speedup (a FLOP budget is not a time)")
    calibration = Calibration(sampler, options, seeds, classes, prompts)
    baseline_options = options.with_plan("all")
    base_flops = calibration.flops(baseline_options)
    budget = budget_flops if budget_flops is not None else base_flops / target_speedup
    reference, base_seconds = calibration.run(baseline_options)

    if method == "similarity":
        plans = [similarity_key_steps(calibration, budget)]
    elif method == "search":
        plans = candidate_plans(bundle, options.num_steps)
    else:
        raise TuneError(f"unknown method {method!r}: search or similarity")
    trials = []
    for plan in plans:
        try:
            flops = calibration.flops(options.with_plan(plan))
        except PlanError:
            continue  # e.g. a quad schedule that does not exist for this step count
        trial = Trial(plan, flops / base_flops)
        if by == "flops" and flops > budget:
            trials.append(trial)
            continue
        latents, seconds = calibration.run(options.with_plan(plan))
        trial.speedup = base_seconds / seconds
        trial.psnr, trial.mse = latent_psnr(latents, reference)
        trials.append(trial)
        if progress:
            progress(trial)
    fits = [t for t in trials if t.psnr is not None and (by == "flops" or t.speedup >= target_speedup)]
    if not fits:
        raise TuneError(f"no plan tried meets the budget ({budget / base_flops:.3f} of the baseline's FLOPs"
                        + (f", or {target_speedup}x measured" if by == "time" else "") + ")")
    best = max(fits, key=lambda t: t.psnr)
    return {
        "method": method, "by": by, "target_speedup": target_speedup, "budget_flops": budget,
        "baseline_flops": base_flops, "num_steps": options.num_steps, "guidance": options.guidance,
        "calibration": {"seeds": seeds, "classes": classes, "prompts": prompts},
        "chosen": best.plan, "trials": [t.to_dict() for t in trials],
    }


def write_tuned_plan(bundle: Bundle, record: dict) -> None:
    """default_plan := the chosen plan; the manifest is replaced atomically (never half-written)."""
    manifest = dict(bundle.manifest)
    chosen = SamplingOptions().with_plan(record["chosen"])
    manifest["default_plan"] = {**manifest["default_plan"], "num_steps": record["num_steps"],
                                "key_steps": chosen.key_steps, "cache": chosen.cache}
    manifest["tuned"] = record
    check_manifest(manifest)
    path = bundle.root / MANIFEST_NAME
    fd, tmp = tempfile.mkstemp(dir=bundle.root, prefix=".manifest-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    bundle.manifest = manifest


def format_record(record: dict) -> str:
    lines = [f"{'plan':<34} {'FLOPs':>7} {'speedup':>8} {'PSNR dB':>8}"]
    for t in record["trials"]:
        speed = "-" if t["speedup"] is None else f"{t['speedup']:.2f}x"
        quality = "over budget" if t["psnr"] is None else f"{t['psnr']:.2f}"
        mark = "  <- chosen" if t["plan"] == record["chosen"] else ""
        lines.append(f"{t['plan']:<34} {t['flops_ratio']:>7.3f} {speed:>8} {quality:>8}{mark}")
    budget = record["budget_flops"] / record["baseline_flops"]
    lines.append(f"budget: {budget:.3f} of the baseline's FLOPs" + (
        f", measured speedup >= {record['target_speedup']}" if record["by"] == "time" else ""))
    return "\n".join(lines)
