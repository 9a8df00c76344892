"""Hugging Face export/import: the real transformers package (CPU, fp32) against our model, Engine,
tokenizer and chat renderer; the CLI's files, round trip and bad input."""
from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanochat.common import shared_data_dir
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig, build_model
from nanochat.hf.export import export_run, read_hf_dir, remote_code_sources, write_hf_dir
from nanochat.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is the [hf] extra (make setup installs it)")

REPO = Path(__file__).resolve().parents[1]
_SHARED = shared_data_dir()


# ----------------------------------------------------------------------------- helpers

def run_tokenizer(run_dir: Path, env: dict) -> Tokenizer:
    from nanochat.config import load_config
    from nanochat.tokenizer import get_tokenizer
    cfg = load_config(str(run_dir / "resolved_config.yaml"))
    return get_tokenizer(env["NANOCHAT_BASE_DIR"], cfg.data.tokenizer)


def random_model(vocab: int, **kw) -> GPT:
    """A GPT whose every weight is non-trivial (init zeroes the output projections) and whose logits
    are decisive (greedy choices are not near-ties)."""
    model = build_model(GPTConfig(vocab_size=vocab, **kw), "cpu", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.size(1) ** -0.5)
    return model.eval()


def hf_load(path: Path, remote: bool):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=remote, dtype=torch.float32).eval()


def engine_greedy(model: GPT, tok: Tokenizer, prompt: list[int], n: int) -> list[int]:
    seqs, _ = Engine(model, tok).generate_batch(prompt, max_tokens=n, temperature=0.0)
    return seqs[0][len(prompt):]


def hf_greedy(model, prompt: list[int], n: int, eos: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=eos[-1])
    new = out[0, len(prompt):].tolist()
    return new[:next((i for i, t in enumerate(new) if t in eos), len(new))]


def real_text(limit: int = 60_000) -> str:
    """Web text from ../shared/data (c4 sample), else this repo's own sources."""
    c4 = (_SHARED / "pretrain" / "c4-sample.00000-of-00001.json.gz") if _SHARED else None
    if c4 is not None and c4.is_file():
        parts, n = [], 0
        with gzip.open(c4, "rt", encoding="utf-8") as f:
            for line in f:
                parts.append(json.loads(line)["text"])
                n += len(parts[-1])
                if n > limit:
                    break
        return "\n\n".join(parts)
    return (REPO / "nanochat" / "gpt.py").read_text()[:limit]


CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hello there! What's 2+2?"},
                  {"role": "assistant", "content": "It's 4."},
                  {"role": "user", "content": "And  3 × 7 ?\n"},
                  {"role": "assistant", "content": "21, I think."}]},
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."}]},
    {"messages": [{"role": "user", "content": "How many r in strawberry?"},
                  {"role": "assistant", "content": [
                      {"type": "text", "text": "Let me count."},
                      {"type": "python", "text": "'strawberry'.count('r')"},
                      {"type": "python_output", "text": "3"},
                      {"type": "text", "text": " There are 3."}]}]},
]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny(tiny_pretrained, tmp_path_factory):
    """(env, run dir, tokenizer, native export dir, remote-code export dir) of the session's tiny run."""
    env, run = tiny_pretrained
    out = tmp_path_factory.mktemp("hf")
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = env["NANOCHAT_BASE_DIR"]
    try:
        native = export_run(run, out / "native")
        remote = export_run(run, out / "remote", remote_code=True)
    finally:
        if old is None:
            os.environ.pop("NANOCHAT_BASE_DIR")
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old
    return env, run, run_tokenizer(run, env), native, remote


# ----------------------------------------------------------------------------- tokenizer, chat template

def test_tokenizer_ids_and_chat_template_equal_ours(tiny):
    from transformers import AutoTokenizer
    _, _, tok, native, _ = tiny
    hf = AutoTokenizer.from_pretrained(str(native))
    text = real_text()
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
    assert (hf.bos_token, hf.eos_token) == ("<|bos|>", "<|assistant_end|>")
    for conv in CONVERSATIONS:
        ids, _ = tok.render_conversation(conv)
        assert hf.apply_chat_template(conv["messages"], tokenize=True)["input_ids"] == ids
        prompt = tok.render_for_completion(conv)
        got = hf.apply_chat_template(conv["messages"][:-1], tokenize=True, add_generation_prompt=True)
        assert got["input_ids"] == prompt


