"""Tests for ppo.py: the math against independent computations, then end-to-end runs."""

import glob
import math
import os

import numpy as np
import pytest
import torch

import ppo


def small_args(log_dir: str, **overrides) -> ppo.Args:
    """A run that finishes in seconds: tiny networks, short rollouts, one eval episode."""
    base = dict(
        env="Pendulum-v1",
        total_steps=512,
        num_envs=2,
        num_steps=64,
        num_minibatches=4,
        update_epochs=2,
        hidden_sizes=(16, 16),
        log_every=128,
        eval_every=256,
        eval_episodes=1,
        checkpoint_every=256,
        log_dir=log_dir,
    )
    base.update(overrides)
    return ppo.Args(**base)


# -- math ---------------------------------------------------------------------------------
def gae_by_episodes(rewards, values, dones, last_value, gamma, lam):
    """Independent GAE: for each t, sum_l (gamma lambda)^l delta_{t+l} over the steps up to the
    end of t's episode, with V(s_{t+l+1}) = 0 after the episode's last step."""
    steps, envs = len(rewards), len(rewards[0])
    adv = [[0.0] * envs for _ in range(steps)]
    for n in range(envs):
        for t in range(steps):
            total, weight, k = 0.0, 1.0, t
            while k < steps:
                next_v = last_value[n] if k == steps - 1 else values[k + 1][n]
                next_v = 0.0 if dones[k][n] else next_v
                total += weight * (rewards[k][n] + gamma * next_v - values[k][n])
                if dones[k][n]:
                    break
                weight *= gamma * lam
                k += 1
            adv[t][n] = total
    return adv


def test_gae_matches_sums_over_episodes_across_ends_and_truncations():
    torch.manual_seed(0)
    steps, envs, gamma, lam = 13, 3, 0.97, 0.9
    rewards, values, last_value = (torch.randn(steps, envs), torch.randn(steps, envs), torch.randn(envs))
    dones = torch.zeros(steps, envs)
    dones[[2, 3, 9], 0] = 1  # two ends in a row: a one-step episode
    dones[5, 1] = 1
    dones[12, 2] = 1  # the last step ends: last_value must not be used
    adv, ret = ppo.gae(rewards, values, dones, last_value, gamma, lam)
    expected = gae_by_episodes(rewards.tolist(), values.tolist(), dones.tolist(), last_value.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, adv + values)


def test_gae_with_lambda_one_gives_bootstrapped_monte_carlo_returns_at_truncation():
    """A truncated episode's last reward carries gamma V(final obs) (as train adds it); with
    lambda = 1 the return target is then sum_k gamma^k r_{t+k} + gamma^(T-t) V(final)."""
    gamma, v_final = 0.9, 5.0
    r = [1.0, 2.0, -1.0, 0.5]
    rewards = torch.tensor(r).unsqueeze(1)
    rewards[-1] += gamma * v_final  # truncated after the 4th step
    values = torch.tensor([0.3, -0.2, 0.7, 1.1]).unsqueeze(1)
    dones = torch.tensor([0.0, 0.0, 0.0, 1.0]).unsqueeze(1)
    _, ret = ppo.gae(rewards, values, dones, torch.tensor([123.0]), gamma, 1.0)
    for t in range(4):
        expected = sum(gamma ** (k - t) * r[k] for k in range(t, 4)) + gamma ** (4 - t) * v_final
        assert ret[t, 0].item() == pytest.approx(expected, rel=1e-6)


def test_log_probs_and_entropies_match_torch_distributions():
    torch.manual_seed(1)
    mean, log_std, actions = torch.randn(6, 3), torch.randn(6, 3) * 0.3, torch.randn(6, 3)
    normal = torch.distributions.Normal(mean, log_std.exp())
    torch.testing.assert_close(ppo.gaussian_log_prob(actions, mean, log_std), normal.log_prob(actions).sum(-1))
    torch.testing.assert_close(ppo.gaussian_entropy(log_std), normal.entropy().sum(-1))
    logits, choice = torch.randn(6, 4), torch.tensor([0, 3, 1, 1, 2, 0])
    cat = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(ppo.categorical_log_prob(logits, choice), cat.log_prob(choice))
    torch.testing.assert_close(ppo.categorical_entropy(logits), cat.entropy())


def test_actor_sample_log_prob_is_the_gaussian_log_density():
    torch.manual_seed(2)
    space = ppo.gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    actor = ppo.Actor(4, space, (8,), "tanh", False)
    with torch.no_grad():
        actor.log_std.copy_(torch.tensor([-0.5, 0.0, 0.4]))
        obs = torch.randn(5, 4)
        actions, log_probs = actor.sample(obs)
        again, _ = actor.log_prob_entropy(obs, actions)
    torch.testing.assert_close(log_probs, again)


