"""keystep.runtime.tokenizer.ClipTokenizer against transformers' CLIPTokenizer on small home-made CLIP vocabularies.

No download: each tokenizer directory is written here in transformers' CLIPTokenizer save format (byte-level vocab:
the 256 byte characters, their ``</w>`` variants, merges learnt by a tiny BPE trainer on a fixed corpus, then
``<|startoftext|>``/``<|endoftext|>``), in the config styles real SD pipelines ship.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest

from keystep.runtime.tokenizer import ClipTokenizer, TokenizerError, bytes_to_unicode

CORPUS = """
a photo of a cat, the digit seven! a handwritten 7. it's a dog; don't stop. the the photograph of an astronaut
riding a horse on mars, highly detailed, 4k, trending on artstation. café résumé naïve über straße 東京 猫 写真
😀 🐱 👍🏽 photos digits sevens hand written cats dogs!! you're we've i'm we'll he'd they're
"""


def _train_merges(corpus: str, n_merges: int) -> list[tuple[str, str]]:
    """Greedy byte-level BPE on the lowercased whitespace-split corpus (most frequent pair, ties by symbol order)."""
    be = bytes_to_unicode()
    words: Counter = Counter()
    for w in corpus.lower().split():
        chars = [be[b] for b in w.encode("utf-8")]
        chars[-1] += "</w>"
        words[tuple(chars)] += 1
    merges = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        merged: Counter = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


MERGES = _train_merges(CORPUS, 160)


def _added(content: str, normalized: bool, special: bool | None = None, legacy: bool = False) -> dict:
    token = {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}
    if legacy:
        token = {"__type": "AddedToken", **token}
    if special is not None:
        token["special"] = special
    return token


def write_clip_tokenizer(path, style: str = "plain", pad_token: str = "<|endoftext|>", merges=None):
    """A CLIPTokenizer directory. Styles: ``plain`` (string special tokens), ``sd1`` (SD 1.x repos: AddedToken
    dicts with normalized=true; pad from special_tokens_map.json), ``decoder`` (transformers >= 4.34 saves, with
    ``added_tokens_decoder``)."""
    path.mkdir(parents=True, exist_ok=True)
    merges = MERGES if merges is None else merges
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    for a, b in merges:
        if a + b not in vocab_list:
            vocab_list.append(a + b)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True, "errors": "replace"}
    if style == "plain":
        specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "pad_token": pad_token}
        config.update(specials)
        special_map = specials
    elif style == "sd1":
        config.update(bos_token=_added("<|startoftext|>", True, legacy=True),
                      eos_token=_added("<|endoftext|>", True, legacy=True),
                      unk_token=_added("<|endoftext|>", True, legacy=True), pad_token="<|endoftext|>")
        special_map = {"bos_token": _added("<|startoftext|>", True), "eos_token": _added("<|endoftext|>", True),
                       "unk_token": _added("<|endoftext|>", True), "pad_token": pad_token}
    elif style == "decoder":
        decoder = {str(vocab["<|startoftext|>"]): _added("<|startoftext|>", True, special=True),
                   str(vocab["<|endoftext|>"]): _added("<|endoftext|>", False, special=True)}
        if pad_token not in ("<|startoftext|>", "<|endoftext|>"):
            decoder[str(vocab[pad_token])] = _added(pad_token, False, special=True)
        config.update(added_tokens_decoder=decoder, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                      unk_token="<|endoftext|>", pad_token=pad_token)
        special_map = {"bos_token": _added("<|startoftext|>", True), "eos_token": _added("<|endoftext|>", False),
                       "unk_token": _added("<|endoftext|>", False), "pad_token": _added(pad_token, False)}
    else:
        raise ValueError(style)
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")
    return path


LONG = " ".join(["a highly detailed photo of an astronaut riding a horse on mars, trending on artstation"] * 12)

PROMPTS = [
    "",
    " ",
    "a photo of a cat",
    "A Photo Of A CAT",
    "a handwritten 7",
    "the digit seven!!",
    "the digit seven!!!",
    "hello!!! world?! ... --- ;;",
    "1234567890 3.14 1,000,000 4k 8K 1920x1080",
    "it's", "don't", "IT'S", "DON'T", "you're we've i'm we'll he'd they'RE", "'s 'S ''s rock'n'roll", "'ſ",
    "café résumé naïve über straße",
    "cafe\u0301 re\u0301sume\u0301",  # decomposed accents: NFC composes them
    "ΣΟΦΙΑ ΟΔΟΣ Σ",
    "ЖЁЛТЫЙ кот",
    "東京の猫 写真 日本語",
    "猫猫猫 한국어 ひらがな カタカナ",
    "😀 🐱 👍🏽 ❤️ 🇫🇷",
    "👨‍👩‍👧 family",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "  lots   of\t\twhitespace \n\n and\r\nnewlines  ",
    "nbsp\xa0em\u2003ideographic\u3000space\u2028line",
    "control\x00\x01\x1fchars\ufffd\x7f",
    "ﬁ ﬂ ½ ² Ⅻ ٣ १ Ⓐ K Å İ ı",
    "<|startoftext|>a photo<|endoftext|>",
    "a<|endoftext|>b <|endoftext|><|endoftext|>",
    "<|ENDOFTEXT|> <|StartOfText|> <|endoftext <|> |>",
    "x!<|endoftext|>!y",
    "(masterpiece:1.2), [best quality], {ultra-detailed}, <lora:foo:0.8>, #hashtag @user $100 50%",
    "path/to\\file.png & \"quotes\" `ticks` ~tilde~ ^caret^ |pipe|",
    LONG,
    "word " * 80,
    "!" * 200,
]


def _transformers_reference(path, cls_name: str = "CLIPTokenizer"):
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, cls_name)
    return cls.from_pretrained(str(path), local_files_only=True)


def _reference_ids(ref, texts, max_length):
    # exactly how diffusers' StableDiffusionPipeline calls it (per prompt; batches give the same rows)
    return np.asarray(
        ref(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np").input_ids,
        dtype=np.int64,
    )


def _normalization_of(ref) -> str:
    """Which cleanup the reference implements: transformers 4's slow CLIPTokenizer without ftfy -> "basic"."""
    if getattr(ref, "is_fast", True):
        return "tokenizers"
    if getattr(ref, "fix_text", None) is not None:
        pytest.skip("transformers' slow CLIPTokenizer is using ftfy, which ClipTokenizer does not emulate")
    return "basic"


