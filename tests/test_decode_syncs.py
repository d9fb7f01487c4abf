"""An eager decode step asks the device nothing: every host read (item, tolist, bool, int)
is refused while `Generator._decode` runs, for uniform and ragged rows with images; and the
tokens are the ones the checked, syncing path gives."""
from __future__ import annotations

import contextlib

import torch

from _helpers import TINY_IMAGE_TOKEN, tiny_model
from llama_vision.generation import Generator


@contextlib.contextmanager
def no_host_reads():
    names = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host sync in a decode step: Tensor.{name}")
        return method

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, m in saved.items():
            setattr(torch.Tensor, n, m)


def test_decode_step_has_no_host_syncs_and_equals_the_checked_path():
    model = tiny_model().eval()
    gen = Generator(model)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 1, 4, 3, 28, 28, generator=g)
    ratios = torch.tensor([[[1, 2]], [[2, 2]]])
    for rows in ([[TINY_IMAGE_TOKEN, 5, 9, 33], [TINY_IMAGE_TOKEN, 7, 8, 2]], [[TINY_IMAGE_TOKEN, 5, 9, 33, 4, 6], [TINY_IMAGE_TOKEN, 7]]):
        lengths = [len(r) for r in rows]
        with torch.inference_mode():
            prompt = torch.tensor([r + [0] * (max(lengths) - len(r)) for r in rows])
            media = model.prepare_media(prompt, {"image": (images, ratios)})
            caches = model.init_caches(2, max(lengths) + 4)
            pos = torch.tensor(lengths)
            model(prompt, media=media, caches=caches, logit_index=pos - 1)
            step = torch.tensor([[11], [12]])
            uniform = len(set(lengths)) == 1
            layout = (max(lengths) + 1, lengths[0] if uniform else None)
            saved = [(c.k.clone(), c.v.clone()) for c in caches]
            with no_host_reads():
                fast = gen._decode(step, pos[:, None], media, caches, layout)
            for c, (k, v) in zip(caches, saved):  # the checked path from the same cache state
                c.k.copy_(k)
                c.v.copy_(v)
            want = model(step, media=media, caches=caches, positions=pos[:, None])[:, -1]
        assert torch.equal(fast, want)


def test_compiled_decode_reads_media_from_buffers_kept_across_prompts():
    """Generator(compile=True): each prompt's media K/V are copied into buffers that stay
    the same tensors from prompt to prompt (CUDA graphs read them in place)."""
    model = tiny_model().eval()
    gen = Generator(model, compile=True)
    g = torch.Generator().manual_seed(1)
    tokens = torch.tensor([[TINY_IMAGE_TOKEN, 5, 9], [TINY_IMAGE_TOKEN, 7, 8]])
    ratios = torch.tensor([[[1, 2]], [[2, 2]]])
    held = None
    for _ in range(2):
        with torch.inference_mode():
            media = model.prepare_media(tokens, {"image": (torch.randn(2, 1, 4, 3, 28, 28, generator=g), ratios)})
            static = gen._in_static_buffers(media)
        state, kept = media["image"], static["image"]
        pairs = list(zip(state.kv.values(), kept.kv.values()))
        assert pairs and all(torch.equal(a, b) for (k, v), (sk, sv) in pairs for a, b in ((k, sk), (v, sv)))
        assert torch.equal(kept.span_end, state.span_end) and torch.equal(kept.token_valid, state.token_valid)
        ptrs = [t.data_ptr() for kv in kept.kv.values() for t in kv]
        assert held is None or ptrs == held  # the same buffers for the next prompt
        held = ptrs
        assert all(t.data_ptr() != s.data_ptr() for (k, v), (sk, sv) in pairs for t, s in ((sk, k), (sv, v)))
