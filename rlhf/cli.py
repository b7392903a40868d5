"""`rlhf sft|reward|dpo|ppo|grpo|pipeline|plot|configs ...` — one sub-command per stage.

Each stage module exposes a `Config` dataclass and `train(cfg) -> summary dict`; this file only
parses the command line into that config (defaults < --config YAML < --field value).
"""

from __future__ import annotations

import gc
import importlib
import sys

from rlhf.runtime import ConfigError, parse_config

COMMANDS = {
    "sft": ("rlhf.sft", "Supervised fine-tuning on demonstrations."),
    "reward": ("rlhf.reward", "Train a reward model from pairwise preferences or K-wise rankings "
               "(`rlhf reward score ...` scores a file)."),
    "dpo": ("rlhf.dpo", "DPO (and IPO, SimPO, Plackett-Luce...) on pairwise preferences or K-wise rankings: no reward "
            "model, no generation."),
    "ppo": ("rlhf.ppo", "PPO against a reward model or reward functions, with a KL penalty to a frozen reference."),
    "grpo": ("rlhf.grpo", "GRPO: group-normalised advantages, no critic."),
    "pipeline": ("rlhf.pipeline", "SFT -> rankings -> reward model and DPO -> PPO and GRPO, with a report."),
    "plot": ("rlhf.plot", "Plot curves from metrics.jsonl of one or more runs."),
    "configs": ("rlhf.shipped_configs", "Print where the shipped accelerate / DeepSpeed / stage configs are, "
                "or copy them (--out DIR)."),
}


def usage(prog: str, commands: dict) -> str:
    width = max(map(len, commands))
    lines = [f"usage: {prog} <command> [--config FILE.yaml] [--option value ...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in commands.items()]
    lines += ["", f"`{prog} <command> --help` lists every option with its default."]
    return "\n".join(lines)


def dispatch(prog: str, commands: dict, argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog, commands))
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"{prog}: unknown command `{name}`\n\n{usage(prog, commands)}", file=sys.stderr)
        raise SystemExit(2)
    # Importing a stage makes about 400k objects (torch, transformers) that live as long as the process; the cyclic
    # collector would rescan them all on every full pass (about 0.8 s in all during the import, 0.25 s a pass
    # after it). So no collection while importing, and what was imported is frozen out of the collector's sight.
    gc.disable()
    try:
        module = importlib.import_module(commands[name][0])
    finally:
        gc.freeze()
        gc.enable()
    # Bad input of every kind (options, files, data, models, reward functions) is a ConfigError: one
    # line naming the culprit and exit status 2, as argparse's usage errors; anything else is a bug.
    try:
        if hasattr(module, "cli"):  # commands with their own sub-commands or positional arguments
            module.cli(rest, prog=f"{prog} {name}")
        else:
            module.train(parse_config(module.Config, rest, prog=f"{prog} {name}"))
    except ConfigError as e:
        print(f"{prog} {name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    dispatch("rlhf", COMMANDS, argv)


if __name__ == "__main__":
    main()
