"""The projector video modality (LLaVA-OneVision's video path, llama_vision.model.llava
`add_llava_video_modality`): the image modality's tower / projector / image_newline
(the same modules) encode every real frame, each frame's grid is bilinearly pooled to
ceil(g/2)^2 tokens, one image_newline closes a video. Checked against transformers'
LlavaOnevisionForConditionalGeneration after weight conversion (video features 1e-5,
logits 1e-4 for a video prompt and a ragged video + text batch, 8 greedy tokens), saved
and reloaded through params.json, trained on a generated video JSONL (bad clips skipped
and counted) and generated from with Generator.generate(videos=...)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from transformers import CLIPVisionConfig, LlamaConfig  # noqa: E402
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration  # noqa: E402

from _helpers import randomize_hf_llava  # noqa: E402
from llama_vision.checkpoint.llava_hf import hf_tokens_to_ours, llava_from_hf  # noqa: E402
from llama_vision.generation import Generator  # noqa: E402

ATOL = 1e-4
IMAGE, VIDEO = 250, 251  # OneVision's <image> / <video> ids: rows of its vocabulary
PIX, PATCH = 28, 7  # a 4 x 4 grid per frame -> 2 x 2 pooled tokens
FRAMES = 4


def _config() -> LlavaOnevisionConfig:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=PIX, patch_size=PATCH, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE, video_token_index=VIDEO,
                                vision_feature_layer=-2, vision_feature_select_strategy="default",
                                image_grid_pinpoints=[[PIX, PIX], [PIX, 2 * PIX], [2 * PIX, PIX]],
                                vision_aspect_ratio="anyres_max_9")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = _config()
    hf = LlavaOnevisionForConditionalGeneration(cfg).eval()
    randomize_hf_llava(hf, 1)
    return hf, llava_from_hf(hf.state_dict(), cfg.to_dict()), cfg


def _video(seed: int, frames: int = FRAMES) -> torch.Tensor:
    return torch.randn(frames, 3, PIX, PIX, generator=torch.Generator().manual_seed(seed))


def _ours_videos(per_row: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row its videos [f, 3, H, W] -> (frames [B, V, F, 3, H, W], frame_counts [B, V])."""
    v = max(max(len(r) for r in per_row), 1)
    f = max([x.shape[0] for r in per_row for x in r] or [1])
    px = torch.zeros(len(per_row), v, f, 3, PIX, PIX)
    counts = torch.zeros(len(per_row), v, dtype=torch.long)
    for b, vids in enumerate(per_row):
        for i, x in enumerate(vids):
            px[b, i, : x.shape[0]] = x
            counts[b, i] = x.shape[0]
    return px, counts


def _video_ids(frames: int = FRAMES) -> list[int]:
    return [VIDEO] * (frames * 4 + 1)  # processing_llava_onevision: frames * pooled^2 + 1


def test_imported_onevision_has_the_video_modality_sharing_the_image_weights(pair):
    _, ours, _ = pair
    video, image = ours.modalities["video"], ours.modalities["image"]
    assert video.fusion == "projector" and video.token_id != image.token_id
    assert video.token_id == ours.args.vocab_size + 1
    assert video.tokens_per_item(FRAMES) == FRAMES * 4 + 1
    # one set of weights: nothing of its own
    assert [n for n, _ in ours.named_parameters() if "video" in n] == []
    assert ours.args.llava["video"]["pool"] == "bilinear2x"


