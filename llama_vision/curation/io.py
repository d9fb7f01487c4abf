"""Reading input shards into row batches, and writing the curated WebDataset shards.

Inputs (by file name): WebDataset / img2dataset tar shards (``.tar``, ``.tar.gz``,
``.tgz``; read with :class:`llama_vision.data.sources.WebDatasetSource`, the trainer's own
reader), JSONL manifests (``.jsonl``: ``{"image" | "video": path, "caption": ...}``, paths
relative to the manifest) and parquet files (``.parquet``: img2dataset's parquet output or
any table with an image/video bytes column and a caption column).

A *batch* is a dict of equal-length numpy arrays (Ray Data's ``numpy`` batch format). The
reader's columns (:data:`READ_COLUMNS`):

    shard_id  int64    position of the input shard in the expanded --input list
    index     int64    position of the sample in its shard (records that failed to parse
                       keep their slot, so indices do not depend on data quality)
    key       str      the sample's key (tar key, ``file:line``, parquet ``key`` column)
    source    str      the input shard's path
    uid       uint64   stable hash of (shard file name, key): seeds per-sample random draws
    media     bytes    the encoded image or video (b"" when there is none)
    text      str      the caption ("" when there is none)
    meta      str      the sample's JSON metadata as text ("{}" when there is none)
    skip      str      why the sample cannot be used ("" when it can): bad_json, bad_shard,
                       missing_shard, missing_image, no_image, bad_image, bad_video, ...
    message   str      details for ``skip``
    last      bool     the shard's last row (the resume bookkeeping counts rows with it)

Broken input never raises here: it becomes a row with ``skip`` set, counted in the report.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from typing import Any, Iterator

import numpy as np

from llama_vision.data.sources import (
    BAD_SHARD,
    MISSING_SHARD,
    JsonlCaptionSource,
    Record,
    WebDatasetSource,
)

READ_COLUMNS = ("shard_id", "index", "key", "source", "uid", "media", "text", "meta", "skip", "message", "last")

NO_MEDIA = "no_media"
MULTIPLE_MEDIA = "multiple_media"
MISSING_MEDIA = "missing_media"
EMPTY_SHARD = "empty_shard"
BAD_PARQUET = "bad_parquet"

_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "bytes")
_VIDEO_COLUMNS = ("mp4", "webm", "mkv", "video")
_CAPTION_COLUMNS = ("caption", "txt", "text")


def sample_uid(source: str, key: str) -> int:
    """64-bit hash of (input file name, key): the same sample gets the same random draws
    wherever its shard lives and whichever worker reads it."""
    digest = hashlib.blake2b(f"{os.path.basename(source)}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _row(shard_id: int, index: int, key: str, source: str, media: bytes = b"", text: str = "", meta: Any = None,
         skip: str = "", message: str = "") -> dict:
    try:
        meta_text = json.dumps(meta if meta is not None else {}, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        meta_text = "{}"
    return {"shard_id": shard_id, "index": index, "key": key, "source": source, "uid": sample_uid(source, key),
            "media": media, "text": text or "", "meta": meta_text, "skip": skip, "message": message, "last": False}


def _record_row(record: Record, shard_id: int, index: int, modality: str, source: str) -> dict:
    """One parsed source record -> a row (media bytes read from disk for JSONL paths)."""
    if record.error:
        return _row(shard_id, index, record.key, source, skip=record.error, message=record.message)
    fields = record.fields
    media_list = fields.get("videos" if modality == "video" else "images") or []
    if not media_list:
        return _row(shard_id, index, record.key, source, text=fields.get("text") or "", meta=fields.get("meta"),
                    skip=NO_MEDIA, message=f"sample has no {modality}")
    if len(media_list) > 1:
        return _row(shard_id, index, record.key, source, text=fields.get("text") or "", meta=fields.get("meta"),
                    skip=MULTIPLE_MEDIA, message=f"sample has {len(media_list)} {modality}s; curation takes one")
    media = media_list[0]
    if isinstance(media, str):
        try:
            with open(media, "rb") as f:
                media = f.read()
        except OSError as exc:
            return _row(shard_id, index, record.key, source, text=fields.get("text") or "", meta=fields.get("meta"),
                        skip=MISSING_MEDIA, message=f"{media}: {exc}")
    return _row(shard_id, index, record.key, source, media=bytes(media), text=fields.get("text") or "",
                meta=fields.get("meta"))


def _jsonl_source(path: str, modality: str):
    if modality == "video":
        from llama_vision.data.video_dataset import JsonlVideoSource

        return JsonlVideoSource(path)
    return JsonlCaptionSource(path)


def _iter_parquet(path: str, shard_id: int, modality: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 -- any pyarrow failure is a bad file, counted
        yield _row(shard_id, 0, path, path, skip=BAD_PARQUET, message=f"{path}: {exc}")
        return
    names = pf.schema_arrow.names
    media_col = next((c for c in (_VIDEO_COLUMNS if modality == "video" else _IMAGE_COLUMNS) if c in names), None)
    text_col = next((c for c in _CAPTION_COLUMNS if c in names), None)
    if media_col is None:
        wanted = ", ".join(_VIDEO_COLUMNS if modality == "video" else _IMAGE_COLUMNS)
        yield _row(shard_id, 0, path, path, skip=BAD_PARQUET, message=f"{path}: no {modality} column (one of {wanted})")
        return
    index = 0
    try:
        for batch in pf.iter_batches(batch_size=256):
            for rec in batch.to_pylist():
                key = str(rec.get("key") if rec.get("key") is not None else f"{index:09d}")
                media = rec.get(media_col)
                if isinstance(media, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
                    media = media.get("bytes")
                text = rec.get(text_col) if text_col else None
                meta = {k: v for k, v in rec.items() if k not in (media_col, text_col) and not isinstance(v, (bytes, bytearray))}
                if not media:
                    yield _row(shard_id, index, key, path, text=text if isinstance(text, str) else "", meta=meta,
                               skip=NO_MEDIA, message=f"{key}: empty {media_col}")
                else:
                    yield _row(shard_id, index, key, path, media=bytes(media), text=text if isinstance(text, str) else "",
                               meta=meta)
                index += 1
    except Exception as exc:  # noqa: BLE001 -- a damaged row group ends the file, counted
        yield _row(shard_id, index, path, path, skip=BAD_PARQUET, message=f"{path}: unreadable after row {index}: {exc}")


# WebDatasetSource.iter_shard reads the one tar it is given (a missing one becomes a
# missing_shard record); constructing a source would re-expand and glob the path instead.
_TAR_READER = WebDatasetSource.__new__(WebDatasetSource)


def iter_shard_rows(path: str, shard_id: int, modality: str) -> Iterator[dict]:
    """Every sample of one input file as a row dict (see the module docstring), in file order."""
    lower = path.lower()
    if lower.endswith(".parquet"):
        rows = _iter_parquet(path, shard_id, modality)
    elif lower.endswith(".jsonl"):
        source = _jsonl_source(path, modality) if os.path.exists(path) else None
        if source is None:
            rows = iter([_row(shard_id, 0, path, path, skip=MISSING_SHARD, message=f"file {path} does not exist")])
        else:
            rows = (_record_row(r, shard_id, i, modality, path) for i, r in enumerate(source.iter_shard(path)))
    else:
        rows = (_record_row(r, shard_id, i, modality, path) for i, r in enumerate(_TAR_READER.iter_shard(path)))
    yield from rows


def read_shard_batches(shard: dict, modality: str, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch generator: one input shard ``{"shard_id", "path"}`` -> row batches of
    at most ``batch_size`` rows, the final row flagged ``last``. An empty shard yields one
    ``empty_shard`` row so that it, too, is counted and marked done."""
    shard_id, path = int(shard["shard_id"]), str(shard["path"])
    pending: list[dict] = []
    count = 0
    for row in iter_shard_rows(path, shard_id, modality):
        row["index"] = count  # the slot, even when a record had to be re-numbered (parquet errors)
        count += 1
        pending.append(row)
        if len(pending) > batch_size:  # keep one back so that the last row can be flagged
            yield rows_to_batch(pending[:batch_size])
            pending = pending[batch_size:]
    if count == 0:
        pending = [_row(shard_id, 0, path, path, skip=EMPTY_SHARD, message=f"{path} has no samples")]
    pending[-1]["last"] = True
    yield rows_to_batch(pending)


