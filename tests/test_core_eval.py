"""CORE: bundle download, task loading, prompt rendering, scoring spans, and real-model scoring.

Everything runs on real components: a local HTTP server for the download, the offline bundle in
../shared/data/eval_bundle, a nanochat tokenizer trained here, and small nanochat GPTs.
"""
import gzip
import http.server
import io
import json
import random
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from nanochat.common import shared_data_dir
from nanochat.core_eval import (centered_accuracy, core_summary, crop_left, ensure_eval_bundle,
                                evaluate_core, evaluate_task, fewshot_indices, load_core_tasks,
                                load_task_examples, prepare_example, render_prompts, score_example,
                                scored_spans, task_order, write_core_csv)

SHARED = shared_data_dir()
BUNDLE = SHARED / "eval_bundle" if SHARED else None
needs_bundle = pytest.mark.skipif(BUNDLE is None or not (BUNDLE / "core.yaml").is_file(),
                                  reason="../shared/data/eval_bundle (the offline CORE bundle) is absent")


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and stay fast when other jobs share the 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    """A real nanochat tokenizer, trained on ~300k chars of the shared C4 sample (fast)."""
    if SHARED is None:
        pytest.skip("../shared/data is absent: no text to train the test tokenizer on")
    from nanochat.tokenizer import train_tokenizer
    docs, n = [], 0
    with gzip.open(SHARED / "pretrain" / "c4-sample.00000-of-00001.json.gz", "rt", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line)["text"])
            n += len(docs[-1])
            if n > 300_000:
                break
    return train_tokenizer(iter(docs), 1024)


def tiny_gpt(vocab_size, seq_len=128, seed=0):
    """A real nanochat GPT, depth 2, width 64."""
    from nanochat.gpt import GPTConfig, build_model
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    return build_model(cfg, "cpu", seed)


def randomize(model, seed=0):
    """Random weights everywhere (std 2/sqrt(fan_in)). nanochat's init zeroes the output projections
    and makes the logits ~0, so every choice ties; a random model for the chance-level test has to
    actually prefer something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2.0 / max(1, p.shape[-1]) ** 0.5)
    return model


# ----------------------------------------------------------------------------- the bundle download

def make_bundle_zip(top="eval_bundle") -> bytes:
    """A small but complete CORE bundle as zip bytes (core.yaml, meta csv, one data file)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{top}/core.yaml", "icl_tasks:\n-\n  label: copa\n  dataset_uri: cr/copa.jsonl\n"
                                        "  num_fewshot: [0]\n  icl_task_type: multiple_choice\n")
        zf.writestr(f"{top}/eval_meta_data.csv", "Eval Task,Random baseline\ncopa,50\n")
        zf.writestr(f"{top}/eval_data/cr/copa.jsonl",
                    json.dumps({"query": "It rained, therefore", "choices": ["wet.", "dry."], "gold": 0}) + "\n")
    return buf.getvalue()


class _Server:
    """A real HTTP server on 127.0.0.1; `plan` is the list of responses, one per request
    ('ok', an int status, or 'truncated'), the last one repeating."""

    def __init__(self, payload: bytes, plan):
        self.payload, self.plan, self.requests = payload, list(plan), 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                step = outer.plan[min(outer.requests, len(outer.plan) - 1)]
                outer.requests += 1
                if isinstance(step, int):
                    self.send_response(step)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = outer.payload if step == "ok" else outer.payload[: len(outer.payload) // 2]
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(outer.payload)))  # truncated lies here
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/eval_bundle.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_unzips_bundle_atomically(tmp_path):
    with _Server(make_bundle_zip(), ["ok"]) as srv:
        path = ensure_eval_bundle(tmp_path, None, url=srv.url, backoff_s=0.01)
        assert path == tmp_path / "eval_bundle"
        assert [s.label for s in load_core_tasks(path)] == ["copa"]
        assert load_core_tasks(path)[0].available
        # second call: already there, no new request
        assert ensure_eval_bundle(tmp_path, None, url=srv.url) == path
        assert srv.requests == 1
    # nothing left behind but the bundle and the cached zip: no temp files, no extraction dirs
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".eval_bundle.lock") == ["downloads", "eval_bundle"]
    assert [p.name for p in (tmp_path / "downloads").rglob("*") if p.is_file() and p.name != ".lock"] == \
        ["eval_bundle.zip"]


