"""CLIP BPE tokenizer for Stable-Diffusion-style bundles, in pure Python (stdlib + numpy).

Reads a tokenizer directory in transformers' ``CLIPTokenizer`` save format (``vocab.json``, ``merges.txt``,
``tokenizer_config.json``, ``special_tokens_map.json``, i.e. what a diffusers SD ``tokenizer/`` folder holds)
and produces the ``input_ids`` that diffusers' ``StableDiffusionPipeline`` feeds its text encoder::

    tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
              truncation=True, return_tensors="pt").input_ids

Two text-cleanup conventions are implemented (``normalization=``):

``"tokenizers"`` (default)
    transformers 5's ``CLIPTokenizer`` (backed by the Rust *tokenizers* library; identical to ``CLIPTokenizerFast``
    in transformers 4): added/special tokens are split out first, then NFC, every whitespace run -> one space,
    per-character lowercasing, CLIP's pre-tokenizer regex, byte-level mapping, BPE with the ``</w>`` suffix.
``"basic"``
    transformers 4's slow Python ``CLIPTokenizer`` when ``ftfy`` is not installed (its ``BasicTokenizer`` fallback):
    control characters, NUL and U+FFFD are dropped, CJK ideographs get spaces around them, NFC, whitespace split,
    ``str.lower`` per word, then the same regex/byte-level/BPE steps.

The two differ only on unusual input (control/format characters such as zero-width joiners inside emoji
sequences, CJK ideograph runs, Greek final sigma, special-token literals typed in other case).

Nothing here imports torch/transformers/tokenizers or the third-party ``regex`` module: CLIP's pattern
``<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`` is run by a
small scanner using :mod:`unicodedata` categories (L* = letters, N* = numbers) and the Unicode ``White_Space`` set.
Characters that this Python's Unicode database does not know yet (category Cn; 3.11 ships Unicode 14) may be classed
differently than by the newer Unicode tables of the Rust tokenizers library; every assigned character matches.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import KeystepError

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

NORMALIZATIONS = ("tokenizers", "basic")

# transformers' "no limit" model_max_length (VERY_LARGE_INTEGER = int(1e30)); anything this big means "unset".
_UNSET_MAX_LENGTH = int(1e29)

# Special-token attributes in the order transformers registers them (the last registration of a given string wins
# when they disagree on the "normalized" flag).
_SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_EXTRA_SPECIAL_KEYS = ("additional_special_tokens", "extra_special_tokens")

_STARTOFTEXT = "<|startoftext|>"
_ENDOFTEXT = "<|endoftext|>"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_LITERALS = (_STARTOFTEXT, _ENDOFTEXT) + _CONTRACTIONS
_END_OF_WORD = "</w>"

# Unicode White_Space property (what \s means for the regex engines transformers/tokenizers use).
_WHITE_SPACE = frozenset(
    [chr(c) for c in range(0x09, 0x0E)]
    + [" ", "\x85", "\xa0", "\u1680"]
    + [chr(c) for c in range(0x2000, 0x200B)]
    + ["\u2028", "\u2029", "\u202f", "\u205f", "\u3000"]
)
_WHITESPACE_RUN = re.compile("[" + "".join(sorted(_WHITE_SPACE)).replace("\\", "\\\\") + "]+")


class TokenizerError(KeystepError, ValueError):
    """A tokenizer file is missing, unreadable or inconsistent (the message names the file)."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level mapping: every byte -> a printable unicode character (no whitespace/control)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# ---------------------------------------------------------------------------------------------------------------------
# Character classes


@lru_cache(maxsize=4096)
def _char_class(ch: str) -> str:
    """'L' (\\p{L}), 'N' (\\p{N}), 'S' (\\s) or 'P' (anything else)."""
    if ch in _WHITE_SPACE:
        return "S"
    cat = unicodedata.category(ch)
    if cat[0] == "L":
        return "L"
    if cat[0] == "N":
        return "N"
    return "P"


def _char_class_ignore_case(ch: str) -> str:
    return "S" if ch == "\u0345" else _char_class(ch)