@torch.no_grad()
def test_video_tokens_equal_get_video_features(pair):
    hf, ours, cfg = pair
    clips = [_video(1), _video(2)]
    want = hf.get_video_features(torch.stack(clips), vision_feature_layer=-2,
                                 vision_feature_select_strategy="default").pooler_output  # [2, 17, D]
    enc = ours.modalities["video"].encode(_ours_videos([clips]))
    assert enc.tokens.shape[:3] == (1, 2, FRAMES * 4 + 1) and bool(enc.valid.all())
    torch.testing.assert_close(enc.tokens[0], want, atol=1e-5, rtol=0)
    # a shorter video in a padded slot: its own frames only
    short = _video(3, frames=2)
    enc = ours.modalities["video"].encode(_ours_videos([[clips[0]], [short]]))
    want_short = hf.get_video_features(short[None], vision_feature_layer=-2,
                                       vision_feature_select_strategy="default").pooler_output[0]
    assert int(enc.valid[1, 0].sum()) == 2 * 4 + 1
    torch.testing.assert_close(enc.tokens[1, 0, : 9], want_short, atol=1e-5, rtol=0)


@torch.no_grad()
def test_video_prompt_logits_match_transformers(pair):
    hf, ours, cfg = pair
    ids = [1, 5] + _video_ids() + [9, 33, 17, 4]
    clip = _video(4)
    want = hf(input_ids=torch.tensor([ids]), pixel_values_videos=clip[None]).logits
    tokens = hf_tokens_to_ours(torch.tensor([ids]), cfg.to_dict(), ours)
    assert int((tokens == ours.modalities["video"].token_id).sum()) == FRAMES * 4 + 1
    got = ours(tokens, media_inputs={"video": _ours_videos([[clip]])})
    torch.testing.assert_close(got, want.float(), atol=ATOL, rtol=0)


