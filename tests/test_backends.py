"""Every backend runs the same ONNX stages to the same numbers; feeds are validated before the backend sees them."""

import numpy as np
import pytest

from keystep.runtime.backends.base import BackendError, get_backend
from keystep.runtime.bundle import Bundle
from keystep.runtime.dit_sampler import DiTSampler
from keystep.runtime.sampler import SamplingOptions


def feeds_for(spec, batch, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for io in spec.inputs:
        shape = io.concrete(batch)
        feeds[io.name] = (rng.integers(0, 10, shape) if io.dtype == "int64" else rng.standard_normal(shape)).astype(
            io.dtype)
    return feeds


@pytest.mark.parametrize("stage", ["encoder", "decoder", "full"])
def test_openvino_matches_onnxruntime(tiny_bundle, stage):
    pytest.importorskip("openvino", reason="openvino is part of the dev extra")
    spec = Bundle.load(tiny_bundle).stage(stage)
    feeds = feeds_for(spec, 5)
    ort_out = get_backend("onnxruntime").load(spec).run(feeds)
    ov_out = get_backend("openvino").load(spec).run(feeds)
    for name, value in ort_out.items():
        np.testing.assert_allclose(ov_out[name], value, rtol=1e-4, atol=1e-4)


def test_openvino_sampling_matches_onnxruntime(tiny_bundle):
    pytest.importorskip("openvino", reason="openvino is part of the dev extra")
    bundle = Bundle.load(tiny_bundle)
    options = SamplingOptions.from_bundle(bundle, num_steps=6, key_steps="0,3")
    runs = [DiTSampler(bundle, get_backend(name)).sample([1, 2], options, seed=4).latents
            for name in ("onnxruntime", "openvino")]
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-4, atol=1e-4)


def test_bad_feeds_and_backends_are_named(tiny_bundle):
    spec = Bundle.load(tiny_bundle).stage("decoder")
    runner = get_backend("onnxruntime").load(spec)
    feeds = feeds_for(spec, 2)
    with pytest.raises(BackendError, match="hidden.*shape"):
        runner.run({**feeds, "hidden": feeds["hidden"][:, :3]})
    with pytest.raises(BackendError, match="dtype"):
        runner.run({**feeds, "class_label": feeds["class_label"].astype(np.int32)})
    with pytest.raises(BackendError, match="inputs"):
        runner.run({"hidden": feeds["hidden"]})
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        get_backend("tpu")
