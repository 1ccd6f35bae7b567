"""A keystep backend whose stage calls are BLS requests to the repository's stage models.

The plan executor calls ``runner.run(feeds)`` exactly as with a local backend; here that becomes
``pb_utils.InferenceRequest(model_name=<stage model>, inputs=..., requested_output_names=...).exec()``. Concurrent
requests' calls of one stage reach the stage model at the same time, where Triton's dynamic batcher merges them.
"""

from __future__ import annotations

import numpy as np

from ..backends.base import BackendError, check_feeds
from ..bundle import StageSpec


def pb_utils_caller():
    """The real BLS call (only inside Triton's Python stub)."""
    import triton_python_backend_utils as pb_utils

    def call(model: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=outputs,
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in feeds.items()])
        response = request.exec()
        if response.has_error():
            raise BackendError(f"stage model {model!r} failed: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}

    return call


class BLSRunner:
    thread_safe = True  # each call is its own BLS request

    def __init__(self, spec: StageSpec, model: str, call):
        self.spec = spec
        self.model = model
        self._call = call
        self._outputs = [o.name for o in spec.outputs]
        self._row_scalars = {io.name for io in spec.inputs + spec.outputs if io.shape == ("batch",)}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        # per-row scalars travel as (rows, 1): the stage model's config reshapes them to (rows,) (Triton dims)
        sent = {k: v.reshape(-1, 1) if v.ndim == 1 and k in self._row_scalars else v for k, v in feeds.items()}
        outputs = self._call(self.model, sent, self._outputs)
        missing = set(self._outputs) - set(outputs)
        if missing:
            raise BackendError(f"stage model {self.model!r} returned no {sorted(missing)}")
        return {k: v.reshape(-1) if k in self._row_scalars else v for k, v in outputs.items()}


class BLSBackend:
    name = "triton-bls"

    def __init__(self, stage_models: dict[str, str], caller=None, batches_decoders: bool = True):
        self.stage_models = stage_models
        self._call = caller or pb_utils_caller()
        # GPU stage models: one decoder call per key-step group fills the GPU; CPU (python) stages: one per step,
        # as keystep's CPU backends run them (docs/benchmarks.md)
        self.batches_decoders = batches_decoders

    def load(self, spec: StageSpec) -> BLSRunner:
        if spec.name not in self.stage_models:
            raise BackendError(f"no stage model serves stage {spec.name!r} in this repository "
                               f"(has: {', '.join(sorted(self.stage_models))}); rewrite it with keystep triton")
        return BLSRunner(spec, self.stage_models[spec.name], self._call)
