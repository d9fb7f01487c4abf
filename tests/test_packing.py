"""Multimodal sequence packing and token-budget batching (data.packing,
data.max_tokens_per_batch) and the decoder-input contract they use (DecoderInput,
docs/decoder_input.md): packed == unpacked (losses, logits, gradients), the span and mask
rules that make it so, exact resume, budgets, clear config errors."""
from __future__ import annotations

import itertools
import json
import random
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from _helpers import ROOT, TINY_IMAGE_TOKEN as IMG, tiny_model, tiny_train_overrides
from llama_vision.config import load_config
from llama_vision.data.batch import IGNORE_INDEX, batch_fingerprint
from llama_vision.data.collate import build_dataloader, collate_examples
from llama_vision.data.datasets import CaptionDataset, shifted_labels
from llama_vision.data.image import ImageProcessor
from llama_vision.data.packing import collate_packed
from llama_vision.data.sources import JsonlCaptionSource
from llama_vision.model.cross_attention import NO_END, media_spans
from llama_vision.model.decoder_input import DecoderInput, clip_spans_to_segments, positions_from_segments
from llama_vision.training.data import build_loader, micro_batches
from llama_vision.training.flops import step_flops, step_shape_from_batch
from llama_vision.training.metrics import read_metrics
from llama_vision.training.objectives import LMObjective
from llama_vision.training.train_config import DataConfig, TrainConfig

PRETRAIN = str(ROOT / "configs/train/tiny_image_pretrain.yaml")
PAD = 0
TILES = 4


# ------------------------------------------------------------------ hand-built samples
def _sample(key: str, layout: list, g: torch.Generator) -> dict:
    """layout: token ids, with ("img", n_tiles) for an image placeholder; targets are every
    text token after the first (loss on text, never on placeholders)."""
    tokens, images, ratios = [], [], []
    for item in layout:
        if isinstance(item, tuple):
            tokens.append(IMG)
            images.append(torch.randn(item[1], 3, 28, 28, generator=g))
            ratios.append((1, item[1]))
        else:
            tokens.append(item)
    mask = [i > 0 and t != IMG for i, t in enumerate(tokens)]
    return {"key": key, "tokens": tokens, "labels": shifted_labels(tokens, mask), "images": images, "aspect_ratios": ratios}


def _rows(seed: int = 0) -> list[list[dict]]:
    """Three packed rows: [1 image, text-only] (the text-only sample must not see the image
    before it), [2 images mid-text, text-only, 1 image], [text-only, text-only]."""
    g = torch.Generator().manual_seed(seed)
    r = random.Random(seed)
    text = lambda n: [r.randrange(2, 500) for _ in range(n)]  # noqa: E731
    s0 = _sample("s0", [("img", 2), 1, *text(6)], g)
    s1 = _sample("s1", [1, *text(7)], g)
    s2 = _sample("s2", [1, *text(2), ("img", 1), *text(3), ("img", 3), *text(4)], g)
    s3 = _sample("s3", [1, *text(4)], g)
    s4 = _sample("s4", [("img", 1), 1, *text(5)], g)
    s5 = _sample("s5", [1, *text(3)], g)
    s6 = _sample("s6", [1, *text(9)], g)
    return [[s0, s1], [s2, s3, s4], [s5, s6]]


def _packed_and_unpacked(seed: int = 0):
    rows = _rows(seed)
    packed = collate_packed(rows, pad_id=PAD, max_num_tiles=TILES, image_token_id=IMG)
    flat = [ex for row in rows for ex in row]
    unpacked = collate_examples(flat, pad_id=PAD, max_num_tiles=TILES, image_token_id=IMG)
    # (packed row, offset in it, unpacked row, length) of every sample
    where, k = [], 0
    for r, row in enumerate(rows):
        off = 0
        for ex in row:
            where.append((r, off, k, len(ex["tokens"])))
            off += len(ex["tokens"])
            k += 1
    return rows, packed, unpacked, where


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")


def _losses_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    objective = LMObjective(model, nullcontext)
    logits = objective.logits(batch)
    (F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
     / batch.num_targets).backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return logits.detach(), _token_losses(logits.detach(), batch.labels), grads


def _per_sample(packed_t, unpacked_t, where):
    """Pairs (packed slice, unpacked slice) per sample of a [B, L, ...] tensor."""
    return [(packed_t[r, off : off + n], unpacked_t[k, :n]) for r, off, k, n in where]


