"""data.kind llava_json (llama_vision/data/llava.py): LLaVA's conversation JSON (arrays, read
streaming, and JSONL) gives exactly the examples of the equivalent native `conversations`
rows; broken rows are skipped and counted with their reasons; a short SFT runs on it."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from _helpers import ROOT
from llama_vision.data.datasets import ConversationDataset
from llama_vision.data.image import ImageProcessor
from llama_vision.data.llava import JsonArrayError, JsonArrayReader, LlavaJsonSource, convert_image_tags, llava_row_fields
from llama_vision.data.sources import ConversationSource
from llama_vision.tokenizer import load_tokenizer, train_sentencepiece

TOKENIZER = ROOT.parent / "shared" / "reference" / "tokenizer.model"
PROC = ImageProcessor(tile_size=28, max_num_tiles=4)
IMAGE_SIZES = {"a.jpg": (56, 28), "b.png": (28, 28), "c.jpg": (56, 56)}  # 2, 1 and 4 tiles


@pytest.fixture(scope="module")
def tok():
    if not TOKENIZER.is_file():
        pytest.skip(f"the Llama 3 tokenizer is not at {TOKENIZER}")
    return load_tokenizer(TOKENIZER)


@pytest.fixture
def images(tmp_path) -> Path:
    """tmp/imgs/{a.jpg, b.png, c.jpg}, each a different colour and tile grid."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (name, size) in enumerate(IMAGE_SIZES.items()):
        Image.new("RGB", size, (60 * i, 200 - 50 * i, 30)).save(folder / name)
    return folder


def write_json_array(path: Path, rows: list, indent: int | None = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=indent, ensure_ascii=False))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def dataset(source, tok) -> ConversationDataset:
    return ConversationDataset(source, tok, PROC, shuffle=False, max_seq_len=4096)


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


