"""What every rlhf stage (sft, reward, ppo, grpo) does the same way, written once.

- `TrainingConfig`: the optimizer, schedule, precision and LoRA options (TRL's names); a stage
  redeclares a field to change its default.
- `setup_accelerator`, `lora`, `prepare_training`: the accelerator, peft adapters, AdamW and
  transformers' schedule, with the model and optimizer prepared by accelerate.
- `backward`: one micro-batch's share of the optimizer step's mean loss -> gradients; at the end of
  an accumulation cycle: clip, optimizer step, schedule.
- `save_checkpoint` / `open_run`: `checkpoints/step-N` (accelerate's state + the stage's); the state
  to continue from (a checkpoint's or a fresh run's) and the run directory.
- `step_batches`, `epoch_steps`, `open_epoch_run`: the data order of SFT, reward and DPO (a function of the
  step), their budget, and their run directory and progress bar.
- `due`, `end_step`: when to evaluate; logging, the progress bar and checkpoints after every step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np
import torch
from transformers import get_scheduler

from rlhf.distributed import checkpoint, make_accelerator
from rlhf.models import apply_lora
from rlhf.runtime import (Run, RunConfig, arg, check, fmt_metrics, load_state, loading_checkpoint, progress,
                          save_state)

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr")


@dataclasses.dataclass
class TrainingConfig(RunConfig):
    """Optimisation, precision and LoRA options of every rlhf training stage."""

    gradient_accumulation_steps: int = arg(1, "Micro-batches per optimizer step.")
    learning_rate: float = arg(1e-3, "Peak learning rate (AdamW).")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.999, "AdamW beta2.")
    adam_epsilon: float = arg(1e-8, "AdamW epsilon.")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    max_grad_norm: float = arg(1.0, "Clip the gradient norm to this (0: no clipping).")
    lr_scheduler_type: str = arg("cosine", "Learning-rate schedule (transformers.get_scheduler; cosine_with_min_lr "
                                           "decays to 10% of the peak).", choices=SCHEDULERS)
    warmup_ratio: float = arg(0.05, "Share of the optimizer steps spent warming the learning rate up from 0.")
    bf16: bool = arg(False, "bfloat16 autocast for every forward pass (training, generation, reference and reward "
                            "models), on CPU or GPU; weights, optimizer state, log-probs and losses stay float32. "
                            "Pays on CPUs with AVX512-BF16 or AMX from ~30M parameters (docs/precision.md).")
    gradient_checkpointing: bool = arg(False, "Recompute activations in the backward pass to save memory.")
    use_peft: bool = arg(False, "Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = arg(16, "LoRA rank.")
    lora_alpha: int = arg(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = arg(0.05, "Dropout on the LoRA input (PPO and GRPO switch every dropout off, this one too).")
    lora_target_modules: list[str] = arg(["q_proj", "k_proj", "v_proj", "o_proj"],
                                         "Module names that get LoRA adapters (comma-separated on the command line).")
    save_adapter_only: bool = arg(False, "With use_peft: save the adapter alone in output_dir/model (not merged).")

    def __post_init__(self):
        check(self.gradient_accumulation_steps > 0, "gradient_accumulation_steps", "must be positive")
        check(self.learning_rate > 0, "learning_rate", "must be positive")
        check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1", "adam_beta1 and adam_beta2 must be "
                                                                                   "in [0, 1)")
        check(self.adam_epsilon > 0, "adam_epsilon", "must be positive")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0: no clipping)")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        check(self.lora_r > 0 and self.lora_alpha > 0, "lora_r", "lora_r and lora_alpha must be positive")
        check(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        check(bool(self.lora_target_modules), "lora_target_modules", "must name at least one module")
        check(not self.save_adapter_only or self.use_peft, "save_adapter_only", "needs use_peft true")


# --------------------------------------------------------------------------------------------
# Accelerator, LoRA, optimizer
# --------------------------------------------------------------------------------------------


def setup_accelerator(cfg):
    """The stage's Accelerator, with its batch settings checked against a DeepSpeed config at once."""
    return make_accelerator(cfg.gradient_accumulation_steps, bf16=cfg.bf16, max_grad_norm=cfg.max_grad_norm,
                            per_device_train_batch_size=cfg.per_device_train_batch_size)


def lora(model, cfg: TrainingConfig):
    """`model` with LoRA adapters when `use_peft` (only they train), else `model` itself."""
    if not cfg.use_peft:
        return model
    return apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)


