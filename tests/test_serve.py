"""`nemodiff serve` as a real subprocess on 127.0.0.1 (embedded model, float32), driven by the official `openai`
client: greedy text equals offline generation in every mode, streams concatenate to the non-streamed text, 32
concurrent streaming clients in mixed modes, a client that disconnects mid-stream frees its slot, bad requests
are 400s naming the field (and the server keeps serving), --api-key (401); in process, over a stand-in
engine: engine errors as 400 / 429 / 500, stop strings held back, the metrics format."""

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

from nemodiff_jax.embedded import ASSETS  # noqa: E402

MODES = ("ar", "diffusion", "linear_spec")
PROMPTS = [
    "HAMLET:",
    "ROMEO:\nBut soft, what light",
    "KING HENRY:\nOnce more unto the breach,",
    "Of Man's first disobedience,",
    "To be, or not to be,",
    "JULIET:\nO Romeo, Romeo!",
    "First Citizen:\nBefore we proceed",
    "MACBETH:\nIs this a dagger",
]
CHAT = [{"role": "user", "content": "Hail!"}]
N = 16  # max_tokens everywhere (one compiled shape per mode, on both sides)
MODEL = "nemodiff-embedded"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *extra):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nemodiff_jax.cli", "serve", "--port", str(self.port), "--dtype", "float32",
             "--log-level", "warning", *extra], stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, timeout=180.0):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nemodiff serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"nemodiff serve did not come up in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()

    def client(self, key="unused", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.split(" ")[0] == name:
                    return float(line.split()[-1])
        raise KeyError(name)

    def post(self, path: str, data: bytes | str | dict, headers=None):
        """Raw POST: (status, parsed JSON body)."""
        if isinstance(data, dict):
            data = json.dumps(data)
        if isinstance(data, str):
            data = data.encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def launched():
    """Both servers start at once (loading overlaps the offline reference below)."""
    # 2 slots per mode (rows of different requests share a pool, few admission shapes to compile), sized for
    # short prompts and at most 256 new tokens (a small KV cache: CPU-cheap passes)
    main = Server("--warmup", "--slots", "2", "--max-prompt-tokens", "64", "--max-new-tokens", "256")
    keyed = Server("--api-key", "sesame")
    yield main, keyed
    for s in (main, keyed):
        s.stop()


@pytest.fixture(scope="module")
def reference(launched):
    """Offline greedy generation: {(prompt, mode): Result} for PROMPTS and the chat prompt (token ids: CHAT)."""
    import nemodiff_jax

    gen = nemodiff_jax.load(ASSETS, dtype="float32", progress=False)
    chat_ids = gen.tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    ref = {}
    for mode in MODES:
        for p, r in zip([*PROMPTS, "chat"], gen.generate([*PROMPTS, chat_ids], mode=mode, max_new_tokens=N)):
            ref[(p, mode)] = r
    ref["chat_ids"] = chat_ids
    ref["eos"] = gen.config.eos_token_ids
    return ref


@pytest.fixture(scope="module")
def server(launched, reference):
    return launched[0].wait()


@pytest.fixture(scope="module")
def keyed(launched, reference):
    return launched[1].wait()


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    with urllib.request.urlopen(server.url + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok"}


@pytest.mark.parametrize("mode", MODES)
def test_greedy_completion_equals_offline_and_stream_concatenates(server, reference, mode):
    ref = reference
    c = server.client()
    for p in PROMPTS[:2]:
        r = c.completions.create(model=MODEL, prompt=p, max_tokens=N, temperature=0, extra_body={"mode": mode})
        assert r.choices[0].text == ref[(p, mode)].text
        assert r.choices[0].finish_reason in ("length", "stop")
        u = r.usage
        assert u.completion_tokens <= N and u.total_tokens == u.prompt_tokens + u.completion_tokens
        stats = r.model_extra["stats"]
        assert stats["mode"] == mode and stats["forward_passes"] >= 1 and stats["tokens_per_forward"] > 0
        if mode == "linear_spec":
            assert stats["rounds"] >= 1 and stats["mean_accepted_per_round"] >= 1
        if mode == "diffusion":
            assert stats["blocks"] >= 1 and stats["denoise_steps_per_block"] >= 1

        chunks = list(c.completions.create(model=MODEL, prompt=p, max_tokens=N, temperature=0, stream=True,
                                           extra_body={"mode": mode}))
        assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
        last = chunks[-1]
        assert last.choices[0].finish_reason == r.choices[0].finish_reason
        assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])
        assert last.model_extra["stats"]["mode"] == mode and last.usage.completion_tokens == r.usage.completion_tokens


