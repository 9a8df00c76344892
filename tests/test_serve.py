"""`nanochat-run stage=serve` as a user runs it: a real uvicorn server on a loopback port, serving
the tiny checkpoint trained in this session, driven by real clients.

- the official `openai` package (stream and not, n > 1, /v1/models); nanochat's SSE protocol
- 16 concurrent streaming httpx clients: temperature-0 texts equal their solo runs, and they
  really shared decode steps (/health saw several active sequences)
- a client that disconnects mid-stream: its sequence is cancelled and its row freed
- every bad-input class → 400 (413 for a huge body) naming the field; a full queue → 429 +
  Retry-After; a burst of bad requests interleaved with good ones leaves the good ones right
- /health, /metrics (Prometheus text)
- the web UI in headless Chromium (Playwright): send, streamed reply, regenerate, edit, screenshot
- SIGTERM: in-flight stream ends, the process exits 0 and the run is COMPLETED
- dry run prints the serve plan; `latest` without chat runs is a ConfigError
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]


class ServerProcess:
    """`python -m launch.run stage=serve ...` with its output collected by a thread."""

    def __init__(self, env: dict, root: Path, source: Path, *overrides: str):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launch.run", "stage=serve", f"stage.init_from={source}", "stage.port=0",
             f"run.root={root}", "stage.max_tokens=32", *overrides],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_url(timeout=240)
        self._wait_ready(timeout=120)

    def _wait_ready(self, timeout: float) -> None:
        """/health answers 503 "warming" until the idle-time warm-up has run every prefill shape."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            r = httpx.get(self.url + "health", timeout=10)
            if r.status_code == 200:
                return
            assert r.json()["status"] == "warming", r.text
            time.sleep(0.1)
        raise AssertionError("server never became ready")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def _wait_url(self, timeout: float) -> str:
        t0 = time.time()
        while time.time() - t0 < timeout:
            for line in list(self.lines):
                m = re.search(r"\[nanochat\] serving .* at (http://127\.0\.0\.1:\d+/)", line)
                if m:
                    return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.proc.kill()
        raise AssertionError("server did not start:\n" + "".join(self.lines)[-4000:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def server(stage_root, tmp_path_factory):
    env, root, pre = stage_root
    srv = ServerProcess(env, root, pre)
    srv.root, srv.source, srv.env = root, pre, env
    yield srv
    srv.stop()


def chat_body(text: str, **kw) -> dict:
    return {"model": "x", "messages": [{"role": "user", "content": text}], "temperature": 0, **kw}


def oai(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "v1", api_key="unused", max_retries=0, timeout=120)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


# --------------------------------------------------------------------------- protocols

def test_openai_client_and_nanochat_protocol(server):
    client = oai(server)
    models = client.models.list()
    name = models.data[0].id
    assert name == "nanochat-d2-pretrain"
    r = client.chat.completions.create(model=name, messages=[{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "Hello there"}],
                                       temperature=0, max_tokens=12)
    assert r.object == "chat.completion" and len(r.choices) == 1
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length") and c.message.role == "assistant"
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # streaming gives the same text, chunk by chunk, and a usage chunk when asked
    stream = client.chat.completions.create(model=name, messages=[{"role": "system", "content": "Be brief."},
                                                                  {"role": "user", "content": "Hello there"}],
                                            temperature=0, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(pieces) == c.message.content and finish == c.finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens
    # n > 1 with a seed: n different samples, reproducible
    kw = dict(model=name, messages=[{"role": "user", "content": "Tell me a story"}], temperature=1.0,
              max_tokens=16, n=3, seed=123, top_p=0.95, extra_body={"top_k": 40})
    r1, r2 = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [ch.message.content for ch in r1.choices]
    assert [ch.index for ch in r1.choices] == [0, 1, 2]
    assert texts == [ch.message.content for ch in r2.choices] and len(set(texts)) > 1
    # nanochat's protocol: data: {"token": ...} frames, then data: {"done": true}
    with httpx.stream("POST", server.url + "chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0,
                            "max_tokens": 12}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        frames = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
    assert frames[-1]["done"] is True and all("token" in f for f in frames[:-1])
    # its text is the OpenAI one without the system prompt → compare with a plain user turn
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello there"}],
                                       temperature=0, max_tokens=12)
    assert "".join(f["token"] for f in frames[:-1]) == r.choices[0].message.content
    health = httpx.get(server.url + "health").json()
    assert health["ready"] and health["replicas"][0]["max_seqs"] == 16 and health["free_slots"] == 16


async def _stream_text(client: "httpx.AsyncClient", url: str, body: dict) -> str:
    out = []
    async with client.stream("POST", url + "v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for ch in json.loads(line[6:])["choices"]:
                    out.append(ch["delta"].get("content") or "")
    return "".join(out)


def test_16_concurrent_streams_equal_solo(server):
    bodies = [chat_body(f"Question {i}: " + "why " * (i % 4) + "?", max_tokens=24) for i in range(16)]

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            solo = [await _stream_text(client, server.url, b) for b in bodies]
            seen_active = []

            async def watch():
                while True:
                    seen_active.append((await client.get(server.url + "health")).json()["replicas"][0]["active"])
                    await asyncio.sleep(0.01)
            watcher = asyncio.ensure_future(watch())
            together = await asyncio.gather(*[_stream_text(client, server.url, b) for b in bodies])
            watcher.cancel()
            return solo, list(together), seen_active
    solo, together, seen = asyncio.run(main())
    assert all(solo) and together == solo
    assert max(seen) > 1, f"requests never shared a decode step: active counts {seen}"


def test_disconnect_mid_stream_frees_row(server):
    cancelled0 = metric(server.url, 'nanochat_sequences_finished_total{reason="cancelled"}')
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server.url + "v1/chat/completions",
                           json=chat_body("Go on and on", max_tokens=110, stream=True)) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert all(not line or line.startswith("data: ") for line in got)
        # leaving the block closes the connection mid-answer
    t0 = time.time()
    while time.time() - t0 < 30:
        if (httpx.get(server.url + "health").json()["replicas"][0]["active"] == 0 and
                metric(server.url, 'nanochat_sequences_finished_total{reason="cancelled"}') > cancelled0):
            break
        time.sleep(0.1)
    assert metric(server.url, 'nanochat_sequences_finished_total{reason="cancelled"}') == cancelled0 + 1
    assert httpx.get(server.url + "health").json()["free_slots"] == 16


# --------------------------------------------------------------------------- bad input

BAD = [  # (body, field named in the error, words in the message)
    ({"messages": [{"role": "user", "content": "hi"}] * 501}, "messages", "500"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, "messages[0].content", "8,000"),
    ({"messages": [{"role": "user", "content": "x" * 7000}, {"role": "assistant", "content": "y" * 7000}] * 2
     + [{"role": "user", "content": "z" * 7000}]}, "messages", "32,000"),
    (chat_body("hi", temperature=-0.1), "temperature", "[0, 2]"),
    (chat_body("hi", temperature=2.5), "temperature", "[0, 2]"),
    (chat_body("hi", temperature="hot"), "temperature", "number"),
    (chat_body("hi", top_k=0), "top_k", "[1, 200]"),
    (chat_body("hi", top_k=201), "top_k", "[1, 200]"),
    (chat_body("hi", max_tokens=0), "max_tokens", "[1, 4096]"),
    (chat_body("hi", max_tokens=4097), "max_tokens", "[1, 4096]"),
    (chat_body("hi", max_completion_tokens=5000), "max_completion_tokens", "[1, 4096]"),
    (chat_body("hi", n=0), "n", "[1, 16]"),
    (chat_body("hi", stop=5), "stop", "string"),
    (chat_body("hi", seed=-1), "seed", "non-negative"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "system, user, assistant"),
    ({"messages": [{"role": "user", "content": "   "}]}, "messages[0].content", "empty"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": " "}]}]},
     "messages[0].content[1].text", "empty"),   # each part, as the schema says
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content", "string"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "string"),
    ({"messages": []}, "messages", "at least one"),
    ({"messages": "hi"}, "messages", "list"),
    ({"temperature": 0}, "messages", "required"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "messages[1].role", "last message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages", "alternate"),
    # within the character limits but longer than the tiny model's 128-token context
    ({"messages": [{"role": "user", "content": "the cat sat on the mat " * 40}]}, "messages", "tokens too many"),
]


def test_every_bad_input_class_is_a_clear_4xx(server):
    url = server.url + "v1/chat/completions"
    with httpx.Client(timeout=60) as client:
        for body, field, words in BAD:
            for route in ("v1/chat/completions", "chat/completions"):
                r = client.post(server.url + route, json=body)
                assert r.status_code == 400, (body if len(str(body)) < 300 else field, r.text)
                err = r.json()["error"]
                assert err["type"] == "invalid_request_error" and err["param"] == field, err
                assert words in err["message"], err
        m = re.search(r"(\d+) tokens too many", client.post(url, json=BAD[-1][0]).json()["error"]["message"])
        assert m and int(m.group(1)) > 0
        for raw in (b'{"messages": [', b"not json at all", b"\xff\xfe", b"[1, 2, 3]", b"null"):
            r = client.post(url, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["message"], (raw, r.text)
        r = client.post(url, content=b'{"messages": "' + b"x" * 1_100_000 + b'"}')
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        assert client.get(server.url + "v1/chat/completions").status_code == 405
        assert client.get(server.url + "health").json()["ready"]


def test_bad_burst_interleaved_with_good(server):
    goods = [chat_body(f"Good question {i}", max_tokens=16) for i in range(6)]

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            solo = [await _stream_text(client, server.url, b) for b in goods]

            async def bad(body):
                r = await client.post(server.url + "v1/chat/completions", json=body)
                return r.status_code
            jobs = []
            for i, g in enumerate(goods):
                jobs.append(_stream_text(client, server.url, g))
                jobs += [bad(BAD[(3 * i + k) % len(BAD)][0]) for k in range(3)]
            out = await asyncio.gather(*jobs)
            return solo, out
    solo, out = asyncio.run(main())
    texts = [o for o in out if isinstance(o, str)]
    codes = [o for o in out if not isinstance(o, str)]
    assert texts == solo and set(codes) == {400} and len(codes) == 18


def test_full_queue_is_429_with_retry_after(stage_root):
    """An in-process app over a 1-row, 1-deep scheduler: the third concurrent request is refused."""
    import uvicorn

    from nanochat.chat_cli import load
    from nanochat.serve.app import ServeSettings, build_app
    from nanochat.serve.metrics import ServerMetrics
    from nanochat.serve.scheduler import ReplicaPool, Scheduler
    _, _, pre = stage_root
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = stage_root[0]["NANOCHAT_BASE_DIR"]
    try:
        model, tok, _ = load(pre, "cpu")
    finally:
        if old is None:
            os.environ.pop("NANOCHAT_BASE_DIR")
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old
    metrics = ServerMetrics()
    # not started yet: nothing decodes, so the row and the queue stay exactly as full as the probe
    # below makes them (a tiny model may end its answer faster than a probe can follow)
    pool = ReplicaPool([Scheduler(model, tok, max_seqs=1, max_queue=1, observer=metrics)])
    app = build_app(pool, tok, ServeSettings(model_name="tiny", retry_after_s=3), metrics)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/"
    try:
        t0 = time.time()
        while not server.started and time.time() - t0 < 30:
            time.sleep(0.05)
        with httpx.Client(timeout=60) as c:
            body = chat_body("Keep talking", max_tokens=40, stream=True)
            with c.stream("POST", url + "v1/chat/completions", json=body) as first, \
                    c.stream("POST", url + "v1/chat/completions", json=body) as second:
                assert first.status_code == 200 and second.status_code == 200
                r = c.post(url + "v1/chat/completions", json={**body, "stream": False})
                assert r.status_code == 429 and r.headers["retry-after"] == "3"
                assert r.json()["error"]["type"] == "rate_limit_error"
                r = c.post(url + "chat/completions", json=body)
                assert r.status_code == 429
                pool.start()
                first.read(), second.read()
            r = c.post(url + "v1/chat/completions", json={**body, "stream": False, "max_tokens": 4})
            assert r.status_code == 200   # rows free again
            assert 'status="429"' in c.get(url + "metrics").text
    finally:
        server.should_exit = True
        thread.join(30)
        pool.stop()


# --------------------------------------------------------------------------- web UI

def test_web_ui_in_headless_chromium(server, tmp_path):
    from conftest import headless_chromium
    with headless_chromium() as browser:
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url)
        assert page.title() == "nanochat"
        page.fill("#input", "/temperature 0")
        page.press("#input", "Enter")
        page.wait_for_selector("text=temperature = 0")
        page.fill("#input", "Hello there")
        page.press("#input", "Enter")
        stats = page.wait_for_selector(".msg.assistant .stats", timeout=60_000)
        assert "tokens/s" in stats.inner_text()
        first = page.inner_text(".msg.assistant").split("\n")[0]
        assert page.inner_text(".msg.user") == "Hello there"
        # regenerate the last answer (temperature 0: the same text again)
        page.click("#regen")
        page.wait_for_function("document.querySelector('#send').disabled === false", timeout=60_000)
        page.wait_for_selector(".msg.assistant .stats")
        assert page.locator(".msg.assistant").count() == 1
        assert page.inner_text(".msg.assistant").split("\n")[0] == first
        # a second turn, then edit the FIRST user message: the conversation continues from there
        page.fill("#input", "And then?")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelectorAll('.msg.assistant .stats').length === 2", timeout=60_000)
        page.click(".msg.user >> nth=0")
        page.fill("textarea.edit", "Tell me about cats")
        page.press("textarea.edit", "Enter")
        page.wait_for_function("document.querySelector('#send').disabled === false", timeout=60_000)
        page.wait_for_selector(".msg.assistant .stats")
        users = page.locator(".msg.user").all_inner_texts()
        assert users == ["Tell me about cats"] and page.locator(".msg.assistant").count() == 1
        page.fill("#input", "/help")
        page.press("#input", "Enter")
        page.wait_for_selector("text=Commands:")
        shot = tmp_path / "nanochat_ui.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 1000 and not errors, errors


# --------------------------------------------------------------------------- lifecycle (last: stops the server)

def test_sigterm_finishes_streams_and_exits_0(server):
    got = []

    def consume():
        with httpx.stream("POST", server.url + "chat/completions", timeout=60,
                          json=chat_body("A long answer please", max_tokens=110)) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    got.append(json.loads(line[6:]))
    t = threading.Thread(target=consume)
    t.start()
    t0 = time.time()
    while not got and time.time() - t0 < 60:
        time.sleep(0.02)
    rc = server.stop()
    t.join(30)
    assert rc == 0, "".join(server.lines)[-3000:]
    assert got and got[-1].get("done") is True          # the in-flight stream ended properly
    assert got[-1]["finish_reason"] in ("stop", "length", "cancelled")
    out = "".join(server.lines)
    assert "SIGTERM: draining" in out and "serve completed" in out
    runs = list((server.root / "serve").glob("*/*/COMPLETED"))
    assert len(runs) == 1
    result = json.loads((runs[0].parent / "result.json").read_text())
    assert result["stopped_by"] == "SIGTERM" and result["generated_tokens"] > 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "health", timeout=5)


def test_dry_run_prints_serve_plan(stage_root, tmp_path):
    env, root, pre = stage_root
    from conftest import nanochat_run
    p = nanochat_run(env, "stage=serve", f"stage.init_from={pre}", "run.dry_run=true", "stage.max_seqs=8",
                     "hardware=8gpu", f"run.root={root}")
    assert "8 × (cuda:0" in p.stdout and "8 sequences per replica" in p.stdout and "KV cache" in p.stdout
    assert "tokens sent at most every 20 ms" in p.stdout and "16-token blocks" in p.stdout
    neg = subprocess.run([sys.executable, "-m", "launch.run", "stage=serve", "run.dry_run=true", f"run.root={root}",
                          f"stage.init_from={pre}", "stage.stream_interval_ms=-5"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert neg.returncode != 0 and "stage.stream_interval_ms" in neg.stdout + neg.stderr
    bad = subprocess.run([sys.executable, "-m", "launch.run", "stage=serve", "run.dry_run=true",
                          f"run.root={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "no completed rl / sft / mid / pretrain run" in bad.stdout + bad.stderr
