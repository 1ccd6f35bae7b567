"""OpenVINO backend (CPU): reads the same ONNX stages; precision hint f32, or bf16 where the CPU has it."""

from __future__ import annotations

import threading

import numpy as np

from ..bundle import StageSpec
from .base import BackendError, check_feeds, check_graph_io, import_optional, stage_failed

PRECISIONS = ("f32", "bf16")


class OpenVINORunner:
    thread_safe = True  # one infer request per calling thread; the compiled model is shared

    def __init__(self, spec: StageSpec, compiled):
        self.spec = spec
        self._compiled = compiled
        self._local = threading.local()
        check_graph_io(spec, [i.any_name for i in compiled.inputs], [o.any_name for o in compiled.outputs])
        self._outputs = [(o.name, compiled.output(o.name)) for o in spec.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        try:
            result = request.infer(feeds)
        except Exception as exc:  # OpenVINO's RuntimeError subclasses
            raise stage_failed(self.spec, exc) from exc
        # results alias the request's buffers, which the next call overwrites: copy out
        return {name: np.array(result[port]) for name, port in self._outputs}


class OpenVINOBackend:
    name = "openvino"
    batches_decoders = False  # CPU only

    def __init__(self, threads: int | None = None, precision: str = "f32"):
        self._ov = import_optional("openvino", "openvino", "'keystep[openvino]'")
        self._core = self._ov.Core()
        if precision not in PRECISIONS:
            raise BackendError(f"openvino precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        capabilities = self._core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if precision == "bf16" and "BF16" not in capabilities:
            raise BackendError(f"this CPU has no bf16 support for OpenVINO (capabilities: {', '.join(capabilities)})")
        self.precision = precision
        self.config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads

    def load(self, spec: StageSpec) -> OpenVINORunner:
        try:
            compiled = self._core.compile_model(str(spec.path), "CPU", self.config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long messages
            raise BackendError(f"openvino cannot compile stage {spec.name!r} from {spec.path}: {exc}") from exc
        return OpenVINORunner(spec, compiled)
