"""The vision-language model: image encoder -> gated cross-attention adapters -> frozen
Llama 3 decoder (Meta's CrossAttentionTransformer; state-dict keys are Meta's).

Further modalities plug in through `add_modality`, fused by cross-attention adapters or,
LLaVA-style, by a projector whose tokens take their placeholders' places in the decoder
input (llama_vision.model.modality). `vision_num_cross_attention_layers: 0` builds the
trunk without Meta's image encoder and adapters (a LLaVA-family model adds its projector
image modality: llama_vision.model.llava)."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .args import ModelArgs
from .cross_attention import NO_END, MediaState, build_adapter_blocks, media_spans
from .decoder_input import DecoderInput, clip_spans_to_segments, positions_from_segments
from .init import init_weights
from .modality import FUSIONS, FusedEmbeds, MediaTokens, Modality
from .text import AdapterSchedule, KVCache, PlaceholderEmbedding, TextDecoder
from .vision import VisionModel

# Meta's tokenizer file lists <|image|> at 128011; its chat format rewrites it to 128256
# (row 0 of the learnable table) before the model. Accept both at the input.
LLAMA3_IMAGE_SPECIAL_ID = 128011
LLAMA3_VOCAB = 128256


class VisionLanguageModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # (registered before the text model: parameter order is Meta's state-dict order)
        self.vision_model = VisionModel(args) if args.fusion_schedule else None
        self.text_model = TextDecoder(args)
        self.modalities: dict[str, Modality] = {}
        # Projector-modality items may come without placeholders while this is set: they are
        # encoded and kept in the autograd graph with weight 0 (every output bitwise as
        # without them). What FSDP's dummy media need (training.media_sync): a data-parallel
        # rank with no image then runs the tower, the projector and the decoder's input in
        # the same order, forward and backward, as the ranks that have images.
        self.unattended_media = False
        if self.vision_model is None:  # a trunk for other image modalities (projector fusion)
            return
        self.add_modality(
            "image",
            token_id=args.image_token_id,
            encode=self._encode_image_inputs,
            adapter_attr="cross_attention_layers",
            layers=args.fusion_schedule,
            aliases=(LLAMA3_IMAGE_SPECIAL_ID,) if args.vocab_size == LLAMA3_VOCAB else (),
            trainable_modules=["vision_model.vision_projection", "text_model.cross_attention_layers", "text_model.learnable_embedding"],
            own_placeholder=False,
        )

    # --- modalities ---------------------------------------------------------------------
    def add_modality(
        self,
        name: str,
        *,
        token_id: int,
        encode,
        layers: list[int],
        adapter_attr: str | None = None,
        encoder: nn.Module | None = None,
        encoder_attr: str | None = None,
        order: int = 0,
        aliases: tuple[int, ...] = (),
        trainable_modules: list[str] | None = None,
        own_placeholder: bool = True,
        seed: int = 0,
        fusion: str = "cross_attention",
        tokens_per_item=None,
    ) -> Modality:
        """Register a modality: `encode(inputs) -> MediaTokens`, adapters before `layers`
        (fusion "cross_attention"), or its tokens in its placeholders' places in the decoder
        input (fusion "projector": no adapters, `layers` empty; `tokens_per_item(meta)` says
        how many placeholders one item takes; llama_vision.model.modality).

        `encoder` (optional) is registered as `self.<encoder_attr>` so its weights are saved
        and trained with the model; adapter blocks go to `text_model.<adapter_attr>` with
        gates at 0, so existing outputs stay bitwise unchanged until they are trained.
        own_placeholder: the placeholder token's input embedding is the modality's own
        parameter (`text_model.placeholder_embeddings.<name>.weight`, in its trainability
        group), so its training stage learns it; False reads the shared learnable table
        (the image modality: Meta's layout).
        """
        if name in self.modalities:
            raise ValueError(f"modality {name!r} is already registered")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if fusion == "projector" and layers:
            raise ValueError(f"a projector modality has no adapter layers, got layers={list(layers)}")
        lo, hi = self.args.vocab_size, self.args.vocab_size + self.args.n_learnable_embeddings
        if not lo <= token_id < hi:
            raise ValueError(f"placeholder id {token_id} for {name!r} must be a learnable-row id in [{lo}, {hi})")
        taken = {m.token_id: m.name for m in self.modalities.values()}
        if token_id in taken:
            raise ValueError(f"placeholder id {token_id} is already used by modality {taken[token_id]!r}")
        if encoder is not None:
            encoder_attr = encoder_attr or f"{name}_encoder"
            self.add_module(encoder_attr, encoder)
        ref = self.text_model.output.weight
        if fusion == "cross_attention":
            adapter_attr = adapter_attr or f"{name}_cross_attention_layers"
            with torch.device(ref.device):
                blocks = build_adapter_blocks(self.args, len(layers)).to(ref.dtype)
            if ref.device.type != "meta":
                # Same weights at every TP degree, seeded by the blocks' state-dict names.
                init_weights(blocks, seed=seed, prefix=f"text_model.{adapter_attr}.")
            self.text_model.add_adapters(AdapterSchedule(name, adapter_attr, list(layers), order), blocks)
            default_owned = [f"text_model.{adapter_attr}"]
        else:
            adapter_attr, default_owned = "", []
        owned = list(trainable_modules or []) or default_owned + ([encoder_attr] if encoder is not None else [])
        if own_placeholder:
            with torch.device(ref.device):
                placeholder = PlaceholderEmbedding(self.args.dim, token_id).to(ref.dtype)
            if ref.device.type != "meta":
                # It starts as the shared table's row for this id, so adding the modality
                # changes no output (the table is vocab-parallel: read it through its
                # forward, which gathers the row on every tensor-parallel rank).
                row = torch.tensor([token_id - self.args.vocab_size], device=ref.device)
                with torch.no_grad():
                    placeholder.weight.copy_(self.text_model.learnable_embedding(row)[0])
            self.text_model.placeholder_embeddings[name] = placeholder
            owned.append(f"text_model.placeholder_embeddings.{name}")
        modality = Modality(name, token_id, encode, adapter_attr, list(layers), order, tuple(aliases), owned, fusion,
                            tokens_per_item)
        self.modalities[name] = modality
        return modality

    # --- encoders -----------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor, aspect_ratios: torch.Tensor) -> torch.Tensor:
        """images [B, N, T, 3, S, S], aspect_ratios [B, N, 2] -> [B, N, T, P, dim]."""
        t = images.shape[2]
        if t > self.args.vision_max_num_chunks:
            raise ValueError(f"images carry {t} tiles, more than vision_max_num_tiles={self.args.vision_max_num_chunks}")
        tiles = (aspect_ratios[..., 0] * aspect_ratios[..., 1]).max().item()
        if tiles > t:
            raise ValueError(f"an aspect ratio asks for {tiles} tiles but only {t} tile slots were given")
        return self.vision_model(images, aspect_ratios)

    def _encode_image_inputs(self, inputs) -> MediaTokens:
        images, aspect_ratios = inputs
        feats = self.encode_images(images, aspect_ratios)  # [B, N, T, P, D]
        b, n, t, p, d = feats.shape
        n_tiles = aspect_ratios[..., 0] * aspect_ratios[..., 1]  # [B, N]
        valid = (torch.arange(t, device=feats.device)[None, None, :] < n_tiles[..., None].to(feats.device))
        valid = valid[..., None].expand(b, n, t, p).reshape(b, n, t * p)
        return MediaTokens(feats.reshape(b, n, t * p, d), valid)

    # --- forward ------------------------------------------------------------------------
    def prepare_media(self, tokens: torch.Tensor, media_inputs: dict[str, Any], *,
                      present_only: bool = False) -> dict[str, MediaState | FusedEmbeds]:
        """Encode each modality once and precompute every adapter's K/V (the per-prompt
        work; decode steps only read it). tokens [B, S] locate the placeholders. A
        projector modality's state is its tokens in placeholder order (FusedEmbeds), which
        the forward puts in place of the placeholders of the call that has them (the
        prefill; decode steps have none).

        present_only: run the encoder on the media slots that rows use only (slot n of
        row b is used iff the row has more than n placeholders), the others left at
        zero (masked out either way). Packed rows pad their image slots to the row with
        the most images, so that is the encoder work packing would otherwise add. Needs
        inputs that are tensors [B, N, ...] (else everything is encoded); encoding a
        subset changes the encoder's batch, so float rounding may differ from a full
        encode (the default, bitwise as before)."""
        rows = tokens.tolist()
        states = {}
        for name, inputs in media_inputs.items():
            if inputs is None:
                continue
            if name not in self.modalities:
                raise KeyError(f"no modality {name!r} registered; known: {sorted(self.modalities)}")
            mod = self.modalities[name]
            counts = [sum(t in mod.placeholder_ids for t in row) for row in rows]
            if mod.fusion == "projector":
                states[name] = self._fused_embeds(mod, mod.encode(inputs), counts, self.unattended_media)
                continue
            enc = self._encode_used_slots(mod, inputs, counts) if present_only else mod.encode(inputs)
            b, n = enc.tokens.shape[:2]
            if b != len(rows):
                raise ValueError(f"{name}: inputs have batch {b}, tokens have {len(rows)} rows")
            for i, c in enumerate(counts):
                if c > n:
                    raise ValueError(f"row {i} has {c} {name} placeholder tokens but only {n} {name} slots were given")
            start, end = media_spans(rows, mod.placeholder_ids, slots=n)
            present = torch.arange(n)[None, :] < torch.tensor(counts)[:, None]  # [B, N]
            valid = enc.valid & present[..., None].to(enc.valid.device)
            flat = enc.tokens.reshape(b, -1, enc.tokens.shape[-1])
            blocks = self.text_model.adapters(name)
            states[name] = MediaState(
                kv={id(blk): blk.compute_kv(flat) for blk in blocks},
                token_owner=torch.arange(n, device=flat.device).repeat_interleave(enc.tokens.shape[2]),
                token_valid=valid.reshape(b, -1),
                span_start=start.to(flat.device),
                span_end=end.to(flat.device),
            )
        return states

    @staticmethod
    def _fused_embeds(mod: Modality, enc: MediaTokens, counts: list[int], unattended: bool = False) -> FusedEmbeds:
        """A projector modality's encoder output [B, N, L, D] -> its valid tokens in row /
        slot / token order, which must be as many per row as the row's placeholders
        (`unattended`: or none, for a row without placeholders: FusedEmbeds.unattended)."""
        b = enc.tokens.shape[0]
        if b != len(counts):
            raise ValueError(f"{mod.name}: inputs have batch {b}, tokens have {len(counts)} rows")
        have = enc.valid.reshape(b, -1).sum(1).tolist()
        spare = [unattended and want == 0 and got > 0 for want, got in zip(counts, have)]
        for i, (want, got, unused) in enumerate(zip(counts, have, spare)):
            if want != got and not unused:
                raise ValueError(f"row {i} has {want} {mod.name} placeholder tokens but its {mod.name} inputs give {got} "
                                 f"tokens (each item takes as many placeholders as it has tokens: the modality's "
                                 f"tokens_per_item)")
        if not any(spare):
            return FusedEmbeds(enc.tokens[enc.valid], counts)
        rows = torch.tensor(spare, device=enc.valid.device)[:, None, None]
        return FusedEmbeds(enc.tokens[enc.valid & ~rows], counts, unattended=enc.tokens[enc.valid & rows])

    def _fused_input(self, tokens: torch.Tensor, fused: dict[str, FusedEmbeds]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(input_embeds [B, S, D], embeds_mask [B, S]) putting each projector modality's
        tokens at its placeholders in `tokens` [B, S]; None when no row of this call has
        any (a decode step, or text-only rows: the plain token path, bitwise)."""
        embeds = mask = None
        for name, state in fused.items():
            mod = self.modalities[name]
            where = torch.isin(tokens, torch.tensor(sorted(mod.placeholder_ids), device=tokens.device))
            per_row = where.sum(1).tolist()
            if state.unattended is not None and state.unattended.numel():
                # unattended items (VisionLanguageModel.unattended_media): into the graph with
                # weight 0, through the input embeddings like placed tokens (so their backward
                # runs after the decoder's, as on a rank that places them)
                if embeds is None:
                    embeds = state.unattended.new_zeros(*tokens.shape, state.unattended.shape[-1])
                    mask = torch.zeros_like(where)
                embeds = embeds + 0 * state.unattended.sum()
            if not any(per_row):
                continue
            if per_row != list(state.counts):
                raise ValueError(f"{name}: the rows have {per_row} placeholder tokens but were encoded for {list(state.counts)}")
            if embeds is None:
                embeds = state.tokens.new_zeros(*tokens.shape, state.tokens.shape[-1])
                mask = torch.zeros_like(where)
            embeds = embeds.masked_scatter(where[..., None], state.tokens.to(embeds.dtype))
            mask = mask | where
        return None if embeds is None else (embeds, mask)

    @staticmethod
    def _split_media(media: dict) -> tuple[dict[str, MediaState], dict[str, FusedEmbeds]]:
        cross = {n: s for n, s in media.items() if not isinstance(s, FusedEmbeds)}
        return cross, {n: s for n, s in media.items() if isinstance(s, FusedEmbeds)}

    @staticmethod
    def _encode_used_slots(mod: Modality, inputs: Any, counts: list[int]) -> MediaTokens:
        """mod.encode over the used slots only (see prepare_media), scattered back into
        zero-filled [B, N, ...] MediaTokens."""
        parts = inputs if isinstance(inputs, tuple) else (inputs,)
        if not parts or not all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in parts):
            return mod.encode(inputs)
        b, n = parts[0].shape[:2]
        if any(tuple(t.shape[:2]) != (b, n) for t in parts) or len(counts) != b:
            return mod.encode(inputs)
        used = torch.arange(n)[None, :] < torch.tensor(counts)[:, None].clamp(max=n)  # [B, N]
        if bool(used.all()) or not bool(used.any()):
            return mod.encode(inputs)
        idx = tuple(i.to(parts[0].device) for i in used.nonzero(as_tuple=True))
        sub = tuple(t[idx][None] for t in parts)  # [1, M, ...]: the used slots as one row
        enc = mod.encode(sub if isinstance(inputs, tuple) else sub[0])
        tokens = enc.tokens.new_zeros(b, n, *enc.tokens.shape[2:]).index_put(idx, enc.tokens[0])
        valid = enc.valid.new_zeros(b, n, *enc.valid.shape[2:]).index_put(idx, enc.valid[0])
        return MediaTokens(tokens, valid)

    def media_for_rows(self, media: dict[str, MediaState], rows: torch.Tensor, tokens: torch.Tensor) -> dict[str, MediaState]:
        """Reuse encoded media under new token rows, without re-encoding anything.

        Row i of `tokens` [B', S'] reads the media (K/V, valid tokens) of row `rows[i]` of
        `media` (rows [B'] indexes its batch); its attention spans come from its own
        placeholders, which must be as many as that source row's (e.g. DPO's chosen and
        rejected continuations of one prompt share its images).
        """
        token_rows = tokens.tolist()
        out = {}
        for name, state in media.items():
            mod = self.modalities[name]
            if isinstance(state, FusedEmbeds):
                pieces = list(state.tokens.split(list(state.counts)))
                picked = [int(r) for r in rows.tolist()]
                out[name] = FusedEmbeds(torch.cat([pieces[r] for r in picked]), [state.counts[r] for r in picked])
                continue
            start, end = media_spans(token_rows, mod.placeholder_ids, slots=state.span_start.shape[1])
            have = (state.span_start != NO_END).sum(1).cpu()[rows.cpu()]
            want = (start != NO_END).sum(1)
            if start.shape[1] != state.span_start.shape[1] or not torch.equal(have, want):
                raise ValueError(f"{name}: new rows have {want.tolist()} placeholders but their source rows have {have.tolist()}")
            picked = state.select_rows(rows.to(state.span_start.device))
            out[name] = dataclasses.replace(picked, span_start=start.to(picked.span_start.device), span_end=end.to(picked.span_end.device))
        return out

    def forward(
        self,
        tokens: torch.Tensor,
        images: torch.Tensor | None = None,
        aspect_ratios: torch.Tensor | None = None,
        *,
        media_inputs: dict[str, Any] | None = None,
        media: dict[str, MediaState] | None = None,
        positions: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        logit_index: torch.Tensor | None = None,
        decoder_input: DecoderInput | None = None,
    ) -> torch.Tensor:
        """tokens [B, S] (+ images [B, N, T, 3, S, S], aspect_ratios [B, N, 2], or other
        modalities in `media_inputs`, or precomputed `media`) -> float32 logits [B, S, V].

        logit_index [B]: compute logits only at that position of each row -> [B, 1, V]
        (prefill needs one row of logits, not S x vocab).

        decoder_input: the per-token layout beyond token ids (docs/decoder_input.md):
        explicit RoPE positions, packed-sample segment ids (block-diagonal causal
        self-attention; media spans clipped to each sample), row lengths, and input
        embeddings replacing the token embedding (tokens may then be None, without media).
        None -- or every field None -- is exactly the call without it. `positions` here
        is the same field for existing callers: give one or the other."""
        if decoder_input is not None:
            return self._forward_layout(tokens, images, aspect_ratios, media_inputs, media, positions, caches, logit_index, decoder_input)
        self.check_tokens(tokens, positions)
        if media is None:
            inputs = dict(media_inputs or {})
            if images is not None:
                inputs["image"] = (images, aspect_ratios)
            media = self.prepare_media(tokens, inputs) if inputs else {}
        media, fused = self._split_media(media)
        fused_input = self._fused_input(tokens, fused) if fused else None
        if fused_input is not None:  # projector modalities: their tokens replace their placeholders
            layout = DecoderInput(input_embeds=fused_input[0], embeds_mask=fused_input[1])
            return self._forward_layout(tokens, None, None, None, media, positions, caches, logit_index, layout)
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        # With logit_index the last layer computes only the kept position of each row.
        h = self.text_model(self._canonical_tokens(tokens), positions, media, caches, keep=logit_index)
        return self.text_model.logits(h)

    def _forward_layout(self, tokens, images, aspect_ratios, media_inputs, media, positions, caches, logit_index,
                        layout: DecoderInput) -> torch.Tensor:
        """`forward` with a DecoderInput (validated here, once, for every decoder caller)."""
        if positions is not None and layout.positions is not None:
            raise ValueError("positions given twice: as forward(positions=) and as DecoderInput.positions")
        ref = tokens if tokens is not None else layout.input_embeds
        if ref is None:
            raise ValueError("forward needs tokens or DecoderInput.input_embeds")
        b, s = ref.shape[:2]
        layout.validate(b, s, self.args.dim, cached=caches is not None, keep=logit_index is not None)
        segments = layout.resolved_segments(s, cached=caches is not None)
        positions = positions if positions is not None else layout.positions
        if positions is not None and positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.args.max_seq_len):
            raise ValueError(f"DecoderInput.positions must be in [0, max_seq_len={self.args.max_seq_len}), got "
                             f"{int(positions.min())}..{int(positions.max())}")
        if positions is None:
            positions = (positions_from_segments(segments) if segments is not None
                         else torch.arange(s, device=ref.device).expand(b, -1))
        if tokens is None:
            if media is not None or images is not None or media_inputs:
                raise ValueError("media need tokens: their placeholders locate each item's text span")
            if layout.embeds_mask is not None:
                raise ValueError("DecoderInput.embeds_mask needs tokens: the positions it leaves False read the token embedding")
            end = s if caches is None else int(positions.max()) + 1
            if end > self.args.max_seq_len:
                raise ValueError(f"sequence of {end} positions is longer than max_seq_len={self.args.max_seq_len}")
            media = {}
        else:
            # Without caches a row is S tokens long whatever its (restarting) positions say.
            self.check_tokens(tokens, positions if caches is not None else None)
            if media is None:
                inputs = dict(media_inputs or {})
                if images is not None:
                    inputs["image"] = (images, aspect_ratios)
                # Packed rows: no encoder work for the image slots padding each row to the most.
                media = self.prepare_media(tokens, inputs, present_only=segments is not None) if inputs else {}
            media, fused = self._split_media(media)
            fused_input = self._fused_input(tokens, fused) if fused else None
            if fused_input is not None:
                if layout.input_embeds is not None:
                    raise ValueError("DecoderInput.input_embeds and projector-modality media both give input embeddings")
                layout = dataclasses.replace(layout, input_embeds=fused_input[0], embeds_mask=fused_input[1])
            tokens = self._canonical_tokens(tokens)
        if segments is not None:
            # Spans count token indices of the row: clip each to its placeholder's sample.
            media = {name: dataclasses.replace(st, span_end=clip_spans_to_segments(st.span_start, st.span_end, segments))
                     for name, st in media.items()}
        h = self.text_model(tokens, positions, media, caches, keep=logit_index, segment_ids=segments,
                            input_embeds=layout.input_embeds, embeds_mask=layout.embeds_mask)
        return self.text_model.logits(h)

    def _canonical_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        for mod in self.modalities.values():
            for alias in mod.aliases:
                tokens = tokens.masked_fill(tokens == alias, mod.token_id)
        return tokens

    def check_tokens(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        limit = self.args.vocab_size + self.args.n_learnable_embeddings
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= limit):
            bad = tokens[(tokens < 0) | (tokens >= limit)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {limit})")
        end = tokens.shape[1] if positions is None else int(positions.max()) + 1
        if end > self.args.max_seq_len:
            raise ValueError(f"sequence of {end} tokens is longer than max_seq_len={self.args.max_seq_len}")

    def init_caches(self, batch: int, max_len: int | None = None, dtype=None, device=None) -> list[KVCache]:
        """Preallocated self-attention caches for incremental decoding."""
        max_len = max_len or self.args.max_seq_len
        ref = self.text_model.output.weight
        attn = self.text_model.layers[0].attention
        return [
            KVCache(batch, attn.n_local_kv_heads, max_len, attn.head_dim, dtype or ref.dtype, device or ref.device)
            for _ in self.text_model.layers
        ]

    # --- convenience: one fresh forward over ragged rows --------------------------------
    @torch.no_grad()
    def logits(self, tokens: list[list[int]], images: list[list[Any]] | None = None) -> list[torch.Tensor]:
        """Rows of token ids (+ PIL images per row, in placeholder order) -> list of float32
        logits [len(row), vocab], one batched forward (rows right-padded)."""
        from llama_vision.inputs import prepare_image_batch, pad_rows

        device = self.text_model.output.weight.device
        tok, lengths = pad_rows(tokens, device=device)
        image_inputs = prepare_image_batch(self, tokens, images, device=device)
        out = self.forward(tok, media_inputs={"image": image_inputs} if image_inputs is not None else None)
        return [out[i, :n] for i, n in enumerate(lengths)]
