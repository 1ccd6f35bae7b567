"""graphs/cleanup.py: the pre-TensorRT cleanup keeps outputs identical (ORT CPU), shrinks foldable graphs, and
writes external data past its size threshold."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from keystep.graphs.cleanup import cleanup_graph


def run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def stage_feeds(path, batch=2, seed=0):
    """Random inputs for a bundle stage: floats ~N(0,1), int64 class labels in 0..9."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs():
        shape = [batch if isinstance(d, str) else d for d in inp.shape]
        if inp.type == "tensor(int64)":
            feeds[inp.name] = rng.integers(0, 10, shape).astype(np.int64)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def assert_same_outputs(a, b, feeds):
    for x, y in zip(run(a, feeds), run(b, feeds), strict=True):
        np.testing.assert_array_equal(x, y)


def foldable_graph() -> onnx.ModelProto:
    """y = x * (c * 2 + c) + reshape(x, [shape(x)[0], 4]): a constant subgraph, a shape computation over the
    static axis, and two dead nodes."""
    c = numpy_helper.from_array(np.arange(4, dtype=np.float32), "c")
    nodes = [
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Mul", ["c", "two"], ["c2"], name="const_mul"),
        helper.make_node("Add", ["c2", "c"], ["c3"], name="const_add"),
        helper.make_node("Mul", ["x", "c3"], ["scaled"], name="scale"),
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
        helper.make_node("Constant", [], ["minus_one"], value=numpy_helper.from_array(np.array([-1], np.int64))),
        helper.make_node("Slice", ["x_shape", "one", "two_i"], ["width"], name="width"),
        helper.make_node("Concat", ["minus_one", "width"], ["target"], axis=0, name="target"),
        helper.make_node("Reshape", ["x", "target"], ["flat"], name="reshape"),
        helper.make_node("Add", ["scaled", "flat"], ["y"], name="out"),
        helper.make_node("Relu", ["x"], ["unused"], name="dead_relu"),
        helper.make_node("Exp", ["unused"], ["unused2"], name="dead_exp"),
    ]
    graph = helper.make_graph(
        nodes, "foldable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[c, numpy_helper.from_array(np.array([1], np.int64), "one"),
                     numpy_helper.from_array(np.array([2], np.int64), "two_i")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_synthetic_graph_folds_and_keeps_outputs(tmp_path):
    src, dst = tmp_path / "g.onnx", tmp_path / "g.clean.onnx"
    onnx.save(foldable_graph(), src)
    lines = []
    report = cleanup_graph(src, dst, log=lines.append)
    assert [s.step for s in report.steps] == ["original", "cleanup", "fold constants", "shape inference",
                                              "final cleanup"]
    assert lines[0] == "g.clean: original .. 12 nodes, 16 tensors, 1 inputs, 1 outputs"
    assert report.steps[1].nodes == 10  # the dead Relu -> Exp chain
    # Mul(x, folded constant) + Reshape(x, folded shape) + Add: nothing else survives folding.
    assert report.steps[-1].nodes == 3 and not report.external_data
    assert sorted(n.op_type for n in onnx.load(dst).graph.node) == ["Add", "Mul", "Reshape"]
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    assert_same_outputs(src, dst, feeds)


def test_bundle_stage_cleans_with_identical_outputs(tiny_bundle, tmp_path):
    src = tiny_bundle / "decoder.onnx"
    report = cleanup_graph(src, tmp_path / "decoder.onnx", fold_constants=True)
    assert report.steps[-1].nodes <= report.steps[0].nodes
    assert not (tmp_path / "decoder.onnx.data").exists()
    assert_same_outputs(src, tmp_path / "decoder.onnx", stage_feeds(src))


def test_external_data_past_threshold_and_back(tiny_bundle, tmp_path):
    src = tiny_bundle / "encoder.onnx"
    big = tmp_path / "big" / "encoder.onnx"
    report = cleanup_graph(src, big, external_data_threshold=1024)  # the tiny stage counts as "over 2 GB"
    data = big.parent / "encoder.onnx.data"
    assert report.external_data and data.stat().st_size > 100_000
    skeleton = onnx.load(str(big), load_external_data=False)
    assert {e.value for t in skeleton.graph.initializer for e in t.external_data if e.key == "location"} == \
        {"encoder.onnx.data"}
    feeds = stage_feeds(src)
    assert_same_outputs(src, big, feeds)

    # Cleaning again in place must not append to the stale data file.
    size = data.stat().st_size
    cleanup_graph(big, big, external_data_threshold=1024)
    assert data.stat().st_size == size
    assert_same_outputs(src, big, feeds)

    # An external-data input loads from its folder; under the threshold the output is one file again.
    small = tmp_path / "small" / "encoder.onnx"
    report = cleanup_graph(big, small)
    assert not report.external_data and not (small.parent / "encoder.onnx.data").exists()
    assert_same_outputs(src, small, feeds)


def test_missing_graphsurgeon_message(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_gs(name, *args, **kwargs):
        if name == "onnx_graphsurgeon":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gs)
    with pytest.raises(ImportError, match="pip install onnx-graphsurgeon"):
        cleanup_graph(foldable_graph(), tmp_path / "x.onnx")
