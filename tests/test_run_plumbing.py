"""The run plumbing below the fence (identical in every file, see test_shared_sections.py), tested once
through sac.py: resume, signals, checkpoints, evaluation schedule, fine-tuning, user envs, warnings."""

import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import COUNTING_TERMINATE_AT, COUNTING_TIME_LIMIT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import sac

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_args(log_dir: str, **overrides) -> sac.Args:
    base = dict(env="Pendulum-v1", total_steps=300, learning_starts=100, batch_size=32, hidden_sizes=(32, 32))
    base.update(log_every=100, eval_every=200, eval_episodes=1, checkpoint_every=200, log_dir=log_dir)
    return sac.Args(**{**base, **overrides})


def scalars(run_dir: str, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def one_line_error(code: int, capsys) -> str:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_episode_statistics_count_every_step_with_same_step_autoreset(log_dir):
    """gymnasium's RecordEpisodeStatistics under SAME_STEP autoreset: on the counting env (reward 1 per step)
    the logged returns and lengths are exactly the episodes' lengths, alternating time limit and termination."""
    out = sac.train(small_args(log_dir, env="tests/Counting-v0", total_steps=60, learning_starts=100, eval_every=0))
    returns, lengths = scalars(out["run_dir"], "charts/episodic_return"), scalars(out["run_dir"], "charts/episodic_length")
    expected, step = [], 0
    for episode in range(len(returns)):
        length = COUNTING_TIME_LIMIT if episode % 2 == 0 else COUNTING_TERMINATE_AT
        step += length
        expected.append((step, float(length)))
    assert len(returns) >= 8 and returns == expected and lengths == expected


def test_resume_of_a_model_file_is_one_line_and_writes_nothing(log_dir, capsys):
    out = sac.train(small_args(log_dir, total_steps=150, eval_every=0))
    before = sorted(os.listdir(out["run_dir"]))
    line = one_line_error(sac.main(["--resume", os.path.join(out["run_dir"], "model.pt")]), capsys)
    assert "model.pt holds no training state" in line and "--checkpoint" in line
    assert sorted(os.listdir(out["run_dir"])) == before  # no stray event file


def test_resume_file_grows_with_the_stored_transitions_not_the_capacity(log_dir):
    """Pendulum rows are 3 + 1 + 1 + 3 + 1 float32 = 36 bytes: 200 more stored rows add about 7.2 kB, and a
    1M-row buffer holding 150 rows saves a file far smaller than its 36 MB of storage."""
    sizes = {}
    for steps in (150, 350):
        out = sac.train(small_args(log_dir, total_steps=steps, eval_every=0, buffer_size=1_000_000))
        sizes[steps] = os.path.getsize(os.path.join(out["run_dir"], "resume.pt"))
    assert sizes[150] < 200_000
    assert abs(sizes[350] - sizes[150] - 200 * 36) <= 400  # torch.save aligns each record to 64 bytes


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_resume_and_resume_continues_from_that_step(log_dir, sig):
    """A real signal to a training process: resume.pt is written, one line on stderr, exit 128 + signal, no
    traceback; --resume continues from exactly the step the line names."""
    cmd = [sys.executable, "sac.py", "--env", "Pendulum-v1", "--total-steps", "1000000", "--learning-starts", "100"]
    cmd += ["--batch-size", "16", "--hidden-sizes", "16", "--log-every", "50", "--eval-every", "0"]
    cmd += ["--checkpoint-every", "0", "--log-dir", log_dir]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 200"):  # training and updating
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith(f"{signal.Signals(sig).name}: stopped at step")
    step = int(lines[0].split("stopped at step ")[1].split(";")[0])
    path = lines[0].split("--resume ")[1]
    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] == step >= 200 and saved["train"]["num_updates"] == step - 99
    assert sac.main(["--resume", path, "--total-steps", str(step + 30), "--checkpoint-every", "1000"]) == 0
    resumed = torch.load(path, weights_only=True)
    assert resumed["global_step"] == step + 30 and resumed["train"]["num_updates"] == step + 30 - 99


def test_final_evaluation_runs_once_when_the_budget_is_a_multiple_of_eval_every(log_dir):
    out = sac.train(small_args(log_dir, total_steps=300, eval_every=100))
    assert [step for step, _ in scalars(out["run_dir"], "charts/eval_return")] == [100, 200, 300]


def test_checkpoint_without_eval_only_fine_tunes_from_its_weights(log_dir, capsys):
    """--checkpoint alone trains on from the saved weights (said on stdout): with no update in the new run
    (learning starts after its budget) its model.pt holds exactly the loaded weights."""
    first = sac.train(small_args(log_dir, total_steps=200, eval_every=0))
    model = os.path.join(first["run_dir"], "model.pt")
    capsys.readouterr()
    assert sac.main(["--checkpoint", model, "--total-steps", "50", "--learning-starts", "1000", "--log-dir", log_dir]) == 0
    assert f"fine-tuning {model}" in capsys.readouterr().out
    runs = sorted(glob.glob(os.path.join(log_dir, "Pendulum-v1__sac__*")))
    tuned = [r for r in runs if r != first["run_dir"]]
    assert len(tuned) == 1
    before, after = (torch.load(p, weights_only=True)["state"] for p in (model, os.path.join(tuned[0], "model.pt")))
    for name in ("actor", "critic", "critic_target"):
        for k, v in before[name].items():
            assert torch.equal(after[name][k], v)
    fresh = sac.Actor(3, sac.make_env("Pendulum-v1").action_space, (32, 32), "relu", False)
    assert not torch.equal(fresh.state_dict()["head.weight"], before["actor"]["head.weight"])


