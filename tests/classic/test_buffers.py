"""Replay memories: sum tree vs brute force, frame de-duplication round trip, n-step vs a loop, PER, checkpoints."""

import numpy as np
import pytest

from classic.buffers import PrioritizedReplayBuffer, ReplayBuffer, SumTree, replay_nbytes
from classic.envs import make_env


def test_sum_tree_find_matches_prefix_sums_and_sampling_frequencies():
    rng = np.random.default_rng(0)
    tree = SumTree(37)  # not a power of two
    p = rng.random(37) * (rng.random(37) > 0.2)  # some zero priorities, which must never be drawn
    tree.update(np.arange(37), p)
    tree.update(np.array([3, 3, 10]), np.array([0.0, 2.5, 0.7]))  # repeated index: the last write wins
    p[3], p[10] = 2.5, 0.7
    assert tree.total == pytest.approx(p.sum())
    mass = rng.random(20_000) * p.sum()
    brute = np.searchsorted(np.cumsum(p), mass, side="right")  # the leaf whose interval holds each mass
    np.testing.assert_array_equal(tree.find(mass), brute)
    counts = np.bincount(tree.find(rng.random(200_000) * tree.total), minlength=37)
    assert counts[p == 0].sum() == 0
    expected = 200_000 * p / p.sum()
    nz = expected > 0
    chi2 = ((counts[nz] - expected[nz]) ** 2 / expected[nz]).sum()
    assert chi2 < 80, chi2  # ~29 degrees of freedom: p < 1e-6 for a correct sampler to fail


def _fill_synthetic(buf, steps, rng):
    """Feed transitions whose observation is the step number; random episode ends. Returns the log."""
    log, t, obs = [], 0, np.array([0.0], dtype=np.float32)
    for _ in range(steps):
        t += 1
        nxt = np.array([float(t)], dtype=np.float32)
        r = float(rng.normal())
        terminated, truncated = bool(rng.random() < 0.08), bool(rng.random() < 0.04)
        buf.add(obs, int(rng.integers(3)), r, terminated, truncated and not terminated, nxt)
        log.append((obs[0], r, terminated, truncated and not terminated, nxt[0], buf.total - 2))
        obs = nxt
        if terminated or truncated:
            t += 1
            obs = np.array([float(t)], dtype=np.float32)  # a "reset": a new observation
    return log


@pytest.mark.parametrize("n_step", [1, 3])
def test_n_step_transitions_match_a_loop(n_step):
    gamma = 0.9
    buf = ReplayBuffer(150, (1,), n_step=n_step, gamma=gamma, seed=0)
    log = _fill_synthetic(buf, 400, np.random.default_rng(1))  # wraps the ring ~3 times
    slots = {entry[-1]: i for i, entry in enumerate(log)}
    live = [q for q in range(buf.oldest, buf.total) if buf.sampleable[q % buf.capacity]]
    assert len(live) > 100
    batch = buf._transitions(np.array(live), np.ones(len(live), np.float32))
    for j, q in enumerate(live):
        i = slots[q]
        g, disc, term, k = 0.0, 1.0, 0.0, 0
        while True:  # the n-step target by hand
            obs, r, te, tr, nxt, _ = log[i + k]
            g += disc * r
            disc *= gamma
            k += 1
            if te or tr or k == n_step:
                term = float(te)
                break
        assert batch.obs[j, 0] == log[i][0]
        assert batch.rewards[j] == pytest.approx(g, rel=1e-5, abs=1e-5)
        assert batch.discounts[j] == pytest.approx(disc, rel=1e-6)
        assert batch.terminated[j] == term
        assert batch.next_obs[j, 0] == nxt
    # exactly the transitions whose n-step target is known are sampleable (final-observation
    # slots and the newest, still pending transitions are not)
    for i, (_, _, te, tr, _, q) in enumerate(log):
        if q >= buf.oldest:
            ended = any(e[2] or e[3] for e in log[i: i + n_step])
            assert buf.sampleable[q % buf.capacity] == (ended or i + n_step - 1 < len(log)), (i, q)
    finals = set(range(buf.oldest, buf.total)) - {e[-1] for e in log}
    assert finals and not any(buf.sampleable[q % buf.capacity] for q in finals)


