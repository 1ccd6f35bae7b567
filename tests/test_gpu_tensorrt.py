"""The real TensorRT path (``-m gpu``; skipped with the reason on machines without TensorRT or a CUDA device):
engines built through Polygraphy from the tiny DiT bundle must reproduce ONNX Runtime CPU, with and without CUDA
graphs, and rebuilds must come from the cache."""

import shutil

import numpy as np
import pytest

from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import Bundle
from keystep.runtime.dit_sampler import DiTSampler
from keystep.runtime.engine_plan import EngineTargets
from keystep.runtime.sampler import SamplingOptions

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def environment():
    from keystep.graphs.trt_build import EngineBuildError, tensorrt_environment

    try:
        return tensorrt_environment()
    except EngineBuildError as exc:
        pytest.skip(f"needs TensorRT and a CUDA device: {exc}")


@pytest.fixture(scope="module")
def engine_bundle(tiny_bundle, environment, tmp_path_factory):
    from keystep.graphs.trt_build import build_engines

    root = tmp_path_factory.mktemp("gpu") / "bundle"
    shutil.copytree(tiny_bundle, root)
    build_engines(root, EngineTargets(images=(1, 2)), environment=environment, progress=lambda m: None)
    return root


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("plan", ["default", "all"])
def test_engines_reproduce_onnxruntime(engine_bundle, cuda_graphs, plan):
    bundle = Bundle.load(engine_bundle)
    options = SamplingOptions.from_bundle(bundle, parallel=True)
    options = options if plan == "default" else options.with_plan(plan)
    want = DiTSampler(bundle, get_backend("onnxruntime")).sample([1, 3], options, seed=2).latents
    backend = get_backend("tensorrt", cuda_graphs=cuda_graphs)
    sampler = DiTSampler(bundle, backend)
    for _ in range(3):  # warm-up, capture, replay
        got = sampler.sample([1, 3], options, seed=2).latents
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-3
    stats = backend.stats()
    assert stats["graph_fallbacks"] == []
    assert stats["cuda_graphs"] == (stats["call_shapes"] if cuda_graphs else 0)


def test_rebuild_is_cached(engine_bundle, environment):
    from keystep.graphs.trt_build import build_engines

    def refuse(*args):
        raise AssertionError("an unchanged engine was rebuilt")

    build_engines(engine_bundle, EngineTargets(images=(1, 2)), environment=environment, compile_engine=refuse,
                  progress=lambda m: None)
