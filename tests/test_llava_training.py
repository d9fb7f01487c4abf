"""Training the LLaVA projector modality with tools/train.py's trainer (tiny configs on the
shapes world's chat data): every image expands to its tower's 16 placeholders, only the
projector (and the special-token rows) change in stage 1 -- the decoder and the CLIP tower
bitwise unchanged --, the loss falls, init_vision_from starts the tower from a weights
file, and final/ loads back as the same model."""
from __future__ import annotations

import pytest
import torch

from _helpers import ROOT, tiny_train_overrides
from llama_vision.config import load_config
from llama_vision.training.train_config import TrainConfig

PRETRAIN = ROOT / "configs/train/tiny_llava_pretrain.yaml"


@pytest.fixture(scope="module")
def run(shapes_corpus, tmp_path_factory):
    """A 12-step tiny_llava_pretrain run, its tower started from a saved HF-layout file."""
    from safetensors.torch import save_file

    import yaml

    from llama_vision.checkpoint.clip_vision import clip_vision_to_hf
    from llama_vision.data.synthetic.chat_sets import write_chat_sets
    from llama_vision.model.clip_vision import ClipVisionConfig, ClipVisionTower
    from llama_vision.training.trainer import Trainer

    root = tmp_path_factory.mktemp("llava_train")
    chat = write_chat_sets(root / "chat", n=32)
    tower_cfg = ClipVisionConfig(**yaml.safe_load((ROOT / "configs/model/tiny_llava.yaml").read_text())["llava"]["tower"])
    torch.manual_seed(7)
    tower = ClipVisionTower(tower_cfg)
    with torch.no_grad():
        for p in tower.parameters():
            p.normal_(0, 0.05)
    save_file({k: v.contiguous() for k, v in clip_vision_to_hf(tower.state_dict(), tower_cfg, prefix="vision_model.").items()},
              str(root / "clip.safetensors"))
    overrides = tiny_train_overrides(shapes_corpus, root / "run", max_steps=12, checkpoint_every=12,
                                     init_vision_from=root / "clip.safetensors", **{
                                         "model": ROOT / "configs/model/tiny_llava.yaml",
                                         "data.paths": f'["{chat["sft"]}"]', "data.shuffle": "false",
                                         "micro_batch_size": 4, "optim.lr": 3e-3, "optim.warmup_steps": 1})
    cfg = load_config(TrainConfig, PRETRAIN, overrides)
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    batch = next(iter(trainer.loader))
    trainer.fit()
    return {"root": root, "trainer": trainer, "before": before, "tower": tower, "batch": batch}


def test_images_expand_to_their_tokens_and_the_tower_starts_from_the_file(run):
    model = run["trainer"].model
    p = model.modalities["image"].token_id
    batch = run["batch"]
    per_row = (batch.tokens == p).sum(1)
    assert bool((per_row == 16 * batch.num_images).all()) and int(batch.num_images.sum()) > 0
    assert bool((batch.labels[batch.tokens == p] == -100).all())  # placeholders are never targets
    for name, t in run["tower"].state_dict().items():
        assert torch.equal(run["before"][f"vision_model.vision_encoder.{name}"], t), name


def test_stage_one_trains_the_projector_only_and_lowers_the_loss(run):
    from llama_vision.training.metrics import read_metrics

    model = run["trainer"].model
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, run["before"][n])}
    assert changed and all(n.startswith("vision_model.projector.") or n.startswith("text_model.learnable_embedding")
                           for n in changed), sorted(changed)[:5]
    assert any(n.startswith("vision_model.projector.") for n in changed)
    losses = [m["loss"] for m in read_metrics(run["root"] / "run" / "metrics.jsonl")]
    print(losses)
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


@torch.no_grad()
def test_final_loads_back_as_the_trained_model(run):
    from llama_vision.checkpoint import load_model

    model = run["trainer"].model.eval()
    back = load_model(run["root"] / "run" / "final")
    batch = run["batch"]
    media = {"image": (batch.images, batch.aspect_ratios)}
    torch.testing.assert_close(back(batch.tokens, media_inputs=media), model(batch.tokens, media_inputs=media), atol=1e-6, rtol=0)


@torch.no_grad()
def test_generate_with_pil_images_expands_each_placeholder(run):
    """Generator.generate on a LLaVA model: one <|image|> per PIL image in the prompt,
    expanded to the image's 16 tokens (llama_vision.inputs.prepare_images) -- the same
    answer as the already-expanded prompt with the processor's pixels."""
    from PIL import Image

    from llama_vision.data.llava_images import LlavaImageProcessor
    from llama_vision.generation import Generator

    trainer = run["trainer"]
    model, tok = trainer.model.eval(), trainer.tokenizer
    gen = Generator(model, tok, streaming_layout=False)
    p = model.modalities["image"].token_id
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    prompt = [p] + tok.encode("a", bos=True, eos=False)
    got = gen.generate([prompt], [[image]], max_new_tokens=6, stop_tokens=[])[0]
    pixels, size = LlavaImageProcessor.for_params(model.args.llava)(image)
    want = gen.generate_from_tensors([[p] * 16 + prompt[1:]], media_inputs={"image": (pixels[None, None], torch.tensor([[size]]))},
                                     max_new_tokens=6, stop_tokens=[])[0]
    assert got == want and size == (30, 40)


def test_the_serving_engine_answers_as_generate_for_a_llava_model(run):
    """tools/serve.py's engine on a LLaVA model: each image's placeholder expanded at
    admission, the images encoded at the prefill only; greedy answers equal
    Generator.generate token for token for text-only, one- and two-image prompts decoding
    side by side, and a prompt too long once its images' tokens count is refused."""
    import io

    from PIL import Image

    from llama_vision.generation import Generator
    from llama_vision.serving.engine import Engine, GenerationRequest, RequestRejected, SamplingParams

    trainer = run["trainer"]
    model, tok = trainer.model.eval(), trainer.tokenizer
    p = model.modalities["image"].token_id

    def png(colour, size):
        buf = io.BytesIO()
        Image.new("RGB", size, colour).save(buf, format="PNG")
        return buf.getvalue()

    red, blue = png((200, 30, 30), (40, 30)), png((30, 30, 200), (30, 40))
    text = tok.encode("a", bos=True, eos=False)
    cases = [(text, []), ([p] + text, [red]), ([p, p] + text, [red, blue]), ([p] + text + text, [blue])]
    engine = Engine(model, tok, max_batch=2)
    engine.start()
    try:
        streams = [engine.submit(GenerationRequest(ids, imgs, SamplingParams(max_tokens=6, stop_token_ids=[])))
                   for ids, imgs in cases]
        got = [[e.token_id for e in s if e.token_id is not None] for s in streams]
        with pytest.raises(RequestRejected, match="images' tokens"):
            engine.submit(GenerationRequest([p] * 6 + text, [red] * 6, SamplingParams(max_tokens=model.args.max_seq_len - 60)))
    finally:
        engine.shutdown()
    reference = Generator(model, tok, streaming_layout=False)
    for (ids, imgs), tokens in zip(cases, got):
        want = reference.generate([ids], [[Image.open(io.BytesIO(d)).convert("RGB") for d in imgs]], max_new_tokens=6,
                                  stop_tokens=[])[0]
        assert tokens == want and len(tokens) == 6
    assert got[1] != got[0] or got[2] != got[0]  # the images reach the answer
    assert engine.metrics()["vision_encoder_runs"] == 0  # (the cross-attention K/V cache: unused)