def test_download_retries_server_errors_and_truncation(tmp_path):
    with _Server(make_bundle_zip(top="some_other_name"), [503, "truncated", 500, "ok"]) as srv:
        path = ensure_eval_bundle(tmp_path, None, url=srv.url, retries=5, backoff_s=0.01)
        assert srv.requests == 4
    assert (path / "eval_data" / "cr" / "copa.jsonl").is_file()
    assert not list(tmp_path.rglob("*.incomplete")) and not list(tmp_path.glob(".eval_bundle.extract-*"))


def test_download_gives_up_with_clear_error(tmp_path):
    with _Server(make_bundle_zip(), [503]) as srv:
        with pytest.raises(RuntimeError, match=r"after 3 attempts.*paths.eval_bundle"):
            ensure_eval_bundle(tmp_path, None, url=srv.url, retries=3, backoff_s=0.01)
        assert srv.requests == 3
    with _Server(make_bundle_zip(), [404]) as srv:  # a client error is not retried
        with pytest.raises(RuntimeError, match="HTTP 404"):
            ensure_eval_bundle(tmp_path, None, url=srv.url, retries=3, backoff_s=0.01)
        assert srv.requests == 1
    assert not (tmp_path / "eval_bundle").exists()


def test_download_rejects_a_zip_without_core_yaml(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "not a bundle")
    with _Server(buf.getvalue(), ["ok"]) as srv:
        with pytest.raises(RuntimeError, match="no core.yaml"):
            ensure_eval_bundle(tmp_path, None, url=srv.url, backoff_s=0.01)
    assert not (tmp_path / "eval_bundle").exists()


def test_concurrent_callers_download_once(tmp_path):
    with _Server(make_bundle_zip(), ["ok"]) as srv:
        out, errs = [], []

        def call():
            try:
                out.append(ensure_eval_bundle(tmp_path, None, url=srv.url, backoff_s=0.01))
            except Exception as e:  # pragma: no cover - reported below
                errs.append(e)
        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errs and len(out) == 4 and srv.requests == 1


def test_configured_bundle_wins_and_missing_one_falls_back(tmp_path):
    local = tmp_path / "mine"
    with zipfile.ZipFile(io.BytesIO(make_bundle_zip())) as zf:
        zf.extractall(local)
    assert ensure_eval_bundle(tmp_path / "base", str(local / "eval_bundle")) == local / "eval_bundle"
    with _Server(make_bundle_zip(), ["ok"]) as srv:
        got = ensure_eval_bundle(tmp_path / "base", str(tmp_path / "nope"), url=srv.url, backoff_s=0.01)
        assert got == tmp_path / "base" / "eval_bundle" and srv.requests == 1


# ----------------------------------------------------------------------------- tasks and math

@needs_bundle
def test_load_core_tasks_from_offline_bundle():
    specs = load_core_tasks(BUNDLE)
    by = {s.label: s for s in specs}
    assert len(specs) == 22
    assert [s.label for s in specs if not s.available] == ["squad", "coqa"]
    assert by["jeopardy"].task_type == "language_modeling" and by["jeopardy"].num_fewshot == 10
    assert by["jeopardy"].continuation_delimiter == "\nAnswer: "
    assert by["copa"].continuation_delimiter == " " and by["copa"].num_fewshot == 0
    assert by["winograd"].task_type == "schema"
    assert by["agi_eval_lsat_ar"].num_fewshot == 3
    assert (by["boolq"].random_baseline, by["bigbench_language_identification"].random_baseline) == (62, 9.1)
    assert by["hellaswag"].random_baseline == 25 and by["lambada_openai"].random_baseline == 0


