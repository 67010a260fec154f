"""Tests for mpo.py: the math against independent computations, then short end-to-end runs.

Run: pytest tests/test_mpo.py (about 1 minute of CPU time, 40 s of it the slow-marked learning
test; 2.5 minutes of wall time on a 2-core machine shared with other jobs).
"""

import copy
import glob
import math
import os
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch

from mpo import (
    Args,
    Batch,
    CategoricalActor,
    Critic,
    GaussianActor,
    SnippetReplay,
    e_step_weights,
    gaussian_kl_decoupled,
    gaussian_log_prob,
    load_checkpoint,
    load_state,
    main,
    make_env,
    retrace_target,
    temperature_dual,
    train,
    update,
)

# Small settings that keep every end-to-end run to seconds.
TINY = dict(
    policy_hidden_sizes=(16, 16),
    critic_hidden_sizes=(16, 16),
    buffer_size=10_000,
    batch_size=8,
    num_samples=4,
    retrace_steps=3,
    eval_episodes=1,
    log_every=100,
    eval_every=0,
)


# -- helpers -------------------------------------------------------------------------------
def inverse_softplus(y: float) -> float:
    """x with log(1 + exp(x)) = y."""
    return math.log(math.expm1(y))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def golden_section_min(f, lo: float, hi: float, iters: int = 200) -> float:
    """Minimiser of a unimodal f on [lo, hi] by golden-section search."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2


def random_tril(batch: int, dim: int, gen: torch.Generator, diagonal: bool) -> torch.Tensor:
    """Lower-triangular factors with a positive diagonal [batch, dim, dim], float64."""
    raw = torch.randn(batch, dim, dim, generator=gen, dtype=torch.float64)
    diag = torch.rand(batch, dim, generator=gen, dtype=torch.float64) + 0.3
    off = torch.zeros_like(raw) if diagonal else raw.tril(-1)
    return off + torch.diag_embed(diag)


def one_step_batch(obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor) -> Batch:
    """Snippets of one step (T = 1) from obs [B, O], stored actions [B, A] and rewards [B], not terminated, with
    next_obs = obs: the Retrace target is then r + gamma V'(s')."""
    zeros = torch.zeros_like(rewards)
    steps = [obs, actions, zeros, rewards, obs, zeros, torch.ones_like(rewards)]
    return Batch(*(x.unsqueeze(1) for x in steps))


def one_critic(q_function):
    """A Q-function [...] as the critic ensemble of one that `update` reads: [1, ...]."""
    return lambda obs, actions: q_function(obs, actions).unsqueeze(0)


def assert_critic_step(critic, before, obs, critic_actions, target, lr):
    """critic is its snapshot `before` after one SGD step (lr) on (Q(s, a) - target)^2 / 2, from autograd."""
    loss = 0.5 * (before(obs, critic_actions) - target).pow(2).mean()
    grads = torch.autograd.grad(loss, list(before.parameters()))
    for new, old, grad in zip(critic.parameters(), before.parameters(), grads, strict=True):
        assert torch.allclose(new, old - lr * grad, rtol=1e-6, atol=1e-7)
    assert any(g.abs().max() > 1e-3 for g in grads)  # the step is not trivially zero


# -- E-step: the temperature dual ------------------------------------------------------------
@pytest.mark.parametrize("prior", ["samples", "categorical"])
def test_dual_minimiser_matches_bisection_and_puts_kl_at_epsilon(prior):
    """The minimiser of temperature_dual (found by golden-section search on it) equals the root
    of g'(eta) = epsilon - mean_s KL(q_eta || prior), found by bisection on a numpy float64
    formula written from the derivation, and the weights at it have KL(q || prior) = epsilon."""
    rng = np.random.default_rng(0)
    num_states, num_actions, epsilon = 16, 20, 0.1
    q = rng.normal(0.0, 3.0, (num_states, num_actions))
    if prior == "samples":  # M samples of pi: every sample has prior weight 1 / M
        log_prior = np.full((num_states, num_actions), -np.log(num_actions))
    else:  # a categorical pi: the prior of each enumerated action is pi(a|s)
        logits = rng.normal(0.0, 1.0, (num_states, num_actions))
        log_prior = logits - np.log(np.exp(logits).sum(1, keepdims=True))

    def kl_at(eta: float) -> float:
        z = q / eta + log_prior
        w = np.exp(z - z.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        return float(np.mean(np.sum(w * (np.log(w) - log_prior), axis=1)))

    lo, hi = 1e-3, 1e4  # the KL falls monotonically in eta: bisection on log eta
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if kl_at(mid) > epsilon else (lo, mid)
    eta_bisection = math.sqrt(lo * hi)

    q_t, log_prior_t = torch.tensor(q), torch.tensor(log_prior)

    def dual(log_eta: float) -> float:
        eta = torch.tensor(math.exp(log_eta), dtype=torch.float64)
        return float(temperature_dual(eta, q_t, log_prior_t, epsilon))

    eta_dual = math.exp(golden_section_min(dual, math.log(1e-3), math.log(1e4)))
    assert eta_dual == pytest.approx(eta_bisection, rel=1e-6)  # a flat minimum: not 1e-12
    weights = e_step_weights(q_t, torch.tensor(eta_bisection), log_prior_t).numpy()
    assert np.allclose(weights.sum(1), 1.0)
    kl = np.mean(np.sum(weights * (np.log(weights) - log_prior), axis=1))
    assert kl == pytest.approx(epsilon, rel=1e-6)


# -- Gaussian policy: log-probability and the decoupled KL ------------------------------------
@pytest.mark.parametrize("diagonal", [True, False])
def test_decoupled_kl_terms_sum_to_torch_kl(diagonal):
    """C_mean + C_cov = KL(pi_old || pi) from torch.distributions; each part alone is the KL
    when the other parameter is unchanged (C_cov: same mean; C_mean: same covariance)."""
    gen = torch.Generator().manual_seed(1)
    batch, dim = 32, 4
    mean_old = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    mean = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    tril_old = random_tril(batch, dim, gen, diagonal)
    tril = random_tril(batch, dim, gen, diagonal)
    mvn = torch.distributions.MultivariateNormal
    kl_mean, kl_cov = gaussian_kl_decoupled(mean_old, tril_old, mean, tril)
    expected = torch.distributions.kl_divergence(mvn(mean_old, scale_tril=tril_old), mvn(mean, scale_tril=tril))
    assert torch.allclose(kl_mean + kl_cov, expected, rtol=1e-10)
    cov_only = torch.distributions.kl_divergence(mvn(mean_old, scale_tril=tril_old), mvn(mean_old, scale_tril=tril))
    assert torch.allclose(kl_cov, cov_only, rtol=1e-10)
    same_cov = gaussian_kl_decoupled(mean_old, tril_old, mean, tril_old)
    mean_only = torch.distributions.kl_divergence(mvn(mean_old, scale_tril=tril_old), mvn(mean, scale_tril=tril_old))
    assert torch.allclose(same_cov[0], mean_only, rtol=1e-10)
    assert torch.allclose(same_cov[1], torch.zeros(batch, dtype=torch.float64), atol=1e-12)
    if diagonal:  # the diagonal policy's KL is also the sum of per-dimension Normal KLs
        std_old, std = tril_old.diagonal(dim1=-2, dim2=-1), tril.diagonal(dim1=-2, dim2=-1)
        normal = torch.distributions.Normal
        per_dim = torch.distributions.kl_divergence(normal(mean_old, std_old), normal(mean, std))
        assert torch.allclose(kl_mean + kl_cov, per_dim.sum(-1), rtol=1e-10)


@pytest.mark.parametrize("diagonal", [True, False])
def test_gaussian_log_prob_matches_torch(diagonal):
    gen = torch.Generator().manual_seed(2)
    batch, samples, dim = 8, 5, 3
    mean = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    tril = random_tril(batch, dim, gen, diagonal)
    actions = torch.randn(batch, samples, dim, generator=gen, dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(mean.unsqueeze(1), scale_tril=tril.unsqueeze(1))
    assert torch.allclose(gaussian_log_prob(actions, mean, tril), dist.log_prob(actions), rtol=1e-10)


def test_gaussian_actor_samples_have_the_policy_covariance():
    """Samples of the full-covariance actor have covariance L L^T (Monte Carlo, 200k draws),
    so candidates, log_prob and the Cholesky parameterisation agree."""
    actor = GaussianActor(3, make_env("Pendulum-v1").action_space, (8,), "relu", False, True)
    torch.manual_seed(0)
    with torch.no_grad():
        params = actor(torch.randn(1, 3))
        actions, log_prior = actor.candidates(params, 200_000)
    expected = (params[1] @ params[1].transpose(-2, -1))[0]
    assert torch.allclose(actions[0].T.cov(), expected, rtol=0.02)  # 200k samples: ~0.5% noise
    assert torch.allclose(actions[0].mean(0), params[0][0], atol=0.01)
    assert torch.allclose(log_prior.exp().sum(-1), torch.ones(1))


# -- Retrace ---------------------------------------------------------------------------------
def random_snippets(batch: int, steps: int, seed: int) -> dict[str, torch.Tensor]:
    """Snippets as SnippetReplay returns them: a valid prefix of random length whose last step
    may terminate (then the snippet stops; a truncation also stops it but bootstraps)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
    valid = (torch.arange(steps) < lengths.unsqueeze(1)).double()
    terminated = torch.zeros(batch, steps, dtype=torch.float64)
    ends = torch.rand(batch, generator=gen) < 0.5
    terminated[ends, lengths[ends] - 1] = 1.0

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "rewards": rand(batch, steps),
        "terminated": terminated,
        "valid": valid,
        "q_taken": rand(batch, steps),
        "next_v": rand(batch, steps),
        "traces": torch.rand(batch, steps, generator=gen, dtype=torch.float64),
    }


