"""Record sources: lazy, deterministic readers of raw training samples.

A source is a list of *shards* (tar files or JSONL files) plus ``iter_shard(shard)``, which
streams that file's samples as :class:`Record` s in file order, never holding more than one
sample in memory. Sources do no decoding beyond text/JSON: images stay file paths or raw
bytes until a dataset decides to use them.

Broken input never raises out of a source. A line that is not JSON, a tar that ends
mid-member or a shard that does not exist becomes a ``Record`` with ``error`` set (a skip
reason) so that the dataset counts it -- and so that it still occupies its slot in the
record stream, which keeps sharding and resume positions independent of data quality.

Normalised ``fields`` per source:

* :class:`WebDatasetSource` and :class:`JsonlCaptionSource`: ``images`` (list of ``bytes`` or
  path), ``text`` (caption ``str`` or ``None``), ``meta`` (the sample's JSON object or ``{}``).
* :class:`ConversationSource`: ``images`` (list of paths), ``messages`` (raw message list).
* :class:`DPOSource`: ``images``, ``prompt`` (``str`` or message list), ``chosen``,
  ``rejected`` (``str``).
"""

from __future__ import annotations

import glob
import json
from abc import ABC, abstractmethod
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "ppm", "tif", "tiff"})
VIDEO_EXTENSIONS = frozenset({"mp4", "mkv", "webm", "avi", "mov"})
TEXT_EXTENSIONS = ("txt", "text", "caption")

# Skip reasons produced by sources (datasets add their own; see datasets.SkipReason).
BAD_JSON = "bad_json"
BAD_RECORD = "bad_record"
BAD_TEXT = "bad_text"
BAD_SHARD = "bad_shard"
MISSING_SHARD = "missing_shard"


@dataclass(frozen=True)
class Record:
    """One raw sample.

    ``key`` identifies it for logs (tar key, or ``file:line`` for JSONL); ``source`` is the
    shard it came from; ``fields`` is the normalised content (see module docstring).
    ``error`` is a skip reason when the sample could not even be parsed, with ``message``
    saying why; such records have empty ``fields``.
    """

    key: str
    source: str
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    message: str = ""


