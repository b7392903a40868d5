"""`rlhf pipeline`: the whole RLHF recipe end to end, on the built-in default without any download.

    1. sft       supervised fine-tuning on demonstrations                  -> OUT/sft/model
    2. rankings  K responses per prompt sampled from the SFT policy,
                 ranked by the (noisy) labeller                             -> OUT/rankings.jsonl
    3. reward    reward model trained on those rankings                     -> OUT/reward/model
    4. dpo       DPO on the same rankings, from the SFT model (no reward model) -> OUT/dpo/model
    5. ppo       PPO against the learned reward, KL penalty to the SFT model -> OUT/ppo/model
    6. grpo      GRPO with the task's reward functions                      -> OUT/grpo/model

Then OUT/summary.json (per stage: held-out accuracy, gold score, KL to the reference, reward-model
pairwise accuracy, wall time) and OUT/report.md with PNG plots.

Each stage is an ordinary run directory. A stage whose summary.json exists is done and skipped;
one that stopped part-way resumes from its latest checkpoint, so re-running the same command after
a crash continues where it stopped. `stages` picks a subset, and `sft_model_path` /
`reward_model_path` point later stages at existing models instead of training them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import yaml

from rlhf import dpo, grpo, ppo, reward, sft
from rlhf.models import check_model_path, load_causal_lm, load_tokenizer
from rlhf.plot import plot_runs
from rlhf.runtime import (
    ConfigError, RunConfig, arg, atomic_write_text, check, checkpoint_dirs, config_to_dict, load_yaml_config,
    make_config, parse_config, seed_everything, to_jsonable, write_json,
)
from rlhf.tasks import arithmetic

STAGES = ("sft", "rankings", "reward", "dpo", "ppo", "grpo")
_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "rlhf"  # the shipped ones (rlhf/shipped_configs.py)


@dataclasses.dataclass
class Config(RunConfig):
    """The RLHF pipeline: SFT -> rankings -> reward model and DPO -> PPO and GRPO, with a report."""

    output_dir: str = arg("runs/demo", "Pipeline directory; each stage writes its own run directory inside it.")
    stages: list[str] = arg(list(STAGES), "Stages to run, in order (comma-separated): " + ", ".join(STAGES) + ".")
    sft_config: str = arg("configs/rlhf/sft_tiny.yaml", "YAML config of the SFT stage.")
    reward_config: str = arg("configs/rlhf/reward_tiny.yaml", "YAML config of the reward-model stage.")
    dpo_config: str = arg("configs/rlhf/dpo_tiny.yaml", "YAML config of the DPO stage.")
    ppo_config: str = arg("configs/rlhf/ppo_tiny.yaml", "YAML config of the PPO stage.")
    grpo_config: str = arg("configs/rlhf/grpo_tiny.yaml", "YAML config of the GRPO stage.")
    sft_overrides: dict = arg({}, "Options that override the SFT config (YAML mapping, e.g. {max_steps: 50}).")
    reward_overrides: dict = arg({}, "Options that override the reward config.")
    dpo_overrides: dict = arg({}, "Options that override the DPO config.")
    ppo_overrides: dict = arg({}, "Options that override the PPO config.")
    grpo_overrides: dict = arg({}, "Options that override the GRPO config.")
    model_name_or_path: str = arg("", "Base model for SFT (empty: the one in sft_config, builtin:tiny by default).")
    sft_model_path: str = arg("", "Use this SFT model instead of training one (the sft stage is then skipped).")
    reward_model_path: str = arg("", "Use this reward model instead of training one (rankings and reward are skipped).")
    num_ranking_prompts: int = arg(36000, "Prompts whose sampled responses the labeller ranks.")
    completions_per_prompt: int = arg(8, "K: responses per prompt in a ranking (C(K,2) ranked pairs each).")
    ranking_temperature: float = arg(1.0, "Sampling temperature of the SFT policy when collecting responses to rank.")
    labeller_noise: float = arg(0.5, "Noise of the built-in labeller (Bradley-Terry temperature; 0: perfect rankings).")
    max_steps: int = arg(-1, "Cap on every stage's optimizer steps, for smoke tests (-1: each config's own budget).")
    logging_steps: int = arg(1, "Log metrics every this many steps (passed to every stage).")

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        check(not unknown, "stages", f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
        check(self.completions_per_prompt >= 2, "completions_per_prompt", "a ranking needs at least 2 responses")
        check(self.num_ranking_prompts > 0, "num_ranking_prompts", "must be positive")
        check(self.labeller_noise >= 0, "labeller_noise", "must be >= 0")


def cli(argv: list[str], prog: str = "rlhf pipeline") -> None:
    train(parse_args(argv, prog))  # a ConfigError exits 2 in rlhf.cli, as for every command


def parse_args(argv: list[str], prog: str = "rlhf pipeline") -> Config:
    """Like every command, but with configs/rlhf/pipeline_tiny.yaml as the defaults when no --config is given."""
    if not any(a == "--config" or a.startswith("--config=") for a in argv) and "-h" not in argv \
            and "--help" not in argv:
        argv = ["--config", str(_config_path("configs/rlhf/pipeline_tiny.yaml")), *argv]
    return parse_config(Config, argv, prog=prog)


def _config_path(path: str) -> Path:
    """A stage config given relative to the working directory, or else to the project's configs/rlhf."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    fallback = _CONFIG_DIR / p.name
    return fallback if fallback.is_file() else p


