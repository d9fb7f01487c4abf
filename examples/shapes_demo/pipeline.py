"""The CPU demo end to end (`tools/demo.py --workdir DIR`).

1. data: the shapes world (`llama_vision.data.synthetic.shapes`) in ``DIR/data`` + a word-level
   SentencePiece tokenizer on all captions (``DIR/data/tokenizer.model``); reused on rerun.
2. stage 0 (``configs/train/demo_text.yaml``): the decoder learns the caption language
   (image + video captions, no media) -> ``DIR/stage0/final`` = "the pretrained LLM".
3. stage 1 (``demo_image.yaml``): decoder frozen, ViT + gated cross-attention trained.
4. stage 2 (``demo_video.yaml``): only the video parameters trained.
5. held-out evaluation through the evaluation harness (``llama_vision.eval``: predictions
   and results.json in ``DIR/eval/{images,videos}/{model,control}/``) + control runs with every
   cross-attention gate forced to 0, and a bitwise check that the decoder never changed
   -> ``DIR/metrics.json`` (atomic write).
6. ``tools/infer_image.py`` / ``tools/infer_video.py`` on a few held-out samples.

``--fusion projector`` trains the image stage LLaVA's way instead: a small CLIP-style tower
pretrained contrastively (``tools/pretrain_tower.py``, ``demo_clip.yaml`` -> ``DIR/tower_clip``),
then it and an mlp2x_gelu projector feeding the same frozen stage-0 decoder through its
input (``demo_llava.yaml``, llama_vision/model/llava.py), then its video stage
(``demo_llava_video.yaml``: LLaVA-OneVision's video path on that checkpoint, the frames
through the same tower and projector, 4 tokens each; only the projector trains, on the
image captions and the clips mixed);
``--fusion both`` trains both arms on the same trunk and data. Whenever the projector arm
runs, metrics.json gets ``fusion_comparison``: per arm the caption and video accuracy (and
the image accuracy after the video stage), the stages' train wall time, the decoder tokens
an image takes and the prefill time of one image.

Each stage runs ``tools/train.py`` in a subprocess (the same command a user would type).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TEXT_CFG = REPO / "configs/train/demo_text.yaml"
IMAGE_CFG = REPO / "configs/train/demo_image.yaml"
VIDEO_CFG = REPO / "configs/train/demo_video.yaml"
LLAVA_CFG = REPO / "configs/train/demo_llava.yaml"
LLAVA_VIDEO_CFG = REPO / "configs/train/demo_llava_video.yaml"
TOWER_CFG = REPO / "configs/train/demo_clip.yaml"
FUSIONS = ("cross_attention", "projector", "both")

DECODER_PREFIXES = ("text_model.layers.", "text_model.tok_embeddings", "text_model.norm", "text_model.output")

# Bumped whenever prepare_data writes a different stage-0 corpus from the same data, so a
# rerun rebuilds it (and, through the stamp in every stage's reuse key, retrains).
TEXT_CORPUS_VERSION = 4  # 3: + scene-line rows (media_text); 4: + video scene-line rows
# Bumped whenever the checkpoints a stage writes change layout, so a rerun retrains instead
# of reusing a final/ that no longer loads (2: the video placeholder's own embedding).
STAGE_FORMAT = 2

# Extra keys beside the contract's (see eval_videos): chance-level-aware video scores.
FORCED_CHOICE_KEYS = ("video_direction_forced_choice_accuracy", "control_video_direction_forced_choice_accuracy")

METRIC_KEYS = (
    "image_caption_accuracy",
    "video_direction_accuracy",
    "control_image_caption_accuracy",
    "control_video_direction_accuracy",
    "decoder_unchanged",
    "wall_s",
)


@dataclasses.dataclass
class DemoOptions:
    workdir: str
    seed: int = 0
    quick: bool = False
    skip_video: bool = False
    steps_scale: float = 1.0
    fusion: str = "cross_attention"
    n_train_images: int = 4096
    n_test_images: int = 200
    n_train_videos: int = 400
    n_test_videos: int = 80
    text_steps: int = 400
    image_steps: int = 3000
    projector_steps: int = 2000
    tower_steps: int = 800
    video_steps: int = 300
    projector_video_steps: int = 2000
    n_show: int = 2

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.quick:
            self.n_train_images, self.n_test_images = 48, 8
            self.n_train_videos, self.n_test_videos = 12, 4
            self.text_steps, self.image_steps, self.video_steps = 8, 4, 3
            self.projector_steps, self.tower_steps, self.projector_video_steps = 4, 3, 3
            self.n_show = 1


def _steps(n: int, scale: float) -> int:
    return max(1, int(round(n * scale)))


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- 1. data ----------------------------------------------------------------------------------


def prepare_data(opts: DemoOptions) -> dict[str, Any]:
    from llama_vision.data.synthetic.shapes import generate_shapes_world, iter_shard_samples
    from llama_vision.tokenizer.sentencepiece_tokenizer import train_sentencepiece

    data_dir = Path(opts.workdir) / "data"
    summary = generate_shapes_world(
        data_dir,
        opts.n_train_images,
        opts.n_test_images,
        opts.n_train_videos,
        opts.n_test_videos,
        seed=opts.seed,
        shard_size=512,
    )
    tok_path = data_dir / "tokenizer.model"
    text_path = data_dir / "text_captions.jsonl"
    stamp = data_dir / "tokenizer.stamp.json"
    stamp_value = {"manifest": json.loads(Path(summary["manifest"]).read_text()), "corpus": TEXT_CORPUS_VERSION}
    result = {**summary, "tokenizer": str(tok_path), "text_captions": str(text_path), "stamp": str(stamp)}
    if summary["reused"] and tok_path.exists() and text_path.exists() and stamp.exists() and json.loads(stamp.read_text()) == stamp_value:
        return result
    captions = []
    for shard in summary["image_shards"]:
        for sample in iter_shard_samples(shard):
            text = sample.get("caption") or sample.get("txt")
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            captions.append(text)
    video_captions = [r["caption"] for r in _read_jsonl(summary["train_videos"])]
    test_captions = [r["caption"] for r in _read_jsonl(summary["test_images"])] + [
        r["caption"] for r in _read_jsonl(summary["test_videos"])
    ]
    scenes = [scene_line(c) for c in captions]
    frames = projector_video_frames()
    video_scenes = [video_scene_line(r, frames) for r in _read_jsonl(summary["train_videos"])]
    # The vocabulary comes from all captions and scene lines (words only; the held-out
    # captions use the same closed vocabulary, so they add no words the training ones lack).
    train_sentencepiece(captions + video_captions + test_captions + scenes + video_scenes, tok_path, vocab_size=400,
                        model_type="word")
    # Stage 0's text corpus: image and video training captions (video ones repeated so the
    # motion sentences are not drowned out), shuffled: stage 0 reads less than one epoch
    # through a bounded shuffle buffer, so a file sorted by kind would hide the video
    # sentences from it entirely. Each image caption also comes once with its scene line
    # in the media slot (before <|begin_of_text|>, where an image's tokens go): the trunk
    # learns that what sits there describes the caption, which a projector's soft tokens
    # need in order to steer it (docs/llava.md, "The demo"); the cross-attention arm
    # never sees a scene line. Each video caption likewise comes with the scene lines of
    # the frames the projector's video stage samples, one after another (a clip's tokens).
    reps = max(1, len(captions) // max(1, 4 * len(video_captions)))
    rows = ([{"caption": c} for c in captions] + [{"media_text": m, "caption": c} for m, c in zip(scenes, captions)]
            + [{"caption": c} for c in video_captions] * reps
            + [{"media_text": m, "caption": c} for m, c in zip(video_scenes, video_captions)] * (4 * reps))
    random.Random(opts.seed).shuffle(rows)
    tmp = text_path.with_name(text_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, text_path)
    _atomic_json(stamp, stamp_value)
    return result


def scene_line(caption: str) -> str:
    """A caption's scene line: one word per cell in POSITIONS order (row-major, the order of
    a 2 x 2 pooled token grid), the cell's colour and kind fused or "none", e.g.
    "redcircle none none bluesquare"."""
    from llama_vision.data.synthetic.shapes import POSITIONS, parse_caption

    cells = {position: colour + kind for colour, kind, position in parse_caption(caption)}
    if not cells:
        raise ValueError(f"not a shapes-world image caption: {caption!r}")
    return " ".join(cells.get(p, "none") for p in POSITIONS)


def projector_video_frames() -> int:
    """Frames the projector arm's video stage samples per clip (demo_llava_video.yaml)."""
    import yaml

    return int(yaml.safe_load(LLAVA_VIDEO_CFG.read_text(encoding="utf-8"))["video"]["num_frames"])


