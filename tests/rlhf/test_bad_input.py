"""Bad input through the command line: exit status 2, one `error:` line naming the culprit, no
traceback, and (where it can be checked before training) nothing written to the run directory."""

import json
import math

import pytest
import torch

from rlhf.cli import main

HERE = __file__
torch.set_num_threads(1)
QUIET = ["--progress", "false", "--report_to", "none"]
SFT_SMALL = ["--num_train_examples", "16", "--num_eval_examples", "0", "--num_eval_prompts", "0", "--max_steps", "1"]
GRPO_SMALL = ["--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "2",
              "--max_completion_length", "2", "--num_eval_prompts", "0", "--num_train_prompts", "8"]


def fails(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit status 2 and exactly one error line; return that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def test_output_dir_that_is_a_file_or_under_one(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    assert "`output_dir`" in fails(capsys, ["sft", "--output_dir", str(f), *QUIET, *SFT_SMALL])
    msg = fails(capsys, ["sft", "--output_dir", str(f / "run"), *QUIET, *SFT_SMALL])
    assert "`output_dir`" in msg and "notes.txt" in msg and "file" in msg
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("kind", ["dotted", "under_existing_dir", "empty_dir", "file", "bad_builtin"])
def test_bad_model_paths_name_the_path(tmp_path, capsys, kind):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0")
    name, needle = {
        "dotted": ("./no/such/model", "no such model directory: ./no/such/model"),
        "under_existing_dir": (str(tmp_path / "sfft"), f"no such model directory: {tmp_path / 'sfft'}"),
        "empty_dir": (str(tmp_path / "empty"), "is empty"),
        "file": (str(tmp_path / "weights.bin"), "is a file"),
        "bad_builtin": ("builtin:tinyy", "unknown built-in model"),
    }[kind]
    msg = fails(capsys,
                ["sft", "--model_name_or_path", name, "--output_dir", str(tmp_path / "run"), *QUIET, *SFT_SMALL])
    assert needle in msg
    assert not (tmp_path / "run").exists()


def test_hub_name_that_fails_to_load_names_it(monkeypatch):
    import transformers

    from rlhf.models import load_causal_lm
    from rlhf.runtime import ConfigError

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nmore lines")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ConfigError, match=r"some-org/some-model: no such local directory.*couldn't connect"):
        load_causal_lm("some-org/some-model")


def test_local_data_file_typo_is_not_a_hub_problem(tmp_path, capsys):
    msg = fails(capsys, ["sft", "--dataset_name", str(tmp_path / "dat.jsonl"), "--output_dir", str(tmp_path / "run"),
                         *QUIET, *SFT_SMALL])
    assert f"no such data file: {tmp_path / 'dat.jsonl'}" in msg and "Hub" not in msg


# ---------------------------------------------------------------------------------------------
# Options shared by every command
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, needle", [
    (["--logging_steps", "0"], "`logging_steps`: must be >= 1"),
    (["--report_to", "tensorbord"], "`report_to`: unknown logger 'tensorbord'"),
    (["--report_to", "none,tensorboard"], "`report_to`: `none` cannot be combined"),
    (["--report_to", "wandb"], "`report_to`: wandb is not installed"),
])
def test_general_options_fail_before_any_work(tmp_path, capsys, monkeypatch, argv, needle):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    assert needle in fails(capsys,
                           ["sft", "--output_dir", str(tmp_path / "run"), "--progress", "false", *SFT_SMALL, *argv])
    assert not (tmp_path / "run").exists()


def test_lora_target_modules_matching_nothing(tmp_path, capsys):
    msg = fails(capsys, ["sft", "--use_peft", "true", "--lora_target_modules", "q_proj,c_attn",
                         "--output_dir", str(tmp_path / "run"), *QUIET, *SFT_SMALL])
    assert "`lora_target_modules`: 'c_attn' matches no module" in msg and "v_proj" in msg
    assert not (tmp_path / "run").exists()
    msg = fails(capsys, ["grpo", "--use_peft", "true", "--lora_target_modules", "qproj",
                         "--output_dir", str(tmp_path / "grpo"), *QUIET, *GRPO_SMALL])
    assert "'qproj' matches no module" in msg
    assert not (tmp_path / "grpo").exists()


# ---------------------------------------------------------------------------------------------
# Reward functions and reward models
# ---------------------------------------------------------------------------------------------


def raising_reward(prompts, completions, **kwargs):
    raise KeyError("answer")


def nan_reward(prompts, completions, **kwargs):
    return [math.nan] * len(completions)


def short_reward(prompts, completions, **kwargs):
    return [1.0]


def text_reward(prompts, completions, **kwargs):
    return ["good"] * len(completions)


@pytest.mark.parametrize("fn, needle", [("raising_reward", "raised on batch 0: KeyError"),
                                        ("nan_reward", "non-finite value"),
                                        ("short_reward", "returned 1 values for 4 completions"),
                                        ("text_reward", "returned non-numbers")])
