"""SFT throughput: `rlhf sft` vs TRL's SFTTrainer on the same model, data and batch, in one process.

Both train `builtin:tiny` on the built-in arithmetic demonstrations (prompt + completion, loss on the
completion only), AdamW, constant learning rate, no evaluation, no checkpoints, for the same number of
optimizer steps; the table reports wall time and examples per second, and the final training loss of
each as a sanity check that both did the same work. Timings on a shared machine are noisy: compare the
ratio, measured here within one run (the two alternate `--repeats` times). TRL's "train loss" is its
mean over the run, ours the last step's.

    python scripts/bench_sft.py --steps 200 --batch_size 64 --threads 1

Needs `pip install trl` (the `bench` extra).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def run_ours(steps: int, batch: int, seed: int, out: Path) -> tuple[float, float]:
    from rlhf import sft
    from rlhf.runtime import make_config

    cfg = make_config(sft.Config, dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
                                       num_train_examples=steps * batch, learning_rate=3e-3,
                                       lr_scheduler_type="constant",
                                       warmup_ratio=0.0, num_eval_prompts=0, num_eval_examples=0, eval_pass_at_k=0,
                                       progress=False, report_to="none", seed=seed, overwrite=True))
    t0 = time.perf_counter()
    summary = sft.train(cfg)
    return time.perf_counter() - t0, summary["time/train_s"], summary["train/loss_last"]


def run_trl(steps: int, batch: int, seed: int, out: Path) -> tuple[float, float]:
    import datasets
    from trl import SFTConfig, SFTTrainer

    from rlhf.models import BUILTIN_TINY, load_causal_lm, load_tokenizer
    from rlhf.tasks import arithmetic

    t0 = time.perf_counter()
    rows = arithmetic.make_sft_rows(steps * batch, seed)
    tokenizer = load_tokenizer(BUILTIN_TINY)
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=3e-3,
                     lr_scheduler_type="constant", completion_only_loss=True, max_length=64,
                     report_to="none", save_strategy="no", logging_steps=steps, use_cpu=True, seed=seed,
                     disable_tqdm=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=load_causal_lm(BUILTIN_TINY), args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer)
    result = trainer.train()
    return time.perf_counter() - t0, result.metrics["train_runtime"], result.training_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine).")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, fn in (("rlhf sft", run_ours), ("TRL SFTTrainer", run_trl)):
                from accelerate.state import AcceleratorState

                AcceleratorState._reset_state(reset_partial_state=True)  # each trainer sets up its own state
                wall, loop, loss = fn(args.steps, args.batch_size, r, Path(tmp) / f"{name.split()[0]}{r}")
                rows.append((name, r, wall, loop, args.steps * args.batch_size / loop, loss))
    print(f"\nSFT on builtin:tiny, {args.steps} steps x {args.batch_size} examples, torch threads {args.threads}")
    print("wall s: whole call (data, model, training, saving); loop s / examples/s: the training loop only")
    print(f"{'trainer':<16} {'rep':>3} {'wall s':>8} {'loop s':>8} {'examples/s':>11} {'train loss':>11}")
    for name, r, wall, loop, eps, loss in rows:
        print(f"{name:<16} {r:>3} {wall:>8.1f} {loop:>8.1f} {eps:>11.0f} {loss:>11.4f}")
    ours = sum(x[4] for x in rows if x[0] == "rlhf sft") / args.repeats
    theirs = sum(x[4] for x in rows if x[0] != "rlhf sft") / args.repeats
    print(f"training-loop throughput ratio rlhf sft / TRL: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
