"""`rlhf dpo` under `accelerate launch` with 2 processes (DDP, ZeRO-2, ZeRO-3; gloo on CPU) equals one process with
the same global batch, and a run resumed from its step-2 checkpoint repeats the uninterrupted one.

run_stages.py trains the stage for 3 optimizer steps (checkpoint at step 2) and again resumed from step 2. DPO is
deterministic - same rankings, same order, reference log-probs precomputed in fixed batches - so the loss curve,
the metrics and the weights match one process (as SFT and reward do in test_stages_launch.py). `dpo_lora`
trains LoRA adapters with the reference computed per batch by the same model with its adapters disabled; `dpo_tr`
moves the reference towards the policy after every step (TR-DPO), so the resumed run needs it from the checkpoint;
`dpo_ld` trains on LD-DPO's per-pair log-probs (K x K reference log-probs per ranking, gathered from both processes)
with WPO's pair weights.
"""

from __future__ import annotations

import pytest
import torch

from launching import HERE, launch_many
from test_stages_launch import comparable, load_model, result, training_rows

DRIVER = str(HERE / "run_stages.py")
SETUPS = ["ddp", "zero2", "zero3"]


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    launch_many([([DRIVER, str(root / "single"), "dpo,dpo_lora,dpo_tr,dpo_ld", "2"], None)]
                + [([DRIVER, str(root / setup), "dpo,dpo_lora,dpo_tr,dpo_ld", "1"], setup) for setup in SETUPS])
    return root


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("stage", ["dpo", "dpo_lora", "dpo_tr", "dpo_ld"])  # dpo_lora: LoRA, the reference
# per batch (adapters off); dpo_tr: TR-DPO's reference, mixed with the policy after every step; dpo_ld: LD-DPO + WPO
def test_two_processes_equal_one_and_resume_exactly(dpo_runs, setup, stage):
    got, single = result(dpo_runs, setup, stage), result(dpo_runs, "single", stage)
    assert got["world"] == 2 and single["world"] == 1
    mine, ref, resumed = (training_rows(got["straight"]), training_rows(single["straight"]),
                          training_rows(got["resumed"]))
    assert sorted(mine) == sorted(ref) == sorted(resumed) == [1, 2, 3]
    for step in mine:
        a, b = comparable(mine[step]), comparable(ref[step])
        assert a.keys() == b.keys()
        for k in b:
            if step == 1 and k == "rewards/accuracies":  # the policy is the reference: each margin is float noise
                continue
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (step, k)
    a, b = comparable(mine[3]), comparable(resumed[3])
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    assert abs(ref[1]["rewards/margins"]) < 1e-5 < abs(ref[3]["rewards/margins"])  # the policy left the reference
    for summary in ("summary", "resumed_summary"):  # held-out preference accuracy and greedy accuracy
        for k in ("eval/preference_accuracy", "eval/accuracy")[:2 if stage == "dpo" else 1]:
            assert got[summary][k] == pytest.approx(single["summary"][k], abs=1e-6), (summary, k)
    w, w_single, w_resumed = (load_model("dpo", got["model_straight"]), load_model("dpo", single["model_straight"]),
                              load_model("dpo", got["model_resumed"]))
    for k in w_single:
        torch.testing.assert_close(w[k], w_single[k], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(w_resumed[k], w[k], rtol=1e-4, atol=1e-5)