def test_load_core_tasks_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no core.yaml"):
        load_core_tasks(tmp_path)
    (tmp_path / "core.yaml").write_text("icl_tasks:\n- {label: x, dataset_uri: x.jsonl, icl_task_type: ranking}\n")
    (tmp_path / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nx,0\n")
    with pytest.raises(ValueError, match="ranking"):
        load_core_tasks(tmp_path)
    (tmp_path / "core.yaml").write_text("icl_tasks:\n- {label: y, dataset_uri: y.jsonl, icl_task_type: schema}\n")
    with pytest.raises(ValueError, match="y: no 'Random baseline'"):
        load_core_tasks(tmp_path)


def test_centered_accuracy():
    assert centered_accuracy(0.25, 25) == 0.0
    assert centered_accuracy(1.0, 25) == 1.0
    assert centered_accuracy(0.625, 25) == pytest.approx(0.5)
    assert centered_accuracy(0.0, 50) == pytest.approx(-1.0)
    assert centered_accuracy(0.3, 0) == pytest.approx(0.3)
    assert centered_accuracy(0.81, 62) == pytest.approx(0.5)
    assert centered_accuracy(0.091, 9.1) == pytest.approx(0.0)


def test_fewshot_sampling_is_seeded_and_never_includes_the_item():
    for idx in (0, 7, 99):
        a = fewshot_indices(100, idx, 10)
        assert a == fewshot_indices(100, idx, 10)          # same seed, same shots
        assert idx not in a and len(set(a)) == 10 and all(0 <= i < 100 for i in a)
        assert a != fewshot_indices(100, idx, 10, seed=999)  # the seed matters
    assert fewshot_indices(100, 3, 10) != fewshot_indices(100, 4, 10)  # per-item draws
    # nanochat's rule: random.Random(1234 + idx).sample(others, k)
    assert fewshot_indices(50, 5, 3) == random.Random(1239).sample([i for i in range(50) if i != 5], 3)
    small = fewshot_indices(3, 1, 10)                   # small pools: all the others, no crash
    assert len(small) == 2 and set(small) == {0, 2}
    assert fewshot_indices(1, 0, 5) == [] and fewshot_indices(10, 0, 0) == []


# ----------------------------------------------------------------------------- prompt rendering

def test_render_multiple_choice():
    shot = {"query": "Q: 1+1?", "choices": ["3", "2"], "gold": 1}
    item = {"query": "Q: 2+2?", "choices": ["4", "5"], "gold": 0}
    assert render_prompts("multiple_choice", item, "\nAnswer: ", [shot, shot]) == [
        "Q: 1+1?\nAnswer: 2\n\nQ: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: 4",
        "Q: 1+1?\nAnswer: 2\n\nQ: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: 5"]
    assert render_prompts("multiple_choice", item, " ", []) == ["Q: 2+2? 4", "Q: 2+2? 5"]


def test_render_schema():
    shot = {"context_options": ["The cat", "The dog"], "continuation": "barked.", "gold": 1}
    item = {"context_options": ["Ann gave Bo a gift because Ann", "Ann gave Bo a gift because Bo"],
            "continuation": "was kind.", "gold": 0}
    assert render_prompts("schema", item, " ", [shot]) == [
        "The dog barked.\n\nAnn gave Bo a gift because Ann was kind.",
        "The dog barked.\n\nAnn gave Bo a gift because Bo was kind."]


def test_render_language_modeling_strips_contexts():
    shot = {"context": "  Capital of France:  ", "continuation": "Paris"}
    item = {"context": "Capital of Italy: \n", "continuation": "Rome"}
    assert render_prompts("language_modeling", item, "\nAnswer: ", [shot]) == [
        "Capital of France:\nAnswer: Paris\n\nCapital of Italy:\nAnswer:",
        "Capital of France:\nAnswer: Paris\n\nCapital of Italy:\nAnswer: Rome"]
    assert render_prompts("language_modeling", item, " ", []) == ["Capital of Italy:", "Capital of Italy: Rome"]
    with pytest.raises(ValueError, match="ranking"):
        render_prompts("ranking", item, " ", [])


@needs_bundle
def test_render_real_bundle_items():
    by = {s.label: s for s in load_core_tasks(BUNDLE)}
    copa = load_task_examples(by["copa"])[0]
    assert render_prompts("multiple_choice", copa, " ", []) == [
        "The man turned on the faucet, therefore the toilet filled with water.",
        "The man turned on the faucet, therefore water flowed from the spout."]
    wino = load_task_examples(by["winograd"])[0]
    assert render_prompts("schema", wino, " ", [])[1] == \
        "The city councilmen refused the demonstrators a permit because the demonstrators feared violence."
    jeo = load_task_examples(by["jeopardy"])[1]
    assert render_prompts("language_modeling", jeo, "\nAnswer: ", [])[1] == (
        "WORLD HISTORY: Accused of accepting bribes, Francis Bacon was imprisoned in this forbidding "
        "complex in 1621\nAnswer: Tower of London")


# ----------------------------------------------------------------------------- spans

def test_scored_spans():
    # mc: the choices start after the common prefix
    assert scored_spans("multiple_choice", [[9, 5, 6, 7], [9, 5, 6, 8, 1]]) == \
        ([[9, 5, 6, 7], [9, 5, 6, 8, 1]], [3, 3], [4, 5])
    # schema: the shared continuation is the common suffix
    assert scored_spans("schema", [[9, 2, 7, 7], [9, 3, 3, 7, 7]])[1:] == ([2, 3], [4, 5])
    # lm: only the full prompt, scored after the context-only prefix
    assert scored_spans("language_modeling", [[9, 1, 2], [9, 1, 2, 3, 4]]) == ([[9, 1, 2, 3, 4]], [3], [5])
    # lm with a merge across the boundary: falls back to the common prefix
    assert scored_spans("language_modeling", [[9, 1, 2], [9, 1, 5, 4]])[1:] == ([2], [4])
    # degenerate: identical choices still score one token, never position 0
    assert scored_spans("multiple_choice", [[9, 2], [9, 2]])[1:] == ([1, 1], [2, 2])


def test_crop_left_keeps_the_end_and_shifts_spans():
    seqs, s, e = crop_left([list(range(10)), list(range(3))], [8, 1], [10, 3], 4)
    assert seqs == [[6, 7, 8, 9], [0, 1, 2]] and s == [2, 1] and e == [4, 3]
    assert crop_left([[1, 2, 3]], [1], [3], None) == ([[1, 2, 3]], [1], [3])


@needs_bundle
def test_prepare_example_is_deterministic_and_self_free(tokenizer):
    spec = {s.label: s for s in load_core_tasks(BUNDLE)}["arc_easy"]
    pool = task_order(load_task_examples(spec))
    assert pool == task_order(load_task_examples(spec)) and pool != load_task_examples(spec)
    a = prepare_example(tokenizer, spec, pool, 3, None)
    assert a == prepare_example(tokenizer, spec, pool, 3, None)
    prompts = render_prompts(spec.task_type, pool[3], spec.continuation_delimiter,
                             [pool[i] for i in fewshot_indices(len(pool), 3, 10)])
    shots_text = prompts[0].rsplit("\n\n", 1)[0]
    assert pool[3]["query"] not in shots_text and shots_text.count("\nAnswer: ") == 10
    seqs, starts, ends = a
    assert len(seqs) == len(pool[3]["choices"]) and all(t[0] == tokenizer.get_bos_token_id() for t in seqs)
    for t, s, e, choice in zip(seqs, starts, ends, pool[3]["choices"]):
        assert tokenizer.decode(t) == "<|bos|>" + prompts[0][: -len(pool[3]["choices"][0])] + choice
        assert choice.endswith(tokenizer.decode(t[s:e]).strip()) and e == len(t)
    # crop to 64 tokens: the spans still point at the same tokens
    cseqs, cs, ce = prepare_example(tokenizer, spec, pool, 3, 64)
    for t, s, e, ct, c_s, c_e in zip(seqs, starts, ends, cseqs, cs, ce):
        assert len(ct) == min(64, len(t)) and ct[c_s:c_e] == t[s:e]


# ----------------------------------------------------------------------------- scoring with real models

@needs_bundle
def test_random_model_scores_near_chance(tokenizer):
    """200 four-way HellaSwag items: a random model lands near 25% (binomial sd ~3%)."""
    spec = {s.label: s for s in load_core_tasks(BUNDLE)}["hellaswag_zeroshot"]
    model = randomize(tiny_gpt(tokenizer.get_vocab_size()), seed=1)
    acc = evaluate_task(model, tokenizer, spec, load_task_examples(spec), "cpu", max_per_task=200)
    assert abs(acc - 0.25) < 0.12, acc
    assert abs(centered_accuracy(acc, spec.random_baseline)) < 0.16


@needs_bundle
def test_evaluate_core_on_offline_bundle(tokenizer, tmp_path):
    model = randomize(tiny_gpt(tokenizer.get_vocab_size(), seq_len=128), seed=2)
    model.train()
    out = evaluate_core(model, tokenizer, BUNDLE, "cpu", max_per_task=3, progress=False)
    assert model.training  # mode restored
    assert out["tasks_skipped"] == ["squad", "coqa"]
    assert out["tasks_evaluated"] == 20 and out["tasks_total"] == 22 and len(out["results"]) == 20
    baselines = {s.label: s.random_baseline for s in load_core_tasks(BUNDLE)}
    for label, r in out["results"].items():
        assert r["num_examples"] == 3
        assert round(r["accuracy"] * 3, 4) in (0, 1, 2, 3)
        assert r["centered"] == pytest.approx(centered_accuracy(r["accuracy"], baselines[label]))
    assert out["core"] == pytest.approx(sum(r["centered"] for r in out["results"].values()) / 20)
    assert core_summary(out).startswith(f"CORE {out['core']:.4f} over 20 of 22 tasks")
    assert "squad, coqa" in core_summary(out)
    # deterministic: same model, same numbers
    again = evaluate_core(model, tokenizer, BUNDLE, "cpu", max_per_task=3, tasks=["copa", "jeopardy"],
                          progress=True)
    assert again["results"]["copa"] == out["results"]["copa"]
    assert again["results"]["jeopardy"] == out["results"]["jeopardy"]
    assert again["tasks_evaluated"] == 2 and again["tasks_skipped"] == []
    with pytest.raises(ValueError, match="unknown CORE task.*nope"):
        evaluate_core(model, tokenizer, BUNDLE, "cpu", max_per_task=1, tasks=["nope"])


# A synthetic bundle whose answers a tiny model can memorize: if the whole pipeline (rendering,
# tokenization, spans, argmin of the mean loss, greedy exact match, centering) is right, a model
# trained on the gold texts scores 100%, and 0% when the gold labels are flipped.
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory",
         "Oscar", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Wendy", "Xavier", "Yvonne",
         "Zack", "Laura", "Nina"]
