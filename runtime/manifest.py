"""The schema of ``manifest.json`` (and of ``engines/index.json``), validated on load with pydantic.

Why pydantic rather than a JSON-Schema validator: the checks that matter most here are cross-references (every stage
a plan or width profile names exists, the stage I/O agrees with the model config, the default plan fits the step
count and the scheduler), which are code either way; pydantic keeps types, ranges and those checks in one typed
model the runtime reads, reports every error with its field path, and still exports a JSON Schema for other tools
(``python -m keystep.runtime.manifest`` prints it).

Two manifest kinds: :class:`Manifest` (one diffusion model: families ``dit``, ``unet`` — SDXL with its ``sdxl``
section —, ``unet3d`` and ``if``, a DeepFloyd-IF diffusion stage) and :class:`CascadeManifest` (family ``cascade``:
a T5 text encoder and the list of ``if`` stage bundles in its sub-directories); :func:`manifest_model` picks one.

Strict mode: no silent coercion ("50" is not an int, 1.5 is not an int, true is not a number) and no NaN/Infinity.
Model configs accept extra keys (facts about the model a newer exporter may add); every other object is closed,
so a misspelt key is an error rather than a silently ignored field.

``schema_version`` is the manifest format's version. This keystep reads version 1; a higher one comes from a newer
keystep and is refused with a message that says so, before anything else is validated.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1
MAX_TRAIN_TIMESTEPS = 100_000  # scheduler tables are built eagerly; far above any released model (1000)
MAX_DIM = 1 << 20  # a static axis larger than this is a corrupt manifest, not a model

DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
SYMBOLIC_DIM = re.compile(r"^(?:[1-9][0-9]*\*)?[A-Za-z_][A-Za-z0-9_]*$")  # "batch", "height", "8*height"
SHA256 = r"^[0-9a-f]{64}$"

PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class Closed(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class Open(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False, frozen=True)


def check_relative_path(path: str) -> str:
    """Bundle files are named relative to the bundle: no absolute paths, no ``..``, no empty names."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or "\\" in path or path.startswith("~"):
        raise ValueError(f"must be a relative path inside the bundle, got {path!r}")
    return path


class FileEntry(Closed):
    path: str
    sha256: str = Field(pattern=SHA256)
    bytes: Count | None = None

    _path = field_validator("path")(check_relative_path)


Dim = Union[Annotated[int, Field(ge=1, le=MAX_DIM)], str]


class IOEntry(Closed):
    name: str = Field(min_length=1, max_length=256)
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    shape: list[Dim] = Field(max_length=8)

    @field_validator("shape")
    @classmethod
    def _symbolic(cls, shape: list) -> list:
        for d in shape:
            if isinstance(d, str) and not SYMBOLIC_DIM.match(d):
                raise ValueError(f"axis {d!r} is neither a size nor a symbolic axis (NAME or INT*NAME)")
        return shape


class Flops(Closed):
    per_sample: Count | None = None
    constant: Count = 0
    token_mlp: list[Count] = Field(default_factory=list)


class StageEntry(Closed):
    files: list[FileEntry] = Field(min_length=1)
    inputs: list[IOEntry] = Field(min_length=1)
    outputs: list[IOEntry] = Field(min_length=1)
    flops: Flops = Field(default_factory=Flops)
    precision: dict[str, Any] | None = None  # the build's conversion report (shown by inspect)

    @model_validator(mode="after")
    def _unique_names(self) -> "StageEntry":
        for side in ("inputs", "outputs"):
            names = [io.name for io in getattr(self, side)]
            if len(set(names)) != len(names):
                raise ValueError(f"{side} repeat a name: {names}")
        return self

    def io(self, name: str) -> IOEntry | None:
        return next((io for io in self.inputs + self.outputs if io.name == name), None)


