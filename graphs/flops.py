"""FLOP counting for ONNX graphs (an ONNX -> analysis pass).

Usage::

    from keystep.graphs.flops import count_flops, flops_per_sample
    rep = count_flops("unet.onnx", {"sample": (2, 4, 64, 64), "timestep": (2,), ...})
    rep.total, rep.matmul_conv, rep.by_op_type
    lin = flops_per_sample("unet.onnx", lambda b: {"sample": (b, 4, 64, 64), ...})
    lin.per_sample, lin.constant, lin.at(8)

How shapes are obtained
-----------------------
Only shapes are needed, never weights.  A path is loaded with
``onnx.load(path, load_external_data=False)``; then a light "skeleton" copy of the
model is built in which every large initializer is replaced by a stub carrying only
name, dtype and dims; small ones (integers <= 4096 elements: reshape targets, axes, ...;
others <= 64 elements: Resize scales, ...) keep their data because shape inference
needs it -- a small tensor stored externally is read from its data file with one seek.  Model
local functions (``model.functions``, e.g. emitted by the torch dynamo exporter or
``export_modules_as_functions``) are inlined with
``onnx.inliner.inline_local_functions``.  The symbolic input dims (``"batch"``, ...)
are then made concrete from ``input_shapes`` (a dim_param bound on one input is also
applied to other inputs using the same name), stale ``value_info`` / output shapes are
dropped and ``onnx.shape_inference.infer_shapes(..., data_prop=True)`` gives a
concrete shape for every intermediate tensor.

Conventions (FLOPs, not MACs)
-----------------------------
* One multiply-accumulate (MAC) = **2 FLOPs**.  ``FlopReport.matmul_conv`` is exactly
  ``2 * MACs`` summed over the MAC ops below (bias adds excluded):

  - ``MatMul`` / ``MatMulInteger`` / ``QLinearMatMul`` (numpy broadcasting of batch
    dims):  MACs = numel(Y) * K, with K = A.shape[-1].
  - ``Gemm``:  MACs = M * N * K  (transA respected).
  - ``Conv`` / ``ConvInteger`` / ``QLinearConv`` (any number of spatial dims, groups,
    stride, dilation, padding):  MACs = numel(Y) * prod(W.shape[1:])
    (= N * Cout * prod(out_spatial) * Cin/groups * prod(kernel)).
  - ``ConvTranspose``:  MACs = numel(X) * prod(W.shape[1:])
    (= N * Cin * prod(in_spatial) * Cout/groups * prod(kernel)).
  - ``Einsum`` with two operands: MACs = product of the sizes of all distinct
    indices (naive evaluation); n > 2 operands: (n - 1) * that product (warned).
    A single operand (transpose / trace / sum) is counted as 1 FLOP per input element
    and not as MACs.
  - ``Attention`` (ai.onnx opset 23, what the dynamo exporter emits for SDPA at
    opset >= 23): MACs = S_kv * (numel(Q) + numel(Y))  (Q K^T and P V), plus a
    softmax over the score tensor (5 FLOPs / score element, not in ``matmul_conv``).

* Bias adds of Gemm / Conv / ConvTranspose (if the bias input is present): 1 FLOP per
  output element; they are added to ``by_op_type[op]`` and ``total`` but **not** to
  ``matmul_conv`` (so ``by_op_type["Conv"]`` may exceed the Conv MAC part).
* Elementwise ops (Add, Mul, Div, Sqrt, Relu, Exp, Where, comparisons, ...):
  1 FLOP per output element.  Variadic Sum/Max/Min: (n_inputs - 1) per output
  element, Mean: n_inputs per output element.
* Transcendental activations (Sigmoid, Tanh, Softplus, Elu, Selu, HardSwish, ...):
  4 FLOPs per output element; Swish 5 (= Sigmoid + Mul, which is how torch exports
  SiLU); Gelu, Mish: 8.  (Below opset 20 torch decomposes GELU into Div/Erf/Add/Mul,
  which are then counted as those elementwise ops.)
* Softmax, LogSoftmax, LayerNormalization, GroupNormalization,
  InstanceNormalization: 5 FLOPs per output element; RMSNormalization 4,
  BatchNormalization (inference: scale + shift) 2, LpNormalization 3.
* Reductions (ReduceSum/Mean/Max/Min/Prod, ArgMax/ArgMin, CumSum): 1 FLOP per
  *input* element; ReduceL1/L2/SumSquare/LogSum/LogSumExp: 2 per input element.
* Pooling: Max/Average/LpPool: numel(Y) * prod(kernel_shape); Global*Pool:
  numel(X).
* Resize / Upsample: nearest 0, linear 4, cubic 16 FLOPs per output element.
* Pure data movement / shape ops (Reshape, Transpose, Concat, Slice, Gather, Cast,
  Shape, Constant, Expand, Pad, ...) cost 0.
* Ops without a rule (custom domains, com.microsoft fused ops, ...) and control flow
  (If / Loop / Scan -- their subgraphs are *not* recursed into) cost 0; they are listed
  in ``FlopReport.uncounted`` and a ``warnings.warn`` is issued.

If onnx's data propagation leaves dims symbolic (typical for the legacy TorchScript
exporter's shape arithmetic, e.g. ``head_dim = Div(Shape(..), heads)`` in
nn.MultiheadAttention), the constant shape sub-graphs are evaluated (Shape/Size from the
inferred shapes, the rest with ``onnx.reference`` on small tensors), replaced by Constants
and inference is re-run; nodes folded that way are not counted.

Shape inference must give a concrete shape for every tensor a counted op needs;
otherwise ``ValueError`` naming the node is raised (``strict=False`` turns that into a
warning and counts the node as 0).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import onnx
from onnx import shape_inference

__all__ = ["FlopReport", "LinearFlops", "count_flops", "flops_per_sample"]

# --------------------------------------------------------------------------- tables

MAC_OPS = frozenset({
    "MatMul", "MatMulInteger", "QLinearMatMul", "Gemm",
    "Conv", "ConvInteger", "QLinearConv", "ConvTranspose", "Einsum", "Attention",
})

# FLOPs per output element
PER_OUTPUT_ELEMENT: dict[str, int] = {
    **{op: 1 for op in (
        "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Relu",
        "LeakyRelu", "PRelu", "ThresholdedRelu", "Clip", "Floor", "Ceil", "Round", "Sign",
        "Exp", "Log", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh",
        "Asinh", "Acosh", "Atanh", "Erf", "Where", "Equal", "Greater", "Less",
        "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Not", "Mod", "BitShift",
        "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "IsNaN", "IsInf",
        "HardSigmoid", "Shrink",
    )},
    **{op: 4 for op in ("Sigmoid", "Tanh", "Softplus", "Softsign", "Elu", "Selu", "Celu",
                        "HardSwish")},
    "Swish": 5,
    "Gelu": 8, "Mish": 8,
    **{op: 5 for op in ("Softmax", "LogSoftmax", "Hardmax", "LayerNormalization",
                        "GroupNormalization", "InstanceNormalization")},
    "RMSNormalization": 4,
    "BatchNormalization": 2,
    "LpNormalization": 3,
}

# FLOPs per input element (input 0)
PER_INPUT_ELEMENT: dict[str, int] = {
    **{op: 1 for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                        "ArgMax", "ArgMin", "CumSum")},
    **{op: 2 for op in ("ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum",
                        "ReduceLogSumExp")},
}

VARIADIC = frozenset({"Sum", "Max", "Min", "Mean"})
POOL = frozenset({"MaxPool", "AveragePool", "LpPool"})
GLOBAL_POOL = frozenset({"GlobalMaxPool", "GlobalAveragePool", "GlobalLpPool"})
RESIZE = frozenset({"Resize", "Upsample"})
CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})

ZERO_COST = frozenset({
    "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather", "GatherElements",
    "GatherND", "Scatter", "ScatterElements", "ScatterND", "Shape", "Size", "Constant",
    "ConstantOfShape", "Cast", "CastLike", "Identity", "Squeeze", "Unsqueeze", "Expand",
    "Flatten", "Pad", "Tile", "Range", "DepthToSpace", "SpaceToDepth", "Dropout",
    "NonZero", "Trilu", "EyeLike", "OneHot", "Compress", "ReverseSequence", "TopK",
    "Unique", "SplitToSequence", "SequenceAt", "SequenceConstruct", "SequenceEmpty",
    "SequenceInsert", "SequenceErase", "SequenceLength", "ConcatFromSequence",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "RandomNormal",
    "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial",
    "Optional", "OptionalGetElement", "OptionalHasElement", "Col2Im", "CenterCropPad",
    "GridSample", "RoiAlign", "NonMaxSuppression",
})


# --------------------------------------------------------------------------- results

@dataclass
class FlopReport:
    """FLOPs of one graph at one set of concrete input shapes.

    ``total``        all counted FLOPs.
    ``matmul_conv``  the MAC-derived part: exactly 2 * MACs of MatMul/Gemm/Conv/
                     ConvTranspose/Einsum/Attention (no bias adds).
    ``by_op_type``   FLOPs per ONNX op type (includes bias adds / softmax of the MAC
                     ops); sums to ``total``.  Op types that cost 0 are omitted.
    ``uncounted``    op type -> node count of nodes without a FLOP rule (costed 0).
    ``warnings``     human-readable notes (skipped control flow, unknown ops, ...).
    """

    total: int
    by_op_type: dict[str, int]
    matmul_conv: int
    uncounted: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def other(self) -> int:
        """FLOPs not derived from MACs (elementwise, norms, softmax, biases, ...)."""
        return self.total - self.matmul_conv

    def to_dict(self) -> dict:
        return {
            "total": int(self.total),
            "matmul_conv": int(self.matmul_conv),
            "other": int(self.other),
            "by_op_type": {k: int(v) for k, v in sorted(self.by_op_type.items(),
                                                         key=lambda kv: -kv[1])},
            "uncounted": dict(sorted(self.uncounted.items())),
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class LinearFlops:
    """FLOPs as an affine function of the batch size: ``per_sample * batch + constant``."""

    per_sample: int
    constant: int

    def at(self, batch: int) -> int:
        return self.per_sample * int(batch) + self.constant

    def to_dict(self) -> dict:
        return {"per_sample": int(self.per_sample), "constant": int(self.constant)}


# --------------------------------------------------------------------------- loading

_KEEP_INT_MAX_ELEMS = 4096  # integer initializers: reshape targets, axes, indices, ...
_KEEP_OTHER_MAX_ELEMS = 64  # float initializers: Resize scales/roi, scalar constants, ...
_INT_TYPES = frozenset({
    onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16,
    onnx.TensorProto.INT8, onnx.TensorProto.UINT64, onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT16, onnx.TensorProto.UINT8, onnx.TensorProto.BOOL,
})


def _is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _read_small_external(t: onnx.TensorProto, base_dir: str | None) -> onnx.TensorProto | None:
    """Inline copy of a small external tensor (read with one seek), or None."""
    if base_dir is None:
        return None
    info = {e.key: e.value for e in t.external_data}
    try:
        path = os.path.join(base_dir, info["location"])
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
        with open(path, "rb") as fh:
            fh.seek(offset)
            raw = fh.read(length if length is not None else -1)
    except (KeyError, OSError, ValueError):
        return None
    out = onnx.TensorProto()
    out.name = t.name
    out.data_type = t.data_type
    out.dims.extend(t.dims)
    out.raw_data = raw
    return out


def _stub_initializer(t: onnx.TensorProto, base_dir: str | None) -> onnx.TensorProto:
    """Keep small initializers (shape-relevant data), stub everything else to dims+dtype."""
    n = math.prod(t.dims)
    small = n <= (_KEEP_INT_MAX_ELEMS if t.data_type in _INT_TYPES else _KEEP_OTHER_MAX_ELEMS)
    if small and not _is_external(t):
        return t
    if small:
        loaded = _read_small_external(t, base_dir)
        if loaded is not None:
            return loaded
    stub = onnx.TensorProto()
    stub.name = t.name
    stub.data_type = t.data_type
    stub.dims.extend(t.dims)
    return stub


def _skeleton(model: onnx.ModelProto, base_dir: str | None = None) -> onnx.ModelProto:
    """A weight-free copy of ``model`` (value_info dropped) with local functions inlined."""
    src = model.graph
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g = m.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.sparse_initializer.extend(src.sparse_initializer)
    g.initializer.extend(_stub_initializer(t, base_dir) for t in src.initializer)
    if len(m.functions):
        from onnx import inliner

        m = inliner.inline_local_functions(m, convert_version=False)
        m.ClearField("functions")
    return m


def _load_skeleton(model_or_path) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return _skeleton(model_or_path)
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        model = onnx.load(path, load_external_data=False)
        return _skeleton(model, os.path.dirname(os.path.abspath(path)))
    raise TypeError(f"expected a path or onnx.ModelProto, got {type(model_or_path).__name__}")


# --------------------------------------------------------------------------- shapes

def _bind_inputs(model: onnx.ModelProto,
                 input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """Copy of the skeleton with concrete graph-input dims; value_info/output shapes cleared."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    init_names = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    real_inputs = [i for i in g.input if i.name not in init_names]
    known = {i.name for i in real_inputs}
    unknown = sorted(set(input_shapes) - known)
    if unknown:
        raise ValueError(f"input_shapes names {unknown} are not graph inputs "
                         f"(graph inputs: {sorted(known)})")

    # dim_param -> value, from the inputs that were given
    params: dict[str, int] = {}
    for vi in real_inputs:
        if vi.name not in input_shapes or not vi.type.HasField("tensor_type"):
            continue
        shape = tuple(int(d) for d in input_shapes[vi.name])
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            dims = tt.shape.dim
            if len(dims) != len(shape):
                raise ValueError(f"input {vi.name!r}: graph has rank {len(dims)}, "
                                 f"input_shapes gives {shape} (rank {len(shape)})")
            for ax, (d, v) in enumerate(zip(dims, shape)):
                if d.HasField("dim_value") and d.dim_value != v:
                    raise ValueError(f"input {vi.name!r}: dim {ax} is fixed to {d.dim_value} "
                                     f"in the graph but input_shapes gives {v}")
                if d.HasField("dim_param") and d.dim_param:
                    old = params.setdefault(d.dim_param, v)
                    if old != v:
                        raise ValueError(f"symbolic dim {d.dim_param!r} bound to both {old} "
                                         f"and {v} (input {vi.name!r})")

    for vi in real_inputs:
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if vi.name in input_shapes:
            shape = [int(d) for d in input_shapes[vi.name]]
        else:
            if not tt.HasField("shape"):
                raise ValueError(f"graph input {vi.name!r} has no shape; give it in input_shapes")
            shape = []
            for ax, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value"):
                    shape.append(d.dim_value)
                elif d.dim_param in params:
                    shape.append(params[d.dim_param])
                else:
                    raise ValueError(
                        f"graph input {vi.name!r} dim {ax} ({d.dim_param or '?'}) is symbolic "
                        f"and not bound; give {vi.name!r} in input_shapes")
        tt.ClearField("shape")
        tt.shape.SetInParent()
        for v in shape:
            tt.shape.dim.add().dim_value = v

    g.ClearField("value_info")
    for out in g.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    return m


