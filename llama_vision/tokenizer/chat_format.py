"""Llama 3.2 Vision dialog format, as in Meta's llama-models ``llama3/chat_format.py``.

A dialog becomes::

    <|begin_of_text|>
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>     (per message)
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                    (open for generation)

Messages are plain dicts::

    {"role": "system" | "user" | "assistant" | "tool" | "ipython",
     "content": str | [str | {"type": "text", "text": str} | {"type": "image", ...}],
     # optional, as in Meta's RawMessage:
     "tool_calls": [{"tool_name": str, "arguments": dict}],     # assistant only
     "stop_reason": "end_of_turn" | "end_of_message" | "out_of_tokens" | None,
                                                 # assistant only; None/absent: end_of_turn
     "context": str}                                            # user only (RAG context)

Faithful to Meta in the details that change ids:

* every text item is tokenised on its own (``[a, b]`` is ``encode(a) + encode(b)``, not
  ``encode(a + b)``) and is **not** stripped: llama-models' vision-era format keeps text
  as given. (The older text-only Llama 3 repo and transformers' chat template strip the
  content; pass ``strip_content=True`` to reproduce that.)
* special-token strings inside content are plain text (they cannot forge a turn);
* an image item is one token at its place in the content: the tokenizer's
  ``image_token_id`` (128256 for Llama 3), i.e. Meta's ``<|image|>`` (128011) after the
  rewrite Meta applies before the model; the image payload itself is not read here;
* :meth:`ChatFormat.encode_content` is Meta's completion-prompt encoder: BOS, then the
  content (``encode_content_tokens`` gives the content alone, as inside a message);
* the tool role's header says ``ipython``; an assistant turn that calls a tool ends with
  ``<|eom_id|>`` when its ``stop_reason`` is ``end_of_message``; tool calls are rendered
  with Meta's ``ToolUtils.encode_tool_call`` rules.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

Message = Mapping[str, Any]

# role in the message -> text of the header (Meta calls the tool role "ipython").
ROLE_HEADERS = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "ipython",
    "ipython": "ipython",
}
BUILTIN_QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")
TOOL_PROMPT_FORMATS = ("json", "function_tag", "python_list")
# Meta's StopReason values. Only end_of_message changes the ids (<|eom_id|>); Meta closes
# the other two with <|eot_id|>. out_of_tokens is what decode_assistant reports for a cut-off
# reply, so its messages must encode back.
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")


def _format_python_value(value: Any) -> str:
    """Meta's ``python_list`` argument rendering (strings double-quoted, not escaped)."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (bool, int, float)) or value is None:
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_format_python_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_format_python_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"Unsupported tool argument type: {type(value).__name__}")