def test_chat_uses_the_template_and_streams_deltas(server, reference):
    c = server.client()
    for mode in MODES:
        want = reference[("chat", mode)]
        r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=N, temperature=0,
                                      extra_body={"mode": mode})
        assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
        assert r.usage.prompt_tokens == len(reference["chat_ids"]) and r.usage.completion_tokens == len(want.tokens)
        assert r.choices[0].finish_reason == ("stop" if want.tokens[-1] in reference["eos"] else "length")
    chunks = list(c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=N, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    want = reference[("chat", "ar")]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.tokens)
    assert chunks[-2].choices[0].finish_reason is not None and "stats" in chunks[-2].model_extra


def test_chat_thinking_options_and_budget(server):
    """chat_template_kwargs reach the template (vLLM's field), max_thinking_tokens forces </think>: both equal
    the offline API with the same options."""
    import nemodiff_jax

    gen = nemodiff_jax.load(ASSETS, dtype="float32", progress=False)
    ids = gen.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, enable_thinking=True)
    assert gen.tokenizer.decode(ids, skip_special_tokens=False).endswith("<think>\n")
    c = server.client()
    for mode in MODES:
        want = gen.generate([ids], mode=mode, max_new_tokens=N, max_thinking_tokens=3)[0]
        assert want.tokens[3] == gen.tokenizer.token_to_id("</think>")
        r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=N, temperature=0,
                                      extra_body={"mode": mode, "max_thinking_tokens": 3,
                                                  "chat_template_kwargs": {"enable_thinking": True}})
        assert r.usage.prompt_tokens == len(ids) and r.choices[0].message.content == want.text, mode


def test_32_concurrent_streaming_clients_in_mixed_modes(server, reference):
    ref = reference
    jobs = [(PROMPTS[i % len(PROMPTS)], MODES[i % len(MODES)]) for i in range(32)]

    async def one(client, prompt, mode):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0,
                                                 stream=True, extra_body={"mode": mode})
        text = []
        async for ch in stream:
            text.append(ch.choices[0].text)
        return "".join(text)

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p, m) for p, m in jobs))

    texts = asyncio.run(main())
    for (p, m), text in zip(jobs, texts):
        assert text == ref[(p, m)].text, (p, m)


def test_disconnect_mid_stream_cancels_and_server_goes_on(server, reference):
    ref = reference
    c = server.client()
    cancelled = server.metric('nemodiff_requests_total{outcome="cancelled"}')
    stream = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=250, temperature=0, stream=True,
                                  extra_body={"mode": "ar", "ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].finish_reason is None
    stream.close()
    t0 = time.monotonic()
    while server.metric('nemodiff_requests_total{outcome="cancelled"}') <= cancelled:
        assert time.monotonic() - t0 < 60, "the disconnected request was never cancelled"
        time.sleep(0.05)
    while server.metric("nemodiff_slots_in_use") > 0:
        assert time.monotonic() - t0 < 60, "the cancelled request still holds its slot"
        time.sleep(0.05)
    assert server.metric("nemodiff_client_disconnects_total") >= 1
    r = c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=N, temperature=0)
    assert r.choices[0].text == ref[(PROMPTS[1], "ar")].text


def test_stop_strings_cut_the_text_across_chunks(server, reference):
    ref = reference
    c = server.client()
    prompt = PROMPTS[0]
    full = ref[(prompt, "ar")].text
    pieces = [ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt=prompt, max_tokens=N,
                                                                  temperature=0, stream=True)]
    assert "".join(pieces) == full
    # a stop string across the boundary of two streamed chunks (or, if the text came in one, of two tokens),
    # and a list with one that never occurs
    ends = [len("".join(pieces[:i + 1])) for i in range(len(pieces))]
    tokens = reference[(prompt, "ar")].tokens
    ends = [b for b in ends if 2 <= b <= len(full) - 2] or [
        len(tok) for k in range(1, len(tokens)) if 2 <= len(tok := _decode(tokens[:k])) <= len(full) - 2]
    b = ends[0]
    for stop in (full[b - 2:b + 2], ["never in the text", full[len(full) // 2:][:3]]):
        first = min(full.find(s) for s in ([stop] if isinstance(stop, str) else stop) if s in full)
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0, stop=stop)
        assert r.choices[0].text == full[:first] and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens < N
        streamed = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0, stop=stop,
                                             stream=True))
        assert "".join(ch.choices[0].text for ch in streamed) == full[:first]
        assert streamed[-1].choices[0].finish_reason == "stop"
    assert server.metric("nemodiff_stop_string_total") >= 4


def _decode(ids):
    from nemodiff_jax.tokenizer import Tokenizer

    return Tokenizer.default().decode(ids)