@torch.no_grad()
def test_ragged_video_and_text_batch_matches_transformers(pair):
    hf, ours, cfg = pair
    rows = [[1, 5] + _video_ids() + [9, 33], [1, 40, 41]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    clip = _video(5)
    want = hf(input_ids=ids, attention_mask=mask, pixel_values_videos=clip[None]).logits
    got = ours(hf_tokens_to_ours(ids, cfg.to_dict(), ours), media_inputs={"video": _ours_videos([[clip], []])})
    for b, r in enumerate(rows):
        torch.testing.assert_close(got[b, : len(r)], want[b, : len(r)].float(), atol=ATOL, rtol=0)


@torch.no_grad()
def test_greedy_8_tokens_identical(pair):
    hf, ours, cfg = pair
    ids = [1, 5] + _video_ids() + [9, 33]
    clip = _video(6)
    want = hf.generate(input_ids=torch.tensor([ids]), pixel_values_videos=clip[None], max_new_tokens=8,
                       min_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    tokens = hf_tokens_to_ours(torch.tensor([ids]), cfg.to_dict(), ours)[0].tolist()
    got = Generator(ours, streaming_layout=False).generate_from_tensors(
        [tokens], media_inputs={"video": _ours_videos([[clip]])}, max_new_tokens=8, stop_tokens=[])[0]
    assert len(want) == 8 and got == want


@torch.no_grad()
def test_saved_and_loaded_back_with_the_video_modality(pair, tmp_path):
    from llama_vision.checkpoint import load_model, read_params, save_meta_checkpoint

    _, ours, cfg = pair
    save_meta_checkpoint(ours, tmp_path / "ckpt")
    assert read_params(tmp_path / "ckpt")["llava"]["video"]["num_frames"] >= 1
    back = load_model(tmp_path / "ckpt")
    assert back.modalities["video"].fusion == "projector"
    assert back.modalities["video"].token_id == ours.modalities["video"].token_id
    ids = [1, 5] + _video_ids() + [9]
    tokens = hf_tokens_to_ours(torch.tensor([ids]), cfg.to_dict(), ours)
    media = {"video": _ours_videos([[_video(7)]])}
    assert torch.equal(back(tokens, media_inputs=media), ours(tokens, media_inputs=media))


# --- training data, the trainer and generation on a tiny LLaVA model with the video modality


@pytest.fixture(scope="module")
def video_run(shapes_corpus, tmp_path_factory):
    """A tiny LLaVA model (configs/model/tiny_llava.yaml + `llava.video`) trained 12 steps
    on a generated video-caption JSONL with one corrupt and one missing clip."""
    import yaml

    from _helpers import ROOT, tiny_train_overrides
    from llama_vision.config import load_config
    from llama_vision.data.synthetic.shapes import draw_motion_video, write_mp4
    from llama_vision.training.train_config import TrainConfig
    from llama_vision.training.trainer import Trainer

    root = tmp_path_factory.mktemp("llava_video")
    rows = []
    for i, direction in enumerate(["left", "up", "right", "down"] * 2):
        frames = draw_motion_video(np.random.default_rng(i), direction, num_frames=8, size=(40, 32), colour="red",
                                   kind="circle")
        write_mp4(frames, root / f"c{i}.mp4")
        rows.append({"video": f"c{i}.mp4", "caption": f"the red circle moves {direction}."})
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    rows.insert(3, {"video": "broken.mp4", "caption": "the red circle moves up."})
    rows.insert(5, {"video": "gone.mp4", "caption": "the red circle moves up."})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = yaml.safe_load((ROOT / "configs/model/tiny_llava.yaml").read_text())
    params["llava"]["video"] = {"pool": "bilinear2x", "num_frames": 4}
    (root / "model.yaml").write_text(yaml.safe_dump(params))
    overrides = tiny_train_overrides(shapes_corpus, root / "run", max_steps=12, checkpoint_every=12, **{
        "model": root / "model.yaml", "data.kind": "video_jsonl", "data.paths": f'["{root / "train.jsonl"}"]',
        "data.shuffle": "false", "data.max_seq_len": 48, "video.num_frames": 4, "micro_batch_size": 4,
        "optim.lr": 3e-3, "optim.warmup_steps": 1})
    cfg = load_config(TrainConfig, ROOT / "configs/train/tiny_llava_pretrain.yaml", overrides)
    trainer = Trainer(cfg)
    batch = next(iter(trainer.loader))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    return {"root": root, "trainer": trainer, "batch": batch, "before": before}


def test_video_batches_expand_each_video_to_its_tokens(video_run):
    from llama_vision.data.video_dataset import ProjectorVideoBatch

    model, batch = video_run["trainer"].model, video_run["batch"]
    video = model.modalities["video"]
    assert isinstance(batch, ProjectorVideoBatch) and video.fusion == "projector"
    assert batch.frames.shape == (4, 1, 4, 3, 28, 28) and batch.frame_counts.tolist() == [[4]] * 4
    assert video.tokens_per_item(4) == 16  # 4 frames x 2 x 2 pooled tokens, no image_newline without AnyRes
    assert ((batch.tokens == video.token_id).sum(1) == 16).all()
    assert bool((batch.labels[batch.tokens == video.token_id] == -100).all())
    assert batch.images is None and torch.isfinite(batch.frames).all()


def test_video_training_lowers_the_loss_and_counts_bad_clips(video_run):
    from llama_vision.training.metrics import read_metrics

    trainer = video_run["trainer"]
    metrics = read_metrics(video_run["root"] / "run" / "metrics.jsonl")
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, video_run["before"][n])}
    assert any(n.startswith("vision_model.projector.") for n in changed)
    skipped = trainer.loader.dataset.skipped()
    assert skipped.get("bad_video", 0) >= 1 and skipped.get("missing_video", 0) >= 1, skipped
    assert metrics[-1]["skipped_samples"] == sum(skipped.values())