FOODS = ["apples", "bread", "cheese", "dates", "eggs", "figs", "grapes", "honey", "rice", "soup", "tea", "jam"]
PLACES = ["school", "market", "river", "castle", "garden", "harbor", "temple", "forest", "church", "office",
          "bridge", "field"]


def synthetic_tasks():
    rng = random.Random(0)
    mc, schema, lm = [], [], []
    for i in range(12):
        gold_food, other = rng.sample(FOODS, 2)
        g = rng.randrange(2)
        choices = [other, other]
        choices[g] = gold_food
        mc.append({"query": f"{NAMES[i]} likes", "choices": choices, "gold": g})
        g = rng.randrange(2)
        opts = [f"{NAMES[2 * i + 1]} went to the"] * 2
        opts[g] = f"{NAMES[2 * i]} went to the"
        schema.append({"context_options": opts, "continuation": PLACES[i], "gold": g})
        lm.append({"context": f"The secret of {NAMES[i]} is",
                   "continuation": f"{FOODS[i * 5 % 12]} and {PLACES[i * 7 % 12]}"})
    return mc, schema, lm


def write_synthetic_bundle(root: Path, mc, schema, lm) -> Path:
    tasks = [("likes", "multiple_choice", mc, 50), ("likes_flipped", "multiple_choice",
             [dict(e, gold=1 - e["gold"]) for e in mc], 50),
             ("went", "schema", schema, 50), ("secret", "language_modeling", lm, 0)]
    yaml_lines, csv_lines = ["icl_tasks:"], ["Eval Task,Random baseline"]
    for label, kind, items, baseline in tasks + [("ghost", "language_modeling", None, 0)]:
        yaml_lines += ["-", f"  label: {label}", f"  dataset_uri: syn/{label}.jsonl", "  num_fewshot: [0]",
                       f"  icl_task_type: {kind}"]
        csv_lines.append(f"{label},{baseline}")
        if items is not None:
            (root / "eval_data" / "syn").mkdir(parents=True, exist_ok=True)
            (root / "eval_data" / "syn" / f"{label}.jsonl").write_text(
                "".join(json.dumps(e) + "\n" for e in items))
    (root / "core.yaml").write_text("\n".join(yaml_lines) + "\n")
    (root / "eval_meta_data.csv").write_text("\n".join(csv_lines) + "\n")
    return root


