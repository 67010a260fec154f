"""Shared test fixtures: the repository root on sys.path and tiny registered test envs."""

import os
import sys
from functools import partial

import gymnasium as gym
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MUJOCO_GL", "egl")

COUNTING_TIME_LIMIT = 8  # even episodes end by this TimeLimit (truncation)
COUNTING_TERMINATE_AT = 5  # odd episodes terminate after this many steps


class CountingEnv(gym.Env):
    """Observation [t, episode]: t counts steps within the episode, episode counts resets.

    Odd episodes terminate after COUNTING_TERMINATE_AT steps; even episodes run into the
    TimeLimit of COUNTING_TIME_LIMIT steps and are truncated. The reward is 1 per step. A
    transition (obs, next_obs) is consistent iff next_obs = obs + [1, 0].
    """

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium.Env convention)

    def __init__(self, discrete: bool = False, render_mode: str | None = None):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(2) if discrete else gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.episode, self.t = -1, 0

    def _obs(self) -> np.ndarray:
        return np.array([self.t, self.episode], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        terminated = self.episode % 2 == 1 and self.t >= COUNTING_TERMINATE_AT
        return self._obs(), 1.0, terminated, False, {}


gym.register("tests/Counting-v0", entry_point=CountingEnv, max_episode_steps=COUNTING_TIME_LIMIT)
gym.register(
    "tests/CountingDiscrete-v0", entry_point=partial(CountingEnv, discrete=True), max_episode_steps=COUNTING_TIME_LIMIT
)


@pytest.fixture
def log_dir(tmp_path) -> str:
    """A per-test run directory root."""
    return str(tmp_path / "runs")
