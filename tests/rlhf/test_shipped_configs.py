"""The shipped configs from any directory: `rlhf configs [--out DIR]`, the DeepSpeed path fallback, package data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from rlhf.cli import main
from rlhf.shipped_configs import CONFIG_DIR, resolve_deepspeed_config_env, shipped_files

ROOT = Path(__file__).resolve().parents[2]
ZERO = ["zero2", "zero3", "zero3_offload", "two_nodes"]  # the accelerate configs that name a DeepSpeed file


def test_the_package_holds_the_repository_configs():
    assert (ROOT / "rlhf" / "configs").resolve() == (ROOT / "configs").resolve()  # one home, linked into the package
    names = {str(p) for p in shipped_files()}
    assert {f"accelerate/{n}.yaml" for n in ["single", "ddp", *ZERO]} <= names
    assert {"deepspeed/zero2.json", "deepspeed/zero3.json", "rlhf/sft_tiny.yaml", "classic/dqn_cartpole.yaml"} <= names


def test_configs_prints_the_shipped_directory(capsys):
    main(["configs"])
    out = capsys.readouterr().out.strip()
    assert Path(out) == CONFIG_DIR and (Path(out) / "accelerate" / "zero3.yaml").is_file()


def test_configs_out_writes_a_copy_that_works_from_any_directory(tmp_path, monkeypatch, capsys):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    from rlhf import pipeline
    from rlhf.runtime import load_yaml_config

    main(["configs", "--out", str(tmp_path / "cfg")])
    assert f"wrote {len(shipped_files())} files" in capsys.readouterr().out
    copy = tmp_path / "cfg"
    assert sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file()) == shipped_files()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # what accelerate sees when launched from another directory
    for name in ZERO:
        cfg = load_config_from_file(str(copy / "accelerate" / f"{name}.yaml"))  # accelerate's own loader
        ds_file = Path(cfg.deepspeed_config["deepspeed_config_file"])
        assert ds_file.is_absolute() and ds_file.parent == copy / "deepspeed"
        shipped = json.loads((CONFIG_DIR / "deepspeed" / ds_file.name).read_text())
        assert HfDeepSpeedConfig(str(ds_file)).config == shipped  # what the launched processes load
    # the comments and every other line are the shipped file's, byte for byte
    shipped_lines = (CONFIG_DIR / "accelerate" / "zero3.yaml").read_text().splitlines()
    copied_lines = (copy / "accelerate" / "zero3.yaml").read_text().splitlines()
    changed = [a for a, b in zip(shipped_lines, copied_lines) if a != b]
    assert len(shipped_lines) == len(copied_lines)
    assert changed == ["  deepspeed_config_file: configs/deepspeed/zero3.json"]
    for name in ["single", "ddp"]:
        assert load_config_from_file(str(copy / "accelerate" / f"{name}.yaml")).distributed_type is not None
    # the pipeline's stage configs point into the copy (so edits there take effect)
    values = load_yaml_config(copy / "rlhf" / "pipeline_tiny.yaml", pipeline.Config)
    for stage in ["sft", "reward", "ppo", "grpo"]:
        assert Path(values[f"{stage}_config"]) == copy / "rlhf" / f"{stage}_tiny.yaml"
    assert yaml.safe_load((copy / "rlhf" / "sft_tiny.yaml").read_text()) == \
        yaml.safe_load((CONFIG_DIR / "rlhf" / "sft_tiny.yaml").read_text())


def test_configs_out_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    main(["configs", "--out", str(tmp_path)])
    (tmp_path / "accelerate" / "zero3.yaml").write_text("edited")
    with pytest.raises(SystemExit) as exit_info:
        main(["configs", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "exist already" in capsys.readouterr().err  # as every command's bad input
    assert (tmp_path / "accelerate" / "zero3.yaml").read_text() == "edited"
    main(["configs", "--out", str(tmp_path), "--overwrite", "true"])
    assert "deepspeed_config_file" in (tmp_path / "accelerate" / "zero3.yaml").read_text()


def test_relative_deepspeed_path_falls_back_to_the_shipped_file(tmp_path, monkeypatch):
    env = {"ACCELERATE_DEEPSPEED_CONFIG_FILE": "configs/deepspeed/zero3.json"}
    monkeypatch.chdir(ROOT)  # the repository root: the path exists, accelerate reads it as it is
    assert resolve_deepspeed_config_env(env) is None
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == "configs/deepspeed/zero3.json"
    monkeypatch.chdir(tmp_path)  # anywhere else: the package's copy
    assert resolve_deepspeed_config_env(env) == str(CONFIG_DIR / "deepspeed" / "zero3.json")
    assert Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).is_file()
    (tmp_path / "configs" / "deepspeed").mkdir(parents=True)  # the user's own file by that name wins
    (tmp_path / "configs" / "deepspeed" / "zero3.json").write_text("{}")
    env = {"ACCELERATE_DEEPSPEED_CONFIG_FILE": "configs/deepspeed/zero3.json"}
    assert resolve_deepspeed_config_env(env) is None
    others = ["configs/deepspeed/missing.json", "my/zero3.json", str(tmp_path / "x.json"), '{"zero_optimization": {}}']
    for value in others:  # not a shipped file's name, absolute, or a JSON string: left to accelerate
        env = {"ACCELERATE_DEEPSPEED_CONFIG_FILE": value}
        assert resolve_deepspeed_config_env(env) is None and env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == value
    assert resolve_deepspeed_config_env({}) is None


def test_wheel_ships_the_configs(tmp_path):
    """`pip install` of the package has them: build a wheel from a copy of the source tree (offline)."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ["rlhf", "classic", "configs"]:
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        shipped = {f"rlhf/configs/{p.as_posix()}" for p in shipped_files()}
        assert shipped <= names
        assert z.read("rlhf/configs/deepspeed/zero3.json") == (CONFIG_DIR / "deepspeed" / "zero3.json").read_bytes()
