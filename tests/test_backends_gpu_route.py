"""The ONNX Runtime GPU route: provider options, CUDA-graph bookkeeping, and the IO-binding runner — the latter on
the CPU provider, which supports IO binding, so buffer reuse is checked here; graph capture itself only on a GPU."""

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from keystep.runtime.backends.base import BackendError, get_backend
from keystep.runtime.backends.onnxruntime_gpu import (
    NO_GRAPH,
    GraphIds,
    IOBindingBackend,
    OnnxRuntimeCudaBackend,
    OnnxRuntimeTensorRTBackend,
    cuda_provider_options,
    format_profile_shapes,
    output_shapes,
    tensorrt_provider_options,
)
from keystep.runtime.bundle import Bundle, IOSpec, StageSpec
from keystep.runtime.engine_plan import CallShape, profiles_from_calls
from keystep.tools.cli import main

from test_backends import feeds_for

ENCODER = StageSpec(
    name="encoder",
    path=Path("/bundles/tiny/encoder.onnx"),
    inputs=(IOSpec("latent", "float32", ("batch", 4, 32, 32)), IOSpec("timestep", "float32", ("batch",)),
            IOSpec("scale", "float32", (1,))),
    outputs=(IOSpec("hidden", "float32", ("batch", 256, 384)),),
    flops_per_sample=None,
    flops_constant=0,
)


def test_cuda_provider_options():
    assert cuda_provider_options(1, True) == {"device_id": "1", "enable_cuda_graph": "True"}
    assert cuda_provider_options(0, False)["enable_cuda_graph"] == "False"


def test_tensorrt_options_cache_in_the_bundle_and_profile_from_plan_batches():
    options = tensorrt_provider_options(ENCODER, 0, cuda_graphs=True)
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == "/bundles/tiny/engines/ort-trt"
    assert options["trt_cuda_graph_enable"] == options["trt_engine_cache_enable"] == "True"
    assert not any(k.startswith("trt_profile") for k in options)

    profile = profiles_from_calls([CallShape("encoder", b) for b in (2, 6, 4)])["encoder"]
    ranges = {k: v for k, v in profile.input_shapes(ENCODER, {}).items() if k != "scale"}  # static: no profile
    options = tensorrt_provider_options(ENCODER, 0, cuda_graphs=False, shape_ranges=ranges)
    assert options["trt_cuda_graph_enable"] == "False"
    assert options["trt_profile_min_shapes"] == "latent:2x4x32x32,timestep:2"
    assert options["trt_profile_opt_shapes"] == options["trt_profile_max_shapes"] == "latent:6x4x32x32,timestep:6"
    assert format_profile_shapes({"a": (1, 8), "b": (3,)}) == "a:1x8,b:3"


def test_output_shapes_bound_from_the_inputs_or_unknown():
    key = ((3, 4, 32, 32), (3,), (1,))
    assert output_shapes(ENCODER, key) == {"hidden": (3, 256, 384)}
    unknown = dataclasses.replace(ENCODER, outputs=(IOSpec("hidden", "float32", ("tokens", 384)),))
    assert output_shapes(unknown, key) is None


def test_graph_ids_per_shape_up_to_the_bound_then_fallback_warned_once():
    """Ids from 1: 0 is the graph of runs that set no gpu_graph_id."""
    ids = GraphIds(2, "decoder")
    assert [ids(k) for k in ("a", "b", "a", "b")] == [1, 2, 1, 2]
    with pytest.warns(UserWarning, match="'decoder': 2 CUDA graphs captured") as caught:
        assert [ids(k) for k in ("c", "d", "c", "a")] == [NO_GRAPH, NO_GRAPH, NO_GRAPH, 1]
    assert len(caught) == 1 and len(ids) == 2


def reference(runner, feeds):
    return runner.run({k: v.copy() for k, v in feeds.items()})


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graph-ids"])
@pytest.mark.parametrize("stage", ["full", "encoder", "decoder"])
def test_cpu_iobinding_runner_matches_plain_onnxruntime(tiny_bundle, stage, cuda_graphs):
    """Several batch sizes, each repeated with new data: reused buffers must not leak old data and results must be
    copies. With graph ids on (ignored by the CPU provider) keys beyond the bound share the eager binding."""
    spec = Bundle.load(tiny_bundle).stage(stage)
    plain = get_backend("onnxruntime").load(spec)
    backend = IOBindingBackend(device="cpu", cuda_graphs=cuda_graphs, max_cuda_graphs=2)
    runner = backend.load(spec)
    kept = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed, batch in enumerate([1, 3, 3, 2, 1, 4, 2, 4]):
            feeds = feeds_for(spec, batch, seed)
            got = runner.run(feeds)
            for name, value in reference(plain, feeds).items():
                np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6)
            kept.append((got, reference(plain, feeds)))
    for got, want in kept:  # earlier results survive later calls on the same buffers
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6)
    assert backend.batches_decoders is False
    assert len(caught) == (1 if cuda_graphs else 0)
    stats = backend.stats()
    assert stats["cuda_graphs"] == backend.graph_count == (2 if cuda_graphs else 0)
    assert stats["stages"] == 1 and stats["buffer_bytes"] > 0


def test_cpu_iobinding_learns_output_shapes_from_a_first_run(tiny_bundle):
    spec = Bundle.load(tiny_bundle).stage("decoder")
    plain = get_backend("onnxruntime").load(spec)
    unbound = dataclasses.replace(spec, outputs=tuple(dataclasses.replace(o, shape=("rows",) + o.shape[1:])
                                                      for o in spec.outputs))
    runner = IOBindingBackend(device="cpu").load(unbound)
    before = runner.buffer_bytes
    for seed in range(3):
        feeds = feeds_for(spec, 2, seed)
        for name, value in reference(plain, feeds).items():
            np.testing.assert_allclose(runner.run(feeds)[name], value, rtol=1e-5, atol=1e-6)
        if seed == 0:
            assert runner.buffer_bytes > before  # outputs bound to buffers of the learned shape