class SchedulerSection(Open):
    """diffusers' scheduler_config.json fields that every scheduler here reads; the class validates the rest."""

    class_name: str = Field(alias="_class_name")
    num_train_timesteps: Annotated[int, Field(ge=2, le=MAX_TRAIN_TIMESTEPS)] = 1000
    beta_start: Annotated[float, Field(gt=0, lt=1)] = 0.0001
    beta_end: Annotated[float, Field(gt=0, lt=1)] = 0.02
    beta_schedule: str = "linear"
    trained_betas: list[Annotated[float, Field(gt=0, lt=1)]] | None = None
    steps_offset: Annotated[int, Field(ge=0, le=MAX_TRAIN_TIMESTEPS)] = 0
    # typed where present (the scheduler classes read them loosely: {} would pass as "false")
    clip_sample: bool | None = None
    clip_sample_range: Annotated[float, Field(gt=0)] | None = None
    set_alpha_to_one: bool | None = None
    thresholding: bool | None = None
    dynamic_thresholding_ratio: Annotated[float, Field(gt=0, le=1)] | None = None
    sample_max_value: Annotated[float, Field(gt=0)] | None = None
    rescale_betas_zero_snr: bool | None = None
    skip_prk_steps: bool | None = None
    use_karras_sigmas: bool | None = None
    use_exponential_sigmas: bool | None = None
    use_beta_sigmas: bool | None = None
    lower_order_final: bool | None = None
    solver_order: Annotated[int, Field(ge=1, le=3)] | None = None
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None
    timestep_spacing: Literal["leading", "trailing", "linspace"] | None = None
    sigma_min: Annotated[float, Field(gt=0)] | None = None
    sigma_max: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _builds(self) -> "SchedulerSection":
        from .schedulers import make_scheduler

        try:
            make_scheduler(self.model_dump(by_alias=True, exclude_unset=True))
        except Exception as exc:  # the scheduler classes raise ValueError/TypeError/KeyError for bad fields
            raise ValueError(f"not a usable scheduler config: {exc}") from None
        return self


class DefaultPlan(Closed):
    num_steps: PositiveInt = 50
    key_steps: Union[str, list[Count], None] = "default"
    guidance: Annotated[float, Field(ge=0, le=1000)] = 4.0
    cache: str | None = None
    scheduler: str | None = None
    parallel: bool | None = None
    max_decoder_batch: PositiveInt | None = None
    noise_injection: bool | None = None
    noise_alpha: Annotated[float, Field(ge=0, le=1)] = 0.003
    noise_tau: Annotated[float, Field(ge=0, le=1)] = 0.3
    noise_level: Annotated[int, Field(ge=0, le=MAX_TRAIN_TIMESTEPS)] | None = None  # IF super-resolution stages


class DiTModelConfig(Open):
    input_size: Annotated[int, Field(ge=1, le=MAX_DIM)]
    patch_size: PositiveInt
    in_channels: Annotated[int, Field(ge=1, le=4096)]
    hidden_size: Annotated[int, Field(ge=1, le=MAX_DIM)]
    depth: Annotated[int, Field(ge=1, le=1024)]
    num_heads: Annotated[int, Field(ge=1, le=4096)]
    mlp_hidden: PositiveInt
    num_classes: Annotated[int, Field(ge=1, le=1 << 24)]
    learn_sigma: bool
    time_freq_shift: Count = 0
    mlp_norm_eps: Annotated[float, Field(gt=0, lt=1)] = 1e-6
    frequency_embedding_size: Annotated[int, Field(ge=2)] = 256
    own_embedder_blocks: list[Count] = Field(default_factory=list)  # blocks with their own t/class embedders
    pixel_space: bool | None = None  # samples are images in [-1, 1] (no VAE); None in bundles from before the field

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @model_validator(mode="after")
    def _consistent(self) -> "DiTModelConfig":
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if any(b >= self.depth for b in self.own_embedder_blocks):
            raise ValueError(f"own_embedder_blocks {self.own_embedder_blocks} name blocks beyond depth {self.depth}")
        return self


