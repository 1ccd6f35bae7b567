"""Mixed precision for ONNX graphs (an ONNX -> ONNX pass): a float32 stage graph -> fp16 or bf16 with fp32 islands.

TensorRT 11 is strongly typed (no FP16/BF16 builder flags), so a graph's precision is its tensor types.

What stays float32
------------------
* **Islands** (tensors and arithmetic in fp32), where the low type overflows or loses too much:
  normalisations, softmax, sum/mean reductions (decomposed norms and softmax), Exp (overflows fp16 above ~11),
  Sin/Cos (the timestep embedding's phase ``t * freq`` reaches ~1000 rad: fp16 rounds it by ~0.5 rad), plus any op
  type the caller lists. An island grows along non-MAC ops: upstream to a producer with at most one variable
  float input whose consumers all sit in islands (``Pow`` before a ``ReduceMean``; ``t * freq`` and
  ``Unsqueeze(t)`` before ``Sin``), downstream to a consumer whose variable float inputs all come from a reduction
  or Exp, whose values can exceed the low range (``Add(eps)`` and ``Sqrt`` after a variance ``ReduceMean``,
  ``Div`` of a decomposed softmax). Normalised outputs are bounded: the affine and activation after a norm go low.
  Ops with a low variable input stop the growth, so e.g. the residual stream stays low.
* **fp32 compute** (tensors stay low, the node computes in fp32 between Casts): ops the target has no low kernel
  for (``low_kernels``), ops whose schema at the graph's opset does not admit the low type (opset 18: Conv,
  ConvTranspose, Einsum, InstanceNormalization, Sin, Cos and Range have no bf16; Range has no fp16), and ops
  without a schema. Their outputs are rounded to the low type, so the graph keeps the low type's numerics.

Everything else with float32 tensors becomes low: initializers, ``Constant`` / ``ConstantOfShape`` values and
``Cast(to=FLOAT)`` in the low region, values clipped to the low type's finite range (a -3.4e38 attention mask must
not become -inf: ``-inf * 0`` is NaN). A constant that any consumer needs in fp32 stays fp32. Graph inputs and
outputs stay float32; Casts go only where a tensor crosses between precisions, one per tensor and target type.
Integer and shape subgraphs are untouched.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Collection, Iterable

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .flops import MAC_OPS

__all__ = ["LOW_TYPES", "DEFAULT_FP32_OPS", "PrecisionReport", "convert_precision", "convert_file"]

LOW_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_NUMPY = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}
_SCHEMA_TYPE = {"fp16": "tensor(float16)", "bf16": "tensor(bfloat16)"}
FLOAT = TensorProto.FLOAT

DEFAULT_FP32_OPS = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization",
    "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
    "Exp", "Sin", "Cos",
})
# islands grow downstream only from these: their outputs (sums, exponentials) can exceed the low type's range
UNBOUNDED_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "Exp"})
CONSTANT_OPS = frozenset({"Constant", "ConstantOfShape"})
LOW, FP32 = "low", "fp32"


@dataclass
class PrecisionReport:
    """What the converted graph contains (the manifest's ``precision`` field, without the measured error)."""

    type: str
    fp32_ops: list[str]  # op types with a node in an fp32 island
    fp32_nodes: int
    fp32_compute_ops: list[str]  # op types computed in fp32 on low tensors (no low kernel / schema type)
    fp32_compute_nodes: int
    low_nodes: int
    casts_added: int

    def to_dict(self) -> dict:
        return asdict(self)


class _Node:
    """A node and its float32 inputs, split by what its schema says: ``carrying`` inputs take the node's precision,
    ``fixed`` ones stay float32 whatever it is (Resize's ``scales``, Pow's exponent), Cast's input is ``free``."""

    def __init__(self, index: int, node: onnx.NodeProto, types: dict[str, int], opsets: dict[str, int]):
        self.index, self.proto, self.op = index, node, node.op_type
        floats = [i for i, name in enumerate(node.input) if name and types.get(name) == FLOAT]
        self.float_outputs = [o for o in node.output if o and types.get(o) == FLOAT]
        self.carrying, self.fixed, self.free = floats, [], []
        self.schema, self.params = None, set()
        if self.op == "Cast":
            self.carrying, self.free = [], floats
            return
        try:
            self.schema = onnx.defs.get_schema(self.op, opsets.get(node.domain or "", 1), node.domain or "")
        except onnx.defs.SchemaError:
            return
        formal = [self.schema.inputs[min(i, len(self.schema.inputs) - 1)].type_str for i in range(len(node.input))]
        outs = self.schema.outputs
        # the precision-carrying type parameters: the float outputs', or for float-in, non-float-out nodes
        # (Shape, IsNaN, Equal) the float inputs'
        self.params = {outs[min(j, len(outs) - 1)].type_str for j, o in enumerate(node.output) if o in self.float_outputs}
        self.params = self.params or {formal[i] for i in floats}
        self.carrying = [i for i in floats if formal[i] in self.params]
        self.fixed = [i for i in floats if formal[i] not in self.params]

    @property
    def is_float(self) -> bool:
        return bool(self.carrying or self.fixed or self.free or self.float_outputs)

    def variable_inputs(self, constants: set[str]) -> list[str]:
        return [self.proto.input[i] for i in self.carrying + self.free if self.proto.input[i] not in constants]

    def admits(self, precision: str) -> bool:
        """Whether the schema allows the low type for every precision-carrying type parameter."""
        if self.op == "Cast":
            return True
        if self.schema is None:
            return False
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in self.schema.type_constraints}
        return all(_SCHEMA_TYPE[precision] in allowed.get(p, {p}) for p in self.params)


