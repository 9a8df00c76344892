"""The documented API on a real server (uvicorn on loopback, a tiny random-weight model, an API key).

- schemathesis over /openapi.json, all its checks: no 5xx, every status, content type, header and
  body as documented, schema-violating bodies rejected, no route usable without the key
- the API key: the official `openai` client with the key works, without it (or a wrong one) gets 401
  with an OpenAI-style error; /, /health and /metrics stay open; also openai>=3 when it installs
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest
import torch

from nanochat.gpt import GPTConfig, build_model
from nanochat.serve.app import ServeSettings, build_app
from nanochat.serve.limits import Defaults, Limits
from nanochat.serve.metrics import ServerMetrics
from nanochat.serve.scheduler import ReplicaPool, Scheduler
from nanochat.tokenizer import train_tokenizer

KEY = "sk-test-0123456789"
OPENAI3 = os.environ.get("NANOCHAT_OPENAI3_DIR", "/tmp/nanochat-openai3")   # pip install --target here
# small limits keep every generated request fast (and inside the 256-token context)
LIMITS = Limits(max_messages=4, max_message_chars=40, max_total_chars=160, max_max_tokens=4, max_n=2,
                max_body_bytes=20_000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api_server():
    import uvicorn
    torch.set_num_threads(1)
    tok = train_tokenizer([collections.__doc__, textwrap.__doc__, json.__doc__] * 3, 400)
    cfg = GPTConfig(sequence_len=256, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=1, n_embd=64)
    model = build_model(cfg, "cpu", 0).eval()
    metrics = ServerMetrics()
    pool = ReplicaPool([Scheduler(model, tok, max_seqs=4, max_queue=8, observer=metrics)]).start()
    app = build_app(pool, tok, ServeSettings(model_name="tiny", limits=LIMITS, api_key=KEY,
                                             defaults=Defaults(max_tokens=4)), metrics)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(10)
    pool.stop()


# --------------------------------------------------------------------------- schemathesis

SCHEMATHESIS_TOML = """
hooks = "nanochat_checks.py"
# what a JSON schema cannot state (the roles' order, the characters of all messages together, the
# conversation's length in tokens) is a documented 400, which schema-valid bodies may get; the check in
# nanochat_checks.py fails every other 400 to a schema-valid body
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400"]
"""
# the 400 codes of those rules (nanochat/serve/limits.py); invalid_role: the last message is the assistant's
SCHEMATHESIS_HOOKS = """
import schemathesis

UNSTATED = {"invalid_conversation", "invalid_role", "conversation_too_long", "context_length_exceeded"}


@schemathesis.check
def valid_data_rejected_only_by_unstated_rules(ctx, response, case):
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code != 400:
        return None
    code = response.json()["error"]["code"]
    assert code in UNSTATED, f"schema-valid data answered 400 {code}: {response.text}"
