"""Tests of dpi_ilqr.py: each math piece against an independent computation, then short runs."""

import dataclasses
import glob
import os

import gymnasium as gym
import numpy as np
import pytest
import torch

from dpi_ilqr import (
    COSTS,
    LQ_ACTION_COST,
    LQ_ENV_ID,
    LQ_HORIZON,
    LQ_STATE_COST,
    Actor,
    Args,
    Dynamics,
    Imitation,
    LinearGaussianPolicy,
    PriorBuffer,
    Quadratic,
    augmented_cost,
    conjugate_gradient,
    disadvantage,
    dual_search,
    evaluate,
    expected_disadvantage,
    fisher_vector_product,
    fit_dynamics,
    gaussian_kl,
    gmm_fit,
    linearize_policy,
    load_checkpoint,
    load_state,
    lq_matrices,
    lqr_backward,
    lqr_evaluate,
    main,
    make_env,
    make_variant_env,
    prior_moments,
    quadratic_cost,
    register_envs,
    rollout,
    solve_eta,
    train,
    update_actor,
)

F64 = torch.float64
# train() sets one thread from --threads; the math tests run outside it, and their small
# tensor ops are several times slower with more threads on a shared CPU
torch.set_num_threads(1)


def random_spd(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """Random symmetric positive-definite matrices [..., n, n] with eigenvalues >= 0.1 scale."""
    m = torch.randn(*shape, shape[-1], generator=gen, dtype=F64)
    return scale * (m @ m.transpose(-1, -2) / shape[-1] + 0.1 * torch.eye(shape[-1], dtype=F64))


def random_problem(gen: torch.Generator, steps: int = 5, obs_dim: int = 3, action_dim: int = 2):
    """A time-varying linear-Gaussian model and a convex quadratic cost."""
    y = obs_dim + action_dim
    a = torch.eye(obs_dim, dtype=F64) + 0.2 * torch.randn(steps, obs_dim, obs_dim, generator=gen, dtype=F64)
    b = 0.5 * torch.randn(steps, obs_dim, action_dim, generator=gen, dtype=F64)
    dynamics = Dynamics(
        torch.cat([a, b], 2),
        0.1 * torch.randn(steps, obs_dim, generator=gen, dtype=F64),
        random_spd(gen, steps, obs_dim, scale=0.01),
    )
    cost = Quadratic(
        random_spd(gen, steps, y),
        torch.randn(steps, y, generator=gen, dtype=F64),
        torch.randn(steps, generator=gen, dtype=F64),
    )
    return dynamics, cost


def random_policy(gen: torch.Generator, steps: int, obs_dim: int, action_dim: int):
    return LinearGaussianPolicy(
        0.3 * torch.randn(steps, action_dim, obs_dim, generator=gen, dtype=F64),
        0.3 * torch.randn(steps, action_dim, generator=gen, dtype=F64),
        random_spd(gen, steps, action_dim, scale=0.5),
    )


def simulate(dynamics, policy, x0, gamma, cost, n, gen, first_action=None) -> torch.Tensor:
    """Discounted costs [n] of n sampled trajectories of `policy` from x0 under the model (the
    first action fixed to first_action when given)."""
    steps, obs_dim = dynamics.f.shape
    x = x0.expand(n, -1).clone()
    total = torch.zeros(n, dtype=F64)
    for t in range(steps):
        mean = x @ policy.K[t].T + policy.k[t]
        chol = torch.linalg.cholesky(policy.cov[t])
        u = mean + torch.randn(n, mean.shape[1], generator=gen, dtype=F64) @ chol.T
        if t == 0 and first_action is not None:
            u = first_action.expand(n, -1)
        y = torch.cat([x, u], 1)
        step_cost = 0.5 * ((y @ cost.C[t]) * y).sum(1) + y @ cost.c[t] + cost.c0[t]
        total += gamma**t * step_cost
        noise = torch.randn(n, obs_dim, generator=gen, dtype=F64) @ torch.linalg.cholesky(dynamics.cov[t]).T
        x = y @ dynamics.F[t].T + dynamics.f[t] + noise
    return total


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(x)


# -- dynamics fit ---------------------------------------------------------------------------
def test_fit_dynamics_recovers_a_synthetic_linear_gaussian_system():
    gen = torch.Generator().manual_seed(0)
    dynamics, _ = random_problem(gen, steps=3)
    steps, obs_dim, y = dynamics.F.shape
    n = 20_000
    s = torch.randn(steps, n, obs_dim, generator=gen, dtype=F64) + 1.0
    a = torch.randn(steps, n, y - obs_dim, generator=gen, dtype=F64)
    noise = torch.randn(steps, n, obs_dim, generator=gen, dtype=F64) @ torch.linalg.cholesky(dynamics.cov).transpose(1, 2)
    s_next = (torch.cat([s, a], 2) @ dynamics.F.transpose(1, 2)) + dynamics.f[:, None] + noise
    points = torch.cat([s, a, s_next], 2)
    mask = torch.ones(steps, n, dtype=torch.bool)
    d = points.shape[2]

    def fit_without_prior(pts):  # no prior mean/covariance, no prior weight, ridge 1e-6
        zeros_mean, zeros_cov = (torch.zeros(steps, d, dtype=F64), torch.zeros(steps, d, d, dtype=F64))
        return fit_dynamics(pts, mask, zeros_mean, zeros_cov, 0.0, 1e-6, obs_dim)

    fit = fit_without_prior(points)
    # standard errors: noise std 0.1 / sqrt(20000) ~ 7e-4 per coefficient
    torch.testing.assert_close(fit.F, dynamics.F, atol=5e-3, rtol=0)
    torch.testing.assert_close(fit.f, dynamics.f, atol=5e-3, rtol=0)
    torch.testing.assert_close(fit.cov, dynamics.cov, atol=5e-4, rtol=0)  # entries ~1e-2
    # the same data in units 1e4 times larger (inputs of variance ~1e-8, as once pi_n has
    # converged): the same A, B; an absolute ridge of 1e-6 would shrink them by half
    small = fit_without_prior(points * 1e-4)
    torch.testing.assert_close(small.F, fit.F, atol=1e-5, rtol=0)


def test_fit_dynamics_without_prior_is_least_squares_on_the_unmasked_samples():
    """strength 0 and no ridge: [F_t f_t] is numpy's least-squares fit of s' on [s, a, 1] over
    the samples the mask keeps at step t, and cov_t the residuals' mean outer product (the
    maximum-likelihood covariance), on few noisy samples where the fit is far from exact."""
    rng = np.random.default_rng(16)
    steps, n, obs_dim, action_dim = 3, 12, 2, 1
    d = 2 * obs_dim + action_dim
    points = torch.as_tensor(rng.standard_normal((steps, n, d)))
    mask = torch.as_tensor(rng.random((steps, n)) < 0.8)
    mask[:, :8] = True  # at least 8 samples for 4 regressors at every step
    fit = fit_dynamics(points, mask, torch.zeros(steps, d, dtype=F64), torch.zeros(steps, d, d, dtype=F64), 0.0, 0.0, obs_dim)
    for t in range(steps):
        kept = points[t][mask[t]].numpy()
        inputs = np.hstack([kept[:, : obs_dim + action_dim], np.ones((len(kept), 1))])
        coef, *_ = np.linalg.lstsq(inputs, kept[:, obs_dim + action_dim :], rcond=None)
        residual = kept[:, obs_dim + action_dim :] - inputs @ coef
        np.testing.assert_allclose(fit.F[t].numpy(), coef[:-1].T, atol=1e-10)
        np.testing.assert_allclose(fit.f[t].numpy(), coef[-1], atol=1e-10)
        np.testing.assert_allclose(fit.cov[t].numpy(), residual.T @ residual / len(kept), atol=1e-10)


def test_gmm_prior_lets_a_few_samples_per_step_recover_the_dynamics():
    """With 4 samples per step (fewer than the 6 regression inputs) plain regression fails;
    the NIW posterior with a GMM prior fitted on all steps' data recovers A, B, c."""
    gen = torch.Generator().manual_seed(1)
    dynamics, _ = random_problem(gen, steps=1)
    obs_dim, y = dynamics.F.shape[1:]
    steps, few = 6, 4

    def sample(n):
        s = torch.randn(steps, n, obs_dim, generator=gen, dtype=F64)
        a = torch.randn(steps, n, y - obs_dim, generator=gen, dtype=F64)
        noise = 0.1 * torch.randn(steps, n, obs_dim, generator=gen, dtype=F64)
        s_next = torch.cat([s, a], 2) @ dynamics.F[0].T + dynamics.f[0] + noise
        return torch.cat([s, a, s_next], 2)

    torch.manual_seed(0)
    gmm = gmm_fit(sample(400).reshape(-1, 2 * obs_dim + y - obs_dim), 2, 50, None)
    points = sample(few)
    mask = torch.ones(steps, few, dtype=torch.bool)
    mu0, phi = prior_moments(gmm, points, mask)
    with_prior = fit_dynamics(points, mask, mu0, phi, 1.0, 1e-6, obs_dim)
    without = fit_dynamics(points, mask, mu0, phi, 0.0, 1e-6, obs_dim)
    err_prior = (with_prior.F - dynamics.F[0]).abs().max()
    err_plain = (without.F - dynamics.F[0]).abs().max()
    assert err_prior < 0.1, err_prior
    assert err_plain > 5 * err_prior, (err_plain, err_prior)


def test_niw_posterior_equals_pooling_the_prior_pseudo_samples():
    """A prior that is the mean and covariance of m pseudo-samples, with strength m, gives the
    same model as a plain fit on the samples and pseudo-samples pooled (mean and scatter of a
    union), at every step."""
    gen = torch.Generator().manual_seed(15)
    steps, n, m, obs_dim, d = 3, 7, 5, 2, 5
    points = torch.randn(steps, n, d, generator=gen, dtype=F64)
    pseudo = 2.0 + torch.randn(steps, m, d, generator=gen, dtype=F64)
    mu0 = pseudo.mean(1)
    centred = pseudo - mu0[:, None]
    phi = centred.transpose(1, 2) @ centred / m
    posterior = fit_dynamics(points, torch.ones(steps, n, dtype=torch.bool), mu0, phi, float(m), 1e-6, obs_dim)
    pooled = torch.cat([points, pseudo], 1)
    plain = fit_dynamics(
        pooled,
        torch.ones(steps, n + m, dtype=torch.bool),
        torch.zeros(steps, d, dtype=F64),
        torch.zeros(steps, d, d, dtype=F64),
        0.0,
        1e-6,
        obs_dim,
    )
    for a, b in zip(posterior, plain):
        torch.testing.assert_close(a, b)


def test_gmm_fit_recovers_two_separated_clusters():
    gen = torch.Generator().manual_seed(2)
    centres = torch.tensor([[-5.0, 0.0, 1.0], [5.0, 2.0, -1.0]], dtype=F64)
    x = torch.cat([c + 0.5 * torch.randn(1000, 3, generator=gen, dtype=F64) for c in centres])
    torch.manual_seed(0)
    gmm = gmm_fit(x, 2, 100, None)
    order = gmm.means[:, 0].argsort()
    torch.testing.assert_close(gmm.means[order], centres, atol=0.1, rtol=0)
    torch.testing.assert_close(gmm.log_weights.exp(), torch.full((2,), 0.5, dtype=F64), atol=0.01, rtol=0)
    eye = 0.25 * torch.eye(3, dtype=F64).expand(2, -1, -1)
    torch.testing.assert_close(gmm.covs, eye, atol=0.05, rtol=0)


# -- costs and linearisations ---------------------------------------------------------------
def test_quadratic_cost_expansion_is_exact_and_matches_finite_differences():
    gen = torch.Generator().manual_seed(3)
    obs = torch.randn(2, 3, 2, generator=gen, dtype=F64)
    actions = torch.randn(2, 3, 1, generator=gen, dtype=F64)
    mask = torch.tensor([[True, True, False], [True, False, False]])

    def smooth(o, a):  # not quadratic: the expansion is the average local one
        return torch.sin(o[..., 0]) * a[..., 0] + o[..., 1] ** 3

    q = quadratic_cost(smooth, obs, actions, mask)
    # at t = 1 only one sample: the expansion reproduces its value, gradient and Hessian
    y0 = torch.cat([obs[1, 0], actions[1, 0]])

    def f(y):
        return smooth(y[:2], y[2:])

    eps, eye = 1e-4, torch.eye(3, dtype=F64)
    g = torch.stack([(f(y0 + eps * e) - f(y0 - eps * e)) / (2 * eps) for e in eye])
    h = torch.stack(
        [
            torch.stack(
                [
                    (f(y0 + eps * (ei + ej)) - f(y0 + eps * (ei - ej)) - f(y0 - eps * (ei - ej)) + f(y0 - eps * (ei + ej)))
                    / (4 * eps**2)
                    for ej in eye
                ]
            )
            for ei in eye
        ]
    )
    # central differences: O(eps^2) truncation, O(1e-16 / eps^2) rounding
    torch.testing.assert_close(q.C[1], h, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.c[1] + q.C[1] @ y0, g, atol=1e-7, rtol=0)
    torch.testing.assert_close(0.5 * y0 @ q.C[1] @ y0 + q.c[1] @ y0 + q.c0[1], f(y0))
    # a quadratic cost is reproduced exactly everywhere, averaged or not
    lq = quadratic_cost(
        COSTS[LQ_ENV_ID], torch.randn(1, 5, 4, dtype=F64), torch.randn(1, 5, 2, dtype=F64), torch.ones(1, 5, dtype=torch.bool)
    )
    z = torch.randn(6, dtype=F64)
    torch.testing.assert_close(0.5 * z @ lq.C[0] @ z + lq.c[0] @ z + lq.c0[0], COSTS[LQ_ENV_ID](z[:4], z[4:]))


def test_linear_quadratic_cost_is_minus_the_env_reward():
    register_envs()
    env = make_env(LQ_ENV_ID)
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        action = rng.uniform(-2, 2, 2)
        cost = COSTS[LQ_ENV_ID](torch.as_tensor(obs), torch.as_tensor(action))
        obs, reward, *_ = env.step(action)
        assert float(cost) == pytest.approx(-reward, rel=1e-12)


@pytest.mark.parametrize(("env_id", "index"), [("Swimmer-v5", 3), ("Hopper-v5", 5), ("HalfCheetah-v5", 8)])
def test_locomotion_costs_reward_the_forward_velocity(env_id, index):
    """The velocity the cost rewards is qvel[0], the x velocity the env's reward uses, and the
    control term has the env's weight (cost difference between two actions at one state)."""
    env = gym.make(env_id)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        obs, *_ = env.step(env.action_space.sample())
        assert obs[index] == pytest.approx(env.unwrapped.data.qvel[0])
    weight = env.unwrapped._ctrl_cost_weight
    o = torch.as_tensor(obs)
    zero, one = (torch.zeros(env.action_space.shape, dtype=F64), torch.ones(env.action_space.shape, dtype=F64))
    assert float(COSTS[env_id](o, one) - COSTS[env_id](o, zero)) == pytest.approx(weight * one.numel())


def test_cartpole_swingup_cost_is_minus_the_suite_reward():
    """dm_control's own task.get_reward on random states and controls (every angle, the cart beyond the tolerance
    margin, both action bounds), and along an episode: the reward of step t is minus c(s_{t+1}, a_t)."""
    cost = COSTS["dm_control/cartpole-swingup-v0"]
    env = make_env("dm_control/cartpole-swingup-v0")
    obs, _ = env.reset(seed=0)
    physics, task = env.unwrapped._env.physics, env.unwrapped._env.task
    rng = np.random.default_rng(0)
    for i in range(50):
        with physics.reset_context():  # forward kinematics: the pole's orientation from qpos
            physics.data.qpos[:] = rng.uniform([-3.0, -np.pi], [3.0, np.pi])
            physics.data.qvel[:] = rng.normal(0.0, 5.0, 2)
            physics.data.ctrl[:] = (-1.0, 1.0)[i] if i < 2 else rng.uniform(-1.0, 1.0)
        parts = task.get_observation(physics)
        flat = np.concatenate([parts[key].ravel() for key in sorted(parts)])
        value = cost(torch.as_tensor(flat), torch.as_tensor(physics.data.ctrl.copy()))
        assert float(value) == pytest.approx(-task.get_reward(physics), rel=1e-12, abs=1e-15)
    obs, _ = env.reset(seed=1)
    for _ in range(50):
        action = rng.uniform(-1.0, 1.0, 1)
        obs, reward, *_ = env.step(action)
        assert float(cost(torch.as_tensor(obs), torch.as_tensor(action))) == pytest.approx(-reward, rel=1e-12, abs=1e-15)


def test_linearize_policy_matches_finite_differences():
    torch.manual_seed(0)
    actor = Actor(3, 2, (8,), "tanh", 0.0)
    with torch.no_grad():
        actor.head.weight.normal_()  # a clearly non-linear mean
    obs = torch.randn(2, 4, 3, dtype=F64)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    Kbar, kbar = linearize_policy(actor, obs, mask)
    eps = 1e-3
    for t in range(2):
        jacs, offsets = [], []
        for i in np.flatnonzero(mask[t]):
            s = obs[t, i]
            cols = []
            for j in range(3):
                e = torch.zeros(3, dtype=F64)
                e[j] = eps
                cols.append((actor((s + e).float()) - actor((s - e).float())).double() / (2 * eps))
            jac = torch.stack(cols, 1)
            jacs.append(jac)
            offsets.append(actor(s.float()).double() - jac @ s)
        torch.testing.assert_close(Kbar[t], torch.stack(jacs).mean(0), atol=2e-3, rtol=0)
        torch.testing.assert_close(kbar[t], torch.stack(offsets).mean(0), atol=2e-3, rtol=0)


def test_augmented_cost_equals_scaled_cost_minus_log_pi():
    gen = torch.Generator().manual_seed(4)
    _, cost = random_problem(gen, steps=2)
    pi_bar = random_policy(gen, 2, 3, 2)
    mu = 3.7
    aug = augmented_cost(cost, mu, pi_bar)
    for t in range(2):
        y = torch.randn(5, generator=gen, dtype=F64)
        s, a = y[:3], y[3:]
        c = 0.5 * y @ cost.C[t] @ y + cost.c[t] @ y + cost.c0[t]
        log_pi = gaussian_log_density(a, pi_bar.K[t] @ s + pi_bar.k[t], pi_bar.cov[t])
        torch.testing.assert_close(0.5 * y @ aug.C[t] @ y + aug.c[t] @ y + aug.c0[t], c / mu - log_pi)


# -- LQR ------------------------------------------------------------------------------------
def test_lqr_backward_matches_brute_force_least_squares():
    """Gains and cost-to-go equal the minimiser of the whole finite-horizon problem, written as
    one quadratic in (x0, u_0..u_{T-1}) and solved in the actions by one linear solve."""
    gen = torch.Generator().manual_seed(5)
    steps, obs_dim, action_dim, gamma = 5, 3, 2, 0.9
    dynamics, cost = random_problem(gen, steps, obs_dim, action_dim)
    eta, V = lqr_backward(dynamics, cost, gamma)
    # x_t = G_t z + h_t with z = [x0; u_0; ...; u_{T-1}]
    nz = obs_dim + steps * action_dim
    G = torch.zeros(obs_dim, nz, dtype=F64)
    G[:, :obs_dim] = torch.eye(obs_dim, dtype=F64)
    h = torch.zeros(obs_dim, dtype=F64)
    H = torch.zeros(nz, nz, dtype=F64)
    g = torch.zeros(nz, dtype=F64)
    const = torch.zeros((), dtype=F64)
    for t in range(steps):
        U = torch.zeros(action_dim, nz, dtype=F64)
        U[:, obs_dim + t * action_dim : obs_dim + (t + 1) * action_dim] = torch.eye(action_dim, dtype=F64)
        Y = torch.cat([G, U])  # y_t = Y z + yh
        yh = torch.cat([h, torch.zeros(action_dim, dtype=F64)])
        H += gamma**t * Y.T @ cost.C[t] @ Y
        g += gamma**t * Y.T @ (cost.C[t] @ yh + cost.c[t])
        const += gamma**t * (0.5 * yh @ cost.C[t] @ yh + cost.c[t] @ yh + cost.c0[t])
        G, h = dynamics.F[t] @ Y, dynamics.F[t] @ yh + dynamics.f[t]
    u_idx = slice(obs_dim, None)
    for _ in range(3):
        x0 = torch.randn(obs_dim, generator=gen, dtype=F64)
        u_star = -torch.linalg.solve(H[u_idx, u_idx], H[u_idx, :obs_dim] @ x0 + g[u_idx])
        z = torch.cat([x0, u_star])
        j_star = 0.5 * z @ H @ z + g @ z + const
        torch.testing.assert_close(0.5 * x0 @ V.V_xx[0] @ x0 + V.v_x[0] @ x0 + V.v0[0], j_star)
        x = x0
        for t in range(steps):  # the optimal actions along the optimal (noise-free) path
            u = u_star[t * action_dim : (t + 1) * action_dim]
            torch.testing.assert_close(eta.K[t] @ x + eta.k[t], u)
            x = dynamics.F[t] @ torch.cat([x, u]) + dynamics.f[t]
    # the gain K_0 is the derivative of the optimal first action w.r.t. x0
    dU = -torch.linalg.solve(H[u_idx, u_idx], H[u_idx, :obs_dim])
    torch.testing.assert_close(eta.K[0], dU[:action_dim])
    # max-entropy covariance: Q_aa^-1 at the last step is the cost's C_aa^-1
    torch.testing.assert_close(eta.cov[-1], torch.linalg.inv(cost.C[-1][obs_dim:, obs_dim:]))


def test_lqr_backward_reports_a_non_pd_q_aa():
    gen = torch.Generator().manual_seed(6)
    dynamics, cost = random_problem(gen, 3)
    C = cost.C.clone()
    C[1, 3:, 3:] = -torch.eye(2, dtype=F64)
    assert lqr_backward(dynamics, Quadratic(C, cost.c, cost.c0), 0.9) is None


def test_lqr_evaluate_matches_monte_carlo_and_the_disadvantage_has_zero_mean():
    gen = torch.Generator().manual_seed(7)
    steps, gamma, n = 4, 0.95, 200_000
    dynamics, cost = random_problem(gen, steps)
    eta = random_policy(gen, steps, 3, 2)
    Q, V = lqr_evaluate(dynamics, cost, eta, gamma)
    x0 = torch.randn(3, generator=gen, dtype=F64)
    total = simulate(dynamics, eta, x0, gamma, cost, n, gen)
    se = total.std() / n**0.5
    assert abs(total.mean() - (0.5 * x0 @ V.V_xx[0] @ x0 + V.v_x[0] @ x0 + V.v0[0])) < 4 * se
    a0 = torch.randn(2, generator=gen, dtype=F64)
    total_a = simulate(dynamics, eta, x0, gamma, cost, n, gen, first_action=a0)
    y0 = torch.cat([x0, a0])
    q_value = 0.5 * y0 @ Q.C[0] @ y0 + Q.c[0] @ y0 + Q.c0[0]
    assert abs(total_a.mean() - q_value) < 4 * total_a.std() / n**0.5
    # E_{a ~ eta_t(.|s)} A_t(s, a) = 0 at random states, by sampling a
    A = disadvantage(Q, V)
    for t in range(steps):
        s = torch.randn(3, generator=gen, dtype=F64)
        chol = torch.linalg.cholesky(eta.cov[t])
        a = eta.K[t] @ s + eta.k[t] + torch.randn(n, 2, generator=gen, dtype=F64) @ chol.T
        y = torch.cat([s.expand(n, -1), a], 1)
        adv = 0.5 * ((y @ A.C[t]) * y).sum(1) + y @ A.c[t] + A.c0[t]
        assert abs(adv.mean()) < 4 * adv.std() / n**0.5
        assert adv.std() > 1e-3  # A is not trivially zero


def test_expected_disadvantage_matches_sampling():
    gen = torch.Generator().manual_seed(8)
    _, A = random_problem(gen, steps=3)
    obs = torch.randn(4, 3, generator=gen, dtype=F64)
    steps = torch.tensor([0, 2, 1, 2])
    mean = torch.randn(4, 2, generator=gen, dtype=F64)
    var = torch.tensor([0.3, 1.5], dtype=F64)
    exact = expected_disadvantage(A, obs, steps, mean, var)
    n = 200_000
    for b in range(4):
        a = mean[b] + var.sqrt() * torch.randn(n, 2, generator=gen, dtype=F64)
        y = torch.cat([obs[b].expand(n, -1), a], 1)
        t = steps[b]
        values = 0.5 * ((y @ A.C[t]) * y).sum(1) + y @ A.c[t] + A.c0[t]
        assert abs(values.mean() - exact[b]) < 4 * values.std() / n**0.5


# -- the dual search on mu -------------------------------------------------------------------
def kl_problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    steps = 6
    dynamics, cost = random_problem(gen, steps)
    pi_bar = random_policy(gen, steps, 3, 2)
    pi_bar = pi_bar._replace(cov=pi_bar.cov[:1].expand(steps, -1, -1))  # one std, as pi_n
    x0_mean = torch.randn(3, generator=gen, dtype=F64)
    x0_cov = random_spd(gen, 3, scale=0.1)
    return dynamics, cost, pi_bar, x0_mean, x0_cov, gen


def test_dual_search_meets_alpha_and_the_kl_matches_monte_carlo():
    """The KL the search meets is E over eta's trajectories of sum_t gamma^t log(eta/pi_n),
    estimated here by sampling those trajectories under the model."""
    dynamics, cost, pi_bar, x0_mean, x0_cov, gen = kl_problem(9)
    gamma, alpha, tol = 0.9, 2.0, 0.1
    mu, eta, kl, iters = dual_search(
        lambda m: solve_eta(m, dynamics, cost, pi_bar, x0_mean, x0_cov, gamma), alpha, 1.0, tol, 50
    )
    assert abs(kl - alpha) <= tol * alpha and iters < 50
    n = 200_000
    x = x0_mean + torch.randn(n, 3, generator=gen, dtype=F64) @ torch.linalg.cholesky(x0_cov).T
    log_ratio = torch.zeros(n, dtype=F64)
    for t in range(len(dynamics.F)):
        mean = x @ eta.K[t].T + eta.k[t]
        a = mean + torch.randn(n, 2, generator=gen, dtype=F64) @ torch.linalg.cholesky(eta.cov[t]).T
        log_ratio += gamma**t * (
            gaussian_log_density(a, mean, eta.cov[t]) - gaussian_log_density(a, x @ pi_bar.K[t].T + pi_bar.k[t], pi_bar.cov[t])
        )
        noise = torch.randn(n, 3, generator=gen, dtype=F64) @ torch.linalg.cholesky(dynamics.cov[t]).T
        x = torch.cat([x, a], 1) @ dynamics.F[t].T + dynamics.f[t] + noise
    assert abs(log_ratio.mean() - kl) < 4 * log_ratio.std() / n**0.5
    # a larger mu gives a smaller KL (the search's premise)
    assert solve_eta(10 * mu, dynamics, cost, pi_bar, x0_mean, x0_cov, gamma)[0] < kl


def test_small_alpha_gives_eta_close_to_pi_n():
    dynamics, cost, pi_bar, x0_mean, x0_cov, _ = kl_problem(10)
    alpha = 1e-5
    _, eta, kl, _ = dual_search(lambda m: solve_eta(m, dynamics, cost, pi_bar, x0_mean, x0_cov, 0.9), alpha, 1.0, 0.1, 50)
    assert kl <= 1.1 * alpha
    torch.testing.assert_close(eta.K, pi_bar.K, atol=1e-2, rtol=0)
    torch.testing.assert_close(eta.k, pi_bar.k, atol=1e-2, rtol=0)
    torch.testing.assert_close(eta.cov, pi_bar.cov, atol=1e-2, rtol=1e-2)
    # and a large alpha lets eta move far from pi_n
    _, eta_far, _, _ = dual_search(lambda m: solve_eta(m, dynamics, cost, pi_bar, x0_mean, x0_cov, 0.9), 10.0, 1.0, 0.1, 50)
    assert (eta_far.k - pi_bar.k).abs().max() > 0.1


def test_dual_search_treats_a_non_pd_mu_as_too_small():
    """solve(mu) fails below mu = 1 (Q_aa not PD there); the search must move up past it."""
    calls = []

    def solve(mu):
        calls.append(mu)
        return None if mu < 1.0 else (1.0 / mu, mu)

    mu, _, kl, _ = dual_search(solve, 0.1, 1e-3, 0.1, 50)
    assert abs(kl - 0.1) <= 0.01 and mu == pytest.approx(1 / kl)
    assert calls[0] == 1e-3 and calls[1] > calls[0]


# -- natural-gradient step -------------------------------------------------------------------
def small_actor_and_target(seed: int):
    torch.manual_seed(seed)
    actor = Actor(2, 2, (4,), "tanh", -0.5)
    with torch.no_grad():
        actor.head.weight.normal_(0, 0.5)
    gen = torch.Generator().manual_seed(seed)
    _, A = random_problem(gen, steps=3, obs_dim=2, action_dim=2)
    obs = torch.randn(64, 2, generator=gen)
    target = Imitation(A, obs, torch.randint(0, 3, (64,), generator=gen))
    return actor, target


def explicit_fisher(actor: Actor, obs: torch.Tensor) -> torch.Tensor:
    """F = mean_s J_mean' diag(1/std^2) J_mean, plus 2 I on the log-std block: the Fisher of
    a Gaussian with a state-independent std, built from per-state Jacobians."""
    params = list(actor.parameters())
    n_params = sum(p.numel() for p in params)
    var = (2 * actor.log_std.detach()).exp()
    fisher = torch.zeros(n_params, n_params, dtype=F64)
    for s in obs:
        mean = actor(s)
        for j in range(len(mean)):
            grad = torch.autograd.grad(mean[j], params, allow_unused=True, retain_graph=True)
            row = torch.cat([torch.zeros(p.numel()) if g is None else g.reshape(-1) for p, g in zip(params, grad)]).double()
            fisher += torch.outer(row, row) / var[j] / len(obs)
    # d^2 KL / d log_std^2 = 2 per action dim; log_std is the first parameter
    fisher[: actor.log_std.numel(), : actor.log_std.numel()] += 2 * torch.eye(actor.log_std.numel(), dtype=F64)
    return fisher


def test_fisher_vector_product_matches_the_explicit_fisher():
    actor, target = small_actor_and_target(11)
    names = [name for name, _ in actor.named_parameters()]
    assert names[0] == "log_std"
    fisher = explicit_fisher(actor, target.obs)
    v = torch.randn(len(fisher))
    mean = actor(target.obs)
    log_std = actor.log_std.expand_as(mean)
    kl = gaussian_kl(mean.detach(), log_std.detach(), mean, log_std).mean()
    params = list(actor.parameters())
    kl_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, params, create_graph=True)])
    fvp = fisher_vector_product(kl_grad, params, v, damping=0.1)
    torch.testing.assert_close(fvp.double(), fisher @ v.double() + 0.1 * v.double(), atol=1e-4, rtol=1e-4)