@torch.no_grad()
def test_generate_from_a_video_path_expands_its_placeholder(video_run):
    from llama_vision.data.llava_images import LlavaImageProcessor
    from llama_vision.data.video import VideoProcessor

    trainer = video_run["trainer"]
    model, tok = trainer.model.eval(), trainer.tokenizer
    gen = Generator(model, tok, streaming_layout=False)
    v = model.modalities["video"].token_id
    path = str(video_run["root"] / "c0.mp4")
    prompt = [v] + tok.encode("the", bos=True, eos=False)
    got = gen.generate([prompt], videos=[[path]], max_new_tokens=6, stop_tokens=[])[0]
    frame = LlavaImageProcessor.for_video_params(model.args.llava)
    clip, _, info = VideoProcessor(4, 28, 1, image_processor=frame)(path)
    media = {"video": (clip[None, None, :, 0], torch.tensor([[info.valid]]))}
    want = gen.generate_from_tensors([[v] * 16 + prompt[1:]], media_inputs=media, max_new_tokens=6, stop_tokens=[])[0]
    assert got == want and len(got) == 6
    # the trained model reloads with its video modality and answers the same
    from llama_vision.checkpoint import load_model

    back = load_model(video_run["root"] / "run" / "final")
    assert Generator(back, tok, streaming_layout=False).generate([prompt], videos=[[path]], max_new_tokens=6,
                                                                 stop_tokens=[])[0] == got
    # tools/infer_video.py's path (inference.answer_video): the same tokens, `--num-frames` honoured
    from llama_vision.inference import Sampling, answer_video

    answer, summary = answer_video(gen, path, "the", Sampling(max_new_tokens=6), raw=True)
    want = gen.generate([prompt], videos=[[path]], max_new_tokens=6)[0]
    assert answer == tok.decode(want) and summary.startswith("video: 4 frames sampled -> 16 decoder input tokens")
    assert answer_video(gen, path, "the", Sampling(max_new_tokens=2), raw=True, num_frames=2)[1].startswith(
        "video: 2 frames sampled -> 8 decoder input tokens")


@torch.no_grad()
def test_siglip_full_selection_video_matches_transformers():
    """A SigLIP tower with OneVision's own defaults (the last layer, every token kept)."""
    from transformers import SiglipVisionConfig

    base = _config()
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=PIX, patch_size=PATCH, vision_use_head=False)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=base.text_config, image_token_index=IMAGE,
                               video_token_index=VIDEO, vision_feature_layer=-1, vision_feature_select_strategy="full",
                               image_grid_pinpoints=[[PIX, PIX]], vision_aspect_ratio="anyres_max_9")
    torch.manual_seed(0)
    hf = LlavaOnevisionForConditionalGeneration(cfg).eval()
    randomize_hf_llava(hf, 3)
    ours = llava_from_hf(hf.state_dict(), cfg.to_dict())
    ids = [1, 5] + _video_ids(3) + [9, 33]
    clip = _video(8, frames=3)
    want = hf(input_ids=torch.tensor([ids]), pixel_values_videos=clip[None]).logits
    got = ours(hf_tokens_to_ours(torch.tensor([ids]), cfg.to_dict(), ours), media_inputs={"video": _ours_videos([[clip]])})
    torch.testing.assert_close(got, want.float(), atol=ATOL, rtol=0)


@torch.no_grad()
def test_onevision_image_prompt_matches_transformers(pair):
    """The imported OneVision's image path too (AnyRes crops + anyres_max + image_newline)."""
    from PIL import Image

    from llama_vision.data.anyres import preprocess_anyres

    hf, ours, cfg = pair
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    item = preprocess_anyres(image, ours.vision_model.config.anyres)
    n = ours.modalities["image"].tokens_per_item((30, 50))
    ids = [1, 5] + [IMAGE] * n + [9, 33]
    want = hf(input_ids=torch.tensor([ids]), pixel_values=item.pixel_values[None], image_sizes=torch.tensor([[30, 50]])).logits
    got = ours(hf_tokens_to_ours(torch.tensor([ids]), cfg.to_dict(), ours),
               media_inputs={"image": (item.pixel_values[None, None], torch.tensor([[[30, 50]]]))})
    torch.testing.assert_close(got, want.float(), atol=ATOL, rtol=0)


