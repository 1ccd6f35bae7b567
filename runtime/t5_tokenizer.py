"""T5's SentencePiece (Unigram) tokenizer for DeepFloyd-IF bundles, run by the Rust ``tokenizers`` library (no torch,
no transformers, no sentencepiece at run time).

A bundle carries the ``tokenizer.json`` transformers writes for a ``T5Tokenizer`` (the build converts a
``spiece.model``-only folder once, with transformers). It holds the normalizer, the Metaspace pre-tokenizer, the
Unigram model and the post-processor that appends ``</s>``; this module adds what ``IFPipeline.encode_prompt``
asks of the tokenizer: ``padding="max_length", max_length=77, truncation=True`` (``</s>`` stays the last real token)
and the attention mask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .tokenizer import TokenizerError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError("T5 tokenization needs the `tokenizers` package (pip install tokenizers)") from None
    return tokenizers


class T5Tokenizer:
    """``encode(texts, max_length)`` -> (input_ids, attention_mask), int64 (len(texts), max_length)."""

    def __init__(self, tokenizer, pad_token: str, source: str = "tokenizer"):
        self._tokenizer = tokenizer
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise TokenizerError(f"{source}: the pad token {pad_token!r} is not in the vocabulary")
        self.pad_token, self.pad_token_id = pad_token, pad_id

    @classmethod
    def from_dir(cls, path: str | Path) -> "T5Tokenizer":
        root = Path(path)
        file = root / TOKENIZER_FILE
        if not file.is_file():
            raise TokenizerError(f"{file}: file not found (a T5 tokenizer folder saved by transformers)")
        try:
            tokenizer = _tokenizers().Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust library raises its own exception types
            raise TokenizerError(f"{file}: not a tokenizers file ({exc})") from None
        pad = "<pad>"
        config = root / CONFIG_FILE
        if config.is_file():
            try:
                value = json.loads(config.read_text()).get("pad_token", pad)
            except (OSError, json.JSONDecodeError) as exc:
                raise TokenizerError(f"{config}: unreadable ({exc})") from None
            pad = value["content"] if isinstance(value, dict) else (value or pad)
        return cls(tokenizer, pad, str(root))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, texts: Sequence[str] | str, max_length: int = 77) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        tokenizer = self._tokenizer
        tokenizer.enable_truncation(int(max_length))  # counts the post-processor's </s>
        tokenizer.enable_padding(length=int(max_length), pad_id=self.pad_token_id, pad_token=self.pad_token)
        encodings = tokenizer.encode_batch(list(texts), add_special_tokens=True)
        ids = np.array([e.ids for e in encodings], np.int64).reshape(len(texts), int(max_length))
        mask = np.array([e.attention_mask for e in encodings], np.int64).reshape(ids.shape)
        return ids, mask

    __call__ = encode