def convert_precision(
    model: onnx.ModelProto,
    precision: str,
    fp32_ops: Iterable[str] = (),
    low_kernels: Collection[str] | None = None,
) -> tuple[onnx.ModelProto, PrecisionReport]:
    """``model`` converted to ``precision`` (``fp16`` / ``bf16``), and what the result contains.

    ``fp32_ops`` adds op types to the fp32 islands. ``low_kernels`` are the op types the target computes in the
    low type; other float ops compute in fp32 between Casts (None: every op whose schema admits the type).
    """
    if precision not in LOW_TYPES:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(LOW_TYPES)}")
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise ValueError("the precision pass does not handle control flow (If/Loop/Scan subgraphs)")
    types = _tensor_types(model)
    opsets = {o.domain or "": o.version for o in model.opset_import}
    nodes = [_Node(i, n, types, opsets) for i, n in enumerate(graph.node)]
    constants = {t.name for t in graph.initializer} | {o for nd in nodes if nd.op in CONSTANT_OPS for o in nd.proto.output}
    graph_inputs = {i.name for i in graph.input}
    graph_outputs = {o.name for o in graph.output}
    islands = _islands(nodes, constants, graph_outputs, DEFAULT_FP32_OPS | set(fp32_ops))

    precision_of: dict[int, str] = {}
    computes_fp32: list[_Node] = []
    producer = {o: nd for nd in nodes for o in nd.proto.output if o}
    for nd in nodes:
        if nd.op in CONSTANT_OPS or not nd.is_float:
            continue
        if nd.index in islands:
            precision_of[nd.index] = FP32
        elif not nd.float_outputs and nd.admits(precision):
            # float in, nothing float out (Shape, IsNaN, Cast to int): read the input in the precision it is made in
            source = nd.proto.input[(nd.carrying + nd.free)[0]]
            made = FP32 if source in graph_inputs else precision_of.get(producer[source].index, LOW) if source in producer else LOW
            precision_of[nd.index] = FP32 if made == FP32 or not _has_kernel(nd, low_kernels) else LOW
        elif nd.admits(precision) and _has_kernel(nd, low_kernels):
            precision_of[nd.index] = LOW
        else:
            precision_of[nd.index] = FP32
            computes_fp32.append(nd)

    # constants take the low type only if every consumer wants it there (fp32-compute nodes read low tensors)
    rounded = {nd.index for nd in computes_fp32}
    wants: dict[str, set[str]] = {o: {FP32} for o in graph_outputs}
    for nd in nodes:
        for i in nd.carrying:
            wants.setdefault(nd.proto.input[i], set()).add(LOW if nd.index in rounded else precision_of.get(nd.index, FP32))
        for i in nd.fixed:
            wants.setdefault(nd.proto.input[i], set()).add(FP32)
    low_constants = {c for c in constants if types.get(c) == FLOAT and wants.get(c) == {LOW}}

    converted, casts = _rewrite(model, precision, nodes, precision_of, rounded, low_constants, types)
    island_ops = Counter(nodes[i].op for i in islands)
    compute_ops = Counter(nd.op for nd in computes_fp32)
    report = PrecisionReport(
        type=precision,
        fp32_ops=sorted(island_ops),
        fp32_nodes=sum(island_ops.values()),
        fp32_compute_ops=sorted(compute_ops),
        fp32_compute_nodes=sum(compute_ops.values()),
        low_nodes=sum(p == LOW for p in precision_of.values()),
        casts_added=casts,
    )
    return converted, report