CONFIGS = [("plain", "<|endoftext|>"), ("plain", "!"), ("sd1", "<|endoftext|>"), ("sd1", "!"), ("decoder", "!"),
           ("decoder", "<|endoftext|>")]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-tokenizers")
    return {cfg: write_clip_tokenizer(root / f"{cfg[0]}-{'eot' if cfg[1] != '!' else 'bang'}", *cfg)
            for cfg in CONFIGS}


# transformers 5's CLIPTokenizer is the fast (tokenizers) implementation; transformers 4's slow one is covered by
# the "basic" normalization tests
@pytest.mark.parametrize("config", CONFIGS, ids=[f"{s}-pad{p}" for s, p in CONFIGS])
def test_matches_transformers(tokenizer_dirs, config):
    path = tokenizer_dirs[config]
    ref = _transformers_reference(path, "CLIPTokenizer")
    ours = ClipTokenizer.from_dir(path, normalization=_normalization_of(ref))
    assert ours.model_max_length == ref.model_max_length == 77
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    if config[1] == "!":
        assert ours.pad_token_id == 0  # SD 2.x convention: pad with "!" (id 0 in a CLIP vocab)
    else:
        assert ours.pad_token_id == ours.eos_token_id
    got = ours.encode(PROMPTS)
    want = _reference_ids(ref, PROMPTS, ref.model_max_length)
    assert got.dtype == np.int64 and got.shape == (len(PROMPTS), 77)
    for text, g, w in zip(PROMPTS, got, want):
        assert g.tolist() == w.tolist(), f"prompt {text!r}"
    for max_length in (2, 5, 16, 128):
        np.testing.assert_array_equal(ours.encode(PROMPTS, max_length=max_length),
                                      _reference_ids(ref, PROMPTS, max_length))