def prepare_training(accelerator, model, cfg: TrainingConfig, total_steps: int):
    """(model, optimizer, scheduler): AdamW over the trainable parameters and the learning-rate schedule over
    `total_steps` optimizer steps, the model and the optimizer prepared by accelerate (DDP / DeepSpeed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = accelerator.device.type in ("cpu", "cuda")  # one kernel for all tensors, not one per tensor
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, fused=fused)
    min_lr = {"min_lr_rate": 0.1} if cfg.lr_scheduler_type == "cosine_with_min_lr" else None
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps, scheduler_specific_kwargs=min_lr)
    # The scheduler stays unprepared: accelerate's wrapper would step it once per process. `backward` steps
    # it once per optimizer step; its state goes into trainer_state.pt (accelerate's register_for_checkpointing
    # would load it with pickle).
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler


# --------------------------------------------------------------------------------------------
# One micro-batch
# --------------------------------------------------------------------------------------------


def backward(accelerator, model, optimizer, scheduler, loss: torch.Tensor, max_grad_norm: float) -> dict:
    """Backward of one micro-batch's loss; at the end of an accumulation cycle clip, step and schedule.

    `loss` is this micro-batch's share of the optimizer step's mean loss: normalised by the step's
    global count (`loss_normaliser`), so the shares of all micro-batches and processes add up to
    the mean over the whole step. Call inside `accelerator.accumulate(model)`, whose forward pass
    it belongs to. Returns `train/lr` (the rate of this update) and `train/grad_norm` (before
    clipping) after an optimizer step, {} in mid-cycle.
    """
    # DDP / DeepSpeed average gradients over processes and accelerate divides by the accumulation
    # steps: undo both, so the gradient is that of the sum of the shares.
    accelerator.backward(loss * (accelerator.num_processes * accelerator.gradient_accumulation_steps))
    if not accelerator.sync_gradients:
        return {}
    out = {"train/lr": scheduler.get_last_lr()[0]}
    if max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        if grad_norm is not None:  # DeepSpeed clips inside its own step and may not report it
            out["train/grad_norm"] = float(grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return out


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def save_checkpoint(run, accelerator, step: int, state: dict, process_state: dict | None = None, **stateful) -> None:
    """Write `checkpoints/step-N`: accelerate's state (model, optimizer, each process's RNG) in
    `accelerate/`, `state` and each of `stateful`'s `state_dict()` in `trainer_state.pt` (plain data,
    read weights-only), and `process_state` (tensors each process keeps for itself) in `process_R.pt`.
    Call on every process (a `state_dict()` may be collective; the main process's is written)."""
    with checkpoint(accelerator, run, step) as tmp:  # barriers: tmp exists before, everyone done after
        accelerator.save_state(str(Path(tmp) / "accelerate"))
        states = {k: v.state_dict() for k, v in stateful.items()}
        if process_state is not None:
            torch.save({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in process_state.items()},
                       Path(tmp) / f"process_{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            save_state(Path(tmp) / "trainer_state.pt", {"step": step, **state, **states})


def open_run(cfg, accelerator, resume_dir: Path | None, fresh: dict, **stateful) -> tuple[dict, dict | None, Run]:
    """(state to continue from, this process's `process_state` or None, the run directory).

    A fresh run starts from `fresh`; a resumed one from checkpoint `resume_dir` (see `save_checkpoint`),
    with accelerate's state and each of `stateful` restored in place. The run directory is opened
    only after the checkpoint loaded, so a bad checkpoint (a ConfigError) changes nothing.
    """
    state, process_state = (fresh, None) if resume_dir is None else load_checkpoint(resume_dir, accelerator, **stateful)
    return state, process_state, Run(cfg, is_main=accelerator.is_main_process, checkpoint=resume_dir)


def load_checkpoint(path: Path, accelerator, **stateful) -> tuple[dict, dict | None]:
    """Inverse of `save_checkpoint`: (the saved `state`, this process's `process_state` or None)."""
    with loading_checkpoint(path):
        accelerator.load_state(str(path / "accelerate"))
        state = load_state(path / "trainer_state.pt", restore_rng=False)  # accelerate restored each process's RNG
        for name, obj in stateful.items():
            obj.load_state_dict(state[name])
        mine, process_state = path / f"process_{accelerator.process_index}.pt", None
        if mine.exists():
            process_state = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v
                             for k, v in torch.load(mine, weights_only=True).items()}
    return state, process_state


# --------------------------------------------------------------------------------------------
# Data order of SFT and reward (a function of the step, so a resumed run sees the same batches)
# --------------------------------------------------------------------------------------------


def epoch_steps(cfg, accelerator, n_examples: int) -> tuple[int, int]:
    """(global batch, optimizer steps) of `num_train_epochs` passes over `n_examples`, capped by `max_steps`
    (-1: no cap); the global batch counts every micro-batch of every process."""
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    steps = math.ceil(cfg.num_train_epochs * n_examples / global_batch)
    return global_batch, (min(steps, cfg.max_steps) if cfg.max_steps > 0 else steps)


def open_epoch_run(cfg, accelerator, resume_dir: Path | None, scheduler, total_steps: int, name: str, **stateful):
    """`open_run` for the stages that pass over a data set (sft, reward, dpo), whose checkpoints hold the step and
    the last step's metrics (summary.json's train/loss_last after a resume): (start, metrics, run, progress bar).
    `stateful`: more objects restored from the checkpoint, as in `open_run`."""
    state, _, run = open_run(cfg, accelerator, resume_dir, {"step": 0, "metrics": {}}, scheduler=scheduler,
                             **stateful)
    bar = progress(total_steps, name, enabled=cfg.progress and accelerator.is_main_process, initial=state["step"])
    return state["step"], state["metrics"], run, bar


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n_examples: int) -> np.ndarray:
    """The example order of one epoch (read-only; cached, as every step of the epoch slices it)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n_examples)
    perm.flags.writeable = False
    return perm


def global_batch_indices(step: int, global_batch: int, n_examples: int, seed: int) -> np.ndarray:
    """Example indices of optimizer step `step`: a stream of per-epoch permutations, cut into global batches."""
    start, out = step * global_batch, []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n_examples)
        out.extend(epoch_order(seed, epoch, n_examples)[offset: offset + global_batch - len(out)].tolist())
    return np.asarray(out)


def step_batches(accelerator, cfg, step: int, examples: list, collate, pad_token_id: int) -> list[dict]:
    """This process's micro-batches of optimizer step `step`, collated, on its device: process-major
    slices of the global batch, so 2 processes x B see what 1 process x 2B sees."""
    per_device, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    indices = global_batch_indices(step, per_device * accumulation * accelerator.num_processes, len(examples), cfg.seed)
    mine = indices.reshape(accelerator.num_processes, accumulation * per_device)[accelerator.process_index]
    batches = [collate([examples[i] for i in mine[j * per_device:(j + 1) * per_device]], pad_token_id)
               for j in range(accumulation)]
    return [{k: v.to(accelerator.device) for k, v in b.items()} for b in batches]


def scoring_batches(accelerator, examples: list[dict], batch_size: int, shape) -> list[list[int]]:
    """This process's batches (indices into `examples`) of a pass that scores every example once: evaluation,
    DPO's reference log-probs before training.

    A batch is padded to its largest example, and an example's numbers do not depend on its batch (to float
    rounding), so the examples go in order of `shape(example)`, what their collate pads a batch to: batches of
    like examples forward fewer positions (DPO's built-in pairs: 13.2 a pair instead of 15.0; the more the
    lengths vary, the more it saves). Fixed slices of that order, dealt to processes in turn: the numbers do not
    depend on the number of processes, and processes may get different numbers of batches (under ZeRO-3, forward
    with the weights gathered once: no per-layer collectives to keep in step).
    """
    order = sorted(range(len(examples)), key=lambda i: shape(examples[i]))
    return [order[start:start + batch_size] for start in
            range(accelerator.process_index * batch_size, len(examples), accelerator.num_processes * batch_size)]


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


def due(every: int, step: int, total_steps: int) -> bool:
    """Whether an every-`every`-steps event (evaluation, checkpoint) falls on `step`; the last step has its own."""
    return bool(every) and step % every == 0 and step < total_steps


def end_step(run, bar, cfg, step: int, total_steps: int, metrics: dict, show: list[str], save) -> None:
    """After optimizer step `step`: log `metrics` (every `logging_steps`, at the last step and whenever they
    hold an evaluation), show the `show` ones on the progress bar, and checkpoint (`save()`) every `save_steps`."""
    if step % cfg.logging_steps == 0 or step == total_steps or any(k.startswith("eval/") for k in metrics):
        run.log(step, metrics)
    bar.update(1)
    bar.set_postfix(fmt_metrics(metrics, show))
    if due(cfg.save_steps, step, total_steps):
        save()