def _shape_of_type(tp: onnx.TypeProto):
    if not tp.HasField("tensor_type"):
        return None
    tt = tp.tensor_type
    if not tt.HasField("shape"):
        return None
    out = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        else:
            out.append(d.dim_param or "?")
    return tuple(out)


def _infer(model: onnx.ModelProto) -> dict[str, tuple]:
    inferred = shape_inference.infer_shapes(model, check_type=False, strict_mode=False,
                                            data_prop=True)
    g = inferred.graph
    shapes: dict[str, tuple] = {}
    for t in g.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        s = _shape_of_type(vi.type)
        if s is not None:
            shapes[vi.name] = s
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    shapes.setdefault(node.output[0], tuple(int(d) for d in a.t.dims))
    return shapes


def _concrete(s) -> bool:
    return s is not None and all(isinstance(d, int) for d in s)


def _all_concrete(model: onnx.ModelProto, shapes: dict[str, tuple]) -> bool:
    return all(_concrete(shapes.get(o)) for n in model.graph.node for o in n.output if o)


# Shape-value folding.  onnx's data propagation does not cover everything the legacy
# TorchScript exporter emits for shape arithmetic (e.g. Div/Cast/Sqrt of dims in
# nn.MultiheadAttention), which leaves "unk__N" dims behind.  With all input dims concrete,
# every such sub-graph is a constant: evaluate it (Shape/Size from inferred shapes, the rest
# with onnx.reference on small tensors), replace the nodes by Constants and re-infer.
_FOLD_MAX_ELEMS = 1 << 16
_NO_FOLD = CONTROL_FLOW | {"RandomNormal", "RandomNormalLike", "RandomUniform",
                           "RandomUniformLike", "Bernoulli", "Multinomial", "Constant"}