CONDITIONING_INPUTS = ("class_labels", "text_embeds", "time_ids")  # per-row inputs of every time-embedding stage


class SDXLSection(Closed):
    """StableDiffusionXLPipeline's added conditioning (``model_config.sdxl``)."""

    time_ids: Literal[6]  # original size (h, w), crop top-left (y, x), target size (h, w)
    projection_dim: PositiveInt  # text_encoder_2's pooled projection: the stages' text_embeds width
    force_zeros_for_empty_prompt: bool


class UNetModelConfig(Open):
    in_channels: Annotated[int, Field(ge=1, le=4096)]
    out_channels: Annotated[int, Field(ge=1, le=4096)]
    sample_size: list[Annotated[int, Field(ge=1, le=MAX_DIM)]] = Field(min_length=2, max_length=2)
    text_dim: PositiveInt
    num_skips: PositiveInt
    skip_channels: list[PositiveInt]
    skip_levels: list[Count]
    num_levels: PositiveInt
    controlnet: bool = False
    vae_scale_factor: Annotated[int, Field(ge=1, le=64)] = 8
    vae_scaling_factor: Annotated[float, Field(gt=0)] | None = None
    pixel_space: bool = False
    text_len: PositiveInt | None = None
    vocab_size: PositiveInt | None = None
    conditioning: list[Literal[CONDITIONING_INPUTS]] = Field(default_factory=list)  # type: ignore[valid-type]
    size_multiple: PositiveInt | None = None  # upsamplers that double regardless of the skip's size (IF)
    sdxl: SDXLSection | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "UNetModelConfig":
        if not len(self.skip_channels) == len(self.skip_levels) == self.num_skips:
            raise ValueError(f"num_skips {self.num_skips} disagrees with skip_channels ({len(self.skip_channels)}) "
                             f"or skip_levels ({len(self.skip_levels)})")
        text_time = {"text_embeds", "time_ids"} <= set(self.conditioning)
        if (self.sdxl is not None) != text_time:
            raise ValueError("sdxl and the conditioning inputs text_embeds + time_ids go together (SDXL's "
                             "addition_embed_type 'text_time')")
        return self


class DiTBlocksVariant(Closed):
    kind: Literal["dit-blocks"]
    first: Count
    last: Count


class DeepCacheVariant(Closed):
    kind: Literal["deepcache"]
    branch_id: Count
    block: Count
    layer: Count


class CacheSection(Closed):
    variants: dict[str, Annotated[Union[DiTBlocksVariant, DeepCacheVariant], Field(discriminator="kind")]]


class WidthEngineEntry(Closed):
    name: str = Field(min_length=1)
    stage: Literal["encoder", "decoder"]
    masked: bool
    heads: list[list[Count]]
    groups: list[list[Count]]


class WidthSection(Closed):
    spec: str
    token_selection: Literal["gather", "dense", "off", "none"]  # none: the model has no token routers
    approximation: bool = False
    masks: str
    unit_flops: dict[str, Count]
    engines: list[WidthEngineEntry] = Field(min_length=1)

    _masks = field_validator("masks")(check_relative_path)


class SourceSection(Open):
    kind: str
    path: str | None = None


class VideoUNetModelConfig(UNetModelConfig):
    """Family ``unet3d`` (text-to-video, UNet3DConditionModel): a UNet's config plus the default frame count."""

    num_frames: Annotated[int, Field(ge=1, le=4096)]  # the manifest's FLOPs are counted at it


class IFSection(Closed):
    """One DeepFloyd-IF diffusion stage (``model_config.if``)."""

    role: Literal["base", "super_resolution"]
    image_channels: Annotated[int, Field(ge=1, le=4096)]
    learned_variance: bool  # the UNet returns epsilon and the variance's interpolation (2 x image_channels)
    noising_scheduler: SchedulerSection | None = None  # super-resolution: how the upscaled image is noised


