"""The OpenAI Chat Completions schema, as the server supports it: pure functions, no HTTP.

* :func:`parse_chat_request`: a request body (dict) -> :class:`ChatRequest` (normalised
  messages, the encoded image bytes in placeholder order, sampling values, ``stream``,
  ``stop`` strings); every problem raises :class:`APIError` with the HTTP status and an
  OpenAI-style message naming it.
* :func:`build_prompt`: normalised messages -> Meta chat-format prompt ids (images as the
  tokenizer's ``image_token_id``), via :class:`llama_vision.tokenizer.ChatFormat`.
* :func:`load_image_url`: ``data:image/...;base64,...`` (and ``file://`` when allowed) ->
  validated encoded bytes. Network URLs are never fetched.
* :class:`TextStream`: incremental detokenisation for streaming (decode the accumulated
  ids, emit the new suffix; a trailing partial UTF-8 character is held back) and ``stop``
  strings (the text is cut before the first one; :attr:`TextStream.stopped` tells the
  caller to cancel generation).
* :func:`error_body`: ``{"error": {"message", "type", "param", "code"}}``.

Supported request fields: ``model``, ``messages`` (roles system / user / assistant; content a
string or a list of ``{"type": "text", "text"}``, ``{"type": "image_url", "image_url":
{"url"}}`` and, as in vLLM, ``{"type": "video_url", "video_url": {"url"}}`` parts; media only
in user messages), ``max_tokens`` (or
``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop`` (a string or up to
4), ``stream``, ``stream_options.include_usage``, ``n`` (1 only), and one extension (as in
vLLM): ``ignore_eos: true`` generates exactly ``max_tokens`` tokens, never stopping at the
end-of-turn token, and ``skip_special_tokens`` (default true: special tokens such as
``<|eot_id|>`` are left out of the text; false: they appear by name). Other OpenAI fields are accepted and ignored, except the ones that would
change the answer and are not implemented (``n`` > 1, ``logprobs``, ``tools``,
``response_format`` other than text), which are rejected.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

# ----------------------------------------------------------------------------- errors

ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """A request the server answers with an error: HTTP ``status`` and OpenAI's fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


def _schema(message: str, param: str | None) -> APIError:
    """A field with the wrong type or an out-of-range value: 422."""
    return APIError(422, message, param=param, code="invalid_value")


# ----------------------------------------------------------------------------- images

_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*?),(?P<data>.*)$", re.DOTALL)
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")


def decode_data_url(url: str, param: str, kind: str = "image") -> bytes:
    """``data:[<mime>][;base64],<data>`` -> the bytes (base64 required); `kind`: image or
    video, the media type it must have."""
    m = _DATA_URL.match(url)
    if m is None:
        raise APIError(400, f"{param}: malformed data URL (expected data:{kind}/<type>;base64,<data>)", param=param, code=f"invalid_{kind}_url")
    mime = m.group("mime").strip().lower()
    params = [p.strip().lower() for p in m.group("params").split(";") if p.strip()]
    if mime and not mime.startswith(f"{kind}/"):
        what = "an image (image/png, image/jpeg, ...)" if kind == "image" else "a video (video/mp4, video/webm, ...)"
        raise APIError(400, f"{param}: the data URL's media type is {mime!r}, not {what}", param=param, code=f"invalid_{kind}")
    if "base64" not in params:
        raise APIError(400, f"{param}: the data URL is not base64 encoded (expected data:{kind}/<type>;base64,<data>)", param=param, code="invalid_base64")
    data = re.sub(r"\s+", "", urllib.parse.unquote(m.group("data")) if "%" in m.group("data") else m.group("data"))
    if not data or not _B64_CHARS.match(data):
        raise APIError(400, f"{param}: the data URL's payload is not valid base64", param=param, code="invalid_base64")
    try:
        altchars = b"-_" if ("-" in data or "_" in data) else None
        padded = data + "=" * (-len(data) % 4)
        return base64.b64decode(padded, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{param}: the data URL's payload is not valid base64 ({e})", param=param, code="invalid_base64") from None


def read_local_file(url: str, param: str, allow_local_files: bool, max_bytes: int | None = None) -> bytes:
    """``file:///abs/path`` (or ``file:relative``) -> its bytes, only when the server allows it."""
    if not allow_local_files:
        raise APIError(400, f"{param}: file:// URLs are disabled on this server (start it with --allow-local-files)", param=param, code="local_files_disabled")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, f"{param}: file:// URL with a remote host {parsed.netloc!r}; only local paths are read", param=param, code="invalid_image_url")
    path = urllib.parse.unquote(parsed.path)
    if not os.path.isfile(path):
        raise APIError(400, f"{param}: local file not found: {path}", param=param, code="file_not_found")
    size = os.path.getsize(path)
    if max_bytes is not None and size > max_bytes:
        raise APIError(413, f"{param}: local file {path} is {size} bytes, over the {max_bytes}-byte limit", param=param, code="image_too_large")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise APIError(400, f"{param}: cannot read local file {path}: {e}", param=param, code="file_not_readable") from None


