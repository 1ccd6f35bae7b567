"""The precision pass (graphs/precision.py) and ``keystep build --precision``: graph types, numerics vs fp32 on
ONNX Runtime CPU, the manifest, generation from an fp16 bundle, and bad specs."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from keystep.export.build import build_dit_bundle
from keystep.export.errors import ModelLoadError
from keystep.export.stage_precision import ORT_CPU_BF16_KERNELS, ORT_CPU_LOW_KERNELS, PrecisionPlan, output_error
from keystep.graphs.precision import convert_precision
from keystep.runtime.bundle import Bundle
from keystep.tools.cli import main

FP16, BF16, FLOAT = TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT
LOW = {"fp16": FP16, "bf16": BF16}
# relative L2 error of a stage's output vs fp32 (measured: DiT ~5e-4 / ~1e-2, UNet decoder ~6e-4 / ~7e-3)
TOLERANCE = {"fp16": 3e-3, "bf16": 3e-2}


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    return types | {t.name: t.data_type for t in g.initializer}


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def dit_feeds(batch=2, size=8, rng=np.random.default_rng(0)):
    return {"latent": rng.standard_normal((batch, 4, size, size)).astype(np.float32),
            "timestep": rng.uniform(0, 1000, batch).astype(np.float32),
            "class_label": rng.integers(0, 10, batch)}


@pytest.fixture(scope="module")
def dit_full(tiny_bundle):
    return onnx.load(str(tiny_bundle / "full.onnx"))


@pytest.fixture(scope="module")
def unet_decoder(sd_bundle_dir):
    """The tiny UNet's decoder stage (up blocks: GroupNorm, Conv, Resize, attention, sin/cos time embedding) from the
    session's SD bundle, and seeded inputs at the model's size (timesteps over the training range)."""
    from keystep.graphs.trt_build import bundle_axes

    bundle = Bundle.load(sd_bundle_dir)
    spec = bundle.stage("decoder")
    sizes = {**bundle_axes(bundle), "batch": 2}
    rng = np.random.default_rng(0)
    feeds = {io.name: (rng.uniform(0, 1000, io.concrete(sizes)) if io.name == "timestep"
                       else rng.standard_normal(io.concrete(sizes))).astype(np.float32) for io in spec.inputs}
    return onnx.load(str(spec.path)), feeds


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_dit_graph_types_and_numerics(dit_full, precision):
    converted, report = convert_precision(dit_full, precision, low_kernels=ORT_CPU_LOW_KERNELS[precision])
    onnx.checker.check_model(converted, full_check=True)
    types = tensor_types(converted)
    assert [types[i.name] for i in converted.graph.input] == [FLOAT, FLOAT, TensorProto.INT64]
    assert all(types[o.name] == FLOAT for o in converted.graph.output)
    nodes = list(converted.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    for n in nodes:  # the islands: norms, softmax, sin/cos read and write fp32
        if n.op_type in ("LayerNormalization", "Softmax", "Sin", "Cos"):
            assert {types[t] for t in [*n.input, *n.output] if t} == {FLOAT}, n.name
    for n in (n for n in nodes if n.op_type in ("Sin", "Cos")):  # the phase t * freq is computed in fp32 too
        assert producer[n.input[0]].op_type == "Mul" and types[producer[n.input[0]].input[0]] == FLOAT
    assert {"LayerNormalization", "Softmax", "Sin", "Cos"} <= set(report.fp32_ops)
    weights = [t for t in converted.graph.initializer if t.name.endswith(".weight")]
    assert weights and all(t.data_type == LOW[precision] for t in weights)
    matmuls = [n for n in nodes if n.op_type in ("MatMul", "Gemm")]
    if precision == "fp16":  # ORT inserts its own Casts for fp16 ops it has no CPU kernel for
        assert all(types[n.output[0]] == FP16 for n in matmuls) and report.fp32_compute_nodes == 0
    else:  # no bf16 MatMul kernel on ORT CPU: fp32 arithmetic, its output rounded to bf16 at once
        consumers = {}
        for n in nodes:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        assert all([c.op_type for c in consumers[n.output[0]]] == ["Cast"] for n in matmuls)
        assert all(types[consumers[n.output[0]][0].output[0]] == BF16 for n in matmuls)
        assert "MatMul" in report.fp32_compute_ops
    feeds = dit_feeds()
    (reference,), (value,) = run(dit_full, feeds), run(converted, feeds)
    error = output_error(value, reference)
    assert 1e-6 < error["rel_l2"] < TOLERANCE[precision], error  # > 0: the graph really is not fp32


def test_pure_bf16_graph_is_valid_but_ort_cpu_has_no_kernels(dit_full):
    """Without the ORT kernel table every op the opset-18 schema allows is bf16 (what a TensorRT build wants);
    ORT CPU then refuses the session: no bf16 MatMul/Add/... kernels and no automatic Casts. If this starts to load,
    ORT gained bf16 kernels and ORT_CPU_BF16_KERNELS can grow."""
    converted, report = convert_precision(dit_full, "bf16")
    onnx.checker.check_model(converted, full_check=True)
    assert report.fp32_compute_ops == ["Conv", "Einsum"]  # no bf16 in their opset-18 schemas
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("op", sorted(ORT_CPU_BF16_KERNELS - {"ConstantOfShape", "Shape", "Cast"}))
def test_ort_cpu_runs_the_listed_bf16_kernels(op):
    """Each op in the table runs with bf16 tensors on ORT CPU (a one-op graph between Casts)."""
    h = onnx.helper
    ints = lambda name, values: h.make_tensor(name, TensorProto.INT64, [len(values)], values)  # noqa: E731
    extra = {"Expand": [ints("s", [4, 4])], "Gather": [ints("s", [1])], "Reshape": [ints("s", [2, 8])],
             "Slice": [ints("s", [0]), ints("e", [2])], "Unsqueeze": [ints("s", [0])],
             "ScatterND": [h.make_tensor("s", TensorProto.INT64, [1, 1], [0])]}.get(op, [])
    inputs = ["low", *(t.name for t in extra)]
    attrs = {"axis": 0} if op in ("Concat", "Split") else {}
    if op == "Squeeze":
        inputs = ["low"]
    if op == "LayerNormalization":
        inputs = ["low", "low_row"]
    if op == "ScatterND":
        inputs.append("low_row")
    if op == "Split":
        attrs["num_outputs"] = 2
    nodes = [h.make_node("Cast", ["x"], ["low"], to=BF16), h.make_node("Cast", ["row"], ["low_row"], to=BF16),
             h.make_node(op, inputs, ["y"] + (["y2"] if op == "Split" else []), **attrs),
             h.make_node("Cast", ["y"], ["out"], to=FLOAT)]
    shape = [1, 4] if op == "Squeeze" else [4, 4]
    graph = h.make_graph(nodes, op, [h.make_tensor_value_info("x", FLOAT, shape), h.make_tensor_value_info(
        "row", FLOAT, [1, 4] if op == "ScatterND" else [4])], [h.make_tensor_value_info("out", FLOAT, None)], extra)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=10)
    x = np.arange(shape[0] * 4, dtype=np.float32).reshape(shape)
    (out,) = run(model, {"x": x, "row": np.ones([1, 4] if op == "ScatterND" else [4], np.float32)})
    assert np.isfinite(out).all()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_unet_decoder_numerics(unet_decoder, precision):
    model, feeds = unet_decoder
    converted, report = convert_precision(model, precision, low_kernels=ORT_CPU_LOW_KERNELS[precision])
    onnx.checker.check_model(converted, full_check=True)
    types = tensor_types(converted)
    norms = [n for n in converted.graph.node if n.op_type == "InstanceNormalization"]  # torch's GroupNorm export
    assert norms and all(types[n.input[0]] == FLOAT and types[n.output[0]] == FLOAT for n in norms)
    convs = [n for n in converted.graph.node if n.op_type == "Conv"]
    conv_weights = {n.input[1] for n in convs}
    assert all(t.data_type == LOW[precision] for t in converted.graph.initializer if t.name in conv_weights)
    (reference,), (value,) = run(model, feeds), run(converted, feeds)
    assert 1e-6 < output_error(value, reference)["rel_l2"] < TOLERANCE[precision]


def test_constants_casts_and_boundaries():
    """Constants, ConstantOfShape and Cast(to=FLOAT) in the low region become low; a -3.4e38 mask stays finite;
    Resize's scales stay float32; one Cast per tensor and type; an integer subgraph is untouched."""
    h = onnx.helper
    nodes = [
        h.make_node("Shape", ["x"], ["shape"]),
        h.make_node("ConstantOfShape", ["shape"], ["half"], value=h.make_tensor("v", FLOAT, [1], [0.5])),
        h.make_node("Constant", [], ["mask"], value=h.make_tensor("mask", FLOAT, [2], [0.0, -3.4e38])),
        h.make_node("Cast", ["shape"], ["shape_f"], to=FLOAT),
        h.make_node("ReduceSum", ["shape_f"], ["n"]),
        h.make_node("MatMul", ["x", "w"], ["y"]),
        h.make_node("Add", ["y", "mask"], ["masked"]),
        h.make_node("Mul", ["masked", "half"], ["m"]),
        h.make_node("Add", ["m", "n"], ["a"]),
        h.make_node("Softmax", ["a"], ["s"]),
        h.make_node("Mul", ["s", "x"], ["p"]),
        h.make_node("Resize", ["p", "", "scales"], ["out"], mode="nearest"),
    ]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", FLOAT, [2, 2])],
                         [h.make_tensor_value_info("out", FLOAT, [2, 2])],
                         [h.make_tensor("w", FLOAT, [2, 2], [1.0, 2.0, 3.0, 4.0]),
                          h.make_tensor("scales", FLOAT, [2], [1.0, 1.0])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=10)
    converted, report = convert_precision(model, "fp16")
    onnx.checker.check_model(converted, full_check=True)
    types = tensor_types(converted)
    by_output = {o: n for n in converted.graph.node for o in n.output}
    assert types["half"] == types["mask"] == types["w"] == types["y"] == types["m"] == types["p"] == FP16
    assert np.isfinite(onnx.numpy_helper.to_array(by_output["mask"].attribute[0].t)).all()
    assert types["shape"] == TensorProto.INT64  # the integer subgraph is untouched
    assert types["shape_f"] == types["n"] == FLOAT  # the Cast feeds only the ReduceSum island: grown into it
    assert types["s"] == types["scales"] == types["out"] == FLOAT
    assert report.fp32_ops == ["Cast", "ReduceSum", "Softmax"]
    casts = [(n.input[0], n.attribute[0].i) for n in converted.graph.node if n.op_type == "Cast" and n.name]
    # one Cast per crossing; x feeds MatMul and Mul through the same one
    assert sorted(casts) == [("a", FLOAT), ("n", FP16), ("out/fp16", FLOAT), ("s", FP16), ("x", FP16)]
    x = np.array([[0.1, 0.2], [0.3, 0.4]], np.float32)
    np.testing.assert_allclose(run(converted, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-3, atol=1e-3)


def test_precision_specs():
    stages = ["encoder", "decoder", "full", "vae_decoder"]
    assert PrecisionPlan.parse(None).resolve(stages) == {}
    assert PrecisionPlan.parse("fp32").resolve(stages) == {}
    assert PrecisionPlan.parse("fp16").resolve(stages) == {"encoder": "fp16", "decoder": "fp16", "full": "fp16"}
    assert PrecisionPlan.parse("decoder=bf16,vae_decoder=fp16").resolve(stages) == {
        "decoder": "bf16", "vae_decoder": "fp16"}
    for bad in ("fp8", "encoder=fp8", "encoder", "=fp16", "encoder=fp16,"):
        with pytest.raises(ModelLoadError, match="--precision"):
            PrecisionPlan.parse(bad)
    with pytest.raises(ModelLoadError, match="decodr"):
        PrecisionPlan.parse("decodr=fp16").resolve(stages)


@pytest.mark.parametrize("spec,message", [("fp8", "unknown precision 'fp8'"), ("decodr=fp16", "decodr")])
def test_bad_precision_builds_nothing(original_checkpoint, tmp_path, capsys, spec, message):
    out = tmp_path / "b"
    assert main(["build", str(original_checkpoint), "--out", str(out), "--num-heads", "4", "--precision", spec]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_fp16_bundle_generates_close_to_fp32(original_checkpoint, tiny_bundle, clipped_dit_scheduler, tmp_path,
                                             capsys):
    out = build_dit_bundle(str(original_checkpoint), str(tmp_path / "fp16"), steps=10, num_heads=4,
                           precision="encoder=fp16,decoder=fp16,full=bf16", scheduler_config=clipped_dit_scheduler,
                           progress=lambda m: None)  # tiny_bundle's sampler
    manifest = json.loads((out / "manifest.json").read_text())
    reference = json.loads((tiny_bundle / "manifest.json").read_text())
    for name, entry in manifest["stages"].items():
        p = entry["precision"]
        assert p["type"] == ("bf16" if name == "full" else "fp16")
        assert {"LayerNormalization", "Softmax"} <= set(p["fp32_ops"]) and p["fp32_nodes"] > 0
        error = p["error_vs_fp32"]["outputs"][entry["outputs"][0]["name"]]
        assert 0 < error["rel_l2"] < TOLERANCE[p["type"]] and error["max_abs"] >= error["mean_abs"] > 0
        assert entry["flops"] == reference["stages"][name]["flops"]  # Casts cost nothing; the MACs are the same
        assert entry["files"][0]["bytes"] < 0.6 * reference["stages"][name]["files"][0]["bytes"]
    assert main(["inspect", str(out)]) == 0
    assert "fp16: fp32 islands" in capsys.readouterr().out
    latents = {}
    for bundle in (tiny_bundle, out):
        path = tmp_path / f"{bundle.name}.npy"
        args = ["generate", str(bundle), "--class", "1", "4", "--steps", "10", "--seed", "3"]
        assert main([*args, "--save-latents", str(path)]) == 0
        latents[bundle.name] = np.load(path)
    fp32, fp16 = latents[tiny_bundle.name], latents["fp16"]
    psnr = 10 * np.log10(np.ptp(fp32) ** 2 / np.mean((fp16 - fp32) ** 2))
    assert psnr > 40 and np.linalg.norm(fp16 - fp32) / np.linalg.norm(fp32) < 1e-2, psnr
