"""Fakes of TensorRT 11 and the CUDA runtime that behave like them where keystep's GPU code could go wrong.

The fake *builder* (:func:`fake_compile`) checks what TensorRT's builder would: a profile for every input, ranks and
static dimensions as in the graph, ``min <= opt <= max``, and build options of the builder's type; the "engine" it
writes is the cleaned graph plus that profile and those options. The fake *runtime* runs the graph with ONNX
Runtime on "device memory" that is a dict of numpy buffers, and refuses what TensorRT refuses:

* ``set_input_shape`` returns False outside the profile the engine was built with (or at another rank);
* ``execute_async_v3`` returns False unless every I/O tensor has an address and every input a shape, and the
  activation memory is at least ``device_memory_size_v2``;
* I/O types are a ``DataType`` enum and :meth:`FakeTensorRT.nptype` is TensorRT's (no strings, no bf16/fp8:
  ``TypeError``);
* ``create_execution_context`` returns None when the fake is out of device memory.

The fake CUDA stream is asynchronous like a real one: copies, engine runs and graph launches are queued and run at
``synchronize``; host->device copies take their data at the call (pageable memory is staged), device->host copies
land only when the stream runs. A copy or synchronize during capture, a copy past a buffer's end, a double free or a
graph destroyed twice fail loudly (AssertionError: a bug in the code under test). Capture records enqueues and is
invalidated (``end_capture`` raises, as ``cudaStreamEndCapture`` does) when a context's first enqueue is captured
(TensorRT initialises lazily, so a plain enqueue must come first) or when the engine has data-dependent shapes
(NonZero, NonMaxSuppression, Unique, Compress: TensorRT synchronises on the size, e.g. DyDiT's NonZero->Gather).
"""

from __future__ import annotations

import enum
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from keystep.graphs.trt_build import EngineBuildOptions
from keystep.runtime.backends.base import BackendError

ENV = ("11.4.0", "Fake GPU 80GB")
MAGIC = b"FAKE-TRT-ENGINE\n"
DATA_DEPENDENT_OPS = {"NonZero", "NonMaxSuppression", "Unique", "Compress"}


# --- the builder --------------------------------------------------------------------------------------------------

def fake_compile(onnx_path, shapes, options):
    """The ``compile_engine`` of :func:`keystep.graphs.trt_build.build_engines`, checking its arguments like
    TensorRT's builder does before writing the "engine" (header line with profile and options + the ONNX)."""
    assert isinstance(options, EngineBuildOptions), f"build options of type {type(options).__name__}"
    model = onnx.load(str(onnx_path))
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    assert {i.name for i in graph_inputs} == set(shapes), f"profile for {sorted(shapes)}, graph inputs " \
        f"{sorted(i.name for i in graph_inputs)}"
    for value in graph_inputs:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        low, opt, high = (tuple(s) for s in shapes[value.name])
        for shape in (low, opt, high):
            assert len(shape) == len(dims), f"{value.name}: profile rank {len(shape)}, graph rank {len(dims)}"
            assert all(want is None or want == got for want, got in zip(dims, shape)), \
                f"{value.name}: profile {shape} changes a static dimension of {dims}"
        assert all(a <= b <= c for a, b, c in zip(low, opt, high)), f"{value.name}: not min <= opt <= max"
    header = {"name": Path(onnx_path).stem, "shapes": {k: [list(s) for s in v] for k, v in shapes.items()},
              "options": {"opt_level": options.opt_level, "tf32": options.tf32, "refit": options.refit,
                          "timing_cache": options.timing_cache}}
    return MAGIC + json.dumps(header).encode() + b"\n" + Path(onnx_path).read_bytes()


# --- CUDA ---------------------------------------------------------------------------------------------------------

