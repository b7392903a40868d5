"""The shipped config files, from any directory: `rlhf configs [--out DIR]`.

The repository's `configs/` (accelerate/, deepspeed/, rlhf/, classic/) is also inside the package
as `rlhf/configs` (a link in the checkout, package data in a wheel), so a `pip install` has them.

Accelerate resolves an accelerate config's `deepspeed_config_file` against the working directory,
and the shipped ones name theirs as `configs/deepspeed/<name>.json`, which exists only from the
repository root. `resolve_deepspeed_config_env` (called by `rlhf.distributed.make_accelerator`
before accelerate reads it) points such a path at the shipped file when the working directory has
no file by that name, so `accelerate launch --config_file <any copy of the shipped configs>/accelerate/zero3.yaml
-m rlhf ...` works from anywhere. `rlhf configs --out DIR` writes an editable copy whose accelerate
(and pipeline) files name the copy's own files by absolute path: those work from any directory
for any script, not only for `rlhf` commands.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

from rlhf.runtime import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
KINDS = ("accelerate", "deepspeed", "rlhf", "classic")
# `key: configs/<kind>/<file>` (a value, optionally followed by a comment): a reference to another shipped file
_REFERENCE = re.compile(r"^(?P<key>\s*[A-Za-z_][\w]*:\s*)configs/(?P<rel>[\w./-]+)(?P<rest>\s*(#.*)?)$")


def shipped_files() -> list[Path]:
    """Every shipped config file, relative to CONFIG_DIR, sorted."""
    return sorted(p.relative_to(CONFIG_DIR) for kind in KINDS for p in (CONFIG_DIR / kind).glob("*")
                  if p.suffix in (".yaml", ".json") and p.is_file())


def shipped_file(path: str) -> Path | None:
    """The shipped file that `path` names, when it is `configs/<kind>/<file>` relative to a working
    directory without such a file (None otherwise: an absolute path, a file that exists, anything else)."""
    p = Path(path)
    if p.is_absolute() or len(p.parts) < 3 or p.parts[0] != "configs" or p.exists():
        return None
    candidate = CONFIG_DIR.joinpath(*p.parts[1:])
    return candidate if candidate.is_file() else None


def resolve_deepspeed_config_env(environ=os.environ) -> str | None:
    """Point ACCELERATE_DEEPSPEED_CONFIG_FILE (set by `accelerate launch` from the accelerate config's
    `deepspeed_config_file`) at the shipped DeepSpeed file when it names one that is not in the
    working directory. Returns the new value, or None when nothing changed."""
    shipped = shipped_file(environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", ""))
    if shipped is None:
        return None
    environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(shipped)
    return str(shipped)


def write_copy(out: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Copy the shipped configs into `out` (out/accelerate/zero3.yaml, ...). References from one file
    to another (`deepspeed_config_file: configs/deepspeed/zero3.json`, the pipeline's stage configs)
    are rewritten to the copy's files by absolute path, so the copy works from any directory.
    Refuses to replace existing files unless `overwrite`. Returns the written paths."""
    out = Path(out).expanduser().resolve()
    files = shipped_files()
    existing = [out / rel for rel in files if (out / rel).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{len(existing)} file(s) exist already, e.g. {existing[0]}; "
                              "pass --overwrite true to replace them")
    written = []
    for rel in files:
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel.suffix == ".yaml":
            dest.write_text(_rewrite_references(CONFIG_DIR / rel, out), encoding="utf-8")
        else:
            shutil.copyfile(CONFIG_DIR / rel, dest)
        written.append(dest)
    return written


def _rewrite_references(src: Path, out: Path) -> str:
    lines = []
    for line in src.read_text(encoding="utf-8").splitlines(keepends=True):
        body, newline = line.rstrip("\r\n"), line[len(line.rstrip("\r\n")):]
        m = _REFERENCE.match(body)
        if m and (CONFIG_DIR / m["rel"]).is_file():
            body = f"{m['key']}{json.dumps(str(out / m['rel']))}{m['rest']}"  # a JSON string is a YAML string
        lines.append(body + newline)
    return "".join(lines)


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def cli(argv: list[str], prog: str = "rlhf configs") -> None:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the directory of the shipped configs (accelerate/, deepspeed/, rlhf/, classic/),\n"
        "or write an editable copy of them with --out.",
        epilog=f"examples:\n  accelerate launch --config_file \"$({prog})/accelerate/zero3.yaml\" -m rlhf sft ...\n"
        f"  {prog} --out my_configs\n"
        "  accelerate launch --config_file my_configs/accelerate/zero3.yaml -m rlhf sft ...")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write a copy into DIR (DeepSpeed and stage-config references rewritten to the copy's "
                        "files by absolute path); default: print the shipped directory")
    parser.add_argument("--overwrite", type=_bool, default=False, metavar="true|false",
                        help="replace files already in DIR (default: false)")
    args = parser.parse_args(argv)
    if args.out is None:
        print(CONFIG_DIR)  # alone on stdout, for "$(rlhf configs)/accelerate/zero3.yaml"
        if sys.stdout.isatty():
            print(" ".join(str(rel) for rel in shipped_files()), file=sys.stderr)
        return
    try:
        written = write_copy(args.out, overwrite=args.overwrite)
    except FileExistsError as e:
        raise ConfigError(f"--out: {e}") from None  # one line and exit status 2, as every command
    out = Path(args.out).expanduser().resolve()
    print(f"wrote {len(written)} files into {out}:")
    for kind in KINDS:
        names = sorted(p.name for p in written if p.parent.name == kind)
        print(f"  {kind}/: {' '.join(names)}")
    print(f"e.g. accelerate launch --config_file {out / 'accelerate' / 'zero3.yaml'} -m rlhf sft --max_steps 4")