def test_random_strings_match_transformers(tokenizer_dirs):
    """Fuzz: random strings over an alphabet of tricky pieces (whitespace kinds, marks, specials, contractions)."""
    import random

    pieces = list("abcxyzABCXYZ0189!!''\".,;:-_()<>|/\\?*&#~`+=") + [" "] * 8 + [
        "\t", "\n", "\r", "\x0b", "\x0c", "\x85", "\xa0", "\u2003", "\u3000", "\u200b", "\u200d", "\ufeff", "\x00",
        "\ufffd", "\x1c", "\u2028", "é", "É", "ß", "ẞ", "ſ", "σ", "Σ", "ς", "Ж", "東", "京", "猫", "한", "ひ", "カ",
        "\u0301", "\u0308", "\u0345", "\u0338", "😀", "👍🏽", "‍", "️", "Ⅻ", "½", "١", "ﬁ", "ǅ", "K", "İ",
        "<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "'s", "'S", "'t", "'re", "'VE", "'m", "'ll", "'D", "'ſ",
        "photo", "the", "digit", "seven", "hand", "written",
    ]
    rng = random.Random(1234)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, rng.choice((4, 16, 48))))) for _ in range(400)]
    for config in (("sd1", "<|endoftext|>"), ("decoder", "!")):
        ref = _transformers_reference(tokenizer_dirs[config])
        ours = ClipTokenizer.from_dir(tokenizer_dirs[config], normalization=_normalization_of(ref))
        got, want = ours.encode(texts), _reference_ids(ref, texts, 77)
        bad = [t for t, g, w in zip(texts, got, want) if g.tolist() != w.tolist()]
        assert not bad, f"{len(bad)} mismatches, e.g. {bad[:3]!r}"


def test_truncation_keeps_eos_and_padding(tokenizer_dirs):
    tok = ClipTokenizer.from_dir(tokenizer_dirs[("plain", "!")])
    ids = tok.encode([LONG, "a cat", ""])
    assert ids.shape == (3, 77)
    assert ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id
    assert tok.pad_token_id not in ids[0].tolist()
    assert ids[0, 1:-1].tolist() == tok.token_ids(LONG)[:75]
    n = len(tok.token_ids("a cat"))
    assert ids[1, n + 1] == tok.eos_token_id and (ids[1, n + 2:] == tok.pad_token_id).all()
    assert ids[2, :2].tolist() == [tok.bos_token_id, tok.eos_token_id] and (ids[2, 2:] == 0).all()
    assert tok.encode("a cat").tolist() == ids[1:2].tolist()  # a single string is one row
    assert tok.encode([]).shape == (0, 77)
    assert tok.encode(["a cat"], max_length=2).tolist() == [[tok.bos_token_id, tok.eos_token_id]]
    with pytest.raises(ValueError):
        tok.encode(["a cat"], max_length=1)
    with pytest.raises(TypeError):
        tok.encode([b"bytes"])


def test_basic_normalization_differences(tokenizer_dirs):
    """normalization="basic" = transformers 4's slow CLIPTokenizer without ftfy (checked against it outside this
    suite): format/control characters are dropped, CJK ideographs become separate words, str.lower's final sigma,
    any-case special-token literals."""
    path = tokenizer_dirs[("plain", "<|endoftext|>")]
    fast, basic = ClipTokenizer.from_dir(path), ClipTokenizer.from_dir(path, normalization="basic")
    pairs = [
        ("👨\u200d👩\u200d👧 a\x00b\ufffdc\u200bd", "👨👩👧 abcd"),
        ("東京の猫", "東 京 の 猫"),
        ("ΟΔΟΣ", "οδος"),
        ("x <|ENDOFTEXT|> y", "x <|endoftext|> y"),
        ("a\u0345b", "a b"),
        ("a photo of A CAT, it's 7!!", "a photo of a cat, it's 7!!"),
    ]
    for basic_text, fast_text in pairs:
        assert basic.token_ids(basic_text) == fast.token_ids(fast_text), basic_text
    # CLIP's pattern is compiled with IGNORECASE there: "'ſ" (long s) is a contraction, i.e. a single BPE word
    long_s = "".join(bytes_to_unicode()[b] for b in "'ſ".encode())
    assert basic.token_ids("it'ſ") == basic.token_ids("it") + list(basic._bpe(long_s))
    assert fast.token_ids("it'ſ") == fast.token_ids("it'") + fast.token_ids("ſ")
    assert basic.token_ids("ΟΔΟΣ") != fast.token_ids("ΟΔΟΣ")
    assert basic.token_ids("東京") != fast.token_ids("東京")
    with pytest.raises(ValueError):
        ClipTokenizer.from_dir(path, normalization="ftfy")


