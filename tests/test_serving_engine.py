"""The serving engine (llama_vision/serving/engine.py) in-process, with a checkpoint that
really answers (conftest's colour_model): greedy answers equal Generator.generate token for
token whatever the batch they decode in; continuous batching; the image cache; cancelled
and failing requests free their slots; bad requests are refused naming the problem."""
from __future__ import annotations

import io
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from _eval_fixture import QUESTION


@pytest.fixture(scope="module")
def served(colour_model):
    from llama_vision import inference
    from llama_vision.generation import Generator

    ckpt, world = colour_model
    gen = inference.setup(str(ckpt), dtype="fp32", device="cpu")
    reference = Generator(gen.model, gen.tokenizer, streaming_layout=False)
    images = [(Path(world["root"]) / r["image"]).read_bytes() for r in world["test"]]
    answers = [r["answers"][0] for r in world["test"]]
    return gen, reference, images, answers


def _engine(gen, **kw):
    from llama_vision.serving.engine import Engine

    engine = Engine(gen.model, gen.tokenizer, **kw)
    engine.start()
    return engine


def _dialog_ids(gen, turns: list[tuple[str, int]], replies: list[str] = ()) -> list[int]:
    """User turns (text, n_images) with the assistant's replies between them -> chat ids."""
    from llama_vision.tokenizer import ChatFormat

    messages = []
    for i, (text, n) in enumerate(turns):
        messages.append({"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": text}]})
        if i < len(replies):
            messages.append({"role": "assistant", "content": replies[i]})
    return ChatFormat(gen.tokenizer).encode_dialog(messages)


def _pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _tokens(stream) -> list[int]:
    return [e.token_id for e in stream if e.token_id is not None]


def test_greedy_answers_equal_generator_in_any_batch(served):
    from llama_vision.serving.engine import GenerationRequest, SamplingParams

    gen, reference, images, answers = served
    cases = [
        (_dialog_ids(gen, [("Say something.", 0)]), []),                                     # text only
        (_dialog_ids(gen, [(QUESTION, 1)]), [images[0]]),                                     # one image
        (_dialog_ids(gen, [(QUESTION, 2)]), [images[1], images[2]]),                          # two images
        (_dialog_ids(gen, [(QUESTION, 1), (QUESTION, 1)], [answers[3]]), [images[3], images[4]]),  # multi-turn
    ] + [(_dialog_ids(gen, [(QUESTION, 1)]), [data]) for data in images[5:17]]
    engine = _engine(gen, max_batch=4)  # fewer slots than requests: they queue, join and leave
    try:
        streams = [engine.submit(GenerationRequest(ids, imgs, SamplingParams(max_tokens=6))) for ids, imgs in cases]
        got = [_tokens(s) for s in streams]
    finally:
        engine.shutdown()
    for (ids, imgs), tokens in zip(cases, got):
        want = reference.generate([ids], [[_pil(d) for d in imgs]], max_new_tokens=6)[0]
        assert tokens == want, (gen.tokenizer.decode(tokens), gen.tokenizer.decode(want))
    # It answers (the colour of each single-image request), so the pairing is right.
    single = [gen.tokenizer.decode(t) for t in got[4:]]
    assert sum(a == b for a, b in zip(single, answers[5:17])) >= 10
    trace = engine.metrics()["batch_size_trace"]
    assert max(trace) == 4 and len(streams) == 16


def test_short_requests_join_a_running_long_one_and_finish_first(served):
    from llama_vision.serving.engine import GenerationRequest, SamplingParams

    gen, reference, images, _ = served
    engine = _engine(gen, max_batch=8)
    done: dict[str, float] = {}
    try:
        long = engine.submit(GenerationRequest(_dialog_ids(gen, [(QUESTION, 1)]), [images[0]],
                                               SamplingParams(max_tokens=120, stop_token_ids=[])))
        first = next(iter(long))  # it is running
        assert first.token_id is not None

        def consume(name, stream):
            _tokens(stream)
            done[name] = time.monotonic()

        threads = [threading.Thread(target=consume, args=("long", long))]
        threads[0].start()
        shorts = [engine.submit(GenerationRequest(_dialog_ids(gen, [(QUESTION, 1)]), [d], SamplingParams(max_tokens=4)))
                  for d in images[1:4]]
        for i, s in enumerate(shorts):
            threads.append(threading.Thread(target=consume, args=(f"short{i}", s)))
            threads[-1].start()
        for t in threads:
            t.join(timeout=120)
    finally:
        engine.shutdown()
    assert long.completion_tokens == 120 and long.finish_reason == "length"
    assert all(done[f"short{i}"] < done["long"] for i in range(3))
    trace = engine.metrics()["batch_size_trace"]
    # The batch grew while the long request ran, and shrank back to it alone.
    assert trace[0] == 1 and max(trace) >= 2 and trace[-1] == 1


