"""TensorRT backend (TensorRT 11 Python API): the bundle's prebuilt engines, CUDA graphs per distinct call.

Engines come from ``keystep engines BUNDLE`` (or ``keystep build --backend tensorrt``), listed in
``<bundle>/engines/index.json`` (:mod:`keystep.runtime.engine_plan`). Loading a stage deserializes every engine of the
bundle once, because their activation memory is shared: one device allocation of the largest
``device_memory_size_v2``, handed to every execution context (``USER_MANAGED``). That is sound because stages
never run concurrently: the plan alternates encoder, decoders and cached stages on one stream.

The I/O tensors are the engine's own (``num_io_tensors``, ``get_tensor_mode``, ``get_tensor_dtype``), checked
against the bundle's stage at load: a missing or extra input, or a dtype that differs (an engine built from another
graph), fails there with the names, before any context exists. TensorRT types without a numpy equivalent (fp8, fp4,
int4) are refused; bf16 maps to ``ml_dtypes.bfloat16``.

Each distinct call shape (engine, input shapes) gets a *slot*: its own execution context with the input shapes set
once, preallocated device buffers for every input and output bound with ``set_tensor_address``, and after one
warm-up run a captured CUDA graph that later calls replay. Slots are keyed by every input's full shape, not the
batch alone: a UNet call at the same batch but another height/width needs its own shapes and buffers. A context per
slot (not per engine) keeps every captured graph valid: a graph bakes in shapes and addresses, and re-setting a
shared context for another shape would invalidate it. Calls copy their inputs into the slot's buffers, run (or
replay), and copy the outputs back; scheduler updates stay on the host for now.

:meth:`TensorRTBackend.close` (or ``with`` the backend) destroys the graphs and contexts and frees every device
allocation and the stream; a long-lived host that loads many bundles should call it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..bundle import StageSpec, parse_dim, sha256_file
from ..engine_plan import ENGINE_DIR, EngineIndex, EnginePlanError, check_batch
from .base import BackendError, check_feeds, import_optional
from .cuda import Cuda

ShapeKey = tuple[tuple[int, ...], ...]  # every input's shape, in the stage spec's input order


@dataclass(frozen=True)
class IOTensor:
    name: str
    is_input: bool
    dtype: np.dtype


@dataclass
class CallSlot:
    """The device side of one call shape: context, buffers and (after warm-up) its CUDA graph."""

    context: object
    inputs: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (device pointer, bytes)
    outputs: dict[str, tuple[int, tuple[int, ...], np.dtype]] = field(default_factory=dict)  # (pointer, shape, dtype)
    nbytes: int = 0
    runs: int = 0
    graph: object = None
    graph_failed: bool = False

    @property
    def pointers(self) -> list[int]:
        return [p for p, _ in self.inputs.values()] + [p for p, _, _ in self.outputs.values()]


def numpy_dtype(trt, dtype, stage: str, tensor: str) -> np.dtype:
    """The numpy dtype of a TensorRT I/O tensor. ``trt.nptype`` knows no bf16 (numpy has none) and raises a bare
    TypeError for it and for fp8/fp4/int4: bf16 maps to ml_dtypes' type, the others are refused by name."""
    if dtype == getattr(getattr(trt, "DataType", None), "BF16", object()):
        try:
            import ml_dtypes
        except ImportError:
            raise BackendError(f"stage {stage!r} tensor {tensor!r} is bfloat16 in the engine; numpy needs the "
                               f"ml_dtypes package for it: pip install ml_dtypes") from None
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        raise BackendError(f"stage {stage!r} tensor {tensor!r} has TensorRT type {dtype}, which has no numpy "
                           f"equivalent: keep the graph's inputs and outputs float32/float16 (fp8/fp4/int4 only "
                           f"inside the graph)") from None


def engine_io(trt, engine, stage: str) -> list[IOTensor]:
    """The engine's I/O tensors in its own order."""
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        tensors.append(IOTensor(name, is_input, numpy_dtype(trt, engine.get_tensor_dtype(name), stage, name)))
    return tensors


def check_engine_io(spec: StageSpec, io: list[IOTensor]) -> None:
    """The engine must take exactly the stage's inputs and produce at least its outputs, with the same dtypes."""
    inputs = {t.name: t for t in io if t.is_input}
    outputs = {t.name: t for t in io if not t.is_input}
    want_in = {i.name for i in spec.inputs}
    if set(inputs) != want_in:
        raise BackendError(f"stage {spec.name!r}: the engine's inputs {sorted(inputs)} are not the bundle's "
                           f"{sorted(want_in)} (engine built from another graph?): rebuild the engines")
    missing = [o.name for o in spec.outputs if o.name not in outputs]
    if missing:
        raise BackendError(f"stage {spec.name!r}: the engine has no output {missing} (outputs: {sorted(outputs)}): "
                           f"rebuild the engines")
    for want in spec.inputs + spec.outputs:
        got = (inputs if want.name in inputs else outputs)[want.name].dtype
        if got != np.dtype(want.dtype):
            raise BackendError(f"stage {spec.name!r} tensor {want.name!r} is {got} in the engine but {want.dtype} in "
                               f"the bundle: rebuild the engines from this bundle")


