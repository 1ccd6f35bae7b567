"""The text-to-video adapter (family ``unet3d``): load a diffusers TextToVideoSDPipeline directory (ModelScope
text-to-video / VideoFusion layout: ``unet/`` = UNet3DConditionModel, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``) and describe its ONNX stages for ``write_bundle``.

Stages and their I/O (symbolic axes as for 2-D UNets — ``batch``, ``height``/``width`` of the latent,
``height_l``/``width_l`` after l downsamplers, ``text_len`` — plus ``frames``):

==============  =============================================================  =====================================
stage           inputs                                                         outputs
==============  =============================================================  =====================================
text_encoder    input_ids[batch,text_len] i64                                  text_embeddings[batch,text_len,D]
encoder         sample[batch,C,frames,height,width], timestep[batch],          skip_i[batch,frames,C_i,h_i,w_i],
                encoder_hidden_states[batch,text_len,D]                        mid[batch,frames,C_mid,h_L,w_L]
decoder         skip_0..skip_{n-1}, mid, timestep, encoder_hidden_states       noise_pred[batch,C,frames,height,width]
full            sample, timestep, encoder_hidden_states                        noise_pred (+ cache_deep<id> per
                                                                               DeepCache branch)
cached.deep<id> sample, timestep, encoder_hidden_states, cache_deep<id>        noise_pred
vae_decoder     latent[batch,4,height,width] (one frame per row)               image[batch,3,8*height,8*width]
==============  =============================================================  =====================================

A ``batch`` row is one video (its timestep and text apply to every frame); the VAE decodes frames as rows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from keystep.runtime.signature import with_keywords

from .build import (
    DEFAULT_STEPS,
    UNET_NOISE_INJECTION,
    BuildOptions,
    cache_manifest,
    parse_cache_variants,
    resolve_scheduler_config,
)
from .dit_export import StageDef, TensorSpec, VAEDecoderStage
from .errors import ModelLoadError
from .tokenizer_asset import has_tokenizer
from .unet3d_model import VideoDecoderStage, VideoEncoderStage, VideoFullStage, VideoShallowStage
from .unet_cache import DeepCacheBranch, deep_feature_shape
from .unet_export import (
    DEFAULT_TEXT_LEN,
    MAX_SPATIAL,
    TRACE_TEXT_LEN,
    LoadedSD,
    _level_dims,
    _read_json,
    _size_dict,
    default_latent_size,
    trace_latent_size,
)
from .unet_model import TextEncoderStage, skip_layout, with_branch_free_upsamplers

SUPPORTED_DOWN_BLOCKS = ("CrossAttnDownBlock3D", "DownBlock3D")
SUPPORTED_UP_BLOCKS = ("CrossAttnUpBlock3D", "UpBlock3D")
DEFAULT_FRAMES = 16  # TextToVideoSDPipeline's num_frames default; the manifest's FLOPs are counted at it
MAX_FRAMES = 4096  # upper bound of the frames axis of the exported graphs


def check_video_unet_config(config: dict, where: str = "UNet") -> None:
    """Reject UNet3D configs whose forward needs inputs the stages do not take, or blocks they do not know."""
    name = config.get("_class_name", "UNet3DConditionModel")
    if name != "UNet3DConditionModel":
        raise ModelLoadError(f"{where}: expected a UNet3DConditionModel, found {name!r}")
    if config.get("time_cond_proj_dim") is not None:
        raise ModelLoadError(f"{where}: time_cond_proj_dim (a timestep_cond input) is not supported")
    for kind, types, supported in (("down", config.get("down_block_types") or (), SUPPORTED_DOWN_BLOCKS),
                                   ("up", config.get("up_block_types") or (), SUPPORTED_UP_BLOCKS)):
        bad = [t for t in types if t not in supported]
        if bad:
            raise ModelLoadError(f"{where}: unsupported {kind} block types {bad} (supported: {', '.join(supported)})")


def is_video_pipeline(index: dict, path: Path) -> bool:
    """A pipeline directory whose unet/ is a UNet3DConditionModel (TextToVideoSDPipeline and its relatives)."""
    if index.get("_class_name") == "TextToVideoSDPipeline":
        return True
    config = path / "unet" / "config.json"
    return config.is_file() and _read_json(config).get("_class_name") == "UNet3DConditionModel"


def load_video_pipeline_dir(path: str | Path) -> LoadedSD:
    """A diffusers TextToVideoSDPipeline directory: model_index.json, unet/ (UNet3DConditionModel), vae/
    (AutoencoderKL), text_encoder/ (CLIPTextModel), tokenizer/, scheduler/scheduler_config.json."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory does not exist: {path}")
    index = _read_json(path / "model_index.json")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / part).is_dir():
            raise ModelLoadError(f"{path}: the text-to-video pipeline has no {part}/ directory")
    check_video_unet_config(_read_json(path / "unet" / "config.json"), f"{path}/unet")
    vae_config = _read_json(path / "vae" / "config.json")
    if vae_config.get("_class_name") != "AutoencoderKL":
        raise ModelLoadError(f"{path}/vae: expected an AutoencoderKL, found {vae_config.get('_class_name')!r}")
    te_config = _read_json(path / "text_encoder" / "config.json")
    if "CLIPTextModel" not in (te_config.get("architectures") or []):
        raise ModelLoadError(f"{path}/text_encoder: expected a CLIPTextModel, found {te_config.get('architectures')}")
    if not has_tokenizer(path / "tokenizer"):
        raise ModelLoadError(f"{path}/tokenizer has neither vocab.json + merges.txt nor tokenizer.json")
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")

    from diffusers import AutoencoderKL, UNet3DConditionModel
    from transformers import CLIPTextModel

    try:
        unet = UNet3DConditionModel.from_pretrained(path / "unet", torch_dtype=torch.float32).eval()
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch.float32).eval()
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load {path}: {exc}") from exc
    return LoadedSD(unet, vae, text_encoder, path / "tokenizer", scheduler_config, index, "diffusers-pipeline", path)