def video_scene_line(row: dict, num_frames: int) -> str:
    """A video row's scene lines: for each of the `num_frames` frames the video data
    samples (`uniform_indices`, the loader's), the `scene_line` of where the shape's centre
    is (the 2 x 2 cell it lies in), one after another: 4 * num_frames words."""
    from llama_vision.data.synthetic.shapes import POSITIONS
    from llama_vision.data.video import uniform_indices

    centres = row.get("centres")
    if not centres or len(centres) != row["num_frames"]:
        raise ValueError(f"video row {row.get('video')!r}: needs one centre per frame (shapes-world data version 3)")
    words = []
    for i in uniform_indices(len(centres), num_frames):
        x, y = centres[i]
        cell = 2 * (y >= 0.5) + (x >= 0.5)
        words += [row["colour"] + row["kind"] if j == cell else "none" for j in range(len(POSITIONS))]
    return " ".join(words)


# ---- 2-4. training stages -----------------------------------------------------------------------


def run_stage(config: Path, out_dir: Path, overrides: list[str], log=print, depends: tuple[Path, ...] = (),
              tool: str = "tools/train.py", product: str = "final/params.json") -> float:
    """TOOL --config CONFIG output_dir=OUT_DIR overrides... ; -> wall seconds. Skipped if
    OUT_DIR/PRODUCT exists and was made from the same config, overrides, upstream stage and
    `depends` files."""
    # Reuse key: the overrides, the config text and the upstream stage's stamp (so a changed
    # config or a retrained previous stage retrains this one).
    upstream = [o.split("=", 1)[1] for o in overrides if o.startswith(("init_from=", "init_text_from="))]
    up_stamp = Path(upstream[0]).parent / "demo_done.json" if upstream else None
    key = {
        "overrides": overrides,
        "config": config.read_text(encoding="utf-8"),
        "upstream": up_stamp.read_text(encoding="utf-8") if up_stamp and up_stamp.exists() else None,
        "depends": [Path(d).read_text(encoding="utf-8") for d in depends],
        "format": STAGE_FORMAT,
    }
    if (out_dir / product).exists() and (out_dir / "demo_done.json").exists():
        done = json.loads((out_dir / "demo_done.json").read_text())
        if done.get("key") == key:
            log(f"[demo] {out_dir.name}: reusing {out_dir / product}")
            return 0.0
    cmd = [sys.executable, str(REPO / tool), "--config", str(config), f"output_dir={out_dir}", *overrides]
    log("[demo] $ " + " ".join(cmd))
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=str(REPO))
    wall = time.time() - t0
    _atomic_json(out_dir / "demo_done.json", {"key": key, "wall_s": wall, "finished": time.time()})
    return wall


