"""``keystep profile``: where a plan's time goes, stage by stage, and how far each plan is from the hardware.

    keystep profile BUNDLE [--plan SPEC ...] [--both-decoder-modes] [--warmup 1] [--repeats 3] [--json]
                    [--markdown FILE] [--plot FILE.png] [--class C ...] [--prompt ...] [plan and backend flags]

Every plan runs the whole pipeline (text encoder, sampling loop, ControlNet, VAE) once per round; rounds interleave
the plans (baseline, plan 1, plan 2, baseline, ...) after ``--warmup`` rounds, so machine noise hits all plans
alike, and the numbers are medians over the ``--repeats`` measured rounds. Sessions are loaded before the first
round (their load time is reported apart).

Timing sources: the sampling loop's stage calls come from ``SampleResult.call_seconds`` (aligned with
``result.prepared.calls``); the calls made outside it (text encoder, ControlNet inside ``encoder_cache``, VAE) are
timed by a sampler subclass whose stage runners record every call. ``host`` is the rest of the end-to-end time:
CFG, noise injection, scheduler steps, tiling (``SampleResult.host_seconds``, less the ControlNet time the runtime
counts there), plus tokenization and image conversion outside the loop, so stages + host = end-to-end per run.

The floor is a plan's FLOPs divided by the backend's peak, measured on one large float32 MatMul run through the
same backend (a one-node ONNX graph), so it shows how close each plan gets to the hardware.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from keystep.runtime.bundle import Bundle, IOSpec, StageSpec
from keystep.runtime.errors import KeystepError
from keystep.runtime.sampler import SamplingError, SamplingOptions

from ..bench.common import cpu_name
from .args import list_flag

# the order stages appear in tables and plots (only those that ran are shown)
STAGE_ORDER = ("text_encoder", "text_encoder_2", "encoder", "controlnet", "decoder", "full", "cached", "vae_decoder", "host")
PLAN_STAGES = ("encoder", "decoder", "full", "cached")  # the ones inside run_plan's call list
SPATIAL_STAGES = ("encoder", "decoder", "full", "cached", "controlnet", "vae_decoder")  # FLOPs scale with the image area


def stage_kind(name: str) -> str:
    """A width engine ("decoder.w2") counts as its stage ("decoder")."""
    return name.split(".", 1)[0]
STAGE_COLOURS = {
    "text_encoder": "#8c564b", "text_encoder_2": "#bcbd22", "encoder": "#1f77b4", "controlnet": "#9467bd", "decoder": "#ff7f0e",
    "full": "#2ca02c", "cached": "#17becf", "vae_decoder": "#e377c2", "host": "#7f7f7f",
}
DEFAULT_PROMPT = "a photo"
PEAK_SIZE = 1024


class ProfileError(KeystepError, ValueError):
    """Bad profiling input (repeats < 1, a missing optional dependency, ...)."""


# --- timing every stage call ----------------------------------------------------------------------------------


@dataclass
class CallEvent:
    stage: str
    batch: int
    start: float  # perf_counter
    seconds: float


class TimedRunner:
    """Wraps a stage runner and logs each call's stage, batch and wall time."""

    def __init__(self, inner, log: list[CallEvent]):
        self.inner = inner
        self.spec = inner.spec
        self.log = log
        self._batch_input = next((io.name for io in inner.spec.inputs if io.shape and io.shape[0] == "batch"), None)

    def run(self, feeds):
        t0 = time.perf_counter()
        outputs = self.inner.run(feeds)
        seconds = time.perf_counter() - t0
        batch = len(feeds[self._batch_input]) if self._batch_input in feeds else 1
        self.log.append(CallEvent(self.spec.name, batch, t0, seconds))
        return outputs


