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

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rlhf.core import aggregate_loss
from rlhf.runtime import (ConfigError, Run, RunConfig, Timer, arg, check, command_name, fmt_metrics, load_state,
                          loading_checkpoint, progress, resolve_checkpoint, save_state, seed_everything)

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr")


@dataclass
class TrainingConfig(RunConfig):
    """Optimisation, precision and LoRA options shared by `rlhf sft` and `rlhf reward`."""

    num_train_epochs: float = arg(1.0, "Passes over the training data (the budget, unless max_steps is smaller).")
    max_steps: int = arg(-1, "Cap on optimizer steps (-1: no cap).")
    per_device_train_batch_size: int = arg(32, "Examples per micro-batch on each process.")
    gradient_accumulation_steps: int = arg(1, "Micro-batches per optimizer step.")
    learning_rate: float = arg(1e-3, "Peak learning rate (AdamW).")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.999, "AdamW beta2.")
    adam_epsilon: float = arg(1e-8, "AdamW epsilon.")
    max_grad_norm: float = arg(1.0, "Clip the gradient norm to this (0: no clipping).")
    lr_scheduler_type: str = arg("cosine", "Learning-rate schedule (transformers.get_scheduler).", choices=SCHEDULERS)
    warmup_ratio: float = arg(0.05, "Share of the steps spent warming the learning rate up from 0.")
    bf16: bool = arg(False, "bfloat16 mixed precision (autocast).")
    gradient_checkpointing: bool = arg(False, "Recompute activations in the backward pass to save memory.")
    use_peft: bool = arg(False, "Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = arg(16, "LoRA rank.")
    lora_alpha: int = arg(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = arg(0.05, "Dropout on the LoRA input.")
    lora_target_modules: list[str] = arg(["q_proj", "k_proj", "v_proj", "o_proj"], "Module names that get LoRA adapters (comma-separated on the command line).")
    save_adapter_only: bool = arg(False, "With use_peft: save only the adapter in output_dir/model (else the merged weights).")

    def __post_init__(self):
        check(self.num_train_epochs > 0, "num_train_epochs", "must be positive")
        check(self.max_steps == -1 or self.max_steps > 0, "max_steps", "must be -1 (no cap) or positive")
        check(self.per_device_train_batch_size > 0, "per_device_train_batch_size", "must be positive")
        check(self.gradient_accumulation_steps > 0, "gradient_accumulation_steps", "must be positive")
        check(self.learning_rate > 0, "learning_rate", "must be positive")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        check(self.lora_r > 0 and self.lora_alpha > 0, "lora_r", "lora_r and lora_alpha must be positive")
        check(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        check(bool(self.lora_target_modules), "lora_target_modules", "must name at least one module")
        check(not self.save_adapter_only or self.use_peft, "save_adapter_only", "needs use_peft true")


@dataclass
class Config(TrainingConfig):
    """Supervised fine-tuning (SFT) of a causal language model on demonstrations."""

    output_dir: str = arg("runs/sft", "Run directory; the final model goes to output_dir/model.")
    model_name_or_path: str = arg("builtin:tiny", "Model to fine-tune: `builtin:tiny`, a hub name or a local directory.")
    dataset_name: str = arg("", "Hub name or local json/jsonl/parquet/csv file or directory; empty: generate the built-in arithmetic task's demonstrations.")
    dataset_split: str = arg("train", "Split of `dataset_name` to train on (hub datasets and directories).")
    eval_dataset_name: str = arg("", "Optional data (same format) for the eval loss; the built-in task uses held-out demonstrations.")
    num_train_examples: int = arg(20000, "Built-in task: number of demonstrations to generate.")
    carry_error_rate: float = arg(0.6, "Built-in task: share of carry prompts whose demonstration drops the carry.")
    max_length: int = arg(64, "Longest example in tokens; longer examples are dropped (counted in summary.json), never truncated.")
    completion_only_loss: bool = arg(True, "Loss on completion tokens only (prompt tokens get label -100); false: on every token.")
    packing: bool = arg(False, "Concatenate examples into blocks of max_length tokens (no padding; attention crosses example boundaries).")
    eval_steps: int = arg(0, "Evaluate every this many steps (0: only at the end).")
    num_eval_prompts: int = arg(500, "Built-in task: held-out prompts answered greedily for eval/accuracy.")
    num_eval_examples: int = arg(1000, "Built-in task: held-out demonstrations for eval/loss.")
    per_device_eval_batch_size: int = arg(128, "Batch size of evaluation (loss and generation).")
    eval_pass_at_k: int = arg(8, "Built-in task, final eval: share of carry prompts where any of k samples at temperature 1 is right (0: skip).")

    def __post_init__(self):
        check(self.max_length >= 8, "max_length", f"must be at least 8, got {self.max_length}")
        super().__post_init__()
        check(0 <= self.carry_error_rate <= 1, "carry_error_rate", "must be in [0, 1]")
        check(self.num_train_examples > 0, "num_train_examples", "must be positive")
        check(self.eval_steps >= 0 and self.num_eval_prompts >= 0 and self.eval_pass_at_k >= 0, "eval_steps",
              "eval_steps, num_eval_prompts and eval_pass_at_k must be >= 0")


# ---------------------------------------------------------------------------------------------
# Pieces shared with rlhf.reward
# ---------------------------------------------------------------------------------------------


def global_batch_indices(step: int, global_batch: int, n_examples: int, seed: int) -> np.ndarray:
    """Example indices of optimizer step `step`: a stream of per-epoch permutations, cut into global batches."""
    start, out = step * global_batch, []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n_examples)
        perm = np.random.default_rng([seed, epoch]).permutation(n_examples)
        out.extend(perm[offset: offset + global_batch - len(out)].tolist())
    return np.asarray(out)


def micro_batches(indices: np.ndarray, acc, per_device: int, accumulation: int) -> list[np.ndarray]:
    """This process's `accumulation` micro-batches of one global batch (process-major slices)."""
    mine = indices.reshape(acc.num_processes, accumulation * per_device)[acc.process_index]
    return [mine[i * per_device:(i + 1) * per_device] for i in range(accumulation)]


def maybe_lora(model, cfg):
    if not cfg.use_peft:
        return model
    from rlhf.models import apply_lora

    return apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules)


def optimizer_and_scheduler(model, cfg, total_steps: int):
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                  weight_decay=cfg.weight_decay)
    # Stepped by hand once per optimizer step (accelerate's prepared scheduler would step once per process).
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps,
                              scheduler_specific_kwargs={"min_lr_rate": 0.1} if cfg.lr_scheduler_type == "cosine_with_min_lr" else None)
    return optimizer, scheduler


