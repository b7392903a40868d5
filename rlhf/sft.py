"""`rlhf sft`: supervised fine-tuning of a causal LM on demonstrations.

Data: `text`, `prompt` + `completion`, or `messages` (see rlhf.data); without `--dataset_name` the
built-in arithmetic task's demonstrations are generated (with their dropped-carry human error).
Loss: next-token cross-entropy, on completion tokens only by default, averaged over every supervised
token of the optimizer step - across micro-batches and processes - so 8 micro-batches of 1 give the
same update as 1 batch of 8, and 2 processes x B the same as 1 x 2B.

Order of work: config -> tokenizer, data (all checks) -> model -> run directory. Bad input therefore
fails before anything is written. The data order is a function of the step (a fixed permutation per
epoch), so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from rlhf.core import aggregate_loss
from rlhf.data import collate_sft, load_rows, pack_examples, sft_shape, tokenize_sft
from rlhf.distributed import gathered_for_generation, loss_normaliser, reduce_sum, save_hf_model
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.runtime import (ConfigError, Timer, arg, check, command_name, resolve_checkpoint,
                          seed_everything)
from rlhf.tasks import arithmetic
from rlhf.training import (TrainingConfig, backward, due, end_step, epoch_steps, lora, open_epoch_run,
                           prepare_training, save_checkpoint, scoring_batches, setup_accelerator,
                           step_batches)


@dataclass
class Config(TrainingConfig):
    """Supervised fine-tuning (SFT) of a causal language model on demonstrations."""

    output_dir: str = arg("runs/sft", "Run directory; the final model goes to output_dir/model.")
    num_train_epochs: float = arg(1.0, "Passes over the training data (the budget, unless max_steps is smaller).")
    max_steps: int = arg(-1, "Cap on optimizer steps (-1: no cap).")
    per_device_train_batch_size: int = arg(32, "Examples per micro-batch on each process.")
    model_name_or_path: str = arg("builtin:tiny", "Model to fine-tune: `builtin:tiny`, a hub name or a local dir.")
    dataset_name: str = arg("", "Hub name or local json/jsonl/parquet/csv file or directory; empty: generate the "
                                "built-in arithmetic task's demonstrations.")
    dataset_split: str = arg("train", "Split of `dataset_name` to train on (hub datasets and directories).")
    eval_dataset_name: str = arg("", "Data (same format) for eval/loss; the built-in task has held-out demonstrations.")
    num_train_examples: int = arg(20000, "Built-in task: number of demonstrations to generate.")
    carry_error_rate: float = arg(0.6, "Built-in task: share of carry prompts whose demonstration drops the carry.")
    max_length: int = arg(64, "Longest example in tokens; longer ones are dropped (counted in summary.json), not cut.")
    completion_only_loss: bool = arg(True, "Loss on completion tokens only (prompt labels -100); false: every token.")
    packing: bool = arg(False, "Concatenate examples into blocks of max_length tokens (no padding; attention crosses "
                               "example boundaries).")
    eval_steps: int = arg(0, "Evaluate every this many steps (0: only at the end).")
    num_eval_prompts: int = arg(500, "Built-in task: held-out prompts answered greedily for eval/accuracy.")
    num_eval_examples: int = arg(1000, "Built-in task: held-out demonstrations for eval/loss.")
    per_device_eval_batch_size: int = arg(128, "Batch size of evaluation (loss and generation).")
    eval_pass_at_k: int = arg(8, "Built-in task, final eval: share of carry prompts where any of k samples at "
                                 "temperature 1 is right (0: skip).")

    def __post_init__(self):
        check(self.max_length >= 8, "max_length", f"must be at least 8, got {self.max_length}")
        super().__post_init__()
        check(self.num_train_epochs > 0, "num_train_epochs", "must be positive")
        check(self.max_steps == -1 or self.max_steps > 0, "max_steps", "must be -1 (no cap) or positive")
        check(self.per_device_train_batch_size > 0, "per_device_train_batch_size", "must be positive")
        check(0 <= self.carry_error_rate <= 1, "carry_error_rate", "must be in [0, 1]")
        check(self.num_train_examples > 0, "num_train_examples", "must be positive")
        check(self.eval_steps >= 0 and self.num_eval_prompts >= 0 and self.eval_pass_at_k >= 0, "eval_steps",
              "eval_steps, num_eval_prompts and eval_pass_at_k must be >= 0")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def load_examples(cfg: Config, tokenizer):
    """(train examples, eval examples or None, dropped counts, built-in task?) with every row checked."""
    if cfg.dataset_name:
        train_rows, train_src = load_rows(cfg.dataset_name, cfg.dataset_split), cfg.dataset_name
    else:
        rows = arithmetic.make_sft_rows(cfg.num_train_examples, cfg.seed, cfg.carry_error_rate)
        train_rows = datasets.Dataset.from_list(rows)
        train_src = "built-in arithmetic demonstrations"
    train = tokenize_sft(train_rows, tokenizer, cfg.max_length, cfg.completion_only_loss, source=train_src)
    eval_tok = None
    if cfg.eval_dataset_name:
        eval_tok = tokenize_sft(load_rows(cfg.eval_dataset_name, cfg.dataset_split), tokenizer, cfg.max_length,
                                cfg.completion_only_loss, source=cfg.eval_dataset_name)
    elif not cfg.dataset_name and cfg.num_eval_examples > 0:
        # held-out prompts, same demonstrator (so eval/loss includes the irreducible dropped-carry noise)
        prompts = arithmetic.make_prompts(cfg.num_eval_examples, cfg.seed, split="eval")
        rng = np.random.default_rng(cfg.seed + 7)
        rows = [{"prompt": p, "completion": arithmetic.dropped_carry_answer(p)
                 if arithmetic.has_carry(p) and rng.random() < cfg.carry_error_rate else arithmetic.gold_answer(p)}
                for p in prompts]
        eval_tok = tokenize_sft(datasets.Dataset.from_list(rows), tokenizer, cfg.max_length, cfg.completion_only_loss,
                                source="built-in held-out demonstrations")
    train_examples = pack_examples(train.examples, cfg.max_length) if cfg.packing else train.examples
    if not train_examples:
        raise ConfigError(f"`packing`: the data holds fewer than max_length={cfg.max_length} tokens")
    return train_examples, (eval_tok.examples if eval_tok else None), train.dropped_too_long, not cfg.dataset_name


# ---------------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------------


def token_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token cross-entropy and its mask (label != -100)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    labels = batch["labels"][:, 1:]  # (B, T-1): token t is predicted from tokens < t
    mask = labels != -100  # (B, T-1)
    # (B, T-1)
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels.clamp_min(0), reduction="none")
    return per_token, mask


@torch.no_grad()
def eval_loss(accelerator, model, examples: list[dict], batch_size: int, pad_token_id: int) -> float:
    model.eval()
    total, count = 0.0, 0.0
    with gathered_for_generation(accelerator, model) as unwrapped:
        for chunk in scoring_batches(accelerator, examples, batch_size, sft_shape):
            batch = {k: v.to(accelerator.device)
                     for k, v in collate_sft([examples[i] for i in chunk], pad_token_id).items()}
            per_token, mask = token_losses(unwrapped, batch)
            total += float((per_token * mask).sum())
            count += float(mask.sum())
    model.train()
    return float(reduce_sum(accelerator, total) / reduce_sum(accelerator, count).clamp_min(1))


def evaluate(accelerator, model, tokenizer, cfg: Config, eval_examples, builtin_task: bool,
             final: bool = False) -> dict:
    metrics = {}
    if eval_examples:
        metrics["eval/loss"] = eval_loss(accelerator, model, eval_examples, cfg.per_device_eval_batch_size,
                                         tokenizer.pad_token_id)
    if builtin_task and cfg.num_eval_prompts > 0:
        prompts = arithmetic.make_prompts(cfg.num_eval_prompts, cfg.seed, split="eval")
        with gathered_for_generation(accelerator, model) as unwrapped:
            metrics.update(arithmetic.evaluate_policy(unwrapped, tokenizer, prompts, cfg.per_device_eval_batch_size))
            if final and cfg.eval_pass_at_k > 0:
                with torch.random.fork_rng(devices=[]):  # sampling here must not shift the training RNG
                    torch.manual_seed(cfg.seed)
                    metrics.update(arithmetic.evaluate_pass_at_k(unwrapped, tokenizer, prompts, k=cfg.eval_pass_at_k,
                                                                 batch_size=cfg.per_device_eval_batch_size))
    return metrics


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train(cfg: Config) -> dict:
    accelerator = setup_accelerator(cfg)
    seed_everything(cfg.seed, cfg.deterministic)
    resume_dir = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir, command_name(cfg))
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    train_examples, eval_examples, dropped, builtin_task = load_examples(cfg, tokenizer)
    global_batch, total_steps = epoch_steps(cfg, accelerator, len(train_examples))

    model = lora(load_causal_lm(cfg.model_name_or_path, gradient_checkpointing=cfg.gradient_checkpointing), cfg)
    model, optimizer, scheduler = prepare_training(accelerator, model, cfg, total_steps)
    start, metrics, run, bar = open_epoch_run(cfg, accelerator, resume_dir, scheduler, total_steps, "sft")

    def save(step):
        save_checkpoint(run, accelerator, step, {"metrics": metrics}, scheduler=scheduler)

    timer, tokens_seen = Timer(), 0.0
    model.train()
    for step in range(start, total_steps):
        batches = step_batches(accelerator, cfg, step, train_examples, collate_sft, tokenizer.pad_token_id)
        # Token-mean over the whole optimizer step: every process divides by the same global count.
        n_tokens = loss_normaliser(accelerator, sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
        loss_sum, update = 0.0, {}
        for batch in batches:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    per_token, mask = token_losses(model, batch)
                loss = aggregate_loss(per_token, mask, "token-mean", num_tokens=n_tokens)
                update = backward(accelerator, model, optimizer, scheduler, loss, cfg.max_grad_norm)
            loss_sum += float(loss.detach())
        tokens_seen += float(n_tokens)
        done = step + 1
        metrics = {"loss/sft": float(reduce_sum(accelerator, loss_sum)), **update,
                   "train/epoch": done * global_batch / len(train_examples),
                   "train/tokens_per_s": tokens_seen / max(timer.elapsed(), 1e-9)}
        if due(cfg.eval_steps, done, total_steps):
            metrics.update(evaluate(accelerator, model, tokenizer, cfg, eval_examples, builtin_task))
        end_step(run, bar, cfg, done, total_steps, metrics,
                 ["loss/sft", "eval/loss", "eval/accuracy", "eval/well_formed"], lambda: save(done))
    bar.close()
    train_seconds = timer.elapsed()
    if start < total_steps:
        save(total_steps)

    final = evaluate(accelerator, model, tokenizer, cfg, eval_examples, builtin_task, final=True)
    run.log(total_steps, final)
    save_hf_model(accelerator, model, Path(cfg.output_dir) / "model", tokenizer, merge_lora=not cfg.save_adapter_only)
    summary = {**final, "step": total_steps, "train/loss_last": metrics.get("loss/sft"),
               "data/train_examples": len(train_examples), "data/dropped_too_long": dropped,
               "time/train_s": train_seconds, "model/parameters": sum(p.numel() for p in model.parameters()),
               "model/trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    run.write_summary(summary)
    run.close()
    return summary
