"""TensorRT backend (TensorRT 11 Python API): the bundle's prebuilt engines, CUDA graphs per distinct call.

Engines come from ``keystep engines BUNDLE`` (or ``keystep build --backend tensorrt``), listed in
``<bundle>/engines/index.json`` (:mod:`keystep.runtime.engine_plan`). Loading a stage deserializes every engine of the
bundle once, because their activation memory is shared: one device allocation of the largest
``device_memory_size_v2``, handed to every execution context (``USER_MANAGED``). That is sound because stages
never run concurrently: the plan alternates encoder, decoders and cached stages on one stream.

Each distinct call shape (engine, rows) gets a *slot*: its own execution context with the input shapes set once,
preallocated device buffers for every input and output bound with ``set_tensor_address``, and after one warm-up run
a captured CUDA graph that later calls replay. A context per slot (not per engine) keeps every captured graph valid:
a graph bakes in shapes and addresses, and re-setting a shared context for another batch would invalidate it.
Calls copy their inputs into the slot's buffers, run (or replay), and copy the outputs back; scheduler updates
stay on the host for now.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..bundle import StageSpec, parse_dim, sha256_file
from ..engine_plan import ENGINE_DIR, EngineIndex, EnginePlanError, check_batch
from .base import BackendError, check_feeds, import_optional
from .cuda import Cuda


@dataclass
class CallSlot:
    """The device side of one call shape: context, buffers and (after warm-up) its CUDA graph."""

    context: object
    inputs: dict[str, int]  # name -> device pointer
    outputs: dict[str, tuple[int, tuple[int, ...], np.dtype]]  # name -> (pointer, shape, dtype)
    nbytes: int
    runs: int = 0
    graph: object = None
    graph_failed: bool = False


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

    def load(self, spec: StageSpec) -> "TensorRTRunner":
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


class TensorRTRunner:
    def __init__(self, spec: StageSpec, engine, entry, engines: EngineSet, backend: TensorRTBackend):
        self.spec = spec
        self.engine = engine
        self.entry = entry
        self._engines = engines
        self._backend = backend
        self._trt = backend._trt
        self._cuda = backend.cuda
        self.slots: dict[int, CallSlot] = {}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        batch = batch_rows(self.spec, feeds)
        try:
            check_batch(self.entry, batch)
        except EnginePlanError as exc:
            raise BackendError(str(exc)) from None
        slot = self.slots.get(batch) or self._allocate(batch, feeds)
        for name, array in feeds.items():
            self._cuda.copy_to_device(slot.inputs[name], array)
        self._execute(slot, batch)
        outputs = {}
        for name, (ptr, shape, dtype) in slot.outputs.items():
            outputs[name] = np.empty(shape, dtype)  # fresh arrays: the caller keeps them across calls
            self._cuda.copy_to_host(outputs[name], ptr)
        self._cuda.synchronize()
        return outputs

    def _allocate(self, batch: int, feeds: dict[str, np.ndarray]) -> CallSlot:
        trt, cuda = self._trt, self._cuda
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        context.set_device_memory(self._engines.memory, self._engines.memory_bytes)
        inputs, outputs, nbytes = {}, {}, 0
        for name, array in feeds.items():
            if not context.set_input_shape(name, array.shape):
                raise BackendError(f"stage {self.spec.name!r}: TensorRT rejected input {name!r} shape {array.shape}")
            inputs[name] = cuda.malloc(array.nbytes)
            nbytes += array.nbytes
            context.set_tensor_address(name, inputs[name])
        for io in self.spec.outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(io.name))
            if any(d < 0 for d in shape):
                raise BackendError(
                    f"stage {self.spec.name!r} output {io.name!r} has a data-dependent shape {shape}: it cannot be "
                    f"preallocated or captured in a CUDA graph (DyDiT token gathering: build with --token-skip dense)")
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(io.name)))
            size = int(np.prod(shape)) * dtype.itemsize
            ptr = cuda.malloc(size)
            nbytes += size
            context.set_tensor_address(io.name, ptr)
            outputs[io.name] = (ptr, shape, dtype)
        slot = CallSlot(context, inputs, outputs, nbytes)
        self.slots[batch] = slot
        return slot

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


def batch_rows(spec: StageSpec, feeds: dict[str, np.ndarray]) -> int:
    """The call's rows: the size of the first input axis named ``batch`` (check_feeds made them agree)."""
    for io in spec.inputs:
        for axis, dim in enumerate(io.shape):
            if isinstance(dim, str) and parse_dim(dim) == (1, "batch"):
                return int(feeds[io.name].shape[axis])
    raise BackendError(f"stage {spec.name!r} has no batch axis")
