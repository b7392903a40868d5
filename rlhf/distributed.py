"""Accelerate / DeepSpeed helpers shared by every rlhf stage, so each stage runs unchanged on
1 CPU, 1 GPU, or N processes with DDP or DeepSpeed ZeRO-2/3.

- `make_accelerator`: creates the process state first with the gloo backend on CPU (accelerate
  otherwise leaves the world size at 1 for CPU DeepSpeed runs; see shared/ANCHORS.md).
- `reduce_sum` / `reduce_mean`: metrics and normalisers across processes.
- `gathered_for_generation`: under ZeRO-3, gather the sharded parameters once per rollout instead
  of once per generated token.
- `save_hf_model`: consolidated Hugging Face weights (safetensors) from any setup, written by the
  main process to a temporary directory and renamed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch


def make_accelerator(gradient_accumulation_steps: int = 1, mixed_precision: str = "no", cpu: bool = False):
    from accelerate import Accelerator, PartialState

    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        PartialState(backend="gloo")
    return Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed_precision,
                       cpu=cpu)


def reduce_sum(accelerator, value) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64 if accelerator.device.type == "cpu" else torch.float32,
                        device=accelerator.device).detach().clone()
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t


def reduce_mean(accelerator, value) -> torch.Tensor:
    return reduce_sum(accelerator, value) / accelerator.num_processes


def is_zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


@contextlib.contextmanager
def gathered_for_generation(accelerator, model):
    """Yield the unwrapped model with full parameters; under ZeRO-3 gather them once for the whole rollout."""
    unwrapped = accelerator.unwrap_model(model)
    if is_zero3(accelerator):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield unwrapped
    else:
        yield unwrapped


def save_hf_model(accelerator, model, out_dir: str | os.PathLike, tokenizer=None, merge_lora: bool = True) -> None:
    """Save `model` consolidated in Hugging Face format (safetensors) to `out_dir`.

    With a peft model and `merge_lora`, the adapters are merged into a copy of the weights so the
    result loads with plain transformers; otherwise the adapter alone is saved.
    """
    out_dir = Path(out_dir)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards on every rank; full dict on main
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if merge_lora and hasattr(unwrapped, "merge_and_unload"):
            import copy

            merged = copy.deepcopy(unwrapped)
            merged.load_state_dict(state_dict)
            merged = merged.merge_and_unload()
            merged.save_pretrained(tmp, safe_serialization=True)
        else:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    accelerator.wait_for_everyone()
