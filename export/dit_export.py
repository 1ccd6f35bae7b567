"""The DiT adapter: stage modules, their I/O specs and sample inputs, all derived from one config + split.

Following TensorRT demoDiffusion's idea, this is the single place that knows each stage's input/output names, dtypes
and symbolic shapes; the ONNX export axes and the manifest entries are both derived from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from keystep.runtime.bundle import parse_dim

from keystep.runtime.width import WidthEngine

from .dit_cache import BlockRange, DiTBlockSkipStage, DiTCachingFullStage
from .dit_model import DecoderStage, DiT, EncoderStage, narrow_block
from .errors import ModelLoadError


def resolve_dim(dim, sizes: dict[str, int]) -> int:
    """The concrete size of one shape entry: ints stay, symbolic dims are looked up in ``sizes``."""
    if isinstance(dim, int):
        return dim
    factor, name = parse_dim(dim)
    try:
        return factor * sizes[name]
    except KeyError:
        raise KeyError(f"no concrete size given for symbolic dim {name!r}") from None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # ints, and symbolic dims: names ("batch", "height") or multiples of one ("8*height")

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def concrete(self, sizes: "int | dict[str, int]") -> tuple[int, ...]:
        """The shape with every symbolic dim made concrete; an int means ``{"batch": n}``."""
        sizes = {"batch": sizes} if isinstance(sizes, int) else sizes
        return tuple(resolve_dim(d, sizes) for d in self.shape)

    def sample(self, batch: "int | dict[str, int]", generator: torch.Generator, high: int = 1000) -> torch.Tensor:
        """A random tensor of this spec; ``batch`` is the batch size, or a concrete size per symbolic dim."""
        shape = list(self.concrete(batch))
        if self.dtype == "int64":
            return torch.randint(0, high, shape, generator=generator)
        return torch.randn(shape, generator=generator)


@dataclass
class StageDef:
    name: str
    module: nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # Symbolic dims other than "batch" (e.g. "height", "text_len"): the concrete size per dim used to trace the
    # export, and the one the manifest's FLOPs are counted at. Empty for stages whose only dynamic axis is batch.
    trace_sizes: dict[str, int] = field(default_factory=dict)
    flops_sizes: dict[str, int] = field(default_factory=dict)
    # (min, max) per symbolic dim name for the export; dims not listed get bundle_writer.DEFAULT_DIM_RANGE
    dim_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    # DyDiT token selection: per block, the FLOPs of its MLP for one token (turns the graph's reported token counts
    # into FLOPs), and for gather graphs the tokens per sample whose MLPs the FLOP counter cannot see (their count
    # is data-dependent; the manifest counts all of them, an upper bound)
    token_mlp_flops: tuple[int, ...] = ()
    gathered_tokens: int = 0


def _dit_specs(cfg) -> tuple[TensorSpec, list[TensorSpec], TensorSpec, TensorSpec]:
    s = cfg.input_size
    latent = TensorSpec("latent", "float32", ("batch", cfg.in_channels, s, s))
    cond = [TensorSpec("timestep", "float32", ("batch",)), TensorSpec("class_label", "int64", ("batch",))]
    hidden = TensorSpec("hidden", "float32", ("batch", cfg.num_tokens, cfg.hidden_size))
    output = TensorSpec("model_output", "float32", ("batch", cfg.out_channels, s, s))
    return latent, cond, hidden, output


def check_split(cfg, split: int) -> None:
    if not 1 <= split < cfg.depth:
        raise ModelLoadError(f"--split {split} is out of range: the model has {cfg.depth} blocks (1..{cfg.depth - 1})")


def dit_stages(model: DiT, split: int, vae=None, cached: list[BlockRange] = ()) -> list[StageDef]:
    """encoder, decoder, full (+ one cached-step stage per block range, whose residual the full stage returns)."""
    cfg = model.config
    check_split(cfg, split)
    latent, cond, hidden, output = _dit_specs(cfg)
    residuals = {}
    for r in cached:
        r.check(cfg.depth)
        residuals[r.name] = TensorSpec(f"cache_{r.name}", "float32", hidden.shape)
    full = DiTCachingFullStage(model, list(cached)) if cached else model
    stages = [
        StageDef("encoder", EncoderStage(model, split).eval(), [latent, *cond], [hidden]),
        StageDef("decoder", DecoderStage(model, split).eval(), [hidden, *cond], [output]),
        StageDef("full", full.eval(), [latent, *cond], [output, *residuals.values()]),
    ]
    stages += [
        StageDef(f"cached.{r.name}", DiTBlockSkipStage(model, r).eval(), [latent, *cond, residuals[r.name]], [output])
        for r in cached
    ]
    if vae is not None:
        stages.append(vae_decoder_stage(vae, cfg.in_channels, cfg.input_size))
    return stages


def dit_width_stages(model: DiT, split: int, engines: list[WidthEngine], token_mode: str, vae=None) -> list[StageDef]:
    """One encoder/decoder stage per width engine, its blocks narrowed to the engine's units. Merged engines take
    ``head_mask``/``group_mask`` rows; with token selection every stage also reports its blocks' MLP token counts."""
    cfg = model.config
    check_split(cfg, split)
    latent, cond, hidden, output = _dit_specs(cfg)
    routed = model.blocks[0].token_router is not None and token_mode != "off"
    gather = routed and token_mode == "gather"
    stages = []
    for engine in engines:
        start = 0 if engine.stage == "encoder" else split
        blocks = list(model.blocks)
        for offset, units in enumerate(engine.units):
            narrowed = narrow_block(blocks[start + offset], np.flatnonzero(units[0]).tolist(), np.flatnonzero(units[1]).tolist())
            narrowed.token_mode = token_mode
            blocks[start + offset] = narrowed
        narrowed_model = model.with_blocks(blocks).eval()
        stage_blocks = blocks[start : start + len(engine.units)]
        inputs = [latent if engine.stage == "encoder" else hidden, *cond]
        if engine.masked:
            inputs += [
                TensorSpec("head_mask", "float32", ("batch", sum(b.heads for b in stage_blocks))),
                TensorSpec("group_mask", "float32", ("batch", sum(b.groups for b in stage_blocks))),
            ]
        outputs = [hidden if engine.stage == "encoder" else output]
        if routed:
            outputs.append(TensorSpec("mlp_tokens", "int64", (len(stage_blocks),)))
        module = (EncoderStage if engine.stage == "encoder" else DecoderStage)(narrowed_model, split).eval()
        stages.append(StageDef(
            engine.name, module, inputs, outputs,
            # only gather graphs skip work: dense token masking computes every token's MLP
            token_mlp_flops=tuple(4 * cfg.hidden_size * b.fc1.out_features for b in stage_blocks) if gather else (),
            gathered_tokens=cfg.num_tokens if gather else 0,
        ))
    if vae is not None:
        stages.append(vae_decoder_stage(vae, cfg.in_channels, cfg.input_size))
    return stages


class VAEDecoderStage(nn.Module):
    """Latents -> images in [0, 1], with the pipeline's scaling and post-processing inside the graph."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        image = self.vae.decode(latent / self.vae.config.scaling_factor).sample
        return (image / 2 + 0.5).clamp(0, 1)


def vae_decoder_stage(vae, latent_channels: int, latent_size: int) -> StageDef:
    if vae.config.latent_channels != latent_channels:
        raise ModelLoadError(f"VAE has {vae.config.latent_channels} latent channels, transformer {latent_channels}")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return StageDef(
        "vae_decoder",
        VAEDecoderStage(vae).eval(),
        [TensorSpec("latent", "float32", ("batch", latent_channels, latent_size, latent_size))],
        [TensorSpec("image", "float32", ("batch", vae.config.out_channels, latent_size * factor, latent_size * factor))],
    )
