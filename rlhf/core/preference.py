"""Direct preference losses: DPO and its variants on pairwise preferences or K-wise rankings.

Every loss works on sequence log-probabilities of K responses per prompt and their ranks (0 = best,
ties allowed, rank < 0 marks padding), as :func:`rlhf.core.ranking_loss` does: pairwise data is
K = 2. The implicit reward of a response is r = beta * (logp - ref_logp) (beta * logp without a
reference); a pair (i, j) with rank_i < rank_j has margin d = r_i - r_j. Pair losses are averaged
over the ordered pairs of a prompt (ties skipped), then over the prompts that have a pair: every
prompt weighs the same, whatever its K.

References:
- Rafailov et al. 2023, "Direct Preference Optimization" (DPO, eq. 7; Plackett-Luce, appendix A.3 eq. 20).
- Mitchell 2023, "A note on DPO with noisy preferences" (cDPO: label smoothing);
  Chowdhury et al. 2024, "Provably Robust DPO" (eq. 9: the unbiased loss under label flips).
- Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences" (IPO, eq. 17).
- Zhao et al. 2023, "SLiC-HF" (hinge loss); Meng et al. 2024, "SimPO" (eq. 6: length-normalised,
  reference-free, target margin gamma).
- Pang et al. 2024, "Iterative Reasoning Preference Optimization" (RPO: DPO plus the negative
  log-likelihood of the preferred response, per token).
- Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment" (EXO, eq. 16);
  Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards" (NCA);
  Jung et al. 2024, "Binary Classifier Optimization" (BCO; here without its running reward shift);
  Wu et al. 2024, "Self-Play Preference Optimization" (SPPO, hard labels); D'Oosterlinck et al. 2024,
  "Anchored Preference Optimization" (APO-zero eq. 7, APO-down eq. 8); Lu et al. 2024, "Discovering
  Preference Optimization Algorithms" (DiscoPOP, eq. 5).
- Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
  Divergence Constraints" (f-DPO: the implicit reward beta * f'(pi / pi_ref), Table 1).
- Liu et al. 2024, "Length Desensitization in Direct Preference Optimization" (LD-DPO: in each pair,
  the tokens past the shorter response's length weigh alpha).
- Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization" (eq. 2 with the
  sampled-alignment normalisation, as TRL's `use_weighting`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PAIR_LOSSES = ("sigmoid", "sigmoid_norm", "robust", "ipo", "hinge", "simpo", "exo_pair", "nca_pair", "bco_pair",
               "sppo_hard", "apo_zero", "apo_down", "discopop")
LOSS_TYPES = PAIR_LOSSES + ("plackett_luce",)
LENGTH_NORMALISED = ("sigmoid_norm", "ipo", "simpo")  # on the mean log-prob per response token, not the sum
SMOOTHED = ("sigmoid", "sigmoid_norm", "robust", "simpo", "exo_pair")  # the losses label_smoothing applies to
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# the losses on reward differences alone, where f-DPO's rewards may stand in for the log-ratio
ON_MARGINS = ("sigmoid", "sigmoid_norm", "robust", "ipo", "hinge", "exo_pair", "discopop", "plackett_luce")


def _d(x: torch.Tensor) -> torch.Tensor:
    return x.detach()


def ranked_pairs(ranks: torch.Tensor) -> torch.Tensor:
    """Ordered pairs (i, j) of each prompt with i ranked strictly better than j, both real responses.

    Shapes: ranks (B, K) int, 0 = best, < 0 padding; returns (B, K, K) bool.
    """
    valid = ranks >= 0
    return (ranks.unsqueeze(2) < ranks.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)


def length_desensitised_logps(token_logps: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO's log-prob of each response in each of its pairs: in pair (i, j) the first min(L_i, L_j) tokens of
    response i count in full and its later ("verbose") tokens weigh `alpha`, so that a response's length alone
    does not make its log-prob smaller. Entry [b, i, j] is response i's against response j; the diagonal
    (i against itself, nothing cut) is the plain sum, and `alpha` = 1 is the plain sum everywhere.

    Shapes: token_logps, mask (B, K, R), each response's tokens first (mask 1 on them); returns (B, K, K) float.
    """
    cumulative = (token_logps * mask).cumsum(dim=-1)  # (B, K, R): log-prob of each response's first t + 1 tokens
    lengths = mask.sum(dim=-1).long()  # (B, K)
    shared = torch.minimum(lengths.unsqueeze(2), lengths.unsqueeze(1))  # (B, K, K)
    head = torch.gather(cumulative, 2, (shared - 1).clamp_min(0)) * (shared > 0)  # (B, K, K): i's first tokens
    return head + alpha * (cumulative[..., -1:] - head)


