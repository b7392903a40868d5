"""Fixtures every test directory shares: what a crash in a run's final phase and a bad checkpoint are tested with."""

from __future__ import annotations

import json
import os
import pickle
import sys

# Some machines set PYTHONDONTWRITEBYTECODE=1: every Python process the suite starts (accelerate launches and their
# workers, command-line runs, vLLM engines: at least 76) would then compile torch's, transformers' and datasets' Python
# from source again (`import rlhf.sft` 15 s instead of 7 once cached; the suite 15-16 min instead of 11-14 min on a
# Zen 4 machine). The suite's processes cache the bytecode they compile, this one's included.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf import runtime  # noqa: E402


class Kill(BaseException):
    """Like kill -9: no `except Exception` stops it."""


@pytest.fixture
def kill_in_final_phase(monkeypatch):
    """`kill_in_final_phase(train, make_cfg)`: run `train(make_cfg())`, killed after its final checkpoint and
    final evaluation but before summary.json, then resume it from `latest`; returns the resumed summary."""

    def run(train, make_cfg):
        def killed(self, summary):
            raise Kill

        monkeypatch.setattr(runtime.Run, "write_summary", killed)
        with pytest.raises(Kill):
            train(make_cfg())
        monkeypatch.undo()
        return train(make_cfg(resume_from_checkpoint="latest"))

    return run


@pytest.fixture
def dir_files():
    """`dir_files(d)`: every file under `d` with its bytes and modification time (what "nothing changed" compares)."""
    return lambda d: {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def untimed():
    """`untimed(rows)`: metric rows (or summaries) without their timings, which differ between any two runs."""
    def timed(key):
        return key.startswith("time/") or key.endswith(("per_s", "time_s"))

    return lambda rows: [{k: v for k, v in r.items() if not timed(k)} for r in rows]


@pytest.fixture
def plant_pickle(tmp_path):
    """`plant_pickle(ckpt, name, plain_pickle=False)`: put a file into checkpoint `ckpt` whose unpickling would
    create `tmp_path / "pwned"` (a torch.save file, or with `plain_pickle` a pickle.dump one), and fix the
    manifest as whoever planted it could; returns that marker path."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # unpickling calls open(marker, "w")
            return (open, (str(marker), "w"))

    def plant(ckpt, name: str, plain_pickle: bool = False):
        if plain_pickle:
            (ckpt / name).write_bytes(pickle.dumps(Payload()))
        else:
            torch.save(Payload(), ckpt / name)
        manifest = ckpt / "checkpoint.json"
        if manifest.exists():
            info = json.loads(manifest.read_text())
            info["files"][name] = (ckpt / name).stat().st_size
            manifest.write_text(json.dumps(info))
        return marker

    return plant