def encode_tool_call(tool_call: Mapping[str, Any], tool_prompt_format: str) -> str:
    """Text of one assistant tool call, following Meta's ``ToolUtils.encode_tool_call``."""
    try:
        name, args = tool_call["tool_name"], tool_call["arguments"]
        if name in BUILTIN_QUERY_TOOLS:
            return f'{name}.call(query="{args["query"]}")'
        if name == "code_interpreter":
            return args["code"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed tool call {tool_call!r}: missing {e}") from e
    if tool_prompt_format == "json":
        return json.dumps({"type": "function", "name": name, "parameters": args})
    if tool_prompt_format == "function_tag":
        return f"<function={name}>{json.dumps(args)}</function>"
    args_str = ", ".join(f"{k}={_format_python_value(v)}" for k, v in args.items())
    return f"[{name}({args_str})]"


class ChatFormat:
    """Encode dialogs for a Llama 3 style tokenizer (tiktoken or SentencePiece).

    Args:
        tokenizer: a :class:`Tokenizer` or :class:`SentencePieceTokenizer`.
        strip_content: strip every text item (the text-only Llama 3 repo's behaviour);
            off by default to match Meta's Llama 3.2 Vision format.
    """

    def __init__(self, tokenizer: Any, strip_content: bool = False):
        self.tokenizer = tokenizer
        self.strip_content = strip_content
        self.image_token_id: int = tokenizer.image_token_id
        st = tokenizer.special_tokens
        self.bos_id: int = st["<|begin_of_text|>"]
        self.start_header_id: int = st["<|start_header_id|>"]
        self.end_header_id: int = st["<|end_header_id|>"]
        self.eot_id: int = st["<|eot_id|>"]
        self.eom_id: int = st["<|eom_id|>"]
        self.python_tag_id: int = st["<|python_tag|>"]

    # ------------------------------------------------------------------ pieces
    def _text(self, text: str) -> list[int]:
        if self.strip_content:
            text = text.strip()
        return self.tokenizer.encode(text, bos=False, eos=False)

    def encode_header(self, role: str) -> list[int]:
        """``<|start_header_id|>`` role ``<|end_header_id|>`` and the tokens of "\\n\\n"."""
        if role not in ROLE_HEADERS:
            raise ValueError(f"unknown message role {role!r}; expected one of {sorted(ROLE_HEADERS)}")
        return [
            self.start_header_id,
            *self.tokenizer.encode(ROLE_HEADERS[role], bos=False, eos=False),
            self.end_header_id,
            *self.tokenizer.encode("\n\n", bos=False, eos=False),
        ]

    def _content_pieces(self, content: Any) -> list[tuple[list[int], bool]]:
        """Content -> [(ids, is_text)]; ``is_text`` is False for image tokens."""
        items = [content] if isinstance(content, str) else content
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"message content must be a str or a list of items, got {type(content).__name__}")
        pieces = []
        for item in items:
            if isinstance(item, str):
                pieces.append((self._text(item), True))
                continue
            kind = item.get("type") if isinstance(item, Mapping) else None
            if kind == "text":
                text = item.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"text content item needs a str 'text', got {type(text).__name__}")
                pieces.append((self._text(text), True))
            elif kind == "image":
                pieces.append(([self.image_token_id], False))
            else:
                raise ValueError(
                    f"unknown content item type {kind!r} in {item!r}; expected 'text' or 'image'"
                )
        return pieces

    def encode_content(self, content: Any) -> list[int]:
        """A completion prompt: ``<|begin_of_text|>`` then the content (Meta's ``encode_content``).

        Same semantics as llama-models' ``ChatFormat.encode_content`` (``_encode_content``
        with ``bos=True``), so code ported from there keeps its BOS: ``<|begin_of_text|>``
        comes exactly once, before the first item, whether that item is text or an image.
        As in Meta's code, an empty item list gives no ids at all (there is no first item
        to put BOS before). For the content ids alone, as placed inside a message, use
        :meth:`encode_content_tokens`.
        """
        pieces = self._content_pieces(content)
        tokens = [i for ids, _ in pieces for i in ids]
        # Meta adds BOS while processing the first item, so [] stays empty.
        return [self.bos_id, *tokens] if pieces else tokens

    def encode_content_tokens(self, content: Any) -> list[int]:
        """Token ids of the content alone, no BOS (Meta's ``_encode_content(content)``, as
        :meth:`encode_message` uses it between the header and the end token)."""
        return [i for ids, _ in self._content_pieces(content) for i in ids]

    def _message_pieces(self, message: Message, tool_prompt_format: str | None) -> list[tuple[list[int], bool]]:
        """A message as [(ids, trainable)]: trainable marks what the assistant produced
        (its text, tool calls and end token; not its header, not image tokens)."""
        if not isinstance(message, Mapping):
            raise ValueError(f"a message must be a mapping with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLE_HEADERS:
            raise ValueError(f"unknown message role {role!r}; expected one of {sorted(ROLE_HEADERS)}")
        if "content" not in message:
            raise ValueError(f"{role} message has no 'content'")
        fmt = tool_prompt_format or "json"
        if fmt not in TOOL_PROMPT_FORMATS:
            raise ValueError(f"unknown tool_prompt_format {fmt!r}; expected one of {TOOL_PROMPT_FORMATS}")
        is_assistant = role == "assistant"
        tool_calls = message.get("tool_calls") or []
        # Meta's RawMessage defaults stop_reason to None and treats it as end_of_turn; JSON
        # round trips of such messages carry an explicit null, so None == absent.
        stop_reason = message.get("stop_reason")
        if stop_reason is None:
            stop_reason = "end_of_turn"
        if stop_reason not in STOP_REASONS:
            raise ValueError(f"unknown stop_reason {stop_reason!r}; expected one of {STOP_REASONS}")
        if tool_calls and not is_assistant:
            raise ValueError(f"only assistant messages can hold tool_calls, not {role!r} ones")
        if not isinstance(tool_calls, (list, tuple)) or not all(isinstance(c, Mapping) for c in tool_calls):
            raise ValueError(f"tool_calls must be a list of {{'tool_name', 'arguments'}} dicts, got {tool_calls!r}")

        pieces: list[tuple[list[int], bool]] = [(self.encode_header(role), False)]
        if tool_calls and tool_calls[0].get("tool_name") == "code_interpreter":
            pieces.append(([self.python_tag_id], is_assistant))
        pieces += [(ids, is_assistant and is_text) for ids, is_text in self._content_pieces(message["content"])]
        if role == "user" and message.get("context") is not None:
            # the separator is never stripped, even with strip_content
            pieces.append((self.tokenizer.encode("\n\n", bos=False, eos=False), False))
            pieces += [(ids, False) for ids, _ in self._content_pieces(message["context"])]
        for call in tool_calls:
            # tool-call text is generated verbatim: never stripped
            pieces.append((self.tokenizer.encode(encode_tool_call(call, fmt), bos=False, eos=False), True))
        eom = is_assistant and stop_reason == "end_of_message"
        pieces.append(([self.eom_id if eom else self.eot_id], is_assistant))
        return pieces

    # ------------------------------------------------------------------ public API
    def encode_message(self, message: Message, tool_prompt_format: str | None = None) -> list[int]:
        """Header + content (+ tool calls) + ``<|eot_id|>`` (``<|eom_id|>`` if so asked)."""
        return [i for ids, _ in self._message_pieces(message, tool_prompt_format) for i in ids]

    def encode_dialog_with_assistant_mask(
        self,
        messages: Sequence[Message],
        tool_prompt_format: str | None = None,
        add_generation_prompt: bool = False,
    ) -> tuple[list[int], list[bool]]:
        """Ids of the dialog and a loss mask for supervised fine-tuning.

        ``mask[i]`` is True exactly for the tokens of assistant message content (text and
        tool calls, but not image tokens) and the ``<|eot_id|>``/``<|eom_id|>`` closing
        each assistant message: the tokens the model should learn to produce. The default
        (``add_generation_prompt=False``) omits the trailing open assistant header, since
        a training dialog ends with the answer; pass True to get :meth:`encode_dialog`'s ids.
        """
        ids: list[int] = [self.bos_id]
        mask: list[bool] = [False]
        for message in messages:
            for piece, trainable in self._message_pieces(message, tool_prompt_format):
                ids += piece
                mask += [trainable] * len(piece)
        if add_generation_prompt:
            header = self.encode_header("assistant")
            ids += header
            mask += [False] * len(header)
        return ids, mask

    def encode_dialog(
        self,
        messages: Sequence[Message],
        tool_prompt_format: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """``<|begin_of_text|>``, every message, then the assistant header (Meta's
        ``encode_dialog_prompt``; images already as ``image_token_id``)."""
        ids, _ = self.encode_dialog_with_assistant_mask(messages, tool_prompt_format, add_generation_prompt)
        return ids

    def decode_assistant(self, ids: Sequence[int]) -> dict[str, Any]:
        """Turn generated ids into an assistant message dict.

        A leading assistant header is skipped; decoding stops at the first stop token,
        which sets ``stop_reason`` (``<|eom_id|>``: "end_of_message"; ``<|eot_id|>`` or
        ``<|end_of_text|>``: "end_of_turn"; none: "out_of_tokens"). As in Meta's
        decoder, a reply starting with ``<|python_tag|>`` is a ``code_interpreter`` call.
        Other tool-call syntaxes are left in ``content`` for the caller to parse.
        """
        ids = [int(i) for i in ids]
        header = self.encode_header("assistant")
        if ids[: len(header)] == header:
            ids = ids[len(header) :]
        stop_reason = "out_of_tokens"
        for k, i in enumerate(ids):
            if i in self.tokenizer.stop_tokens:
                stop_reason = "end_of_message" if i == self.eom_id else "end_of_turn"
                ids = ids[:k]
                break
        message: dict[str, Any] = {"role": "assistant", "content": "", "stop_reason": stop_reason}
        if ids[:1] == [self.python_tag_id]:
            code = self.tokenizer.decode(ids[1:])
            message["tool_calls"] = [{"tool_name": "code_interpreter", "arguments": {"code": code}}]
        else:
            message["content"] = self.tokenizer.decode(ids)
        return message
