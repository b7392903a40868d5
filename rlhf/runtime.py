"""Run plumbing shared by `rlhf` and `classic`: config, run directory, checkpoints, seeding, progress.

Import-light on purpose (stdlib, yaml, numpy, torch): `classic` uses it without pulling in
transformers, and `rlhf.core` does not use it at all.

- Config: one `@dataclass` per command whose fields are declared with `arg(default, help)`.
  `parse_config(Cls, argv)` applies defaults < `--config file.yaml` < `--field value`.
- `Run`: the run directory (`config.yaml`, `metrics.jsonl`, `summary.json`, `checkpoints/`, TensorBoard).
- Checkpoints: one directory per step, written under a temporary name, completed by a manifest
  (`checkpoint.json`: command, files and sizes) and renamed, so a crash never leaves a half-written
  checkpoint behind; `resume_from_checkpoint` takes a path or `latest`, and a checkpoint that is
  incomplete, damaged or another command's is refused before anything is written. Every file is
  read as data (weights-only torch.load, safetensors, npz without pickle, JSON): see
  docs/distributed.md, "Checkpoints and trust", for the one exception (DeepSpeed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml


class ConfigError(ValueError):
    """A bad option, YAML key or value; the message names the culprit."""


def notice(message: str) -> None:
    """One line for the user on stderr, from the first process only (`accelerate launch` sets RANK in each)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def arg(default: Any, help: str, choices: typing.Sequence | None = None, aliases: typing.Sequence[str] = ()) -> Any:
    """Declare a config field with its default and help text (written once, shown by --help); `aliases`:
    other names accepted for it on the command line, in YAML and by `make_config` (another library's name)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "aliases": tuple(aliases)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class RunConfig:
    """Fields every command shares. Command configs inherit from it (one level, no deeper)."""

    output_dir: str = arg("runs/default", "Run directory: config.yaml, metrics.jsonl, summary.json, checkpoints/.")
    seed: int = arg(1, "Random seed (python, numpy, torch, environments).")
    overwrite: bool = arg(False, "Allow writing into an output_dir that already holds a finished run.")
    resume_from_checkpoint: str = arg("", "Checkpoint directory to resume from, or `latest` (newest in output_dir).")
    save_steps: int = arg(0, "Save a resumable checkpoint every this many steps (0: only at the end).")
    save_total_limit: int = arg(2, "Keep at most this many checkpoints (oldest are deleted).")
    logging_steps: int = arg(1, "Log metrics every this many steps.")
    deterministic: bool = arg(False, "Use deterministic torch algorithms (slower, bitwise repeatable).")
    report_to: str = arg("tensorboard", "Where to log besides metrics.jsonl: tensorboard, wandb, none "
                                        "(comma-separated).")
    progress: bool = arg(True, "Show a progress bar.")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _convert(name: str, value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field type; raise a ConfigError naming the field."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where}: `{name}` must not be empty (expected {getattr(tp, '__name__', tp)})")
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                value = float(value) if re.fullmatch(r"[-+]?\d+(\.0*)?([eE]\+?\d+)?", value.strip()) else value
                if isinstance(value, float):
                    return int(value)
            if isinstance(value, int):
                return value
            raise ValueError
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin in (list, tuple) or tp in (list, tuple):
            (inner,) = typing.get_args(tp)[:1] or (str,)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [_convert(name, v, inner, where) for v in value]
        if origin is dict or tp is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (ValueError, TypeError):
        pass
    else:
        return value
    kind = str(tp) if typing.get_args(tp) else getattr(tp, "__name__", str(tp))  # list[float], not list
    raise ConfigError(f"{where}: `{name}` expects {kind}, got {value!r}")


def config_fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _alias_names(cls) -> dict[str, str]:
    return {a: name for name, f in config_fields(cls).items() for a in f.metadata.get("aliases", ())}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def load_yaml_config(path: str | os.PathLike, cls) -> dict[str, Any]:
    """Read a YAML config and check every key against `cls`; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    fields, alias_of = config_fields(cls), _alias_names(cls)
    out, given_as = {}, {}
    for key, value in data.items():
        name = alias_of.get(key, key)
        if name not in fields:
            raise ConfigError(f"{path}: unknown key `{key}` for `{cls.__name__}`{_suggest(key, fields)}")
        if name in out:
            raise ConfigError(f"{path}: `{given_as[name]}` and `{key}` are one option (`{name}`); give one of them")
        out[name], given_as[name] = _convert(name, value, fields[name].type, str(path)), key
    return out


