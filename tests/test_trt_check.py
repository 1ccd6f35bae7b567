"""graphs/trt_check.py and ``keystep check``: known-bad graphs give exactly the expected issue, real bundle stages
give no errors, DyDiT's gathered token skipping is reported as data-dependent shapes."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from keystep.graphs.trt_check import check_tensorrt, format_issues
from keystep.runtime.bundle import Bundle, sha256_file
from keystep.tools.cli import main

F = TensorProto.FLOAT


def model(nodes, inputs, outputs, initializers=(), domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", 18), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=opsets)


def value(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def summary(issues):
    return [(i.severity, i.node, i.op_type) for i in issues]


def test_clean_graph_has_no_issues():
    m = model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [value("x", ["batch", 4])],
              [value("y", ["batch", 4])])
    assert check_tensorrt(m) == []
    assert format_issues([]) == "no issues"


@pytest.mark.parametrize("node,domains,expected", [
    (helper.make_node("Det", ["x"], ["y"], name="det"), (), "not supported by TensorRT's ONNX parser"),
    (helper.make_node("BiasGelu", ["x", "x"], ["y"], name="fused", domain="com.microsoft"), ("com.microsoft",),
     "plugin named 'BiasGelu'"),
    (helper.make_node("Normalizer", ["x"], ["y"], name="ml", domain="ai.onnx.ml"), ("ai.onnx.ml",),
     "ai.onnx.ml operators"),
])
def test_unsupported_ops_are_errors(node, domains, expected):
    m = model([node], [value("x", [2, 3, 3])], [value("y", None)], domains=domains)
    issues = check_tensorrt(m)
    assert summary(issues) == [("error", node.name, node.op_type)]
    assert expected in issues[0].message


def test_plugin_domain_passes():
    node = helper.make_node("MyPlugin", ["x"], ["y"], name="plugin", domain="trt.plugins")
    assert check_tensorrt(model([node], [value("x", [2])], [value("y", [2])], domains=["trt.plugins"])) == []


@pytest.mark.parametrize("node,inputs,initializers,expected", [
    (helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize", mode="linear",
                      coordinate_transformation_mode="tf_crop_and_resize"), [value("x", [1, 1, 4, 4])],
     [const("scales", np.array([1, 1, 2, 2], np.float32))], "tf_crop_and_resize"),
    (helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize", mode="linear", antialias=1),
     [value("x", [1, 1, 4, 4])], [const("scales", np.array([1, 1, 0.5, 0.5], np.float32))], "antialias"),
    (helper.make_node("Pad", ["x", "pads"], ["y"], name="pad", mode="wrap"), [value("x", [1, 4])],
     [const("pads", np.array([0, 1, 0, 1], np.int64))], "wrap"),
    (helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"], name="scatter", reduction="add"),
     [value("x", [4, 2])], [const("idx", np.array([[1]], np.int64)), const("upd", np.ones((1, 2), np.float32))],
     "reduction 'add'"),
    (helper.make_node("MaxPool", ["x"], ["y", "indices"], name="pool", kernel_shape=[2, 2]),
     [value("x", [1, 1, 4, 4])], [], "Indices output"),
    (helper.make_node("TopK", ["x", "k"], ["y", "i"], name="topk"), [value("x", [1, 5000])],
     [const("k", np.array([4000], np.int64))], "K=4000"),
    (helper.make_node("Squeeze", ["x", "axes"], ["y"], name="squeeze"),
     [value("x", [1, 4]), value("axes", [1], TensorProto.INT64)], [], "not a constant"),
])
def test_unsupported_attributes_are_errors(node, inputs, initializers, expected):
    issues = [i for i in check_tensorrt(model([node], inputs, [value("y", None)], initializers))
              if i.severity == "error"]
    assert summary(issues) == [("error", node.name, node.op_type)]
    assert expected in issues[0].message


def test_float64_tensor_names_its_producer():
    nodes = [helper.make_node("Cast", ["x"], ["x64"], name="to_double", to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["x64"], ["y"], name="to_float", to=F)]
    issues = check_tensorrt(model(nodes, [value("x", ["batch", 4])], [value("y", ["batch", 4])]))
    assert summary(issues) == [("error", "to_double", "Cast")]
    assert issues[0].tensor == "x64" and "float64" in issues[0].message


def test_float64_graph_input_and_initializer():
    nodes = [helper.make_node("Add", ["x", "w"], ["y"], name="add")]
    issues = check_tensorrt(model(nodes, [value("x", [4], TensorProto.DOUBLE)], [value("y", [4], TensorProto.DOUBLE)],
                                  [const("w", np.ones(4))]))
    assert {(i.severity, i.tensor) for i in issues} == {("error", "x"), ("error", "w"), ("error", "y")}
    assert "graph input 'x'" in format_issues(issues) and "initializer 'w' (used by add)" in format_issues(issues)


def test_dynamic_non_batch_axis_is_a_warning():
    m = model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [value("x", ["batch", "height", 4])],
              [value("y", ["batch", "height", 4])])
    issues = check_tensorrt(m)
    assert summary(issues) == [("warning", "", "")]
    assert issues[0].tensor == "x" and "axis 1 ('height')" in issues[0].message and "CUDA graph" in issues[0].message
    assert "axes 0 ('batch'), 1 ('height') are dynamic" in check_tensorrt(m, static_axes_ok=())[0].message
    assert check_tensorrt(m, static_axes_ok=("batch", "height")) == []


def token_skip_graph():
    """DyDiT-style token skipping on (16, 8) tokens: route = x @ w > 0 -> NonZero -> gather the selected rows."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["logits"], name="router"),
        helper.make_node("Reshape", ["logits", "flat_shape"], ["logits_flat"], name="flatten"),
        helper.make_node("Greater", ["logits_flat", "zero"], ["select"], name="select"),
        helper.make_node("NonZero", ["select"], ["nz"], name="nonzero"),
        helper.make_node("Reshape", ["nz", "flat_shape"], ["index"], name="index"),
        helper.make_node("Gather", ["x", "index"], ["picked"], name="gather_tokens", axis=0),
        helper.make_node("ReduceSum", ["picked"], ["y"], name="sum", keepdims=1),
    ]
    inits = [const("w", np.ones((8, 1), np.float32)), const("flat_shape", np.array([-1], np.int64)),
             const("zero", np.array(0, np.float32))]
    return model(nodes, [value("x", [16, 8])], [value("y", [1, 1])], inits)


