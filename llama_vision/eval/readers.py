"""Readers that turn benchmark files on local disk into :class:`EvalSample` lists.

Nothing is downloaded: every reader takes the ``data:`` mapping of a task YAML (``spec``)
and the data root (``--data-root``) that its relative paths are resolved against, and
returns the task's samples in file order. :func:`read_samples` dispatches on
``spec["format"]``:

``hf_parquet``
    Hugging Face ``datasets`` data as published on the Hub (one parquet file, or a folder of
    them searched recursively, e.g. a snapshot's ``data/validation-00000-of-00002.parquet``
    or MMMU's ``<Subject>/validation-*.parquet``) or a ``datasets.save_to_disk`` folder
    (arrow shards listed in ``state.json``; a ``dataset_dict.json`` folder holds one such
    folder per split). Keys: ``path``, optional ``split`` (keeps the files whose name is
    ``<split>-...``/``<split>.parquet`` or that lie under a ``<split>`` folder), ``preset``
    (one of :data:`READER_PRESETS`), ``columns`` (see :data:`COLUMN_KEYS`; merged over the
    preset; without preset and columns they are inferred from the schema) and ``limit``.
    Tables are read with pyarrow a record batch at a time, only the columns in use.
``vqav2_json``
    The official VQA files: ``questions`` (``v2_OpenEnded_mscoco_<subtype>_questions.json``),
    optional ``annotations`` (``v2_mscoco_<subtype>_annotations.json``; without it, e.g. for
    test-dev, every sample has ``answers == []``), ``images`` (folder) and optional
    ``image_pattern`` (default ``COCO_{data_subtype}_{image_id:012d}.jpg``, the subtype
    taken from the questions file, ``test-dev2015`` images living in ``test2015``).
``docvqa_json``
    The official DocVQA single-page JSON (``path``); its ``image`` entries
    (``documents/xxx.png``) are relative to the JSON's folder or to ``images`` if given.
``chartqa_json``
    The official ChartQA files (``files``: a list, or ``path``: one), lists of
    ``{"imgname", "query", "label"}``; images in ``images`` (default: the ``png`` folder
    beside each file). ``id = "<file stem>/<index>"``, ``meta["source"]`` is ``human`` or
    ``augmented``.
``jsonl``
    Generic: one object per line (``path``) with optional ``id`` (default: the 1-based line
    number), ``image`` (a path or a list of paths) and/or ``video`` (a path), ``question``,
    ``answers`` (a list, or one string) and optional ``choices`` with the gold ``answer``
    given as a letter, a 0-based index or the choice text. Media paths are relative to the
    file's folder (or to ``media_root``); all other fields go to ``meta``.

Every reader also accepts ``limit`` (keep the first N samples).

Malformed data (a missing file, column or field, an answer that is not one of the choices)
raises ``FileNotFoundError`` / ``ValueError`` naming the file, the row or line and the key.
Images, however, are never decoded while reading: a sample only carries references
(:data:`ImageRef`), so a corrupt or missing image cannot stop a task from being read. The
runner opens them with :func:`open_image` / :func:`load_images`, which raise
:class:`~llama_vision.data.image_io.ImageLoadError` naming the image (file, or parquet
file + row + column) and the sample, and counts those failures per task. A ``video`` path
is passed on as is, whether or not the file exists.

Note that ``hf_parquet`` samples hold the encoded image bytes in memory (as the published
parquet files embed them); use ``limit`` for quick runs on the large sets.
"""

from __future__ import annotations

import ast
import json
import os
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image

from llama_vision.data.image_io import ImageLoadError, load_image

__all__ = [
    "COLUMN_KEYS",
    "EvalSample",
    "ImageBytes",
    "ImageRef",
    "MissingImage",
    "READERS",
    "READER_PRESETS",
    "load_images",
    "open_image",
    "read_chartqa_json",
    "read_docvqa_json",
    "read_hf_parquet",
    "read_jsonl",
    "read_samples",
    "read_vqav2_json",
]

LETTERS = string.ascii_uppercase


# --------------------------------------------------------------------------- image refs


class ImageBytes(bytes):
    """Encoded image bytes that remember where they came from (``source``), so that a
    decoding error can name the parquet file, row and column. Behaves as ``bytes``."""

    source: str | None

    def __new__(cls, data: bytes, source: str | None = None) -> "ImageBytes":
        obj = super().__new__(cls, data)
        obj.source = source
        return obj

    def __reduce__(self):
        return (ImageBytes, (bytes(self), self.source))

    def __repr__(self) -> str:
        return f"ImageBytes(<{len(self)} bytes>, source={self.source!r})"


