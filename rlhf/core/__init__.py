"""The policy-optimisation core shared by ``rlhf`` and ``classic``: pure functions on torch tensors.

Imports nothing but torch, numpy and the standard library.
"""

from .advantages import (baseline_advantages, discounted_returns, gae, group_advantages, group_stats,
                         informative_groups, overlong_penalty, per_token_rewards, reinforce_pp_advantages,
                         rloo_advantages, token_gae)
from .kl import (AdaptiveKLController, FixedKLController, ProportionalKLController, kl_controller, kl_estimate,
                 truncated_importance_weights)
from .losses import (bradley_terry_loss, clip_fraction, dqn_target, dueling_q, entropy_from_logits, kl_penalty_loss,
                     log_sum_sq_probs, logprobs_from_logits, policy_gradient_loss, ppo_clip_loss, ranking_loss,
                     sequence_log_ratio, td_loss, value_loss)
from .masked import (AGGREGATION_MODES, aggregate_loss, explained_variance, masked_mean, masked_sum, masked_var,
                     masked_whiten)
from .preference import (best_response_nll, dpo_loss, implicit_rewards, length_desensitised_logps, pair_losses,
                         pair_rewards, plackett_luce_nll, ranked_pairs, wpo_weights)
from .trust_region import (backtracking_line_search, conjugate_gradient, fisher_vector_product, flat_grad, flat_params,
                           kl_dual_update, set_flat_params, trpo_step_size)

__all__ = ["AGGREGATION_MODES", "AdaptiveKLController", "aggregate_loss", "backtracking_line_search",
           "baseline_advantages", "best_response_nll", "bradley_terry_loss", "clip_fraction", "conjugate_gradient",
           "discounted_returns", "dpo_loss", "dqn_target", "dueling_q", "entropy_from_logits", "explained_variance",
           "fisher_vector_product", "FixedKLController", "flat_grad", "flat_params", "gae", "group_advantages",
           "group_stats", "implicit_rewards", "informative_groups", "kl_controller", "kl_dual_update", "kl_estimate",
           "kl_penalty_loss", "length_desensitised_logps", "log_sum_sq_probs",
           "logprobs_from_logits", "masked_mean", "masked_sum", "masked_var", "masked_whiten", "overlong_penalty",
           "pair_losses", "pair_rewards", "per_token_rewards", "plackett_luce_nll", "policy_gradient_loss",
           "ppo_clip_loss",
           "ProportionalKLController", "ranked_pairs", "ranking_loss", "reinforce_pp_advantages", "rloo_advantages",
           "sequence_log_ratio", "set_flat_params", "td_loss", "token_gae", "trpo_step_size", "wpo_weights",
           "truncated_importance_weights", "value_loss"]
