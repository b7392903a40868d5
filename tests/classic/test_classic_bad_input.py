"""Bad options of the classic commands: exit status 2, one error line naming the option, no run directory."""

import pytest
import torch

from classic.cli import main


def fails(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command", ["ppo", "dqn"])
@pytest.mark.parametrize("device, needle", [("cdua", "unknown device 'cdua'"), ("cuda", "no cuda device"),
                                            ("cuda:7", "no cuda device")])
def test_device_typos_and_missing_gpus(tmp_path, capsys, monkeypatch, command, device, needle):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    msg = fails(capsys, [command, "--device", device, "--output_dir", str(tmp_path / "run"), "--total_timesteps", "64"])
    assert "`device`" in msg and needle in msg
    assert not (tmp_path / "run").exists()


def test_device_index_beyond_the_gpus(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "has 1 cuda device(s)" in fails(capsys, ["pg", "--device", "cuda:1", "--output_dir", str(tmp_path / "run")])


@pytest.mark.parametrize("argv, needle", [(["--logging_steps", "0"], "`logging_steps`"),
                                          (["--report_to", "tensorbord"], "`report_to`: unknown logger")])
def test_shared_options(tmp_path, capsys, argv, needle):
    assert needle in fails(capsys, ["trpo", "--output_dir", str(tmp_path / "run"), *argv])
    assert not (tmp_path / "run").exists()


def test_output_dir_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    argv = ["dqn", "--output_dir", str(tmp_path / "f" / "run"), "--total_timesteps", "64"]
    assert "`output_dir`" in fails(capsys, argv)
