"""Bundle = a directory with ``manifest.json`` and the stage graphs it names. Loading verifies schema and hashes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from .errors import KeystepError
from .manifest import SCHEMA_VERSION, Manifest, check_version, first_error, manifest_model  # noqa: F401 (SCHEMA_VERSION: writers)
from .width import WidthEngine, WidthTable

MANIFEST_NAME = "manifest.json"


class BundleError(KeystepError, ValueError):
    """The bundle is missing, unreadable, corrupt or does not match its manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_dim(dim: str) -> tuple[int, str]:
    """A symbolic axis is a name ("batch", "height") or a multiple of one ("8*height") -> (factor, name)."""
    factor, sep, name = dim.partition("*")
    if not sep:
        return 1, dim
    if not factor.strip().isdigit() or not name.strip():
        raise ValueError(f"bad symbolic dim {dim!r}: expected NAME or INT*NAME")
    return int(factor), name.strip()


@dataclass(frozen=True)
class IOSpec:
    name: str
    dtype: str
    shape: tuple  # ints and symbolic axes ("batch", "height", "8*height")

    def concrete(self, sizes: int | dict[str, int]) -> tuple[int, ...]:
        """The shape with symbolic axes bound; an int binds "batch" only."""
        sizes = {"batch": sizes} if isinstance(sizes, int) else sizes
        out = []
        for d in self.shape:
            if isinstance(d, int):
                out.append(d)
            else:
                factor, name = parse_dim(d)
                out.append(factor * sizes[name])
        return tuple(out)


@dataclass(frozen=True)
class StageSpec:
    name: str
    path: Path  # the graph file (external data files, if any, sit next to it)
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    flops_per_sample: int | None
    flops_constant: int
    token_mlp_flops: tuple[int, ...] = ()  # per block, one token's MLP (DyDiT token selection)

    def flops(self, batch: int) -> int | None:
        """FLOPs of a call at ``batch`` rows (with token selection: as if every token ran its MLP)."""
        if self.flops_per_sample is None:
            return None
        return self.flops_per_sample * batch + self.flops_constant

    def actual_flops(self, batch: int, mlp_tokens) -> int | None:
        """FLOPs of a call whose blocks ran their MLPs on ``mlp_tokens`` tokens (the graph's own count)."""
        full = self.flops(batch)
        if full is None or not self.token_mlp_flops:
            return full
        tokens_per_block = batch * self._tokens
        return full - sum((tokens_per_block - int(n)) * f for n, f in zip(mlp_tokens, self.token_mlp_flops))

    @cached_property
    def _tokens(self) -> int:
        hidden = next(s for s in self.inputs + self.outputs if s.name == "hidden")
        return hidden.shape[1]


