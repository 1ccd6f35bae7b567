"""The few CUDA runtime calls the TensorRT backend makes (cuda-python's ``cudart``), with errors turned into
:class:`BackendError`. Kept to memory, copies, one stream and graph capture/replay, so a fake with the same methods
can stand in for it in tests on machines without a GPU."""

from __future__ import annotations

import numpy as np

from .base import BackendError


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


class Cuda:
    """One device, one stream. Pointers are plain ints (what TensorRT's ``set_tensor_address`` takes)."""

    def __init__(self, device_id: int = 0, cudart=None):
        self._rt = cudart or import_cudart()
        count = self._check(self._rt.cudaGetDeviceCount(), "cudaGetDeviceCount", no_device_ok=True)
        if not count:
            raise BackendError("the tensorrt backend needs a CUDA device; none was found (is the driver loaded?)")
        if device_id >= count:
            raise BackendError(f"CUDA device {device_id} requested, {count} present")
        self._check(self._rt.cudaSetDevice(device_id), "cudaSetDevice")
        props = self._check(self._rt.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
        name = props.name
        self.device_name = (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")
        self.stream = self._check(self._rt.cudaStreamCreate(), "cudaStreamCreate")

    def _check(self, result, what: str, no_device_ok: bool = False):
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            if no_device_ok:  # cudaErrorNoDevice / insufficient driver: report "no device" instead
                return 0
            raise BackendError(f"{what} failed: {err}")
        return values[0] if len(values) == 1 else (values or None)

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self._rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

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

    @property
    def stream_handle(self) -> int:
        """The stream as the integer TensorRT's ``execute_async_v3`` takes."""
        return int(self.stream)

    def launch(self, graph_exec) -> None:
        self._check(self._rt.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")