def test_repeated_image_skips_the_vision_encoder(served):
    from llama_vision.serving.engine import GenerationRequest, SamplingParams

    gen, _, images, _ = served
    engine = _engine(gen, max_batch=2)
    try:
        ids = _dialog_ids(gen, [(QUESTION, 1)])
        a = _tokens(engine.submit(GenerationRequest(ids, [images[0]], SamplingParams(max_tokens=4))))
        runs = engine.metrics()["vision_encoder_runs"]
        b = _tokens(engine.submit(GenerationRequest(ids, [images[0]], SamplingParams(max_tokens=4))))
        m = engine.metrics()
    finally:
        engine.shutdown()
    assert runs == 1 and m["vision_encoder_runs"] == 1 and m["image_cache_hits"] == 1
    assert a == b


def test_sampling_with_a_seed_equals_generator(served):
    from llama_vision.serving.engine import GenerationRequest, SamplingParams

    gen, reference, images, _ = served
    ids = _dialog_ids(gen, [("Say something.", 0)])
    engine = _engine(gen)
    try:
        got = _tokens(engine.submit(GenerationRequest(ids, [], SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7))))
    finally:
        engine.shutdown()
    assert got == reference.generate([ids], None, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)[0]


def test_cancelled_and_failing_requests_free_their_slots(served, monkeypatch):
    from llama_vision.serving.engine import GenerationRequest, SamplingParams

    gen, _, images, _ = served
    engine = _engine(gen, max_batch=2)
    ids = _dialog_ids(gen, [(QUESTION, 1)])
    try:
        doomed = engine.submit(GenerationRequest(ids, [images[0]], SamplingParams(max_tokens=200, stop_token_ids=[])))
        events = iter(doomed)
        next(events)
        doomed.cancel()  # a client that went away mid-stream
        assert [e.finish_reason for e in events][-1] == "cancelled"
        # One request whose images cannot be encoded fails alone; the others run.
        real = engine.images.encode
        monkeypatch.setattr(engine.images, "encode", lambda data: (_ for _ in ()).throw(RuntimeError("boom")) if data == images[1] else real(data))
        bad = engine.submit(GenerationRequest(ids, [images[1]], SamplingParams(max_tokens=4)))
        rest = [engine.submit(GenerationRequest(ids, [d], SamplingParams(max_tokens=4))) for d in images[2:18]]
        last = list(bad)[-1]
        assert last.finish_reason == "error" and "boom" in last.error
        assert all(_tokens(s) and s.finish_reason in ("stop", "length") for s in rest)
        assert engine.metrics()["active_slots"] == 0 and engine.metrics()["requests_failed"] == 1
        # A step that fails (here: the decoder itself) ends its batch with an error, not the
        # scheduler: the next requests are served.
        forward = gen.model.text_model.forward
        monkeypatch.setattr(gen.model.text_model, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("step failed")))
        broken = engine.submit(GenerationRequest(_dialog_ids(gen, [("Say something.", 0)]), [], SamplingParams(max_tokens=4)))
        assert list(broken)[-1].finish_reason == "error"
        monkeypatch.setattr(gen.model.text_model, "forward", forward)
        assert engine.is_alive()
        assert _tokens(engine.submit(GenerationRequest(ids, [images[2]], SamplingParams(max_tokens=4))))
    finally:
        engine.shutdown()


