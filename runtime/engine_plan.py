"""What a GPU deployment of a bundle needs before any GPU is touched: the calls its plans make, one TensorRT
optimisation profile per engine, one CUDA graph per distinct call shape, the I/O buffers of each, and the cache key
that says when an engine must be rebuilt. Pure Python (numpy-free): the engine builder, the TensorRT backend,
``inspect`` and the tests all derive these from the same functions.

Batch sizes come from the plans (:mod:`keystep.runtime.plan`): a batched decoder call over S steps of B images with
CFG has ``2*S*B`` rows, so the profile of the decoder engine spans the smallest to the largest call and a CUDA graph
is captured per distinct (engine, batch). Stages outside the step loop run once per generate call: the text encoder
at ``images`` rows (prompts, then negatives), ControlNet with the latent rows, the VAE at ``images`` rows.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from .atomic import write_atomic  # noqa: F401 (the engine builder writes with it too)
from .bundle import Bundle, IOSpec, StageSpec, parse_dim
from .errors import KeystepError
from .manifest import EngineIndexFile, first_error
from .plan import StageCall
from .sampler import SamplingOptions, prepare_run

ENGINE_DIR = "engines"
ENGINE_INDEX = "index.json"
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1, "uint8": 1, "int8": 1}


class EnginePlanError(KeystepError, ValueError):
    """The engines do not cover a call, or the engine index is unreadable or stale."""


@dataclass(frozen=True, order=True)
class CallShape:
    """A distinct call of a run: which engine, at how many rows. One CUDA graph and one buffer set each."""

    runner: str
    batch: int


@dataclass(frozen=True)
class EngineProfile:
    """The batch range one engine is built for (one TensorRT optimisation profile)."""

    stage: str
    batches: tuple[int, ...]  # every batch the plans call it with, sorted
    counts: tuple[int, ...]  # how many calls each batch gets over the plans (same order)

    @property
    def min(self) -> int:
        return self.batches[0]

    @property
    def max(self) -> int:
        return self.batches[-1]

    @property
    def opt(self) -> int:
        """The batch with the most rows over the plans' calls (TensorRT tunes its kernels at opt); ties: larger."""
        return max(zip(self.batches, self.counts), key=lambda bc: (bc[0] * bc[1], bc[0]))[0]

    def input_shapes(self, spec: StageSpec, axes: dict[str, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Per input, the (min, opt, max) shapes TensorRT's profile takes; ``axes`` binds the non-batch axes."""
        return {io.name: tuple(concrete(io, axes, b) for b in (self.min, self.opt, self.max)) for io in spec.inputs}

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max, "batches": list(self.batches),
                "counts": list(self.counts)}


def concrete(io: IOSpec, axes: dict[str, int], batch: int) -> tuple[int, ...]:
    try:
        return io.concrete({**axes, "batch": batch})
    except KeyError as exc:
        raise EnginePlanError(f"tensor {io.name!r} has axis {exc.args[0]!r} with no size; give it with the engine "
                              f"build's sizes (e.g. --height/--width)") from None


def call_shapes(calls: list[StageCall]) -> list[CallShape]:
    """The distinct (engine, batch) calls in first-use order: the CUDA graphs a run captures."""
    return list(dict.fromkeys(CallShape(c.runner, c.batch) for c in calls))


def profiles_from_calls(calls: list[CallShape]) -> dict[str, EngineProfile]:
    """One profile per engine spanning its calls' batches (``calls`` may repeat: repeats weigh ``opt``)."""
    per_stage: dict[str, Counter] = {}
    for call in calls:
        per_stage.setdefault(call.runner, Counter())[call.batch] += 1
    return {stage: EngineProfile(stage, tuple(sorted(c)), tuple(c[b] for b in sorted(c)))
            for stage, c in per_stage.items()}


@dataclass(frozen=True)
class EngineTargets:
    """What the engines of a bundle must serve: the plans (``with_plan`` notation) at each image count."""

    plans: tuple[str, ...] = ("default", "all")
    images: tuple[int, ...] = (1,)
    max_decoder_batch: int | None = None

    def call_list(self, bundle: Bundle) -> list[CallShape]:
        """Every call of every target run (with repeats; decoders batched per group, as GPU backends run them), plus
        the once-per-generate stages' calls."""
        base = SamplingOptions.from_bundle(bundle, max_decoder_batch=self.max_decoder_batch)
        full = "full" in bundle.stages
        calls = []
        for spec in self.plans:
            options = base if spec == "default" else base.with_plan(spec)
            for images in self.images:
                calls += [CallShape(c.runner, c.batch) for c in prepare_run(bundle, options, images, True, full).calls]
        cfg = bundle.default_plan.get("guidance", 1.0) > 1
        for images in self.images:
            for stage, rows in (("text_encoder", images), ("text_encoder_2", images), ("vae_decoder", images),
                                ("controlnet", images * (2 if cfg else 1))):
                if stage in bundle.stages:
                    calls.append(CallShape(stage, rows))
        return calls

    def to_dict(self) -> dict:
        return {"plans": list(self.plans), "images": list(self.images), "max_decoder_batch": self.max_decoder_batch}


def plan_shape_ranges(bundle: Bundle, targets: EngineTargets, axes: dict[str, int]) -> dict[str, dict[str, tuple]]:
    """Per stage, the (min, opt, max) shapes of its dynamic inputs over the target plans: TensorRT's profiles, and
    the profile options of ONNX Runtime's TensorRT provider."""
    ranges = {}
    for stage, profile in profiles_from_calls(targets.call_list(bundle)).items():
        spec = bundle.stage(stage)
        dynamic = {io.name for io in spec.inputs if any(isinstance(d, str) for d in io.shape)}
        ranges[stage] = {k: v for k, v in profile.input_shapes(spec, axes).items() if k in dynamic}
    return ranges


@dataclass(frozen=True)
class TensorBuffer:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def bytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class CallBuffers:
    """The device buffers one call shape binds: preallocated once, captured into its CUDA graph."""

    call: CallShape
    inputs: tuple[TensorBuffer, ...]
    outputs: tuple[TensorBuffer, ...]

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.inputs + self.outputs)


