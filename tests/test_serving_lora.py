"""Several LoRA adaptors served on one base model (llama_vision/serving/lora_bank.py): in one
continuously batched engine, requests of adaptor "a" (our LoRA dir), adaptor "b" (a PEFT
adapter dir) and of the base model decode together and each gets, token for token, what
`Generator` answers on a model holding only its adaptor (unmerged, as `load_lora` /
`import_peft` put it); the OpenAI `model` field picks the adaptor through tools/serve.py
(under torchrun, TP=2); what a shared batch cannot hold is refused by name."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from _eval_fixture import QUESTION

MAX_TOKENS = 6


@torch.no_grad()
def _random_lora(model, seed: int, scale: float) -> None:
    from llama_vision.model.lora import lora_modules

    g = torch.Generator().manual_seed(seed)
    for host in lora_modules(model).values():
        for w in (host.adaptor.A.weight, host.adaptor.B.weight):
            w.copy_(scale * torch.randn(w.shape, generator=g))


@pytest.fixture(scope="module")
def adaptors(colour_model, tmp_path_factory):
    """The colour checkpoint, adaptor "a" (our layout: trunk attention + MLP, rank 4) and
    adaptor "b" (PEFT layout: trunk attention, cross-attention queries and the output head,
    rank 2), with random weights large enough to change the answers."""
    from llama_vision.checkpoint import load_model
    from llama_vision.checkpoint.lora import save_lora
    from llama_vision.checkpoint.peft import export_peft
    from llama_vision.model.lora import apply_lora

    ckpt, world = colour_model
    root = tmp_path_factory.mktemp("serving_lora")
    model = load_model(ckpt)
    apply_lora(model, ["trunk_attention", "trunk_mlp"], rank=4, alpha=64.0)
    _random_lora(model, seed=1, scale=0.2)
    save_lora(model, root / "a", base_checkpoint=ckpt)
    model = load_model(ckpt)
    apply_lora(model, ["trunk_attention", "text_model.cross_attention_layers.*.attention.wq", "text_model.output"],
               rank=2, alpha=32.0)
    _random_lora(model, seed=2, scale=0.2)
    save_lora(model, root / "b_ours", base_checkpoint=ckpt)
    export_peft(root / "b_ours", root / "b")
    images = [(Path(world["root"]) / r["image"]).read_bytes() for r in world["test"][:4]]
    return {"ckpt": ckpt, "a": root / "a", "b": root / "b", "images": images, "root": root}


def _generator(ckpt, lora=None):
    from llama_vision import inference
    from llama_vision.generation import Generator

    gen = inference.setup(str(ckpt), dtype="fp32", device="cpu", lora=str(lora) if lora else None)
    return Generator(gen.model, gen.tokenizer, streaming_layout=False)


def _prompt(tokenizer, n_images: int, text: str = QUESTION) -> list[int]:
    from llama_vision.tokenizer import ChatFormat

    return ChatFormat(tokenizer).encode_dialog([{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}])


def _pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.fixture(scope="module")
def cases(adaptors):
    """(adaptor, prompt ids, image bytes, the reference answer) for every adaptor x prompt."""
    refs = {name: _generator(adaptors["ckpt"], adaptors.get(name)) for name in (None, "a", "b")}
    tokenizer = refs[None].tokenizer
    prompts = [(_prompt(tokenizer, 0, "Say something."), []), (_prompt(tokenizer, 1), adaptors["images"][:1]),
               (_prompt(tokenizer, 2), adaptors["images"][1:3]), (_prompt(tokenizer, 1), adaptors["images"][3:4])]
    out = []
    for name, gen in refs.items():
        for ids, imgs in prompts:
            want = gen.generate([ids], [[_pil(d) for d in imgs]], max_new_tokens=MAX_TOKENS, temperature=0.0)[0]
            out.append((name, ids, imgs, want))
    by_adaptor = {name: [c[3] for c in out if c[0] == name] for name in refs}
    # the adaptors change the answers (else routing to the wrong one could pass)
    assert by_adaptor["a"] != by_adaptor[None] and by_adaptor["b"] != by_adaptor[None] and by_adaptor["a"] != by_adaptor["b"]
    return out


def test_mixed_batches_of_adaptors_equal_one_adaptor_models(adaptors, cases):
    from llama_vision.checkpoint import load_model
    from llama_vision.serving.engine import Engine, GenerationRequest, SamplingParams
    from llama_vision.serving.lora_bank import LoraBank
    from llama_vision.tokenizer import load_tokenizer

    model = load_model(adaptors["ckpt"])
    bank = LoraBank.attach(model, {"a": adaptors["a"], "b": adaptors["b"]})
    assert bank.names == ["a", "b"]
    engine = Engine(model, load_tokenizer(Path(adaptors["ckpt"]) / "tokenizer.model"), max_batch=5, lora_bank=bank)
    engine.start()
    try:
        # interleaved so that every decode step mixes adaptors (and the base) in one batch
        order = sorted(range(len(cases)), key=lambda i: (i % 4, i))
        streams = {i: engine.submit(GenerationRequest(cases[i][1], cases[i][2], SamplingParams(max_tokens=MAX_TOKENS),
                                                      adapter=cases[i][0])) for i in order}
        got = {i: [e.token_id for e in s if e.token_id is not None] for i, s in streams.items()}
    finally:
        engine.shutdown()
    assert max(engine.batch_size_trace) >= 3
    for i, (name, _, imgs, want) in enumerate(cases):
        assert got[i] == want, (name, len(imgs), got[i], want)
    # rows that ask for no adaptor run the base model's very computation
    from llama_vision.generation import use_streaming_layout

    plain = load_model(adaptors["ckpt"])
    use_streaming_layout(plain)  # (the engine re-laid the served model out so)
    tokens = torch.tensor([cases[0][1]])
    bank.select([None])
    with torch.no_grad():
        assert torch.equal(model(tokens), plain(tokens))


def test_unknown_adaptor_is_a_404_and_unservable_adaptors_are_refused(adaptors):
    from llama_vision.checkpoint import load_model
    from llama_vision.checkpoint.lora import save_lora
    from llama_vision.model.lora import apply_lora
    from llama_vision.serving.engine import Engine, GenerationRequest, RequestRejected
    from llama_vision.serving.lora_bank import LoraBank
    from llama_vision.tokenizer import load_tokenizer

    model = load_model(adaptors["ckpt"])
    bank = LoraBank.attach(model, {"a": adaptors["a"]})
    engine = Engine(model, load_tokenizer(Path(adaptors["ckpt"]) / "tokenizer.model"), max_batch=2, lora_bank=bank)
    with pytest.raises(RequestRejected, match="no LoRA adaptor named 'zz'") as e:
        engine.submit(GenerationRequest([1, 2, 3], adapter="zz"))
    assert e.value.status == 404
    with pytest.raises(ValueError, match="already taken"):
        bank.add("a", adaptors["a"])
    # LoRA on the ViT changes image K/V, which the server caches per image
    vit = load_model(adaptors["ckpt"])
    apply_lora(vit, ["vision"], rank=2)
    save_lora(vit, adaptors["root"] / "vit", base_checkpoint=adaptors["ckpt"])
    with pytest.raises(ValueError, match="act on images"):
        bank.add("vit", adaptors["root"] / "vit")
    assert bank.names == ["a"] and not any(".adaptor." in k for k in model.state_dict())
    # a run that also trained whole groups changed base weights
    both = load_model(adaptors["ckpt"])
    apply_lora(both, ["trunk_attention"], rank=2)
    save_lora(both, adaptors["root"] / "both", base_checkpoint=adaptors["ckpt"], extra={"also_trained": ["adapters"]})
    with pytest.raises(ValueError, match="also trained"):
        bank.add("both", adaptors["root"] / "both")
    with pytest.raises(FileNotFoundError, match="neither"):
        bank.add("none", adaptors["root"])


def test_serve_cli_routes_by_model_name_under_tp2(adaptors, cases):
    from test_serving_http import start_server, stop_server

    server = start_server(adaptors["ckpt"], "--lora", f"a={adaptors['a']}", "--lora", f"b={adaptors['b']}", nproc=2)
    try:
        status, listing = server.request("GET", "/v1/models")
        assert status == 200 and [m["id"] for m in listing["data"]] == ["colour", "a", "b"]
        assert listing["data"][1]["parent"] == "colour"
        client = server.client()
        tokenizer = _generator(adaptors["ckpt"]).tokenizer
        for name, ids, imgs, want in cases:
            if imgs:
                continue  # text prompts here: the image path is the engine's, tested above
            reply = client.chat.completions.create(model=name or "colour", max_tokens=MAX_TOKENS, temperature=0,
                                                   messages=[{"role": "user", "content": "Say something."}],
                                                   extra_body={"skip_special_tokens": False})
            assert reply.model == (name or "colour")
            assert reply.choices[0].message.content == tokenizer.decode(want), name
        status, body = server.request("POST", "/v1/chat/completions",
                                      {"model": "c", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 404 and "'colour', 'a', 'b'" in body["error"]["message"]
    finally:
        stop_server(server.proc)