class IFStageModelConfig(UNetModelConfig):
    """Family ``if``: a pixel-space UNet stage of a DeepFloyd-IF cascade (its text encoder is the cascade's)."""

    if_: IFSection = Field(alias="if")

    @model_validator(mode="after")
    def _stage(self) -> "IFStageModelConfig":
        stage, c = self.if_, self.if_.image_channels
        sr = stage.role == "super_resolution"
        if not self.pixel_space or self.vae_scale_factor != 1:
            raise ValueError("an IF stage samples pixels: pixel_space true, vae_scale_factor 1")
        if self.in_channels != c * (2 if sr else 1):
            raise ValueError(f"in_channels {self.in_channels}: an IF {stage.role} stage takes {c * (2 if sr else 1)} "
                             f"({c} image channels{' + the upscaled image' if sr else ''})")
        if self.out_channels != c * (2 if stage.learned_variance else 1):
            raise ValueError(f"out_channels {self.out_channels} disagrees with image_channels {c} and "
                             f"learned_variance {stage.learned_variance}")
        if sr != (stage.noising_scheduler is not None) or sr != ("class_labels" in self.conditioning):
            raise ValueError("a super-resolution stage (and only one) has the noising_scheduler and the noise level "
                             "as its class_labels conditioning")
        return self


FAMILY_CONFIGS = {"dit": DiTModelConfig, "unet": UNetModelConfig, "unet3d": VideoUNetModelConfig,
                  "if": IFStageModelConfig}


