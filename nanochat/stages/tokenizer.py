"""Stage `tokenizer`: train a BPE on `data`, save it by name, evaluate its compression.

    nanochat-run stage=tokenizer data=demo stage.vocab_size=4096 stage.max_chars=20000000

The artifact goes to `<base_dir>/tokenizer/<data.tokenizer>/` where later stages find it.
Returns the metrics (the harness writes them to result.json): training time, chars/s,
vocab size, and bytes per token on held-out text of each source, next to GPT-2 / GPT-4
when tiktoken has those encodings cached locally (skipped with a note otherwise).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from nanochat.common import atomic_write_json, get_base_dir, print0, shared_data_dir
from nanochat.config import Config, TokenizerStageConfig
from nanochat.results import TokenizerResult
from nanochat.stage_plan import SourceRun, StagePlan, mixture_rows
from nanochat.stages import Stage
from nanochat.tokenizer import tokenizer_dir, train_tokenizer

# tiktoken's reference encodings: (tiktoken's name, the files it needs in its cache)
_REFERENCE = {
    "gpt2": ("gpt2", ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                      "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"]),
    "gpt4": ("cl100k_base", ["https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"]),
}


def reference_encodings() -> tuple[dict, dict]:
    """({name: tiktoken.Encoding}, {name: note}) for the references cached locally; never downloads."""
    import tiktoken
    encs, notes = {}, {}
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")  # where tiktoken keeps them (sha1 of the url)
    for name, (enc_name, urls) in _REFERENCE.items():
        if not all(os.path.isfile(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in urls):
            notes[name] = f"skipped: tiktoken {enc_name} is not cached in {cache} (offline)"
            continue
        try:
            encs[name] = tiktoken.get_encoding(enc_name)
        except Exception as e:  # a corrupt cache entry must not fail the stage
            notes[name] = f"skipped: {type(e).__name__}: {e}"
    return encs, notes


def _take_chars(texts: Iterable[str], n: int) -> str:
    out, total = [], 0
    for t in texts:
        out.append(t[: n - total])
        total += len(out[-1])
        if total >= n:
            break
    return "\n\n".join(out)


def eval_sources(cfg: Config, base_dir: Path) -> dict[str, Callable[[], str]]:
    """Text per evaluation source, each up to stage.eval_chars.

    `<data>/train` is the text the tokenizer was trained on, `<data>/val` its held-out split;
    the shared public samples (C4, Common Crawl, Shakespeare) are other distributions.
    """
    from nanochat.dataset import TEXT_COLUMN, iter_texts, open_shard  # pyarrow: not at the launcher's import
    n = cfg.stage.eval_chars
    name = cfg.data.name
    sources: dict[str, Callable[[], str]] = {
        f"{name}/train": lambda: _take_chars(iter_texts(cfg.data, base_dir, "train", doc_cap=cfg.stage.doc_cap), n),
        f"{name}/val": lambda: _take_chars(iter_texts(cfg.data, base_dir, "val"), n),
    }
    if cfg.data.source == "mixture":  # each source's held-out text too
        from nanochat.mixture import source_configs
        for src, c in source_configs(cfg.data).items():
            sources[f"{name}/{src}/val"] = lambda c=c: _take_chars(iter_texts(c, base_dir, "val"), n)
    shared = shared_data_dir(cfg.paths.shared_data)
    if shared is not None:
        pre = shared / "pretrain"
        txt = pre / "tinyshakespeare.txt"
        for label, path in (("c4", pre / "parquet" / "shard_00000.parquet"),
                            ("common_crawl", pre / "parquet" / "shard_00001.parquet")):
            if path.is_file():
                sources[label] = lambda p=path: _take_chars(
                    open_shard(p).read(columns=[TEXT_COLUMN]).column(0).to_pylist(), n)
        if txt.is_file():
            sources["shakespeare"] = lambda: txt.read_text(encoding="utf-8")[:n]
    return sources


def compression_table(tokenizer, sources: dict[str, Callable[[], str]]) -> tuple[dict, dict]:
    """bytes/token per source for ours and the locally available references."""
    refs, notes = reference_encodings()
    table = {}
    for label, get_text in sources.items():
        try:
            text = get_text()
        except Exception as e:  # e.g. val_fraction=0 means no val split: report, don't fail
            notes[label] = f"skipped: {type(e).__name__}: {e}"
            continue
        if not text:
            continue
        nbytes, ntok = len(text.encode("utf-8")), len(tokenizer.encode(text))
        row = {"chars": len(text), "bytes": nbytes, "tokens": ntok, "bytes_per_token": round(nbytes / max(ntok, 1), 4)}
        for rname, enc in refs.items():
            rt = len(enc.encode_ordinary(text))   # vs_<ref>_pct > 0: ours compresses better on this text
            row.update({f"{rname}_tokens": rt, f"{rname}_bytes_per_token": round(nbytes / max(rt, 1), 4),
                        f"vs_{rname}_pct": round(100.0 * (rt - ntok) / max(rt, 1), 2)})
        table[label] = row
    return table, notes


def run(cfg: Config, run_dir: Path) -> TokenizerResult:
    from nanochat.dataset import iter_texts
    st = cfg.stage
    if st.max_chars < 1 or st.doc_cap < 1:
        raise ValueError(f"stage.max_chars={st.max_chars}, stage.doc_cap={st.doc_cap}: both must be positive")
    base_dir = get_base_dir(cfg.paths.base_dir)
    out = tokenizer_dir(base_dir, cfg.data.tokenizer)
    print0(f"[tokenizer] training vocab {st.vocab_size} on data={cfg.data.name} "
           f"(max_chars={st.max_chars:,}, doc_cap={st.doc_cap:,})")
    t0 = time.time()
    texts = iter_texts(cfg.data, base_dir, "train", max_chars=st.max_chars, doc_cap=st.doc_cap)
    tok = train_tokenizer(texts, st.vocab_size)
    wall = time.time() - t0  # includes reading (and building/downloading) the corpus
    tok.save(out, extra_meta={"name": cfg.data.tokenizer, "data": cfg.data.name, "source": cfg.data.source,
                              "wall_seconds": round(wall, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "run_dir": str(run_dir)})
    m = tok.meta
    print0(f"[tokenizer] {m['train_chars']:,} chars in {m['train_seconds']:.2f}s "
           f"({m['chars_per_sec']:,.0f} chars/s), vocab {tok.get_vocab_size()} → {out}")
    table, notes = compression_table(tok, eval_sources(cfg, base_dir))
    for label, row in table.items():
        refs = "  ".join(f"{r}={row[f'{r}_bytes_per_token']}" for r in _REFERENCE if f"{r}_bytes_per_token" in row)
        print0(f"[tokenizer] {label:>20}: {row['bytes_per_token']:.3f} bytes/token  {refs}")
    for label, note in notes.items():
        print0(f"[tokenizer] {label}: {note}")
    result = {"tokenizer": cfg.data.tokenizer, "path": str(out), "vocab_size": tok.get_vocab_size(),
              "requested_vocab_size": st.vocab_size, "train_chars": m["train_chars"],
              "train_docs": m["train_docs"], "train_seconds": m["train_seconds"],
              "chars_per_sec": m["chars_per_sec"], "wall_seconds": round(wall, 3), "compression": table,
              "notes": notes | ({"vocab": m["note"]} if "note" in m else {})}
    atomic_write_json(Path(run_dir) / "tokenizer_eval.json", result)
    return TokenizerResult(**result)


# --------------------------------------------------------------------------- the declaration

def tokenizer_plan(cfg: Config, source: Optional[SourceRun], probe: Optional[dict] = None) -> StagePlan:
    rows = [("data", f"{cfg.data.name} ({cfg.data.source})"), ("vocab_size", f"{cfg.stage.vocab_size:,}"),
            ("max_chars", f"{cfg.stage.max_chars:,}"), ("doc_cap", f"{cfg.stage.doc_cap:,}"),
            ("artifact", f"{cfg.paths.base_dir}/tokenizer/{cfg.data.tokenizer}")]
    return StagePlan(None, rows + mixture_rows(cfg, None)[0])


# a tokenizer belongs to its data, not to a model depth: runs/tokenizer/tok_<data.tokenizer>/
STAGE = Stage("tokenizer", schema=TokenizerStageConfig, planner=tokenizer_plan, worker=run,
              tag=lambda cfg: f"tok_{cfg.data.tokenizer}", result=TokenizerResult)