def test_conjugate_gradient_matches_a_linear_solve():
    gen = torch.Generator().manual_seed(12)
    A = random_spd(gen, 6)
    b = torch.randn(6, generator=gen, dtype=F64)
    x = conjugate_gradient(lambda v: A @ v, b, iters=6)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))


def test_natural_gradient_step_satisfies_the_kl_bound():
    """(theta - theta_n)'F(theta - theta_n) <= beta with the explicit Fisher (equality up to
    CG and damping when the full step is taken), and the exact KL is close to half of it
    (the second-order model; beta is small so that the model holds)."""
    beta = 1e-4
    actor, target = small_actor_and_target(13)
    theta_n = torch.nn.utils.parameters_to_vector(actor.parameters()).detach().clone()
    fisher = explicit_fisher(actor, target.obs)
    with torch.no_grad():
        old_mean, old_log_std = actor(target.obs), actor.log_std.clone()
    args = Args(beta=beta, cg_iters=50, cg_damping=1e-4, line_search=False)
    update_actor(actor, [target], args)
    step = (torch.nn.utils.parameters_to_vector(actor.parameters()).detach() - theta_n).double()
    quad = step @ fisher @ step
    assert quad <= beta * (1 + 1e-3)
    assert quad >= 0.95 * beta  # the step uses its budget (damping 1e-4 is negligible)
    with torch.no_grad():
        new_mean = actor(target.obs)
        kl = gaussian_kl(old_mean, old_log_std.expand_as(new_mean), new_mean, actor.log_std.expand_as(new_mean)).mean()
    assert float(kl) == pytest.approx(float(quad) / 2, rel=0.2)


