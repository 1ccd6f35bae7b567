"""Graph cleanup before TensorRT engine building (usable on its own): ONNX file -> smaller, equivalent ONNX file.

The sequence follows demoDiffusion's ``Optimizer`` (NVIDIA/TensorRT ``demo/Diffusion/demo_diffusion/model/optimizer.py``):

1. ``onnx_graphsurgeon.import_onnx`` -> ``cleanup().toposort()`` (drops nodes and tensors no output depends on);
2. Polygraphy ``fold_constants(..., allow_onnxruntime_shape_inference=True)`` (evaluates subgraphs whose inputs
   are all constants, and shape computations that only depend on static dims);
3. ONNX shape inference: in memory for small graphs, through a temporary file
   (``onnx.shape_inference.infer_shapes_path``) for graphs over the protobuf limit, which in-memory inference
   cannot serialize;
4. a final ``cleanup()`` (folding leaves dead constants behind), then save.

Graphs larger than ``external_data_threshold`` bytes are saved with their tensors in one external file
``<dst name>.data`` next to ``dst`` (protobuf cannot serialize a message of 2 GiB or more).

Usage::

    from keystep.graphs.cleanup import cleanup_graph
    report = cleanup_graph("decoder.onnx", "decoder.clean.onnx", log=print)
    report.steps[-1].nodes, report.external_data
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

# Protobuf refuses messages of 2 GiB or more; keep room for the graph structure around the tensors.
PROTOBUF_LIMIT = 2**31
DEFAULT_EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 2**20


@dataclass(frozen=True)
class StepCount:
    step: str
    nodes: int
    tensors: int
    inputs: int
    outputs: int

    def format(self, name: str) -> str:
        return (f"{name}: {self.step} .. {self.nodes} nodes, {self.tensors} tensors, "
                f"{self.inputs} inputs, {self.outputs} outputs")


@dataclass
class CleanupReport:
    name: str
    dst: Path
    external_data: bool = False  # True: tensors were written to ``<dst name>.data``
    steps: list[StepCount] = field(default_factory=list)

    def format(self) -> str:
        return "\n".join(s.format(self.name) for s in self.steps)


def import_graphsurgeon():
    try:
        import onnx_graphsurgeon as gs
    except ImportError as exc:
        raise ImportError("graph passes need onnx-graphsurgeon: pip install onnx-graphsurgeon "
                          "(or keystep's 'export' extra)") from exc
    return gs


def fold_constants_quietly(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        from polygraphy.backend.onnx.loader import fold_constants
        from polygraphy.logger import G_LOGGER
    except ImportError as exc:
        raise ImportError("constant folding needs polygraphy: pip install polygraphy "
                          "(or keystep's 'export' extra)") from exc
    with G_LOGGER.verbosity(G_LOGGER.WARNING):  # its per-pass info lines duplicate our step counts
        return fold_constants(model, allow_onnxruntime_shape_inference=True)


def cleanup_graph(src: str | Path | onnx.ModelProto, dst: str | Path, *, fold_constants: bool = True,
                  external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD, log=None) -> CleanupReport:
    """Clean ``src`` (a path, whose external data is loaded from its folder, or a ModelProto) into ``dst``.

    ``log`` (e.g. ``print``) receives one demoDiffusion-style line per step."""
    gs = import_graphsurgeon()
    dst = Path(dst)
    model = src if isinstance(src, onnx.ModelProto) else onnx.load(str(src))
    had_external_data = not isinstance(src, onnx.ModelProto) and _uses_external_data(Path(src))
    report = CleanupReport(name=dst.stem, dst=dst)

    def record(step: str, graph) -> None:
        count = StepCount(step, len(graph.nodes), len(graph.tensors()), len(graph.inputs), len(graph.outputs))
        report.steps.append(count)
        if log is not None:
            log(count.format(report.name))

    graph = gs.import_onnx(model)
    record("original", graph)
    graph.cleanup().toposort()
    record("cleanup", graph)
    model = gs.export_onnx(graph)
    if fold_constants:
        model = fold_constants_quietly(model)
        record("fold constants", gs.import_onnx(model))
    large = had_external_data or model.ByteSize() > external_data_threshold
    model = _infer_shapes(model, large)
    record("shape inference", gs.import_onnx(model))
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    record("final cleanup", graph)
    model = gs.export_onnx(graph)
    report.external_data = model.ByteSize() > external_data_threshold
    _save(model, dst, report.external_data)
    return report


def external_data_location(dst: Path) -> str:
    return dst.name + ".data"


def _uses_external_data(path: Path) -> bool:
    skeleton = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in skeleton.graph.initializer)


def _infer_shapes(model: onnx.ModelProto, large: bool) -> onnx.ModelProto:
    if not large:
        return onnx.shape_inference.infer_shapes(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        _save(model, path, external_data=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
        return onnx.load(str(path))  # reads the data file (from the temp dir) back into memory


def _save(model: onnx.ModelProto, dst: Path, external_data: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = dst.parent / external_data_location(dst)
    # onnx appends tensors to an existing data file: a stale one from an earlier run would grow and mismatch.
    if data.exists():
        os.remove(data)
    if external_data:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_data_location(dst), convert_attribute=False)
    else:
        onnx.save_model(model, str(dst))