def _fold_basic(ch: str) -> str:
    # The slow tokenizer compiles CLIP's pattern with re.IGNORECASE (simple case folding); after lowercasing the only
    # character that still folds onto a pattern letter is LATIN SMALL LETTER LONG S.
    return "s" if ch == "\u017f" else ch.lower()


def _match_literal(text: str, i: int, literal: str, ignore_case: bool) -> bool:
    n = len(literal)
    if i + n > len(text):
        return False
    chunk = text[i : i + n]
    if chunk == literal:
        return True
    return ignore_case and "".join(_fold_basic(c) for c in chunk) == literal


def _clip_pretokenize(text: str, ignore_case: bool) -> list[str]:
    """``findall`` of CLIP's pattern (see the module docstring) over ``text``.

    ``ignore_case`` reproduces the slow tokenizer's ``regex.IGNORECASE`` compile: besides case-insensitive literals,
    U+0345 COMBINING GREEK YPOGEGRAMMENI (Mn, but case-equivalent to the letter iota) then matches no alternative at
    all, so it is skipped like whitespace.
    """
    class_of = _char_class_ignore_case if ignore_case else _char_class
    pieces = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "<'":  # the pattern's literal alternatives, tried in order
            size = next((len(lit) for lit in _LITERALS if _match_literal(text, i, lit, ignore_case)), 0)
            if size:
                pieces.append(text[i : i + size])
                i += size
                continue
        cls = class_of(ch)
        if cls == "S":
            i += 1
            continue
        if cls == "N":
            pieces.append(ch)
            i += 1
            continue
        j = i + 1
        while j < n and class_of(text[j]) == cls:
            j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


# ---------------------------------------------------------------------------------------------------------------------
# Text cleanup


