"""Shared fixtures: a session base dir with the demo corpus + a small demo tokenizer, and a
helper that runs `nanochat-run` the way a user does (a subprocess of `python -m launch.run`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=tiny"]


def run_cli(args: list[str], base_dir: Path, cwd: Path, module: str = "launch.run", timeout: float = 600,
            env_extra: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["NANOCHAT_BASE_DIR"] = str(base_dir)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    if env_extra:
        env.update(env_extra)
    p = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """NANOCHAT_BASE_DIR with the demo corpus and a 1024-token demo tokenizer (trained for real)."""
    d = tmp_path_factory.mktemp("nanochat_base")
    work = tmp_path_factory.mktemp("tok_run")
    run_cli(["stage=tokenizer", "data=demo", "stage.vocab_size=1024", "stage.max_chars=1000000",
             f"run.root={work}"], d, work, check=True)
    return d


@pytest.fixture()
def workdir(tmp_path) -> Path:
    return tmp_path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def only_run_dir(root: Path, stage: str = "pretrain") -> Path:
    dirs = [p.parent for p in Path(root).glob(f"{stage}/*/*/resolved_config.yaml")]
    assert len(dirs) == 1, f"expected exactly one {stage} run dir under {root}, found {dirs}"
    return dirs[0]
