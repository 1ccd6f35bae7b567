"""The DiT adapter: stage modules, their I/O specs and sample inputs, all derived from one config + split.

Following TensorRT demoDiffusion's idea, this is the single place that knows each stage's input/output names, dtypes
and symbolic shapes; the ONNX export axes and the manifest entries are both derived from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from keystep.runtime.bundle import parse_dim

from .dit_model import DecoderStage, DiT, EncoderStage
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


def dit_stages(model: DiT, split: int, vae=None) -> list[StageDef]:
    cfg = model.config
    if not 1 <= split < cfg.depth:
        raise ModelLoadError(f"--split {split} is out of range: the model has {cfg.depth} blocks (1..{cfg.depth - 1})")
    s = cfg.input_size
    latent = TensorSpec("latent", "float32", ("batch", cfg.in_channels, s, s))
    cond = [TensorSpec("timestep", "float32", ("batch",)), TensorSpec("class_label", "int64", ("batch",))]
    hidden = TensorSpec("hidden", "float32", ("batch", cfg.num_tokens, cfg.hidden_size))
    output = TensorSpec("model_output", "float32", ("batch", cfg.out_channels, s, s))
    stages = [
        StageDef("encoder", EncoderStage(model, split).eval(), [latent, *cond], [hidden]),
        StageDef("decoder", DecoderStage(model, split).eval(), [hidden, *cond], [output]),
        StageDef("full", model.eval(), [latent, *cond], [output]),
    ]
    if vae is not None:
        stages.append(vae_decoder_stage(vae, cfg.in_channels, s))
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
