"""The Llama 3 text decoder, with gated cross-attention adapters run before chosen layers.

Module and parameter names are Meta's (`text_model.layers.N.attention.wq`, ...). The
adapter schedule is keyed by modality: each registered adapter set is a ModuleList stored
under its own attribute (`cross_attention_layers` for images) plus the self-attention
layer indices it runs before, so new modalities plug in without editing this file.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model_parallel import column_parallel_linear, gather_from_tp, vocab_parallel_embedding

from .args import ModelArgs
from .attention import attention
from .cross_attention import MediaState
from .decoder_input import segment_attention_mask
from .layers import FeedForward, GQAProjections, RMSNorm
from .rope import apply_rotary_emb, precompute_freqs_cis


class KVCache:
    """Static, preallocated self-attention cache [B, n_local_kv_heads, max_len, head_dim].

    Slot j holds the key/value of position j, so rows of a ragged batch can sit at
    different positions (right-padded prompts are overwritten as decoding proceeds).
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows start..stop-1 of this one, sharing its memory (writes go
        through): a server's slots [start, stop) decoded as one batch."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[start:stop], self.v[start:stop]
        return view

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, contiguous_from: int | None):
        """Write k/v [B, H, S, D] at `positions` [B, S]; returns the cache prefix in use."""
        s = k.shape[2]
        if contiguous_from is not None:
            self.k[:, :, contiguous_from : contiguous_from + s] = k
            self.v[:, :, contiguous_from : contiguous_from + s] = v
        else:
            idx = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            self.k.scatter_(2, idx, k)
            self.v.scatter_(2, idx, v)


def take_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t [B, S, ...], rows [B] -> [B, 1, ...]: position rows[b] of each row b."""
    return t[torch.arange(t.shape[0], device=t.device), rows.to(t.device)][:, None]


class Attention(GQAProjections):
    """Grouped-query self-attention with RoPE; K/V kept at GQA width in the cache."""

    def forward(self, x, freqs_cis, positions, mask, cache: KVCache | None, cache_from: int | None, kv_len: int,
                rows: torch.Tensor | None = None):
        """x [B, S, D] -> [B, S, D]; rows [B] (optional): only the output of position
        rows[b] of each row is wanted -> [B, 1, D]. Keys and values (and the cache writes)
        still cover all S positions; the query, attention and output projection run for
        one position per row (prefill's last layer: only the last prompt position's
        hidden state reaches the logits)."""
        b, s, _ = x.shape
        xq, fq, q_pos = x, freqs_cis, positions
        if rows is not None:
            xq, fq, q_pos = take_rows(x, rows), take_rows(freqs_cis, rows), take_rows(positions, rows)
        q_len = xq.shape[1]
        q = apply_rotary_emb(self.wq(xq).view(b, q_len, self.n_local_heads, self.head_dim), fq)
        k = apply_rotary_emb(self.wk(x).view(b, s, self.n_local_kv_heads, self.head_dim), freqs_cis)
        v = self.wv(x).view(b, s, self.n_local_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            cache.update(positions, k, v, cache_from)
            k, v = cache.k[:, :, :kv_len], cache.v[:, :, :kv_len]
        if rows is not None:
            # The caller's mask is for all S queries. A kept position that is the last key
            # sees every key; any other hides the keys after it.
            keys = torch.arange(k.shape[2], device=x.device)
            mask = None if bool((q_pos == keys[-1]).all()) else (keys[None, None, :] <= q_pos[:, :, None])[:, None]
        # No mask: the queries are the last q_len of the keys; causal unless it is one query
        # (a decode step shared by every row), which sees every key (see _self_attention_mask).
        out = attention(q, k, v, mask=mask, causal=mask is None and q_len > 1, backend=self.backend)
        return self.wo(out.transpose(1, 2).reshape(b, q_len, -1))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs_cis, positions, mask, cache, cache_from, kv_len, rows=None):
        """x [B, S, D] -> [B, S, D], or [B, 1, D] with `rows` (see `Attention.forward`)."""
        attn = self.attention(self.attention_norm(x), freqs_cis, positions, mask, cache, cache_from, kv_len, rows)
        if rows is not None:
            x = take_rows(x, rows)
        h = x + attn
        return h + self.feed_forward(self.ffn_norm(h))


def _causal_from(start: int, s: int, kv_len: int, device) -> torch.Tensor:
    """[1, 1, s, kv_len] bool: query i (at position start + i) sees keys 0..start + i."""
    keys = torch.arange(kv_len, device=device)
    queries = start + torch.arange(s, device=device)
    return (keys[None, :] <= queries[:, None])[None, None]


class PlaceholderEmbedding(nn.Module):
    """The input embedding [dim] of one added modality's placeholder token, owned (and
    trained) by that modality -- unlike the shared learnable table, whose rows all belong
    to the image adapters' trainability group."""

    def __init__(self, dim: int, token_id: int):
        super().__init__()
        self.token_id = token_id
        self.weight = nn.Parameter(torch.empty(dim))