class Manifest(Closed):
    schema_version: Literal[SCHEMA_VERSION]
    family: Literal[tuple(FAMILY_CONFIGS)]  # type: ignore[valid-type]
    model_config_: dict[str, Any] = Field(alias="model_config")
    split: PositiveInt | None = None
    source: SourceSection | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    scheduler: SchedulerSection
    default_plan: DefaultPlan
    stages: dict[str, StageEntry] = Field(min_length=1)
    cache: CacheSection | None = None
    width: WidthSection | None = None
    assets: dict[str, list[FileEntry]] = Field(default_factory=dict)
    tuned: dict[str, Any] | None = None  # keystep tune's record of how the default plan was chosen

    @property
    def config(self) -> DiTModelConfig | UNetModelConfig:
        return FAMILY_CONFIGS[self.family].model_validate(self.model_config_)

    @model_validator(mode="after")
    def _cross_references(self) -> "Manifest":
        try:
            config = self.config
        except ValidationError as exc:
            raise ValueError(f"model_config: {first_error(exc)}") from None
        self._check_plan()
        self._check_cache()
        if self.family == "dit":
            self._check_dit(config)
        else:
            self._check_unet(config)
        return self

    # --- cross-reference checks; each names the field it is about ---------------------------------------------
    def _require_stage(self, name: str, why: str) -> StageEntry:
        if name not in self.stages:
            raise ValueError(f"stages: no stage {name!r} ({why}); has {sorted(self.stages)}")
        return self.stages[name]

    def _check_plan(self) -> None:
        from .plan import PlanError, parse_cache, parse_key_steps

        plan = self.default_plan
        if plan.num_steps > self.scheduler.num_train_timesteps:
            raise ValueError(f"default_plan.num_steps: {plan.num_steps} steps > the scheduler's "
                             f"{self.scheduler.num_train_timesteps} training timesteps")
        try:
            parse_key_steps(plan.key_steps, plan.num_steps, self.family)
            variants = list(self.cache.variants) if self.cache else []
            parse_cache(plan.cache, plan.num_steps, variants)
        except PlanError as exc:
            raise ValueError(f"default_plan: {exc}") from None

    def _check_cache(self) -> None:
        for name in (self.cache.variants if self.cache else {}):
            self._require_stage(f"cached.{name}", f"cache variant {name!r} runs it")
            full = self._require_stage("full", f"cache variant {name!r} is refreshed by it")
            if full.io(f"cache_{name}") is None:
                raise ValueError(f"stages.full: no output cache_{name} for cache variant {name!r}")

    def _check_dit(self, cfg: DiTModelConfig) -> None:
        if self.split is None or not 1 <= self.split < cfg.depth:
            raise ValueError(f"split: {self.split!r} must be a block index in 1..{cfg.depth - 1} (model depth {cfg.depth})")
        if self.width is not None:
            self._check_width(cfg)
            stages = [e.name for e in self.width.engines]
        else:
            stages = [self._require_stage(s, "dense DiT bundles run it") and s for s in ("encoder", "decoder")]
            stages += [s for s in self.stages if s == "full" or s.startswith("cached.")]
        size, tokens, c = cfg.input_size, cfg.num_tokens, cfg.in_channels
        expected = {"latent": ["batch", c, size, size], "model_output": ["batch", cfg.out_channels, size, size],
                    "hidden": ["batch", tokens, cfg.hidden_size], "timestep": ["batch"], "class_label": ["batch"]}
        for name in stages:
            for io in self.stages[name].inputs + self.stages[name].outputs:
                want = expected.get(io.name)
                if want is not None and io.shape != want:
                    raise ValueError(f"stages.{name}: {io.name} has shape {io.shape}, but model_config says {want}")
        if "vae_decoder" in self.stages and self.stages["vae_decoder"].io("latent") is None:
            raise ValueError("stages.vae_decoder: no 'latent' input")

    def _check_width(self, cfg: DiTModelConfig) -> None:
        blocks = {"encoder": self.split, "decoder": cfg.depth - self.split}
        for i, engine in enumerate(self.width.engines):
            where = f"width.engines.{i}"
            self._require_stage(engine.name, f"{where} names it")
            for kind, units in (("heads", engine.heads), ("groups", engine.groups)):
                if len(units) != blocks[engine.stage]:
                    raise ValueError(f"{where}.{kind}: {len(units)} blocks, the {engine.stage} has {blocks[engine.stage]}")
                if any(u >= cfg.num_heads for block in units for u in block):
                    raise ValueError(f"{where}.{kind}: unit index >= num_heads ({cfg.num_heads})")
        if not any(f.path == self.width.masks for f in self.assets.get("width", [])):
            raise ValueError(f"width.masks: {self.width.masks!r} is not a file of the 'width' asset")

    def _check_unet(self, cfg: UNetModelConfig) -> None:
        cascade_stage = self.family == "if"  # its text encoder and tokenizer are the cascade bundle's
        for name in ("encoder", "decoder") if cascade_stage else ("text_encoder", "encoder", "decoder"):
            self._require_stage(name, "text-to-image bundles run it")
        if "tokenizer" not in self.assets and not cascade_stage:
            raise ValueError("assets: no 'tokenizer' (text-to-image bundles tokenize prompts with it)")
        if cfg.sdxl is not None:
            self._require_stage("text_encoder_2", "SDXL bundles encode prompts with both text encoders")
            if "tokenizer_2" not in self.assets:
                raise ValueError("assets: no 'tokenizer_2' (SDXL's second text encoder tokenizes with it)")
            pooled = self.stages["text_encoder_2"].io("text_embeds")
            if pooled is None or pooled.shape[-1] != cfg.sdxl.projection_dim:
                raise ValueError(f"stages.text_encoder_2: output 'text_embeds' must be (batch, "
                                 f"{cfg.sdxl.projection_dim}) (model_config.sdxl.projection_dim)")
        if (self.default_plan.noise_level is not None) != (cascade_stage and cfg.if_.role == "super_resolution"):
            raise ValueError("default_plan.noise_level: set for IF super-resolution stages only")
        for name in [s for s in ("encoder", "decoder", "full", "controlnet") if s in self.stages] + [
                s for s in self.stages if s.startswith("cached.")]:
            missing = [c for c in cfg.conditioning if self.stages[name].io(c) is None]
            if missing:
                raise ValueError(f"stages.{name}: no input {missing[0]!r} (model_config.conditioning lists it)")
        encoder = self.stages["encoder"]
        skips = [io.name for io in encoder.outputs if io.name.startswith("skip_")]
        if len(skips) != cfg.num_skips:
            raise ValueError(f"stages.encoder: {len(skips)} skip outputs, model_config.num_skips is {cfg.num_skips}")
        sample = encoder.io("sample")
        video = self.family == "unet3d"  # text-to-video: (batch, C, frames, height, width)
        if sample is None or len(sample.shape) != (5 if video else 4) or sample.shape[1] != cfg.in_channels:
            layout = f"(batch, {cfg.in_channels}, {'frames, ' if video else ''}height, width)"
            raise ValueError(f"stages.encoder: input 'sample' must be {layout}")
        for name in ("encoder", "decoder", "full"):
            text = self.stages[name].io("encoder_hidden_states") if name in self.stages else None
            if text is not None and text.shape[-1] != cfg.text_dim:
                raise ValueError(f"stages.{name}: encoder_hidden_states width {text.shape[-1]} != "
                                 f"model_config.text_dim {cfg.text_dim}")
        if cfg.controlnet:
            self._require_stage("controlnet", "model_config.controlnet is true")
        if not cfg.pixel_space and "vae_decoder" not in self.stages and cfg.vae_scaling_factor is not None:
            raise ValueError("stages: no 'vae_decoder' for a latent-space model with a VAE scaling factor")


