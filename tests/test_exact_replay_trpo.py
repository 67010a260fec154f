"""trpo.py's Simulator against the real env: a state saved mid-episode and restored in a second env, which has been
stepping elsewhere, replays the real env's observations, rewards and terminations bit-exactly (the vine's branches
[TRPO Sec. 5.2] must see what the trunk would have seen)."""

import inspect

import gymnasium as gym
import numpy as np
import pytest

import treepi
import trpo
from trpo import Simulator, make_env

GYM_MUJOCO = ["Ant", "HalfCheetah", "Hopper", "Humanoid", "HumanoidStandup", "InvertedDoublePendulum", "InvertedPendulum"]
GYM_MUJOCO += ["Pusher", "Reacher", "Swimmer", "Walker2d"]  # codespell:ignore
SUITE = ["cartpole-swingup", "finger-turn_hard", "walker-run", "humanoid-stand", "reacher-hard", "fish-swim", "lqr-lqr_2_1"]
ENV_IDS = ["CartPole-v1"] + [f"{name}-v5" for name in GYM_MUJOCO] + [f"dm_control/{task}-v0" for task in SUITE]


def random_steps(env: gym.Env, rng: np.random.Generator, steps: int, seed: int) -> None:
    """Random actions, a new episode (seeded) whenever one ends."""
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset(seed=int(rng.integers(1 << 30)) + seed)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_restored_state_replays_the_real_env_bit_exactly(env_id):
    rng = np.random.default_rng(0)
    env = make_env(env_id)
    env.reset(seed=1)
    env.action_space.seed(1)
    random_steps(env, rng, 25, seed=0)  # mid-episode
    state = Simulator(env, env_id).get_state()
    actions = [env.action_space.sample() for _ in range(10)]
    real = []
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        real.append((obs, reward, terminated))
        if terminated or truncated:
            break
    # a second env in another episode (another suite target, stale derived quantities), as the vine's branch env
    other = make_env(env_id)
    other.reset(seed=2)
    other.action_space.seed(2)
    random_steps(other, rng, 3, seed=100)
    sim = Simulator(other, env_id)
    sim.set_state(state)
    for action, (obs, reward, terminated) in zip(actions, real):
        replay_obs, replay_reward, replay_terminated = sim.step(action)
        assert np.array_equal(replay_obs, obs) and replay_obs.shape == (sim.obs_dim,)
        assert replay_reward == reward and replay_terminated == terminated
    # the branch horizons' time limit: the spec's, or the suite's 1000 steps (its spec has none; lqr's episodes have none)
    suite_limit = np.iinfo(np.int64).max if "lqr" in env_id else 1000
    assert sim.time_limit == (suite_limit if env_id.startswith("dm_control/") else env.spec.max_episode_steps)


def test_restores_count_no_suite_steps():
    """dm_control's Environment.step resets after 1000 steps, and before the first reset: a fresh suite env, never reset,
    restores one state and steps 1001 times with the same result each time (the vine's horizons apply the limit)."""
    env_id = "dm_control/cartpole-swingup-v0"
    env = make_env(env_id)
    env.reset(seed=0)
    state, action = Simulator(env, env_id).get_state(), env.action_space.sample()
    expected = env.step(action)[:3]
    sim = Simulator(make_env(env_id), env_id)
    for _ in range(1001):
        sim.set_state(state)
        obs, reward, terminated = sim.step(action)
        assert np.array_equal(obs, expected[0]) and (reward, terminated) == expected[1:]


def test_the_saved_state_is_treepis_in_the_same_words():
    """trpo.py's vine and treepi.py's true model save the same things, by the same code: the carried body positions and
    the model arrays an env draws (tested in tests/test_exact_replay_treepi.py)."""
    for name in ("mujoco_of", "drawn_model_fields"):
        assert inspect.getsource(getattr(trpo, name)) == inspect.getsource(getattr(treepi, name)), name
    assert (trpo.CARRIED, trpo.MAX_DRAWN) == (treepi.CARRIED, treepi.MAX_DRAWN)
    with pytest.raises(trpo.UsageError, match="40,401 model numbers"):
        Simulator(make_env("dm_control/quadruped-escape-v0"), "dm_control/quadruped-escape-v0")