def test_clipped_surrogate_matches_its_definition_and_stops_gradients_when_clipped():
    ratio = torch.tensor([0.5, 0.9, 1.1, 1.5, 0.5, 1.5])
    adv = torch.tensor([1.0, -2.0, 3.0, 1.0, -1.0, -1.0])
    old = torch.zeros(6)
    log_probs = ratio.log().requires_grad_(True)
    loss = ppo.clipped_surrogate(log_probs, old, adv, clip=0.2)
    terms = [min(r * a, min(max(r, 0.8), 1.2) * a) for r, a in zip(ratio.tolist(), adv.tolist())]
    assert loss.item() == pytest.approx(-sum(terms) / 6, rel=1e-6)
    loss.backward()
    # clipped and pessimistic (ratio 1.5 with A > 0, ratio 0.5 with A < 0): no gradient
    assert log_probs.grad[3].item() == 0.0 and log_probs.grad[4].item() == 0.0
    # unclipped side (ratio 0.5 with A > 0): gradient -r A / 6
    assert log_probs.grad[0].item() == pytest.approx(-0.5 * 1.0 / 6)


def test_value_loss_clipping_takes_the_pessimistic_error():
    values, old, returns = (torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([3.0, 1.0]))
    # unclipped errors (1, 1); clipped values (0.2, 0.0) -> errors (2.8, 1.0)
    assert ppo.value_loss(values, old, returns, None).item() == pytest.approx(0.5 * (1 + 1) / 2)
    assert ppo.value_loss(values, old, returns, 0.2).item() == pytest.approx(0.5 * (2.8**2 + 1) / 2)


def test_running_mean_std_matches_numpy_over_all_batches():
    rng = np.random.default_rng(3)
    rms = ppo.RunningMeanStd((2,))
    batches = [rng.normal(3.0, 2.0, size=(n, 2)) for n in (1, 5, 1, 40, 7)]
    for b in batches:
        rms.update(b)
    data = np.concatenate(batches)
    np.testing.assert_allclose(rms.mean, data.mean(0), rtol=1e-4)  # the 1e-4 prior count
    np.testing.assert_allclose(rms.var, data.var(0), rtol=1e-4)
    copy = ppo.RunningMeanStd((2,))
    copy.load_state_dict(rms.state_dict())
    np.testing.assert_array_equal(copy.normalize(data, 10.0), rms.normalize(data, 10.0))


def test_reward_scaler_divides_by_the_std_of_discounted_returns():
    scaler = ppo.RewardScaler(num_envs=1, gamma=0.5, clip=100.0)
    rewards = [1.0, 2.0, 4.0, 1.0]
    ended = [False, True, False, False]
    returns, g = [], 0.0
    out = []
    for r, e in zip(rewards, ended):
        g = g * 0.5 + r
        returns.append(g)
        out.append(scaler(np.array([r]), np.array([e]))[0])
        if e:
            g = 0.0
        # all returns so far merged at once with the prior (mean 0, var 1, count 1e-4)
        c, n, mean = 1e-4, len(returns), float(np.mean(returns))
        var = (c * 1.0 + n * np.var(returns) + mean**2 * c * n / (c + n)) / (c + n)
        assert out[-1] == pytest.approx(r / math.sqrt(var + 1e-8), rel=1e-4)


# -- end to end ---------------------------------------------------------------------------
def test_end_to_end_pendulum_trains_logs_and_round_trips(log_dir, capsys):
    out = ppo.train(small_args(log_dir))
    assert out["global_step"] == 512
    assert out["num_updates"] == 4 * 2 * 4  # iterations x epochs x minibatches
    run_dir = out["run_dir"]
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    model = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
    assert model["algo"] == "ppo" and model["state"]["obs_rms"]["count"] > 500
    capsys.readouterr()
    assert ppo.main(["--checkpoint", os.path.join(run_dir, "model.pt"), "--eval-only"]) == 0
    assert f"mean {out['eval_return']:.1f}" in capsys.readouterr().out  # frozen statistics


def test_end_to_end_discrete_and_mujoco(log_dir):
    out = ppo.train(small_args(log_dir, env="CartPole-v1"))
    assert out["num_updates"] > 0
    model = torch.load(os.path.join(out["run_dir"], "model.pt"), weights_only=True)
    assert model["state"]["actor"]["head.weight"].shape[0] == 2  # two logits
    out = ppo.train(small_args(log_dir, env="Hopper-v5", total_steps=256, num_steps=128))
    assert out["num_updates"] > 0


def test_loaded_checkpoint_gives_identical_actions(log_dir):
    out = ppo.train(small_args(log_dir, total_steps=256, eval_every=0))
    payload = ppo.load_checkpoint(os.path.join(out["run_dir"], "model.pt"), "Pendulum-v1")
    space = ppo.make_env("Pendulum-v1").action_space
    acts = []
    for _ in range(2):
        actor, rms = ppo.Actor(3, space, (16, 16), "tanh", False), ppo.RunningMeanStd((3,))
        ppo.load_state({"actor": actor, "obs_rms": rms}, payload["state"], "model.pt")
        acts.append(lambda obs, actor=actor, rms=rms: actor.deterministic(torch.as_tensor(rms.normalize(obs, 10.0))).detach())
    obs = np.random.default_rng(0).normal(size=(20, 3)) * 10
    torch.testing.assert_close(acts[0](obs), acts[1](obs), rtol=0, atol=0)
    assert (acts[0](obs).abs() <= 2.0).all()  # clipped to Pendulum's bounds