class MissingImage(str):
    """An image the data refers to but does not contain (e.g. a null image cell).

    It is a ``str`` (a path that names no file) so that it fits :data:`ImageRef`;
    :func:`open_image` raises ``ImageLoadError`` with ``reason`` for it.
    """

    reason: str

    def __new__(cls, source: str, reason: str) -> "MissingImage":
        obj = super().__new__(cls, f"<missing image: {source}>")
        obj.source = source
        obj.reason = reason
        return obj

    def __reduce__(self):
        return (MissingImage, (self.source, self.reason))


ImageRef = Union[bytes, str]
"""Raw encoded image bytes, or an absolute file path."""


@dataclass
class EvalSample:
    """One question of an evaluation task."""

    id: str  # unique within the task (string form of question_id etc.)
    question: str
    answers: list[str]  # references; for multiple-choice tasks: [gold letter "A".."Z"]
    choices: list[str] | None = None  # option texts in order (A, B, C, ...) for MC tasks
    images: list[ImageRef] = field(default_factory=list)  # zero or more, in prompt order
    video: str | None = None  # absolute path of a video file
    meta: dict = field(default_factory=dict)  # e.g. question_type for MMMU, original fields


def open_image(ref: ImageRef) -> Image.Image:
    """Decode one image reference into an RGB PIL image.

    Raises:
        ImageLoadError: the file is missing or the data is corrupt; the message names the
            file, or for in-memory bytes the parquet file, row and column they came from.
    """
    if isinstance(ref, MissingImage):
        raise ImageLoadError(f"cannot load image {ref.source}: {ref.reason}", source=ref.source, cause=ref.reason)
    if not isinstance(ref, (bytes, bytearray, memoryview, str, os.PathLike)):
        raise TypeError(f"an image reference is bytes or a path, got {type(ref).__name__}")
    source = getattr(ref, "source", None)
    try:
        return load_image(ref)
    except ImageLoadError as error:
        if source is None:
            raise
        cause = error.cause if error.cause is not None else str(error)
        raise ImageLoadError.from_cause(source, cause) from None


def load_images(sample: EvalSample) -> list[Image.Image]:
    """Decode all images of ``sample`` in prompt order.

    Raises:
        ImageLoadError: for the first image that cannot be loaded; the message names the
            sample id and the image (its ``source`` attribute is the image's name).
    """
    images = []
    for index, ref in enumerate(sample.images):
        try:
            images.append(open_image(ref))
        except ImageLoadError as error:
            raise ImageLoadError(
                f"sample {sample.id!r}: image {index + 1} of {len(sample.images)}: {error}",
                source=error.source,
                cause=error.cause,
            ) from None
    return images


# --------------------------------------------------------------------------- helpers


def _abs(root: Path, value: str | os.PathLike) -> Path:
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(root) / path
    return Path(os.path.abspath(path))


def _require(spec: dict, key: str, fmt: str) -> Any:
    if key not in spec or spec[key] in (None, ""):
        raise ValueError(f"data spec of format {fmt!r} needs {key!r}; got keys {sorted(spec)}")
    return spec[key]


def _existing_file(path: Path, what: str) -> Path:
    if not path.is_file():
        where = "is not a file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"{what} {str(path)!r} {where}")
    return path


def _load_json(path: Path, what: str) -> Any:
    _existing_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({what}): {error}") from None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _as_text(value: Any, where: str, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key!r} must be a string, got {_type_name(value)} {value!r:.80}")
    return str(value)


def _as_answer_list(value: Any, where: str, key: str, field_name: str = "answer") -> list[str]:
    """A reference list from a list of strings/numbers, a list of ``{field_name: ...}``
    structs (VQAv2), one string, or null (no references)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        out = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                if field_name not in item:
                    raise ValueError(
                        f"{where}: {key}[{i}] is a struct without {field_name!r}; has {sorted(item)}"
                    )
                item = item[field_name]
            out.append(_as_text(item, where, f"{key}[{i}]"))
        return out
    return [_as_text(value, where, key)]


def _as_choices(value: Any, where: str, key: str) -> list[str]:
    """Option texts from a list, or from the string repr of a python list (MMMU)."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{where}: {key!r} must be a list or the repr of a list, got {value!r:.120}") from None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: {key!r} must be a list of option texts, got {_type_name(value)}")
    if len(value) > len(LETTERS):
        raise ValueError(f"{where}: {key!r} has {len(value)} options; at most {len(LETTERS)} are supported")
    return [_as_text(v, where, f"{key}[{i}]") for i, v in enumerate(value)]