# ---- 5. evaluation ------------------------------------------------------------------------------


def _load(ckpt: Path):
    import torch

    from llama_vision.checkpoint import load_model
    from llama_vision.generation import Generator
    from llama_vision.tokenizer import load_tokenizer

    model = load_model(str(ckpt), device="cpu", dtype=torch.float32)
    model.eval()
    return Generator(model, load_tokenizer(str(ckpt / "tokenizer.model")))


def _harness_task(name: str, rows: list[dict], out_dir: Path, max_new_tokens: int, metric: str, mode: str = "generate"):
    """A raw-prompt (<|image|> or <|video|>, <|begin_of_text|>, then the model's caption)
    task of the evaluation harness over ``rows`` (generic JSONL, written to out_dir)."""
    from llama_vision.eval.tasks import TaskConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return TaskConfig(name=name, data={"format": "jsonl", "path": str(path)}, prompt="", chat=False,
                      max_new_tokens=max_new_tokens, metric=metric, mode=mode)


def _score(ckpt: Path, tasks: list, out_dir: Path, control: bool, batch_size: int) -> dict[str, list[dict]]:
    """Run the harness (llama_vision/eval/runner.py, the one scoring path) on ``tasks`` ->
    predictions.jsonl rows per task; control: no image information (`silence_images`)."""
    import shutil

    from llama_vision.eval.runner import evaluate

    gen = _load(ckpt)
    if control:
        silence_images(gen.model)
    out = out_dir / ("control" if control else "model")
    shutil.rmtree(out, ignore_errors=True)  # a retrained stage: never resume stale predictions
    evaluate(gen, tasks, out_dir, out, batch_size=batch_size, run_info={"ckpt": str(ckpt), "control": control}, log=lambda *_: None)
    return {t.name: [json.loads(x) for x in (out / t.name / "predictions.jsonl").read_text().splitlines()] for t in tasks}


