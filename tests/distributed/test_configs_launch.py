"""The shipped accelerate configs used from outside the repository, as a user who installed the package.

`accelerate launch --config_file <shipped>/accelerate/zero3.yaml -m rlhf sft ...` from a directory
that is not the checkout: the accelerate config names its DeepSpeed file as
`configs/deepspeed/zero3.json` (relative to the repository root), which `rlhf` then finds in the
package (rlhf/shipped_configs.py). Before, accelerate stopped with "Expected a string path to an
existing deepspeed config". (`rlhf configs --out DIR`'s copy is checked in tests/rlhf/test_shipped_configs.py.)
"""

from __future__ import annotations

import json

import pytest

from launching import ROOT, free_port, launch
from rlhf.shipped_configs import CONFIG_DIR


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_launch_from_a_directory_outside_the_checkout(tmp_path):
    from transformers import AutoModelForCausalLM

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    assert ROOT not in cwd.resolve().parents and not (cwd / "configs").exists()
    out = cwd / "run"
    cmd = ["-m", "accelerate.commands.launch", "--config_file", str(CONFIG_DIR / "accelerate" / "zero3.yaml"),
           "--num_processes", "2", "--main_process_port", str(free_port()),
           "-m", "rlhf", "sft", "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_train_examples", "64",
           "--num_eval_prompts", "4", "--num_eval_examples", "8", "--eval_steps", "0", "--save_steps", "0",
           "--progress", "false", "--report_to", "none", "--output_dir", "run"]  # relative: to cwd
    launch(cmd, config=None, cwd=cwd, timeout=300)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss/sft" in r]
    assert [r["step"] for r in train] == [1, 2]
    # 2 steps x 4 rows x 2 processes of 64 examples: both processes took part (1 process: 0.125)
    assert train[-1]["train/epoch"] == pytest.approx(0.25)
    assert (out / "summary.json").exists()
    state = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()  # consolidated from the ZeRO-3 shards
    assert state and all(v.numel() > 0 for v in state.values())