# ----------------------------------------------------------------------------- parity

SEED_GQA = dict(sequence_len=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=128, rope_bf16=False)
MODERN_GQA = dict(sequence_len=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, rope_base=100000.0,
                  value_embeds=True, window_pattern="SSSL", short_window=48, long_window=256,
                  resid_lambdas=True, x0_lambdas=True, smear=True, backout=True, qk_scale=1.2,
                  pad_vocab_to=64, init_style="modern")


@pytest.mark.parametrize("kind", ["seed", "modern"])
def test_logits_and_greedy_generation_match_ours(tiny, tmp_path, kind):
    """GQA, T=200 > the 48-token short window: last-position logits ≤ 1e-4 and 32 greedy tokens equal
    our Engine's (seed: transformers' own NanoChat class; modern: our remote code)."""
    _, _, tok, _, _ = tiny
    kw = SEED_GQA if kind == "seed" else MODERN_GQA
    model = random_model(tok.get_vocab_size(), **kw)
    cfg_kw = dict(vars(model.config))
    write_hf_dir(tmp_path, cfg_kw, model.state_dict(), tok)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == ("nanochat" if kind == "seed" else "nanochat_hydra")
    hf = hf_load(tmp_path, remote=kind == "modern")
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, tok.get_vocab_size(), (2, 200), generator=g)
    with torch.no_grad():
        ours, theirs = model(idx)[:, -1], hf(idx).logits[:, -1]
    assert (ours - theirs).abs().max().item() <= 1e-4
    prompt = tok.render_for_completion(CONVERSATIONS[0])
    eos = [tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()]
    # the Engine runs the calculator tool: a random model must not open a tool call for the comparison
    want = engine_greedy(model, tok, prompt, 32)
    assert tok.encode_special("<|python_start|>") not in want
    assert hf_greedy(hf, prompt, 32, eos) == want


def test_remote_code_is_our_module(tiny):
    """The shipped model code is nanochat/gpt.py, attention.py and shapes.py with only the imports rewritten."""
    _, _, _, _, remote = tiny
    for name, text in remote_code_sources().items():
        assert (remote / name).read_text() == text
    ours = (REPO / "nanochat" / "gpt.py").read_text()
    assert (remote / "gpt.py").read_text() == ours.replace("from nanochat.attention import", "from .attention import"
                                                           ).replace("from nanochat.shapes import", "from .shapes import")


@pytest.mark.parametrize("rev", ["d575940_d2", "92d63d4_d2"])
def test_nanochat_checkpoints_through_transformers(tmp_path, rev):
    """nanochat's own trained checkpoints (seed d575940 with bf16 RoPE tables, modern 92d63d4), imported and
    exported: the remote-code export is exact; for the seed model transformers' NanoChat (fp32 tables) is
    close but not exact. Prints the measured difference (README quotes it)."""
    from nanochat import interop
    fx = (_SHARED / "nanochat_checkpoints" / rev) if _SHARED else None
    if fx is None or not fx.is_dir():
        pytest.skip(f"../shared/data/nanochat_checkpoints/{rev} absent")
    src = interop.locate(fx)
    kw, state = interop.from_nanochat(interop.load_state(src.model_path), interop.load_meta(src.meta_path)["model_config"])
    tok = interop.load_tokenizer(src.tokenizer_dir, kw["vocab_size"])
    with torch.device("meta"):
        model = GPT(GPTConfig(**kw))
    model.to_empty(device="cpu")
    model.init_rotary()
    model.load_state_dict(state)
    model.eval()
    idx = torch.tensor([tok.encode(real_text(4000), prepend="<|bos|>")[:128]])
    diffs = {}
    for remote in ((False, True) if rev.startswith("d575940") else (True,)):
        d = tmp_path / ("remote" if remote else "native")
        d.mkdir()
        write_hf_dir(d, kw, state, tok, remote_code=remote)
        with torch.no_grad():
            diffs[remote] = (model(idx) - hf_load(d, remote)(idx).logits).abs().max().item()
    print(f"\n{rev}: max |logit diff| over 128 positions: {diffs}")
    assert diffs[True] == 0.0
    if False in diffs:
        assert 0.0 < diffs[False] < 5e-2


