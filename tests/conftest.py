"""Shared fixtures: a session base dir with the demo corpus + a small demo tokenizer, and a
helper that runs `nanochat-run` the way a user does (a subprocess of `python -m launch.run`)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=tiny"]


def compose_checked(overrides: list[str], config_dir: str = str(REPO / "conf"),
                    config_name: str = "config") -> dict:
    """Compose like nanochat-run (Hydra, in this process) and turn Hydra's refusals into ConfigError
    naming the override that caused them (found by composing each override alone)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from launch.validate import resolved_tree
    from nanochat.config import ConfigError

    def attempt(ovs: list[str]):
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            return compose(config_name=config_name, overrides=ovs)
    try:
        dcfg = attempt(overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        named = [o for o in overrides if o in str(e)]  # Hydra usually quotes the override
        culprit = named[0] if named else (overrides[-1] if overrides else "overrides")
        for o in ([] if named or len(overrides) < 2 else overrides):
            try:
                attempt([o])
            except (HydraException, OmegaConfBaseException, ValueError):
                culprit = o
                break
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(culprit.lstrip("+~").partition("=")[0] or culprit, culprit,
                          "write overrides as key=value or group=option (nanochat-run --help lists the groups; "
                          "`+key=value` adds a key, `~key` deletes one)", f"Hydra refused it: {first}") from None
    return resolved_tree(dcfg)


def dry_run_plans(overrides: list[str]) -> object:
    """What `nanochat-run <overrides> run.dry_run=true` does before it prints the plan (each entry's, for a pipeline)."""
    from launch import run, validate
    from nanochat.config import config_from_dict
    tree = compose_checked([*overrides, "run.dry_run=true"])
    cfg = config_from_dict(tree)
    if cfg.run.pipeline:
        return [run.prepare(config_from_dict(run.stage_tree(tree, e)))[1] for e in cfg.run.pipeline]
    validate.check_hardware(cfg)
    return run.prepare(cfg)[1]


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


def preemption_checkpoint_step(run_dir: Path, proc, timeout: float = 300) -> int:
    """Wait for the first checkpoint of a run started with stage.save_every=-1 (so the only one
    before the end is what a preemption writes) and return its step."""
    deadline = time.monotonic() + timeout
    while not list((run_dir / "checkpoints").glob("step_*")):
        assert time.monotonic() < deadline and proc.poll() is None, "no preemption checkpoint"
        time.sleep(0.2)
    return int(next((run_dir / "checkpoints").glob("step_*")).name.split("_")[1])


def only_run_dir(root: Path, stage: str = "pretrain") -> Path:
    dirs = [p.parent for p in Path(root).glob(f"{stage}/*/*/resolved_config.yaml")]
    assert len(dirs) == 1, f"expected exactly one {stage} run dir under {root}, found {dirs}"
    return dirs[0]


# --------------------------------------------------------------------------- chat-stage sources

def nanochat_run(env: dict, *args: str, timeout: int = 300, module: str = "launch.run") -> subprocess.CompletedProcess:
    """Run a CLI like a user with `env`; fail with its output when it exits non-zero."""
    p = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed ({p.returncode}):\n"
                             f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory) -> tuple[dict, Path]:
    """A 2048-token demo tokenizer and an 8-step depth-2 pretrain run, made once per session."""
    scratch = tmp_path_factory.mktemp("tiny_source")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(NANOCHAT_BASE_DIR=str(scratch / "base"), NANOCHAT_OFFLINE="1", OMP_NUM_THREADS="1")
    nanochat_run(env, "stage=tokenizer", "data=demo", "stage.vocab_size=2048", "stage.max_chars=2000000",
                 f"run.root={scratch}")
    pre = scratch / "pretrain" / "d2" / "tiny"
    nanochat_run(env, "experiment=tiny", "model.depth=2", "stage.num_iterations=8", "stage.eval_every=-1",
                 f"run.root={scratch}", f"run.dir={pre}")
    return env, pre


@pytest.fixture(scope="module")
def stage_root(tiny_pretrained, tmp_path_factory) -> tuple[dict, Path, Path]:
    """(env, run root, pretrain run dir): a private run root holding a copy of the tiny pretrain
    run, so `init_from=latest` in one test module never sees another module's runs."""
    env, pre = tiny_pretrained
    root = tmp_path_factory.mktemp("runs")
    copy = root / "pretrain" / "d2" / pre.name
    shutil.copytree(pre, copy)
    return dict(env), root, copy


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextlib.contextmanager
def headless_chromium():
    """A Playwright browser on Debian's chromium (no browser download); skips the test when either is missing."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip(f"Chromium is not installed ({chromium}); .ci/run installs Debian's chromium package")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