def buffer_plan(bundle: Bundle, calls: list[CallShape], axes: dict[str, int]) -> list[CallBuffers]:
    """I/O buffers of each distinct call; ``axes`` binds the non-batch symbolic axes (the engine index's)."""
    plan = []
    for call in dict.fromkeys(calls):
        spec = bundle.stage(call.runner)
        plan.append(CallBuffers(
            call,
            tuple(TensorBuffer(io.name, concrete(io, axes, call.batch), io.dtype) for io in spec.inputs),
            tuple(TensorBuffer(io.name, concrete(io, axes, call.batch), io.dtype) for io in spec.outputs)))
    return plan


def free_axes(bundle: Bundle) -> set[str]:
    """Symbolic axes other than ``batch`` in the bundle's stage I/O (UNet: height, width, per-level sizes, ...)."""
    names = set()
    for spec in bundle.stages.values():
        for io in spec.inputs + spec.outputs:
            names.update(parse_dim(d)[1] for d in io.shape if isinstance(d, str))
    names.discard("batch")
    return names


# --- engine cache -----------------------------------------------------------------------------------------------

def engine_cache_key(onnx_sha256: str, options: dict, tensorrt_version: str, gpu_name: str) -> str:
    """An engine is reusable exactly when its graph, build options (profile shapes included), TensorRT version and
    GPU are the same: the key hashes all four, canonically."""
    text = json.dumps({"onnx": onnx_sha256, "options": options, "tensorrt": tensorrt_version, "gpu": gpu_name},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class EngineEntry:
    stage: str
    file: str  # relative to the engine directory
    key: str
    onnx_sha256: str
    profile: dict  # EngineProfile.to_dict() + per-input (min, opt, max) shapes
    options: dict
    engine_sha256: str = ""  # the engine file's, so a corrupt or replaced file is caught at load


@dataclass
class EngineIndex:
    """``<bundle>/engines/index.json``: which engine file serves each stage, for which TensorRT and GPU."""

    tensorrt_version: str
    gpu: str
    axes: dict[str, int]
    targets: dict
    engines: dict[str, EngineEntry] = field(default_factory=dict)

    @staticmethod
    def path(bundle_root: Path) -> Path:
        return Path(bundle_root) / ENGINE_DIR / ENGINE_INDEX

    @classmethod
    def load(cls, bundle_root: Path) -> "EngineIndex":
        path = cls.path(bundle_root)
        if not path.is_file():
            raise EnginePlanError(f"{bundle_root} has no TensorRT engines ({path} is missing): build them with "
                                  f"`keystep engines {bundle_root}` on the GPU machine")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise EnginePlanError(f"unreadable engine index {path}: {exc}") from None
        try:
            index = EngineIndexFile.model_validate(data)
        except ValidationError as exc:
            raise EnginePlanError(f"{path}: {first_error(exc)}") from None
        engines = {k: EngineEntry(**e.model_dump()) for k, e in index.engines.items()}  # profile keeps its shapes
        return cls(index.tensorrt_version, index.gpu, dict(index.axes), dict(index.targets), engines)

    def save(self, bundle_root: Path) -> Path:
        """Write atomically: a crashed build leaves the previous index (and its engines) valid."""
        path = self.path(bundle_root)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"tensorrt_version": self.tensorrt_version, "gpu": self.gpu, "axes": self.axes,
                "targets": self.targets, "engines": {k: vars(v) for k, v in sorted(self.engines.items())}}
        write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
        return path

    def entry(self, stage: str) -> EngineEntry:
        if stage not in self.engines:
            raise EnginePlanError(f"no TensorRT engine for stage {stage!r} (built: {', '.join(self.engines)}); "
                                  f"rebuild the engines for the plans you run")
        return self.engines[stage]

    def check_matches(self, tensorrt_version: str, gpu: str) -> None:
        if (self.tensorrt_version, self.gpu) != (tensorrt_version, gpu):
            raise EnginePlanError(
                f"the engines were built with TensorRT {self.tensorrt_version} for {self.gpu!r}; this is TensorRT "
                f"{tensorrt_version} on {gpu!r}: rebuild them (engines are specific to both)")


def check_batch(entry: EngineEntry, batch: int) -> None:
    """A call outside the engine's profile would fail deep in TensorRT: name the fix instead."""
    low, high = entry.profile["min"], entry.profile["max"]
    if not low <= batch <= high:
        raise EnginePlanError(
            f"stage {entry.stage!r} engine takes batches {low}..{high}; this call has {batch} rows. Rebuild the "
            f"engines with the plans/image counts you run (--engine-plans/--engine-images)")