def test_reward_function_errors_exit_2_without_traceback(tmp_path, capsys, fn, needle):
    msg = fails(capsys, ["grpo", "--reward_funcs", f"{HERE}:{fn}", "--output_dir", str(tmp_path / "run"),
                         *QUIET, *GRPO_SMALL])
    assert f"`{fn}`" in msg and needle in msg


def test_a_causal_lm_is_not_a_reward_model(tmp_path, capsys, tiny_model_dir):
    msg = fails(capsys, ["ppo", "--reward_model_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "run"),
                         *QUIET, "--max_steps", "1", "--num_eval_prompts", "0"])
    assert "`reward_model_path`" in msg and "not a trained reward model" in msg and "score.weight" in msg
    assert not (tmp_path / "run").exists()
    data = _jsonl(tmp_path / "s.jsonl", [{"prompt": "1+2=", "completion": "3"}])
    msg = fails(capsys, ["reward", "score", "--model", str(tiny_model_dir), "--data", data])
    assert "`--model`" in msg and "not a trained reward model" in msg
    assert "no such model directory" in fails(capsys,
                                              ["reward", "score", "--model", str(tmp_path / "rm"), "--data", data])


def test_a_saved_reward_model_passes_the_head_check(tmp_path):
    from rlhf.models import BUILTIN_TINY, load_reward_model

    load_reward_model(BUILTIN_TINY).save_pretrained(tmp_path / "rm")
    assert load_reward_model(str(tmp_path / "rm"), trained=True).config.num_labels == 1


# ---------------------------------------------------------------------------------------------
# Data accepted silently before
# ---------------------------------------------------------------------------------------------


def test_empty_grpo_prompt_names_file_and_line(tmp_path, capsys):
    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1+2="}, {"prompt": "  "}, {"prompt": "3+4="}])
    msg = fails(capsys, ["grpo", "--dataset_name", data, "--output_dir", str(tmp_path / "run"), *QUIET, *GRPO_SMALL])
    assert "p.jsonl: line 2: empty `prompt`" in msg
    assert not (tmp_path / "run").exists()


def test_chosen_equal_to_rejected_names_the_line(tmp_path, capsys):
    data = _jsonl(tmp_path / "r.jsonl", [{"prompt": "1+2=", "chosen": "3", "rejected": "4"},
                                         {"prompt": "1+3=", "chosen": "4", "rejected": "4"}])
    msg = fails(capsys, ["reward", "--dataset_name", data, "--output_dir", str(tmp_path / "run"), *QUIET])
    assert "r.jsonl: line 2: `chosen` and `rejected` are the same response" in msg
    assert not (tmp_path / "run").exists()


def test_rankings_that_all_tie_are_an_error(tmp_path, capsys):
    data = _jsonl(tmp_path / "t.jsonl", [{"prompt": "1+2=", "completions": ["3", "4"], "ranks": [0, 0]},
                                         {"prompt": "1+3=", "completions": ["4", "5", "6"], "ranks": [1, 1, 1]}])
    msg = fails(capsys, ["reward", "--dataset_name", data, "--output_dir", str(tmp_path / "run"), *QUIET])
    assert "t.jsonl: no usable ranking" in msg and "2 with all responses tied" in msg
    assert not (tmp_path / "run").exists()


def test_type_change_on_line_3_is_blamed_on_line_3(tmp_path, capsys):
    # datasets stores the mixed column as Json, which reads the strings "3" and "4" back as numbers:
    # the row check would then blame line 1
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2=", "completion": "3"}, {"prompt": "1+3=", "completion": "4"},
                                         {"prompt": "1+4=", "completion": 5}])
    msg = fails(capsys, ["sft", "--dataset_name", data, "--output_dir", str(tmp_path / "run"), *QUIET, *SFT_SMALL])
    assert "d.jsonl: line 3: column `completion` is a number here but a string on earlier lines" in msg


# ---------------------------------------------------------------------------------------------
# One exit status for usage errors
# ---------------------------------------------------------------------------------------------


def test_pipeline_usage_errors_exit_2_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "demo"
    # a bad option of a later stage fails before the first stage trains
    assert "`learning_rate`" in fails(capsys,
                                      ["pipeline", "--output_dir", str(out), "--ppo_overrides", "{learning_rate: -1}"])
    assert "`grpo_config`: no such file" in fails(capsys,
                                                  ["pipeline", "--output_dir", str(out), "--grpo_config", "nope.yaml"])
    assert "`sft_model_path`: no such model directory" in fails(
        capsys, ["pipeline", "--output_dir", str(out), "--sft_model_path", str(tmp_path / "nope")])
    assert "run the sft stage first" in fails(capsys, ["pipeline", "--output_dir", str(out), "--stages", "ppo"])
    assert not out.exists()


@pytest.mark.parametrize("command", ["sft", "reward", "dpo", "ppo", "grpo", "pipeline"])
def test_every_stage_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "--output_dir" in capsys.readouterr().out