def silence_images(model) -> None:
    """The control: no image information reaches the decoder -- every cross-attention gate
    at 0 (Meta's adapters), or the projector's output at 0 (LLaVA: its tokens become zero
    vectors in the decoder input)."""
    import torch

    from llama_vision.model import zero_gates

    zero_gates(model)
    projector = getattr(model.vision_model, "projector", None)
    if projector is not None:
        last = projector.linear_2 if projector.kind == "mlp2x_gelu" else projector.linear_1
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()


def prefill_ms_per_image(ckpt: Path, test_jsonl: str, n: int = 16) -> float:
    """Median wall milliseconds of the first token for one held-out image (batch 1: image
    encoding, the prompt's forward and the pick), over `n` images after a warm-up."""
    import statistics

    from llama_vision.data.image_io import load_image

    gen = _load(ckpt)
    root = Path(test_jsonl).parent
    rows = _read_jsonl(test_jsonl)[: n + 1]
    prompt = [gen.tokenizer.image_token_id] + gen.tokenizer.encode("", bos=True, eos=False)
    times = []
    for i, r in enumerate(rows):
        image = load_image(str(root / r["image"]))
        t0 = time.perf_counter()
        gen.generate([prompt], [[image]], max_new_tokens=1, temperature=0.0)
        if i:  # the first call warms up
            times.append(1000 * (time.perf_counter() - t0))
    return round(statistics.median(times), 2)


def decoder_tokens_per_image(ckpt: Path, test_jsonl: str) -> float:
    """Decoder input positions one held-out image takes on average: 1 (its <|image|>: the
    image enters through cross-attention) or the projector's tokens (LLaVA)."""
    import torch

    from llama_vision.checkpoint import load_model

    model = load_model(str(ckpt), device="cpu", dtype=torch.float32)
    mod = model.modalities["image"]
    if mod.fusion != "projector":
        return 1.0
    from llama_vision.data.llava_images import LlavaImageProcessor
    from llama_vision.data.image_io import load_image

    processor = LlavaImageProcessor.for_params(model.args.llava)
    root = Path(test_jsonl).parent
    sizes = [load_image(str(root / r["image"])).size[::-1] for r in _read_jsonl(test_jsonl)]
    return sum(processor.tokens_per_item(s) for s in sizes) / len(sizes)


def _mean_score(records: list[dict]) -> float:
    return sum(r["score"] for r in records) / len(records)


def eval_images(ckpt: Path, test_jsonl: str, control: bool, batch_size: int = 16, max_new_tokens: int = 48,
                out_dir: Path | None = None) -> tuple[float, list[str]]:
    """-> (caption accuracy of the generated captions, the captions), through the harness
    (out_dir: its outputs, default WORKDIR/eval/images)."""
    root = Path(test_jsonl).parent
    rows = [{"id": f"{i:05d}", "image": str(root / r["image"]), "question": "", "answers": [r["caption"]]}
            for i, r in enumerate(_read_jsonl(test_jsonl))]
    out_dir = out_dir or Path(ckpt).parent.parent / "eval" / "images"
    task = _harness_task("shapes_image_captions", rows, out_dir, max_new_tokens, "shapes_caption")
    records = _score(ckpt, [task], out_dir, control, batch_size)[task.name]
    return _mean_score(records), [r["raw_prediction"] for r in records]


