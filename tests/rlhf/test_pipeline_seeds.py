"""scripts/pipeline_seeds.py: one pipeline run per seed, finished runs reused, spread = mean / min / max per column."""

import importlib.util
import json

import pytest
import yaml

from tests.rlhf.test_pipeline import TINY

spec = importlib.util.spec_from_file_location("pipeline_seeds",
                                              __file__.rsplit("/tests/", 1)[0] + "/scripts/pipeline_seeds.py")
pipeline_seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pipeline_seeds)


def test_spread_and_report_cells():
    assert pipeline_seeds.spread([0.5, float("nan"), 0.9, None, 0.7]) == pytest.approx((0.7, 0.5, 0.9))
    assert pipeline_seeds.spread([None]) is None
    summaries = {1: {"grpo": {"eval/accuracy": 0.96, "eval/accuracy_carry": 0.94, "eval/accuracy_no_carry": 0.98}},
                 2: {"grpo": {"eval/accuracy": 0.98, "eval/accuracy_carry": 0.97, "eval/accuracy_no_carry": 0.99}},
                 3: {"grpo": {"eval/accuracy": 0.97, "eval/accuracy_carry": 0.95, "eval/accuracy_no_carry": 1.0}}}
    text = pipeline_seeds.report(summaries, "cmd")
    grpo_row = next(line for line in text.splitlines() if line.startswith("| GRPO | 97.0"))
    assert grpo_row.startswith("| GRPO | 97.0 (96.0-98.0) | 95.3 (94.0-97.0) | 99.0 (98.0-100.0) | - |")
    assert "| 2 | - | - | - | 98.0 / 97.0 / 99.0 |" in text
    assert "\n| SFT |" not in text  # no seed ran it


@pytest.mark.slow
def test_two_seeds_reuse_finished_runs(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "stages": ["sft", "grpo"]}))
    out, md = tmp_path / "seeds", tmp_path / "seeds.md"
    argv = ["--seeds", "1,2", "--output_dir", str(out), "--out", str(md), "--", "--config", str(config)]
    pipeline_seeds.main(argv)
    first = {s: json.loads((out / f"seed_{s}" / "summary.json").read_text()) for s in (1, 2)}
    assert first[1]["grpo"]["eval/accuracy"] != first[2]["grpo"]["eval/accuracy"] or \
        (out / "seed_1" / "sft" / "model" / "model.safetensors").read_bytes() != \
        (out / "seed_2" / "sft" / "model" / "model.safetensors").read_bytes()  # the seeds differ
    text = md.read_text()
    assert "| GRPO |" in text and "| SFT |" in text and "| 1 |" in text and "| 2 |" in text
    capsys.readouterr()
    pipeline_seeds.main(argv)  # again: every stage of both seeds is done already
    assert capsys.readouterr().out.count("done already") == 4
    assert md.read_text() == text


@pytest.mark.slow
def test_reward_model_diagnostics_enter_the_summary(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "stages": ["sft", "rankings", "reward"]}))
    summary = pipeline_seeds.run_seed(1, tmp_path / "seeds", ["--config", str(config)], num_rm_prompts=8)
    for column in pipeline_seeds.RM_COLUMNS:
        assert 0.0 <= summary["reward"][column] <= 1.0, column  # shares of held-out pairs the RM orders right