_MAX_FOLD_ROUNDS = 8


def _has_data(t: onnx.TensorProto) -> bool:
    if _is_external(t):
        return False
    if math.prod(t.dims) == 0:
        return True
    return bool(t.raw_data or t.float_data or t.int32_data or t.int64_data or t.double_data
                or t.uint64_data or t.string_data)


def _eval_node(node: onnx.NodeProto, feeds: dict, opsets) -> list | None:
    import numpy as np
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    try:
        inputs = [helper.make_tensor_value_info(
            n, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), None)
            for n, v in feeds.items()]
        outputs = [helper.make_value_info(o, onnx.TypeProto()) for o in node.output if o]
        graph = helper.make_graph([node], "fold", inputs, outputs)
        model = helper.make_model(graph, opset_imports=list(opsets))
        return ReferenceEvaluator(model).run(None, feeds)
    except Exception:  # noqa: BLE001 - folding is best effort
        return None


def _fold_once(model: onnx.ModelProto, shapes: dict[str, tuple]) -> onnx.ModelProto | None:
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    values: dict[str, "np.ndarray"] = {}
    for t in g.initializer:
        if _has_data(t) and math.prod(t.dims) <= _FOLD_MAX_ELEMS:
            values[t.name] = numpy_helper.to_array(t)
    new_nodes: list[onnx.NodeProto] = []
    changed = False
    for node in g.node:
        op = node.op_type
        out_vals = None
        if node.domain not in ("", "ai.onnx"):
            pass
        elif op == "Constant":
            a = node.attribute[0] if len(node.attribute) == 1 else None
            if a is not None and a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                if math.prod(a.t.dims) <= _FOLD_MAX_ELEMS:
                    values[node.output[0]] = numpy_helper.to_array(a.t)
            elif a is not None and a.name != "sparse_value":  # value_int(s) / value_float(s)
                res = _eval_node(node, {}, model.opset_import)
                if res is not None and np.asarray(res[0]).size <= _FOLD_MAX_ELEMS:
                    values[node.output[0]] = np.asarray(res[0])
        elif op in ("Shape", "Size"):
            s = shapes.get(node.input[0])
            if _concrete(s):
                if op == "Size":
                    out_vals = [np.array(math.prod(s), dtype=np.int64)]
                else:
                    start = _attr(node, "start", 0)
                    end = _attr(node, "end", None)
                    out_vals = [np.array(s[start:end], dtype=np.int64)]
        elif op not in _NO_FOLD:
            ins = [i for i in node.input if i]
            if ins and all(i in values for i in ins) and \
                    sum(values[i].size for i in ins) <= _FOLD_MAX_ELEMS:
                res = _eval_node(node, {i: values[i] for i in ins}, model.opset_import)
                if res is not None and all(np.asarray(r).size <= _FOLD_MAX_ELEMS for r in res):
                    out_vals = [np.asarray(r) for r in res]
        if out_vals is None:
            new_nodes.append(node)
            continue
        changed = True
        for name, val in zip([o for o in node.output if o], out_vals):
            values[name] = val
            new_nodes.append(helper.make_node(
                "Constant", [], [name], value=numpy_helper.from_array(val, name)))
    if not changed:
        return None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.ClearField("node")
    m.graph.node.extend(new_nodes)
    m.graph.ClearField("value_info")
    return m


