"""tools/serve.py end to end: the real `openai` client against a server this file starts on
127.0.0.1 (a free port) with a small trained checkpoint (the colour model of
_eval_fixture: it names the colour of the one shape in an image).

* greedy answers equal `Generator.generate` token for token (text, count) for text-only,
  one-image, two-image and multi-turn prompts, also under `torchrun --nproc_per_node 2`
  (gloo); 16 concurrent clients get their own answers; streamed chunks join to the answer;
* continuous batching: short requests submitted while a long one runs join its batch and
  finish first (the per-step batch-size trace shows it);
* every bad input gets its status and an OpenAI-style error naming the problem; a client
  killed mid-stream frees its slot; the server is healthy after;
* the chat page in headless Chromium (Debian's package; Playwright drives it).

The checkpoint (conftest's `colour_model`, trained once per session) has its context
widened from 256 to 2048 positions (a copy of params.json; the same weights) so that a long
request (`ignore_eos`, 1500 tokens) runs for seconds on a 2-core CPU, long enough to join,
cancel or time out reliably. One server serves most tests; a
second one (one slot, a queue of one, a 2 s timeout, file:// allowed) the limit tests.

Set SERVING_TEST_CKPT_ROOT=DIR to keep the trained checkpoint between runs (development).
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from _eval_fixture import QUESTION, train_colour_checkpoint
from _helpers import ROOT

openai = pytest.importorskip("openai", reason="pip install openai (the serving tests' client)")

SERVE = ROOT / "tools" / "serve.py"
CONTEXT = 2048
LONG = 1500  # tokens of the long (ignore_eos) requests: seconds of decoding
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
MAIN_FLAGS = ["--max-batch", "16", "--max-queue", "64", "--max-images", "4", "--max-image-pixels", "10000", "--max-body-mb", "1"]
SMALL_FLAGS = ["--max-batch", "1", "--max-queue", "1", "--request-timeout", "2", "--allow-local-files"]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def colour(request, tmp_path_factory):
    """(checkpoint dir with a 2048-position context, the colour world). The trained model is
    conftest's session-wide `colour_model` (or, for development, the one kept in
    $SERVING_TEST_CKPT_ROOT, trained there on first use)."""
    keep = os.environ.get("SERVING_TEST_CKPT_ROOT")
    ckpt, world = train_colour_checkpoint(Path(keep)) if keep else request.getfixturevalue("colour_model")
    wide = tmp_path_factory.mktemp("serving_ckpt")
    for f in Path(ckpt).iterdir():
        if f.name != "params.json":
            (wide / f.name).symlink_to(f.resolve())
    params = json.loads((Path(ckpt) / "params.json").read_text())
    params["max_seq_len"] = CONTEXT
    (wide / "params.json").write_text(json.dumps(params, indent=2))
    return wide, world


@pytest.fixture(scope="module")
def gen(colour):
    from llama_vision import inference

    return inference.setup(str(colour[0]), device="cpu", dtype="fp32")


def _image_path(world, i: int) -> Path:
    return Path(world["root"]) / world["test"][i]["image"]


def data_url(path_or_bytes) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(path) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def reference(gen, messages: list[dict], max_tokens: int, *, ignore_eos: bool = False) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new ids) of Generator.generate for OpenAI-style messages (this
    test's own conversion: image_url parts -> {"type": "image"} + the loaded image)."""
    from llama_vision.data.image_io import load_image
    from llama_vision.tokenizer import ChatFormat

    dialog, images = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            items = []
            for p in content:
                if p["type"] == "text":
                    items.append({"type": "text", "text": p["text"]})
                else:
                    url = p["image_url"]["url"]
                    images.append(load_image(base64.b64decode(url.split(",", 1)[1])))
                    items.append({"type": "image"})
            content = items
        dialog.append({"role": m["role"], "content": content})
    ids = ChatFormat(gen.tokenizer).encode_dialog(dialog)
    new = gen.generate([ids], [images], max_new_tokens=max_tokens, temperature=0.0, stop_tokens=[] if ignore_eos else None)[0]
    return ids, new


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, lines: list[str]):
        self.proc, self.port, self.lines = proc, port, lines
        self.base = f"http://127.0.0.1:{port}"

    def client(self, **kw):
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=kw.pop("timeout", 120), **kw)

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None, timeout: float = 60):
        """-> (status, parsed JSON or text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if isinstance(body, dict):
                body = json.dumps(body).encode()
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            raw = r.read().decode()
            try:
                return r.status, json.loads(raw)
            except json.JSONDecodeError:
                return r.status, raw
        finally:
            conn.close()

    def engine(self) -> dict:
        status, m = self.request("GET", "/v1/engine/trace")
        assert status == 200, m
        return m

    def output(self) -> str:
        return "".join(self.lines[-200:])


def start_server(ckpt: Path, *flags: str, nproc: int = 1, timeout: float = 240) -> Server:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    if nproc > 1:
        env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SERVE)]
    else:
        env.setdefault("OMP_NUM_THREADS", "2")
        cmd = [sys.executable, str(SERVE)]
    cmd += ["--ckpt", str(ckpt), "--host", "127.0.0.1", "--port", "0", "--dtype", "fp32", "--device", "cpu", "--model-name", "colour", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(ROOT),
                            start_new_session=True)
    lines: list[str] = []
    found: list[int] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)/", line)
            if m and not found:
                found.append(int(m.group(1)))

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise AssertionError(f"server did not start ({proc.returncode}):\n{''.join(lines)[-4000:]}")
        time.sleep(0.1)
    server = Server(proc, found[0], lines)
    while True:
        try:
            status, body = server.request("GET", "/health", timeout=5)
            if status == 200 and body.get("status") == "ok":
                return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise AssertionError(f"/health never answered:\n{server.output()}")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server (or torchrun, which passes it on): uvicorn shuts down gracefully,
    the engine after it (and under TP the followers with it); then SIGKILL the group's rest."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (torchrun's workers)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(colour):
    s = start_server(colour[0], *MAIN_FLAGS)
    yield s
    alive = s.proc.poll() is None
    stop_server(s.proc)
    assert alive, f"the server died during the tests:\n{s.output()}"


@pytest.fixture(scope="module")
def small_server(colour):
    s = start_server(colour[0], *SMALL_FLAGS)
    yield s
    stop_server(s.proc)


@pytest.fixture(scope="module")
def prompts(colour, gen):
    """name -> (messages, max_tokens, ignore_eos, prompt ids, reference ids)."""
    _, world = colour
    img0, img1 = _image_path(world, 0), _image_path(world, 1)
    one = [{"role": "user", "content": [image_part(img0), text_part(QUESTION)]}]
    first_ids, first = reference(gen, one, 8)
    cases = {
        "text_only": ([{"role": "system", "content": "You name colours."}, {"role": "user", "content": QUESTION}], 8, False),
        "one_image": (one, 8, False),
        "two_image": ([{"role": "user", "content": [image_part(img0), image_part(img1), text_part(QUESTION)]}], 8, False),
        "multi_turn": (one + [{"role": "assistant", "content": gen.tokenizer.decode(first)},
                              {"role": "user", "content": [image_part(img1), text_part(QUESTION)]}], 8, False),
        # every generated id compared, 48 of them, specials included (skip_special_tokens: false)
        "one_image_48_tokens": (one, 48, True),
    }
    out = {}
    for name, (messages, n, ignore_eos) in cases.items():
        ids, new = reference(gen, messages, n, ignore_eos=ignore_eos)
        out[name] = (messages, n, ignore_eos, ids, new)
    return out


@pytest.fixture(scope="module")
def image_refs(colour, gen):
    """16 test images -> (path, greedy reference answer text)."""
    _, world = colour
    refs = []
    for i in range(16):
        path = _image_path(world, i)
        _, new = reference(gen, [{"role": "user", "content": [image_part(path), text_part(QUESTION)]}], 8)
        refs.append((path, gen.tokenizer.decode(new)))
    # the model really answers (this is no random checkpoint): most references are the truth
    truth = [world["test"][i]["answers"][0] for i in range(16)]
    assert sum(r == t for (_, r), t in zip(refs, truth)) >= 12, (refs, truth)
    return refs


def _ask(client, messages, max_tokens=8, **extra):
    return client.chat.completions.create(model="colour", messages=messages, max_tokens=max_tokens, temperature=0, extra_body=extra or None)


def _expect(gen, case):
    messages, n, ignore_eos, ids, new = case
    text = gen.tokenizer.decode(new)  # specials by name: what skip_special_tokens=false returns
    finish = "length" if len(new) == n else "stop"
    return text, len(new), len(ids), finish


# ----------------------------------------------------------------------------- answers

def test_models_health_and_page(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["colour"]
    status, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["max_batch"] == 16
    status, page = server.request("GET", "/")
    assert status == 200 and "<title>llama_vision chat</title>" in page and "/v1/chat/completions" in page


@pytest.mark.parametrize("name", ["text_only", "one_image", "two_image", "multi_turn", "one_image_48_tokens"])
def test_greedy_answers_equal_generator(server, gen, prompts, name):
    case = prompts[name]
    messages, n, ignore_eos, _, _ = case
    text, n_out, n_in, finish = _expect(gen, case)
    extra = {"ignore_eos": True, "skip_special_tokens": False} if ignore_eos else {}
    r = _ask(server.client(), messages, n, **extra)
    assert r.object == "chat.completion" and r.model == "colour" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert (r.usage.completion_tokens, r.usage.prompt_tokens, r.usage.total_tokens) == (n_out, n_in, n_in + n_out)


def test_streamed_chunks_join_to_the_answer(server, gen, prompts):
    for name in ("one_image", "one_image_48_tokens"):
        messages, n, ignore_eos, _, new = prompts[name]
        extra = {"ignore_eos": True, "skip_special_tokens": False} if ignore_eos else {}
        stream = server.client().chat.completions.create(model="colour", messages=messages, max_tokens=n, temperature=0, stream=True,
                                                         stream_options={"include_usage": True}, extra_body=extra or None)
        chunks = list(stream)
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert "".join(pieces) == gen.tokenizer.decode(new)
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == ["length" if len(new) == n else "stop"]
        assert chunks[-1].usage.completion_tokens == len(new) and not chunks[-1].choices
        if ignore_eos:
            assert len(pieces) > 10  # really streamed, piece by piece


def test_stop_strings_and_seeded_sampling(server, prompts):
    client = server.client()
    messages = prompts["one_image"][0]
    expected = _ask(client, messages).choices[0].message.content
    # the model continues with <|eot_id|> under ignore_eos: "stop" cuts before it
    r = _ask(client, messages, 40, ignore_eos=True, skip_special_tokens=False, stop=["<|"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="colour", messages=messages, max_tokens=40, temperature=0, stream=True, stop="<|",
                                            extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    # skip_special_tokens (the default) leaves the specials out of the text
    r = _ask(client, messages, 40, ignore_eos=True)
    assert r.choices[0].message.content.startswith(expected) and "<|" not in r.choices[0].message.content
    assert r.usage.completion_tokens == 40
    # seeded sampling is reproducible
    texts = [client.chat.completions.create(model="colour", messages=messages, max_tokens=20, temperature=1.5, top_p=0.95, seed=7,
                                            extra_body={"ignore_eos": True, "skip_special_tokens": False}).choices[0].message.content
             for _ in range(2)]
    assert texts[0] == texts[1]


def test_sixteen_concurrent_clients(server, image_refs):
    client = server.client()

    def one(ref):
        path, _ = ref
        return _ask(client, [{"role": "user", "content": [image_part(path), text_part(QUESTION)]}]).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, image_refs))
    assert answers == [r for _, r in image_refs]


def test_continuous_batching(server, image_refs):
    """Short requests submitted while a long one decodes join its batch and finish first."""
    client = server.client()
    done: dict[str, float] = {}
    started = threading.Event()

    def long_request():
        stream = client.chat.completions.create(model="colour", messages=[{"role": "user", "content": QUESTION}], max_tokens=LONG,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
        n = 0
        for chunk in stream:
            n += 1
            started.set()
        done["long"] = time.monotonic()
        return n

    def short(i):
        path, ref = image_refs[i]
        r = _ask(client, [{"role": "user", "content": [image_part(path), text_part(QUESTION)]}])
        done[f"short{i}"] = time.monotonic()
        return r.choices[0].message.content == ref

    with ThreadPoolExecutor(8) as pool:
        long_future = pool.submit(long_request)
        assert started.wait(60)
        time.sleep(0.2)
        shorts = [pool.submit(short, i) for i in range(6)]
        assert all(f.result() for f in shorts)
        assert long_future.result() > 0
    assert all(done[f"short{i}"] < done["long"] for i in range(6)), done
    # The long request's decode steps are the last LONG - 1 of the trace: alone, then with
    # the short ones (their prefills joined between two of its steps), then alone again.
    trace = server.engine()["batch_size_trace"]
    window = trace[-(LONG - 1):]
    joined = [i for i, b in enumerate(window) if b >= 2]
    assert window[0] == 1 and window[-1] == 1 and joined and joined[0] > 0, window[:50]
    assert max(window) >= 2 and joined[-1] < len(window) - 1
    status, text = server.request("GET", "/metrics")
    assert status == 200
    buckets = dict(re.findall(r'llama_vision_decode_batch_size_bucket\{le="([^"]+)"\} (\d+)', text))
    assert int(buckets["+Inf"]) > int(buckets["1"]) > 0  # steps with more than one row, in the histogram too


def test_metrics(server):
    status, text = server.request("GET", "/metrics")
    assert status == 200 and isinstance(text, str)
    for name in ("llama_vision_requests_total", "llama_vision_prompt_tokens_total", "llama_vision_completion_tokens_total",
                 "llama_vision_queue_depth", "llama_vision_active_slots", "llama_vision_batch_size",
                 'llama_vision_request_latency_seconds_bucket{le="+Inf"}', "llama_vision_time_to_first_token_seconds_count",
                 "llama_vision_decode_batch_size_sum", 'llama_vision_http_responses_total{code="200"}'):
        assert name in text, name
    value = lambda n: float(re.search(rf"^{n} (\S+)$", text, re.M).group(1))  # noqa: E731
    assert value("llama_vision_requests_total") > 0 and value("llama_vision_completion_tokens_total") > 0
    assert value("llama_vision_request_latency_seconds_count") > 0
    status, m = server.request("GET", "/metrics?format=json")
    assert status == 200 and isinstance(m["batch_size_trace"], list) and m["requests_total"] > 0


# ----------------------------------------------------------------------------- bad input

def _bad(server, body, status, *needles, raw: bytes | None = None, headers=None):
    got, err = server.request("POST", "/v1/chat/completions", raw if raw is not None else body, headers=headers)
    assert got == status, (got, err)
    assert set(err["error"]) == {"message", "type", "param", "code"}, err
    message = err["error"]["message"]
    for needle in needles:
        assert needle.lower() in message.lower(), (needle, message)
    return err["error"]


def _user(*parts):
    return {"model": "colour", "max_tokens": 4, "messages": [{"role": "user", "content": [*parts, text_part(QUESTION)]}]}


def _url(url):
    return {"type": "image_url", "image_url": {"url": url}}


def test_bad_inputs(server, colour, image_refs):
    _, world = colour
    img = _image_path(world, 0)
    _bad(server, _user(_url("data:image/png;base64,@@not base64@@")), 400, "base64")
    _bad(server, _user(_url("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB!")), 400, "base64")
    _bad(server, _user(_url("data:image/png," + "abc")), 400, "not base64")
    _bad(server, _user(_url("data:image/png;base64," + base64.b64encode(b"hello, this is text").decode())), 400, "not an image")
    _bad(server, _user(_url("data:text/plain;base64," + base64.b64encode(b"hi").decode())), 400, "not an image")
    png = img.read_bytes()
    _bad(server, _user(_url("data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode())), 400, "not an image")
    e = _bad(server, _user(_url("https://example.com/cat.png")), 400, "remote URLs are not fetched")
    assert e["param"] == "messages[0].content[0].image_url.url"
    _bad(server, _user(_url("http://127.0.0.1:1/x.png")), 400, "remote URLs are not fetched")
    _bad(server, _user(_url(f"file://{img}")), 400, "file://", "--allow-local-files")
    _bad(server, _user(*[image_part(img)] * 5), 400, "too many images", "4")
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (200, 200), (200, 30, 30)).save(buf, format="PNG")
    _bad(server, _user(_url(data_url(buf.getvalue()))), 413, "200x200", "pixels")
    long_text = " ".join(["red"] * (CONTEXT + 10))
    e = _bad(server, {"model": "colour", "messages": [{"role": "user", "content": long_text}]}, 400, "prompt longer than the context", str(CONTEXT))
    assert e["code"] == "context_length_exceeded"
    _bad(server, {**_user(image_part(img)), "max_tokens": CONTEXT}, 400, "longer than the context", "max_tokens")
    _bad(server, None, 413, "too large", raw=json.dumps({"messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode())
    _bad(server, None, 400, "not valid JSON", raw=b'{"messages": [')
    _bad(server, None, 422, "JSON object", raw=b'["a list"]')
    _bad(server, {"model": "colour"}, 422, "messages")
    _bad(server, {"model": "colour", "messages": []}, 422, "messages")
    _bad(server, {"model": "colour", "messages": [{"role": "wizard", "content": "hi"}]}, 422, "role", "wizard")
    _bad(server, {"model": "colour", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 422, "audio")
    _bad(server, {"model": "colour", "messages": [{"role": "user", "content": 5}]}, 422, "content")
    _bad(server, {**_user(), "temperature": "hot"}, 422, "temperature")
    _bad(server, {**_user(), "temperature": 7}, 422, "temperature")
    _bad(server, {**_user(), "max_tokens": 0}, 422, "max_tokens")
    _bad(server, {**_user(), "top_p": 0}, 422, "top_p")
    _bad(server, {**_user(), "stop": [1, 2]}, 422, "stop")
    _bad(server, {**_user(), "n": 3}, 400, "n=1")
    _bad(server, {**_user(), "model": "gpt-9"}, 404, "gpt-9", "does not exist")
    _bad(server, {"model": "colour", "messages": [{"role": "assistant", "content": [image_part(img)]}, {"role": "user", "content": "x"}]},
         400, "only accepted in user messages")
    # the openai client maps them to its exceptions
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="not an image"):
        _ask(client, [{"role": "user", "content": [_url("data:image/png;base64," + base64.b64encode(b"nope").decode())]}])
    with pytest.raises(openai.BadRequestError, match="base64"):
        client.chat.completions.create(model="colour", stream=True, messages=[{"role": "user", "content": [_url("data:image/png;base64,%%%")]}])
    # unknown routes / methods are JSON errors too
    status, err = server.request("GET", "/v1/nothing")
    assert status == 404 and "error" in err
    status, err = server.request("GET", "/v1/chat/completions")
    assert status == 405 and "error" in err
    # ... and the server goes on answering, correctly
    assert _ask(client, [{"role": "user", "content": [image_part(image_refs[0][0]), text_part(QUESTION)]}]).choices[0].message.content == image_refs[0][1]


def test_client_killed_mid_stream_frees_its_slot(server, image_refs):
    before = server.engine()
    script = (
        "import sys, openai\n"
        "c = openai.OpenAI(base_url=sys.argv[1], api_key='x', max_retries=0)\n"
        "s = c.chat.completions.create(model='colour', messages=[{'role': 'user', 'content': 'What colour is the shape?'}],"
        " max_tokens=int(sys.argv[2]), temperature=0, stream=True, extra_body={'ignore_eos': True, 'skip_special_tokens': False})\n"
        "for chunk in s:\n"
        "    print('chunk', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, f"{server.base}/v1", str(LONG)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(5):
            line = proc.stdout.readline()
            assert line.startswith("chunk"), (line, proc.wait(), proc.stderr.read())
        assert server.engine()["active_slots"] == 1
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while (m := server.engine())["active_slots"] or m["queue_depth"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.02)
    # freed long before it would have finished
    assert m["completion_tokens_total"] - before["completion_tokens_total"] < LONG // 2, (m, before)
    # the same for a client that goes away while waiting for a non-streamed answer
    import socket

    body = json.dumps({"model": "colour", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": LONG, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 10
    while not server.engine()["active_slots"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    before = server.engine()
    sock.close()
    while (m := server.engine())["active_slots"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.02)
    assert m["completion_tokens_total"] - before["completion_tokens_total"] < LONG // 2, (m, before)
    client = server.client()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda ref: _ask(client, [{"role": "user", "content": [image_part(ref[0]), text_part(QUESTION)]}]).choices[0].message.content,
                                image_refs))
    assert answers == [r for _, r in image_refs]
    status, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["active_slots"] == 0
    status, text = server.request("GET", "/metrics")
    assert float(re.search(r"^llama_vision_client_disconnects_total (\S+)$", text, re.M).group(1)) >= 2


def test_queue_full_timeout_and_local_files(small_server, colour, image_refs):
    """One slot, a queue of one: the third concurrent request gets 429; a request over the
    2 s timeout gets 504; file:// URLs work when allowed."""
    _, world = colour
    client = small_server.client()
    long_messages = [{"role": "user", "content": QUESTION}]
    started = threading.Event()
    results = {}

    def long_stream():
        try:
            for _ in client.chat.completions.create(model="colour", messages=long_messages, max_tokens=LONG, temperature=0, stream=True,
                                                    extra_body={"ignore_eos": True}):
                started.set()
        except openai.APIError as e:  # the 2 s timeout ends it
            results["long"] = e

    def queued():
        try:
            results["queued"] = _ask(client, [{"role": "user", "content": [image_part(image_refs[0][0]), text_part(QUESTION)]}])
        except openai.APIError as e:
            results["queued"] = e

    t_long = threading.Thread(target=long_stream)
    t_long.start()
    assert started.wait(60)
    time.sleep(0.5)  # the queued request's own 2 s run from its arrival: it must outlive the long one's
    t_queued = threading.Thread(target=queued)
    t_queued.start()
    deadline = time.monotonic() + 10
    while small_server.engine()["queue_depth"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    status, err = small_server.request("POST", "/v1/chat/completions", _user())
    assert status == 429 and "queue is full" in err["error"]["message"], err
    with pytest.raises(openai.RateLimitError):
        _ask(client, [{"role": "user", "content": QUESTION}])
    t_long.join(60)
    t_queued.join(60)
    assert "timed out" in str(results["long"]), results  # streamed: an error event ends the stream
    assert not isinstance(results["queued"], Exception) and results["queued"].choices[0].message.content == image_refs[0][1], results
    # non-streamed: a 504 naming the timeout
    t0 = time.monotonic()
    status, err = small_server.request("POST", "/v1/chat/completions",
                                       {"model": "colour", "messages": long_messages, "max_tokens": LONG, "ignore_eos": True})
    assert status == 504 and "timed out" in err["error"]["message"] and "2" in err["error"]["message"], err
    assert 1.5 < time.monotonic() - t0 < 10
    # file:// is read when --allow-local-files is given
    path, ref = image_refs[3]
    r = _ask(client, [{"role": "user", "content": [_url(f"file://{path}"), text_part(QUESTION)]}])
    assert r.choices[0].message.content == ref
    _bad(small_server, _user(_url(f"file://{path}.missing")), 400, "not found")
    status, health = small_server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok"


# ----------------------------------------------------------------------------- TP and browser

def test_tensor_parallel_server_gives_the_same_answers(colour, gen, prompts, image_refs):
    s = start_server(colour[0], "--max-batch", "4", nproc=2)
    try:
        client = s.client()
        for name, case in prompts.items():
            messages, n, ignore_eos, _, _ = case
            text, n_out, n_in, finish = _expect(gen, case)
            extra = {"ignore_eos": True, "skip_special_tokens": False} if ignore_eos else {}
            r = _ask(client, messages, n, **extra)
            assert (r.choices[0].message.content, r.usage.completion_tokens, r.usage.prompt_tokens) == (text, n_out, n_in), name
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda ref: _ask(client, [{"role": "user", "content": [image_part(ref[0]), text_part(QUESTION)]}]).choices[0].message.content,
                                    image_refs[:6]))
        assert answers == [r for _, r in image_refs[:6]]
        assert s.proc.poll() is None
    finally:
        out = s.output()
        stop_server(s.proc)
    assert out.count("serving colour on") == 1, out  # only rank 0 serves


