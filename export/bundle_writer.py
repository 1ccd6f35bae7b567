"""Export stage modules to ONNX and write a bundle atomically (temp dir, then rename)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from keystep.graphs.flops import flops_per_sample
from keystep.runtime.bundle import MANIFEST_NAME, SCHEMA_VERSION, sha256_file

from .dit_export import StageDef

ONNX_OPSET = 18
SAMPLE_BATCH = 2
# Above this the protobuf limit (2 GiB) bites: weights go to an external data file next to the graph.
EXTERNAL_DATA_BYTES = 1_500_000_000


def export_stage(stage: StageDef, out_dir: Path) -> list[Path]:
    """Export one stage with a dynamic batch axis; returns the files written (graph first)."""
    path = out_dir / f"{stage.name}.onnx"
    gen = torch.Generator().manual_seed(0)
    args = tuple(spec.sample(SAMPLE_BATCH, gen) for spec in stage.inputs)
    batch = torch.export.Dim("batch", min=1, max=65536)
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
            dynamic_shapes=tuple({0: batch} for _ in args),
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=external,
            verbose=False,
        )
    return [path] + ([path.with_name(path.name + ".data")] if external else [])


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
        return {s.name: tuple(batch if d == "batch" else d for d in s.shape) for s in stage.inputs}

    flops = flops_per_sample(files[0], shapes)
    return {
        "files": [{"path": f.name, "sha256": sha256_file(f), "bytes": f.stat().st_size} for f in files],
        "inputs": [s.to_dict() for s in stage.inputs],
        "outputs": [s.to_dict() for s in stage.outputs],
        "flops": {"per_sample": int(flops.per_sample), "constant": int(flops.constant)},
    }


def write_bundle(out: Path, stages: list[StageDef], manifest_fields: dict, progress=print) -> Path:
    """Export every stage into a temp dir next to ``out``, write the manifest, then rename into place.

    A failure at any point removes the temp dir, so ``out`` is either the complete new bundle or untouched.
    """
    out = Path(out).resolve()
    if out.exists() and not (out / MANIFEST_NAME).is_file():
        raise FileExistsError(f"{out} exists and is not a bundle; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        entries = {}
        for stage in stages:
            progress(f"exporting stage {stage.name} ...")
            files = export_stage(stage, tmp)
            entries[stage.name] = stage_manifest_entry(stage, files, tmp)
        manifest = {"schema_version": SCHEMA_VERSION, **manifest_fields, "stages": entries}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
