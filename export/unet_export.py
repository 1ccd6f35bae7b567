"""The Stable-Diffusion adapter: load a diffusers SD pipeline directory (and optionally a ControlNet) and describe its
ONNX stages (:class:`StageDef`) for ``write_bundle``.

Stages and their I/O (symbolic axes: ``batch``; ``height``/``width`` = the latent's; ``height_l``/``width_l`` = the
size after l downsamplers, for diffusers' default Downsample2D ``ceil(size / 2**l)`` (see
:func:`keystep.export.unet_model.level_sizes`); ``text_len``; ``F*height`` = F times ``height``):

==============  ==========================================================  ========================================
stage           inputs                                                      outputs
==============  ==========================================================  ========================================
text_encoder    input_ids[batch,text_len] i64                               text_embeddings[batch,text_len,D]
encoder         sample[batch,C,height,width], timestep[batch],              skip_0..skip_{n-1}[batch,C_i,h_i,w_i],
                encoder_hidden_states[batch,text_len,D]                     mid[batch,C_mid,h_L,w_L]
decoder         skip_0..skip_{n-1}, mid, timestep, encoder_hidden_states    noise_pred[batch,C_out,height,width]
full            sample, timestep, encoder_hidden_states                     noise_pred
controlnet      sample, timestep, encoder_hidden_states,                    down_res_0..down_res_{n-1} (skip shapes),
                controlnet_cond[batch,3,8*height,8*width] (image in [0,1]),  mid_res (mid's shape); already scaled
                conditioning_scale[1]
vae_decoder     latent[batch,4,height,width]                                image[batch,3,8*height,8*width] in [0,1]
==============  ==========================================================  ========================================

All float inputs/outputs are float32. ControlNet residuals are added to the encoder's skip_i / mid before the
decoder (diffusers adds them to ``down_block_res_samples`` and the mid-block output).

UNets with per-row conditioning (:func:`keystep.export.unet_model.conditioning_inputs`) take it as trailing inputs
of encoder, decoder, full, cached.* and controlnet: SDXL ``text_embeds[batch,P]`` + ``time_ids[batch,N]``, IF
stage II ``class_labels[batch]`` (the noise level). SDXL pipelines have two text encoders, both read as
StableDiffusionXLPipeline does (penultimate hidden states; the second also returns its projected pooled output):
``text_encoder(input_ids) -> text_embeddings[batch,text_len,D1]``, ``text_encoder_2(input_ids) ->
text_embeddings[batch,text_len,D2], text_embeds[batch,P]``; the UNet's encoder_hidden_states are their
concatenation (D1 + D2).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .dit_export import StageDef, TensorSpec, VAEDecoderStage
from .errors import ModelLoadError
from .tokenizer_asset import has_tokenizer
from .unet_cache import DeepCacheBranch, UNetCachingFullStage, UNetShallowStage, deep_feature_shape
from .unet_model import (
    CLASS_LABEL_INPUT,
    ControlNetStage,
    PenultimateTextEncoderStage,
    TextEncoderStage,
    UNetDecoderStage,
    UNetEncoderStage,
    UNetFullStage,
    conditioning_inputs,
    fixed_factor_upsampling,
    level_sizes,
    skip_layout,
    with_branch_free_upsamplers,
)

# DeepFloyd-IF's blocks: ResnetBlock2D down/upsamplers and SimpleCrossAttn (added-K/V) attention
SUPPORTED_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
SUPPORTED_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D", "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")
SUPPORTED_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", "UNetMidBlock2DSimpleCrossAttn", None)
# CLIP's context length in every SD release; the FLOPs of text-conditioned stages are counted at it
DEFAULT_TEXT_LEN = 77
TRACE_TEXT_LEN = 7  # text_len of the export trace for the UNet stages (any length works afterwards)
DEFAULT_LATENT_SIZE = 64  # SD 1.x's 512 px, for UNet configs without sample_size
MAX_SPATIAL = 16384  # upper bound of the height / width axes of the exported graphs (latent pixels)


@dataclass
class LoadedSD:
    unet: object  # diffusers UNet2DConditionModel
    vae: object | None = None  # diffusers AutoencoderKL
    text_encoder: object | None = None  # transformers CLIPTextModel
    tokenizer_dir: Path | None = None  # copy its files into the bundle
    scheduler_config: dict | None = None
    model_index: dict = field(default_factory=dict)
    source_kind: str = "diffusers-pipeline"
    path: Path | None = None
    pixel_space: bool = False  # no VAE: the UNet denoises images (checked by check_pixel_space_unet)
    # SDXL: the second text encoder (CLIPTextModelWithProjection) and its tokenizer
    text_encoder_2: object | None = None
    tokenizer_2_dir: Path | None = None

    @property
    def sdxl(self) -> bool:
        return self.text_encoder_2 is not None


# The text encoders of each pipeline layout: (component, tokenizer, transformers class). SDXL reads both CLIP
# encoders' penultimate layer and the second one's pooled projection (StableDiffusionXLPipeline.encode_prompt).
SD_TEXT_ENCODERS = (("text_encoder", "tokenizer", "CLIPTextModel"),)
SDXL_TEXT_ENCODERS = (("text_encoder", "tokenizer", "CLIPTextModel"),
                      ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"))
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLControlNetPipeline")
SDXL_TIME_IDS = 6  # original size (h, w), crop top-left (y, x), target size (h, w)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


# --- validation -----------------------------------------------------------------------------------------------------


def check_unet_config(config: dict, where: str = "UNet") -> None:
    """Reject UNets whose forward needs inputs the stage contract does not have (SDXL, class-conditional, ...)."""
    name = config.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise ModelLoadError(f"{where}: expected a UNet2DConditionModel, found {name!r}")
    addition = config.get("addition_embed_type")
    if addition not in (None, "text", "text_time"):
        raise ModelLoadError(f"{where}: addition_embed_type {addition!r} needs image inputs the stages do not take")
    if config.get("class_embed_type") not in (None, "timestep") or config.get("num_class_embeds") is not None:
        raise ModelLoadError(
            f"{where}: class-conditional UNets (class_embed_type {config.get('class_embed_type')!r}, num_class_embeds "
            f"{config.get('num_class_embeds')!r}) need class labels, which the stages do not take (only "
            f"class_embed_type 'timestep', a noise level, is supported)")
    if config.get("time_cond_proj_dim") is not None:
        raise ModelLoadError(f"{where}: UNets with time_cond_proj_dim (LCM's guidance embedding) need a timestep_cond "
                             f"input, which the stages do not take")
    if config.get("encoder_hid_dim_type") not in (None, "text_proj"):
        raise ModelLoadError(f"{where}: encoder_hid_dim_type {config['encoder_hid_dim_type']!r} needs image embeddings")
    for kind, types, supported in (("down", config.get("down_block_types") or (), SUPPORTED_DOWN_BLOCKS),
                                   ("up", config.get("up_block_types") or (), SUPPORTED_UP_BLOCKS)):
        bad = [t for t in types if t not in supported]
        if bad:
            raise ModelLoadError(f"{where}: unsupported {kind} block types {bad} (supported: {', '.join(supported)})")
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in SUPPORTED_MID_BLOCKS:
        raise ModelLoadError(f"{where}: unsupported mid block type {mid!r}")


def _text_dim(config) -> int:
    dim = config.encoder_hid_dim or config.cross_attention_dim
    if isinstance(dim, (list, tuple)):
        if len(set(dim)) != 1:
            raise ModelLoadError(f"UNet: per-block cross_attention_dim {list(dim)} is not supported")
        dim = dim[0]
    return int(dim)


def check_controlnet(controlnet, unet) -> None:
    config = dict(controlnet.config)
    if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
        raise ModelLoadError("ControlNet: class-conditional ControlNets need class labels, which the stage lacks")
    if config.get("addition_embed_type") not in (None, "text", "text_time"):
        raise ModelLoadError(f"ControlNet: addition_embed_type {config['addition_embed_type']!r} is not supported")
    if conditioning_inputs(config) != conditioning_inputs(unet.config):
        raise ModelLoadError(
            f"ControlNet takes {list(conditioning_inputs(config)) or 'no'} added conditioning, the UNet "
            f"{list(conditioning_inputs(unet.config)) or 'none'} (an SDXL UNet needs an SDXL ControlNet and back)")
    if config.get("addition_embed_type") == "text_time" and (
            controlnet.add_embedding.linear_1.in_features != unet.add_embedding.linear_1.in_features):
        raise ModelLoadError("ControlNet and UNet expect different text_embeds + time_ids widths")
    channels = [c for c, _ in skip_layout(unet)]
    cn_channels = [block.out_channels for block in controlnet.controlnet_down_blocks]
    if cn_channels != channels or [lv for _, lv in skip_layout(controlnet)] != [lv for _, lv in skip_layout(unet)]:
        raise ModelLoadError(f"ControlNet residuals (channels {cn_channels}) do not match the UNet's skips {channels}")
    if controlnet.controlnet_mid_block.out_channels != channels[-1]:
        raise ModelLoadError("ControlNet mid residual does not match the UNet's mid block")
    if controlnet.config.in_channels != unet.config.in_channels:
        raise ModelLoadError(f"ControlNet has {controlnet.config.in_channels} input channels, the UNet "
                             f"{unet.config.in_channels}")
    if _text_dim(controlnet.config) != _text_dim(unet.config):
        raise ModelLoadError("ControlNet and UNet expect different encoder_hidden_states widths")


# --- loading --------------------------------------------------------------------------------------------------------


PIXEL_CHANNELS = (1, 3)  # grey or RGB images


def check_pixel_space_unet(unet_config: dict, path: Path) -> None:
    """Without vae/ the UNet must denoise images themselves: 1 or 3 channels in, as many out (epsilon/v)."""
    c_in, c_out = unet_config.get("in_channels", 4), unet_config.get("out_channels", 4)
    if c_in not in PIXEL_CHANNELS or c_out != c_in:
        raise ModelLoadError(
            f"{path}: the pipeline has no vae/ directory and its UNet is not pixel-space-shaped ({c_in} channels in, "
            f"{c_out} out; pixel space needs 1 or 3 in and as many out) — a latent model needs its vae/")


def pipeline_text_encoders(index: dict, path: Path) -> tuple[tuple[str, str, str], ...]:
    """The text encoders a pipeline directory's model_index.json lays out (SD or SDXL base); others are refused."""
    name = index.get("_class_name", "")
    if name.startswith("StableDiffusionXL") or "text_encoder_2" in index:
        if name not in SDXL_PIPELINES:
            raise ModelLoadError(
                f"{path}: {name or 'this SDXL pipeline'} is not supported (SDXL text-to-image: StableDiffusionXLPipeline;"
                f" the refiner's img2img layout, StableDiffusionXLImg2ImgPipeline, is not supported yet)")
        return SDXL_TEXT_ENCODERS
    return SD_TEXT_ENCODERS


