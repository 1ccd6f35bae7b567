"""Export stage modules to ONNX and write a bundle atomically (temp dir, then rename)."""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from keystep.graphs.flops import flops_per_sample
from keystep.runtime.atomic import publish_directory
from keystep.runtime.bundle import MANIFEST_NAME, SCHEMA_VERSION, sha256_file
from keystep.runtime.manifest import check_manifest

from .dit_export import StageDef, parse_dim
from .stage_precision import PrecisionPlan, convert_stage

ONNX_OPSET = 18
SAMPLE_BATCH = 2
DEFAULT_DIM_RANGE = (1, 65536)  # (min, max) of a symbolic axis unless StageDef.dim_ranges says otherwise
# Above this the protobuf limit (2 GiB) bites: weights go to an external data file next to the graph.
EXTERNAL_DATA_BYTES = 1_500_000_000


def export_stage(stage: StageDef, out_dir: Path) -> list[Path]:
    """Export one stage with its symbolic axes dynamic; returns the files written (graph first).

    Every symbolic dim name in the input specs becomes one ``torch.export.Dim`` shared by all inputs that use it
    ("8*height" becomes ``8 * Dim("height")``); the trace inputs come from ``TensorSpec.sample`` at batch
    ``SAMPLE_BATCH`` and ``stage.trace_sizes``.
    """
    path = out_dir / f"{stage.name}.onnx"
    gen = torch.Generator().manual_seed(0)
    sizes = {"batch": SAMPLE_BATCH, **stage.trace_sizes}
    args = tuple(spec.sample(sizes, gen) for spec in stage.inputs)
    dims: dict[str, torch.export.Dim] = {}

    def export_dim(symbolic: str):
        factor, name = parse_dim(symbolic)
        if name not in dims:
            low, high = stage.dim_ranges.get(name, DEFAULT_DIM_RANGE)
            dims[name] = torch.export.Dim(name, min=low, max=high)
        return dims[name] if factor == 1 else factor * dims[name]

    dynamic_shapes = tuple(
        {axis: export_dim(d) for axis, d in enumerate(spec.shape) if isinstance(d, str)} for spec in stage.inputs
    )
    params = list(inspect.signature(stage.module.forward).parameters.values())
    named = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    if any(p.kind is p.VAR_POSITIONAL for p in params) and len(dynamic_shapes) > named:
        dynamic_shapes = (*dynamic_shapes[:named], dynamic_shapes[named:])  # forward(self, a, *rest): nests *rest
    size = sum(p.numel() * p.element_size() for p in stage.module.parameters())
    external = size > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings(), _quiet_torch_onnx():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            stage.module,
            args,
            str(path),
            input_names=[s.name for s in stage.inputs],
            output_names=[s.name for s in stage.outputs],
            dynamic_shapes=dynamic_shapes,
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=external,
            verbose=False,
        )
    _check_dynamic_axes(stage, path)
    return [path] + ([path.with_name(path.name + ".data")] if external else [])


def _check_dynamic_axes(stage: StageDef, path: Path) -> None:
    """Fail if the exporter specialised a symbolic axis. torch.onnx.export silently re-exports with the exporter's
    suggested fixes when a guard contradicts a Dim (e.g. ``height = 2*_height`` for a branch on ``height % 2``);
    the graph would then be wrong or fail for other sizes. Range refinements (e.g. batch <= 63 for a branch that
    only calls ``.contiguous()``) keep the axis name and are accepted: ONNX graphs do not enforce ranges."""
    graph_inputs = {i.name: i for i in onnx.load(str(path), load_external_data=False).graph.input}
    for spec in stage.inputs:
        if spec.name not in graph_inputs:
            raise RuntimeError(f"stage {stage.name}: input {spec.name} is not an input of the exported graph")
        dims = graph_inputs[spec.name].type.tensor_type.shape.dim
        for axis, (want, got) in enumerate(zip(spec.shape, dims)):
            if isinstance(want, int):
                ok = got.dim_value == want
            elif parse_dim(want)[0] == 1:
                ok = got.dim_param == want
            else:
                ok = bool(got.dim_param)
            if not ok:
                raise RuntimeError(
                    f"stage {stage.name}: the export specialised input {spec.name} axis {axis} "
                    f"(wanted {want!r}, got {got.dim_param or got.dim_value!r}); a shape-dependent branch in the "
                    f"model does not hold for every size of that axis")