def validate_image(data: bytes, param: str, max_image_pixels: int | None = None) -> tuple[int, int]:
    """Decode the bytes (so that 'not an image' fails here, with a 400) -> (width, height).
    Images over ``max_image_pixels`` (width x height) are a 413."""
    from llama_vision.data.image_io import ImageLoadError
    from PIL import Image

    try:
        # The header first: a huge image is refused before its pixels are decoded.
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as e:
        raise APIError(413, f"{param}: image too large ({e})", param=param, code="image_too_large") from None
    except Exception:
        width = height = None
    if width is not None and max_image_pixels is not None and width * height > max_image_pixels:
        raise APIError(413, f"{param}: image of {width}x{height} = {width * height} pixels is over the limit of {max_image_pixels} pixels", param=param, code="image_too_large")
    from llama_vision.data.image_io import load_image

    try:
        image = load_image(data)
    except ImageLoadError as e:
        cause = getattr(e, "cause", None)
        reason = cause if isinstance(cause, str) else str(e)
        raise APIError(400, f"{param}: not an image ({reason})", param=param, code="invalid_image") from None
    return image.size


def load_image_url(url: Any, param: str, *, allow_local_files: bool = False, max_image_pixels: int | None = None) -> bytes:
    """An ``image_url.url`` -> validated encoded image bytes."""
    data = _media_url_bytes(url, param, "image", allow_local_files)
    validate_image(data, param, max_image_pixels)
    return data


def load_video_url(url: Any, param: str, *, allow_local_files: bool = False, max_bytes: int | None = None) -> bytes:
    """A ``video_url.url`` (``data:video/<type>;base64,...`` or, when allowed, ``file://``)
    -> the encoded video bytes (the engine decodes them: an unreadable video is its 400)."""
    return _media_url_bytes(url, param, "video", allow_local_files, max_bytes)


def _media_url_bytes(url: Any, param: str, kind: str, allow_local_files: bool, max_bytes: int | None = None) -> bytes:
    """A media part's URL (`kind`: image or video) -> its non-empty bytes; network URLs refused."""
    if not isinstance(url, str) or not url:
        raise _schema(f"{param} must be a non-empty string", param)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = decode_data_url(url, param, kind)
    elif scheme == "file":
        data = read_local_file(url, param, allow_local_files, max_bytes)
    elif scheme in ("http", "https", "ftp", "ftps", "s3", "gs"):
        raise APIError(400, f"{param}: remote URLs are not fetched by this server ({scheme}://...); send the {kind} inline as a data:{kind}/...;base64 URL", param=param, code="remote_url_not_allowed")
    else:
        raise APIError(400, f"{param}: unsupported {kind} URL (expected data:{kind}/<type>;base64,<data>{' or file://' if allow_local_files else ''})", param=param, code=f"invalid_{kind}_url")
    if not data:
        raise APIError(400, f"{param}: the {kind} is empty", param=param, code=f"invalid_{kind}")
    return data


# ----------------------------------------------------------------------------- request

ROLES = ("system", "user", "assistant")
REJECTED_FIELDS = {
    "tools": "tool calling is not supported by this server",
    "functions": "function calling is not supported by this server",
    "logprobs": "logprobs are not supported by this server",
    "top_logprobs": "logprobs are not supported by this server",
}