def _infer_concrete(bound: onnx.ModelProto) -> tuple[dict[str, tuple], set[str]]:
    """Shape map of ``bound``; falls back to shape-value folding when dims stay symbolic.

    Also returns the names of tensors that were folded to constants (shape arithmetic)."""
    shapes = _infer(bound)
    work = bound
    for _ in range(_MAX_FOLD_ROUNDS):
        if _all_concrete(work, shapes):
            break
        folded = _fold_once(work, shapes)
        if folded is None:
            break
        work = folded
        new_shapes = _infer(work)
        # keep what we knew (e.g. non-folded originals); prefer concrete new info
        for k, v in new_shapes.items():
            if _concrete(v) or k not in shapes:
                shapes[k] = v
    folded_names = {n.output[0] for n in work.graph.node if n.op_type == "Constant"}
    return shapes, folded_names


# --------------------------------------------------------------------------- counting

class _ShapeError(ValueError):
    pass


def _node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name or '<unnamed>'!r} (outputs {list(node.output)})"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _einsum_macs(eq: str, in_shapes: list[tuple[int, ...]]) -> tuple[int, int]:
    """Returns (product of all index sizes, number of operands)."""
    eq = eq.replace(" ", "")
    lhs = eq.split("->")[0]
    terms = lhs.split(",")
    if len(terms) != len(in_shapes):
        raise ValueError(f"Einsum equation {eq!r} has {len(terms)} operands, "
                         f"got {len(in_shapes)} shapes")
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, in_shapes):
        if "..." in term:
            pre, post = term.split("...")
            n_ell = len(shape) - len(pre) - len(post)
            labels = list(pre) + [f"...{n_ell - i}" for i in range(n_ell)] + list(post)
        else:
            labels = list(term)
        if len(labels) != len(shape):
            raise ValueError(f"Einsum term {term!r} does not match shape {shape}")
        for lab, s in zip(labels, shape):
            sizes[lab] = max(sizes.get(lab, 1), int(s))
    return math.prod(sizes.values()), len(terms)