def load_sd_pipeline_dir(path: str | Path) -> LoadedSD:
    """A diffusers Stable Diffusion directory: model_index.json, unet/, vae/, text_encoder/ (CLIPTextModel),
    tokenizer/, scheduler/scheduler_config.json — or an SDXL one (StableDiffusionXLPipeline: also text_encoder_2/
    (CLIPTextModelWithProjection) and tokenizer_2/). Without vae/ the UNet works in pixel space (images in [-1, 1])."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory does not exist: {path}")
    index = _read_json(path / "model_index.json")
    encoders = pipeline_text_encoders(index, path)
    for part in ("unet", "scheduler", *(d for e in encoders for d in e[:2])):
        if not (path / part).is_dir():
            raise ModelLoadError(f"{path}: the pipeline has no {part}/ directory")
    unet_config = _read_json(path / "unet" / "config.json")
    check_unet_config(unet_config, f"{path}/unet")
    if (unet_config.get("addition_embed_type") == "text_time") != (encoders is SDXL_TEXT_ENCODERS):
        raise ModelLoadError(f"{path}/unet: addition_embed_type {unet_config.get('addition_embed_type')!r} does not "
                             f"match the {index.get('_class_name')} layout")
    has_vae = (path / "vae").is_dir()
    if has_vae:
        vae_config = _read_json(path / "vae" / "config.json")
        if vae_config.get("_class_name") != "AutoencoderKL":
            raise ModelLoadError(f"{path}/vae: expected an AutoencoderKL, found {vae_config.get('_class_name')!r}")
    else:
        check_pixel_space_unet(unet_config, path)
    for encoder, tokenizer, architecture in encoders:
        te_config = _read_json(path / encoder / "config.json")
        if architecture not in (te_config.get("architectures") or []):
            raise ModelLoadError(f"{path}/{encoder}: expected a {architecture}, found {te_config.get('architectures')}")
        if not has_tokenizer(path / tokenizer):
            raise ModelLoadError(f"{path}/{tokenizer} has neither vocab.json + merges.txt nor tokenizer.json")
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")

    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch.float32).eval()
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch.float32).eval() if has_vae else None
        text_encoders = [getattr(transformers, architecture).from_pretrained(path / encoder, dtype=torch.float32).eval()
                         for encoder, _, architecture in encoders]
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load {path}: {exc}") from exc
    loaded = LoadedSD(unet, vae, text_encoders[0], path / encoders[0][1], scheduler_config, index,
                      "diffusers-pipeline", path, pixel_space=not has_vae)
    if len(text_encoders) > 1:
        loaded.text_encoder_2, loaded.tokenizer_2_dir = text_encoders[1], path / encoders[1][1]
        check_text_time(loaded)
    return loaded


def check_text_time(loaded: LoadedSD) -> None:
    """SDXL: the UNet's added embedding must take the second encoder's projection + 6 time ids (as the pipeline's
    ``_get_add_time_ids`` checks), and its cross-attention width must be the two encoders' widths together."""
    unet, te1, te2 = loaded.unet, loaded.text_encoder, loaded.text_encoder_2
    expected = unet.add_embedding.linear_1.in_features
    passed = unet.config.addition_time_embed_dim * SDXL_TIME_IDS + te2.config.projection_dim
    if expected != passed:
        raise ModelLoadError(f"{loaded.path}/unet: its added embedding takes {expected} values, the pipeline makes "
                             f"{passed} ({SDXL_TIME_IDS} time ids x {unet.config.addition_time_embed_dim} + projection "
                             f"{te2.config.projection_dim})")
    width = te1.config.hidden_size + te2.config.hidden_size
    if _text_dim(unet.config) != width:
        raise ModelLoadError(f"{loaded.path}/unet: cross_attention_dim {_text_dim(unet.config)} is not the text "
                             f"encoders' {te1.config.hidden_size} + {te2.config.hidden_size}")