@dataclass
class ChatRequest:
    """A validated chat request. ``messages`` are ChatFormat dialog messages (content: a
    list of ``{"type": "text", "text"}`` / ``{"type": "image"}`` items); ``images`` the
    encoded bytes, one per image item, in order; ``sampling`` the keyword arguments of
    the engine's ``SamplingParams`` (``max_tokens`` None: whatever the context leaves)."""

    messages: list[dict]
    images: list[bytes] = field(default_factory=list)
    sampling: dict = field(default_factory=dict)
    stream: bool = False
    stop: list[str] = field(default_factory=list)
    model: str | None = None
    include_usage: bool = False
    max_tokens_given: bool = False
    skip_special_tokens: bool = True
    videos: list[bytes] = field(default_factory=list)
    """Encoded video files, one per ``{"type": "video"}`` item, in order."""


def _number(body: Mapping, key: str, lo: float, hi: float, default: float, *, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _schema(f"'{key}' must be a number, got {value!r}", key)
    if value < lo or value > hi or (lo_open and value <= lo):
        raise _schema(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", key)
    return float(value)


def _int(body: Mapping, key: str, minimum: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise _schema(f"'{key}' must be an integer, got {value!r}", key)
    if minimum is not None and value < minimum:
        raise _schema(f"'{key}' must be >= {minimum}, got {value}", key)
    return value


def _content_items(content: Any, role: str, param: str, images: list[bytes], *, allow_local_files: bool,
                   max_images: int | None, max_image_pixels: int | None, videos: list[bytes] | None = None) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if content is None:
        raise _schema(f"{param} is null; a {role} message needs content", param)
    if not isinstance(content, list):
        raise _schema(f"{param} must be a string or a list of content parts, got {type(content).__name__}", param)
    items = []
    for k, part in enumerate(content):
        p = f"{param}[{k}]"
        if isinstance(part, str):  # lenient: a bare string part is text
            items.append({"type": "text", "text": part})
            continue
        if not isinstance(part, Mapping):
            raise _schema(f"{p} must be an object with a 'type', got {type(part).__name__}", p)
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _schema(f"{p}.text must be a string", f"{p}.text")
            items.append({"type": "text", "text": text})
        elif kind in ("image_url", "image"):
            if role != "user":
                raise APIError(400, f"{p}: images are only accepted in user messages, not in {role} ones", param=p, code="invalid_image_position")
            spec = part.get("image_url") if kind == "image_url" else part
            url = spec.get("url") if isinstance(spec, Mapping) else spec
            if max_images is not None and len(images) >= max_images:
                raise APIError(400, f"too many images: the conversation has more than {max_images} (the limit per request)", param=p, code="too_many_images")
            images.append(load_image_url(url, f"{p}.image_url.url", allow_local_files=allow_local_files, max_image_pixels=max_image_pixels))
            items.append({"type": "image"})
        elif kind == "video_url" and videos is not None:  # (vLLM's part for a video)
            if role != "user":
                raise APIError(400, f"{p}: videos are only accepted in user messages, not in {role} ones", param=p, code="invalid_video_position")
            spec = part.get("video_url")
            url = spec.get("url") if isinstance(spec, Mapping) else spec
            videos.append(load_video_url(url, f"{p}.video_url.url", allow_local_files=allow_local_files))
            items.append({"type": "video"})
        else:
            expected = "'text', 'image_url' or 'video_url'" if videos is not None else "'text' or 'image_url'"
            raise _schema(f"{p}: unsupported content part type {kind!r} (expected {expected})", f"{p}.type")
    return items


def parse_messages(messages: Any, *, allow_local_files: bool = False, max_images: int | None = 8,
                   max_image_pixels: int | None = None, videos: list[bytes] | None = None) -> tuple[list[dict], list[bytes]]:
    """OpenAI messages -> (ChatFormat messages, image bytes in order); `videos`: a list
    that collects the ``video_url`` parts' bytes in order (None: such parts are refused)."""
    if not isinstance(messages, list) or not messages:
        raise _schema("'messages' must be a non-empty list of {role, content} objects", "messages")
    out, images = [], []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise _schema(f"{param} must be an object with 'role' and 'content'", param)
        role = msg.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise _schema(f"{param}.role must be one of {list(ROLES)}, got {role!r}", f"{param}.role")
        if role == "assistant" and msg.get("tool_calls"):
            raise APIError(400, f"{param}: assistant tool_calls are not supported", param=f"{param}.tool_calls", code="unsupported")
        if "content" not in msg:
            raise _schema(f"{param} has no 'content'", f"{param}.content")
        content = _content_items(msg["content"], role, f"{param}.content", images, allow_local_files=allow_local_files,
                                 max_images=max_images, max_image_pixels=max_image_pixels, videos=videos)
        out.append({"role": role, "content": content})
    if out[-1]["role"] == "assistant":
        raise APIError(400, "the last message is an assistant message; the conversation must end with a user (or system) message", param=f"messages[{len(out) - 1}].role", code="invalid_value")
    return out, images


def parse_chat_request(body: Any, *, allow_local_files: bool = False, max_images: int | None = 8,
                       max_image_pixels: int | None = None, model_name: str | None = None,
                       adapters: Sequence[str] = ()) -> ChatRequest:
    """A chat-completions body -> :class:`ChatRequest` (raises :class:`APIError`). `model`
    may name the served model or one of its LoRA `adapters`."""
    if not isinstance(body, Mapping):
        raise _schema(f"the request body must be a JSON object, got {type(body).__name__}", None)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _schema("'model' must be a string", "model")
    if model_name is not None and model not in (None, "", model_name, *adapters):
        served = ", ".join(repr(m) for m in (model_name, *adapters))
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served}", param="model", code="model_not_found")
    for key, why in REJECTED_FIELDS.items():
        if body.get(key):
            raise APIError(400, f"'{key}': {why}", param=key, code="unsupported")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise APIError(400, "'response_format': only {\"type\": \"text\"} is supported", param="response_format", code="unsupported")
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise APIError(400, f"'n': only n=1 is supported, got {n}", param="n", code="unsupported")

    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True)
    seed = _int(body, "seed")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _schema(f"'stream' must be a boolean, got {stream!r}", "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, Mapping):
        raise _schema("'stream_options' must be an object", "stream_options")
    include_usage = bool((opts or {}).get("include_usage", False))
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _schema(f"'ignore_eos' must be a boolean, got {ignore_eos!r}", "ignore_eos")
    skip_special = body.get("skip_special_tokens", True)
    if not isinstance(skip_special, bool):
        raise _schema(f"'skip_special_tokens' must be a boolean, got {skip_special!r}", "skip_special_tokens")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _schema("'stop' must be a string or a list of strings", "stop")
    if len(stop) > 4:
        raise _schema(f"'stop' takes at most 4 sequences, got {len(stop)}", "stop")
    stop = [s for s in stop if s]

    videos: list[bytes] = []
    messages, images = parse_messages(body.get("messages"), allow_local_files=allow_local_files, max_images=max_images,
                                      max_image_pixels=max_image_pixels, videos=videos)
    sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    if ignore_eos:
        sampling["stop_token_ids"] = []
    return ChatRequest(messages=messages, images=images, sampling=sampling, stream=stream, stop=stop, model=model,
                       include_usage=include_usage, max_tokens_given=max_tokens is not None, skip_special_tokens=skip_special,
                       videos=videos)


def build_prompt(tokenizer, messages: Sequence[Mapping], video_token: int | None = None) -> list[int]:
    """ChatFormat messages -> ``<|begin_of_text|>`` + the turns + the open assistant header.
    A ``{"type": "video"}`` item sits where an image item would and becomes `video_token`
    (the model's video placeholder; None: the model takes no videos, a ValueError)."""
    from llama_vision.tokenizer import ChatFormat

    flags = [p.get("type") == "video" for m in messages if not isinstance(m["content"], str) for p in m["content"]
             if p.get("type") in ("image", "video")]
    if any(flags) and video_token is None:
        raise ValueError("the messages have a video but this model takes no videos")
    plain = [m if isinstance(m["content"], str) else
             {**m, "content": [{"type": "image"} if p.get("type") == "video" else p for p in m["content"]]} for m in messages]
    ids = ChatFormat(tokenizer).encode_dialog(plain)
    if not any(flags):
        return ids
    order = iter(flags)
    return [video_token if t == tokenizer.image_token_id and next(order) else t for t in ids]


def resolve_max_tokens(req: ChatRequest, prompt_len: int, max_seq_len: int, default_max_tokens: int | None = None) -> int:
    """The request's ``max_tokens``, checked against the context (400 naming the lengths);
    when absent: what the context leaves, capped at ``default_max_tokens``."""
    if prompt_len >= max_seq_len:
        raise APIError(400, f"prompt longer than the context: the messages take {prompt_len} tokens and this model's context "
                            f"is {max_seq_len} tokens (with room for at least one generated token)",
                       param="messages", code="context_length_exceeded")
    room = max_seq_len - prompt_len
    mt = req.sampling.get("max_tokens")
    if mt is None:
        return room if default_max_tokens is None else min(room, default_max_tokens)
    if mt > room:
        raise APIError(400, f"prompt + max_tokens longer than the context: this model's context is {max_seq_len} tokens, "
                            f"the messages take {prompt_len} and max_tokens asks for {mt} (at most {room} fit)",
                       param="max_tokens", code="context_length_exceeded")
    return mt


# ----------------------------------------------------------------------------- detokenization

def special_ids(tokenizer) -> frozenset[int] | range:
    """Ids that are not text: the special tokens, the image / learnable-embedding ids."""
    ids = set(int(i) for i in getattr(tokenizer, "special_tokens", {}).values())
    for name in ("image_token_id", "image_special_token_id"):
        if getattr(tokenizer, name, None) is not None:
            ids.add(int(getattr(tokenizer, name)))
    return frozenset(ids)


def decode(tokenizer, ids: Sequence[int], skip: frozenset[int] | None = None) -> str:
    """``tokenizer.decode``, leaving out the ids in ``skip`` (and every id past the
    vocabulary's text, ``n_words`` on, when skipping)."""
    if skip is not None:
        limit = getattr(tokenizer, "n_words", None)
        ids = [i for i in ids if i not in skip and (limit is None or i < limit)]
    return tokenizer.decode(ids)


class TextStream:
    """Token ids in, text deltas out, with ``stop`` strings.

    ``skip_special_tokens`` (default, as vLLM): special tokens (``<|eot_id|>``, ...; only
    generated with ``ignore_eos``) are left out of the text.

    ``push(id)`` returns the text that can be shown now: the accumulated ids are decoded
    and the part past what was already emitted is returned, except a trailing U+FFFD (a
    UTF-8 character whose bytes are still arriving) and any tail that could be the start of
    a stop string. When a stop string appears the text is cut before it, :attr:`stopped`
    becomes True and later pushes return "". ``finish()`` returns what was held back.
    ``text`` is everything emitted; ``ids`` the ids pushed (up to the stop).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = special_ids(tokenizer) if skip_special_tokens else None
        self.stop = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False

    def _decoded(self) -> str:
        return decode(self.tokenizer, self.ids, self.skip)

    def _emit_upto(self, full: str, end: int) -> str:
        if end <= len(self.text) or not full.startswith(self.text):
            # nothing new, or the decode is not prefix-stable yet: wait for more ids
            return ""
        delta = full[len(self.text):end]
        self.text += delta
        return delta

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        full = self._decoded()
        if self.stop:
            # Only the region past the emitted text (plus a stop's length of overlap) can hold a new match.
            start = max(0, len(self.text) - self._max_stop)
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.stopped = True
                return self._emit_upto(full, cut) if cut >= len(self.text) else ""
        end = len(full)
        while end > 0 and full[end - 1] == "\ufffd":
            end -= 1
        if self.stop:
            end = min(end, len(full) - self._held_for_stop(full))
        return self._emit_upto(full, end)

    def _held_for_stop(self, full: str) -> int:
        """Length of the longest tail of ``full`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:k]):
                    best = k
                    break
        return best

    def finish(self) -> str:
        """The held-back tail (a partial stop string, an incomplete character) at the end."""
        if self.stopped:
            return ""
        return self._emit_upto(self._decoded(), 10**18)