def _gold_letter(answer: Any, choices: list[str], answer_format: str, where: str, key: str) -> str:
    """Normalise a multiple-choice gold answer to its letter.

    ``answer_format``: ``"index"`` (0-based, int or digit string), ``"letter"`` ("A"..),
    ``"text"`` (one of the choice texts) or ``"auto"``: an int is an index; a string is a
    letter if it is one letter within range, else a choice text if it equals one (after
    stripping), else an index if it is a digit string.
    """
    n = len(choices)
    expected = f"expected a {answer_format} answer for {n} choices {choices!r:.200}"

    def from_index(v: Any) -> str | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v.strip())
        if isinstance(v, int) and 0 <= v < n:
            return LETTERS[v]
        return None

    def from_letter(v: Any) -> str | None:
        if isinstance(v, str):
            s = v.strip().strip("()").strip().rstrip(".").upper()
            if len(s) == 1 and s in LETTERS[:n]:
                return s
        return None

    def from_text(v: Any) -> str | None:
        if isinstance(v, str):
            stripped = [c.strip() for c in choices]
            if v.strip() in stripped:
                return LETTERS[stripped.index(v.strip())]
        return None

    if answer_format == "index":
        letter = from_index(answer)
    elif answer_format == "letter":
        letter = from_letter(answer)
    elif answer_format == "text":
        letter = from_text(answer)
    elif answer_format == "auto":
        if isinstance(answer, int) and not isinstance(answer, bool):
            letter = from_index(answer)
        else:
            letter = from_letter(answer) or from_text(answer) or from_index(answer)
    else:
        raise ValueError(f"answer_format must be one of 'index', 'letter', 'text', 'auto'; got {answer_format!r}")
    if letter is None:
        raise ValueError(f"{where}: {key!r}: {expected}, got {answer!r:.120}")
    return letter


def _check_unique(samples: list[EvalSample], what: str) -> None:
    seen: dict[str, int] = {}
    for index, sample in enumerate(samples):
        if sample.id in seen:
            raise ValueError(
                f"{what}: sample id {sample.id!r} occurs twice (samples {seen[sample.id]} and {index}); "
                "ids must be unique within a task"
            )
        seen[sample.id] = index


def _limit(spec: dict) -> int | None:
    limit = spec.get("limit")
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"data spec 'limit' must be a non-negative integer, got {limit!r}")
    return limit


# --------------------------------------------------------------------------- hf_parquet

COLUMN_KEYS: dict[str, str] = {
    "id": "column holding the sample id (null: the row index over all files read)",
    "question": "column holding the question text",
    "answers": "column of references: list[str], list of structs (see answer_field), or a string",
    "answer_field": "field of each struct in an 'answers' list of structs (default 'answer')",
    "answer": "column of one answer (a string; the gold for MC tasks); use instead of 'answers'",
    "answer_format": "how a MC gold answer is given: 'index' (0-based), 'letter', 'text' or 'auto'",
    "answers_literal": "parse answers written as the repr of a python list (MMMU open questions)",
    "unanswered": "answer values that mean 'no reference' (e.g. MMMU test '?'), read as answers []",
    "choices": "column of option texts (list[str] or the repr of a python list); makes it MC",
    "question_type": "column whose value 'open' marks a row as open-ended (MMMU); copied to meta",
    "images": "list of image columns (struct{bytes,path}, binary or path string), in order",
    "null_images": "a null image cell is 'missing' (a load error at run time) or 'skip'ped",
    "image_placeholders": "order images by their '<image N>' placeholders in question/choices",
    "meta": "columns copied into meta when present",
}

_MMMU_IMAGES = [f"image_{i}" for i in range(1, 8)]

READER_PRESETS: dict[str, dict[str, Any]] = {
    # lmms-lab/VQAv2: answers = 10 {answer, answer_confidence, answer_id} structs.
    "vqav2": {
        "id": "question_id",
        "question": "question",
        "answers": "answers",
        "answer_field": "answer",
        "images": ["image"],
        "meta": ["question_type", "answer_type", "multiple_choice_answer", "image_id"],
    },
    # lmms-lab/textvqa: answers = list[str] (10).
    "textvqa": {
        "id": "question_id",
        "question": "question",
        "answers": "answers",
        "images": ["image"],
        "meta": ["image_id", "set_name", "ocr_tokens"],
    },
    # lmms-lab/DocVQA (config DocVQA): answers = list[str] (null on test).
    "docvqa": {
        "id": "questionId",
        "question": "question",
        "answers": "answers",
        "images": ["image"],
        "meta": ["question_types", "docId", "ucsf_document_id", "ucsf_document_page_no", "data_split"],
    },
    # lmms-lab/ChartQA: one answer string, type human/augmented, no id column.
    "chartqa": {
        "id": None,
        "question": "question",
        "answer": "answer",
        "images": ["image"],
        "meta": ["type"],
    },
    # lmms-lab/ai2d: options list[str], answer = 0-based index as a string, no id column.
    "ai2d": {
        "id": None,
        "question": "question",
        "choices": "options",
        "answer": "answer",
        "answer_format": "index",
        "images": ["image"],
    },
    # MMMU/MMMU: options = repr of a list, answer = letter (MC) or text (open),
    # image_1..image_7 (mostly null), "<image N>" placeholders in question and options.
    "mmmu": {
        "id": "id",
        "question": "question",
        "choices": "options",
        "answer": "answer",
        "answer_format": "letter",
        "answers_literal": True,
        "unanswered": ["?"],
        "question_type": "question_type",
        "images": _MMMU_IMAGES,
        "null_images": "skip",
        "image_placeholders": True,
        "meta": ["subfield", "topic_difficulty", "img_type", "explanation"],
    },
}

