"""DyDiT bundles built from the CLI with each token-skip mode and sampled end to end, against the DyDiT reference
(tests/dydit_reference.py):

* ``--token-skip dense`` runs the MLP on every token and multiplies by the 0/1 selection: the same samples as the
  reference with token selection (and as the gathered bundle), with static shapes only, so TensorRT can capture
  every call in a CUDA graph (what the TensorRT backend advises for DyDiT);
* ``--no-token-skip`` ignores the token routers (an approximation, flagged in the manifest): the reference
  without token selection.

Like the other random-weight fixtures they sample with DiT's DDIM clipped (conftest.clipped_dit_scheduler)."""

import shutil

import numpy as np
import onnx
import pytest
import torch

from dit_reference import DiTDDIM
from dydit_reference import dydit_sample
from fake_tensorrt import ENV, FakeCuda, FakeTensorRT, fake_compile
from keystep.graphs.trt_build import build_engines
from keystep.runtime.backends.base import get_backend
from keystep.runtime.backends.tensorrt import TensorRTBackend
from keystep.runtime.bundle import Bundle
from keystep.runtime.dit_sampler import DiTSampler
from keystep.runtime.engine_plan import EngineTargets, call_shapes
from keystep.runtime.sampler import SamplingOptions
from keystep.tools.cli import main

FLAGS = {"dense": ["--token-skip", "dense"], "off": ["--no-token-skip"]}


def build(mode, checkpoint, scheduler_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens") / mode
    assert main(["build", str(checkpoint), "--out", str(out), "--steps", "5", "--max-profiles", "1",
                 "--scheduler-config", scheduler_config, *FLAGS[mode]]) == 0
    return Bundle.load(out)


@pytest.fixture(scope="module")
def dense_bundle(dydit_checkpoint_path, clipped_dit_scheduler, tmp_path_factory):
    return build("dense", dydit_checkpoint_path, clipped_dit_scheduler, tmp_path_factory)


@pytest.fixture(scope="module")
def off_bundle(dydit_checkpoint_path, clipped_dit_scheduler, tmp_path_factory):
    return build("off", dydit_checkpoint_path, clipped_dit_scheduler, tmp_path_factory)


def sample(bundle, key_steps, labels=(1, 2, 7), seed=3):
    options = SamplingOptions.from_bundle(bundle, key_steps=key_steps, noise_injection=False)
    return DiTSampler(bundle, get_backend("onnxruntime")).sample(list(labels), options, seed=seed)


@pytest.mark.parametrize("key_steps", ["all", [0, 3]])
@pytest.mark.parametrize("mode", ["dense", "off"])
def test_each_mode_samples_like_the_dydit_reference(request, mode, dydit_model, dydit_bundle, key_steps):
    bundle = request.getfixturevalue(f"{mode}_bundle")
    width = bundle.manifest["width"]
    assert (width["token_selection"], width["approximation"]) == (mode, mode == "off")
    result = sample(bundle, key_steps)
    z_T = torch.from_numpy(DiTSampler(bundle, get_backend("onnxruntime")).initial_noise(3, 3))
    args = (dydit_model, z_T, [1, 2, 7], DiTDDIM(5, "ddim", clip_denoised=True), 4.0, bundle.manifest["split"],
            result.prepared.plan.key_steps)
    expected = dydit_sample(*args, token_select=(mode == "dense")).numpy()
    other = dydit_sample(*args, token_select=(mode != "dense")).numpy()
    np.testing.assert_allclose(result.latents, expected, rtol=0, atol=1e-4)
    assert np.abs(result.latents - other).max() > 1e-2  # the token routers matter: the modes differ
    if mode == "dense":  # the gathered bundle (other engines, same computation) gives the same samples
        np.testing.assert_allclose(result.latents, sample(Bundle.load(dydit_bundle), key_steps).latents, rtol=0,
                                   atol=1e-4)


def test_dense_engines_have_static_shapes_and_capture_every_call(dense_bundle, tmp_path):
    bundle = dense_bundle
    for name, spec in bundle.stages.items():
        ops = {n.op_type for n in onnx.load(str(spec.path)).graph.node}
        assert not ops & {"NonZero", "Compress", "Unique"}, name
    root = tmp_path / "dense"
    shutil.copytree(bundle.root, root)
    build_engines(root, EngineTargets(plans=("default",), images=(1,)), environment=ENV, compile_engine=fake_compile,
                  progress=lambda m: None)
    cuda = FakeCuda()
    backend = TensorRTBackend(trt=FakeTensorRT(cuda), cuda=cuda)
    engines = Bundle.load(root)
    sampler = DiTSampler(engines, backend)
    options = SamplingOptions.from_bundle(engines, parallel=True)
    results = [sampler.sample([2], options, seed=1) for _ in range(2)]
    reference = DiTSampler(engines, get_backend("onnxruntime")).sample([2], options, seed=1)
    for result in results:
        np.testing.assert_allclose(result.latents, reference.latents, rtol=1e-5, atol=1e-5)
    stats = backend.stats()
    assert stats["graph_fallbacks"] == [] and stats["cuda_graphs"] == len(call_shapes(reference.prepared.calls))
