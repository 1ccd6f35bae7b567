"""ONNX Runtime on NVIDIA GPUs: the CUDA and TensorRT execution providers, IO binding and CUDA graphs.

Every stage runs through an IO binding whose device buffers are allocated once per input-shape key and reused, so a
CUDA graph captured for that key replays on the same addresses (ORT's constraint: "shapes of inputs/outputs cannot
change across inference calls", same virtual addresses).

CUDA EP: ORT >= 1.18 keeps one graph per run-config ``gpu_graph_id`` (ids from 1: -1 means "no graph" and 0 is the
id of runs that set none); a plan has few distinct (stage, batch) calls, so each key gets its own graph up to
``max_cuda_graphs`` per stage (the scheme of ORT's own ``GpuBindingManager``). Older ORT captures one graph per
session and replays it for every shape, so graphs with it are refused.

TensorRT EP: ORT documents ``gpu_graph_id`` for the CUDA EP only (the PR that added it says the TensorRT EP has not
applied it), so a graph-enabled TensorRT EP session would replay its first shape's graph for every shape. Such a
session is given one shape: a stage whose plans call it with several shapes runs without graphs; a stage with one
planned shape (or unknown shapes) is captured for its first shape, and any other shape runs on a second session
without graphs. The engine and timing cache directories (``<bundle>/engines/ort-trt``) are created first: the EP
creates them non-recursively and fails when ``<bundle>/engines`` is missing.

The binding logic is device-agnostic and runs on the CPU provider in the tests; only the provider options and graph
capture need a GPU.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from ..bundle import Bundle, StageSpec, parse_dim
from ..engine_plan import EngineTargets, free_axes, plan_shape_ranges
from .base import BackendError, check_feeds, import_optional

NO_GRAPH = -1  # gpu_graph_id that runs the session without capturing or replaying a graph
FIRST_GRAPH_ID = 1  # 0 is the graph of runs that set no gpu_graph_id
MULTI_GRAPH_ORT = (1, 18)  # the first ORT that keeps several CUDA graphs per session (run config gpu_graph_id)
ShapeKey = tuple[tuple[int, ...], ...]  # the input shapes of a call, in the spec's input order
ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (min, opt, max) of one input


def _flag(value: bool) -> str:
    # "True"/"False" is what both the CUDA EP's and the (older) TensorRT EP's option parsers accept
    return "True" if value else "False"


def cuda_provider_options(device_id: int, cuda_graphs: bool) -> dict[str, str]:
    return {"device_id": str(device_id), "enable_cuda_graph": _flag(cuda_graphs)}


def format_profile_shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    """TensorRT EP profile syntax: ``latent:1x4x32x32,timestep:1``."""
    return ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in shapes.items())


def engine_cache_dir(spec: StageSpec) -> Path:
    """TensorRT engines live with the bundle they were built from (the stage graph sits in the bundle dir)."""
    return spec.path.parent / "engines" / "ort-trt"


def tensorrt_provider_options(spec: StageSpec, device_id: int, cuda_graphs: bool,
                              shape_ranges: dict[str, ShapeRange] | None = None) -> dict[str, str]:
    cache = str(engine_cache_dir(spec))
    options = {
        "device_id": str(device_id),
        "trt_cuda_graph_enable": _flag(cuda_graphs),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,  # the default is the working directory
    }
    if shape_ranges:
        for i, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
            options[key] = format_profile_shapes({name: r[i] for name, r in shape_ranges.items()})
    return options


def output_shapes(spec: StageSpec, key: ShapeKey) -> dict[str, tuple[int, ...]] | None:
    """The outputs' shapes for these input shapes from the spec's symbolic axes; None when an output has an axis the
    inputs do not bind (the runner then learns the shapes from a first run)."""
    sizes = {}
    for io, shape in zip(spec.inputs, key):
        for dim, got in zip(io.shape, shape):
            if not isinstance(dim, int):
                factor, axis = parse_dim(dim)
                sizes[axis] = got // factor
    try:
        return {io.name: io.concrete(sizes) for io in spec.outputs}
    except KeyError:
        return None


class GraphIds:
    """Shape key -> CUDA graph id for one session: a new id per new key until ``limit``, then NO_GRAPH (one warning,
    since every further new shape then runs un-captured)."""

    def __init__(self, limit: int, stage: str):
        self.limit = limit
        self.stage = stage
        self._ids: dict[ShapeKey, int] = {}
        self._warned = False

    def __call__(self, key: ShapeKey) -> int:
        if key in self._ids:
            return self._ids[key]
        if len(self._ids) < self.limit:
            self._ids[key] = FIRST_GRAPH_ID + len(self._ids)
            return self._ids[key]
        if not self._warned:
            self._warned = True
            warnings.warn(f"stage {self.stage!r}: {self.limit} CUDA graphs captured (max_cuda_graphs); input shapes "
                          f"{key} and any further new shapes run without a graph", stacklevel=3)
        return NO_GRAPH

    def __len__(self) -> int:
        return len(self._ids)


class ShapeBinding:
    """An IO binding over device buffers for one input-shape key. Outputs are preallocated when the spec gives their
    shapes; otherwise ORT allocates them on the first run and their shapes fix the buffers from then on."""

    def __init__(self, ort, session, spec: StageSpec, key: ShapeKey, device: str, device_id: int):
        self._ort = ort
        self._device = (device, device_id)
        self._output_names = [io.name for io in spec.outputs]
        self.binding = session.io_binding()
        self.buffers = {}
        for io, shape in zip(spec.inputs, key):
            self.buffers[io.name] = self._allocate(shape, io.dtype)
            self.binding.bind_ortvalue_input(io.name, self.buffers[io.name])
        self._output_dtypes = {io.name: io.dtype for io in spec.outputs}
        shapes = output_shapes(spec, key)
        self.outputs_bound = shapes is not None
        if shapes is None:
            for name in self._output_names:
                self.binding.bind_output(name, device, device_id)
        else:
            self._bind_outputs(shapes)

    def _allocate(self, shape, dtype: str):
        return self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype), *self._device)

    def _bind_outputs(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for name in self._output_names:
            self.buffers[name] = self._allocate(shapes[name], self._output_dtypes[name])
            self.binding.bind_ortvalue_output(name, self.buffers[name])
        self.outputs_bound = True

    @property
    def nbytes(self) -> int:
        return sum(v.tensor_size_in_bytes() for v in self.buffers.values())

    def run(self, session, feeds: dict[str, np.ndarray], run_options) -> dict[str, np.ndarray]:
        for name, value in feeds.items():
            self.buffers[name].update_inplace(np.ascontiguousarray(value))
        self.binding.synchronize_inputs()
        session.run_with_iobinding(self.binding, run_options)
        self.binding.synchronize_outputs()
        # host copies: the buffers are overwritten by the next call with this key
        result = dict(zip(self._output_names, self.binding.copy_outputs_to_cpu()))
        if not self.outputs_bound:
            self._bind_outputs({name: value.shape for name, value in result.items()})
        return result


class IOBindingRunner:
    """Runs a stage through per-shape bindings. Keys with a CUDA graph keep their binding (the graph replays on its
    addresses); other keys share one binding, rebuilt when the shape changes, so un-graphed memory stays bounded.

    ``graph_ids``: a graph per shape key (CUDA EP). ``fallback_session``: the session's provider captures one graph
    per session (TensorRT EP): the first key runs on ``session`` (the provider captures it), every other key on the
    graph-less session this factory makes, created on first need."""

    def __init__(self, ort, spec: StageSpec, session, device: str = "cpu", device_id: int = 0,
                 graph_ids: GraphIds | None = None, fallback_session=None):
        self._ort = ort
        self.spec = spec
        self._session = session
        self._device = (device, device_id)
        self._graph_ids = graph_ids
        self._fallback_factory = fallback_session
        self._fallback = None
        self._graphed_key: ShapeKey | None = None
        self._graphed: dict[ShapeKey, ShapeBinding] = {}
        self._eager: tuple[ShapeKey, ShapeBinding] | None = None
        self._run_options: dict[int | None, object] = {}

    def _options(self, graph_id: int | None):
        if graph_id not in self._run_options:
            options = self._ort.RunOptions()
            if graph_id is not None:
                options.add_run_config_entry("gpu_graph_id", str(graph_id))
            self._run_options[graph_id] = options
        return self._run_options[graph_id]

    def _binding(self, key: ShapeKey, graphed: bool, session) -> ShapeBinding:
        if graphed:
            if key not in self._graphed:
                self._graphed[key] = ShapeBinding(self._ort, session, self.spec, key, *self._device)
            return self._graphed[key]
        if self._eager is None or self._eager[0] != key:
            self._eager = None  # drop the old buffers before allocating the new ones
            self._eager = (key, ShapeBinding(self._ort, session, self.spec, key, *self._device))
        return self._eager[1]

    def _fallback_session(self, key: ShapeKey):
        if self._fallback is None:
            warnings.warn(f"stage {self.spec.name!r}: this provider keeps one CUDA graph per session (captured for "
                          f"input shapes {self._graphed_key}); shapes {key} and any other run on a second session "
                          f"without graphs", stacklevel=3)
            self._fallback = self._fallback_factory()
        return self._fallback

    @property
    def graph_count(self) -> int:
        if self._fallback_factory is not None:
            return int(self._graphed_key is not None)
        return len(self._graph_ids) if self._graph_ids is not None else 0

    @property
    def session_count(self) -> int:
        return 1 + (self._fallback is not None)

    @property
    def buffer_bytes(self) -> int:
        bindings = list(self._graphed.values()) + ([self._eager[1]] if self._eager else [])
        return sum(b.nbytes for b in bindings)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        key = tuple(tuple(feeds[io.name].shape) for io in self.spec.inputs)
        session = self._session
        if self._fallback_factory is not None:
            self._graphed_key = self._graphed_key or key
            graphed, graph_id = key == self._graphed_key, None  # the provider captures its session's one shape
            if not graphed:
                session = self._fallback_session(key)
        else:
            graph_id = self._graph_ids(key) if self._graph_ids is not None else NO_GRAPH
            graphed = graph_id != NO_GRAPH
        binding = self._binding(key, graphed, session)
        if not binding.outputs_bound and graph_id is not None:
            graph_id = NO_GRAPH  # a graph must not capture ORT-allocated outputs that are rebound after this run
        try:
            return binding.run(session, feeds, self._options(graph_id))
        except Exception as exc:  # ORT raises its own exception types
            raise BackendError(f"onnxruntime ({self._device[0]}) failed running stage {self.spec.name!r} on input "
                               f"shapes {key}: {exc}") from exc


class IOBindingBackend:
    """An ORT session per stage behind an :class:`IOBindingRunner`. Parameterised by device and providers so the
    binding logic is testable with the CPU provider; the GPU backends below only choose providers, options and how
    their provider keeps CUDA graphs (:meth:`graph_mode`)."""

    name = "onnxruntime-iobinding"

    def __init__(self, device: str = "cpu", device_id: int = 0, cuda_graphs: bool = False, max_cuda_graphs: int = 16,
                 providers: list | None = None):
        self._ort = import_optional("onnxruntime", self.name, "onnxruntime")
        self.device = device
        self.device_id = device_id
        self.cuda_graphs = cuda_graphs
        self.max_cuda_graphs = max_cuda_graphs
        self._providers = providers or ["CPUExecutionProvider"]
        self.batches_decoders = device != "cpu"  # GPUs gain from batching a group's decoders (see base.Backend)
        self._runners: list[IOBindingRunner] = []

    def providers_for(self, spec: StageSpec, cuda_graphs: bool) -> list:
        return self._providers

    def graph_mode(self, spec: StageSpec) -> str:
        """How this stage's session keeps CUDA graphs: ``per-shape`` (a gpu_graph_id per input-shape key),
        ``single-shape`` (one per session) or ``off``."""
        return "per-shape"

    def _session(self, spec: StageSpec, providers: list):
        options = self._ort.SessionOptions()
        options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # nodes left on the CPU would otherwise busy-wait between GPU calls (see onnxruntime.py)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = self._ort.InferenceSession(str(spec.path), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for invalid graphs and unsupported nodes
            hint = " (CUDA graphs need every node on the GPU: try cuda_graphs=False)" if self.cuda_graphs else ""
            raise BackendError(f"{self.name} cannot load stage {spec.name!r} from {spec.path}: {exc}{hint}") from exc
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        # ORT's Python API retries a failed GPU provider on the next one with only a log line; say so instead
        if wanted not in session.get_providers():
            raise BackendError(f"{self.name}: stage {spec.name!r} did not load on {wanted} (session providers: "
                               f"{session.get_providers()}); check the CUDA/TensorRT installation")
        return session

    def load(self, spec: StageSpec) -> IOBindingRunner:
        mode = self.graph_mode(spec) if self.cuda_graphs else "off"
        session = self._session(spec, self.providers_for(spec, mode != "off"))
        graph_ids = GraphIds(self.max_cuda_graphs, spec.name) if mode == "per-shape" else None
        fallback = (lambda: self._session(spec, self.providers_for(spec, False))) if mode == "single-shape" else None
        runner = IOBindingRunner(self._ort, spec, session, self.device, self.device_id, graph_ids, fallback)
        self._runners.append(runner)
        return runner

    @property
    def graph_count(self) -> int:
        return sum(r.graph_count for r in self._runners)

    def stats(self) -> dict[str, int]:
        """For profile/inspect: graph ids handed out (ORT captures each after its warm-up runs) and bound memory."""
        return {"stages": len(self._runners), "sessions": sum(r.session_count for r in self._runners),
                "cuda_graphs": self.graph_count, "buffer_bytes": sum(r.buffer_bytes for r in self._runners)}


def require_providers(backend: str, providers: list[str], needs: str) -> None:
    ort = import_optional("onnxruntime", backend, "onnxruntime-gpu")
    available = ort.get_available_providers()
    if not set(providers) <= set(available):
        raise BackendError(f"{backend} needs {needs}; this onnxruntime has providers [{', '.join(available)}]: "
                           f"pip uninstall onnxruntime && pip install onnxruntime-gpu")


def require_graph_support(ort, backend: str) -> None:
    """Several CUDA graphs per session (one per input shape, selected by gpu_graph_id) need ORT >= 1.18."""
    version = tuple(int(x) for x in re.findall(r"\d+", ort.__version__)[:2])
    if version < MULTI_GRAPH_ORT:
        raise BackendError(f"{backend}: CUDA graphs for the plan's several input shapes need onnxruntime-gpu >= "
                           f"{'.'.join(map(str, MULTI_GRAPH_ORT))} (this is {ort.__version__}, which replays one "
                           f"graph for every shape): upgrade onnxruntime-gpu, or run without graphs "
                           f"(--no-cuda-graphs)")


class OnnxRuntimeCudaBackend(IOBindingBackend):
    name = "onnxruntime-cuda"

    def __init__(self, device_id: int = 0, cuda_graphs: bool = True, max_cuda_graphs: int = 16,
                 threads: int | None = None):
        # ``threads`` is accepted for the CLI's sake: the intra-op pool only serves nodes left on the CPU
        require_providers(self.name, ["CUDAExecutionProvider"], "the onnxruntime-gpu package and a CUDA device")
        super().__init__("cuda", device_id, cuda_graphs, max_cuda_graphs)
        if cuda_graphs:
            require_graph_support(self._ort, self.name)

    def providers_for(self, spec: StageSpec, cuda_graphs: bool) -> list:
        return [("CUDAExecutionProvider", cuda_provider_options(self.device_id, cuda_graphs))]


class OnnxRuntimeTensorRTBackend(IOBindingBackend):
    """TensorRT engines (cached in the bundle) with the CUDA EP for the nodes TensorRT does not take.
    ``shape_ranges``: per stage name, per dynamic input, (min, opt, max) shapes; by default the bundle's default
    plan and baseline at one image (:func:`keystep.runtime.engine_plan.plan_shape_ranges`, as ``keystep engines``
    builds). Bundles with spatial axes (UNets) get none: TensorRT then builds for the shapes it sees and rebuilds
    when a new one falls outside."""

    name = "onnxruntime-tensorrt"

    def __init__(self, device_id: int = 0, cuda_graphs: bool = True, max_cuda_graphs: int = 16,
                 shape_ranges: dict[str, dict[str, ShapeRange]] | None = None, threads: int | None = None):
        # ``threads`` is accepted for the CLI's sake: the intra-op pool only serves nodes left on the CPU
        require_providers(self.name, ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
                          "the onnxruntime-gpu package, TensorRT and a CUDA device")
        super().__init__("cuda", device_id, cuda_graphs, max_cuda_graphs)
        self.shape_ranges = shape_ranges
        self._plan_ranges: dict = {}  # bundle root -> ranges derived from its plans

    def ranges_for(self, spec: StageSpec) -> dict[str, ShapeRange] | None:
        if self.shape_ranges is not None:
            return self.shape_ranges.get(spec.name)
        root = spec.path.parent
        if root not in self._plan_ranges:  # once per bundle, not once per stage
            bundle = Bundle.load(root, verify=False)
            self._plan_ranges[root] = {} if free_axes(bundle) else plan_shape_ranges(bundle, EngineTargets(), {})
        return self._plan_ranges[root].get(spec.name)

    def graph_mode(self, spec: StageSpec) -> str:
        """One graph per TensorRT EP session: off where the plans call the stage with several shapes."""
        ranges = self.ranges_for(spec)
        varying = {name: (r[0], r[2]) for name, r in (ranges or {}).items() if r[0] != r[2]}
        if varying:
            warnings.warn(f"{self.name}: stage {spec.name!r} is called with several input shapes ({varying}) and the "
                          f"TensorRT EP keeps one CUDA graph per session: it runs without graphs (onnxruntime-cuda "
                          f"and tensorrt capture one per shape)", stacklevel=3)
            return "off"
        return "single-shape"

    def providers_for(self, spec: StageSpec, cuda_graphs: bool) -> list:
        engine_cache_dir(spec).mkdir(parents=True, exist_ok=True)  # the EP's own mkdir is not recursive
        trt = tensorrt_provider_options(spec, self.device_id, cuda_graphs, self.ranges_for(spec))
        # fallback only: a session captures a CUDA graph when one provider (here TensorRT) holds every node
        return [("TensorrtExecutionProvider", trt),
                ("CUDAExecutionProvider", cuda_provider_options(self.device_id, cuda_graphs=False))]