def test_trained_model_gets_memorized_answers_right(tokenizer, tmp_path):
    mc, schema, lm = synthetic_tasks()
    bundle = write_synthetic_bundle(tmp_path / "bundle", mc, schema, lm)
    texts = ([f"{e['query']} {e['choices'][e['gold']]}" for e in mc]
             + [f"{e['context_options'][e['gold']]} {e['continuation']}" for e in schema]
             + [f"{e['context']} {e['continuation']}" for e in lm])
    bos = tokenizer.get_bos_token_id()
    ids = tokenizer.encode(texts, prepend=bos)
    T = max(map(len, ids))
    x = torch.full((len(ids), T), bos)
    y = torch.full((len(ids), T), -1)
    for i, t in enumerate(ids):
        x[i, :len(t)] = torch.tensor(t)
        y[i, :len(t) - 1] = torch.tensor(t[1:])
    model = tiny_gpt(tokenizer.get_vocab_size(), seq_len=64, seed=0)
    before = evaluate_core(model, tokenizer, bundle, "cpu", progress=False)
    assert before["results"]["secret"]["accuracy"] == 0.0  # an untrained model can't produce them
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(100):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = evaluate_core(model, tokenizer, bundle, "cpu", progress=False)
    acc = {k: r["accuracy"] for k, r in out["results"].items()}
    assert acc == {"likes": 1.0, "likes_flipped": 0.0, "went": 1.0, "secret": 1.0}, acc
    assert out["results"]["likes_flipped"]["centered"] == -1.0
    assert out["tasks_skipped"] == ["ghost"] and out["tasks_evaluated"] == 4
    assert out["core"] == pytest.approx((1 - 1 + 1 + 1) / 4)
    # the CSV has one row per task, the skipped one, and the CORE row
    write_core_csv(out, tmp_path / "core.csv")
    rows = (tmp_path / "core.csv").read_text().splitlines()
    assert rows[0] == "task,accuracy,centered,num_examples,random_baseline"
    assert rows[1] == "likes,1.000000,1.000000,12,50.0"
    assert rows[2] == "likes_flipped,0.000000,-1.000000,12,50.0"
    assert rows[-2] == "ghost,,,0," and rows[-1] == "CORE,,0.500000,4,"