def stage_config(module, cfg: Config, name: str, **values):
    """The stage's Config: its YAML file < the pipeline's overrides < the values the pipeline wires in."""
    path = _config_path(getattr(cfg, f"{name}_config"))
    check(path.is_file(), f"{name}_config", f"no such file: {path}")
    yaml_values = load_yaml_config(path, module.Config)
    out_dir = Path(cfg.output_dir) / name
    merged = {**yaml_values, **getattr(cfg, f"{name}_overrides"), **values,
              "output_dir": str(out_dir), "seed": cfg.seed, "report_to": cfg.report_to, "progress": cfg.progress,
              "logging_steps": cfg.logging_steps, "overwrite": cfg.overwrite}
    if cfg.max_steps > 0:
        merged["max_steps"] = min(cfg.max_steps, merged.get("max_steps", -1)) if merged.get("max_steps", -1) > 0 \
            else cfg.max_steps
    if checkpoint_dirs(out_dir) and not (out_dir / "summary.json").exists():
        merged["resume_from_checkpoint"] = "latest"  # a stage that stopped part-way continues
    return make_config(module.Config, merged)


def run_stage(name: str, module, stage_cfg, timings: dict) -> dict:
    out_dir = Path(stage_cfg.output_dir)
    if (out_dir / "summary.json").exists() and not stage_cfg.overwrite:
        print(f"[pipeline] {name}: done already ({out_dir / 'summary.json'}), skipped")
        return json.loads((out_dir / "summary.json").read_text())
    resumed = f" (resuming from {stage_cfg.resume_from_checkpoint})" if stage_cfg.resume_from_checkpoint else ""
    print(f"[pipeline] {name}: running -> {out_dir}{resumed}")
    start = time.perf_counter()
    summary = module.train(stage_cfg)
    timings[name] = time.perf_counter() - start
    return summary


def collect_rankings(cfg: Config, sft_model_path: str, path: Path) -> dict:
    """Sample K responses per prompt from the SFT policy and let the noisy labeller rank them.

    Sampled duplicates carry no preference, so a prompt's K responses are its distinct samples,
    topped up (when the policy is too sure of itself) with the task's perturbed answers — the
    stand-in for responses from other models that InstructGPT's labellers also ranked.
    """
    rng = np.random.default_rng(cfg.seed)
    tokenizer = load_tokenizer(sft_model_path)
    model = load_causal_lm(sft_model_path)
    prompts = arithmetic.make_prompts(cfg.num_ranking_prompts, seed=cfg.seed + 7)
    k = cfg.completions_per_prompt
    samples = arithmetic.generate_completions(model, tokenizer, prompts, batch_size=64, do_sample=True,
                                              temperature=cfg.ranking_temperature, num_return_sequences=k)
    groups, from_policy = [], 0
    for i, prompt in enumerate(prompts):
        # Empty responses (EOS first) are dropped: the data format rejects empty completions.
        distinct = [t for t in dict.fromkeys(text.strip() for text, _ in samples[i * k:(i + 1) * k]) if t]
        from_policy += len(distinct)
        for extra in arithmetic.candidate_answers(prompt, min(k + 4, 14), rng):
            if len(distinct) >= k:
                break
            if extra not in distinct:
                distinct.append(extra)
        groups.append(distinct[:k])
    arithmetic.write_rankings(path, prompts, k, seed=cfg.seed, noise=cfg.labeller_noise, completions=groups)
    return {"rankings/prompts": len(prompts), "rankings/k": k,
            "rankings/share_from_policy": from_policy / (len(prompts) * k), "rankings/path": str(path)}