BAD = [  # (body, the field the error must name)
    ({"prompt": "HAMLET:", "mode": "turbo"}, "mode"),
    ({"prompt": "HAMLET:", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "HAMLET:", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "HAMLET:", "temperature": "hot"}, "temperature"),
    ({"prompt": "HAMLET:", "top_p": 0}, "top_p"),
    ({"prompt": "HAMLET:", "seed": 1.5}, "seed"),
    ({"prompt": [1.5, 2.0, 3.0]}, "prompt"),
    ({"prompt": [1, 2, 99999]}, "prompt"),
    ({"prompt": "HAMLET:", "max_tokens": 2100}, "max_tokens"),
    ({"prompt": "HAMLET:", "max_tokens": 2030, "mode": "diffusion"}, "max_tokens"),
    ({"prompt": "HAMLET:", "max_tokens": 600}, "max_tokens"),  # within the context, beyond --max-new-tokens
    ({"prompt": "HAMLET: " * 40}, "prompt"),  # beyond --max-prompt-tokens
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "HAMLET:", "threshold": 0.5}, "threshold"),
    ({"prompt": "HAMLET:", "mode": "linear_spec", "policy": "leftmost"}, "policy"),
    ({"prompt": "HAMLET:", "mode": "diffusion", "policy": "random"}, "policy"),
    ({"prompt": "HAMLET:", "mode": "diffusion", "block_size": 1}, "block_size"),
    ({"prompt": "HAMLET:", "mode": "diffusion", "thresh": 0.5}, "thresh"),
    ({"prompt": "HAMLET:", "n": 2}, "n"),
    ({"prompt": "HAMLET:", "stop": 7}, "stop"),
    ({"prompt": "HAMLET:", "stream": "yes"}, "stream"),
    ({"prompt": "HAMLET:", "logprobs": 3}, "logprobs"),
    ({"prompt": [[5.5, 6]]}, "prompt"),
    ({"prompt": "HAMLET:", "seed": -1}, "seed"),
    ({"prompt": "HAMLET:", "top_k": 10 ** 6}, "top_k"),
    ({"prompt": "HAMLET:", "mode": "diffusion", "block_size": 0}, "block_size"),
    ({"prompt": "HAMLET:", "max_thinking_tokens": -2}, "max_thinking_tokens"),
]
BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "mode": "diffusion", "threshold": 2}, "threshold"),
    ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": ["x"]}, "chat_template_kwargs"),
    ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"messages": []}},
     "chat_template_kwargs"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]}, "messages"),
]


def test_bad_requests_are_400_naming_the_field_and_the_server_stays_up(server, reference):
    ref = reference
    for path, cases in (("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)):
        for body, param in cases:
            status, err = server.post(path, body)
            assert status == 400, (body, status, err)
            assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param, (body, err)
            assert err["error"]["message"] and err["error"]["code"] is None
    for raw in ('{"prompt": "HAMLET:",', "[1, 2]", "\xff\xfe", ""):
        status, err = server.post("/v1/completions", raw.encode("latin-1"))
        assert status == 400 and err["error"]["type"] == "invalid_request_error", (raw, err)
    status, err = server.post("/v1/completions", {"prompt": "HAMLET:", "model": "gpt-4"})
    assert status == 404 and err["error"]["param"] == "model"
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="HAMLET:", extra_body={"mode": "quantum"})
    assert e.value.body["param"] == "mode"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5000)
    r = c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=N, temperature=0)
    assert r.choices[0].text == ref[(PROMPTS[2], "ar")].text
    assert server.metric('nemodiff_http_responses_total{endpoint="/v1/completions",code="400"}') >= len(BAD)
    assert server.metric('nemodiff_requests_total{outcome="failed"}') == 0  # all caught before the engine


def test_api_key_gives_401_without_it(keyed):
    with pytest.raises(openai.AuthenticationError):
        keyed.client("wrong").models.list()
    for path, body in (("/v1/completions", {"prompt": "HAMLET:"}), ("/v1/chat/completions", {"messages": []})):
        status, err = keyed.post(path, body)
        assert status == 401 and err["error"]["code"] == "invalid_api_key", err
    with urllib.request.urlopen(keyed.url + "/health") as r:
        assert r.status == 200
    assert [m.id for m in keyed.client("sesame").models.list().data] == [MODEL]
    status, err = keyed.post("/v1/completions", {"prompt": ""}, headers={"Authorization": "Bearer sesame"})
    assert status == 400 and err["error"]["param"] == "prompt"  # past the key: validated as usual


# ---------------------------------------------------------------------------------------------- in-process
# The app over a stand-in engine (the Engine interface: submit -> Handle with stream()/cancel(), stats,
# queue_depth, slots, slots_in_use), driven by raw ASGI calls: no model, no compilation.


class _Handle:
    def __init__(self, request, items, error):
        self.id, self.request, self.items, self.error = request.id, request, items, error
        self.cancelled, self.first_token_s = False, None

    def stream(self):
        yield from self.items
        if self.error is not None:
            raise self.error

    def cancel(self):
        self.cancelled = True


