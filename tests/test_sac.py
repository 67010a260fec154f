"""Tests for sac.py: the math against independent computations, then end-to-end runs."""

import glob
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import COUNTING_TERMINATE_AT, COUNTING_TIME_LIMIT

import sac


def small_args(log_dir: str, **overrides) -> sac.Args:
    """A run that finishes in seconds: tiny networks, few steps, one eval episode."""
    base = dict(
        env="Pendulum-v1",
        total_steps=300,
        learning_starts=100,
        batch_size=32,
        hidden_sizes=(32, 32),
        log_every=100,
        eval_every=200,
        eval_episodes=1,
        checkpoint_every=200,
        log_dir=log_dir,
    )
    base.update(overrides)
    return sac.Args(**base)


# -- math ---------------------------------------------------------------------------------
def test_squashed_log_prob_matches_numerical_change_of_variables():
    """log pi(a) from squashed_gaussian equals log of the numerically differentiated CDF of
    a = scale * tanh(u) + bias, u ~ N(mean, std), per dimension (the density factorises)."""
    torch.manual_seed(0)
    mean = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    log_std = torch.tensor([[-0.5, 0.2, -1.0]], dtype=torch.float64)
    noise = torch.tensor([[0.7, -0.4, 1.5]], dtype=torch.float64)
    scale = torch.tensor([2.0, 0.4, 1.0], dtype=torch.float64)
    bias = torch.tensor([0.5, 0.0, -1.0], dtype=torch.float64)
    action, log_prob = sac.squashed_gaussian(mean, log_std, noise, scale, bias)

    def cdf(a: float, i: int) -> float:
        u = math.atanh((a - bias[i].item()) / scale[i].item())
        z = (u - mean[0, i].item()) / math.exp(log_std[0, i].item())
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    h = 1e-6
    expected = 0.0
    for i in range(3):
        a = action[0, i].item()
        expected += math.log((cdf(a + h, i) - cdf(a - h, i)) / (2 * h))
    assert log_prob.shape == (1,)
    assert log_prob.item() == pytest.approx(expected, abs=1e-5)  # central difference, h = 1e-6
    u = mean + log_std.exp() * noise
    torch.testing.assert_close(action, torch.tanh(u) * scale + bias)


def test_squashed_log_prob_is_stable_where_tanh_saturates():
    """For |u| ~ 20, 1 - tanh(u)^2 underflows even in float64; the softplus form stays finite
    and matches log sech(u)^2 = log 4 - 2 (|u| + log1p(exp(-2|u|))), computed in Python."""
    us = [20.0, -19.0, 0.3]
    mean = torch.tensor([us])
    zeros = torch.zeros(1, 3)
    _, log_prob = sac.squashed_gaussian(mean, zeros, zeros, torch.ones(3), torch.zeros(3))
    expected = sum(-0.5 * math.log(2 * math.pi) - (math.log(4) - 2 * (abs(u) + math.log1p(math.exp(-2 * abs(u))))) for u in us)
    assert torch.isfinite(log_prob).all()
    assert log_prob.item() == pytest.approx(expected, rel=1e-6)


def test_soft_q_target_matches_elementwise_formula():
    torch.manual_seed(1)
    b = 7
    rewards, next_log_prob = torch.randn(b), torch.randn(b)
    terminated = torch.tensor([0, 1, 0, 0, 1, 0, 0], dtype=torch.float32)
    next_q = torch.randn(2, b)
    alpha, gamma = torch.tensor(0.3), 0.97
    y = sac.soft_q_target(rewards, terminated, next_q, next_log_prob, alpha, gamma)
    for i in range(b):
        v = min(next_q[0, i].item(), next_q[1, i].item()) - 0.3 * next_log_prob[i].item()
        expected = rewards[i].item() + (0.0 if terminated[i] else gamma * v)
        assert y[i].item() == pytest.approx(expected, abs=1e-6)


def test_soft_update_matches_polyak_formula():
    torch.manual_seed(2)
    online = torch.nn.Linear(4, 3)
    target = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in target.parameters()]
    sac.soft_update(target, online, tau=0.1)
    for t, p, old in zip(target.parameters(), online.parameters(), before):
        torch.testing.assert_close(t, 0.1 * p.detach() + 0.9 * old)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_batched_critic_equals_two_separate_mlps(layer_norm):
    """The stacked-weight Critic computes exactly what two plain MLPs with the same weights do."""
    torch.manual_seed(3)
    critic = sac.Critic(5, 2, (16, 8), "relu", layer_norm)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        if layer_norm:
            critic.norm_weight.uniform_(0.5, 1.5)
            critic.norm_bias.uniform_(-0.5, 0.5)
    obs, actions = torch.randn(9, 5), torch.randn(9, 2)
    q = critic(obs, actions)
    assert q.shape == (2, 9)
    for e in range(2):
        x = torch.cat([obs, actions], -1)
        x = x @ critic.weights[0][e] + critic.biases[0][e]
        if layer_norm:
            x = F.layer_norm(x, (16,)) * critic.norm_weight[e] + critic.norm_bias[e]
        x = torch.relu(x) @ critic.weights[1][e] + critic.biases[1][e]
        x = torch.relu(x) @ critic.weights[2][e] + critic.biases[2][e]
        torch.testing.assert_close(q[e], x.squeeze(-1))