def train(cfg: Config) -> dict:
    out = Path(cfg.output_dir)
    sft_model = cfg.sft_model_path or str(out / "sft" / "model")
    reward_model = cfg.reward_model_path or str(out / "reward" / "model")
    rankings_path, eval_path = out / "rankings.jsonl", out / "rankings_eval.jsonl"
    wired = {
        "sft": {"model_name_or_path": cfg.model_name_or_path} if cfg.model_name_or_path else {},
        "reward": dict(model_name_or_path=sft_model, dataset_name=str(rankings_path), eval_dataset_name=str(eval_path)),
        "dpo": dict(model_name_or_path=sft_model, dataset_name=str(rankings_path), eval_dataset_name=str(eval_path)),
        "ppo": dict(model_name_or_path=sft_model, reward_model_path=reward_model),
        "grpo": dict(model_name_or_path=sft_model),
    }
    # Bad input fails before anything runs or is written: the models and files this run needs but does
    # not make, and every stage's options (a typo in ppo_overrides fails now, not after SFT has trained).
    for option in ("sft_model_path", "reward_model_path"):
        if getattr(cfg, option):
            check_model_path(getattr(cfg, option), option)
    if cfg.sft_model_path or "sft" not in cfg.stages:
        _require_model(sft_model, "sft_model_path", "the sft stage")
    if "ppo" in cfg.stages and (cfg.reward_model_path or "reward" not in cfg.stages):
        _require_model(reward_model, "reward_model_path", "the reward stage")
    if ("reward" in cfg.stages and not cfg.reward_model_path and "rankings" not in cfg.stages
            and not rankings_path.exists()):
        raise ConfigError(f"the reward stage needs {rankings_path}: run the rankings stage first")
    if "dpo" in cfg.stages and "rankings" not in cfg.stages and not rankings_path.exists():
        raise ConfigError(f"the dpo stage needs {rankings_path}: run the rankings stage first")
    given = {"sft": cfg.sft_model_path, "reward": cfg.reward_model_path}  # stages replaced by a given model
    for name, module in (("sft", sft), ("reward", reward), ("dpo", dpo), ("ppo", ppo), ("grpo", grpo)):
        if name in cfg.stages and not given.get(name):
            stage_config(module, cfg, name, **wired[name])

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(to_jsonable(config_to_dict(cfg)), sort_keys=False))
    seed_everything(cfg.seed)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    results: dict[str, dict] = {}

    if "sft" in cfg.stages and not cfg.sft_model_path:
        results["sft"] = run_stage("sft", sft, stage_config(sft, cfg, "sft", **wired["sft"]), timings)
        write_json(timings_path, timings)
    _require_model(sft_model, "sft_model_path", "the sft stage")

    if "rankings" in cfg.stages and (not cfg.reward_model_path or "dpo" in cfg.stages):
        if rankings_path.exists() and not cfg.overwrite:
            print(f"[pipeline] rankings: done already ({rankings_path}), skipped")
        else:
            print(f"[pipeline] rankings: sampling {cfg.completions_per_prompt} responses x "
                  f"{cfg.num_ranking_prompts} prompts from the SFT policy -> {rankings_path}")
            start = time.perf_counter()
            results["rankings"] = collect_rankings(cfg, sft_model, rankings_path)
            timings["rankings"] = time.perf_counter() - start
            write_json(out / "rankings_summary.json", results["rankings"])
            write_json(timings_path, timings)
    if "reward" in cfg.stages and not cfg.reward_model_path:
        if not rankings_path.exists():
            raise ConfigError(f"the reward stage needs {rankings_path}: run the rankings stage first")
        write_eval_rankings(cfg, eval_path)
        results["reward"] = run_stage("reward", reward, stage_config(reward, cfg, "reward", **wired["reward"]), timings)
        write_json(timings_path, timings)
    if "dpo" in cfg.stages:
        if not rankings_path.exists():
            raise ConfigError(f"the dpo stage needs {rankings_path}: run the rankings stage first")
        write_eval_rankings(cfg, eval_path)
        results["dpo"] = run_stage("dpo", dpo, stage_config(dpo, cfg, "dpo", **wired["dpo"]), timings)
        write_json(timings_path, timings)

    if "ppo" in cfg.stages:
        _require_model(reward_model, "reward_model_path", "the reward stage")
        results["ppo"] = run_stage("ppo", ppo, stage_config(ppo, cfg, "ppo", **wired["ppo"]), timings)
        write_json(timings_path, timings)
    if "grpo" in cfg.stages:
        results["grpo"] = run_stage("grpo", grpo, stage_config(grpo, cfg, "grpo", **wired["grpo"]), timings)
        write_json(timings_path, timings)

    summary = build_summary(out, timings)
    write_json(out / "summary.json", summary)
    write_report(out, summary)
    print(f"[pipeline] wrote {out / 'summary.json'} and {out / 'report.md'}")
    print(format_table(summary))
    return summary


