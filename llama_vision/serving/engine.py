"""The serving engine: continuous batching over a preallocated pool of KV-cache slots.

Every request owns one slot (one row of every layer's KV cache) from its prefill to its last
token. The scheduler loop alternates

    plan   -- drop cancelled / timed-out slots, admit queued requests into free slots
    admit  -- per new request: its images' cross-attention K/V (:mod:`.media`, cached by
              image hash), the prefill of its prompt into its slot, its first token
    decode -- ONE step for every running slot together: rows at their own positions
              (``KVCache`` writes each row at its position; the mask hides keys past it)

so requests join and leave the running batch at step boundaries. Running slots are kept
contiguous (0..n-1: a finished slot's place is taken by the last one) so a step decodes
rows ``[0, n)`` of the pool as views, without copying caches.

Tensor parallelism: rank 0 plans (HTTP requests arrive there) and broadcasts each step's
plan -- admitted requests with their prompt ids, image bytes and resolved seeds, and the
slots to drop -- to the other ranks (:meth:`Engine.follow`), which execute the very same
step; every forward is then the same collective on every rank, and sampling is identical
(greedy, or seeded per request).

The decoder input is the contract of docs/decoder_input.md: per-row ``positions`` (a slot's
next cache indices) and per-slot media spans.

LoRA: with a :class:`~llama_vision.model.lora_bank.LoraBank` the engine serves several
adaptors on one base model; a request names its adaptor (``GenerationRequest.adapter``,
the OpenAI ``model`` field) and every forward tells the bank each row's adaptor, so
requests of different adaptors (and of the base model) share a decode step.

LLaVA models (a projector image modality): an image's placeholder is expanded to its tokens
at admission (the context check counts them), the images are encoded in the prefill only,
and their tokens then live in the slot's KV cache like the prompt's: decode steps carry no
media.
"""
from __future__ import annotations

import asyncio
import io
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch
from PIL import Image

import model_parallel as mp
from llama_vision.generation import sample_top_p, use_streaming_layout
from llama_vision.model.cross_attention import media_spans

from .media import ImageCache, ImageKV, batch_media


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    """None: up to the end of the context (max_seq_len - prompt length)."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    """None: the tokenizer's stop tokens."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    """Chat-formatted ids; images as <|image|> placeholders, one per entry of `images`."""
    images: list[bytes] = field(default_factory=list)
    """Encoded image bytes (PNG, JPEG, ...), in placeholder order."""
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    adapter: str | None = None
    """The LoRA adaptor to answer with (a name of the engine's `lora_bank`); None: the base model."""
    videos: list[bytes] = field(default_factory=list)
    """Encoded video files (mp4, ...), one per video placeholder (the video modality's
    token), in order: a LLaVA checkpoint's projector video path."""


@dataclass
class TokenEvent:
    token_id: int | None
    """A generated token; None on the final event."""
    finish_reason: str | None = None
    """On the final event: stop, length, cancelled, timeout or error."""
    error: str | None = None


class QueueFull(Exception):
    """The request queue is at its limit (HTTP 429)."""


