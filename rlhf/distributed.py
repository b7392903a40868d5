"""Accelerate / DeepSpeed helpers shared by every rlhf stage, so each stage runs unchanged on
1 CPU, 1 GPU, or N processes / nodes with DDP or DeepSpeed ZeRO-2/3 (`accelerate launch`).

- `make_accelerator`: creates the process state first with the gloo backend on CPU (accelerate
  1.15 otherwise leaves the world size at 1 for CPU DeepSpeed runs; see docs/distributed.md), then
  fills the DeepSpeed config's "auto" batch / accumulation / clipping entries from the stage's
  config and rejects fixed entries that disagree with it (`check_batch_config`), before any work.
  With `bf16` the prepared model's forward runs under `torch.autocast` (bfloat16, float32 master
  weights and optimizer state), on CPU as on GPU; on a CPU without bfloat16 instructions that is
  emulated and slow, which it warns about (`cpu_bf16_instructions`; see docs/precision.md).
- `loss_normaliser`: the token (or sequence) count of the whole optimizer step, over micro-batches
  and processes: a micro-batch's loss summed and divided by it is that micro-batch's share of the
  step's mean, and the shares add up to it (`rlhf.training.backward` then undoes DDP / DeepSpeed's
  average over processes and accelerate's division by the accumulation steps). So 2 processes x
  batch B == 1 process x 2B == 1 process x 2 micro-batches of B.
- `reduce_sum` / `gather_objects`: metrics across processes.
- `gathered_for_generation`: under ZeRO-3, gather the sharded parameters once per rollout and
  switch off DeepSpeed's per-module fetch/release hooks meanwhile, so `generate` does not
  all-gather every layer for every new token.
- `prepare_frozen`: reference / reward models: an evaluation-only ZeRO-3 engine (sharded) under
  ZeRO-3, a plain module on the device otherwise.
- `checkpoint`: `Run.checkpoint` with the barriers a multi-process `save_state` needs.
- `save_hf_model`: consolidated Hugging Face weights (safetensors) from any setup, LoRA merged.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object

from rlhf.runtime import ConfigError
from rlhf.shipped_configs import resolve_deepspeed_config_env

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Accelerator
# --------------------------------------------------------------------------------------------

_PRISTINE_DS_CONFIG: dict | None = None


def make_accelerator(gradient_accumulation_steps: int = 1, mixed_precision: str = "no", cpu: bool = False, *,
                     bf16: bool | None = None, per_device_train_batch_size: int | None = None,
                     max_grad_norm: float | None = None):
    """An `Accelerator` for the launch at hand (plain, DDP or DeepSpeed), CPU-safe.

    `bf16=True` is `mixed_precision="bf16"`. With `per_device_train_batch_size` given, the batch
    settings are checked against an accelerate / DeepSpeed config right away (`check_batch_config`).
    """
    # a shipped accelerate config names `configs/deepspeed/<name>.json`, relative to the repository
    # root; from any other directory that is the copy inside the package
    resolve_deepspeed_config_env()
    if bf16 is not None:
        mixed_precision = "bf16" if bf16 else mixed_precision
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # CPU-only multi-process launch. accelerate picks no backend here: a DeepSpeed launch would
        # fall back to one process and a DDP (multi_gpu) launch to N unsynchronised copies. So
        # create the shared process state first: gloo for DeepSpeed, and accelerate's MULTI_CPU
        # (DDP over gloo) otherwise.
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            PartialState(backend="gloo")
        else:
            cpu = True
            PartialState(cpu=True)
    try:
        accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps,
                                  mixed_precision=mixed_precision, cpu=cpu)
    except ValueError as e:  # accelerate fixes the precision per process, at its first Accelerator
        if "mixed_precision=" not in str(e):
            raise
        running = AcceleratorState().mixed_precision
        raise ConfigError(f"`bf16`: this process already runs in mixed precision {running!r} and this stage asks "
                          f"for {mixed_precision!r}; give every stage of one process (`rlhf pipeline`) the same "
                          "bf16") from None
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu" and cpu_bf16_instructions() is None:
        logger.warning("`bf16`: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX on x86, BF16 on Arm): "
                       "bfloat16 autocast runs emulated, usually slower than float32; set --bf16 false")
    ds = deepspeed_config(accelerator)
    if ds is not None:
        # The DeepSpeed config lives in accelerate's process-wide state and is filled in place for
        # the stage that prepares it; a later stage in the same process (`rlhf pipeline`) starts
        # again from the file's values, not from the previous stage's batch sizes.
        global _PRISTINE_DS_CONFIG
        if _PRISTINE_DS_CONFIG is None:
            _PRISTINE_DS_CONFIG = copy.deepcopy(ds)
        else:
            ds.clear()
            ds.update(copy.deepcopy(_PRISTINE_DS_CONFIG))
    if per_device_train_batch_size is not None:
        check_batch_config(accelerator, per_device_train_batch_size, gradient_accumulation_steps, max_grad_norm)
    return accelerator


def cpu_bf16_instructions() -> str | None:
    """The instructions this CPU has for bfloat16 matmuls (oneDNN's fast path): "AMX", "AVX512-BF16", "BF16" (Arm),
    or None: bfloat16 matmuls are then emulated (converted to float32 and back), usually slower than float32."""
    if platform.machine().lower() in ("x86_64", "amd64", "x86", "i686"):
        if torch.cpu._is_amx_tile_supported():
            return "AMX"
        return "AVX512-BF16" if torch.cpu._is_avx512_bf16_supported() else None
    return "BF16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None  # Arm: cpuinfo's bf16 flag


def deepspeed_config(accelerator) -> dict | None:
    """The DeepSpeed config dict of this launch (None without DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else plugin.deepspeed_config


def check_batch_config(accelerator, per_device_train_batch_size: int, gradient_accumulation_steps: int,
                       max_grad_norm: float | None = None) -> None:
    """Reconcile a DeepSpeed config with the stage's batch settings before any training step.

    "auto" entries are filled from the stage (micro-batch, accumulation, global batch, clipping);
    a fixed entry that disagrees is a ConfigError naming both values. Without this, accelerate
    silently keeps DeepSpeed's accumulation steps and DeepSpeed asserts only at `prepare` time,
    after the models are loaded. Also checks accelerate's own accumulation (e.g. `accelerate
    launch --gradient_accumulation_steps`) against the stage's.
    """
    world = accelerator.num_processes
    if accelerator.gradient_accumulation_steps != gradient_accumulation_steps:
        raise ConfigError(
            f"accelerate config: gradient_accumulation_steps={accelerator.gradient_accumulation_steps} (from "
            f"`accelerate launch` / ACCELERATE_GRADIENT_ACCUMULATION_STEPS) conflicts with the stage's "
            f"`gradient_accumulation_steps`={gradient_accumulation_steps}; set it in one place only")
    ds = deepspeed_config(accelerator)
    if ds is None:
        return
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "accelerate config `deepspeed_config`"
    expected = {
        "train_micro_batch_size_per_gpu": (per_device_train_batch_size, "`per_device_train_batch_size`"),
        "gradient_accumulation_steps": (gradient_accumulation_steps, "`gradient_accumulation_steps`"),
        "train_batch_size": (per_device_train_batch_size * gradient_accumulation_steps * world,
                             f"`per_device_train_batch_size` x `gradient_accumulation_steps` x {world} processes "
                             f"= {per_device_train_batch_size} x {gradient_accumulation_steps} x {world}"),
    }
    for key, (value, what) in expected.items():
        given = ds.get(key, "auto")
        if given == "auto":
            ds[key] = value
        elif given is not None and int(given) != value:
            raise ConfigError(f"{source}: `{key}`={given} conflicts with the stage's {what} = {value}; "
                              f"set `{key}` to \"auto\" or change the stage's option")
    clip = ds.get("gradient_clipping", "auto")
    wanted_clip = float(max_grad_norm) if max_grad_norm else 0.0  # DeepSpeed: 0 = no clipping
    if clip == "auto":
        ds["gradient_clipping"] = wanted_clip
    elif max_grad_norm is not None and float(clip) != wanted_clip:
        raise ConfigError(f"{source}: `gradient_clipping`={clip} conflicts with the stage's "
                          f"`max_grad_norm`={max_grad_norm}; "
                          "set it to \"auto\"")
    zero = ds.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") in (None, "auto",
                                                                                                    False):
        # needed by `save_hf_model` to consolidate the shards into one Hugging Face model
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def is_zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and int(plugin.zero_stage) == 3


# --------------------------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------------------------


def reduce_sum(accelerator, value) -> torch.Tensor:
    """Sum of `value` (a number or tensor) over processes; float64 on CPU so counts stay exact."""
    dtype = torch.float64 if accelerator.device.type == "cpu" else torch.float32
    t = torch.as_tensor(value, device=accelerator.device).detach().to(dtype).clone()
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t


def loss_normaliser(accelerator, local_count) -> torch.Tensor:
    """The count of the whole optimizer step: `local_count` (this process's tokens or sequences, over
    all its micro-batches) summed over processes, at least 1.

    Pass it as `num_tokens=` / `num_seqs=` to `rlhf.core.aggregate_loss` (or a loss built on it):
    each micro-batch's loss is then its share of the step's mean, for `rlhf.training.backward`.
    """
    return reduce_sum(accelerator, local_count).clamp_min(1)


def gather_objects(accelerator, objects: list) -> list:
    """Concatenate python lists from every process (in rank order)."""
    if accelerator.num_processes == 1:
        return list(objects)
    return gather_object(list(objects))


# --------------------------------------------------------------------------------------------
# Generation under ZeRO-3
# --------------------------------------------------------------------------------------------


def _zero3_param_offload(model):
    """DeepSpeed's ZeRO-3 parameter manager of an engine (training or evaluation-only), or None."""
    opt = getattr(model, "optimizer", None)
    offload = getattr(opt, "parameter_offload", opt)
    return offload if hasattr(offload, "setup_zero_stage3_hooks") else None


def unwrap(accelerator, model):
    """`accelerator.unwrap_model`, skipped for a model nothing wraps: it re-reads package metadata on
    every call, which adds up when called once per rollout, and its first call imports DeepSpeed
    (about a CPU-second) where nothing needs it."""
    wrapped = hasattr(model, "module") or hasattr(model, "_orig_mod")
    return accelerator.unwrap_model(model) if wrapped else model


@contextlib.contextmanager
def gathered_for_generation(accelerator, model):
    """Yield the unwrapped model with full parameters; under ZeRO-3 gather them once per rollout.

    DeepSpeed's ZeRO-3 hooks fetch each layer's parameters before its forward and release them
    after it, i.e. one all-gather per layer per generated token. Here the parameters are gathered
    once, the hooks are taken off for the duration (so they neither re-fetch nor release), and put
    back afterwards. Costs one full copy of the weights per process while generating.
    """
    unwrapped = unwrap(accelerator, model)
    if not is_zero3(accelerator):
        yield unwrapped
        return
    import deepspeed

    offload = _zero3_param_offload(model)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if offload is not None:
            offload._remove_module_hooks()
        # transformers' generate() turns on synced_gpus under ZeRO-3 (every process keeps stepping
        # until all are done, for the per-layer gathers); with the weights local that is not needed
        # and would deadlock callers that generate on the main process only (evaluation).
        try:
            with transformers_zero3_off():
                yield unwrapped
        finally:
            if offload is not None:
                offload.setup_zero_stage3_hooks()


@contextlib.contextmanager
def transformers_zero3_off():
    """Within this block transformers does not see the ZeRO-3 launch: models built here get full
    (unpartitioned) weights instead of `deepspeed.zero.Init` shards, and `generate` does not sync
    processes. For small models built from a config, and for code that runs with gathered weights.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved, hf_deepspeed._hf_deepspeed_config_weak_ref = hf_deepspeed._hf_deepspeed_config_weak_ref, None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def prepare_frozen(accelerator, model):
    """Place a frozen model (reference policy, reward model) for evaluation only; call on every process.

    ZeRO-3: an evaluation-only DeepSpeed engine (no optimizer), sharded like the policy, so each
    process holds 1/N of its weights; its forward is collective (every process must call it
    equally often). Otherwise a plain module on this process's device: DDP and ZeRO-1/2 shard
    only gradients and optimizer state, which a frozen model does not have; with mixed precision its
    forward runs under the accelerator's autocast, as the prepared policy's does (so a reward model
    scores in bf16 under `--bf16 true`; its scores are read in float32).
    """
    model.eval().requires_grad_(False)
    if not is_zero3(accelerator):
        model = model.to(accelerator.device)
        if accelerator.mixed_precision != "no":
            model.forward = _under_autocast(accelerator, model.forward)
        return model
    import deepspeed

    ds = deepspeed_config(accelerator)
    zero = ds.get("zero_optimization", {})
    config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, **{k: zero[k] for k in ("offload_param",) if k in zero}},
        "steps_per_print": 10**9,
    }
    for precision in ("bf16", "fp16"):
        enabled = ds.get(precision, {}).get("enabled", False)
        config[precision] = {"enabled": enabled is True or str(enabled).lower() == "true"}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _under_autocast(accelerator, forward):
    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with accelerator.autocast():
            return forward(*args, **kwargs)
    return autocast_forward


# --------------------------------------------------------------------------------------------
# Checkpoints and saving
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def checkpoint(accelerator, run, step: int):
    """`run.checkpoint(step)` for every process: yields the temporary directory to `save_state` into.

    The main process creates (empties) the directory before any process writes its shards into it
    and renames it into place only after every process has finished writing.
    """
    with run.checkpoint(step) as tmp:
        accelerator.wait_for_everyone()
        yield tmp
        accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()


def save_hf_model(accelerator, model, out_dir: str | os.PathLike, tokenizer=None, merge_lora: bool = True) -> None:
    """Save `model` consolidated in Hugging Face format (safetensors) to `out_dir`; call on every process.

    Under ZeRO-3 the shards are gathered (collective). With a peft model and `merge_lora`, the
    adapters are merged into a fresh CPU copy of the base model so the result loads with plain
    transformers; otherwise the adapter alone is saved. Written to a temporary name, then renamed.
    """
    out_dir = Path(out_dir)
    accelerator.wait_for_everyone()
    state_dict = consolidated_state_dict(accelerator, model)  # full on the main process, {} elsewhere
    if accelerator.is_main_process:
        unwrapped = unwrap(accelerator, model)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        with _bare_save():
            if merge_lora and hasattr(unwrapped, "merge_and_unload"):
                merged = _merged_lora_copy(unwrapped, state_dict)
                merged.save_pretrained(tmp, safe_serialization=True)
            else:
                unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def _bare_save():
    """transformers' `save_pretrained` unwraps the model it saves with accelerate's `extract_model_from_parallel`,
    whose first call imports DeepSpeed (0.6 CPU s) wherever it is installed, used or not; the models
    `save_hf_model` saves are already unwrapped, so inside this block that step returns its argument."""
    from transformers import modeling_utils

    original = modeling_utils.unwrap_model
    modeling_utils.unwrap_model = lambda model, recursive=False: model
    try:
        yield
    finally:
        modeling_utils.unwrap_model = original


def consolidated_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """The full state dict of `model` (a prepared model or any sub-module of one) on the main process.

    Under ZeRO-3 the parameters are gathered one module at a time (collective: call on every
    process), so no process ever holds more than one layer beyond its shard; other processes get {}.
    """
    module = unwrap(accelerator, model)
    if not is_zero3(accelerator):
        if not accelerator.is_main_process:
            return {}
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules():
        params = list(sub.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if accelerator.is_main_process:
                for name, p in params:
                    out[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
    if accelerator.is_main_process:  # persistent buffers are not sharded
        for key, value in module.state_dict().items():
            if key not in out:
                out[key] = value.detach().cpu().clone()
    return out


def load_consolidated(accelerator, model, state_dict: dict[str, torch.Tensor]) -> None:
    """Inverse of `consolidated_state_dict`: copy a full state dict into `model`, in place.

    Under ZeRO-3 each module's parameters are gathered, written on the main process and re-partitioned from it
    (collective: call on every process; only the main process's `state_dict` is read there); buffers, never
    sharded, are left as they are there.
    """
    module = unwrap(accelerator, model)
    if not is_zero3(accelerator):
        module.load_state_dict(state_dict)
        return
    import deepspeed

    for prefix, sub in module.named_modules():
        params = list(sub.named_parameters(recurse=False))
        if not params:
            continue
        with torch.no_grad(), deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
            if accelerator.is_main_process:
                for name, p in params:
                    p.copy_(state_dict[f"{prefix}.{name}" if prefix else name])


@torch.no_grad()
def lerp_parameters(accelerator, target, source, weight: float) -> None:
    """target <- weight x source + (1 - weight) x target, parameter by parameter (the same architecture: names
    match), in place. Under ZeRO-3 each pair is gathered, mixed on the main process and re-partitioned from it
    (collective: call on every process)."""
    target, sources = unwrap(accelerator, target), dict(unwrap(accelerator, source).named_parameters())
    if not is_zero3(accelerator):
        for name, t in target.named_parameters():
            t.lerp_(sources[name].to(t.dtype), weight)
        return
    import deepspeed

    for name, t in target.named_parameters():
        s = sources[name]
        with deepspeed.zero.GatheredParameters([s]), deepspeed.zero.GatheredParameters([t], modifier_rank=0):
            if accelerator.is_main_process:
                t.lerp_(s.to(t.dtype), weight)


def _merged_lora_copy(peft_model, state_dict: dict[str, torch.Tensor]) -> Any:
    """A plain transformers model: a fresh base model + the peft wrapper, loaded from `state_dict`, merged.

    Built from the config rather than deep-copied, because under ZeRO-3 the live module only holds
    this process's empty shard placeholders.
    """
    from peft import get_peft_model

    base = peft_model.get_base_model()
    fresh = type(base)(base.config)
    adapter = peft_model.active_adapter
    wrapped = get_peft_model(fresh, peft_model.peft_config[adapter], adapter_name=adapter)
    missing, unexpected = wrapped.load_state_dict(state_dict, strict=False)
    if unexpected or [k for k in missing if "lora_" in k or "modules_to_save" in k]:
        raise RuntimeError(f"save_hf_model: state dict does not match the peft model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return wrapped.merge_and_unload()
