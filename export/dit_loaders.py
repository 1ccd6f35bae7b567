"""Load a DiT from a diffusers directory or an original facebookresearch checkpoint into :class:`DiT`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .dit_model import DiT, DiTConfig
from .dydit import attach_dydit_routers, has_dydit_routers, router_heads
from .errors import ModelLoadError

# Every released DiT (S/B/L/XL) uses 64-dim heads; the original checkpoint format has no other way to tell.
ORIGINAL_DIT_HEAD_DIM = 64


@dataclass
class LoadedDiT:
    model: DiT
    source_kind: str  # "diffusers-pipeline" | "diffusers-transformer" | "original-checkpoint"
    scheduler_config: dict | None = None
    vae: object | None = None  # diffusers AutoencoderKL when the pipeline has one
    labels: dict[int, str] = field(default_factory=dict)
    routers: object | None = None  # dydit.WidthRouters of a DyDiT checkpoint (its token routers are in the blocks)


def load_dit(path: str | Path, num_heads: int | None = None) -> LoadedDiT:
    """Dispatch on what ``path`` is: a diffusers pipeline dir, a transformer dir, or a .pt/.pth checkpoint."""
    if str(path).startswith("random:"):
        from .random_models import DYDIT_PRESETS, parse_random_spec, random_dit, random_dydit

        preset, seed = parse_random_spec(str(path))
        if preset in DYDIT_PRESETS:
            model, routers = random_dydit(preset, seed)
            return LoadedDiT(model, "random", routers=routers)
        return LoadedDiT(random_dit(preset, seed), "random")
    from keystep.models import shipped

    entry = shipped(str(path))
    if entry is not None:
        if not entry.available:
            raise ModelLoadError(f"shipped model {entry.name}: {entry.path} is missing from this install")
        loaded = load_dit(entry.path, num_heads=num_heads)
        loaded.scheduler_config = dict(entry.scheduler)
        return loaded
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return load_diffusers_pipeline(path)
        if (path / "config.json").is_file():
            return LoadedDiT(load_diffusers_transformer(path), "diffusers-transformer")
        raise ModelLoadError(f"{path}: a directory but neither model_index.json nor config.json is in it")
    sd, metadata = read_checkpoint(path)
    if num_heads is None and "num_heads" in metadata:
        num_heads = int(metadata["num_heads"])
    model = dit_from_original_state_dict(sd, num_heads)
    routers = attach_dydit_routers(model, sd) if has_dydit_routers(sd) else None
    return LoadedDiT(model, "dydit-checkpoint" if routers else "original-checkpoint", routers=routers)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def load_diffusers_pipeline(path: Path) -> LoadedDiT:
    index = _read_json(path / "model_index.json")
    if "transformer" not in index:
        raise ModelLoadError(f"{path}/model_index.json has no 'transformer' entry: not a DiT pipeline")
    model = load_diffusers_transformer(path / "transformer")
    scheduler_config = None
    if (path / "scheduler" / "scheduler_config.json").is_file():
        scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    vae = None
    if (path / "vae").is_dir():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(path / "vae").eval()
    labels = {int(k): v for k, v in (index.get("id2label") or {}).items()}
    return LoadedDiT(model, "diffusers-pipeline", scheduler_config, vae, labels)


def load_diffusers_transformer(path: Path) -> DiT:
    config = _read_json(path / "config.json")
    if config.get("_class_name") not in ("DiTTransformer2DModel", "Transformer2DModel"):
        raise ModelLoadError(f"{path}: expected a DiTTransformer2DModel, found {config.get('_class_name')!r}")
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or not config.get("num_embeds_ada_norm"):
        raise ModelLoadError(f"{path}: only class-conditional ada_norm_zero DiT transformers are supported")
    from diffusers import DiTTransformer2DModel

    src = DiTTransformer2DModel.from_pretrained(path).eval()
    return dit_from_diffusers(src)


# diffusers' CombinedTimestepLabelEmbeddings parameter -> ours (ConditionEmbedder / the DiT's own)
EMBEDDER_NAMES = {
    "timestep_embedder.linear_1.weight": "t_fc1.weight", "timestep_embedder.linear_1.bias": "t_fc1.bias",
    "timestep_embedder.linear_2.weight": "t_fc2.weight", "timestep_embedder.linear_2.bias": "t_fc2.bias",
    "class_embedder.embedding_table.weight": "y_table.weight",
}


def dit_from_diffusers(src) -> DiT:
    c = src.config
    heads, head_dim = c.num_attention_heads, c.attention_head_dim
    hidden = heads * head_dim
    first = src.transformer_blocks[0]
    sd = src.state_dict()
    emb0 = "transformer_blocks.0.norm1.emb."
    # diffusers keeps a timestep/class embedder in every block. Checkpoints converted from the original DiT carry
    # copies of one (exported once, shared); a DiT initialised or trained in diffusers has its own per block, and
    # each block with a different one gets it (block 0's also conditions the final layer, as in diffusers).
    own = tuple(i for i in range(1, c.num_layers) if any(
        not torch.equal(sd[f"transformer_blocks.{i}.norm1.emb.{name}"], sd[emb0 + name]) for name in EMBEDDER_NAMES))
    cfg = DiTConfig(
        input_size=c.sample_size,
        patch_size=c.patch_size,
        in_channels=c.in_channels,
        hidden_size=hidden,
        depth=c.num_layers,
        num_heads=heads,
        mlp_hidden=first.ff.net[0].proj.out_features,
        num_classes=c.num_embeds_ada_norm,
        learn_sigma=(c.out_channels or c.in_channels) == 2 * c.in_channels,
        time_freq_shift=int(first.norm1.emb.time_proj.downscale_freq_shift),
        mlp_norm_eps=float(c.norm_eps),
        own_embedder_blocks=own,
    )
    out = {
        "x_proj.weight": sd["pos_embed.proj.weight"],
        "x_proj.bias": sd["pos_embed.proj.bias"],
        "pos_embed": src.pos_embed.pos_embed.detach().float(),
        **{ours: sd[emb0 + theirs] for theirs, ours in EMBEDDER_NAMES.items()},
        "final_ada.weight": sd["proj_out_1.weight"],
        "final_ada.bias": sd["proj_out_1.bias"],
        "final_linear.weight": sd["proj_out_2.weight"],
        "final_linear.bias": sd["proj_out_2.bias"],
    }
    for i in own:
        for theirs, ours in EMBEDDER_NAMES.items():
            out[f"block_embedders.{i}.{ours}"] = sd[f"transformer_blocks.{i}.norm1.emb.{theirs}"]
    for i in range(cfg.depth):
        b = f"transformer_blocks.{i}."
        for w in ("weight", "bias"):
            out[f"blocks.{i}.qkv.{w}"] = torch.cat([sd[b + f"attn1.to_{p}.{w}"] for p in "qkv"], dim=0)
            out[f"blocks.{i}.proj.{w}"] = sd[b + f"attn1.to_out.0.{w}"]
            out[f"blocks.{i}.fc1.{w}"] = sd[b + f"ff.net.0.proj.{w}"]
            out[f"blocks.{i}.fc2.{w}"] = sd[b + f"ff.net.2.{w}"]
            out[f"blocks.{i}.ada.{w}"] = sd[b + f"norm1.linear.{w}"]
    return _build(cfg, out)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) from .pt/.pth/.safetensors; {"model", "ema"} wrappers unwrap to "ema" first.
    safetensors metadata may say what the original format cannot, e.g. ``num_heads``."""
    metadata = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
                metadata = f.metadata() or {}
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ModelLoadError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(sd, dict):
        for key in ("ema", "model", "state_dict"):
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or "x_embedder.proj.weight" not in sd:
        raise ModelLoadError(f"{path}: not an original DiT checkpoint (no x_embedder.proj.weight)")
    return sd, metadata


