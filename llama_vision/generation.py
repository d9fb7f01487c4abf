"""Batched generation: one prefill over right-padded rows, then incremental decoding with
static KV caches and cross-attention K/V computed once per prompt."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from model_parallel import is_linear, tp_broadcast_object, tp_size

from .inputs import pad_rows, prepare_images, prepare_videos
from .model.modality import FusedEmbeds
from .utils.pages import copy_releasing

LLAMA3_STOP_TOKENS = (128001, 128008, 128009)  # <|end_of_text|>, <|eom_id|>, <|eot_id|>


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Nucleus sampling as in Meta's reference: keep the smallest prefix of sorted tokens
    whose mass reaches p. probs [B, V] -> ids [B]."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    cum = torch.cumsum(sorted_probs, dim=-1)
    sorted_probs[cum - sorted_probs > p] = 0.0
    sorted_probs.div_(sorted_probs.sum(dim=-1, keepdim=True))
    pick = torch.multinomial(sorted_probs, num_samples=1, generator=generator)
    return torch.gather(order, -1, pick)[:, 0]


def use_streaming_layout(model: nn.Module) -> int:
    """Store the text decoder's widening projections (out > in: the vocabulary projection,
    SwiGLU w1/w3) as the transpose of the usual layout: same values and shape, strides
    (1, out). Returns how many weights were changed.

    Why: a decode step multiplies ONE row by each weight, a GEMV that only streams memory,
    and on CPU MKL streams an [in, out] matrix faster than an [out, in] one whose rows are
    short -- the 128256 x 512 vocabulary projection of benchmarks/cpu_vs_hf.py runs in half
    the time (~2x), the 1536 x 512 FFN inputs ~1.5x faster; at dim 4096 ~7%. Projections
    that narrow (w2, wo) are faster as they are and keep their layout. The values are
    unchanged; only the summation order inside MKL differs (float rounding, ~1e-7).
    state_dict() still returns contiguous tensors (safetensors refuses strided ones).
    """
    changed = 0
    for module in model.text_model.modules():
        if not is_linear(module):
            continue
        w = module.weight
        if w.shape[0] <= w.shape[1] or w.stride() == (1, w.shape[0]):
            continue
        # Copied block by block, each block of a memory-mapped original handed back to the
        # kernel once read: its pages would otherwise stay resident next to the copy for as
        # long as the file's mapping lives (as long as any weight of the file does).
        streaming = torch.empty(w.shape[1], w.shape[0], dtype=w.dtype, device=w.device).t()
        w.data = copy_releasing(streaming, w.data)
        module.register_state_dict_post_hook(_contiguous_weight_in_state_dict)
        changed += 1
    return changed


def _contiguous_weight_in_state_dict(module, state_dict, prefix, local_metadata) -> None:
    key = prefix + "weight"
    if key in state_dict and not isinstance(state_dict[key], nn.Parameter):  # keep_vars=True keeps the Parameter
        state_dict[key] = state_dict[key].contiguous()


class Generator:
    """`Generator(model, tokenizer=None, compile=False, streaming_layout=True)`; rows may carry
    0..many images each.

    On CPU the model's widening decoder projections are re-laid out for decoding (see
    `use_streaming_layout`): same weights, faster one-row steps.

    compile=True runs each decode step through torch.compile ("reduce-overhead", i.e. CUDA
    graphs, on GPU): the step attends over the whole preallocated cache under a device-side
    mask (`TextDecoder.forward(static=True)`), so it has no host syncs and one shape per
    (batch, cache length). Cache lengths are rounded up to a multiple of `CACHE_BUCKET` and
    the caches are kept for the next call of the same shape (CUDA graphs replay on fixed
    addresses). The first call of a shape compiles (tens of seconds). Off by default: on
    CPU the eager step is as fast (the step is GEMV-bound; see docs/BENCHMARKS.md).
    """

    CACHE_BUCKET = 256

    def __init__(self, model, tokenizer=None, *, compile: bool = False, streaming_layout: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.compile = compile
        self._compiled_step = None
        self._static_caches: dict[tuple, list] = {}
        self._static_media: dict[tuple, torch.Tensor] = {}
        # Not for a model in training (the evaluation hook): its parameters belong to the
        # optimizer and, under FSDP, to their shards.
        if streaming_layout and self.device.type == "cpu":
            use_streaming_layout(model)

    @property
    def device(self) -> torch.device:
        return self.model.text_model.output.weight.device

    def default_stop_tokens(self) -> list[int]:
        if self.tokenizer is not None:
            return list(self.tokenizer.stop_tokens)
        return [t for t in LLAMA3_STOP_TOKENS if t < self.model.args.vocab_size]

    @torch.inference_mode()
    def generate(
        self,
        tokens: list[list[int]],
        images: list[list[Any]] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_tokens: list[int] | None = None,
        on_token: Callable[[int, int], None] | None = None,
        videos: list[list[Any]] | None = None,
    ) -> list[list[int]]:
        """Rows of prompt ids (+ PIL images per row) -> new token ids per row (the stop token
        itself is not returned). stop_tokens=None: the tokenizer's end tokens; []: never stop.
        on_token(row, id) streams tokens as they are produced. videos: per row, its videos
        (paths or frames) for a LLaVA model's projector video modality, one video
        placeholder each (llama_vision.inputs.prepare_videos)."""
        # (a projector image modality expands each image's placeholder to its tokens)
        tokens, image_inputs = prepare_images(self.model, tokens, images, device=self.device)
        media_inputs = {"image": image_inputs} if image_inputs is not None else {}
        if videos is not None:
            tokens, video_inputs = prepare_videos(self.model, tokens, videos, device=self.device)
            if video_inputs is not None:
                media_inputs["video"] = video_inputs
        return self._generate(tokens, media_inputs, max_new_tokens, temperature, top_p, seed, stop_tokens, on_token)

    @torch.inference_mode()
    def generate_from_tensors(self, tokens: list[list[int]], images=None, aspect_ratios=None, media_inputs=None, **kw) -> list[list[int]]:
        """As `generate`, with media already as tensors (images [B, N, T, 3, S, S] +
        aspect_ratios [B, N, 2], and/or other modalities in `media_inputs`)."""
        inputs = dict(media_inputs or {})
        if images is not None:
            inputs["image"] = (images.to(self.device), aspect_ratios.to(self.device))
        return self._generate(tokens, inputs, **kw)

    def _generate(self, tokens, media_inputs, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=None, stop_tokens=None, on_token=None):
        model = self.model
        prompt, lengths = pad_rows(tokens, device=self.device)
        b = len(tokens)
        total = max(lengths) + max_new_tokens
        if total > model.args.max_seq_len:
            raise ValueError(f"prompt ({max(lengths)} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={model.args.max_seq_len}")
        stops = torch.tensor(self.default_stop_tokens() if stop_tokens is None else list(stop_tokens), dtype=torch.long, device=self.device)
        if seed is None and temperature > 0 and tp_size() > 1:
            # Each rank's own RNG could pick another token and the ranks' next forwards would
            # no longer match (a hang): draw the seed once, on TP rank 0.
            seed = tp_broadcast_object(int(torch.randint(0, 2**62, ()).item()))
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        media = model.prepare_media(prompt, media_inputs) if media_inputs else {}
        # Projector modalities' tokens enter with the prompt only; decode steps read the
        # cross-attention modalities' K/V.
        prefill_media = media
        media = {name: state for name, state in media.items() if not isinstance(state, FusedEmbeds)}
        if self.compile:
            media = self._in_static_buffers(media)
            prefill_media = {**prefill_media, **media}
        caches = self._caches(b, total)
        pos = torch.tensor(lengths, device=self.device)
        logits = model(prompt, media=prefill_media, caches=caches, logit_index=pos - 1)[:, -1]
        out: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        uniform = len(set(lengths)) == 1  # every row at the same position: no mask needed
        for step in range(max_new_tokens):
            nxt = self._pick(logits, temperature, top_p, generator)
            done = torch.isin(nxt, stops) | done
            # One device -> host transfer per step (tokens + finished flags together).
            ids, finished = torch.stack([nxt, done.long()]).tolist()
            for i in range(b):
                if not finished[i]:
                    out[i].append(ids[i])
                    if on_token is not None:
                        on_token(i, ids[i])
            if all(finished) or step == max_new_tokens - 1:
                break
            # Host-known layout of this step (positions lengths + step): it asks the device nothing.
            layout = (max(lengths) + step + 1, lengths[0] + step if uniform else None)
            logits = self._decode(nxt[:, None], pos[:, None], media, caches, layout)
            pos = pos + 1
        return out

    def _caches(self, batch: int, total: int) -> list:
        if not self.compile:
            return self.model.init_caches(batch, total)
        # Compiled: few distinct shapes, and the same tensors again for the same shape.
        # Reuse is exact: slots past a row's position are masked until rewritten.
        length = min(-(-total // self.CACHE_BUCKET) * self.CACHE_BUCKET, self.model.args.max_seq_len)
        key = (batch, length)
        if key not in self._static_caches:
            caches = self.model.init_caches(batch, length)
            if self.device.type == "cuda":
                for c in caches:  # CUDA graphs read/write them in place
                    torch._dynamo.mark_static_address(c.k)
                    torch._dynamo.mark_static_address(c.v)
            self._static_caches[key] = caches
        return self._static_caches[key]

    def _in_static_buffers(self, media: dict) -> dict:
        """Compiled decode: the media K/V (and masks' inputs) copied once per prompt into
        buffers kept across calls (one per name and shape), which CUDA graphs read in place
        -- passed fresh, every replay would copy all adapters' K/V into the graph's input
        buffers again (a few GB per decode step at 11B)."""
        def buffer(key: tuple, t: torch.Tensor) -> torch.Tensor:
            key = (*key, tuple(t.shape), t.dtype, t.device)
            held = self._static_media.get(key)
            if held is None:
                held = self._static_media[key] = torch.empty_like(t)
                if held.device.type == "cuda":
                    torch._dynamo.mark_static_address(held)
            return held.copy_(t)

        out = {}
        for name, state in media.items():
            kv = {blk: (buffer((name, i, "k"), k), buffer((name, i, "v"), v)) for i, (blk, (k, v)) in enumerate(state.kv.items())}
            out[name] = dataclasses.replace(
                state, kv=kv,
                **{f: buffer((name, f), getattr(state, f)) for f in ("token_owner", "token_valid", "span_start", "span_end")},
            )
        return out

    def _decode(self, tokens, positions, media, caches, layout: tuple[int, int | None]) -> torch.Tensor:
        """One decode step: tokens, positions [B, 1] -> float32 logits [B, V]. layout: the
        decoder's `decode_layout` (kv_len, start or None), known on the host. The tokens are
        the model's own picks and the positions the prompt's continuation (both checked at
        prefill), so the step goes to the decoder directly, without host syncs."""
        if not self.compile:
            text = self.model.text_model
            h = text(self.model._canonical_tokens(tokens), positions, media, caches, decode_layout=layout)
            return text.logits(h)[:, -1]
        if self._compiled_step is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._compiled_step = torch.compile(self._static_step, mode=mode, dynamic=False)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
        return self._compiled_step(tokens, positions, media, caches)

    def _static_step(self, tokens, positions, media, caches) -> torch.Tensor:
        text = self.model.text_model
        h = text(self.model._canonical_tokens(tokens), positions, media, caches, static=True)
        return text.logits(h)[:, -1]

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        return sample_top_p(probs, top_p, generator)

    def chat(self, messages: list[dict], images: list[Any] | None = None, **kw) -> str:
        """One dialog (Meta's chat format; `{"type": "image"}` items in the order of
        `images`) -> the assistant's reply text."""
        if self.tokenizer is None:
            raise ValueError("Generator.chat needs a tokenizer: Generator(model, tokenizer)")
        from .tokenizer import ChatFormat

        ids = ChatFormat(self.tokenizer).encode_dialog(messages)
        new = self.generate([ids], [list(images or [])], **kw)[0]
        return self.tokenizer.decode(new)