def write_eval_rankings(cfg: Config, path: Path) -> None:
    """Held-out prompts with candidates ranked by the gold score: they measure the reward model and DPO."""
    if not path.exists():
        arithmetic.write_rankings(path, arithmetic.make_prompts(500, seed=cfg.seed, split="eval"),
                                  cfg.completions_per_prompt, seed=cfg.seed + 1, noise=0.0)


def _require_model(path: str, option: str, stage: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"no model at {path}: run {stage} first or pass `{option}`")


# ---------------------------------------------------------------------------------------------
# Summary and report
# ---------------------------------------------------------------------------------------------

_POLICY_KEYS = ("eval/accuracy", "eval/reward_mean", "eval/accuracy_carry", "eval/accuracy_no_carry", "kl/ref")


def _read_summary(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_config(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _label(stage: str, row: dict) -> str:
    """The policy's name in the report: DPO with its losses unless it is plain sigmoid (DPO's own)."""
    losses = row.get("loss_type", ["sigmoid"])
    return f"DPO ({' + '.join(losses)})" if stage == "dpo" and losses != ["sigmoid"] else stage.upper()


def build_summary(out: Path, timings: dict) -> dict:
    summary: dict[str, dict] = {}
    for stage in ("sft", "dpo", "ppo", "grpo"):
        s = _read_summary(out / stage / "summary.json")
        if s:
            row = {k: s.get(k) for k in _POLICY_KEYS + ("eval/preference_accuracy",) if k in s}
            if stage == "sft":
                row.setdefault("kl/ref", 0.0)  # the SFT model is the reference
            if stage == "dpo":  # which losses the row is (rpo_alpha: an sft term)
                config = _read_config(out / stage / "config.yaml")
                row["loss_type"] = list(config.get("loss_type", ["sigmoid"])) + ["sft"] * bool(config.get("rpo_alpha"))
            summary[stage] = row
    r = _read_summary(out / "reward" / "summary.json")
    if r:
        summary["reward"] = {k: v for k, v in r.items() if k.startswith("eval/")}
    rank = _read_summary(out / "rankings_summary.json")
    if rank:
        summary["rankings"] = {k: v for k, v in rank.items() if k != "rankings/path"}
    for stage, seconds in timings.items():
        summary.setdefault(stage, {})["time/wall_s"] = round(seconds, 1)
    return summary


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def format_table(summary: dict) -> str:
    cols = ["eval/accuracy", "eval/accuracy_carry", "eval/accuracy_no_carry", "eval/reward_mean", "kl/ref",
            "time/wall_s"]
    lines = ["| policy | held-out accuracy | carry | no carry | gold score | KL to SFT | wall time (s) |",
             "|---|---|---|---|---|---|---|"]
    for stage in ("sft", "dpo", "ppo", "grpo"):
        if stage in summary:
            row = summary[stage]
            lines.append(f"| {_label(stage, row)} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def write_report(out: Path, summary: dict) -> None:
    parts = ["# RLHF pipeline report", "", f"Run directory: `{out}`", "", "## Policies (held-out prompts, greedy "
                                                                          "decoding)",
             "", format_table(summary), ""]
    if "reward" in summary:
        parts += ["## Reward model", "", "| metric | value |", "|---|---|"]
        parts += [f"| {k} | {_fmt(v)} |" for k, v in summary["reward"].items()] + [""]
    for stage, keys in (("ppo", ["reward/score_mean", "reward/gold_mean", "kl/ref", "kl/beta", "eval/accuracy"]),
                        ("grpo", ["reward/mean", "kl/ref", "frac_reward_zero_std", "eval/accuracy"]),
                        ("reward", ["loss/reward", "reward/accuracy", "eval/accuracy"]),
                        ("dpo", ["loss/dpo", "rewards/accuracies", "rewards/margins", "eval/accuracy"]),
                        ("sft", ["loss/sft", "eval/loss", "eval/accuracy"])):
        metrics = out / stage / "metrics.jsonl"
        if not metrics.is_file():
            continue
        present = {k for line in metrics.read_text().splitlines() if line.strip() for k in json.loads(line)}
        keys = [k for k in keys if k in present]
        if keys:
            png = plot_runs([out / stage], keys=keys, out=out / f"{stage}_curves.png", title=stage.upper())
            parts += [f"## {stage.upper()} curves", "", f"![{stage}]({png.name})", ""]
    parts += ["## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    parts += [f"| {s} | {_fmt(v.get('time/wall_s'))} |" for s, v in summary.items() if "time/wall_s" in v]
    atomic_write_text(out / "report.md", "\n".join(parts) + "\n")