# --- cascade bundles (DeepFloyd-IF) -----------------------------------------------------------------------------


class CascadeModelConfig(Closed):
    pipeline: Literal["deepfloyd-if"]
    text_len: PositiveInt  # the T5 tokens per prompt (IFPipeline: 77)
    text_dim: PositiveInt  # T5's width: the diffusion stages' encoder_hidden_states
    vocab_size: PositiveInt


class CascadePart(Closed):
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", max_length=64)  # a sub-directory holding a bundle
    role: Literal["base", "super_resolution"]


class CascadeSource(Open):
    kind: str
    path: str | None = None
    super_resolution: list[str] = Field(default_factory=list)


class CascadeManifest(Closed):
    """Family ``cascade``: the shared T5 text encoder and its tokenizer; the diffusion stages are complete bundles
    (family ``if``) in the sub-directories ``cascade`` lists, in the order they run, each with its own manifest
    (validated when the cascade loads)."""

    schema_version: Literal[SCHEMA_VERSION]
    family: Literal["cascade"]
    model_config_: CascadeModelConfig = Field(alias="model_config")
    source: CascadeSource | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    cascade: list[CascadePart] = Field(min_length=1)
    stages: dict[str, StageEntry] = Field(min_length=1)
    assets: dict[str, list[FileEntry]] = Field(default_factory=dict)

    @property
    def config(self) -> CascadeModelConfig:
        return self.model_config_

    @model_validator(mode="after")
    def _cross_references(self) -> "CascadeManifest":
        names = [p.name for p in self.cascade]
        if len(set(names)) != len(names):
            raise ValueError(f"cascade: stage names repeat: {names}")
        if self.cascade[0].role != "base" or any(p.role != "super_resolution" for p in self.cascade[1:]):
            raise ValueError("cascade: a base stage first, then super-resolution stages")
        if set(names) & set(self.stages) or set(names) & set(self.assets):
            raise ValueError(f"cascade: a diffusion stage's directory shares a name with a stage or asset: {names}")
        if set(self.stages) != {"text_encoder"}:
            raise ValueError(f"stages: a cascade has exactly its 'text_encoder' (T5), got {sorted(self.stages)}")
        t5 = self.stages["text_encoder"]
        if [io.name for io in t5.inputs] != ["input_ids", "attention_mask"] or t5.io("text_embeddings") is None:
            raise ValueError("stages.text_encoder: (input_ids, attention_mask) -> text_embeddings expected")
        if t5.io("text_embeddings").shape[-1] != self.config.text_dim:
            raise ValueError(f"stages.text_encoder: text_embeddings width {t5.io('text_embeddings').shape[-1]} != "
                             f"model_config.text_dim {self.config.text_dim}")
        if "tokenizer" not in self.assets:
            raise ValueError("assets: no 'tokenizer' (the T5 tokenizer.json)")
        return self


