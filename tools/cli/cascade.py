"""The CLI for DeepFloyd-IF cascade bundles: ``generate`` runs every diffusion stage in order; ``inspect`` shows the
cascade and each stage's plan; ``profile`` / ``tune`` / ``inspect`` take one diffusion stage as ``CASCADE/stage_N``.

Plan flags (--steps, --key-steps, --cache, --guidance, --scheduler, ...) apply to every diffusion stage, or with
``--stage NAME`` (repeatable) to the named ones only; the others run their default plans.
"""

from __future__ import annotations

from pathlib import Path

from keystep.runtime.bundle import Bundle
from keystep.runtime.sampler import SamplingError, SamplingOptions

SDXL_FLAGS = ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size")


def check_if_args(args, cascade: bool) -> None:
    """One line for the flags an IF bundle cannot use."""
    if not args.prompt:
        raise SamplingError("a text-to-image bundle needs --prompt")
    if any(getattr(args, k, None) is not None for k in SDXL_FLAGS):
        raise SamplingError("--prompt-2/--negative-prompt-2/size conditioning apply to SDXL bundles only")
    if getattr(args, "control_image", None):
        raise SamplingError("--control-image: IF bundles have no ControlNet stage")
    if cascade and getattr(args, "init_noise", None):
        raise SamplingError("--init-noise applies to one diffusion stage (generate CASCADE/stage_N), not a cascade")


def stage_options(stage_bundle: Bundle, args, options_from_args) -> SamplingOptions:
    """The plan flags if they apply to this stage (all stages, or the ``--stage`` ones), else its default plan."""
    chosen = getattr(args, "stages", None)
    if chosen and stage_bundle.root.name not in chosen:
        return SamplingOptions.from_bundle(stage_bundle)
    return options_from_args(stage_bundle, args)


def generate_cascade(bundle: Bundle, args, backend, options_from_args) -> tuple[list, object]:
    from keystep.runtime.if_sampler import CascadeSampler

    check_if_args(args, cascade=True)
    sampler = CascadeSampler(bundle, backend)
    unknown = sorted(set(getattr(args, "stages", None) or ()) - set(sampler.stage_names))
    if unknown:
        raise SamplingError(f"--stage {unknown[0]}: the cascade's diffusion stages are {', '.join(sampler.stage_names)}")
    prompts = args.prompt * args.images if len(args.prompt) == 1 else args.prompt
    options = [stage_options(s.bundle, args, options_from_args) for s in sampler.stages]
    results = sampler.sample(prompts, options, negative_prompt=args.negative_prompt, height=args.height,
                             width=args.width, seed=args.seed, noise_level=args.noise_level)
    for name, result in zip(sampler.stage_names, results):
        plan = result.prepared.plan
        kind = "baseline" if plan.baseline else f"{len(plan.key_steps)} key steps of {plan.num_steps}"
        size = "x".join(map(str, result.latents.shape[2:]))
        print(f"{name} ({size}): {kind}, {len(result.prepared.calls)} stage calls, {result.total_seconds:.2f} s")
    return results, sampler


def generate_stage(bundle: Bundle, args, backend, options, init):
    from keystep.runtime.if_sampler import IFStageSampler

    check_if_args(args, cascade=False)
    sampler = IFStageSampler(bundle, backend)
    prompts = args.prompt * args.images if len(args.prompt) == 1 else args.prompt
    result = sampler.sample(prompts, options, negative_prompt=args.negative_prompt, height=args.height,
                            width=args.width, init_noise=init, seed=args.seed, noise_level=args.noise_level)
    return result, sampler


def describe_cascade(bundle: Bundle, args, options_from_args, describe_bundle) -> dict:
    top = {name: {"inputs": [vars_of(s) for s in spec.inputs], "outputs": [vars_of(s) for s in spec.outputs],
                  "bytes": sum(f.get("bytes", 0) for f in bundle.manifest["stages"][name]["files"]),
                  "gflops_per_sample": None if spec.flops_per_sample is None else spec.flops_per_sample / 1e9}
           for name, spec in bundle.stages.items()}
    stages = []
    for part in bundle.manifest["cascade"]:
        stage_bundle = Bundle.load(bundle.root / part["name"], verify=not args.no_verify)
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