def test_nonzero_gather_token_skip_is_data_dependent():
    issues = check_tensorrt(token_skip_graph())
    assert summary(issues) == [("warning", "nonzero", "NonZero"), ("warning", "gather_tokens", "Gather")]
    assert "'nonzero' (NonZero)" in issues[1].message and "CUDA graph" in issues[1].message


def test_argmax_indices_keep_a_fixed_shape():
    nodes = [helper.make_node("ArgMax", ["x"], ["best"], name="argmax", axis=1, keepdims=0),
             helper.make_node("Gather", ["x", "best"], ["y"], name="gather", axis=1)]
    assert check_tensorrt(model(nodes, [value("x", ["batch", 8])], [value("y", None)])) == []


def reshape_graph(shape_nodes):
    nodes = [*shape_nodes, helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape")]
    return model(nodes, [value("x", ["batch", 8])], [value("y", None)],
                 [const("minus_one", np.array([-1], np.int64)), const("zero_i", np.array([0], np.int64)),
                  const("one_i", np.array([1], np.int64))])


def test_reshape_to_activation_values_is_flagged():
    """target = [-1, 1 + max(argmax(x))]: the shape depends on what x contains."""
    issues = check_tensorrt(reshape_graph([
        helper.make_node("ArgMax", ["x"], ["best"], name="argmax", axis=1, keepdims=0),
        helper.make_node("ReduceMax", ["best"], ["most"], name="most", keepdims=1),
        helper.make_node("Add", ["most", "one_i"], ["width"], name="width"),
        helper.make_node("Concat", ["minus_one", "width"], ["target"], name="target", axis=0),
    ]))
    assert summary(issues) == [("warning", "reshape", "Reshape")]
    assert "shape input 'target' (from 'target', Concat) is computed from activation values" in issues[0].message


def test_reshape_to_shape_of_input_is_not_flagged():
    """target = [shape(x)[0], -1]: known as soon as the input shape is."""
    assert check_tensorrt(reshape_graph([
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
        helper.make_node("Gather", ["x_shape", "zero_i"], ["batch"], name="batch", axis=0),
        helper.make_node("Concat", ["batch", "minus_one"], ["target"], name="target", axis=0),
    ])) == []


def test_shape_of_a_data_dependent_tensor_is_value_derived():
    """Shape(gathered tokens) depends on how many tokens the router picked: an Expand to it is flagged."""
    m = token_skip_graph()
    m.graph.node.extend([helper.make_node("Shape", ["picked"], ["picked_shape"], name="picked_shape"),
                         helper.make_node("Expand", ["x", "picked_shape"], ["z"], name="expand")])
    m.graph.output.append(value("z", None))
    assert ("warning", "expand", "Expand") in summary(check_tensorrt(m))


def gather_fed_by_nonzero(m: onnx.ModelProto) -> set[str]:
    """Gather nodes whose indices descend from a NonZero (an independent walk over producers)."""
    producer = {out: n for n in m.graph.node for out in n.output}

    def from_nonzero(tensor):
        node = producer.get(tensor)
        return node is not None and (node.op_type == "NonZero" or any(from_nonzero(i) for i in node.input if i))

    return {n.name for n in m.graph.node if n.op_type == "Gather" and from_nonzero(n.input[1])}


def test_tiny_dit_stages_have_no_issues(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    for name in bundle.stages:
        assert check_tensorrt(bundle.stage(name).path) == [], name


def test_dydit_token_gather_is_reported(dydit_bundle):
    bundle = Bundle.load(dydit_bundle)
    assert bundle.manifest["width"]["token_selection"] == "gather"
    for name in bundle.stages:
        path = bundle.stage(name).path
        issues = check_tensorrt(path)
        assert all(i.severity == "warning" for i in issues), format_issues(issues)
        gathers = {i.node for i in issues if i.op_type == "Gather"}
        expected = gather_fed_by_nonzero(onnx.load(str(path), load_external_data=False))
        assert expected and gathers == expected, name
        assert {i.op_type for i in issues} == {"NonZero", "Gather"}


def bundle_with_bad_decoder(tiny_bundle, dst):
    """A copy of the tiny bundle whose decoder gains a com.microsoft op (manifest hash updated)."""
    shutil.copytree(tiny_bundle, dst)
    decoder = onnx.load(str(dst / "decoder.onnx"))
    out = decoder.graph.output[0].name
    for node in decoder.graph.node:
        node.output[:] = [f"{out}_pre" if o == out else o for o in node.output]
    decoder.graph.node.append(helper.make_node("FastGelu", [f"{out}_pre"], [out], name="contrib_gelu",
                                               domain="com.microsoft"))
    decoder.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(decoder, str(dst / "decoder.onnx"))
    manifest = json.loads((dst / "manifest.json").read_text())
    entry = manifest["stages"]["decoder"]["files"][0]
    entry["sha256"], entry["bytes"] = sha256_file(dst / "decoder.onnx"), (dst / "decoder.onnx").stat().st_size
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_check_cli(tiny_bundle, dydit_bundle, tmp_path, capsys):
    assert main(["check", str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    assert "decoder: 0 errors, 0 warnings" in out and "full: 0 errors" in out

    assert main(["check", str(dydit_bundle), "--json"]) == 0  # warnings only
    report = json.loads(capsys.readouterr().out)
    assert set(report) == set(Bundle.load(dydit_bundle).stages)
    assert any(i["op_type"] == "Gather" and "NonZero" in i["message"] for i in report["decoder.w1"])

    bad = bundle_with_bad_decoder(tiny_bundle, tmp_path / "bad")
    assert main(["check", str(bad)]) == 1
    assert "contrib_gelu (FastGelu)" in capsys.readouterr().out
    assert main(["check", str(bad), "--stage", "encoder"]) == 0
    assert main(["check", str(bad), "--stage", "nope"]) == 2  # BundleError: a user error
