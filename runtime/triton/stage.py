"""The ``python`` flavour of a stage model: one bundle stage run by keystep's CPU backend inside Triton.

With ``max_batch_size > 0`` and dynamic batching, Triton hands :meth:`StageCore.execute` the calls of several
requests at once; they run as one call (rows concatenated along the batch axis) and the outputs are split back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..pipeline import make_backend
from .orchestrator import check_numpy_bridge, parameters


class StageCore:
    def __init__(self, runner, batched: bool):
        self.runner = runner
        self.batched = batched  # every input and output has the batch axis first

    def execute(self, calls: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | str]:
        if not self.batched or len(calls) == 1:
            return [self._run_one(feeds) for feeds in calls]
        try:
            rows = [len(next(iter(feeds.values()))) for feeds in calls]
            merged = {name: np.concatenate([feeds[name] for feeds in calls]) for name in calls[0]}
            out = self.runner.run(merged)
        except Exception:  # e.g. one call's inputs do not fit: run them one by one, each with its own outcome
            return [self._run_one(feeds) for feeds in calls]
        bounds = np.cumsum([0, *rows])
        return [{k: v[a:b] for k, v in out.items()} for a, b in zip(bounds, bounds[1:])]

    def _run_one(self, feeds):
        try:
            return self.runner.run(feeds)
        except Exception as exc:
            return f"keystep stage {self.runner.spec.name!r}: {exc}"


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        check_numpy_bridge(pb_utils)
        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = parameters(config)
        model_dir = Path(args["model_repository"])
        bundle = Bundle.load(model_dir / params["bundle"], verify=False)  # the orchestrator's load verified it
        spec = bundle.stage(params["stage"])
        threads = int(params["threads"]) if params.get("threads") else None
        runner = make_backend(params.get("backend", "onnxruntime"), threads=threads).load(spec)
        self.core = StageCore(runner, int(config.get("max_batch_size", 0)) > 0)

    def execute(self, requests):
        pb = self.pb
        calls = [{t.name(): t.as_numpy() for t in r.inputs()} for r in requests]
        responses = []
        for out in self.core.execute(calls):
            if isinstance(out, str):
                responses.append(pb.InferenceResponse(error=pb.TritonError(out)))
            else:
                responses.append(pb.InferenceResponse(
                    output_tensors=[pb.Tensor(k, np.ascontiguousarray(v)) for k, v in out.items()]))
        return responses
