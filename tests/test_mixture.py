"""data=mixture: proportions by weight, exact resume, ranks × accumulation, per-source bpb, bad mixtures."""
from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY, run_cli
from nanochat.common import shared_data_dir
from nanochat.config import ConfigError, DataConfig, config_from_dict
from nanochat.dataloader import DataLoader
from nanochat.dataset import iter_texts
from nanochat.mixture import weights
from nanochat.stages.pretrain import SlotLoader
from nanochat.tokenizer import train_tokenizer

SHARED = shared_data_dir()
ALPHABETS = {"lower": "abcdefghij", "digits": "0123456789", "upper": "ABCDEFGHIJ"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three local sources whose texts share no character (no spaces: the split pattern keeps letters,
    digits and case apart), so every token of a row names its source. Document lengths differ a lot
    between sources: weights must hold in tokens, not in documents."""
    d = tmp_path_factory.mktemp("mix")
    rng = random.Random(0)
    lengths = {"lower": (5, 60), "digits": (80, 400), "upper": (20, 120)}
    for name, chars in ALPHABETS.items():
        docs = ["".join(rng.choice(chars) for _ in range(rng.randint(*lengths[name]))) for _ in range(400)]
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok = train_tokenizer(iter(["".join(ALPHABETS.values()) * 3] + [(d / f"{n}.jsonl").read_text()[:20000]
                                                                   for n in ALPHABETS]), 400)
    return d, tok, tmp_path_factory.mktemp("base")


def mix_cfg(d, w: dict, packing: str = "stream") -> DataConfig:
    return DataConfig(name="mix", source="mixture", packing=packing,
                      mixture={n: {"name": "local", "path": str(d / f"{n}.jsonl"), "weight": v} for n, v in w.items()})


def _take(loader, n):
    return [tuple(t.clone() for t in next(loader)) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("packing", ["stream", "bestfit"])
def test_token_shares_over_10000_rows_match_the_weights(corpus, packing):
    d, tok, base = corpus
    w = {"lower": 5.0, "digits": 3.0, "upper": 2.0}  # normalised to 0.5 / 0.3 / 0.2
    B, T = 50, 64
    dl = DataLoader(mix_cfg(d, w, packing), tok, B, T, "train", base_dir=base, seed=7, buffer_size=64)
    source_of = {}
    for i in range(tok.get_vocab_size()):
        text = tok.decode([i])
        for name, chars in ALPHABETS.items():
            if text and all(c in chars for c in text):
                source_of[i] = name
    bos = tok.get_bos_token_id()
    counts = dict.fromkeys(ALPHABETS, 0)
    for _ in range(10_000 // B):
        x, y = next(dl)
        rows = torch.cat([x, y[:, -1:]], dim=1).tolist()
        for row in rows:
            for a, b in zip(row, row[1:] + [None]):
                # a BOS belongs to the document it starts
                name = source_of.get(b) if a == bos else source_of.get(a)
                if name is not None:
                    counts[name] += 1
    dl.close()
    total = sum(counts.values())
    assert total > 0.99 * 10_000 * (T + 1)
    for name, share in weights(mix_cfg(d, w)).items():
        assert abs(counts[name] / total - share) < 0.01, (name, counts[name] / total, share)


@pytest.mark.parametrize("packing", ["stream", "bestfit"])
def test_resume_in_the_middle_equals_an_unbroken_run(corpus, packing):
    d, tok, base = corpus
    cfg = mix_cfg(d, {"lower": 0.6, "digits": 0.1, "upper": 0.3}, packing)
    kw = dict(batch_size=4, seq_len=48, split="train", base_dir=base, buffer_size=16, seed=3, rank=1, world_size=2)
    ref = DataLoader(cfg, tok, **kw)
    _take(ref, 150)  # the small-weight upper source is past its first epoch on this rank by now
    state = json.loads(json.dumps(ref.state_dict()))  # what a checkpoint holds
    assert state["epoch"] >= 0 and set(state["head" if packing == "stream" else "after"]["after"]) == set(ALPHABETS)
    after = _take(ref, 20)
    ref.close()
    resumed = DataLoader(cfg, tok, state=state, **kw)
    assert _same(_take(resumed, 20), after)
    resumed.close()
    # another seed is another interleaving of the same documents
    other = DataLoader(cfg, tok, **dict(kw, seed=4))
    assert not _same(_take(other, 5), _take(DataLoader(cfg, tok, **kw), 5))
    other.close()


def test_two_ranks_equal_one_rank_with_accumulation(corpus):
    """The global batch of each step: 2 ranks × accum 1 == 1 rank × accum 2 (pretrain's SlotLoader)."""
    d, tok, base = corpus
    cfg = SimpleNamespace(data=mix_cfg(d, {"lower": 0.5, "digits": 0.25, "upper": 0.25}, "bestfit"),
                          run=SimpleNamespace(seed=11))

    def loaders(world, accum):
        plan = SimpleNamespace(grad_accum_steps=accum, device_batch_size=3, sequence_len=32)
        return [SlotLoader(cfg, plan, SimpleNamespace(rank=r, world=world, device="cpu", base_dir=base), tok, None)
                for r in range(world)]

    def steps(slot_loaders, world, accum, n):
        out = []
        for _ in range(n):
            # the stream order of a step: slot j (the j-th micro-batch) of rank r is stream r + world·j
            parts = {r + world * j: next(sl)[0] for r, sl in enumerate(slot_loaders) for j in range(accum)}
            out.append(torch.cat([parts[s] for s in sorted(parts)]))
        return out

    ddp, acc = loaders(2, 1), loaders(1, 2)
    a, b = steps(ddp, 2, 1, 25), steps(acc, 1, 2, 25)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for sl in ddp + acc:
        sl.close()


def test_tokenizer_text_follows_the_weights_in_characters(corpus):
    d, _, base = corpus
    cfg = mix_cfg(d, {"lower": 0.2, "digits": 0.5, "upper": 0.3})
    chars = dict.fromkeys(ALPHABETS, 0)
    for text in iter_texts(cfg, base, "train", max_chars=60_000):
        chars[next(n for n, a in ALPHABETS.items() if text[0] in a)] += len(text)
    assert sum(chars.values()) == 60_000
    for name, share in weights(cfg).items():
        assert abs(chars[name] / 60_000 - share) < 0.01


def test_bad_mixture_entries_are_config_errors():
    def check(mixture, key):
        tree = {"data": {"name": "mixture", "source": "mixture", "mixture": mixture}}
        with pytest.raises(ConfigError) as e:
            config_from_dict(tree)
        assert e.value.key == key, e.value

    check({"web": {"name": "demo", "weight": 1, "pathh": "/x"}}, "data.mixture.web.pathh")
    check({"web": {"name": "demo", "weight": 1, "packing": "bestfit"}}, "data.mixture.web.packing")
    check({"web": {"name": "wiki", "weight": 1}}, "data.mixture.web.name")
    check({"web": {"name": "demo", "weight": -0.5}, "b": {"name": "demo", "weight": 1}}, "data.mixture.web.weight")
    check({"web": {"name": "demo"}}, "data.mixture.web.weight")
    check({"a": {"name": "demo", "weight": 0}, "b": {"name": "demo", "weight": 0.0}}, "data.mixture")
    check({"web": {"name": "demo", "weight": 1, "demo_chars": "many"}}, "data.mixture.web.demo_chars")
    check(None, "data.mixture")


# ---------------------------------------------------------------------- through nanochat-run

MIX = "data.mixture={web: {name: demo, weight: 0.7}, mine: {name: local, path: %s, weight: 0.3}}"


@pytest.mark.parametrize("mixture,key", [
    ("{web: {name: demo, weight: 1, pathh: /x}}", "data.mixture.web.pathh"),
    ("{web: {name: demo, weight: -1}, b: {name: demo, weight: 2}}", "data.mixture.web.weight"),
    ("{web: {name: demo, weight: 0}, b: {name: demo, weight: 0}}", "data.mixture"),
    ("{web: {name: demo, weight: 1}, mine: {name: local, path: /nonexistent/corpus, weight: 1}}",
     "data.mixture.mine.path"),
])
def test_bad_mixture_is_refused_before_any_run_dir(base_dir, workdir, mixture, key):
    root = workdir / "runs"
    p = run_cli([*TINY, "data=mixture", "data.tokenizer=demo", f"data.mixture={mixture}", f"run.root={root}",
                 "run.dry_run=true"], base_dir, workdir)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and f"ConfigError {key}" in out, out[-2000:]
    assert not root.exists()


def test_a_source_repeated_beyond_max_epochs_is_refused_and_weights_sweep(base_dir, workdir, tmp_path):
    small = tmp_path / ("a_long_directory_name_" * 6) / "small.jsonl"
    small.parent.mkdir()
    small.write_text("".join(json.dumps({"text": f"line {i} of a very small corpus"}) + "\n" for i in range(60)))
    args = [*TINY, "data=mixture", "data.tokenizer=demo", MIX % small, f"run.root={workdir / 'runs'}"]
    p = run_cli([*args, "run.dry_run=true"], base_dir, workdir)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "ConfigError data.mixture.mine.weight" in out and "max_epochs=4" in out, out[-2000:]
    p = run_cli([*args, "data.max_epochs=1000", "run.dry_run=true"], base_dir, workdir, check=True)
    assert "warning: source mine repeats" in p.stdout
    # a sweep over one weight: the weights are normalised in every job
    p = run_cli(["-m", *args, "data.max_epochs=1000", "data.mixture.mine.weight=0.1,0.7", "run.dry_run=true"],
                base_dir, workdir, check=True)
    assert "weight 0.125" in p.stdout and "weight 0.500" in p.stdout
    # job dirs are named after the overrides: the mixture dict makes that name long, so it is cut with a hash
    jobs = [d for d in (workdir / "runs" / "sweeps").glob("*/*") if d.is_dir()]
    assert len(jobs) == 2 and all(len(d.name) <= 200 for d in jobs)


@pytest.mark.skipif(SHARED is None, reason="../shared/data (offline public datasets) is absent")
def test_pretrain_on_a_mixture_records_bpb_per_source(base_dir, workdir):
    from nanochat.plots import training_curves
    from nanochat.scaling_report import mixture_table, read_run
    shakespeare = SHARED / "pretrain" / "tinyshakespeare.txt"
    run_dir = workdir / "run"
    run_cli([*TINY, "data=mixture", "data.tokenizer=demo", MIX % shakespeare, "model.depth=2",
             "stage.num_iterations=4", "stage.eval_every=2", "stage.eval_tokens=2048", "stage.save_every=-1",
             f"run.dir={run_dir}"], base_dir, workdir, check=True)
    result = json.loads((run_dir / "result.json").read_text())
    by = result["val_bpb_by_source"]
    assert set(by) == {"web", "mine"} and all(math.isfinite(v) and v > 0 for v in by.values())
    assert result["mixture"] == {"web": 0.7, "mine": 0.3}
    assert result["final_val_bpb"] == pytest.approx(0.7 * by["web"] + 0.3 * by["mine"])
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val/bpb/mine" in r] == [0, 2, 4]
    assert training_curves(run_dir, workdir / "curves.png", "pretrain").stat().st_size > 0
    rec = read_run(workdir, run_dir)
    assert rec.mixture == {"web": 0.7, "mine": 0.3} and rec.by_source == by
    assert any("| `run` |" in l and "0.700 | 0.300" in l for l in mixture_table([rec]))
