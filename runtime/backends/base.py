"""The one small interface every backend implements: load a stage, run it on named numpy arrays."""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from ..bundle import StageSpec


class BackendError(RuntimeError):
    """A backend is unavailable here or failed to load/run a stage."""


class StageRunner(Protocol):
    spec: StageSpec

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str

    def load(self, spec: StageSpec) -> StageRunner: ...


def check_feeds(spec: StageSpec, feeds: dict[str, np.ndarray]) -> None:
    """Name the wrong input before a backend fails with its own, vaguer message."""
    expected = {io.name for io in spec.inputs}
    if set(feeds) != expected:
        raise BackendError(f"stage {spec.name!r}: inputs {sorted(feeds)} given, {sorted(expected)} expected")
    batch = None
    for io in spec.inputs:
        arr = feeds[io.name]
        if arr.dtype != np.dtype(io.dtype):
            raise BackendError(f"stage {spec.name!r} input {io.name!r}: dtype {arr.dtype}, expected {io.dtype}")
        if len(arr.shape) != len(io.shape) or any(d != "batch" and d != a for d, a in zip(io.shape, arr.shape)):
            raise BackendError(f"stage {spec.name!r} input {io.name!r}: shape {arr.shape}, expected {io.shape}")
        batch = arr.shape[0] if batch is None else batch
        if arr.shape[0] != batch:
            raise BackendError(f"stage {spec.name!r}: inputs disagree on the batch size")


# name -> (module, class); imported lazily so a missing optional backend only fails when it is asked for
_BACKENDS = {
    "onnxruntime": ("keystep.runtime.backends.onnxruntime", "OnnxRuntimeBackend"),
    "openvino": ("keystep.runtime.backends.openvino", "OpenVINOBackend"),
}


def get_backend(name: str, **options) -> Backend:
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(_BACKENDS)}")
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(**options)
