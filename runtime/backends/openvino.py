"""OpenVINO backend (CPU): reads the same ONNX stages; precision hint f32, or bf16 where the CPU has it.

Shapes: with ``static_shapes`` each stage is compiled once per distinct set of input shapes it is called with (the
graph read, reshaped to those shapes, compiled, cached): a plan calls each stage at a few fixed shapes, all known
before sampling. Measured (docs/benchmarks.md, "OpenVINO static shapes"): under bf16 the static compiles ran the
SD-like UNet 1.15-1.34x faster than the dynamic graph and DiT-S/2 as fast; under f32 they were no faster (DiT-S/2,
interleaved A/B: 3 % slower). So the default is static for bf16 and dynamic for f32.
"""

from __future__ import annotations

import threading

import numpy as np

from ..bundle import StageSpec
from .base import BackendError, check_feeds, check_graph_io, import_optional, stage_failed

PRECISIONS = ("f32", "bf16")


class OpenVINORunner:
    thread_safe = True  # one infer request per calling thread and shape; the compiled models are shared

    def __init__(self, spec: StageSpec, compile_for, static_shapes: bool):
        """``compile_for(shapes)`` compiles the stage for ``{input: shape}`` (None: the dynamic graph)."""
        self.spec = spec
        self._compile_for = compile_for
        self._static = static_shapes
        self._compiled: dict = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        model = compile_for.model
        check_graph_io(spec, [i.any_name for i in model.inputs], [o.any_name for o in model.outputs])
        if not static_shapes:
            self._compiled[None] = compile_for(None)

    @property
    def compiled_shapes(self) -> list:
        """The input shapes compiled so far (one entry, None, for a dynamic compile)."""
        return list(self._compiled)

    def _compiled_for(self, key):
        compiled = self._compiled.get(key)
        if compiled is None:
            with self._lock:  # one compile per shape, even when several threads ask at once
                compiled = self._compiled.get(key)
                if compiled is None:
                    compiled = self._compiled[key] = self._compile_for(dict(key))
        return compiled

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        key = tuple(sorted((name, tuple(a.shape)) for name, a in feeds.items())) if self._static else None
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        request = requests.get(key)
        try:
            if request is None:
                request = requests[key] = self._compiled_for(key).create_infer_request()
            result = request.infer(feeds)
        except BackendError:
            raise
        except Exception as exc:  # OpenVINO's RuntimeError subclasses
            raise stage_failed(self.spec, exc) from exc
        # results alias the request's buffers, which the next call overwrites: copy out
        return {o.name: np.array(result[o.name]) for o in self.spec.outputs}


class _StageCompiler:
    """Compiles one stage's graph: dynamic (``shapes=None``) or reshaped to static input shapes."""

    def __init__(self, backend: "OpenVINOBackend", spec: StageSpec):
        self._backend = backend
        self._spec = spec
        try:
            self.model = backend._core.read_model(str(spec.path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long messages
            raise BackendError(f"openvino cannot read stage {spec.name!r} from {spec.path}: {exc}") from exc

    def __call__(self, shapes: dict | None):
        core, spec = self._backend._core, self._spec
        try:
            if shapes is None:
                return core.compile_model(self.model, "CPU", self._backend.config)
            model = core.read_model(str(spec.path))  # reshape mutates: each shape gets its own copy
            model.reshape({name: list(shape) for name, shape in shapes.items()})
            return core.compile_model(model, "CPU", self._backend.config)
        except Exception as exc:
            at = "" if shapes is None else f" at input shapes {shapes}"
            raise BackendError(f"openvino cannot compile stage {spec.name!r}{at} from {spec.path}: "
                               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}") from exc


def openvino_capabilities() -> list[str] | None:
    """OpenVINO's CPU OPTIMIZATION_CAPABILITIES (``BF16``, ``FP32``, ...), or None without the openvino package."""
    try:
        import openvino
    except ImportError:
        return None
    return list(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class OpenVINOBackend:
    name = "openvino"
    batches_decoders = False  # CPU only

    def __init__(self, threads: int | None = None, precision: str = "f32", static_shapes: bool | None = None):
        self._ov = import_optional("openvino", "openvino", "'keystep[openvino]'")
        self._core = self._ov.Core()
        if precision not in PRECISIONS:
            raise BackendError(f"openvino precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        capabilities = self._core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if precision == "bf16" and "BF16" not in capabilities:
            raise BackendError(f"this CPU has no bf16 support for OpenVINO (capabilities: {', '.join(capabilities)})")
        self.precision = precision
        self.static_shapes = precision == "bf16" if static_shapes is None else static_shapes  # see the module doc
        self.config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads

    def describe(self) -> str:
        return f"openvino {self.precision}, {'static' if self.static_shapes else 'dynamic'} shapes"

    def load(self, spec: StageSpec) -> OpenVINORunner:
        return OpenVINORunner(spec, _StageCompiler(self, spec), self.static_shapes)