class FakeCuda:
    """The :class:`keystep.runtime.backends.cuda.Cuda` interface on one asynchronous fake stream."""

    device_name = ENV[1]
    stream_handle = 7

    def __init__(self, fail_capture_for=()):
        self.memory: dict[int, np.ndarray] = {}
        self.freed: list[int] = []
        self.next_ptr = 4096
        self.pending: list = []  # queued stream work
        self.capturing: list | None = None
        self.capture_broken: str | None = None
        self.fail_capture_for = set(fail_capture_for)
        self.captures = 0
        self.launches = 0
        self.graphs: list[list] = []
        self.destroyed_graphs: list[int] = []
        self.closed = False

    # memory
    def malloc(self, nbytes):
        assert not self.closed
        ptr = self.next_ptr  # 256-byte aligned, like cudaMalloc
        self.next_ptr += (max(nbytes, 1) + 511) // 256 * 256
        self.memory[ptr] = np.zeros(max(nbytes, 1), np.uint8)
        return ptr

    def free(self, ptr):
        assert ptr in self.memory, f"free of {ptr}: not allocated (double free?)"
        del self.memory[ptr]
        self.freed.append(ptr)

    def buffer(self, ptr, nbytes, what):
        assert ptr in self.memory, f"{what} at {ptr}: not an allocation"
        size = self.memory[ptr].size
        assert nbytes <= size, f"{what}: {nbytes} bytes into a buffer of {size} bytes"
        return self.memory[ptr]

    def write(self, ptr, array):
        """A device-side write (an engine's output): bounds-checked."""
        raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        self.buffer(ptr, raw.size, "device write")[: raw.size] = raw

    # stream
    def _issue(self, op, what):
        assert self.capturing is None, f"{what} on a capturing stream"
        self.pending.append(op)

    def copy_to_device(self, ptr, array):
        data = np.ascontiguousarray(array).view(np.uint8).reshape(-1).copy()  # staged now: pageable memory
        self.buffer(ptr, data.size, "H2D copy")
        self._issue(lambda: self.write(ptr, data), "H2D copy")

    def copy_to_host(self, array, ptr):
        self.buffer(ptr, array.nbytes, "D2H copy")

        def land():
            array.reshape(-1).view(np.uint8)[:] = self.memory[ptr][: array.nbytes]

        self._issue(land, "D2H copy")

    def synchronize(self):
        assert self.capturing is None, "cudaStreamSynchronize during capture"
        work, self.pending = self.pending, []
        for op in work:
            op()

    def enqueue(self, engine, context, run):
        """An engine run on the stream (from ``execute_async_v3``), recorded instead while capturing."""
        if self.capturing is None:
            self.pending.append(run)
            context.warmed_up = True
            return
        if not context.warmed_up:
            self.capture_broken = "TensorRT initialised lazily inside the capture (no plain enqueue before)"
        elif engine.data_dependent:
            self.capture_broken = f"engine {engine.name!r} has data-dependent shapes ({engine.data_dependent})"
        elif engine.name in self.fail_capture_for:
            self.capture_broken = f"engine {engine.name!r} is not capturable"
        self.capturing.append(run)

    def begin_capture(self):
        assert self.capturing is None, "capture already in progress"
        self.capturing, self.capture_broken = [], None

    def end_capture(self):
        recorded, self.capturing = self.capturing, None
        assert recorded is not None, "end_capture without begin_capture"
        if self.capture_broken:
            raise BackendError(f"cudaStreamEndCapture failed: operation not permitted when stream is capturing "
                               f"({self.capture_broken})")
        self.captures += 1
        self.graphs.append(recorded)
        return len(self.graphs) - 1

    def abort_capture(self):
        self.capturing = None

    def launch(self, graph):
        assert graph not in self.destroyed_graphs, "launch of a destroyed graph"
        self.launches += 1
        for run in self.graphs[graph]:
            self._issue(run, "graph launch")

    def destroy_graph(self, graph):
        assert 0 <= graph < len(self.graphs) and graph not in self.destroyed_graphs, f"destroy of graph {graph}"
        self.destroyed_graphs.append(graph)

    def close(self):
        assert not self.closed, "stream destroyed twice"
        self.closed = True


# --- TensorRT -----------------------------------------------------------------------------------------------------

class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


ONNX_TYPES = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(bfloat16)": DataType.BF16,
              "tensor(int64)": DataType.INT64, "tensor(int32)": DataType.INT32, "tensor(bool)": DataType.BOOL,
              "tensor(uint8)": DataType.UINT8, "tensor(int8)": DataType.INT8}


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.device_memory = engine, {}, {}, None
        self.warmed_up = False

    def set_device_memory(self, ptr, size):
        self.device_memory = (ptr, size)

    def set_input_shape(self, name, shape):
        shape = tuple(int(d) for d in shape)
        low, _, high = self.engine.profile[name]
        if len(shape) != len(low) or not all(a <= d <= b for a, d, b in zip(low, shape, high)):
            return False  # TensorRT: "out of the optimization profile's bounds"
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, ptr):
        if name not in self.engine.names or ptr % 256:
            return False  # unknown tensor or a misaligned address
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        if name in self.engine.profile:
            return self.shapes.get(name, tuple(-1 for _ in self.engine.profile[name][0]))
        return self.engine.output_shapes(self.shapes)[name]

    def execute_async_v3(self, stream):
        engine = self.engine
        if (stream != FakeCuda.stream_handle or set(self.addresses) != set(engine.names)
                or set(self.shapes) != set(engine.profile) or self.device_memory is None
                or self.device_memory[1] < engine.device_memory_size_v2):
            return False
        engine.cuda.enqueue(engine, self, self._run)
        return True

    def _run(self):
        cuda, session = self.engine.cuda, self.engine.session
        feeds = {}
        for i in session.get_inputs():
            dtype = np.dtype(FakeTensorRT.nptype(ONNX_TYPES[i.type]))
            n = int(np.prod(self.shapes[i.name])) * dtype.itemsize
            feeds[i.name] = cuda.buffer(self.addresses[i.name], n, f"read of {i.name}")[:n].view(dtype).reshape(
                self.shapes[i.name]).copy()
        for o, value in zip(session.get_outputs(), session.run(None, feeds)):
            cuda.write(self.addresses[o.name], value)