def test_video_wds_shards_feed_the_projector_path(video_run):
    """video_wds: .mp4 members decoded from the tar, the broken one skipped and counted."""
    import dataclasses
    import io
    import tarfile

    from llama_vision.data.collate import build_dataloader
    from llama_vision.data.video_dataset import ProjectorVideoBatch, build_video_dataset

    root, trainer = video_run["root"], video_run["trainer"]
    shard = root / "videos-000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, clip, text in [("a", "c0.mp4", "the red circle moves left."), ("b", "broken.mp4", "up."),
                                ("c", "c1.mp4", "the red circle moves up.")]:
            for name, data in [(f"{key}.mp4", (root / clip).read_bytes()), (f"{key}.txt", text.encode())]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = dataclasses.replace(trainer.cfg, data=dataclasses.replace(trainer.cfg.data, kind="video_wds", paths=[str(shard)]))
    ds = build_video_dataset(cfg, trainer.tokenizer, trainer.model.args, 0, 1, loop=False)
    (batch,) = list(build_dataloader(ds, batch_size=4))
    video = trainer.model.modalities["video"]
    assert isinstance(batch, ProjectorVideoBatch) and batch.frames.shape == (2, 1, 4, 3, 28, 28)
    assert ((batch.tokens == video.token_id).sum(1) == video.tokens_per_item(4)).all()
    assert ds.skipped() == {"bad_video": 1}


def test_memory_plan_sizes_the_frames_through_the_tower(video_run):
    """tools/plan_memory on a projector video stage: every frame is one crop through the
    image tower (the planner's video shape is Meta's otherwise)."""
    from llama_vision.training.memory_plan import plan_memory

    trainer = video_run["trainer"]
    plan = plan_memory(trainer.cfg, gpus=1, device="cpu", model=trainer.model)
    b = plan.batch
    assert b.video is None and b.tower is not None
    assert (b.images, b.images_per_row, b.tiles, b.tower.crops, b.tower.tokens_per_image) == (16, 4, 1, 1, 4)
    import dataclasses

    cfg = trainer.cfg
    half = plan_memory(dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, num_frames=2)), gpus=1, device="cpu",
                       model=trainer.model)
    assert plan.activation_parts["vision"] == 2 * half.activation_parts["vision"] > 0  # the tower's share: per frame


@torch.no_grad()
def test_export_to_onevision_round_trips_through_from_pretrained(pair, tmp_path):
    """ours (imported from OneVision) -> save_llava_hf -> LlavaOnevisionForConditionalGeneration
    .from_pretrained: the same logits as the original transformers model on a video prompt
    and an image prompt (AnyRes-Max, image_newline)."""
    from llama_vision.checkpoint.llava_hf import save_llava_hf

    hf, ours, cfg = pair
    save_llava_hf(ours, tmp_path / "ov")
    assert json.loads((tmp_path / "ov" / "config.json").read_text())["model_type"] == "llava_onevision"
    back = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "ov").eval()
    ids = torch.tensor([[1, 5] + _video_ids() + [9, 33]])
    clip = _video(6)
    torch.testing.assert_close(back(input_ids=ids, pixel_values_videos=clip[None]).logits,
                               hf(input_ids=ids, pixel_values_videos=clip[None]).logits, atol=1e-5, rtol=0)
    state, ref = back.state_dict(), hf.state_dict()
    assert state.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(state[k], ref[k], atol=0, rtol=0, msg=k)