def test_retrace_matches_double_loop_over_eq13():
    """Every step's target equals eq. 13 written as a plain double loop:
    Q_ret(t) = Q'(t) + sum_{j >= t} gamma^(j-t) (prod_{k=t+1..j} c_k) delta_j,
    delta_j = r_j + gamma (1 - terminated_j) V'(s'_j) - Q'(j), the sum over the snippet."""
    gamma, batch, steps = 0.9, 64, 6
    data = random_snippets(batch, steps, seed=3)
    got = retrace_target(**data, gamma=gamma)
    d = {k: v.tolist() for k, v in data.items()}
    for b in range(batch):
        length = int(sum(d["valid"][b]))
        for t in range(steps):
            if t >= length:
                assert got[b, t] == 0.0
                continue
            total, coeff = d["q_taken"][b][t], 1.0
            for j in range(t, length):
                if j > t:
                    coeff *= gamma * d["traces"][b][j]
                delta = d["rewards"][b][j] + gamma * (1.0 - d["terminated"][b][j]) * d["next_v"][b][j] - d["q_taken"][b][j]
                total += coeff * delta
            assert got[b, t].item() == pytest.approx(total, abs=1e-12)


def test_retrace_is_n_step_return_when_pi_is_b_and_traces_are_one():
    """With pi = b deterministic, c = 1 and V'(s_j) = Q'(s_j, a_j): the N-step return
    sum_j gamma^j r_j + gamma^L V'(s_L), no bootstrap after a termination."""
    gamma, batch, steps = 0.95, 64, 5
    data = random_snippets(batch, steps, seed=4)
    data["traces"] = torch.ones(batch, steps, dtype=torch.float64)
    data["q_taken"][:, 1:] = data["next_v"][:, :-1]  # Q'(s_{j+1}, a_{j+1}) = V'(s'_j)
    got = retrace_target(**data, gamma=gamma)[:, 0]
    for b in range(batch):
        length = int(data["valid"][b].sum())
        expected = sum(gamma**j * data["rewards"][b, j].item() for j in range(length))
        if data["terminated"][b, length - 1] == 0:
            expected += gamma**length * data["next_v"][b, length - 1].item()
        assert got[b].item() == pytest.approx(expected, abs=1e-12)


def test_retrace_is_one_step_target_when_traces_are_zero():
    gamma, batch, steps = 0.99, 64, 5
    data = random_snippets(batch, steps, seed=5)
    data["traces"] = torch.zeros(batch, steps, dtype=torch.float64)
    got = retrace_target(**data, gamma=gamma)
    expected = data["rewards"] + gamma * (1 - data["terminated"]) * data["next_v"]
    assert torch.allclose(got, expected * data["valid"], atol=1e-12)