def test_atari_frames_stored_once_and_stacks_round_trip_across_episodes_and_wraparound():
    env = make_env("BreakoutNoFrameskip-v4", seed=0)  # training env: a lost life ends an episode
    buf = ReplayBuffer(300, (84, 84), np.uint8, frame_stack=4, n_step=1, seed=0)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    log, episodes = [], 0
    for _ in range(700):  # > 2 x capacity, several lost lives
        nxt, r, te, tr, _ = env.step(int(rng.integers(4)))
        buf.add(obs, 0, r, te, tr, nxt)
        log.append((obs, nxt, buf.total - 2))
        obs = nxt
        if te or tr:
            episodes += 1
            obs, _ = env.reset()
    assert episodes >= 3
    assert buf.frames.shape == (300, 84, 84)  # one frame per slot, not a stack per transition
    checked = 0
    for o, nxt, q in log:
        if q >= buf.oldest and buf.sampleable[q % buf.capacity]:
            np.testing.assert_array_equal(buf.stack(np.array([q]))[0], o)
            np.testing.assert_array_equal(buf.stack(np.array([q + 1]))[0], nxt)
            checked += 1
    assert checked > 250
    idx = buf.sample_indices(5000)
    assert idx.min() >= buf.oldest and buf.sampleable[idx % buf.capacity].all()


def test_one_million_atari_transitions_fit_in_8_gb():
    n = replay_nbytes(1_000_000, (84, 84), np.uint8, prioritized=True)
    assert 84 * 84 * 1_000_000 < n < 8e9


def test_prioritized_sampling_frequencies_and_weights():
    buf = PrioritizedReplayBuffer(64, (1,), n_step=1, alpha=0.7, eps=0.01, seed=0)
    _fill_synthetic(buf, 50, np.random.default_rng(2))
    live = np.array([q for q in range(buf.total) if buf.sampleable[q % buf.capacity]])
    td = np.random.default_rng(3).normal(size=len(live)) * 3
    buf.update_priorities(live, td)
    prio = (np.abs(td) + 0.01) ** 0.7
    probs = prio / prio.sum()
    counts = np.zeros(len(live))
    where = {q: i for i, q in enumerate(live)}
    for _ in range(400):
        batch = buf.sample(64, beta=0.5)
        for q in batch.indices:
            counts[where[q]] += 1
        expect_w = (len(live) * probs[[where[q] for q in batch.indices]]) ** -0.5
        np.testing.assert_allclose(batch.weights, expect_w / expect_w.max(), rtol=1e-5)
    expected = counts.sum() * probs
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 3 * len(live), chi2  # stratified sampling is less noisy than multinomial


def test_state_dict_round_trip_continues_identically(tmp_path):
    a = PrioritizedReplayBuffer(80, (1,), n_step=2, seed=5)
    _fill_synthetic(a, 120, np.random.default_rng(4))
    a.update_priorities(a.sample(16).indices, np.arange(16.0))
    a.save(tmp_path / "replay.npz")
    b = PrioritizedReplayBuffer(80, (1,), n_step=2, seed=999)
    b.load(tmp_path / "replay.npz")
    for x, y in zip(a.sample(32, beta=0.6), b.sample(32, beta=0.6)):
        np.testing.assert_array_equal(x, y)
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    _fill_synthetic(a, 30, rng_a)
    _fill_synthetic(b, 30, rng_b)
    np.testing.assert_array_equal(a.sample(32).obs, b.sample(32).obs)


def test_diagnostic_returns_match_a_loop_and_skip_steps_near_a_time_limit():
    buf = ReplayBuffer(300, (1,), n_step=1, gamma=0.95, seed=0)
    log = _fill_synthetic(buf, 280, np.random.default_rng(6))
    by_obs = {entry[0]: i for i, entry in enumerate(log)}
    obs, _, returns = buf.sample_diagnostic(200)
    horizon = np.log(0.01) / np.log(0.95)
    for o, g in zip(obs[:, 0], returns):
        i, want, disc = by_obs[o], 0.0, 1.0
        for k in range(i, len(log)):
            want += disc * log[k][1]
            disc *= 0.95
            if log[k][2] or log[k][3]:
                assert log[k][2] or k + 1 - i >= horizon  # truncated episodes only far from the cut
                break
        else:
            raise AssertionError("sampled a step whose episode has not ended")
        assert g == pytest.approx(want, rel=1e-4, abs=1e-4)