def manifest_model(data: Any) -> type[Manifest] | type[CascadeManifest]:
    """The schema a manifest is validated with: cascades have their own (no scheduler or plan of their own)."""
    return CascadeManifest if isinstance(data, dict) and data.get("family") == "cascade" else Manifest


# --- engines/index.json --------------------------------------------------------------------------------------


class EngineProfileEntry(Open):
    min: PositiveInt
    opt: PositiveInt
    max: PositiveInt

    @model_validator(mode="after")
    def _ordered(self) -> "EngineProfileEntry":
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile must satisfy min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        return self


class EngineIndexEntry(Closed):
    stage: str = Field(min_length=1)
    file: str
    key: str = Field(min_length=1)
    onnx_sha256: str = Field(pattern=SHA256)
    profile: EngineProfileEntry
    options: dict[str, Any]
    engine_sha256: str = Field(default="", pattern=r"^(?:[0-9a-f]{64})?$")

    _file = field_validator("file")(check_relative_path)


class EngineIndexFile(Closed):
    tensorrt_version: str = Field(min_length=1)
    gpu: str = Field(min_length=1)
    axes: dict[str, PositiveInt]
    targets: dict[str, Any]
    engines: dict[str, EngineIndexEntry]

    @model_validator(mode="after")
    def _keys(self) -> "EngineIndexFile":
        for name, entry in self.engines.items():
            if entry.stage != name:
                raise ValueError(f"engines.{name}.stage: {entry.stage!r} differs from its key {name!r}")
        return self


# --- errors --------------------------------------------------------------------------------------------------


def first_error(exc: ValidationError) -> str:
    """One line for a validation error: the first problem with its field path (and how many more there are)."""
    errors = exc.errors(include_url=False)
    e = errors[0]
    path = ".".join(str(p) for p in e["loc"])
    message = e["msg"].removeprefix("Value error, ")
    got = "" if e["type"] in ("missing", "value_error", "assertion_error") else f" (got {_short(e.get('input'))})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{path + ': ' if path else ''}{message}{got}{more}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_manifest(data: dict) -> "Manifest":
    """Validate a manifest a writer is about to save (build, tune): a schema error there is a keystep bug."""
    try:  # as the JSON it becomes (tuples are lists there)
        data = json.loads(json.dumps(data))
        return manifest_model(data).model_validate(data)
    except ValidationError as exc:
        raise RuntimeError(f"keystep wrote a manifest its own schema refuses: {first_error(exc)}") from None


def check_version(data: Any) -> str | None:
    """A message for a manifest from another keystep's format, or None. Checked before the schema so a newer
    bundle says 'upgrade' instead of listing every field it does not know."""
    if not isinstance(data, dict):
        return "not a JSON object"
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        return (f"schema_version {version} comes from a newer keystep (this one reads version {SCHEMA_VERSION}): "
                f"upgrade keystep to load it")
    if version != SCHEMA_VERSION:
        return f"schema_version: {version!r} is not a manifest version this keystep reads ({SCHEMA_VERSION})"
    return None


if __name__ == "__main__":  # the JSON Schema, for other tools: one of the two manifest kinds
    from pydantic import TypeAdapter

    print(json.dumps(TypeAdapter(Union[Manifest, CascadeManifest]).json_schema(by_alias=True), indent=2))
