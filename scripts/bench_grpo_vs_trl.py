"""Held-out accuracy and training time of our GRPO and TRL's GRPOTrainer from the same SFT model, matched settings.

    python scripts/bench_grpo_vs_trl.py --sft_model runs/demo/sft/model --seeds 1,2,3 \\
        --trl_python /path/to/env-with-trl/bin/python [--config configs/rlhf/grpo_tiny.yaml] [--out results/x.md]

Both sides read the same GRPO config (our grpo_tiny.yaml by default): learning rate and schedule, steps,
completions per step, G, max_completion_length, temperature / top-p / top-k, beta (k3 KL in the loss on both),
epsilon, loss_type, scale_rewards, the reward functions and their weights, AdamW settings, gradient clipping;
one thread each, no gradient checkpointing, no evaluation or checkpoints while training. TRL's side runs in
`--trl_python` (an environment with TRL and this project's task code on PYTHONPATH; it needs neither peft nor
the rest of `rlhf`) and saves its model; then both final models are evaluated here the same way as the
pipeline does: greedy answers to the held-out prompts of `rlhf grpo` for that seed. Training time is the
wall-clock time of the training loop alone (TRL: `trainer.train()`; ours: summary.json's time/train_s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BENCH_RLHF = Path(__file__).resolve().parent / "bench_rlhf.py"

# Runs under --trl_python: TRL's GRPOTrainer built by scripts/bench_rlhf.py's trl_grpo_trainer.
TRL_GRPO = """
import importlib, importlib.util, json, sys, time, torch
s = json.loads(sys.argv[1])
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("bench_rlhf", s["bench_rlhf"])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
funcs = [getattr(importlib.import_module(m), f) for m, f in (r.split(":") for r in s["reward_funcs"])]
trainer = bench.trl_grpo_trainer(s["model_dir"], s["out"], s["prompts"], funcs, **s["config"])
start = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - start
trainer.save_model(s["out"] + "/model")
print(json.dumps({"train_s": seconds}))
"""


def trl_config(cfg) -> dict:
    """GRPOConfig fields matching our grpo.Config `cfg`."""
    return dict(max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_train_batch_size,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_generations=cfg.num_generations,
                max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
                top_k=cfg.top_k, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type,
                warmup_steps=round(cfg.warmup_ratio * cfg.max_steps), adam_beta1=cfg.adam_beta1,
                adam_beta2=cfg.adam_beta2,
                adam_epsilon=cfg.adam_epsilon, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                beta=cfg.beta, epsilon=cfg.cliprange,
                epsilon_high=cfg.cliprange_high if cfg.cliprange_high is not None else cfg.cliprange,
                num_iterations=cfg.num_iterations, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
                reward_weights=cfg.reward_weights or None, mask_truncated_completions=cfg.mask_truncated_completions,
                seed=cfg.seed)


def run_pair(args, seed: int, tmp: Path) -> dict:
    from rlhf import grpo
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.rewards import BUILTIN_REWARDS
    from rlhf.runtime import load_yaml_config, make_config
    from rlhf.tasks.arithmetic import evaluate_policy, make_prompts

    values = {**load_yaml_config(Path(args.config), grpo.Config), "model_name_or_path": args.sft_model,
              "output_dir": str(tmp / f"ours_{seed}"), "seed": seed, "num_eval_prompts": 0, "eval_steps": 0,
              "save_steps": 0, "progress": False, "report_to": "none"}
    cfg = make_config(grpo.Config, values)
    unknown = [f for f in cfg.reward_funcs if f not in BUILTIN_REWARDS]
    if unknown or cfg.reward_model_path or cfg.dataset_name:
        raise SystemExit(f"{args.config}: only the built-in task with built-in reward functions is benchmarked "
                         f"(not {unknown or cfg.reward_model_path or cfg.dataset_name})")
    ours = grpo.train(cfg)

    trl_out = tmp / f"trl_{seed}"
    settings = dict(bench_rlhf=str(BENCH_RLHF), model_dir=args.sft_model, out=str(trl_out),
                    prompts=make_prompts(cfg.num_train_prompts, seed), config=trl_config(cfg),
                    reward_funcs=[BUILTIN_REWARDS[f] for f in cfg.reward_funcs])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH_RLHF.parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([args.trl_python, "-c", TRL_GRPO, json.dumps(settings)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL GRPOTrainer under {args.trl_python} failed:\n{proc.stderr[-3000:]}")
    trl = json.loads(proc.stdout.strip().splitlines()[-1])

    prompts = make_prompts(args.num_eval_prompts, seed=seed, split="eval")  # rlhf grpo's held-out prompts
    row = {}
    for name, model_dir, seconds in (("ours", Path(cfg.output_dir) / "model", ours["time/train_s"]),
                                     ("TRL", trl_out / "model", trl["train_s"])):
        metrics = evaluate_policy(load_causal_lm(str(model_dir)), load_tokenizer(str(model_dir)), prompts,
                                  batch_size=128, max_new_tokens=cfg.max_completion_length)
        row[name] = {**metrics, "time/train_s": seconds}
    return row


def table(rows: dict[int, dict], command: str, config: str) -> str:
    keys = {"held-out accuracy": "eval/accuracy", "carry": "eval/accuracy_carry",
            "no carry": "eval/accuracy_no_carry", "training time (s)": "time/train_s"}
    lines = [f"`{command}`", "",
             f"GRPO from the same SFT model, settings of `{config}` on both sides; accuracies in %, each cell:",
             "mean (min-max) over the seeds, then each seed.", "",
             "| trainer | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name in ("ours", "TRL"):
        cells = []
        for k in keys.values():
            v = np.array([r[name][k] for r in rows.values()], dtype=float) * (1 if k.startswith("time") else 100)
            cells.append(f"{v.mean():.1f} ({v.min():.1f}-{v.max():.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for seed, r in rows.items():
        for name in ("ours", "TRL"):
            lines.append(f"| {name}, seed {seed} | " + " | ".join(
                f"{r[name][k]:.1f}" if k.startswith("time") else f"{100 * r[name][k]:.1f}" for k in keys.values())
                         + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft_model", required=True, help="The SFT model both trainers start from (e.g. "
                                                           "runs/demo/sft/model).")
    parser.add_argument("--config", default="configs/rlhf/grpo_tiny.yaml", help="Our GRPO config; TRL gets the same "
                                                                                "settings.")
    parser.add_argument("--seeds", default="1", help="Comma-separated seeds (one run of each trainer per seed).")
    parser.add_argument("--trl_python", default=sys.executable, help="A Python whose environment has TRL.")
    parser.add_argument("--num_eval_prompts", type=int, default=500, help="Held-out prompts for the final greedy "
                                                                          "evaluation.")
    parser.add_argument("--out", default="", help="Also write the markdown table to this file.")
    args = parser.parse_args()
    if not (Path(args.sft_model) / "config.json").is_file():
        parser.error(f"--sft_model: no model at {args.sft_model}")
    if not Path(args.config).is_file():
        parser.error(f"--config: no such file: {args.config}")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = {int(s): run_pair(args, int(s), Path(tmp)) for s in args.seeds.split(",")}
    text = table(rows, "python scripts/bench_grpo_vs_trl.py " + " ".join(sys.argv[1:]), args.config)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