def test_cpu_iobinding_names_bad_feeds(tiny_bundle):
    spec = Bundle.load(tiny_bundle).stage("decoder")
    feeds = feeds_for(spec, 2)
    with pytest.raises(BackendError, match="dtype"):
        IOBindingBackend().load(spec).run({**feeds, "class_label": feeds["class_label"].astype(np.int32)})


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="CUDA provider present")
@pytest.mark.parametrize("name", ["onnxruntime-cuda", "onnxruntime-tensorrt"])
def test_gpu_backends_say_what_to_install(name, tiny_bundle, capsys):
    with pytest.raises(BackendError, match=rf"{name} needs the onnxruntime-gpu package.*CPUExecutionProvider.*"
                                           r"pip uninstall onnxruntime && pip install onnxruntime-gpu"):
        get_backend(name)
    assert main(["generate", str(tiny_bundle), "--class", "1", "--steps", "2", "--backend", name]) == 2
    assert "pip install onnxruntime-gpu" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_backend_generates_the_cpu_latents(tiny_bundle, tmp_path):
    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        pytest.skip(f"no CUDAExecutionProvider in this onnxruntime (providers: {available})")
    args = ["generate", str(tiny_bundle), "--class", "1", "4", "--steps", "10", "--key-steps", "0,3,6"]
    for backend in ("onnxruntime", "onnxruntime-cuda"):
        assert main([*args, "--backend", backend, "--save-latents", str(tmp_path / f"{backend}.npy")]) == 0
    # the CUDA EP may use TF32 matmuls
    np.testing.assert_allclose(np.load(tmp_path / "onnxruntime-cuda.npy"), np.load(tmp_path / "onnxruntime.npy"),
                               rtol=2e-3, atol=2e-3)


# --- the GPU backends' session choices, with ONNX Runtime told it has the GPU providers ---------------------------

@pytest.fixture()
def gpu_providers(monkeypatch):
    """This onnxruntime says it has the CUDA and TensorRT providers (sessions are not created in these tests)."""
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    return monkeypatch


def test_cuda_graphs_per_shape_need_onnxruntime_1_18(gpu_providers):
    gpu_providers.setattr(onnxruntime, "__version__", "1.17.3")
    with pytest.raises(BackendError, match=r"need onnxruntime-gpu >= 1\.18 \(this is 1\.17\.3.*--no-cuda-graphs"):
        OnnxRuntimeCudaBackend(cuda_graphs=True)
    assert OnnxRuntimeCudaBackend(cuda_graphs=False).graph_mode  # without graphs any version does
    gpu_providers.setattr(onnxruntime, "__version__", "1.18.0")
    assert OnnxRuntimeCudaBackend(cuda_graphs=True).providers_for(ENCODER, True) == [
        ("CUDAExecutionProvider", {"device_id": "0", "enable_cuda_graph": "True"})]


def test_tensorrt_ep_gets_one_graphed_shape_per_session_and_its_cache_dirs(gpu_providers, tiny_bundle, tmp_path):
    """The decoder (batches 2..20 over the default plan and the baseline) runs without graphs; the encoder and the
    full stage (one batch each at one image) keep the TensorRT EP's graph. The engine cache directory is created
    (the EP's mkdir is not recursive and <bundle>/engines does not exist yet)."""
    import shutil

    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    bundle = Bundle.load(root)
    backend = OnnxRuntimeTensorRTBackend(cuda_graphs=True)
    with pytest.warns(UserWarning, match="'decoder' is called with several input shapes"):
        assert backend.graph_mode(bundle.stage("decoder")) == "off"
    assert backend.graph_mode(bundle.stage("encoder")) == backend.graph_mode(bundle.stage("full")) == "single-shape"
    assert not (root / "engines").exists()
    options = dict(backend.providers_for(bundle.stage("decoder"), False))["TensorrtExecutionProvider"]
    assert options["trt_cuda_graph_enable"] == "False"
    assert (root / "engines" / "ort-trt").is_dir() and options["trt_engine_cache_path"] == str(root / "engines" /
                                                                                                "ort-trt")


class SingleGraphBackend(IOBindingBackend):
    """The CPU provider standing in for a provider that keeps one CUDA graph per session (the TensorRT EP)."""

    def __init__(self):
        super().__init__(device="cpu", cuda_graphs=True)
        self.sessions_made = []

    def graph_mode(self, spec):
        return "single-shape"

    def providers_for(self, spec, cuda_graphs):
        self.sessions_made.append(cuda_graphs)
        return ["CPUExecutionProvider"]


def test_single_graph_sessions_run_other_shapes_on_a_graphless_session(tiny_bundle):
    spec = Bundle.load(tiny_bundle).stage("decoder")
    plain = get_backend("onnxruntime").load(spec)
    backend = SingleGraphBackend()
    runner = backend.load(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed, batch in enumerate([2, 2, 4, 2, 6, 4]):
            feeds = feeds_for(spec, batch, seed)
            for name, value in reference(plain, feeds).items():
                np.testing.assert_allclose(runner.run(feeds)[name], value, rtol=1e-5, atol=1e-6)
    assert backend.sessions_made == [True, False]  # the graphed session, then one graph-less session for the rest
    assert [str(w.message).count("one CUDA graph per session") for w in caught] == [1]
    assert backend.stats() == {"stages": 1, "sessions": 2, "cuda_graphs": 1, "buffer_bytes": runner.buffer_bytes}
