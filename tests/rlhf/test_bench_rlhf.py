"""scripts/bench_rlhf.py times each training step by patching two stage functions by name: they must still
be what `train()` calls once per step, or the benchmark would time nothing (or fail after a long run)."""

import importlib.util

import pytest
import torch

from rlhf import grpo, ppo
from rlhf.runtime import make_config

spec = importlib.util.spec_from_file_location("bench_rlhf", __file__.rsplit("/tests/", 1)[0] + "/scripts/bench_rlhf.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def length_reward(prompts, completions, **kwargs):
    return [len(c) / 8 for c in completions]


QUICK = dict(max_steps=2, max_completion_length=4, num_eval_prompts=0, progress=False, report_to="none",
             reward_funcs=[f"{__file__}:length_reward"])


@pytest.mark.parametrize("stage, values", [
    (grpo, dict(per_device_train_batch_size=8, num_generations=4)),
    (ppo, dict(per_device_train_batch_size=4, num_mini_batches=1, num_ppo_epochs=1)),
])
def test_the_benchmark_times_every_step(tmp_path, stage, values):
    torch.set_num_threads(1)
    name = stage.__name__.split(".")[-1]
    cfg = make_config(stage.Config, {**QUICK, **values, "output_dir": str(tmp_path / name)})
    with bench.cpu_per_step(stage, *bench.TIMED_CALLS[name]) as steps:
        stage.train(cfg)
    assert len(steps) == 2 and all(cpu > 0 for cpu, _ in steps)


def test_a_function_train_no_longer_calls_is_an_error():
    class Stage:  # `first` is called, `last` never: the rename the benchmark must not miss
        @staticmethod
        def first():
            pass

        @staticmethod
        def last():
            pass

    with pytest.raises(RuntimeError, match="timed 0 of 1 steps"):
        with bench.cpu_per_step(Stage, "first", "last"):
            Stage.first()