def load_controlnet(path: str | Path):
    """A diffusers ControlNetModel directory (config.json + weights)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"ControlNet directory does not exist: {path}")
    config = _read_json(path / "config.json")
    if config.get("_class_name") != "ControlNetModel":
        raise ModelLoadError(f"{path}: expected a ControlNetModel, found {config.get('_class_name')!r}")
    from diffusers import ControlNetModel

    try:
        return ControlNetModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load ControlNet {path}: {exc}") from exc


# --- stages ---------------------------------------------------------------------------------------------------------


def _level_dims(level: int) -> tuple[str, str]:
    return ("height", "width") if level == 0 else (f"height_{level}", f"width_{level}")


def _size_dict(unet, height: int, width: int) -> dict[str, int]:
    sizes = {}
    for level, (h, w) in enumerate(level_sizes(unet, height, width)):
        hd, wd = _level_dims(level)
        sizes[hd], sizes[wd] = h, w
    return sizes


def default_latent_size(unet) -> tuple[int, int]:
    s = unet.config.sample_size or DEFAULT_LATENT_SIZE
    return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))


def trace_latent_size(unet) -> tuple[int, int]:
    """A latent size at which every downsample divides evenly (so no size-dependent branch is taken the "odd" way)
    near the model's default, with height != width so the two axes cannot be unified by the trace."""
    factor = 2 ** (len(level_sizes(unet, 1, 1)) - 1)
    h, w = (max(2, math.ceil(s / factor)) * factor for s in default_latent_size(unet))
    return (h, w + factor) if h == w else (h, w)