# --------------------------------------------------------------------------------------------
# Shard lists
# --------------------------------------------------------------------------------------------

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def _matching_brace(pattern: str, start: int) -> int:
    depth = 0
    for i in range(start, len(pattern)):
        if pattern[i] == "{":
            depth += 1
        elif pattern[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _split_top_level(body: str) -> list[str]:
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(body):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    parts.append(body[last:])
    return parts


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion, as used for webdataset shard lists.

    ``{000..003}`` -> zero-padded numeric range (padding kept when either bound has a leading
    zero; descending ranges count down), ``{a,b}`` -> alternatives; braces nest and repeat.
    A brace pair with neither a range nor a comma stays literal.

    >>> expand_braces("train-{00..02}.tar")
    ['train-00.tar', 'train-01.tar', 'train-02.tar']
    >>> expand_braces("{a,b}{1..2}")
    ['a1', 'a2', 'b1', 'b2']
    """
    start = pattern.find("{")
    while start != -1:
        end = _matching_brace(pattern, start)
        if end == -1:
            return [pattern]
        body = pattern[start + 1 : end]
        prefix, suffix = pattern[:start], pattern[end + 1 :]
        match = _RANGE.match(body)
        if match:
            lo, hi = match.group(1), match.group(2)
            a, b = int(lo), int(hi)
            padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (lo, hi))
            width = max(len(lo), len(hi)) if padded else 0
            step = 1 if b >= a else -1
            alternatives = [str(n).zfill(width) for n in range(a, b + step, step)]
        else:
            alternatives = _split_top_level(body)
            if len(alternatives) == 1:
                # Not an expansion (e.g. a literal "{x}"): keep it and look further right.
                start = pattern.find("{", start + 1)
                continue
        tails = expand_braces(suffix)
        return [prefix + head + tail for alt in alternatives for head in expand_braces(alt) for tail in tails]
    return [pattern]


def expand_urls(patterns: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard paths for one or more brace/glob patterns, in a deterministic order.

    Brace expansion runs first (keeping its order: ``{000..009}`` is already sorted); a result
    with glob characters is then globbed and sorted. Paths without glob characters are kept
    even if missing -- a gap in an img2dataset shard range is reported per shard
    (``missing_shard``) rather than silently shrinking the data. Raises ``FileNotFoundError``
    when nothing matches at all, which is a configuration error rather than bad data.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for expanded in expand_braces(os.fspath(pattern)):
            if glob.has_magic(expanded):
                urls.extend(sorted(glob.glob(expanded)))
            else:
                urls.append(expanded)
    if not any(os.path.exists(u) for u in urls):
        raise FileNotFoundError(f"no shard found for {patterns!r}")
    return urls


# --------------------------------------------------------------------------------------------
# WebDataset tar shards
# --------------------------------------------------------------------------------------------

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def split_key(member_name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member, webdataset's rule: the key is the path up to the
    first dot of the base name (``a.b/c.seg.jpg`` -> ``("a.b/c", "seg.jpg")``). ``None`` for
    names without an extension or whose base name starts with a dot (not sample members)."""
    match = _KEY_EXT.match(member_name)
    return (match.group(1), match.group(2)) if match else None


class WebDatasetSource:
    """Tar shards laid out as img2dataset/webdataset write them.

    Consecutive members sharing a key form one sample: ``key.jpg`` (or another image
    extension; several images as ``key.0.jpg``, ``key.1.jpg``... in member order), ``key.txt``
    (the caption) and/or ``key.json`` (metadata; its ``caption`` is used when there is no
    ``.txt``). Other members (``.parquet``, ``.npy``...) are ignored. Tars are read with
    ``tarfile`` in streaming mode (``r|*``: also ``.tar.gz``), one member at a time.

    Args:
        urls: brace/glob pattern(s), e.g. ``"images/train-{000000..000009}.tar"``.
    """

    def __init__(self, urls: str | os.PathLike | Iterable[str | os.PathLike]):
        self.shards = expand_urls(urls)

    def __iter__(self) -> Iterator[Record]:
        for shard in self.shards:
            yield from self.iter_shard(shard)

    def iter_shard(self, shard: str) -> Iterator[Record]:
        """The samples of one tar, in tar order; broken tars end with a ``bad_shard`` record."""
        if not os.path.exists(shard):
            yield Record(key=shard, source=shard, error=MISSING_SHARD, message=f"shard {shard} does not exist")
            return
        key, members, name = None, {}, ""
        try:
            with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    name = member.name
                    parts = split_key(name) if member.isfile() else None
                    if parts is None:
                        continue
                    member_key, ext = parts
                    if member_key != key:
                        if key is not None:
                            yield self._record(key, shard, members)
                        key, members = member_key, {}
                    members[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            # The sample being assembled may be incomplete: report it (or the shard) as bad.
            yield Record(
                key=key if key is not None else shard,
                source=shard,
                error=BAD_SHARD,
                message=f"{shard}: unreadable at or after member {name!r}: {exc}",
            )
            return
        if key is not None:
            yield self._record(key, shard, members)

    @staticmethod
    def _record(key: str, shard: str, members: dict[str, bytes]) -> Record:
        images = [data for ext, data in members.items() if ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
        videos = [data for ext, data in members.items() if ext.rsplit(".", 1)[-1].lower() in VIDEO_EXTENSIONS]
        try:
            meta = json.loads(members["json"]) if "json" in members else {}
            if not isinstance(meta, dict):
                raise ValueError(f"JSON metadata is a {type(meta).__name__}, not an object")
        except ValueError as exc:
            return Record(key=key, source=shard, error=BAD_JSON, message=f"{key}.json: {exc}")
        text = None
        for ext in TEXT_EXTENSIONS:
            if ext in members:
                try:
                    text = members[ext].decode("utf-8")
                except UnicodeDecodeError as exc:
                    return Record(key=key, source=shard, error=BAD_TEXT, message=f"{key}.{ext}: {exc}")
                break
        if text is None and isinstance(meta.get("caption"), str):
            text = meta["caption"]
        return Record(key=key, source=shard, fields={"images": images, "videos": videos, "text": text, "meta": meta})


# --------------------------------------------------------------------------------------------
# JSONL sources
# --------------------------------------------------------------------------------------------


class _JsonlSource(ABC):
    """One JSON object per line; image paths are relative to the JSONL file's folder (or
    ``image_root``). Blank lines are ignored; every other line is exactly one record."""

    def __init__(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        image_root: str | os.PathLike | None = None,
    ):
        self.shards = expand_urls(paths)
        self.image_root = None if image_root is None else os.fspath(image_root)

    def __iter__(self) -> Iterator[Record]:
        for shard in self.shards:
            yield from self.iter_shard(shard)

    def iter_shard(self, shard: str) -> Iterator[Record]:
        """The records of one JSONL file in line order."""
        if not os.path.exists(shard):
            yield Record(key=shard, source=shard, error=MISSING_SHARD, message=f"file {shard} does not exist")
            return
        root = self.image_root if self.image_root is not None else os.path.dirname(os.path.abspath(shard))
        name = os.path.basename(shard)
        # Binary mode: an invalid UTF-8 line must only spoil itself, not the rest of the file.
        with open(shard, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                key = f"{name}:{lineno}"
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    yield Record(key=key, source=shard, error=BAD_JSON, message=f"{key}: {exc}")
                    continue
                yield self._record(key, shard, obj, root)

    def _record(self, key: str, shard: str, obj: Any, root: str) -> Record:
        """One parsed JSON value -> its record (`bad_record` naming the problem)."""
        try:
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            fields = self._fields(obj, root)
        except (ValueError, TypeError) as exc:
            return Record(key=key, source=shard, error=BAD_RECORD, message=f"{key}: {exc}")
        return Record(key=key, source=shard, fields=fields)

    @abstractmethod
    def _fields(self, obj: dict, root: str) -> dict[str, Any]:
        """One parsed JSON object -> the record's fields (raise ValueError for bad records)."""

    @staticmethod
    def _images(obj: dict, root: str, *names: str) -> list[str]:
        """Absolute image paths from the first present field among ``names`` (str or list)."""
        for name in names:
            if name in obj and obj[name] is not None:
                value = obj[name]
                paths = [value] if isinstance(value, str) else value
                if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
                    raise ValueError(f"{name!r} must be a path or a list of paths")
                return [os.path.join(root, p) for p in paths]
        return []


class JsonlCaptionSource(_JsonlSource):
    """Image-caption manifest: ``{"image": "rel.jpg" | ["a.jpg", ...], "caption" | "text": str}``.

    A line without ``image`` is a text-only sample. Optional ``media_text`` (str): text that
    stands where the media's tokens go, before ``<|begin_of_text|>`` (see
    :class:`~llama_vision.data.datasets.CaptionDataset`).
    """

    def _fields(self, obj: dict, root: str) -> dict[str, Any]:
        text = obj.get("caption", obj.get("text"))
        if text is not None and not isinstance(text, str):
            raise ValueError("caption must be a string")
        media_text = obj.get("media_text")
        if media_text is not None and not isinstance(media_text, str):
            raise ValueError(f"media_text must be a string, got {type(media_text).__name__}")
        return {"images": self._images(obj, root, "image", "images"), "text": text, "media_text": media_text, "meta": obj}


class ConversationSource(_JsonlSource):
    """Chat samples: ``{"images": [...], "messages": [{"role", "content"}...]}``.

    ``content`` is either a string with ``<|image|>`` placeholders or a list of
    ``{"type": "text", "text": ...}`` / ``{"type": "image"}`` parts; messages are validated
    by the dataset.
    """

    def _fields(self, obj: dict, root: str) -> dict[str, Any]:
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        return {"images": self._images(obj, root, "images", "image"), "messages": messages}


class DPOSource(_JsonlSource):
    """Preference pairs: ``{"images": [...], "prompt": str | [messages], "chosen": str,
    "rejected": str}``."""

    def _fields(self, obj: dict, root: str) -> dict[str, Any]:
        prompt = obj.get("prompt")
        if not isinstance(prompt, (str, list)) or not prompt:
            raise ValueError("'prompt' must be a string or a non-empty message list")
        for name in ("chosen", "rejected"):
            if not isinstance(obj.get(name), str):
                raise ValueError(f"{name!r} must be a string")
        return {
            "images": self._images(obj, root, "images", "image"),
            "prompt": prompt,
            "chosen": obj["chosen"],
            "rejected": obj["rejected"],
        }