"""


def test_schemathesis_run_finds_no_failure(api_server, tmp_path):
    """`schemathesis run` over /openapi.json on loopback: all checks (and ours: a schema-valid body is
    refused only for what the schema cannot state), bounded examples, every operation."""
    exe = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    if not os.path.exists(exe):
        pytest.skip("schemathesis is not installed (the dev extra pins schemathesis==4.32.5)")
    (tmp_path / "schemathesis.toml").write_text(SCHEMATHESIS_TOML)
    (tmp_path / "nanochat_checks.py").write_text(SCHEMATHESIS_HOOKS)
    cmd = [exe, "--config-file", str(tmp_path / "schemathesis.toml"), "run", api_server + "openapi.json",
           "--checks", "all", "--max-examples", "30", "--seed", "1", "-H", f"Authorization: Bearer {KEY}",
           "--phases", "examples,coverage,fuzzing"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "NO_COLOR": "1"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "No issues found" in out or "passed" in out, out[-3000:]


def test_openapi_documents_bodies_statuses_and_key(api_server):
    doc = httpx.get(api_server + "openapi.json").json()
    op = doc["paths"]["/v1/chat/completions"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert set(op["responses"]) == {"200", "400", "401", "413", "429", "503"}
    assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "text/event-stream" in doc["paths"]["/chat/completions"]["post"]["responses"]["200"]["content"]
    req = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert req["messages"]["maxItems"] == LIMITS.max_messages             # this server's limits
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert httpx.get(api_server + "docs").status_code == 200


# --------------------------------------------------------------------------- API key

def test_api_key_with_openai_client(api_server):
    import openai
    ok = openai.OpenAI(base_url=api_server + "v1", api_key=KEY, max_retries=0, timeout=60)
    reply = ok.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens >= 1
    assert [m.id for m in ok.models.list()] == ["tiny"]
    for wrong in ("nope", KEY + "x"):
        bad = openai.OpenAI(base_url=api_server + "v1", api_key=wrong, max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    # nanochat's protocol needs the key too; the UI, health and metrics do not
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(api_server + "chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    with httpx.stream("POST", api_server + "chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and '"done": true' in r.read().decode()
    for path in ("", "health", "metrics"):
        assert httpx.get(api_server + path).status_code == 200, path


def _openai3_dir() -> str:
    """openai>=3 in its own --target dir (so the venv keeps the 2.x line); skip if it does not install."""
    marker = os.path.join(OPENAI3, "openai", "__init__.py")
    if not os.path.exists(marker):
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", OPENAI3,
                            "openai>=3,<4"], capture_output=True, text=True, timeout=300)
        if r.returncode != 0 or not os.path.exists(marker):
            pytest.skip(f"openai>=3 did not install: {r.stderr.strip()[-300:]}")
    return OPENAI3


def test_api_key_with_openai_3(api_server):
    target = _openai3_dir()
    code = textwrap.dedent(f"""
        import openai, sys
        assert int(openai.__version__.split('.')[0]) >= 3, openai.__version__
        c = openai.OpenAI(base_url={api_server + 'v1'!r}, api_key={KEY!r}, max_retries=0, timeout=60)
        r = c.chat.completions.create(model="tiny", messages=[{{"role": "user", "content": "hi"}}], max_tokens=2)
        assert r.usage.completion_tokens >= 1
        bad = openai.OpenAI(base_url={api_server + 'v1'!r}, api_key="wrong", max_retries=0, timeout=60)
        try:
            bad.chat.completions.create(model="tiny", messages=[{{"role": "user", "content": "hi"}}], max_tokens=2)
        except openai.AuthenticationError as e:
            assert e.status_code == 401
        else:
            sys.exit("no 401 without the key")
        print("openai", openai.__version__, "ok")
    """)
    env = {**os.environ, "PYTHONPATH": target + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok" in r.stdout


def test_web_ui_asks_for_the_key_once(api_server):
    """The UI in headless Chromium: a 401 makes it ask for the key (once), kept in sessionStorage."""
    from conftest import headless_chromium
    with headless_chromium() as browser:
        page = browser.new_page()
        asked, errors = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: (asked.append(d.message), d.accept(KEY)))
        page.goto(api_server)
        page.fill("#input", "Hello there")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant .stats", timeout=60_000)
        assert len(asked) == 1 and "API key" in asked[0]
        assert page.evaluate("sessionStorage.getItem('nanochat_api_key')") == KEY
        page.fill("#input", "And then?")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelectorAll('.msg.assistant .stats').length === 2", timeout=60_000)
        assert len(asked) == 1 and not errors, (asked, errors)   # asked once, not again


@pytest.mark.slow
def test_peer_bench_short_mode(tmp_path):
    """bench/serve.py --peer transformers --short: both servers answer every request in full, and the
    last line is one JSON object with the peer's figures and the ratios (no timing asserted)."""
    pytest.importorskip("transformers", reason="the peer is the bench extra: transformers[serving]==5.25.0")
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    if not os.path.exists(exe):
        pytest.skip("the `transformers` CLI is not installed (bench extra)")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(repo, "bench", "serve.py"), "--peer", "transformers", "--short",
                        "--threads", "1"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["peer"]["name"].startswith("transformers serve")
    assert last["short_requests"] == 0 and last["peer"]["short_requests"] == 0
    assert last["requests"] == last["peer"]["requests"] > 0
    for key in ("ratio_single_stream_tok_s", "ratio_agg4", "ratio_ttft_ms_p95", "ratio_single_vs_engine"):
        assert last[key] > 0, key
    assert set(last["multi_turn"]) == {"cache_on", "cache_off"}
    assert "ours/peer" in r.stdout


def test_api_key_from_config_or_env_and_open_host_warning(monkeypatch, capsys):
    from types import SimpleNamespace

    from nanochat.stages.serve import api_key
    monkeypatch.delenv("NANOCHAT_API_KEY", raising=False)
    cfg = lambda host, key=None: SimpleNamespace(stage=SimpleNamespace(host=host, api_key=key))   # noqa: E731
    assert api_key(cfg("127.0.0.1")) is None and "WARNING" not in capsys.readouterr().out
    assert api_key(cfg("0.0.0.0")) is None and "without an API key" in capsys.readouterr().out
    assert api_key(cfg("0.0.0.0", "k1")) == "k1" and "WARNING" not in capsys.readouterr().out
    monkeypatch.setenv("NANOCHAT_API_KEY", "k2")
    assert api_key(cfg("0.0.0.0")) == "k2" and api_key(cfg("::1", "k1")) == "k1"


def test_first_tokens_posted_together_wake_the_event_loop_once():
    """The first tokens of a prefill (posted urgent, one per stream) reach the event loop with one
    wake-up, not one each; a first token posted after that flush wakes it again."""
    from nanochat.serve.app import _Mailbox
    from nanochat.serve.scheduler import Event
    loop = asyncio.new_event_loop()
    wakes = []
    threadsafe = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *a: (wakes.append(a), threadsafe(*a))
    try:
        box = _Mailbox(loop, interval=0.05)
        queues = [asyncio.Queue() for _ in range(5)]
        poster = threading.Thread(target=lambda: [box.post(q, (0, Event("text", "x")), urgent=True) for q in queues])
        poster.start()
        poster.join()
        loop.run_until_complete(asyncio.sleep(0.01))
        assert len(wakes) == 1 and all(q.qsize() == 1 for q in queues)
        box.post(queues[0], (0, Event("text", "y")), urgent=True)
        loop.run_until_complete(asyncio.sleep(0.01))
        assert len(wakes) == 2 and queues[0].qsize() == 2
    finally:
        loop.close()