def test_a_cancelled_queued_request_gives_up_its_queue_place(served):
    from llama_vision.serving.engine import Engine, GenerationRequest, SamplingParams

    gen, _, images, _ = served
    engine = Engine(gen.model, gen.tokenizer, max_batch=1, max_queue=1)  # not started: requests stay queued
    ids = _dialog_ids(gen, [(QUESTION, 1)])
    first = engine.submit(GenerationRequest(ids, [images[0]], SamplingParams(max_tokens=2)))
    first.cancel()
    engine.submit(GenerationRequest(ids, [images[1]], SamplingParams(max_tokens=2)))  # no QueueFull
    assert list(first)[-1].finish_reason == "cancelled"


def test_bad_requests_are_refused_naming_the_problem(served):
    from llama_vision.serving.engine import Engine, GenerationRequest, QueueFull, RequestRejected, SamplingParams

    gen, _, images, _ = served
    engine = Engine(gen.model, gen.tokenizer, max_batch=1, max_queue=1, max_images=2, max_image_pixels=1000)  # not started
    ids = _dialog_ids(gen, [(QUESTION, 1)])
    cases = [
        (GenerationRequest(ids, [], SamplingParams()), "1 image placeholder(s) but 0 image(s)"),
        (GenerationRequest(ids, [b"not an image"], SamplingParams()), "image 1: not a readable image"),
        (GenerationRequest(ids, [images[0]], SamplingParams(max_tokens=10_000)), "plus max_tokens (10000) is longer than the context"),
        (GenerationRequest(ids * 20, [images[0]] * 20, SamplingParams()), "is longer than the context (256 tokens)"),
        (GenerationRequest(_dialog_ids(gen, [(QUESTION, 3)]), images[:3], SamplingParams()), "too many images: 3"),
        (GenerationRequest([], [], SamplingParams()), "the prompt is empty"),
        (GenerationRequest(ids, [images[0]], SamplingParams(top_p=0)), "top_p"),
    ]
    for request, message in cases:
        with pytest.raises(RequestRejected, match=re.escape(message)) as info:
            engine.submit(request)
        assert info.value.status == 400
    big = io.BytesIO()
    Image.new("RGB", (40, 40)).save(big, format="PNG")
    with pytest.raises(RequestRejected, match="40x40 pixels exceeds the limit of 1000") as info:
        engine.submit(GenerationRequest(ids, [big.getvalue()], SamplingParams()))
    assert info.value.status == 413
    engine.submit(GenerationRequest(ids, [images[0]], SamplingParams(max_tokens=2)))
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit(GenerationRequest(ids, [images[0]], SamplingParams(max_tokens=2)))


def test_batch_media_matches_prepare_media(served):
    """The server's per-image K/V, laid out for a batch of slots, is the MediaState that
    prepare_media computes for the same rows (padding slots aside)."""
    from llama_vision.inputs import prepare_image_batch
    from llama_vision.serving.media import ImageCache, batch_media
    from llama_vision.model.cross_attention import media_spans

    gen, _, images, _ = served
    model = gen.model
    rows = [_dialog_ids(gen, [(QUESTION, 2)]), _dialog_ids(gen, [(QUESTION, 1)])]
    data = [[images[0], images[1]], [images[2]]]
    cache = ImageCache(model, capacity=8)
    token = gen.tokenizer.image_token_id
    spans = [tuple(t[0] for t in media_spans([r], {token}, slots=len(d))) for r, d in zip(rows, data)]
    ours = batch_media([[cache.get(x) for x in d] for d in data], spans, model.text_model.adapters("image"), gen.device)
    with torch.inference_mode():
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        theirs = model.prepare_media(tokens, {"image": prepare_image_batch(model, rows, [[_pil(x) for x in d] for d in data])})["image"]
    assert torch.equal(ours.token_valid, theirs.token_valid) and torch.equal(ours.token_owner, theirs.token_owner)
    present = torch.tensor([[True, True], [True, False]])
    assert torch.equal(ours.span_start[present], theirs.span_start[present])
    assert torch.equal(ours.span_end[present], theirs.span_end[present])
    assert bool((ours.span_start[~present] >= ours.span_end[~present]).all())  # padding: an empty span
    for key, (k, v) in theirs.kv.items():
        valid = theirs.token_valid[:, None, :, None]
        torch.testing.assert_close(ours.kv[key][0] * valid, k * valid, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.kv[key][1] * valid, v * valid, rtol=1e-5, atol=1e-5)
