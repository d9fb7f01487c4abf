"""Training data pipeline: sources, datasets, collation, sharding, resume, skip accounting."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from llama_vision.data.batch import Batch, PreferenceBatch
from llama_vision.data.collate import build_dataloader, collate_examples
from llama_vision.data.datasets import CaptionDataset, ConversationDataset, DPODataset, normalize_messages
from llama_vision.data.image import ImageProcessor
from llama_vision.data.sampler import Partition, partition_stream, shuffle_buffer
from llama_vision.data.sources import (
    ConversationSource,
    DPOSource,
    JsonlCaptionSource,
    Record,
    WebDatasetSource,
    expand_braces,
    split_key,
)
from llama_vision.tokenizer import ChatFormat, load_tokenizer, train_sentencepiece

TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "tokenizer.model"
TILE = 28  # tiny tiles keep image work negligible
PROC = ImageProcessor(tile_size=TILE, max_num_tiles=4)
# (width, height) -> tile grid with 28-px tiles
SIZES = {1: (28, 28), 2: (56, 28), 3: (84, 28), 4: (56, 56)}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    if TOKENIZER.is_file():
        return load_tokenizer(TOKENIZER)
    # Outside the workspace: a small SentencePiece model has the same interface.
    corpus = ["a red square", "What is this?", "They differ. Yes. No. Hello. Describe."] * 50
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return load_tokenizer(train_sentencepiece(corpus, path, vocab_size=400))


def image_bytes(n_tiles: int = 1, fmt: str = "JPEG", color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", SIZES[n_tiles], color).save(buf, fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def image_dir(tmp_path):
    """imgs/a.jpg (2 tiles), b.png (1 tile), c.jpg (4 tiles), corrupt.jpg, truncated.jpg."""
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.jpg").write_bytes(image_bytes(2))
    (d / "b.png").write_bytes(image_bytes(1, "PNG", (0, 90, 200)))
    (d / "c.jpg").write_bytes(image_bytes(4))
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    good = image_bytes(4)
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return d


def examples_and_skips(dataset) -> tuple[dict, dict]:
    examples = {ex["key"]: ex for ex in dataset}
    return examples, dataset.skipped()


def expected_labels(tokens, mask):
    return [tokens[i + 1] if mask[i + 1] else -100 for i in range(len(tokens) - 1)] + [-100]


def labelled_text(tok, ex, labels_key="labels"):
    return tok.decode([t for t in ex[labels_key] if t != -100])


# ---------------------------------------------------------------------------------- sources


def test_expand_braces():
    assert expand_braces("train-{000000..000002}.tar") == [f"train-00000{i}.tar" for i in range(3)]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("x{a,{b,c}}y") == ["xay", "xby", "xcy"]
    assert expand_braces("lit{x}-{0..1}") == ["lit{x}-0", "lit{x}-1"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_split_key_follows_webdataset():
    assert split_key("0001.jpg") == ("0001", "jpg")
    assert split_key("a.b/c.seg.png") == ("a.b/c", "seg.png")
    assert split_key("dir/0001.json") == ("dir/0001", "json")
    assert split_key("noext") is None
    assert split_key("dir/.hidden") is None


def test_webdataset_caption_dataset_good_and_bad(tmp_path, tok):
    d = tmp_path / "images"
    d.mkdir()
    meta = json.dumps({"caption": "not used: txt wins", "url": "http://x"}).encode()
    jpeg = image_bytes(2)
    write_tar(d / "train-000000.tar", [
        ("000000.jpg", jpeg), ("000000.txt", b"a red square\n"), ("000000.json", meta),
        ("000001.png", image_bytes(1, "PNG")), ("000001.json", json.dumps({"caption": "from json"}).encode()),
        ("000002.jpg", b"garbage" * 20), ("000002.txt", b"corrupt image"),
        ("000003.jpg", jpeg[: len(jpeg) // 2]), ("000003.txt", b"truncated image"),
        ("000004.jpg", jpeg), ("000004.txt", b"   \n"),
        ("sub.dir/000005.jpg", image_bytes(4)), ("sub.dir/000005.txt", b"dotted directory"),
        ("000006.txt", b"text only sample"),
    ])  # fmt: skip
    write_tar(d / "train-000001.tar", [
        ("000007.jpg", jpeg), ("000007.json", b"{not json"),
        ("000008.webp", image_bytes(3, "WEBP")), ("000008.txt", b"webp image"),
    ])  # fmt: skip
    # shard 000002 is missing; shard 000003 is cut in the middle of its second sample
    write_tar(tmp_path / "full.tar", [("000009.jpg", jpeg), ("000009.txt", b"ok"), ("000010.jpg", jpeg)])
    raw = (tmp_path / "full.tar").read_bytes()
    third_member_data = 512 + -(-len(jpeg) // 512) * 512 + 1024 + 512  # headers + padded data
    (d / "train-000003.tar").write_bytes(raw[: third_member_data + 100])

    source = WebDatasetSource(str(d / "train-{000000..000003}.tar"))
    assert len(source.shards) == 4
    ds = CaptionDataset(source, tok, PROC, shuffle=False)
    examples, skipped = examples_and_skips(ds)

    assert sorted(examples) == ["000000", "000001", "000006", "000008", "000009", "sub.dir/000005"]
    assert skipped == {"bad_image": 2, "empty_text": 1, "bad_json": 1, "missing_shard": 1, "bad_shard": 1}
    assert {s.reason for s in ds.skip_counter.recent} == set(skipped)

    def caption(ex):
        n = len(ex["images"])
        assert ex["tokens"][:n] == [tok.image_token_id] * n and ex["tokens"][n] == tok.bos_id
        assert ex["tokens"][-1] == tok.eos_id
        return tok.decode(ex["tokens"][n + 1 : -1])

    assert caption(examples["000000"]) == "a red square"
    assert caption(examples["000001"]) == "from json"
    assert caption(examples["000006"]) == "text only sample" and examples["000006"]["images"] == []
    assert [t.shape[0] for t in examples["sub.dir/000005"]["images"]] == [4]
    assert examples["sub.dir/000005"]["aspect_ratios"] == [(2, 2)]
    assert examples["000008"]["aspect_ratios"] == [(1, 3)]


def test_jsonl_caption_manifest(tmp_path, image_dir, tok):
    manifest = write_jsonl(tmp_path / "manifest.jsonl", [
        {"image": "imgs/a.jpg", "caption": "first"},
        {"image": ["imgs/b.png", "imgs/c.jpg"], "text": "two images"},
        {"image": "imgs/missing.jpg", "caption": "missing file"},
        '{"image": "imgs/a.jpg", "caption": ',
        "",
        {"image": "imgs/a.jpg", "caption": ""},
        {"caption": "just text"},
        {"image": "imgs/corrupt.jpg", "caption": "corrupt"},
        {"image": "imgs/truncated.jpg", "caption": "truncated"},
        {"image": 5, "caption": "bad field"},
        [1, 2],
    ])  # fmt: skip
    examples, skipped = examples_and_skips(CaptionDataset(JsonlCaptionSource(manifest), tok, PROC, shuffle=False))
    assert sorted(examples) == ["manifest.jsonl:1", "manifest.jsonl:2", "manifest.jsonl:7"]
    assert skipped == {"missing_image": 1, "bad_json": 1, "empty_text": 1, "bad_image": 2, "bad_record": 2}

    two = examples["manifest.jsonl:2"]
    caption = tok.encode("two images", bos=False, eos=False)
    img = tok.image_token_id
    assert two["tokens"] == [img, img, tok.bos_id, *caption, tok.eos_id]
    # labels[i] is the target at position i: nothing for the image tokens or for predicting BOS,
    # then every caption token and the EOS, nothing after the last token.
    assert two["labels"] == [-100, -100, *caption, tok.eos_id, -100]
    assert [t.shape for t in two["images"]] == [(1, 3, TILE, TILE), (4, 3, TILE, TILE)]
    assert two["aspect_ratios"] == [(1, 1), (2, 2)]
    text_only = examples["manifest.jsonl:7"]
    assert text_only["tokens"][0] == tok.bos_id and text_only["images"] == []
    assert text_only["labels"][0] == text_only["tokens"][1]


def test_media_text_stands_in_the_media_slot_and_is_never_a_target(tmp_path, image_dir, tok):
    # media_text: text where the media's tokens go (after any image token, before BOS), no
    # label on it nor on predicting BOS; a non-string one is a bad record, named.
    manifest = write_jsonl(tmp_path / "manifest.jsonl", [
        {"media_text": "a red square", "caption": "first"},
        {"image": "imgs/a.jpg", "media_text": "red", "caption": "with image"},
        {"media_text": 3, "caption": "bad"},
    ])  # fmt: skip
    dataset = CaptionDataset(JsonlCaptionSource(manifest), tok, PROC, shuffle=False)
    examples, skipped = examples_and_skips(dataset)
    assert skipped == {"bad_record": 1}
    assert any("media_text must be a string, got int" in s.message for s in dataset.skip_counter.recent)
    enc = lambda text: tok.encode(text, bos=False, eos=False)  # noqa: E731
    stand_in, first = enc("a red square"), enc("first")
    ex = examples["manifest.jsonl:1"]
    assert ex["tokens"] == [*stand_in, tok.bos_id, *first, tok.eos_id] and ex["images"] == []
    assert ex["labels"] == [-100] * len(stand_in) + [*first, tok.eos_id, -100]
    ex = examples["manifest.jsonl:2"]
    assert ex["tokens"] == [tok.image_token_id, *enc("red"), tok.bos_id, *enc("with image"), tok.eos_id]
    assert ex["labels"] == [-100] * (1 + len(enc("red"))) + [*enc("with image"), tok.eos_id, -100]


def test_conversation_dataset_masks_non_assistant_tokens(tmp_path, image_dir, tok):
    two_image_messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "Compare with"}, {"type": "image"}]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
    ]
    path = write_jsonl(tmp_path / "conv.jsonl", [
        {"images": ["imgs/a.jpg"], "messages": [
            {"role": "user", "content": "<|image|>What is this?"},
            {"role": "assistant", "content": "A red square."}]},
        {"images": ["imgs/a.jpg", "imgs/c.jpg"], "messages": two_image_messages},
        {"images": ["imgs/a.jpg", "imgs/b.png"], "messages": [
            {"role": "user", "content": "<|image|>one placeholder, two images"},
            {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}]},
        {"messages": [{"role": "user", "content": "no assistant turn"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"images": ["imgs/missing.jpg"], "messages": [
            {"role": "user", "content": "<|image|>?"}, {"role": "assistant", "content": "z"}]},
        {"images": ["imgs/truncated.jpg"], "messages": [
            {"role": "user", "content": "<|image|>?"}, {"role": "assistant", "content": "z"}]},
        "{oops",
        {"messages": "not a list"},
    ])  # fmt: skip
    ds = ConversationDataset(ConversationSource(path), tok, PROC, shuffle=False)
    examples, skipped = examples_and_skips(ds)
    assert sorted(examples) == ["conv.jsonl:1", "conv.jsonl:2", "conv.jsonl:4"]
    assert skipped == {
        "image_count_mismatch": 1, "empty_labels": 1, "bad_record": 2,
        "missing_image": 1, "bad_image": 1, "bad_json": 1,
    }  # fmt: skip

    chat = ChatFormat(tok)
    ex = examples["conv.jsonl:2"]
    ids, mask = chat.encode_dialog_with_assistant_mask(two_image_messages)
    assert ex["tokens"] == ids
    assert ex["labels"] == expected_labels(ids, mask)
    assert [t.shape[0] for t in ex["images"]] == [2, 4]
    # Independent of ChatFormat's mask: exactly the assistant replies and their <|eot_id|>.
    assert labelled_text(tok, ex) == "They differ.<|eot_id|>Yes.<|eot_id|>"
    first = examples["conv.jsonl:1"]
    assert first["tokens"].count(tok.image_token_id) == 1
    assert labelled_text(tok, first) == "A red square.<|eot_id|>"
    # the string form and the list form give the same ids
    list_form = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                 {"role": "assistant", "content": "A red square."}]  # fmt: skip
    assert first["tokens"] == chat.encode_dialog_with_assistant_mask(list_form)[0]
    assert examples["conv.jsonl:4"]["images"] == []


def test_normalize_messages_counts_placeholders():
    messages, n = normalize_messages([{"role": "user", "content": "<|image|><|image|>two"}])
    assert n == 2
    assert messages[0]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "two"}]


def test_dpo_dataset_pairs_share_prompt_and_images(tmp_path, image_dir, tok):
    path = write_jsonl(tmp_path / "dpo.jsonl", [
        {"images": ["imgs/a.jpg"], "prompt": "<|image|>Describe.",
         "chosen": "A red square.", "rejected": "A blue circle."},
        {"images": ["imgs/b.png"], "chosen": "Yes", "rejected": "No", "prompt": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "<|image|>And this?"}]},
        {"prompt": "x", "chosen": "", "rejected": "y"},
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        {"prompt": "<|image|>x", "chosen": "a", "rejected": "b"},
        {"prompt": "x", "chosen": 3, "rejected": "b"},
    ])  # fmt: skip
    ds = DPODataset(DPOSource(path), tok, PROC, shuffle=False)
    examples, skipped = examples_and_skips(ds)
    assert sorted(examples) == ["dpo.jsonl:1", "dpo.jsonl:2"]
    assert skipped == {"empty_text": 1, "identical_pair": 1, "image_count_mismatch": 1, "bad_record": 1}

    ex = examples["dpo.jsonl:2"]
    # loss only on the final reply, not on the assistant turn inside the prompt
    assert labelled_text(tok, ex, "chosen_labels") == "Yes<|eot_id|>"
    assert labelled_text(tok, ex, "rejected_labels") == "No<|eot_id|>"
    prompt_len = len(ChatFormat(tok).encode_dialog(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]))  # fmt: skip
    assert ex["chosen_tokens"][:prompt_len] == ex["rejected_tokens"][:prompt_len]

    batch = ds.collate_fn()(list(examples.values()))
    assert isinstance(batch, PreferenceBatch) and len(batch) == 2
    assert batch.chosen.images is batch.rejected.images
    assert batch.chosen.images.shape == (2, 1, 4, 3, TILE, TILE)
    assert batch.chosen.num_tiles.tolist() == [[2], [1]]
    moved = batch.to("cpu")
    assert moved.chosen.images is moved.rejected.images


def test_truncation_drops_cut_images_and_skips_empty(tmp_path, image_dir, tok):
    messages = [
        {"role": "user", "content": "<|image|>What colour?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Now a long question about the next picture <|image|> please"},
        {"role": "assistant", "content": "Blue."},
    ]
    path = write_jsonl(tmp_path / "conv.jsonl", [{"images": ["imgs/a.jpg", "imgs/c.jpg"], "messages": messages}])
    full = next(iter(ConversationDataset(ConversationSource(path), tok, PROC, shuffle=False)))
    second_image = [i for i, t in enumerate(full["tokens"]) if t == tok.image_token_id][1]

    ds = ConversationDataset(ConversationSource(path), tok, PROC, shuffle=False, max_seq_len=second_image)
    (ex,) = list(ds)
    assert len(ex["tokens"]) == second_image and ex["tokens"] == full["tokens"][:second_image]
    assert len(ex["images"]) == 1 and ex["aspect_ratios"] == [(1, 2)]
    assert labelled_text(tok, ex) == "Red.<|eot_id|>" and ex["labels"][-1] == -100
    collate_examples([ex], tok.pad_id, 4, tok.image_token_id)  # consistent image count

    # A cut that leaves no labelled token skips the sample instead of emitting an empty loss.
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"image": "imgs/a.jpg", "caption": "some caption"}])
    short = CaptionDataset(JsonlCaptionSource(manifest), tok, PROC, shuffle=False, max_seq_len=2)
    assert list(short) == [] and short.skipped() == {"empty_labels": 1}
    cut = next(iter(CaptionDataset(JsonlCaptionSource(manifest), tok, PROC, shuffle=False, max_seq_len=4)))
    assert cut["tokens"] == [tok.image_token_id, tok.bos_id, *tok.encode("some caption", bos=False, eos=False)[:2]]
    assert cut["labels"] == [-100, *cut["tokens"][2:], -100]


# ---------------------------------------------------------------------------------- collation


def _example(key, n_text, tiles_per_image, image_token_id):
    images = [torch.full((n, 3, TILE, TILE), float(10 * len(key) + j)) for j, n in enumerate(tiles_per_image)]
    grids = {1: (1, 1), 2: (1, 2), 3: (3, 1), 4: (2, 2)}
    tokens = [image_token_id] * len(images) + list(range(1, n_text + 1))
    return {
        "key": key,
        "tokens": tokens,
        "labels": tokens[1:] + [-100],
        "images": images,
        "aspect_ratios": [grids[n] for n in tiles_per_image],
    }


def test_collate_variable_images_and_tiles(tok):
    img = tok.image_token_id
    rows = [_example("a", 3, [], img), _example("bb", 5, [3], img), _example("ccc", 2, [1, 4], img)]
    batch = collate_examples(rows, tok.pad_id, 4, img)
    assert isinstance(batch, Batch) and len(batch) == 3
    assert batch.tokens.shape == (3, 6) and batch.lengths.tolist() == [3, 6, 4]
    assert batch.tokens[0, 3:].tolist() == [tok.pad_id] * 3
    assert batch.labels[0, 2:].tolist() == [-100] * 4 and batch.labels[2, 4:].tolist() == [-100] * 2
    assert batch.images.shape == (3, 2, 4, 3, TILE, TILE)
    assert batch.num_images.tolist() == [0, 1, 2]
    assert batch.num_tiles.tolist() == [[0, 0], [3, 0], [1, 4]]
    assert batch.aspect_ratios.tolist() == [[[1, 1], [1, 1]], [[3, 1], [1, 1]], [[1, 1], [2, 2]]]
    assert torch.equal(batch.images[2, 1], rows[2]["images"][1])
    assert torch.equal(batch.images[1, 0, :3], rows[1]["images"][0])
    assert batch.images[1, 0, 3:].abs().sum() == 0 and batch.images[0].abs().sum() == 0
    assert batch.keys == ["a", "bb", "ccc"]
    assert batch.num_targets == sum(len(r["tokens"]) - 1 for r in rows)

    text_only = collate_examples([rows[0], _example("d", 2, [], img)], tok.pad_id, 4, img)
    assert text_only.images is None and text_only.num_images.tolist() == [0, 0]
    assert text_only.to("meta").tokens.device.type == "meta"

    bad = _example("broken-key", 3, [2], img)
    bad["images"].append(bad["images"][0])
    bad["aspect_ratios"].append((1, 2))
    with pytest.raises(ValueError, match="broken-key"):
        collate_examples([rows[0], bad], tok.pad_id, 4, img)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs an accelerator")
def test_batch_pin_memory(tok):
    batch = collate_examples([_example("a", 3, [2], tok.image_token_id)], tok.pad_id, 4, tok.image_token_id)
    assert batch.pin_memory().images.is_pinned()


# ---------------------------------------------------------------------------------- sharding


class ListSource:
    """In-memory source: ``shards[j]`` holds ``sizes[j]`` records keyed ``j:i``."""

    def __init__(self, sizes):
        self.shards = [str(j) for j in range(len(sizes))]
        self.sizes = sizes

    def iter_shard(self, shard):
        return (Record(key=f"{shard}:{i}", source=shard) for i in range(self.sizes[int(shard)]))


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=8),
    world_size=st.integers(1, 3),
    num_workers=st.integers(1, 3),
    split=st.sampled_from(["auto", "shard", "record"]),
    shuffle=st.booleans(),
    epoch=st.integers(0, 3),
)
def test_partitions_cover_every_record_once(sizes, world_size, num_workers, split, shuffle, epoch):
    source = ListSource(sizes)
    everything = [r.key for shard in source.shards for r in source.iter_shard(shard)]
    seen = []
    for rank, worker in itertools.product(range(world_size), range(num_workers)):
        part = Partition(rank, world_size, worker, num_workers)
        def stream(start=0):
            kwargs = dict(seed=3, epoch=epoch, shuffle=shuffle, buffer_size=4, split=split, start=start)
            return [r.key for r in partition_stream(source, part, **kwargs)]

        keys = stream()
        assert keys == stream()  # deterministic
        tail = stream(start=2)
        assert tail == keys[2:]  # resumable
        seen += keys
    assert sorted(seen) == sorted(everything)


def test_record_split_rule_and_epoch_shuffle():
    source = ListSource([5, 5])
    order = [r.key for shard in source.shards for r in source.iter_shard(shard)]
    part = Partition(rank=1, world_size=2, worker=0, num_workers=2)  # global partition 2 of 4
    keys = [r.key for r in partition_stream(source, part, shuffle=False, split="record")]
    # Record m goes to rank m % 2, and within it to worker (m // 2) % 2: rank 1's
    # first, third, ... records (1, 5, 9) are its worker 0's, the DataLoader's first ask.
    assert keys == [order[1], order[5], order[9]]
    # Blocks of 2 (the micro-batch): rank 1 worker 0 holds blocks 1 and 5 = records 2, 3.
    keys = [r.key for r in partition_stream(source, part, shuffle=False, split="record", block=2)]
    assert keys == [order[2], order[3]]
    one = Partition()
    epoch0 = [r.key for r in partition_stream(source, one, seed=1, epoch=0, buffer_size=4)]
    epoch1 = [r.key for r in partition_stream(source, one, seed=1, epoch=1, buffer_size=4)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(order) and epoch0 != epoch1
    assert list(shuffle_buffer(range(5), 1, None)) == list(range(5))


def _text_manifest(tmp_path, n_files=3, per_file=7):
    """``n_files`` text-only caption manifests; returns their brace pattern."""
    for f in range(n_files):
        write_jsonl(tmp_path / f"part-{f}.jsonl", [{"caption": f"caption {f} {i}"} for i in range(per_file)])
    return str(tmp_path / f"part-{{0..{n_files - 1}}}.jsonl")


def test_two_ranks_two_workers_dataloader_cover_epoch(tmp_path, tok):
    pattern = _text_manifest(tmp_path)
    everything = {f"part-{f}.jsonl:{i + 1}" for f in range(3) for i in range(7)}
    for split in ("record", "shard"):
        seen = []
        for rank in range(2):
            ds = CaptionDataset(JsonlCaptionSource(pattern), tok, PROC, rank=rank, world_size=2, seed=5,
                                shuffle_buffer=3, split=split)  # fmt: skip
            loader = build_dataloader(ds, batch_size=2, num_workers=2)
            seen += [k for batch in loader for k in batch.keys]
        assert len(seen) == len(everything) and set(seen) == everything


# ---------------------------------------------------------------------------------- resume


def _resume_matches(make_dataset, num_workers, batch_size, stops):
    full = [b.keys for b in build_dataloader(make_dataset(), batch_size, num_workers)]
    assert full
    for stop in stops:
        ds = make_dataset()
        loader = build_dataloader(ds, batch_size, num_workers)
        head = [b.keys for b in itertools.islice(loader, stop)]
        state = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON checkpoint
        resumed_ds = make_dataset()
        resumed = build_dataloader(resumed_ds, batch_size, num_workers)
        resumed.load_state_dict(state)
        tail = [b.keys for b in resumed]
        assert head + tail == full, f"stop={stop}"
    return full


def test_resume_mid_epoch_yields_exactly_the_rest(tmp_path, image_dir, tok):
    lines = [{"image": "imgs/a.jpg", "caption": f"image {i}"} for i in range(14)]
    lines[::3] = [{"caption": f"text-only {i}"} for i in range(0, 14, 3)]
    lines[5] = {"image": "imgs/corrupt.jpg", "caption": "bad"}
    manifest = write_jsonl(tmp_path / "m.jsonl", lines)

    def make():
        return CaptionDataset(JsonlCaptionSource(manifest), tok, PROC, seed=7, shuffle_buffer=5)

    full = _resume_matches(make, num_workers=2, batch_size=2, stops=[1, 2, 3])
    assert sum(len(k) for k in full) == 13
    _resume_matches(make, num_workers=0, batch_size=3, stops=[2])

    # a different worker count cannot continue the same streams
    ds = make()
    loader = build_dataloader(ds, 2, 2)
    next(iter(loader))
    other = build_dataloader(make(), 2, 0)
    other.load_state_dict(ds.state_dict())
    with pytest.raises(ValueError, match="workers"):
        next(iter(other))


def test_resume_across_epochs_in_loop_mode(tmp_path, tok):
    pattern = _text_manifest(tmp_path, n_files=2, per_file=5)

    def make():
        return CaptionDataset(JsonlCaptionSource(pattern), tok, PROC, seed=1, shuffle_buffer=3, loop=True)

    everything = sorted(f"part-{f}.jsonl:{i + 1}" for f in range(2) for i in range(5))
    reference = [b.keys for b in itertools.islice(build_dataloader(make(), 3, 0), 12)]  # 3.6 epochs
    flat = sum(reference, [])
    for epoch in range(3):  # batches run across epoch boundaries; each epoch is a permutation
        assert sorted(flat[10 * epoch : 10 * epoch + 10]) == everything
    assert flat[:10] != flat[10:20]
    ds = make()
    loader = build_dataloader(ds, 3, 0)
    head = [b.keys for b in itertools.islice(loader, 5)]  # mid-epoch 1
    resumed = build_dataloader(make(), 3, 0)
    resumed.load_state_dict(ds.state_dict())
    assert head + [b.keys for b in itertools.islice(resumed, 7)] == reference


# ---------------------------------------------------------------------------------- skips


def test_dataloader_workers_report_skip_counts(tmp_path, image_dir, tok):
    lines = [
        {"image": "imgs/a.jpg", "caption": "good 0"},
        "{bad json",
        {"image": "imgs/missing.jpg", "caption": "missing"},
        {"image": "imgs/truncated.jpg", "caption": "truncated"},
        {"image": "imgs/b.png", "caption": ""},
        {"image": "imgs/corrupt.jpg", "caption": "corrupt"},
    ] + [{"image": "imgs/c.jpg", "caption": f"good {i}"} for i in range(1, 7)]
    manifest = write_jsonl(tmp_path / "m.jsonl", lines)
    # Without shuffling the record split is i % 2 (one file, two workers) and every worker's
    # stream ends with good records, so every skip travels in some batch.
    ds = CaptionDataset(JsonlCaptionSource(manifest), tok, PROC, shuffle=False)
    loader = build_dataloader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert sorted(k for b in batches for k in b.keys) == sorted(f"m.jsonl:{i}" for i in [1, *range(7, 13)])
    assert {b.position["worker"] for b in batches} == {0, 1}
    expected = {"bad_json": 1, "missing_image": 1, "bad_image": 2, "empty_text": 1}
    assert loader.skipped == expected == ds.skipped()
    assert all(isinstance(b.skipped, dict) for b in batches)
    # the totals survive a checkpoint
    restored = CaptionDataset(JsonlCaptionSource(manifest), tok, PROC, shuffle=False)
    restored.load_state_dict(ds.state_dict())
    assert restored.skipped() == expected


def test_resume_at_another_layout_reads_every_record_once(tmp_path, tok):
    """2 DP ranks (no workers, micro-batch 2) stop after 3 batches; 1 rank with 2 workers
    (micro-batch 4, the same global batch) resumes: it reads exactly the records nobody
    read, starting with the next global batch of the one order, and a resume at that
    second layout again continues exactly."""
    from llama_vision.data.datasets import resume_position

    pattern = _text_manifest(tmp_path, n_files=2, per_file=11)
    everything = [f"part-{f}.jsonl:{i + 1}" for f in range(2) for i in range(11)]

    def dataset(rank, world, block, **kw):
        return CaptionDataset(JsonlCaptionSource(pattern), tok, PROC, rank=rank, world_size=world, seed=5, shuffle=False,
                              split="record", block_size=block, **kw)  # fmt: skip

    first, states = [], []
    for rank in range(2):
        loader = build_dataloader(dataset(rank, 2, 2), batch_size=2)
        first += [k for b in itertools.islice(loader, 3) for k in b.keys]
        states.append(json.loads(json.dumps(loader.state_dict())))
    assert sorted(first, key=everything.index) == everything[:12]  # 3 global batches of 4
    resumed = build_dataloader(dataset(0, 1, 4), batch_size=4, num_workers=2)
    resumed.load_state_dict(resume_position(states, 0, 1, 2, block_size=4))
    batches = [b.keys for b in resumed]
    assert set(batches[0]) == set(everything[12:16])  # the next global batch
    rest = [k for b in batches for k in b]
    assert sorted(first + rest) == sorted(everything) and len(first + rest) == len(everything)
    # The positions of the resumed layout translate again (to 3 ranks, 1 worker each).
    again = build_dataloader(dataset(0, 1, 4), batch_size=4, num_workers=2)
    again.load_state_dict(resume_position(states, 0, 1, 2, block_size=4))
    head = [k for b in itertools.islice(again, 1) for k in b.keys]
    second = [again.state_dict()]
    tail = []
    for rank in range(3):
        loader = build_dataloader(dataset(rank, 3, 1), batch_size=1)
        loader.load_state_dict(resume_position(second, rank, 3, 1))
        tail += [k for b in loader for k in b.keys]
    assert sorted(first + head + tail) == sorted(everything) and len(first + head + tail) == len(everything)