def eval_videos(ckpt: Path, test_jsonl: str, control: bool, batch_size: int = 8, max_new_tokens: int = 16,
                out_dir: Path | None = None) -> tuple[float, float, list[str]]:
    """-> (direction accuracy of the generated captions, forced-choice direction accuracy,
    generated captions), through the harness. Forced choice: of the four captions that
    differ only in the direction ("the red circle moves left." / right / up / down), the one
    the model gives the highest log-likelihood (the harness's loglikelihood mode); it always
    names a direction, so a model that ignores the video scores chance (0.25 on the balanced
    test set) instead of 0."""
    root = Path(test_jsonl).parent
    test = _read_jsonl(test_jsonl)
    captions = [{"id": f"{i:05d}", "video": str(root / r["video"]), "question": "", "answers": [r["caption"]]} for i, r in enumerate(test)]
    choices = [{**c, "choices": direction_choices(r["caption"]), "answer": direction_index(r["caption"])} for c, r in zip(captions, test)]
    out_dir = out_dir or Path(ckpt).parent.parent / "eval" / "videos"
    tasks = [_harness_task("shapes_video_captions", captions, out_dir, max_new_tokens, "shapes_direction"),
             _harness_task("shapes_video_forced_choice", choices, out_dir, 1, "multiple_choice", mode="loglikelihood")]
    records = _score(ckpt, tasks, out_dir, control, batch_size)
    generated, forced = records[tasks[0].name], records[tasks[1].name]
    return _mean_score(generated), _mean_score(forced), [r["raw_prediction"] for r in generated]


def direction_choices(caption: str) -> list[str]:
    """The four captions that differ from ``caption`` only in the direction, in DIRECTIONS order."""
    from llama_vision.data.synthetic.shapes import DIRECTIONS, parse_video_caption, video_caption

    parsed = parse_video_caption(caption)
    if parsed is None:
        raise ValueError(f"not a shapes-world video caption: {caption!r}")
    colour, kind, _ = parsed
    return [video_caption(colour, kind, d) for d in DIRECTIONS]


def direction_index(caption: str) -> int:
    from llama_vision.data.synthetic.shapes import DIRECTIONS, parse_video_caption

    return DIRECTIONS.index(parse_video_caption(caption)[2])


def decoder_unchanged(a: Path, b: Path) -> bool:
    """Every decoder tensor of checkpoint b equals checkpoint a's bitwise."""
    import glob

    import torch

    def decoder(d: Path) -> dict:
        sd: dict = {}
        for f in sorted(glob.glob(str(d / "consolidated.*.pth"))):
            sd.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        return {k: v for k, v in sd.items() if k.startswith(DECODER_PREFIXES)}

    da, db = decoder(a), decoder(b)
    if not da or da.keys() != db.keys():
        return False
    return all(da[k].dtype == db[k].dtype and da[k].shape == db[k].shape and torch.equal(da[k], db[k]) for k in da)


# ---- 6. the inference CLIs ---------------------------------------------------------------------