def test_natural_gradient_step_with_line_search_decreases_the_surrogate():
    actor, target = small_actor_and_target(14)
    with torch.no_grad():
        old_mean, old_log_std = actor(target.obs), actor.log_std.clone()
    metrics = update_actor(actor, [target], Args(beta=0.05))
    assert metrics["stats/step_fraction"] > 0 and metrics["stats/surrogate_improvement"] > 0
    with torch.no_grad():
        new_mean = actor(target.obs)
        kl = gaussian_kl(old_mean, old_log_std.expand_as(new_mean), new_mean, actor.log_std.expand_as(new_mean)).mean()
    assert 2 * kl <= 0.05


# -- environments ------------------------------------------------------------------------------
def test_make_variant_env_scales_the_pole_mass_and_length():
    nominal = make_env("InvertedPendulum-v5").unwrapped.model
    pole = nominal.body("pole").id
    longer = make_variant_env("InvertedPendulum-v5", 1.0, 1.5).unwrapped.model
    heavier = make_variant_env("InvertedPendulum-v5", 2.0, 1.0).unwrapped.model
    assert longer.geom("cpole").size[1] == pytest.approx(1.5 * nominal.geom("cpole").size[1], rel=1e-3)
    assert longer.body_mass[pole] > 1.3 * nominal.body_mass[pole]  # mass from the geom volume
    assert heavier.body_mass[pole] == pytest.approx(2 * nominal.body_mass[pole])
    assert heavier.body_mass[pole - 1] == pytest.approx(nominal.body_mass[pole - 1])  # the cart
    register_envs()
    lq = make_variant_env(LQ_ENV_ID, 2.0, 1.0).unwrapped
    np.testing.assert_allclose(lq.b, lq_matrices(2.0)[1])