def rows_to_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Row dicts -> a numpy batch of READ_COLUMNS (object arrays for str/bytes)."""
    batch: dict[str, np.ndarray] = {}
    for name in READ_COLUMNS:
        values = [r[name] for r in rows]
        if name in ("shard_id", "index"):
            batch[name] = np.asarray(values, dtype=np.int64)
        elif name == "uid":
            batch[name] = np.asarray(values, dtype=np.uint64)
        elif name == "last":
            batch[name] = np.asarray(values, dtype=bool)
        else:
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            batch[name] = arr
    return batch


# --------------------------------------------------------------------------- media types


def sniff_video_ext(data: bytes) -> str:
    """Container extension of encoded video bytes (the trainer picks members by extension)."""
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "webm" if b"webm" in data[:64] else "mkv"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    if data[4:8] == b"ftyp" and data[8:10] == b"qt":
        return "mov"
    return "mp4"


IMAGE_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "PPM": "ppm"}

# --------------------------------------------------------------------------- output shards

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-/]+$")


def output_key(key: str, index: int) -> str:
    """A tar member key the WebDataset reader splits back correctly (no dots, no odd
    characters); other keys (``file.jsonl:12``) become the sample's index."""
    key = key.strip("/")
    return key if key and _SAFE_KEY.match(key) else f"{index:09d}"


def write_wds_shard(path: str, samples: list[dict]) -> None:
    """Write a WebDataset tar atomically: per sample ``<key>.<ext>`` (the media bytes as
    read), ``<key>.txt`` (caption) and ``<key>.json`` (metadata), in the given order.

    samples: ``{"key", "ext", "media": bytes, "text": str, "meta": dict}``."""
    from llama_vision.utils.io import atomic_open

    with atomic_open(path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, data in ((s["ext"], s["media"]), ("txt", s["text"].encode("utf-8")),
                              ("json", json.dumps(s["meta"], ensure_ascii=False, sort_keys=True).encode("utf-8"))):
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: same input, same bytes
                tar.addfile(info, io.BytesIO(data))


def expand_inputs(patterns: str | list[str]) -> list[str]:
    """The input shards of ``--input`` (brace and glob patterns; llama_vision's expand_urls)."""
    from llama_vision.data.sources import expand_urls

    return expand_urls(patterns)


__all__ = [
    "BAD_PARQUET",
    "BAD_SHARD",
    "EMPTY_SHARD",
    "IMAGE_FORMAT_EXT",
    "MISSING_MEDIA",
    "MISSING_SHARD",
    "MULTIPLE_MEDIA",
    "NO_MEDIA",
    "READ_COLUMNS",
    "expand_inputs",
    "iter_shard_rows",
    "output_key",
    "read_shard_batches",
    "rows_to_batch",
    "sample_uid",
    "sniff_video_ext",
    "write_wds_shard",
]
