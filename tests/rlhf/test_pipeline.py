"""`rlhf pipeline`: every stage wired to the previous one, summary + report written, resume skips finished stages."""

import json

import pytest

import yaml

from rlhf import pipeline
from rlhf.runtime import ConfigError, make_config, parse_config

TINY = {
    "sft_overrides": {"num_train_examples": 256, "num_eval_prompts": 16, "num_eval_examples": 32, "eval_pass_at_k": 0,
                      "per_device_train_batch_size": 16},
    "reward_overrides": {"num_eval_prompts": 16, "per_device_train_batch_size": 8},
    "dpo_overrides": {"num_greedy_eval_prompts": 16, "per_device_train_batch_size": 8, "save_steps": 0,
                      "eval_steps": 0},
    "ppo_overrides": {"num_eval_prompts": 16, "per_device_train_batch_size": 8, "num_mini_batches": 2, "save_steps": 0,
                      "eval_steps": 0},
    "grpo_overrides": {"num_eval_prompts": 16, "per_device_train_batch_size": 16, "num_generations": 4, "save_steps": 0,
                       "eval_steps": 0},
    "num_ranking_prompts": 24, "max_steps": 2, "progress": False, "report_to": "none",
}


@pytest.mark.slow
def test_pipeline_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    # First only SFT, as if the pipeline had been stopped after its first stage.
    pipeline.train(make_config(pipeline.Config, {**TINY, "output_dir": str(out), "stages": ["sft"]}))
    sft_weights = (out / "sft" / "model" / "model.safetensors").stat().st_mtime_ns
    summary = pipeline.train(make_config(pipeline.Config, {**TINY, "output_dir": str(out)}))
    assert "sft: done already" in capsys.readouterr().out
    assert (out / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == sft_weights  # not retrained

    for stage in ("sft", "reward", "dpo", "ppo", "grpo"):
        assert (out / stage / "model" / "config.json").is_file(), stage
    rows = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(len(r["completions"]) == 8 == len(r["ranks"]) for r in rows)
    assert all(len(set(r["completions"])) == 8 and all(r["completions"]) for r in rows)

    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for stage in ("sft", "ppo", "grpo"):
        assert {"eval/accuracy", "eval/reward_mean", "kl/ref", "time/wall_s"} <= set(summary[stage])
    assert {"eval/accuracy", "eval/preference_accuracy", "time/wall_s"} <= set(summary["dpo"])
    assert "eval/accuracy" in summary["reward"] and summary["rankings"]["rankings/k"] == 8
    report = (out / "report.md").read_text()
    assert "| SFT |" in report and "| DPO |" in report and "| PPO |" in report and "| GRPO |" in report
    for png in ("ppo_curves.png", "grpo_curves.png", "reward_curves.png", "dpo_curves.png"):
        assert f"]({png})" in report and (out / png).read_bytes()[:4] == b"\x89PNG"


def test_pipeline_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="`stages`: unknown stage"):
        make_config(pipeline.Config, {"stages": ["sft", "kto"]})
    with pytest.raises(ConfigError, match="`completions_per_prompt`"):
        parse_config(pipeline.Config, ["--completions_per_prompt", "1"])
    cfg = make_config(pipeline.Config, {**TINY, "output_dir": str(tmp_path), "stages": ["ppo"]})
    with pytest.raises(ConfigError, match="no model at .*sft_model_path"):
        pipeline.train(cfg)


def test_report_names_the_dpo_losses(tmp_path):
    for stage, accuracy in (("sft", 0.5), ("dpo", 0.75)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "summary.json").write_text(json.dumps({"eval/accuracy": accuracy}))
    assert "| DPO | 0.750 |" in pipeline.format_table(pipeline.build_summary(tmp_path, {}))  # no config: DPO's own
    (tmp_path / "dpo" / "config.yaml").write_text(yaml.safe_dump({"loss_type": ["sigmoid"], "rpo_alpha": 0.0}))
    assert "| DPO | 0.750 |" in pipeline.format_table(pipeline.build_summary(tmp_path, {}))
    (tmp_path / "dpo" / "config.yaml").write_text(yaml.safe_dump({"loss_type": ["ipo", "bco_pair"], "rpo_alpha": 1.0}))
    table = pipeline.format_table(pipeline.build_summary(tmp_path, {}))
    assert "| SFT | 0.500 |" in table and "| DPO (ipo + bco_pair + sft) | 0.750 |" in table