class _quiet_torch_onnx:
    """The dynamo exporter prints progress lines to stdout; a build prints its own."""

    def __enter__(self):
        self._devnull = open(os.devnull, "w")
        self._saved = os.dup(1)
        os.dup2(self._devnull.fileno(), 1)
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    def __exit__(self, *exc):
        os.dup2(self._saved, 1)
        os.close(self._saved)
        self._devnull.close()


def stage_manifest_entry(stage: StageDef, files: list[Path], root: Path) -> dict:
    def shapes(batch: int) -> dict:
        sizes = {**stage.flops_sizes, "batch": batch}
        return {s.name: s.concrete(sizes) for s in stage.inputs}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gather graphs: the counter notes each MLP it cannot size
        flops = flops_per_sample(files[0], shapes, strict=not stage.gathered_tokens)
    per_sample = flops.per_sample + stage.gathered_tokens * sum(stage.token_mlp_flops)
    entry = {
        "files": [{"path": f.name, "sha256": sha256_file(f), "bytes": f.stat().st_size} for f in files],
        "inputs": [s.to_dict() for s in stage.inputs],
        "outputs": [s.to_dict() for s in stage.outputs],
        "flops": {"per_sample": int(per_sample), "constant": int(flops.constant)},
    }
    if stage.token_mlp_flops:
        entry["flops"]["token_mlp"] = list(stage.token_mlp_flops)
    return entry


@dataclass
class NestedBundle:
    """A complete bundle written into a sub-directory of another (a cascade's diffusion stages)."""

    stages: list[StageDef]
    manifest_fields: dict
    assets: dict[str, Path] = field(default_factory=dict)
    precision: PrecisionPlan = field(default_factory=PrecisionPlan)


def write_bundle(
    out: Path, stages: list[StageDef], manifest_fields: dict, progress=print, assets: dict[str, Path] | None = None,
    precision: PrecisionPlan = PrecisionPlan(), nested: dict[str, NestedBundle] | None = None,
) -> Path:
    """Export every stage into a temp dir next to ``out``, write the manifest, then rename into place.

    ``assets`` are directories copied into the bundle under their name (e.g. the tokenizer), hashed like stages.
    ``precision`` says which stages are converted to fp16/bf16 after their export (the manifest records it).
    ``nested`` bundles are written into sub-directories of that name first (each with its own manifest).
    A failure at any point removes the temp dir, so ``out`` is either the complete new bundle or untouched.
    """
    converted = precision.resolve([s.name for s in stages])  # a bad stage name fails before any export
    for part in (nested or {}).values():
        part.precision.resolve([s.name for s in part.stages])
    out = Path(out).resolve()
    if out.exists() and not (out / MANIFEST_NAME).is_file():
        raise FileExistsError(f"{out} exists and is not a bundle; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, part in (nested or {}).items():
            progress(f"writing {name}/ ...")
            (tmp / name).mkdir()
            _write_contents(tmp / name, part.stages, part.manifest_fields, part.assets,
                            part.precision.resolve([s.name for s in part.stages]), progress)
        _write_contents(tmp, stages, manifest_fields, assets or {}, converted, progress)
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_contents(root: Path, stages: list[StageDef], manifest_fields: dict, assets: dict[str, Path],
                    converted: dict[str, str], progress) -> None:
    """Export the stages into ``root``, copy the assets, write the manifest last."""
    entries = {}
    for stage in stages:
        progress(f"exporting stage {stage.name} ...")
        files = export_stage(stage, root)
        report = None
        if stage.name in converted:
            progress(f"converting stage {stage.name} to {converted[stage.name]} ...")
            sizes = {"batch": SAMPLE_BATCH, **stage.trace_sizes}
            report = convert_stage(stage, files[0], converted[stage.name], sizes)
        entries[stage.name] = stage_manifest_entry(stage, files, root)
        if report:
            entries[stage.name]["precision"] = report
    copied = {}
    for name, src in assets.items():
        shutil.copytree(src, root / name)
        copied[name] = [
            {"path": str(f.relative_to(root)), "sha256": sha256_file(f)} for f in sorted((root / name).rglob("*"))
            if f.is_file()
        ]
    manifest = {"schema_version": SCHEMA_VERSION, **manifest_fields, "stages": entries}
    if copied:
        manifest["assets"] = copied
    check_manifest(manifest)  # the runtime's schema: a build never writes a bundle the runtime refuses
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