def test_rollout_keeps_episodes_time_aligned_and_stops_at_termination():
    envs = [make_env("InvertedPendulum-v5") for _ in range(2)]
    rng = np.random.default_rng(0)
    rollouts, infos = rollout(envs, lambda o: rng.normal(0, 3, (len(o), 1)), 30, np.arange(3))
    assert rollouts.obs.shape == (3, 31, 4) and rollouts.mask.shape == (3, 30)
    lengths = rollouts.mask.sum(1)
    assert infos["_episode"].all() and sorted(int(x) for x in lengths) == sorted(infos["episode"]["l"])
    for i in range(3):
        assert rollouts.mask[i, : lengths[i]].all()  # steps 0 .. L-1, then nothing
        reset_obs, _ = envs[0].reset(seed=i)
        np.testing.assert_allclose(rollouts.obs[i, 0].numpy(), reset_obs)  # each starts at t = 0
    assert (lengths < 30).any()  # large random pushes topple the pole
    assert (rollouts.actions.abs() <= 3).all()  # executed actions are inside the bounds
    buffer = PriorBuffer(capacity=2)
    buffer.add(rollouts)
    assert len(buffer.episodes) == 2 and torch.cat(buffer.episodes).shape[1] == 4 + 1 + 4


# -- end to end -----------------------------------------------------------------------------
LQ_FAST = dict(env=LQ_ENV_ID, episodes=4, num_envs=4, horizon=20, prior_em_iters=5, eval_episodes=2, log_every=80)