def test_progress_can_join_an_existing_rich_bar(tokenizer, tmp_path):
    from rich.console import Console
    from rich.progress import Progress
    mc, schema, lm = synthetic_tasks()
    bundle = write_synthetic_bundle(tmp_path / "bundle", mc, schema, lm)
    model = tiny_gpt(tokenizer.get_vocab_size(), seq_len=64)
    with Progress(console=Console(file=io.StringIO())) as bar:  # a training loop's live bar
        outer = bar.add_task("train", total=10)
        out = evaluate_core(model, tokenizer, bundle, "cpu", max_per_task=2, tasks=["likes", "went"],
                            progress=bar)
        assert [t.id for t in bar.tasks] == [outer]  # our row was removed again
    assert out["tasks_evaluated"] == 2


def bigram_gpt(vocab_size=64, table=None):
    """A real GPT whose weights make it an exact bigram model: with the output projections at zero
    (nanochat's init) every block is the identity, so the logits at a position depend only on its
    token. wte row t = e_t (RMS-normed to sqrt(64)·e_t); lm_head[:, t] = table[t] / sqrt(64), i.e.
    table[t][j] is the (pre-softcap) logit of token j after token t."""
    model = tiny_gpt(vocab_size, seq_len=16)
    with torch.no_grad():
        model.transformer.wte.weight.copy_(torch.eye(vocab_size, 64))
        model.lm_head.weight.zero_()
        for prev, row in (table or {}).items():
            for nxt, logit in row.items():
                model.lm_head.weight[nxt, prev] = logit / 8.0
    return model