class RequestRejected(ValueError):
    """A request the engine cannot run; ``status``: the HTTP status (400, 413, 422)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


_DONE = object()


class RequestStream:
    """A submitted request's tokens, as they are generated (iterate; async-iterate when
    submitted with ``loop=``). ``cancel()`` frees its slot at the next step boundary."""

    def __init__(self, request_id: str, prompt_tokens: int, loop: asyncio.AbstractEventLoop | None):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self._loop = loop
        self._queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()

    def cancel(self) -> None:
        self.cancelled = True

    def _push(self, event: TokenEvent) -> None:
        if event.token_id is not None:
            self.completion_tokens += 1
        else:
            self.finish_reason = event.finish_reason
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
            except RuntimeError:  # the client's event loop is gone: nobody is listening
                self.cancelled = True
        else:
            self._queue.put(event)

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._loop is not None:
            raise TypeError("this stream was submitted with an event loop: use `async for`")
        while True:
            event = self._queue.get()
            yield event
            if event.token_id is None:
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._loop is None:
            raise TypeError("submit(..., loop=asyncio.get_running_loop()) to iterate asynchronously")
        while True:
            event = await self._queue.get()
            yield event
            if event.token_id is None:
                return


@dataclass
class _Slot:
    """A running request (on every TP rank; `stream` only on rank 0)."""

    request_id: str
    params: SamplingParams
    stops: frozenset[int]
    images: list[ImageKV]
    spans: tuple[torch.Tensor, torch.Tensor]
    length: int  # tokens in the cache = the position of the next token
    last_token: int = -1
    generated: int = 0
    generator: torch.Generator | None = None
    stream: RequestStream | None = None
    deadline: float | None = None
    submitted: float = 0.0
    adapter: str | None = None


class Engine:
    """Continuous batching for a VisionLanguageModel (see the module docstring)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_seq_len: int | None = None, max_queue: int = 64,
                 image_cache_size: int = 64, max_images: int = 8, max_image_pixels: int = 64_000_000,
                 request_timeout_s: float | None = None, lora_bank=None, max_videos: int = 2):
        self.model = model.eval()
        self.lora_bank = lora_bank
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
        self.max_queue = max_queue
        self.max_images = max_images
        self.max_videos = max_videos
        self.max_image_pixels = max_image_pixels
        self.request_timeout_s = request_timeout_s
        self.device = model.text_model.output.weight.device
        if self.device.type == "cpu":
            # The CPU's faster GEMV layout of the widening projections (what Generator does;
            # a no-op on an already re-laid-out model): docs/BENCHMARKS.md "Serving load".
            use_streaming_layout(model)
        self.caches = model.init_caches(max_batch, self.max_seq_len)
        self.images = ImageCache(model, image_cache_size)
        self._image_token = tokenizer.image_token_id
        # A LLaVA model's image modality (projector fusion): an image is its tokens in the
        # prompt, so it is encoded at the prefill and lives in the slot's KV cache after
        # it (no cross-attention K/V to cache or to batch at decode steps).
        image = model.modalities.get("image")
        self._projector = image is not None and image.fusion == "projector"
        # Videos likewise, on a LLaVA model's projector video path (OneVision's): a video
        # is its sampled frames' tokens in the prompt, encoded at the prefill.
        video = model.modalities.get("video")
        self._video_token = video.token_id if video is not None and video.fusion == "projector" else None
        self._slots: list[_Slot] = []
        self._streams: dict[str, RequestStream] = {}  # admitted on rank 0, until their slot exists
        # (request, stream, submitted, its videos' decoded frames from validation)
        self._queue: deque[tuple[GenerationRequest, RequestStream, float, list[torch.Tensor]]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._media = None  # the running batch's image MediaState (rebuilt when slots change)
        self._media_stale = True
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.counters = {"requests_total": 0, "requests_failed": 0, "prompt_tokens_total": 0, "completion_tokens_total": 0,
                         "decode_steps_total": 0}
        self.batch_size_trace: deque[int] = deque(maxlen=4096)
        self.latency_s: deque[float] = deque(maxlen=4096)
        self.ttft_s: deque[float] = deque(maxlen=4096)

    # -- the public API ---------------------------------------------------------------------

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        """Validate and queue a request -> its stream. Raises RequestRejected (naming the
        problem) or QueueFull."""
        clips = self._validate(request)
        rid = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
        stream = RequestStream(rid, len(request.prompt_ids), loop)
        with self._wake:
            self._purge_queue()
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._queue.append((GenerationRequest(request.prompt_ids, request.images, request.params, rid, request.adapter,
                                                  request.videos),
                                stream, time.monotonic(), clips))
            self.counters["requests_total"] += 1
            self._wake.notify()
        return stream

    def start(self) -> None:
        """Run the scheduler on a background thread (TP rank 0)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="llama-vision-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def follow(self) -> None:
        """TP ranks other than 0: execute rank 0's steps until it shuts down."""
        while True:
            plan = mp.broadcast_object(None)
            if plan is None:
                return
            try:
                self._execute(plan)
            except Exception as e:  # as on rank 0 (the same step fails on every rank)
                self._fail_running(f"{type(e).__name__}: {e}")

    def is_alive(self) -> bool:
        """The scheduler thread runs (what /health reports)."""
        return self._thread is not None and self._thread.is_alive()

    def _fail_running(self, error: str) -> None:
        for slot in self._slots:
            self.counters["requests_failed"] += 1
            if slot.stream is not None:
                slot.stream._push(TokenEvent(None, "error", error))
        self._slots.clear()
        self._media_stale = True

    def metrics(self) -> dict:
        with self._lock:
            queued = len(self._queue)
        return {
            **self.counters,
            "queue_depth": queued,
            "active_slots": len(self._slots),
            "max_batch": self.max_batch,
            "batch_size_trace": list(self.batch_size_trace),
            "vision_encoder_runs": self.images.encoder_runs,
            "image_cache_hits": self.images.hits,
            "latency_s": list(self.latency_s),
            "ttft_s": list(self.ttft_s),
        }

    # -- validation (rank 0, the caller's thread) ---------------------------------------------

    @property
    def video_token(self) -> int | None:
        """The placeholder a prompt's video takes (a LLaVA model's projector video path), or
        None when this engine takes no videos."""
        return self._video_token

    @property
    def adapters(self) -> list[str]:
        """The LoRA adaptors this engine serves, by name."""
        return list(self.lora_bank.names) if self.lora_bank is not None else []

    def _validate(self, request: GenerationRequest) -> list[torch.Tensor]:
        """Refuse a request the engine cannot run (RequestRejected naming why) -> its videos'
        decoded frames (`_validate_videos`), which admission uses instead of decoding again."""
        from llama_vision.data.image_io import ImageLoadError, load_image

        ids, p = request.prompt_ids, request.params
        if not ids:
            raise RequestRejected("the prompt is empty")
        if request.adapter is not None and request.adapter not in self.adapters:
            raise RequestRejected(f"no LoRA adaptor named {request.adapter!r}; this engine serves {self.adapters}", status=404)
        limit = self.model.args.vocab_size + self.model.args.n_learnable_embeddings
        bad = [t for t in ids if not 0 <= t < limit]
        if bad:
            raise RequestRejected(f"token id {bad[0]} is outside the vocabulary (0..{limit - 1})")
        if p.max_tokens is not None and p.max_tokens < 1:
            raise RequestRejected(f"max_tokens must be at least 1, got {p.max_tokens}")
        if len(ids) + (p.max_tokens or 1) > self.max_seq_len:
            asked = f" plus max_tokens ({p.max_tokens})" if p.max_tokens is not None else ""
            raise RequestRejected(f"the prompt ({len(ids)} tokens){asked} is longer than the context ({self.max_seq_len} tokens)")
        if p.temperature < 0 or not 0 < p.top_p <= 1:
            raise RequestRejected(f"temperature must be >= 0 and top_p in (0, 1], got {p.temperature}, {p.top_p}")
        placeholders = sum(t == self._image_token for t in ids)
        if placeholders != len(request.images):
            raise RequestRejected(f"the prompt has {placeholders} image placeholder(s) but {len(request.images)} image(s) were given")
        if len(request.images) > self.max_images:
            raise RequestRejected(f"too many images: {len(request.images)} (at most {self.max_images} per request)")
        if request.images and "image" not in self.model.modalities:
            raise RequestRejected("this checkpoint has no image adapters")
        expanded = len(ids)
        for i, data in enumerate(request.images):
            try:
                # The header first: an oversized image is refused before it is decoded.
                width, height = Image.open(io.BytesIO(data)).size
            except (OSError, ValueError, SyntaxError):
                width = height = 0  # not even a header: load_image names the problem below
            if width * height > self.max_image_pixels:
                raise RequestRejected(f"image {i + 1}: {width}x{height} pixels exceeds the limit of {self.max_image_pixels}", status=413)
            try:
                load_image(data)
            except ImageLoadError as e:
                raise RequestRejected(f"image {i + 1}: not a readable image ({e})") from None
            if self._projector:  # its placeholder becomes as many tokens as the image has
                expanded += self.model.modalities["image"].tokens_per_item((height, width)) - 1
        added, clips = self._validate_videos(request)
        expanded += added
        if expanded + (p.max_tokens or 1) > self.max_seq_len:
            media = "images' and videos'" if request.videos else "images'"
            raise RequestRejected(f"the prompt ({expanded} tokens with its {media} tokens) plus max_tokens is longer than "
                                  f"the context ({self.max_seq_len} tokens)")
        return clips

    def _validate_videos(self, request: GenerationRequest) -> tuple[int, list[torch.Tensor]]:
        """Check a request's videos (count, a projector video path to take them, each one
        decodable) -> (the positions their placeholders add when expanded, each video's
        processed frames [f, 3, S, S])."""
        from llama_vision.data.video import VideoLoadError
        from llama_vision.inputs import projector_clip

        videos = request.videos
        if self._video_token is None:
            if videos:
                raise RequestRejected("this checkpoint takes no videos in the server (a LLaVA checkpoint with a projector "
                                      "video modality does; Meta-style video adapters are served by tools/infer_video.py "
                                      "only)")
            return 0, []
        placeholders = sum(t == self._video_token for t in request.prompt_ids)
        if placeholders != len(videos):
            raise RequestRejected(f"the prompt has {placeholders} video placeholder(s) but {len(videos)} video(s) were given")
        if len(videos) > self.max_videos:
            raise RequestRejected(f"too many videos: {len(videos)} (at most {self.max_videos} per request)")
        clips = []
        for i, data in enumerate(videos):
            try:
                clips.append(projector_clip(self.model, data))
            except VideoLoadError as e:
                raise RequestRejected(f"video {i + 1}: not a readable video ({e})") from None
        added = sum(self.model.modalities["video"].tokens_per_item(c.shape[0]) - 1 for c in clips)
        return added, clips

    # -- the scheduler (rank 0) ---------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._queue and not self._slots:
                        self._wake.wait(timeout=0.5)
                    if self._stopping:
                        break
                plan = self._plan()
                if mp.tp_size() > 1:
                    mp.broadcast_object(plan)
                try:
                    self._execute(plan)
                except Exception as e:  # a failing step ends its batch, not the server
                    self._fail_running(f"{type(e).__name__}: {e}")
        finally:
            for slot in self._slots:
                self._finish(slot, "cancelled")
            self._slots.clear()
            if mp.tp_size() > 1:
                mp.broadcast_object(None)  # the followers return

    def _plan(self) -> dict:
        """What this step does, as data every TP rank can execute: slots to drop (and why),
        requests to admit (with everything needed to run them)."""
        now = time.monotonic()
        drop = []
        for slot in self._slots:
            if slot.stream is not None and slot.stream.cancelled:
                drop.append((slot.request_id, "cancelled"))
            elif slot.deadline is not None and now > slot.deadline:
                drop.append((slot.request_id, "timeout"))
        admit = []
        free = self.max_batch - len(self._slots) + len(drop)
        with self._lock:
            self._purge_queue()
            while self._queue and len(admit) < free:
                request, stream, submitted, clips = self._queue.popleft()
                seed = request.params.seed
                if seed is None and request.params.temperature > 0:
                    seed = int(torch.randint(0, 2**62, ()).item())  # drawn once, here: every TP rank samples alike
                admit.append({"request_id": request.request_id, "prompt_ids": request.prompt_ids, "images": request.images,
                              "params": request.params, "seed": seed, "submitted": submitted, "adapter": request.adapter,
                              "videos": clips})  # (decoded frames: every TP rank gets them with the plan)
                self._streams[request.request_id] = stream
        return {"drop": drop, "admit": admit}

    def _purge_queue(self) -> None:
        """Drop queued requests whose client went away or whose time ran out (holding the
        lock): they must not hold a queue place, nor be prefilled to be dropped."""
        now = time.monotonic()
        kept = deque()
        for entry in self._queue:
            _, stream, submitted, _ = entry
            if stream.cancelled:
                stream._push(TokenEvent(None, "cancelled"))
            elif self.request_timeout_s is not None and now > submitted + self.request_timeout_s:
                stream._push(TokenEvent(None, "timeout"))
            else:
                kept.append(entry)
        self._queue = kept

    # -- execution (every rank) ---------------------------------------------------------------

    @torch.inference_mode()
    def _execute(self, plan: dict) -> None:
        for request_id, reason in plan["drop"]:
            slot = next((s for s in self._slots if s.request_id == request_id), None)
            if slot is not None:
                self._remove(slot, reason)
        for item in plan["admit"]:
            stream = self._streams.pop(item["request_id"], None)
            try:
                self._admit(item, stream)
            except Exception as e:  # one bad request never takes the batch down
                self.counters["requests_failed"] += 1
                if stream is not None:
                    stream._push(TokenEvent(None, "error", f"{type(e).__name__}: {e}"))
        if self._slots:
            self._decode_step()

    def _admit(self, item: dict, stream: RequestStream | None) -> None:
        params: SamplingParams = item["params"]
        ids: list[int] = item["prompt_ids"]
        media_inputs = {}
        if self._projector:  # LLaVA: the placeholders expanded, the images encoded at the prefill only
            from llama_vision.data.image_io import load_image
            from llama_vision.inputs import prepare_images

            rows, image_inputs = prepare_images(self.model, [ids], [[load_image(d) for d in item["images"]]],
                                                device=self.device)
            ids, images = rows[0], []
            media_inputs = {"image": image_inputs} if image_inputs is not None else {}
        else:
            images = [self.images.get(data) for data in item["images"]]
        if item.get("videos"):  # (validated and decoded: the projector video path) expanded, encoded at the prefill
            from llama_vision.inputs import prepare_video_clips

            rows, video_inputs = prepare_video_clips(self.model, [ids], [item["videos"]], device=self.device)
            ids, media_inputs = rows[0], {**media_inputs, "video": video_inputs}
        start, end = media_spans([ids], {self._image_token}, slots=max(len(images), 1))
        stops = params.stop_token_ids if params.stop_token_ids is not None else list(self.tokenizer.stop_tokens)
        generator = None
        if item["seed"] is not None:
            generator = torch.Generator(device=self.device).manual_seed(item["seed"])
        slot = _Slot(item["request_id"], params, frozenset(stops), images, (start[0], end[0]), 0,
                     generator=generator, stream=stream, submitted=item["submitted"], adapter=item.get("adapter"))
        if self.request_timeout_s is not None:
            slot.deadline = item["submitted"] + self.request_timeout_s
        index = len(self._slots)
        # The prefill: the prompt alone, into this slot's cache rows.
        prompt = torch.tensor([ids], device=self.device)
        media = batch_media([images], [slot.spans], self.model.text_model.adapters("image"), self.device) if images else None
        caches = [c.rows(index, index + 1) for c in self.caches]
        if self.lora_bank is not None:
            self.lora_bank.select([slot.adapter])
        # (media None: the forward encodes media_inputs, the projector's images, or none)
        logits = self.model(prompt, media={"image": media} if media is not None else None, media_inputs=media_inputs,
                            caches=caches,
                            logit_index=torch.tensor([len(ids) - 1], device=self.device))[:, -1]
        slot.length = len(ids)
        self._slots.append(slot)
        self._media_stale = True
        self.counters["prompt_tokens_total"] += len(ids)
        if stream is not None:
            self.ttft_s.append(time.monotonic() - slot.submitted)
        self._accept(slot, self._sample(logits, [slot])[0])

    def _decode_step(self) -> None:
        """One token for every running slot (rows 0..n-1 of the cache pool)."""
        slots = list(self._slots)
        n = len(slots)
        self.batch_size_trace.append(n)
        self.counters["decode_steps_total"] += 1
        if self._media_stale:
            self._media = None
            if any(s.images for s in slots):
                self._media = batch_media([s.images for s in slots], [s.spans for s in slots],
                                          self.model.text_model.adapters("image"), self.device)
            self._media_stale = False
        tokens = torch.tensor([[s.last_token] for s in slots], device=self.device)
        lengths = [s.length for s in slots]
        positions = torch.tensor(lengths, device=self.device)[:, None]
        caches = [c.rows(0, n) for c in self.caches]
        layout = (max(lengths) + 1, lengths[0] if len(set(lengths)) == 1 else None)
        text = self.model.text_model
        media = {"image": self._media} if self._media is not None else {}
        if self.lora_bank is not None:
            self.lora_bank.select([s.adapter for s in slots])
        h = text(self.model._canonical_tokens(tokens), positions, media, caches, decode_layout=layout)
        picks = self._sample(text.logits(h)[:, -1], slots)
        for slot in slots:
            slot.length += 1
        for slot, token in zip(slots, picks):
            self._accept(slot, token)

    def _sample(self, logits: torch.Tensor, slots: list[_Slot]) -> list[int]:
        """logits [B, V] -> one token per slot (greedy rows in one argmax)."""
        picks = logits.argmax(-1)
        for i, slot in enumerate(slots):
            if slot.params.temperature > 0:
                probs = torch.softmax(logits[i : i + 1] / slot.params.temperature, dim=-1)
                picks[i] = sample_top_p(probs, slot.params.top_p, slot.generator)[0]
        return picks.tolist()

    def _accept(self, slot: _Slot, token: int) -> None:
        """A sampled token: stop, emit, or run out of budget / context."""
        if token in slot.stops:
            self._remove(slot, "stop")
            return
        slot.generated += 1
        slot.last_token = token
        self.counters["completion_tokens_total"] += 1
        if slot.stream is not None:
            slot.stream._push(TokenEvent(token))
        budget = slot.params.max_tokens or self.max_seq_len
        if slot.generated >= budget or slot.length >= self.max_seq_len:
            self._remove(slot, "length")

    def _remove(self, slot: _Slot, reason: str) -> None:
        """Free the slot; the last running slot moves into its place (slots stay 0..n-1)."""
        index = self._slots.index(slot)
        last = len(self._slots) - 1
        if index != last:
            for c in self.caches:
                c.k[index].copy_(c.k[last])
                c.v[index].copy_(c.v[last])
            self._slots[index] = self._slots[last]
        self._slots.pop()
        self._media_stale = True
        self._finish(slot, reason)

    def _finish(self, slot: _Slot, reason: str) -> None:
        if slot.stream is not None:
            self.latency_s.append(time.monotonic() - slot.submitted)
            slot.stream._push(TokenEvent(None, reason))
