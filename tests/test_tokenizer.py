"""Tests for llama_vision.tokenizer: the Llama 3 tiktoken tokenizer, the SentencePiece
tokenizer and load_tokenizer.

The reference for ids is a tiktoken.Encoding built here, independently of the package:
ranks read by tiktoken's own loader, the pre-tokenisation regex and special-token table
written out below, and a literal copy of Meta's chunking loop.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_vision.tokenizer import (
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)
from llama_vision.tokenizer.tiktoken_tokenizer import split_whitespaces_or_nonwhitespaces

TOKENIZER_PATH = Path(__file__).resolve().parents[1].parent / "shared/reference/tokenizer.model"
needs_llama3 = pytest.mark.skipif(
    not TOKENIZER_PATH.is_file(),
    reason=f"the real Llama 3 tokenizer file is not available at {TOKENIZER_PATH}",
)

# Written out independently of the package (Meta's values).
REF_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
REF_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
    "<|python_tag|>", "<|image|>",
]  # fmt: skip


def meta_split(s: str, max_len: int):
    """Literal copy of Meta's ``Tokenizer._split_whitespaces_or_nonwhitespaces``."""
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if len(s) > 0 else False
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


def meta_chunked_encode(enc: tiktoken.Encoding, s: str) -> list[int]:
    """Meta's encode loop (400k-char chunks, 25k runs) over the reference encoding."""
    out = []
    for i in range(0, len(s), 400_000):
        for sub in meta_split(s[i : i + 400_000], 25_000):
            out += enc.encode(sub, allowed_special=set(), disallowed_special=())
    return out


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    if not TOKENIZER_PATH.is_file():
        pytest.skip(f"the real Llama 3 tokenizer file is not available at {TOKENIZER_PATH}")
    return Tokenizer(TOKENIZER_PATH)


@pytest.fixture(scope="module")
def ref_enc() -> tiktoken.Encoding:
    if not TOKENIZER_PATH.is_file():
        pytest.skip(f"the real Llama 3 tokenizer file is not available at {TOKENIZER_PATH}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file itself, no path-keyed cache
        ranks = tiktoken.load.load_tiktoken_bpe(str(TOKENIZER_PATH))
    names = REF_NAMED_SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - 12)]
    specials = {name: len(ranks) + k for k, name in enumerate(names)}
    return tiktoken.Encoding(name="ref", pat_str=REF_PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


# ---------------------------------------------------------------- (a) ids vs reference
SAMPLES = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 12345 o'clock, isn't it?",
    "  leading and trailing spaces   ",
    "tabs\tand\nnew\r\nlines\n\n\n",
    "whitespace runs:" + " " * 100 + "\n" * 50 + "\t" * 30 + "end",
    "naïve café résumé Ångström",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "中文字符测试，日本語のテキスト、한국어 텍스트",
    "Ελληνικά русский עברית العربية हिन्दी",
    "code: def f(x):\n    return x**2  # comment\n",
    "numbers 1 12 123 1234 12345678901234567890 3.14159",
    "<|begin_of_text|><|eot_id|><|image|> not special by default",
    "\u00a0\u2003\u3000 unicode spaces \u200b zero width",
]


@needs_llama3
@pytest.mark.parametrize("text", SAMPLES)
def test_ids_match_independent_tiktoken(tok, ref_enc, text):
    assert tok.encode(text, bos=False, eos=False) == ref_enc.encode(text, disallowed_special=())


@needs_llama3
def test_known_ids(tok):
    # Well-known Llama 3 ids: "Hello" = 9906, " world" = 1917.
    assert tok.encode("Hello world", bos=True, eos=True) == [128000, 9906, 1917, 128001]


@needs_llama3
def test_long_text_over_400k_chars(tok, ref_enc):
    # 500k chars; the 400k chunk border falls after "\n", a natural pre-token border,
    # so Meta's chunked ids equal unchunked ones too.
    text = "abcd efgh\n" * 50_000
    ids = tok.encode(text, bos=False, eos=False)
    assert ids == meta_chunked_encode(ref_enc, text)
    assert ids == ref_enc.encode(text)
    assert tok.decode(ids) == text


