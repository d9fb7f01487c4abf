"""LLaVA conversation data (``data.kind: llava_json``) as native conversation records.

:class:`LlavaJsonSource` reads the files LLaVA and the sets built on its layout are released
as (``llava_instruct_150k.json``, ``llava_v1_5_mix665k.json``, ShareGPT4V, LLaVA-OneVision
exports, LLaMA-Factory's ShareGPT layout) and yields :class:`~.sources.Record` s with the
fields of :class:`~.sources.ConversationSource` -- ``images`` (absolute paths) and
``messages`` (native ``{"role", "content"}`` dicts with ``<|image|>`` placeholders) -- so
:class:`~.datasets.ConversationDataset` builds the examples exactly as for native rows.

**Files.** A file whose first character (after a UTF-8 BOM and whitespace) is ``[`` is one
JSON array of rows, as LLaVA releases them; anything else is JSONL, one row per line (blank
lines ignored), whatever the file is named. Arrays are parsed *streaming*: the file is read
in chunks of :attr:`LlavaJsonSource.chunk_bytes` and decoded element by element with
``json.JSONDecoder.raw_decode``, so memory stays at about one element plus one chunk even
for the ~1 GB mix665k file, and rows come in file order. Record keys are ``<file>:<line>``
(1-based) for JSONL and ``<file>:<index>`` (0-based, as ``rows[index]``) for arrays.

**Rows.** ``{"id", "image": str | [str] (or "images"), "conversations": [{"from", "value"}]}``
(LLaVA), or ``{"images": [...], "messages": [{"role", "content"}]}`` (ShareGPT style), with
an optional top-level ``"system": str`` (LLaMA-Factory) put first as a system turn. A turn
may use either key pair. Roles: ``human`` / ``user`` -> user, ``gpt`` / ``assistant`` ->
assistant, ``system`` -> system (case-insensitive); any other role skips the row. Image
paths are relative to ``image_root`` (default: the folder of the file that lists them);
absolute paths stay as they are.

**Images in the text.** Each ``<image>`` tag becomes one ``<|image|>`` placeholder; the tags
take the row's images in order (multi-image rows). LLaVA separates the tag from the question
by a newline (``"<image>\\nWhat is this?"``, sometimes ``"What is this?\\n<image>"``): that
newline is layout, not content, so exactly one ``\\n`` next to each tag is removed -- the one
right after it, or, when the tag ends the value, the one right before it. So
``"<image>\\nWhat is this?"`` is the native ``"<|image|>What is this?"``. A row that lists
images but has no tag anywhere gets all of them, in order, at the start of its first user
turn (what LLaVA's own preprocessing does). Any other disagreement between tags and images
is left to the dataset, which skips the row as ``image_count_mismatch``.

**Bad data** never raises (the :mod:`.sources` contract); each bad row keeps its slot in
the record stream:

* a JSONL line that is not JSON, or an array element with invalid UTF-8: ``bad_json``;
* a row that is JSON but not a usable conversation: ``bad_record`` -- not an object, no
  ``conversations`` / ``messages`` list, a turn without a str role/text, an unknown role,
  a first (non-system) turn that is not the user's, a last turn that is not the
  assistant's (no reply to train on), an empty or non-str image path, a ``video`` row;
* invalid JSON *inside an array* cannot be stepped over reliably (where the next element
  starts is unknown once the syntax breaks), so it ends that file: one ``bad_json`` record
  naming the byte offset, keyed by the index the broken element would have had; the same
  for a file cut off mid-array (a partial download) and for an element longer than
  :attr:`LlavaJsonSource.max_element_chars` (a string that never closes);
* missing or undecodable image files are found by the dataset when it loads them
  (``missing_image`` / ``bad_image``).

Skip messages name the file and line/index and, when the row has one, its ``id``.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from typing import Any, BinaryIO, Iterator

from .datasets import IMAGE_PLACEHOLDER
from .sources import BAD_JSON, BAD_RECORD, MISSING_SHARD, Record, _JsonlSource

LLAVA_IMAGE_TAG = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

_UTF8_BOM = codecs.BOM_UTF8
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
# Bytes that are not UTF-8, as the "surrogateescape" decoder hands them over.
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]")
# A decode error this close to the end of the text read so far may be a token (number,
# literal, escape) cut by the chunk boundary rather than a syntax error.
_TOKEN_TAIL = 8


# --------------------------------------------------------------------------------------------
# Rows -> native conversation fields
# --------------------------------------------------------------------------------------------


def convert_image_tags(text: str) -> str:
    """LLaVA's ``<image>`` tags -> ``<|image|>``, minus the one separating newline per tag
    (the one right after it, or, when the tag ends the text, the one right before it)."""
    if LLAVA_IMAGE_TAG not in text:
        return text
    pieces = text.split(LLAVA_IMAGE_TAG)  # tag k sits between pieces[k] and pieces[k + 1]
    last = len(pieces) - 1
    for k in range(1, len(pieces)):
        if pieces[k].startswith("\n"):
            pieces[k] = pieces[k][1:]
        elif k == last and not pieces[k] and pieces[k - 1].endswith("\n"):
            pieces[k - 1] = pieces[k - 1][:-1]
    return IMAGE_PLACEHOLDER.join(pieces)


def row_images(row: dict, root: str) -> list[str]:
    """Absolute paths of the row's ``image`` (or ``images``): a path or a list of paths."""
    for name in ("image", "images"):
        value = row.get(name)
        if value is None:
            continue
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list):
            raise ValueError(f"{name!r} must be a path or a list of paths, not a {type(value).__name__}")
        for i, path in enumerate(paths):
            where = name if isinstance(value, str) else f"{name}[{i}]"
            if not isinstance(path, str):
                raise ValueError(f"{where} is a {type(path).__name__}, not a path")
            if not path.strip():
                raise ValueError(f"{where} is an empty path")
        return [os.path.join(root, path) for path in paths]
    return []