def test_chat_page_in_headless_chromium(server, gen, image_refs, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")
    exe = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    (path, ref), (path2, _) = image_refs[0], image_refs[5]
    first = [{"role": "user", "content": [image_part(path), text_part(QUESTION)]}]
    dialog = first + [{"role": "assistant", "content": ref}, {"role": "user", "content": [image_part(path2), text_part(QUESTION)]}]
    ref2 = gen.tokenizer.decode(reference(gen, dialog, 64)[1])  # what the page's second turn must get
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page()
            page.goto(server.base + "/")
            sync_api.expect(page.locator("#model")).to_contain_text("colour")
            page.set_input_files("#file-input", str(path))
            sync_api.expect(page.locator("#pending img")).to_have_count(1)
            page.fill("#prompt", QUESTION)
            page.click("#send")
            answer = page.locator('.msg.assistant[data-done="true"] .text').nth(0)
            sync_api.expect(answer).to_have_text(ref, timeout=60_000)
            sync_api.expect(page.locator("#status")).to_contain_text("stop")
            # a second turn, about another image, in the same conversation
            page.set_input_files("#file-input", str(path2))
            page.fill("#prompt", QUESTION)
            page.keyboard.press("Enter")
            sync_api.expect(page.locator('.msg.assistant[data-done="true"] .text').nth(1)).to_have_text(ref2, timeout=60_000)
            assert page.locator(".msg.user img").count() == 2 and page.locator(".msg.error").count() == 0
            shot = tmp_path / "chat_page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 1000
            print(f"chat page screenshot: {shot}")
        finally:
            browser.close()


# ----------------------------------------------------------------------------- pure functions

class _ByteTokenizer:
    """ids are bytes (0..255); decode as UTF-8 with U+FFFD for partial characters."""

    special_tokens = {"<|eot_id|>": 300}
    n_words = 256

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_text_stream_holds_partial_characters_and_stop_strings():
    from llama_vision.serving.openai_api import TextStream

    tok = _ByteTokenizer()
    s = TextStream(tok)
    out = [s.push(b) for b in "hé€!".encode()]
    assert out == ["h", "", "é", "", "", "€", "!"] and s.finish() == "" and s.text == "hé€!"
    s = TextStream(tok, stop=["END", "zz"])
    out = [s.push(b) for b in b"abEN"]
    assert "".join(out) == "ab" and not s.stopped  # "EN" held back: it may become END
    assert s.push(ord("x")) == "ENx"
    assert s.push(ord("E")) == "" and s.push(ord("N")) == "" and s.push(ord("D")) == ""
    assert s.stopped and s.text == "abENx" and s.push(ord("q")) == "" and s.finish() == ""
    s = TextStream(tok, stop=["END"])
    for b in b"abE":
        s.push(b)
    assert s.finish() == "E" and s.text == "abE"  # held-back text comes out at the end


def test_parse_chat_request_normalises_messages():
    from llama_vision.serving.openai_api import APIError, parse_chat_request

    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png, format="PNG")
    url = data_url(png.getvalue())
    req = parse_chat_request({
        "model": "m", "stream": True, "stop": "x", "max_tokens": 5, "temperature": 0, "seed": 3, "ignore_eos": True,
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [_url(url), text_part("q"), _url(url)]},
                     {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]})
    assert req.messages == [{"role": "system", "content": [{"type": "text", "text": "s"}]},
                            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}, {"type": "image"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
                            {"role": "user", "content": [{"type": "text", "text": "b"}]}]
    assert req.images == [png.getvalue()] * 2 and req.stream and req.stop == ["x"]
    assert req.sampling == {"max_tokens": 5, "temperature": 0.0, "top_p": 1.0, "seed": 3, "stop_token_ids": []}
    with pytest.raises(APIError) as e:
        parse_chat_request({"messages": [{"role": "user", "content": [_url(url)] * 3}]}, max_images=2)
    assert e.value.status == 400 and "too many images" in e.value.message