def unet_model_config(loaded: LoadedSD, controlnet=None) -> dict:
    """Facts about the model the runtime needs (for the manifest's model_config)."""
    unet = loaded.unet
    layout = skip_layout(unet)
    cfg = {
        "in_channels": unet.config.in_channels,
        "out_channels": unet.config.out_channels,
        "sample_size": list(default_latent_size(unet)),
        "text_dim": _text_dim(unet.config),
        "num_skips": len(layout),
        "skip_channels": [c for c, _ in layout],
        "skip_levels": [lv for _, lv in layout],
        "num_levels": layout[-1][1] + 1,
        "controlnet": controlnet is not None,
    }
    if loaded.vae is not None:
        cfg["vae_scale_factor"] = 2 ** (len(loaded.vae.config.block_out_channels) - 1)
        cfg["vae_scaling_factor"] = loaded.vae.config.scaling_factor
    elif loaded.pixel_space:  # images in [-1, 1] are the UNet's samples
        cfg["vae_scale_factor"] = 1
        cfg["pixel_space"] = True
    if loaded.text_encoder is not None:
        te = loaded.text_encoder.config
        cfg.update(text_len=te.max_position_embeddings, vocab_size=te.vocab_size)
    conditioning = conditioning_inputs(unet.config)
    if conditioning:
        cfg["conditioning"] = list(conditioning)
    if fixed_factor_upsampling(unet):  # the runtime refuses sizes the graph cannot take
        cfg["size_multiple"] = 2 ** (cfg["num_levels"] - 1)
    if loaded.sdxl:
        cfg["sdxl"] = {
            "time_ids": SDXL_TIME_IDS,
            "projection_dim": loaded.text_encoder_2.config.projection_dim,
            # StableDiffusionXLPipeline: without a negative prompt, CFG's negative embeddings are zeros
            "force_zeros_for_empty_prompt": bool(loaded.model_index.get("force_zeros_for_empty_prompt", True)),
        }
    return cfg