def _count_node(node, shape_of, warn) -> tuple[int, int]:
    """Returns (mac_flops, other_flops) of one node. ``shape_of(name)`` -> concrete shape."""
    op = node.op_type
    numel = lambda name: math.prod(shape_of(name))  # noqa: E731
    has = lambda i: len(node.input) > i and node.input[i] != ""  # noqa: E731

    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        return 2 * numel(node.output[0]) * shape_of(node.input[0])[-1], 0
    if op == "Gemm":
        a = shape_of(node.input[0])
        k = a[0] if _attr(node, "transA", 0) else a[1]
        y = numel(node.output[0])
        return 2 * y * k, (y if has(2) else 0)
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = shape_of(node.input[3] if op == "QLinearConv" else node.input[1])
        y = numel(node.output[0])
        bias = y if (op == "Conv" and has(2)) or (op == "QLinearConv" and has(8)) else 0
        return 2 * y * math.prod(w[1:]), bias
    if op == "ConvTranspose":
        w = shape_of(node.input[1])
        x = numel(node.input[0])
        return 2 * x * math.prod(w[1:]), (numel(node.output[0]) if has(2) else 0)
    if op == "Einsum":
        eq = _attr(node, "equation")
        eq = eq.decode() if isinstance(eq, bytes) else eq
        shapes = [shape_of(i) for i in node.input]
        if len(shapes) == 1:
            return 0, math.prod(shapes[0])
        prod, n = _einsum_macs(eq, shapes)
        if n > 2:
            warn(f"{_node_label(node)}: Einsum with {n} operands counted as "
                 f"(n-1) * prod(all index sizes) MACs")
        return 2 * (n - 1) * prod, 0
    if op == "Attention":
        q = shape_of(node.input[0])
        k = shape_of(node.input[1])
        y = shape_of(node.output[0])
        s_kv = k[-2]
        if len(node.output) > 1 and node.output[1]:  # present_key = past + new keys
            s_kv = shape_of(node.output[1])[-2]
        macs = s_kv * (math.prod(q) + math.prod(y))
        if len(q) == 4:
            scores = q[0] * q[1] * q[2] * s_kv
        else:
            heads = int(_attr(node, "q_num_heads", 1) or 1)
            scores = q[0] * q[1] * heads * s_kv
        return 2 * macs, 5 * scores

    if op in PER_OUTPUT_ELEMENT:
        return 0, PER_OUTPUT_ELEMENT[op] * numel(node.output[0])
    if op in VARIADIC:
        n = sum(1 for i in node.input if i)
        per = n if op == "Mean" else n - 1
        return 0, per * numel(node.output[0]) if per > 0 else 0
    if op in PER_INPUT_ELEMENT:
        return 0, PER_INPUT_ELEMENT[op] * numel(node.input[0])
    if op in POOL:
        ks = _attr(node, "kernel_shape")
        return 0, numel(node.output[0]) * math.prod(ks or (1,))
    if op in GLOBAL_POOL:
        return 0, numel(node.input[0])
    if op in RESIZE:
        mode = _attr(node, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        per = {"nearest": 0, "linear": 4, "bilinear": 4, "cubic": 16}.get(mode, 4)
        return 0, per * numel(node.output[0]) if per else 0
    raise KeyError(op)  # no rule


def _is_counted(node: onnx.NodeProto) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    op = node.op_type
    return (op in MAC_OPS or op in PER_OUTPUT_ELEMENT or op in VARIADIC or op in PER_INPUT_ELEMENT
            or op in POOL or op in GLOBAL_POOL or op in RESIZE)


def _count_bound(bound: onnx.ModelProto, strict: bool) -> FlopReport:
    shapes, folded = _infer_concrete(bound)
    by_op: dict[str, int] = {}
    uncounted: dict[str, int] = {}
    notes: list[str] = []
    mac_total = 0
    total = 0

    def warn(msg: str) -> None:
        notes.append(msg)

    for node in bound.graph.node:
        op = node.op_type
        if node.output and all(o in folded for o in node.output if o):
            continue  # constant / shape arithmetic, folded away before runtime
        if not _is_counted(node):
            if node.domain in ("", "ai.onnx") and op in ZERO_COST:
                continue
            key = op if node.domain in ("", "ai.onnx") else f"{node.domain}::{op}"
            uncounted[key] = uncounted.get(key, 0) + 1
            if op in CONTROL_FLOW:
                warn(f"{_node_label(node)}: control flow, subgraphs not counted")
            else:
                warn(f"{_node_label(node)}: no FLOP rule for "
                     f"{(node.domain + '::') if node.domain else ''}{op}, counted as 0")
            continue

        def shape_of(name: str, _node=node) -> tuple[int, ...]:
            s = shapes.get(name)
            if s is None or any(not isinstance(d, int) for d in s):
                got = "no shape" if s is None else f"non-concrete shape {s}"
                raise _ShapeError(
                    f"cannot count FLOPs of {_node_label(_node)}: shape inference gave "
                    f"{got} for tensor {name!r} (check input_shapes; custom-domain or "
                    f"data-dependent producers upstream have no inferable shape; "
                    f"strict=False counts such nodes as 0 with a warning)")
            return s

        try:
            mac, other = _count_node(node, shape_of, warn)
        except _ShapeError as e:
            if strict:
                raise ValueError(str(e)) from None
            warn(str(e))
            uncounted[op] = uncounted.get(op, 0) + 1
            continue
        flops = mac + other
        mac_total += mac
        total += flops
        if flops:
            by_op[op] = by_op.get(op, 0) + flops

    for msg in notes:
        warnings.warn(msg, stacklevel=3)
    return FlopReport(total=total, by_op_type=by_op, matmul_conv=mac_total,
                      uncounted=uncounted, warnings=notes)


# --------------------------------------------------------------------------- public API

def count_flops(model_or_path: "str | os.PathLike | onnx.ModelProto",
                input_shapes: dict[str, tuple[int, ...]],
                *, strict: bool = True) -> FlopReport:
    """Count FLOPs of an ONNX graph at concrete input shapes (see module docstring).

    ``input_shapes`` maps graph-input names to concrete shapes; inputs whose dims are all
    static (or whose symbolic dims are bound through another input) may be omitted.
    Raises ``ValueError`` if a counted op has no concrete inferred shape (``strict=False``:
    warn and count it as 0 instead).
    """
    skel = _load_skeleton(model_or_path)
    return _count_bound(_bind_inputs(skel, input_shapes), strict)


def inferred_shapes(model_or_path: "str | os.PathLike | onnx.ModelProto",
                    input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Every tensor's shape at concrete input shapes (the same inference the counter uses; weights never loaded)."""
    shapes, _ = _infer_concrete(_bind_inputs(_load_skeleton(model_or_path), input_shapes))
    return shapes


def flops_per_sample(model_or_path: "str | os.PathLike | onnx.ModelProto",
                     input_shapes_for_batch: Callable[[int], dict],
                     *, strict: bool = True) -> LinearFlops:
    """FLOPs as ``per_sample * batch + constant``, from counts at batch 1 and 2.

    ``input_shapes_for_batch(b)`` must return the ``input_shapes`` dict for batch ``b``.
    """
    skel = _load_skeleton(model_or_path)
    f1 = _count_bound(_bind_inputs(skel, input_shapes_for_batch(1)), strict).total
    f2 = _count_bound(_bind_inputs(skel, input_shapes_for_batch(2)), strict).total
    per_sample = f2 - f1
    constant = f1 - per_sample
    if per_sample < 0 or constant < 0:
        warnings.warn(f"FLOPs are not affine-increasing in the batch size "
                      f"(batch 1: {f1}, batch 2: {f2})", stacklevel=2)
    return LinearFlops(per_sample=per_sample, constant=constant)
