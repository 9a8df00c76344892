"""nanochat interop: exact conversion both ways, against nanochat's own outputs and formulas."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanochat import interop
from nanochat.gpt import GPT, GPTConfig

from nanochat.common import shared_data_dir

_SHARED = shared_data_dir()  # ../shared/data next to the checkout, or $NANOCHAT_SHARED_DATA
FIXTURES = (_SHARED if _SHARED is not None else Path("/nonexistent/shared/data")) / "nanochat_checkpoints"
REVISIONS = ["d575940_d2", "92d63d4_d2"]


def fixture(rev: str) -> Path:
    path = FIXTURES / rev
    if not (path / "reference.json").is_file():
        pytest.skip(f"nanochat fixture {path} absent (../shared/data/nanochat_checkpoints, see its README)")
    return path


def build(kw: dict, state: dict) -> GPT:
    with torch.device("meta"):
        model = GPT(GPTConfig(**kw))
    model.to_empty(device="cpu")
    model.init_rotary()
    model.load_state_dict(state, strict=True)
    return model.eval()


def imported(rev: str) -> tuple[GPT, dict, interop.NanochatSource]:
    src = interop.locate(fixture(rev))
    meta = interop.load_meta(src.meta_path)
    kw, state = interop.from_nanochat(interop.load_state(src.model_path), meta["model_config"])
    return build(kw, state), kw, src


# ----------------------------------------------------------------------------- nanochat, written out

def nanochat_forward(sd: dict, mc: dict, idx: torch.Tensor, modern: bool) -> torch.Tensor:
    """nanochat's GPT forward at d575940 (seed) / 92d63d4 (modern), straight from its formulas,
    on a state dict in nanochat's own layout (half-split RoPE)."""
    L, H, Hkv, d = mc["n_layer"], mc["n_head"], mc["n_kv_head"], mc["n_embd"]
    D, T, seq = d // H, idx.size(1), mc["sequence_len"]
    base = 100000 if modern else 10000
    inv = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    cos, sin = freqs.cos()[None, :, None], freqs.sin()[None, :, None]
    if not modern:                                        # d575940 kept its tables in bf16
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()

    def rot(x):
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)

    def rms(x):
        return F.rms_norm(x, (x.size(-1),))

    short = -(-seq // 4 // 128) * 128
    pat = mc.get("window_pattern", "L")
    lefts = [short if pat[i % len(pat)] == "S" else seq for i in range(L)]
    lefts[-1] = seq
    x = rms(sd["transformer.wte.weight"][idx])
    if modern:
        g = sd["smear_lambda"] * torch.sigmoid(x[:, 1:, :24] @ sd["smear_gate.weight"].T)
        x = torch.cat([x[:, :1], x[:, 1:] + g * x[:, :-1]], 1)
    x0, x_back = x, None
    for i in range(L):
        p = f"transformer.h.{i}."
        if modern:
            x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        h = rms(x)
        q = (h @ sd[p + "attn.c_q.weight"].T).view(1, T, H, D)
        k = (h @ sd[p + "attn.c_k.weight"].T).view(1, T, Hkv, D)
        v = (h @ sd[p + "attn.c_v.weight"].T).view(1, T, Hkv, D)
        if modern and f"value_embeds.{i}.weight" in sd:
            gate = 3 * torch.sigmoid(h[..., :12] @ sd[p + "attn.ve_gate.weight"].T)
            v = v + gate.unsqueeze(-1) * sd[f"value_embeds.{i}.weight"][idx].view(1, T, Hkv, D)
        q, k = rms(rot(q)), rms(rot(k))
        if modern:
            q, k = q * 1.2, k * 1.2
        k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
        att = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        t, s = torch.arange(T)[:, None], torch.arange(T)[None]
        keep = (s <= t) & ((t - s <= lefts[i]) if modern else True)   # FA window (left, 0): left + current
        att = att.masked_fill(~keep, float("-inf")).softmax(-1)
        y = torch.einsum("bhts,bshd->bthd", att, v).reshape(1, T, d)
        x = x + y @ sd[p + "attn.c_proj.weight"].T
        x = x + F.relu(rms(x) @ sd[p + "mlp.c_fc.weight"].T).square() @ sd[p + "mlp.c_proj.weight"].T
        if modern and i == L // 2:
            x_back = x
    if modern:
        x = x - sd["backout_lambda"] * x_back
    logits = (rms(x) @ sd["lm_head.weight"].T)[..., :mc["vocab_size"]]
    return 15 * torch.tanh(logits / 15)


def nanochat_state(mc: dict, modern: bool, seed: int = 0) -> dict:
    """A random state dict with nanochat's names and shapes (vocab padded to 64 when modern)."""
    g = torch.Generator().manual_seed(seed)
    d, L, H, Hkv = mc["n_embd"], mc["n_layer"], mc["n_head"], mc["n_kv_head"]
    kvd = Hkv * d // H
    V = -(-mc["vocab_size"] // 64) * 64 if modern else mc["vocab_size"]
    r = lambda *shape, s=0.3: s * torch.randn(*shape, generator=g)   # noqa: E731
    sd = {"transformer.wte.weight": r(V, d, s=1.0), "lm_head.weight": r(V, d)}
    for i in range(L):
        p = f"transformer.h.{i}."
        sd.update({p + "attn.c_q.weight": r(d, d), p + "attn.c_k.weight": r(kvd, d), p + "attn.c_v.weight": r(kvd, d),
                   p + "attn.c_proj.weight": r(d, d), p + "mlp.c_fc.weight": r(4 * d, d),
                   p + "mlp.c_proj.weight": r(d, 4 * d, s=0.1)})
        if modern and i % 2 == (L - 1) % 2:
            sd[p + "attn.ve_gate.weight"] = r(Hkv, 12)
            sd[f"value_embeds.{i}.weight"] = r(V, kvd)
    if modern:
        sd.update({"resid_lambdas": 1 + r(L, s=0.1), "x0_lambdas": r(L, s=0.1), "smear_gate.weight": r(1, 24),
                   "smear_lambda": r(1), "backout_lambda": r(1)})
    return sd


@pytest.mark.parametrize("modern", [False, True], ids=["seed", "modern"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_conversion_matches_nanochat_formulas(modern, heads):
    # seq 256 → S layers see 128 tokens to the left: a 200-token input crosses the window edge
    mc = {"sequence_len": 256, "vocab_size": 100, "n_layer": 3, "n_head": heads[0], "n_kv_head": heads[1],
          "n_embd": 64}
    if modern:
        mc["window_pattern"] = "SSL"
    sd = nanochat_state(mc, modern)
    idx = torch.randint(0, 100, (1, 200), generator=torch.Generator().manual_seed(1))
    kw, ours = interop.from_nanochat(dict(sd), mc)
    model = build(kw, ours)
    with torch.no_grad():
        want = nanochat_forward(sd, mc, idx, modern)
        got = model(idx)
    assert (got - want).abs().max().item() < 1e-4
    # and back: exactly nanochat's tensors
    mc_back, back = interop.to_nanochat(ours, kw)
    assert mc_back == mc and back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_rope_row_reorder_is_an_exact_involution_pair():
    w = torch.randn(6 * 8, 5)
    assert torch.equal(interop.rope_rows(interop.rope_rows(w, 6, to_interleaved=True), 6, to_interleaved=False), w)
    # row 2i of a head ← row i, row 2i+1 ← −row D/2+i
    out = interop.rope_rows(w, 6, to_interleaved=True)
    assert torch.equal(out[8 + 2], w[8 + 1]) and torch.equal(out[8 + 3], -w[8 + 4 + 1])


def test_orig_mod_prefix_and_bf16_are_accepted():
    mc = {"sequence_len": 64, "vocab_size": 100, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": 32}
    sd = nanochat_state(mc, modern=False)
    compiled = {"_orig_mod." + k: v.bfloat16() for k, v in sd.items()}
    kw, ours = interop.from_nanochat(compiled, mc)
    _, plain = interop.from_nanochat({k: v.bfloat16().float() for k, v in sd.items()}, mc)
    assert all(t.dtype == torch.float32 for t in ours.values())
    assert all(torch.equal(ours[k], plain[k]) for k in plain)


@pytest.mark.parametrize("mutate,needle", [
    (lambda sd: sd.pop("transformer.h.1.mlp.c_fc.weight"), "missing keys ['transformer.h.1.mlp.c_fc.weight']"),
    (lambda sd: sd.__setitem__("transformer.h.0.attn.extra", torch.zeros(1)), "unknown keys ['transformer.h.0.attn.extra']"),
    (lambda sd: sd.__setitem__("lm_head.weight", torch.zeros(100, 16)), "misshapen tensors ['lm_head.weight: (100, 16)"),
])
def test_bad_state_dicts_name_the_key(mutate, needle):
    mc = {"sequence_len": 64, "vocab_size": 100, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": 32}
    sd = nanochat_state(mc, modern=False)
    mutate(sd)
    with pytest.raises(interop.InteropError) as e:
        interop.from_nanochat(sd, mc)
    assert needle in str(e.value)


def test_export_refuses_models_nanochat_cannot_express():
    kw = dict(sequence_len=64, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, qk_scale=1.3)
    with pytest.raises(interop.InteropError, match="qk_scale=1.3"):
        interop.to_nanochat({}, kw)


# ----------------------------------------------------------------------------- the real checkpoints

@pytest.mark.parametrize("rev", REVISIONS)
def test_fixture_logits_and_greedy_generation_equal_nanochat(rev):
    from nanochat.engine import Engine
    model, kw, src = imported(rev)
    ref = json.loads((src.base_dir / "reference.json").read_text())
    assert kw["resid_lambdas"] == rev.startswith("92d63d4")       # generation detected from the weights
    tok = interop.load_tokenizer(src.tokenizer_dir, kw["vocab_size"])
    for text, lg, gen in zip(ref["texts"], ref["logits"], ref["generations"]):
        assert tok.encode(text, prepend="<|bos|>") == lg["ids"] == gen["prompt_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([lg["ids"]]))[0]
        assert (logits[-1] - torch.tensor(lg["last_row"])).abs().max().item() < 1e-4
        assert logits.argmax(-1).tolist() == lg["argmax"]
        seqs, _ = Engine(model, tok).generate_batch(gen["prompt_ids"], num_samples=1, max_tokens=24, temperature=0.0)
        assert seqs[0] == gen["ids"] and tok.decode(seqs[0]) == gen["text"]


def test_fixture_param_count_equals_plan():
    from nanochat.shapes import param_counts
    from nanochat.config import config_from_dict
    from nanochat.plan import model_shape
    _, kw, src = imported("92d63d4_d2")
    n = sum(t.numel() for t in interop.load_state(src.model_path).values())
    m = config_from_dict({"model": {"generation": "modern", "depth": 2, "vocab_size": 1024, "sequence_len": 128}}).model
    assert param_counts(model_shape(m))["total"] == n


# ----------------------------------------------------------------------------- CLI: import, export, errors

def _cli_overrides(tmp_path: Path) -> list[str]:
    return [f"run.root={tmp_path / 'runs'}", f"paths.base_dir={tmp_path / 'base'}"]


@pytest.mark.slow
def test_import_export_round_trip_bitwise(tmp_path):
    from launch.interop_cli import export_run, import_checkpoint, main_import
    from nanochat.checkpoint import load_model_from_run
    from nanochat.chat_cli import load as chat_load
    src_dir = fixture("92d63d4_d2")
    assert main_import([str(src_dir), *_cli_overrides(tmp_path)]) == 0
    (run,) = list((tmp_path / "runs" / "pretrain" / "d2").iterdir())
    assert (run / "COMPLETED").exists() and (run / "plan.json").exists()
    meta = json.loads((run / "meta.json").read_text())["nanochat_import"]
    assert meta["step"] == 30 and len(meta["files"]["model"]["sha256"]) == 64
    model, tok, _ = chat_load(run)                            # what nanochat-chat / eval / sft load
    ref = json.loads((src_dir / "reference.json").read_text())["logits"][0]
    with torch.no_grad():
        assert (model(torch.tensor([ref["ids"]]))[0, -1] - torch.tensor(ref["last_row"])).abs().max() < 1e-4
    assert tok.get_vocab_size() == 1024
    # a later stage accepts it as its source (plan only: the dry run writes nothing)
    from launch.run import prepare
    from launch.interop_cli import compose
    cfg, _ = compose(["stage=sft", f"stage.init_from={run}", *_cli_overrides(tmp_path), "run.dry_run=true"])
    cfg, plan, _ = prepare(cfg)
    assert plan["model"]["value_embeds"] and plan["model"]["n_embd"] == 128
    # export → nanochat's layout, bitwise the source; and import of the export is bitwise ours
    out = export_run(run, tmp_path / "nc")
    original = torch.load(src_dir / "base_checkpoints/d2/model_000030.pt", weights_only=True)
    exported = torch.load(out / "model_000030.pt", weights_only=True)
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    assert json.loads((out / "meta_000030.json").read_text())["model_config"] == \
        json.loads((src_dir / "base_checkpoints/d2/meta_000030.json").read_text())["model_config"]
    again = import_checkpoint(str(tmp_path / "nc"), overrides=_cli_overrides(tmp_path))
    m1, _ = load_model_from_run(run, "cpu")
    m2, _ = load_model_from_run(again, "cpu")
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def _copy_fixture(tmp_path: Path) -> Path:
    dst = tmp_path / "nc"
    shutil.copytree(fixture("d575940_d2"), dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


@pytest.mark.parametrize("breakage,needle", [
    ("wrong_dir", "no nanochat checkpoint"),
    ("truncated", "is the file complete?"),
    ("unknown_key", "unknown keys ['transformer.h.0.attn.bias']"),
    ("tokenizer", "use the tokenizer this checkpoint was trained with"),
])
def test_bad_sources_give_clear_errors_and_write_nothing(tmp_path, breakage, needle, capsys):
    from launch.interop_cli import main_import
    base = _copy_fixture(tmp_path)
    ckpt = base / "base_checkpoints" / "d2"
    src = base
    if breakage == "wrong_dir":
        src = base / "tokenizer"
    elif breakage == "truncated":
        data = (ckpt / "model_000030.pt").read_bytes()
        (ckpt / "model_000030.pt").write_bytes(data[: len(data) // 2])
    elif breakage == "unknown_key":
        sd = torch.load(ckpt / "model_000030.pt", weights_only=True)
        sd["transformer.h.0.attn.bias"] = torch.zeros(128)
        torch.save(sd, ckpt / "model_000030.pt")
    else:   # the other revision's model config claims a different vocab than this tokenizer
        meta = json.loads((ckpt / "meta_000030.json").read_text())
        sd = torch.load(ckpt / "model_000030.pt", weights_only=True)
        sd = {k: (v[:512] if k in ("transformer.wte.weight", "lm_head.weight") else v) for k, v in sd.items()}
        meta["model_config"]["vocab_size"] = 512
        torch.save(sd, ckpt / "model_000030.pt")
        (ckpt / "meta_000030.json").write_text(json.dumps(meta))
    assert main_import([str(src), *_cli_overrides(tmp_path)]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "base").exists()
