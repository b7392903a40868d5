"""Helpers for the multi-process tests: launch `accelerate launch` with a timeout, show the output on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def child_env() -> dict:
    env = dict(os.environ)
    # one thread per process: 2 processes share 2 cores; no GPU even if one is visible; no tokenizer threads
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", None)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], config: str | None = None, num_processes: int = 2, timeout: int = 300,
           expect_ok: bool = True, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/<config>.yaml ... args` (or plain python if config is None),
    from the repository root unless `cwd` is given."""
    if config is None:  # plain python (a script, or `-m module ...`)
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", str(num_processes),
               "--main_process_port", str(free_port()), *args]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n--- stdout ---\n{out[-6000:]}\n--- stderr "
                    f"---\n{err[-6000:]}")
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-6000:]}\n"
                    f"--- stderr ---\n{proc.stderr[-10000:]}")
    return proc


def launch_many(jobs: list[tuple[list[str], str | None]], timeout: int = 900) -> None:
    """Run several launches at once (their processes wait on each other's collectives, so running
    launches side by side fills the idle time); fail with the output of the first that failed."""
    import tempfile
    import time

    procs = []
    for args, config in jobs:
        cmd = [sys.executable, *args] if config is None else [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", "2",
            "--main_process_port", str(free_port()), *args]
        log = tempfile.TemporaryFile(mode="w+")
        procs.append((cmd, log, subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                                 text=True)))
    deadline = time.monotonic() + timeout
    failed = None
    for cmd, log, proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode != 0 and failed is None:
            log.seek(0)
            failed = f"exit {proc.returncode}: {' '.join(cmd)}\n--- output ---\n{log.read()[-12000:]}"
    if failed:
        pytest.fail(failed)


# --------------------------------------------------------------------------------------------
# Reading run_stages.py's results
# --------------------------------------------------------------------------------------------


def result(root, setup, stage):
    path = root / setup / stage / "result.json"
    assert path.exists(), f"{setup}/{stage} did not finish"
    return json.loads(path.read_text())


def training_rows(rows):
    return {r["step"]: r for r in rows if r["step"] > 0 and any(k.startswith("loss/") for k in r)}


def comparable(row):
    return {
        k: v
        for k, v in row.items()
        if isinstance(v, (int, float))
        and not k.startswith(("time/", "train/tokens_per_s"))
        and k not in ("completions/per_s", "step")
    }


def load_model(stage, path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if stage.startswith("reward") else AutoModelForCausalLM
    return cls.from_pretrained(path).state_dict()


def check_resumed_equals_straight(stage, got):
    """The run resumed from its step-2 checkpoint repeats the unbroken one: step 3's metrics and the final weights."""
    import torch

    straight, resumed = training_rows(got["straight"]), training_rows(got["resumed"])
    assert sorted(straight) == sorted(resumed) == [1, 2, 3]
    a, b = comparable(straight[3]), comparable(resumed[3])  # step 3, redone after resuming
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    w_straight, w_resumed = load_model(stage, got["model_straight"]), load_model(stage, got["model_resumed"])
    assert w_straight.keys() == w_resumed.keys() and not any("lora" in k for k in w_straight)
    for k in w_straight:
        torch.testing.assert_close(w_resumed[k], w_straight[k], rtol=1e-4, atol=1e-5)