def test_a_video_stage_on_a_llava_checkpoint_adds_the_projector_video_path(video_run, shapes_corpus, tmp_path):
    """stage video_pretrain with init_from a LLaVA image checkpoint (no video modality, pool_to
    2): the stage adds the projector video modality from its `video:` block (pool image: 4
    tokens per frame, one per pooled cell), trains only its trainable set on the clips and
    saves a checkpoint that loads back with the modality."""
    import yaml

    from _helpers import ROOT, tiny_train_overrides
    from llama_vision.checkpoint import load_model, read_params, save_meta_checkpoint
    from llama_vision.config import load_config
    from llama_vision.model.builder import build_model
    from llama_vision.training.train_config import TrainConfig
    from llama_vision.training.trainer import Trainer

    tok_words = video_run["trainer"].tokenizer.n_words
    params = yaml.safe_load((ROOT / "configs/model/tiny_llava.yaml").read_text())
    params["llava"]["pool_to"] = 2
    params["vocab_size"] = tok_words
    image_ckpt = tmp_path / "image"
    save_meta_checkpoint(build_model(params, seed=1), image_ckpt)
    assert "video" not in read_params(image_ckpt)["llava"]
    overrides = tiny_train_overrides(shapes_corpus, tmp_path / "run", max_steps=3, checkpoint_every=3, **{
        "model": image_ckpt, "init_from": image_ckpt, "data.paths": f'["{video_run["root"] / "train.jsonl"}"]',
        "data.shuffle": "false", "video.num_frames": 4, "video.pool": "image", "micro_batch_size": 4,
        "trainable.adapters": "true", "optim.lr": 3e-3, "optim.warmup_steps": 1})
    cfg = load_config(TrainConfig, ROOT / "configs/train/tiny_video_pretrain.yaml", overrides)
    trainer = Trainer(cfg)
    video = trainer.model.modalities["video"]
    assert video.fusion == "projector" and video.tokens_per_item(4) == 16
    batch = next(iter(trainer.loader))
    assert ((batch.tokens == video.token_id).sum(1) == 16).all() and batch.frames.shape[2] == 4
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("vision_model.projector.", "text_model.learnable_embedding")) for n in changed), changed
    saved = read_params(tmp_path / "run" / "final")["llava"]
    assert saved["video"]["pool"] == "image" and saved["video"]["num_frames"] == 4 and saved["pool_to"] == 2
    assert load_model(str(tmp_path / "run" / "final")).modalities["video"].tokens_per_item(4) == 16


@torch.no_grad()
def test_lmms_eval_adapter_expands_projector_videos_and_images(video_run, monkeypatch):
    """The lmms-eval / VLMEvalKit adapter on a LLaVA checkpoint: a video item expands to its
    frames' tokens, an image item to the image's (Generator.generate's answers), and a
    loglikelihood request scores the continuation after the expanded prompt."""
    pytest.importorskip("lmms_eval")
    for k, v in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}.items():
        monkeypatch.setenv(k, v)
    from PIL import Image

    from llama_vision.eval.lmms_eval_model import LlamaVisionLMM
    from llama_vision.eval.loglikelihood import continuation_logprobs
    from llama_vision.inputs import prepare_videos

    trainer = video_run["trainer"]
    model, tok = trainer.model.eval(), trainer.tokenizer
    gen = Generator(model, tok, streaming_layout=False)
    lmm = LlamaVisionLMM(pretrained=str(video_run["root"] / "run" / "final"), dtype="fp32", device="cpu", raw=True,
                         max_new_tokens=6)
    path = str(video_run["root"] / "c1.mp4")
    v, i = model.modalities["video"].token_id, model.modalities["image"].token_id
    text = tok.encode("the", bos=True, eos=False)
    want = tok.decode(gen.generate([[v] + text], videos=[[path]], max_new_tokens=6)[0])
    assert lmm.generate_inner([{"type": "video", "value": path}, {"type": "text", "value": "the"}]) == want
    image_path = video_run["root"] / "im.png"
    Image.new("RGB", (30, 20), (30, 200, 30)).save(image_path)
    want = tok.decode(gen.generate([[i] + text], [[Image.open(image_path).convert("RGB")]], max_new_tokens=6)[0])
    assert lmm.generate_inner([{"type": "image", "value": str(image_path)}, {"type": "text", "value": "the"}]) == want
    dialog = [{"role": "user", "content": [{"type": "video", "path": path}, {"type": "text", "text": "the"}]}]
    (nll, _), = lmm._score([(dialog, " red circle")])
    rows, media = prepare_videos(model, [[v] + text], [[path]])
    (logp, _), = continuation_logprobs(model, rows, [tok.encode(" red circle", bos=False, eos=False)], {"video": media})
    assert nll == pytest.approx(-logp, abs=1e-5)


