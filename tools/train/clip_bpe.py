"""Train a small byte-level BPE tokenizer in CLIP's format from a text corpus and save it as a transformers
``CLIPTokenizer`` directory (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``).

The vocabulary is laid out like CLIP's: the 256 byte characters, the same with the ``</w>`` word ending, one entry per
merge, then ``<|startoftext|>`` and ``<|endoftext|>``. Words are CLIP's pre-tokens (lowercased; every digit its own
pre-token), so keystep's runtime tokenizer and transformers' ``CLIPTokenizer`` split the corpus the same way.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

from keystep.runtime.tokenizer import bytes_to_unicode, byte_level_pre_tokens

END_OF_WORD = "</w>"
STARTOFTEXT, ENDOFTEXT = "<|startoftext|>", "<|endoftext|>"


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_merges(texts: Iterable[str], max_merges: int = 1000) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent symbol pair (ties: the smallest pair), until every
    word is one symbol or ``max_merges`` merges are made."""
    words: Counter = Counter()
    for text in texts:
        for piece in byte_level_pre_tokens(text):
            words[tuple(piece[:-1]) + (piece[-1] + END_OF_WORD,)] += 1
    merges = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        words = Counter({_merge_pair(word, best): count for word, count in words.items()})
    return merges


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += [STARTOFTEXT, ENDOFTEXT]
    return {t: i for i, t in enumerate(tokens)}


def save_clip_tokenizer(path: Path, merges: list[tuple[str, str]], model_max_length: int) -> dict[str, int]:
    """Write the tokenizer directory (SD 1.x conventions: pad with ``<|endoftext|>``); returns the vocabulary."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocab(merges)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    specials = {"bos_token": STARTOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT, "pad_token": ENDOFTEXT}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True,
              "errors": "replace", **specials}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return vocab
