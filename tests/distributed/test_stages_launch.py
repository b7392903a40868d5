"""Every rlhf stage under `accelerate launch` with 2 processes: DDP, ZeRO-2, ZeRO-3 (gloo on CPU).

One launch per setup runs sft, reward, grpo and ppo back to back (run_stages.py), each for 3
optimizer steps with a checkpoint at step 2 and then again resumed from it (the four launches and
the 1-process reference run side by side). Checked per stage and
setup: it finishes, writes a consolidated model that plain transformers loads, the resumed run
repeats the uninterrupted one (metrics and weights), and it matches one process with the same
global batch: SFT and reward exactly (same rows, same order), GRPO and PPO in what does not depend
on sampling (the greedy start evaluation, the first step's KL and ratio) and in the reward level
(each process samples its own completions, so the curves agree only statistically).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from launching import HERE, launch, launch_many

DRIVER = str(HERE / "run_stages.py")
STAGES = ["sft", "reward", "grpo", "ppo"]
SETUPS = ["ddp", "zero2", "zero3"]
TRAIN_LOSS = {"sft": "loss/sft", "reward": "loss/reward", "grpo": "loss/policy", "ppo": "loss/policy"}


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    launch_many([([DRIVER, str(root / "single"), ",".join(STAGES), "2"], None)]
                + [([DRIVER, str(root / setup), ",".join(STAGES), "1"], setup) for setup in SETUPS])
    return root


def result(root, setup, stage):
    path = root / setup / stage / "result.json"
    assert path.exists(), f"{setup}/{stage} did not finish"
    return json.loads(path.read_text())


def training_rows(rows):
    return {r["step"]: r for r in rows if r["step"] > 0 and any(k.startswith("loss/") for k in r)}


def comparable(row):
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not k.startswith(("time/", "train/tokens_per_s"))
            and k not in ("completions/per_s", "step")}


def load_model(stage, path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if stage == "reward" else AutoModelForCausalLM
    return cls.from_pretrained(path).state_dict()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("stage", STAGES)
def test_stage_finishes_saves_and_resumes(stage_runs, setup, stage):
    got = result(stage_runs, setup, stage)
    assert got["world"] == 2
    straight, resumed = training_rows(got["straight"]), training_rows(got["resumed"])
    assert sorted(straight) == sorted(resumed) == [1, 2, 3]
    for step in (3,):  # redone after resuming from step 2
        a, b = comparable(straight[step]), comparable(resumed[step])
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (step, k)
    w_straight, w_resumed = load_model(stage, got["model_straight"]), load_model(stage, got["model_resumed"])
    assert w_straight.keys() == w_resumed.keys() and not any("lora" in k for k in w_straight)
    for k in w_straight:
        torch.testing.assert_close(w_resumed[k], w_straight[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("stage", ["sft", "reward"])
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
@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_sampling_stages_match_one_process(stage_runs, setup, stage):
    got, single = result(stage_runs, setup, stage), result(stage_runs, "single", stage)
    start = {k: v for r in got["straight"] for k, v in r.items() if k.startswith("start/")}
    start_single = {k: v for r in single["straight"] for k, v in r.items() if k.startswith("start/")}
    assert start and start == pytest.approx(start_single, abs=1e-6)  # greedy eval of the same start model
    a, b = training_rows(got["straight"]), training_rows(single["straight"])
    # step 1: the policy is the reference and (one generation per step) the sampling policy
    assert a[1]["kl/ref"] == pytest.approx(0.0, abs=1e-6) and b[1]["kl/ref"] == pytest.approx(0.0, abs=1e-6)
    reward_key = "reward/mean" if stage == "grpo" else "reward/score_mean"
    mean = lambda rows: sum(r[reward_key] for r in rows.values()) / len(rows)  # noqa: E731
    # 3 steps x 32 completions: the mean length reward agrees to a few standard errors
    assert mean(a) == pytest.approx(mean(b), abs=0.08)
    assert all(math.isfinite(r[TRAIN_LOSS[stage]]) for r in a.values())


@pytest.mark.slow
@pytest.mark.distributed
def test_conflicting_deepspeed_config_fails_before_training(tmp_path):
    from launching import ROOT

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
