"""The ``keystep`` model of a Triton repository: keystep's plan executor, unchanged, behind Triton's request API.

Its stage calls go to one of two places (the model config's ``stage_calls`` parameter):

* ``in-process`` — keystep's own CPU backend (ONNX Runtime or OpenVINO) inside this model's Python stub; the
  ``python`` flavour on machines where Business Logic Scripting (BLS) is unavailable, and the simplest deployment.
* ``bls`` — a BLS request per stage call to the repository's stage models (``tensorrt_plan`` engines,
  ``onnxruntime_onnx`` graphs, or ``python`` stage models), so Triton's dynamic batcher merges the stage calls
  of concurrent requests and stages scale with their own instance groups.

Either way, Triton's dynamic batcher may hand :meth:`OrchestratorCore.execute` several requests at once: each is
validated on its own (a bad request gets its own error response, the others run), then compatible ones (same plan,
steps, guidance, size) run as one sampling run with every row's own noise (:mod:`.codec`).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..pipeline import Pipeline, make_backend
from .codec import OUTPUTS, RowRequest, decode_request, error_message, group_requests, run_group


def check_numpy_bridge(pb_utils) -> None:
    """Triton's Python backend before r24.11 (pybind11 < 2.12, e.g. server 2.51) misreads NumPy 2 arrays: every
    tensor it makes has 0 bytes and every input reads as its first element, silently. Refuse to serve then."""
    probe = np.arange(3, dtype=np.float32)
    back = pb_utils.Tensor("probe", probe).as_numpy()
    if back.shape != probe.shape or not np.array_equal(back, probe):
        raise RuntimeError(
            f"this Triton Python backend cannot exchange tensors with NumPy {np.__version__} (it predates NumPy 2 "
            f"support, python_backend < r24.11): give the model an execution environment with numpy<2 "
            f"(EXECUTION_ENV_PATH; `keystep serve` makes one) or use Triton >= 24.11")


def parameters(model_config: dict) -> dict[str, str]:
    """A Triton model config's ``parameters`` as plain strings."""
    return {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}


class OrchestratorCore:
    """Requests in (dicts of numpy inputs), results out (dicts of numpy outputs, or an error message per request).
    Independent of Triton's Python API so it can be exercised without a server."""

    def __init__(self, pipe: Pipeline, max_rows: int, concurrent_groups: int = 1):
        self.pipe = pipe
        self.max_rows = max(1, max_rows)
        self.pool = ThreadPoolExecutor(concurrent_groups) if concurrent_groups > 1 else None

    def execute(self, requests: list[tuple[dict[str, np.ndarray], set[str] | None]]) -> list[dict | str]:
        """``requests``: (inputs, requested output names or None for all). Returns per request its outputs, or the
        error message to answer it with."""
        decoded: list[RowRequest | Exception] = []
        for inputs, requested in requests:
            try:
                decoded.append(decode_request(self.pipe, inputs, requested))
            except Exception as exc:  # every failure becomes this request's error response
                decoded.append(exc)
        results: list[dict | str] = [error_message(d) if isinstance(d, Exception) else {} for d in decoded]
        groups = group_requests(decoded, self.max_rows)

        def run(group):
            try:
                return group, run_group(self.pipe, [decoded[i] for i in group])
            except Exception as exc:  # the whole group failed (a backend error): each of its requests says so
                return group, [error_message(exc)] * len(group)

        done = self.pool.map(run, groups) if self.pool else map(run, groups)
        for group, outputs in done:
            for i, out in zip(group, outputs):
                results[i] = out
        return results


def load_core(model_dir: Path, params: dict[str, str], max_batch_size: int, bls_caller=None) -> OrchestratorCore:
    bundle = Bundle.load(model_dir / params.get("bundle", "bundle"))
    if params.get("stage_calls", "in-process") == "bls":
        from .bls import BLSBackend

        backend = BLSBackend(json.loads(params["stage_models"]), caller=bls_caller,
                             batches_decoders=params.get("batch_decoders", "true") == "true")
        concurrent = int(params.get("concurrent_groups", "4"))
    else:
        threads = int(params["threads"]) if params.get("threads") else None
        backend = make_backend(params.get("backend", "onnxruntime"), threads=threads,
                               precision=params.get("precision") or None)
        concurrent = 1  # CPU stages in this process: groups run one after the other on the cores
    return OrchestratorCore(Pipeline(bundle, backend), max_batch_size or 1, concurrent)


class TritonPythonModel:
    """Triton's Python-backend interface over :class:`OrchestratorCore` (``triton_python_backend_utils`` exists
    only inside the server's Python stub, hence the import in :meth:`initialize`)."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        check_numpy_bridge(pb_utils)
        self.pb = pb_utils
        config = json.loads(args["model_config"])
        model_dir = Path(args["model_repository"]) / args["model_version"]
        self.core = load_core(model_dir, parameters(config), int(config.get("max_batch_size", 0)))

    def execute(self, requests):
        pb = self.pb
        batch = []
        for request in requests:
            inputs = {t.name(): t.as_numpy() for t in request.inputs()}
            batch.append((inputs, set(request.requested_output_names()) or None))
        responses = []
        for out in self.core.execute(batch):
            if isinstance(out, str):
                responses.append(pb.InferenceResponse(error=pb.TritonError(out)))
            else:
                tensors = [pb.Tensor(name, np.ascontiguousarray(value.astype(OUTPUTS[name][1])))
                           for name, value in out.items()]
                responses.append(pb.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self):
        if self.core.pool is not None:
            self.core.pool.shutdown(wait=True)