def wpo_weights(token_logps: torch.Tensor, token_log_sum_sq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO's weight of each response, how likely the policy is to produce it: exp of the mean over its tokens of
    log p(y_t) - log sum_v p(v)^2 (the token's log-prob relative to that of the policy's own draws agreeing,
    `rlhf.core.log_sum_sq_probs`), detached: a constant of the loss. A pair weighs the product of its two.

    Shapes: token_logps, token_log_sum_sq, mask (..., R); returns (...) float (1 for an empty response).
    """
    aligned = ((token_logps - token_log_sum_sq) * mask).sum(dim=-1) / mask.sum(dim=-1).clamp_min(1)
    return torch.exp(aligned).detach()


def pair_rewards(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_i, r_j) of every ordered pair (i, j): from one reward per response (B, K), or from one per response
    and pair (B, K, K), [b, i, j] response i's in its pair with j (:func:`length_desensitised_logps`).

    Shapes: rewards (B, K) or (B, K, K); returns two (B, K, K).
    """
    if rewards.dim() == 3:
        return rewards, rewards.transpose(1, 2)
    k = rewards.shape[1]
    return rewards.unsqueeze(2).expand(-1, -1, k), rewards.unsqueeze(1).expand(-1, k, -1)


def implicit_rewards(logps: torch.Tensor, ref_logps: torch.Tensor | None, beta: float = 0.1,
                     f_divergence: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """beta x f'(pi / pi_ref) of each response, for the divergence f that regularises the policy (f-DPO, Table 1;
    reverse KL is DPO). With u = logps - ref_logps, the log-ratio: reverse_kl u; forward_kl 1 - exp(-u);
    js_divergence log 2 + log sigma(u); alpha_divergence (exp((alpha - 1) u) - 1) / (alpha - 1), u at alpha = 1
    (TRL's parameterisation; the paper's alpha is 1 - this one). Each is 0 at u = 0 and rises with u; exponents
    are clamped at 80 (float32's exp overflows past 88). `ref_logps` None: reference-free, beta x logps.

    Shapes: logps, ref_logps (...) float; returns (...) float.
    """
    if ref_logps is None:
        if f_divergence != "reverse_kl":
            raise ValueError(f"f_divergence {f_divergence!r} needs a reference")
        return beta * logps
    u = logps - ref_logps
    if f_divergence == "reverse_kl" or f_divergence == "alpha_divergence" and alpha == 1:
        return beta * u
    if f_divergence == "forward_kl":
        return beta * (1 - torch.exp((-u).clamp_max(80)))
    if f_divergence == "js_divergence":
        return beta * (math.log(2) + F.logsigmoid(u))
    if f_divergence == "alpha_divergence":
        return beta * torch.expm1(((alpha - 1) * u).clamp_max(80)) / (alpha - 1)
    raise ValueError(f"f_divergence must be one of {', '.join(F_DIVERGENCES)}, got {f_divergence!r}")


def pair_losses(better: torch.Tensor, worse: torch.Tensor, loss_type: str = "sigmoid", beta: float = 0.1,
                label_smoothing: float = 0.0, simpo_gamma: float = 0.5, discopop_tau: float = 0.05) -> torch.Tensor:
    """Loss of each preferred-over-dispreferred pair from the implicit rewards r_b (better) and r_w (worse) of its
    two responses; d = r_b - r_w, s = sigma, eps = label_smoothing:

    sigmoid (DPO eq. 7, cDPO with eps), sigmoid_norm (on mean log-probs): -(1 - eps) log s(d) - eps log s(-d);
    robust (rDPO eq. 9): ((1 - eps) (-log s(d)) - eps (-log s(-d))) / (1 - 2 eps);
    ipo (IPO eq. 17, h = d / beta the log-ratio difference): (h - 1 / (2 beta))^2;
    hinge (SLiC): max(0, 1 - d); simpo (SimPO eq. 6, with cDPO's smoothing): sigmoid on d - gamma;
    exo_pair (EXO eq. 16, eps > 0): KL((s(d), s(-d)) || (1 - eps, eps));
    nca_pair (NCA): -log s(r_b) - (log s(-r_b) + log s(-r_w)) / 2; bco_pair: -log s(r_b) - log s(-r_w);
    sppo_hard (SPPO, hard labels; on log-ratios): (r_b / beta - 1 / (2 beta))^2 + (r_w / beta + 1 / (2 beta))^2;
    apo_zero (APO eq. 7): 1 - s(r_b) + s(r_w); apo_down (APO eq. 8): s(r_b) + 1 - s(d);
    discopop (DiscoPOP eq. 5, m = s(d / tau)): (1 - m) (-log s(d)) + m exp(-d).

    Shapes: better, worse (...) float, the same; returns (...) float.
    """
    eps, d = label_smoothing, better - worse
    if loss_type in ("sigmoid", "sigmoid_norm"):
        return -(1 - eps) * F.logsigmoid(d) - eps * F.logsigmoid(-d)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(d) + eps * F.logsigmoid(-d)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (d / beta - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - d)
    if loss_type == "simpo":
        m = d - simpo_gamma
        return -(1 - eps) * F.logsigmoid(m) - eps * F.logsigmoid(-m)
    if loss_type == "exo_pair":
        if not 0 < eps < 1:
            raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (EXO's epsilon), got {eps}")
        return (torch.sigmoid(d) * (F.logsigmoid(d) - math.log1p(-eps))
                + torch.sigmoid(-d) * (F.logsigmoid(-d) - math.log(eps)))
    if loss_type == "nca_pair":
        return -F.logsigmoid(better) - 0.5 * (F.logsigmoid(-better) + F.logsigmoid(-worse))
    if loss_type == "bco_pair":
        return -F.logsigmoid(better) - F.logsigmoid(-worse)
    if loss_type == "sppo_hard":
        return (better / beta - 1 / (2 * beta)) ** 2 + (worse / beta + 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(better) + torch.sigmoid(worse)
    if loss_type == "apo_down":
        return torch.sigmoid(better) + 1 - torch.sigmoid(d)
    if loss_type == "discopop":
        # m exp(-d) as exp(log m - d): finite where m underflows and exp(-d) overflows (a pair ordered far wrong)
        return -(1 - torch.sigmoid(d / discopop_tau)) * F.logsigmoid(d) + torch.exp(F.logsigmoid(d / discopop_tau) - d)
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def plackett_luce_nll(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each prompt's ranking under Plackett-Luce with weights exp(reward).

    DPO appendix A.3, eq. 20: -sum_k log(exp(r_(k)) / sum_{l >= k} exp(r_(l))), responses in rank order.
    Ties use Breslow's rule (each tied response competes against every response ranked at or below
    it); the responses of the worst rank choose nothing and add no term. With K = 2 and no tie it
    is -log sigma(r_0 - r_1), the DPO loss.

    Shapes: rewards (B, K) float, ranks (B, K) int (0 = best, < 0 padding); returns (B,) float.
    """
    valid = ranks >= 0  # (B, K)
    at_or_below = (ranks.unsqueeze(1) >= ranks.unsqueeze(2)) & valid.unsqueeze(1)  # (B, K, K): [i, j] rank_j >= rank_i
    denom = torch.logsumexp(rewards.unsqueeze(1).masked_fill(~at_or_below, float("-inf")), dim=2)  # (B, K)
    worst = ranks.masked_fill(~valid, -1).max(dim=1, keepdim=True).values  # (B, 1)
    chooses = valid & (ranks < worst)  # (B, K)
    return torch.where(chooses, denom - rewards, torch.zeros_like(rewards)).sum(dim=1)


def dpo_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    ranks: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """DPO-family loss of K ranked responses per prompt: mean over prompts of the mean pair loss
    (or of the Plackett-Luce negative log-likelihood with ``loss_type="plackett_luce"``).

    Rewards r = beta * (logps - ref_logps), or beta * logps when ``ref_logps`` is None (reference-free,
    SimPO); with another ``f_divergence``, f-DPO's :func:`implicit_rewards` (for the losses ``ON_MARGINS``).
    The caller picks the sequence log-prob: the sum over completion tokens (DPO), their mean
    (``LENGTH_NORMALISED``: IPO, SimPO, sigmoid_norm), or one per pair (B, K, K) as LD-DPO's
    :func:`length_desensitised_logps` (not for plackett_luce, which ranks whole lists). ``weights`` (B, K): WPO's
    :func:`wpo_weights`, each pair's loss times the product of its two responses' (pair losses only). Pair losses:
    :func:`pair_losses`; K-wise: every ordered pair with rank_i < rank_j (ties skipped), as InstructGPT's reward
    model (Ouyang et al. 2022, eq. 1); a loss with a term per response (nca_pair, bco_pair, sppo_hard, apo_*)
    counts it once per pair it is in.
    Metrics (TRL's names), per-prompt pair means averaged over prompts: ``rewards/chosen`` and
    ``rewards/rejected`` (r of the better / worse response), ``rewards/margins``,
    ``rewards/accuracies`` (share of pairs with r_better > r_worse), ``logps/chosen``, ``logps/rejected``.

    Shapes: logps, ref_logps (B, K) or both (B, K, K) float, ranks (B, K) int (0 = best, < 0 padding); returns
    (loss, metrics).
    """
    if f_divergence != "reverse_kl" and loss_type not in ON_MARGINS:
        raise ValueError(f"f_divergence applies to the losses on reward differences ({', '.join(ON_MARGINS)}), "
                         f"not {loss_type!r}")
    if loss_type == "plackett_luce" and (logps.dim() == 3 or weights is not None):
        raise ValueError("plackett_luce ranks whole lists: it takes one log-prob per response (B, K), not per pair, "
                         "and no pair weights")
    rewards = implicit_rewards(logps, ref_logps, beta, f_divergence, f_alpha)  # (B, K) or (B, K, K)
    pairs = ranked_pairs(ranks).to(logps.dtype)  # (B, K, K)
    n_pairs = pairs.sum(dim=(1, 2))  # (B,)
    has_pairs = (n_pairs > 0).to(logps.dtype)  # (B,)
    n_prompts = has_pairs.sum().clamp_min(1)
    better, worse = pair_rewards(rewards)  # (B, K, K): r_i, r_j
    margins = better - worse

    def per_prompt_mean(x):  # (B, K, K) over each prompt's pairs -> mean over prompts
        return ((x * pairs).sum(dim=(1, 2)) / n_pairs.clamp_min(1)).sum() / n_prompts

    if loss_type == "plackett_luce":
        loss = (plackett_luce_nll(rewards, ranks) * has_pairs).sum() / n_prompts
    else:
        losses = pair_losses(better, worse, loss_type, beta, label_smoothing, simpo_gamma, discopop_tau)  # (B, K, K)
        if weights is not None:  # WPO: a pair weighs the product of its responses' weights
            losses = losses * (weights.unsqueeze(2) * weights.unsqueeze(1))
        loss = per_prompt_mean(losses)
    metrics = {
        "loss/dpo": _d(loss),
        "rewards/chosen": _d(per_prompt_mean(better)),
        "rewards/rejected": _d(per_prompt_mean(worse)),
        "rewards/margins": _d(per_prompt_mean(margins)),
        "rewards/accuracies": _d(per_prompt_mean((margins > 0).to(logps.dtype))),
    }
    metrics["logps/chosen"], metrics["logps/rejected"] = (_d(per_prompt_mean(x)) for x in pair_rewards(logps))
    return loss, metrics


def best_response_nll(token_logps: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term (Pang et al. 2024; the term TRL's `rpo_alpha` weighs): minus the per-token log-prob of each
    prompt's best response (the mean over responses tied at the best rank), averaged over the prompts that have a
    pair, so that it weighs prompts as :func:`dpo_loss` does.

    Shapes: token_logps (B, K) float, each response's mean log-prob per token; ranks (B, K) int (0 = best, < 0
    padding); returns () float.
    """
    valid = ranks >= 0
    top = ranks.masked_fill(~valid, torch.iinfo(ranks.dtype).max).min(dim=1, keepdim=True).values  # (B, 1)
    best = (valid & (ranks == top)).to(token_logps.dtype)  # (B, K)
    per_prompt = -(torch.where(best > 0, token_logps, torch.zeros_like(token_logps)).sum(dim=1)
                   / best.sum(dim=1).clamp_min(1))  # (B,)
    has_pairs = ranked_pairs(ranks).flatten(1).any(dim=1).to(token_logps.dtype)  # (B,)
    return (per_prompt * has_pairs).sum() / has_pairs.sum().clamp_min(1)