def _islands(nodes: list[_Node], constants: set[str], graph_outputs: set[str], seeds: set[str]) -> set[int]:
    """Indices of the nodes in fp32 islands: the seed op types, grown to a fixpoint along non-MAC ops."""
    producer = {o: nd for nd in nodes for o in nd.proto.output if o}
    consumers: dict[str, list[_Node]] = {}
    for nd in nodes:
        for name in set(nd.proto.input):
            consumers.setdefault(name, []).append(nd)
    islands = {nd.index for nd in nodes if nd.op in seeds and nd.is_float}
    unbounded = {i for i in islands if nodes[i].op in UNBOUNDED_OPS}
    growable = [nd for nd in nodes if nd.is_float and nd.op not in MAC_OPS | CONSTANT_OPS and nd.float_outputs]
    changed = True
    while changed:
        changed = False
        for nd in growable:
            if nd.index in islands:
                continue
            variable = nd.variable_inputs(constants)
            uses = [c for o in nd.float_outputs for c in consumers.get(o, [])]
            feeds_islands = (len(variable) <= 1 and uses and all(c.index in islands for c in uses)
                             and not graph_outputs.intersection(nd.float_outputs))
            fed_by_unbounded = variable and all(v in producer and producer[v].index in unbounded for v in variable)
            if fed_by_unbounded:
                unbounded.add(nd.index)
            if feeds_islands or fed_by_unbounded:
                islands.add(nd.index)
                changed = True
    return islands


