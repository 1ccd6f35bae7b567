"""TensorRT compatibility check for an ONNX graph, before any engine is built (no TensorRT needed).

Usage::

    from keystep.graphs.trt_check import check_tensorrt, format_issues
    issues = check_tensorrt("decoder.onnx")           # errors first, then warnings
    print(format_issues(issues))

What is checked
---------------
* **Operators** against the operator table of TensorRT's ONNX parser (onnx-tensorrt ``docs/operators.md``) as of
  **TensorRT 10.x** (10.0-10.13, ONNX opsets up to 22).  An op the table marks unsupported, or one it does not
  list, is an error; ops added after that table (opset 23+, e.g. ``Attention``, ``RMSNormalization``) and a few
  rows we could not confirm are warnings: a newer parser may import them.  ``ai.onnx.ml`` ops are unsupported.
  Ops of other domains (``com.microsoft`` contrib ops, ...) are errors unless a TensorRT plugin of that name is
  registered when the engine is built; the ``trt.plugins`` domain is TensorRT's own plugin domain and passes.
  Model-local functions are inlined first (the parser inlines them too).
* **Attributes** TensorRT rejects, only where certain: Resize with ``tf_crop_and_resize``, antialiasing or a
  keep-aspect-ratio policy other than ``stretch``; Pad ``wrap``; ScatterND with a reduction; MaxPool's Indices
  output; TopK with a constant K above 3840; Squeeze/Unsqueeze/Reduce* axes that are not constants (TensorRT
  fixes every tensor's rank and every reduction's axes when it builds the engine).
* **Dtypes** TensorRT has no type for (float64, int16, uint16/32/64, string, complex, FNUZ fp8, fp8 e5m2, fp6,
  2-bit, uint4) on graph inputs/outputs, initializers and intermediates (types inferred by ONNX shape
  inference).  int64 is a TensorRT type since 10.0 and is not reported.
* **Dynamic shapes that prevent CUDA graphs**: a graph input axis that is symbolic and not in ``static_axes_ok``
  is a warning.  A captured CUDA graph fixes every shape, so each distinct size needs its own graph (and
  TensorRT a profile covering it).
* **Data-dependent shapes** (warnings): TensorRT must read such a size back to the host during execution (an
  ``IOutputAllocator`` for network outputs), which blocks CUDA graph capture.  A dataflow pass marks every tensor
  as *value-derived* (its values depend on activation values) or not (computed from constants, initializers
  and ``Shape``/``Size`` of tensors whose shapes are known once the input shapes are set), and tracks tensors
  whose *shape* is data-dependent.  Reported nodes:

  - NonZero, NonMaxSuppression, Unique, Compress: the output size is a count of values;
  - a shape-defining input (Reshape/Expand shape, ConstantOfShape, Tile repeats, Slice starts/ends/axes/steps,
    Resize scales/sizes, Range, OneHot depth, TopK K, Pad pads, Split sizes, ...) that is value-derived.
    A Reshape whose shape is built from ``Shape()`` is *not* reported;
  - Gather/GatherElements/GatherND whose indices have a data-dependent size (DyDiT token skipping:
    ``NonZero(router > 0)`` -> gather the selected tokens).  Indices with data-dependent *values* but a fixed
    size (``ArgMax``, ``TopK`` with a constant K) give a fixed output shape and are not reported;
  - If/Loop whose condition or trip count is value-derived (their subgraphs are analysed too).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from keystep.runtime.bundle import parse_dim

TABLE_VERSION = "TensorRT 10.x (onnx-tensorrt docs/operators.md, opsets <= 22)"

SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BlackmanWindow Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND
Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU
HammingWindow HannWindow Hardmax HardSigmoid HardSwish Identity If InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul Max
MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad Pow PRelu
QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape
Resize ReverseSequence RNN RoiAlign Round Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign
Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu
Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# Rows we could not confirm for the table above, and ops newer than it: a newer parser may import them.
UNVERIFIED_OPS = frozenset("""
AffineGrid Attention CenterCropPad Col2Im DeformConv RMSNormalization RotaryEmbedding Swish TensorScatter
""".split())

DEFAULT_DOMAINS = ("", "ai.onnx")
ML_DOMAIN = "ai.onnx.ml"
PLUGIN_DOMAINS = ("trt.plugins",)

# ONNX element type name -> how messages call it. FP6 and 2-bit types exist only in newer onnx releases.
_UNSUPPORTED_DTYPE_NAMES = {
    "DOUBLE": "float64", "STRING": "string", "COMPLEX64": "complex64", "COMPLEX128": "complex128", "INT16": "int16",
    "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64", "FLOAT8E4M3FNUZ": "float8e4m3fnuz",
    "FLOAT8E5M2": "float8e5m2", "FLOAT8E5M2FNUZ": "float8e5m2fnuz", "FLOAT6E2M3": "float6e2m3",
    "FLOAT6E3M2": "float6e3m2", "UINT4": "uint4", "INT2": "int2", "UINT2": "uint2",
}
UNSUPPORTED_DTYPES = {getattr(onnx.TensorProto, k): v for k, v in _UNSUPPORTED_DTYPE_NAMES.items()
                      if hasattr(onnx.TensorProto, k)}

# Ops whose output size is a count of values.
COUNTING_OPS = frozenset({"NonZero", "NonMaxSuppression", "Unique", "Compress"})
# Inputs (index -> role) that define an output shape.
SHAPE_INPUTS = {
    "Reshape": {1: "shape"}, "Expand": {1: "shape"}, "ConstantOfShape": {0: "shape"}, "Tile": {1: "repeats"},
    "Slice": {1: "starts", 2: "ends", 3: "axes", 4: "steps"}, "Resize": {2: "scales", 3: "sizes"},
    "Upsample": {1: "scales"}, "Range": {0: "start", 1: "limit", 2: "delta"}, "OneHot": {1: "depth"},
    "TopK": {1: "K"}, "Pad": {1: "pads"}, "Split": {1: "split"}, "CenterCropPad": {1: "shape"},
    "MaxUnpool": {2: "output_shape"},
}
GATHER_OPS = frozenset({"Gather", "GatherElements", "GatherND"})
# Output shape is the shape of these inputs only (the others just supply values).
OUTPUT_SHAPE_FROM = {"Scatter": (0,), "ScatterElements": (0,), "ScatterND": (0,), "Shape": (), "Size": ()}
# Values that are unknown when the engine is built even without activation inputs.
RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                        "Bernoulli"})
REDUCE_OPS = frozenset({"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare"})
TOPK_MAX_K = 3840

DDS_CONSEQUENCE = ("TensorRT reads the size back to the host while executing (an output allocator for outputs), "
                   "which blocks CUDA graph capture")
SEVERITY_ORDER = {"error": 0, "warning": 1}


@dataclass(frozen=True)
class CompatIssue:
    severity: str  # "error" | "warning"
    node: str  # the node concerned ("" for a graph input/output/initializer; see ``tensor``)
    op_type: str
    message: str
    tensor: str = ""  # the tensor concerned, where there is one

    def to_dict(self) -> dict:
        return asdict(self)


def check_tensorrt(model_or_path: onnx.ModelProto | str | Path,
                   static_axes_ok: tuple[str, ...] = ("batch",)) -> list[CompatIssue]:
    """Every TensorRT compatibility issue of the graph, errors first (see the module docstring)."""
    model = _load(model_or_path)
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    graph = model.graph
    constants = _constants(graph)
    issues: list[CompatIssue] = []
    for node in _walk_nodes(graph):
        issues += _check_op(node)
        issues += _check_attributes(node, constants)
    issues += _check_dtypes(model)
    issues += _check_dynamic_inputs(graph, static_axes_ok)
    issues += _Dataflow().analyse(graph)
    return sorted(issues, key=lambda i: SEVERITY_ORDER[i.severity])


def format_issues(issues: list[CompatIssue]) -> str:
    if not issues:
        return "no issues"
    lines = []
    for i in issues:
        where = f"{i.node} ({i.op_type})" if i.node else "graph"
        lines.append(f"{i.severity:<7} {where}: {i.message}")
    return "\n".join(lines)


# --- loading and walking --------------------------------------------------------------------------------------


def _load(model_or_path) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    # Weights are never needed: skip external data (small constants stored inline are still there).
    return onnx.load(str(model_or_path), load_external_data=False)


def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _walk_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _walk_nodes(sub)


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto | None]:
    """Tensors the parser sees as weights: initializers and Constant outputs (in any subgraph). The value is the
    TensorProto when there is one (Constant nodes with ``value_float`` etc. map to None)."""
    constants: dict[str, onnx.TensorProto | None] = {t.name: t for t in graph.initializer}
    for node in _walk_nodes(graph):
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            value = _attr(node, "value")
            constants[node.output[0]] = value if isinstance(value, onnx.TensorProto) else None
    return constants


def _constant_int(constants: dict, name: str) -> int | None:
    tensor = constants.get(name)
    if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    value = onnx.numpy_helper.to_array(tensor)
    return int(value.reshape(-1)[0]) if value.size == 1 else None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- operators and attributes ---------------------------------------------------------------------------------


def _check_op(node: onnx.NodeProto) -> list[CompatIssue]:
    op, domain = node.op_type, node.domain
    if domain in PLUGIN_DOMAINS:
        return []
    if domain == ML_DOMAIN:
        return [CompatIssue("error", node.name, op, f"{ML_DOMAIN} operators are not supported by TensorRT")]
    if domain not in DEFAULT_DOMAINS:
        return [CompatIssue("error", node.name, op, f"custom domain {domain!r}: TensorRT's parser imports it only "
                            f"if a TensorRT plugin named {op!r} is registered when the engine is built")]
    if op in SUPPORTED_OPS:
        return []
    if op in UNVERIFIED_OPS:
        return [CompatIssue("warning", node.name, op, f"{op} is not in the {TABLE_VERSION} operator table; "
                            "a newer TensorRT may import it")]
    return [CompatIssue("error", node.name, op, f"{op} is not supported by TensorRT's ONNX parser ({TABLE_VERSION})")]


def _check_attributes(node: onnx.NodeProto, constants: dict) -> list[CompatIssue]:
    if node.domain not in DEFAULT_DOMAINS:
        return []
    op = node.op_type
    problems = []
    if op == "Resize":
        if _text(_attr(node, "coordinate_transformation_mode", "")) == "tf_crop_and_resize":
            problems.append("coordinate_transformation_mode 'tf_crop_and_resize' is not supported")
        if _attr(node, "antialias", 0):
            problems.append("antialias=1 is not supported")
        if _text(_attr(node, "keep_aspect_ratio_policy", "stretch")) != "stretch":
            problems.append("only keep_aspect_ratio_policy 'stretch' is supported")
    elif op == "Pad" and _text(_attr(node, "mode", "constant")) == "wrap":
        problems.append("pad mode 'wrap' is not supported")
    elif op == "ScatterND" and _text(_attr(node, "reduction", "none")) != "none":
        problems.append(f"reduction {_text(_attr(node, 'reduction'))!r} is not supported")
    elif op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        problems.append("the Indices output is not supported")
    elif op == "TopK":
        k = _attr(node, "k") if len(node.input) < 2 else _constant_int(constants, node.input[1])  # attr < opset 10
        if k is not None and k > TOPK_MAX_K:
            problems.append(f"K={k} exceeds TensorRT's limit of {TOPK_MAX_K}")
    if op in ("Squeeze", "Unsqueeze") or op in REDUCE_OPS:
        if len(node.input) > 1 and node.input[1] and node.input[1] not in constants:
            problems.append(f"axes input {node.input[1]!r} is not a constant: TensorRT fixes ranks and reduction "
                            "axes when it builds the engine")
    return [CompatIssue("error", node.name, op, p) for p in problems]


# --- dtypes -----------------------------------------------------------------------------------------------------


def _check_dtypes(model: onnx.ModelProto) -> list[CompatIssue]:
    graph = _with_inferred_types(model).graph
    producers = {out: node for node in _walk_nodes(graph) for out in node.output}
    consumers: dict[str, list[str]] = {}
    for node in _walk_nodes(graph):
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    graph_inputs = {i.name for i in graph.input}
    dtypes: dict[str, int] = {t.name: t.data_type for t in graph.initializer}
    for info in (*graph.input, *graph.output, *graph.value_info):
        if info.type.HasField("tensor_type"):
            dtypes.setdefault(info.name, info.type.tensor_type.elem_type)
    issues = []
    for name, dtype in dtypes.items():
        if dtype not in UNSUPPORTED_DTYPES:
            continue
        what = f"{UNSUPPORTED_DTYPES[dtype]} is not a TensorRT type"
        if name in producers:
            node = producers[name]
            issues.append(CompatIssue("error", node.name, node.op_type, f"output {name!r}: {what}", tensor=name))
        else:
            kind = "graph input" if name in graph_inputs else "initializer"
            users = ", ".join(consumers.get(name, [])) or "no node"
            issues.append(CompatIssue("error", "", "", f"{kind} {name!r} (used by {users}): {what}", tensor=name))
    return issues


def _with_inferred_types(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError):  # ValueError: a proto over 2 GB
        return model  # the declared types only


# --- dynamic input axes ---------------------------------------------------------------------------------------


def _check_dynamic_inputs(graph: onnx.GraphProto, static_axes_ok: tuple[str, ...]) -> list[CompatIssue]:
    initializers = {t.name for t in graph.initializer}
    issues = []
    for inp in graph.input:
        if inp.name in initializers or not inp.type.tensor_type.HasField("shape"):
            continue
        dynamic = [f"{axis} ({dim.dim_param or '?'!r})" for axis, dim in enumerate(inp.type.tensor_type.shape.dim)
                   if not dim.HasField("dim_value") and _axis_name(dim.dim_param or "?") not in static_axes_ok]
        if dynamic:
            axes = f"axis {dynamic[0]} is" if len(dynamic) == 1 else f"axes {', '.join(dynamic)} are"
            issues.append(CompatIssue(
                "warning", "", "", f"input {inp.name!r} {axes} dynamic: a CUDA graph fixes shapes, so each distinct "
                "size needs its own captured graph and a TensorRT profile covering it", tensor=inp.name))
    return issues


def _axis_name(label: str) -> str:
    try:
        return parse_dim(label)[1]  # "2*batch" is still the batch axis
    except ValueError:
        return label


# --- data-dependent shapes --------------------------------------------------------------------------------------


class _Dataflow:
    """Forward pass over the graph: which tensors are value-derived, which have a data-dependent shape (and from
    which node that shape comes)."""

    def __init__(self):
        self.value_derived: set[str] = set()
        self.shape_origin: dict[str, onnx.NodeProto] = {}  # tensor -> node whose data-dependent size it carries
        self.producer: dict[str, onnx.NodeProto] = {}
        self.issues: list[CompatIssue] = []

    def analyse(self, graph: onnx.GraphProto) -> list[CompatIssue]:
        initializers = {t.name for t in graph.initializer}
        for inp in graph.input:
            if inp.name not in initializers:
                self.value_derived.add(inp.name)  # activations; their shapes are set before execution
        for node in graph.node:
            self._visit(node)
        return self.issues

    def _visit(self, node: onnx.NodeProto) -> None:
        for out in node.output:
            self.producer[out] = node
        inputs = [i for i in node.input if i]
        op = node.op_type if node.domain in DEFAULT_DOMAINS else None
        if op in ("Shape", "Size"):
            # Known once input shapes are set, unless the input's own shape depends on values.
            derived = any(i in self.shape_origin for i in inputs)
        else:
            derived = op in RANDOM_OPS or any(i in self.value_derived for i in inputs)
        if op in ("If", "Loop", "Scan"):
            derived = True  # subgraph outputs: analysed, but not traced back out (conservative)
        shape_from = OUTPUT_SHAPE_FROM.get(op, range(len(node.input)))
        origin = next((self.shape_origin[node.input[k]] for k in shape_from
                       if k < len(node.input) and node.input[k] in self.shape_origin), None)
        origin = self._own_origin(node, op) or origin
        for out in node.output:
            if not out:
                continue
            if derived:
                self.value_derived.add(out)
            if origin is not None:
                self.shape_origin[out] = origin
        for sub in _subgraphs(node):
            self.analyse(sub)  # formal inputs (iteration number, carried state, ...) count as value-derived

    def _own_origin(self, node: onnx.NodeProto, op: str | None) -> onnx.NodeProto | None:
        """Report ``node`` and return it when its own output size depends on values."""
        if op in COUNTING_OPS:
            return self._report(node, "output size is a count of tensor values")
        for k, role in SHAPE_INPUTS.get(op, {}).items():
            if k < len(node.input) and node.input[k] in self.value_derived:
                return self._report(node, f"{role} input {node.input[k]!r}{self._via(node.input[k])} is computed "
                                    "from activation values")
        if op in GATHER_OPS and len(node.input) > 1 and node.input[1] in self.shape_origin:
            indices = node.input[1]
            source = self.shape_origin[indices]
            return self._report(node, f"indices {indices!r} have a size set by values at {source.name!r} "
                                f"({source.op_type}), so the gathered size is too (e.g. token skipping)")
        if op == "If" and node.input[0] in self.value_derived:
            return self._report(node, "the branch is chosen by activation values (branch output shapes may differ)")
        if op == "Loop" and any(k < len(node.input) and node.input[k] in self.value_derived for k in (0, 1)):
            return self._report(node, "the trip count or loop condition depends on activation values")
        return None

    def _via(self, tensor: str) -> str:
        node = self.producer.get(tensor)
        return f" (from {node.name!r}, {node.op_type})" if node is not None else " (a graph input)"

    def _report(self, node: onnx.NodeProto, why: str) -> onnx.NodeProto:
        self.issues.append(CompatIssue("warning", node.name, node.op_type,
                                       f"data-dependent shape: {why}; {DDS_CONSEQUENCE}"))
        return node