def show_inference(ckpt: Path, rows: list[dict], root: Path, video: bool, num_frames: int | None, log=print) -> list[dict]:
    shown = []
    for r in rows:
        if video:
            cmd = [sys.executable, str(REPO / "tools/infer_video.py"), "--ckpt", str(ckpt), "--video", str(root / r["video"]),
                   "--raw", "--dtype", "fp32", "--max-new-tokens", "16"]
            if num_frames:
                cmd += ["--num-frames", str(num_frames)]
        else:
            cmd = [sys.executable, str(REPO / "tools/infer_image.py"), "--ckpt", str(ckpt), "--image", str(root / r["image"]),
                   "--prompt", "", "--raw", "--dtype", "fp32", "--max-new-tokens", "48"]
        log("[demo] $ " + " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
        extra = f" ({r.get('aspect_ratio')} canvas {r.get('canvas')})" if not video else f" ({r.get('num_frames')} frames)"
        log(f"  prompt: <|{'video' if video else 'image'}|><|begin_of_text|>   (raw base-model prompt){extra}")
        log("  output:\n    " + (proc.stdout.strip() or "(none)").replace("\n", "\n    "))
        if proc.returncode != 0:
            log(f"  FAILED (rc={proc.returncode}): {proc.stderr.strip()[-800:]}")
        log(f"  ground truth: {r['caption']}")
        shown.append({"cmd": cmd, "rc": proc.returncode, "stdout": proc.stdout[-2000:], "truth": r["caption"]})
    return shown


# ---- the whole demo -----------------------------------------------------------------------------


def run_demo(opts: DemoOptions, log=print) -> dict[str, Any]:
    t_start = time.time()
    work = Path(opts.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    opts.workdir = str(work)
    walls: dict[str, float] = {}

    log(f"[demo] 1/6 data -> {work / 'data'}")
    t0 = time.time()
    data = prepare_data(opts)
    walls["data_wall_s"] = time.time() - t0
    log(f"[demo] data {'reused' if data['reused'] else 'generated'} in {walls['data_wall_s']:.1f}s: {data['counts']}")
    tok = data["tokenizer"]
    common = [f"tokenizer={tok}", f"seed={opts.seed}"]
    shards = json.dumps(data["image_shards"])
    s0, s1, s2 = work / "stage0", work / "stage1", work / "stage2"
    stamp = (Path(data["stamp"]),)  # the data every stage trains on
    if opts.quick:
        common_quick = ["data.shuffle_buffer=16", "micro_batch_size=4"]
    else:
        common_quick = []

    log("[demo] 2/6 stage 0: text-only decoder pretraining")
    walls["stage0_wall_s"] = run_stage(
        TEXT_CFG, s0, common + common_quick + [f"max_steps={_steps(opts.text_steps, opts.steps_scale)}",
                                               f"data.paths={json.dumps([data['text_captions']])}"], log, stamp)
    run_cross, run_proj = opts.fusion in ("cross_attention", "both"), opts.fusion in ("projector", "both")
    final = None
    if run_cross:
        log("[demo] 3/6 stage 1: image adapters (decoder frozen)")
        walls["stage1_wall_s"] = run_stage(
            IMAGE_CFG, s1, common + common_quick + [f"max_steps={_steps(opts.image_steps, opts.steps_scale)}",
                                                   f"data.paths={shards}", f"init_from={s0 / 'final'}"], log, stamp)
        final = s1 / "final"
        if not opts.skip_video:
            log("[demo] 4/6 stage 2: video adapters (everything else frozen)")
            walls["stage2_wall_s"] = run_stage(
                VIDEO_CFG, s2, common + common_quick + [f"max_steps={_steps(opts.video_steps, opts.steps_scale)}",
                                                       f"data.paths={json.dumps([data['train_videos']])}", f"init_from={s1 / 'final'}"], log, stamp)
            final = s2 / "final"
    s1p, s2p, tower = work / "stage1_projector", work / "stage2_projector", work / "tower_clip"
    if run_proj:
        log("[demo] 3/6 stage 1 (projector fusion): contrastive pretraining of the CLIP-style tower")
        walls["tower_clip_wall_s"] = run_stage(
            TOWER_CFG, tower, common + [f"max_steps={_steps(opts.tower_steps, opts.steps_scale)}", f"data.paths={shards}"]
            + (["data.shuffle_buffer=16", "batch_size=8"] if opts.quick else []), log, stamp,
            tool="tools/pretrain_tower.py", product="tower.safetensors")
        log("[demo] 3/6 stage 1 (projector fusion): mlp2x_gelu projector + the tower (decoder frozen)")
        walls["stage1_projector_wall_s"] = run_stage(
            LLAVA_CFG, s1p, common + common_quick + [f"max_steps={_steps(opts.projector_steps, opts.steps_scale)}",
                                                    f"data.paths={shards}", f"init_text_from={s0 / 'final'}",
                                                    f"init_vision_from={tower / 'tower.safetensors'}"], log,
            stamp + (tower / "demo_done.json",))
        if not opts.skip_video:
            log("[demo] 4/6 stage 2 (projector fusion): frames through the tower + projector (decoder frozen)")
            # the image captions and the clips, one mixture (images go through the projector too)
            sources = (f"[{{kind: caption_wds, paths: {shards}, weight: 1.0}}, "
                       f"{{kind: video_jsonl, paths: {json.dumps([data['train_videos']])}, weight: 1.0}}]")
            walls["stage2_projector_wall_s"] = run_stage(
                LLAVA_VIDEO_CFG, s2p, common + common_quick + [f"max_steps={_steps(opts.projector_video_steps, opts.steps_scale)}",
                                                          f"data.sources={sources}", f"model={s1p / 'final'}",
                                                          f"init_from={s1p / 'final'}"], log, stamp)
    with_video = not opts.skip_video

    log(f"[demo] 5/6 held-out evaluation of {final or s1p / 'final'}")
    t0 = time.time()
    metrics: dict[str, Any] = {}
    arms: dict[str, dict[str, Any]] = {}
    img_preds = ctl_img_preds = vid_preds = ctl_vid_preds = []
    if run_cross:
        cross = arms["cross_attention"] = {}
        cross["image_caption_accuracy"], img_preds = eval_images(final, data["test_images"], control=False)
        cross["control_image_caption_accuracy"], ctl_img_preds = eval_images(final, data["test_images"], control=True)
        if with_video:  # the final checkpoint (stage 2) holds the image stage's weights too
            cross["video_direction_accuracy"], cross["video_direction_forced_choice_accuracy"], vid_preds = eval_videos(
                final, data["test_videos"], control=False)
            cross["control_video_direction_accuracy"], cross["control_video_direction_forced_choice_accuracy"], ctl_vid_preds = (
                eval_videos(final, data["test_videos"], control=True))
            cross["image_caption_accuracy_after_video"] = cross["image_caption_accuracy"]  # (measured on it)
            cross["video_stage_train_wall_s"] = stage_wall_s(s2)
        cross["decoder_unchanged"] = decoder_unchanged(s0 / "final", final) and decoder_unchanged(s0 / "final", s1 / "final")
        cross["image_stage_train_wall_s"] = stage_wall_s(s1)
        cross["image_checkpoint"] = str(s1 / "final")
    if run_proj:
        proj = arms["projector"] = {}
        out = work / "eval" / "images_projector"
        proj["image_caption_accuracy"], proj_preds = eval_images(s1p / "final", data["test_images"], control=False, out_dir=out)
        proj["control_image_caption_accuracy"], proj_ctl = eval_images(s1p / "final", data["test_images"], control=True, out_dir=out)
        proj["decoder_unchanged"] = decoder_unchanged(s0 / "final", s1p / "final")
        # The arm's image stage is the tower's contrastive pretraining + the projector stage.
        proj["image_stage_train_wall_s"] = sum(stage_wall_s(d) or 0.0 for d in (tower, s1p))
        proj["image_checkpoint"] = str(s1p / "final")
        if with_video:
            # The video stage retrains the projector, which images go through too: its
            # checkpoint's image accuracy is the arm's after both stages.
            out = work / "eval" / "videos_projector"
            proj["video_direction_accuracy"], proj["video_direction_forced_choice_accuracy"], proj_vid = eval_videos(
                s2p / "final", data["test_videos"], control=False, out_dir=out)
            proj["control_video_direction_accuracy"], proj["control_video_direction_forced_choice_accuracy"], proj_ctl_vid = (
                eval_videos(s2p / "final", data["test_videos"], control=True, out_dir=out))
            proj["image_caption_accuracy_after_video"], _ = eval_images(
                s2p / "final", data["test_images"], control=False, out_dir=work / "eval" / "images_projector_after_video")
            proj["decoder_unchanged"] = proj["decoder_unchanged"] and decoder_unchanged(s0 / "final", s2p / "final")
            proj["video_stage_train_wall_s"] = stage_wall_s(s2p)
        if not run_cross:
            final, img_preds, ctl_img_preds = (s2p if with_video else s1p) / "final", proj_preds, proj_ctl
            if with_video:
                vid_preds, ctl_vid_preds = proj_vid, proj_ctl_vid
    main = arms["cross_attention" if run_cross else "projector"]
    for key in ("image_caption_accuracy", "control_image_caption_accuracy", "decoder_unchanged",
                "video_direction_accuracy", "control_video_direction_accuracy", *FORCED_CHOICE_KEYS):
        metrics[key] = main.get(key)
    if run_proj:
        for arm in arms.values():
            ckpt = Path(arm["image_checkpoint"])
            arm["decoder_tokens_per_image"] = decoder_tokens_per_image(ckpt, data["test_images"])
            arm["prefill_ms_per_image"] = prefill_ms_per_image(ckpt, data["test_images"], n=2 if opts.quick else 16)
            arm.setdefault("video_direction_accuracy", None)
        metrics["fusion_comparison"] = arms
    walls["eval_wall_s"] = time.time() - t0

    img_rows = _read_jsonl(data["test_images"])
    samples = {
        "image": [{"truth": r["caption"], "pred": p, "control": c} for r, p, c in list(zip(img_rows, img_preds, ctl_img_preds))[:8]],
    }
    if vid_preds:
        vid_rows = _read_jsonl(data["test_videos"])
        samples["video"] = [{"truth": r["caption"], "pred": p, "control": c} for r, p, c in list(zip(vid_rows, vid_preds, ctl_vid_preds))[:8]]
    for kind, rows in samples.items():
        for s in rows[:4]:
            log(f"  [{kind}] truth: {s['truth']!r}\n          pred:  {s['pred']!r}\n          gates=0: {s['control']!r}")

    log("[demo] 6/6 the inference CLIs on held-out samples")
    t0 = time.time()
    img_root = Path(data["test_images"]).parent
    show_inference(final, img_rows[: opts.n_show], img_root, video=False, num_frames=None, log=log)
    if with_video:
        vid_rows = _read_jsonl(data["test_videos"])
        show_inference(final, vid_rows[: opts.n_show], Path(data["test_videos"]).parent, video=True, num_frames=None, log=log)
    walls["infer_wall_s"] = time.time() - t0

    metrics.update(walls)
    metrics["wall_s"] = time.time() - t_start
    metrics["counts"] = data["counts"]
    metrics["steps"] = {
        "stage0": _steps(opts.text_steps, opts.steps_scale),
        "stage1": _steps(opts.image_steps, opts.steps_scale) if run_cross else None,
        "stage2": _steps(opts.video_steps, opts.steps_scale) if with_video and run_cross else None,
        "stage1_projector": _steps(opts.projector_steps, opts.steps_scale) if run_proj else None,
        "tower_clip": _steps(opts.tower_steps, opts.steps_scale) if run_proj else None,
        "stage2_projector": _steps(opts.projector_video_steps, opts.steps_scale) if run_proj and with_video else None,
    }
    stages = [s0]
    if run_cross:
        stages += [s1, s2] if with_video else [s1]
    if run_proj:
        stages += [s1p, s2p] if with_video else [s1p]
    plots = [d / "loss.png" for d in stages]
    metrics["loss_plots"] = [str(p) for p in plots if p.exists()]
    metrics["final_checkpoint"] = str(final)
    metrics["options"] = dataclasses.asdict(opts)
    metrics["samples"] = samples
    _atomic_json(work / "metrics.json", metrics)
    log("[demo] metrics -> " + str(work / "metrics.json"))
    for k in METRIC_KEYS + FORCED_CHOICE_KEYS:
        log(f"  {k}: {metrics[k]}")
    if "fusion_comparison" in metrics:
        log(fusion_table(metrics["fusion_comparison"]))
    return metrics


COMPARISON_ROWS = (
    ("image caption accuracy", "image_caption_accuracy", "{:.3f}"),
    ("  control (no image information)", "control_image_caption_accuracy", "{:.3f}"),
    ("video direction accuracy", "video_direction_accuracy", "{:.3f}"),
    ("  control (no video information)", "control_video_direction_accuracy", "{:.3f}"),
    ("image caption accuracy after the video stage", "image_caption_accuracy_after_video", "{:.3f}"),
    ("image stage train wall (s)", "image_stage_train_wall_s", "{:.0f}"),
    ("video stage train wall (s)", "video_stage_train_wall_s", "{:.0f}"),
    ("decoder tokens per image", "decoder_tokens_per_image", "{:g}"),
    ("prefill, 1 image, batch 1 (ms)", "prefill_ms_per_image", "{:.1f}"),
    ("decoder bitwise unchanged", "decoder_unchanged", "{}"),
)


def fusion_table(arms: dict[str, dict[str, Any]]) -> str:
    """metrics.json's fusion_comparison as a Markdown table (the README's)."""
    names = list(arms)
    lines = ["| | " + " | ".join(n.replace("_", "-") for n in names) + " |", "|---|" + "---|" * len(names)]
    for label, key, fmt in COMPARISON_ROWS:
        cells = [("n/a" if arms[n].get(key) is None else fmt.format(arms[n][key])) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_wall_s(out_dir: Path) -> float | None:
    """The training wall seconds of a stage (from its demo_done.json: also when reused)."""
    done = out_dir / "demo_done.json"
    return json.loads(done.read_text()).get("wall_s") if done.exists() else None