def test_resume_with_a_new_budget_records_it_in_args_json(log_dir):
    first = sac.train(small_args(log_dir, total_steps=150, eval_every=0))
    assert sac.main(["--resume", os.path.join(first["run_dir"], "resume.pt"), "--total-steps", "180"]) == 0
    with open(os.path.join(first["run_dir"], "args.json")) as f:
        assert json.load(f)["total_steps"] == 180


def test_a_resumed_run_keeps_the_uninterrupted_schedule(log_dir):
    """Stopped at step 150, a run resumes evaluating, logging and saving at the multiples of each period, as one that
    was never stopped (before, the schedule restarted from the resume step: evaluations at 250, 350)."""
    first = sac.train(small_args(log_dir, total_steps=150, eval_every=100, log_every=40, checkpoint_every=100))
    assert sac.main(["--resume", os.path.join(first["run_dir"], "resume.pt"), "--total-steps", "350"]) == 0
    assert [step for step, _ in scalars(first["run_dir"], "charts/eval_return")] == [100, 150, 200, 300, 350]
    assert [step for step, _ in scalars(first["run_dir"], "charts/SPS")] == [40, 80, 120, 150, 160, 200, 240, 280, 320, 350]


def test_log_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "a_file"
    path.write_text("x")
    line = one_line_error(sac.main(["--env", "Pendulum-v1", "--log-dir", str(path)]), capsys)
    assert str(path) in line and "not a directory" in line


def test_truncated_or_foreign_checkpoints_are_one_line_naming_the_file(log_dir, tmp_path, capsys):
    out = sac.train(small_args(log_dir, total_steps=150, eval_every=0))
    with open(os.path.join(out["run_dir"], "model.pt"), "rb") as f:
        data = f.read()
    truncated, text, tensor = tmp_path / "truncated.pt", tmp_path / "notes.pt", tmp_path / "tensor.pt"
    truncated.write_bytes(data[: len(data) // 2])
    text.write_text("hello")
    torch.save(torch.zeros(3), tensor)
    for path, problem in ((truncated, "truncated, corrupted"), (text, "truncated, corrupted"), (tensor, "not a checkpoint")):
        line = one_line_error(sac.main(["--checkpoint", str(path), "--eval-only"]), capsys)
        assert str(path) in line and problem in line


def test_checkpoint_of_other_network_sizes_is_one_line(log_dir, capsys):
    out = sac.train(small_args(log_dir, total_steps=150, eval_every=0))
    model = os.path.join(out["run_dir"], "model.pt")
    line = one_line_error(sac.main(["--checkpoint", model, "--eval-only", "--hidden-sizes", "8"]), capsys)
    assert model in line and "does not fit" in line


def test_a_users_env_by_module_colon_id(tmp_path, log_dir, monkeypatch, capsys):
    """--env my_envs:Drift-v0 imports my_envs, which registers the env, and trains on it; a module that does
    not import is one line."""
    (tmp_path / "my_envs.py").write_text(
        "import gymnasium as gym\n"
        "import numpy as np\n\n\n"
        "class Drift(gym.Env):\n"
        "    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)\n"
        "    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)\n\n"
        "    def reset(self, *, seed=None, options=None):\n"
        "        super().reset(seed=seed)\n"
        "        self.x = np.zeros(2, np.float32)\n"
        "        return self.x, {}\n\n"
        "    def step(self, action):\n"
        "        self.x = self.x + np.array([action[0], 1.0], np.float32)\n"
        "        return self.x, -abs(float(self.x[0])), False, False, {}\n\n\n"
        "gym.register('Drift-v0', entry_point=Drift, max_episode_steps=20)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["--env", "my_envs:Drift-v0", "--total-steps", "60", "--learning-starts", "20", "--batch-size", "8"]
    assert sac.main([*argv, "--hidden-sizes", "8", "--eval-episodes", "1", "--log-dir", log_dir]) == 0
    assert glob.glob(os.path.join(log_dir, "my_envs:Drift-v0__sac__1__*", "model.pt"))
    line = one_line_error(sac.main(["--env", "no_such_module_here:Drift-v0", "--log-dir", log_dir]), capsys)
    assert "cannot import no_such_module_here" in line


def test_a_normal_mujoco_run_prints_nothing_on_stderr(log_dir):
    """HalfCheetah-v5's model file uses an attribute mujoco 4 deprecates; a run shows no warning for it."""
    cmd = [sys.executable, "sac.py", "--env", "HalfCheetah-v5", "--total-steps", "20", "--learning-starts", "100"]
    cmd += ["--eval-episodes", "1", "--hidden-sizes", "8", "--log-dir", log_dir]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.splitlines()[-1].startswith("done: step 20")


def test_a_second_signal_stops_at_once(log_dir):
    """The first SIGINT asks to stop after the step; a second one, sent while that step still runs (here the
    handler is called twice in a row), stops at once with KeyboardInterrupt, which `main` reports in one line."""
    run = sac.Run(small_args(log_dir), None, model={}, train_state={}, act=None)
    run.on_signal(signal.SIGINT, None)
    assert run.stop_signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        run.on_signal(signal.SIGINT, None)