def resume(path: Path | None, acc, scheduler) -> tuple[int, dict]:
    """Restore model / optimizer / RNG (accelerate) and the scheduler from checkpoint `path` (None: a fresh
    run); returns the step to continue from and that step's metrics (summary.json's `train/loss_last`)."""
    if path is None:
        return 0, {}
    with loading_checkpoint(path):
        acc.load_state(str(path))
        state = load_state(path / "trainer_state.pt")
        scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), state["metrics"]


def save_checkpoint(run: Run, acc, scheduler, step: int, metrics: dict) -> None:
    with run.checkpoint(step) as tmp:
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            save_state(tmp / "trainer_state.pt", {"step": step, "scheduler": scheduler.state_dict(), "metrics": metrics})
        acc.wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def load_examples(cfg: Config, tokenizer):
    """(train examples, eval examples or None, dropped counts, built-in task?) with every row checked."""
    import datasets

    from rlhf.data import load_rows, pack_examples, tokenize_sft
    from rlhf.tasks import arithmetic

    if cfg.dataset_name:
        train_rows, train_src = load_rows(cfg.dataset_name, cfg.dataset_split), cfg.dataset_name
    else:
        train_rows = datasets.Dataset.from_list(arithmetic.make_sft_rows(cfg.num_train_examples, cfg.seed, cfg.carry_error_rate))
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
                 if arithmetic.has_carry(p) and rng.random() < cfg.carry_error_rate else arithmetic.gold_answer(p)} for p in prompts]
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
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels.clamp_min(0), reduction="none")  # (B, T-1)
    return per_token, mask


@torch.no_grad()
def eval_loss(acc, model, examples: list[dict], batch_size: int, pad_token_id: int) -> float:
    from rlhf.data import collate_sft
    from rlhf.distributed import gathered_for_generation, reduce_sum

    model.eval()
    total, count = 0.0, 0.0
    # Processes may get different numbers of batches: under ZeRO-3 forward with the weights gathered
    # once (no per-layer collectives to keep in step).
    with gathered_for_generation(acc, model) as unwrapped:
        for i in range(acc.process_index * batch_size, len(examples), acc.num_processes * batch_size):
            batch = {k: v.to(acc.device) for k, v in collate_sft(examples[i:i + batch_size], pad_token_id).items()}
            per_token, mask = token_losses(unwrapped, batch)
            total += float((per_token * mask).sum())
            count += float(mask.sum())
    model.train()
    return float(reduce_sum(acc, total) / reduce_sum(acc, count).clamp_min(1))


