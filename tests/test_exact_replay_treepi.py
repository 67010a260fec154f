"""treepi.py's true model against the real envs: a fresh Simulator steps saved node states [obs | physics] to exactly
the observations, rewards and terminations that the env itself returned, on every gymnasium v5 MuJoCo env and on
control suite tasks (the task's own reward), one state per call and several episodes' states in one batch."""

import glob
import os

import numpy as np
import pytest
import torch

import treepi
from treepi import Simulator, make_env

GYMNASIUM = ["Ant-v5", "HalfCheetah-v5", "Hopper-v5", "Humanoid-v5", "HumanoidStandup-v5", "InvertedDoublePendulum-v5"]
GYMNASIUM += ["InvertedPendulum-v5", "Pusher-v5", "Reacher-v5", "Swimmer-v5", "Walker2d-v5"]
SUITE = [f"dm_control/{task}-v0" for task in ("cartpole-swingup", "finger-turn_hard", "walker-run", "humanoid-stand")]
SUITE += ["dm_control/lqr-lqr_2_1-v0"]  # its joint stiffnesses are drawn when the env is built
SEEDS, WARM_UP, STEPS = (1, 2, 3), 6, 10


def real_episodes(env_id: str, sim: Simulator) -> tuple[np.ndarray, np.ndarray, list[list[tuple]]]:
    """Per seed: a real env after WARM_UP small random steps (the pendulums stay up), its node state [obs | physics], then STEPS random actions
    ([-1, 1] units, as the search draws them) and what the env returned for each (obs, reward, terminated)."""
    env, rng = make_env(env_id), np.random.default_rng(0)
    env.action_space.seed(0)
    roots, actions, returned = [], rng.uniform(-1, 1, (len(SEEDS), STEPS, sim.action_scale.numel())), []
    for k, seed in enumerate(SEEDS):
        obs, _ = env.reset(seed=seed)
        for _ in range(WARM_UP):
            obs, _, terminated, _, _ = env.step(0.1 * env.action_space.sample())
            assert not terminated  # mid-episode
        roots.append(np.concatenate([obs, sim.physics(env)]))
        executed = (torch.from_numpy(actions[k]).float() * sim.action_scale + sim.action_bias).numpy()
        returned.append([env.step(a)[:3] for a in executed])
    return np.stack(roots), actions, returned


@pytest.mark.parametrize("env_id", GYMNASIUM + SUITE)
def test_fresh_simulator_replays_the_real_env_bit_for_bit(env_id):
    recorder = Simulator(env_id)
    roots, actions, returned = real_episodes(env_id, recorder)
    sim = Simulator(env_id)  # fresh: a new env, whose last reset differs from the recorded episodes'
    for rows in ([0], list(range(len(SEEDS)))):  # one state per call, and three episodes' states in one batch
        states, alive = torch.from_numpy(roots[rows]), np.ones(len(rows), dtype=bool)
        for t in range(STEPS):
            states, rewards, continuation = sim.step(states, torch.from_numpy(actions[rows, t]).float())
            for j, k in enumerate(rows):
                if alive[j]:
                    obs, reward, terminated = returned[k][t]
                    assert np.array_equal(states[j, : sim.obs_dim].numpy(), obs), (k, t)
                    assert rewards[j].item() == reward and continuation[j].item() == (not terminated), (k, t)
                    alive[j] = not terminated
    if env_id == "dm_control/finger-turn_hard-v0":  # the target, drawn by each reset, rides in the node state
        targets = roots[:, sim.obs_dim + sim.parts["site_pos"].start : sim.obs_dim + sim.parts["site_pos"].stop]
        assert sim.model_fields == ["site_pos"] and len(np.unique(targets, axis=0)) == len(SEEDS)


def test_the_drawn_model_arrays_are_those_that_resets_or_construction_change():
    """finger draws its target site at reset, lqr its joint stiffnesses when built; gymnasium's envs draw none; a terrain
    drawn per episode (quadruped-escape, 201 x 201 heights) is too large to carry in every node state: refused."""
    assert treepi.drawn_model_fields("dm_control/finger-turn_hard-v0") == ["site_pos"]
    assert treepi.drawn_model_fields("dm_control/lqr-lqr_2_1-v0") == ["jnt_stiffness"]
    assert treepi.drawn_model_fields("Ant-v5") == []
    with pytest.raises(treepi.UsageError, match="40,401 model numbers"):
        Simulator("dm_control/quadruped-escape-v0")


def test_control_suite_true_model_trains_end_to_end(log_dir):
    """A tiny TreePI/search run on cartpole-swingup with the simulator: searches from the training env's own states."""
    flags = "--total-steps 40 --learning-starts 20 --batch-size 4 --snippet-length 2 --policy-hidden-sizes 8"
    flags += " --critic-hidden-sizes 8 --num-samples 3 --depth 2 --num-rollouts 3 --search-states 2 --log-every 20"
    flags += " --eval-every 0 --eval-episodes 1 --checkpoint-every 0 --act search"
    argv = ["--env", "dm_control/cartpole-swingup-v0", "--model", "true", *flags.split(), "--log-dir", log_dir]
    assert treepi.main(argv) == 0
    assert glob.glob(os.path.join(log_dir, "*", "model.pt"))