class TimingMixin:
    """Put before a sampler class: every ``runner(stage)`` it hands out logs its calls in ``self.events``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events: list[CallEvent] = []
        self._timed: dict[str, TimedRunner] = {}

    def runner(self, stage):
        if stage not in self._timed:
            self._timed[stage] = TimedRunner(super().runner(stage), self.events)
        return self._timed[stage]


def profiled_sampler(bundle: Bundle, backend):
    from keystep.runtime.samplers import sampler_class

    base = sampler_class(bundle)
    cls = type(f"Profiled{base.__name__}", (TimingMixin, base), {})
    return cls(bundle, backend)


# --- the backend's peak -----------------------------------------------------------------------------------------

_PEAK_CACHE: dict[tuple, dict] = {}


def measure_peak(backend, size: int = PEAK_SIZE, runs: int = 8) -> dict:
    """GFLOP/s of one float32 (size x size) @ (size x size) MatMul through ``backend`` (best of ``runs``). Falls
    back to numpy's matmul when onnx is not importable or the backend cannot run the graph, and says so."""
    key = (getattr(backend, "name", type(backend).__name__), _backend_threads(backend), size)
    if key in _PEAK_CACHE:
        return dict(_PEAK_CACHE[key])
    flops = 2 * size**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    note = None
    try:
        import onnx  # noqa: F401  (the export extra)
    except ImportError:
        note = "onnx is not importable: numpy matmul peak, not the backend's"
    if note is None:
        with tempfile.TemporaryDirectory(prefix="keystep-peak-") as tmp:
            try:
                runner = backend.load(_matmul_stage(Path(tmp), size))
                fn = lambda: runner.run({"a": a, "b": b})  # noqa: E731
                seconds = _best_time(fn, runs)
                source = f"{key[0]} MatMul {size}x{size}x{size} float32"
            except Exception as exc:  # the backend cannot run it: numpy is still a useful reference
                note = f"the backend could not run the MatMul graph ({exc}): numpy matmul peak, not the backend's"
    if note is not None:
        seconds = _best_time(lambda: a @ b, runs)
        source = f"numpy matmul {size}x{size}x{size} float32"
    peak = {"gflops_per_s": flops / seconds / 1e9, "source": source, "size": size, "flops": flops,
            "best_seconds": seconds, "note": note}
    _PEAK_CACHE[key] = peak
    return dict(peak)


