"""Tests of cpi_garnet.py's ablation (--algorithms): where AGGREVATED-VI's gain over CPI comes from.

cpi_model regresses A^pi_n computed on AGGREVATED-VI's learned model (soft VI at mu = inf); cpi_exact and
cpi_exact_visited regress the exact Q^pi_n of the true MDP. Oracles written here: the learned model counted
from the raw transitions into a dense tensor and solved with np.linalg.solve, and Q^pi by iterating the Bellman
equation on the dense true model until it stops moving.
"""

import glob
import os

import numpy as np
import pytest
from test_cpi_garnet import dense, random_policy, small_args, solve_values

from cpi_garnet import (
    ALGORITHMS,
    Args,
    TransitionCounts,
    cpi_targets,
    load_checkpoint,
    main,
    make_garnet,
    model_targets,
    sample_visitation,
    train,
    value_iteration,
)


def learned_model(data, S: int, A: int) -> tuple[np.ndarray, np.ndarray]:
    """P_hat [S, A, S] and c_hat [S, A] from raw transitions: counts, an unvisited (s, a) a self-loop with the
    mean observed cost."""
    n = np.zeros((S, A, S))
    np.add.at(n, (data.states, data.actions, data.next_states), 1.0)
    cost_sum = np.zeros((S, A))
    np.add.at(cost_sum, (data.states, data.actions), data.costs)
    visits = n.sum(-1)
    P = np.where(visits[..., None] > 0, n / np.maximum(visits, 1)[..., None], 0.0)
    c = np.where(visits > 0, cost_sum / np.maximum(visits, 1), data.costs.mean())
    for s, a in zip(*np.nonzero(visits == 0)):
        P[s, a, s] = 1.0
    return P, c


def iterated_q(P: np.ndarray, c: np.ndarray, pi: np.ndarray, gamma: float) -> np.ndarray:
    """Q^pi by Bellman iteration Q <- c + gamma P (pi . Q) on dense arrays, until it moves by < 1e-12."""
    Q = np.zeros_like(c)
    while True:
        Q_new = c + gamma * P @ (pi * Q).sum(1)
        if np.abs(Q_new - Q).max() < 1e-12:
            return Q_new
        Q = Q_new


def test_the_default_curves_are_the_papers_two_and_every_curve_has_its_own_stream():
    assert Args().algorithms == ("cpi", "aggrevated_vi") == ALGORITHMS[:2]
    assert len(set(ALGORITHMS)) == len(ALGORITHMS)


def test_model_advantage_at_mu_inf_is_a_pi_on_the_learned_model():
    """cpi_model's targets: A^pi_n = Q - V of pi_n under P_hat, at every state the episodes visited; checked against
    the learned model counted here from the same episodes and solved as a linear system."""
    S, A, gamma = 40, 3, 0.9
    mdp = make_garnet(S, A, 4, gamma, seed=2)
    pi = random_policy(np.random.default_rng(0), S, A)
    data = sample_visitation(mdp, pi, 60, np.random.default_rng(5))  # the episodes model_targets draws
    counts = TransitionCounts(S, A)
    states, targets, metrics, episodes, steps, V = model_targets(mdp, pi, counts, None, 60, np.inf, np.random.default_rng(5))
    P, c = learned_model(data, S, A)
    assert 0.2 < metrics["stats/model_coverage"] < 1  # some (s, a) unvisited: the self-loops matter
    V_hat = solve_values(P, c, pi, gamma)
    Q_hat = c + gamma * P @ V_hat
    np.testing.assert_array_equal(states, np.concatenate([data.states, data.end_states]))
    np.testing.assert_allclose(V, V_hat, atol=1e-8)
    np.testing.assert_allclose(targets, (Q_hat - V_hat[:, None])[states], atol=1e-8)
    assert (episodes, steps) == (60, len(data.states))
    # pi_n's own advantage averages to zero under pi_n; A^eta of a finite mu does not
    assert np.abs((pi * (Q_hat - V_hat[:, None])).sum(1)).max() < 1e-12
    # and mu = inf is the limit of eq. 10's soft VI: a large mu comes close, the paper's mu does not
    model = counts.model(mdp.rho0, gamma)
    _, _, eta, _ = value_iteration(model, None, np.inf, pi)
    np.testing.assert_allclose(eta, pi, rtol=1e-14)  # eta_n = pi_n
    assert np.abs(value_iteration(model, None, 1e4, pi)[0] - V_hat).max() < 1e-2
    assert np.abs(value_iteration(model, None, 0.5, pi)[0] - V_hat).max() > 0.1


@pytest.mark.parametrize("algo", ["cpi_exact", "cpi_exact_visited"])
def test_exact_targets_are_q_pi_at_cpis_states_for_cpis_episodes(algo):
    """cpi_exact regresses Q^pi_n at CPI's sampled states, cpi_exact_visited at every state its episodes visit; both
    are charged CPI's episodes. Q^pi here by Bellman iteration on the dense true model."""
    S, A, gamma, N, R = 30, 4, 0.9, 25, 2
    mdp = make_garnet(S, A, 3, gamma, seed=3)
    pi = random_policy(np.random.default_rng(1), S, A)
    data = sample_visitation(mdp, pi, N, np.random.default_rng(8))  # the episodes cpi_targets draws
    states, targets, _, episodes, steps = cpi_targets(algo, mdp, pi, N, R, True, np.random.default_rng(8))
    expected = data.end_states if algo == "cpi_exact" else np.concatenate([data.states, data.end_states])
    np.testing.assert_array_equal(states, expected)
    np.testing.assert_allclose(targets, iterated_q(dense(mdp), mdp.costs, pi, gamma)[states], atol=1e-9)
    mc = cpi_targets("cpi", mdp, pi, N, R, True, np.random.default_rng(8))
    assert episodes == mc[3] == N * (1 + A * R)
    assert steps == len(data.states) + round(N * A * R / (1 - gamma))  # the Monte Carlo rollouts' expected length


def test_ablation_curves_leave_the_papers_two_unchanged_and_share_their_axes(log_dir):
    paper = train(small_args(log_dir))
    everything = train(small_args(log_dir, algorithms=ALGORITHMS))
    for algo in ("cpi", "aggrevated_vi"):
        assert everything[f"cost_{algo}"] == paper[f"cost_{algo}"]
    assert everything["eval_return"] == -everything["cost_cpi_exact_visited"]  # the last curve's
    mdps = load_checkpoint(os.path.join(everything["run_dir"], "model.pt"))["state"]["mdps"]
    for result in mdps:
        for algo, same_axis in [("cpi_exact", "cpi"), ("cpi_exact_visited", "cpi"), ("cpi_model", "aggrevated_vi")]:
            assert result[algo]["episodes"].tolist() == result[same_axis]["episodes"].tolist()
        assert result["cpi_model"]["costs"][-1] != result["aggrevated_vi"]["costs"][-1]  # mu = inf is another eta


def test_a_checkpoint_without_the_asked_curves_is_refused(log_dir, capsys):
    out = train(small_args(log_dir, num_mdps=1))
    model, resume = (os.path.join(out["run_dir"], name) for name in ("model.pt", "resume.pt"))
    runs = set(glob.glob(os.path.join(log_dir, "*")))
    capsys.readouterr()
    assert main(["--checkpoint", model, "--eval-only", "--algorithms", "cpi", "cpi_model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "cpi_model" in err
    assert main(["--resume", resume, "--num-mdps", "2", "--algorithms", "cpi_exact"]) == 2
    assert "cpi_exact" in capsys.readouterr().err
    assert set(glob.glob(os.path.join(log_dir, "*"))) == runs  # no new run directory
