"""bench/gpu_check.py runs its whole logic on this CPU (--device cpu --quick) and reports in JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "figures.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                        "--json-out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    lines = p.stdout.strip().splitlines()
    summary = json.loads(lines[-1])["gpu_check"]                  # the last line is the JSON
    assert summary == json.loads(out.read_text())["gpu_check"]
    checks = summary["checks"]
    for name in ("train_step", "bf16_vs_fp32", "kv_decode", "attention", "precision", "auto_batch", "torchrun", "fp8",
                 "simulate"):
        assert checks[name]["status"] == "PASS", (name, checks[name])
        assert any(l.startswith(f"PASS {name} ") for l in lines), name   # one line per check
    assert checks["compile_cache"]["status"] == "SKIP" and "--compile" in checks["compile_cache"]["reason"]
    assert checks["train_step"]["d2_seed_eager"]["tok_per_s"] > 0
    assert checks["bf16_vs_fp32"]["max_abs_diff"] <= checks["bf16_vs_fp32"]["tolerance"]
    assert checks["attention"]["backends"][:2] == ["sdpa", "flex"]
    assert checks["precision"]["skipped_steps"] >= 1
    assert checks["torchrun"]["backend"] == "gloo"
    assert checks["fp8"]["emulated"] is True and checks["fp8"]["max_abs_diff"] <= checks["fp8"]["tolerance"]
    assert checks["auto_batch"]["trials"][0]["fits"] is False     # the probe met a real OOM
    assert abs(checks["simulate"]["relative_error"]) <= 0.10        # simulated vs measured peak
