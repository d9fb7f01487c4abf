"""Readers of the evaluation harness, on small fixtures written in the real layouts: Hugging
Face parquet (image struct{bytes, path}), datasets.save_to_disk folders, the official VQAv2 /
DocVQA / ChartQA JSON files and the generic JSONL. Corrupt and missing images must be
readable as samples and fail only when opened, with ImageLoadError naming them."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
from PIL import Image

from llama_vision.data.image_io import ImageLoadError
from llama_vision.eval.readers import (
    READER_PRESETS,
    READERS,
    EvalSample,
    ImageBytes,
    MissingImage,
    load_images,
    open_image,
    read_samples,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
CORRUPT = b"\x89PNG\r\n\x1a\n this is not really a png"


def png(colour=(255, 0, 0), size=(6, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def write_parquet(path: Path, columns: dict, types: dict | None = None) -> Path:
    types = types or {}
    arrays = {name: pa.array(values, type=types.get(name)) for name, values in columns.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path)
    return path


def img(data: bytes | None, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}


VQA_ANSWER = pa.list_(pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()), ("answer_id", pa.int64())]))


def vqa_answers(*texts):
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


def write_vqav2_snapshot(root: Path) -> Path:
    """lmms-lab/VQAv2 layout: data/<split>-0000k-of-0000n.parquet, several splits."""
    data = root / "VQAv2" / "data"
    common = {"image": IMAGE_TYPE, "answers": VQA_ANSWER}
    write_parquet(
        data / "validation-00000-of-00002.parquet",
        {
            "question_type": ["what color", "is the"],
            "multiple_choice_answer": ["red", "yes"],
            "answers": [vqa_answers("red", "red", "dark red"), vqa_answers("yes", "no")],
            "image_id": [1, 2],
            "answer_type": ["other", "yes/no"],
            "question_id": [1001, 1002],
            "question": ["What color is it?", "Is the sky blue?"],
            "image": [img(png(), "COCO_val2014_000000000001.jpg"), img(CORRUPT, "COCO_val2014_000000000002.jpg")],
        },
        common,
    )
    write_parquet(
        data / "validation-00001-of-00002.parquet",
        {
            "question_type": ["how many"],
            "multiple_choice_answer": ["2"],
            "answers": [vqa_answers("2", "two")],
            "image_id": [3],
            "answer_type": ["number"],
            "question_id": [1003],
            "question": ["How many?"],
            "image": [img(png((0, 0, 255)))],
        },
        common,
    )
    write_parquet(
        data / "testdev-00000-of-00001.parquet",
        {
            "question_type": [None],
            "multiple_choice_answer": [None],
            "answers": [None],
            "image_id": [9],
            "answer_type": [None],
            "question_id": [9001],
            "question": ["Test question?"],
            "image": [img(png())],
        },
        common,
    )
    return root / "VQAv2"


# ------------------------------------------------------------------------ hf_parquet


def test_vqav2_parquet_snapshot_with_corrupt_image(tmp_path):
    write_vqav2_snapshot(tmp_path)
    samples = read_samples({"format": "hf_parquet", "preset": "vqav2", "path": "VQAv2", "split": "validation"}, tmp_path)
    assert [s.id for s in samples] == ["1001", "1002", "1003"]
    first = samples[0]
    assert first.question == "What color is it?"
    assert first.answers == ["red", "red", "dark red"]
    assert first.choices is None and first.video is None
    assert first.meta["answer_type"] == "other" and first.meta["image_id"] == 1
    assert len(first.images) == 1 and isinstance(first.images[0], bytes)

    image = open_image(first.images[0])
    assert image.mode == "RGB" and image.size == (6, 4)
    assert [im.size for im in load_images(samples[2])] == [(6, 4)]

    # The corrupt row is read like any other; it fails only when opened, naming its origin.
    with pytest.raises(ImageLoadError) as raised:
        open_image(samples[1].images[0])
    message = str(raised.value)
    assert "validation-00000-of-00002.parquet" in message and "row 1" in message and "'image'" in message
    with pytest.raises(ImageLoadError, match="sample '1002'"):
        load_images(samples[1])

    # preset alone implies hf_parquet; another split; test-dev has no references.
    test = read_samples({"preset": "vqav2", "path": "VQAv2", "split": "testdev"}, tmp_path)
    assert [(s.id, s.answers) for s in test] == [("9001", [])]


def test_parquet_folder_with_several_splits_needs_split(tmp_path):
    write_vqav2_snapshot(tmp_path)
    with pytest.raises(ValueError, match="several splits.*give 'split'"):
        read_samples({"format": "hf_parquet", "preset": "vqav2", "path": "VQAv2"}, tmp_path)
    with pytest.raises(FileNotFoundError, match="no parquet files of split 'train'.*testdev"):
        read_samples({"format": "hf_parquet", "preset": "vqav2", "path": "VQAv2", "split": "train"}, tmp_path)


def test_limit_and_single_file(tmp_path):
    write_vqav2_snapshot(tmp_path)
    spec = {"format": "hf_parquet", "preset": "vqav2", "path": "VQAv2/data/validation-00000-of-00002.parquet", "limit": 1}
    assert [s.id for s in read_samples(spec, tmp_path)] == ["1001"]


def test_missing_column_names_file_and_column(tmp_path):
    write_vqav2_snapshot(tmp_path)
    spec = {"format": "hf_parquet", "path": "VQAv2", "split": "validation", "preset": "vqav2", "columns": {"id": "qid"}}
    with pytest.raises(ValueError) as raised:
        read_samples(spec, tmp_path)
    message = str(raised.value)
    assert "validation-00000-of-00002.parquet" in message and "'qid'" in message and "columns.id" in message
    assert "question_id" in message  # what the file does have

    with pytest.raises(ValueError, match="unknown key.*'answer_colum'"):
        read_samples({**spec, "columns": {"answer_colum": "x"}}, tmp_path)
    with pytest.raises(ValueError, match="unknown reader preset 'vqa'"):
        read_samples({"format": "hf_parquet", "path": "VQAv2", "preset": "vqa"}, tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_samples({"format": "hf_parquet", "path": "nowhere", "preset": "vqav2"}, tmp_path)
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        read_samples({"format": "csv", "path": "x"}, tmp_path)


def test_image_path_only_null_image_and_custom_columns(tmp_path):
    """Image structs with bytes None and a path relative to the parquet folder; a null image
    cell is a missing image (an ImageLoadError at run time, not a read error)."""
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "pics").mkdir()
    (folder / "pics" / "a.png").write_bytes(png((0, 255, 0)))
    write_parquet(
        folder / "test.parquet",
        {
            "qid": ["q1", "q2", "q3"],
            "prompt": ["one", "two", "three"],
            "gold": ["x", "y", "z"],
            "picture": [img(None, "pics/a.png"), None, img(None, "pics/gone.png")],
        },
        {"picture": IMAGE_TYPE},
    )
    spec = {
        "format": "hf_parquet",
        "path": "custom",
        "columns": {"id": "qid", "question": "prompt", "answer": "gold", "images": ["picture"]},
    }
    samples = read_samples(spec, tmp_path)
    assert [(s.id, s.question, s.answers) for s in samples] == [("q1", "one", ["x"]), ("q2", "two", ["y"]), ("q3", "three", ["z"])]
    assert samples[0].images == [str(folder / "pics" / "a.png")]
    assert open_image(samples[0].images[0]).getpixel((0, 0)) == (0, 255, 0)
    assert isinstance(samples[1].images[0], MissingImage)
    with pytest.raises(ImageLoadError, match="test.parquet row 1 column 'picture'.*empty"):
        open_image(samples[1].images[0])
    with pytest.raises(ImageLoadError, match="gone.png"):
        load_images(samples[2])


def test_textvqa_docvqa_chartqa_ai2d_presets(tmp_path):
    write_parquet(
        tmp_path / "textvqa/data/validation-00000-of-00001.parquet",
        {
            "image_id": ["abc"],
            "question_id": [34602],
            "question": ["what is the brand?"],
            "image": [img(png())],
            "answers": [["nokia", "nokia", "toshiba"]],
            "set_name": ["val"],
        },
        {"image": IMAGE_TYPE},
    )
    write_parquet(
        tmp_path / "DocVQA/DocVQA/validation-00000-of-00001.parquet",
        {
            "questionId": [49153],
            "question": ["What is the date?"],
            "question_types": [["handwritten"]],
            "image": [img(png())],
            "docId": [14465],
            "ucsf_document_id": ["pybv0228"],
            "ucsf_document_page_no": ["81"],
            "answers": [["1/8/93", "January 8, 1993"]],
            "data_split": ["val"],
        },
        {"image": IMAGE_TYPE},
    )
    write_parquet(
        tmp_path / "ChartQA/data/test-00000-of-00001.parquet",
        {"type": ["human_test", "augmented_test"], "question": ["Max value?", "Min value?"], "answer": ["17", "3"], "image": [img(png()), img(png())]},
        {"image": IMAGE_TYPE},
    )
    write_parquet(
        tmp_path / "ai2d/data/test-00000-of-00001.parquet",
        {
            "question": ["Which is a producer?", "Which eats?"],
            "options": [["fox", "grass", "owl", "hawk"], ["sun", "deer"]],
            "answer": ["1", "0"],
            "image": [img(png()), img(png())],
        },
        {"image": IMAGE_TYPE},
    )
    (tv,) = read_samples({"preset": "textvqa", "path": "textvqa", "split": "validation"}, tmp_path)
    assert (tv.id, tv.answers, tv.meta["set_name"]) == ("34602", ["nokia", "nokia", "toshiba"], "val")
    (doc,) = read_samples({"preset": "docvqa", "path": "DocVQA", "split": "validation"}, tmp_path)
    assert (doc.id, doc.answers, doc.meta["ucsf_document_id"]) == ("49153", ["1/8/93", "January 8, 1993"], "pybv0228")
    chart = read_samples({"preset": "chartqa", "path": "ChartQA", "split": "test"}, tmp_path)
    assert [(s.id, s.answers, s.meta["type"]) for s in chart] == [("0", ["17"], "human_test"), ("1", ["3"], "augmented_test")]
    ai2d = read_samples({"preset": "ai2d", "path": "ai2d", "split": "test"}, tmp_path)
    assert [(s.id, s.choices, s.answers) for s in ai2d] == [
        ("0", ["fox", "grass", "owl", "hawk"], ["B"]),
        ("1", ["sun", "deer"], ["A"]),
    ]
    assert all(open_image(s.images[0]).size == (6, 4) for s in ai2d)

    # Without a preset, the columns are inferred from the schema.
    inferred = read_samples({"format": "hf_parquet", "path": "ai2d"}, tmp_path)
    assert [(s.choices, s.answers) for s in inferred] == [(s.choices, s.answers) for s in ai2d]

    # An out-of-range gold index names the file, the row and the column.
    write_parquet(
        tmp_path / "bad_ai2d/test.parquet",
        {"question": ["q"], "options": [["a", "b"]], "answer": ["5"], "image": [img(png())]},
        {"image": IMAGE_TYPE},
    )
    with pytest.raises(ValueError, match=r"test.parquet row 0: 'answer'.*index.*2 choices.*'5'"):
        read_samples({"preset": "ai2d", "path": "bad_ai2d"}, tmp_path)


def test_mmmu_preset(tmp_path):
    images = {f"image_{i}": [None, None, None] for i in range(1, 8)}
    images["image_1"] = [img(png((1, 1, 1))), img(png((3, 3, 3))), None]
    images["image_2"] = [img(png((2, 2, 2))), None, None]
    write_parquet(
        tmp_path / "MMMU/Art/validation-00000-of-00001.parquet",
        {
            "id": ["validation_Art_1", "validation_Art_2", "validation_Art_3"],
            "question": ["Compare <image 2> with <image 1>.", "What is the value in <image 1>?", "Look at <image 1>."],
            "options": ["['<image 1>', 'neither', 'both']", "[]", "['x', 'y']"],
            "explanation": ["", "", ""],
            **images,
            "img_type": ["['Paintings']"] * 3,
            "answer": ["C", "['1.5', '1.50']", "A"],
            "topic_difficulty": ["Easy"] * 3,
            "question_type": ["multiple-choice", "open", "multiple-choice"],
            "subfield": ["Art History"] * 3,
        },
        {f"image_{i}": IMAGE_TYPE for i in range(1, 8)},
    )
    write_parquet(
        tmp_path / "MMMU/Art/dev-00000-of-00001.parquet",
        {"id": ["dev_Art_1"], "question": ["q"], "options": ["['a']"], "explanation": [""], **{k: [None] for k in images},
         "img_type": [""], "answer": ["A"], "topic_difficulty": [""], "question_type": ["multiple-choice"], "subfield": [""]},
        {f"image_{i}": IMAGE_TYPE for i in range(1, 8)},
    )
    mc, open_q, missing = read_samples({"preset": "mmmu", "path": "MMMU", "split": "validation"}, tmp_path)
    assert mc.choices == ["<image 1>", "neither", "both"] and mc.answers == ["C"]
    assert mc.meta["question_type"] == "multiple-choice" and mc.meta["subfield"] == "Art History"
    # Images in the order the text refers to them.
    assert mc.meta["image_columns"] == ["image_2", "image_1"]
    assert [im.getpixel((0, 0)) for im in load_images(mc)] == [(2, 2, 2), (1, 1, 1)]
    assert open_q.choices is None and open_q.answers == ["1.5", "1.50"] and len(open_q.images) == 1
    # A referenced image whose cell is null is a missing image, reported when loaded.
    with pytest.raises(ImageLoadError, match="row 2 column 'image_1'"):
        load_images(missing)


def test_saved_dataset_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"question_id": datasets.Value("int64"), "question": datasets.Value("string"),
         "answers": datasets.Sequence(datasets.Value("string")), "image": datasets.Image()}
    )
    ds = datasets.Dataset.from_dict(
        {"question_id": [7, 8], "question": ["a?", "b?"], "answers": [["x"], ["y", "z"]],
         "image": [{"bytes": png(), "path": None}, {"bytes": CORRUPT, "path": "bad.png"}]},
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"validation": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))

    samples = read_samples({"preset": "textvqa", "path": "single"}, tmp_path)
    assert [(s.id, s.answers) for s in samples] == [("7", ["x"]), ("8", ["y", "z"])]
    assert open_image(samples[0].images[0]).size == (6, 4)
    with pytest.raises(ImageLoadError, match="row 1 column 'image'"):
        open_image(samples[1].images[0])

    assert [s.id for s in read_samples({"preset": "textvqa", "path": "dict", "split": "test"}, tmp_path)] == ["7"]
    with pytest.raises(ValueError, match="splits.*give 'split'"):
        read_samples({"preset": "textvqa", "path": "dict"}, tmp_path)


# ------------------------------------------------------------------------ official JSON


def write_vqav2_json(root: Path) -> None:
    (root / "val2014").mkdir(parents=True)
    questions = {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "val2014",
        "questions": [
            {"image_id": 42, "question": "What is it?", "question_id": 420},
            {"image_id": 43, "question": "Where?", "question_id": 430},
        ],
    }
    annotations = {
        "info": {}, "license": {}, "data_subtype": "val2014", "data_type": "mscoco",
        "annotations": [
            {"question_id": 430, "image_id": 43, "answers": vqa_answers("park", "outside"),
             "multiple_choice_answer": "park", "answer_type": "other", "question_type": "where"},
            {"question_id": 420, "image_id": 42, "answers": vqa_answers("cat"),
             "multiple_choice_answer": "cat", "answer_type": "other", "question_type": "what is"},
        ],
    }
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(questions))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(annotations))
    (root / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(png())  # 43 is missing


def test_vqav2_json(tmp_path):
    write_vqav2_json(tmp_path / "vqa")
    spec = {
        "format": "vqav2_json",
        "questions": "vqa/v2_OpenEnded_mscoco_val2014_questions.json",
        "annotations": "vqa/v2_mscoco_val2014_annotations.json",
        "images": "vqa/val2014",
    }
    a, b = read_samples(spec, tmp_path)
    assert (a.id, a.question, a.answers) == ("420", "What is it?", ["cat"])
    assert (b.id, b.answers, b.meta["answer_type"]) == ("430", ["park", "outside"], "other")
    assert a.images == [str(tmp_path / "vqa/val2014/COCO_val2014_000000000042.jpg")]
    assert open_image(a.images[0]).size == (6, 4)
    with pytest.raises(ImageLoadError, match="COCO_val2014_000000000043.jpg"):
        load_images(b)

    no_annotations = read_samples({k: v for k, v in spec.items() if k != "annotations"}, tmp_path)
    assert [s.answers for s in no_annotations] == [[], []]
    custom = read_samples({**spec, "image_pattern": "{image_id}.png"}, tmp_path)
    assert custom[0].images == [str(tmp_path / "vqa/val2014/42.png")]

    with pytest.raises(FileNotFoundError, match="missing_questions.json"):
        read_samples({**spec, "questions": "vqa/missing_questions.json"}, tmp_path)
    broken = json.loads((tmp_path / spec["questions"]).read_text())
    del broken["questions"][1]["image_id"]
    (tmp_path / "vqa/broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"broken.json questions\[1\]: missing field 'image_id'"):
        read_samples({**spec, "questions": "vqa/broken.json"}, tmp_path)


def test_docvqa_json(tmp_path):
    folder = tmp_path / "docvqa" / "val"
    (folder / "documents").mkdir(parents=True)
    (folder / "documents" / "pybv0228_81.png").write_bytes(png())
    (folder / "documents" / "corrupt_1.png").write_bytes(CORRUPT)
    data = {
        "dataset_name": "docvqa", "dataset_version": "1.0", "dataset_split": "val",
        "data": [
            {"questionId": 49153, "question": "What is the date?", "question_types": ["handwritten"],
             "image": "documents/pybv0228_81.png", "docId": 14465, "ucsf_document_id": "pybv0228",
             "ucsf_document_page_no": "81", "answers": ["1/8/93"], "data_split": "val"},
            {"questionId": 49154, "question": "Who signed?", "image": "documents/corrupt_1.png", "docId": 1,
             "ucsf_document_id": "x", "ucsf_document_page_no": "1", "answers": ["Bob"], "data_split": "val"},
        ],
    }
    (folder / "val_v1.0.json").write_text(json.dumps(data))
    good, bad = read_samples({"format": "docvqa_json", "path": "docvqa/val/val_v1.0.json"}, tmp_path)
    assert (good.id, good.question, good.answers, good.meta["docId"]) == ("49153", "What is the date?", ["1/8/93"], 14465)
    assert open_image(good.images[0]).size == (6, 4)
    with pytest.raises(ImageLoadError, match="corrupt_1.png"):
        load_images(bad)
    # An explicit images root.
    (tmp_path / "elsewhere" / "documents").mkdir(parents=True)
    moved = read_samples({"format": "docvqa_json", "path": "docvqa/val/val_v1.0.json", "images": "elsewhere"}, tmp_path)
    assert moved[0].images == [str(tmp_path / "elsewhere/documents/pybv0228_81.png")]


def test_chartqa_json(tmp_path):
    test = tmp_path / "ChartQA Dataset" / "test"
    (test / "png").mkdir(parents=True)
    (test / "png" / "41699051005347.png").write_bytes(png())
    (test / "test_human.json").write_text(json.dumps([
        {"imgname": "41699051005347.png", "query": "What is the peak?", "label": "62"},
        {"imgname": "missing.png", "query": "Which year?", "label": "2010"},
    ]))
    (test / "test_augmented.json").write_text(json.dumps([
        {"imgname": "41699051005347.png", "query": "Lowest?", "label": 3.5},
    ]))
    spec = {"format": "chartqa_json", "files": ["ChartQA Dataset/test/test_human.json", "ChartQA Dataset/test/test_augmented.json"]}
    samples = read_samples(spec, tmp_path)
    assert [(s.id, s.answers, s.meta["source"]) for s in samples] == [
        ("test_human/0", ["62"], "human"), ("test_human/1", ["2010"], "human"), ("test_augmented/0", ["3.5"], "augmented"),
    ]
    assert open_image(samples[0].images[0]).size == (6, 4)
    with pytest.raises(ImageLoadError, match="missing.png"):
        load_images(samples[1])
    (test / "test_bad.json").write_text(json.dumps([{"imgname": "a.png", "label": "1"}]))
    with pytest.raises(ValueError, match=r"test_bad.json \[0\]: missing field 'query'"):
        read_samples({"format": "chartqa_json", "path": "ChartQA Dataset/test/test_bad.json"}, tmp_path)


# ------------------------------------------------------------------------ jsonl


def test_generic_jsonl(tmp_path):
    folder = tmp_path / "mine"
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "a.png").write_bytes(png())
    (folder / "img" / "b.png").write_bytes(CORRUPT)
    lines = [
        {"id": "s1", "image": "img/a.png", "question": "Colour?", "answers": "red", "split": "val"},
        {"image": ["img/a.png", "img/b.png"], "question": "Same?", "answers": ["no", "No"]},
        {"id": "v1", "video": "clips/v1.mp4", "question": "What happens next?", "choices": ["falls", "rises", "stops"], "answer": "B"},
        {"id": "v2", "video": "clips/v2.mp4", "question": "Why?", "choices": ["a", "b", "c", "d", "e"], "answer": 3},
        {"id": "v3", "video": "clips/v3.mp4", "question": "Who?", "choices": ["the man", "the dog"], "answer": "the dog"},
        {"id": "v4", "video": "clips/v4.mp4", "question": "Where?", "choices": ["in", "out"], "answers": ["0"]},
    ]
    (folder / "test.jsonl").write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[2:]) + "\n")
    samples = read_samples({"format": "jsonl", "path": "mine/test.jsonl"}, tmp_path)
    assert [s.id for s in samples] == ["s1", "2", "v1", "v2", "v3", "v4"]
    s1, s2, v1, v2, v3, v4 = samples
    assert (s1.answers, s1.images, s1.meta) == (["red"], [str(folder / "img/a.png")], {"split": "val"})
    assert s2.answers == ["no", "No"] and len(s2.images) == 2
    assert open_image(s2.images[0]).size == (6, 4)
    with pytest.raises(ImageLoadError, match="sample '2': image 2 of 2.*b.png"):
        load_images(s2)
    assert v1.video == str(folder / "clips/v1.mp4") and v1.images == []  # missing video: passed on
    assert (v1.choices, v1.answers) == (["falls", "rises", "stops"], ["B"])
    assert v2.answers == ["D"] and v3.answers == ["B"] and v4.answers == ["A"]


def test_jsonl_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answers": ["a"]}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: missing field 'answers'"):
        read_samples({"format": "jsonl", "path": "bad.jsonl"}, tmp_path)
    path.write_text(json.dumps({"question": "q", "choices": ["x", "y"], "answer": "Z"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: 'answer'.*2 choices.*'Z'"):
        read_samples({"format": "jsonl", "path": "bad.jsonl"}, tmp_path)
    path.write_text(json.dumps({"question": "q", "answers": "a"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: invalid JSON"):
        read_samples({"format": "jsonl", "path": "bad.jsonl"}, tmp_path)
    path.write_text(json.dumps({"id": 1, "question": "q", "answers": "a"}) + "\n" + json.dumps({"id": "1", "question": "q", "answers": "b"}) + "\n")
    with pytest.raises(ValueError, match="'1' occurs twice"):
        read_samples({"format": "jsonl", "path": "bad.jsonl"}, tmp_path)
    with pytest.raises(FileNotFoundError, match="none.jsonl"):
        read_samples({"format": "jsonl", "path": "none.jsonl"}, tmp_path)
    with pytest.raises(ValueError, match="needs 'path'"):
        read_samples({"format": "jsonl"}, tmp_path)


# ------------------------------------------------------------------------ API


def test_contract_and_refs_pickle():
    assert set(READERS) == {"hf_parquet", "vqav2_json", "docvqa_json", "chartqa_json", "jsonl"}
    assert set(READER_PRESETS) == {"vqav2", "textvqa", "docvqa", "chartqa", "ai2d", "mmmu"}
    sample = EvalSample(id="x", question="q", answers=["a"])
    assert sample.choices is None and sample.images == [] and sample.video is None and sample.meta == {}
    # Refs travel to DataLoader workers.
    data = pickle.loads(pickle.dumps(ImageBytes(CORRUPT, "f.parquet row 3 column 'image'")))
    assert isinstance(data, bytes) and data == CORRUPT
    with pytest.raises(ImageLoadError, match="f.parquet row 3"):
        open_image(data)
    missing = pickle.loads(pickle.dumps(MissingImage("f.parquet row 4 column 'image'", "empty")))
    assert isinstance(missing, str)
    with pytest.raises(ImageLoadError, match="row 4.*empty"):
        open_image(missing)
    assert open_image(png()).size == (6, 4)  # plain bytes work too