class Bundle:
    def __init__(self, root: Path, manifest: dict, stages: dict[str, StageSpec], spec: Manifest | None = None):
        self.root = root
        self.manifest = manifest  # the validated JSON, as written
        self.stages = stages
        self.spec = spec  # the same, typed (runtime/manifest.py)
        self.parts: dict[str, Bundle] = {}  # a cascade's diffusion stage bundles, in the order they run

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def model_config(self) -> dict:
        return self.manifest["model_config"]

    @property
    def scheduler_config(self) -> dict:
        return self.manifest["scheduler"] if "scheduler" in self.manifest else self._per_stage("scheduler")

    @property
    def pixel_space(self) -> bool:
        """The samples are images in [-1, 1] (no VAE): pixel-space UNets and DiTs such as the digits models.
        Bundles from before the field: a DiT without a VAE stage and with 1 or 3 channels."""
        flag = self.model_config.get("pixel_space")
        if flag is None and self.family == "dit":
            return "vae_decoder" not in self.stages and self.model_config["in_channels"] in (1, 3)
        return bool(flag)

    @property
    def default_plan(self) -> dict:
        return self.manifest["default_plan"] if "default_plan" in self.manifest else self._per_stage("plan")

    def _per_stage(self, what: str):
        """A cascade has no scheduler or plan of its own: each diffusion stage has them."""
        raise BundleError(f"{self.root} is a DeepFloyd-IF cascade: each diffusion stage has its own {what} (stages: "
                          f"{', '.join(self.parts)}); give {self.root}/<stage> to this command")

    @property
    def cache_variants(self) -> dict[str, dict]:
        """Feature-caching variants built into the bundle (name -> what it caches); empty if none."""
        return self.manifest.get("cache", {}).get("variants", {})

    @property
    def width(self) -> "WidthTable | None":
        """The width profiles of a DyDiT/calibrated bundle (None for dense bundles), loaded once."""
        section = self.manifest.get("width")
        if section is None:
            return None
        if not hasattr(self, "_width"):
            self._width = load_width_table(self, section)
        return self._width

    @classmethod
    def load(cls, root: str | Path, verify: bool = True) -> "Bundle":
        """Read and validate ``manifest.json`` (runtime/manifest.py's schema), then verify every file's sha256.
        Every problem is a BundleError naming the file and the field."""
        root = Path(root)
        manifest_path = root / MANIFEST_NAME
        if not root.is_dir():
            raise BundleError(f"bundle directory not found: {root}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise BundleError(f"{root} is not a bundle: {MANIFEST_NAME} is missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise BundleError(f"unreadable manifest {manifest_path}: {exc}") from None
        problem = check_version(manifest)
        if problem:
            raise BundleError(f"{manifest_path}: {problem}")
        try:
            spec = manifest_model(manifest).model_validate(manifest)
        except ValidationError as exc:
            raise BundleError(f"{manifest_path}: {first_error(exc)}") from None
        stages = {name: _stage_spec(root, name, entry) for name, entry in spec.stages.items()}
        bundle = cls(root, manifest, stages, spec)
        if verify:
            for name, entry in spec.stages.items():
                _verify_files(root, f"stage {name!r}", entry.files)
            for name, files in spec.assets.items():
                _verify_files(root, f"asset {name!r}", files)
        if bundle.family == "cascade":
            bundle.parts = {p.name: _cascade_part(bundle, p, verify) for p in spec.cascade}
        return bundle

    def stage(self, name: str) -> StageSpec:
        try:
            return self.stages[name]
        except KeyError:
            raise BundleError(f"bundle {self.root} has no stage {name!r} (has: {', '.join(self.stages)})") from None


def _cascade_part(cascade: Bundle, part, verify: bool) -> Bundle:
    """A cascade's diffusion stage: a complete ``if`` bundle in its sub-directory that fits the cascade."""
    stage = Bundle.load(cascade.root / part.name, verify=verify)
    where = f"{cascade.root / MANIFEST_NAME}: cascade stage {part.name!r}"
    if stage.family != "if":
        raise BundleError(f"{where} has family {stage.family!r}, not 'if'")
    if stage.model_config["if"]["role"] != part.role:
        raise BundleError(f"{where} is a {stage.model_config['if']['role']} stage, the cascade lists it as {part.role}")
    if stage.model_config["text_dim"] != cascade.model_config["text_dim"]:
        raise BundleError(f"{where} takes text of width {stage.model_config['text_dim']}, the cascade's T5 makes "
                          f"{cascade.model_config['text_dim']}")
    return stage


def load_width_table(bundle: Bundle, section: dict) -> WidthTable:
    path = bundle.root / section["masks"]
    try:
        masks = np.load(path, allow_pickle=False)
        heads = bundle.model_config["num_heads"]
        engines = [WidthEngine.from_manifest(e, heads) for e in section["engines"]]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise BundleError(f"bundle {bundle.root}: unreadable width profiles ({path.name}): {exc}") from None
    if masks.dtype != bool or masks.ndim != 4 or masks.shape[1:] != (bundle.model_config["depth"], 2, heads):
        raise BundleError(f"bundle {bundle.root}: {path.name} has shape {masks.shape}, not (timesteps, depth, 2, heads)")
    missing = [e.name for e in engines if e.name not in bundle.stages]
    if missing:
        raise BundleError(f"bundle {bundle.root}: width engines {missing} have no stage in the manifest")
    flops = {e.name: bundle.stage(e.name).flops(1) or 0 for e in engines}
    return WidthTable(masks, bundle.manifest["split"], engines, flops)


def _io(entries) -> tuple[IOSpec, ...]:
    return tuple(IOSpec(e.name, e.dtype, tuple(e.shape)) for e in entries)


def _stage_spec(root: Path, name: str, entry) -> StageSpec:
    return StageSpec(
        name=name,
        path=root / entry.files[0].path,
        inputs=_io(entry.inputs),
        outputs=_io(entry.outputs),
        flops_per_sample=entry.flops.per_sample,
        flops_constant=entry.flops.constant,
        token_mlp_flops=tuple(entry.flops.token_mlp),
    )


def _verify_files(root: Path, what: str, files) -> None:
    for f in files:
        path = root / f.path
        if not path.is_file():
            raise BundleError(f"{what}: file {path} is missing")
        if f.bytes is not None and path.stat().st_size != f.bytes:
            raise BundleError(f"{what}: {path} has {path.stat().st_size} bytes, the manifest says {f.bytes} "
                              f"(truncated or replaced)")
        if sha256_file(path) != f.sha256:
            raise BundleError(f"{what}: {path} does not match the manifest's sha256 (corrupt or replaced)")