# (LLaVA row with image paths relative to imgs/, the equivalent native row).
GOOD_ROWS = [
    ("single image",
     {"id": "s1", "image": "a.jpg", "conversations": [human("<image>\nWhat is this?"), gpt("A red square.")]},
     {"images": ["a.jpg"], "messages": [
         {"role": "user", "content": "<|image|>What is this?"}, {"role": "assistant", "content": "A red square."}]}),
    ("three images, two rounds",
     {"id": "m3", "image": ["a.jpg", "b.png", "c.jpg"], "conversations": [
         human("Image 1: <image>\nImage 2: <image>\nImage 3: <image>\nWhich is the largest?"), gpt("The third."),
         human("And the smallest?"), gpt("The second one.")]},
     {"images": ["a.jpg", "b.png", "c.jpg"], "messages": [
         {"role": "user", "content": "Image 1: <|image|>Image 2: <|image|>Image 3: <|image|>Which is the largest?"},
         {"role": "assistant", "content": "The third."},
         {"role": "user", "content": "And the smallest?"}, {"role": "assistant", "content": "The second one."}]}),
    ("two images, tags on their own lines",
     {"id": "m2", "images": ["b.png", "a.jpg"], "conversations": [
         human("<image>\n<image>\nWhat differs?\n\nAnswer briefly."), gpt("The size.\nAnd the colour.")]},
     {"images": ["b.png", "a.jpg"], "messages": [
         {"role": "user", "content": "<|image|><|image|>What differs?\n\nAnswer briefly."},
         {"role": "assistant", "content": "The size.\nAnd the colour."}]}),
    ("no image",
     {"id": "t1", "conversations": [human("Hello"), gpt("Hi!"), human("Name a colour."), gpt("Blue.")]},
     {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                   {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}),
    ("image listed without a tag: put first in the first user turn",
     {"id": "p1", "image": "b.png", "conversations": [human("Describe the picture."), gpt("A blue square.")]},
     {"images": ["b.png"], "messages": [
         {"role": "user", "content": "<|image|>Describe the picture."}, {"role": "assistant", "content": "A blue square."}]}),
    ("two images listed without a tag, after a system turn",
     {"id": "p2", "image": ["c.jpg", "a.jpg"], "conversations": [
         {"from": "system", "value": "Be brief."}, human("Compare them."), gpt("Same colour.")]},
     {"images": ["c.jpg", "a.jpg"], "messages": [
         {"role": "system", "content": "Be brief."}, {"role": "user", "content": "<|image|><|image|>Compare them."},
         {"role": "assistant", "content": "Same colour."}]}),
    ("tag after the question",
     {"id": "e1", "image": "c.jpg", "conversations": [human("What colour is it?\n<image>"), gpt("Green.")]},
     {"images": ["c.jpg"], "messages": [
         {"role": "user", "content": "What colour is it?<|image|>"}, {"role": "assistant", "content": "Green."}]}),
    ("system turn, user/assistant role names",
     {"id": "u1", "image": "a.jpg", "conversations": [
         {"from": "system", "value": "You describe images."},
         {"from": "user", "value": "<image>\nDescribe it."}, {"from": "assistant", "value": "A wide red box."}]},
     {"images": ["a.jpg"], "messages": [
         {"role": "system", "content": "You describe images."},
         {"role": "user", "content": "<|image|>Describe it."}, {"role": "assistant", "content": "A wide red box."}]}),
    ("ShareGPT messages form with a top-level system prompt",
     {"messages": [{"role": "user", "content": "<image>Who made this?"}, {"role": "assistant", "content": "Nobody."}],
      "images": ["c.jpg"], "system": "You are helpful."},
     {"images": ["c.jpg"], "messages": [
         {"role": "system", "content": "You are helpful."},
         {"role": "user", "content": "<|image|>Who made this?"}, {"role": "assistant", "content": "Nobody."}]}),
]  # fmt: skip

# (LLaVA row or raw text, skip reason, words its message must contain).
BROKEN_ROWS = [
    ({"id": "r1", "image": "a.jpg", "conversations": [human("<image>\nHi"), {"from": "bing", "value": "Hello"}]},
     "bad_record", ["'r1'", "unknown role 'bing'"]),
    ({"id": "r2", "image": "a.jpg"}, "bad_record", ["'r2'", "no 'conversations'"]),
    ({"id": "r3", "image": "a.jpg", "conversations": [gpt("I start."), human("<image>\nWhat?"), gpt("Red.")]},
     "bad_record", ["'r3'", "first turn is 'gpt'"]),
    ({"id": "r4", "conversations": [human("Hi"), gpt("Hello"), human("Anyone?")]},
     "bad_record", ["'r4'", "last turn is 'human'"]),
    ({"id": "r5", "image": "", "conversations": [human("<image>\nWhat?"), gpt("Red.")]},
     "bad_record", ["'r5'", "empty path"]),
    ({"id": "r6", "image": ["a.jpg", 7], "conversations": [human("<image><image>?"), gpt("x")]},
     "bad_record", ["'r6'", "image[1] is a int"]),
    ({"id": "r7", "conversations": [human("Hi"), {"from": "gpt"}]}, "bad_record", ["'r7'", "no str 'value'"]),
    ({"id": "r8", "conversations": []}, "bad_record", ["'r8'", "non-empty list"]),
    ({"id": "r9", "video": "clip.mp4", "conversations": [human("<video>\nWhat?"), gpt("x")]},
     "bad_record", ["'r9'", "video rows"]),
    ({"id": "m1", "image": "a.jpg", "conversations": [human("<image>\n<image>\nTwo tags, one image."), gpt("x")]},
     "image_count_mismatch", ["2 image placeholders but 1 images"]),
    ({"id": "f1", "image": "nowhere.jpg", "conversations": [human("<image>\nWhat?"), gpt("x")]},
     "missing_image", ["nowhere.jpg"]),
    ([{"from": "human", "value": "not an object"}], "bad_record", ["expected a JSON object, got list"]),
]  # fmt: skip


def relative_to(row: dict, prefix: str) -> dict:
    """`row` with its image paths under `prefix`."""
    out = dict(row)
    for name in ("image", "images"):
        if isinstance(row.get(name), str) and row[name]:
            out[name] = prefix + row[name]
        elif isinstance(row.get(name), list):
            out[name] = [prefix + p if isinstance(p, str) and p else p for p in row[name]]
    return out


def assert_same_example(got: dict, want: dict, what: str) -> None:
    assert got["tokens"] == want["tokens"], what
    assert got["labels"] == want["labels"], what
    assert got["aspect_ratios"] == want["aspect_ratios"], what
    assert len(got["images"]) == len(want["images"]), what
    assert all(torch.equal(a, b) for a, b in zip(got["images"], want["images"])), what


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("layout", ["json_array", "jsonl"])
def test_llava_rows_give_the_examples_of_the_native_rows(tmp_path, images, tok, layout):
    """The done-when: every good row == its hand-written native `conversations` row, in
    tokens, labels and image tiles. The array sits in its own folder with image_root set;
    the JSONL sits beside imgs/ and uses the default root (its own folder)."""
    native = write_jsonl(tmp_path / "native.jsonl", [relative_to(n, "imgs/") for _, _, n in GOOD_ROWS])
    if layout == "json_array":
        path = write_json_array(tmp_path / "ann" / "llava.json", [row for _, row, _ in GOOD_ROWS])
        source = LlavaJsonSource(path, image_root=images)
    else:
        path = write_jsonl(tmp_path / "llava.jsonl", [relative_to(row, "imgs/") for _, row, _ in GOOD_ROWS])
        source = LlavaJsonSource(path)
    got = list(dataset(source, tok))
    want = list(dataset(ConversationSource(native), tok))
    assert len(got) == len(want) == len(GOOD_ROWS)
    for (what, _, _), g, w in zip(GOOD_ROWS, got, want):
        assert_same_example(g, w, what)
    first = 0 if layout == "json_array" else 1  # keys: <file>:<index> / <file>:<line>
    assert [ex["key"] for ex in got] == [f"{path.name}:{i + first}" for i in range(len(GOOD_ROWS))]
    # Independent of the native path: the separating newline is gone, the replies are labelled.
    single = got[0]
    assert tok.decode(single["tokens"]).count("\n") == 4  # the "\n\n" of the user and assistant headers
    assert tok.decode([t for t in single["labels"] if t != -100]) == "A red square.<|eot_id|>"
    assert [len(ex["images"]) for ex in got] == [1, 3, 2, 0, 1, 2, 1, 1, 1]


def test_image_tag_newline_rule():
    assert convert_image_tags("<image>\nWhat is this?") == "<|image|>What is this?"
    assert convert_image_tags("What is this?\n<image>") == "What is this?<|image|>"
    assert convert_image_tags("What is this?\n<image>\n") == "What is this?\n<|image|>"  # one newline per tag
    assert convert_image_tags("<image>\n\nTwo newlines") == "<|image|>\nTwo newlines"
    assert convert_image_tags("A <image> B") == "A <|image|> B"  # spaces are content
    assert convert_image_tags("A\n<image>\nB") == "A\n<|image|>B"
    assert convert_image_tags("<image>\n<image>\n") == "<|image|><|image|>"
    assert convert_image_tags("no tag\n") == "no tag\n"


# ----------------------------------------------------------------------------- broken rows


@pytest.mark.parametrize("layout", ["json_array", "jsonl"])
def test_broken_rows_are_skipped_and_counted_with_their_reasons(tmp_path, images, tok, layout):
    good = GOOD_ROWS[0][1]
    rows = [good] + [row for row, _, _ in BROKEN_ROWS] + [good]
    if layout == "json_array":
        rows.insert(3, 42)  # a non-object element
        path = write_json_array(tmp_path / "ann" / "llava.json", rows)
        source = LlavaJsonSource(path, image_root=images)
        position = {i: f"llava.json:{i}" for i in range(len(rows))}
    else:
        rows.insert(3, '{"id": "j1", "conversations": [')  # a line that is not JSON
        path = write_jsonl(tmp_path / "llava.jsonl", [relative_to(r, "imgs/") if isinstance(r, dict) else r for r in rows])
        source = LlavaJsonSource(path)
        position = {i: f"llava.jsonl:{i + 1}" for i in range(len(rows))}
    ds = dataset(source, tok)
    examples = list(ds)
    assert [ex["key"] for ex in examples] == [position[0], position[len(rows) - 1]]

    want: dict[str, int] = {"bad_record" if layout == "json_array" else "bad_json": 1}
    for _, reason, _ in BROKEN_ROWS:
        want[reason] = want.get(reason, 0) + 1
    assert ds.skipped() == want
    # Every skip names its row's position and (when it has one) id. The counter keeps the
    # last few: check those against the table.
    recent = {s.key: s for s in ds.skip_counter.recent}
    broken_at = [i for i in range(1, len(rows) - 1) if i != 3]
    for (row, reason, words), i in list(zip(BROKEN_ROWS, broken_at))[-len(recent):]:
        skip = recent[position[i]]
        assert skip.reason == reason
        for word in words:
            assert word in skip.message, (skip.message, word)
        if reason == "bad_record":
            assert skip.message.startswith(position[i] + ": ")


def test_all_source_skip_messages_name_the_position_and_the_id(tmp_path, images):
    """Every source-level skip (all of them, not just the counter's last few)."""
    rows = [row for row, reason, _ in BROKEN_ROWS if reason == "bad_record"]
    path = write_json_array(tmp_path / "llava.json", rows)
    records = list(LlavaJsonSource(path, image_root=images))
    assert [r.error for r in records] == ["bad_record"] * len(rows)
    for i, (record, (row, _, words)) in enumerate(zip(records, (b for b in BROKEN_ROWS if b[1] == "bad_record"))):
        assert record.key == f"llava.json:{i}" and record.message.startswith(f"llava.json:{i}: ")
        for word in words:
            assert word in record.message, (record.message, word)


def test_invalid_json_inside_an_array_ends_the_file_with_one_counted_record(tmp_path, images, tok):
    good = json.dumps({"id": "ok", "image": "a.jpg", "conversations": [human("<image>\nWhat?"), gpt("Red.")]})
    text = f'[\n{good},\n{{"id": "broken", "conversations": oops}},\n{good}\n]\n'
    path = tmp_path / "ann" / "broken.json"
    path.parent.mkdir()
    path.write_text(text)
    ds = dataset(LlavaJsonSource(path, image_root=images), tok)
    assert [ex["key"] for ex in ds] == ["broken.json:0"]
    assert ds.skipped() == {"bad_json": 1}
    (skip,) = ds.skip_counter.recent
    assert skip.key == "broken.json:1"
    assert f"byte {text.index('oops')}" in skip.message and "the rest of broken.json is not read" in skip.message

    # A file cut off mid-array (a partial download): the complete elements, then one bad_json.
    cut = tmp_path / "ann" / "cut.json"
    cut.write_text(text[: text.index("oops") - 30])
    records = list(LlavaJsonSource(cut, image_root=images))
    assert [r.error for r in records] == [None, "bad_json"]
    assert "truncated file?" in records[1].message and records[1].key == "cut.json:1"


def test_invalid_utf8_spoils_only_its_element(tmp_path, images):
    good = json.dumps({"image": "a.jpg", "conversations": [human("<image>\nWhat?"), gpt("Red é.")]}, ensure_ascii=False)
    bad = good.encode().replace("Red".encode(), b"R\xff\xfed")
    path = tmp_path / "utf8.json"
    path.write_bytes(b"\xef\xbb\xbf[" + good.encode() + b",\n" + bad + b",\n" + good.encode() + b"]")  # with a BOM
    for chunk in (LlavaJsonSource.chunk_bytes, 5):
        source = LlavaJsonSource(path, image_root=images)
        source.chunk_bytes = chunk
        records = list(source)
        assert [r.error for r in records] == [None, "bad_json", None]
        assert records[1].message == "utf8.json:1: invalid UTF-8 in the element"
        assert records[2].fields["messages"][1]["content"] == "Red é."


def test_missing_file_is_a_counted_shard(tmp_path, images):
    path = write_json_array(tmp_path / "a.json", [GOOD_ROWS[0][1]])
    source = LlavaJsonSource([path, tmp_path / "gone.json"], image_root=images)
    assert [r.error for r in source] == [None, "missing_shard"]


# ----------------------------------------------------------------------------- streaming


class ReadLog(io.RawIOBase):
    """A binary file that records the size of every read."""

    def __init__(self, data: bytes):
        self.inner = io.BytesIO(data)
        self.sizes: list[int] = []

    def read(self, size=-1):
        self.sizes.append(size)
        return self.inner.read(size)


class PeakReader(JsonArrayReader):
    """Records the most text the reader held at once."""

    peak = 0

    def _read_more(self):
        super()._read_more()
        self.peak = max(self.peak, len(self.text))


def tricky_rows(n: int) -> list[dict]:
    """Small rows whose strings hold what a naive splitter trips on, at every offset."""
    specials = ['say \\"hi\\" ]', "brackets [ { } ] , inside", "é漢字😀 multibyte", "tab\tand\\nescapes \\u00e9", ""]
    return [{"id": i, "image": f"img_{i % 7}.jpg", "score": i * 1.5e-3, "ok": i % 2 == 0, "none": None,
             "conversations": [human(f"<image>\n{specials[i % len(specials)]} {'x' * (i % 13)}"),
                               gpt(specials[(i + 2) % len(specials)] + str(-i))]} for i in range(n)]  # fmt: skip


def test_large_array_streams_in_small_chunks_with_bounded_memory(tmp_path, monkeypatch):
    rows = tricky_rows(20_000)
    path = write_json_array(tmp_path / "big.json", rows, indent=1)
    want = [llava_row_fields(row, str(tmp_path)) for row in json.loads(path.read_text())]
    monkeypatch.setattr(LlavaJsonSource, "chunk_bytes", 64)
    records = list(LlavaJsonSource(path))
    assert [r.error for r in records if r.error] == []
    assert [r.fields for r in records] == want

    data = path.read_bytes()
    raw = ReadLog(data)
    reader = PeakReader(raw, chunk_bytes=64)
    values = [value for _, value, _ in reader]
    assert values == rows
    longest = max(len(json.dumps(row, indent=1, ensure_ascii=False)) for row in rows)
    # Read in chunks: many small reads (a chunk, or the unread rest of an element when that
    # is longer), none larger than about twice the longest element.
    assert max(raw.sizes) <= 2 * longest + 64 and len(raw.sizes) > len(data) // (2 * longest + 64)
    assert reader.peak <= 3 * longest + 64  # never the whole file (len(data) is ~170x that)
    assert len(data) > 100 * reader.peak


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_elements_straddling_chunk_boundaries(chunk):
    rows = [*tricky_rows(40), 0, -12.5e3, 1e-7, True, False, None, "str ] ,", [], {}, [[1, [2]], {"a": [3]}]]
    for indent in (None, 2):
        data = json.dumps(rows, indent=indent, ensure_ascii=False).encode()
        assert [v for _, v, _ in JsonArrayReader(io.BytesIO(data), chunk)] == rows


def test_a_long_element_is_read_in_doubling_steps(tmp_path):
    long_row = {"conversations": [human("<image>\n" + "word " * 40_000), gpt("ok")], "image": "a.jpg"}
    data = json.dumps([long_row, {"x": 1}]).encode()
    raw = ReadLog(data)
    values = [v for _, v, _ in JsonArrayReader(raw, chunk_bytes=64)]
    assert values == [long_row, {"x": 1}]
    assert len(raw.sizes) < 20  # 64, 64, 128, ... not len / 64 re-decodes


def test_array_syntax_errors_name_the_byte_offset():
    cases = {
        b'[{"a": 1} {"b": 2}]': (10, "expected ',' or ']' after element 0"),
        b'[1, 2,]': (6, "element 2 is not valid JSON"),
        b'[1, 2] trailing': (7, "after the array's closing ']'"),
        b'[{"a": "never closes': (7, "the file ends inside it"),
    }
    for data, (offset, words) in cases.items():
        for chunk in (1, 4, 1 << 20):
            with pytest.raises(JsonArrayError) as info:
                list(JsonArrayReader(io.BytesIO(data), chunk))
            assert info.value.offset == offset and words in str(info.value), (data, chunk, str(info.value))
    with pytest.raises(JsonArrayError, match="longer than 100 characters"):
        list(JsonArrayReader(io.BytesIO(b'["' + b"x" * 1000), chunk_bytes=16, max_element_chars=100))
    assert list(JsonArrayReader(io.BytesIO(b"  [ ]\n"))) == []


# ----------------------------------------------------------------------------- training


def test_tiny_sft_run_on_llava_json(tmp_path, images):
    """data.kind: llava_json through the config loader, build_loader (plain and packed) and
    two optimizer steps of a tiny SFT."""
    from llama_vision.config import load_config
    from llama_vision.training.metrics import read_metrics
    from llama_vision.training.train_config import TrainConfig
    from llama_vision.training.trainer import Trainer

    rows = [row for _, row, _ in GOOD_ROWS] * 2
    path = write_json_array(tmp_path / "ann" / "train.json", rows)
    texts = [t["value"] if "value" in t else t["content"] for row in rows for t in row.get("conversations", row.get("messages", []))]
    tokenizer = train_sentencepiece(texts * 20, tmp_path / "tokenizer.model", vocab_size=400)
    overrides = {
        "model": ROOT / "configs/model/tiny.yaml", "tokenizer": tokenizer, "output_dir": tmp_path / "run",
        "init_from": "null", "device": "cpu", "tensorboard": "false", "save_final": "false",
        "max_steps": 2, "checkpoint_every": 100, "micro_batch_size": 2, "optim.warmup_steps": 1,
        "data.kind": "llava_json", "data.paths": f'["{path}"]', "data.image_root": images, "data.max_seq_len": 96,
    }  # fmt: skip
    cfg = load_config(TrainConfig, ROOT / "configs/train/tiny_image_sft.yaml", [f"{k}={v}" for k, v in overrides.items()])
    assert cfg.data.kind == "llava_json" and cfg.stage == "sft"

    trainer = Trainer(cfg)
    trainer.fit()
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    assert not trainer.loader.skipped

    from llama_vision.training.data import build_loader

    packed = load_config(TrainConfig, ROOT / "configs/train/tiny_image_sft.yaml",
                         [f"{k}={v}" for k, v in overrides.items()] + ["data.packing=true"])  # fmt: skip
    batch = next(iter(build_loader(packed, trainer.tokenizer, trainer.model.args, 0, 1)))
    assert batch.tokens.shape[0] == 2 and (batch.labels != -100).any()
