"""``keystep build`` for DiT models: load, validate the plan and scheduler, export the stages, write the bundle."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from keystep.models import shipped
from keystep.runtime.plan import parse_key_steps
from keystep.runtime.schedulers import class_name_for_scheduler, make_scheduler

from .bundle_writer import write_bundle
from .dit_export import dit_stages, dit_width_stages
from .dit_loaders import load_dit
from .errors import ModelLoadError
from .tokenizer_asset import tokenizer_asset
from .width_build import WidthPlan

# facebookresearch DiT trains with a linear beta schedule over 1000 steps; other fields keep diffusers' defaults.
DIT_TRAINING_SCHEDULE = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
}
DIT_NOISE_INJECTION = {"noise_alpha": 0.003, "noise_tau": 0.3}


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


def build_dit_bundle(
    model: str,
    out: str,
    split: int | None = None,
    scheduler: str | None = None,
    scheduler_config: str | None = None,
    steps: int = 50,
    key_steps: str | None = None,
    guidance: float | None = None,
    num_heads: int | None = None,
    width: str | None = None,
    max_profiles: int = 8,
    token_skip: str = "gather",
    progress=print,
) -> Path:
    loaded = load_dit(model, num_heads=num_heads)
    cfg = loaded.model.config
    # a shipped model's tuned default plan (docs/models.md), unless the caller says otherwise
    entry = shipped(model)
    tuned = entry.default_plan if entry else {}
    guidance = guidance if guidance is not None else tuned.get("guidance", 4.0)
    key_steps = key_steps or tuned.get("key_steps", "default")
    split = cfg.default_split if split is None else split
    parse_key_steps(key_steps, steps, "dit")  # fail early on a plan that does not fit
    sched = resolve_scheduler_config(loaded.scheduler_config, scheduler_config, scheduler)
    width = width or ("dydit" if loaded.routers is not None else "none")
    assets = {}
    if width == "none":
        stages = dit_stages(loaded.model, split, loaded.vae)
    else:
        plan = WidthPlan.compile(loaded, width, sched, steps, key_steps, split, max_profiles, token_skip, progress)
        stages = dit_width_stages(loaded.model, split, plan.engines, plan.token_mode, loaded.vae)
    fields = {
        "family": "dit",
        "model_config": cfg.to_dict(),
        "split": split,
        "source": {"kind": loaded.source_kind,
                   "path": model if loaded.source_kind == "random" or entry else str(Path(model).resolve())},
        "labels": {str(k): v for k, v in sorted(loaded.labels.items())},
        "scheduler": sched,
        "default_plan": {"num_steps": steps, "key_steps": key_steps, "guidance": guidance, **DIT_NOISE_INJECTION},
    }
    if width == "none":
        return write_bundle(Path(out), stages, fields, progress=progress)
    fields["width"] = plan.manifest()
    with tempfile.TemporaryDirectory() as scratch:
        return write_bundle(Path(out), stages, fields, progress=progress, assets={"width": plan.save_masks(Path(scratch))})


UNET_NOISE_INJECTION = {"noise_alpha": 0.003, "noise_tau": 0.5}  # FasterDiffusion's SD setting: t < 500


def build_unet_bundle(
    model: str,
    out: str,
    controlnet: str | None = None,
    scheduler: str | None = None,
    scheduler_config: str | None = None,
    steps: int = 50,
    key_steps: str | None = None,
    guidance: float = 7.5,
    progress=print,
) -> Path:
    from .unet_export import load_controlnet, load_sd_pipeline_dir, unet_model_config, unet_stages

    loaded = load_sd_pipeline_dir(model)
    control = load_controlnet(controlnet) if controlnet else None
    key_steps = key_steps or "default"
    parse_key_steps(key_steps, steps, "unet")
    sched = resolve_scheduler_config(loaded.scheduler_config, scheduler_config, scheduler)
    fields = {
        "family": "unet",
        "model_config": unet_model_config(loaded, control),
        "source": {"kind": loaded.source_kind, "path": str(Path(model).resolve()),
                   "controlnet": str(Path(controlnet).resolve()) if controlnet else None},
        "scheduler": sched,
        "default_plan": {"num_steps": steps, "key_steps": key_steps, "guidance": guidance, **UNET_NOISE_INJECTION},
    }
    stages = unet_stages(loaded, control)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = tokenizer_asset(loaded.tokenizer_dir, Path(scratch))
        return write_bundle(Path(out), stages, fields, progress=progress, assets={"tokenizer": tokenizer})


def is_unet_pipeline(model: str) -> bool:
    index = Path(model) / "model_index.json"
    return index.is_file() and "unet" in json.loads(index.read_text())


def build_bundle(model: str, out: str, controlnet: str | None = None, **options) -> Path:
    """Dispatch on the model kind: a diffusers SD-style directory (has a unet) or a DiT."""
    if is_unet_pipeline(model):
        given = [k for k in ("width", "max_profiles", "token_skip") if options.get(k) is not None]
        if given:
            raise ModelLoadError(f"--{given[0].replace('_', '-')} applies to DiT models only")
        options.pop("split", None), options.pop("num_heads", None)
        return build_unet_bundle(model, out, controlnet=controlnet, **options)
    if controlnet:
        raise ModelLoadError("--controlnet applies to UNet (Stable Diffusion) models only")
    return build_dit_bundle(model, out, **options)
