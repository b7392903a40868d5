"""Peak memory per process for full fine-tuning of a ~100M-parameter Llama under DDP, ZeRO-2, ZeRO-3
(2 processes, CPU, gloo), and what the reference model costs with and without LoRA.

    python scripts/bench_memory.py                  # launches the 3 setups, prints a table
    python scripts/bench_memory.py --steps 3 --setups ddp,zero3

Each setup is `accelerate launch --config_file configs/accelerate/<setup>.yaml` of this file in
worker mode: a Llama built from a config (random init; 12 layers, hidden 768, vocab 8192, untied:
97.5M parameters), AdamW, a few optimizer steps on random tokens through `rlhf.distributed`.
Reported per process: the RSS high-water mark (`resource.getrusage`) minus the RSS before the
model existed (python + torch + DeepSpeed), i.e. what the model, gradients, optimizer state and
activations cost. fp32 everywhere (CPU); on GPU with bf16 the ratios are what carries over.

The LoRA part (one process, no launch) loads the same model through `rlhf.grpo`'s
`load_policy_and_reference` with and without `use_peft` and counts the bytes of distinct weight
tensors held by policy + reference, and checks the adapter-disabled policy gives the base model's
log-probs (the reference it stands in for).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = ("ddp", "zero2", "zero3")


def llama_100m(vocab: int = 8192):
    """Built through `from_config`, as `from_pretrained` would: under a ZeRO-3 launch transformers
    then creates it already sharded (`deepspeed.zero.Init`), so no process ever holds all of it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM._from_config(cfg)


def steady_rss_mib() -> float:
    """RSS after freeing what can be freed (gc + glibc malloc_trim): what the process keeps holding."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    return rss_mib()


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def worker(args) -> None:
    import torch

    from rlhf.distributed import gather_objects, make_accelerator

    torch.set_num_threads(1)
    acc = make_accelerator(per_device_train_batch_size=args.batch, max_grad_norm=1.0)
    import deepspeed  # noqa: F401  (imported in every setup so the baseline is comparable)

    base = rss_mib()
    model = llama_100m()
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model, optimizer = acc.prepare(model, optimizer)
    g = torch.Generator().manual_seed(acc.process_index)
    for _ in range(args.steps):
        ids = torch.randint(3, 8192, (args.batch, args.seq_len), generator=g)
        with acc.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    row = {"rank": acc.process_index, "baseline_mib": base, "peak_mib": peak_rss_mib(), "steady_mib": steady_rss_mib(),
           "params": n_params, "loss": float(loss)}
    rows = gather_objects(acc, [row])
    if acc.is_main_process:
        Path(args.result).write_text(json.dumps(rows))
    acc.wait_for_everyone()


def lora_reference() -> dict:
    """Bytes of distinct weight tensors held by policy + reference, full copy vs LoRA (adapters disabled)."""
    import torch

    from rlhf import grpo
    from rlhf.runtime import make_config

    def unique_bytes(*models) -> int:
        seen, total = set(), 0
        for m in models:
            if m is None:
                continue
            for t in list(m.parameters()) + list(m.buffers()):
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total

    with tempfile.TemporaryDirectory() as d:
        llama_100m().save_pretrained(d)
        common = dict(model_name_or_path=d, beta=0.04, progress=False, report_to="none", num_eval_prompts=0)
        full_policy, full_ref = grpo.load_policy_and_reference(make_config(grpo.Config, common))
        full = unique_bytes(full_policy, full_ref)
        lora_policy, lora_ref = grpo.load_policy_and_reference(make_config(grpo.Config, dict(common, use_peft=True)))
        lora = unique_bytes(lora_policy, lora_ref)
        base = unique_bytes(full_policy)
        # the adapter-disabled policy is the base model: same log-probs as the untouched copy
        for name, p in lora_policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)  # trained adapters: the policy now differs from the base
        ids = torch.randint(3, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), lora_policy.disable_adapter():
            ref_logits = lora_policy(input_ids=ids).logits
        with torch.no_grad():
            base_logits = full_ref(input_ids=ids).logits
            policy_logits = lora_policy(input_ids=ids).logits
    return {"base_mib": base / 2**20, "full_mib": full / 2**20, "lora_mib": lora / 2**20,
            "reference_is_none_with_lora": lora_ref is None,
            "ref_vs_base_max_abs": float((ref_logits - base_logits).abs().max()),
            "policy_vs_base_max_abs": float((policy_logits - base_logits).abs().max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setup in args.setups.split(","):
            out = Path(tmp) / f"{setup}.json"
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "configs/accelerate" / f"{setup}.yaml"), "--num_processes", "2", __file__, "--worker",
                   "--result", str(out), "--steps", str(args.steps), "--batch", str(args.batch),
                   "--seq_len", str(args.seq_len)]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{setup} failed:\n{proc.stderr[-4000:]}")
            results[setup] = json.loads(out.read_text())

    n = next(iter(results.values()))[0]["params"]
    print(f"Full fine-tuning, Llama {n / 1e6:.1f}M params, AdamW fp32, 2 CPU processes, batch {args.batch} x "
          f"{args.seq_len} tokens per process, {args.steps} steps")
    print()
    print("| setup | peak RSS, rank 0 / 1 (MiB) | peak minus baseline | held after the steps minus baseline | "
          "held vs DDP | loss after last step |")
    print("|---|---|---|---|---|---|")
    ddp = None
    for setup, rows in results.items():
        peak = max(r["peak_mib"] - r["baseline_mib"] for r in rows)
        held = max(r["steady_mib"] - r["baseline_mib"] for r in rows)
        ddp = held if setup == "ddp" else ddp
        ratio = f"{held / ddp:.2f}" if ddp else "-"
        peaks = " / ".join(f"{r['peak_mib']:.0f}" for r in rows)
        print(f"| {setup} | {peaks} | {peak:.0f} | {held:.0f} | {ratio} | {rows[0]['loss']:.4f} |")
    print()
    lora = lora_reference()
    print("Reference model cost (rlhf.grpo.load_policy_and_reference, same model, beta > 0):")
    print()
    print("| policy + reference | distinct weights held (MiB) |")
    print("|---|---|")
    print(f"| full fine-tuning: policy + frozen copy | {lora['full_mib']:.0f} |")
    print(f"| LoRA: policy with adapters, reference = adapters disabled | {lora['lora_mib']:.0f} "
          f"(base model alone: {lora['base_mib']:.0f}) |")
    print()
    print(f"LoRA reference is a separate model: {not lora['reference_is_none_with_lora']}; adapter-disabled "
          f"logits vs the base model: max |diff| = {lora['ref_vs_base_max_abs']:.2e} (policy with adapters: "
          f"{lora['policy_vs_base_max_abs']:.2e})")


if __name__ == "__main__":
    main()
