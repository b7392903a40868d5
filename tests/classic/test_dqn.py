"""classic dqn: bad input errors, learning on CartPole, an Atari smoke run, exact resume after a crash."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

import rlhf.runtime as runtime
from classic import dqn
from classic.cli import main as classic_main
from rlhf.runtime import ConfigError, load_state, make_config, parse_config, read_jsonl


def _cfg(tmp_path, **over):
    base = dict(output_dir=str(tmp_path / "run"), progress=False, report_to="none")
    return make_config(dqn.Config, {**base, **over})


@pytest.mark.parametrize("argv, option, words", [
    (["--env_id", "CartPol-v1"], "env_id", "unknown environment"),
    (["--env_id", "Pendulum-v1"], "env_id", "discrete"),
    (["--n_step", "0"], "n_step", ">= 1"),
    (["--buffer_size", "16", "--batch_size", "32"], "buffer_size", "smaller than batch_size"),
    (["--dueling", "avg"], "dueling", "one of"),
    (["--end_learning_rate", "0.01", "--learning_rate", "0.001"], "end_learning_rate", "must be in"),
    (["--lr_decay_fraction", "0"], "lr_decay_fraction", "must be in"),
    (["--target_update_unit", "round"], "target_update_unit", "one of"),
])
def test_bad_input_names_the_option_before_any_work(tmp_path, argv, option, words):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=rf"`{option}`.*{words}"):
        parse_config(dqn.Config, argv + ["--output_dir", str(out)])
    assert not out.exists()


def test_cli_reports_bad_input_and_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        classic_main(["dqn", "--n_step", "0", "--output_dir", str(tmp_path / "x")])
    assert e.value.code == 2 and "`n_step`" in capsys.readouterr().err
    cfg = _cfg(tmp_path, resume_from_checkpoint=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="resume_from_checkpoint"):
        dqn.train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cartpole_learns_clearly_better_than_random(tmp_path):
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, total_timesteps=10_000, learning_rate=2.3e-3, batch_size=64, buffer_size=10_000,
               learning_starts=500, target_update_interval=10, train_frequency=64, gradient_steps=32,
               exploration_fraction=0.3, end_e=0.04, hidden_sizes=[64, 64], eval_frequency=2500, eval_episodes=5,
               double_q=True, save_buffer=False)
    summary = dqn.train(cfg)
    # a uniformly random policy averages ~22; the best evaluation must be far above it (seeds 1-8: 154-500)
    assert summary["eval/best_return_mean"] >= 100, summary
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert any("q/replay_max" in r and "q/replay_return" in r for r in rows)
    assert {"eval/return_mean", "eval/return_std", "time/sps"} <= set(summary)


@pytest.mark.slow
def test_atari_smoke_run_with_small_buffer(tmp_path):
    cfg = _cfg(tmp_path, env_id="BreakoutNoFrameskip-v4", total_timesteps=1000, buffer_size=600, batch_size=8,
               learning_starts=400, train_frequency=8, gradient_steps=1, target_update_interval=200, eval_frequency=0,
               eval_episodes=1, eval_epsilon=0.2, logging_steps=200, dueling="mean", prioritized=True, n_step=3,
               torch_threads=1)
    summary = dqn.train(cfg)
    assert summary["global_step"] == 1000 and summary["train/updates"] == 75
    assert np.isfinite(summary["eval/return_mean"]) and summary["eval/return_mean"] >= 0  # unclipped game score
    ckpt = runtime.checkpoint_dirs(tmp_path / "run")[-1]
    with np.load(ckpt / "replay.npz") as replay:
        assert replay["frames"].shape == (600, 84, 84) and replay["frames"].dtype == np.uint8
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert np.isfinite([r["loss/td"] for r in rows if "loss/td" in r]).all()


def test_learning_rate_decays_linearly_to_its_floor_then_holds(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, total_timesteps=400, learning_starts=50, buffer_size=400, batch_size=16, train_frequency=50,
               gradient_steps=1, hidden_sizes=[16], eval_frequency=0, eval_episodes=1, logging_steps=50,
               learning_rate=1e-3, end_learning_rate=1e-4, lr_decay_fraction=0.5)
    seen = []  # the optimizer's lr at each gradient step
    original_learn = dqn.learn

    def spy(cfg, nets, replay, beta):
        seen.append(nets.optimizer.param_groups[0]["lr"])
        return original_learn(cfg, nets, replay, beta)

    monkeypatch.setattr(dqn, "learn", spy)
    dqn.train(cfg)
    # rounds at steps 100, 150, ..., 400; the decay reaches 1e-4 at 0.5 * 400 = 200 steps and stays there
    reference = [1e-3 + (1e-4 - 1e-3) * min(1.0, t / 200) for t in range(100, 401, 50)]
    np.testing.assert_allclose(seen, reference, rtol=1e-12)
    logged = {r["step"]: r["train/lr"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/lr" in r}
    assert logged[100] == pytest.approx(5.5e-4) and logged[400] == pytest.approx(1e-4)
    constant = _cfg(tmp_path, learning_rate=2e-3)
    assert dqn.lr_at(constant, 0) == dqn.lr_at(constant, 10**6) == 2e-3


def test_target_update_unit_gradient_step_averages_after_every_nth_gradient_step(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, total_timesteps=300, learning_starts=50, buffer_size=300, batch_size=16, train_frequency=50,
               gradient_steps=3, hidden_sizes=[16], eval_frequency=0, eval_episodes=1, logging_steps=50,
               target_update_unit="gradient_step", target_update_interval=2, tau=0.3)
    online = []  # the online weights at the start, then after each gradient step
    original_learn = dqn.learn

    def spy(cfg, nets, replay, beta):
        if not online:
            online.append([p.detach().clone() for p in nets.online.parameters()])
        out = original_learn(cfg, nets, replay, beta)
        online.append([p.detach().clone() for p in nets.online.parameters()])
        return out

    monkeypatch.setattr(dqn, "learn", spy)
    dqn.train(cfg)
    assert len(online) == 1 + 5 * 3  # rounds at steps 100, 150, ..., 300
    reference = online[0]  # the target starts as a copy of the online net
    for n, weights in enumerate(online[1:], start=1):
        if n % 2 == 0:  # after gradient steps 2, 4, ..., 14 and at no env step
            reference = [(1 - 0.3) * t + 0.3 * w for t, w in zip(reference, weights)]
    state = load_state(runtime.checkpoint_dirs(tmp_path / "run")[-1] / "state.pt", restore_rng=False)
    for got, want in zip(state["target_net"].values(), reference):
        torch.testing.assert_close(got, want)
    assert not torch.equal(reference[0], online[-1][0])  # the average lags the online net


class _Crash(BaseException):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("over", [
    {},
    dict(bf16=True),  # a bf16 run resumes exactly in bf16, from float32 weights in the checkpoint
    dict(bf16=True, env_id="BreakoutNoFrameskip-v4", total_timesteps=800, buffer_size=800, batch_size=8,
         train_frequency=8, save_steps=300, eval_frequency=0, eval_episodes=1, eval_epsilon=0.2, torch_threads=1),
], ids=["fp32", "bf16", "bf16-cnn-channels-last"])
def test_resume_after_a_crash_continues_exactly(tmp_path, monkeypatch, over):
    torch.set_num_threads(1)
    common = dict(total_timesteps=2000, learning_starts=200, buffer_size=2000, batch_size=32, train_frequency=4,
                  gradient_steps=1, target_update_interval=100, hidden_sizes=[64, 64], learning_rate=1e-3,
                  save_steps=700, save_total_limit=5, eval_frequency=1000, eval_episodes=2, logging_steps=200,
                  double_q=True, dueling="max", prioritized=True, n_step=3, end_learning_rate=1e-4,
                  lr_decay_fraction=0.5)
    common.update(over)
    total, save_steps = common["total_timesteps"], common["save_steps"]
    straight = dqn.train(_cfg(tmp_path / "a", **common))

    original_exit = runtime.CheckpointWriter.__exit__

    def exit_then_crash(self, *exc):
        original_exit(self, *exc)
        if exc[0] is None and f"step-{total:08d}" not in self.final.name:
            raise _Crash  # like kill -9 right after the first checkpoint landed

    monkeypatch.setattr(runtime.CheckpointWriter, "__exit__", exit_then_crash)
    with pytest.raises(_Crash):
        dqn.train(_cfg(tmp_path / "b", **common))
    monkeypatch.setattr(runtime.CheckpointWriter, "__exit__", original_exit)
    first = runtime.checkpoint_dirs(tmp_path / "b" / "run")
    assert len(first) == 1 and save_steps <= int(first[0].name.split("-")[1]) < total
    resumed = dqn.train(_cfg(tmp_path / "b", **common, resume_from_checkpoint="latest"))

    a_state = load_state(runtime.checkpoint_dirs(tmp_path / "a" / "run")[-1] / "state.pt", restore_rng=False)
    b_state = load_state(runtime.checkpoint_dirs(tmp_path / "b" / "run")[-1] / "state.pt", restore_rng=False)
    for name in ("q_net", "target_net"):
        for k, v in a_state[name].items():
            assert v.dtype == torch.float32
            torch.testing.assert_close(b_state[name][k], v, rtol=0, atol=0)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time/sps"} for r in rows]  # noqa: E731
    rows_a = strip(read_jsonl(tmp_path / "a" / "run" / "metrics.jsonl"))
    rows_b = strip(read_jsonl(tmp_path / "b" / "run" / "metrics.jsonl"))
    assert rows_a == rows_b and len(rows_a) >= total // 200
    untimed = lambda summary: {k: v for k, v in summary.items() if not k.startswith("time/")}  # noqa: E731 (sps, cpu_sps)
    assert untimed(straight) == untimed(resumed)
    assert json.loads((tmp_path / "b" / "run" / "summary.json").read_text())["global_step"] == total


# ---- damaged or foreign checkpoints, and a crash in the final phase ---------------------------

TINY = dict(total_timesteps=300, learning_starts=100, buffer_size=500, batch_size=16, train_frequency=4,
            gradient_steps=1, hidden_sizes=[16], eval_frequency=0, eval_episodes=2, logging_steps=100)


@pytest.fixture(scope="module")
def finished_dqn_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dqn_run")
    dqn.train(_cfg(root, **TINY))
    return root / "run"


def _damage(run, how, tmp_path):
    ckpt = runtime.checkpoint_dirs(run)[-1]
    if how == "truncated state.pt":
        (ckpt / "state.pt").write_bytes((ckpt / "state.pt").read_bytes()[:200])
    elif how == "truncated replay.npz":
        (ckpt / "replay.npz").write_bytes((ckpt / "replay.npz").read_bytes()[:-10])
    elif how == "missing replay.npz":  # what a kill while the old code deleted a checkpoint could leave
        (ckpt / "replay.npz").unlink()
    elif how == "run directory":
        return run, {}
    elif how == "other network":
        return ckpt, dict(hidden_sizes=[32])
    elif how == "other algorithm":
        from classic import ppo

        ppo.train(make_config(ppo.Config, dict(output_dir=str(tmp_path / "ppo"), total_timesteps=64, num_envs=1,
                                               num_steps=64, num_minibatches=1, eval_episodes=0, progress=False,
                                               report_to="none")))
        return runtime.checkpoint_dirs(tmp_path / "ppo")[-1], {}
    return ckpt, {}


@pytest.mark.parametrize("how, message", [
    ("truncated state.pt", r"state.pt has 200 bytes, \d+ when it was written"),
    ("truncated replay.npz", r"replay.npz has \d+ bytes, \d+ when it was written"),
    ("missing replay.npz", r"replay.npz is missing from the checkpoint"),
    ("run directory", r"is a run directory, not a checkpoint"),
    ("other network",
     r"does not load into this run: .*size mismatch for .*torch.Size\(\[16, 4\]\).*torch.Size\(\[32, 4\]\)"),
    ("other algorithm", r"is a checkpoint of `classic ppo`, not of `classic dqn`"),
])
def test_a_bad_checkpoint_is_one_clear_error_and_changes_nothing(finished_dqn_run, tmp_path, capsys, dir_files, how,
                                                                  message):
    run = tmp_path / "run"
    shutil.copytree(finished_dqn_run, run)
    ckpt, over = _damage(run, how, tmp_path)
    capsys.readouterr()  # what _damage's own runs printed
    (run / "summary.json").unlink()  # a run cut short in its final phase
    before = dir_files(run)
    argv = ["dqn"] + [f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in {
        **TINY, "total_timesteps": 600, **over}.items()] + [
        "--output_dir", str(run), "--resume_from_checkpoint", str(ckpt), "--progress", "false", "--report_to", "none"]
    with pytest.raises(SystemExit) as e:
        classic_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert dir_files(run) == before  # config.yaml not rewritten, nothing else touched


def test_a_kill_in_the_final_phase_then_resume_gives_the_run_an_uninterrupted_one_does(tmp_path, kill_in_final_phase,
                                                                                       untimed):
    torch.set_num_threads(1)
    straight = dqn.train(_cfg(tmp_path / "a", **TINY))
    resumed = kill_in_final_phase(dqn.train, lambda **kw: _cfg(tmp_path / "b", **TINY, **kw))
    assert untimed([resumed]) == untimed([straight])
    a, b = (read_jsonl(tmp_path / d / "run" / "metrics.jsonl") for d in "ab")
    assert untimed(b) == untimed(a) and sum("eval/return_mean" in r for r in b) == 1