def conditioning_spec(name: str, unet) -> TensorSpec:
    """The TensorSpec of one per-row conditioning input (float32: time ids and noise levels are exact integers)."""
    if name == CLASS_LABEL_INPUT:
        return TensorSpec(name, "float32", ("batch",))
    if name == "time_ids":
        return TensorSpec(name, "float32", ("batch", SDXL_TIME_IDS))
    width = unet.add_embedding.linear_1.in_features - SDXL_TIME_IDS * unet.config.addition_time_embed_dim
    return TensorSpec(name, "float32", ("batch", width))  # text_embeds: the pooled projection


def unet_stages(loaded: LoadedSD, controlnet=None, branches: list[DeepCacheBranch] = (), full: bool = True
                ) -> list[StageDef]:
    """StageDefs for text_encoder(s) (if loaded), encoder, decoder, full (unless ``full`` is False), one shallow stage
    per DeepCache branch (whose deep feature the full stage then returns), controlnet (if given) and vae_decoder (if
    loaded), each with batch / height / width / text_len dynamic where they apply."""
    unet = loaded.unet.eval()
    check_unet_config(dict(unet.config))
    cfg = unet.config
    layout = skip_layout(unet)
    levels = layout[-1][1] + 1
    text_dim = _text_dim(cfg)
    te = loaded.text_encoder
    text_len = te.config.max_position_embeddings if te is not None else DEFAULT_TEXT_LEN

    f32 = "float32"
    sample = TensorSpec("sample", f32, ("batch", cfg.in_channels, "height", "width"))
    timestep = TensorSpec("timestep", f32, ("batch",))
    ehs = TensorSpec("encoder_hidden_states", f32, ("batch", "text_len", text_dim))
    conditioning = [conditioning_spec(name, unet) for name in conditioning_inputs(cfg)]
    skips = [TensorSpec(f"skip_{i}", f32, ("batch", c, *_level_dims(lv))) for i, (c, lv) in enumerate(layout)]
    mid = TensorSpec("mid", f32, ("batch", layout[-1][0], *_level_dims(layout[-1][1])))
    noise_pred = TensorSpec("noise_pred", f32, ("batch", cfg.out_channels, "height", "width"))

    th, tw = trace_latent_size(unet)
    dh, dw = default_latent_size(unet)
    trace = {**_size_dict(unet, th, tw), "text_len": TRACE_TEXT_LEN}
    flops = {**_size_dict(unet, dh, dw), "text_len": text_len}
    spatial = {d: (1, MAX_SPATIAL) for lv in range(levels) for d in _level_dims(lv)}

    def stage(name, module, inputs, outputs, trace_sizes=trace, flops_sizes=flops, ranges=spatial):
        return StageDef(name, module.eval(), inputs, outputs, dict(trace_sizes), dict(flops_sizes), dict(ranges))

    stages = []
    for name, te in (("text_encoder", te), ("text_encoder_2", loaded.text_encoder_2)):
        if te is None:
            continue
        te = te.eval()
        module = PenultimateTextEncoderStage(te) if loaded.sdxl else TextEncoderStage(te)
        outputs = [TensorSpec("text_embeddings", f32, ("batch", "text_len", te.config.hidden_size))]
        if getattr(module, "pooled", False):
            outputs.append(TensorSpec("text_embeds", f32, ("batch", te.config.projection_dim)))
        length = te.config.max_position_embeddings
        stages.append(stage(
            name, module, [TensorSpec("input_ids", "int64", ("batch", "text_len"))], outputs,
            trace_sizes={"text_len": length}, flops_sizes={"text_len": length}, ranges={"text_len": (1, length)},
        ))
    deep = {}
    for branch in branches:
        branch.check(unet)
        channels, level = deep_feature_shape(unet, branch)
        deep[branch.name] = TensorSpec(f"cache_{branch.name}", f32, ("batch", channels, *_level_dims(level)))
    stages += [
        stage("encoder", UNetEncoderStage(unet), [sample, timestep, ehs, *conditioning], [*skips, mid]),
        stage("decoder", UNetDecoderStage(unet, len(skips)), [*skips, mid, timestep, ehs, *conditioning],
              [noise_pred]),
    ]
    if full:
        module = UNetCachingFullStage(unet, list(branches)) if branches else UNetFullStage(unet)
        stages.append(stage("full", module, [sample, timestep, ehs, *conditioning], [noise_pred, *deep.values()]))
    stages += [
        stage(f"cached.{b.name}", UNetShallowStage(unet, b), [sample, timestep, ehs, deep[b.name], *conditioning],
              [noise_pred])
        for b in branches
    ]
    if controlnet is not None:
        controlnet = controlnet.eval()
        check_controlnet(controlnet, unet)
        factor = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
        pooled = bool(controlnet.config.global_pool_conditions)
        res_dims = (lambda lv: (1, 1)) if pooled else _level_dims
        stages.append(stage(
            "controlnet", ControlNetStage(controlnet),
            [sample, timestep, ehs,
             TensorSpec("controlnet_cond", f32, ("batch", controlnet.config.conditioning_channels,
                                                 f"{factor}*height", f"{factor}*width")),
             TensorSpec("conditioning_scale", f32, (1,)), *conditioning],
            [*(TensorSpec(f"down_res_{i}", f32, ("batch", c, *res_dims(lv))) for i, (c, lv) in enumerate(layout)),
             TensorSpec("mid_res", f32, ("batch", layout[-1][0], *res_dims(layout[-1][1])))],
        ))
    if loaded.vae is not None:
        vae = loaded.vae.eval()
        if vae.config.latent_channels != cfg.in_channels:
            raise ModelLoadError(f"VAE has {vae.config.latent_channels} latent channels, the UNet {cfg.in_channels}")
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        stages.append(stage(
            "vae_decoder", VAEDecoderStage(with_branch_free_upsamplers(vae)),
            [TensorSpec("latent", f32, ("batch", vae.config.latent_channels, "height", "width"))],
            [TensorSpec("image", f32, ("batch", vae.config.out_channels, f"{factor}*height", f"{factor}*width"))],
            trace_sizes={"height": th, "width": tw}, flops_sizes={"height": dh, "width": dw},
            ranges={"height": (1, MAX_SPATIAL), "width": (1, MAX_SPATIAL)},
        ))
    return stages
