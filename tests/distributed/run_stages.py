"""Run rlhf stages back to back in one launch (one process start-up instead of one per stage), each
twice: straight for 3 optimizer steps with a checkpoint at step 2, then resumed from that checkpoint.

    accelerate launch --config_file configs/accelerate/zero3.yaml tests/distributed/run_stages.py OUT sft,grpo 1
    python tests/distributed/run_stages.py OUT sft,grpo 2        # one process, per-device batches x 2

The last argument multiplies the per-device batch sizes, so a 1-process run with 2 has the same
global batch as a 2-process run with 1. Writes OUT/<stage>/result.json (main process): the
metrics of the straight run, of the resumed run, and where the models are.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LENGTH_REWARD = f"{HERE.parent / 'rlhf' / 'test_grpo.py'}:length_reward"  # learnable from scratch
GATED_REWARD = f"{HERE.parent / 'rlhf' / 'test_grpo.py'}:prompt_gated_reward"  # constant on half the prompts


def stage_configs(root: Path, scale: int) -> dict:
    common = dict(seed=3, max_steps=3, save_steps=2, progress=False, report_to="none", overwrite=True)
    configs = {
        "sft": dict(common, per_device_train_batch_size=8 * scale, num_train_examples=256, learning_rate=3e-3,
                    num_eval_prompts=8, num_eval_examples=16, eval_steps=0, per_device_eval_batch_size=8),
        "reward": dict(common, per_device_train_batch_size=2 * scale, num_train_prompts=32, completions_per_prompt=3,
                       learning_rate=1e-3, num_eval_prompts=8, eval_steps=0, per_device_eval_batch_size=3),
        "dpo": dict(common, per_device_train_batch_size=2 * scale, num_train_prompts=32, completions_per_prompt=3,
                    learning_rate=1e-3, beta=0.5, num_eval_prompts=8, num_greedy_eval_prompts=8,
                    per_device_eval_batch_size=3),
        # dpo with LoRA and the reference per batch: the policy with its adapters off, under every setup
        "dpo_lora": dict(common, per_device_train_batch_size=2 * scale, num_train_prompts=32, completions_per_prompt=3,
                         learning_rate=1e-2, beta=0.5, num_eval_prompts=8, num_greedy_eval_prompts=0,
                         per_device_eval_batch_size=3, use_peft=True, lora_dropout=0.0, precompute_ref_log_probs=False),
        # dpo with TR-DPO's moving reference, mixed in after every step: the checkpoint holds it (gathered under ZeRO-3)
        "dpo_tr": dict(common, per_device_train_batch_size=2 * scale, num_train_prompts=32, completions_per_prompt=3,
                       learning_rate=1e-3, beta=0.5, num_eval_prompts=8, num_greedy_eval_prompts=0,
                       per_device_eval_batch_size=3, precompute_ref_log_probs=False, sync_ref_model=True,
                       ref_model_sync_steps=1, ref_model_mixup_alpha=0.6),
        # dpo with LD-DPO's per-pair log-probs (the reference pass gathers K x K per ranking) and WPO's pair weights
        "dpo_ld": dict(common, per_device_train_batch_size=2 * scale, num_train_prompts=32, completions_per_prompt=3,
                       learning_rate=1e-3, beta=0.5, num_eval_prompts=8, num_greedy_eval_prompts=0,
                       per_device_eval_batch_size=3, ld_alpha=0.5, use_weighting=True),
        "grpo": dict(common, model_name_or_path=str(root / "start"), reward_funcs=[LENGTH_REWARD], reward_weights=[1.0],
                     per_device_train_batch_size=8 * scale, num_generations=4, max_completion_length=6,
                     learning_rate=1e-3, beta=0.05, num_train_prompts=64, num_eval_prompts=8),
        # the variants whose arithmetic spans processes: REINFORCE++'s global whitening with the KL in the reward,
        # dynamic sampling's shared decision to sample another round, GSPO, dapo's global token mean, entropy bonus
        "grpo_variants": dict(common, model_name_or_path=str(root / "start"), reward_funcs=[GATED_REWARD],
                              per_device_train_batch_size=8 * scale, num_generations=4, max_completion_length=6,
                              learning_rate=1e-3, beta=0.05, num_train_prompts=64, num_eval_prompts=8,
                              advantage_estimator="reinforce_pp", kl_in_reward=True, dynamic_sampling=True,
                              max_sampling_rounds=3, loss_type="dapo", importance_sampling_level="sequence",
                              num_iterations=2, entropy_coef=0.01, overlong_buffer_len=2),
        "ppo": dict(common, model_name_or_path=str(root / "start"), reward_funcs=[LENGTH_REWARD], reward_weights=[1.0],
                    per_device_train_batch_size=4 * scale, max_completion_length=6, learning_rate=1e-3,
                    num_train_prompts=64, num_eval_prompts=8),
    }
    # use_vllm: an engine per process, on the tiny model's shape with heads of 32 (what vLLM's CPU attention serves)
    vllm = dict(model_name_or_path=str(root / "start32"), use_vllm=True)
    configs.update({
        # the reward score with the model's own log-likelihood (its tied LM head); refused under ZeRO-3
        "reward_logprob": dict(configs["reward"], logprob_coef=0.5),
        "grpo_vllm": dict(configs["grpo"], **vllm),
        "grpo_vllm_lora": dict(configs["grpo"], **vllm, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                               learning_rate=1e-2),
        "ppo_vllm": dict(configs["ppo"], **vllm),
        "grpo_vllm_tp2": dict(configs["grpo"], **vllm, vllm_tensor_parallel_size=2),  # 2 processes: one engine
    })
    return configs


def main() -> None:
    import importlib

    import torch

    from rlhf.runtime import ConfigError, make_config, read_jsonl

    root, stages, scale = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
    torch.set_num_threads(1)
    from accelerate import PartialState

    from rlhf.distributed import make_accelerator

    is_main = make_accelerator().is_main_process  # the process group, once, before any stage
    if is_main and not (root / "start").exists():
        from rlhf.models import save_builtin_tiny

        save_builtin_tiny(root / "start")  # a model directory: exercises from_pretrained under ZeRO-3
    if is_main and any("vllm" in s for s in stages) and not (root / "start32").exists():
        from transformers import LlamaForCausalLM

        from rlhf.models.builtin import build_builtin, tiny_tokenizer

        build_builtin(LlamaForCausalLM, head_dim=32).save_pretrained(root / "start32")
        tiny_tokenizer().save_pretrained(root / "start32")
    PartialState().wait_for_everyone()
    for name, values in stage_configs(root, scale).items():
        if name not in stages:
            continue
        module = importlib.import_module(f"rlhf.{name.split('_')[0]}")  # dpo_lora: rlhf.dpo, grpo_vllm: grpo
        out = root / name
        try:
            summary = module.train(make_config(module.Config, dict(values, output_dir=str(out))))
        except ConfigError as e:  # a stage that refuses this setup: the test reads the message
            if is_main:
                (root / f"{name}.refused").write_text(str(e))
            continue
        if is_main:
            straight = read_jsonl(out / "metrics.jsonl")
            shutil.copytree(out / "model", root / f"{name}_model_straight", dirs_exist_ok=True)
        PartialState().wait_for_everyone()
        ckpt = out / "checkpoints" / "step-00000002"
        resumed_summary = module.train(make_config(module.Config, dict(values, output_dir=str(out),
                                                                       resume_from_checkpoint=str(ckpt))))
        if is_main:
            (out / "result.json").write_text(
                json.dumps(
                    {
                        "world": PartialState().num_processes,
                        "straight": straight,
                        "resumed": read_jsonl(out / "metrics.jsonl"),
                        "summary": summary,
                        "resumed_summary": resumed_summary,
                        "model_straight": str(root / f"{name}_model_straight"),
                        "model_resumed": str(out / "model"),
                    },
                    default=str,
                )
            )
        PartialState().wait_for_everyone()


if __name__ == "__main__":
    main()
