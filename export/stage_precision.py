"""``keystep build --precision``: which stages to convert, the conversion, and its error measured on ORT CPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from keystep.graphs.precision import LOW_TYPES, convert_file

from .dit_export import StageDef
from .errors import ModelLoadError

PRECISIONS = ("fp32", *LOW_TYPES)
VAE_STAGE = "vae_decoder"  # stays fp32 under a bare --precision: decoded pixels are the product, and it runs once
# The op types ONNX Runtime 1.32's CPU provider runs in bf16 (found by running one-op graphs; tests/test_precision.py
# checks each). Unlike fp16, where its InsertCastTransformer computes ops without a CPU kernel in fp32, a bf16 node
# without a kernel fails the session, so bf16 graphs compute every other op in fp32 between explicit Casts.
ORT_CPU_BF16_KERNELS = frozenset({
    "Cast", "Concat", "ConstantOfShape", "Expand", "Flatten", "Gather", "Identity", "LayerNormalization", "Reshape",
    "ScatterND", "Shape", "Slice", "Split", "Squeeze", "Transpose", "Unsqueeze",
})
# Ops computed in the low type on ORT CPU: fp16 -> every op (ORT adds its own Casts), bf16 -> the kernels above.
ORT_CPU_LOW_KERNELS = {"fp16": None, "bf16": ORT_CPU_BF16_KERNELS}
TRAIN_TIMESTEPS = 1000  # both families train on t in [0, 1000): error inputs use that range (sin/cos phases)


@dataclass(frozen=True)
class PrecisionPlan:
    """``--precision``: ``fp32`` | ``fp16`` | ``bf16`` (every stage but the VAE) or ``STAGE=P,STAGE=P,...``."""

    everywhere: str = "fp32"
    per_stage: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str | None) -> "PrecisionPlan":
        if not spec:
            return cls()
        if "=" not in spec:
            return cls(everywhere=_check_precision(spec, spec))
        per_stage = {}
        for item in spec.split(","):
            stage, _, precision = item.partition("=")
            if not stage or not precision:
                raise ModelLoadError(f"bad --precision {spec!r}: use fp16, bf16 or STAGE=PRECISION[,STAGE=PRECISION]")
            per_stage[stage.strip()] = _check_precision(precision.strip(), spec)
        return cls(per_stage=per_stage)

    def part(self, prefix: str) -> "PrecisionPlan":
        """The plan of a nested bundle (a cascade's diffusion stage): per-stage entries named ``PREFIX.STAGE``."""
        return PrecisionPlan(self.everywhere, {k[len(prefix) + 1:]: v for k, v in self.per_stage.items()
                                               if k.startswith(prefix + ".")})

    def outside(self, prefixes: list[str]) -> "PrecisionPlan":
        """The plan of the enclosing bundle: the per-stage entries of no nested bundle."""
        return PrecisionPlan(self.everywhere, {k: v for k, v in self.per_stage.items()
                                               if not any(k.startswith(p + ".") for p in prefixes)})

    def resolve(self, stage_names: list[str]) -> dict[str, str]:
        """The stages to convert and their precision; fails on a stage the bundle does not have."""
        unknown = sorted(set(self.per_stage) - set(stage_names))
        if unknown:
            raise ModelLoadError(f"--precision names stage(s) {', '.join(unknown)} this bundle does not have "
                                 f"(stages: {', '.join(stage_names)})")
        chosen = {s: self.everywhere for s in stage_names if s != VAE_STAGE} | self.per_stage
        return {s: p for s, p in chosen.items() if p != "fp32"}


def _check_precision(precision: str, spec: str) -> str:
    if precision not in PRECISIONS:
        raise ModelLoadError(f"bad --precision {spec!r}: unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    return precision


def convert_stage(stage: StageDef, path: Path, precision: str, sizes: dict[str, int]) -> dict:
    """Convert the exported stage graph at ``path`` in place; returns the manifest's ``precision`` field, with the
    error against the fp32 graph on the same seeded inputs (at ``sizes``), both run on ONNX Runtime CPU."""
    feeds = error_inputs(stage, sizes)
    reference = _run(path, feeds)
    report = convert_file(path, precision, low_kernels=ORT_CPU_LOW_KERNELS[precision])
    converted = _run(path, feeds)
    errors = {name: output_error(converted[name], reference[name])
              for name, value in reference.items() if value.dtype == np.float32}
    return {**report.to_dict(), "error_vs_fp32": {
        "measured_on": f"onnxruntime {ort.__version__} CPU",
        "inputs": f"seeded random at {sizes}, timesteps uniform in [0, {TRAIN_TIMESTEPS})",
        "outputs": errors,
    }}


def error_inputs(stage: StageDef, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(0)
    feeds = {}
    for spec in stage.inputs:
        if spec.name == "timestep":
            feeds[spec.name] = (torch.rand(spec.concrete(sizes), generator=gen) * TRAIN_TIMESTEPS).numpy()
        else:  # integer inputs (class labels, token ids) in {0, 1}: valid for every model
            feeds[spec.name] = spec.sample(sizes, gen, high=2).numpy()
    return feeds


def output_error(value: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    diff = value.astype(np.float64) - reference
    return {"max_abs": float(np.abs(diff).max()), "mean_abs": float(np.abs(diff).mean()),
            "rel_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(reference), 1e-30))}


def _run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))