@needs_llama3
def test_long_runs_split_like_meta(tok, ref_enc):
    # Runs longer than 25k characters, and a chunk border inside a word, exercise both
    # of Meta's cuts: ids must equal Meta's chunked encoding exactly.
    text = "x" * 60_001 + " " * 30_000 + "word " * 70_000 + "\n" * 26_000 + "tail"
    ids = tok.encode(text, bos=False, eos=False)
    assert len(text) > 400_000
    assert ids == meta_chunked_encode(ref_enc, text)
    assert tok.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(" \t\n\u3000ab\u00e9"), max_size=40),
    max_len=st.integers(min_value=1, max_value=6),
)
def test_fast_split_equals_meta_loop(text, max_len):
    assert list(split_whitespaces_or_nonwhitespaces(text, max_len)) == list(meta_split(text, max_len))


# Arbitrary unicode text except lone surrogates, which UTF-8 cannot hold (tiktoken
# replaces them with U+FFFD, as documented).
unicode_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200)


@needs_llama3
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=unicode_text)
def test_roundtrip_and_ids_property(tok, ref_enc, text):
    ids = tok.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == text
    assert ids == ref_enc.encode(text, disallowed_special=())


# ---------------------------------------------------------------- (c) special tokens
@needs_llama3
def test_special_strings_are_text_unless_allowed(tok):
    plain = tok.encode("<|eot_id|>", bos=False, eos=False)
    assert len(plain) > 1 and all(i < 128000 for i in plain)
    assert tok.decode(plain) == "<|eot_id|>"
    assert tok.encode("<|eot_id|>", bos=False, eos=False, allowed_special="all") == [128009]
    mixed = tok.encode("a<|eot_id|>b<|eom_id|>", bos=False, eos=False, allowed_special={"<|eot_id|>"})
    assert 128009 in mixed and 128008 not in mixed
    with pytest.raises(ValueError):
        tok.encode("<|eom_id|>", bos=False, eos=False, disallowed_special="all")


@needs_llama3
def test_attributes_match_meta(tok):
    assert tok.n_words == 128256
    assert (tok.bos_id, tok.eos_id, tok.eom_id, tok.eot_id) == (128000, 128001, 128008, 128009)
    assert tok.pad_id == 128004 and tok.python_tag_id == 128010
    assert tok.stop_tokens == [128001, 128008, 128009]
    assert len(tok.special_tokens) == 256
    assert tok.special_tokens["<|reserved_special_token_2|>"] == 128012
    assert tok.special_tokens["<|reserved_special_token_245|>"] == 128255
    assert tok.encode("hi", bos=True, eos=False)[0] == 128000
    assert tok.encode("hi", bos=False, eos=True)[-1] == 128001
    with pytest.raises(TypeError):
        tok.encode(b"bytes", bos=False, eos=False)


# ---------------------------------------------------------------- (d) image token
@needs_llama3
def test_image_token_ids(tok):
    assert tok.image_token_id == 128256  # learnable row 0, what Meta's checkpoints embed
    assert tok.image_special_token_id == 128011
    assert tok.encode("<|image|>", bos=False, eos=False, allowed_special="all") == [128011]
    assert tok.to_model_ids([128000, 128011, 9906]) == [128000, 128256, 9906]
    assert tok.decode([128256]) == tok.decode([128011]) == "<|image|>"
    assert tok.decode([128263]) == "<|image|>"  # any learnable-table row
    for bad in (128264, -1):
        with pytest.raises(ValueError, match=str(bad)):
            tok.decode([bad])


@needs_llama3
def test_token_pieces(tok):
    assert tok.token_to_piece(9906) == "Hello"
    assert tok.token_bytes(1917) == b" world"
    assert tok.token_to_piece(128009) == "<|eot_id|>"
    assert tok.token_to_piece(128256) == "<|image|>"
    # a multi-byte character split over byte tokens streams back byte-exactly
    ids = tok.encode("😀", bos=False, eos=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == "😀".encode()


# ---------------------------------------------------------------- (f) SentencePiece
DEMO_TEXTS = [
    "a red square on a blue background",
    "the cat sits on the mat",
    "two green circles and one yellow triangle",
    "what color is the square",
    "there is a small dog next to the big house",
]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory) -> SentencePieceTokenizer:
    path = train_sentencepiece(DEMO_TEXTS * 20, tmp_path_factory.mktemp("sp") / "tokenizer.model", 400)
    return SentencePieceTokenizer(path)


def test_sp_roundtrip_demo_text(sp_tok):
    for text in DEMO_TEXTS + ["unseen words like zebra and quokka", "  two  spaces\nnewline "]:
        ids = sp_tok.encode(text, bos=False, eos=False)
        assert all(0 <= i < sp_tok.sp_size for i in ids)
        assert sp_tok.decode(ids) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\u2581"), max_size=80))