def test_sharded_bf16_export_loads(tiny, tmp_path):
    _, run, tok, _, _ = tiny
    model = random_model(tok.get_vocab_size(), **SEED_GQA)
    write_hf_dir(tmp_path, dict(vars(model.config)), model.state_dict(), tok, dtype="bfloat16",
                 max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf_load(tmp_path, remote=False)   # transformers loads the sharded dir
    kw, state, _, _ = read_hf_dir(tmp_path)
    for k, v in model.state_dict().items():
        if k != "rope":
            assert torch.equal(state[k], v.bfloat16().float()), k


# ----------------------------------------------------------------------------- CLI: files, round trip, errors

def cli(env: dict, module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"import sys; from launch.interop_cli import {module}; "
                           f"sys.exit({module}(sys.argv[1:]))", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_export_files_and_card(tiny):
    _, run, tok, native, remote = tiny
    names = {p.name for p in native.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= names
    gen = json.loads((native / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()]
    card = (native / "README.md").read_text()
    assert "seed" in card and "| pretrain |" in card and "val bpb" in card and "Fill in the license" in card
    assert "trust_remote_code=True" in (remote / "README.md").read_text()
    assert not list(native.parent.glob(".*tmp*"))


@pytest.mark.parametrize("which", ["native", "remote"])
def test_import_round_trip_bitwise_and_run_dir(tiny, tmp_path, which):
    env, run, _, native, remote = tiny
    src = native if which == "native" else remote
    target = tmp_path / "imported"
    p = cli(env, "main_import", str(src), f"run.root={tmp_path}", f"run.dir={target}")
    assert p.returncode == 0, p.stderr
    assert (target / "COMPLETED").exists()                 # run.dir= is honoured
    from nanochat.checkpoint import latest_checkpoint, load_model_state
    a = load_model_state(latest_checkpoint(run))
    b = load_model_state(latest_checkpoint(target))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = tmp_path / "again"
    p = cli(env, "main_export", str(target), str(again), "--format", "hf", *(["--remote-code"] if which == "remote" else []))
    assert p.returncode == 0, p.stderr
    from safetensors.torch import load_file
    x, y = load_file(str(src / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_bad_input_one_line_errors_nothing_written(tiny, tmp_path):
    env, run, _, native, _ = tiny

    def fails(module, *args, needle):
        p = cli(env, module, *args)
        assert p.returncode == 2, p.stdout + p.stderr
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and needle in lines[0], p.stderr

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    fails("main_export", str(run), str(full), "--format", "hf", needle="--force")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    fails("main_export", str(run), str(tmp_path / "o"), "--format", "hf", "--dtype", "float8", needle="float8")
    fails("main_export", str(run), str(tmp_path / "o"), "--format", "hf", "--step", "999", needle="--step 999")
    empty_run = tmp_path / "norun"
    empty_run.mkdir()
    (empty_run / "resolved_config.yaml").write_text((run / "resolved_config.yaml").read_text())
    fails("main_export", str(empty_run), str(tmp_path / "o"), "--format", "hf", needle="no completed checkpoint")
    assert not (tmp_path / "o").exists()
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    fails("main_import", str(other), f"run.root={tmp_path}", needle="model_type='llama'")
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (notok / f).write_bytes((native / f).read_bytes())
    fails("main_import", str(notok), f"run.root={tmp_path}", needle="tokenizer")
    assert not (tmp_path / "pretrain").exists()
    ok = cli(env, "main_export", str(run), str(full), "--format", "hf", "--force")
    assert ok.returncode == 0 and (full / "config.json").exists() and not (full / "keep.txt").exists()


# ----------------------------------------------------------------------------- transformers serve

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["native", "remote"])
def test_transformers_serve_greedy_chat_equals_ours(tiny, which):
    """`transformers serve OUT_DIR` on a loopback port: one greedy chat completion equals our Engine's
    (transformers' nanochat type, and our remote code with --trust-remote-code)."""
    import urllib.request
    env, run, tok, native, remote = tiny
    out_dir = native if which == "native" else remote
    from nanochat.checkpoint import load_model_from_run
    model, _ = load_model_from_run(run, "cpu")
    messages = [{"role": "user", "content": "Hello there, who are you?"}]
    prompt = tok.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    want = tok.decode(engine_greedy(model, tok, prompt, 16))
    exe = Path(sys.executable).with_name("transformers")
    port = _free_port()
    extra = ["--trust-remote-code"] if which == "remote" else []
    proc = subprocess.Popen([str(exe), "serve", str(out_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--dtype", "float32", *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "transformers serve did not come up"
                time.sleep(0.5)
        body = json.dumps({"model": str(out_dir), "messages": messages, "max_tokens": 16, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert reply["choices"][0]["message"]["content"] == want
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ----------------------------------------------------------------------------- lm-evaluation-harness

def _data_dir() -> str:
    if _SHARED is None or not (_SHARED / "arc" / "ARC-Easy" / "test.jsonl").is_file():
        pytest.skip("../shared/data/arc absent (see its README)")
    return str(_SHARED)


def test_lm_eval_arc_easy_ours_equals_hf_on_export(tiny):
    """arc_easy through our lm-eval model class == lm-eval's own `hf` model on the exported dir."""
    pytest.importorskip("lm_eval", reason="lm-eval is the [eval] extra")
    from nanochat.checkpoint import load_model_from_run
    from nanochat.harness import evaluate, make_lm_class, task_configs
    _, run, tok, native, _ = tiny
    cfgs = task_configs(["arc_easy"], _data_dir())
    model, _ = load_model_from_run(run, "cpu")
    ours = evaluate(make_lm_class()(model, tok, batch_size=16), cfgs, limit=40)["results"]["arc_easy"]
    theirs = evaluate("hf", cfgs, limit=40, batch_size=8,
                      model_args={"pretrained": str(native), "dtype": "float32", "device": "cpu"})["results"]["arc_easy"]
    for metric in ("acc,none", "acc_norm,none"):
        assert abs(ours[metric] - theirs[metric]) * 40 <= 1 + 1e-9, (metric, ours, theirs)


@pytest.mark.parametrize("kind", ["seed", "modern"])
def test_lm_eval_requests_match_direct_scoring(tiny, kind):
    """loglikelihood / loglikelihood_rolling equal the model's own log-probs (batched, padded); greedy
    generate_until equals the Engine's greedy tokens cut at the stop string; a stop signal between
    batches raises EvalInterrupted."""
    pytest.importorskip("lm_eval", reason="lm-eval is the [eval] extra")
    from lm_eval.api.instance import Instance
    from nanochat.harness import make_lm_class
    from nanochat.lifecycle import STOP, EvalInterrupted
    _, _, tok, _, _ = tiny
    model = random_model(tok.get_vocab_size(), **(SEED_GQA if kind == "seed" else MODERN_GQA))
    lm = make_lm_class()(model, tok, batch_size=2, max_gen_toks=12)
    texts = ["The cat sat on the mat.", "def f(x):\n    return x * 2\n", "A long line " * 30]
    inst = lambda kind_, args: Instance(request_type=kind_, doc={}, arguments=args, idx=0)

    def direct(ids: list[int], n: int) -> float:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0]
        return float(sum(logp[i - 1, ids[i]] for i in range(len(ids) - n, len(ids))))

    pairs = [("The cat sat", " on the mat."), ("def f(x):", "\n    return x * 2\n"), ("A long", " line" * 60)]
    ll = lm.loglikelihood([inst("loglikelihood", p) for p in pairs])
    for (ctx, cont), (score, _) in zip(pairs, ll):
        c, whole = lm.tok_encode(ctx), lm.tok_encode(ctx + cont)      # lm-eval: context ids + the rest of whole
        assert score == pytest.approx(direct(c + whole[len(c):], len(whole) - len(c)), rel=1e-6, abs=1e-4)
    rolling = lm.loglikelihood_rolling([inst("loglikelihood_rolling", (t,)) for t in texts[:2]])
    for t, score in zip(texts, rolling):
        ids = [tok.get_bos_token_id()] + tok.encode(t)
        assert score == pytest.approx(direct(ids, len(ids) - 1), rel=1e-6, abs=1e-4)
    prompt = "Question: what is two plus two?\nAnswer:"
    got = lm.generate_until([inst("generate_until", (prompt, {"until": ["\n\n"], "max_gen_toks": 12}))] * 3)
    want = tok.decode(engine_greedy(model, tok, lm.tok_encode(prompt), 12)).split("\n\n")[0]
    assert got == [want] * 3
    STOP.signum = 15
    try:
        with pytest.raises(EvalInterrupted):
            lm.loglikelihood([inst("loglikelihood", (t[:10], t[10:])) for t in texts])
    finally:
        STOP.signum = None


def test_eval_stage_harness_run_and_errors(tiny, tmp_path):
    """`nanochat-run stage=eval stage.harness.tasks=[...] stage.harness.limit=N`: result.json, harness.json;
    a task with no definition or no local data is a ConfigError before any run dir exists."""
    pytest.importorskip("lm_eval", reason="lm-eval is the [eval] extra")
    data = _data_dir()
    env, run, _, _, _ = tiny
    env = dict(env, NANOCHAT_SHARED_DATA=data)
    args = ["stage=eval", f"stage.init_from={run}", f"run.root={tmp_path}"]
    p = subprocess.run([sys.executable, "-m", "launch.run", *args, "stage.harness.tasks=[arc_easy,gsm8k]",
                        "stage.harness.limit=3", "stage.harness.num_fewshot=1"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run_dir = next(tmp_path.glob("eval/*/*/COMPLETED")).parent
    result = json.loads((run_dir / "result.json").read_text())
    harness = json.loads((run_dir / "harness.json").read_text())
    assert result["mode"] == "harness" and set(result["harness"]["results"]) == {"arc_easy", "gsm8k"}
    assert "acc_stderr,none" in result["harness"]["results"]["arc_easy"]
    assert harness["lm_eval_version"] == "0.4.13" and len(harness["config_hash"]["arc_easy"]) == 64
    assert harness["results"]["arc_easy"]["sample_len"] == 3
    from nanochat.report import stage_metrics
    assert "lm-eval arc_easy" in stage_metrics("eval", result)
    for bad, needle in ((["stage.harness.tasks=[hellaswag]"], "no local definition"),
                        (["stage.harness.tasks=[arc_easy]", f"stage.harness.data_dir={tmp_path}"], "arc/ARC-Easy")):
        p = subprocess.run([sys.executable, "-m", "launch.run", *args, *bad], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and needle in p.stdout + p.stderr, p.stdout + p.stderr
        assert "Traceback" not in p.stderr
    assert len(list(tmp_path.glob("eval/*/*"))) == 1


def test_import_native_dir_without_our_record(tiny, tmp_path):
    """A `nanochat` dir that did not come from us (no nanochat_hydra record in config.json) imports as the seed
    generation, weights bitwise."""
    import shutil
    env, run, _, native, _ = tiny
    src = tmp_path / "foreign"
    shutil.copytree(native, src)
    config = json.loads((src / "config.json").read_text())
    config.pop("nanochat_hydra")
    (src / "config.json").write_text(json.dumps(config))
    target = tmp_path / "imported"
    p = cli(env, "main_import", str(src), f"run.root={tmp_path}", f"run.dir={target}")
    assert p.returncode == 0, p.stderr
    from nanochat.checkpoint import latest_checkpoint, load_model_state
    a, b = load_model_state(latest_checkpoint(run)), load_model_state(latest_checkpoint(target))
    assert all(torch.equal(a[k], b[k]) for k in a)