def test_bf16_products_keep_q_and_log_prob_float32_and_close():
    """--bf16: the matrix products run in bfloat16 (the results differ from float32), while Q
    and log pi come out float32 and within bfloat16's rounding of the float32 values."""
    torch.manual_seed(4)
    space = sac.gym.spaces.Box(-2.0, 2.0, (3,))
    critic, actor = sac.Critic(11, 3, (256, 256), "relu", False), sac.Actor(11, space, (256, 256), "relu", False)
    obs, actions = torch.randn(64, 11), torch.rand(64, 3) * 4 - 2
    noise = torch.randn(64, 3)

    def outputs():
        mean, log_std = actor(obs)
        a, log_prob = sac.squashed_gaussian(mean, log_std, noise, actor.action_scale, actor.action_bias)
        return critic(obs, actions), a, log_prob

    exact = outputs()
    with torch.autocast("cpu", torch.bfloat16):  # what train() does under --bf16
        low = outputs()
    for x, y in zip(exact, low):
        assert y.dtype == torch.float32
        assert not torch.equal(x, y)  # bfloat16 products: 8 bits of mantissa
        torch.testing.assert_close(y, x, rtol=0.05, atol=0.05 * x.abs().mean().item())


def test_end_to_end_bf16_trains_with_float32_weights(log_dir):
    """--bf16 reaches the updates (same seed, other weights than float32) and keeps the
    weights float32 and finite."""

    def weights(run_dir: str) -> list[torch.Tensor]:
        model = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
        return [w for part in model["state"].values() if isinstance(part, dict)
                for w in part.values()]  # fmt: skip

    out = sac.train(small_args(log_dir, bf16=True))
    assert out["num_updates"] == 201 and math.isfinite(out["eval_return"])
    low = weights(out["run_dir"])
    assert low and all(w.dtype == torch.float32 and w.isfinite().all() for w in low)
    exact = weights(sac.train(small_args(log_dir))["run_dir"])
    assert any(not torch.equal(a, b) for a, b in zip(low, exact))