def _suggest(key: str, fields) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(fields), n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


def build_parser(cls, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description or (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
    )
    parser.add_argument("--config", default=None, help="YAML file of option: value (command-line options override it).")
    for name, f in config_fields(cls).items():
        tp, _ = _unwrap_optional(f.type)
        metavar = {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(tp, "VALUE")
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %: "10%" is text
        if f.metadata.get("choices"):
            help_text += f" One of: {', '.join(map(str, f.metadata['choices']))}."
        flags = [f"--{n}" for n in (name, *f.metadata.get("aliases", ()))]
        parser.add_argument(*flags, dest=name, default=_default_of(f), metavar=metavar, help=help_text)
    return parser


def parse_config(cls, argv: list[str] | None = None, prog: str | None = None):
    """defaults < YAML (`--config`) < `--field value`. Returns a validated `cls` instance."""
    parser = build_parser(cls, prog=prog)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        fields = config_fields(cls)
        bad = next((u for u in unknown if u.startswith("--")), unknown[0])
        parser.error(f"unknown option {bad}{_suggest(bad.lstrip('-').split('=')[0], fields)}")
    alias_of = _alias_names(cls)
    explicit = [alias_of.get(n, n) for n in _explicit_options(argv if argv is not None else sys.argv[1:])]
    values = {name: _default_of(f) for name, f in config_fields(cls).items()}
    if ns.config:
        values.update(load_yaml_config(ns.config, cls))
    fields = config_fields(cls)
    for name in explicit:
        if name in fields:
            values[name] = _convert(name, getattr(ns, name), fields[name].type, f"--{name}")
    return make_config(cls, values)


def _explicit_options(argv: list[str]) -> list[str]:
    return [a[2:].split("=")[0] for a in argv if a.startswith("--")]


def make_config(cls, values: dict[str, Any]):
    """Build `cls` from a dict, checking choices; `__post_init__` errors become ConfigErrors."""
    fields, alias_of = config_fields(cls), _alias_names(cls)
    values = {alias_of.get(k, k): v for k, v in values.items()}  # an alias given after its field wins, as in a dict
    for name, value in values.items():
        if name not in fields:
            raise ConfigError(f"unknown option `{name}` for `{cls.__name__}`{_suggest(name, fields)}")
        if isinstance(value, str) and typing.get_origin(fields[name].type) is list:  # "a,b" from Python, as on the CLI
            value = values[name] = _convert(name, value, fields[name].type, f"`{name}`")
        choices = fields[name].metadata.get("choices")
        for v in value if isinstance(value, list) else [value]:  # a list option: each of its values
            if choices and v is not None and v not in choices:
                raise ConfigError(f"`{name}` must be one of {', '.join(map(str, choices))}; got {v!r}")
    try:
        cfg = cls(**values)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None
    if isinstance(cfg, RunConfig):
        check_run_options(cfg)
    return cfg


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def check(condition: bool, option: str, message: str) -> None:
    """Validation helper for `__post_init__`: raise a ConfigError that names the option."""
    if not condition:
        raise ConfigError(f"`{option}`: {message}")


REPORT_TO = ("tensorboard", "wandb", "none")


def report_targets(report_to: str) -> set[str]:
    """`report_to` as a set of logger names ("none" and "" give the empty set)."""
    return {t.strip() for t in report_to.split(",") if t.strip()} - {"none"}


def check_run_options(cfg: RunConfig) -> None:
    """Checks of the options every command shares, run by `make_config` before any model loads or file is written."""
    out = Path(cfg.output_dir).expanduser()
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    check(blocker is None, "output_dir", f"{out} is a file, not a directory" if blocker == out
          else f"{out} lies under {blocker}, which is a file")
    check(cfg.logging_steps >= 1, "logging_steps", f"must be >= 1, got {cfg.logging_steps}")
    check(cfg.save_steps >= 0, "save_steps", f"must be >= 0 (0: only at the end), got {cfg.save_steps}")
    check(cfg.save_total_limit >= 0, "save_total_limit", f"must be >= 0 (0: keep all), got {cfg.save_total_limit}")
    names = [t.strip() for t in cfg.report_to.split(",") if t.strip()]
    for name in names:
        check(name in REPORT_TO, "report_to", f"unknown logger {name!r}; use {', '.join(REPORT_TO)} (comma-separated)")
    check("none" not in names or len(names) == 1, "report_to", "`none` cannot be combined with other loggers")
    import importlib.util

    # Say so now rather than after the first training step, where the logger is first used.
    for name, package in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        check(name not in names or importlib.util.find_spec(package) is not None, "report_to",
              f"{name} is not installed (pip install {package}), or leave it out of report_to")
    if isinstance(getattr(cfg, "device", None), str):
        check_device(cfg.device)


def meant_as_local_path(name: str) -> bool:
    """Whether a model / dataset name that does not exist here was meant as a local path, not a hub id:
    it is no valid hub id (`./x`, `/abs`, `~/x`, `runs/sft/model`) or its parent directory exists here
    (`runs/sfft` next to `runs/sft`). Such a name fails at once instead of after a hub round trip."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    parent = Path(name).expanduser().parent
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return parent != Path(".") and parent.exists()


def check_device(device: str, option: str = "device") -> None:
    """A torch device string that parses and names hardware this machine has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    backend = getattr(torch, dev.type, None) if dev is not None else None  # torch.cuda, torch.mps, torch.xpu
    if dev is None or (dev.type != "cpu" and not hasattr(backend, "is_available")):
        raise ConfigError(f"`{option}`: unknown device {device!r}; use cpu, cuda, cuda:N or mps")
    if dev.type == "cpu":
        return
    check(backend.is_available(), option, f"{device!r} asked for, but torch finds no {dev.type} device on this "
                                          f"machine; use cpu")
    if dev.index is not None and hasattr(backend, "device_count"):
        check(dev.index < backend.device_count(), option,
              f"{device!r} asked for, but this machine has {backend.device_count()} {dev.type} device(s)")


# --------------------------------------------------------------------------------------------
# Files written atomically
# --------------------------------------------------------------------------------------------


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def to_jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
    return x


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut short by a crash
    return out


# --------------------------------------------------------------------------------------------
# Seeding and RNG state
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

_CKPT = re.compile(r"^step-(\d+)$")
MANIFEST = "checkpoint.json"  # written last into a checkpoint: its presence means the checkpoint is complete


def command_name(cfg) -> str:
    """The command a config belongs to (`classic dqn`, `rlhf sft`), recorded in its checkpoints."""
    return type(cfg).__module__.replace(".", " ")


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (those with a manifest) in `output_dir/checkpoints`, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_info(path: Path, command: str | None = None) -> dict[str, Any]:
    """The manifest of a complete checkpoint, after checking that every file it lists is there at its
    recorded size and (given `command`) that this command wrote it; else a ConfigError naming the culprit."""
    where = "`resume_from_checkpoint`"
    if not (path / MANIFEST).is_file():
        if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
            raise ConfigError(f"{where}: {path} is a run directory, not a checkpoint; pass one of "
                              f"{path / 'checkpoints'}/step-N, or `latest` with --output_dir {path}")
        raise ConfigError(f"{where}: {path} is not a complete checkpoint (no {MANIFEST}: never finished, "
                          "or not a checkpoint at all)")
    try:
        info = json.loads((path / MANIFEST).read_text())
        files = {str(k): int(v) for k, v in info["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{where}: {path / MANIFEST} is damaged (not a checkpoint manifest)") from None
    if command is not None and info.get("command") != command:
        raise ConfigError(f"{where}: {path} is a checkpoint of `{info.get('command')}`, not of `{command}`")
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise ConfigError(f"{where}: {f} is missing from the checkpoint")
        if f.stat().st_size != size:
            raise ConfigError(f"{where}: {f} has {f.stat().st_size} bytes, {size} when it was written (truncated or "
                              f"damaged)")
    return info


def resolve_checkpoint(resume: str, output_dir: str | os.PathLike, command: str | None = None) -> Path | None:
    """`resume_from_checkpoint` -> a complete checkpoint directory (see `checkpoint_info`); None when not resuming."""
    if not resume:
        return None
    if resume == "latest":
        dirs = checkpoint_dirs(output_dir)
        if not dirs:
            raise ConfigError(f"`resume_from_checkpoint latest`: no checkpoint in {Path(output_dir) / 'checkpoints'}")
        path = dirs[-1]
    else:
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"`resume_from_checkpoint`: no checkpoint directory at {path}")
    checkpoint_info(path, command)
    return path


@contextlib.contextmanager
def loading_checkpoint(path: Path):
    """Wrap the code that loads checkpoint `path`: a file that does not load, or state that does not fit
    this run (another network size or model), ends in one ConfigError instead of a traceback."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:  # torch, safetensors, numpy, accelerate: what a damaged or foreign checkpoint raises
        detail = f"it has no entry {e} (written with other options?)" if isinstance(e, KeyError) else (
            " ".join(str(e).split()) or type(e).__name__)
        raise ConfigError(f"`resume_from_checkpoint`: {path} does not load into this run: {detail[:800]}") from None


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint without ever leaving a half-deleted `step-N`: rename it aside first."""
    aside = path.with_name(f".old-{path.name}")
    os.replace(path, aside)
    shutil.rmtree(aside)


class CheckpointWriter:
    """Context manager yielding a temporary directory that becomes `checkpoints/step-N` on success.

    `with CheckpointWriter(output_dir, step) as d: torch.save(..., d / "state.pt")`. Only if the
    block finishes is the manifest written (the files and their sizes, plus `info`) and the
    directory renamed into place (rename is atomic on one file system); an existing `step-N` is
    renamed aside first and deleted after, so a crash at any point leaves every `step-N` complete
    (a crash between the two renames leaves none for that step: `latest` then takes the one before).
    Then old checkpoints beyond `keep` are removed. In multi-process runs call it on every process
    with `is_main` set; only the main process renames and prunes, after the caller's barrier.
    """

    def __init__(self, output_dir: str | os.PathLike, step: int, keep: int = 2, is_main: bool = True,
                 info: dict[str, Any] | None = None):
        self.root = Path(output_dir) / "checkpoints"
        self.final = self.root / f"step-{step:08d}"
        self.tmp = self.root / f".tmp-step-{step:08d}"
        self.step, self.keep, self.is_main, self.info = step, keep, is_main, info or {}

    def __enter__(self) -> Path:
        if self.is_main:
            for junk in [self.tmp, *self.root.glob(".old-step-*")]:  # left by a crash
                shutil.rmtree(junk, ignore_errors=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self.is_main:
            return
        files = {
            p.relative_to(self.tmp).as_posix(): p.stat().st_size for p in sorted(self.tmp.rglob("*")) if p.is_file()
        }
        write_json(self.tmp / MANIFEST, {"step": self.step, **self.info, "files": files})
        aside = self.final.with_name(f".old-{self.final.name}")
        if self.final.exists():  # replacing step-N: never delete it in place
            os.replace(self.final, aside)
        os.replace(self.tmp, self.final)
        shutil.rmtree(aside, ignore_errors=True)
        if self.keep > 0:
            for old in checkpoint_dirs(self.root.parent)[: -self.keep]:
                _remove_checkpoint(old)


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save a dict of state dicts / numbers, with every RNG state added under `rng`."""
    torch.save({**state, "rng": rng_state()}, path)


def load_state(path: str | os.PathLike, restore_rng: bool = True) -> dict[str, Any]:
    """Inverse of `save_state`, weights-only: a file that would run code when unpickled is refused (ConfigError)."""
    # numpy RNG state holds numpy arrays / dtypes, so allow-list them for the weights-only unpickler.
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler's refusal, a truncated zip, ...
        detail = " ".join(str(e).split()).split("WeightsUnpickler error: ")[-1].split(". ")[0]
        raise ConfigError(f"`resume_from_checkpoint`: cannot load {path}: {detail}. Checkpoint files are read as data "
                          "only (weights-only): a damaged file, or one that would run code, is refused") from None
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return state


try:  # the pickling helper of numpy arrays moved in numpy 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct  # type: ignore
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct  # type: ignore

_SAFE_GLOBALS = [_np_reconstruct, np.ndarray, np.dtype] + [
    type(np.dtype(t)) for t in (np.uint8, np.uint32, np.int64, np.float32, np.float64, np.bool_)]


# --------------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------------


class Run:
    """The run directory of one command: config, metrics, summary, checkpoints, TensorBoard.

    Only the main process writes (`is_main=False` makes every method a no-op), so the same code
    runs unchanged under `accelerate launch`.
    """

    def __init__(self, cfg: RunConfig, is_main: bool = True, checkpoint: Path | None = None):
        """`checkpoint`: the one this run resumes from, already loaded (so a bad one has changed nothing)."""
        self.cfg, self.is_main = cfg, is_main
        self.dir = Path(cfg.output_dir)
        self.resuming = bool(cfg.resume_from_checkpoint)
        self._tb = None
        self._wandb = None
        self._metrics = None
        self._rows = 0  # rows in metrics.jsonl, recorded in each checkpoint (what a resume keeps)
        if not is_main:
            return
        summary = self.dir / "summary.json"
        if summary.exists() and not cfg.overwrite and not self.resuming:
            raise ConfigError(
                f"`output_dir` {self.dir} already holds a finished run (summary.json); "
                "pass --overwrite true to replace it or choose another output_dir"
            )
        if summary.exists() and cfg.overwrite and not self.resuming:
            for name in ("metrics.jsonl", "summary.json"):
                (self.dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.dir / "checkpoints", ignore_errors=True)
            shutil.rmtree(self.dir / "tensorboard", ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "config.yaml", yaml.safe_dump(to_jsonable(config_to_dict(cfg)), sort_keys=False))
        if not self.resuming:
            (self.dir / "metrics.jsonl").unlink(missing_ok=True)
        if checkpoint is not None:
            self.truncate_metrics(checkpoint)

    # -- metrics -----------------------------------------------------------------------------
    def truncate_metrics(self, checkpoint: Path) -> None:
        """On resume, keep the metric rows logged before `checkpoint` was written; the rest is redone.

        By count, not by step: rows logged at the checkpoint's step after it was written (the final
        evaluation) would otherwise appear twice after a resume from the final checkpoint.
        """
        path = self.dir / "metrics.jsonl"
        if not self.is_main or not path.exists():
            return
        if self._metrics is not None:  # reopened (appending to the truncated file) by the next log()
            self._metrics.close()
            self._metrics = None
        rows = read_jsonl(path)[: checkpoint_info(checkpoint)["metrics_rows"]]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        self._rows = len(rows)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {"step": int(step), **to_jsonable(metrics)}
        if self._metrics is None:
            self._metrics = open(self.dir / "metrics.jsonl", "a", buffering=1)
        self._metrics.write(json.dumps(row) + "\n")
        self._rows += 1
        targets = report_targets(self.cfg.report_to)
        if "tensorboard" in targets:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"),
                                         purge_step=step if self.resuming else None)
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        if "wandb" in targets:
            if self._wandb is None:
                import wandb  # optional dependency: pip install wandb

                self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlhf"), name=self.dir.name,
                                         config=to_jsonable(config_to_dict(self.cfg)), resume="allow")
            self._wandb.log(row, step=step)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.is_main:
            write_json(self.dir / "summary.json", summary)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint(self, step: int) -> CheckpointWriter:
        return CheckpointWriter(self.dir, step, keep=self.cfg.save_total_limit, is_main=self.is_main,
                                info={"command": command_name(self.cfg), "metrics_rows": self._rows})

    def resume_path(self) -> Path | None:
        return resolve_checkpoint(self.cfg.resume_from_checkpoint, self.dir, command_name(self.cfg))

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "step"):
    """A tqdm bar (to stderr); callers show live metrics with `bar.set_postfix(...)`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, unit=unit, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5, file=sys.stderr)


def fmt_metrics(metrics: dict[str, Any], keys: typing.Iterable[str]) -> dict[str, str]:
    """Pick `keys` present in `metrics` and format them compactly for a progress-bar postfix."""
    out = {}
    for k in keys:
        if k in metrics and metrics[k] is not None:
            v = to_jsonable(metrics[k])
            out[k.split("/")[-1]] = f"{v:.4g}" if isinstance(v, float) else str(v)
    return out


class Timer:
    """Wall-clock and CPU seconds since construction (CPU time of this process: robust on a loaded machine)."""

    def __init__(self):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def cpu_elapsed(self) -> float:
        return time.process_time() - self.cpu_start
