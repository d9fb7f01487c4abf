"""The HTTP layer: an OpenAI-compatible FastAPI app over an :class:`~llama_vision.serving.engine.Engine`.

    app = build_app(engine, "llama-vision", max_body_bytes=32 << 20, allow_local_files=False)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``POST /v1/chat/completions`` (JSON, or server-sent events with ``stream: true``),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text; ``?format=json``:
the engine's raw metrics, batch-size trace included), ``GET /v1/engine/trace`` (the same
JSON), ``GET /`` (the chat page). Every error is OpenAI's ``{"error": {...}}`` object with
its HTTP status; a request's failure is its own (the server keeps serving); a client that
disconnects has its request cancelled, which frees its batch slot at the next step.
"""
from __future__ import annotations

import asyncio
import bisect
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import Request

from .openai_api import (
    APIError,
    ChatRequest,
    TextStream,
    build_prompt,
    decode,
    error_body,
    parse_chat_request,
    resolve_max_tokens,
)

log = logging.getLogger("llama_vision.serving")

STATIC_DIR = Path(__file__).resolve().parent / "static"
CHAT_PAGE = STATIC_DIR / "chat.html"

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PREFIX = "llama_vision"


# ----------------------------------------------------------------------------- metrics

class Histogram:
    """A cumulative Prometheus histogram (thread-safe)."""

    def __init__(self, buckets):
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def render(self, name: str, help_text: str) -> list[str]:
        with self._lock:
            counts, total, n = list(self.counts), self.sum, self.count
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        acc = 0
        for b, c in zip(self.buckets, counts):
            acc += c
            lines.append(f'{name}_bucket{{le="{_fmt(b)}"}} {acc}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {n}')
        lines += [f"{name}_sum {_fmt(total)}", f"{name}_count {n}"]
        return lines


def _fmt(v: float) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 2**53):
        return str(int(v))
    return repr(float(v)) if v == v else "NaN"


# engine.metrics() key -> (metric name, type, help)
ENGINE_COUNTERS = {
    "requests_total": ("requests_total", "Requests the engine accepted."),
    "requests_failed": ("requests_failed_total", "Requests that ended with an error."),
    "prompt_tokens_total": ("prompt_tokens_total", "Prompt tokens of accepted requests (tokens in)."),
    "completion_tokens_total": ("completion_tokens_total", "Generated tokens (tokens out)."),
    "vision_encoder_runs": ("vision_encoder_runs_total", "Images sent through the vision encoder."),
    "image_cache_hits": ("image_cache_hits_total", "Images served from the image cache."),
    "decode_steps_total": ("decode_steps_total", "Batched decode steps run."),
}
ENGINE_GAUGES = {
    "queue_depth": ("queue_depth", "Requests waiting for a batch slot."),
    "active_slots": ("active_slots", "Requests in the running batch."),
}
ENGINE_LISTS = ("batch_size_trace", "latency_s", "ttft_s")


