"""The shared run plumbing: config precedence and errors, run directory, atomic checkpoints, RNG state."""

import dataclasses
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf.runtime import (
    CheckpointWriter, ConfigError, Run, RunConfig, arg, check, checkpoint_dirs, load_state, make_config, parse_config,
    read_jsonl, resolve_checkpoint, save_state,
)


@dataclasses.dataclass
class DemoConfig(RunConfig):
    learning_rate: float = arg(3e-4, "Adam step size.")
    double_q: bool = arg(False, "Use the Double DQN target.")
    dueling: str = arg("none", "Dueling aggregation.", choices=["none", "mean", "max"])
    lora_target_modules: list[str] = arg(["q_proj", "v_proj"], "Modules that get LoRA adapters.")
    total_timesteps: int = arg(1000, "Environment steps.")

    def __post_init__(self):
        check(self.total_timesteps > 0, "total_timesteps", "must be positive")


def test_defaults_yaml_cli_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("learning_rate: 0.1\ndueling: max\ntotal_timesteps: 5000\n")
    cfg = parse_config(DemoConfig, ["--config", str(cfg_file), "--dueling", "mean", "--double_q", "true"])
    assert cfg.learning_rate == 0.1  # YAML over default
    assert cfg.dueling == "mean"  # command line over YAML
    assert cfg.double_q is True and cfg.total_timesteps == 5000
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    cfg = parse_config(DemoConfig, ["--lora_target_modules", "a,b", "--total_timesteps", "1e5"])
    assert cfg.lora_target_modules == ["a", "b"]
    assert parse_config(DemoConfig, ["--total_timesteps", "1e5"]).total_timesteps == 100000
    # from Python (the pipeline's overrides, scripts), a list option given as a string reads as on the command line
    assert make_config(DemoConfig, {"lora_target_modules": "a, b"}).lora_target_modules == ["a", "b"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--dueling", "avg"], "`dueling` must be one of"),
        (["--double_q", "maybe"], "`double_q` expects bool"),
        (["--learning_rate", "fast"], "`learning_rate` expects float"),
        (["--total_timesteps", "0"], "`total_timesteps`: must be positive"),
    ],
)
def test_bad_values_name_the_option(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config(DemoConfig, argv)


def test_unknown_cli_option_exits(capsys):
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--learning_rat", "1"])
    assert "unknown option --learning_rat" in capsys.readouterr().err


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key `learning_rat`.*did you mean `learning_rate`"):
        parse_config(DemoConfig, ["--config", str(f)])
    f.write_text("double_q: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml: `double_q` expects bool"):
        parse_config(DemoConfig, ["--config", str(f)])


def test_help_lists_every_field_with_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--help"])
    out = capsys.readouterr().out
    for name in ("--learning_rate", "--double_q", "--output_dir", "--resume_from_checkpoint"):
        assert name in out
    assert "Adam step size. (default: 0.0003)" in " ".join(out.split())


def test_run_dir_files_and_refusal_to_overwrite(tmp_path):
    cfg = DemoConfig(output_dir=str(tmp_path / "run"), report_to="tensorboard")
    run = Run(cfg)
    run.log(1, {"loss/policy": torch.tensor(0.5), "eval/return_mean": 3})
    run.log(2, {"loss/policy": 0.25})
    run.write_summary({"eval/return_mean": 7.0})
    run.close()
    d = tmp_path / "run"
    assert (d / "config.yaml").read_text().count("learning_rate: 0.0003") == 1
    assert read_jsonl(d / "metrics.jsonl") == [
        {"step": 1, "loss/policy": 0.5, "eval/return_mean": 3}, {"step": 2, "loss/policy": 0.25}]
    assert json.loads((d / "summary.json").read_text()) == {"eval/return_mean": 7.0}
    assert any((d / "tensorboard").iterdir())
    with pytest.raises(ConfigError, match="already holds a finished run"):
        Run(cfg)
    Run(dataclasses.replace(cfg, overwrite=True)).close()
    assert not (d / "summary.json").exists() and not (d / "metrics.jsonl").exists()


def test_truncate_metrics_on_resume(tmp_path):
    cfg = DemoConfig(output_dir=str(tmp_path), report_to="none")
    run = Run(cfg)
    for s in range(1, 4):
        run.log(s, {"x": s})
    with run.checkpoint(3) as d:
        save_state(d / "state.pt", {"step": 3})
    run.log(3, {"eval/final": 1})  # logged at the checkpoint's step, after it: a resume redoes it
    run.log(4, {"x": 4})
    run.close()
    run = Run(dataclasses.replace(cfg, resume_from_checkpoint="latest"), checkpoint=checkpoint_dirs(tmp_path)[-1])
    run.log(3, {"eval/final": 1})
    run.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "x": 1}, {"step": 2, "x": 2}, {"step": 3, "x": 3},
                                                      {"step": 3, "eval/final": 1}]