def _matmul_stage(tmp: Path, size: int) -> StageSpec:
    from onnx import TensorProto, helper, save

    def value(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [size, size])

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "keystep_peak",
                              [value("a"), value("b")], [value("c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="keystep-profile")
    model.ir_version = 8  # readable by older runtimes too
    path = tmp / "matmul.onnx"
    save(model, str(path))
    io = lambda name: IOSpec(name, "float32", (size, size))  # noqa: E731
    return StageSpec("matmul_peak", path, (io("a"), io("b")), (io("c"),), 2 * size**3, 0)


def _best_time(fn, runs: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _backend_threads(backend) -> int | None:
    threads = getattr(backend, "threads", None)
    if threads is None:
        threads = getattr(backend, "config", {}).get("INFERENCE_NUM_THREADS")
    return threads


# --- running the plans ------------------------------------------------------------------------------------------


@dataclass
class PlanEntry:
    name: str
    options: SamplingOptions
    spec: str
    baseline: bool
    mode: str | None  # "parallel" | "sequential" | None (no decoder calls)


def _plan_name(spec: str, mode: str | None) -> str:
    short = spec if len(spec) <= 24 else spec[:21] + "..."
    return short if mode is None else f"{short} ({mode})"


def resolve_plans(sampler, options: SamplingOptions, plans, both_decoder_modes: bool, images: int) -> list[PlanEntry]:
    """The plans to run, validated up front (a bad spec fails before any timing). The baseline comes first and is
    always included: the speedups are measured against it."""
    specs = list(plans) if plans else ["all", options.plan_spec]
    default_mode = options.parallel if options.parallel is not None else sampler.backend.batches_decoders
    modes = [True, False] if both_decoder_modes else [default_mode]
    entries: list[PlanEntry] = []
    for spec in ["all", *specs]:
        for parallel in modes:
            opts = replace(options.with_plan(spec), parallel=parallel)
            prepared = sampler.prepare(opts, images)  # raises PlanError for bad specs / decoder batches
            plan = prepared.plan
            decoders = any(c.stage == "decoder" for c in prepared.calls)
            mode = ("parallel" if parallel else "sequential") if decoders else None
            label = plan.spec if prepared.cache is None else (
                prepared.cache.spec if prepared.cache.start == 0 else f"{plan.spec}+{prepared.cache.spec}")
            name = _plan_name(label, mode)
            if any(e.name == name for e in entries):
                continue
            entries.append(PlanEntry(name, opts, label, plan.baseline and prepared.cache is None, mode))
    return entries


def profile_bundle(
    bundle: Bundle | str | Path,
    backend=None,
    options: SamplingOptions | None = None,
    plans: list[str] | None = None,
    both_decoder_modes: bool = False,
    warmup: int = 1,
    repeats: int = 3,
    class_labels: list[int] | None = None,
    prompts: list[str] | None = None,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    control_image=None,
    control_scale: float = 1.0,
    seed: int = 0,
    peak_size: int = PEAK_SIZE,
    frames: int | None = None,
) -> dict:
    """Run every plan ``warmup + repeats`` times, interleaved, and return the profile as a JSON-able dict.

    ``plans``: key-step specs (``all``, ``default``, ``uniform:M``, ``0,2,5``); default: the baseline and
    ``options.key_steps`` (the bundle's default plan). ``control_image``: a path or a (3, H, W) array in [0, 1]
    (UNet bundles with a ControlNet stage).
    """
    if repeats < 1:
        raise ProfileError(f"--repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise ProfileError(f"--warmup must be at least 0, got {warmup}")
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    if backend is None:
        from keystep.runtime.backends.base import get_backend

        backend = get_backend("onnxruntime")
    options = options or SamplingOptions.from_bundle(bundle)
    sampler = profiled_sampler(bundle, backend)
    if bundle.family == "unet3d":
        run, settings, flops_scale = _video_workload(sampler, class_labels, prompts, negative_prompt, height, width,
                                                     frames, control_image, seed)
    elif frames is not None:
        raise SamplingError("--frames applies to text-to-video bundles")
    else:
        run, settings, flops_scale = _workload(sampler, bundle, class_labels, prompts, negative_prompt, height,
                                               width, control_image, control_scale, seed)
    images = settings["images"]
    flops_note = settings.pop("flops_note", None)
    entries = resolve_plans(sampler, options, plans, both_decoder_modes, images)

    def stage_flops(stage: str, batch: int, mlp_tokens=()) -> float | None:
        """FLOPs of one call of bundle stage (or width engine) ``stage``; with token selection, as executed."""
        flops = bundle.stage(stage).actual_flops(batch, mlp_tokens)
        if flops is None:
            return None
        if isinstance(flops_scale, dict):  # per stage kind (text-to-video: the VAE's rows are frames already)
            return flops * flops_scale.get(stage_kind(stage), 1.0)
        return flops * (flops_scale if stage_kind(stage) in SPATIAL_STAGES else 1.0)

    # load every session before timing (the runtime loads lazily, inside the first call)
    needed = {s for s in ("text_encoder", "text_encoder_2") if s in bundle.stages} \
        if bundle.family in ("unet", "unet3d") else set()
    for entry in entries:
        needed |= {c.runner for c in sampler.prepare(entry.options, images).calls}
    if settings.get("control"):  # the baseline runs encoder + decoder every step; the full graph is never used
        needed = (needed - {"full"}) | {"controlnet", "encoder", "decoder"}
    if "vae_decoder" in bundle.stages:
        needed.add("vae_decoder")
    load_seconds = {}
    for stage in sorted(needed, key=lambda name: (STAGE_ORDER.index(stage_kind(name)), name)):
        t0 = time.perf_counter()
        sampler.runner(stage)
        load_seconds[stage] = time.perf_counter() - t0

    peak = measure_peak(backend, peak_size)

    runs: dict[str, list[dict]] = {e.name: [] for e in entries}
    for round_ in range(warmup + repeats):
        for entry in entries:
            measured = _run_once(sampler, run, entry.options, stage_flops)
            if round_ >= warmup:
                runs[entry.name].append(measured)

    plans_out = [_summarise(entry, runs[entry.name], images, peak) for entry in entries]
    base = plans_out[0]
    for p in plans_out:
        p["speedup"] = base["seconds_per_image"] / p["seconds_per_image"]
        p["sampling_speedup"] = base["sampling_seconds_per_image"] / p["sampling_seconds_per_image"]
        p["flop_ratio"] = (p["flops_per_run"] / base["flops_per_run"]
                           if p["flops_per_run"] and base["flops_per_run"] else None)
    return {
        "bundle": str(bundle.root),
        "family": bundle.family,
        "backend": getattr(backend, "name", type(backend).__name__),
        "threads": _backend_threads(backend),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "settings": {
            **settings,
            "num_steps": options.num_steps,
            "guidance": options.guidance,
            "scheduler": options.scheduler or bundle.scheduler_config.get("_class_name"),
            "warmup": warmup,
            "repeats": repeats,
            "both_decoder_modes": both_decoder_modes,
        },
        "flops_note": flops_note,
        "width": {k: bundle.manifest["width"][k] for k in ("spec", "token_selection", "approximation")}
        if bundle.width is not None else None,
        "load_seconds": load_seconds,
        "peak": peak,
        "baseline": base["name"],
        "plans": plans_out,
        # GPU backends: CUDA graphs captured, fallbacks, device memory for I/O buffers and shared activations
        "gpu": backend.stats() if hasattr(backend, "stats") else None,
    }


def _workload(sampler, bundle, class_labels, prompts, negative_prompt, height, width, control_image, control_scale,
              seed):
    """``run(options) -> (SampleResult, decode-or-None)`` for the bundle's family, the settings to report, and the
    factor the manifest's FLOPs (counted at the model's default size) are scaled by."""
    if bundle.family == "cascade":
        raise ProfileError(f"profile one diffusion stage of the cascade: keystep profile {bundle.root}/<stage> "
                           f"(stages: {', '.join(p['name'] for p in bundle.manifest['cascade'])})")
    if bundle.family == "if":  # one IF diffusion stage: its inputs (T5, earlier stages) are computed once, cached
        if class_labels or control_image is not None:
            raise SamplingError("an IF stage takes --prompt (no --class, no --control-image)")
        prompts = list(prompts or [DEFAULT_PROMPT])
        h, w = sampler.output_size(height, width)

        def run(options):
            result = sampler.sample(prompts, options, negative_prompt=negative_prompt, height=h, width=w, seed=seed)
            return result, sampler.decode(result.latents)

        dh, dw = sampler.default_size
        settings = {"images": len(prompts), "prompts": prompts, "negative_prompt": negative_prompt, "height": h,
                    "width": w, "control": False, "control_scale": None}
        return run, settings, (h * w) / (dh * dw)
    if bundle.family == "unet":
        from keystep.runtime.unet_sampler import load_control_image

        if class_labels:
            raise SamplingError("this is a text-to-image bundle: use --prompt, not --class")
        prompts = list(prompts or [DEFAULT_PROMPT])
        h, w = sampler.output_size(height, width)
        control = None
        if control_image is not None:
            control = load_control_image(str(control_image), h, w) if isinstance(control_image, (str, Path)) \
                else np.asarray(control_image, np.float32)
            if "controlnet" not in bundle.stages:
                raise SamplingError("this bundle has no ControlNet stage (build it with --controlnet)")
        dh, dw = sampler.default_size
        scale = (h * w) / (dh * dw)

        def run(options):
            result = sampler.sample(prompts, options, negative_prompt=negative_prompt, height=h, width=w, seed=seed,
                                    control_image=control, control_scale=control_scale)
            return result, sampler.decode(result.latents)

        settings = {"images": len(prompts), "prompts": prompts, "negative_prompt": negative_prompt, "height": h,
                    "width": w, "control": control is not None, "control_scale": control_scale if control is not None
                    else None}
        if scale != 1.0:
            settings["flops_note"] = (f"FLOPs are counted at the model's default {dh}x{dw}; scaled by the pixel count "
                                      f"to {h}x{w} (approximate: attention grows faster)")
        return run, settings, scale
    if prompts:
        raise SamplingError("this is a class-conditional bundle: use --class, not --prompt")
    if height or width:
        raise SamplingError("--height/--width apply to text-to-image bundles; a DiT's size is fixed")
    if control_image is not None:
        raise SamplingError("--control-image applies to text-to-image bundles with a ControlNet")
    labels = list(class_labels if class_labels else [0])

    def run(options):
        result = sampler.sample(labels, options, seed=seed)
        return result, sampler.decode(result.latents)

    return run, {"images": len(labels), "class_labels": labels}, 1.0


def _video_workload(sampler, class_labels, prompts, negative_prompt, height, width, frames, control_image, seed):
    """:func:`_workload` for text-to-video bundles: FLOPs scale with frames x pixels (counted at the bundle's
    default frame count and size)."""
    if class_labels:
        raise SamplingError("this is a text-to-video bundle: use --prompt, not --class")
    if control_image is not None:
        raise SamplingError("--control-image applies to text-to-image bundles with a ControlNet")
    prompts = list(prompts or [DEFAULT_PROMPT])
    h, w = sampler.output_size(height, width)
    frames = frames or sampler.default_frames
    dh, dw = sampler.default_size
    area = (h * w) / (dh * dw)
    scale = area * frames / sampler.default_frames

    def run(options):
        result = sampler.sample(prompts, options, negative_prompt=negative_prompt, height=h, width=w, seed=seed,
                                num_frames=frames)
        return result, sampler.decode(result.latents)

    settings = {"images": len(prompts), "prompts": prompts, "negative_prompt": negative_prompt, "height": h,
                "width": w, "frames": frames}
    if scale != 1.0:
        settings["flops_note"] = (f"FLOPs are counted at the model's default {sampler.default_frames} frames of "
                                  f"{dh}x{dw}; scaled by frames x pixels to {frames} x {h}x{w} (approximate: "
                                  f"attention grows faster)")
    return run, settings, {**{kind: scale for kind in SPATIAL_STAGES}, "vae_decoder": area}


def _run_once(sampler, run, options, stage_flops) -> dict:
    sampler.events.clear()
    t0 = time.perf_counter()
    result, _ = run(options)
    total = time.perf_counter() - t0
    events = list(sampler.events)
    calls = result.prepared.calls
    plan_events = [e for e in events if stage_kind(e.stage) in PLAN_STAGES]
    if [e.stage for e in plan_events] != [c.runner for c in calls]:  # cannot happen unless the runtime changes
        raise RuntimeError("profile: the stage calls seen do not match the plan's call list")
    loop_start = plan_events[0].start if plan_events else t0
    loop_end = plan_events[-1].start + plan_events[-1].seconds if plan_events else t0
    timeline, by_call = [], iter(zip(calls, result.call_seconds, result.mlp_tokens))
    for e in events:
        if stage_kind(e.stage) in PLAN_STAGES:
            call, seconds, tokens = next(by_call)
            timeline.append({"stage": call.stage, "engine": call.runner, "steps": list(call.steps), "batch": call.batch,
                             "start": e.start - t0, "seconds": seconds,
                             "flops": stage_flops(call.runner, call.batch, tokens)})
        else:
            timeline.append({"stage": e.stage, "steps": None, "batch": e.batch, "start": e.start - t0,
                             "seconds": e.seconds, "flops": stage_flops(e.stage, e.batch)})
    in_loop_other = sum(e.seconds for e in events
                        if stage_kind(e.stage) not in PLAN_STAGES and loop_start <= e.start <= loop_end)
    stage_seconds = sum(item["seconds"] for item in timeline)
    return {
        "total": total,
        "sampling": result.total_seconds,
        "host": total - stage_seconds,
        "host_in_loop": result.host_seconds - in_loop_other,
        "timeline": timeline,
        "plan": result.prepared.plan,
        "noise_injection": result.prepared.noise_injection,
    }


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _summarise(entry: PlanEntry, runs: list[dict], images: int, peak: dict) -> dict:
    first = runs[0]["timeline"]
    stages = {}
    for stage in [s for s in STAGE_ORDER if any(item["stage"] == s for item in first)]:
        per_run_calls = [[item for item in r["timeline"] if item["stage"] == stage] for r in runs]
        calls = per_run_calls[0]
        per_call = [item["seconds"] for run_calls in per_run_calls for item in run_calls]
        per_run = [sum(item["seconds"] for item in run_calls) for run_calls in per_run_calls]
        flops = [item["flops"] for item in calls]
        flops_run = None if any(f is None for f in flops) else float(sum(flops))
        seconds_run = _stats(per_run)
        by_batch = {}
        for batch in sorted({item["batch"] for item in calls}):
            times = [item["seconds"] for run_calls in per_run_calls for item in run_calls if item["batch"] == batch]
            same = [item["flops"] for item in calls if item["batch"] == batch]
            f = None if any(x is None for x in same) else sum(same) / len(same)  # width engines differ per call
            med = statistics.median(times)
            by_batch[str(batch)] = {
                "calls_per_run": sum(1 for item in calls if item["batch"] == batch),
                "seconds_per_call": _stats(times),
                "seconds_per_row": med / batch,
                "flops_per_call": f,
                "gflops_per_s": None if f is None else f / med / 1e9,
            }
        stages[stage] = {
            "calls_per_run": len(calls),
            "batches": sorted({item["batch"] for item in calls}),
            "seconds_per_call": _stats(per_call),
            "seconds_per_run": seconds_run,
            "seconds_per_image": seconds_run["median"] / images,
            "flops_per_call": None if flops_run is None else flops_run / len(calls),
            "flops_per_run": flops_run,
            "gflops_per_s": None if flops_run is None else flops_run / seconds_run["median"] / 1e9,
            "share": None,  # set below
            "by_batch": by_batch,
        }
    host = _stats([r["host"] for r in runs])
    stages["host"] = {
        "calls_per_run": None,
        "seconds_per_run": host,
        "seconds_per_image": host["median"] / images,
        "in_loop_seconds_per_run": _stats([r["host_in_loop"] for r in runs]),
        "flops_per_run": None,
        "gflops_per_s": None,
        "share": None,
    }
    # shares of the sum of the stage medians (which add to 100 %; the median total may come from another run)
    parts = sum(s["seconds_per_run"]["median"] for s in stages.values())
    for s in stages.values():
        s["share"] = s["seconds_per_run"]["median"] / parts if parts > 0 else 0.0
    known = [s["flops_per_run"] for name, s in stages.items() if name != "host"]
    flops_run = None if any(f is None for f in known) else float(sum(known))
    plan_flops = [s["flops_per_run"] for name, s in stages.items() if name in PLAN_STAGES]
    total = _stats([r["total"] for r in runs])
    sampling = _stats([r["sampling"] for r in runs])
    floor = None if flops_run is None else flops_run / (peak["gflops_per_s"] * 1e9)
    median_run = sorted(runs, key=lambda r: r["total"])[(len(runs) - 1) // 2]
    plan = runs[0]["plan"]
    return {
        "name": entry.name,
        "spec": entry.spec,
        "baseline": entry.baseline,
        "decoder_mode": entry.mode,
        "num_steps": plan.num_steps,
        "key_steps": list(plan.key_steps),
        "noise_injection": runs[0]["noise_injection"],
        "calls_per_run": sum(s["calls_per_run"] for n, s in stages.items() if n != "host"),
        "seconds_per_run": total,
        "seconds_per_image": total["median"] / images,
        "sampling_seconds_per_run": sampling,
        "sampling_seconds_per_image": sampling["median"] / images,
        "flops_per_run": flops_run,
        "plan_flops_per_run": None if any(f is None for f in plan_flops) else float(sum(plan_flops)),
        "gflops_per_s": None if flops_run is None else flops_run / total["median"] / 1e9,
        "floor_seconds_per_run": floor,
        "floor_seconds_per_image": None if floor is None else floor / images,
        "fraction_of_peak": None if floor is None else floor / total["median"],
        "stages": stages,
        "timeline": median_run["timeline"],
    }


# --- output -----------------------------------------------------------------------------------------------------


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} us"


def _spread(stats: dict) -> str:
    return f"{fmt_seconds(stats['median'])} ({fmt_seconds(stats['min'])}-{fmt_seconds(stats['max'])})"


def _gflop(f: float | None) -> str:
    return "-" if f is None else f"{f / 1e9:.4g}"


def _rate(r: float | None) -> str:
    return "-" if r is None else f"{r:.3g}"


def _steps_text(steps: list[int] | None) -> str:
    if not steps:
        return ""
    return str(steps[0]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"


def _stage_rows(plan: dict) -> list[list[str]]:
    """Rows: stage, calls, batch, per call, per run, GFLOP/call, GFLOP/s, share; decoder sub-rows per batch."""
    rows = []
    for name, s in plan["stages"].items():
        if name == "host":
            rows.append([name, "", "", "", _spread(s["seconds_per_run"]), "", "", f"{100 * s['share']:.1f} %"])
            continue
        batches = s["batches"]
        batch = str(batches[0]) if len(batches) == 1 else f"{batches[0]}-{batches[-1]}"
        rows.append([name, str(s["calls_per_run"]), batch, _spread(s["seconds_per_call"]),
                     _spread(s["seconds_per_run"]), _gflop(s["flops_per_call"]), _rate(s["gflops_per_s"]),
                     f"{100 * s['share']:.1f} %"])
        if len(batches) > 1:
            for b, sub in s["by_batch"].items():
                rows.append([f"  batch {b}", str(sub["calls_per_run"]), b, _spread(sub["seconds_per_call"]), "",
                             _gflop(sub["flops_per_call"]), _rate(sub["gflops_per_s"]), ""])
    return rows


STAGE_HEADER = ["stage", "calls", "batch", "per call: median (min-max)", "per run: median (min-max)", "GFLOP/call",
                "GFLOP/s", "share"]
SUMMARY_HEADER = ["plan", "s/image", "min-max per run", "speedup", "sampling speedup", "GFLOP/image", "floor s/image",
                  "% of peak"]


def _summary_rows(d: dict) -> list[list[str]]:
    images = d["settings"]["images"]
    rows = []
    for p in d["plans"]:
        rows.append([
            p["name"] + (" [baseline]" if p["name"] == d["baseline"] else ""),
            fmt_seconds(p["seconds_per_image"]),
            f"{fmt_seconds(p['seconds_per_run']['min'])}-{fmt_seconds(p['seconds_per_run']['max'])}",
            f"{p['speedup']:.2f}x",
            f"{p['sampling_speedup']:.2f}x",
            _gflop(None if p["flops_per_run"] is None else p["flops_per_run"] / images),
            fmt_seconds(p["floor_seconds_per_image"]),
            "-" if p["fraction_of_peak"] is None else f"{100 * p['fraction_of_peak']:.1f} %",
        ])
    return rows


def _plan_title(p: dict) -> str:
    if p["baseline"]:
        what = "full model every step" if "full" in p["stages"] else "encoder + decoder every step"
    else:
        what = f"{len(p['key_steps'])} key steps {p['key_steps']}, decoders {p['decoder_mode']}"
    return f"plan {p['name']}: {p['num_steps']} steps, {what}, {p['calls_per_run']} stage calls per run"


def _header_lines(d: dict) -> list[str]:
    s = d["settings"]
    threads = d["threads"] or "all"
    what = (f"class {s['class_labels']}" if d["family"] == "dit"
            else f"prompt {s['prompts']}, {s['height']}x{s['width']}" + (", ControlNet" if s.get("control") else ""))
    peak = d["peak"]
    lines = [
        f"keystep profile {d['bundle']}",
        f"  {d['family']} bundle, {d['backend']} ({threads} threads), {d['machine']['cpu']}, {d['machine']['cores']} cores",
        f"  {s['num_steps']} steps, {s['scheduler']}, CFG {s['guidance']}, {s['images']} image(s), {what}; "
        f"warmup {s['warmup']}, median of {s['repeats']} interleaved run(s)",
        f"  peak {peak['gflops_per_s']:.1f} GFLOP/s ({peak['source']})" + (f" - {peak['note']}" if peak["note"] else ""),
    ]
    if d.get("flops_note"):
        lines.append(f"  note: {d['flops_note']}")
    if d.get("gpu"):
        lines.append("  gpu: " + ", ".join(f"{k.replace('_', ' ')} {_gpu_value(k, v)}" for k, v in d["gpu"].items()))
    if d.get("width"):
        w = d["width"]
        lines.append(f"  width profiles {w['spec']}, token selection {w['token_selection']}"
                     + (" - APPROXIMATION: the checkpoint's token routers are dropped" if w["approximation"] else "")
                     + "; FLOPs as executed")
    return lines


def _gpu_value(key: str, value) -> str:
    if key.endswith("bytes"):
        return f"{value / 2**20:.1f} MiB"
    return ", ".join(value) or "none" if isinstance(value, list) else str(value)


def _text_table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def format_table(d: dict) -> str:
    """The profile as terminal text: a header, one stage table per plan, then the plan summary with the floor."""
    lines = _header_lines(d)
    for p in d["plans"]:
        lines += ["", _plan_title(p)]
        lines += ["  " + x for x in _text_table(STAGE_HEADER, _stage_rows(p), right={1, 2, 5, 6, 7})]
        floor = p["floor_seconds_per_image"]
        lines.append(
            f"  total {_spread(p['seconds_per_run'])} per run, {fmt_seconds(p['seconds_per_image'])} per image, "
            f"speedup {p['speedup']:.2f}x; floor {fmt_seconds(floor)} per image"
            + ("" if p["fraction_of_peak"] is None else f" ({100 * p['fraction_of_peak']:.1f} % of peak)"))
    lines += ["", "summary (end to end per image; floor = FLOPs / peak)"]
    lines += ["  " + x for x in _text_table(SUMMARY_HEADER, _summary_rows(d), right={1, 2, 3, 4, 5, 6, 7})]
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def esc(c):
        return c.replace("|", "\\|")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(esc(c) for c in r) + " |" for r in rows)]


def to_markdown(d: dict) -> str:
    lines = ["# keystep profile", ""]
    lines += [x.strip() + "  " for x in _header_lines(d)]
    lines += ["", "## Summary", "", *_md_table(SUMMARY_HEADER, _summary_rows(d))]
    for p in d["plans"]:
        lines += ["", f"## {_plan_title(p)}", "", *_md_table(STAGE_HEADER, _stage_rows(p))]
        lines.append("")
        lines.append(f"Total {_spread(p['seconds_per_run'])} per run, {fmt_seconds(p['seconds_per_image'])} per "
                     f"image, speedup {p['speedup']:.2f}x, floor {fmt_seconds(p['floor_seconds_per_image'])} per image.")
    return "\n".join(lines) + "\n"


def write_markdown(d: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_markdown(d))
    return path


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ProfileError("--plot needs matplotlib: pip install matplotlib (or 'keystep[profile]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(d: dict, path: str | Path) -> Path:
    """A PNG: (1) stacked per-stage seconds per image for each plan, with its floor; (2) each plan's timeline
    (x = time in the median run, one bar per stage call, coloured by stage, labelled with the steps it covers)."""
    plt = require_matplotlib()
    from matplotlib.patches import Patch

    plans = d["plans"]
    images = d["settings"]["images"]
    stages = [s for s in STAGE_ORDER if any(s in p["stages"] for p in plans)]
    fig, (bars, timeline) = plt.subplots(
        2, 1, figsize=(12, 3.5 + 0.55 * len(plans) + 0.5 * len(plans)),
        gridspec_kw={"height_ratios": [1.2, max(1.0, 0.5 * len(plans))]})

    x = np.arange(len(plans))
    bottom = np.zeros(len(plans))
    for stage in stages:
        values = np.array([p["stages"][stage]["seconds_per_run"]["median"] / images if stage in p["stages"] else 0.0
                           for p in plans])
        bars.bar(x, values, 0.6, bottom=bottom, color=STAGE_COLOURS[stage], label=stage)
        bottom += values
    for i, p in enumerate(plans):
        bars.text(i, bottom[i], f" {p['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
        if p["floor_seconds_per_image"] is not None:
            bars.hlines(p["floor_seconds_per_image"], i - 0.35, i + 0.35, colors="black", linestyles="dashed",
                        label="floor (FLOPs / peak)" if i == 0 else None)
    bars.set_xticks(x, [p["name"] for p in plans], fontsize=8)
    bars.set_ylabel("seconds per image")
    bars.set_ylim(0, bottom.max() * 1.15 if bottom.max() > 0 else 1)
    bars.set_title(f"{Path(d['bundle']).name}: per-stage time ({d['backend']}, median of "
                   f"{d['settings']['repeats']}; label = speedup vs {d['baseline']})", fontsize=10)
    bars.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a bar

    end = max((item["start"] + item["seconds"] for p in plans for item in p["timeline"]), default=1.0)
    for row, p in enumerate(plans):
        y = len(plans) - 1 - row
        for item in p["timeline"]:
            timeline.broken_barh([(item["start"], item["seconds"])], (y - 0.35, 0.7),
                                 facecolors=STAGE_COLOURS.get(item["stage"], "black"), edgecolor="white",
                                 linewidth=0.3)
            label = _steps_text(item["steps"])
            if label and item["seconds"] > end * 0.012 * max(1, len(label) / 2):
                timeline.text(item["start"] + item["seconds"] / 2, y, label, ha="center", va="center", fontsize=6,
                              color="white")
        keys = [item for item in p["timeline"] if item["stage"] in ("encoder", "full")]
        if keys and not p["baseline"]:  # mark the key steps above the bar
            timeline.plot([k["start"] for k in keys], [y + 0.42] * len(keys), "v", color="black", markersize=3)
    timeline.set_yticks(range(len(plans)), [p["name"] for p in reversed(plans)], fontsize=8)
    timeline.set_xlim(0, end * 1.01)
    timeline.set_xlabel("seconds into the run (median run; gaps = host work)")
    timeline.set_title("timeline: stage calls per plan (labels = steps covered; triangles = key steps)", fontsize=10)
    timeline.legend(handles=[Patch(color=STAGE_COLOURS[s], label=s) for s in stages if s != "host"], fontsize=7,
                    loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- command line ---------------------------------------------------------------------------------------------


def non_negative_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    import argparse

    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_profile_arguments(p) -> None:
    p.add_argument("bundle")
    p.add_argument("--plan", action="append", metavar="SPEC",
                   help="a key-step plan to profile (repeat for several): all, default, uniform:M, 0,1,2,5; the "
                        "baseline 'all' is always run (speedups are measured against it). Default: all + the "
                        "bundle's default plan (--key-steps X counts as one more --plan X)")
    p.add_argument("--both-decoder-modes", action="store_true",
                   help="run each key-step plan with batched (--parallel) and sequential decoders")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="unmeasured rounds first (default 1)")
    p.add_argument("--repeats", type=positive_int, default=3, help="measured rounds (default 3)")
    list_flag(p, "--class", dest="class_labels", type=int, help="DiT class label(s) (default 0); repeatable")
    list_flag(p, "--prompt", help=f"prompt(s) for text-to-image bundles (default {DEFAULT_PROMPT!r}); repeatable")
    p.add_argument("--negative-prompt", help="negative prompt (CFG's unconditional text)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    p.add_argument("--frames", type=int, help="text-to-video: frames per video (default: the bundle's)")
    p.add_argument("--control-image", help="profile with ControlNet, conditioned on this image")
    p.add_argument("--control-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-size", type=positive_int, default=PEAK_SIZE, help="MatMul size for the peak (default 1024)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON instead of the table")
    p.add_argument("--markdown", metavar="FILE", help="also write the tables as markdown")
    p.add_argument("--plot", metavar="FILE.png", help="also write a PNG: per-stage bars and per-plan timelines")


def run_profile_command(args, bundle: Bundle, options: SamplingOptions, backend) -> int:
    import json

    if args.plot:
        require_matplotlib()  # fail before minutes of profiling, not after
    plans = list(args.plan or []) + ([args.key_steps] if args.key_steps else [])
    result = profile_bundle(
        bundle, backend, options, plans=plans or None, both_decoder_modes=args.both_decoder_modes,
        warmup=args.warmup, repeats=args.repeats, class_labels=args.class_labels, prompts=args.prompt,
        negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        control_image=args.control_image, control_scale=args.control_scale, seed=args.seed,
        peak_size=args.peak_size, frames=args.frames)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    if args.markdown:
        path = write_markdown(result, args.markdown)
        if not args.json:
            print(f"wrote {path}")
    if args.plot:
        path = plot(result, args.plot)
        if not args.json:
            print(f"wrote {path}")
    return 0
