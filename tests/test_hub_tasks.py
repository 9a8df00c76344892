"""Task data through `datasets` (local files) and the hub (a local hub server, tests/hub_server.py),
the generic `hub:` task source, URL downloads and the CORE bundle from a hub repo."""
from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hub_server import HubServer
from nanochat import hub
from nanochat.core_eval import ensure_eval_bundle, load_core_tasks
from nanochat.tasks import ARC, GSM8K, MMLU, HumanEval, TaskDataError, make_task
from nanochat.tasks import common as tcommon
from nanochat.tasks.spellingbee import load_words


def _parquet(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


ARC_ROWS = [{"id": f"q{i}", "question": f"Question {i}?",
             "choices": {"text": ["yes", "no", "maybe"], "label": ["A", "B", "C"]}, "answerKey": "B"}
            for i in range(7)]
CHATS = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
         for i in range(5)]


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No shared data, an empty hub cache, an empty datasets cache, nothing offline."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "NANOCHAT_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "no_data").mkdir()
    return tmp_path


@pytest.fixture
def server(env, monkeypatch):
    with HubServer(token="hf_test_token") as s:
        monkeypatch.setenv("HF_ENDPOINT", s.endpoint)
        yield s


# ----------------------------------------------------------------------------- local files

def test_local_copies_load_through_datasets(env, monkeypatch):
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    d = env / "data"
    (d / "gsm8k").mkdir(parents=True)
    (d / "gsm8k" / "test.jsonl").write_text(
        "".join(json.dumps({"question": f"{i}+1?", "answer": f"<<{i}+1={i + 1}>>#### {i + 1}"}) + "\n"
                for i in range(3)))
    g = GSM8K("test", data_dir=d)
    assert len(g) == 3 and g.evaluate(g[2], "#### 3")
    # csv (header, numbers and "None" kept as text) in the cais layout, one split per subject file
    (d / "mmlu" / "cais_mmlu" / "dev").mkdir(parents=True)
    (d / "mmlu" / "cais_mmlu" / "dev" / "algebra_dev.csv").write_text(
        "question,choice0,choice1,choice2,choice3,answer\nWhat is 2+2?,4,None,22,0,0\n")
    (d / "mmlu" / "cais_mmlu" / "dev" / "law_dev.csv").write_text(
        'question,choice0,choice1,choice2,choice3,answer\n"Is it, legal?",yes,no,maybe,NA,1\n')
    m = MMLU("all", "dev", data_dir=d)
    assert [(r["subject"], r["choices"], r["answer"]) for r in m.rows] == \
        [("algebra", ["4", "None", "22", "0"], 0), ("law", ["yes", "no", "maybe", "NA"], 1)]
    # parquet and jsonl.gz given as paths
    arc = env / "arc.parquet"
    arc.write_bytes(_parquet(ARC_ROWS))
    assert ARC("ARC-Easy", "test", path=arc)[6]["messages"][1]["content"] == "B"
    he = env / "he.jsonl.gz"
    with gzip.open(he, "wt") as f:
        f.write(json.dumps({"task_id": "t/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
                            "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}) + "\n")
    assert HumanEval(path=he)[0]["entry_point"] == "f"
    # a broken file is named with the reader that failed
    bad = env / "bad.jsonl"
    bad.write_text('{"question": "a"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: could not read it as json"):
        GSM8K("test", path=bad)


# ----------------------------------------------------------------------------- hub tasks

def test_hub_task_comes_from_the_parquet_export_through_the_cache(server, env, monkeypatch):
    server.add_repo("allenai/ai2_arc", {"ARC-Easy/test/0000.parquet": _parquet(ARC_ROWS[:4]),
                                        "ARC-Easy/test/0001.parquet": _parquet(ARC_ROWS[4:]),
                                        "ARC-Challenge/test/0000.parquet": _parquet(ARC_ROWS[:1])},
                    revision=tcommon.PARQUET_REVISION)
    server.fail_times["ARC-Easy/test/0001.parquet"] = 1  # one 503: retried
    task = ARC("ARC-Easy", "test", data_dir=env / "no_data")
    assert len(task) == 7 and task[5]["messages"][1]["content"] == "B"
    assert "Question 5?" in task[5]["messages"][0]["content"]
    assert server.gets("ARC-Challenge/test/0000.parquet") == 0  # only the split asked for
    # again: answered from the hub cache without fetching a file
    n = server.gets(".parquet")
    assert len(ARC("ARC-Easy", "test", data_dir=env / "no_data")) == 7 and server.gets(".parquet") == n
    with pytest.raises(TaskDataError, match=r"arc \(ARC-Easy/validation\).*ARC-Easy/validation/\*.parquet"):
        ARC("ARC-Easy", "validation", data_dir=env / "no_data")
    # offline, the hub gone: the cache still answers, a miss says so
    server.__exit__()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert len(ARC("ARC-Easy", "test", data_dir=env / "no_data")) == 7
    with pytest.raises(TaskDataError, match=r"arc \(ARC-Challenge/test\).*not in the hub cache.*offline mode"):
        ARC("ARC-Challenge", "test", data_dir=env / "no_data")  # in the repo, never downloaded


def test_generic_hub_source_and_gated_dataset(server, env, monkeypatch):
    server.add_repo("someone/chats", {"default/train/0000.parquet": _parquet(CHATS),
                                      "default/test/0000.parquet": _parquet(CHATS[:2])},
                    revision=tcommon.PARQUET_REVISION, gated=True)
    with pytest.raises(TaskDataError, match=r"hub:someone/chats.*HTTP 401.*HF_TOKEN"):
        make_task("hub:someone/chats", "train")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    t = make_task("hub:someone/chats", "train")
    assert len(t) == 5 and t[3]["messages"][1]["content"] == "hello 3"
    assert len(make_task("hub:someone/chats:default:test", "train")) == 2  # the source's split wins
    assert len(make_task("hub:someone/chats", "val")) == 2
    with pytest.raises(TaskDataError, match=r"no 'conversation' column \(columns: \['messages'\]\)"):
        make_task({"name": "hub", "repo": "someone/chats", "column": "conversation"}, "train")
    with pytest.raises(ValueError, match=r"hub:<owner>/<name>\[:config\]\[:split\]"):
        make_task("hub:nochats", "train")


# ----------------------------------------------------------------------------- URLs and the bundle

def test_url_downloads_are_cached_locked_and_clean_on_failure(server, env, monkeypatch):
    server.static["words.txt"] = b"cat\ndog\nzebra\n"
    server.fail_times["words.txt"] = 1
    monkeypatch.setattr("nanochat.tasks.spellingbee.WORD_LIST_URL", f"{server.endpoint}/static/words.txt")
    assert load_words(data_dir=env / "no_data", base_dir=str(env / "base")) == ("cat", "dog", "zebra")
    gets = [p for m, p, _ in server.requests if m == "GET" and p == "/static/words.txt"]
    assert len(gets) == 2  # a 503, then the file; a second call reads the cache
    cached = hub.fetch_url(f"{server.endpoint}/static/words.txt", env / "base" / "downloads")
    assert cached.read_bytes() == b"cat\ndog\nzebra\n"
    assert len([p for m, p, _ in server.requests if p == "/static/words.txt"]) == 2
    with pytest.raises(hub.HubError, match=r"missing.txt: HTTP 404"):
        hub.fetch_url(f"{server.endpoint}/static/missing.txt", env / "dl", attempts=3, backoff=0.01)
    assert len([p for m, p, _ in server.requests if p == "/static/missing.txt"]) == 1  # a 404 is not retried
    assert not [p for p in (env / "dl").rglob("*") if p.is_file() and p.name != ".lock"]


def test_eval_bundle_from_a_hub_repo(server, env):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("eval_bundle/core.yaml", "icl_tasks:\n-\n  label: copa\n  dataset_uri: cr/copa.jsonl\n"
                                             "  num_fewshot: [0]\n  icl_task_type: multiple_choice\n")
        zf.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Random baseline\ncopa,50\n")
        zf.writestr("eval_bundle/eval_data/cr/copa.jsonl", json.dumps({"query": "q", "choices": ["a", "b"],
                                                                       "gold": 0}) + "\n")
    server.add_repo("someone/core", {"bundles/eval_bundle.zip": buf.getvalue()})
    got = ensure_eval_bundle(env / "base", "hf://datasets/someone/core/bundles/eval_bundle.zip", backoff_s=0.01)
    assert got == env / "base" / "eval_bundle" and [t.label for t in load_core_tasks(got)] == ["copa"]
    assert any(p.name == "eval_bundle.zip" for p in (env / "hub_cache").rglob("*"))  # in the hub cache
    assert hub.parse_hub_url(f"{server.endpoint}/datasets/someone/core/resolve/v1/bundles/eval_bundle.zip") == \
        ("someone/core", "v1", "bundles/eval_bundle.zip")


def test_datasets_and_huggingface_hub_are_imported_lazily():
    """`nanochat-run --help`, dry runs and task/dataset imports must not pay for `datasets` (seconds)."""
    import subprocess
    import sys
    code = ("import sys, launch.run, nanochat.dataset, nanochat.tasks, nanochat.core_eval, nanochat.hub; "
            "print(sorted(m for m in ('datasets', 'huggingface_hub', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