def test_sd2_pad_from_special_tokens_map(tmp_path):
    """SD 2.x repos say pad "<|endoftext|>" in tokenizer_config.json but "!" in special_tokens_map.json: the map wins
    (no added_tokens_decoder), and "!" is then split out as a token of its own, as transformers does."""
    path = write_clip_tokenizer(tmp_path / "tok", "sd1", "!")
    tok = ClipTokenizer.from_dir(path)
    assert tok.pad_token_id == 0
    assert tok.token_ids("wow!!") == tok.token_ids("wow") + [0, 0]


def _corrupt(tmp_path, name, content):
    path = write_clip_tokenizer(tmp_path / "tok")
    if content is None:
        (path / name).unlink()
    else:
        (path / name).write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("vocab.json", None, "vocab.json"),
        ("merges.txt", None, "merges.txt"),
        ("vocab.json", "{not json", "vocab.json"),
        ("vocab.json", "[1, 2]", "vocab.json"),
        ("vocab.json", '{"a": "x"}', "vocab.json"),
        ("merges.txt", "#version: 0.2\na b c\n", "merges.txt:2"),
        ("merges.txt", "#version: 0.2\nzz qq\n", "merges.txt:2"),
        ("tokenizer_config.json", "{", "tokenizer_config.json"),
        ("tokenizer_config.json", '{"model_max_length": "77"}', "tokenizer_config.json"),
        ("special_tokens_map.json", '{"pad_token": "<|nope|>"}', "special_tokens_map.json: pad_token"),
        ("special_tokens_map.json", '{"bos_token": 5}', "special_tokens_map.json"),
        ("special_tokens_map.json", "[]", "special_tokens_map.json"),
    ],
)
def test_bad_files_raise_tokenizer_error(tmp_path, name, content, needle):
    with pytest.raises(TokenizerError, match=needle.replace(".", r"\.")) as info:
        ClipTokenizer.from_dir(_corrupt(tmp_path, name, content))
    assert isinstance(info.value, ValueError)


def test_missing_directory_and_optional_configs(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        ClipTokenizer.from_dir(tmp_path / "nope")
    path = write_clip_tokenizer(tmp_path / "tok")
    (path / "tokenizer_config.json").unlink()
    (path / "special_tokens_map.json").unlink()
    tok = ClipTokenizer.from_dir(path)  # CLIPTokenizer defaults, but no length limit without the config
    assert tok.model_max_length is None and tok.pad_token_id == tok.eos_token_id
    with pytest.raises(ValueError, match="max_length"):
        tok.encode(["a"])
    assert tok.encode(["a"], max_length=4).shape == (1, 4)


def test_no_heavy_imports(tokenizer_dirs):
    """The runtime tokenizer needs neither torch/transformers/tokenizers nor the third-party regex/ftfy modules."""
    path = tokenizer_dirs[("sd1", "!")]
    script = textwrap.dedent(
        f"""
        import sys
        BLOCKED = ("torch", "diffusers", "transformers", "tokenizers", "regex", "ftfy")
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("blocked for this test: " + name)
        sys.meta_path.insert(0, Block())
        from keystep.runtime.tokenizer import ClipTokenizer
        ids = ClipTokenizer.from_dir({str(path)!r}).encode(["a photo of a cat!", "東京 😀"])
        assert ids.shape == (2, 77), ids.shape
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("OK")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout


def test_bundle_tokenizer_asset_from_tokenizer_json(tmp_path):
    """transformers 5 saves only tokenizer.json; the build writes vocab.json/merges.txt from it for the runtime."""
    transformers = pytest.importorskip("transformers")
    from keystep.export.tokenizer_asset import tokenizer_asset

    src = tmp_path / "src"
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    merges = [("h", "a</w>"), ("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (tmp_path / "v.json").write_text(json.dumps(vocab))
    (tmp_path / "m.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    reference = transformers.CLIPTokenizer(str(tmp_path / "v.json"), str(tmp_path / "m.txt"), model_max_length=77)
    reference.save_pretrained(src)
    for name in ("vocab.json", "merges.txt"):
        (src / name).unlink(missing_ok=True)
    assert (src / "tokenizer.json").is_file()
    ours = ClipTokenizer.from_dir(tokenizer_asset(src, tmp_path))
    prompts = ["the digit seven", "ha ha THE", "", "a handwritten 7!"]
    want = reference(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(ours.encode(prompts), np.asarray(want))