@pytest.mark.parametrize("anyres", [False, True], ids=["one_crop", "anyres"])
def test_image_and_video_sources_mix_on_the_projector_video_path(video_run, shapes_corpus, tmp_path, anyres):
    """OneVision's image + video stage: `data.sources` with a caption source and a video
    source on a LLaVA model's projector video path (one crop per image, or AnyRes crops
    with image_newline). A micro-batch holds image rows and video rows side by side, each
    row's logits as if it were alone, and the stage trains; on Meta's video adapters a
    video source in a mixture is refused, naming the source."""
    import yaml

    from _helpers import ROOT, tiny_train_overrides
    from llama_vision.config import load_config
    from llama_vision.training.train_config import TrainConfig
    from llama_vision.training.trainer import Trainer

    model_yaml = tmp_path / "model.yaml"
    params = yaml.safe_load((ROOT / "configs/model/tiny_llava.yaml").read_text())
    params["llava"]["video"] = {"pool": "bilinear2x", "num_frames": 4}
    if anyres:
        params["llava"].update(image_newline=True, anyres={"grid_pinpoints": [[28, 28], [28, 56], [56, 28]],
                                                           "crop_size": 28, "patches_per_side": 4})
    model_yaml.write_text(yaml.safe_dump(params))
    sources = (f'[{{kind: caption_wds, paths: ["{shapes_corpus["shards"]}"], weight: 1.0}}, '
               f'{{kind: video_jsonl, paths: ["{video_run["root"] / "train.jsonl"}"], weight: 1.0}}]')
    overrides = tiny_train_overrides(shapes_corpus, tmp_path / "run", max_steps=4, checkpoint_every=4, **{
        "model": model_yaml, "data.paths": "[]", "data.sources": sources, "data.max_seq_len": 160 if anyres else 48,
        "video.num_frames": 4, "micro_batch_size": 6, "optim.lr": 3e-3, "optim.warmup_steps": 1})
    cfg = load_config(TrainConfig, ROOT / "configs/train/tiny_llava_pretrain.yaml", overrides)
    trainer = Trainer(cfg)
    model = trainer.model.eval()
    batch = next(b for b in trainer.loader if b.images is not None and b.frames is not None)
    with_video = batch.frame_counts[:, 0] > 0
    with_image = (batch.tokens == model.modalities["image"].token_id).any(1)
    assert with_video.any() and with_image.any() and not (with_video & with_image).any()
    assert (batch.images.shape[2] > 1) == anyres  # (a base image + crops per AnyRes image)
    with torch.no_grad():
        both = model(batch.tokens, batch.images, batch.aspect_ratios, media_inputs=batch.media_inputs())
        for b in range(batch.tokens.shape[0]):
            alone = model(batch.tokens[b:b + 1], batch.images[b:b + 1], batch.aspect_ratios[b:b + 1],
                          media_inputs={"video": (batch.frames[b:b + 1], batch.frame_counts[b:b + 1])})
            real = batch.tokens[b] != trainer.tokenizer.pad_id
            torch.testing.assert_close(both[b][real], alone[0][real], atol=1e-5, rtol=1e-5)
    model.train()
    trainer.fit()
    assert (tmp_path / "run" / "final" / "params.json").exists()

    meta = load_config(TrainConfig, ROOT / "configs/train/tiny_image_sft.yaml",
                       tiny_train_overrides(shapes_corpus, tmp_path / "meta", **{"data.paths": "[]", "data.sources": sources}))
    from llama_vision.training.data import build_loader

    with pytest.raises(ValueError, match=r"data.sources\[1\]: video sources mix with image / text sources only on a LLaVA"):
        build_loader(meta, trainer.tokenizer, trainer.model.args.__class__(**{**vars(trainer.model.args), "llava": None}), 0, 1)