_COLUMN_DEFAULTS: dict[str, Any] = {
    "id": None,
    "question": "question",
    "answers": None,
    "answer_field": "answer",
    "answer": None,
    "answer_format": "auto",
    "answers_literal": False,
    "unanswered": [],
    "choices": None,
    "question_type": None,
    "images": [],
    "null_images": "missing",
    "image_placeholders": False,
    "meta": [],
}

_COLUMN_ROLES = ("id", "question", "answers", "answer", "choices", "question_type")
_PLACEHOLDER = re.compile(r"<image (\d+)>")
_HF_SHARD = re.compile(r"^(?P<split>.+?)(-\d{5}-of-\d{5})?\.(parquet|arrow)$")


def _infer_columns(names: list[str]) -> dict[str, Any]:
    """Column mapping guessed from a schema's column names (no preset, no columns)."""
    present = set(names)

    def first(*options: str) -> str | None:
        return next((o for o in options if o in present), None)

    numbered = sorted(
        (n for n in names if re.fullmatch(r"image_\d+", n)), key=lambda n: int(n.split("_")[1])
    )
    images = (["image"] if "image" in present else []) + numbered
    cols: dict[str, Any] = {
        "id": first("id", "question_id", "questionId", "qid"),
        "question": first("question", "query") or "question",
        "answers": first("answers"),
        "answer": None if "answers" in present else first("answer", "label"),
        "choices": first("options", "choices"),
        "question_type": "question_type" if first("options", "choices") and "question_type" in present else None,
        "images": images,
        "null_images": "skip" if numbered else "missing",
        "image_placeholders": bool(numbered),
    }
    used = {v for v in cols.values() if isinstance(v, str)} | set(images)
    cols["meta"] = [n for n in names if n not in used]
    return cols