@dataclass
class AdapterSchedule:
    """Where one modality's adapter blocks run: block j runs before self-attention layer
    `layers[j]`. Lower `order` runs first when two modalities share a layer."""

    modality: str
    attr: str
    layers: list[int]
    order: int = 0


class TextDecoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.vocab_size = args.vocab_size
        self.tok_embeddings = vocab_parallel_embedding(args.vocab_size, args.dim)
        # New special tokens (ids >= vocab_size): a small trainable table beside the frozen one.
        self.learnable_embedding = vocab_parallel_embedding(args.n_learnable_embeddings, args.dim)
        # Placeholders of modalities added later (video, user modalities): their own rows,
        # trained with their modality (empty for the image model: Meta's layout).
        self.placeholder_embeddings = nn.ModuleDict()
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = column_parallel_linear(args.dim, args.vocab_size)
        self.adapter_schedules: dict[str, AdapterSchedule] = {}
        self._by_layer: list[list[tuple[str, nn.Module]]] | None = None
        self.checkpoint_activations = False  # recompute each decoder layer in backward (training)
        self.checkpoint_adapters = False  # ... and each adapter block
        # Look the learnable table up even when no id in the batch is new (then its rows
        # get a zero gradient instead of none). Data-parallel training under FSDP sets it
        # for micro-batches where ANY rank has a new id: every rank must then compute the
        # same gradients of its shards.
        self.embed_all_tables = False
        # The RoPE table is deliberately NOT a buffer: everything that converts or moves a
        # module's buffers would reach it. `.to(bfloat16)` casts complex buffers to the real
        # dtype (dropping the imaginary part), a float32 buffer would be rounded to bf16,
        # `to_empty` (meta builds, checkpoint loading) leaves it uninitialised, FSDP's
        # buffer_dtype casts it and DDP re-broadcasts it every step. As a plain attribute it
        # stays Meta's float32 table whatever the parameters become; `_rope_table_on`
        # computes it on first use and follows the device the decoder runs on.
        self._rope_table: torch.Tensor | None = None

    @staticmethod
    def _freqs(args: ModelArgs) -> torch.Tensor:
        """Meta's float32 RoPE table, complex64 [2 * max_seq_len, head_dim // 2], on the CPU
        (the Llama 3.1 scaling needs host values)."""
        return precompute_freqs_cis(
            args.head_dim,
            args.max_seq_len * 2,
            args.rope_theta,
            args.use_scaled_rope,
            scale_factor=args.rope_scale_factor,
            low_freq_factor=args.rope_low_freq_factor,
            high_freq_factor=args.rope_high_freq_factor,
            old_context_len=args.rope_original_max_position,
        )

    def _rope_table_on(self, device: torch.device) -> torch.Tensor:
        """The float32 RoPE table (complex64 [2 * max_seq_len, head_dim // 2]) on `device`.

        Computed on the CPU on first use -- bitwise the table of `precompute_freqs_cis` on
        every device -- and copied once to the device in use (recomputed only when the
        decoder moves). The fast path is one attribute read and a device compare, so
        torch.compile traces through it without a break. (Building it does host work,
        `.tolist()`: a compiled call that finds no table graph-breaks there once and
        recompiles onto the fast path next call. Not wrapped in torch.compiler.disable,
        whose import of torch._dynamo would add ~1.5 s to `import llama_vision`.)"""
        table = self._rope_table
        if table is not None and table.device == device:
            return table
        # A normal tensor even if first used under inference_mode (a later training step
        # must be able to use it).
        with torch.inference_mode(False), torch.no_grad():
            if device.type == "meta":  # shape-only runs: nothing to compute
                n, d = 2 * self.args.max_seq_len, self.args.head_dim // 2
                table = torch.empty(n, d, dtype=torch.complex64, device="meta")
            else:
                table = self._freqs(self.args).to(device)
        if device.type == "cuda":
            # A constant of CUDA-graph replays (like parameters), not an input copied in
            # at every decode step.
            torch._dynamo.mark_static_address(table)
        self._rope_table = table
        return table

    def rope(self, positions: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """positions [B, S] (int) -> complex64 rotations [B, S, head_dim // 2] on `device`
        (default: positions' device): row p of Meta's float32 table, e^{i p theta_j}."""
        if device is None:
            device = positions.device
        else:
            device = torch.device(device)
            if device.index is None and device.type not in ("cpu", "meta"):
                device = torch.empty(0, device=device).device  # "cuda" -> "cuda:<current>"
        return self._rope_table_on(device)[positions]

    # --- adapters ---------------------------------------------------------------------
    def add_adapters(self, schedule: AdapterSchedule, blocks: nn.ModuleList) -> None:
        """Register a modality's adapter blocks under `schedule.attr` (its state-dict name)."""
        if schedule.modality in self.adapter_schedules:
            raise ValueError(f"adapters for modality {schedule.modality!r} are already registered")
        if len(blocks) != len(schedule.layers):
            raise ValueError(f"{len(blocks)} adapter blocks for {len(schedule.layers)} scheduled layers")
        bad = [i for i in schedule.layers if not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"adapter layers {bad} outside 0..{len(self.layers) - 1}")
        if hasattr(self, schedule.attr):
            raise ValueError(f"text decoder already has an attribute {schedule.attr!r}")
        self.add_module(schedule.attr, blocks)
        self.adapter_schedules[schedule.modality] = schedule
        self._by_layer = None

    def adapters(self, modality: str) -> nn.ModuleList:
        return getattr(self, self.adapter_schedules[modality].attr)

    def _adapters_by_layer(self) -> list[list[tuple[str, nn.Module]]]:
        if self._by_layer is None:
            table: list[list[tuple[int, str, nn.Module]]] = [[] for _ in self.layers]
            for sched in self.adapter_schedules.values():
                for block, layer in zip(getattr(self, sched.attr), sched.layers):
                    table[layer].append((sched.order, sched.modality, block))
            self._by_layer = [[(m, blk) for _, m, blk in sorted(row, key=lambda r: r[0])] for row in table]
        return self._by_layer

    # --- forward ----------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor, *, skip_check: bool = False) -> torch.Tensor:
        """tokens [B, S] -> [B, S, D]; ids >= vocab_size read the learnable table, or an
        added modality's own placeholder embedding (`placeholder_embeddings`).
        skip_check: always look both tables up instead of asking the device whether any id
        is new (a host sync, which a compiled step must not have)."""
        new = tokens >= self.vocab_size
        base = self.tok_embeddings(tokens.masked_fill(new, 0))
        if not skip_check and not self.embed_all_tables and not new.any():
            return base
        extra = self.learnable_embedding((tokens - self.vocab_size).clamp(min=0)).to(base.dtype)
        out = torch.where(new[..., None], extra, base)
        for placeholder in self.placeholder_embeddings.values():
            out = torch.where((tokens == placeholder.token_id)[..., None], placeholder.weight.to(out.dtype), out)
        return out

    def _input_embeddings(self, tokens, input_embeds, embeds_mask, *, skip_check: bool) -> torch.Tensor:
        """[B, S, D]: the token embedding; or the caller's input_embeds everywhere (no
        embeds_mask: taken as they are, dtype included), or where embeds_mask is True (cast
        to the token embedding's dtype)."""
        if input_embeds is None:
            return self.embed(tokens, skip_check=skip_check)
        if embeds_mask is None:
            return input_embeds
        if tokens is None:
            raise ValueError("embeds_mask needs tokens: the positions it leaves False read the token embedding")
        h = self.embed(tokens, skip_check=skip_check)
        return torch.where(embeds_mask[..., None].to(h.device), input_embeds.to(h.dtype), h)

    def forward(
        self,
        tokens: torch.Tensor | None,
        positions: torch.Tensor,
        media: dict[str, MediaState] | None = None,
        caches: list[KVCache] | None = None,
        *,
        static: bool = False,
        keep: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        input_embeds: torch.Tensor | None = None,
        embeds_mask: torch.Tensor | None = None,
        decode_layout: tuple[int, int | None] | None = None,
    ) -> torch.Tensor:
        """tokens, positions [B, S] -> final-norm hidden states [B, S, D].

        decode_layout (with caches): what the caller knows on the host about `positions`,
        (kv_len, start): keys 0..kv_len-1 are in use, and every row writes at start..start+S-1
        (start None: rows at different positions, `positions` say where). The step then
        asks the device nothing (no host syncs): a decode loop passes it for every step
        after validating the prompt once.

        keep [B] (optional): only position keep[b] of each row is wanted -> [B, 1, D]; the
        last layer then runs its query, attention output and FFN for that position alone
        (every layer's keys/values, and so the caches, are still complete).

        Without caches the batch is a causal prefix from position 0 (training / one fresh
        forward). With caches, keys up to max(positions) are attended, masked per row.
        static=True (with caches): attend over the WHOLE preallocated cache under a mask
        built on the device -- no host syncs and the same shapes at every step, what
        torch.compile / CUDA graphs need (the eager default slices to the used length).

        The `DecoderInput` fields (llama_vision.model.decoder_input, docs/decoder_input.md;
        validated by `VisionLanguageModel.forward`), all None by default = the paths above:
        segment_ids [B, S] (no caches): packed rows -- `positions` are RoPE positions only
        (restarting per sample), self-attention is block-diagonal causal over segments and
        media masks are taken at token indices 0..S-1 (the spans' coordinates; the caller
        clips the spans to segments). input_embeds [B, S, D] (+ embeds_mask [B, S] bool):
        input embeddings replacing the token embedding (where embeds_mask, else
        everywhere); tokens may then be None.
        """
        h = self._input_embeddings(tokens, input_embeds, embeds_mask, skip_check=static or decode_layout is not None)
        freqs_cis = self.rope(positions, h.device)  # [B, S, head_dim // 2], float32 whatever h's dtype
        # Token index of each query in its row: what media spans (and cache slots) count
        # in. It is the position except in packed rows, where positions restart.
        index = positions
        if segment_ids is not None:
            if caches is not None or static or keep is not None:
                raise ValueError("segment_ids (packed rows) take a fresh forward: no KV caches, static or keep")
            mask, cache_from, kv_len = segment_attention_mask(segment_ids.to(h.device)), None, positions.shape[1]
            index = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
        elif static:
            if caches is None:
                raise ValueError("static=True needs KV caches")
            mask, cache_from, kv_len = self._static_cache_mask(positions, caches[0].k.shape[2])
        elif decode_layout is not None:
            if caches is None:
                raise ValueError("decode_layout needs KV caches")
            mask, cache_from, kv_len = self._known_cache_mask(positions, *decode_layout)
        else:
            mask, cache_from, kv_len = self._self_attention_mask(positions, caches is not None)
            if caches is None and mask is not None:
                raise ValueError("without KV caches, positions must be 0..S-1 in every row (one causal prefix)")
        media_masks = {name: state.masks(index) for name, state in (media or {}).items()}
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            rows = keep if i == last else None
            for modality, block in self._adapters_by_layer()[i]:
                if modality in media_masks:
                    state = media[modality]
                    if self.checkpoint_adapters and self.training:
                        h = torch.utils.checkpoint.checkpoint(block, h, state.kv_for(block), *media_masks[modality], use_reentrant=False)
                    else:
                        h = block(h, state.kv_for(block), *media_masks[modality])
            cache = caches[i] if caches is not None else None
            if self.checkpoint_activations and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, freqs_cis, positions, mask, cache, cache_from, kv_len, rows, use_reentrant=False)
            else:
                h = layer(h, freqs_cis, positions, mask, cache, cache_from, kv_len, rows)
        return self.norm(h)

    @staticmethod
    def _self_attention_mask(positions: torch.Tensor, cached: bool):
        """(mask, contiguous write offset or None, key length). mask is None when every row
        holds the same positions and no key needs hiding beyond causality: a prefix from 0
        (plain causal) or, with caches, one decode position (every cached key is visible --
        no [B, 1, 1, L] mask to build, and SDPA takes its unmasked kernel)."""
        b, s = positions.shape
        start = int(positions[0, 0])
        contiguous = bool((positions == start + torch.arange(s, device=positions.device)).all())
        if contiguous and (start == 0 or (s == 1 and cached)):
            return None, start, start + s
        kv_len = int(positions.max()) + 1
        keys = torch.arange(kv_len, device=positions.device)
        mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, S, L]
        return mask, (start if contiguous and cached else None), kv_len

    @staticmethod
    def _known_cache_mask(positions: torch.Tensor, kv_len: int, start: int | None):
        """`_self_attention_mask` from host-known facts instead of device reads: rows all
        writing at `start` (one decode position each: every cached key visible, no mask),
        or ragged rows masked past their own positions."""
        s = positions.shape[1]
        if start is not None:
            return (None if s == 1 else _causal_from(start, s, kv_len, positions.device)), start, kv_len
        keys = torch.arange(kv_len, device=positions.device)
        return (keys[None, None, :] <= positions[:, :, None])[:, None], None, kv_len

    @staticmethod
    def _static_cache_mask(positions: torch.Tensor, cache_len: int):
        """(mask [B, 1, S, cache_len], None = scatter writes at `positions`, cache_len):
        slots past a row's position (unwritten or stale) get exactly zero weight."""
        keys = torch.arange(cache_len, device=positions.device)
        return (keys[None, None, :] <= positions[:, :, None])[:, None], None, cache_len

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden [.., D] -> float32 logits [.., vocab] (gathered across TP ranks)."""
        return gather_from_tp(self.output(h)).float()