def test_the_server_answers_video_requests_as_generate(video_run):
    """tools/serve.py on a LLaVA video checkpoint: an OpenAI `video_url` part (a data URL)
    becomes the video's bytes, build_prompt puts the video placeholder where the part
    sits, and the engine expands it to the frames' tokens at admission: greedy answers for
    a video, an image and a text prompt decoding side by side equal Generator.generate's.
    A wrong placeholder count, an unreadable video, too long a prompt and a checkpoint
    without the video path are refused, naming the problem."""
    import base64
    import io

    from PIL import Image

    from llama_vision.serving.engine import Engine, GenerationRequest, RequestRejected, SamplingParams
    from llama_vision.serving.openai_api import APIError, build_prompt, parse_chat_request

    trainer = video_run["trainer"]
    model, tok = trainer.model.eval(), trainer.tokenizer
    v, p = model.modalities["video"].token_id, model.modalities["image"].token_id
    clip = (video_run["root"] / "c2.mp4").read_bytes()
    body = {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(clip).decode()}},
        {"type": "text", "text": "what moves?"}]}]}
    req = parse_chat_request(body)
    assert req.videos == [clip] and req.images == []
    ids = build_prompt(tok, req.messages, video_token=v)
    assert ids.count(v) == 1 and tok.image_token_id not in ids
    with pytest.raises(ValueError, match="takes no videos"):
        build_prompt(tok, req.messages)
    with pytest.raises(APIError, match="not a video"):
        parse_chat_request({"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "data:image/png;base64,AAAA"}}]}]})

    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (30, 200, 30)).save(buf, format="PNG")
    green = buf.getvalue()
    text = tok.encode("the", bos=True, eos=False)
    cases = [(ids, [], [clip]), ([p] + text, [green], []), (text, [], []), ([v] + text, [], [clip])]
    engine = Engine(model, tok, max_batch=3)
    engine.start()
    try:
        streams = [engine.submit(GenerationRequest(i, imgs, SamplingParams(max_tokens=5, stop_token_ids=[]), videos=vids))
                   for i, imgs, vids in cases]
        got = [[e.token_id for e in s if e.token_id is not None] for s in streams]
        with pytest.raises(RequestRejected, match="1 video placeholder\\(s\\) but 2 video\\(s\\)"):
            engine.submit(GenerationRequest([v] + text, [], SamplingParams(max_tokens=2), videos=[clip, clip]))
        with pytest.raises(RequestRejected, match="video 1: not a readable video"):
            engine.submit(GenerationRequest([v] + text, [], SamplingParams(max_tokens=2), videos=[b"\x00\x00\x00\x18ftypmp42"]))
        with pytest.raises(RequestRejected, match="images' and videos' tokens"):
            engine.submit(GenerationRequest([v] + text, [], SamplingParams(max_tokens=model.args.max_seq_len - 10),
                                            videos=[clip]))
    finally:
        engine.shutdown()
    reference = Generator(model, tok, streaming_layout=False)
    path = str(video_run["root"] / "c2.mp4")
    for (i, imgs, vids), tokens in zip(cases, got):
        want = reference.generate([i], [[Image.open(io.BytesIO(d)).convert("RGB") for d in imgs]],
                                  videos=[[path] * len(vids)], max_new_tokens=5, stop_tokens=[])[0]
        assert tokens == want and len(tokens) == 5
    assert got[3] != got[2]  # the video reaches the answer

    import yaml

    from _helpers import ROOT
    from llama_vision.model.builder import build_model

    params = yaml.safe_load((ROOT / "configs/model/tiny_llava.yaml").read_text())
    engine = Engine(build_model({**params, "vocab_size": tok.n_words}, seed=0), tok, max_batch=1)
    assert engine.video_token is None
    with pytest.raises(RequestRejected, match="takes no videos in the server"):
        engine.submit(GenerationRequest([v] + text, [], SamplingParams(max_tokens=2), videos=[clip]))
