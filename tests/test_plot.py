"""`rlhf plot`: overlays runs from metrics.jsonl into a PNG; bad input is a clear error."""

import json

import pytest

from rlhf.cli import main as rlhf_main
from rlhf.plot import choose_keys, load_runs


def _write_run(d, rows):
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_overlays_runs(tmp_path, capsys):
    _write_run(tmp_path / "a", [{"step": s, "eval/accuracy": s / 10, "kl/ref": 0.01 * s} for s in range(1, 6)])
    _write_run(tmp_path / "b", [{"step": s, "eval/accuracy": s / 20, "note": "x"} for s in range(1, 6)])
    assert choose_keys(load_runs([tmp_path / "a", tmp_path / "b"])) == ["eval/accuracy", "kl/ref"]
    out = tmp_path / "c.png"
    rlhf_main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert "wrote" in capsys.readouterr().out


def test_plot_missing_run_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        rlhf_main(["plot", str(tmp_path / "nope")])
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_plot_unknown_key_lists_the_logged_ones(tmp_path, capsys):
    _write_run(tmp_path / "a", [{"step": 1, "eval/accuracy": 0.5, "kl/ref": 0.1}])
    with pytest.raises(SystemExit) as e:
        rlhf_main(["plot", str(tmp_path / "a"), "--keys", "eval/acuracy", "--out", str(tmp_path / "c.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no run logged eval/acuracy" in err and "eval/accuracy, kl/ref" in err
    assert not (tmp_path / "c.png").exists()


def test_plot_labels_must_match_the_runs(tmp_path, capsys):
    for name in ("a", "b"):
        _write_run(tmp_path / name, [{"step": 1, "kl/ref": 0.1}])
    with pytest.raises(SystemExit) as e:
        rlhf_main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "one",
                   "--out", str(tmp_path / "c.png")])
    assert e.value.code == 2 and "--labels: 1 labels for 2 runs" in capsys.readouterr().err
