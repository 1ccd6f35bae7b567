"""``keystep inspect`` of DeepFloyd-IF cascade bundles: the cascade and each diffusion stage's plan (``generate``
runs through the Python API, :mod:`keystep.runtime.pipeline`; ``profile`` / ``tune`` / ``inspect`` take one
diffusion stage as ``CASCADE/stage_N``).

Plan flags (--steps, --key-steps, --cache, --guidance, --scheduler, ...) apply to every diffusion stage, or with
``--stage NAME`` (repeatable) to the named ones only; the others run their default plans.
"""

from __future__ import annotations

from pathlib import Path

from keystep.runtime.bundle import Bundle
from keystep.runtime.sampler import SamplingError, SamplingOptions


def stage_options(stage_bundle: Bundle, args, options_from_args) -> SamplingOptions:
    """The plan flags if they apply to this stage (all stages, or the ``--stage`` ones), else its default plan."""
    chosen = getattr(args, "stages", None)
    if chosen and stage_bundle.root.name not in chosen:
        return SamplingOptions.from_bundle(stage_bundle)
    return options_from_args(stage_bundle, args)


def describe_cascade(bundle: Bundle, args, options_from_args, describe_bundle) -> dict:
    top = {name: {"inputs": [vars_of(s) for s in spec.inputs], "outputs": [vars_of(s) for s in spec.outputs],
                  "bytes": sum(f.get("bytes", 0) for f in bundle.manifest["stages"][name]["files"]),
                  "gflops_per_sample": None if spec.flops_per_sample is None else spec.flops_per_sample / 1e9}
           for name, spec in bundle.stages.items()}
    unknown = sorted(set(getattr(args, "stages", None) or ()) - set(bundle.parts))
    if unknown:
        raise SamplingError(f"--stage {unknown[0]}: the cascade's diffusion stages are {', '.join(bundle.parts)}")
    stages = []
    for part in bundle.manifest["cascade"]:
        stage_bundle = bundle.parts[part["name"]]
        stages.append({**part, "description": describe_bundle(stage_bundle, stage_options(stage_bundle, args,
                                                                                         options_from_args),
                                                              images=args.images)})
    return {"bundle": str(bundle.root), "family": "cascade", "source": bundle.manifest.get("source"),
            "model_config": bundle.model_config, "stages": top, "cascade": stages}


def vars_of(io) -> dict:
    return {"name": io.name, "dtype": io.dtype, "shape": list(io.shape)}


def format_cascade(d: dict, format_description) -> str:
    lines = [f"bundle  {d['bundle']}", "family  cascade (DeepFloyd-IF: T5 text encoder, then the diffusion stages "
             "below in order)", "model   " + ", ".join(f"{k}={v}" for k, v in d["model_config"].items()), "stages"]
    for name, s in d["stages"].items():
        ins = ", ".join(f"{i['name']}{i['shape']}" for i in s["inputs"])
        outs = ", ".join(f"{o['name']}{o['shape']}" for o in s["outputs"])
        gf = "?" if s["gflops_per_sample"] is None else f"{s['gflops_per_sample']:.3f}"
        lines.append(f"  {name:<12} {s['bytes'] / 1e6:8.1f} MB  {gf:>9} GFLOP/sample  ({ins}) -> ({outs})")
    for stage in d["cascade"]:
        lines += ["", f"=== {stage['name']} ({stage['role'].replace('_', '-')}; inspect/profile/tune it as "
                      f"{Path(d['bundle']) / stage['name']})"]
        lines += ["  " + line for line in format_description(stage["description"]).split("\n")]
    return "\n".join(lines)
