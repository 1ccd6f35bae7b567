"""The tokenizer files a bundle carries: CLIP's BPE ``vocab.json`` + ``merges.txt``, which the runtime's pure-Python
tokenizer reads. transformers >= 5 saves only ``tokenizer.json``; its BPE model holds the same vocab and merges."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import ModelLoadError

BPE_FILES = ("vocab.json", "merges.txt")


def has_tokenizer(path: Path) -> bool:
    return all((path / f).is_file() for f in BPE_FILES) or (path / "tokenizer.json").is_file()


def tokenizer_asset(src: Path, scratch: Path) -> Path:
    """``src`` itself when it has the BPE files, else a copy in ``scratch`` with them written from tokenizer.json."""
    if all((src / f).is_file() for f in BPE_FILES):
        return src
    try:
        model = json.loads((src / "tokenizer.json").read_text())["model"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise ModelLoadError(f"{src}: no vocab.json/merges.txt and no readable tokenizer.json: {exc}") from exc
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
        raise ModelLoadError(f"{src}/tokenizer.json is not a CLIP BPE tokenizer (model {model.get('type')!r})")
    out = scratch / "tokenizer"
    shutil.copytree(src, out)
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return out