def loaded_policy(model: str, args: Args, env: gym.Env):
    """obs -> the deterministic action of the actor saved in `model` (the mean, clipped to the bounds)."""
    actor = Actor(env.observation_space.shape[0], env.action_space.shape[0], args.hidden_sizes, args.activation, 0.0)
    load_state({"actor": actor}, load_checkpoint(model, args.env)["state"], model)
    low, high = torch.as_tensor(env.action_space.low), torch.as_tensor(env.action_space.high)
    return lambda obs: actor(obs.float()).clamp(low, high)


def event_files(run_dir: str) -> list[str]:
    return glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))


def test_train_writes_events_and_a_model_that_reloads_with_identical_actions(log_dir, capsys):
    args = Args(**LQ_FAST, total_steps=240, eval_every=160, log_dir=log_dir)
    out = train(args)
    assert out["num_updates"] == 3 and out["global_step"] == 240
    assert event_files(out["run_dir"]) and os.path.isfile(os.path.join(out["run_dir"], "model.pt"))
    # the saved policy, loaded into a fresh actor, acts exactly as --eval-only reports
    model = os.path.join(out["run_dir"], "model.pt")
    env = make_env(LQ_ENV_ID)
    returns = evaluate(loaded_policy(model, args, env), env, 2, args.seed + 10_000, torch.device("cpu"))
    assert np.mean(returns) == out["eval_return"]
    reloaded = train(dataclasses.replace(args, checkpoint=model, eval_only=True))
    assert reloaded["eval_return"] == out["eval_return"]
    assert main(["--checkpoint", model, "--eval-only"]) == 0
    assert "eval over 2 episodes" in capsys.readouterr().out