# -- Categorical MPO by hand -----------------------------------------------------------------
@pytest.mark.parametrize("num_critics", [1, 2])
def test_categorical_e_and_m_step_match_hand_computation(num_critics):
    """One update step on a single state with 3 actions and plain SGD, against the
    hand-derived quantities: q(a) = pi_old(a) exp(Q(a)/eta) / Z; the logits move by
    -[(p - q) + alpha (p - p_old)]; the parameter x of eta = softplus(x) + 1e-8 by
    -sigmoid(x) g'(eta) with g'(eta) = epsilon + log Z - sum_a q(a) Q(a) / eta; that of alpha
    by -sigmoid(x) (epsilon_mean - KL(p_old || p)); the critic by one step on
    (Q(s, a) - r - gamma sum_a' p_old(a') Q'(a'))^2 / 2 (a one-step snippet). With two critics Q' is the minimum of
    two target tables, each above it at some action, and each critic steps to the same target."""
    logits_old, logits = [0.2, -0.5, 1.0], [0.6, -0.1, 0.4]
    q_values, eta, alpha, epsilon, epsilon_mean = [1.0, 2.0, 0.5], 0.7, 2.0, 0.1, 0.05
    p_old = [math.exp(x) / sum(math.exp(y) for y in logits_old) for x in logits_old]
    p = [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]
    unnormalised = [p_old[a] * math.exp(q_values[a] / eta) for a in range(3)]
    z = sum(unnormalised)
    q = [u / z for u in unnormalised]
    kl = sum(p_old[a] * math.log(p_old[a] / p[a]) for a in range(3))
    grad_logits = [(p[a] - q[a]) + alpha * (p[a] - p_old[a]) for a in range(3)]
    dual_slope = epsilon + math.log(z) - sum(q[a] * q_values[a] for a in range(3)) / eta
    x_eta, x_alpha = inverse_softplus(eta - 1e-8), inverse_softplus(alpha - 1e-8)

    # the pure functions
    log_prior = torch.tensor([p_old]).log()
    q_t = torch.tensor([q_values])
    weights = e_step_weights(q_t, torch.tensor(eta), log_prior)
    assert weights[0].tolist() == pytest.approx(q, rel=1e-6)
    dual = temperature_dual(torch.tensor(eta), q_t, log_prior, epsilon)
    assert dual.item() == pytest.approx(eta * epsilon + eta * math.log(z), rel=1e-6)
    space = gym.spaces.Discrete(3)
    actor, actor_target = CategoricalActor(2, space, (4,), "relu", False), CategoricalActor(2, space, (4,), "relu", False)
    kl_t, no_cov = actor.kl_terms(torch.tensor([logits_old]), torch.tensor([logits]))
    assert kl_t.item() == pytest.approx(kl, rel=1e-6) and no_cov is None

    # one update step with SGD (lr 1): a step is minus the gradient
    args, reward = Args(epsilon=epsilon, epsilon_mean=epsilon_mean), 0.5
    for net, values in ((actor, logits), (actor_target, logits_old)):
        torch.nn.init.zeros_(net.head.weight)  # logits = bias, whatever the state
        net.head.bias.data = torch.tensor(values)
    actor_target.requires_grad_(False)

    # the target critics' tables: their minimum at every action is q_values
    tables = [q_t] if num_critics == 1 else [q_t + torch.tensor([[0.0, 0.5, 0.3]]), q_t + torch.tensor([[0.4, 0.0, 0.0]])]

    def critic_target(obs: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
        return torch.stack([(one_hot * table).sum(-1) for table in tables])  # Q'_e(s, a) from the tables [E, ...]

    log_eta = torch.tensor(x_eta, requires_grad=True)
    log_alpha_mean = torch.tensor(x_alpha, requires_grad=True)
    log_alpha_cov = torch.tensor(0.0, requires_grad=True)
    critic = Critic(2, 3, (4,), "relu", False, num_critics)
    before = copy.deepcopy(critic)
    optimizers = [torch.optim.SGD(params, lr=1.0) for params in (actor.parameters(), critic.parameters())]
    optimizers.append(torch.optim.SGD([log_eta, log_alpha_mean, log_alpha_cov], lr=1.0))
    batch = one_step_batch(torch.zeros(1, 2), torch.tensor([[2.0]]), torch.tensor([reward]))  # the stored action a = 2
    metrics = update(
        actor, actor_target, critic, critic_target, optimizers, log_eta, log_alpha_mean, log_alpha_cov, batch, args
    )
    expected_logits = [logits[a] - grad_logits[a] for a in range(3)]
    assert actor.head.bias.tolist() == pytest.approx(expected_logits, rel=1e-5)
    assert log_eta.item() == pytest.approx(x_eta - sigmoid(x_eta) * dual_slope, rel=1e-5)
    expected_x_alpha = x_alpha - sigmoid(x_alpha) * (epsilon_mean - kl)
    assert log_alpha_mean.item() == pytest.approx(expected_x_alpha, rel=1e-5)
    assert log_alpha_cov.item() == 0.0  # a categorical policy has no covariance bound
    assert metrics["stats/kl_mean"].item() == pytest.approx(kl, rel=1e-5)
    target = reward + args.gamma * sum(p_old[a] * q_values[a] for a in range(3))
    for member, member_before in zip(critic.members, before.members, strict=True):
        assert_critic_step(member, member_before, torch.zeros(1, 2), torch.tensor([[0.0, 0.0, 1.0]]), target, lr=1.0)


@pytest.mark.parametrize("diagonal", [True, False])
def test_gaussian_e_and_m_step_match_an_independent_lagrangian(diagonal):
    """One update step (plain SGD) on a Gaussian policy with fixed candidate actions,
    against the same step computed independently: numpy E-step weights softmax_j(Q_j / eta);
    the policy's step from autograd of -mean_s sum_j q_j log N(a_j; mu, Sigma)
    + alpha_mean mean_s (mu - mu_old)^T Sigma^-1 (mu - mu_old) / 2 (explicit inverse)
    + alpha_cov mean_s KL(N(mu_old, Sigma_old) || N(mu_old, Sigma)) (torch.distributions);
    the duals' steps from the closed-form slopes of g(eta) and of alpha (epsilon - C); the
    critic's from autograd of (Q(s, clip(a)) - r - gamma mean_j Q'(s, a_j))^2 / 2."""
    torch.manual_seed(7)
    num_states, num_samples, dim, lr = 3, 6, 2, 0.1
    eta, alpha_mean, alpha_cov = 0.8, 3.0, 50.0
    epsilon, epsilon_mean, epsilon_cov = 0.1, 0.05, 1e-3
    space = gym.spaces.Box(-1.0, 1.0, (dim,), np.float32)
    policy = (2, space, (4,), "relu", False, not diagonal)
    # the samples of pi' at s_0 and at s'_0 of each one-step snippet, in update's order (s_0, s'_0 per snippet)
    fixed = torch.randn(num_states, 2, num_samples, dim, dtype=torch.float64)

    class FixedCandidates(GaussianActor):
        """pi' whose M 'samples' are the fixed actions, so the test knows them."""

        def candidates(self, params, num_samples):
            assert len(params[0]) == 2 * num_states
            flat = fixed.flatten(0, 1)
            return flat, torch.full(flat.shape[:-1], -math.log(num_samples), dtype=fixed.dtype)

    actor = GaussianActor(*policy).double()
    actor_target = FixedCandidates(*policy).double().requires_grad_(False)
    before = copy.deepcopy(actor)
    obs = torch.randn(num_states, 2, dtype=torch.float64)

    def critic_target(obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return -3.0 * (actions - 0.3).pow(2).sum(-1)  # [B, M] from clipped actions [B, M, A]

    q, q_next = critic_target(None, fixed.clamp(-1, 1)).unbind(1)  # the E-step's at s_0, V''s at s'_0 [B, M] each
    q = q.numpy()
    # independent E-step: weights and the dual's slope g'(eta) = eps + mean_s (log Z - E_q Q/eta)
    log_z = np.log(np.mean(np.exp(q / eta), axis=1))
    w = np.exp(q / eta - log_z[:, None]) / num_samples
    dual_slope = epsilon + np.mean(log_z - np.sum(w * q, axis=1) / eta)
    # independent M-step Lagrangian on the snapshot of the policy
    mvn = torch.distributions.MultivariateNormal
    with torch.no_grad():
        mean_old, tril_old = actor_target(obs)
    mean, tril = before(obs)
    sigma = tril @ tril.transpose(-2, -1)
    log_lik = mvn(mean.unsqueeze(1), scale_tril=tril.unsqueeze(1)).log_prob(fixed[:, 0])  # [B, M]
    diff = (mean - mean_old).unsqueeze(-1)
    c_mean = 0.5 * (diff.transpose(-2, -1) @ torch.linalg.inv(sigma) @ diff).flatten()
    c_cov = torch.distributions.kl_divergence(mvn(mean_old, scale_tril=tril_old), mvn(mean_old, scale_tril=tril))
    lagrangian = -(torch.tensor(w) * log_lik).sum(1).mean() + alpha_mean * c_mean.mean() + alpha_cov * c_cov.mean()
    grads = torch.autograd.grad(lagrangian, list(before.parameters()))

    def dual_param(value: float) -> torch.Tensor:
        return torch.tensor(inverse_softplus(value - 1e-8), dtype=torch.float64, requires_grad=True)

    log_eta, log_alpha_mean, log_alpha_cov = map(dual_param, (eta, alpha_mean, alpha_cov))
    x = [p.item() for p in (log_eta, log_alpha_mean, log_alpha_cov)]
    critic = Critic(2, dim, (4,), "relu", False, 1).double()
    before_critic = copy.deepcopy(critic)
    stored, rewards = 2 * torch.randn(num_states, dim, dtype=torch.float64), torch.randn(num_states, dtype=torch.float64)
    optimizers = [torch.optim.SGD(params, lr=lr) for params in (actor.parameters(), critic.parameters())]
    optimizers.append(torch.optim.SGD([log_eta, log_alpha_mean, log_alpha_cov], lr=lr))
    args = Args(num_samples=num_samples, epsilon=epsilon, epsilon_mean=epsilon_mean, epsilon_cov=epsilon_cov)
    batch = one_step_batch(obs, stored, rewards)
    update(
        actor, actor_target, critic, one_critic(critic_target), optimizers, log_eta, log_alpha_mean, log_alpha_cov, batch, args
    )
    for new, old, grad in zip(actor.parameters(), before.parameters(), grads):
        assert torch.allclose(new, old - lr * grad, rtol=1e-9, atol=1e-12)
    assert any(g.abs().max() > 1e-3 for g in grads)  # the step is not trivially zero
    c_mean, c_cov = c_mean.mean().item(), c_cov.mean().item()
    assert log_eta.item() == pytest.approx(x[0] - lr * sigmoid(x[0]) * dual_slope, rel=1e-9)
    expected = x[1] - lr * sigmoid(x[1]) * (epsilon_mean - c_mean)
    assert log_alpha_mean.item() == pytest.approx(expected, rel=1e-9)
    expected = x[2] - lr * sigmoid(x[2]) * (epsilon_cov - c_cov)
    assert log_alpha_cov.item() == pytest.approx(expected, rel=1e-9)
    target = rewards + args.gamma * q_next.mean(1)  # V'(s') = mean_j Q'(s', a_j) over the fixed samples of pi' at s'
    assert_critic_step(critic, before_critic, obs, stored.clamp(-1, 1), target, lr)


# -- Every step of the snippets trains, one sample set per state -----------------------------
@pytest.mark.parametrize("policy", ["gaussian", "categorical"])
def test_all_steps_update_matches_a_per_step_loop(policy):
    """One update (plain SGD) on snippets of T = 3 steps with early ends, against the same step
    computed by plain per-step loops: pi' evaluated state by state, the trace
    c_t = lambda min(1, pi'(a_t|s_t) / b(a_t|s_t)) and the Retrace target by the backward recursion
    Q_ret(t) = r_t + gamma (1 - term_t) [V'(s'_t) + c_{t+1} (Q_ret(t+1) - Q'(s_{t+1}, a_{t+1}))];
    the loss the mean over every valid step t of (Q(s_t, a_t) - Q_ret(t))^2 / 2 - sum_j q_j log pi(a_j|s_t)
    + alpha_mean C_mean + alpha_cov C_cov (torch.distributions); the duals' closed-form slopes. A Gaussian pi'
    has fixed samples per state s_0 .. s_T of each snippet: those at s_t serve both V'(s'_{t-1}) and the
    E-step at s_t [MPO Alg. 2, l. 11]; a categorical pi' enumerates its actions."""
    gen = torch.Generator().manual_seed(11)
    num_snippets, steps, obs_dim, num_samples, lr, gamma, lam = 4, 3, 2, 5, 0.1, 0.9, 0.8
    eta, alpha_mean, alpha_cov, epsilon, epsilon_mean, epsilon_cov = 0.8, 3.0, 50.0, 0.1, 0.05, 1e-3

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    w_obs = rand(obs_dim)
    if policy == "gaussian":
        dim = 2
        space = gym.spaces.Box(-1.0, 1.0, (dim,), np.float32)
        fixed = rand(num_snippets, steps + 1, num_samples, dim)  # pi''s samples at s_0 .. s_T of each snippet

        class Policy(GaussianActor):
            def candidates(self, params, m):
                assert len(params[0]) == num_snippets * (steps + 1)
                flat = fixed.flatten(0, 1)
                return flat, torch.full(flat.shape[:-1], -math.log(m), dtype=flat.dtype)

        actor, actor_target = GaussianActor(2, space, (4,), "relu", False, True), Policy(2, space, (4,), "relu", False, True)
        stored = 1.5 * rand(num_snippets, steps, dim)  # some outside [-1, 1]: the critic sees them clipped

        def critic_target(obs, critic_actions):
            return -3.0 * (critic_actions - 0.3).pow(2).sum(-1) + (obs * w_obs).sum(-1)

        def candidate_values(b, t, state):  # (actions [M, A], their log prior, Q' [M]) at state s_t of snippet b
            a = fixed[b, t]
            return a, torch.full((num_samples,), -math.log(num_samples), dtype=a.dtype), critic_target(state, a.clamp(-1, 1))

        def distribution(params):
            return torch.distributions.MultivariateNormal(params[0][0], scale_tril=params[1][0])

    else:
        dim, table = 1, rand(3)
        space = gym.spaces.Discrete(3)
        actor, actor_target = CategoricalActor(2, space, (4,), "relu", False), CategoricalActor(2, space, (4,), "relu", False)
        stored = torch.randint(0, 3, (num_snippets, steps, 1), generator=gen).double()

        def critic_target(obs, one_hot):
            return (one_hot * table).sum(-1) + (obs * w_obs).sum(-1)

        def candidate_values(b, t, state):
            a = torch.arange(3, dtype=torch.float64).unsqueeze(-1)
            return a, actor_target(state[None])[0].log_softmax(-1), table + (state * w_obs).sum()

        def distribution(params):
            return torch.distributions.Categorical(logits=params[0])

    actor, actor_target = actor.double(), actor_target.double().requires_grad_(False)
    critic = Critic(2, actor.critic_action_dim, (4,), "relu", False, 1).double()
    before_actor, before_critic = copy.deepcopy(actor), copy.deepcopy(critic)
    # snippets as SnippetReplay returns them: s_{t+1} = s'_t while valid, anything after the end
    lengths, terminated = torch.tensor([3, 1, 2, 3]), torch.zeros(num_snippets, steps, dtype=torch.float64)
    terminated[1, 0] = terminated[3, 2] = 1.0
    valid = (torch.arange(steps) < lengths.unsqueeze(1)).double()
    next_obs, obs = rand(num_snippets, steps, obs_dim), rand(num_snippets, steps, obs_dim)
    obs[:, 1:] = torch.where(valid[:, 1:, None].bool(), next_obs[:, :-1], obs[:, 1:])
    with torch.no_grad():
        log_pi = [[distribution(actor_target(obs[b, t][None])).log_prob(stored[b, t] if dim > 1 else stored[b, t, 0]).item()
                   for t in range(steps)] for b in range(num_snippets)]  # fmt: skip
    behaviour = torch.tensor(log_pi) + 0.5 * rand(num_snippets, steps)  # pi / b on both sides of 1
    rewards = rand(num_snippets, steps)
    batch = Batch(obs, stored, behaviour, rewards, next_obs, terminated, valid)

    # the per-step loops
    def q_target(state, action):  # Q'(s, a) of a stored action
        return critic_target(state, actor.critic_input(action[None]))[0]

    loss, pairs, slopes, kls = 0.0, 0, [], [[], []]
    for b in range(num_snippets):
        length, q_ret = int(lengths[b]), [0.0] * steps
        for t in reversed(range(length)):
            with torch.no_grad():
                _, log_prior, q_next = candidate_values(b, t + 1, next_obs[b, t])
                bootstrap = (log_prior.exp() * q_next).sum()  # V'(s'_t)
                if t + 1 < length:
                    trace = lam * min(1.0, math.exp(log_pi[b][t + 1] - behaviour[b, t + 1].item()))
                    bootstrap = bootstrap + trace * (q_ret[t + 1] - q_target(obs[b, t + 1], stored[b, t + 1]))
                q_ret[t] = rewards[b, t] + gamma * (1 - terminated[b, t]) * bootstrap
        for t in range(length):
            state = obs[b, t]
            q = before_critic(state[None], actor.critic_input(stored[b, t][None]))[0]
            with torch.no_grad():
                actions, log_prior, q_candidates = candidate_values(b, t, state)
                log_z = torch.logsumexp(q_candidates / eta + log_prior, 0)
                weights = (q_candidates / eta + log_prior - log_z).exp()
                slopes.append(epsilon + log_z - (weights * q_candidates).sum() / eta)
                old = distribution(actor_target(state[None]))
            new = distribution(before_actor(state[None]))
            log_lik = new.log_prob(actions if dim > 1 else actions[:, 0])
            loss = loss + 0.5 * (q - q_ret[t]).pow(2) - (weights * log_lik).sum()
            if dim > 1:  # C_mean with the online covariance, C_cov with the old mean [MPO eq. 27]
                diff = new.mean - old.mean
                kls[0].append(0.5 * diff @ torch.linalg.solve(new.covariance_matrix, diff))
                kls[1].append(torch.distributions.kl_divergence(old, type(new)(old.mean, scale_tril=new.scale_tril)))
            else:
                kls[0].append(torch.distributions.kl_divergence(old, new))
            pairs += 1
    c_mean = torch.stack(kls[0]).mean()
    loss = loss / pairs + alpha_mean * c_mean
    if dim > 1:
        c_cov = torch.stack(kls[1]).mean()
        loss = loss + alpha_cov * c_cov
    params = [*before_actor.parameters(), *before_critic.parameters()]
    grads = torch.autograd.grad(loss, params)

    def dual_param(value: float) -> torch.Tensor:
        return torch.tensor(inverse_softplus(value - 1e-8), dtype=torch.float64, requires_grad=True)

    duals = [dual_param(x) for x in (eta, alpha_mean, alpha_cov)]
    x = [p.item() for p in duals]
    optimizers = [torch.optim.SGD(p, lr=lr) for p in (actor.parameters(), critic.parameters(), duals)]
    args = Args(num_samples=num_samples, epsilon=epsilon, epsilon_mean=epsilon_mean, epsilon_cov=epsilon_cov, gamma=gamma)
    args.retrace_lambda = lam
    update(actor, actor_target, critic, one_critic(critic_target), optimizers, *duals, batch, args)
    for new, old, grad in zip([*actor.parameters(), *critic.parameters()], params, grads, strict=True):
        assert torch.allclose(new, old - lr * grad, rtol=1e-9, atol=1e-12)
    assert all(g.abs().max() > 1e-3 for g in grads[-2:])  # the critic's head moves
    assert duals[0].item() == pytest.approx(x[0] - lr * sigmoid(x[0]) * torch.stack(slopes).mean().item(), rel=1e-9)
    assert duals[1].item() == pytest.approx(x[1] - lr * sigmoid(x[1]) * (epsilon_mean - c_mean.item()), rel=1e-9)
    if dim > 1:
        assert duals[2].item() == pytest.approx(x[2] - lr * sigmoid(x[2]) * (epsilon_cov - c_cov.item()), rel=1e-9)


@pytest.fixture
def float64_one_thread():
    """float64 as torch's default dtype (the noise of GaussianActor.candidates then matches double networks), one torch
    thread (small networks in a loop, not the machine's contended cores), the global RNG restored afterwards."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


def test_shared_sample_sets_update_is_unbiased_against_separate_ones(float64_one_thread):
    """update draws ONE set of M actions a_j ~ pi'(.|s) per state s_0 .. s_T of each snippet and uses the set at
    s_{t+1} = s'_t for both integrals of [MPO] Abdolmaleki et al. 2018, arXiv:1806.06920, Alg. 2 line 11: V'(s'_t) =
    E_pi' Q'(s'_t, .) in the Retrace target of step t (eq. 13) and the E-step at s_{t+1} (weights and dual g(eta), eq. 8-9);
    the paper draws separate sets. Sharing is unbiased: the critic's loss depends on the samples only through V', g(eta)
    and the M-step's loss only through the E-step's sets, and either group of sets has the same distribution (independent
    draws of pi' at each state) shared or not, so each loss's expected gradient is unchanged. As the losses act on
    disjoint parameters (the critic; the actor and eta), each parameter's step even keeps its distribution: sharing
    changes only the joint one of the critic's step and the E-step's.
    Estimator A: `draws` plain-SGD updates from the same start, with fresh samples of the real pi' (Gaussian, full
    covariance); the changes / -lr are the gradients. Estimator B, written here: per draw two independent sets per state
    from torch.distributions.MultivariateNormal(pi''s mean, scale_tril), one for V'(s'_t) in the per-step Retrace
    recursion, one for the E-step at s_t; the loss of test_all_steps_update_matches_a_per_step_loop; autograd.
    Checks: the means over the draws agree within 4.5 standard errors of their difference, on a random projection of
    each parameter's gradient and on eta's; the critic's head-bias gradient (the mean TD error, linear in V') and eta's
    are correlated across A's draws, beyond 4 / sqrt(draws), and not across B's."""
    gen = torch.Generator().manual_seed(3)
    num_snippets, steps, obs_dim, dim, num_samples, lr, gamma, lam, draws = 4, 3, 2, 2, 5, 0.1, 0.9, 0.8, 1000
    eta, alpha_mean, alpha_cov, epsilon, epsilon_mean, epsilon_cov = 0.8, 3.0, 50.0, 0.1, 0.05, 1e-3

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    w_obs = rand(obs_dim)

    def critic_target(obs, critic_actions):
        return -3.0 * (critic_actions - 0.3).pow(2).sum(-1) + (obs * w_obs).sum(-1)

    torch.manual_seed(3)
    space = gym.spaces.Box(-1.0, 1.0, (dim,), np.float32)
    actor = GaussianActor(obs_dim, space, (4,), "relu", False, True).double()
    actor_target = GaussianActor(obs_dim, space, (4,), "relu", False, True).double().requires_grad_(False)
    critic = Critic(obs_dim, dim, (4,), "relu", False, 1).double()
    duals = [torch.tensor(inverse_softplus(value - 1e-8), requires_grad=True) for value in (eta, alpha_mean, alpha_cov)]
    params = [*actor.parameters(), *critic.parameters()]
    start = [p.detach().clone() for p in (*params, *duals)]  # every draw starts here
    directions = [rand(*p.shape) for p in params]
    # snippets as SnippetReplay returns them (as test_all_steps_update_matches_a_per_step_loop): one early end, two ends
    # by termination; s_{t+1} = s'_t while valid, some stored actions outside [-1, 1] (the critic sees them clipped)
    lengths, terminated = torch.tensor([3, 1, 2, 3]), torch.zeros(num_snippets, steps)
    terminated[1, 0] = terminated[3, 2] = 1.0
    valid = (torch.arange(steps) < lengths.unsqueeze(1)).double()
    next_obs, obs = rand(num_snippets, steps, obs_dim), rand(num_snippets, steps, obs_dim)
    obs[:, 1:] = torch.where(valid[:, 1:, None].bool(), next_obs[:, :-1], obs[:, 1:])
    stored = 1.5 * rand(num_snippets, steps, dim)
    normal = torch.distributions.MultivariateNormal

    def policy(net, states):  # pi(.|s) as a torch distribution
        mean, tril = net(states)
        return normal(mean, scale_tril=tril)

    with torch.no_grad():
        pi_old, pi_next = policy(actor_target, obs), policy(actor_target, next_obs)
        log_pi = pi_old.log_prob(stored)  # log pi'(a_t|s_t) [S, T]
    behaviour = log_pi + 0.5 * rand(num_snippets, steps)  # pi / b on both sides of 1
    rewards = rand(num_snippets, steps)
    batch = Batch(obs, stored, behaviour, rewards, next_obs, terminated, valid)

    def summary(grads, eta_grad):  # the statistics compared: projections, eta's, the critic's head bias
        return torch.stack([*((g * u).sum() for g, u in zip(grads, directions, strict=True)), eta_grad, grads[-1][0]])

    # A: update, from the same start in every draw
    optimizers = [torch.optim.SGD(p, lr=lr) for p in (actor.parameters(), critic.parameters(), duals)]
    args = Args(num_samples=num_samples, epsilon=epsilon, epsilon_mean=epsilon_mean, epsilon_cov=epsilon_cov, gamma=gamma)
    args.retrace_lambda = lam

    def restart():
        with torch.no_grad():
            for p, p0 in zip([*params, *duals], start, strict=True):
                p.copy_(p0)

    stats_a = []
    for _ in range(draws):
        restart()
        update(actor, actor_target, critic, one_critic(critic_target), optimizers, *duals, batch, args)
        with torch.no_grad():  # SGD: the change is -lr times the gradient
            grads = [(p0 - p) / lr for p, p0 in zip([*params, duals[0]], start)]
            stats_a.append(summary(grads[:-1], grads[-1]))
    stats_a = torch.stack(stats_a)

    # B: two independent sets per state and draw, the per-step recursion of eq. 13, autograd
    restart()
    with torch.no_grad():
        e_actions = pi_old.sample((draws, num_samples)).movedim(1, -2)  # the E-step's at s_t [K, S, T, M, A]
        v_actions = pi_next.sample((draws, num_samples)).movedim(1, -2)  # V''s at s'_t, independent of them
        v_next = critic_target(next_obs.unsqueeze(-2), v_actions.clamp(-1, 1)).mean(-1)  # V'(s'_t) [K, S, T]
        q_stored = critic_target(obs, stored.clamp(-1, 1))  # Q'(s_t, a_t) [S, T]
        q_ret = torch.zeros(draws, num_snippets, steps)
        for b in range(num_snippets):
            length = int(lengths[b])
            for t in reversed(range(length)):
                bootstrap = v_next[:, b, t]
                if t + 1 < length:
                    trace = lam * min(1.0, math.exp(log_pi[b, t + 1] - behaviour[b, t + 1]))
                    bootstrap = bootstrap + trace * (q_ret[:, b, t + 1] - q_stored[b, t + 1])
                q_ret[:, b, t] = rewards[b, t] + gamma * (1 - terminated[b, t]) * bootstrap
        keep = valid.bool()
        q_candidates = critic_target(obs.unsqueeze(-2), e_actions.clamp(-1, 1))[:, keep]  # Q'(s_t, a_j) [K, N, M]
        log_z = torch.logsumexp(q_candidates / eta, -1) - math.log(num_samples)
        weights = (q_candidates / eta - math.log(num_samples) - log_z.unsqueeze(-1)).exp()
        slopes = epsilon + (log_z - (weights * q_candidates).sum(-1) / eta).mean(-1)  # g'(eta) [K]
        old = policy(actor_target, obs[keep])
    q, new = critic(obs[keep], stored[keep].clamp(-1, 1)), policy(actor, obs[keep])
    diff = new.mean - old.mean  # C_mean with the online covariance, C_cov with the old mean [MPO eq. 27]
    c_mean = 0.5 * (diff * torch.linalg.solve(new.covariance_matrix, diff)).sum(-1)
    c_cov = torch.distributions.kl_divergence(old, normal(old.mean, scale_tril=new.scale_tril))
    penalty = alpha_mean * c_mean.mean() + alpha_cov * c_cov.mean()
    stats_b, eta_slope = [], sigmoid(start[-3].item())  # d eta / d log_eta
    for k in range(draws):
        log_lik = new.log_prob(e_actions[k, keep].transpose(0, 1)).transpose(0, 1)  # log pi(a_j|s_t) [N, M]
        loss = (0.5 * (q - q_ret[k, keep]).pow(2) - (weights[k] * log_lik).sum(-1)).mean() + penalty
        stats_b.append(summary(torch.autograd.grad(loss, params, retain_graph=True), eta_slope * slopes[k]))
    stats_b = torch.stack(stats_b)

    z = (stats_a.mean(0) - stats_b.mean(0)) / (stats_a.var(0) / draws + stats_b.var(0) / draws).sqrt()
    assert z.abs().max() < 4.5, z
    correlation = [torch.corrcoef(stats[:, -2:].T)[0, 1].item() for stats in (stats_a, stats_b)]
    assert abs(correlation[0]) > 4 / math.sqrt(draws) > abs(correlation[1]), correlation


# -- Snippet replay on the counting env ------------------------------------------------------
def test_snippets_never_cross_episodes_and_keep_behaviour_log_probs(log_dir):
    """Train on tests/Counting-v0 without updates and inspect the saved
    replay: within a snippet, every valid step continues the previous one (same episode,
    t + 1), next_obs is the true next observation (obs + [1, 0], also at the last step of an
    episode), termination is flagged only where odd episodes end (t = 5), a snippet stops after
    an episode end and nowhere else but the newest row, and the stored log b(a|s) is the
    log-probability of the stored action under the (never updated) policy. A truncation (t = 8)
    still bootstraps in the Retrace target, a termination does not. Loading the replay for a
    resume ends the newest row's snippets there (the resumed run starts new episodes)."""
    result = train(
        Args(
            env="tests/Counting-v0",
            total_steps=3 * 62,
            num_envs=3,
            learning_starts=10_000,
            checkpoint_every=3 * 62,
            log_dir=log_dir,
            **{**TINY, "retrace_steps": 4},
        )
    )
    assert result["num_updates"] == 0
    path = os.path.join(result["run_dir"], "resume.pt")
    resume = load_checkpoint(path)
    replay = SnippetReplay(10_000, 3, 2, 1, 4, torch.device("cpu"))
    replay.load_state_dict(resume["train"]["replay"])
    newest_row = (replay.pos - 1) % replay.rows  # step 62: in the middle of an episode
    assert replay.data["ended"][newest_row].all()  # cut by load_state_dict, as for a resume
    replay.data["ended"][newest_row] = 0.0  # undone here, to test the cut at the newest row
    torch.manual_seed(0)
    batch = replay.sample(2000)
    obs, next_obs, valid = batch.obs, batch.next_obs, batch.valid.bool()
    assert torch.equal(next_obs[valid], obs[valid] + torch.tensor([1.0, 0.0]))
    inner = valid[:, 1:]
    assert torch.equal(obs[:, 1:][inner], next_obs[:, :-1][inner])  # one episode, in order
    t_next, episode = next_obs[..., 0], next_obs[..., 1]
    expect_terminated = (episode % 2 == 1) & (t_next == 5)
    assert torch.equal(batch.terminated.bool()[valid], expect_terminated[valid])
    truncated = (episode % 2 == 0) & (t_next == 8) & valid
    ended = expect_terminated | truncated
    # a snippet stops right after an end, and only there (or at its length, or at the newest row)
    stops = valid[:, :-1] & ~valid[:, 1:]
    newest_obs = replay.data["obs"][(replay.pos - 1) % replay.rows, 0]  # the envs run in step
    newest = (obs[:, :-1] == newest_obs).all(-1)
    assert torch.all(ended[:, :-1][stops] | newest[stops])
    assert not torch.any(ended[:, :-1] & valid[:, 1:])
    assert truncated.any() and expect_terminated.any() and stops.any()
    # the stored behaviour log-probabilities are the policy's at acting time
    actor = GaussianActor(2, make_env("tests/Counting-v0").action_space, TINY["policy_hidden_sizes"], "relu", False, False)
    load_state({"actor": actor}, resume["state"], path)
    with torch.no_grad():
        flat = valid.flatten()
        params = actor(obs.flatten(0, 1)[flat])
        log_pi = actor.log_prob(params, batch.actions.flatten(0, 1)[flat].unsqueeze(1))
    assert torch.allclose(log_pi[:, 0], batch.behaviour_log_prob.flatten()[flat], atol=1e-5)
    # Retrace on these snippets: a truncated step bootstraps, a terminated one does not
    ones = torch.ones_like(batch.rewards)
    target = retrace_target(batch.rewards, batch.terminated, batch.valid, ones, ones, ones, 0.5)
    last = valid & ended
    assert torch.allclose(target[last & expect_terminated], torch.tensor(1.0))  # r only
    assert torch.allclose(target[last & truncated], torch.tensor(1.5))  # r + gamma V'


# -- End-to-end runs -------------------------------------------------------------------------
def event_files(run_dir: str) -> list[str]:
    return glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))


