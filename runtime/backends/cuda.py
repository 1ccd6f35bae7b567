"""The few CUDA runtime calls the TensorRT backend makes (cuda-python's ``cudart``), with errors turned into
:class:`BackendError`. Kept to memory, copies, one stream and graph capture/replay, so a fake with the same methods
can stand in for it in tests on machines without a GPU.

Versions: cuda-python's major must match the CUDA major of the TensorRT wheel (``tensorrt-cu13`` with cuda-python
13, ``tensorrt-cu12`` with cuda-python 12; the ``keystep[tensorrt]`` / ``keystep[tensorrt-cu12]`` extras pin both).
A cuda-python built for a newer CUDA than the driver supports fails every call with
``cudaErrorInsufficientDriver``; that is reported as such (with both versions), never as "no device".
"""

from __future__ import annotations

import importlib.metadata

import numpy as np

from .base import BackendError

# cudaError_t values (stable across CUDA 11-13)
CUDA_SUCCESS = 0
CUDA_ERROR_INSUFFICIENT_DRIVER = 35
CUDA_ERROR_NO_DEVICE = 100


def import_cudart():
    """cuda-python's runtime module under its current name (12.8+: cuda.bindings.runtime) or its old one."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise BackendError("the tensorrt backend needs cuda-python for device memory, streams and CUDA graphs: "
                               "pip install 'keystep[tensorrt]'") from exc
    return cudart


def cuda_version(encoded: int) -> str:
    """CUDA's integer version (1000 * major + 10 * minor) as text: 12080 -> '12.8'."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


def tensorrt_cuda_major() -> int | None:
    """The CUDA major the installed TensorRT wheel is built for (tensorrt-cu12 / tensorrt-cu13 ...), if known."""
    for major in range(11, 20):
        try:
            importlib.metadata.version(f"tensorrt-cu{major}-libs")
            return major
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def insufficient_driver_message(driver: int, runtime: int, trt_major: int | None) -> str:
    """Why cuda-python cannot talk to the GPU when the driver is older than its runtime, and the fix."""
    if not driver:
        return "no NVIDIA driver is loaded (cudaDriverGetVersion reports none): the tensorrt backend needs a GPU"
    want = trt_major or driver // 1000
    return (f"the NVIDIA driver supports CUDA {cuda_version(driver)} but cuda-python is built for CUDA "
            f"{cuda_version(runtime)} (cudaErrorInsufficientDriver). cuda-python's major must match the TensorRT "
            f"wheel's CUDA major{f' ({trt_major})' if trt_major else ''} and the driver: pip install "
            f"'cuda-python>={want},<{want + 1}'" + (" (keystep[tensorrt-cu12] pins both)" if want == 12 else "")
            + ", or update the driver")


class Cuda:
    """One device, one stream. Pointers are plain ints (what TensorRT's ``set_tensor_address`` takes)."""

    def __init__(self, device_id: int = 0, cudart=None):
        self._rt = cudart or import_cudart()
        self._allocations: set[int] = set()
        self.stream = None
        err, count = self._rt.cudaGetDeviceCount()
        if int(err) == CUDA_ERROR_NO_DEVICE or (int(err) == CUDA_SUCCESS and not count):
            raise BackendError("the tensorrt backend needs a CUDA device; none was found (is the driver loaded?)")
        if int(err) == CUDA_ERROR_INSUFFICIENT_DRIVER:
            driver = self._check(self._rt.cudaDriverGetVersion(), "cudaDriverGetVersion")
            runtime = self._check(self._rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
            raise BackendError(insufficient_driver_message(int(driver), int(runtime), tensorrt_cuda_major()))
        if int(err) != CUDA_SUCCESS:
            raise BackendError(f"cudaGetDeviceCount failed: {err}")
        if device_id >= count:
            raise BackendError(f"CUDA device {device_id} requested, {count} present")
        self._check(self._rt.cudaSetDevice(device_id), "cudaSetDevice")
        props = self._check(self._rt.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
        name = props.name
        self.device_name = (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")
        self.stream = self._check(self._rt.cudaStreamCreate(), "cudaStreamCreate")

    def _check(self, result, what: str):
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != CUDA_SUCCESS:
            raise BackendError(f"{what} failed: {err}")
        return values[0] if len(values) == 1 else (values or None)

    def malloc(self, nbytes: int) -> int:
        ptr = int(self._check(self._rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
        self._allocations.add(ptr)
        return ptr

    def free(self, ptr: int) -> None:
        if ptr in self._allocations:
            self._allocations.discard(ptr)
            self._check(self._rt.cudaFree(ptr), "cudaFree")

    def copy_to_device(self, ptr: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self._rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream), "H2D copy")

    def copy_to_host(self, array: np.ndarray, ptr: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self._rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, self.stream), "D2H copy")

    def synchronize(self) -> None:
        self._check(self._rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def begin_capture(self) -> None:
        # thread-local mode: other threads' CUDA calls (e.g. a host-side library) do not invalidate the capture
        mode = self._rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check(self._rt.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")

    def end_capture(self):
        """The instantiated graph, or an exception if anything in the capture was not capturable."""
        graph = self._check(self._rt.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        try:
            return self._check(self._rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            self._rt.cudaGraphDestroy(graph)

    def abort_capture(self) -> None:
        """End a capture that failed half-way, so the stream is usable again (its result is discarded)."""
        graph = self._rt.cudaStreamEndCapture(self.stream)
        if isinstance(graph, tuple) and int(graph[0]) == 0 and graph[1] is not None:
            self._rt.cudaGraphDestroy(graph[1])

    def destroy_graph(self, graph_exec) -> None:
        self._check(self._rt.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")

    @property
    def stream_handle(self) -> int:
        """The stream as the integer TensorRT's ``execute_async_v3`` takes."""
        return int(self.stream)

    def launch(self, graph_exec) -> None:
        self._check(self._rt.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")

    def close(self) -> None:
        """Free what is still allocated and destroy the stream (idempotent). Callers destroy their graphs first."""
        for ptr in sorted(self._allocations):
            self.free(ptr)
        if self.stream is not None:
            stream, self.stream = self.stream, None
            self._check(self._rt.cudaStreamDestroy(stream), "cudaStreamDestroy")