def test_checkpoint_is_atomic_and_pruned(tmp_path):
    for step in (10, 20, 30):
        with CheckpointWriter(tmp_path, step, keep=2) as d:
            save_state(d / "state.pt", {"step": step})
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path, 40, keep=2) as d:
            (d / "partial").write_text("x")
            raise RuntimeError("crash while writing")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000020", "step-00000030"]
    assert resolve_checkpoint("latest", tmp_path).name == "step-00000030"
    assert resolve_checkpoint("", tmp_path) is None
    with pytest.raises(ConfigError, match="no checkpoint"):
        resolve_checkpoint("latest", tmp_path / "empty")


def test_rng_state_round_trip(tmp_path):
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    save_state(tmp_path / "s.pt", {"step": 3})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = load_state(tmp_path / "s.pt")
    assert state["step"] == 3
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class _Kill(BaseException):
    """Like kill -9: nothing after it runs (not an Exception, so no handler catches it)."""


def test_replacing_a_checkpoint_is_crash_safe(tmp_path, monkeypatch):
    for step, value in ((10, "old"), (20, "old")):
        with CheckpointWriter(tmp_path, step, keep=0) as d:
            save_state(d / "state.pt", {"value": value})
            (d / "extra.bin").write_bytes(b"x" * 100)
    real_rmtree = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):  # deletes one file of a checkpoint, then the process dies
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else []
        if not files:
            return real_rmtree(path, *args, **kwargs)
        files[-1].unlink()
        raise _Kill

    monkeypatch.setattr(shutil, "rmtree", killed_while_deleting)
    with pytest.raises(_Kill):
        with CheckpointWriter(tmp_path, 20, keep=0) as d:  # replaces step-20
            save_state(d / "state.pt", {"value": "new"})
            (d / "extra.bin").write_bytes(b"y" * 100)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    latest = resolve_checkpoint("latest", tmp_path)
    assert latest.name == "step-00000020" and load_state(latest / "state.pt")["value"] == "new"
    assert (latest / "extra.bin").read_bytes() == b"y" * 100
    with CheckpointWriter(tmp_path, 30, keep=0) as d:  # the next checkpoint clears what the crash left
        save_state(d / "state.pt", {"value": "next"})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000010", "step-00000020", "step-00000030"]


def test_only_complete_checkpoints_are_accepted(tmp_path):
    with Run(DemoConfig(output_dir=str(tmp_path), report_to="none")).checkpoint(10) as d:
        save_state(d / "state.pt", {"step": 10})
        (d / "replay.npz").write_bytes(b"z" * 64)
    (tmp_path / "checkpoints" / "step-00000020").mkdir()  # no manifest: cut short, or not ours
    (tmp_path / "checkpoints" / "step-00000020" / "state.pt").write_bytes(b"")
    assert resolve_checkpoint("latest", tmp_path).name == "step-00000010"
    with pytest.raises(ConfigError, match="step-00000020 is not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "checkpoints" / "step-00000020"), tmp_path)
    ckpt = tmp_path / "checkpoints" / "step-00000010"
    with pytest.raises(ConfigError, match=r"is a run directory, not a checkpoint.*latest"):
        resolve_checkpoint(str(tmp_path), tmp_path)
    with pytest.raises(ConfigError, match=r"checkpoint of `test_runtime`, not of `classic dqn`"):
        resolve_checkpoint(str(ckpt), tmp_path, "classic dqn")
    (ckpt / "replay.npz").write_bytes(b"z" * 10)
    with pytest.raises(ConfigError, match=r"replay.npz has 10 bytes, 64 when it was written"):
        resolve_checkpoint("latest", tmp_path)
    (ckpt / "replay.npz").unlink()
    with pytest.raises(ConfigError, match=r"replay.npz is missing"):
        resolve_checkpoint("latest", tmp_path)


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, plant_pickle):
    marker = plant_pickle(tmp_path, "state.pt")
    with pytest.raises(ConfigError, match=r"cannot load .*state.pt: Unsupported global"):
        load_state(tmp_path / "state.pt")
    assert not marker.exists()