def _turn_list(row: dict) -> list:
    for name in ("conversations", "messages"):
        if name in row:
            turns = row[name]
            if not isinstance(turns, list) or not turns:
                raise ValueError(f"{name!r} must be a non-empty list of turns")
            return turns
    raise ValueError("row has no 'conversations' (or 'messages') list")


def _native_turn(turn: Any, i: int) -> tuple[str, dict[str, str]]:
    """``(role as written, native message)`` of turn ``i``."""
    if not isinstance(turn, dict):
        raise ValueError(f"turn {i} is a {type(turn).__name__}, not an object")
    role = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if not isinstance(role, str):
        raise ValueError(f"turn {i} has no str 'from' (or 'role')")
    native_role = ROLES.get(role.lower())
    if native_role is None:
        raise ValueError(f"turn {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if not isinstance(text, str):
        raise ValueError(f"turn {i} ({role}) has no str 'value' (or 'content')")
    return role, {"role": native_role, "content": convert_image_tags(text)}


def _check_turn_order(roles: list[str], messages: list[dict[str, str]]) -> None:
    """The dialog opens with the user (after any system turns) and ends with the assistant."""
    speakers = [(role, m["role"]) for role, m in zip(roles, messages) if m["role"] != "system"]
    if not speakers:
        raise ValueError("no user or assistant turn")
    if speakers[0][1] != "user":
        raise ValueError(f"the first turn is {speakers[0][0]!r}, not the user's")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last turn is {roles[-1]!r}, not the assistant's: no reply to train on")


def _prepend_untagged_images(messages: list[dict[str, str]], n_images: int) -> None:
    """LLaVA's rule for a row that lists images without any tag: all of them, in order, at
    the start of the first user turn."""
    if n_images == 0 or any(IMAGE_PLACEHOLDER in m["content"] for m in messages):
        return
    first_user = next(m for m in messages if m["role"] == "user")
    first_user["content"] = IMAGE_PLACEHOLDER * n_images + first_user["content"]


def llava_row_fields(row: dict, root: str) -> dict[str, Any]:
    """One LLaVA / ShareGPT row -> ``{"images", "messages"}`` as :class:`~.sources.ConversationSource`
    gives them. Raises ``ValueError`` naming the problem (and the row's ``id``)."""
    try:
        if row.get("video") is not None or row.get("videos") is not None:
            raise ValueError("video rows are not read by llava_json (data.kind video_jsonl reads videos)")
        images = row_images(row, root)
        roles, messages = map(list, zip(*(_native_turn(turn, i) for i, turn in enumerate(_turn_list(row)))))
        system = row.get("system")  # LLaMA-Factory's system prompt, beside the turns
        if system is not None and not isinstance(system, str):
            raise ValueError(f"'system' must be a str, not a {type(system).__name__}")
        if system:
            roles.insert(0, "system")
            messages.insert(0, {"role": "system", "content": convert_image_tags(system)})
        _check_turn_order(roles, messages)
        _prepend_untagged_images(messages, len(images))
    except ValueError as exc:
        if row.get("id") is not None:
            raise ValueError(f"id {row['id']!r}: {exc}") from None
        raise
    return {"images": images, "messages": messages}


# --------------------------------------------------------------------------------------------
# Streaming JSON arrays
# --------------------------------------------------------------------------------------------


class JsonArrayError(ValueError):
    """The array cannot be read past this point: ``offset`` is the byte where it broke,
    ``index`` the index of the element that was expected there."""

    def __init__(self, message: str, offset: int, index: int):
        super().__init__(message)
        self.offset = offset
        self.index = index


class JsonArrayReader:
    """The elements of the JSON array in a binary file, read chunk by chunk.

    Iterating yields ``(index, value, bad_utf8)``: ``bad_utf8`` says the element's text held
    bytes that are not UTF-8 (its ``value`` then carries them as lone surrogates). A file
    that breaks the array syntax raises :class:`JsonArrayError` after the last good element.
    Memory: the current element plus one chunk (a long element is read in doubling steps, so
    re-decoding it as it grows stays linear in its size).
    """

    def __init__(self, f: BinaryIO, chunk_bytes: int = 1 << 20, max_element_chars: int = 64 << 20):
        self.f = f
        self.chunk_bytes = max(1, chunk_bytes)
        self.max_element_chars = max_element_chars
        # surrogateescape: an invalid byte spoils only its element (and its byte offset is
        # still exact, by encoding back the same way).
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.decode = json.JSONDecoder().raw_decode
        self.text = ""  # decoded text not yet dropped
        self.pos = 0  # next unread character of `text`
        self.dropped_bytes = 0  # bytes of the file before `text`
        self.eof = False
        head = f.read(len(_UTF8_BOM))
        if head == _UTF8_BOM:
            self.dropped_bytes = len(_UTF8_BOM)
        else:
            self.text = self.decoder.decode(head)

    def byte_offset(self, pos: int | None = None) -> int:
        """File offset of character ``pos`` of the text (default: the read position)."""
        pos = self.pos if pos is None else pos
        return self.dropped_bytes + len(self.text[:pos].encode("utf-8", "surrogateescape"))

    def _read_more(self) -> None:
        """Drop the consumed text, then append at least one chunk (or reach the end)."""
        if self.pos:
            self.dropped_bytes = self.byte_offset()
            self.text, self.pos = self.text[self.pos :], 0
        data = self.f.read(max(self.chunk_bytes, len(self.text)))
        if data:
            self.text += self.decoder.decode(data)
        else:
            self.text += self.decoder.decode(b"", final=True)
            self.eof = True

    def _next_char(self) -> str | None:
        """The next non-whitespace character (not consumed); ``None`` at the end of the file."""
        while True:
            self.pos = _JSON_WHITESPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if self.eof:
                return None
            self._read_more()

    def _may_continue(self, exc: json.JSONDecodeError) -> bool:
        """Whether more text could turn this decode error into a valid element."""
        return exc.msg.startswith("Unterminated string") or exc.pos >= len(self.text) - _TOKEN_TAIL

    def _error(self, message: str, index: int, pos: int | None = None) -> JsonArrayError:
        return JsonArrayError(message, self.byte_offset(pos), index)

    def _element(self, index: int) -> tuple[Any, bool]:
        """Decode the element at the read position: ``(value, bad_utf8)``."""
        while True:
            if len(self.text) - self.pos > self.max_element_chars:
                limit = self.max_element_chars
                raise self._error(f"element {index} is longer than {limit} characters (a string that never closes?)", index)
            try:
                value, end = self.decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                if not self.eof and self._may_continue(exc):
                    self._read_more()
                    continue
                ran_out = exc.msg.startswith("Unterminated string") or exc.pos >= len(self.text)
                problem = "the file ends inside it (truncated file?)" if ran_out else exc.msg
                raise self._error(f"element {index} is not valid JSON: {problem}", index, exc.pos) from None
            if end > len(self.text) - _TOKEN_TAIL and not self.eof:
                self._read_more()  # a number cut at the chunk's end decodes as a shorter one
                continue
            bad_utf8 = _ESCAPED_BYTES.search(self.text, self.pos, end) is not None
            self.pos = end
            return value, bad_utf8

    def __iter__(self) -> Iterator[tuple[int, Any, bool]]:
        char = self._next_char()
        if char is None:
            return  # an empty file holds no rows
        if char != "[":
            raise self._error(f"expected '[' to open the array, found {char!r}", 0)
        self.pos += 1
        index = 0
        if self._next_char() == "]":
            self.pos += 1
            self._check_end(index)
            return
        while True:
            if self._next_char() is None:
                raise self._error(f"the file ends before element {index} (truncated file?)", index)
            value, bad_utf8 = self._element(index)
            yield index, value, bad_utf8
            index += 1
            char = self._next_char()
            if char == ",":
                self.pos += 1
            elif char == "]":
                self.pos += 1
                self._check_end(index)
                return
            elif char is None:
                raise self._error(f"the file ends after element {index - 1} without the closing ']' (truncated file?)", index)
            else:
                raise self._error(f"expected ',' or ']' after element {index - 1}, found {char!r}", index)

    def _check_end(self, count: int) -> None:
        char = self._next_char()
        if char is not None:
            raise self._error(f"unexpected {char!r} after the array's closing ']'", count)


def starts_json_array(path: str) -> bool:
    """Whether the file's first non-whitespace character (after a UTF-8 BOM) is ``[``."""
    with open(path, "rb") as f:
        head = f.read(len(_UTF8_BOM))
        if head != _UTF8_BOM:
            f.seek(0)
        while True:
            block = f.read(4096)
            if not block:
                return False
            stripped = block.lstrip(b" \t\r\n")
            if stripped:
                return stripped[:1] == b"["


# --------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------


class LlavaJsonSource(_JsonlSource):
    """LLaVA / ShareGPT conversation rows from JSON-array or JSONL files (module docstring).

    Args:
        paths: file(s), brace/glob patterns as for every source.
        image_root: folder the image paths are relative to; ``None``: each file's folder.
    """

    chunk_bytes: int = 1 << 20
    """Bytes read at a time from a JSON array."""
    max_element_chars: int = 64 << 20
    """An array element longer than this ends the file as ``bad_json`` (memory bound)."""

    def iter_shard(self, shard: str) -> Iterator[Record]:
        """The rows of one file in file order (JSON array or JSONL, by its first character)."""
        if not os.path.exists(shard):
            yield Record(key=shard, source=shard, error=MISSING_SHARD, message=f"file {shard} does not exist")
            return
        if not starts_json_array(shard):
            yield from super().iter_shard(shard)
            return
        root = self.image_root if self.image_root is not None else os.path.dirname(os.path.abspath(shard))
        name = os.path.basename(shard)
        with open(shard, "rb") as f:
            reader = JsonArrayReader(f, self.chunk_bytes, self.max_element_chars)
            try:
                for index, row, bad_utf8 in reader:
                    key = f"{name}:{index}"
                    if bad_utf8:
                        message = f"{key}: invalid UTF-8 in the element"
                        yield Record(key=key, source=shard, error=BAD_JSON, message=message)
                    else:
                        yield self._record(key, shard, row, root)
            except JsonArrayError as exc:
                key = f"{name}:{exc.index}"
                message = f"{key}: byte {exc.offset}: {exc}; the rest of {name} is not read"
                yield Record(key=key, source=shard, error=BAD_JSON, message=message)

    def _fields(self, obj: dict, root: str) -> dict[str, Any]:
        return llava_row_fields(obj, root)
