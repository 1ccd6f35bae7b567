"""``keystep build`` for DiT models: load, validate the plan and scheduler, export the stages, write the bundle."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from keystep.models import resolve_model_path, shipped
from keystep.runtime.plan import parse_key_steps
from keystep.runtime.schedulers import class_name_for_scheduler, make_scheduler
from keystep.runtime.signature import with_keywords

from .bundle_writer import write_bundle
from .dit_cache import BlockRange
from .dit_export import dit_stages, dit_width_stages
from .dit_loaders import load_dit
from .errors import ModelLoadError
from .stage_precision import PrecisionPlan
from .tokenizer_asset import tokenizer_asset
from .width_build import WidthPlan

# Bundles of original DiT / DyDiT checkpoints (no scheduler config) sample as DiT's own code does: its linear betas
# over 1000 steps, DDIM over respaced timesteps (respace.py, ddim_sample) and no x0 clipping (sample.py passes
# clip_denoised=False). clip_sample and set_alpha_to_one also hold for --scheduler ddim/ddpm built from this config.
DIT_TRAINING_SCHEDULE = {
    "_class_name": "RespacedDDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "timestep_respacing": "uniform",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "prediction_type": "epsilon",
}
# random weights (random:PRESET) predict x0 far outside [-1, 1]; unclipped, their samples grow to |x| ~ 1e3 and the
# fidelity numbers benchmarks report on them mean nothing: DiT's sampler with clip_denoised=True (its
# ddim_sample_loop's own default) keeps them in range
RANDOM_WEIGHTS_SCHEDULE = {**DIT_TRAINING_SCHEDULE, "clip_sample": True}
DIT_NOISE_INJECTION = {"noise_alpha": 0.003, "noise_tau": 0.3}
DEFAULT_STEPS = 50


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """What a build of every model kind takes (``keystep build``'s shared flags): the bundle's scheduler, its
    default plan, its feature-cache variants and its precision. Each builder takes these as keywords, beside the
    options of its own model kind."""

    scheduler: str | None = None  # the scheduler class (by name), its fields from scheduler_config or the model's
    scheduler_config: str | None = None  # a scheduler_config.json file
    steps: int | None = None  # the default plan's steps; None: the model kind's (DEFAULT_STEPS; IF: its pipelines')
    key_steps: str | None = None  # the default plan's key steps; None: the shipped model's tuned plan or "default"
    guidance: float | None = None  # the default plan's guidance; None: the model kind's (a shipped model's tuned)
    cache: str | None = None  # feature-cache variants to export, e.g. "deep:0,3" or "blocks:1-2"
    precision: str | None = None  # stage precisions (stage_precision.PrecisionPlan.parse)
CACHE_KINDS = {"dit": "blocks", "unet": "deep", "unet3d": "deep"}


def parse_cache_variants(spec: str | None, family: str) -> list:
    """``--cache``: ``deep:0,1,2`` (UNet, DeepCache branch ids) or ``blocks:2-9,3-8`` (DiT, skipped block ranges)."""
    if not spec:
        return []
    kind, _, items = spec.partition(":")
    if kind not in CACHE_KINDS.values() or not items:
        raise ModelLoadError(f"bad --cache {spec!r}: use deep:ID[,ID...] (UNet) or blocks:FIRST-LAST[,...] (DiT)")
    if kind != CACHE_KINDS[family]:
        raise ModelLoadError(f"--cache {kind}:... applies to {'UNet' if kind == 'deep' else 'DiT'} models, "
                             f"this is a {family} model (use {CACHE_KINDS[family]}:...)")
    if kind == "blocks":
        return [BlockRange.parse(item) for item in items.split(",")]
    from .unet_cache import DeepCacheBranch

    try:
        return [DeepCacheBranch(int(item)) for item in items.split(",")]
    except ValueError:
        raise ModelLoadError(f"bad --cache {spec!r}: DeepCache branch ids are integers") from None


def cache_manifest(variants: list) -> dict:
    """The manifest's ``cache`` section: what each variant caches (runtime and inspect read it)."""
    described = {}
    for v in variants:
        if isinstance(v, BlockRange):
            described[v.name] = {"kind": "dit-blocks", "first": v.start, "last": v.stop - 1}
        else:
            described[v.name] = {"kind": "deepcache", "branch_id": v.branch_id, "block": v.block, "layer": v.layer}
    return {"variants": described}


def resolve_scheduler_config(model_config: dict | None, config_file: str | None, name: str | None) -> dict:
    """The bundle's scheduler: --scheduler-config file, else the model's own, else DiT's training schedule;
    --scheduler then picks the class (fields of the other classes are ignored, as diffusers' from_config does)."""
    if config_file:
        try:
            config = json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read scheduler config {config_file}: {exc}") from exc
    else:
        config = dict(model_config or DIT_TRAINING_SCHEDULE)
    if name is not None:
        config["_class_name"] = class_name_for_scheduler(name)
    make_scheduler(config)  # validate now: a bad field fails the build, not the first generate
    return config


@with_keywords(BuildOptions)
def build_dit_bundle(
    model: str,
    out: str,
    split: int | None = None,
    num_heads: int | None = None,
    width: str | None = None,
    max_profiles: int = 8,
    token_skip: str = "gather",
    progress=print,
    **options,
) -> Path:
    o = BuildOptions(**options)
    precisions = PrecisionPlan.parse(o.precision)
    loaded = load_dit(model, num_heads=num_heads)
    cached = parse_cache_variants(o.cache, "dit")
    cfg = loaded.model.config
    # a shipped model's tuned default plan (docs/models.md), unless the caller says otherwise
    entry = shipped(model)
    tuned = entry.default_plan if entry else {}
    guidance = o.guidance if o.guidance is not None else tuned.get("guidance", 4.0)
    key_steps = o.key_steps or tuned.get("key_steps", "default")
    steps = DEFAULT_STEPS if o.steps is None else o.steps
    split = cfg.default_split if split is None else split
    parse_key_steps(key_steps, steps, "dit")  # fail early on a plan that does not fit
    own = loaded.scheduler_config or (RANDOM_WEIGHTS_SCHEDULE if loaded.source_kind == "random" else None)
    sched = resolve_scheduler_config(own, o.scheduler_config, o.scheduler)
    width = width or ("dydit" if loaded.routers is not None else "none")
    if width != "none" and cached:
        raise ModelLoadError("--cache cannot be combined with width profiles yet (width bundles have no full stage)")
    if width == "none":
        stages = dit_stages(loaded.model, split, loaded.vae, cached)
    else:
        plan = WidthPlan.compile(loaded, width, sched, steps, key_steps, split, max_profiles, token_skip, progress)
        stages = dit_width_stages(loaded.model, split, plan.engines, plan.token_mode, loaded.vae)
    fields = {
        "family": "dit",
        # without a VAE, a 1- or 3-channel DiT samples images in [-1, 1] (as the digits models); otherwise latents
        "model_config": {**cfg.to_dict(), "pixel_space": loaded.vae is None and cfg.in_channels in (1, 3)},
        "split": split,
        "source": {"kind": loaded.source_kind,
                   "path": model if loaded.source_kind == "random" or entry else str(Path(model).resolve())},
        "labels": {str(k): v for k, v in sorted(loaded.labels.items())},
        "scheduler": sched,
        "default_plan": {"num_steps": steps, "key_steps": key_steps, "guidance": guidance, **DIT_NOISE_INJECTION},
    }
    if cached:
        fields["cache"] = cache_manifest(cached)
    if width == "none":
        return write_bundle(Path(out), stages, fields, progress=progress, precision=precisions)
    fields["width"] = plan.manifest()
    with tempfile.TemporaryDirectory() as scratch:
        return write_bundle(Path(out), stages, fields, progress=progress, assets={"width": plan.save_masks(Path(scratch))},
                            precision=precisions)


UNET_NOISE_INJECTION = {"noise_alpha": 0.003, "noise_tau": 0.5}  # FasterDiffusion's SD setting: t < 500


@with_keywords(BuildOptions)
def build_unet_bundle(
    model: str,
    out: str,
    controlnet: str | None = None,
    full: bool = True,
    progress=print,
    **options,
) -> Path:
    """``full=False`` leaves out the ``full`` graph (for large models it doubles the bundle's weights): the baseline
    plan then runs encoder + decoder at every step; cache plans need it."""
    o = BuildOptions(**options)
    precisions = PrecisionPlan.parse(o.precision)
    from .unet_export import load_controlnet, load_sd_pipeline_dir, unet_model_config, unet_stages

    entry = shipped(model)  # a shipped model's tuned default plan (docs/models.md), unless the caller says otherwise
    tuned = entry.default_plan if entry else {}
    guidance = o.guidance if o.guidance is not None else tuned.get("guidance", 7.5)
    loaded = load_sd_pipeline_dir(resolve_model_path(model))
    branches = parse_cache_variants(o.cache, "unet")
    if branches and not full:
        raise ModelLoadError("--cache needs the full stage (its full steps refresh the cache): drop --no-full")
    control = load_controlnet(controlnet) if controlnet else None
    key_steps = o.key_steps or tuned.get("key_steps", "default")
    steps = DEFAULT_STEPS if o.steps is None else o.steps
    parse_key_steps(key_steps, steps, "unet")
    sched = resolve_scheduler_config(loaded.scheduler_config, o.scheduler_config, o.scheduler)
    fields = {
        "family": "unet",
        "model_config": unet_model_config(loaded, control),
        "source": {"kind": loaded.source_kind, "path": model if entry else str(Path(model).resolve()),
                   "controlnet": str(Path(controlnet).resolve()) if controlnet else None},
        "scheduler": sched,
        "default_plan": {"num_steps": steps, "key_steps": key_steps, "guidance": guidance, **UNET_NOISE_INJECTION},
    }
    if branches:
        fields["cache"] = cache_manifest(branches)
    stages = unet_stages(loaded, control, branches, full=full)
    with tempfile.TemporaryDirectory() as scratch:
        assets = {"tokenizer": tokenizer_asset(loaded.tokenizer_dir, Path(scratch) / "1")}
        if loaded.tokenizer_2_dir is not None:  # SDXL's second CLIP tokenizer (OpenCLIP bigG: pad token "!")
            assets["tokenizer_2"] = tokenizer_asset(loaded.tokenizer_2_dir, Path(scratch) / "2")
        return write_bundle(Path(out), stages, fields, progress=progress, assets=assets, precision=precisions)


@with_keywords(BuildOptions)
def build_if_bundle(
    model: str,
    out: str,
    super_resolution: list[str] = (),
    full: bool = True,
    progress=print,
    **options,
) -> Path:
    """A DeepFloyd-IF cascade bundle (:mod:`keystep.export.if_export`): stage I from ``model`` (an IFPipeline
    directory), one super-resolution stage per ``super_resolution`` directory. Plan flags given apply to every
    diffusion stage; otherwise each keeps its pipeline's defaults (stage I 100 steps, guidance 7; stage II 50 steps,
    guidance 4, noise level 250). ``precision``: everywhere, or per stage as ``text_encoder=P`` and
    ``stage_N.STAGE=P``."""
    from .bundle_writer import NestedBundle
    from .if_export import (IF_DEFAULTS, IF_TEXT_LEN, if_stage_model_config, if_unet_stages, load_if_cascade,
                            t5_stage, t5_tokenizer_asset)

    o = BuildOptions(**options)
    precisions = PrecisionPlan.parse(o.precision)
    loaded = load_if_cascade(resolve_model_path(model), list(super_resolution))
    branches = parse_cache_variants(o.cache, "unet")
    if branches and not full:
        raise ModelLoadError("--cache needs the full stage (its full steps refresh the cache): drop --no-full")
    nested, parts = {}, []
    for i, stage in enumerate(loaded.stages, start=1):
        name = f"stage_{i}"
        defaults = IF_DEFAULTS[stage.role]
        num_steps = o.steps or defaults["num_steps"]
        # FasterDiffusion's IF release propagates the encoder in stage I only (runtime.plan.if_default_key_steps)
        plan_keys = o.key_steps or ("default" if stage.role == "base" else "all")
        parse_key_steps(plan_keys, num_steps, "if")
        plan = {"num_steps": num_steps, "key_steps": plan_keys,
                "guidance": o.guidance if o.guidance is not None else defaults["guidance"], **UNET_NOISE_INJECTION}
        if "noise_level" in defaults:
            plan["noise_level"] = defaults["noise_level"]
        fields = {
            "family": "if",
            "model_config": if_stage_model_config(stage),
            "source": {"kind": "diffusers-pipeline", "path": str(stage.path.resolve())},
            "scheduler": resolve_scheduler_config(stage.scheduler_config, o.scheduler_config, o.scheduler),
            "default_plan": plan,
        }
        for branch in branches:
            branch.check(stage.unet)
        if branches:
            fields["cache"] = cache_manifest(branches)
        nested[name] = NestedBundle(if_unet_stages(stage, branches, full), fields, precision=precisions.part(name))
        parts.append({"name": name, "role": stage.role})
    t5 = loaded.text_encoder.config
    fields = {
        "family": "cascade",
        "model_config": {"pipeline": "deepfloyd-if", "text_len": IF_TEXT_LEN, "text_dim": t5.d_model,
                         "vocab_size": t5.vocab_size},
        "source": {"kind": "diffusers-pipeline", "path": str(Path(resolve_model_path(model)).resolve()),
                   "super_resolution": [str(Path(p).resolve()) for p in super_resolution]},
        "cascade": parts,  # each diffusion stage has its own scheduler and plan (in its sub-bundle)
    }
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = t5_tokenizer_asset(loaded.tokenizer_dir, Path(scratch))
        return write_bundle(Path(out), [t5_stage(loaded.text_encoder)], fields, progress=progress,
                            assets={"tokenizer": tokenizer}, precision=precisions.outside(list(nested)),
                            nested=nested)


def is_unet_pipeline(model: str) -> bool:
    index = Path(resolve_model_path(model)) / "model_index.json"
    return index.is_file() and "unet" in json.loads(index.read_text())


def is_video_model(model: str) -> bool:
    from .unet3d_export import is_video_pipeline

    path = Path(resolve_model_path(model))
    return is_video_pipeline(json.loads((path / "model_index.json").read_text()), path)


def without_dit_options(options: dict) -> dict:
    """A UNet build's options: refuses the DiT width options given; the split and head count (flags with a
    default) are dropped."""
    given = [k for k in ("width", "max_profiles", "token_skip") if options.get(k) is not None]
    if given:
        raise ModelLoadError(f"--{given[0].replace('_', '-')} applies to DiT models only")
    return {k: v for k, v in options.items() if k not in ("split", "num_heads")}


def build_bundle(model: str, out: str, controlnet: str | None = None, super_resolution: list[str] = (),
                 **options) -> Path:
    """Dispatch on the model kind: a DeepFloyd-IF directory (a cascade), a text-to-video UNet3D directory, a
    diffusers SD-style directory (has a unet) or a DiT. ``steps=None`` keeps the model kind's default (50; IF: its
    pipelines')."""
    from .if_export import is_if_pipeline

    frames = options.pop("frames", None)
    if is_if_pipeline(resolve_model_path(model)):
        given = [k for k in ("width", "max_profiles", "token_skip") if options.get(k) is not None]
        if given or controlnet:
            raise ModelLoadError(f"--{(given or ['controlnet'])[0].replace('_', '-')} does not apply to IF cascades")
        if frames is not None:
            raise ModelLoadError("--frames applies to text-to-video (UNet3D) models only")
        options.pop("split", None), options.pop("num_heads", None)
        return build_if_bundle(model, out, super_resolution=super_resolution, **options)
    if super_resolution:
        raise ModelLoadError("--super-resolution applies to DeepFloyd-IF (IFPipeline) models only")
    if is_unet_pipeline(model) and is_video_model(model):
        from .unet3d_export import build_video_bundle

        if not options.pop("full", True):
            raise ModelLoadError("--no-full applies to 2-D UNets (SD, SDXL, IF), not text-to-video bundles")
        return build_video_bundle(model, out, controlnet=controlnet, frames=frames, **without_dit_options(options))
    if frames is not None:
        raise ModelLoadError("--frames applies to text-to-video (UNet3D) models only")
    if is_unet_pipeline(model):
        return build_unet_bundle(model, out, controlnet=controlnet, **without_dit_options(options))
    if controlnet:
        raise ModelLoadError("--controlnet applies to UNet (Stable Diffusion) models only")
    if not options.pop("full", True):
        raise ModelLoadError("--no-full applies to UNet (Stable Diffusion) models only")
    return build_dit_bundle(model, out, **options)