def config_from_original(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> DiTConfig:
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if num_heads is None:
        num_heads = router_heads(sd) or hidden // ORIGINAL_DIT_HEAD_DIM
    if hidden % num_heads:
        raise ModelLoadError(f"hidden size {hidden} is not divisible by {num_heads} heads")
    grid = int(round(sd["pos_embed"].shape[1] ** 0.5))
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ModelLoadError(f"final layer gives {out_channels} channels for {in_channels} input channels")
    return DiTConfig(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_hidden=sd["blocks.0.mlp.fc1.weight"].shape[0],
        # the table has a null-class row when the model was trained with class dropout (every DiT is)
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_channels == 2 * in_channels,
    )


# our parameter name -> the original DiT's (facebookresearch/DiT models.py); per block under "blocks.{i}."
ORIGINAL_NAMES = {
    "x_proj": "x_embedder.proj", "t_fc1": "t_embedder.mlp.0", "t_fc2": "t_embedder.mlp.2",
    "final_ada": "final_layer.adaLN_modulation.1", "final_linear": "final_layer.linear",
}
ORIGINAL_BLOCK_NAMES = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
                        "ada": "adaLN_modulation.1"}


def _original_pairs(depth: int):
    """(ours, theirs) for every tensor of the original layout."""
    yield "pos_embed", "pos_embed"
    yield "y_table.weight", "y_embedder.embedding_table.weight"
    for ours, theirs in ORIGINAL_NAMES.items():
        for w in ("weight", "bias"):
            yield f"{ours}.{w}", f"{theirs}.{w}"
    for i in range(depth):
        for ours, theirs in ORIGINAL_BLOCK_NAMES.items():
            for w in ("weight", "bias"):
                yield f"blocks.{i}.{ours}.{w}", f"blocks.{i}.{theirs}.{w}"


def dit_from_original_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> DiT:
    cfg = config_from_original(sd, num_heads)
    return _build(cfg, {ours: sd[theirs] for ours, theirs in _original_pairs(cfg.depth)})


def original_state_dict(model: DiT) -> dict[str, torch.Tensor]:
    """``model``'s weights under the original DiT key names (what training writes, so every loader path is used)."""
    ours = model.state_dict()
    return {theirs: ours[name].detach().clone().contiguous() for name, theirs in _original_pairs(model.config.depth)}


def _build(cfg: DiTConfig, state: dict[str, torch.Tensor]) -> DiT:
    model = DiT(cfg)
    state = {k: v.float() for k, v in state.items()}
    state["t_freqs"] = model.t_freqs
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights do not fit the inferred config {cfg}: {exc}") from exc
    return model.eval()
