"""Actor-critic networks for the policy-gradient family (vanilla PG, PPO, TRPO).

One class, `ActorCritic`, with two heads chosen by the action space:
- `Discrete`: a categorical policy over logits;
- `Box`: a diagonal Gaussian with a state-independent log-std parameter (Schulman et al. 2015,
  TRPO sec. 8; PPO sec. 6.1), sampled actions are *not* squashed (the env wrapper clips them).
and two torsos: separate actor / critic MLPs (CleanRL `ppo_continuous_action.py`, PPO paper
sec. 6.1: 64-64 tanh, no sharing) or a shared Nature CNN for Atari (Mnih et al. 2015).

The distribution of a batch is carried as a flat tensor of *parameters* (`params`: logits, or
mean | log-std), so the old policy of a rollout can be stored and compared against the new one
exactly (`kl(old_params, new_params)`, the KL(old || new) of PPO's penalty and TRPO's constraint).
Initialisation: orthogonal, gain sqrt(2) in the hidden layers, 0.01 for the policy output and
1 for the value output (Andrychowicz et al. 2021, "What Matters in On-Policy RL", C.3; Engstrom
et al. 2020). With `bf16` the networks run under bfloat16 autocast and every method returns float32
(distribution parameters, values), so log-probs, KLs, losses and GAE are float32 math (classic/nets.py).
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Normal, kl_divergence

from classic.nets import NatureCNN, autocast, layer_init, mlp, numpy_mlp
from rlhf.core import entropy_from_logits

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def is_image_space(space: gym.Space) -> bool:
    return isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3


class ActorCritic(nn.Module):
    """pi(a|s) and V(s) for one observation / action space pair.

    `policy="mlp"`: separate actor and critic MLPs; `policy="cnn"`: a shared Nature CNN on uint8
    frames (N, C, 84, 84), scaled to [0, 1], with linear actor and critic heads (discrete only).
    `bf16`: bfloat16 autocast in every forward pass, float32 outputs; `channels_last`: the CNN's
    weights (and so its inputs) in channels-last memory format.
    """

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.Space,
        policy: str = "mlp",
        hidden_sizes: tuple[int, ...] = (64, 64),
        activation: str = "tanh",
        init_log_std: float = 0.0,
        bf16: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        self.bf16 = bf16
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        if not self.discrete and not (isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1):
            raise ValueError(f"unsupported action space {action_space}: expected Discrete or a 1-D Box")
        self.action_dim = int(action_space.n) if self.discrete else int(action_space.shape[0])
        self.cnn = policy == "cnn"
        if self.cnn:
            self.torso = NatureCNN(observation_space.shape[0], 512)  # scales uint8 frames to [0, 1] itself
            for m in self.torso.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    layer_init(m)
            self.actor = layer_init(nn.Linear(512, self.action_dim), gain=0.01)
            self.critic = layer_init(nn.Linear(512, 1), gain=1.0)
            if channels_last:  # after the init: orthogonal_ writes through a contiguous view
                self.torso.to(memory_format=torch.channels_last)
        else:
            obs_dim = int(np.prod(observation_space.shape))
            self.actor = mlp(obs_dim, hidden_sizes, self.action_dim, ACTIVATIONS[activation], out_gain=0.01)
            self.critic = mlp(obs_dim, hidden_sizes, 1, ACTIVATIONS[activation], out_gain=1.0)
        if not self.discrete:
            self.log_std = nn.Parameter(torch.full((self.action_dim,), float(init_log_std)))
            self.action_low, self.action_high = action_space.low, action_space.high  # numpy, for clipping at evaluation

    def actor_parameters(self) -> list[nn.Parameter]:
        """The parameters of pi: all but the critic's (a shared CNN torso is pi's too)."""
        return [p for name, p in self.named_parameters() if not name.startswith("critic.")]

    # -- forward ---------------------------------------------------------------------------
    def _features(self, obs: torch.Tensor) -> torch.Tensor:
        if self.cnn:
            return self.torso(obs)  # (B, 512)
        return obs.flatten(1)  # (B, obs_dim)

    def _heads(self, obs: torch.Tensor, critic: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Actor output (B, A) and value (B,) (None without `critic`) in float32, the layers under `bf16` autocast."""
        with autocast(obs.device.type, self.bf16):
            feats = self._features(obs)
            out, value = self.actor(feats), self.critic(feats).squeeze(-1) if critic else None
        return out.float(), value if value is None else value.float()

    def params(self, obs: torch.Tensor) -> torch.Tensor:
        """Distribution parameters: logits (B, A), or mean | log-std (B, 2 * A)."""
        out = self._heads(obs, critic=False)[0]
        if self.discrete:
            return out
        return torch.cat([out, self.log_std.expand_as(out)], dim=-1)

    def params_and_value(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both heads on one batch (the CNN torso runs once). Shapes: obs (B, ...) -> (B, P), (B,)."""
        out, value = self._heads(obs)
        if not self.discrete:
            out = torch.cat([out, self.log_std.expand_as(out)], dim=-1)
        return out, value

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s). Shapes: obs (B, ...) -> (B,)."""
        with autocast(obs.device.type, self.bf16):
            value = self.critic(self._features(obs)).squeeze(-1)
        return value.float()

    # -- distribution math on params (exact, through torch.distributions / rlhf.core) ----------
    def distribution(self, params: torch.Tensor):
        if self.discrete:
            return Categorical(logits=params, validate_args=False)
        mean, log_std = params.chunk(2, dim=-1)
        return Normal(mean, log_std.exp(), validate_args=False)

    def log_prob(self, params: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s). Shapes: params (B, P), actions (B,) or (B, A) -> (B,).

        Written out (rather than through Distribution objects) because it runs once per minibatch;
        `test_policies_match_torch_distributions` checks it against torch.distributions.
        """
        if self.discrete:
            return params.log_softmax(-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        mean, log_std = params.chunk(2, dim=-1)
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std - LOG_SQRT_2PI).sum(-1)

    def entropy(self, params: torch.Tensor) -> torch.Tensor:
        """Entropy of pi(.|s). Shapes: params (B, P) -> (B,)."""
        if self.discrete:
            return entropy_from_logits(params)
        log_std = params[..., self.action_dim:]
        return (log_std + 0.5 + LOG_SQRT_2PI).sum(-1)  # Gaussian: log sigma + 1/2 log(2 pi e) per dimension

    def kl(self, old_params: torch.Tensor, new_params: torch.Tensor) -> torch.Tensor:
        """Exact KL(pi_old(.|s) || pi_new(.|s)) per state. Shapes: (B, P), (B, P) -> (B,)."""
        kl = kl_divergence(self.distribution(old_params), self.distribution(new_params))
        return kl if self.discrete else kl.sum(-1)

    @torch.inference_mode()
    def act(self, obs: torch.Tensor, deterministic: bool = False):
        """Sample (or take the mode of) pi(.|s): returns actions, log-probs (B,), values (B,).

        The rollout's hot path, so written with plain tensor ops (no Distribution objects); the
        log-probs equal `log_prob` (tested).
        """
        out, value = self._heads(obs)  # (B, A), (B,)
        if self.discrete:
            logp_all = out.log_softmax(-1)
            actions = logp_all.argmax(-1) if deterministic else torch.multinomial(logp_all.exp(), 1).squeeze(-1)
            return actions, logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1), value
        noise = torch.zeros_like(out) if deterministic else torch.randn_like(out)
        actions = out + self.log_std.exp() * noise
        logp = (-0.5 * noise.square() - self.log_std - LOG_SQRT_2PI).sum(-1)  # log N(mean + std noise; mean, std)
        return actions, logp, value

    def numpy_act(self):
        """`act` as a numpy function obs (N, ...) -> (actions, log-probs (N,), values (N,)), for the
        rollout's one-step-at-a-time calls; None where it does not apply (CNN, bf16, parameters off the CPU).

        Per step it is ~20 numpy calls (~1 us each) instead of ~25 torch dispatches and 12 nn.Module
        calls. It reads views of the parameters (see `numpy_mlp`): build it once per rollout. Samples
        come from numpy's global RNG, which checkpoints save and restore (`rlhf.runtime.save_state`),
        so resumes stay exact. Log-probs and values match `log_prob` / `value` to float32 round-off (tested).
        """
        if self.cnn or self.bf16 or next(self.parameters()).device.type != "cpu":
            return None
        actor, critic = numpy_mlp(self.actor), numpy_mlp(self.critic)
        if not self.discrete:
            log_std = self.log_std.detach().numpy()  # a view: sees the optimiser's updates

        def act(obs: np.ndarray):
            x = obs.reshape(len(obs), -1).astype(np.float32, copy=False)  # (N, obs_dim)
            out, value = actor(x), critic(x)[:, 0]  # (N, A), (N,)
            if self.discrete:  # inverse-CDF sampling from the softmax
                z = out - out.max(-1, keepdims=True)
                logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))  # (N, A)
                u = np.random.random((len(x), 1))
                actions = np.minimum((np.exp(logp_all).cumsum(-1) < u).sum(-1), self.action_dim - 1)  # (N,)
                return actions, logp_all[np.arange(len(x)), actions], value
            noise = np.random.standard_normal(out.shape).astype(np.float32)
            actions = out + np.exp(log_std) * noise  # a = mean + std * noise, unclipped
            return actions, (-0.5 * noise**2 - log_std - LOG_SQRT_2PI).sum(-1), value

        return act


LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
