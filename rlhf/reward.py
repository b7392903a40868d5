"""`rlhf reward`: a reward model trained from pairwise preferences or K-wise rankings; `rlhf reward score`.

The model is a sequence classifier with one output, read at the last non-padding token, initialised
from a causal LM (the SFT model, or `builtin:tiny`); its `score` head is new.

K-wise data is trained as InstructGPT did (Ouyang et al. 2022, sec. 3.5): the K responses of a prompt
go through the model once, in one (B*K, T) batch, and `rlhf.core.ranking_loss` averages
-log sigmoid(r_better - r_worse) over all C(K, 2) ordered pairs of each prompt (ties skipped), each
prompt weighing the same - rather than C(K, 2) separate pairwise examples, which would forward each
response K-1 times and over-fit (InstructGPT found the latter over-fits in one epoch). Pairwise rows
are rankings with K = 2, where the loss is exactly the Bradley-Terry loss.

`--loss_type plackett_luce` trains on the negative log-likelihood of each whole ranking instead
(`rlhf.core.plackett_luce_nll`; Plackett 1975, DPO appendix A.3 eq. 20): the best response is a softmax
choice among all K, the second among the K - 1 left, and so on (ties: Breslow's rule, as in `rlhf dpo`).
That is the exact model of a labeller who picks the best remaining response with probability
proportional to exp(reward), as the built-in labeller does (`rlhf.tasks.arithmetic.noisy_ranks`), so
it is the maximum-likelihood loss for such rankings; the pairwise loss is a composite likelihood of the
same model (every pair's marginal is Bradley-Terry) that ignores how the pairs of one ranking depend on
each other. The PL loss sums K - 1 terms per prompt where the pairwise one averages, so its scale (and
the relative weight of `center_rewards_coefficient`) grows with K; `margin` applies to pairs only.
On the pipeline's arithmetic rankings it ranked the right sum above the dropped-carry answer less often
than the pairwise loss on all three seeds measured (results/rlhf_reward_model.md), so pairwise is the default.

Without `--dataset_name` the rankings are generated on the built-in arithmetic task: K distinct
candidate answers per training prompt (drawn around the gold answer by
`rlhf.tasks.arithmetic.candidate_answers`, or sampled from `--sampler_model`) are ordered by the noisy
Bradley-Terry labeller (`--labeller_noise`). Held-out metrics use held-out prompts ranked by the gold
score itself: `eval/accuracy` is the share of gold-ordered pairs the model orders the same way.
Start from the SFT model where there is one (InstructGPT does): an untrained `builtin:tiny` learns the
format pairs at once but must discover addition from rankings alone (see configs/rlhf/reward_tiny.yaml).

`--logprob_coef c` adds c times the model's own log-likelihood of the response, log p(response + EOS |
prompt) under its LM head (the tied input embeddings), to the score head's value, in training and in every
scorer (PPO's, `rlhf reward score`; the coefficient is saved in the model's config.json as
`reward_logprob_coef`). The score head reads one hidden state, at the last token; whether a token is the one
the model would write there (the units digit of a sum) is the LM head's logit of that token at the position
before it, which no fixed direction of a hidden state gives, and training moves the whole score through
both paths. On the pipeline's arithmetic rankings it lifts the right sum above an off-by-one answer from
chance to 94-99% (results/rlhf_reward_model.md). It needs tied embeddings (a sequence classifier loads no
separate lm_head) and is refused under ZeRO-3 (the embedding matrix is read outside its module).

`--expand_layers N` grows the starting model by N decoder layers before training (block expansion, Wu et
al. 2024, "LLaMA Pro"): copies of its last layer with the attention and MLP output projections zeroed, so
the expanded model computes the same hidden states, and the same score, as the unexpanded one at step 0.
A causal LM predicts token t+1 at the last layer of position t; only layers above that one can compare
the prediction with the token actually written. The saved model is an ordinary checkpoint with the larger
`num_hidden_layers`. On the arithmetic task two such layers did not teach the reward model the units
digit (right vs off by one stays at chance): results/rlhf_reward_model.md.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from rlhf.core import ranked_pairs, ranking_loss
from rlhf.data import (DataError, Locator, collate_rankings, load_rows, preference_responses, ranking_shape,
                       tokenize_rankings)
from rlhf.distributed import gathered_for_generation, is_zero3, loss_normaliser, reduce_sum, save_hf_model
from rlhf.models import load_causal_lm, load_reward_model, load_tokenizer, reward_scores
from rlhf.rewards import RewardModelScorer
from rlhf.runtime import Timer, arg, check, command_name, parse_config, resolve_checkpoint, seed_everything
from rlhf.tasks import arithmetic
from rlhf.training import (TrainingConfig, backward, due, end_step, epoch_steps, lora, open_epoch_run,
                           prepare_training, save_checkpoint, scoring_batches, setup_accelerator,
                           step_batches)


@dataclass
class Config(TrainingConfig):
    """Train a reward model from pairwise preferences or K-wise rankings."""

    output_dir: str = arg("runs/reward", "Run directory; the final model goes to output_dir/model.")
    model_name_or_path: str = arg("builtin:tiny", "Causal LM (or reward model) to start from: `builtin:tiny`, a hub "
                                                  "name or a local directory (e.g. an SFT run's model).")
    dataset_name: str = arg("", "Hub name or local json/jsonl/parquet/csv file with `prompt`+`chosen`+`rejected` or "
                                "`prompt`+`completions`+`ranks`, text or chat messages (whole conversations need no "
                                "`prompt`); empty: generate built-in arithmetic rankings.")
    dataset_split: str = arg("train", "Split of `dataset_name` (hub datasets and directories).")
    eval_dataset_name: str = arg("", "Held-out rankings (same formats); built-in task: held-out prompts by gold score.")
    num_train_prompts: int = arg(4000, "Built-in task: prompts to rank.")
    completions_per_prompt: int = arg(4, "Built-in task: K, the candidate answers ranked per prompt.")
    labeller_noise: float = arg(0.5, "Built-in task: labeller temperature; P(i above j) = sigmoid((gold_i - gold_j) / "
                                     "noise); 0 ranks by the gold score.")
    sampler_model: str = arg("", "Built-in task: sample the K candidates from this causal LM (temperature 1) instead "
                                 "of the built-in candidate generator.")
    max_length: int = arg(64, "Longest prompt + response in tokens; longer rankings are dropped (in summary.json).")
    loss_type: str = arg("pairwise", "pairwise: mean of -log sigmoid(r_better - r_worse) over each ranking's C(K, 2) "
                                     "ordered pairs (InstructGPT); plackett_luce: negative log-likelihood of the whole "
                                     "ranking as successive softmax choices of the best remaining response.",
                        choices=("pairwise", "plackett_luce"))
    margin: float = arg(0.0, "Margin m in -log sigmoid(r_better - r_worse - m) (Llama 2 style; 0: none; pairwise "
                             "loss only).")
    center_rewards_coefficient: float = arg(0.0, "Weight of mean(r^2), which keeps rewards centred at 0 (e.g. 0.01; 0: "
                                                 "off).")
    num_train_epochs: float = arg(1.0, "Passes over the rankings (the budget, unless max_steps is smaller).")
    max_steps: int = arg(-1, "Cap on optimizer steps (-1: no cap).")
    per_device_train_batch_size: int = arg(16, "Prompts (each with its K responses) per micro-batch on each process.")
    expand_layers: int = arg(0, "Decoder layers added on top of the starting model, each a copy of its last layer "
                                "with the output projections zeroed, so training starts from the same scores "
                                "(LLaMA Pro block expansion; Llama-family models; 0: none).")
    logprob_coef: float = arg(0.0, "Add this times the model's own log-likelihood of the response (its LM head, the "
                                   "tied input embeddings; EOS included) to the score head's value; 0: the score "
                                   "head alone. Saved in the model's config: PPO and `rlhf reward score` score the "
                                   "same way.")
    use_peft: bool = arg(False, "Train LoRA adapters (and the score head) instead of all weights.")
    eval_steps: int = arg(0, "Evaluate every this many steps (0: only at the end).")
    num_eval_prompts: int = arg(500, "Built-in task: held-out prompts whose candidates are ranked by the gold score.")
    per_device_eval_batch_size: int = arg(64, "Prompts per evaluation batch.")

    def __post_init__(self):
        check(self.max_length >= 8, "max_length", f"must be at least 8, got {self.max_length}")
        super().__post_init__()
        check(self.num_train_epochs > 0, "num_train_epochs", "must be positive")
        check(self.max_steps == -1 or self.max_steps > 0, "max_steps", "must be -1 (no cap) or positive")
        check(self.per_device_train_batch_size > 0, "per_device_train_batch_size", "must be positive")
        check(self.num_train_prompts > 0, "num_train_prompts", "must be positive")
        check(2 <= self.completions_per_prompt <= 10, "completions_per_prompt", "must be between 2 and 10")
        check(self.labeller_noise >= 0, "labeller_noise", "must be >= 0")
        check(self.margin >= 0, "margin", "must be >= 0")
        check(self.margin == 0 or self.loss_type == "pairwise", "margin", "applies to loss_type pairwise only")
        check(self.expand_layers >= 0, "expand_layers", f"must be >= 0, got {self.expand_layers}")
        check(self.logprob_coef >= 0, "logprob_coef", f"must be >= 0, got {self.logprob_coef}")
        check(self.center_rewards_coefficient >= 0, "center_rewards_coefficient", "must be >= 0")
        check(self.eval_steps >= 0 and self.num_eval_prompts >= 0, "eval_steps", "eval_steps and num_eval_prompts must "
                                                                                 "be >= 0")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def builtin_rankings(cfg: Config, prompts: list[str], noise: float, seed: int) -> list[dict]:
    completions = None
    if cfg.sampler_model:
        sampler, sampler_tok = load_causal_lm(cfg.sampler_model), load_tokenizer(cfg.sampler_model)
        k = cfg.completions_per_prompt
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            flat = arithmetic.generate_completions(sampler, sampler_tok, prompts, batch_size=64, do_sample=True,
                                                   num_return_sequences=k)
        # an empty sample (EOS first) is a malformed answer; keep it visible as a space-free marker
        completions = [[flat[i * k + j][0] or "<empty>" for j in range(k)] for i in range(len(prompts))]
    return arithmetic.make_ranking_rows(prompts, cfg.completions_per_prompt, seed, noise, completions)


def load_groups(cfg: Config, tokenizer):
    """(train groups, eval groups or None, counts of dropped rows), every row checked."""
    if cfg.dataset_name:
        train = tokenize_rankings(load_rows(cfg.dataset_name, cfg.dataset_split), tokenizer, cfg.max_length,
                                  cfg.dataset_name)
    else:
        prompts = arithmetic.make_prompts(cfg.num_train_prompts, cfg.seed)
        rows = builtin_rankings(cfg, prompts, cfg.labeller_noise, cfg.seed)
        train = tokenize_rankings(datasets.Dataset.from_list(rows), tokenizer, cfg.max_length, "built-in arithmetic "
                                                                                               "rankings")
    evaluation = None
    if cfg.eval_dataset_name:
        evaluation = tokenize_rankings(load_rows(cfg.eval_dataset_name, cfg.dataset_split), tokenizer, cfg.max_length,
                                       cfg.eval_dataset_name).examples
    elif not cfg.dataset_name and cfg.num_eval_prompts > 0:
        prompts = arithmetic.make_prompts(cfg.num_eval_prompts, cfg.seed, split="eval")
        rows = arithmetic.make_ranking_rows(prompts, cfg.completions_per_prompt, cfg.seed + 1, noise=0.0)  # gold order
        evaluation = tokenize_rankings(datasets.Dataset.from_list(rows), tokenizer, cfg.max_length, "built-in held-out "
                                                                                                    "rankings").examples
    return train.examples, evaluation, {"data/dropped_too_long": train.dropped_too_long,
                                        "data/dropped_all_ties": train.dropped_all_ties}


# ---------------------------------------------------------------------------------------------
# Scores, loss, evaluation
# ---------------------------------------------------------------------------------------------


def group_scores(model, batch: dict) -> torch.Tensor:
    """Scores (B, K) of a collated ranking batch: all B*K responses in one forward pass."""
    scores = reward_scores(model, batch["input_ids"], batch["attention_mask"], batch["prompt_lens"])  # (B*K,)
    return scores.view(batch["ranks"].shape)  # (B, K)


def prompts_with_pairs(ranks: torch.Tensor) -> torch.Tensor:
    """Number of prompts that have at least one strict pair (ties and padding excluded)."""
    return ranked_pairs(ranks).flatten(1).any(dim=1).sum()


def prompt_shares(accelerator, batches: list[dict]) -> list[float]:
    """Each micro-batch's share of the prompts (with a strict pair) of the whole optimizer step, all processes.

    The ranking and DPO losses are means over the prompts of their batch; weighting each micro-batch's loss
    by this share makes the step's loss the mean over all its prompts, so accumulation and processes do not
    change the update.
    """
    local = [float(prompts_with_pairs(b["ranks"])) for b in batches]
    total = float(loss_normaliser(accelerator, sum(local)))
    return [n / total for n in local]


@torch.no_grad()
def evaluate(accelerator, model, groups: list[dict] | None, cfg: Config, pad_token_id: int) -> dict:
    """Held-out pairwise accuracy (pairs pooled), mean margin r_better - r_worse, and the ranking loss."""
    if not groups:
        return {}
    model.eval()
    correct = margin = n_pairs = loss_sum = n_prompts = 0.0
    with gathered_for_generation(accelerator, model) as unwrapped:
        results = [(group_scores(unwrapped, batch), batch["ranks"]) for batch in (
            {k: v.to(accelerator.device) for k, v in collate_rankings([groups[i] for i in chunk], pad_token_id).items()}
            for chunk in scoring_batches(accelerator, groups, cfg.per_device_eval_batch_size, ranking_shape))]
    for scores, ranks in results:  # (B, K) each
        valid = ranks >= 0
        # (B, K, K)
        pairs = ((ranks.unsqueeze(2) < ranks.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)).float()
        diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # (B, K, K): r_i - r_j where i is ranked better
        correct += float(((diff > 0).float() * pairs).sum())
        margin += float((diff * pairs).sum())
        n_pairs += float(pairs.sum())
        k_prompts = float(prompts_with_pairs(ranks))
        loss, _ = ranking_loss(scores, ranks, loss_type=cfg.loss_type)
        loss_sum += float(loss) * k_prompts
        n_prompts += k_prompts
    model.train()
    n_pairs_all, n_prompts_all = (reduce_sum(accelerator, n_pairs).clamp_min(1),
                                  reduce_sum(accelerator, n_prompts).clamp_min(1))
    return {"eval/accuracy": float(reduce_sum(accelerator, correct) / n_pairs_all),
            "eval/margin": float(reduce_sum(accelerator, margin) / n_pairs_all),
            "eval/loss": float(reduce_sum(accelerator, loss_sum) / n_prompts_all),
            "eval/pairs": float(n_pairs_all)}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train(cfg: Config) -> dict:
    accelerator = setup_accelerator(cfg)
    seed_everything(cfg.seed, cfg.deterministic)
    resume_dir = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir, command_name(cfg))
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    groups, eval_groups, dropped = load_groups(cfg, tokenizer)
    global_batch, total_steps = epoch_steps(cfg, accelerator, len(groups))

    seed_everything(cfg.seed, cfg.deterministic)  # the new score head starts the same whatever the data step drew
    # the log-likelihood term reads the embedding matrix outside its module, where ZeRO-3 has it partitioned
    check(not (cfg.logprob_coef and is_zero3(accelerator)), "logprob_coef", "is not supported under ZeRO-3 (use "
                                                                           "ZeRO-2 or DDP)")
    model = load_reward_model(cfg.model_name_or_path, gradient_checkpointing=cfg.gradient_checkpointing,
                              expand=cfg.expand_layers, logprob_coef=cfg.logprob_coef)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = lora(model, cfg)
    model, optimizer, scheduler = prepare_training(accelerator, model, cfg, total_steps)
    start, metrics, run, bar = open_epoch_run(cfg, accelerator, resume_dir, scheduler, total_steps, "reward")

    def save(step):
        save_checkpoint(run, accelerator, step, {"metrics": metrics}, scheduler=scheduler)

    timer = Timer()
    model.train()
    for step in range(start, total_steps):
        batches = step_batches(accelerator, cfg, step, groups, collate_rankings, tokenizer.pad_token_id)
        loss_sum, acc_sum, update = 0.0, 0.0, {}
        for batch, weight in zip(batches, prompt_shares(accelerator, batches)):
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    scores = group_scores(model, batch)  # (B, K)
                loss, m = ranking_loss(scores, batch["ranks"], margin=cfg.margin or None,
                                       center_coef=cfg.center_rewards_coefficient, loss_type=cfg.loss_type)
                share = loss * weight
                update = backward(accelerator, model, optimizer, scheduler, share, cfg.max_grad_norm)
            loss_sum += float(share.detach())
            acc_sum += float(m["reward/accuracy"]) * weight
        done = step + 1
        metrics = {"loss/reward": float(reduce_sum(accelerator, loss_sum)),
                   "reward/accuracy": float(reduce_sum(accelerator, acc_sum)), **update,
                   "train/epoch": done * global_batch / len(groups),
                   "time/sps": (done - start) * global_batch / max(timer.elapsed(), 1e-9)}
        if due(cfg.eval_steps, done, total_steps):
            metrics.update(evaluate(accelerator, model, eval_groups, cfg, tokenizer.pad_token_id))
        end_step(run, bar, cfg, done, total_steps, metrics, ["loss/reward", "reward/accuracy", "eval/accuracy"],
                 lambda: save(done))
    bar.close()
    train_seconds = timer.elapsed()
    if start < total_steps:
        save(total_steps)

    final = evaluate(accelerator, model, eval_groups, cfg, tokenizer.pad_token_id)
    run.log(total_steps, final)
    save_hf_model(accelerator, model, Path(cfg.output_dir) / "model", tokenizer, merge_lora=not cfg.save_adapter_only)
    summary = {**final, "step": total_steps, "train/loss_last": metrics.get("loss/reward"),
               "data/train_rankings": len(groups), **dropped, "time/train_s": train_seconds}
    run.write_summary(summary)
    run.close()
    return summary


# ---------------------------------------------------------------------------------------------
# `rlhf reward score --model DIR --data FILE`
# ---------------------------------------------------------------------------------------------


def score_rows(model_dir: str, data: str, batch_size: int = 64) -> list[dict]:
    """Scores of each row of `data`: `prompt`+`completion` -> score; `prompt`+`completions` -> scores;
    `prompt`+`chosen`+`rejected` -> chosen_score, rejected_score. Plain text or chats, checked as training
    checks them (`rlhf.data.preference_responses`; whole conversations need no `prompt`)."""
    rows = load_rows(data)
    cols = set(rows.column_names)
    keys = (["completion"] if "completion" in cols else ["completions"] if "completions" in cols
            else ["chosen", "rejected"])
    for k in keys:
        if k not in cols:
            raise DataError(f"{data}: missing column `{k}` (scoring needs `completion`, `completions`, or "
                            f"`chosen`+`rejected`)")
    where = Locator(data)
    out, texts = [], []  # texts: (row, key, index in list or None, prompt, response)
    for i, row in enumerate(rows.to_list()):
        responses = row["completions"] if keys == ["completions"] else [row[k] for k in keys]
        if not isinstance(responses, list) or not responses:
            raise DataError(f"{where(i)}: `completions` must be a non-empty list of responses")
        prompt, responses = preference_responses(row.get("prompt"), responses, where(i), "` / `".join(keys))
        out.append({"prompt": prompt})
        texts += [(i, keys[0] if len(keys) == 1 else keys[j], j if keys == ["completions"] else None, prompt, r)
                  for j, r in enumerate(responses)]
    scorer = RewardModelScorer(model_dir, batch_size=batch_size, option="--model")
    for (i, k, j, _, _), v in zip(texts, scorer([t[3] for t in texts], [t[4] for t in texts]).tolist()):
        if k == "completions":
            out[i].setdefault("scores", []).append(v)
        else:
            out[i]["score" if k == "completion" else f"{k}_score"] = v
    return out


def cli(argv: list[str], prog: str = "rlhf reward") -> None:
    """`rlhf reward [options]` trains; `rlhf reward score ...` scores. A ConfigError exits 2 in rlhf.cli."""
    if argv and argv[0] == "score":
        parser = argparse.ArgumentParser(prog=f"{prog} score", description="Score responses with a trained reward "
                                                                           "model; prints JSONL.")
        parser.add_argument("--model", required=True, help="Reward model directory (e.g. output_dir/model of `rlhf "
                                                           "reward`).")
        parser.add_argument("--data", required=True, help="json/jsonl/parquet/csv with `prompt` and `completion`, "
                                                          "`completions`, or `chosen`+`rejected`: text or chat "
                                                          "messages, as training reads them.")
        parser.add_argument("--batch_size", type=int, default=64, help="Responses per forward pass.")
        args = parser.parse_args(argv[1:])
        for row in score_rows(args.model, args.data, args.batch_size):
            print(json.dumps(row))
        return
    train(parse_config(Config, argv, prog=prog))