class EngineSet:
    """Every engine of one bundle, deserialized once, sharing one activation allocation."""

    def __init__(self, root, trt, runtime, cuda: Cuda):
        self.index = EngineIndex.load(root)
        self.index.check_matches(trt.__version__, cuda.device_name)
        self.engines = {}
        for stage, entry in self.index.engines.items():
            path = root / ENGINE_DIR / entry.file
            if not path.is_file():
                raise BackendError(f"TensorRT engine for stage {stage!r} is missing: {path}")
            if entry.engine_sha256 and sha256_file(path) != entry.engine_sha256:
                raise BackendError(f"TensorRT engine {path} does not match its index (corrupt or replaced): rebuild")
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BackendError(f"TensorRT cannot deserialize {path} (built by another TensorRT version?)")
            self.engines[stage] = engine
        self.memory_bytes = max((int(e.device_memory_size_v2) for e in self.engines.values()), default=0)
        self.memory = cuda.malloc(self.memory_bytes)


class TensorRTBackend:
    name = "tensorrt"
    batches_decoders = True  # a GPU is underused by one step's rows: batch a group's decoders

    def __init__(self, device_id: int = 0, cuda_graphs: bool = True, threads: int | None = None, trt=None, cuda=None):
        # threads: accepted for a uniform CLI; host threads do not matter here
        self._trt = trt or import_optional("tensorrt", "tensorrt", "'keystep[tensorrt]' on a machine with an NVIDIA GPU")
        self.cuda = cuda or Cuda(device_id)
        self.cuda_graphs = cuda_graphs
        self._runtime = self._trt.Runtime(self._trt.Logger(self._trt.Logger.WARNING))
        self._sets: dict[str, EngineSet] = {}
        self._runners: list[TensorRTRunner] = []
        self.graph_fallbacks: list[str] = []
        self.closed = False

    def load(self, spec: StageSpec) -> "TensorRTRunner":
        if self.closed:
            raise BackendError("this tensorrt backend is closed")
        root = spec.path.parent
        try:
            if str(root) not in self._sets:
                self._sets[str(root)] = EngineSet(root, self._trt, self._runtime, self.cuda)
            engines = self._sets[str(root)]
            entry = engines.index.entry(spec.name)
        except EnginePlanError as exc:
            raise BackendError(str(exc)) from None
        runner = TensorRTRunner(spec, engines.engines[spec.name], entry, engines, self)
        self._runners.append(runner)
        return runner

    def graph_failed(self, stage: str, batch: int, exc: Exception) -> None:
        """Say once that CUDA graphs fell back to plain execution (then every failure is only counted)."""
        if not self.graph_fallbacks:
            warnings.warn(f"CUDA graph capture failed for stage {stage!r} at batch {batch} ({exc}); running such "
                          f"calls without graphs", RuntimeWarning, stacklevel=3)
        self.graph_fallbacks.append(f"{stage}@{batch}")

    def stats(self) -> dict:
        """What profile/inspect report: graphs captured, device memory for buffers and activations."""
        slots = [s for r in self._runners for s in r.slots.values()]
        return {
            "cuda_graphs": sum(s.graph is not None for s in slots),
            "graph_fallbacks": list(self.graph_fallbacks),
            "call_shapes": len(slots),
            "io_buffer_bytes": sum(s.nbytes for s in slots),
            "shared_activation_bytes": sum(e.memory_bytes for e in self._sets.values()),
        }

    def close(self) -> None:
        """Destroy every CUDA graph and execution context, free every device buffer and the shared activation
        memory, then the stream. Idempotent; the backend cannot load or run afterwards."""
        if self.closed:
            return
        self.closed = True
        for runner in self._runners:
            runner.release()
        for engines in self._sets.values():
            self.cuda.free(engines.memory)
            engines.engines.clear()
        self._runners.clear()
        self._sets.clear()
        self.cuda.close()

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorRTRunner:
    def __init__(self, spec: StageSpec, engine, entry, engines: EngineSet, backend: TensorRTBackend):
        self.spec = spec
        self.engine = engine
        self.entry = entry
        self._engines = engines
        self._backend = backend
        self._trt = backend._trt
        self._cuda = backend.cuda
        self.io = engine_io(self._trt, engine, spec.name)
        check_engine_io(spec, self.io)
        self.slots: dict[ShapeKey, CallSlot] = {}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._backend.closed:
            raise BackendError("this tensorrt backend is closed")
        check_feeds(self.spec, feeds)
        batch = batch_rows(self.spec, feeds)
        try:
            check_batch(self.entry, batch)
        except EnginePlanError as exc:
            raise BackendError(str(exc)) from None
        key = tuple(tuple(feeds[io.name].shape) for io in self.spec.inputs)
        slot = self.slots.get(key) or self._allocate(key, feeds)
        for name, array in feeds.items():
            ptr, size = slot.inputs[name]
            if array.nbytes != size:  # the key is the shapes: only a bug gets here
                raise BackendError(f"stage {self.spec.name!r} input {name!r}: {array.nbytes} bytes for a "
                                   f"{size}-byte buffer")
            self._cuda.copy_to_device(ptr, array)
        self._execute(slot, batch)
        outputs = {}
        for io in self.spec.outputs:
            ptr, shape, dtype = slot.outputs[io.name]
            outputs[io.name] = np.empty(shape, dtype)  # fresh arrays: the caller keeps them across calls
            self._cuda.copy_to_host(outputs[io.name], ptr)
        self._cuda.synchronize()
        return outputs

    def _allocate(self, key: ShapeKey, feeds: dict[str, np.ndarray]) -> CallSlot:
        trt, cuda, stage = self._trt, self._cuda, self.spec.name
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise BackendError(f"TensorRT could not create an execution context for stage {stage!r} (out of device "
                               f"memory? {len(self.slots)} call shapes of this stage are allocated already)")
        slot = CallSlot(context)
        try:
            context.set_device_memory(self._engines.memory, self._engines.memory_bytes)
            for io in (t for t in self.io if t.is_input):
                shape = feeds[io.name].shape
                if not context.set_input_shape(io.name, shape):
                    profile = self.entry.profile.get("shapes", {}).get(io.name)
                    raise BackendError(f"stage {stage!r}: TensorRT rejected input {io.name!r} shape {shape}"
                                       + (f" (the engine's profile: min/opt/max {profile})" if profile else "")
                                       + "; rebuild the engines for the shapes you run")
                size = feeds[io.name].nbytes
                slot.inputs[io.name] = (cuda.malloc(size), size)
                slot.nbytes += size
                self._bind(context, io.name, slot.inputs[io.name][0])
            for io in (t for t in self.io if not t.is_input):
                shape = tuple(int(d) for d in context.get_tensor_shape(io.name))
                if any(d < 0 for d in shape):
                    raise BackendError(
                        f"stage {stage!r} output {io.name!r} has a data-dependent shape {shape}: it cannot be "
                        f"preallocated or captured in a CUDA graph (DyDiT token gathering: build with --token-skip "
                        f"dense)")
                size = int(np.prod(shape)) * io.dtype.itemsize
                slot.outputs[io.name] = (cuda.malloc(size), shape, io.dtype)
                slot.nbytes += size
                self._bind(context, io.name, slot.outputs[io.name][0])
        except BaseException:
            self._release(slot)
            raise
        self.slots[key] = slot
        return slot

    def _bind(self, context, name: str, ptr: int) -> None:
        if not context.set_tensor_address(name, ptr):
            raise BackendError(f"stage {self.spec.name!r}: TensorRT refused the device address of {name!r}")

    def _enqueue(self, slot: CallSlot) -> None:
        if not slot.context.execute_async_v3(self._cuda.stream_handle):
            raise BackendError(f"TensorRT execution of stage {self.spec.name!r} failed (see the TensorRT log)")

    def _execute(self, slot: CallSlot, batch: int) -> None:
        cuda = self._cuda
        if slot.graph is not None:
            cuda.launch(slot.graph)
            return
        if not self._backend.cuda_graphs or slot.graph_failed or slot.runs == 0:
            # the first run is the warm-up: TensorRT allocates and initialises lazily, which capture must not see
            self._enqueue(slot)
            slot.runs += 1
            return
        try:
            cuda.begin_capture()
            self._enqueue(slot)
            slot.graph = cuda.end_capture()
        except BackendError as exc:
            cuda.abort_capture()
            slot.graph_failed = True
            self._backend.graph_failed(self.spec.name, batch, exc)
            self._enqueue(slot)
        else:
            cuda.launch(slot.graph)
        slot.runs += 1

    def _release(self, slot: CallSlot) -> None:
        if slot.graph is not None:
            self._cuda.destroy_graph(slot.graph)
            slot.graph = None
        slot.context = None  # the last reference: TensorRT destroys the context before its memory is freed
        for ptr in slot.pointers:
            self._cuda.free(ptr)
        slot.inputs.clear()
        slot.outputs.clear()

    def release(self) -> None:
        """Destroy this stage's graphs and contexts and free its buffers (the backend's close calls it)."""
        for slot in self.slots.values():
            self._release(slot)
        self.slots.clear()


def batch_rows(spec: StageSpec, feeds: dict[str, np.ndarray]) -> int:
    """The call's rows: the size of the first input axis named ``batch`` (check_feeds made them agree)."""
    for io in spec.inputs:
        for axis, dim in enumerate(io.shape):
            if isinstance(dim, str) and parse_dim(dim) == (1, "batch"):
                return int(feeds[io.name].shape[axis])
    raise BackendError(f"stage {spec.name!r} has no batch axis")
