"""Build a bundle's TensorRT engines (``keystep engines`` / ``keystep build --backend tensorrt``).

One engine per stage the target plans call (every width profile and cache stage is its own stage), each with one
optimisation profile whose min/opt/max batch come from the plans' call sizes (:mod:`keystep.runtime.engine_plan`).
The ONNX is cleaned and constant-folded, checked for TensorRT compatibility, then built through Polygraphy's Python
API, strongly typed (TensorRT 11 has no precision flags: the graph's own types are the precision; see
``keystep build --precision``). Engines are cached by a key over the graph's sha256, the build options (profile
shapes included), the TensorRT version and the GPU name: unchanged inputs never rebuild.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from keystep.runtime.bundle import Bundle, sha256_file
from keystep.runtime.engine_plan import (
    ENGINE_DIR, EngineEntry, EngineIndex, EnginePlanError, EngineTargets, engine_cache_key, free_axes,
    profiles_from_calls, write_atomic,
)
from keystep.runtime.errors import KeystepError


class EngineBuildError(KeystepError, RuntimeError):
    """TensorRT or a GPU is missing, a graph cannot be built, or the sizes needed for the profiles are unknown."""


@dataclass(frozen=True)
class EngineBuildOptions:
    opt_level: int = 3  # builder optimisation level (demoDiffusion's default; 4-5 build much longer)
    tf32: bool = False  # float32 graphs on TF32 tensor cores: faster, ~1e-3 relative error
    refit: bool = False  # refittable engines (swap weights without rebuilding; some fusions are lost)
    timing_cache: str | None = None  # shared across builds; speeds up building, does not change the engine's key

    def key_fields(self) -> dict:
        return {"opt_level": self.opt_level, "tf32": self.tf32, "refit": self.refit}


def tensorrt_environment(device_id: int = 0) -> tuple[str, str]:
    """(TensorRT version, GPU name), or a clear error on machines that cannot build engines."""
    try:
        import tensorrt
    except ImportError:
        raise EngineBuildError("building TensorRT engines needs the tensorrt package and an NVIDIA GPU: "
                               "pip install 'keystep[tensorrt]' on the GPU machine") from None
    from keystep.runtime.backends.base import BackendError
    from keystep.runtime.backends.cuda import Cuda

    try:
        return tensorrt.__version__, Cuda(device_id).device_name
    except BackendError as exc:
        raise EngineBuildError(str(exc)) from None


def bundle_axes(bundle: Bundle, sizes: dict[str, int] | None = None) -> dict[str, int]:
    """Sizes of every non-batch symbolic axis, from ``sizes`` plus shape inference: a stage whose inputs are all
    bound is shape-inferred and its outputs bind further axes (the UNet encoder's skips give the per-level sizes).
    UNet (and IF stage) bundles default height/width to the model's sample size, and an axis named like a model_config
    field (text_len) to that field."""
    from keystep.graphs.flops import inferred_shapes
    from keystep.runtime.bundle import parse_dim

    axes = dict(sizes or {})
    config = bundle.model_config
    sample = config.get("sample_size")
    if bundle.family in ("unet", "unet3d", "if") and sample:  # IF stages: pixel space, the sample size is the image's
        axes.setdefault("height", sample[0])
        axes.setdefault("width", sample[1])
    if isinstance(config.get("num_frames"), int):  # text-to-video: the frames axis at the bundle's default count
        axes.setdefault("frames", config["num_frames"])
    wanted = free_axes(bundle)
    axes.update({k: config[k] for k in wanted - set(axes) if isinstance(config.get(k), int)})  # e.g. text_len
    pending = dict(bundle.stages)
    while wanted - set(axes) and pending:
        ready = [name for name, spec in pending.items()
                 if all(parse_dim(d)[1] in axes or parse_dim(d)[1] == "batch"
                        for io in spec.inputs for d in io.shape if isinstance(d, str))]
        if not ready:
            break
        for name in ready:
            spec = pending.pop(name)
            shapes = inferred_shapes(spec.path, {io.name: io.concrete({**axes, "batch": 1}) for io in spec.inputs})
            for io in spec.outputs:
                for dim, got in zip(io.shape, shapes.get(io.name, ())):
                    if isinstance(dim, str) and isinstance(got, int):
                        factor, axis = parse_dim(dim)
                        if axis != "batch":
                            axes.setdefault(axis, got // factor)
    missing = sorted(wanted - set(axes))
    if missing:
        raise EngineBuildError(f"cannot size axes {missing} of {bundle.root}: give them as NAME=SIZE (--axis)")
    return {k: axes[k] for k in sorted(axes)}


def polygraphy_config(shapes: dict[str, tuple], options: EngineBuildOptions):
    """Polygraphy's profile and builder config for one engine (no TensorRT needed to construct them)."""
    from polygraphy.backend.trt import CreateConfig, Profile

    profile = Profile()
    for name, (low, opt, high) in shapes.items():
        profile.add(name, min=low, opt=opt, max=high)
    # no fp16=/bf16=: TensorRT 11 is strongly typed and rejects precision flags
    config = CreateConfig(tf32=options.tf32, profiles=[profile], builder_optimization_level=options.opt_level,
                          refittable=options.refit, load_timing_cache=options.timing_cache)
    return profile, config


def polygraphy_compile(onnx_path: Path, shapes: dict[str, tuple], options: EngineBuildOptions) -> bytes:
    """Serialized engine bytes for one ONNX graph and its profile (Polygraphy's Python API, no shell-outs)."""
    from polygraphy.backend.trt import engine_bytes_from_network, network_from_onnx_path

    _, config = polygraphy_config(shapes, options)
    network = network_from_onnx_path(str(onnx_path), strongly_typed=True)
    try:
        return engine_bytes_from_network(network, config=config, save_timing_cache=options.timing_cache)
    except Exception as exc:  # Polygraphy raises PolygraphyException with TensorRT's parser/builder log
        raise EngineBuildError(f"TensorRT could not build {onnx_path.name}: {exc}") from exc


def build_engines(
    bundle_root: str | Path,
    targets: EngineTargets = EngineTargets(),
    options: EngineBuildOptions = EngineBuildOptions(),
    sizes: dict[str, int] | None = None,
    environment: tuple[str, str] | None = None,
    compile_engine=polygraphy_compile,
    progress=lambda msg: print(msg, file=sys.stderr),
) -> EngineIndex:
    """Build (or reuse) every engine the target plans need and write ``engines/index.json`` last, atomically.
    ``environment`` and ``compile_engine`` default to this machine's TensorRT and GPU."""
    root = Path(bundle_root)
    bundle = Bundle.load(root)
    trt_version, gpu = environment or tensorrt_environment()
    axes = bundle_axes(bundle, sizes)
    try:
        profiles = profiles_from_calls(targets.call_list(bundle))
    except EnginePlanError as exc:
        raise EngineBuildError(str(exc)) from None
    index = EngineIndex(trt_version, gpu, axes, targets.to_dict())
    engine_dir = root / ENGINE_DIR
    engine_dir.mkdir(exist_ok=True)
    for i, (stage, profile) in enumerate(sorted(profiles.items()), 1):
        spec = bundle.stage(stage)
        shapes = profile.input_shapes(spec, axes)
        build_options = {**options.key_fields(), "shapes": {n: [list(s) for s in v] for n, v in shapes.items()}}
        onnx_sha = bundle.manifest["stages"][stage]["files"][0]["sha256"]
        key = engine_cache_key(onnx_sha, build_options, trt_version, gpu)
        path = engine_dir / f"{stage}.{key[:16]}.plan"
        batches = f"batch {profile.min}..{profile.max} (opt {profile.opt})"
        if path.is_file():
            progress(f"{bar(i, len(profiles))} {stage}: {batches}, cached")
        else:
            progress(f"{bar(i - 1, len(profiles))} building {stage}: {batches} ...")
            start = time.perf_counter()
            write_atomic(path, compile_stage(spec.path, shapes, tuple(axes), options, compile_engine, progress))
            progress(f"{bar(i, len(profiles))} {stage}: {batches}, built in {time.perf_counter() - start:.1f} s")
        index.engines[stage] = EngineEntry(stage, path.name, key, onnx_sha,
                                           {**profile.to_dict(), "shapes": build_options["shapes"]},
                                           options.key_fields(), sha256_file(path))
    index.save(root)
    used = {e.file for e in index.engines.values()}
    for stale in engine_dir.glob("*.plan"):
        if stale.name not in used:
            stale.unlink()
    return index


def compile_stage(onnx_path: Path, shapes: dict, fixed_axes: tuple[str, ...], options: EngineBuildOptions,
                  compile_engine, progress) -> bytes:
    """Clean and fold the graph, refuse what TensorRT cannot parse (warnings are printed), then compile.
    ``fixed_axes``: the non-batch axes the profile pins to one size, which then cannot block CUDA graphs."""
    from .cleanup import cleanup_graph
    from .trt_check import check_tensorrt, format_issues

    issues = check_tensorrt(onnx_path, static_axes_ok=("batch", *fixed_axes))
    errors = [i for i in issues if i.severity == "error"]
    if issues:
        progress(format_issues(issues))
    if errors:
        raise EngineBuildError(f"{onnx_path.name}: {len(errors)} TensorRT incompatibilities (listed above)")
    with tempfile.TemporaryDirectory() as tmp:
        cleaned = Path(tmp) / onnx_path.name
        cleanup_graph(onnx_path, cleaned, log=progress)
        return compile_engine(cleaned, shapes, options)


def bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