def _is_cjk_ideograph(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def _basic_clean(text: str) -> str:
    """transformers' ``BasicTokenizer(strip_accents=False, do_split_on_punc=False).tokenize``, joined by spaces."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD:
            continue
        cat = unicodedata.category(ch)
        if ch not in "\t\n\r" and cat[0] == "C":  # transformers' _is_control: Cc, Cf, Cn (unassigned), Co, Cs
            continue
        if ch in " \t\n\r" or cat == "Zs":
            out.append(" ")
        elif _is_cjk_ideograph(cp):
            out.append(" " + ch + " ")
        else:
            out.append(ch)
    words = unicodedata.normalize("NFC", "".join(out)).split()
    return " ".join(w.lower() for w in words)


def _tokenizers_normalize(text: str) -> str:
    """tokenizers' ``Sequence([NFC(), Replace(Regex(r"\\s+"), " "), Lowercase()])`` (per-character lowercase)."""
    text = _WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(ch.lower() for ch in text)


def byte_level_pre_tokens(text: str) -> list[str]:
    """The byte-level-mapped pre-tokens BPE runs on, as the default ("tokenizers") cleanup produces them (without
    the added-token split): what a CLIP BPE vocabulary is trained on (keystep.tools.train.clip_bpe)."""
    encoder = bytes_to_unicode()
    return ["".join(encoder[b] for b in piece.encode("utf-8"))
            for piece in _clip_pretokenize(_tokenizers_normalize(text), False)]


# ---------------------------------------------------------------------------------------------------------------------
# Added (special) tokens


@dataclass(frozen=True)
class AddedToken:
    """A string matched in the raw (``normalized=False``) or normalized text before BPE, mapped to one id."""

    content: str
    normalized: bool = False
    special: bool = True


def _split_on(text: str, pattern: re.Pattern | None) -> list[tuple[bool, str]]:
    """Leftmost-longest split of ``text`` on the added tokens in ``pattern``: [(is_added_token, piece), ...]."""
    if pattern is None or not text:
        return [(False, text)] if text else []
    parts: list[tuple[bool, str]] = []
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            parts.append((False, text[pos : m.start()]))
        parts.append((True, m.group()))
        pos = m.end()
    if pos < len(text):
        parts.append((False, text[pos:]))
    return parts


def _alternation(contents: Iterable[str]) -> re.Pattern | None:
    contents = sorted({c for c in contents if c}, key=lambda c: (-len(c), c))  # longest first = leftmost-longest
    return re.compile("|".join(re.escape(c) for c in contents)) if contents else None


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer


class ClipTokenizer:
    """CLIP byte-level BPE tokenizer producing transformers-identical ``input_ids`` (see the module docstring).

    ``encode(texts, max_length=None)`` -> int64 array (len(texts), max_length): ``[bos] + ids + [eos]``, truncated
    so that eos stays the last real token, right-padded with the pad token id.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = _STARTOFTEXT,
        eos_token: str = _ENDOFTEXT,
        pad_token: str = _ENDOFTEXT,
        unk_token: str = _ENDOFTEXT,
        model_max_length: int | None = 77,
        added_tokens: Sequence[AddedToken] = (),
        added_token_ids: dict[str, int] | None = None,
        normalization: str = "tokenizers",
        source: str = "vocab",
    ):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.normalization = normalization
        self.encoder = dict(vocab)
        self.bpe_ranks: dict[tuple[str, str], int] = {}
        for rank, pair in enumerate(merges):
            self.bpe_ranks.setdefault(tuple(pair), rank)
        self.model_max_length = model_max_length
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token

        # Added tokens: every special token plus any extra ones, in registration order (the last registration of a
        # string decides its "normalized" flag); added_token_ids gives ids for strings that are not in the vocabulary
        # (tokenizer_config.json's added_tokens_decoder).
        explicit_ids = dict(added_token_ids or {})
        flags: dict[str, bool] = {}
        for tok in added_tokens:
            flags[tok.content] = tok.normalized
        for content in (bos_token, eos_token, unk_token, pad_token):
            flags.setdefault(content, False)
        self.added_tokens = {c: AddedToken(c, normalized=n) for c, n in flags.items()}
        self._added_ids: dict[str, int] = {}
        for content in self.added_tokens:
            if content in self.encoder:
                self._added_ids[content] = self.encoder[content]
            elif content in explicit_ids:
                self._added_ids[content] = explicit_ids[content]
            else:
                raise TokenizerError(f"{source}: special/added token {content!r} has no id in the vocabulary")
        self.bos_token_id = self._added_ids[bos_token]
        self.eos_token_id = self._added_ids[eos_token]
        self.pad_token_id = self._added_ids[pad_token]
        self.unk_token_id = self._added_ids[unk_token]

        if normalization == "tokenizers":
            self._raw_pattern = _alternation(c for c, t in self.added_tokens.items() if not t.normalized)
            # normalized tokens are matched in the normalized text, against their normalized form
            self._normalized_ids = {
                _tokenizers_normalize(c): self._added_ids[c] for c, t in self.added_tokens.items() if t.normalized
            }
            self._normalized_pattern = _alternation(self._normalized_ids)
        else:  # the slow tokenizer matches every added token verbatim in the raw text
            self._raw_pattern = _alternation(self.added_tokens)
            self._normalized_ids = {}
            self._normalized_pattern = None
        self.byte_encoder = bytes_to_unicode()
        self._cache: dict[str, tuple[int, ...]] = {}

    # -- loading --------------------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path, *, normalization: str = "tokenizers") -> "ClipTokenizer":
        """Load a transformers ``CLIPTokenizer`` save directory (a diffusers pipeline's ``tokenizer/`` folder)."""
        root = Path(path)
        if not root.is_dir():
            raise TokenizerError(f"{root}: tokenizer directory not found")
        vocab = _read_vocab(root / VOCAB_FILE)
        merges = _read_merges(root / MERGES_FILE, vocab)
        config = _read_json_object(root / CONFIG_FILE, required=False)
        special_map = _read_json_object(root / SPECIAL_TOKENS_MAP_FILE, required=False)
        specials, added, explicit_ids, origins = _resolve_special_tokens(config, special_map, root)
        for token in added:
            if token.content not in vocab and token.content not in explicit_ids:
                where = origins.get(token.content, str(root / CONFIG_FILE))
                raise TokenizerError(f"{where}: token {token.content!r} is not in {VOCAB_FILE} and has no id")
        mml = config.get("model_max_length")
        if mml is not None and (isinstance(mml, bool) or not isinstance(mml, (int, float)) or mml < 2):
            raise TokenizerError(f"{root / CONFIG_FILE}: model_max_length must be an integer >= 2, got {mml!r}")
        model_max_length = None if mml is None or mml >= _UNSET_MAX_LENGTH else int(mml)
        return cls(
            vocab,
            merges,
            bos_token=specials["bos_token"],
            eos_token=specials["eos_token"],
            pad_token=specials["pad_token"],
            unk_token=specials["unk_token"],
            model_max_length=model_max_length,
            added_tokens=added,
            added_token_ids=explicit_ids,
            normalization=normalization,
            source=str(root),
        )

    # -- tokenization ---------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Byte-level-mapped pre-token -> ids (CLIP BPE with the end-of-word suffix on the last symbol)."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        symbols = list(word[:-1]) + [word[-1] + _END_OF_WORD]
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        unk = self.unk_token_id
        ids = tuple(self.encoder.get(s, unk) for s in symbols)
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def _encode_piece(self, piece: str) -> list[int]:
        """One CLIP pre-token (already cleaned/lowercased) -> ids."""
        if piece in (_STARTOFTEXT, _ENDOFTEXT):
            if self.normalization == "basic":  # the slow tokenizer's BPE cache maps these to themselves
                return [self.encoder.get(piece, self.unk_token_id)]
            # tokenizers' ByteLevel pre-tokenizer re-splits with GPT-2's pattern: "<|", "endoftext", "|>"
            return [i for part in ("<|", piece[2:-2], "|>") for i in self._encode_piece(part)]
        return list(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))

    def _encode_text(self, text: str) -> list[int]:
        if self.normalization == "basic":
            return [i for p in _clip_pretokenize(_basic_clean(text), True) for i in self._encode_piece(p)]
        ids = []
        for is_added, chunk in _split_on(_tokenizers_normalize(text), self._normalized_pattern):
            if is_added:
                ids.append(self._normalized_ids[chunk])
            else:
                ids.extend(i for p in _clip_pretokenize(chunk, False) for i in self._encode_piece(p))
        return ids

    def token_ids(self, text: str) -> list[int]:
        """Ids of ``text`` without bos/eos, padding or truncation."""
        ids: list[int] = []
        for is_added, chunk in _split_on(text, self._raw_pattern):
            if is_added:
                ids.append(self._added_ids[chunk])
            else:
                ids.extend(self._encode_text(chunk))
        return ids

    def encode(self, texts: Sequence[str] | str, max_length: int | None = None) -> np.ndarray:
        """``[bos] + ids[: max_length - 2] + [eos]`` right-padded with the pad id: int64 (len(texts), max_length).

        ``max_length`` defaults to ``model_max_length`` (77 for SD). A single string is treated as ``[text]``.
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_length is None:
            max_length = self.model_max_length
            if max_length is None:
                raise ValueError("this tokenizer has no model_max_length: pass max_length")
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2 (room for bos and eos), got {max_length!r}")
        out = np.full((len(texts), int(max_length)), self.pad_token_id, dtype=np.int64)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] is {type(text).__name__}, expected str")
            ids = [self.bos_token_id] + self.token_ids(text)[: max_length - 2] + [self.eos_token_id]
            out[row, : len(ids)] = ids
        return out

    __call__ = encode


# ---------------------------------------------------------------------------------------------------------------------
# File reading


def _read_text(path: Path, required: bool = True) -> str | None:
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path}: file not found")
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read ({e})") from e


def _read_json_object(path: Path, required: bool = True) -> dict:
    text = _read_text(path, required)
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = _read_json_object(path)
    if not vocab:
        raise TokenizerError(f"{path}: empty vocabulary")
    for token, idx in vocab.items():
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise TokenizerError(f"{path}: id of {token!r} is {idx!r}, expected a non-negative integer")
    return vocab


def _read_merges(path: Path, vocab: dict[str, int]) -> list[tuple[str, str]]:
    merges = []
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.rstrip("\r")
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"{path}:{lineno}: expected two space-separated symbols, got {line!r}")
        for sym in (*parts, parts[0] + parts[1]):
            if sym not in vocab:
                raise TokenizerError(f"{path}:{lineno}: {sym!r} is not in {VOCAB_FILE}")
        merges.append((parts[0], parts[1]))
    return merges


def _as_added_token(value, where: str, special_default: bool) -> AddedToken:
    """A config value (a string, or an AddedToken dict) -> AddedToken. Strings are special, not normalized."""
    if isinstance(value, str):
        return AddedToken(value, normalized=False, special=True)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        special = bool(value.get("special", special_default))
        return AddedToken(value["content"], normalized=bool(value.get("normalized", not special)), special=special)
    raise TokenizerError(f"{where}: expected a token string or AddedToken object, got {value!r}")


def _resolve_special_tokens(config: dict, special_map: dict, root: Path):
    """Special/added tokens as transformers resolves them when loading a CLIPTokenizer directory.

    With ``added_tokens_decoder`` in tokenizer_config.json (transformers >= 4.34 saves), it defines the tokens and
    special_tokens_map.json is ignored; otherwise special_tokens_map.json overrides tokenizer_config.json. The last
    registration of a string (decoder entries by id, then bos, eos, unk, sep, pad, cls, mask, then extras) decides
    whether it is matched in the normalized (lowercased) text or verbatim.
    Returns ({attr: content}, [AddedToken, ...] in registration order, {content: explicit id},
    {content: "file: key" it came from}).
    """
    cfg_path, map_path = root / CONFIG_FILE, root / SPECIAL_TOKENS_MAP_FILE
    values: dict[str, tuple[object, str]] = {k: (config[k], str(cfg_path)) for k in config if k in _SPECIAL_ATTRIBUTES}
    extras: list[tuple[object, str]] = []
    for key in _EXTRA_SPECIAL_KEYS:
        if isinstance(config.get(key), list):
            extras += [(v, str(cfg_path)) for v in config[key]]
    decoder: dict[int, AddedToken] = {}
    if "added_tokens_decoder" in config:
        raw = config["added_tokens_decoder"]
        if not isinstance(raw, dict):
            raise TokenizerError(f"{cfg_path}: added_tokens_decoder must be an object")
        for idx, value in raw.items():
            try:
                decoder[int(idx)] = _as_added_token(value, f"{cfg_path}: added_tokens_decoder[{idx}]", False)
            except ValueError as e:
                if isinstance(e, TokenizerError):
                    raise
                raise TokenizerError(f"{cfg_path}: added_tokens_decoder key {idx!r} is not an integer") from e
    else:
        for key, value in special_map.items():
            if key in _SPECIAL_ATTRIBUTES:
                values[key] = (value, str(map_path))
            elif key in _EXTRA_SPECIAL_KEYS and isinstance(value, list):
                extras += [(v, str(map_path)) for v in value]
    by_content = {t.content: t for t in decoder.values()}
    order: list[AddedToken] = [decoder[i] for i in sorted(decoder)]
    origins = {t.content: f"{cfg_path}: added_tokens_decoder" for t in order}
    specials = {"bos_token": _STARTOFTEXT, "eos_token": _ENDOFTEXT, "unk_token": _ENDOFTEXT, "pad_token": _ENDOFTEXT}
    for key in _SPECIAL_ATTRIBUTES:
        if key not in values or values[key][0] is None:
            if key in specials:  # CLIPTokenizer's defaults are registered as plain strings
                order.append(AddedToken(specials[key]))
            continue
        value, where = values[key]
        tok = _as_added_token(value, f"{where}: {key}", True)
        tok = by_content.get(tok.content, tok)
        origins.setdefault(tok.content, f"{where}: {key}")
        if key in specials:
            specials[key] = tok.content
        order.append(tok)
    for value, where in extras:
        order.append(_as_added_token(value, f"{where}: extra special token", True))
        origins.setdefault(order[-1].content, f"{where}: extra special token")
    return specials, order, {t.content: i for i, t in decoder.items()}, origins