class ServerMetrics:
    """What the HTTP layer measures itself (end-to-end latency and time to first token as
    the client sees them, responses by status) + the engine's batch-size histogram."""

    def __init__(self, max_batch: int):
        self.latency = Histogram(LATENCY_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.batch = Histogram(range(1, max(1, max_batch) + 1))
        self.responses: dict[str, int] = {}
        self.disconnects = 0
        self._lock = threading.Lock()
        self._steps_seen = 0
        self._trace_seen: list[int] | None = None

    def count_response(self, status: int) -> None:
        with self._lock:
            self.responses[str(status)] = self.responses.get(str(status), 0) + 1

    def update_batch(self, m: dict) -> None:
        """Feed the batch sizes of decode steps not seen before into the histogram. With the
        engine's ``decode_steps_total`` counter exactly; without it, by matching the end of
        the last trace seen (steps that scrolled out of the engine's window between two
        scrapes are missed)."""
        trace = list(m.get("batch_size_trace") or [])
        with self._lock:
            if "decode_steps_total" in m:
                total = int(m["decode_steps_total"])
                new = trace[len(trace) - min(len(trace), max(0, total - self._steps_seen)):]
                self._steps_seen = total
            else:
                new = _new_tail(self._trace_seen or [], trace)
                self._trace_seen = trace
        for b in new:
            self.batch.observe(b)


def _new_tail(old: list[int], new: list[int]) -> list[int]:
    """The entries of ``new`` appended since ``old`` was read: exact while the engine's
    window has not scrolled (old is a prefix of new); after that, past the last place
    where old's final entries reappear (a heuristic; an engine with ``decode_steps_total``
    needs none)."""
    if not old:
        return new
    if len(new) >= len(old) and new[: len(old)] == old:
        return new[len(old):]
    marker = old[-64:]
    for start in range(len(new) - len(marker), -1, -1):
        if new[start:start + len(marker)] == marker:
            return new[start + len(marker):]
    return new


def render_prometheus(engine_metrics: dict, server: ServerMetrics, model_name: str, max_batch: int) -> str:
    m = engine_metrics
    lines: list[str] = [f"# HELP {PREFIX}_info The served model.", f"# TYPE {PREFIX}_info gauge",
                        f'{PREFIX}_info{{model="{model_name}"}} 1']
    for key, (name, help_text) in ENGINE_COUNTERS.items():
        if key in m:
            lines += [f"# HELP {PREFIX}_{name} {help_text}", f"# TYPE {PREFIX}_{name} counter", f"{PREFIX}_{name} {_fmt(m[key])}"]
    for key, (name, help_text) in ENGINE_GAUGES.items():
        if key in m:
            lines += [f"# HELP {PREFIX}_{name} {help_text}", f"# TYPE {PREFIX}_{name} gauge", f"{PREFIX}_{name} {_fmt(m[key])}"]
    trace = list(m.get("batch_size_trace") or [])
    lines += [f"# HELP {PREFIX}_max_batch Batch slots.", f"# TYPE {PREFIX}_max_batch gauge", f"{PREFIX}_max_batch {max_batch}",
              f"# HELP {PREFIX}_batch_size Rows in the last decode step.", f"# TYPE {PREFIX}_batch_size gauge",
              f"{PREFIX}_batch_size {trace[-1] if trace else 0}"]
    server.update_batch(m)
    lines += server.batch.render(f"{PREFIX}_decode_batch_size", "Rows per decode step.")
    lines += server.latency.render(f"{PREFIX}_request_latency_seconds", "End-to-end chat completion latency (request received -> last token).")
    lines += server.ttft.render(f"{PREFIX}_time_to_first_token_seconds", "Request received -> first generated token.")
    lines += [f"# HELP {PREFIX}_http_responses_total Chat completion responses by HTTP status.",
              f"# TYPE {PREFIX}_http_responses_total counter"]
    for code, n in sorted(server.responses.items()):
        lines.append(f'{PREFIX}_http_responses_total{{code="{code}"}} {n}')
    lines += [f"# HELP {PREFIX}_client_disconnects_total Requests cancelled because the client went away.",
              f"# TYPE {PREFIX}_client_disconnects_total counter", f"{PREFIX}_client_disconnects_total {server.disconnects}"]
    # Anything else numeric the engine reports, as a gauge (forward compatible).
    known = set(ENGINE_COUNTERS) | set(ENGINE_GAUGES) | set(ENGINE_LISTS)
    for key, value in sorted(m.items()):
        if key not in known and isinstance(value, (int, float)) and not isinstance(value, bool):
            name = f"{PREFIX}_engine_{''.join(c if c.isalnum() else '_' for c in key)}"
            lines += [f"# TYPE {name} gauge", f"{name} {_fmt(value)}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- responses

def _engine_api():
    from . import engine as engine_module

    return engine_module


def build_app(engine, model_name: str = "llama-vision", *, max_body_bytes: int = 32 << 20, allow_local_files: bool = False,
              default_max_tokens: int | None = None, max_images: int | None = None, max_image_pixels: int | None = None,
              chat_page: str | Path | None = None):
    """The FastAPI app. ``engine``: a started :class:`Engine` (its ``tokenizer``,
    ``max_seq_len``, ``max_batch``, ``submit``, ``metrics``). Limits: ``max_body_bytes``
    (413), ``max_images`` per request and ``max_image_pixels`` per image (default: the
    engine's), ``default_max_tokens`` (a request without ``max_tokens`` gets what the
    context leaves, capped at this)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    eng = _engine_api()
    tokenizer = engine.tokenizer
    adapters = tuple(getattr(engine, "adapters", ()))  # LoRA adaptors, served under their names
    max_images = getattr(engine, "max_images", 8) if max_images is None else max_images
    max_image_pixels = getattr(engine, "max_image_pixels", None) if max_image_pixels is None else max_image_pixels
    max_batch = int(getattr(engine, "max_batch", 1))
    video_token = getattr(engine, "video_token", None)  # a LLaVA model's projector video placeholder, or None
    page = Path(chat_page) if chat_page is not None else CHAT_PAGE
    server = ServerMetrics(max_batch)
    created_at = int(time.time())

    app = FastAPI(title="llama_vision", version="0.1.0", docs_url="/docs", redoc_url=None)
    app.state.engine = engine
    app.state.server_metrics = server

    def error(exc: APIError) -> JSONResponse:
        server.count_response(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_exc(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "not_found_error" if exc.status_code == 404 else "invalid_request_error"),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        where = ".".join(str(p) for p in errs[0].get("loc", ())) if errs else None
        msg = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errs) or "invalid request"
        return JSONResponse(error_body(msg, "invalid_request_error", where, "invalid_value"), status_code=422)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}: {exc}", "server_error"), status_code=500)

    # ------------------------------------------------------------------ simple routes
    @app.get("/health")
    async def health():
        ok = _engine_alive(engine)
        m = _safe_metrics(engine)
        body = {"status": "ok" if ok else "unhealthy", "model": model_name, "queue_depth": m.get("queue_depth"),
                "active_slots": m.get("active_slots"), "max_batch": max_batch}
        return JSONResponse(body, status_code=200 if ok else 503)

    def model_card(model_id: str) -> dict:
        card = {"id": model_id, "object": "model", "created": created_at, "owned_by": "llama_vision",
                "max_model_len": int(engine.max_seq_len)}
        if model_id != model_name:  # a LoRA adaptor on the served model (vLLM's fields)
            card.update(root=model_id, parent=model_name)
        return card

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(m) for m in (model_name, *adapters)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in (model_name, *adapters):
            served = ", ".join(repr(m) for m in (model_name, *adapters))
            return error(APIError(404, f"the model {model_id!r} does not exist; this server serves {served}", param="model", code="model_not_found"))
        return model_card(model_id)

    @app.get("/metrics")
    async def metrics(format: str = "prometheus"):
        m = _safe_metrics(engine)
        if format == "json":
            return JSONResponse(_jsonable(m))
        return PlainTextResponse(render_prometheus(m, server, model_name, max_batch), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/engine/trace")
    async def trace():
        return JSONResponse(_jsonable(_safe_metrics(engine)))

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page.read_text(encoding="utf-8"))

    # ------------------------------------------------------------------ chat completions
    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise APIError(400, f"bad Content-Length header {length!r}") from None
            if n > max_body_bytes:
                raise APIError(413, f"request body too large: {n} bytes, the limit is {max_body_bytes} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"request body too large: over the limit of {max_body_bytes} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def submit(req: ChatRequest, prompt_ids: list[int], loop) -> Any:
        max_tokens = resolve_max_tokens(req, len(prompt_ids), int(engine.max_seq_len), default_max_tokens)
        s = req.sampling
        params = eng.SamplingParams(max_tokens=max_tokens, temperature=s["temperature"], top_p=s["top_p"], seed=s["seed"],
                                    stop_token_ids=s.get("stop_token_ids"))
        greq = eng.GenerationRequest(prompt_ids=prompt_ids, images=list(req.images), params=params, request_id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
                                     adapter=req.model if req.model in adapters else None, videos=list(req.videos))
        try:
            return engine.submit(greq, loop=loop)
        except eng.QueueFull as e:
            raise APIError(429, f"the server is busy: the request queue is full ({e or 'try again later'})", type="rate_limit_error", code="queue_full") from None
        except eng.RequestRejected as e:
            status = int(getattr(e, "status", 400) or 400)
            raise APIError(status, str(e), code=getattr(e, "code", None) or "request_rejected") from None

    async def watch_disconnect(request: Request, stream) -> None:
        """Non-streamed requests: cancel generation when the client goes away."""
        try:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    server.disconnects += 1
                    stream.cancel()
                    return
        except asyncio.CancelledError:
            return
        except Exception:  # the transport's own problem; the request goes on
            return

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.monotonic()
        try:
            raw = await read_body(request)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
            req = await run_in_threadpool(parse_chat_request, body, allow_local_files=allow_local_files, max_images=max_images,
                                          max_image_pixels=max_image_pixels, model_name=model_name, adapters=adapters)
            try:
                prompt_ids = await run_in_threadpool(build_prompt, tokenizer, req.messages, video_token)
            except ValueError as e:
                raise APIError(400, f"cannot format the messages: {e}", param="messages") from None
            # The engine validates (decodes) the images again: off the event loop.
            stream = await run_in_threadpool(submit, req, prompt_ids, asyncio.get_running_loop())
        except APIError as e:
            return error(e)
        name = req.model or model_name
        if req.stream:
            # The generator's `finally` cancels an unfinished stream; the background task is a
            # second guarantee (Starlette runs it after the response, disconnected or not).
            return StreamingResponse(sse(stream, req, name, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(stream.cancel))
        watcher = asyncio.create_task(watch_disconnect(request, stream))
        try:
            result = await collect(stream, req, t0)
        finally:
            watcher.cancel()
        if isinstance(result, APIError):
            return error(result)
        text, finish, n_out = result
        prompt_n = int(getattr(stream, "prompt_tokens", 0) or len(prompt_ids))
        server.count_response(200)
        return JSONResponse({
            "id": stream.request_id, "object": "chat.completion", "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_n, "completion_tokens": n_out, "total_tokens": prompt_n + n_out},
        })

    def final_error(ev, stream) -> APIError:
        reason = ev.finish_reason
        if reason == "timeout":
            limit = getattr(engine, "request_timeout_s", None)
            after = f" after {limit:g} s" if isinstance(limit, (int, float)) else ""
            return APIError(504, ev.error or f"the request timed out{after} (the server's per-request timeout)", code="timeout")
        if reason == "cancelled":
            return APIError(503, ev.error or "the request was cancelled", code="cancelled", type="server_error")
        return APIError(500, f"generation failed: {ev.error or 'engine error'}", code="generation_error", type="server_error")

    class Outcome:
        """How a stream ended: finish ("stop" / "length") or error (an APIError); n_out tokens."""

        finish: str | None = None
        error: APIError | None = None
        n_out: int = 0

    async def generated(stream, text_stream: TextStream, t0: float, outcome: Outcome):
        """The stream's new text, piece by piece (for both response kinds); how it ended
        goes into `outcome`. A stop string cancels the stream (its slot is freed)."""
        async for ev in stream:
            if ev.token_id is not None:
                if outcome.n_out == 0:
                    server.ttft.observe(time.monotonic() - t0)
                outcome.n_out += 1
                delta = text_stream.push(ev.token_id)
                if delta:
                    yield delta
                if text_stream.stopped:
                    stream.cancel()
                    outcome.finish = "stop"
                    return
                continue
            if ev.finish_reason in ("stop", "length"):
                outcome.finish = ev.finish_reason
            else:
                outcome.error = final_error(ev, stream)
            return

    async def collect(stream, req: ChatRequest, t0: float):
        text_stream = TextStream(tokenizer, req.stop, req.skip_special_tokens)
        outcome = Outcome()
        try:
            async for _ in generated(stream, text_stream, t0, outcome):
                pass
        except Exception as e:  # the engine's stream broke: this request's problem only
            log.exception("request %s failed", getattr(stream, "request_id", "?"))
            stream.cancel()
            return APIError(500, f"generation failed: {type(e).__name__}: {e}", code="generation_error", type="server_error")
        if outcome.error is not None:
            return outcome.error
        server.latency.observe(time.monotonic() - t0)
        text = text_stream.text if text_stream.stopped else decode(tokenizer, text_stream.ids, text_stream.skip)
        return text, outcome.finish or "stop", outcome.n_out

    async def sse(stream, req: ChatRequest, name: str, t0: float):
        created = int(time.time())
        rid = stream.request_id

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        text_stream = TextStream(tokenizer, req.stop, req.skip_special_tokens)
        outcome = Outcome()
        finish, done = None, False
        status = 200
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for delta in generated(stream, text_stream, t0, outcome):
                yield chunk({"content": delta})
            finish, n_out = outcome.finish, outcome.n_out
            if outcome.error is not None:
                status = outcome.error.status
                yield f"data: {json.dumps(outcome.error.body())}\n\n"
            if finish is not None:
                tail = text_stream.finish()
                if tail:
                    yield chunk({"content": tail})
                yield chunk({}, finish)
                server.latency.observe(time.monotonic() - t0)
                if req.include_usage:
                    prompt_n = int(getattr(stream, "prompt_tokens", 0) or 0)
                    usage = {"prompt_tokens": prompt_n, "completion_tokens": n_out, "total_tokens": prompt_n + n_out}
                    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [], "usage": usage}
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
            done = True
        except asyncio.CancelledError:  # the client went away (Starlette cancels the response)
            server.disconnects += 1
            status = 499
            raise
        except Exception as e:
            log.exception("stream %s failed", rid)
            status = 500
            yield f"data: {json.dumps(error_body(f'generation failed: {type(e).__name__}: {e}', 'server_error'))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not done or finish is None:
                stream.cancel()
            server.count_response(status)

    return app


def _engine_alive(engine) -> bool:
    """The engine's own ``is_alive()`` when it has one, else its scheduler thread's state."""
    alive = getattr(engine, "is_alive", None)
    if callable(alive):
        return bool(alive())
    thread = getattr(engine, "_thread", None)
    return thread is None or thread.is_alive()


def _safe_metrics(engine) -> dict:
    try:
        return dict(engine.metrics())
    except Exception as e:  # metrics must never take the endpoint down
        log.warning("engine.metrics() failed: %s", e)
        return {}


def _jsonable(m: dict) -> dict:
    out = {}
    for k, v in m.items():
        if isinstance(v, (list, tuple)):
            v = list(v)
        try:
            json.dumps(v)
        except TypeError:
            v = str(v)
        out[k] = v
    return out
