"""Every rlhf stage under `accelerate launch` with 2 processes: DDP, ZeRO-2, ZeRO-3 (gloo on CPU).

One launch per setup runs sft, reward, grpo and ppo back to back (run_stages.py), each for 3
optimizer steps with a checkpoint at step 2 and then again resumed from it (the four launches and
the 1-process reference run side by side). Checked per stage and
setup: it finishes, writes a consolidated model that plain transformers loads, the resumed run
repeats the uninterrupted one (metrics and weights), and it matches one process with the same
global batch: SFT and reward exactly (same rows, same order), GRPO and PPO in what does not depend
on sampling (the greedy start evaluation, the first step's KL and ratio) and in the reward level
(each process samples its own completions, so the curves agree only statistically).

Side by side with those, SFT and GRPO on two "machines" of one process each (configs/accelerate/two_nodes.yaml,
two `accelerate launch` processes with machine ranks 0 and 1 meeting at 127.0.0.1) must equal the
1-machine 2-process ZeRO-3 run in everything.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from launching import (HERE, ROOT, check_resumed_equals_straight, comparable, free_port, launch, launch_many,
                       load_model, result, training_rows)

DRIVER = str(HERE / "run_stages.py")
# grpo_variants: run_stages.py's GRPO options; reward_logprob: `logprob_coef`, which ZeRO-3 refuses
STAGES = ["sft", "reward", "reward_logprob", "grpo", "grpo_variants", "ppo"]
SETUPS = ["ddp", "zero2", "zero3"]
TWO_NODE_STAGES = ["sft", "grpo"]  # compared with one machine under zero3 (what two_nodes.yaml uses)
TRAIN_LOSS = {"sft": "loss/sft", "reward": "loss/reward", "reward_logprob": "loss/reward", "grpo": "loss/policy",
              "grpo_variants": "loss/policy", "ppo": "loss/policy"}


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    launch_many([([DRIVER, str(root / "single"), ",".join(STAGES), "2"], None)]
                + [([DRIVER, str(root / setup), ",".join(STAGES), "1"], setup) for setup in SETUPS]
                + two_node_jobs([DRIVER, str(root / "two_nodes"), ",".join(TWO_NODE_STAGES), "1"]))
    return root


def two_node_jobs(args):
    """Two "machines" on this one: an `accelerate launch` of configs/accelerate/two_nodes.yaml per machine
    rank, one process each, meeting at 127.0.0.1 (the file's address, port and size overridden)."""
    port = str(free_port())
    return [(["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/two_nodes.yaml"),
              "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
              "--main_process_port", port, "--num_processes", "2", *args], None) for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("stage", STAGES)
def test_stage_finishes_saves_and_resumes(stage_runs, setup, stage):
    if (setup, stage) == ("zero3", "reward_logprob"):
        refused = (stage_runs / setup / f"{stage}.refused").read_text()
        assert "`logprob_coef`: is not supported under ZeRO-3" in refused
        assert not (stage_runs / setup / stage).exists()  # refused before anything was written
        return
    got = result(stage_runs, setup, stage)
    assert got["world"] == 2
    check_resumed_equals_straight(stage, got)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("setup,stage", [(setup, stage) for stage in ["sft", "reward", "reward_logprob"]
                                         for setup in SETUPS if (setup, stage) != ("zero3", "reward_logprob")])
def test_deterministic_stages_match_one_process(stage_runs, setup, stage):
    got, single = result(stage_runs, setup, stage), result(stage_runs, "single", stage)
    assert single["world"] == 1
    a, b = training_rows(got["straight"]), training_rows(single["straight"])
    key = TRAIN_LOSS[stage]
    curve, ref = [a[s][key] for s in sorted(a)], [b[s][key] for s in sorted(b)]
    assert curve == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert max(ref) - min(ref) > 1e-3  # the steps changed the model (SFT: the loss falls; 4 reward steps: noise)
    w, w_single = load_model(stage, got["model_straight"]), load_model(stage, single["model_straight"])
    for k in w_single:
        torch.testing.assert_close(w[k], w_single[k], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("stage", ["grpo", "grpo_variants", "ppo"])
def test_sampling_stages_match_one_process(stage_runs, setup, stage):
    got, single = result(stage_runs, setup, stage), result(stage_runs, "single", stage)
    start = {k: v for r in got["straight"] for k, v in r.items() if k.startswith("start/")}
    start_single = {k: v for r in single["straight"] for k, v in r.items() if k.startswith("start/")}
    assert start and start == pytest.approx(start_single, abs=1e-6)  # greedy eval of the same start model
    a, b = training_rows(got["straight"]), training_rows(single["straight"])
    # step 1: the policy is the reference and (one generation per step) the sampling policy
    assert a[1]["kl/ref"] == pytest.approx(0.0, abs=1e-6) and b[1]["kl/ref"] == pytest.approx(0.0, abs=1e-6)
    reward_key = "reward/score_mean" if stage == "ppo" else "reward/mean"
    mean = lambda rows: sum(r[reward_key] for r in rows.values()) / len(rows)  # noqa: E731
    # 3 steps x 32 completions: the mean length reward agrees to a few standard errors
    assert mean(a) == pytest.approx(mean(b), abs=0.08)
    assert all(math.isfinite(r[TRAIN_LOSS[stage]]) for r in a.values())


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", TWO_NODE_STAGES)
def test_two_nodes_match_one_node(stage_runs, stage):
    """2 machines x 1 process (two_nodes.yaml) == 1 machine x 2 processes (zero3.yaml): the same ranks
    and seeds, so the same samples and updates: every logged number (timings aside) of the straight
    and the resumed run, and the final weights (GRPO included, unlike 2 processes vs 1)."""
    got, one_node = result(stage_runs, "two_nodes", stage), result(stage_runs, "zero3", stage)
    assert got["world"] == one_node["world"] == 2
    for run in ("straight", "resumed"):
        mine, ref = [comparable(r) for r in got[run]], [comparable(r) for r in one_node[run]]
        assert [r.keys() for r in mine] == [r.keys() for r in ref] and len(training_rows(got[run])) == 3
        for i, (a, b) in enumerate(zip(mine, ref)):
            for k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (run, got[run][i]["step"], k)
    for which in ("model_straight", "model_resumed"):
        w, w_ref = load_model(stage, got[which]), load_model(stage, one_node[which])
        assert w.keys() == w_ref.keys()
        for k in w_ref:
            torch.testing.assert_close(w[k], w_ref[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_conflicting_deepspeed_config_fails_before_training(tmp_path):
    ds = json.loads((ROOT / "configs/deepspeed/zero2.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 16
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    acc_cfg = (ROOT / "configs/accelerate/zero2.yaml").read_text().replace(
        "configs/deepspeed/zero2.json", str(tmp_path / "ds.json"))
    (tmp_path / "acc.yaml").write_text(acc_cfg)
    out = tmp_path / "run"
    cmd = ["-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "acc.yaml"), "--num_processes", "2",
           "-m", "rlhf", "sft", "--per_device_train_batch_size", "8", "--max_steps", "2", "--output_dir", str(out)]
    proc = launch(cmd, config=None, expect_ok=False, timeout=300)
    assert proc.returncode != 0
    assert (f"{tmp_path / 'ds.json'}: `train_micro_batch_size_per_gpu`=16 conflicts with the stage's "
            "`per_device_train_batch_size` = 8") in proc.stderr
    assert not out.exists()  # nothing written: the check runs before the run directory is made