def video_model_config(loaded: LoadedSD, frames: int = DEFAULT_FRAMES) -> dict:
    """Facts about the model the runtime needs (the manifest's model_config)."""
    unet, vae, te = loaded.unet, loaded.vae, loaded.text_encoder
    layout = skip_layout(unet)
    return {
        "in_channels": unet.config.in_channels,
        "out_channels": unet.config.out_channels,
        "sample_size": list(default_latent_size(unet)),
        "num_frames": frames,
        "text_dim": int(unet.config.cross_attention_dim),
        "num_skips": len(layout),
        "skip_channels": [c for c, _ in layout],
        "skip_levels": [lv for _, lv in layout],
        "num_levels": layout[-1][1] + 1,
        "vae_scale_factor": 2 ** (len(vae.config.block_out_channels) - 1),
        "vae_scaling_factor": vae.config.scaling_factor,
        "text_len": te.config.max_position_embeddings,
        "vocab_size": te.config.vocab_size,
    }


def trace_frames(sizes: dict[str, int]) -> int:
    """A frame count for the export trace that equals no other traced size (equal sizes may be unified by the
    tracer, which would tie ``frames`` to another axis)."""
    taken = {2, *sizes.values()}  # 2 = the traced batch
    return next(n for n in range(3, 64) if n not in taken)