def test_squashed_density_integrates_to_one_over_the_action_box():
    """Midpoint-rule integral of pi(a) over the box [-1, 1] x [0, 0.5] is 1, with a and its
    noise related by noise = (atanh((a - bias) / scale) - mean) / std."""
    mean = torch.tensor([0.4, -0.3], dtype=torch.float64)
    log_std = torch.tensor([-0.2, 0.1], dtype=torch.float64)
    scale = torch.tensor([1.0, 0.25], dtype=torch.float64)
    bias = torch.tensor([0.0, 0.25], dtype=torch.float64)
    n = 1000
    grid = [(torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1] * 2  # in (-1, 1)
    g0, g1 = torch.meshgrid(*grid, indexing="ij")
    a = torch.stack([g0, g1], -1).reshape(-1, 2) * scale + bias
    noise = (torch.atanh((a - bias) / scale) - mean) / log_std.exp()
    action, log_prob = sac.squashed_gaussian(mean.expand_as(noise), log_std.expand_as(noise), noise, scale, bias)
    torch.testing.assert_close(action, a)
    cell = (2 * scale / n).prod()
    assert (log_prob.exp().sum() * cell).item() == pytest.approx(1.0, abs=2e-3)  # 1e6 cells


# -- storage and end to end ---------------------------------------------------------------
def test_replay_never_pairs_an_observation_with_the_next_episode(log_dir):
    """Counting env, 2 envs: every stored row satisfies next_obs = obs + [1, 0] (same
    episode), terminated rows are exactly the odd episodes' last steps, and truncated rows
    (time limit) are stored with terminated = 0 and their true last observation."""
    args = small_args(
        log_dir, env="tests/Counting-v0", num_envs=2, total_steps=120, learning_starts=60, eval_every=0, hidden_sizes=(8,)
    )
    out = sac.train(args)
    payload = torch.load(os.path.join(out["run_dir"], "resume.pt"), weights_only=True)
    obs, _, rewards, next_obs, terminated = payload["train"]["replay"]["data"]
    assert len(obs) == 120
    torch.testing.assert_close(next_obs - obs, torch.tensor([1.0, 0.0]).expand_as(obs))
    odd = next_obs[:, 1] % 2 == 1
    expect_term = odd & (next_obs[:, 0] == COUNTING_TERMINATE_AT)
    assert torch.equal(terminated.bool(), expect_term)
    truncated_rows = ~odd & (next_obs[:, 0] == COUNTING_TIME_LIMIT)
    assert truncated_rows.sum() >= 4 and terminated[truncated_rows].sum() == 0
    assert (obs[:, 0] < COUNTING_TIME_LIMIT).all()  # a final observation never starts a row
    assert torch.all(rewards == 1.0)


def test_end_to_end_pendulum_trains_logs_and_round_trips(log_dir, capsys):
    out = sac.train(small_args(log_dir))
    assert out["global_step"] == 300 and out["num_updates"] == 201  # steps 100..300
    run_dir = out["run_dir"]
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    assert os.path.isfile(os.path.join(run_dir, "args.json"))
    model = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
    assert model["algo"] == "sac" and model["global_step"] == 300
    # the checkpoint round trip: --eval-only reproduces the final evaluation exactly
    capsys.readouterr()
    code = sac.main(["--checkpoint", os.path.join(run_dir, "model.pt"), "--eval-only"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"mean {out['eval_return']:.1f}" in printed


def test_loaded_checkpoint_gives_identical_actions(log_dir):
    out = sac.train(small_args(log_dir, total_steps=200, eval_every=0))
    payload = sac.load_checkpoint(os.path.join(out["run_dir"], "model.pt"), "Pendulum-v1")
    space = sac.make_env("Pendulum-v1").action_space
    a, b, fresh = (sac.Actor(3, space, (32, 32), "relu", False) for _ in range(3))
    sac.load_state({"actor": a}, payload["state"], "model.pt")
    sac.load_state({"actor": b}, payload["state"], "model.pt")
    obs = torch.randn(50, 3)
    torch.testing.assert_close(a.deterministic(obs), b.deterministic(obs))
    assert not torch.allclose(fresh.deterministic(obs), a.deterministic(obs))


def test_end_to_end_mujoco_with_video(log_dir):
    """A MuJoCo env (Reacher-v5: 50-step episodes keep the rendering short) with video."""
    out = sac.train(small_args(log_dir, env="Reacher-v5", total_steps=250, capture_video=True))
    assert out["num_updates"] > 0
    videos = glob.glob(os.path.join(out["run_dir"], "videos", "*.mp4"))
    assert videos, "EGL rendering works on this machine class; a video should be written"


def test_resume_continues_from_the_saved_step_with_the_saved_weights(log_dir):
    first = sac.train(small_args(log_dir, total_steps=300, eval_every=0))
    resume_path = os.path.join(first["run_dir"], "resume.pt")
    saved = torch.load(resume_path, weights_only=True)
    assert saved["global_step"] == 300
    # resuming at the saved step trains nothing: the weights written back are the saved ones
    same = sac.train(small_args(log_dir, total_steps=300, eval_every=0, resume=resume_path))
    assert same["global_step"] == 300 and same["num_updates"] == first["num_updates"]
    again = torch.load(resume_path, weights_only=True)
    for name in ("actor", "critic", "critic_target"):
        for k, v in saved["state"][name].items():
            torch.testing.assert_close(again["state"][name][k], v)
    assert same["eval_return"] == pytest.approx(first["eval_return"])
    # resuming with a larger budget continues counting from the saved step
    more = sac.train(small_args(log_dir, total_steps=400, eval_every=0, resume=resume_path))
    assert more["global_step"] == 400 and more["num_updates"] == first["num_updates"] + 100
    assert more["run_dir"] == first["run_dir"]


def test_resume_through_main_takes_the_saved_arguments(log_dir):
    first = sac.train(small_args(log_dir, total_steps=200, eval_every=0, hidden_sizes=(16,)))
    resume_path = os.path.join(first["run_dir"], "resume.pt")
    # no --env, --hidden-sizes, ...: they come from the checkpoint; --total-steps overrides
    assert sac.main(["--resume", resume_path, "--total-steps", "260"]) == 0
    assert torch.load(resume_path, weights_only=True)["global_step"] == 260


def test_same_seed_gives_identical_runs(log_dir):
    a = sac.train(small_args(log_dir, total_steps=250, eval_every=0))
    b = sac.train(small_args(log_dir, total_steps=250, eval_every=0))
    assert a["eval_return"] == b["eval_return"]
    wa = torch.load(os.path.join(a["run_dir"], "model.pt"), weights_only=True)["state"]["actor"]
    wb = torch.load(os.path.join(b["run_dir"], "model.pt"), weights_only=True)["state"]["actor"]
    for k in wa:
        assert torch.equal(wa[k], wb[k])


# -- the command line ---------------------------------------------------------------------
def test_help_lists_documented_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sac.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--learning-starts" in out and "Target smoothing coefficient" in out


def run_bad(argv: list[str], capsys) -> str:
    code = sac.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_unknown_env_names_the_closest_ids(capsys, log_dir):
    line = run_bad(["--env", "HalfCheetah-v9", "--log-dir", log_dir], capsys)
    assert "HalfCheetah-v5" in line


def test_discrete_env_is_refused(capsys, log_dir):
    line = run_bad(["--env", "CartPole-v1", "--log-dir", log_dir], capsys)
    assert "Discrete" in line and "needs a Box" in line


@pytest.mark.parametrize(
    "argv",
    [
        ["--total-steps", "0"],
        ["--num-envs", "-1"],
        ["--batch-size", "512", "--buffer-size", "256"],
        ["--tau", "0"],
        ["--eval-only"],
    ],
)
def test_invalid_arguments_are_one_line_errors(argv, capsys, log_dir):
    run_bad([*argv, "--log-dir", log_dir], capsys)


def test_missing_checkpoint_is_one_line_error(capsys, tmp_path):
    line = run_bad(["--checkpoint", str(tmp_path / "nope.pt"), "--eval-only"], capsys)
    assert "not found" in line


def test_checkpoint_of_another_env_or_algorithm_is_refused(capsys, log_dir):
    out = sac.train(small_args(log_dir, total_steps=150, eval_every=0))
    model = os.path.join(out["run_dir"], "model.pt")
    line = run_bad(["--checkpoint", model, "--eval-only", "--env", "Hopper-v5"], capsys)
    assert "Pendulum-v1" in line
    payload = torch.load(model, weights_only=True)
    payload["algo"] = "ppo"
    other = os.path.join(out["run_dir"], "other.pt")
    torch.save(payload, other)
    line = run_bad(["--checkpoint", other, "--eval-only"], capsys)
    assert "ppo" in line


# -- learning -----------------------------------------------------------------------------
@pytest.mark.slow
def test_learns_pendulum(log_dir):
    """Budget: 6000 env steps (1000 random), 64-64 networks, learning rates 1e-3, seed 1;
    threshold: the final deterministic evaluation (10 episodes) >= -300 (a random policy
    scores about -1200; seeds 1, 2 and 3 reach -135, -122 and -132 with this budget)."""
    args = small_args(
        log_dir,
        total_steps=6_000,
        learning_starts=1_000,
        batch_size=128,
        hidden_sizes=(64, 64),
        q_lr=1e-3,
        policy_lr=1e-3,
        alpha_lr=1e-3,
        eval_every=0,
        eval_episodes=10,
        log_every=1000,
        checkpoint_every=0,
    )
    out = sac.train(args)
    assert out["eval_return"] >= -300


class RecordingWriter:
    """Stands in for SummaryWriter: keeps every add_scalar call."""

    def __init__(self):
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.setdefault(tag, []).append((step, float(value)))


def test_progress_averages_each_metric_over_its_own_updates(capsys):
    """Critic metrics arrive every update, actor metrics every other one (--policy-frequency 2):
    each is the mean of its own values, not of its sum over all updates."""
    writer = RecordingWriter()
    progress = sac.Run(sac.Args(), None, model={}, train_state={}, act=None)
    progress.writer, progress.last = writer, (0.0, 0, 0)
    critic_q, actor_alpha = [1.0, 2.0, 3.0, 6.0], [0.5, 0.1]
    for i, q in enumerate(critic_q):
        progress.add_metrics({"losses/q": torch.tensor(q)})
        if i % 2 == 1:
            progress.add_metrics({"stats/alpha": torch.tensor(actor_alpha[i // 2])})
    progress.log(global_step=100, num_updates=4)
    assert writer.scalars["losses/q"] == [(100, pytest.approx(sum(critic_q) / 4))]
    assert writer.scalars["stats/alpha"] == [(100, pytest.approx(sum(actor_alpha) / 2))]
    progress.add_metrics({"losses/q": torch.tensor(10.0)})  # a new window starts from zero
    progress.log(global_step=200, num_updates=5)
    assert writer.scalars["losses/q"][-1] == (200, pytest.approx(10.0))
    assert "step 200" in capsys.readouterr().out
