"""Chat tasks on the real offline data (../shared/data), and the task registry."""
import collections
import json

import pytest

from nanochat.common import shared_data_dir
from nanochat.execution import use_calculator
from nanochat.tasks import (ARC, GSM8K, MMLU, Arithmetic, CustomJSON, HumanEval, SimpleSpelling, SmolTalk,
                            SpellingBee, Task, TaskDataError, TaskMixture, TaskSequence, assistant_text,
                            extract_answer, make_task, render_mc)

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="offline data ../shared/data (NANOCHAT_SHARED_DATA) is absent")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty cache: only local files count."""
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path


class ListTask(Task):
    def __init__(self, items, **kw):
        super().__init__(**kw)
        self.items = items

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.items)

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": str(self.items[i])},
                             {"role": "assistant", "content": str(self.items[i])}]}

    def evaluate(self, conversation, completion):
        return completion == conversation["messages"][-1]["content"]


def _ids(task):
    return [ex["messages"][0]["content"] for ex in task]


# ----------------------------------------------------------------------------- base classes

def test_slicing():
    items = list(range(20))
    assert _ids(ListTask(items)) == [str(i) for i in items]
    for start, stop, step in [(0, None, 1), (3, 17, 4), (5, None, 3), (0, 100, 7), (19, 20, 1), (10, 10, 1)]:
        t = ListTask(items, start=start, stop=stop, step=step)
        assert _ids(t) == [str(i) for i in items[start:stop:step]]
        assert len(t) == len(items[start:stop:step])
    t = ListTask(items, start=2, step=5)
    assert t[-1]["messages"][0]["content"] == "17"
    with pytest.raises(IndexError):
        t[len(t)]
    with pytest.raises(ValueError, match="slice"):
        ListTask(items, step=0)


def test_mixture_is_deterministic_complete_and_oversamples():
    a, b = ListTask([f"a{i}" for i in range(30)]), ListTask([f"b{i}" for i in range(10)])
    m1, m2 = TaskMixture([a, b], seed=1), TaskMixture([a, b], seed=1)
    assert _ids(m1) == _ids(m2)
    assert _ids(m1) != _ids(TaskMixture([a, b], seed=2))
    assert sorted(_ids(m1)) == sorted(_ids(a) + _ids(b))  # every example exactly once
    assert _ids(m1)[:40] != _ids(a) + _ids(b)             # and shuffled
    over = TaskMixture([a, b, b], seed=1)                 # b listed twice: each b example twice
    counts = collections.Counter(_ids(over))
    assert len(over) == 50 and all(counts[f"b{i}"] == 2 for i in range(10)) and counts["a0"] == 1
    for i in range(len(over)):
        ex = over[i]
        assert over.task_of(i).evaluate(ex, ex["messages"][-1]["content"])
    assert len(TaskMixture([a, b], seed=1, stop=7)) == 7


def test_sequence_concatenates_in_order():
    a, b = ListTask(["x", "y"]), ListTask(["z"], start=0)
    s = TaskSequence([a, b])
    assert _ids(s) == ["x", "y", "z"]
    assert s.task_of(2) is b and s.task_of(0) is a
    assert _ids(TaskSequence([a, b], start=1)) == ["y", "z"]


def test_render_mc_puts_the_letter_after_each_choice():
    text = render_mc("What is the capital of France?", ["A", "B", "C"], ["Paris", "Rome", "Oslo"])
    assert text.splitlines()[:4] == ["Multiple Choice question: What is the capital of France?",
                                     "- Paris=A", "- Rome=B", "- Oslo=C"]
    assert text.endswith("Respond only with the letter of the correct answer.")


def test_extract_answer():
    assert extract_answer("so she makes $18.\n#### 18") == "18"
    assert extract_answer("#### 1,234") == "1234"
    assert extract_answer("#### -3.5 and later #### 7") == "7"
    assert extract_answer("#### $40.") == "40"
    assert extract_answer("the answer is 18") is None


# ----------------------------------------------------------------------------- datasets

@needs_data
def test_arc(offline):
    easy = ARC("ARC-Easy", "test")
    assert len(easy) == 2376 and easy.eval_type == "categorical"
    assert len(ARC("ARC-Easy", "train")) == 2251 and len(ARC("ARC-Easy", "validation")) == 570
    assert len(ARC("ARC-Challenge", "test")) == 1172
    ex = easy[0]
    assert ex["messages"][0]["content"].startswith("Multiple Choice question: Which statement best explains")
    assert "- Sunlight is the source of energy for nearly all ecosystems.=A" in ex["messages"][0]["content"]
    answer = ex["messages"][1]["content"]
    assert answer in ex["letters"]
    assert easy.evaluate(ex, answer) and easy.evaluate(ex, f" {answer}\n")
    assert not any(easy.evaluate(ex, l) for l in ex["letters"] if l != answer)
    assert easy.reward(ex, answer) == 1.0
    # some ARC questions have 3 or 5 choices: letters follow them
    assert {len(e["letters"]) for e in easy} >= {3, 4, 5}


@needs_data
def test_mmlu(offline):
    test = MMLU("all", "test")
    assert len(test) == 14042
    assert len(MMLU("all", "dev")) == 285
    assert len({ex["subject"] for ex in MMLU("all", "dev")}) == 57
    ex = test[0]
    assert ex["subject"] == "abstract_algebra" and ex["letters"] == ["A", "B", "C", "D"]
    # first row of abstract_algebra_test.csv: answer index 1 → "B", choice "4"
    assert ex["messages"][1]["content"] == "B" and "- 4=B" in ex["messages"][0]["content"]
    assert test.evaluate(ex, "B") and not test.evaluate(ex, "C")
    val = MMLU("all", "validation")  # pre-release hendrycks copy, letter answers
    assert len(val) == 1542 and all(e["messages"][1]["content"] in "ABCD" for e in val)


def test_mmlu_auxiliary_train_missing_is_a_clear_error(offline):
    with pytest.raises(TaskDataError, match=r"mmlu \(auxiliary_train/train\).*auxiliary_train"):
        MMLU("auxiliary_train", "train", data_dir=offline)
    with pytest.raises(ValueError, match="split"):
        MMLU("all", "train")


@needs_data
def test_gsm8k_tool_calls_and_grading(offline):
    train = GSM8K("train")
    assert len(train) == 7473 and len(GSM8K("test")) == 1319
    ex = train[0]
    parts = ex["messages"][1]["content"]
    assert parts[0] == {"type": "text", "text": "Natalia sold 48/2 = "}
    assert parts[1] == {"type": "python", "text": "48/2"} and parts[2] == {"type": "python_output", "text": "24"}
    assert "<<" not in assistant_text(parts)
    assert train.reference_answer(ex) == "72"
    assert train.evaluate(ex, "48 + 24 = 72 clips.\n#### 72")
    assert train.evaluate(ex, "#### 72.0")
    assert not train.evaluate(ex, "#### 71") and not train.evaluate(ex, "72")
    assert train.evaluate(ex, assistant_text(parts))  # the reference solution grades correct
    # the calculator reproduces the dataset's own annotations: a check of both
    calls = agree = 0
    for i in range(0, len(train), 5):
        p = train[i]["messages"][1]["content"]
        for call, out in zip(p, p[1:]):
            if call["type"] == "python":
                calls += 1
                got = use_calculator(call["text"])
                try:
                    agree += got is not None and abs(float(got) - float(out["text"])) < 1e-2 * max(1, abs(float(out["text"])))
                except ValueError:
                    pass
    assert calls > 3000 and agree / calls > 0.9, (agree, calls)


@needs_data
def test_humaneval_grades_in_the_sandbox(offline):
    he = HumanEval(timeout=1.0)
    assert len(he) == 164 and he.eval_type == "generative"
    for i in (0, 1, 2):
        ex = he[i]
        assert he.evaluate(ex, ex["messages"][1]["content"]), ex["task_id"]             # canonical solution
        assert he.evaluate(ex, "```python\n" + ex["messages"][1]["content"] + "```\n")  # in a fence
        assert not he.evaluate(ex, ex["messages"][0]["content"] + "    pass\n")
    ex = he[0]
    assert not he.evaluate(ex, ex["messages"][0]["content"] + "    while True:\n        pass\n")


@needs_data
@pytest.mark.slow
def test_humaneval_all_canonical_solutions_pass(offline):
    he = HumanEval()
    failed = [ex["task_id"] for ex in he if not he.evaluate(ex, ex["messages"][1]["content"])]
    assert failed == []


@needs_data
def test_spellingbee(offline):
    train, test = SpellingBee("train", size=300), SpellingBee("test", size=300)
    assert len(train) == 300
    assert train[5] == SpellingBee("train", size=300)[5]  # a pure function of the index
    words_train = {ex["word"] for ex in train}
    words_test = {ex["word"] for ex in test}
    assert not words_train & words_test
    for ex in list(train)[:100]:
        assert ex["answer"] == ex["word"].count(ex["letter"])
        parts = ex["messages"][1]["content"]
        call = next(p for p in parts if p["type"] == "python")
        assert use_calculator(call["text"]) == str(ex["answer"])
        assert train.evaluate(ex, assistant_text(parts))
        assert not train.evaluate(ex, f"#### {ex['answer'] + 1}")
        assert f"{ex['word']}:{','.join(ex['word'])}" in parts[0]["text"]
    tool = SpellingBee("train", size=10, style="tool")
    assert [p["type"] for p in tool[0]["messages"][1]["content"]] == ["python", "python_output", "text"]
    short = SpellingBee("train", size=50, max_len=4)
    assert all(len(ex["word"]) <= 4 for ex in short)


def test_simple_spelling_and_word_list_argument():
    words = ["cat", "dog", "horse", "zebra", "emu", "yak"] * 5
    t = SimpleSpelling("train", size=20, words=words)
    ex = t[0]
    word = ex["word"]
    assert ex["messages"][0]["content"] == f"Spell the word: {word}"
    assert ex["messages"][1]["content"] == word + ":" + ",".join(word)
    assert t.evaluate(ex, ex["messages"][1]["content"] + "\n") and not t.evaluate(ex, word)


def test_arithmetic_is_offline_correct_and_split(offline):
    train, test = Arithmetic("train", size=500, max_value=50), Arithmetic("test", size=500, max_value=50)
    seen = set()
    for ex in train:
        call, out, text = ex["messages"][1]["content"]
        assert call["type"] == "python" and out["type"] == "python_output"
        assert use_calculator(call["text"]) == out["text"] == str(ex["answer"])
        assert train.evaluate(ex, assistant_text(ex["messages"][1]["content"]))
        assert not train.evaluate(ex, f"#### {ex['answer'] + 1}")
        seen.add(call["text"])
    assert not seen & {ex["messages"][1]["content"][0]["text"] for ex in test}
    assert train[3] == Arithmetic("train", size=500, max_value=50)[3]
    plain = Arithmetic("train", size=3, style="plain")
    assert plain[0]["messages"][1]["content"] == f"#### {plain[0]['answer']}"
    with pytest.raises(ValueError, match="ops"):
        Arithmetic(ops="^")


def test_customjson(tmp_path):
    good = tmp_path / "conv.jsonl"
    rows = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": [{"type": "python", "text": "2+2"},
                                                            {"type": "python_output", "text": "4"}]}]}]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    t = CustomJSON(good)
    assert len(t) == 2 and t[0]["messages"][1]["content"] == "hello" and t[1]["messages"][0]["role"] == "system"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps([{"role": "user", "content": "a"},
                                                             {"role": "user", "content": "b"}]) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: message 1 has role 'user' but 'assistant' was expected"):
        CustomJSON(bad)
    with pytest.raises(TaskDataError, match="does not exist"):
        CustomJSON(tmp_path / "missing.jsonl")


@needs_data
def test_identity_conversations(offline):
    t = make_task("identity", "train")
    assert len(t) == 1000 and t[0]["messages"][0]["role"] == "user"


def test_smoltalk_local_file_and_missing_error(offline, tmp_path):
    f = tmp_path / "smol.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hey"},
                                          {"role": "assistant", "content": "hi there"}]}) + "\n")
    t = SmolTalk("train", path=f)
    assert len(t) == 1 and t[0]["messages"][1]["content"] == "hi there"
    with pytest.raises(TaskDataError, match=r"smoltalk.*HuggingFaceTB/smol-smoltalk"):
        SmolTalk("train", data_dir=tmp_path)


# the hub loader (through a local hub server) is tested in test_hub_tasks.py


# ----------------------------------------------------------------------------- registry

@needs_data
@pytest.mark.parametrize("spec,split,n", [
    ("arc_easy", "test", 2376), ("ARC-Challenge", "val", 299), ("mmlu", "test", 14042), ("mmlu", "dev", 285),
    ("gsm8k", "train", 7473), ("gsm8k", "val", 1319), ("humaneval", "test", 164), ("identity", "train", 1000),
    ("spellingbee", "train", 1000), ("spellingbee:size=50,style='tool'", "test", 50),
    ("simplespelling:size=20", "train", 20), ("arithmetic:size=30,max_value=9", "train", 30),
])
def test_make_task(offline, spec, split, n):
    task = make_task(spec, split)
    assert len(task) == n
    assert task[0]["messages"][0]["role"] in ("user", "system")


def test_make_task_options_and_errors(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) + "\n")
    assert len(make_task(f"customjson:{f}", "train")) == 1
    t = make_task({"name": "arithmetic", "size": 12, "ops": "+"}, "train", stop=5)
    assert len(t) == 5 and all("+" in ex["messages"][1]["content"][0]["text"] for ex in t)
    with pytest.raises(ValueError, match="did you mean 'gsm8k'"):
        make_task("gsm8", "train")
    with pytest.raises(ValueError, match="key=value"):
        make_task("spellingbee:200", "train")
    with pytest.raises(ValueError, match="needs a file"):
        make_task("customjson", "train")
    with pytest.raises(ValueError, match="bad options"):
        make_task("arithmetic:sizee=3", "train")
    with pytest.raises(ValueError, match="split"):
        make_task("humaneval", "train")


@needs_data
def test_every_task_renders_with_the_real_tokenizer(offline):
    from nanochat.tokenizer import train_tokenizer
    tok = train_tokenizer(iter([(DATA / "README.md").read_text()]), vocab_size=400)
    py_start = tok.encode_special("<|python_start|>")
    out_start = tok.encode_special("<|output_start|>")
    for spec, split in [("arc_easy", "test"), ("mmlu", "dev"), ("gsm8k", "test"), ("humaneval", "test"),
                        ("identity", "train"), ("spellingbee", "train"), ("simplespelling", "train"),
                        ("arithmetic", "train")]:
        task = make_task(spec, split)
        for i in range(3):
            ex = task[i]
            ids, mask = tok.render_conversation(ex, max_tokens=100_000)
            assert len(ids) == len(mask) and sum(mask) > 0, spec
            if spec in ("gsm8k", "spellingbee", "arithmetic"):
                assert py_start in ids and out_start in ids
                # the tool's output is never trained on
                assert all(m == 0 for t, m in zip(ids, mask) if t == out_start)
            if task.eval_type == "generative" and spec != "identity":
                prompt = tok.render_for_completion(ex)
                assert prompt[-1] == tok.encode_special("<|assistant_start|>")
