"""trpo.py as [DPI]'s baseline: --eval-horizon's score and --robust's variants, against replays in fresh envs and
against dpi_ilqr.py's variants."""

import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dpi_ilqr
from trpo import Actor, Args, RunningMeanStd, load_checkpoint, make_variant_vec_env, robust_variants, train


def last_scalars(run_dir: str) -> dict[str, float]:
    """The last value of every charts/ scalar of a run."""
    events = EventAccumulator(run_dir)
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith("charts/")}


def saved_policy(run_dir: str, args: Args, env: gym.Env):
    """np obs -> the deterministic action of model.pt's actor on observations normalised by its statistics."""
    state = load_checkpoint(os.path.join(run_dir, "model.pt"), args.env)["state"]
    actor = Actor(env.observation_space.shape[0], env.action_space, args.hidden_sizes, args.activation, args.layer_norm)
    actor.load_state_dict(state["actor"])
    rms = RunningMeanStd(env.observation_space.shape)
    rms.load_state_dict(state["obs_rms"])
    return lambda obs: actor.deterministic(torch.as_tensor(rms.normalize(obs, args.obs_clip))).detach().numpy()


def replay(env: gym.Env, act, seeds: list[int], horizon: int) -> tuple[float, float]:
    """Mean return of whole episodes from reset(seed) and of their first `horizon` rewards, by a list of rewards."""
    full, first = [], []
    for seed in seeds:
        (obs, _), rewards, done = env.reset(seed=seed), [], False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            rewards.append(reward)
            done = terminated or truncated
        full.append(sum(rewards))
        first.append(sum(rewards[:horizon]))
    return float(np.mean(full)), float(np.mean(first))


def test_eval_horizon_is_the_return_of_the_first_steps_of_the_evaluation_episodes(log_dir):
    args = Args(env="Swimmer-v5", num_steps=100, total_steps=100, eval_episodes=2, eval_horizon=20, log_dir=log_dir)
    out = train(args)
    scores = last_scalars(out["run_dir"])
    env = gym.make("Swimmer-v5")  # 1000-step episodes: the first 20 steps are a part
    full, first = replay(env, saved_policy(out["run_dir"], args, env), [args.seed + 10_000 + i for i in range(2)], 20)
    assert scores["charts/eval_return"] == pytest.approx(full, rel=1e-6, abs=1e-6)
    assert scores["charts/eval_return_horizon"] == pytest.approx(first, rel=1e-6, abs=1e-6)
    assert abs(first - full) > 1e-3
    default = train(Args(env="Swimmer-v5", num_steps=100, total_steps=100, eval_episodes=2, log_dir=log_dir + "2"))
    assert "charts/eval_return_horizon" not in last_scalars(default["run_dir"])  # off by default
    assert default["eval_return"] == out["eval_return"]


@pytest.mark.parametrize("env_id", ["InvertedPendulum-v5", "Hopper-v5"])
def test_robust_variants_are_dpi_ilqr_s_for_the_same_seed(env_id):
    """The same (mass, length) scales, and each training env's MuJoCo model equal, array for array, to dpi_ilqr.py's."""
    kw = dict(env=env_id, seed=3, robust=True, robust_train_variants=3, robust_test_variants=2)
    params = robust_variants(Args(**kw))
    assert params == dpi_ilqr.robust_variants(dpi_ilqr.Args(**kw))
    assert len(params[0]) == 3 and len(params[1]) == 2 and len(set(params[0] + params[1])) == 5
    envs = make_variant_vec_env(env_id, params[0], 2)
    nominal = gym.make(env_id).unwrapped.model
    for i, env in enumerate(envs.unwrapped.envs):  # 2 copies of each variant, in order
        model, reference = env.unwrapped.model, dpi_ilqr.make_variant_env(env_id, *params[0][i // 2]).unwrapped.model
        arrays = [name for name in dir(model) if isinstance(getattr(model, name), np.ndarray)]
        for name in arrays:
            np.testing.assert_array_equal(getattr(model, name), getattr(reference, name), err_msg=name)
        assert not np.allclose(model.body_mass, nominal.body_mass)
    envs.close()


def test_robust_evaluates_on_dpi_ilqr_s_test_variants(log_dir):
    """A short --robust run: its scores are the replayed means on dpi_ilqr.py's test and training variants."""
    kw = dict(env="Hopper-v5", robust=True, robust_train_variants=2, robust_test_variants=2)
    args = Args(**kw, num_steps=100, total_steps=200, eval_episodes=2, eval_horizon=10, log_dir=log_dir)
    out = train(args)
    assert out["global_step"] == 200 and out["num_updates"] == 1  # one rollout of 100 steps in each training variant
    scores = last_scalars(out["run_dir"])
    train_params, test_params = dpi_ilqr.robust_variants(dpi_ilqr.Args(**kw))
    seeds = [args.seed + 10_000 + i for i in range(2)]
    on = lambda params: [replay(env, saved_policy(out["run_dir"], args, env), seeds, 10) for env in (
        dpi_ilqr.make_variant_env("Hopper-v5", *p) for p in params)]  # fmt: skip
    test, train_returns = np.mean(on(test_params), axis=0), np.mean(on(train_params), axis=0)
    assert scores["charts/eval_return"] == pytest.approx(test[0], rel=1e-6)
    assert scores["charts/eval_return_horizon"] == pytest.approx(test[1], rel=1e-6)
    assert scores["charts/eval_return_train"] == pytest.approx(train_returns[0], rel=1e-6)
    nominal = gym.make("Hopper-v5")
    assert abs(replay(nominal, saved_policy(out["run_dir"], args, nominal), seeds, 10)[0] - test[0]) > 1e-3
