"""float32 against bf16 autocast (`--bf16 true`) for the rlhf stages on CPU, on a model whose cost is its matmuls.

    python scripts/bench_bf16.py                      # builtin:small (34M parameters), 1 thread
    python scripts/bench_bf16.py --threads 1 2 --stages sft grpo

Each run is the stage's own `train()` (built-in arithmetic task, no evaluation, no checkpoints until the end) with
`--bf16 false` and `--bf16 true`, the same seed, so both sides see the same data. A step is timed from one
`end_step` (logging) to the next: the first `--warmup` steps are not timed, nor are model loading and the final
save. Times are per step: CPU-ms of the process (`time.process_time`, all its threads; the fair measure on a shared
machine) and wall-ms. The RL stages also show generation apart (the rollout's `generate`, every decode step) and the
rest of their step (scoring, reference and old log-probs, the update). Shapes: SFT 32 demonstrations a step;
reward 16 prompts x 2 ranked answers; DPO 16 pairs (the prompt shared by both answers, the reference per
batch); GRPO 4 prompts x 8 completions, PPO 16 completions (policy + a 34M value
model, one epoch, one mini-batch), both 16 new tokens (an untrained model rarely stops early) and beta > 0 (a
reference model).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import torch

STAGES = ("sft", "reward", "dpo", "grpo", "ppo")
QUIET = dict(progress=False, report_to="none", save_steps=0, logging_steps=1)


def stage_config(stage: str, model: str, steps: int) -> dict:
    """The stage's options for a run of `steps` optimizer steps on the built-in task."""
    if stage == "sft":
        return dict(model_name_or_path=model, max_steps=steps, per_device_train_batch_size=32,
                    num_train_examples=32 * steps, num_eval_prompts=0, num_eval_examples=0, eval_pass_at_k=0)
    if stage == "reward":
        return dict(model_name_or_path=model, max_steps=steps, per_device_train_batch_size=16,
                    num_train_prompts=16 * steps, completions_per_prompt=2, num_eval_prompts=0)
    if stage == "dpo":  # the reference pass in every step, as the policy's
        return dict(model_name_or_path=model, max_steps=steps, per_device_train_batch_size=16,
                    num_train_prompts=16 * steps, completions_per_prompt=2, precompute_ref_log_probs=False,
                    num_eval_prompts=0, num_greedy_eval_prompts=0)
    if stage == "grpo":
        return dict(model_name_or_path=model, max_steps=steps, per_device_train_batch_size=32, num_generations=8,
                    max_completion_length=16, beta=0.04, num_train_prompts=4 * steps, num_eval_prompts=0)
    return dict(model_name_or_path=model, max_steps=steps, per_device_train_batch_size=16, num_mini_batches=1,
                num_ppo_epochs=1, max_completion_length=16, kl_coef=0.05, reward_funcs=["exact_match"],
                num_train_prompts=16 * steps, num_eval_prompts=0)


@contextlib.contextmanager
def patched(module, name: str, wrapper):
    original = getattr(module, name)
    setattr(module, name, wrapper(original))
    try:
        yield
    finally:
        setattr(module, name, original)


def timed_run(stage: str, model: str, bf16: bool, threads: int, steps: int, warmup: int, seed: int) -> dict:
    """Median CPU-ms and wall-ms per timed step (and of generation within it) of one run of the stage."""
    import importlib

    from accelerate.state import AcceleratorState

    from rlhf.runtime import make_config

    module = importlib.import_module(f"rlhf.{stage}")
    AcceleratorState._reset_state(reset_partial_state=True)  # mixed precision is fixed per process state
    torch.set_num_threads(threads)
    marks, gen = [], [0.0, 0.0]  # (cpu, wall) at each end_step; generation's cpu, wall since the last one

    def on_end_step(end_step):
        def wrapped(*args, **kwargs):
            marks.append((time.process_time(), time.perf_counter(), gen[0], gen[1]))
            return end_step(*args, **kwargs)
        return wrapped

    def on_generate(generate):
        def wrapped(*args, **kwargs):
            cpu, wall = time.process_time(), time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                gen[0] += time.process_time() - cpu
                gen[1] += time.perf_counter() - wall
        return wrapped

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        stack.enter_context(patched(module, "end_step", on_end_step))
        if hasattr(module, "generate"):
            stack.enter_context(patched(module, "generate", on_generate))
        cfg = make_config(module.Config, {**QUIET, **stage_config(stage, model, warmup + steps), "bf16": bf16,
                                          "seed": seed, "output_dir": tmp})
        module.train(cfg)
    timed = [(b[0] - a[0], b[1] - a[1], b[2] - a[2], b[3] - a[3]) for a, b in zip(marks, marks[1:])][warmup - 1:]
    return {key: 1000 * statistics.median(t[i] for t in timed)
            for i, key in enumerate(("cpu", "wall", "gen_cpu", "gen_wall"))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:small", help="Model to train (a built-in name or a directory).")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="Stages to time.")
    parser.add_argument("--threads", nargs="+", type=int, default=[1], help="torch thread counts to time.")
    parser.add_argument("--steps", type=int, default=3, help="Timed optimizer steps per run (median reported).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first (at least 1).")
    parser.add_argument("--seed", type=int, default=1, help="Seed of both runs.")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (a step is timed from the previous one's end)")

    from rlhf.distributed import cpu_bf16_instructions

    rows = []
    for threads in args.threads:
        for stage in args.stages:
            fp32, bf16 = (timed_run(stage, args.model, b, threads, args.steps, args.warmup, args.seed)
                          for b in (False, True))
            parts = [("step", "cpu", "wall")]
            if stage in ("grpo", "ppo"):
                parts += [("generation", "gen_cpu", "gen_wall"), ("step - generation", None, None)]
            for part, cpu, wall in parts:
                if cpu is None:  # the step without generation
                    a = {k: r["cpu"] - r["gen_cpu"] for k, r in (("fp32", fp32), ("bf16", bf16))}
                    w = {k: r["wall"] - r["gen_wall"] for k, r in (("fp32", fp32), ("bf16", bf16))}
                else:
                    a = {"fp32": fp32[cpu], "bf16": bf16[cpu]}
                    w = {"fp32": fp32[wall], "bf16": bf16[wall]}
                rows.append((stage, part, threads, a["fp32"], a["bf16"], w["fp32"], w["bf16"]))
            print(f"  done: {stage}, {threads} thread(s)", flush=True)

    print(f"\n{args.model}, median of {args.steps} steps after {args.warmup} warm-up; "
          f"CPU bf16 instructions: {cpu_bf16_instructions() or 'none'}; torch {torch.__version__}")
    head = ("stage", "part", "threads", "fp32 CPU-ms", "bf16 CPU-ms", "x per CPU-s", "fp32 wall-ms", "bf16 wall-ms",
            "x per wall-s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for stage, part, threads, c32, c16, w32, w16 in rows:
        print(f"| {stage} | {part} | {threads} | {c32:.0f} | {c16:.0f} | {c32 / c16:.2f} | {w32:.0f} | {w16:.0f} | "
              f"{w32 / w16:.2f} |")


if __name__ == "__main__":
    main()