def test_train_robust_logs_train_and_test_returns(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = Args(
        env="InvertedPendulum-v5",
        robust=True,
        robust_train_variants=2,
        robust_test_variants=1,
        episodes=2,
        num_envs=2,
        horizon=15,
        prior_em_iters=5,
        eval_episodes=1,
        total_steps=40,
        log_dir=log_dir,
    )
    out = train(args)
    assert out["num_updates"] >= 1 and len(out["mu"]) == 2
    events = EventAccumulator(out["run_dir"])
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"charts/eval_return", "charts/eval_return_horizon", "charts/eval_return_train", "stats/mu"} <= set(tags)


def test_eval_return_horizon_is_the_return_of_the_first_t_steps_of_the_evaluation_episodes(log_dir):
    """charts/eval_return_horizon against a replay of the saved policy in a fresh Swimmer-v5 (1000-step episodes,
    T = 20): the sum of the first T rewards of the same seeded episodes; charts/eval_return the sum of all."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = Args(env="Swimmer-v5", episodes=2, horizon=20, prior_em_iters=5, eval_episodes=2, total_steps=40, log_dir=log_dir)
    out = train(args)
    events = EventAccumulator(out["run_dir"])
    events.Reload()
    env = gym.make("Swimmer-v5")
    act = loaded_policy(os.path.join(out["run_dir"], "model.pt"), args, env)
    full, first = [], []
    for i in range(2):
        (obs, _), rewards, done = env.reset(seed=args.seed + 10_000 + i), [], False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(torch.as_tensor(obs)).detach().numpy())
            rewards.append(reward)
            done = terminated or truncated
        full.append(sum(rewards))
        first.append(sum(rewards[: args.horizon]))
    assert events.Scalars("charts/eval_return")[-1].value == pytest.approx(np.mean(full), rel=1e-6)
    assert events.Scalars("charts/eval_return_horizon")[-1].value == pytest.approx(np.mean(first), rel=1e-6)
    assert out["eval_return"] == pytest.approx(np.mean(full)) and abs(np.mean(first) - np.mean(full)) > 1e-3


def test_train_on_the_control_suite_and_refuse_its_other_tasks(log_dir, capsys):
    """A tiny run on dm_control/cartpole-swingup-v0 through main(); a suite task without a cost is one line naming
    the supported envs."""
    argv = ["--env", "dm_control/cartpole-swingup-v0", "--episodes", "2", "--horizon", "10", "--prior-em-iters", "5"]
    assert main([*argv, "--total-steps", "40", "--eval-episodes", "1", "--log-dir", log_dir]) == 0
    assert "eval" in capsys.readouterr().out
    assert main(["--env", "dm_control/walker-run-v0", "--log-dir", log_dir]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "supported: InvertedPendulum-v5" in err and "dm_control/cartpole-swingup-v0" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--env", "Pendulum-v1"],
        ["--env", "NoSuchEnv-v0"],
        ["--horizon", "0"],
        ["--episodes", "1"],
        ["--alpha", "-1"],
        ["--beta", "0"],
        ["--gamma", "0"],
        ["--kl-tolerance", "1.5"],
        ["--robust", "--robust-test-variants", "0"],
        ["--robust-mass-range", "2", "1"],
        ["--eval-only"],
        ["--total-steps", "0"],
        ["--cuda"],
        ["--checkpoint", "no/such/model.pt", "--eval-only"],
    ],
)
def test_bad_input_exits_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--alpha" in capsys.readouterr().out


def actor_params(run_dir: str) -> list[torch.Tensor]:
    return list(load_checkpoint(os.path.join(run_dir, "model.pt"))["state"]["actor"].values())


def test_same_seed_gives_identical_runs(log_dir):
    a = train(Args(**LQ_FAST, total_steps=160, eval_every=0, log_dir=log_dir))
    b = train(Args(**LQ_FAST, total_steps=160, eval_every=0, log_dir=log_dir + "2"))
    assert a["eval_return"] == b["eval_return"] and a["mu"] == b["mu"]
    for x, y in zip(actor_params(a["run_dir"]), actor_params(b["run_dir"])):
        assert torch.equal(x, y)
    c = train(Args(**LQ_FAST, total_steps=160, eval_every=0, seed=2, log_dir=log_dir + "3"))
    assert c["eval_return"] != a["eval_return"]


def test_resume_continues_exactly_like_an_uninterrupted_run(log_dir):
    """Two iterations, a resume.pt, two more: the same policy, mu and return as four straight
    iterations (prior buffer, GMM, mu and RNG states are all in resume.pt)."""
    first = train(Args(**LQ_FAST, total_steps=160, eval_every=0, checkpoint_every=80, log_dir=log_dir))
    resume = os.path.join(first["run_dir"], "resume.pt")
    assert main(["--resume", resume, "--total-steps", "320"]) == 0
    straight = train(Args(**LQ_FAST, total_steps=320, eval_every=0, checkpoint_every=80, log_dir=log_dir + "2"))
    for x, y in zip(actor_params(first["run_dir"]), actor_params(straight["run_dir"])):
        assert torch.equal(x, y)
    resumed = load_checkpoint(resume)
    assert resumed["global_step"] == 320 and resumed["train"]["num_updates"] == 4
    assert resumed["train"]["mu"].tolist() == straight["mu"]


def lq_optimal_controller(gamma: float = 1.0) -> list[np.ndarray]:
    """Time-varying optimal gains of LinearQuadratic-v0 by the textbook Riccati recursion
    (c = x'Qx + u'Ru, no factor 1/2), independent of lqr_backward."""
    a, b = lq_matrices(1.0)
    q, r = np.diag(LQ_STATE_COST), LQ_ACTION_COST * np.eye(2)
    p, gains = np.zeros((4, 4)), []
    for _ in range(LQ_HORIZON):
        k = -np.linalg.solve(r + gamma * b.T @ p @ b, gamma * b.T @ p @ a)
        p = q + k.T @ r @ k + gamma * (a + b @ k).T @ p @ (a + b @ k)
        gains.append(k)
    return gains[::-1]


def test_dpi_reaches_near_the_lqr_optimum_on_the_linear_quadratic_system(log_dir):
    """Budget: 12,500 env steps (25 iterations of 10 episodes x 50 steps), seed 1.
    Threshold: the learned deterministic policy's mean cost over 100 episodes is within 10% of
    the optimal time-varying LQR controller's on the same episodes (same seeds, same noise);
    the best stationary linear policy is 1.2% worse than that optimum, the zero action 13
    times worse. Seeds 1-3 reach 1.036-1.040 at this budget."""
    args = Args(
        env=LQ_ENV_ID,
        gamma=1.0,
        episodes=10,
        num_envs=10,
        horizon=LQ_HORIZON,
        prior_strength=10.0,
        total_steps=12_500,
        eval_every=0,
        eval_episodes=5,
        log_dir=log_dir,
    )
    out = train(args)
    register_envs()
    env = make_env(LQ_ENV_ID)
    learned = np.mean(
        evaluate(loaded_policy(os.path.join(out["run_dir"], "model.pt"), args, env), env, 100, 0, torch.device("cpu"))
    )
    gains = lq_optimal_controller()
    optimal = []
    for i in range(100):
        x, _ = env.reset(seed=i)
        total = 0.0
        for t in range(LQ_HORIZON):
            x, reward, *_ = env.step(gains[t] @ x)
            total += reward
        optimal.append(total)
    ratio = learned / np.mean(optimal)  # both negative
    assert 1.0 <= ratio < 1.10, ratio
