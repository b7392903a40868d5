"""A small stand-alone training loop launched by the distributed tests (`accelerate launch ... toy_train.py`).

It exercises every piece of `rlhf.distributed` the stages use, on a tiny random-init Llama:
token-mean loss normalised by the global token count of each optimizer step (`loss_normaliser`),
gradient accumulation (`rlhf.training.backward`), checkpoints with `save_state` + resume with
`load_state`, consolidated Hugging Face saving (optionally LoRA merged), and greedy generation
inside `gathered_for_generation` with a count of the ZeRO-3 all-gathers it triggers. Results go to
OUT/result.json (main process).

The global batch of optimizer step s is the same rows whatever the layout (processes x
micro-batches x per-device batch), so runs with equal global batches must give equal parameters.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rlhf.core import aggregate_loss, logprobs_from_logits
from rlhf.distributed import (checkpoint, consolidated_state_dict, gathered_for_generation, is_zero3, loss_normaliser,
                              make_accelerator, reduce_sum, save_hf_model)
from rlhf.runtime import Run, RunConfig, checkpoint_dirs, load_state, read_jsonl, save_state, seed_everything
from rlhf.training import backward

VOCAB, SEQ = 48, 12


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def global_rows(step: int, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of optimizer step `step`: token ids (G, SEQ) and a mask (G, SEQ) of varied lengths."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, VOCAB, (global_batch, SEQ), generator=g)
    lengths = torch.randint(3, SEQ + 1, (global_batch,), generator=g)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


class ZeroGatherCounter:
    """Counts DeepSpeed ZeRO-3 parameter all-gathers (test instrumentation only)."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

        cls = ppc.PartitionedParameterCoordinator
        self._cls, self._name = cls, "_PartitionedParameterCoordinator__all_gather_params"
        self._orig = getattr(cls, self._name)
        counter = self

        def counting(coord, params, forward):
            if any(p.ds_status == ppc.ZeroParamStatus.NOT_AVAILABLE for p in params):
                counter.count += 1
            return self._orig(coord, params, forward)

        setattr(cls, self._name, counting)
        return self

    def __exit__(self, *exc):
        setattr(self._cls, self._name, self._orig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--per_device", type=int, default=4)
    p.add_argument("--gas", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--save_steps", type=int, default=0)
    p.add_argument("--resume", default="")
    p.add_argument("--check_resume", action="store_true", help="after training, resume from the last checkpoint and "
                                                               "compare")
    p.add_argument("--generate", type=int, default=0, help="new tokens to generate greedily at the end")
    args = p.parse_args(argv)

    accelerator = make_accelerator(gradient_accumulation_steps=args.gas, per_device_train_batch_size=args.per_device,
                           max_grad_norm=None)
    seed_everything(1)
    cfg = RunConfig(output_dir=args.out, resume_from_checkpoint=args.resume, overwrite=True, report_to="none",
                    save_total_limit=0)
    run = Run(cfg, is_main=accelerator.is_main_process)
    model = tiny_llama()
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj"]))
    # SGD (with momentum: optimizer state to resume): unlike Adam it is not invariant to the loss scale,
    # so a wrong normaliser shows up
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=args.lr, momentum=0.9)
    constant = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # the stages' hand-stepped schedule, here flat
    model, opt = accelerator.prepare(model, opt)

    world, per, gas = accelerator.num_processes, args.per_device, args.gas
    global_batch = per * gas * world

    def train_steps(first: int, last: int) -> None:
        model.train()
        for step in range(first, last):
            ids, mask = global_rows(step, global_batch)  # (G, SEQ)
            # micro-batch m of process r: rows [(m * world + r) * per, ... + per)
            rank = accelerator.process_index
            mine = [slice((m * world + rank) * per, (m * world + rank + 1) * per) for m in range(gas)]
            target_mask = mask[:, 1:]  # (G, SEQ-1) the predicted tokens
            local_tokens = sum(target_mask[s].sum() for s in mine)
            norm = loss_normaliser(accelerator, local_tokens)
            loss_sum = torch.zeros((), dtype=torch.float64)
            for s in mine:
                with accelerator.accumulate(model):
                    logits = model(input_ids=ids[s].to(accelerator.device),
                                   attention_mask=mask[s].to(accelerator.device)).logits
                    logp = logprobs_from_logits(logits[:, :-1].float(), ids[s, 1:].to(accelerator.device))  # (B, SEQ-1)
                    loss = aggregate_loss(-logp, target_mask[s].to(accelerator.device), "token-mean", num_tokens=norm)
                    backward(accelerator, model, opt, constant, loss, max_grad_norm=0.0)
                    loss_sum += (-logp * target_mask[s].to(accelerator.device)).sum().detach().double().cpu()
            global_loss = (reduce_sum(accelerator, loss_sum) / reduce_sum(accelerator, local_tokens)).item()
            run.log(step + 1, {"loss/sft": global_loss})
            if args.save_steps and (step + 1) % args.save_steps == 0 and step + 1 < args.steps:
                with checkpoint(accelerator, run, step + 1) as d:
                    accelerator.save_state(str(d))
                    save_state(Path(d) / f"toy_state_{accelerator.process_index}.pt", {"step": step + 1})

    def resume(path) -> int:
        run.close()  # the metrics file is rewritten by truncate_metrics; reopen it afterwards
        accelerator.load_state(str(path))
        first = load_state(Path(path) / f"toy_state_{accelerator.process_index}.pt")["step"]
        run.truncate_metrics(Path(path))
        return first

    train_steps(resume(run.resume_path()) if run.resume_path() else 0, args.steps)
    result = {"world": world, "losses": [r["loss/sft"] for r in read_jsonl(Path(args.out) / "metrics.jsonl")]
              if accelerator.is_main_process else []}
    if args.check_resume:
        # load the mid-run checkpoint into the live engine and redo the rest: must land on the same weights
        straight = consolidated_state_dict(accelerator, model)
        ckpt = checkpoint_dirs(args.out)[-1]
        accelerator.wait_for_everyone()
        train_steps(resume(ckpt), args.steps)
        resumed = consolidated_state_dict(accelerator, model)
        if accelerator.is_main_process:
            result["resumed_from"] = ckpt.name
            result["resume_max_abs_diff"] = max((straight[k] - resumed[k]).abs().max().item() for k in straight)
            result["losses_resumed"] = [r["loss/sft"] for r in read_jsonl(Path(args.out) / "metrics.jsonl")]
    if args.generate:
        model.eval()
        prompt = torch.tensor([[1, 5, 9, 13]], device=accelerator.device)
        import contextlib

        counter = ZeroGatherCounter() if is_zero3(accelerator) else contextlib.nullcontext()
        with counter, torch.no_grad(), gathered_for_generation(accelerator, model) as unwrapped:
            out = unwrapped.generate(prompt, max_new_tokens=args.generate, do_sample=False,
                                     min_new_tokens=args.generate, pad_token_id=0)
        result["generated"] = out[0].tolist()
        result["gathers_during_generate"] = getattr(counter, "count", None)
        # the same model with DeepSpeed's per-layer hooks left in place: one gather per layer per token
        if is_zero3(accelerator):
            with ZeroGatherCounter() as naive, torch.no_grad():
                out2 = accelerator.unwrap_model(model).generate(prompt, max_new_tokens=args.generate, do_sample=False,
                                                        min_new_tokens=args.generate, pad_token_id=0,
                                                        synced_gpus=world > 1)
            result["gathers_naive"] = naive.count
            result["generated_naive"] = out2[0].tolist()
    save_hf_model(accelerator, model, Path(args.out) / "model")
    if accelerator.is_main_process:
        (Path(args.out) / "result.json").write_text(json.dumps(result))
    run.close()
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