class _Engine:
    """submit() raises `refuse` if set; else each handle streams `items` then raises `error` (if set)."""

    def __init__(self, items=(), error=None, refuse=None):
        self.items, self.error, self.refuse, self.handles = list(items), error, refuse, []
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "failed": 0, "tokens": 0, "busy_seconds": 0.0,
                      "per_mode": {}}
        self.queue_depth, self.slots, self.slots_in_use, self.slots_per_pool = 0, 1, 0, 1
        self.max_prompt_tokens, self.max_new_tokens, self.alive = 1024, 512, True

    def submit(self, request):
        if self.refuse is not None:
            raise self.refuse
        self.handles.append(_Handle(request, self.items, self.error))
        return self.handles[-1]

    def stop(self, timeout=None):
        pass


def _app(engine, **kw):
    from types import SimpleNamespace

    from nemodiff_jax import serve
    from nemodiff_jax.config import Config
    from nemodiff_jax.tokenizer import Tokenizer

    gen = SimpleNamespace(tokenizer=Tokenizer.default(), config=Config.from_file(ASSETS / "config.json"), path=ASSETS)
    return serve.create_app(serve.Server(gen, engine, MODEL, **kw))


def _call(app, path, body, method="POST"):
    """One HTTP request through the ASGI app: (status, body bytes)."""
    raw = json.dumps(body).encode() if isinstance(body, dict) else body

    async def go():
        sent, out = [False], []

        async def receive():
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await asyncio.sleep(3600)  # the client never leaves

        async def send(message):
            out.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await app(scope, receive, send)
        return out[0]["status"], b"".join(m.get("body", b"") for m in out[1:])

    return asyncio.run(go())


def _result(tokens, mode="ar"):
    from nemodiff_jax.generate import Result

    return Result(tokens=tokens, text=None, stats={"mode": mode, "generated_tokens": len(tokens),
                                                   "forward_passes": len(tokens) + 1, "tokens_per_forward": 0.5})


def test_engine_errors_map_to_400_429_500_in_process():
    from nemodiff_jax.engine import QueueFull

    body = {"prompt": "HAMLET:", "max_tokens": 4}
    status, out = _call(_app(_Engine(refuse=QueueFull("full"))), "/v1/completions", body)
    err = json.loads(out)["error"]
    assert status == 429 and "busy" in err["message"] and err["code"] == "queue_full"
    for stream in (False, True):
        app = _app(_Engine(error=ValueError("bad option for the engine")))
        status, out = _call(app, "/v1/completions", {**body, "stream": stream})
        assert status == 400 and "bad option" in json.loads(out)["error"]["message"]
        status, out = _call(_app(_Engine(error=RuntimeError("device lost"))), "/v1/completions",
                            {**body, "stream": stream})
        assert status == 500 and json.loads(out)["error"]["type"] == "server_error"


def test_stop_string_is_held_back_and_cancels_the_request_in_process():
    from nemodiff_jax.tokenizer import Tokenizer

    tok = Tokenizer.default()
    ids = tok.encode("And when the sun is to the Sun,", add_special_tokens=False)
    text = tok.decode(ids)
    engine = _Engine(items=[[t] for t in ids] + [_result(ids)])
    app = _app(engine)
    status, out = _call(app, "/v1/completions", {"prompt": "HAMLET:", "max_tokens": 16, "stop": ["the Sun"],
                                                   "stream": True})
    assert status == 200
    events = [e[len("data: "):] for e in out.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    pieces = [c["choices"][0]["text"] for c in chunks]
    assert "".join(pieces) == text[:text.index("the Sun")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["stats"]["finished_by"] == "stop_string"
    assert engine.handles[-1].cancelled  # its slot is freed at once
    # no chunk ever carried a piece of the stop string that was later cut
    assert not any("the S" in p for p in pieces)
    # a stop string that never completes: everything held back is emitted at the end, finish_reason from EOS/length
    status, out = _call(app, "/v1/completions", {"prompt": "HAMLET:", "max_tokens": 16, "stop": "Sun,!"})
    r = json.loads(out)
    assert r["choices"][0]["text"] == text and r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == len(ids) and r["stats"]["forward_passes"] == len(ids) + 1


def test_metrics_text_format_in_process():
    app = _app(_Engine())
    status, out = _call(app, "/metrics", b"", method="GET")
    text = out.decode()
    assert status == 200
    for name in ("nemodiff_requests_total", "nemodiff_generated_tokens_total", "nemodiff_tokens_per_second",
                 "nemodiff_queue_depth", "nemodiff_slots_in_use", "nemodiff_accepted_per_round"):
        assert f"# TYPE {name} " in text
    for line in text.splitlines():
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