def test_sp_roundtrip_property(sp_tok, text):
    # byte fallback + identity normalisation: exact for all text but U+2581 (see below)
    assert sp_tok.decode(sp_tok.encode(text, bos=False, eos=False)) == text


def test_sp_space_marker_limit(sp_tok):
    # documented limit: SentencePiece cannot tell a literal "▁" from a space
    assert sp_tok.decode(sp_tok.encode("a\u2581b", bos=False, eos=False)) == "a b"


def test_sp_specials_and_image_id(sp_tok):
    n = sp_tok.sp_size
    assert sp_tok.n_words == n + 12
    assert sp_tok.bos_id == n and sp_tok.eos_id == n + 1
    assert sp_tok.eot_id == n + 9 and sp_tok.eom_id == n + 8 and sp_tok.pad_id == n + 4
    assert sp_tok.stop_tokens == [n + 1, n + 8, n + 9]
    assert sp_tok.image_special_token_id == n + 11
    assert sp_tok.image_token_id == sp_tok.n_words
    assert sp_tok.decode([sp_tok.image_token_id]) == "<|image|>"
    assert sp_tok.to_model_ids([sp_tok.image_special_token_id]) == [sp_tok.image_token_id]
    with pytest.raises(ValueError):
        sp_tok.decode([sp_tok.n_words + 8])

    text = "the cat<|eot_id|>the mat<|image|>"
    plain = sp_tok.encode(text, bos=True, eos=True)
    assert plain[0] == sp_tok.bos_id and plain[-1] == sp_tok.eos_id
    assert all(i < n for i in plain[1:-1])
    assert sp_tok.decode(plain[1:-1]) == text
    special = sp_tok.encode(text, bos=False, eos=False, allowed_special="all")
    assert sp_tok.eot_id in special and special[-1] == sp_tok.image_special_token_id
    assert sp_tok.decode(special) == text
    only_eot = sp_tok.encode(text, bos=False, eos=False, allowed_special={"<|eot_id|>"})
    assert sp_tok.eot_id in only_eot and sp_tok.image_special_token_id not in only_eot
    with pytest.raises(ValueError, match="image"):
        sp_tok.encode(text, bos=False, eos=False, allowed_special={"<|eot_id|>"}, disallowed_special="all")


@pytest.mark.parametrize("model_type", ["bpe", "unigram", "word"])
def test_sp_model_types_roundtrip(tmp_path, model_type):
    path = train_sentencepiece(iter(DEMO_TEXTS * 10), tmp_path / "tok.model", 350, model_type=model_type)
    assert path == tmp_path / "tok.model"
    assert os.listdir(tmp_path) == ["tok.model"]  # written atomically, no temp file left
    sp = load_tokenizer(path)
    assert isinstance(sp, SentencePieceTokenizer)
    for text in DEMO_TEXTS + ["a new zebra word"]:
        assert sp.decode(sp.encode(text, bos=False, eos=False)) == text


def test_sp_training_errors(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece(DEMO_TEXTS, tmp_path / "t.model", 300, model_type="wordpiece")
    with pytest.raises(ValueError, match="non-empty"):
        train_sentencepiece(["", ""], tmp_path / "t.model", 300)
    with pytest.raises(ValueError, match="t.model"):
        train_sentencepiece(DEMO_TEXTS, tmp_path / "t.model", 10)  # < 256 byte pieces
    assert not (tmp_path / "t.model").exists()


# ---------------------------------------------------------------- load_tokenizer, (g) errors
@needs_llama3
def test_load_tokenizer_detects_tiktoken(tmp_path):
    shutil.copy(TOKENIZER_PATH, tmp_path / "tokenizer.model")
    for where in (tmp_path, tmp_path / "tokenizer.model", str(tmp_path)):
        t = load_tokenizer(where)
        assert isinstance(t, Tokenizer) and t.n_words == 128256


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.model
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer(tmp_path / "nope.model")


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a tokenizer\n", bytes(range(256)) * 4, b"\x0a\x05broken protobuf"],
)
def test_load_tokenizer_garbage(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path)):
        load_tokenizer(path)


def test_tiktoken_file_with_bad_line(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"IQ== 0\nIg== 1\nnot base64!! x\n")
    with pytest.raises(ValueError, match=r"tokenizer.model:3"):
        load_tokenizer(path)
    path.write_bytes(b"IQ== 0\nIg== 5\n")  # ranks with a gap would mis-number every id
    with pytest.raises(ValueError, match="ranks"):
        Tokenizer(path)