class FakeEngine:
    def __init__(self, data: bytes, cuda, fake):
        assert data.startswith(MAGIC), "not an engine of the fake builder"
        header, onnx_bytes = data[len(MAGIC):].split(b"\n", 1)
        header = json.loads(header)
        self.name = header["name"]
        self.profile = {k: tuple(tuple(s) for s in v) for k, v in header["shapes"].items()}
        self.build_options = header["options"]
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        ops = {n.op_type for n in onnx.load_from_string(onnx_bytes).graph.node}
        self.data_dependent = sorted(ops & DATA_DEPENDENT_OPS)
        self.cuda, self.fake = cuda, fake
        self.device_memory_size_v2 = 1000 + len(onnx_bytes) % 997
        self.contexts = []
        self.io = [(i.name, TensorIOMode.INPUT, ONNX_TYPES[i.type]) for i in self.session.get_inputs()]
        self.io += [(o.name, TensorIOMode.OUTPUT, ONNX_TYPES[o.type]) for o in self.session.get_outputs()]
        self.names = [name for name, _, _ in self.io]
        self.dtype_overrides: dict[str, DataType] = dict(fake.dtype_overrides.get(self.name, {}))

    @property
    def num_io_tensors(self):
        return len(self.io)

    def get_tensor_name(self, index):
        return self.io[index][0]

    def get_tensor_mode(self, name):
        return next((mode for n, mode, _ in self.io if n == name), TensorIOMode.NONE)

    def get_tensor_dtype(self, name):
        return self.dtype_overrides.get(name) or next(dtype for n, _, dtype in self.io if n == name)

    def output_shapes(self, input_shapes):
        feeds = {i.name: np.zeros(input_shapes[i.name], FakeTensorRT.nptype(ONNX_TYPES[i.type]))
                 for i in self.session.get_inputs()}
        return {o.name: v.shape for o, v in zip(self.session.get_outputs(), self.session.run(None, feeds))}

    def create_execution_context(self, strategy):
        assert strategy is FakeTensorRT.ExecutionContextAllocationStrategy.USER_MANAGED
        if self.fake.contexts_left is not None:
            if self.fake.contexts_left == 0:
                return None  # TensorRT: out of memory (logged), no exception
            self.fake.contexts_left -= 1
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeTensorRT:
    __version__ = ENV[0]
    DataType = DataType
    TensorIOMode = TensorIOMode

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class ExecutionContextAllocationStrategy(enum.Enum):
        STATIC = 0
        ON_PROFILE_CHANGE = 1
        USER_MANAGED = 2

    def __init__(self, cuda):
        self.cuda, self.engines = cuda, []
        self.contexts_left: int | None = None  # None: unlimited device memory
        self.dtype_overrides: dict[str, dict[str, DataType]] = {}  # engine name -> tensor -> type it reports
        fake = self

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                fake.engines.append(FakeEngine(data, fake.cuda, fake))
                return fake.engines[-1]

        self.Runtime = Runtime

    @staticmethod
    def nptype(trt_type):
        """tensorrt.nptype: numpy has no bf16/fp8, so those (and anything that is not a DataType) raise TypeError."""
        mapping = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
                   DataType.INT32: np.int32, DataType.INT64: np.int64, DataType.BOOL: np.bool_,
                   DataType.UINT8: np.uint8}
        if isinstance(trt_type, DataType) and trt_type in mapping:
            return mapping[trt_type]
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

    def engine(self, name):
        return next(e for e in self.engines if e.name == name)


# --- cuda-python's runtime module, for the Cuda wrapper's own tests -----------------------------------------------

class FakeCudart:
    """The cudart functions :class:`keystep.runtime.backends.cuda.Cuda` calls, returning (error, value) tuples."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeThreadLocal = 1

    class Props:
        name = b"Fake GPU 80GB\x00\x00"

    def __init__(self, devices=1, count_error=0, driver=13000, runtime=13000):
        self.devices, self.count_error, self.driver, self.runtime = devices, count_error, driver, runtime
        self.allocated, self.freed, self.streams, self.destroyed = set(), [], 0, []
        self.next_ptr = 1 << 20

    def cudaGetDeviceCount(self):
        return (self.count_error, 0 if self.count_error else self.devices)

    def cudaDriverGetVersion(self):
        return (0, self.driver)

    def cudaRuntimeGetVersion(self):
        return (0, self.runtime)

    def cudaSetDevice(self, device):
        return (0,)

    def cudaGetDeviceProperties(self, device):
        return (0, self.Props())

    def cudaStreamCreate(self):
        self.streams += 1
        return (0, 99)

    def cudaStreamDestroy(self, stream):
        self.destroyed.append(("stream", stream))
        return (0,)

    def cudaMalloc(self, nbytes):
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + nbytes + 256
        self.allocated.add(ptr)
        return (0, ptr)

    def cudaFree(self, ptr):
        assert ptr in self.allocated, "cudaFree of memory not allocated"
        self.allocated.discard(ptr)
        self.freed.append(ptr)
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec):
        self.destroyed.append(("graph", graph_exec))
        return (0,)
