"""Can a linear score head on a frozen model's hidden states rank the right sum above a near miss?

A reward model's score is a linear head on the hidden state at the last token (EOS). This script fits
that head alone, on the frozen hidden states of a model (e.g. the SFT model the reward model starts
from), to pairs "right answer vs right +- OFFSET" of training prompts, by logistic regression on the
difference of the two hidden states (Bradley-Terry with a linear score), and prints the share of pairs
it ranks right among the pairs it was fit on and among the other pairs, per layer, at the EOS and at the
last digit. Near 50% on the other pairs: the frozen features hold no linear trace of the check, so keeping them (e.g.
regularising the hidden states toward them) cannot give it to a score head.

    python scripts/rm_probe.py SFT_DIR [--offset 1] [--num_prompts 4000] [--num_train 3000]
"""

from __future__ import annotations

import argparse

import numpy as np


def hidden_states(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 256) -> dict:
    """{(layer, position name): (N, H)} hidden states at the EOS and at the token before it."""
    import torch

    from rlhf.data.formats import tokenize_prompt_completions

    ids = [x for x, _ in tokenize_prompt_completions(tokenizer, prompts, completions, chat=False)]
    out: dict = {}
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            chunk = ids[s:s + batch_size]
            x = torch.full((len(chunk), max(map(len, chunk))), tokenizer.pad_token_id)  # (B, T)
            mask = torch.zeros_like(x)
            for i, c in enumerate(chunk):
                x[i, :len(c)], mask[i, :len(c)] = torch.tensor(c), 1
            last = mask.sum(1) - 1  # (B,) the EOS
            rows = torch.arange(len(chunk))
            for layer, h in enumerate(model(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states):
                for back, name in ((0, "EOS"), (1, "last digit")):
                    out.setdefault((layer, name), []).append(h[rows, last - back].double())
    return {k: torch.cat(v) for k, v in out.items()}


def fit_linear_score(d, n_train: int, l2: float = 1e-4):
    """w minimising mean -log sigmoid(w . d) + l2 |w|^2 over the first n_train rows; shares with w . d > 0 among
    those rows and the others."""
    import torch
    import torch.nn.functional as F

    w = torch.zeros(d.shape[1], dtype=d.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500)

    def closure():
        opt.zero_grad()
        loss = -F.logsigmoid(d[:n_train] @ w).mean() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        right = (d @ w > 0).double()
    return float(right[:n_train].mean()), float(right[n_train:].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="Causal LM directory (e.g. an SFT run's model).")
    parser.add_argument("--offset", type=int, default=1, help="The near miss: right +- offset (1: off by one).")
    parser.add_argument("--num_prompts", type=int, default=4000, help="Training prompts (train split of the task).")
    parser.add_argument("--num_train", type=int, default=3000, help="Of those, the pairs the probe is fit on.")
    parser.add_argument("--seed", type=int, default=5, help="Seed of the prompts and of the sign of each near miss.")
    args = parser.parse_args()
    if not 0 < args.num_train < args.num_prompts:
        parser.error("--num_train must be between 0 and --num_prompts")
    import torch

    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.tasks import arithmetic

    torch.set_num_threads(1)
    tokenizer, model = load_tokenizer(args.model), load_causal_lm(args.model).eval()
    rng = np.random.default_rng(args.seed)
    prompts = arithmetic.make_prompts(args.num_prompts, seed=args.seed)
    right = [int(arithmetic.gold_answer(p)) for p in prompts]
    near = [s + args.offset if rng.random() < 0.5 or s < args.offset else s - args.offset for s in right]
    h_right = hidden_states(model, tokenizer, prompts, [str(s) for s in right])
    h_near = hidden_states(model, tokenizer, prompts, [str(s) for s in near])
    print(f"| layer | position | right > right +- {args.offset}: fit pairs | other pairs |")
    print("|---|---|---|---|")
    for (layer, name), h in h_right.items():
        if layer == 0 and name == "EOS":
            continue  # the EOS embedding: the same for every answer
        fit, other = fit_linear_score(h - h_near[(layer, name)], args.num_train)
        print(f"| {layer} | {name} | {100 * fit:.1f}% | {100 * other:.1f}% |")


if __name__ == "__main__":
    main()
