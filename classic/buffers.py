"""Replay memories for DQN: each observation stored once, n-step returns, prioritised sampling.

`ReplayBuffer` keeps a ring of *slots*. A slot holds one observation — for Atari the newest
84x84 uint8 frame of the stack, for classic control the whole vector — plus the transition taken
from it (action, reward, terminated). The next observation of slot q is slot q+1: when an
episode ends, its final observation gets a slot of its own that is never sampled as a transition
(so truncated episodes can still bootstrap from it). A frame stack is rebuilt from the k newest
frames up to the slot, repeating the episode's first frame before the episode start — exactly
what `FrameStackObservation(k, padding_type="reset")` returns. One 1M-slot Atari memory is
~7.1 GB (`replay_nbytes`); storing stacked obs and next_obs as many peers do takes 56 GB.

Slots are addressed by absolute indices (0, 1, 2, ... ever written); slot a lives at a % capacity.
A slot is *sampleable* once its n-step target is known (n later slots written, or the episode has
ended) and while every frame its stack needs is still in the ring.

`PrioritizedReplayBuffer` (Schaul et al. 2016): P(i) = p_i^alpha / sum_k p_k^alpha with
p_i = |delta_i| + eps, stored in a `SumTree` (O(log n) update and prefix-sum sampling, both
vectorised over a batch); importance weights w_i = (N P(i))^-beta / max_j w_j.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from rlhf.core import discounted_returns

_NEVER = np.iinfo(np.int64).max // 2  # `end` of a slot whose episode has not ended yet


class Batch(NamedTuple):
    obs: np.ndarray  # (B, *obs_shape)
    actions: np.ndarray  # (B,) int64
    rewards: np.ndarray  # (B,) float32, n-step discounted sum
    next_obs: np.ndarray  # (B, *obs_shape), the observation n steps later (or the episode's last)
    terminated: np.ndarray  # (B,) float32, 1 if the episode terminated within the n steps
    discounts: np.ndarray  # (B,) float32, gamma ** (steps actually taken)
    indices: np.ndarray  # (B,) int64 absolute slot indices, for priority updates
    weights: np.ndarray  # (B,) float32 importance weights (ones for uniform replay)


def replay_nbytes(capacity: int, frame_shape=(84, 84), frame_dtype=np.uint8, prioritized: bool = False) -> int:
    """Bytes a replay memory of `capacity` slots allocates (measured on the arrays, not estimated)."""
    cls = PrioritizedReplayBuffer if prioritized else ReplayBuffer
    buf = cls(capacity, frame_shape, frame_dtype, frame_stack=4 if len(frame_shape) == 2 else 1)
    return buf.nbytes  # np.zeros is lazily backed by the OS, so this does not touch 7 GB


class ReplayBuffer:
    """Uniform replay over a ring of single observations; see the module docstring."""

    def __init__(self, capacity: int, frame_shape, frame_dtype=np.float32, frame_stack: int = 1, n_step: int = 1,
                 gamma: float = 0.99, seed: int = 0):
        if capacity < n_step + frame_stack + 1:
            raise ValueError(f"replay capacity {capacity} too small for n_step={n_step}, frame_stack={frame_stack}")
        self.capacity, self.k, self.n, self.gamma = int(capacity), int(frame_stack), int(n_step), float(gamma)
        self.frame_shape = tuple(frame_shape)
        cap = self.capacity
        self.frames = np.zeros((cap, *self.frame_shape), dtype=frame_dtype)
        self.actions = np.zeros(cap, dtype=np.int64)
        self.rewards = np.zeros(cap, dtype=np.float32)
        self.terminated = np.zeros(cap, dtype=bool)
        self.sampleable = np.zeros(cap, dtype=bool)
        self.first = np.zeros(cap, dtype=np.int64)  # absolute index of the slot's episode start
        self.end = np.full(cap, _NEVER, dtype=np.int64)  # absolute index of the episode's final slot
        self.total = 0  # slots ever written
        self.num_sampleable = 0
        self.episode_open = False
        self.episode_first = 0
        self.rng = np.random.default_rng(seed)
        # a truncated episode's return-to-go is only trusted this far from its cut (gamma^h < 1%)
        self.mc_horizon = math.ceil(math.log(0.01) / math.log(gamma)) if gamma < 1 else _NEVER

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))

    def __len__(self) -> int:
        return self.num_sampleable

    @property
    def oldest(self) -> int:
        return max(0, self.total - self.capacity)

    # -- writing -------------------------------------------------------------------------------
    def add(self, obs, action: int, reward: float, terminated: bool, truncated: bool, next_obs) -> None:
        """Store one env step. `obs`/`next_obs` as the env returns them (a stack of k frames if k > 1)."""
        if not self.episode_open:
            self.episode_first = self.total
            self._write_slot(obs)
        q = self.total - 1  # the slot holding `obs`
        p = q % self.capacity
        self.actions[p], self.rewards[p], self.terminated[p] = action, reward, terminated
        self._write_slot(next_obs)
        if terminated or truncated:
            self._end_episode(final=q + 1, terminated=bool(terminated))
        else:
            self.episode_open = True
            ready = q + 1 - self.n  # that slot's n-step target is now known
            if ready >= self.episode_first and max(ready - self.k + 1, self.episode_first) >= self.oldest:
                self._set_one(ready % self.capacity, True)

    def _write_slot(self, obs) -> None:
        a, cap = self.total, self.capacity
        if a >= cap:  # evict slot a - cap, and stacks that still reach back into it
            gone = a - cap
            for q in range(gone, min(gone + self.k, a)):
                if max(q - self.k + 1, int(self.first[q % cap])) <= gone:
                    self._set_one(q % cap, False)
        p = a % cap
        self.frames[p] = obs[-1] if self.k > 1 else obs
        self.first[p], self.end[p], self.terminated[p], self.rewards[p] = self.episode_first, _NEVER, False, 0.0
        self.total += 1

    def _end_episode(self, final: int, terminated: bool) -> None:
        self.episode_open = False
        live = np.arange(max(self.episode_first, self.oldest), final + 1)  # the episode's slots still stored
        pos = live % self.capacity
        self.end[pos] = final
        steps = live[:-1]  # transitions (the final slot only holds the last observation)
        self._mark(steps[steps > final - 1 - self.n], ready=True)

    def _mark(self, idx: np.ndarray, ready: bool) -> None:
        """Set slots (absolute `idx`) sampleable or not; ignores indices outside the live window."""
        idx = idx[(idx >= self.oldest) & (idx < self.total)]
        if ready:  # also needs its stack frames in the ring
            idx = idx[np.maximum(idx - self.k + 1, self.first[idx % self.capacity]) >= self.oldest]
        pos = idx % self.capacity
        pos = pos[self.sampleable[pos] != ready]
        self.sampleable[pos] = ready
        self.num_sampleable += len(pos) if ready else -len(pos)
        self._set_priority(pos, ready)

    def _set_one(self, pos: int, ready: bool) -> None:
        """`_mark` for one ring position (the per-step path, without numpy overhead)."""
        if self.sampleable[pos] != ready:
            self.sampleable[pos] = ready
            self.num_sampleable += 1 if ready else -1
            self._set_priority(np.array([pos]), ready)

    def _set_priority(self, pos: np.ndarray, ready: bool) -> None:
        pass  # prioritised replay keeps its sum tree in step

    # -- reading -------------------------------------------------------------------------------
    def stack(self, idx: np.ndarray) -> np.ndarray:
        """Observations of absolute slots `idx` as the env returned them: (B, k, H, W) or (B, *shape)."""
        if self.k == 1:
            return self.frames[idx % self.capacity]
        first = self.first[idx % self.capacity]
        src = np.maximum(idx[:, None] + np.arange(1 - self.k, 1), first[:, None])  # (B, k)
        return self.frames[src % self.capacity]

    def _transitions(self, idx: np.ndarray, weights: np.ndarray) -> Batch:
        """n-step transitions from absolute slots `idx` (all sampleable)."""
        pos = idx % self.capacity
        if self.n == 1:  # one-step targets (the common case): the same numbers without the (B, n) reward window
            return Batch(obs=self.stack(idx), actions=self.actions[pos], rewards=self.rewards[pos],
                         next_obs=self.stack(idx + 1), terminated=self.terminated[pos].astype(np.float32),
                         discounts=np.full(len(idx), self.gamma, dtype=np.float32), indices=idx, weights=weights)
        steps = np.minimum(self.n, self.end[pos] - idx)  # (B,) transitions before the episode ends
        k = np.arange(self.n)
        valid = k[None, :] < steps[:, None]  # (B, n)
        r = self.rewards[(idx[:, None] + k) % self.capacity] * valid  # (B, n)
        rewards = (r * self.gamma ** k).sum(1).astype(np.float32)
        last = idx + steps - 1
        return Batch(
            obs=self.stack(idx),
            actions=self.actions[pos],
            rewards=rewards,
            next_obs=self.stack(idx + steps),
            terminated=self.terminated[last % self.capacity].astype(np.float32),
            discounts=(self.gamma ** steps).astype(np.float32),
            indices=idx,
            weights=weights,
        )

    def sample_indices(self, batch_size: int) -> np.ndarray:
        """Uniform over sampleable slots (rejection on the few that are not)."""
        if self.num_sampleable == 0:
            raise RuntimeError("replay memory has no complete transition to sample yet")
        idx = self.rng.integers(self.oldest, self.total, size=batch_size)
        bad = ~self.sampleable[idx % self.capacity]
        while bad.any():
            idx[bad] = self.rng.integers(self.oldest, self.total, size=int(bad.sum()))
            bad = ~self.sampleable[idx % self.capacity]
        return idx

    def sample(self, batch_size: int, beta: float = 1.0) -> Batch:
        return self._transitions(self.sample_indices(batch_size), np.ones(batch_size, dtype=np.float32))

    def sample_diagnostic(self, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(obs, actions, discounted return-to-go) of stored steps whose episode has ended, or None.

        The return-to-go is what the behaviour policy actually obtained from that state. Steps of an
        episode cut by a time limit count only if the cut is far enough away (gamma^h < 1%).
        """
        live = np.arange(self.oldest, self.total)
        pos = live % self.capacity
        end = self.end[pos]
        ended = self.sampleable[pos] & (end < _NEVER)
        terminated = self.terminated[(np.minimum(end, self.total) - 1) % self.capacity]
        ok = live[ended & (terminated | (end - live >= self.mc_horizon))]
        if len(ok) == 0:
            return None
        idx = ok[self.rng.integers(0, len(ok), size=min(batch_size, len(ok)))]
        steps = self.end[idx % self.capacity] - idx  # (B,) transitions left in each episode
        t = np.arange(steps.max())[:, None]  # (T, 1)
        rewards = self.rewards[(idx[None, :] + t) % self.capacity] * (t < steps[None, :])  # (T, B)
        returns = discounted_returns(torch.from_numpy(rewards), torch.from_numpy(t == steps[None, :] - 1), self.gamma)
        return self.stack(idx), self.actions[idx % self.capacity], returns[0].numpy()

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        pass  # uniform replay ignores them

    # -- checkpointing -------------------------------------------------------------------------
    _ARRAYS = ("frames", "actions", "rewards", "terminated", "sampleable", "first", "end")

    def state_dict(self) -> dict:
        used = min(self.total, self.capacity)
        state = {name: getattr(self, name)[:used] for name in self._ARRAYS}
        state["scalars"] = np.array([self.total, self.num_sampleable, int(self.episode_open), self.episode_first])
        state["rng"] = np.frombuffer(repr(self.rng.bit_generator.state).encode(), dtype=np.uint8)
        return state

    def load_state_dict(self, state: dict) -> None:
        for name in self._ARRAYS:
            arr = np.asarray(state[name])
            if arr.shape[1:] != getattr(self, name).shape[1:] or len(arr) > self.capacity:
                raise ValueError(f"replay checkpoint field {name} has shape {arr.shape}, expected "
                                 f"(<= {self.capacity}, *{getattr(self, name).shape[1:]})")
            getattr(self, name)[: len(arr)] = arr
        self.total, self.num_sampleable, episode_open, self.episode_first = (int(x) for x in state["scalars"])
        self.episode_open = bool(episode_open)
        self.rng.bit_generator.state = ast.literal_eval(bytes(np.asarray(state["rng"])).decode())

    def save(self, path: str | Path) -> None:
        np.savez(path, **self.state_dict())

    def load(self, path: str | Path) -> None:
        with np.load(path, allow_pickle=False) as data:
            self.load_state_dict({k: data[k] for k in data.files})