# ------------------------------------------------------------------ 1. packed == unpacked
def test_packed_batch_equals_unpacked_losses_logits_and_gradients():
    rows, packed, unpacked, where = _packed_and_unpacked()
    assert packed.images is not None and packed.num_images.tolist() == [1, 3, 0]
    assert packed.image_segments.tolist() == [[0, -1, -1], [0, 0, 2], [-1, -1, -1]]
    assert packed.num_targets == unpacked.num_targets
    model = tiny_model().train()
    encoded = []
    model.vision_model.register_forward_pre_hook(lambda m, args: encoded.append(tuple(args[0].shape[:2])))
    logits_p, losses_p, grads_p = _losses_and_grads(model, packed)
    logits_u, losses_u, grads_u = _losses_and_grads(model, unpacked)
    # Packed: the 4 images alone go through the encoder, not the 3 x 3 padded slots.
    assert encoded == [(1, 4), (7, 2)]
    for p, u in _per_sample(logits_p, logits_u, where):
        torch.testing.assert_close(p, u, atol=1e-5, rtol=0)
    for p, u in _per_sample(losses_p, losses_u, where):
        torch.testing.assert_close(p, u, atol=1e-5, rtol=0)
    assert losses_p.sum().item() == pytest.approx(losses_u.sum().item(), abs=1e-4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(grads_p) and any("cross_attention" in n for n in trainable)
    assert any("vision_model" in n for n in trainable)
    for n in trainable:
        torch.testing.assert_close(grads_p[n], grads_u[n], atol=1e-5, rtol=0, msg=n)
    # The adapters and encoder did get a gradient (images matter to the loss).
    assert grads_p["text_model.cross_attention_layers.0.gate_attn"].abs().item() > 1e-4


def _sample_losses(model, batch, where, index):
    with torch.no_grad():
        losses = _token_losses(LMObjective(model, nullcontext).logits(batch), batch.labels)
    r, off, _, n = where[index]
    return losses[r, off : off + n]


def test_naive_packing_variants_give_different_losses(monkeypatch):
    """The test above can fail: without clipping the spans to the sample, or without the
    segment mask, the text-only sample s1 packed after s0 sees s0's image or tokens."""
    import llama_vision.model.model as model_module
    import llama_vision.model.text as text_module
    from llama_vision.model.decoder_input import segment_attention_mask

    _, packed, unpacked, where = _packed_and_unpacked()
    model = tiny_model()
    want = _sample_losses(model, unpacked, [(k, 0, k, n) for _, _, k, n in where], 1)
    good = _sample_losses(model, packed, where, 1)
    torch.testing.assert_close(good, want, atol=1e-5, rtol=0)

    with monkeypatch.context() as m:  # spans in row coordinates, not clipped to the sample
        m.setattr(model_module, "clip_spans_to_segments", lambda start, end, seg: end)
        unclipped = _sample_losses(model, packed, where, 1)
    assert (unclipped - want).abs().max() > 1e-3

    with monkeypatch.context() as m:  # causal over the whole row: no segment mask
        m.setattr(text_module, "segment_attention_mask",
                  lambda seg: segment_attention_mask(torch.zeros_like(seg)))
        unmasked = _sample_losses(model, packed, where, 1)
    assert (unmasked - want).abs().max() > 1e-3


def test_clipped_spans_are_metas_rule_applied_inside_each_sample():
    """clip(spans of the whole row) == media_spans of each sample alone, shifted to the
    sample's offset and ending at its end -- on random rows of placeholders and text,
    samples ending and starting with placeholders included."""
    r = random.Random(0)
    P = 9
    for _ in range(300):
        samples = [[r.choice([P, 1, 2]) for _ in range(r.randint(1, 6))] for _ in range(r.randint(1, 4))]
        row = [t for s in samples for t in s]
        seg = torch.tensor([[i for i, s in enumerate(samples) for _ in s] + [-1] * 2])
        start, end = media_spans([row + [0, 0]], {P})
        got_end = clip_spans_to_segments(start, end, seg)
        want, off = [], 0
        for s in samples:
            s_start, s_end = media_spans([s], {P})
            for a, b in zip(s_start[0].tolist(), s_end[0].tolist()):
                if a != NO_END:
                    want.append((a + off, min(b, len(s)) + off))
            off += len(s)
        got = [(a, b) for a, b in zip(start[0].tolist(), got_end[0].tolist()) if a != NO_END]
        assert got == want, (samples, got, want)


# ------------------------------------------------------------------ 2. RoPE positions
def test_positions_restart_per_sample_and_logits_match():
    rows, packed, unpacked, where = _packed_and_unpacked()
    for r, row in enumerate(rows):
        want = [i for ex in row for i in range(len(ex["tokens"]))]
        assert packed.positions[r, : len(want)].tolist() == want
        assert packed.segment_ids[r, : len(want)].tolist() == [j for j, ex in enumerate(row) for _ in ex["tokens"]]
        assert (packed.segment_ids[r, len(want):] == -1).all()
    assert torch.equal(positions_from_segments(packed.segment_ids), packed.positions)
    model = tiny_model()
    with torch.no_grad():
        lp = model(packed.tokens, packed.images, packed.aspect_ratios,
                   decoder_input=DecoderInput(positions=packed.positions, segment_ids=packed.segment_ids))
        lu = model(unpacked.tokens, unpacked.images, unpacked.aspect_ratios)
        # DecoderInput.packed derives the same positions from the segments.
        torch.testing.assert_close(model(packed.tokens, packed.images, packed.aspect_ratios,
                                         decoder_input=DecoderInput.packed(packed.segment_ids)), lp, atol=0, rtol=0)
    for p, u in _per_sample(lp, lu, where):
        torch.testing.assert_close(p, u, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ the DecoderInput contract
def test_empty_decoder_input_is_bitwise_the_plain_call_and_embeds_hook():
    from _helpers import tiny_inputs

    tokens, images, ratios = tiny_inputs()
    model = tiny_model()
    with torch.no_grad():
        plain = model(tokens, images, ratios)
        assert torch.equal(model(tokens, images, ratios, decoder_input=DecoderInput()), plain)
        # input_embeds = the token embedding: the same logits, with or without a mask.
        emb = model.text_model.embed(tokens)
        assert torch.equal(model(tokens, images, ratios, decoder_input=DecoderInput(input_embeds=emb)), plain)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        mask[0, 2] = True
        assert torch.equal(model(tokens, images, ratios, decoder_input=DecoderInput(input_embeds=emb, embeds_mask=mask)), plain)
        # Overriding one position's embedding changes that position and the ones after it.
        other = emb.clone()
        other[0, 2] += 0.5
        got = model(tokens, images, ratios, decoder_input=DecoderInput(input_embeds=other, embeds_mask=mask))
        assert torch.equal(got[0, :2], plain[0, :2]) and not torch.allclose(got[0, 2:], plain[0, 2:])
        # Text only, no tokens at all (projector-style fusion).
        text = tokens[:, 1:]
        assert torch.equal(model(None, decoder_input=DecoderInput(input_embeds=model.text_model.embed(text))), model(text))
        # lengths only: padding is a segment of its own; real tokens are unchanged.
        padded = torch.cat([text, torch.zeros(1, 3, dtype=torch.long)], 1)
        got = model(padded, decoder_input=DecoderInput(lengths=torch.tensor([text.shape[1]])))
        torch.testing.assert_close(got[:, : text.shape[1]], model(text), atol=1e-5, rtol=0)
        # Packed rows of fused embeddings: the same as packed token ids.
        seg = torch.tensor([[0, 0, 0, 1, 1]])
        packed_text = tokens[:, 1:]
        by_ids = model(packed_text, decoder_input=DecoderInput.packed(seg))
        fused = DecoderInput(segment_ids=seg, input_embeds=model.text_model.embed(packed_text))
        assert torch.equal(model(None, decoder_input=fused), by_ids)
        # With KV caches, lengths describe the rows and change nothing.
        pos = torch.arange(text.shape[1])[None]
        got = model(text, caches=model.init_caches(1, 16),
                    decoder_input=DecoderInput(positions=pos, lengths=torch.tensor([text.shape[1]])))
        assert torch.equal(got, model(text, caches=model.init_caches(1, 16), positions=pos))
    # The hook is differentiable: a projector upstream of input_embeds gets gradients.
    emb = model.text_model.embed(text).detach().requires_grad_()
    model(None, decoder_input=DecoderInput(input_embeds=emb)).sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_decoder_input_errors_name_the_field():
    model = tiny_model()
    tokens = torch.tensor([[1, 2, 3, 4]])
    seg = torch.tensor([[0, 0, 1, 1]])
    cases = [
        (DecoderInput(segment_ids=torch.tensor([[0, 0, 1]])), r"segment_ids: expected shape \[1, 4\]"),
        (DecoderInput(segment_ids=torch.tensor([[0, 1, 0, 1]])), r"row 0 has a segment in two separate runs"),
        (DecoderInput(segment_ids=seg, lengths=torch.tensor([3])), r"lengths=3 but its segment_ids"),
        (DecoderInput(positions=torch.tensor([[0.0, 1, 2, 3]])), r"positions: expected an integer tensor"),
        (DecoderInput(positions=torch.tensor([[0, 1, 2, 999]]), segment_ids=seg), r"positions must be in \[0, max_seq_len=256\)"),
        (DecoderInput(embeds_mask=torch.ones(1, 4, dtype=torch.bool)), r"embeds_mask is set but input_embeds is None"),
        (DecoderInput(input_embeds=torch.zeros(1, 4, 7)), r"input_embeds: expected shape \[1, 4, 64\]"),
    ]
    for layout, match in cases:
        with pytest.raises(ValueError, match=match):
            model(tokens, decoder_input=layout)
    with pytest.raises(ValueError, match="positions given twice"):
        model(tokens, positions=torch.arange(4)[None], decoder_input=DecoderInput(positions=torch.arange(4)[None]))
    with pytest.raises(ValueError, match="with KV caches"):
        model(tokens, caches=model.init_caches(1, 8), decoder_input=DecoderInput(segment_ids=seg))
    with pytest.raises(ValueError, match="logit_index is not supported"):
        model(tokens, logit_index=torch.tensor([3]), decoder_input=DecoderInput(segment_ids=seg))


# ------------------------------------------------------------------ Batch and FLOPs
def test_batch_padding_counts_transfer_and_fingerprint():
    _, packed, unpacked, _ = _packed_and_unpacked()
    n = sum(len(ex["tokens"]) for row in _rows() for ex in row)
    assert packed.real_tokens == unpacked.real_tokens == n
    assert packed.padded_tokens == packed.tokens.numel() and unpacked.padded_tokens == unpacked.tokens.numel()
    assert packed.padding_fraction == pytest.approx(1 - n / packed.tokens.numel())
    assert packed.padding_fraction < unpacked.padding_fraction
    moved = packed.to("cpu")
    for name in ("positions", "segment_ids", "image_segments"):
        assert torch.equal(getattr(moved, name), getattr(packed, name))
    assert unpacked.to("cpu").segment_ids is None and unpacked.positions is None
    # The same tokens packed into other segments: another fingerprint.
    resegmented = replace(packed, segment_ids=packed.segment_ids.clamp(max=0))
    assert not torch.equal(batch_fingerprint(packed), batch_fingerprint(resegmented))


def test_flops_of_a_packed_batch_count_each_sample():
    from _helpers import tiny_params
    from llama_vision.model.args import ModelArgs

    args = ModelArgs(**tiny_params())
    _, packed, unpacked, _ = _packed_and_unpacked()
    groups = {"vision", "adapters"}
    p = step_flops(args, step_shape_from_batch(packed), groups)
    u = step_flops(args, step_shape_from_batch(unpacked), groups)
    assert p.breakdown() == u.breakdown()  # the useful work: identical, attention included
    # Counting the packed rows as one sequence each would overcount self-attention.
    rows_as_sequences = step_flops(args, step_shape_from_batch(replace(packed, segment_ids=None)), groups)
    assert rows_as_sequences.component("self_attention") > p.component("self_attention")


# ------------------------------------------------------------------ data: packing, budgets, resume
@pytest.fixture(scope="module")
def text_manifest(tmp_path_factory, shapes_corpus):
    """Captions of 3..30 tokens, with bad lines in between (skips between samples)."""
    d = tmp_path_factory.mktemp("captions")
    r = random.Random(3)
    words = "the red circle moves left up down right green blue yellow square triangle".split()
    lines = []
    for i in range(60):
        lines.append(json.dumps({"caption": " ".join(r.choice(words) for _ in range(r.randint(1, 28)))}))
        if i % 11 == 5:
            lines.append('{"caption": ')  # bad JSON: a skip the position must account for
    path = d / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _dataset(corpus, manifest, *, loop=False, max_seq_len=40):
    from llama_vision.tokenizer import load_tokenizer

    tok = load_tokenizer(corpus["tokenizer"])
    return CaptionDataset(JsonlCaptionSource(manifest), tok, ImageProcessor(tile_size=28, max_num_tiles=4),
                          max_seq_len=max_seq_len, seed=2, shuffle_buffer=8, loop=loop)


def _cfg(**data) -> TrainConfig:
    mbs = data.pop("micro_batch_size", 3)
    return TrainConfig(micro_batch_size=mbs, data=DataConfig(kind="caption_jsonl", paths=["x"], **data))


def _loader(corpus, manifest, num_workers=0, loop=False, **data):
    ds = _dataset(corpus, manifest, loop=loop)
    return build_dataloader(micro_batches(_cfg(**data), ds), batch_size=None, num_workers=num_workers)


BATCHINGS = [dict(packing=True), dict(max_tokens_per_batch=90), dict(packing=True, max_tokens_per_batch=80)]


@pytest.mark.parametrize("data", BATCHINGS, ids=["packing", "budget", "packing+budget"])
def test_every_sample_once_per_epoch_within_limits(shapes_corpus, text_manifest, data):
    everything = [ex["key"] for ex in _dataset(shapes_corpus, text_manifest)]
    batches = list(_loader(shapes_corpus, text_manifest, **data))
    keys = [k for b in batches for k in b.keys]
    assert keys == everything  # stream order, each sample exactly once
    assert len(batches) > 3
    for b in batches:
        assert b.packed == bool(data.get("packing"))
        if b.packed:
            assert b.tokens.shape[1] <= 40 and len(b) <= (data.get("max_tokens_per_batch", 0) // 40 or 3)
        budget = data.get("max_tokens_per_batch")
        if budget:
            assert b.padded_tokens <= budget or len(b.keys) == 1
    # Greedy: a micro-batch ends only when the next sample would not fit.
    for b, nxt in zip(batches, batches[1:]):
        first = int((nxt.segment_ids[0] == 0).sum()) if nxt.packed else int(nxt.lengths[0])
        if b.packed:
            assert len(b) == (data.get("max_tokens_per_batch", 0) // 40 or 3) and int(b.lengths[-1]) + first > 40
        else:
            assert (len(b) + 1) * max(b.tokens.shape[1], first) > data["max_tokens_per_batch"]
    if not data.get("packing"):
        assert len({len(b) for b in batches}) > 1  # short samples make larger micro-batches
    else:
        fixed = list(build_dataloader(_dataset(shapes_corpus, text_manifest), batch_size=3))
        padded = sum(b.padded_tokens - b.real_tokens for b in batches)
        assert padded < sum(b.padded_tokens - b.real_tokens for b in fixed)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("data", BATCHINGS, ids=["packing", "budget", "packing+budget"])
def test_resume_is_exact(shapes_corpus, text_manifest, data, num_workers):
    """Stop after k micro-batches, resume from the saved position: the same micro-batches
    follow, across an epoch end. The sample pulled for the packer but left for the next
    micro-batch is neither lost nor duplicated."""
    full = [b.keys for b in itertools.islice(_loader(shapes_corpus, text_manifest, num_workers, loop=True, **data), 40)]
    flat = [k for keys in full for k in keys]
    n_epoch = len(list(_dataset(shapes_corpus, text_manifest)))
    assert len(flat) > n_epoch  # the run crosses an epoch boundary
    for stop in (3, 7, 22):
        loader = _loader(shapes_corpus, text_manifest, num_workers, loop=True, **data)
        head = [b.keys for b in itertools.islice(loader, stop)]
        state = json.loads(json.dumps(loader.state_dict()))
        if num_workers == 0 and stop == 3:
            # The position is what was handed out (skipped bad lines included), not what the
            # packer pulled: records consumed = samples handed out + skips before them.
            handed = sum(len(k) for k in head)
            worker = state["workers"][0]
            assert worker["consumed"] == handed + worker["skipped"].get("bad_json", 0)
        resumed = _loader(shapes_corpus, text_manifest, num_workers, loop=True, **data)
        resumed.load_state_dict(state)
        tail = [b.keys for b in itertools.islice(resumed, 40 - stop)]
        assert head + tail == full, f"stop={stop}"


def test_packed_training_resume_reproduces_uninterrupted_losses(shapes_corpus, tmp_path):
    """Single process, packing on: 6 steps in one go == 3 steps, stop, resume, 3 steps
    (bitwise, deterministic CPU)."""
    from llama_vision.training.trainer import Trainer

    over = dict(max_steps=6, save_final="false", micro_batch_size=2,
                **{"data.packing": "true", "data.shuffle": "false", "optim.warmup_steps": 1})
    ref = tmp_path / "ref"
    Trainer(load_config(TrainConfig, PRETRAIN, tiny_train_overrides(shapes_corpus, ref, checkpoint_every=100, **over))).fit()
    want = [m["loss"] for m in read_metrics(ref / "metrics.jsonl")]

    out = tmp_path / "stopped"
    cfg = load_config(TrainConfig, PRETRAIN, tiny_train_overrides(shapes_corpus, out, checkpoint_every=3, **over))
    first = Trainer(cfg)
    step = first.train_step

    def stop_after_3(it):
        if first.step == 3:
            raise KeyboardInterrupt
        return step(it)

    first.train_step = stop_after_3
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert sorted(d.name for d in (out / "checkpoints").glob("step_*")) == ["step_3"]
    Trainer(cfg).fit(resume=True)
    rows = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in rows] == list(range(1, 7))
    assert [m["loss"] for m in rows] == want
    assert rows[0]["tokens"] > 0


def test_validation_loss_per_target_token_is_the_same_packed_or_budgeted(shapes_corpus, tmp_path):
    """The held-out loss is a sum of token NLL over the global target count: packing the
    same samples, or batching them by a token budget, changes neither."""
    from llama_vision.tokenizer import load_tokenizer
    from llama_vision.training.build import build_training_model
    from llama_vision.training.validation import validate

    held_out = {"data.kind": "caption_jsonl", "data.paths": f'["{shapes_corpus["test_images"]}"]'}  # 8 samples
    base = tiny_train_overrides(shapes_corpus, tmp_path, **{"data.shuffle": "false", "init.gates": 0.5, **held_out})
    cfg = load_config(TrainConfig, PRETRAIN, base)
    tok = load_tokenizer(cfg.tokenizer)
    torch.manual_seed(0)
    objective = LMObjective(build_training_model(cfg, tok), nullcontext)
    results = {}
    for name, over in (("padded", {"micro_batch_size": 3}), ("packed", {"data.packing": "true", "micro_batch_size": 2}),
                       ("budget", {"data.max_tokens_per_batch": 60})):
        c = load_config(TrainConfig, PRETRAIN, base + [f"{k}={v}" for k, v in over.items()])
        results[name] = validate(objective, build_loader(c, tok, objective.model.args, 0, 1, loop=False), torch.device("cpu"))
    assert results["padded"]["val_targets"] == results["packed"]["val_targets"] == results["budget"]["val_targets"] > 0
    for name in ("packed", "budget"):
        assert results[name]["val_loss"] == pytest.approx(results["padded"]["val_loss"], abs=1e-5)
        assert results[name]["val_token_accuracy"] == pytest.approx(results["padded"]["val_token_accuracy"], abs=1e-6)


# ------------------------------------------------------------------ 5. bad configs
def test_bad_batching_configs_are_clear_errors(shapes_corpus, tmp_path):
    from llama_vision.model.args import ModelArgs
    from llama_vision.tokenizer import load_tokenizer
    from _helpers import tiny_params

    tok = load_tokenizer(shapes_corpus["tokenizer"])
    args = ModelArgs(**tiny_params(vocab_size=tok.n_words))

    def cfg(**over):
        return load_config(TrainConfig, PRETRAIN, tiny_train_overrides(shapes_corpus, tmp_path, **over))

    for kind in ("dpo", "video_jsonl", "video_wds"):
        with pytest.raises(ValueError, match=rf"data.packing: true is not supported for data.kind='{kind}'"):
            build_loader(cfg(**{"data.kind": kind, "data.packing": "true"}), tok, args, 0, 1)
    with pytest.raises(ValueError, match=r"data.max_tokens_per_batch is not supported for data.kind='dpo'"):
        build_loader(cfg(**{"data.kind": "dpo", "data.max_tokens_per_batch": 512}), tok, args, 0, 1)
    with pytest.raises(ValueError, match=r"data.max_tokens_per_batch must be >= 0"):
        build_loader(cfg(**{"data.max_tokens_per_batch": -1}), tok, args, 0, 1)
    with pytest.raises(ValueError, match=r"data.max_tokens_per_batch=32 is less than one packed row of data.max_seq_len=64"):
        build_loader(cfg(**{"data.packing": "true", "data.max_tokens_per_batch": 32}), tok, args, 0, 1)
    # A config that works builds the packed loader end to end.
    batch = next(iter(build_loader(cfg(**{"data.packing": "true", "micro_batch_size": 2}), tok, args, 0, 1)))
    assert batch.packed and len(batch) == 2 and batch.tokens.shape[1] <= 64
