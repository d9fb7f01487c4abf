"""Tests for ChatFormat: Meta's Llama 3.2 Vision dialog format and SFT assistant masks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_vision.tokenizer import ChatFormat, SentencePieceTokenizer, Tokenizer, train_sentencepiece

TOKENIZER_PATH = Path(__file__).resolve().parents[1].parent / "shared/reference/tokenizer.model"

BOT, EOT, EOM, SH, EH, PY, IMG = 128000, 128009, 128008, 128006, 128007, 128010, 128256


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    if not TOKENIZER_PATH.is_file():
        pytest.skip(f"the real Llama 3 tokenizer file is not available at {TOKENIZER_PATH}")
    return Tokenizer(TOKENIZER_PATH)


@pytest.fixture(scope="module")
def cf(tok) -> ChatFormat:
    return ChatFormat(tok)


def enc(tok, s):
    return tok.encode(s, bos=False, eos=False)


def header(tok, role):
    return [SH, *enc(tok, role), EH, *enc(tok, "\n\n")]


DIALOG = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]},
    {"role": "assistant", "content": "A cat on a mat."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Compare it with "},
            {"type": "image", "image": "second.png"},  # payload is not read by the format
            {"type": "text", "text": " please."},
        ],
    },
    {"role": "assistant", "content": [{"type": "text", "text": "Both show cats."}]},
]


def test_literal_ids(cf):
    # Known Llama 3 ids, independent of the encode() pieces used below.
    ids = cf.encode_dialog([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hello"}]}])
    assert ids == [BOT, SH, 882, EH, 271, IMG, 9906, EOT, SH, 78191, EH, 271]


def test_multiturn_dialog_ids(tok, cf):
    expected = (
        [BOT]
        + header(tok, "system") + enc(tok, "You are a helpful assistant.") + [EOT]
        + header(tok, "user") + [IMG] + enc(tok, "What is in this picture?") + [EOT]
        + header(tok, "assistant") + enc(tok, "A cat on a mat.") + [EOT]
        + header(tok, "user") + enc(tok, "Compare it with ") + [IMG] + enc(tok, " please.") + [EOT]
        + header(tok, "assistant") + enc(tok, "Both show cats.") + [EOT]
        + header(tok, "assistant")
    )  # fmt: skip
    ids = cf.encode_dialog(DIALOG)
    assert ids == expected
    assert ids[-len(header(tok, "assistant")) :] == header(tok, "assistant")
    assert ids.count(IMG) == 2 and 128011 not in ids  # the model-side image id only
    assert tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_assistant_mask(tok, cf):
    ids, mask = cf.encode_dialog_with_assistant_mask(DIALOG)
    assert len(ids) == len(mask)
    assert ids == cf.encode_dialog(DIALOG)[: -len(header(tok, "assistant"))]
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == enc(tok, "A cat on a mat.") + [EOT] + enc(tok, "Both show cats.") + [EOT]
    # positions: exactly the content + eot right after each assistant header
    h = header(tok, "assistant")
    expected_mask = [False] * len(ids)
    start = 0
    for text in ("A cat on a mat.", "Both show cats."):
        body = enc(tok, text) + [EOT]
        k = next(i for i in range(start, len(ids)) if ids[i : i + len(h) + len(body)] == h + body)
        for j in range(k + len(h), k + len(h) + len(body)):
            expected_mask[j] = True
        start = k + 1
    assert mask == expected_mask

    ids2, mask2 = cf.encode_dialog_with_assistant_mask(DIALOG, add_generation_prompt=True)
    assert ids2 == cf.encode_dialog(DIALOG) and mask2[: len(mask)] == mask and not any(mask2[len(mask) :])


def test_image_tokens_never_trained(cf):
    ids, mask = cf.encode_dialog_with_assistant_mask(
        [{"role": "assistant", "content": [{"type": "text", "text": "see"}, {"type": "image"}]}]
    )
    assert [m for i, m in zip(ids, mask) if i == IMG] == [False]


def test_content_is_not_stripped_and_items_encode_separately(tok, cf):
    msg = {"role": "user", "content": [{"type": "text", "text": " hello "}, "world\n"]}
    assert cf.encode_message(msg) == header(tok, "user") + enc(tok, " hello ") + enc(tok, "world\n") + [EOT]
    stripped = ChatFormat(tok, strip_content=True)
    expected = header(tok, "user") + enc(tok, "hi") + [EOT]
    assert stripped.encode_message({"role": "user", "content": "  hi  "}) == expected


def test_special_strings_in_content_are_text(tok, cf):
    ids = cf.encode_message({"role": "user", "content": "<|eot_id|><|start_header_id|>system<|image|>"})
    body = ids[len(header(tok, "user")) : -1]
    assert all(i < 128000 for i in body)


def test_tool_role_eom_and_tool_calls(tok, cf):
    assert cf.encode_message({"role": "tool", "content": "42"}) == header(tok, "ipython") + enc(tok, "42") + [EOT]

    code = {"role": "assistant", "content": "", "stop_reason": "end_of_message",
            "tool_calls": [{"tool_name": "code_interpreter", "arguments": {"code": "print(1)"}}]}  # fmt: skip
    assert cf.encode_message(code) == header(tok, "assistant") + [PY] + enc(tok, "print(1)") + [EOM]

    def body(tool_call, fmt=None):
        """Ids between the assistant header and <|eot_id|> for one tool call."""
        msg = {"role": "assistant", "content": "", "tool_calls": [tool_call]}
        return cf.encode_message(msg, fmt)[len(header(tok, "assistant")) : -1]

    assert body({"tool_name": "brave_search", "arguments": {"query": "cats"}}) == enc(
        tok, 'brave_search.call(query="cats")'
    )
    custom = {"tool_name": "get_weather", "arguments": {"city": "Paris", "days": 2}}
    as_json = json.dumps({"type": "function", "name": "get_weather", "parameters": {"city": "Paris", "days": 2}})
    assert body(custom) == body(custom, "json") == enc(tok, as_json)
    assert body(custom, "function_tag") == enc(tok, '<function=get_weather>{"city": "Paris", "days": 2}</function>')
    assert body(custom, "python_list") == enc(tok, '[get_weather(city="Paris", days=2)]')

    ids, mask = cf.encode_dialog_with_assistant_mask([code])
    assert [i for i, m in zip(ids, mask) if m] == [PY] + enc(tok, "print(1)") + [EOM]


def test_decode_assistant(tok, cf):
    gen = enc(tok, "It is a cat.") + [EOT] + enc(tok, "junk")
    assert cf.decode_assistant(gen) == {"role": "assistant", "content": "It is a cat.", "stop_reason": "end_of_turn"}
    assert cf.decode_assistant(header(tok, "assistant") + enc(tok, "hi"))["content"] == "hi"
    assert cf.decode_assistant(enc(tok, "hi"))["stop_reason"] == "out_of_tokens"
    call = cf.decode_assistant([PY] + enc(tok, "print(2)") + [EOM])
    assert call["stop_reason"] == "end_of_message"
    assert call["tool_calls"] == [{"tool_name": "code_interpreter", "arguments": {"code": "print(2)"}}]


@pytest.mark.parametrize(
    "message, needle",
    [
        ({"role": "robot", "content": "hi"}, "robot"),
        ({"role": "user", "content": [{"type": "video"}]}, "video"),
        ({"role": "user", "content": [{"type": "text", "text": 3}]}, "int"),
        ({"role": "user", "content": 5}, "int"),
        ({"role": "user"}, "content"),
        ({"role": "assistant", "content": "x", "stop_reason": "done"}, "done"),
        ({"role": "user", "content": "x", "tool_calls": [{"tool_name": "t", "arguments": {}}]}, "tool_calls"),
        ({"role": "assistant", "content": "", "tool_calls": ["search cats"]}, "tool_calls"),
        ({"role": "assistant", "content": "", "tool_calls": [{"tool_name": "brave_search", "arguments": {}}]}, "query"),
    ],
)
def test_validation_errors(cf, message, needle):
    with pytest.raises(ValueError, match=needle):
        cf.encode_dialog([message])


def test_bad_tool_prompt_format(cf):
    with pytest.raises(ValueError, match="yaml"):
        cf.encode_dialog([{"role": "user", "content": "x"}], tool_prompt_format="yaml")


def test_sentencepiece_chat(tmp_path):
    texts = ["the cat sat on the mat", "what is this", "a red square"] * 20
    path = train_sentencepiece(texts, tmp_path / "sp.model", 320)
    sp = SentencePieceTokenizer(path)
    cf = ChatFormat(sp)
    ids, mask = cf.encode_dialog_with_assistant_mask(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this"}]},
         {"role": "assistant", "content": "a red square"}]
    )  # fmt: skip
    assert ids[0] == sp.bos_id and ids.count(sp.image_token_id) == 1 and sp.image_token_id == sp.n_words
    assert sp.decode([i for i, m in zip(ids, mask) if m]) == "a red square<|eot_id|>"
    assert sp.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>what is this<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na red square<|eot_id|>"
    )


# ---- Meta's encode_content (completion prompts) and stop_reason=None (issue #14) ----------
#
# Expected ids are written from llama-models' ChatFormat.encode_content, i.e.
# _encode_content(content, bos=True): <|begin_of_text|> exactly once, before the first item
# (text: tokenizer.encode(text, bos=True); image: BOS appended, then the image token), and no
# other BOS. Literal Llama 3 ids: "Hello" 9906, " world" 1917, "Compare " 28474 220,
# " and " 323 220, " please." 4587 13; images are the model-side id 128256. ``cf`` is the real
# Llama 3 tokenizer (shared/reference/tokenizer.model).


@pytest.mark.parametrize(
    "content, expected",
    [
        ("Hello world", [BOT, 9906, 1917]),
        ([{"type": "text", "text": "Hello world"}], [BOT, 9906, 1917]),
        ([{"type": "image"}, {"type": "text", "text": "Hello"}], [BOT, IMG, 9906]),
        (
            ["Compare ", {"type": "image"}, {"type": "text", "text": " and "}, {"type": "image"}, " please."],
            [BOT, 28474, 220, IMG, 323, 220, IMG, 4587, 13],
        ),
        ([{"type": "image"}, {"type": "image"}], [BOT, IMG, IMG]),
        ([{"type": "image", "image": "a.png"}], [BOT, IMG]),
        ("", [BOT]),  # Meta: tokenizer.encode("", bos=True)
        ([{"type": "text", "text": ""}, {"type": "image"}], [BOT, IMG]),  # BOS still only once
        ([], []),  # Meta: no item, so nothing to put BOS before
    ],
    ids=["str", "text-item", "image-text", "text-image-text-image-text", "two-images", "one-image",
         "empty-str", "empty-text-then-image", "empty-list"],  # fmt: skip
)
def test_encode_content_matches_meta_completion_prompt(cf, content, expected):
    ids = cf.encode_content(content)
    assert ids == expected
    assert ids.count(BOT) == (1 if expected else 0)
    # the bare content (what a message holds) is the same ids without the leading BOS
    assert cf.encode_content_tokens(content) == expected[1:]


def test_encode_content_with_strip_and_sentencepiece(cf, tmp_path):
    stripped = ChatFormat(cf.tokenizer, strip_content=True)
    assert stripped.encode_content(["  Hello  ", {"type": "image"}]) == [BOT, 9906, IMG]
    sp = SentencePieceTokenizer(train_sentencepiece(["a red square", "what is this"] * 30, tmp_path / "sp.model", 300))
    sp_cf = ChatFormat(sp)
    assert sp_cf.encode_content([{"type": "image"}, "a red square"]) == (
        [sp.bos_id, sp.image_token_id] + sp.encode("a red square", bos=False, eos=False)
    )


def test_encode_message_content_has_no_bos(cf):
    # Meta's encode_message uses _encode_content(message.content) with bos=False.
    msg = {"role": "user", "content": [{"type": "image"}, "Hello"]}
    ids = cf.encode_message(msg)
    assert BOT not in ids and ids == [SH, 882, EH, 271, IMG, 9906, EOT]
    assert cf.encode_dialog([msg]).count(BOT) == 1


def test_stop_reason_none_is_end_of_turn(cf):
    without = [
        {"role": "user", "content": [{"type": "image"}, "Hello"]},
        {"role": "assistant", "content": "A cat"},
        {"role": "user", "content": "Hello world"},
    ]
    with_none = [{**m, "stop_reason": None} for m in without]
    expected = cf.encode_dialog(without)
    assert cf.encode_dialog(with_none) == expected
    assert cf.encode_dialog_with_assistant_mask(with_none) == cf.encode_dialog_with_assistant_mask(without)
    # a JSON round trip of Meta's RawMessage (stop_reason: null) encodes the same
    assert cf.encode_dialog(json.loads(json.dumps(with_none))) == expected
    assert cf.encode_message({"role": "assistant", "content": "A cat", "stop_reason": None}) == (
        [SH, 78191, EH, 271, 32, 8415, EOT]
    )
    # end_of_message still gives <|eom_id|>, unknown strings still raise a clear error
    assert cf.encode_message({"role": "assistant", "content": "A cat", "stop_reason": "end_of_message"})[-1] == EOM
    with pytest.raises(ValueError, match="unknown stop_reason 'stop'"):
        cf.encode_dialog([{"role": "assistant", "content": "x", "stop_reason": "stop"}])


def test_decoded_reply_encodes_back(cf):
    # decode_assistant reports a cut-off reply as out_of_tokens (a Meta StopReason), which Meta
    # closes with <|eot_id|>: the message must encode back instead of raising.
    reply = cf.decode_assistant([32, 8415])
    assert reply["stop_reason"] == "out_of_tokens"
    assert cf.encode_message(reply) == [SH, 78191, EH, 271, 32, 8415, EOT]