def test_choices_are_ranked_by_mean_not_total_loss():
    """Choice A = one token with loss ~2.3; choice B = a token with loss ~3.3 then a near-certain one.
    B has the larger total but the smaller mean loss, and DCLM/nanochat pick by the mean."""
    BOS, C, A1, B1, B2 = 0, 1, 2, 3, 4
    model = bigram_gpt(table={C: {A1: 2.0, B1: 1.0}, B1: {B2: 40.0}})
    seqs, starts, ends = [[BOS, C, A1], [BOS, C, B1, B2]], [2, 2], [3, 4]
    with torch.no_grad():  # the premise, from the logits themselves
        logp = torch.log_softmax(model(torch.tensor([[BOS, C, B1, B2]])), dim=-1)[0]
        loss_a, loss_b1, loss_b2 = -logp[1, A1].item(), -logp[1, B1].item(), -logp[2, B2].item()
    assert loss_b1 + loss_b2 > loss_a > (loss_b1 + loss_b2) / 2
    assert score_example(model, seqs, starts, ends, "multiple_choice", 1, BOS, "cpu")
    assert not score_example(model, seqs, starts, ends, "multiple_choice", 0, BOS, "cpu")


def test_language_modeling_needs_every_token_greedy():
    BOS, C, X, Y, Z = 0, 1, 2, 3, 4
    model = bigram_gpt(table={C: {X: 5.0}, X: {Y: 5.0, Z: 4.0}})   # greedy after C: X then Y
    assert score_example(model, [[BOS, C, X, Y]], [2], [4], "language_modeling", None, BOS, "cpu")
    assert not score_example(model, [[BOS, C, X, Z]], [2], [4], "language_modeling", None, BOS, "cpu")
    assert not score_example(model, [[BOS, C, Y, Y]], [2], [4], "language_modeling", None, BOS, "cpu")
    # the context itself is not scored: a wrong-by-greedy context token doesn't matter
    assert score_example(model, [[BOS, Z, C, X, Y]], [3], [5], "language_modeling", None, BOS, "cpu")
