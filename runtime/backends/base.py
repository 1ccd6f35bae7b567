"""The one small interface every backend implements: load a stage, run it on named numpy arrays."""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from ..bundle import StageSpec, parse_dim
from ..errors import KeystepError


class BackendError(KeystepError, RuntimeError):
    """A backend is unavailable here or failed to load/run a stage."""


class StageRunner(Protocol):
    spec: StageSpec

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str
    # Whether one decoder call over a whole key-step group beats one call per step. On GPUs batching fills idle
    # SMs; on a 2-core CPU the per-row cost grows with the batch (DiT-S/2 decoder: 38 ms/row at batch 2, 49 at 30),
    # so sequential decoders measured faster (docs/benchmarks.md).
    batches_decoders: bool

    def load(self, spec: StageSpec) -> StageRunner: ...


def check_feeds(spec: StageSpec, feeds: dict[str, np.ndarray]) -> None:
    """Name the wrong input before a backend fails with its own, vaguer message. Symbolic axes ("batch",
    "height", "8*height") must agree across inputs."""
    expected = {io.name for io in spec.inputs}
    if set(feeds) != expected:
        raise BackendError(f"stage {spec.name!r}: inputs {sorted(feeds)} given, {sorted(expected)} expected")
    bound: dict[str, int] = {}
    for io in spec.inputs:
        arr = feeds[io.name]
        if arr.dtype != np.dtype(io.dtype):
            raise BackendError(f"stage {spec.name!r} input {io.name!r}: dtype {arr.dtype}, expected {io.dtype}")
        ok = len(arr.shape) == len(io.shape)
        for want, got in zip(io.shape, arr.shape):
            if isinstance(want, int):
                ok = ok and want == got
                continue
            factor, axis = parse_dim(want)
            if got % factor or bound.setdefault(axis, got // factor) != got // factor:
                raise BackendError(
                    f"stage {spec.name!r} input {io.name!r}: shape {arr.shape} disagrees with the other inputs on "
                    f"axis {want!r} (expected {io.shape})")
        if not ok:
            raise BackendError(f"stage {spec.name!r} input {io.name!r}: shape {arr.shape}, expected {io.shape}")


def check_graph_io(spec: StageSpec, inputs: list[str], outputs: list[str]) -> None:
    """The manifest's I/O names must be the graph's: a disagreement (an edited manifest, a swapped file) is named
    at load instead of surfacing as a backend error mid-sampling."""
    for side, want, have in (("inputs", [i.name for i in spec.inputs], inputs),
                             ("outputs", [o.name for o in spec.outputs], outputs)):
        if sorted(want) != sorted(have):
            raise BackendError(f"stage {spec.name!r}: the manifest's {side} {sorted(want)} are not the graph's "
                               f"{sorted(have)} ({spec.path}); rebuild the bundle")


def stage_failed(spec: StageSpec, exc: BaseException) -> BackendError:
    """A backend's own failure while running a stage, as one line."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return BackendError(f"stage {spec.name!r} ({spec.path.name}) failed: {first[:300]}")


def import_optional(module: str, backend: str, install: str):
    """Import a backend's package lazily, so a missing optional backend fails only when it is asked for."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendError(f"the {backend} backend needs the '{module}' package: pip install {install}") from exc


# name -> (module, class); imported lazily so a missing optional backend only fails when it is asked for
_BACKENDS = {
    "onnxruntime": ("keystep.runtime.backends.onnxruntime", "OnnxRuntimeBackend"),
    "openvino": ("keystep.runtime.backends.openvino", "OpenVINOBackend"),
    "onnxruntime-cuda": ("keystep.runtime.backends.onnxruntime_gpu", "OnnxRuntimeCudaBackend"),
    "onnxruntime-tensorrt": ("keystep.runtime.backends.onnxruntime_gpu", "OnnxRuntimeTensorRTBackend"),
    "tensorrt": ("keystep.runtime.backends.tensorrt", "TensorRTBackend"),
}


def backend_names() -> list[str]:
    """Every registered backend, installed here or not (the CLI's --backend choices)."""
    return list(_BACKENDS)


def get_backend(name: str, **options) -> Backend:
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(_BACKENDS)}")
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(**options)