def test_resume_continues_from_the_saved_step_with_the_saved_weights(log_dir):
    first = ppo.train(small_args(log_dir, eval_every=0))
    resume_path = os.path.join(first["run_dir"], "resume.pt")
    saved = torch.load(resume_path, weights_only=True)
    assert saved["global_step"] == 512
    assert {"actor", "value", "obs_rms"} <= saved["state"].keys()  # what evaluation needs
    assert {"optimizer", "reward_rms", "num_updates", "rng"} <= saved["train"].keys()  # what resuming adds
    same = ppo.train(small_args(log_dir, eval_every=0, resume=resume_path))
    assert same["global_step"] == 512 and same["eval_return"] == pytest.approx(first["eval_return"])
    again = torch.load(resume_path, weights_only=True)
    for name in ("actor", "value"):
        for k, v in saved["state"][name].items():
            torch.testing.assert_close(again["state"][name][k], v)
    torch.testing.assert_close(again["state"]["obs_rms"]["mean"], saved["state"]["obs_rms"]["mean"])
    more = ppo.train(small_args(log_dir, total_steps=640, eval_every=0, resume=resume_path))
    assert more["global_step"] == 640 and more["num_updates"] == first["num_updates"] + 8


def test_same_seed_gives_identical_runs(log_dir):
    a = ppo.train(small_args(log_dir, eval_every=0))
    b = ppo.train(small_args(log_dir, eval_every=0))
    assert a["eval_return"] == b["eval_return"]
    wa = torch.load(os.path.join(a["run_dir"], "model.pt"), weights_only=True)["state"]["actor"]
    wb = torch.load(os.path.join(b["run_dir"], "model.pt"), weights_only=True)["state"]["actor"]
    for k in wa:
        assert torch.equal(wa[k], wb[k])


# -- the command line ---------------------------------------------------------------------
def test_help_lists_documented_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ppo.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--clip-coef" in out and "Clipping parameter epsilon" in out


def run_bad(argv: list[str], capsys) -> str:
    code = ppo.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_unknown_env_names_the_closest_ids(capsys, log_dir):
    assert "CartPole-v1" in run_bad(["--env", "CartPole-v7", "--log-dir", log_dir], capsys)


def test_unsupported_action_space_is_refused(capsys, log_dir):
    # Blackjack has a Tuple observation space; a flat Box is needed
    run_bad(["--env", "Blackjack-v1", "--log-dir", log_dir], capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["--total-steps", "0"],
        ["--num-steps", "0"],
        ["--num-minibatches", "5000", "--num-steps", "64"],
        ["--gae-lambda", "1.5"],
        ["--eval-only"],
    ],
)
def test_invalid_arguments_are_one_line_errors(argv, capsys, log_dir):
    run_bad([*argv, "--log-dir", log_dir], capsys)


def test_missing_or_foreign_checkpoint_is_refused(capsys, log_dir, tmp_path):
    assert "not found" in run_bad(["--checkpoint", str(tmp_path / "x.pt"), "--eval-only"], capsys)
    out = ppo.train(small_args(log_dir, total_steps=128, eval_every=0))
    model = os.path.join(out["run_dir"], "model.pt")
    assert "Pendulum-v1" in run_bad(["--checkpoint", model, "--eval-only", "--env", "Hopper-v5"], capsys)
    payload = torch.load(model, weights_only=True)
    payload["algo"] = "sac"
    torch.save(payload, os.path.join(out["run_dir"], "sac.pt"))
    line = run_bad(["--checkpoint", os.path.join(out["run_dir"], "sac.pt"), "--eval-only"], capsys)
    assert "sac" in line


# -- learning -----------------------------------------------------------------------------
@pytest.mark.slow
def test_learns_cartpole(log_dir):
    """Budget: 120k env steps (8 envs x 128 steps, 10 epochs x 4 minibatches, lr 2.5e-3
    annealed, entropy 0.01, no reward scaling); threshold: the final deterministic evaluation
    over 10 episodes >= 475 (the maximum is 500). Seeds 1, 2 and 3 all reach 500 with this
    budget; seed 1 is tested."""
    args = small_args(
        log_dir,
        env="CartPole-v1",
        total_steps=120_000,
        num_envs=8,
        num_steps=128,
        num_minibatches=4,
        update_epochs=10,
        hidden_sizes=(64, 64),
        learning_rate=2.5e-3,
        norm_reward=False,
        ent_coef=0.01,
        eval_every=0,
        eval_episodes=10,
        log_every=20_000,
        checkpoint_every=0,
    )
    out = ppo.train(args)
    assert out["eval_return"] >= 475