class SumTree:
    """Binary tree of non-negative priorities whose inner nodes hold the sums of their children.

    Leaves are `capacity` slots; `update` and `find` are O(log n) per item and vectorised over a batch.
    """

    def __init__(self, capacity: int):
        self.size = 1 << max(1, math.ceil(math.log2(capacity)))  # leaves (a power of two)
        self.tree = np.zeros(2 * self.size, dtype=np.float64)  # node i has children 2i, 2i+1; root is 1

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def update(self, pos: np.ndarray, priorities: np.ndarray) -> None:
        node = np.asarray(pos, dtype=np.int64) + self.size
        self.tree[node] = priorities
        node = np.unique(node // 2)
        while node[0] >= 1:
            self.tree[node] = self.tree[2 * node] + self.tree[2 * node + 1]
            if node[0] == 1:
                break
            node = np.unique(node // 2)

    def get(self, pos: np.ndarray) -> np.ndarray:
        return self.tree[np.asarray(pos) + self.size]

    def find(self, mass: np.ndarray) -> np.ndarray:
        """Leaf positions whose prefix-sum interval contains each `mass` in [0, total)."""
        mass = np.array(mass, dtype=np.float64)
        node = np.ones(len(mass), dtype=np.int64)
        while node[0] < self.size:
            left = 2 * node
            go_right = mass >= self.tree[left]
            mass -= np.where(go_right, self.tree[left], 0.0)
            node = left + go_right
        return node - self.size


class PrioritizedReplayBuffer(ReplayBuffer):
    """Proportional prioritised replay (Schaul et al. 2016, Alg. 1) on top of `ReplayBuffer`."""

    def __init__(self, *args, alpha: float = 0.6, eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha, self.eps = float(alpha), float(eps)
        self.tree = SumTree(self.capacity)
        self.max_priority = 1.0  # new transitions get the largest priority seen, so each is replayed soon

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.tree.tree.nbytes

    def _set_priority(self, pos: np.ndarray, ready: bool) -> None:
        if len(pos):
            self.tree.update(pos, np.full(len(pos), self.max_priority**self.alpha if ready else 0.0))

    def sample_indices(self, batch_size: int) -> np.ndarray:
        raise NotImplementedError("use sample(); prioritised indices come with their weights")

    def sample(self, batch_size: int, beta: float = 0.4) -> Batch:
        if self.num_sampleable == 0:
            raise RuntimeError("replay memory has no complete transition to sample yet")
        total = self.tree.total
        # stratified: one draw from each of batch_size equal slices of the priority mass
        mass = (np.arange(batch_size) + self.rng.random(batch_size)) * (total / batch_size)
        pos = self.tree.find(np.minimum(mass, np.nextafter(total, 0)))
        bad = self.tree.get(pos) <= 0  # float round-off can land on an empty leaf; redraw those
        while bad.any():
            pos[bad] = self.tree.find(self.rng.random(int(bad.sum())) * total)
            bad = self.tree.get(pos) <= 0
        probs = self.tree.get(pos) / total
        weights = (self.num_sampleable * probs) ** (-beta)
        weights = (weights / weights.max()).astype(np.float32)
        idx = pos + self.capacity * ((self.total - 1 - pos) // self.capacity)  # newest write of each position
        return self._transitions(idx.astype(np.int64), weights)

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        pos = indices % self.capacity
        keep = self.sampleable[pos]  # skip slots evicted since they were sampled
        p = np.abs(np.asarray(td_errors, dtype=np.float64))[keep] + self.eps
        if len(p):
            self.max_priority = max(self.max_priority, float(p.max()))
            self.tree.update(pos[keep], p**self.alpha)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["tree"] = self.tree.tree
        state["max_priority"] = np.array(self.max_priority)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.tree.tree[:] = state["tree"]
        self.max_priority = float(state["max_priority"])


if __name__ == "__main__":  # python -m classic.buffers: memory of a 1M-transition Atari replay
    for per in (False, True):
        n = replay_nbytes(1_000_000, (84, 84), np.uint8, prioritized=per)
        print(f"1M Atari transitions, {'prioritised' if per else 'uniform'} replay: {n:,} bytes = {n / 1e9:.2f} GB "
              f"({n / 2**30:.2f} GiB); stacked obs + next_obs would take {2 * 4 * 84 * 84 * 1_000_000 / 1e9:.1f} GB")