def _rewrite(model, precision, nodes, precision_of, rounded, low_constants, types) -> tuple[onnx.ModelProto, int]:
    """The converted copy of ``model`` and the number of Casts added. Nodes in ``rounded`` compute in fp32 and
    their float outputs are rounded to the low type (except graph outputs, which are float32 anyway)."""
    low_type = LOW_TYPES[precision]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    del graph.node[:]
    graph_outputs = {o.name for o in model.graph.output}
    kind = {name: FP32 for name, t in types.items() if t == FLOAT}  # the precision each float tensor is made in
    kind.update(dict.fromkeys(low_constants, LOW))
    made_as: dict[str, str] = {}  # renamed tensors: a low graph output is produced under another name
    casts: dict[tuple[str, str], str] = {}

    def cast(source: str, target: str, to: int) -> None:
        graph.node.append(helper.make_node("Cast", [source], [target], name=f"{target}/Cast", to=to))

    def version(name: str, want: str) -> str:
        """``name`` in precision ``want``: the tensor itself, or a Cast of it (one per tensor and type)."""
        if kind.get(name, want) == want:
            return made_as.get(name, name)
        if (name, want) not in casts:
            casts[(name, want)] = f"{name}/{precision if want == LOW else 'fp32'}"
            cast(made_as.get(name, name), casts[(name, want)], low_type if want == LOW else FLOAT)
        return casts[(name, want)]

    for init in graph.initializer:
        if init.name in low_constants:
            init.CopyFrom(_to_low(init, precision))
    rounding_casts = 0
    for nd in nodes:
        node = onnx.NodeProto()
        node.CopyFrom(nd.proto)
        p = precision_of.get(nd.index)
        if nd.op in CONSTANT_OPS and node.output[0] in low_constants:
            value = next((a for a in node.attribute if a.name.startswith("value")), None)
            low = _to_low(_constant_value(value), precision)
            node.ClearField("attribute")
            node.attribute.append(helper.make_attribute("value", low))
        if p is None:
            graph.node.append(node)
            continue
        for i in nd.carrying:
            node.input[i] = version(nd.proto.input[i], p)
        for i in nd.fixed:
            node.input[i] = version(nd.proto.input[i], FP32)
        for i in nd.free:
            node.input[i] = made_as.get(node.input[i], node.input[i])
        to = next((a for a in node.attribute if a.name == "to"), None) if nd.op == "Cast" else None
        if to is not None and p == LOW and to.i == FLOAT:
            to.i = low_type
        low_outputs = [o for o in nd.float_outputs if p == LOW]
        rounded_outputs = [o for o in nd.float_outputs if nd.index in rounded and o not in graph_outputs]
        for j, o in enumerate(node.output):
            if o in low_outputs and o in graph_outputs:  # stays float32: the node writes a low tensor, a Cast o
                made_as[o] = node.output[j] = f"{o}/{precision}"
            elif o in rounded_outputs:
                node.output[j] = f"{o}/unrounded"
        graph.node.append(node)
        for o in low_outputs:
            kind[o] = LOW
            if o in graph_outputs:  # low consumers read the node's own low tensor
                casts[(o, LOW)] = made_as.pop(o)
                cast(casts[(o, LOW)], o, FLOAT)
                kind[o] = FP32
        for o in rounded_outputs:
            cast(f"{o}/unrounded", o, low_type)
            kind[o] = LOW
            rounding_casts += 1
    for vi in graph.value_info:
        if kind.get(vi.name) == LOW and vi.type.tensor_type.elem_type == FLOAT:
            vi.type.tensor_type.elem_type = low_type
    return out, len(casts) + rounding_casts


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, by type inference on a weightless copy (weights become typed inputs, so a
    model over protobuf's 2 GiB limit works too; types never depend on weight values)."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    weightless = helper.make_graph(
        list(graph.node), graph.name, list(graph.input) + [
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer
            if t.name not in inputs],
        list(graph.output), value_info=list(graph.value_info))
    inferred = onnx.shape_inference.infer_shapes(
        helper.make_model(weightless, opset_imports=model.opset_import, ir_version=model.ir_version,
                          functions=model.functions))
    g = inferred.graph
    return {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]
            if v.type.HasField("tensor_type")}


def _has_kernel(nd: _Node, low_kernels: Collection[str] | None) -> bool:
    return low_kernels is None or nd.op in low_kernels


def _constant_value(attr: onnx.AttributeProto | None) -> onnx.TensorProto:
    if attr is None:  # ConstantOfShape without a value fills float32 zeros
        return numpy_helper.from_array(np.zeros(1, np.float32))
    if attr.name == "value_float":
        return numpy_helper.from_array(np.array(attr.f, np.float32))
    if attr.name == "value_floats":
        return numpy_helper.from_array(np.array(attr.floats, np.float32))
    return attr.t


def _to_low(tensor: onnx.TensorProto, precision: str) -> onnx.TensorProto:
    """The tensor in the low type, finite values clipped to its range (infinities and NaN stay what they are)."""
    values = numpy_helper.to_array(tensor)
    limit = float(ml_dtypes.finfo(_NUMPY[precision]).max)
    finite = np.isfinite(values)
    values = np.where(finite, np.clip(values, -limit, limit), values).astype(_NUMPY[precision])
    return numpy_helper.from_array(values, tensor.name)


def convert_file(path: Path, precision: str, fp32_ops: Iterable[str] = (),
                 low_kernels: Collection[str] | None = None) -> PrecisionReport:
    """Convert the graph at ``path`` in place (weights in an external data file stay external, in a new one)."""
    path = Path(path)
    model = onnx.load(str(path))
    external = path.with_name(path.name + ".data")
    converted, report = convert_precision(model, precision, fp32_ops, low_kernels)
    if external.exists():
        external.unlink()
        onnx.save(converted, str(path), save_as_external_data=True, location=external.name)
    else:
        onnx.save(converted, str(path))
    return report
