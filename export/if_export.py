"""The DeepFloyd-IF adapter: an IFPipeline directory (stage I) and IFSuperResolutionPipeline directories (stage II,
...) become one *cascade bundle*.

Layout: the cascade's own manifest (family ``cascade``) holds the shared T5 text encoder stage
(``text_encoder(input_ids, attention_mask) -> text_embeddings[batch, text_len, D]``, external weights above the
protobuf limit) and the T5 tokenizer asset (``tokenizer.json``, run by the ``tokenizers`` library), and lists the
diffusion stages in order; each diffusion stage is a complete bundle of family ``if`` in its own sub-directory
(``stage_1/``, ``stage_2/``): the pixel-space UNet split into encoder / decoder (/ full / cached.*) stages exactly
like Stable Diffusion's (:mod:`keystep.export.unet_export`), its scheduler (learned-range variance honoured), its
default plan and, for a super-resolution stage, the image-noising scheduler and default noise level. So
``keystep inspect|profile|tune CASCADE/stage_2`` work on one diffusion stage like on any bundle.

Stage II's UNet takes the noisy 3-channel sample concatenated with the upscaled, noised stage-I image (6 channels)
and the noise level as its ``class_labels`` (``class_embed_type="timestep"``); the runtime does the bilinear
upscaling and the noising (IFSuperResolutionPipeline's ``F.interpolate(..., align_corners=True)`` and
``image_noising_scheduler.add_noise``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .dit_export import StageDef, TensorSpec
from .errors import ModelLoadError
from .unet_export import LoadedSD, _read_json, check_unet_config, unet_model_config, unet_stages

IF_PIPELINES = {"IFPipeline": "base", "IFSuperResolutionPipeline": "super_resolution"}
IF_TEXT_LEN = 77  # IFPipeline.encode_prompt's max_length
IF_DEFAULTS = {  # the diffusers pipelines' __call__ defaults
    "base": {"num_steps": 100, "guidance": 7.0},
    "super_resolution": {"num_steps": 50, "guidance": 4.0, "noise_level": 250},
}


@dataclass
class LoadedIFStage:
    role: str  # "base" | "super_resolution"
    unet: object
    scheduler_config: dict
    path: Path
    noising_scheduler_config: dict | None = None  # super-resolution: the image-noising DDPM schedule

    @property
    def image_channels(self) -> int:
        return self.unet.config.in_channels // (2 if self.role == "super_resolution" else 1)


@dataclass
class LoadedIF:
    text_encoder: object  # transformers T5EncoderModel
    tokenizer_dir: Path
    stages: list[LoadedIFStage] = field(default_factory=list)


def is_if_pipeline(path: Path) -> bool:
    index = Path(path) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") in IF_PIPELINES


def _load_stage(path: Path, role: str) -> tuple[LoadedIFStage, dict]:
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory does not exist: {path}")
    index = _read_json(path / "model_index.json")
    found = IF_PIPELINES.get(index.get("_class_name"))
    if found != role:
        want = [k for k, v in IF_PIPELINES.items() if v == role][0]
        raise ModelLoadError(f"{path}: expected an {want} directory, found {index.get('_class_name')!r}")
    parts = ("unet", "scheduler") + (("image_noising_scheduler",) if role == "super_resolution" else ())
    for part in parts:
        if not (path / part).is_dir():
            raise ModelLoadError(f"{path}: the pipeline has no {part}/ directory")
    config = _read_json(path / "unet" / "config.json")
    check_unet_config(config, f"{path}/unet")
    channels = 3 * (2 if role == "super_resolution" else 1)
    if config.get("in_channels") != channels or config.get("out_channels") not in (3, 6):
        raise ModelLoadError(f"{path}/unet: an IF {role.replace('_', '-')} UNet takes {channels} channels and returns "
                             f"3 (or 6 with learned variance), this one {config.get('in_channels')} -> "
                             f"{config.get('out_channels')}")
    if (role == "super_resolution") != (config.get("class_embed_type") == "timestep"):
        raise ModelLoadError(f"{path}/unet: class_embed_type {config.get('class_embed_type')!r} does not fit an IF "
                             f"{role.replace('_', '-')} stage (the noise level is stage II's class embedding)")
    from diffusers import UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load {path}/unet: {exc}") from exc
    noising = _read_json(path / "image_noising_scheduler" / "scheduler_config.json") if role != "base" else None
    stage = LoadedIFStage(role, unet, _read_json(path / "scheduler" / "scheduler_config.json"), path, noising)
    return stage, index


def load_if_cascade(base: str | Path, super_resolution: list[str | Path] = ()) -> LoadedIF:
    """Stage I from an IFPipeline directory (its T5 and tokenizer are the cascade's), then each
    IFSuperResolutionPipeline directory in order; their own text encoders, if any, must be the same T5."""
    first, index = _load_stage(Path(base), "base")
    path = Path(base)
    if index.get("text_encoder", [None])[0] is None or not (path / "text_encoder").is_dir():
        raise ModelLoadError(f"{path}: the IF stage-I directory has no text_encoder/ (the cascade's T5)")
    te_config = _read_json(path / "text_encoder" / "config.json")
    if "T5EncoderModel" not in (te_config.get("architectures") or []):
        raise ModelLoadError(f"{path}/text_encoder: expected a T5EncoderModel, found {te_config.get('architectures')}")
    if not (path / "tokenizer").is_dir():
        raise ModelLoadError(f"{path}: the pipeline has no tokenizer/ directory")
    stages = [first]
    for sr in super_resolution:
        stage, sr_index = _load_stage(Path(sr), "super_resolution")
        own = Path(sr) / "text_encoder" / "config.json"
        if sr_index.get("text_encoder", [None])[0] is not None and own.is_file() and _t5_shape(_read_json(own)) != \
                _t5_shape(te_config):
            raise ModelLoadError(f"{sr}: its text encoder differs from stage I's; IF stages share one T5")
        if _text_width(stage.unet) != _text_width(first.unet):
            raise ModelLoadError(f"{sr}/unet: expects text embeddings of width {_text_width(stage.unet)}, stage I "
                                 f"{_text_width(first.unet)}")
        stages.append(stage)
    from transformers import T5EncoderModel

    try:
        t5 = T5EncoderModel.from_pretrained(path / "text_encoder", dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load {path}/text_encoder: {exc}") from exc
    if t5.config.d_model != _text_width(first.unet):
        raise ModelLoadError(f"{path}: T5 width {t5.config.d_model}, the UNet's encoder_hid_dim {_text_width(first.unet)}")
    return LoadedIF(t5, path / "tokenizer", stages)


def _t5_shape(config: dict) -> tuple:
    return tuple(config.get(k) for k in ("d_model", "num_layers", "num_heads", "d_ff", "vocab_size"))


def _text_width(unet) -> int:
    return int(unet.config.encoder_hid_dim or unet.config.cross_attention_dim)


# --- stages ---------------------------------------------------------------------------------------------------------


class T5EncoderStage(nn.Module):
    """transformers ``T5EncoderModel`` as IFPipeline.encode_prompt calls it: (input_ids, attention_mask) ->
    last_hidden_state."""

    def __init__(self, text_encoder):
        super().__init__()
        # eager attention: the SDPA path's output (strides of a transposed SDPA result) makes the exporter's
        # decomposition turn T5's reshape into an invalid view; the two compute the same attention
        text_encoder.set_attn_implementation("eager")
        self.text_encoder = text_encoder

    def forward(self, input_ids, attention_mask):
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)[0]


def t5_stage(text_encoder) -> StageDef:
    ids = TensorSpec("input_ids", "int64", ("batch", "text_len"))
    mask = TensorSpec("attention_mask", "int64", ("batch", "text_len"))
    out = TensorSpec("text_embeddings", "float32", ("batch", "text_len", text_encoder.config.d_model))
    length = {"text_len": IF_TEXT_LEN}
    return StageDef("text_encoder", T5EncoderStage(text_encoder).eval(), [ids, mask], [out], dict(length),
                    dict(length), {"text_len": (1, 512)})


def if_stage_model_config(stage: LoadedIFStage) -> dict:
    cfg = unet_model_config(LoadedSD(stage.unet, pixel_space=True))
    cfg.update(text_len=IF_TEXT_LEN)
    cfg["if"] = {"role": stage.role, "image_channels": stage.image_channels,
                 "learned_variance": stage.unet.config.out_channels == 2 * stage.image_channels}
    if stage.noising_scheduler_config is not None:
        cfg["if"]["noising_scheduler"] = stage.noising_scheduler_config
    return cfg


def if_unet_stages(stage: LoadedIFStage, branches=(), full: bool = True) -> list[StageDef]:
    return unet_stages(LoadedSD(stage.unet, pixel_space=True), branches=branches, full=full)


def t5_tokenizer_asset(src: Path, scratch: Path) -> Path:
    """``src`` when it holds transformers' ``tokenizer.json``, else a copy converted once by transformers'
    T5Tokenizer (from ``spiece.model``), so the runtime needs only the ``tokenizers`` library."""
    if (src / "tokenizer.json").is_file():
        return src
    from transformers import T5Tokenizer

    try:
        tokenizer = T5Tokenizer.from_pretrained(src)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{src}: neither tokenizer.json nor a T5 SentencePiece model transformers can read: "
                             f"{exc}") from exc
    out = scratch / "tokenizer"
    tokenizer.save_pretrained(out)
    if not (out / "tokenizer.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        raise ModelLoadError(f"{src}: transformers did not write a tokenizer.json for this T5 tokenizer")
    return out
