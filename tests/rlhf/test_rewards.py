"""Reward functions: loading by name / module / file, weighting, and the error paths that must stop a run."""

import math

import pytest
import torch

from rlhf.rewards import RewardError, RewardFunctions, load_reward_function
from rlhf.runtime import ConfigError


def constant_reward(prompts, completions, **kwargs):
    return [0.5] * len(completions)


def raising_reward(prompts, completions, **kwargs):
    raise KeyError("answer")


def short_reward(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def nan_reward(prompts, completions, **kwargs):
    return [float("nan") if c == "bad" else 1.0 for c in completions]


def column_reward(prompts, completions, answer, **kwargs):
    return [float(c == a) for c, a in zip(completions, answer)]


HERE = __file__


def test_builtin_module_and_file_specs_load():
    from rlhf.tasks.arithmetic import exact_match_reward

    assert load_reward_function("exact_match") is exact_match_reward
    assert load_reward_function("rlhf.tasks.arithmetic:format_reward")(["1+1="], ["2"]) == [1.0]
    fn = load_reward_function(f"{HERE}:constant_reward")
    assert fn(["p"], ["c", "d"]) == [0.5, 0.5]


@pytest.mark.parametrize("spec, words", [
    ("no_such_builtin", ["no_such_builtin", "module:function"]),
    ("rlhf.tasks.arithmetic:nope", ["nope"]),
    ("not_a_module_xyz:fn", ["not_a_module_xyz"]),
    ("/nonexistent/file.py:fn", ["/nonexistent/file.py"]),
])
def test_bad_specs_are_config_errors_naming_them(spec, words):
    with pytest.raises(ConfigError) as e:
        load_reward_function(spec)
    for w in words:
        assert w in str(e.value)


def test_weighted_sum_per_function_values_and_dataset_columns():
    fns = RewardFunctions(["exact_match", "format", f"{HERE}:column_reward"], [1.0, 0.5, 2.0])
    rewards, per_function, valid = fns(["1+2=", "1+2=", "5+5="], ["3", "4", "x"], {"answer": ["3", "3", "x"]})
    assert per_function.tolist() == [[1, 1, 1], [0, 1, 0], [0, 0, 1]]
    assert rewards.tolist() == [3.5, 0.5, 2.0] and valid.all()
    m = fns.metrics(per_function)
    assert m["reward/exact_match_mean"] == pytest.approx(1 / 3)
    assert m["reward/column_reward_mean"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("name, message", [
    ("raising_reward", "raised on batch 7: KeyError"),
    ("short_reward", "returned 2 values for 3 completions on batch 7"),
    ("nan_reward", "non-finite value (nan) on batch 7 for completion 1"),
])
def test_bad_reward_functions_stop_the_run_naming_function_and_batch(name, message):
    fns = RewardFunctions([f"{HERE}:{name}"])
    with pytest.raises(RewardError) as e:
        fns(["a", "b", "c"], ["ok", "bad", "ok"], batch=7)
    assert f"`{name}`" in str(e.value) and message in str(e.value)


def test_skip_bad_rewards_counts_and_drops_the_affected_completions():
    fns = RewardFunctions([f"{HERE}:nan_reward", f"{HERE}:constant_reward"], skip_bad=True)
    rewards, _, valid = fns(["a", "b", "c"], ["ok", "bad", "ok"])
    assert valid.tolist() == [True, False, True] and fns.skipped == 1
    assert rewards.tolist() == [1.5, 1.5, 1.5]  # a finite placeholder (the mean of the valid ones); stages ignore it
    rewards, _, valid = RewardFunctions([f"{HERE}:raising_reward"], skip_bad=True)(["a"], ["x"])
    assert not valid.any() and torch.isfinite(rewards).all()


def test_reward_weights_must_match():
    with pytest.raises(ConfigError, match="reward_weights"):
        RewardFunctions(["exact_match", "format"], [1.0])
    assert not math.isnan(RewardFunctions(["format"]).weights.sum())
