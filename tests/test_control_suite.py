"""The DeepMind Control Suite through shimmy's `dm_control/<domain>-<task>-v0` ids, in every file that takes a
continuous action space: the flattened observation's order, the 1000-step limit as a truncation (bootstrap, never
a termination), and a short end-to-end run of each file (train, evaluate, save, load back)."""

import importlib
import os

import gymnasium as gym
import numpy as np
import pytest
import torch

import sac

CARTPOLE = "dm_control/cartpole-swingup-v0"
FINGER = "dm_control/finger-turn_hard-v0"


def task_observation(env: gym.Env) -> dict:
    """The suite task's own observation of the env's current physics, without any wrapper."""
    control = env.unwrapped._env  # dm_control's control.Environment under shimmy's wrapper
    return control.task.get_observation(control.physics)


def test_flattened_observation_is_the_sorted_keys_values_concatenated():
    env = sac.make_env(FINGER)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        raw = task_observation(env)
        assert list(raw) == ["position", "velocity", "touch", "target_position", "dist_to_target"]  # the task's order
        expect = np.concatenate([np.ravel(raw[key]) for key in sorted(raw)])  # dist_to_target, position, target_, ...
        assert obs.shape == (12,) and obs.dtype == np.float64
        np.testing.assert_array_equal(obs, expect)
        obs, *_ = env.step(rng.uniform(-1.0, 1.0, 2))
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (2,), np.float64)


def test_episodes_end_by_the_time_limit_as_a_truncation_with_the_true_last_observation():
    envs = sac.make_vec_env(CARTPOLE, 1)
    envs.reset(seed=0)
    task_env = envs.unwrapped.envs[0]
    rewards, rng = [], np.random.default_rng(1)
    for t in range(1, 1001):
        next_obs, reward, terminated, truncated, infos = envs.step(rng.uniform(-1.0, 1.0, (1, 1)))
        rewards.append(reward[0])
        assert not terminated[0] and truncated[0] == (t == 1000)
        assert 0.0 <= reward[0] <= 1.0  # the suite's rewards lie in [0, 1]
        if t < 1000:
            last = next_obs[0]
    assert infos["episode"]["l"][0] == 1000 and infos["episode"]["r"][0] == pytest.approx(sum(rewards))
    final = infos["final_obs"][0]
    assert not np.array_equal(final, next_obs[0])  # the next episode's first observation is a different state
    np.testing.assert_array_equal(
        next_obs[0], np.concatenate([np.ravel(v) for _, v in sorted(task_observation(task_env).items())])
    )
    assert np.abs(final - last).max() < 1.0  # one step on from the previous observation


def test_sac_stores_the_time_limit_step_unterminated_with_its_true_next_observation(log_dir):
    """The suite's 1000-step limit is a truncation: the transition is stored with terminated = 0 (so the target
    bootstraps from Q(s', a')) and next_obs = the episode's last observation, never the next episode's first."""
    args = sac.Args(
        env=CARTPOLE, total_steps=1010, learning_starts=1010, hidden_sizes=(8,), eval_every=0, eval_episodes=1, log_dir=log_dir
    )
    out = sac.train(args)
    payload = torch.load(os.path.join(out["run_dir"], "resume.pt"), weights_only=True)
    obs, _, rewards, next_obs, terminated = payload["train"]["replay"]["data"]
    assert len(obs) == 1010 and terminated.sum() == 0
    same_episode = torch.ones(1009, dtype=torch.bool)
    same_episode[999] = False  # row 999 is the 1000th step: the episode's last
    torch.testing.assert_close(next_obs[:-1][same_episode], obs[1:][same_episode], rtol=0, atol=0)
    assert not torch.equal(next_obs[999], obs[1000])
    assert (rewards >= 0).all() and (rewards <= 1).all()


# a few seconds each: past one 1000-step episode, a few updates, one evaluation episode, model.pt loaded back, resumed
RUNS = {
    "sac": ["--total-steps", "1100", "--learning-starts", "1000", "--batch-size", "16", "--hidden-sizes", "16", "16"],
    "ppo": ["--total-steps", "2048", "--num-envs", "2", "--num-steps", "512", "--update-epochs", "1", "--hidden-sizes", "16"],
    "dpi_ilqr": ["--total-steps", "40", "--episodes", "2", "--horizon", "10", "--prior-em-iters", "5"],
    "mpo": [
        *("--total-steps", "1050", "--learning-starts", "1000", "--batch-size", "8", "--num-samples", "4"),
        *("--retrace-steps", "3", "--policy-hidden-sizes", "16", "--critic-hidden-sizes", "16"),
    ],
    "treepi": [
        *("--total-steps", "1030", "--learning-starts", "1000", "--batch-size", "8", "--snippet-length", "3"),
        *("--model-sizes", "16", "16", "--policy-hidden-sizes", "16", "--critic-hidden-sizes", "16", "--num-samples", "4"),
        *("--depth", "3", "--num-rollouts", "6", "--search-states", "4"),
    ],
    "trpo": ["--total-steps", "2000", "--num-envs", "2", "--num-steps", "500", "--hidden-sizes", "16", "--value-epochs", "1"],
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_continuous_file_trains_evaluates_and_loads_back_on_cartpole_swingup(name, log_dir, capsys):
    script = importlib.import_module(name)
    argv = ["--env", CARTPOLE, "--seed", "1", "--eval-every", "0", "--eval-episodes", "1", "--log-dir", log_dir, *RUNS[name]]
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    (run_dir,) = [line.split("| run ")[1].strip() for line in printed.splitlines() if line.startswith("done:")]
    assert os.path.basename(run_dir).startswith("dm_control-cartpole-swingup-v0__")  # no nested directory
    final = float(printed.split("| eval ")[-1].split()[0])
    assert 0.0 <= final <= 1000.0  # one episode's return: 1000 steps of rewards in [0, 1]
    # the saved model reproduces the final evaluation
    assert script.main(["--checkpoint", os.path.join(run_dir, "model.pt"), "--eval-only", "--eval-episodes", "1"]) == 0
    assert f"mean {final:.1f}" in capsys.readouterr().out
    # resume.pt continues the run to a larger budget in the same directory
    total = int(RUNS[name][RUNS[name].index("--total-steps") + 1])
    more = total + {"ppo": 1024, "trpo": 1000}.get(name, 20)  # whole rollouts or iterations
    assert script.main(["--resume", os.path.join(run_dir, "resume.pt"), "--total-steps", str(more)]) == 0
    assert torch.load(os.path.join(run_dir, "resume.pt"), weights_only=True)["global_step"] == more


def test_a_suite_task_renders_for_video(tmp_path):
    """The evaluation env records video on a suite task (the whole recording is tested on Reacher-v5 in test_sac.py:
    here a 1000-frame episode would take most of a minute)."""
    env = sac.make_eval_env(CARTPOLE, str(tmp_path / "videos"), episodes=1)
    assert isinstance(env, gym.wrappers.RecordVideo)  # not the fallback without video
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (240, 320, 3) and frame.std() > 0  # an image, not a blank
    env.close()