def evaluate(acc, model, tokenizer, cfg: Config, eval_examples, builtin_task: bool, final: bool = False) -> dict:
    from rlhf.distributed import gathered_for_generation
    from rlhf.tasks import arithmetic

    metrics = {}
    if eval_examples:
        metrics["eval/loss"] = eval_loss(acc, model, eval_examples, cfg.per_device_eval_batch_size, tokenizer.pad_token_id)
    if builtin_task and cfg.num_eval_prompts > 0:
        prompts = arithmetic.make_prompts(cfg.num_eval_prompts, cfg.seed, split="eval")
        with gathered_for_generation(acc, model) as unwrapped:
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
    from rlhf.data import collate_sft
    from rlhf.distributed import make_accelerator, reduce_sum, save_hf_model
    from rlhf.models import load_causal_lm, load_tokenizer

    acc = make_accelerator(cfg.gradient_accumulation_steps, mixed_precision="bf16" if cfg.bf16 else "no",
                           per_device_train_batch_size=cfg.per_device_train_batch_size, max_grad_norm=cfg.max_grad_norm)
    seed_everything(cfg.seed, cfg.deterministic)
    resume_dir = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir, command_name(cfg))
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    train_examples, eval_examples, dropped, builtin_task = load_examples(cfg, tokenizer)

    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * acc.num_processes
    total_steps = math.ceil(cfg.num_train_epochs * len(train_examples) / global_batch)
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)

    model = maybe_lora(load_causal_lm(cfg.model_name_or_path, gradient_checkpointing=cfg.gradient_checkpointing), cfg)
    optimizer, scheduler = optimizer_and_scheduler(model, cfg, total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    start, metrics = resume(resume_dir, acc, scheduler)
    run = Run(cfg, is_main=acc.is_main_process, checkpoint=resume_dir)  # after the checkpoint loaded: a bad one changes nothing
    timer, tokens_seen = Timer(), 0.0
    model.train()
    bar = progress(total_steps, "sft", enabled=cfg.progress and acc.is_main_process, initial=start)
    for step in range(start, total_steps):
        indices = global_batch_indices(step, global_batch, len(train_examples), cfg.seed)
        batches = [collate_sft([train_examples[i] for i in mb], tokenizer.pad_token_id)
                   for mb in micro_batches(indices, acc, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps)]
        # Token-mean over the whole optimizer step: every process divides by the same global count.
        n_tokens = reduce_sum(acc, sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)).clamp_min(1)
        loss_sum, grad_norm = 0.0, None
        for batch in batches:
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.accumulate(model):
                with acc.autocast():
                    per_token, mask = token_losses(model, batch)
                loss = aggregate_loss(per_token, mask, "token-mean", num_tokens=n_tokens.to(per_token.dtype))
                # DDP averages gradients over processes and accelerate divides by the accumulation steps:
                # undo both so the gradient is that of the global token-mean.
                acc.backward(loss * acc.num_processes * cfg.gradient_accumulation_steps)
                loss_sum += float(loss.detach())
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        tokens_seen += float(n_tokens)
        done = step + 1
        metrics = {"loss/sft": float(reduce_sum(acc, loss_sum)), "train/lr": lr, "train/epoch": done * global_batch / len(train_examples),
                   "train/tokens_per_s": tokens_seen / max(timer.elapsed(), 1e-9)}
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if cfg.eval_steps and done % cfg.eval_steps == 0 and done < total_steps:
            metrics.update(evaluate(acc, model, tokenizer, cfg, eval_examples, builtin_task))
        if done % cfg.logging_steps == 0 or done == total_steps or any(k.startswith("eval/") for k in metrics):
            run.log(done, metrics)
        bar.update(1)
        bar.set_postfix(fmt_metrics(metrics, ["loss/sft", "eval/loss", "eval/accuracy", "eval/well_formed"]))
        if cfg.save_steps and done % cfg.save_steps == 0 and done < total_steps:
            save_checkpoint(run, acc, scheduler, done, metrics)
    bar.close()
    train_seconds = timer.elapsed()
    if start < total_steps:
        save_checkpoint(run, acc, scheduler, total_steps, metrics)

    final = evaluate(acc, model, tokenizer, cfg, eval_examples, builtin_task, final=True)
    run.log(total_steps, final)
    save_hf_model(acc, model, Path(cfg.output_dir) / "model", tokenizer, merge_lora=not cfg.save_adapter_only)
    summary = {**final, "step": total_steps, "train/loss_last": metrics.get("loss/sft"),
               "data/train_examples": len(train_examples), "data/dropped_too_long": dropped,
               "time/train_s": train_seconds, "model/parameters": sum(p.numel() for p in model.parameters()),
               "model/trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    run.write_summary(summary)
    run.close()
    return summary