def _resolve_columns(spec: dict) -> dict[str, Any] | None:
    """The columns mapping of a spec: preset merged with ``columns``; None means infer."""
    preset = spec.get("preset")
    user = spec.get("columns") or {}
    if not isinstance(user, dict):
        raise ValueError(f"data spec 'columns' must be a mapping, got {_type_name(user)}")
    unknown = sorted(set(user) - set(COLUMN_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in data spec 'columns'; valid keys: {sorted(COLUMN_KEYS)}")
    if preset is None and not user:
        return None
    base: dict[str, Any] = dict(_COLUMN_DEFAULTS)
    if preset is not None:
        if preset not in READER_PRESETS:
            raise ValueError(f"unknown reader preset {preset!r}; known: {sorted(READER_PRESETS)}")
        base.update(READER_PRESETS[preset])
    # One reference column: stating one of answers/answer replaces the other.
    if "answer" in user and "answers" not in user:
        base["answers"] = None
    if "answers" in user and "answer" not in user:
        base["answer"] = None
    base.update(user)
    return base


def _validate_columns(cols: dict[str, Any]) -> None:
    if cols.get("answers") and cols.get("answer"):
        raise ValueError(
            f"columns: set only one of 'answers' ({cols['answers']!r}) and 'answer' ({cols['answer']!r})"
        )
    if not cols.get("question"):
        raise ValueError("columns: 'question' must name a column")
    images = cols.get("images") or []
    if isinstance(images, str):
        cols["images"] = [images]
    elif not isinstance(images, (list, tuple)) or not all(isinstance(c, str) for c in images):
        raise ValueError(f"columns: 'images' must be a list of column names, got {images!r}")
    if cols.get("null_images") not in ("missing", "skip"):
        raise ValueError(f"columns: 'null_images' must be 'missing' or 'skip', got {cols.get('null_images')!r}")
    meta = cols.get("meta") or []
    if isinstance(meta, str):
        cols["meta"] = [meta]
    unanswered = cols.get("unanswered") or []
    cols["unanswered"] = [unanswered] if isinstance(unanswered, str) else list(unanswered)
    if cols.get("answer_format", "auto") not in ("index", "letter", "text", "auto"):
        raise ValueError(
            f"columns: 'answer_format' must be 'index', 'letter', 'text' or 'auto', got {cols['answer_format']!r}"
        )


def _split_of(rel: Path) -> str | None:
    match = _HF_SHARD.match(rel.name)
    return match.group("split") if match else None


def _matches_split(rel: Path, split: str) -> bool:
    name = rel.name
    return (
        split in rel.parts[:-1]
        or name.startswith(split + "-")
        or name.startswith(split + ".")
    )


def _is_saved_dataset(folder: Path) -> bool:
    """A ``Dataset.save_to_disk`` folder: ``state.json`` (listing the arrow shards) and
    ``dataset_info.json``."""
    return (folder / "state.json").is_file()


def _table_files(path: Path, split: str | None) -> tuple[list[Path], str]:
    """-> (files, kind) with kind 'parquet' or 'arrow' (datasets.save_to_disk shards)."""
    if path.is_file():
        return [path], "arrow" if path.suffix == ".arrow" else "parquet"
    if not path.is_dir():
        raise FileNotFoundError(f"hf_parquet path {str(path)!r} does not exist")
    if split and (path / split).is_dir():
        return _table_files(path / split, None)
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split is None and len(splits) == 1:
            return _table_files(path / splits[0], None)
        raise ValueError(
            f"{path} is a saved DatasetDict with splits {splits}; "
            + (f"split {split!r} is not among them" if split else "give 'split'")
        )
    if _is_saved_dataset(path):
        state = _load_json(path / "state.json", "datasets state file")
        names = [entry["filename"] for entry in state.get("_data_files", [])]
        if not names:
            raise ValueError(f"{path / 'state.json'}: lists no '_data_files'")
        return [_existing_file(path / n, "arrow shard listed in state.json") for n in names], "arrow"
    files = sorted(
        p
        for p in path.rglob("*.parquet")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise FileNotFoundError(f"no parquet files under {str(path)!r}")
    rels = [f.relative_to(path) for f in files]
    if split is not None:
        kept = [f for f, rel in zip(files, rels) if _matches_split(rel, split)]
        if not kept:
            found = sorted({s for s in map(_split_of, rels) if s})
            raise FileNotFoundError(
                f"no parquet files of split {split!r} under {str(path)!r} (splits seen in file names: {found})"
            )
        return kept, "parquet"
    sharded = {_split_of(r) for r in rels if re.search(r"-\d{5}-of-\d{5}\.parquet$", r.name)}
    if len(sharded) > 1:
        raise ValueError(
            f"parquet files under {str(path)!r} hold several splits {sorted(sharded)}; give 'split'"
        )
    return files, "parquet"


def _open_table(path: Path, kind: str):
    """-> (column names, function(columns) -> iterator of record batches)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "parquet":
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"{path}: not a readable parquet file: {error}") from None
        names = parquet.schema_arrow.names

        def batches(columns: list[str]) -> Iterator[Any]:
            yield from parquet.iter_batches(batch_size=64, columns=columns)

        return names, batches

    def open_reader(source):
        try:
            return pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source)

    with pa.memory_map(str(path)) as source:
        try:
            names = open_reader(source).schema.names
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"{path}: not a readable arrow file: {error}") from None

    def arrow_batches(columns: list[str]) -> Iterator[Any]:
        with pa.memory_map(str(path)) as src:
            reader = open_reader(src)
            batch_iter = reader if hasattr(reader, "read_next_batch") else (
                reader.get_batch(i) for i in range(reader.num_record_batches)
            )
            for batch in batch_iter:
                idx = [batch.schema.get_field_index(c) for c in columns]
                yield pa.RecordBatch.from_arrays([batch.column(i) for i in idx], names=columns)

    return names, arrow_batches


class _HFRowReader:
    """Converts one table row (a dict of python values) into an EvalSample."""

    def __init__(self, cols: dict[str, Any], file: Path, root: Path, dataset_dir: Path):
        self.cols = cols
        self.file = file
        self.root = root
        self.dataset_dir = dataset_dir

    def image_ref(self, value: Any, column: str, row: int, required: bool) -> ImageRef | None:
        source = f"{self.file} row {row} column {column!r}"
        if isinstance(value, dict):
            data, rel = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data, rel = value, None
        elif isinstance(value, str):
            data, rel = None, value
        elif value is None:
            data, rel = None, None
        else:
            raise ValueError(
                f"{source}: an image cell must be struct{{bytes, path}}, binary or a path, got {_type_name(value)}"
            )
        if data is not None:
            return ImageBytes(bytes(data), source)
        if rel:
            path = Path(rel)
            if path.is_absolute():
                return str(path)
            candidates = [self.file.parent / path, self.dataset_dir / path, self.root / path]
            found = next((c for c in candidates if c.is_file()), candidates[0])
            return os.path.abspath(found)
        return MissingImage(source, "the image cell is empty (no bytes and no path)") if required else None

    def sample(self, row: dict[str, Any], index: int, global_index: int) -> EvalSample:
        c = self.cols
        where = f"{self.file} row {index}"
        id_value = row[c["id"]] if c["id"] else global_index
        if id_value is None:
            raise ValueError(f"{where}: id column {c['id']!r} is null")
        question = _as_text(row[c["question"]], where, c["question"])
        meta: dict[str, Any] = {"file": str(self.file), "row": index}
        for name in c["meta"]:
            if name in row:
                meta[name] = row[name]

        qtype = row[c["question_type"]] if c["question_type"] else None
        if c["question_type"]:
            meta["question_type"] = qtype
        choices = None
        if c["choices"] and not (isinstance(qtype, str) and qtype.strip().lower() == "open"):
            choices = _as_choices(row[c["choices"]], where, c["choices"]) or None

        answer_col = c["answer"] or c["answers"]
        raw = row[answer_col] if answer_col else None
        if raw in c["unanswered"] or raw == "":
            raw = None
        if choices is not None:
            if raw is None:
                answers = []
            else:
                if isinstance(raw, (list, tuple)):
                    if len(raw) != 1:
                        raise ValueError(f"{where}: {answer_col!r}: expected one gold answer, got {raw!r:.120}")
                    raw = raw[0]
                answers = [_gold_letter(raw, choices, c["answer_format"], where, answer_col)]
        else:
            if c["answers_literal"] and isinstance(raw, str) and raw.strip().startswith("["):
                try:
                    parsed = ast.literal_eval(raw.strip())
                    if isinstance(parsed, list):
                        raw = parsed
                except (ValueError, SyntaxError):
                    pass
            answers = _as_answer_list(raw, where, answer_col or "answers", c["answer_field"] or "answer")

        images = self.images(row, index, question, choices, meta)
        return EvalSample(
            id=str(id_value), question=question, answers=answers, choices=choices, images=images, meta=meta
        )

    def images(
        self, row: dict[str, Any], index: int, question: str, choices: list[str] | None, meta: dict
    ) -> list[ImageRef]:
        c = self.cols
        columns: list[str] = list(c["images"])
        required = [c["null_images"] == "missing"] * len(columns)
        order = list(range(len(columns)))
        if c["image_placeholders"]:
            referenced: list[int] = []
            for text in [question, *(choices or [])]:
                for match in _PLACEHOLDER.finditer(text):
                    n = int(match.group(1)) - 1
                    if n not in referenced:
                        referenced.append(n)
            for n in referenced:
                if n >= len(columns):
                    raise ValueError(
                        f"{self.file} row {index}: the text refers to <image {n + 1}> "
                        f"but only {len(columns)} image columns are configured"
                    )
                required[n] = True
            order = referenced + [i for i in order if i not in referenced]
        refs: list[ImageRef] = []
        used: list[str] = []
        for i in order:
            ref = self.image_ref(row[columns[i]], columns[i], index, required[i])
            if ref is not None:
                refs.append(ref)
                used.append(columns[i])
        if len(columns) > 1:
            meta["image_columns"] = used
        return refs


def read_hf_parquet(spec: dict, root: Path) -> list[EvalSample]:
    """Read Hugging Face parquet files or a ``datasets.save_to_disk`` folder (see module doc)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("format 'hf_parquet' needs pyarrow: pip install pyarrow") from None
    root = Path(root)
    path = _abs(root, _require(spec, "path", "hf_parquet"))
    split = spec.get("split")
    limit = _limit(spec)
    configured = _resolve_columns(spec)
    files, kind = _table_files(path, split)
    dataset_dir = path if path.is_dir() else path.parent

    samples: list[EvalSample] = []
    global_index = 0
    for file in files:
        if limit is not None and len(samples) >= limit:
            break
        names, batches = _open_table(file, kind)
        cols = dict(configured) if configured is not None else {**_COLUMN_DEFAULTS, **_infer_columns(names)}
        _validate_columns(cols)
        wanted = [(k, cols[k]) for k in _COLUMN_ROLES if cols.get(k)] + [("images", c) for c in cols["images"]]
        for key, column in wanted:
            if column not in names:
                raise ValueError(
                    f"{file}: column {column!r} (columns.{key}) not found; the file has columns {names}"
                )
        needed = [column for _, column in wanted] + [m for m in cols["meta"] if m in names]
        needed = list(dict.fromkeys(needed))
        rows = _HFRowReader(cols, file, root, dataset_dir)
        index = 0
        for batch in batches(needed):
            values = {name: batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}
            for r in range(batch.num_rows):
                if limit is not None and len(samples) >= limit:
                    break
                samples.append(rows.sample({n: v[r] for n, v in values.items()}, index, global_index))
                index += 1
                global_index += 1
            del values
            if limit is not None and len(samples) >= limit:
                break
    return samples


# --------------------------------------------------------------------------- official JSON


def _field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {_type_name(obj)}")
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r}; has {sorted(obj)}")
    return obj[key]


def read_vqav2_json(spec: dict, root: Path) -> list[EvalSample]:
    """Read the official VQA v2 questions (+ annotations) files and a COCO image folder."""
    root = Path(root)
    qpath = _abs(root, _require(spec, "questions", "vqav2_json"))
    images = _abs(root, _require(spec, "images", "vqav2_json"))
    qdata = _load_json(qpath, "VQAv2 questions file")
    questions = _field(qdata, "questions", str(qpath))
    if not isinstance(questions, list):
        raise ValueError(f"{qpath}: 'questions' must be a list, got {_type_name(questions)}")
    subtype = qdata.get("data_subtype") or "val2014"
    image_subtype = {"test-dev2015": "test2015"}.get(subtype, subtype)
    pattern = spec.get("image_pattern") or "COCO_{data_subtype}_{image_id:012d}.jpg"

    annotations: dict[Any, dict] | None = None
    apath = None
    if spec.get("annotations"):
        apath = _abs(root, spec["annotations"])
        adata = _load_json(apath, "VQAv2 annotations file")
        entries = _field(adata, "annotations", str(apath))
        if not isinstance(entries, list):
            raise ValueError(f"{apath}: 'annotations' must be a list, got {_type_name(entries)}")
        annotations = {}
        for i, entry in enumerate(entries):
            annotations[_field(entry, "question_id", f"{apath} annotations[{i}]")] = entry

    limit = _limit(spec)
    samples = []
    for i, q in enumerate(questions[:limit] if limit is not None else questions):
        where = f"{qpath} questions[{i}]"
        qid = _field(q, "question_id", where)
        image_id = _field(q, "image_id", where)
        question = _as_text(_field(q, "question", where), where, "question")
        try:
            name = pattern.format(image_id=int(image_id), question_id=qid, data_subtype=image_subtype)
        except (KeyError, ValueError, IndexError) as error:
            raise ValueError(
                f"image_pattern {pattern!r} cannot be formatted ({error}); "
                "fields: image_id, question_id, data_subtype"
            ) from None
        meta: dict[str, Any] = {"image_id": image_id}
        answers: list[str] = []
        if annotations is not None:
            if qid not in annotations:
                raise ValueError(f"{apath}: no annotation for question_id {qid!r} ({where})")
            ann = annotations[qid]
            awhere = f"{apath} annotation of question_id {qid!r}"
            answers = _as_answer_list(_field(ann, "answers", awhere), awhere, "answers")
            for key in ("multiple_choice_answer", "answer_type", "question_type"):
                if key in ann:
                    meta[key] = ann[key]
        samples.append(
            EvalSample(id=str(qid), question=question, answers=answers, images=[str(images / name)], meta=meta)
        )
    return samples


def read_docvqa_json(spec: dict, root: Path) -> list[EvalSample]:
    """Read the official DocVQA single-page JSON (``{"data": [...]}``)."""
    root = Path(root)
    path = _abs(root, _require(spec, "path", "docvqa_json"))
    image_root = _abs(root, spec["images"]) if spec.get("images") else path.parent
    data = _field(_load_json(path, "DocVQA file"), "data", str(path))
    if not isinstance(data, list):
        raise ValueError(f"{path}: 'data' must be a list, got {_type_name(data)}")
    limit = _limit(spec)
    samples = []
    for i, entry in enumerate(data[:limit] if limit is not None else data):
        where = f"{path} data[{i}]"
        qid = _field(entry, "questionId", where)
        question = _as_text(_field(entry, "question", where), where, "question")
        image = _as_text(_field(entry, "image", where), where, "image")
        image_path = image_root / image
        if not image_path.is_file() and (image_root / Path(image).name).is_file():
            image_path = image_root / Path(image).name
        answers = _as_answer_list(entry.get("answers"), where, "answers")
        meta = {
            k: entry[k]
            for k in ("docId", "ucsf_document_id", "ucsf_document_page_no", "question_types", "data_split")
            if k in entry
        }
        samples.append(
            EvalSample(
                id=str(qid), question=question, answers=answers, images=[os.path.abspath(image_path)], meta=meta
            )
        )
    return samples


def read_chartqa_json(spec: dict, root: Path) -> list[EvalSample]:
    """Read official ChartQA files (``test_human.json``, ``test_augmented.json``)."""
    root = Path(root)
    files = spec.get("files") or ([spec["path"]] if spec.get("path") else None)
    if not files:
        raise ValueError(
            f"data spec of format 'chartqa_json' needs 'files' (a list) or 'path'; got keys {sorted(spec)}"
        )
    if isinstance(files, str):
        files = [files]
    limit = _limit(spec)
    samples = []
    for file in files:
        path = _abs(root, file)
        image_root = _abs(root, spec["images"]) if spec.get("images") else path.parent / "png"
        entries = _load_json(path, "ChartQA file")
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a list of {{imgname, query, label}} objects, got {_type_name(entries)}")
        stem = path.stem
        source = stem.split("_", 1)[1] if "_" in stem else stem
        for i, entry in enumerate(entries):
            if limit is not None and len(samples) >= limit:
                return samples
            where = f"{path} [{i}]"
            image = _as_text(_field(entry, "imgname", where), where, "imgname")
            question = _as_text(_field(entry, "query", where), where, "query")
            answers = _as_answer_list(_field(entry, "label", where), where, "label")
            samples.append(
                EvalSample(
                    id=f"{stem}/{i}",
                    question=question,
                    answers=answers,
                    images=[os.path.abspath(image_root / image)],
                    meta={"source": source, "imgname": image},
                )
            )
    return samples


# --------------------------------------------------------------------------- jsonl

_JSONL_KEYS = ("id", "image", "video", "question", "answers", "answer", "choices")


def read_jsonl(spec: dict, root: Path) -> list[EvalSample]:
    """Read the generic JSONL format (see module doc)."""
    root = Path(root)
    path = _existing_file(_abs(root, _require(spec, "path", "jsonl")), "JSONL file")
    media_root = _abs(root, spec["media_root"]) if spec.get("media_root") else path.parent
    limit = _limit(spec)
    samples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and len(samples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON: {error}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {_type_name(obj)}")
            question = _as_text(_field(obj, "question", where), where, "question")
            raw_images = obj.get("image")
            if raw_images is None:
                raw_images = []
            elif isinstance(raw_images, str):
                raw_images = [raw_images]
            elif not isinstance(raw_images, list):
                raise ValueError(f"{where}: 'image' must be a path or a list of paths, got {_type_name(raw_images)}")
            images = [
                os.path.abspath(media_root / _as_text(p, where, f"image[{k}]")) for k, p in enumerate(raw_images)
            ]
            video = obj.get("video")
            if video is not None:
                video = os.path.abspath(media_root / _as_text(video, where, "video"))

            choices = None
            if obj.get("choices") is not None:
                choices = _as_choices(obj["choices"], where, "choices")
                key = "answer" if "answer" in obj else "answers"
                raw = _field(obj, key, where)
                if isinstance(raw, list):
                    if len(raw) != 1:
                        raise ValueError(
                            f"{where}: {key!r}: expected one gold answer for a MC question, got {raw!r:.120}"
                        )
                    raw = raw[0]
                answers = [_gold_letter(raw, choices, "auto", where, key)]
            else:
                key = "answers" if "answers" in obj else "answer"
                if key not in obj:
                    raise ValueError(f"{where}: missing field 'answers' (or 'answer'); has {sorted(obj)}")
                answers = _as_answer_list(obj[key], where, key)
            sample_id = obj.get("id", line_no)
            meta = {k: v for k, v in obj.items() if k not in _JSONL_KEYS}
            samples.append(
                EvalSample(
                    id=str(sample_id),
                    question=question,
                    answers=answers,
                    choices=choices,
                    images=images,
                    video=video,
                    meta=meta,
                )
            )
    return samples


# --------------------------------------------------------------------------- dispatch

READERS: dict[str, Callable[[dict, Path], list[EvalSample]]] = {
    "hf_parquet": read_hf_parquet,
    "vqav2_json": read_vqav2_json,
    "docvqa_json": read_docvqa_json,
    "chartqa_json": read_chartqa_json,
    "jsonl": read_jsonl,
}


def read_samples(spec: dict, root: Path) -> list[EvalSample]:
    """Read a task's samples: dispatch on ``spec["format"]`` (``hf_parquet`` when only a
    ``preset`` is given), then check that sample ids are unique."""
    if not isinstance(spec, dict):
        raise ValueError(f"a data spec is a mapping, got {_type_name(spec)}")
    fmt = spec.get("format") or ("hf_parquet" if spec.get("preset") else None)
    if fmt is None:
        raise ValueError(f"data spec needs 'format' (one of {sorted(READERS)}); got keys {sorted(spec)}")
    if fmt not in READERS:
        raise ValueError(f"unknown data format {fmt!r}; known formats: {sorted(READERS)}")
    samples = READERS[fmt](spec, Path(root))
    _check_unique(samples, f"data {spec.get('path') or spec.get('questions') or spec.get('files')!r}")
    return samples