def video_stages(loaded: LoadedSD, branches: list[DeepCacheBranch] = (), frames: int = DEFAULT_FRAMES) -> list[StageDef]:
    """StageDefs for text_encoder, encoder, decoder, full, one shallow stage per DeepCache branch and vae_decoder,
    with batch / frames / height / width / text_len dynamic where they apply."""
    unet, vae, te = loaded.unet.eval(), loaded.vae.eval(), loaded.text_encoder.eval()
    check_video_unet_config(dict(unet.config))
    if vae.config.latent_channels != unet.config.in_channels:
        raise ModelLoadError(f"VAE has {vae.config.latent_channels} latent channels, the UNet {unet.config.in_channels}")
    layout = skip_layout(unet)
    levels = layout[-1][1] + 1
    text_len = te.config.max_position_embeddings or DEFAULT_TEXT_LEN

    f32 = "float32"
    sample = TensorSpec("sample", f32, ("batch", unet.config.in_channels, "frames", "height", "width"))
    timestep = TensorSpec("timestep", f32, ("batch",))
    ehs = TensorSpec("encoder_hidden_states", f32, ("batch", "text_len", int(unet.config.cross_attention_dim)))
    skips = [TensorSpec(f"skip_{i}", f32, ("batch", "frames", c, *_level_dims(lv))) for i, (c, lv) in enumerate(layout)]
    mid = TensorSpec("mid", f32, ("batch", "frames", layout[-1][0], *_level_dims(layout[-1][1])))
    noise_pred = TensorSpec("noise_pred", f32, ("batch", unet.config.out_channels, "frames", "height", "width"))

    th, tw = trace_latent_size(unet)
    dh, dw = default_latent_size(unet)
    trace = {**_size_dict(unet, th, tw), "text_len": TRACE_TEXT_LEN}
    trace["frames"] = trace_frames(trace)
    flops = {**_size_dict(unet, dh, dw), "text_len": text_len, "frames": frames}
    ranges = {d: (1, MAX_SPATIAL) for lv in range(levels) for d in _level_dims(lv)} | {"frames": (1, MAX_FRAMES)}

    def stage(name, module, inputs, outputs):
        return StageDef(name, module.eval(), inputs, outputs, dict(trace), dict(flops), dict(ranges))

    deep = {}
    for branch in branches:
        branch.check(unet)
        channels, level = deep_feature_shape(unet, branch)
        deep[branch.name] = TensorSpec(f"cache_{branch.name}", f32, ("batch", "frames", channels, *_level_dims(level)))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return [
        StageDef("text_encoder", TextEncoderStage(te).eval(), [TensorSpec("input_ids", "int64", ("batch", "text_len"))],
                 [TensorSpec("text_embeddings", f32, ("batch", "text_len", te.config.hidden_size))],
                 {"text_len": text_len}, {"text_len": text_len}, {"text_len": (1, text_len)}),
        stage("encoder", VideoEncoderStage(unet), [sample, timestep, ehs], [*skips, mid]),
        stage("decoder", VideoDecoderStage(unet, len(skips)), [*skips, mid, timestep, ehs], [noise_pred]),
        stage("full", VideoFullStage(unet, list(branches)), [sample, timestep, ehs], [noise_pred, *deep.values()]),
        *(stage(f"cached.{b.name}", VideoShallowStage(unet, b), [sample, timestep, ehs, deep[b.name]], [noise_pred])
          for b in branches),
        StageDef("vae_decoder", VAEDecoderStage(with_branch_free_upsamplers(vae)).eval(),
                 [TensorSpec("latent", f32, ("batch", vae.config.latent_channels, "height", "width"))],
                 [TensorSpec("image", f32, ("batch", vae.config.out_channels, f"{factor}*height", f"{factor}*width"))],
                 {"height": th, "width": tw}, {"height": dh, "width": dw},
                 {"height": (1, MAX_SPATIAL), "width": (1, MAX_SPATIAL)}),
    ]


VIDEO_GUIDANCE = 9.0  # TextToVideoSDPipeline's guidance_scale default


@with_keywords(BuildOptions)
def build_video_bundle(
    model: str,
    out: str,
    controlnet: str | None = None,
    frames: int | None = None,
    progress=print,
    **options,
) -> Path:
    """``keystep build`` for a text-to-video pipeline directory (family ``unet3d``)."""
    import tempfile

    from keystep.models import resolve_model_path
    from keystep.runtime.plan import parse_key_steps

    from .bundle_writer import write_bundle
    from .stage_precision import PrecisionPlan
    from .tokenizer_asset import tokenizer_asset

    o = BuildOptions(**options)
    if controlnet:
        raise ModelLoadError("--controlnet applies to Stable Diffusion (2-D UNet) models only")
    frames = DEFAULT_FRAMES if frames is None else frames
    if not 1 <= frames <= MAX_FRAMES:
        raise ModelLoadError(f"--frames must be in 1..{MAX_FRAMES}, got {frames}")
    precisions = PrecisionPlan.parse(o.precision)
    loaded = load_video_pipeline_dir(resolve_model_path(model))
    branches = parse_cache_variants(o.cache, "unet3d")
    key_steps = o.key_steps or "default"
    steps = DEFAULT_STEPS if o.steps is None else o.steps
    parse_key_steps(key_steps, steps, "unet3d")
    sched = resolve_scheduler_config(loaded.scheduler_config, o.scheduler_config, o.scheduler)
    fields = {
        "family": "unet3d",
        "model_config": video_model_config(loaded, frames),
        "source": {"kind": loaded.source_kind, "path": str(Path(model).resolve())},
        "scheduler": sched,
        "default_plan": {"num_steps": steps, "key_steps": key_steps,
                         "guidance": VIDEO_GUIDANCE if o.guidance is None else o.guidance, **UNET_NOISE_INJECTION},
    }
    if branches:
        fields["cache"] = cache_manifest(branches)
    stages = video_stages(loaded, branches, frames)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = tokenizer_asset(loaded.tokenizer_dir, Path(scratch))
        return write_bundle(Path(out), stages, fields, progress=progress, assets={"tokenizer": tokenizer},
                            precision=precisions)