@pytest.mark.parametrize(
    "env, extra",
    [
        ("Pendulum-v1", {}),
        ("Pendulum-v1", {"full_covariance": True, "bf16": True}),
        ("CartPole-v1", {}),
        ("Hopper-v5", {"full_covariance": True, "num_critics": 2}),  # MuJoCo: 3-D actions, early terminations
    ],
    ids=["continuous", "full-covariance-bf16", "discrete", "mujoco"],
)
def test_short_run_updates_logs_and_saves_a_model_that_reloads(env, extra, log_dir, capsys):
    """train() does gradient steps, writes tensorboard events and model.pt, and the saved model,
    evaluated through --eval-only, takes the same actions (the same return, deterministic env)."""
    result = train(Args(env=env, total_steps=300, learning_starts=100, log_dir=log_dir, **TINY, **extra))
    assert result["num_updates"] == 201  # one per step from step 100 (included) to 300
    assert event_files(result["run_dir"])
    model = os.path.join(result["run_dir"], "model.pt")
    assert os.path.isfile(model)
    assert np.isfinite(result["eval_return"])
    assert main(["--checkpoint", model, "--eval-only", "--eval-episodes", "1"]) == 0
    assert f"mean {result['eval_return']:.1f}" in capsys.readouterr().out
    reloaded = train(Args(env=env, checkpoint=model, eval_only=True, **TINY, **extra))
    assert reloaded["eval_return"] == result["eval_return"]  # same seeds, same actions
    networks = {"actor", "actor_target", "critic", "critic_target", "log_eta", "log_alpha_mean", "log_alpha_cov"}
    assert set(load_checkpoint(model)["state"]) == networks


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--epsilon-mean" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["--total-steps", "0"],
        ["--env", "Pendulum-v9"],
        ["--env", "Blackjack-v1"],
        ["--epsilon", "0"],
        ["--epsilon-cov", "-1"],
        ["--retrace-steps", "0"],
        ["--retrace-lambda", "1.5"],
        ["--num-samples", "0"],
        ["--num-critics", "0"],
        ["--batch-size", "0"],
        ["--buffer-size", "3", "--retrace-steps", "5"],
        ["--eta-init", "0"],
        ["--eval-only"],
        ["--checkpoint", "does/not/exist.pt"],
    ],
)
def test_bad_input_is_one_line_on_stderr(argv, log_dir, capsys):
    assert main([*argv, "--log-dir", log_dir]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_checkpoint_of_another_algorithm_is_refused(tmp_path, capsys):
    path = str(tmp_path / "model.pt")
    torch.save({"format": 2, "algo": "sac", "env": "Pendulum-v1", "args": {}, "state": {}}, path)
    assert main(["--checkpoint", path, "--eval-only"]) == 2
    assert "sac checkpoint" in capsys.readouterr().err


def test_resume_continues_from_saved_step_with_saved_weights(log_dir):
    """A run resumed from resume.pt starts at its step and update count with its weights:
    resumed with no steps left, it saves the same weights and evaluates to the same return;
    resumed with more steps, it counts on from there and the weights move."""
    args = Args(env="Pendulum-v1", total_steps=200, learning_starts=100, log_dir=log_dir, **TINY)
    first = train(args)
    resume = os.path.join(first["run_dir"], "resume.pt")
    saved = load_checkpoint(resume)
    backup = resume + ".first"
    shutil.copy(resume, backup)
    same = train(Args(**{**vars(args), "resume": backup}))
    assert (same["global_step"], same["num_updates"]) == (200, 101)
    assert same["eval_return"] == first["eval_return"]
    model = load_checkpoint(os.path.join(first["run_dir"], "model.pt"))
    for name, state in saved["state"].items():
        for key, value in state.items() if isinstance(state, dict) else [("", state)]:
            loaded = model["state"][name][key] if key else model["state"][name]
            assert torch.equal(loaded, value), (name, key)
    more = train(Args(**{**vars(args), "resume": backup, "total_steps": 260}))
    assert (more["global_step"], more["num_updates"]) == (260, 161)
    moved = load_checkpoint(os.path.join(first["run_dir"], "model.pt"))
    assert moved["global_step"] == 260
    weight = "head.weight"
    assert not torch.equal(moved["state"]["actor"][weight], saved["state"]["actor"][weight])


def test_same_seed_gives_identical_runs(log_dir):
    def run() -> tuple[float, dict]:
        result = train(Args(env="Pendulum-v1", total_steps=250, learning_starts=100, log_dir=log_dir, **TINY))
        return result["eval_return"], load_checkpoint(os.path.join(result["run_dir"], "model.pt"))

    (return_a, model_a), (return_b, model_b) = run(), run()
    assert return_a == return_b
    for key, value in model_a["state"]["critic"].items():
        assert torch.equal(value, model_b["state"]["critic"][key]), key
    assert torch.equal(model_a["state"]["log_eta"], model_b["state"]["log_eta"])


# -- Learning --------------------------------------------------------------------------------
@pytest.mark.slow
def test_pendulum_learns(log_dir):
    """Seeded learning test. Budget: 5000 env steps and 4001 updates of a cheaper MPO (64-64
    networks, B = 64, M = 10, T = 3; target period 100 and learning rates 1e-3 instead of 1000
    and 5e-4, for speed), about 40 s of one CPU core. Threshold: mean evaluation return >= -300
    over 5 episodes (a random policy scores about -1200; seeds 1, 2, 3 reached -127, -147, -148)."""
    result = train(
        Args(
            env="Pendulum-v1",
            total_steps=5_000,
            learning_starts=1_000,
            policy_hidden_sizes=(64, 64),
            critic_hidden_sizes=(64, 64),
            batch_size=64,
            num_samples=10,
            retrace_steps=3,
            target_network_frequency=100,
            policy_lr=1e-3,
            q_lr=1e-3,
            eval_every=0,
            eval_episodes=5,
            log_every=1_000,
            checkpoint_every=0,
            save_model=False,
            log_dir=log_dir,
        )
    )
    assert result["num_updates"] == 4_001
    assert result["eval_return"] >= -300
