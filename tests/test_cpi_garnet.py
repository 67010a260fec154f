"""Tests of cpi_garnet.py: Garnet generator, exact evaluation, (soft) value iteration, the
conservative update, the classifier, CPI versus AGGREVATED-VI, the ablation's curves, and the
script end to end.

Every oracle here is computed independently of the script: dense transition tensors built
from the sparse arrays, np.linalg.solve, brute-force enumeration of deterministic policies,
and Monte Carlo simulation written in the test.
"""

import csv
import glob
import itertools
import os

import numpy as np
import pytest
import torch

from cpi_garnet import (
    ALGORITHMS,
    Args,
    TransitionCounts,
    bellman_q,
    classify,
    conservative_update,
    cpi_targets,
    discounted_visitation,
    estimate_q,
    evaluate_policy,
    features,
    fit_regressors,
    load_checkpoint,
    main,
    make_garnet,
    mixture_policy,
    model_targets,
    parse_args,
    policy_cost,
    policy_iteration,
    sample_visitation,
    train,
    value_iteration,
)

FIG1A = Args().algorithms  # the curves a run draws by default: [DPI] Fig. 1a's two


def dense(mdp) -> np.ndarray:
    """P[s, a, s'] from the sparse arrays, summing duplicates (there must be none)."""
    S, A = mdp.costs.shape
    P = np.zeros((S * A, S))
    np.add.at(P, (mdp.rows, mdp.cols), mdp.probs)
    return P.reshape(S, A, S)


def solve_values(P: np.ndarray, costs: np.ndarray, pi: np.ndarray, gamma: float) -> np.ndarray:
    """V^pi from the dense model with numpy: (I - gamma sum_a pi P) V = sum_a pi c."""
    P_pi = np.einsum("sa,sat->st", pi, P)
    return np.linalg.solve(np.eye(len(costs)) - gamma * P_pi, (pi * costs).sum(1))


def random_policy(rng: np.random.Generator, S: int, A: int) -> np.ndarray:
    return rng.dirichlet(np.ones(A), size=S)


def small_args(log_dir: str, **kw) -> Args:
    """A few seconds' experiment: 2 small Garnets, a short budget."""
    base = {
        "num_states": 32,
        "num_mdps": 2,
        "total_steps": 3_000,
        "cpi_states": 20,
        "vi_episodes": 20,
        "log_dir": log_dir,
        "log_every": 1_000,
    }
    return Args(**{**base, **kw})


# -- Garnet generator ----------------------------------------------------------------
@pytest.mark.parametrize("S,A,b", [(50, 4, 3), (20, 2, 1), (7, 3, 7)])
def test_garnet_rows_are_distributions_with_exactly_b_nonzeros(S, A, b):
    mdp = make_garnet(S, A, b, 0.9, seed=3)
    P = dense(mdp)
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-12)  # float sums of b gaps
    assert ((P > 0).sum(-1) == b).all()  # b distinct next states, none with zero mass
    assert len(mdp.cols) == S * A * b  # so no (s, a, s') is listed twice
    assert (mdp.costs >= 0).all() and (mdp.costs <= 1).all() and mdp.costs.shape == (S, A)
    np.testing.assert_allclose(mdp.rho0, 1.0 / S)
    again, other = make_garnet(S, A, b, 0.9, seed=3), make_garnet(S, A, b, 0.9, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(mdp[:5], again[:5]))
    assert not np.array_equal(mdp.costs, other.costs)


def test_garnet_next_state_sets_are_uniform_subsets():
    """All C(4, 2) = 6 pairs of next states are equally likely (12000 rows, 2000 expected each,
    binomial std 41), and each state appears equally often."""
    mdp = make_garnet(4, 3000, 2, 0.9, seed=11)
    pairs = mdp.cols.reshape(-1, 2)
    assert (pairs[:, 0] < pairs[:, 1]).all()  # distinct, sorted
    freq = np.bincount(pairs[:, 0] * 4 + pairs[:, 1], minlength=16)
    expected = [0 * 4 + 1, 0 * 4 + 2, 0 * 4 + 3, 1 * 4 + 2, 1 * 4 + 3, 2 * 4 + 3]
    assert freq.sum() == freq[expected].sum() == 12000
    assert np.abs(freq[expected] - 2000).max() < 5 * 41


def test_garnet_next_states_spread_over_all_states():
    """The b next states are uniform without replacement: every state is hit about equally."""
    S, A, b = 40, 5, 4
    mdp = make_garnet(S, A, b, 0.9, seed=0)
    hits = np.bincount(mdp.cols, minlength=S)  # S * A * b = 800 draws, 20 per state
    assert hits.min() > 5 and hits.max() < 40  # binomial(800, 1/40): 20 +- 4.4


def test_features_are_the_binary_encoding_plus_a_bias():
    psi = features(1000)
    assert psi.shape == (1000, 11)  # log2(1000) -> 10 bits [DPI Sec. 6.1], plus the bias
    np.testing.assert_array_equal(psi[:, :10] @ (2 ** np.arange(10)), np.arange(1000))
    np.testing.assert_array_equal(psi[:, -1], 1.0)
    assert set(np.unique(psi[:, :10])) == {0.0, 1.0}


# -- exact evaluation ------------------------------------------------------------------
def test_exact_evaluation_matches_a_linear_solve_and_monte_carlo():
    S, A, gamma = 8, 3, 0.8
    mdp = make_garnet(S, A, 3, gamma, seed=1)
    rng = np.random.default_rng(0)
    pi = random_policy(rng, S, A)
    V = evaluate_policy(mdp, pi)
    np.testing.assert_allclose(V, solve_values(dense(mdp), mdp.costs, pi, gamma), atol=1e-12)
    # Monte Carlo, written here: n trajectories per start state, truncated at H steps
    n, H = 4000, 80  # gamma^80 max cost / (1 - gamma) = 9e-8: truncation is negligible
    P = dense(mdp)
    s = np.repeat(np.arange(S), n)
    returns = np.zeros(S * n)
    for t in range(H):
        a = (rng.random(len(s))[:, None] > np.cumsum(pi[s], 1)).sum(1).clip(max=A - 1)
        returns += gamma**t * mdp.costs[s, a]
        s = (rng.random(len(s))[:, None] > np.cumsum(P[s, a], 1)).sum(1).clip(max=S - 1)
    returns = returns.reshape(S, n)
    se = returns.std(1) / np.sqrt(n)
    assert (np.abs(returns.mean(1) - V) < 5 * se).all(), (returns.mean(1), V, se)
    assert policy_cost(mdp, pi) == pytest.approx(mdp.rho0 @ V, abs=1e-12)


def test_discounted_visitation_and_the_performance_difference_lemma():
    """d_pi against its definition sum_t gamma^t rho0 P_pi^t, and [DPI Lemma 2.1]:
    J(pi) - J(pi') = E_{s ~ d_pi, a ~ pi}[A^pi'(s, a)] / (1 - gamma)."""
    S, A, gamma = 12, 3, 0.9
    mdp = make_garnet(S, A, 4, gamma, seed=2)
    rng = np.random.default_rng(1)
    pi, pi2 = random_policy(rng, S, A), random_policy(rng, S, A)
    P_pi = np.einsum("sa,sat->st", pi, dense(mdp))
    d, x = np.zeros(S), mdp.rho0.copy()
    for t in range(600):  # gamma^600 < 1e-27
        d += (1 - gamma) * gamma**t * x
        x = x @ P_pi
    np.testing.assert_allclose(discounted_visitation(mdp, pi), d, atol=1e-12)
    V2 = evaluate_policy(mdp, pi2)
    adv2 = bellman_q(mdp, V2) - V2[:, None]
    pdl = d @ (pi * adv2).sum(1) / (1 - gamma)
    assert policy_cost(mdp, pi) - policy_cost(mdp, pi2) == pytest.approx(pdl, abs=1e-10)


def test_rollouts_sample_d_pi_and_estimate_q_without_bias():
    """The [CPI] restart model: episode end states ~ d_pi, all visited states ~ d_pi, and the
    undiscounted cost until a (1 - gamma)-stop is an unbiased estimate of Q^pi."""
    S, A, gamma = 6, 3, 0.8
    mdp = make_garnet(S, A, 3, gamma, seed=5)
    rng = np.random.default_rng(2)
    pi = random_policy(rng, S, A)
    d = discounted_visitation(mdp, pi)
    data = sample_visitation(mdp, pi, 40_000, rng)
    end = np.bincount(data.end_states, minlength=S) / 40_000
    visits = np.bincount(np.concatenate([data.states, data.end_states]), minlength=S)
    assert 0.5 * np.abs(end - d).sum() < 0.015  # TV; sampling error ~ sqrt(S / n) / 2 = 0.006
    assert 0.5 * np.abs(visits / visits.sum() - d).sum() < 0.015
    V = evaluate_policy(mdp, pi)
    Q = bellman_q(mdp, V)
    states = np.arange(S)
    for common in (True, False):
        q_hat, q = estimate_q(mdp, pi, states, 3000, common, rng)
        # per-rollout std <= max cost * sqrt(E[L^2]) = sqrt((1 + gamma) / (1 - gamma)^2) = 6.7
        se = 6.7 / np.sqrt(3000)
        assert np.abs(q_hat - Q).max() < 4 * se, (q_hat, Q)
        assert len(q.end_states) == S * A * 3000


# -- value iteration and policy iteration ----------------------------------------------
def test_value_iteration_reaches_the_optimum_and_policy_iteration_agrees():
    S, A, gamma = 6, 3, 0.9
    mdp = make_garnet(S, A, 2, gamma, seed=7)
    P = dense(mdp)
    # brute force: the optimal V is the componentwise minimum over all A^S deterministic policies
    V_best = np.min(
        [solve_values(P, mdp.costs, np.eye(A)[list(p)], gamma) for p in itertools.product(range(A), repeat=S)], axis=0
    )
    V_vi, Q_vi, eta, sweeps = value_iteration(mdp)
    V_pi, policy = policy_iteration(mdp)
    np.testing.assert_allclose(V_vi, V_best, atol=1e-8)  # VI_TOL gamma / (1 - gamma) = 1e-9
    np.testing.assert_allclose(V_pi, V_best, atol=1e-12)
    np.testing.assert_allclose(solve_values(P, mdp.costs, eta, gamma), V_best, atol=1e-8)
    assert (Q_vi.argmin(1) == policy).all() and sweeps > 1


def test_value_iteration_and_policy_iteration_agree_on_a_larger_garnet():
    mdp = make_garnet(300, 5, 5, 0.95, seed=8)
    V_vi, _, eta, _ = value_iteration(mdp)
    V_pi, policy = policy_iteration(mdp)
    np.testing.assert_allclose(V_vi, V_pi, atol=1e-8)
    assert (eta.argmax(1) == policy).all()
    # the optimal V is a fixed point of the Bellman optimality operator, written densely here
    P = dense(mdp)
    np.testing.assert_allclose((mdp.costs + 0.95 * P @ V_pi).min(1), V_pi, atol=1e-10)


def test_soft_value_iteration_solves_the_kl_regularised_problem_of_eq_10():
    """With mu > 0, V is the value of eta under the cost c + mu log(eta / pi_n) [DPI eq. 9-10],
    eta is greedy for it (no other policy does better at any state), and mu -> 0 gives VI."""
    S, A, gamma, mu = 10, 3, 0.9, 0.3
    mdp = make_garnet(S, A, 3, gamma, seed=9)
    rng = np.random.default_rng(3)
    prior = random_policy(rng, S, A)
    V, Q, eta, _ = value_iteration(mdp, mu=mu, prior=prior)
    np.testing.assert_allclose(eta.sum(1), 1.0, atol=1e-9)
    P = dense(mdp)

    def regularised_value(policy):
        cost = mdp.costs + mu * np.log(policy / prior)
        return solve_values(P, cost, policy, gamma)

    np.testing.assert_allclose(regularised_value(eta), V, atol=1e-8)
    for _ in range(20):  # random other policies are never better, at any state
        assert (regularised_value(random_policy(rng, S, A)) >= V - 1e-8).all()
    np.testing.assert_allclose(Q, mdp.costs + gamma * P @ V, atol=1e-12)
    V_hard = value_iteration(mdp)[0]
    V_cold = value_iteration(mdp, mu=1e-4, prior=prior)[0]
    # 0 <= V_soft - V <= mu max_s log(1 / pi_n(a*|s)) / (1 - gamma): the price of the KL term
    gap = 1e-4 * (-np.log(prior)).max() / (1 - gamma)
    assert (V_cold >= V_hard - 1e-9).all() and (V_cold <= V_hard + gap).all()
    assert (V_cold - V_hard).max() > 0.1 * gap  # and the bound is not vacuous
    _, _, eta_hot, _ = value_iteration(mdp, mu=1e6, prior=prior)
    np.testing.assert_allclose(eta_hot, prior, atol=1e-4)  # huge mu: eta stays at pi_n


# -- conservative update, classifier, model ---------------------------------------------
def test_conservative_update_moves_each_state_by_at_most_beta_in_total_variation():
    rng = np.random.default_rng(4)
    S, A = 500, 6
    pi = random_policy(rng, S, A)
    pi[:5] = np.eye(A)[rng.integers(A, size=5)]  # deterministic states as well
    for beta in (0.01, 0.3, 1.0):
        greedy = rng.integers(A, size=S)
        new = conservative_update(pi.copy(), greedy, beta)
        tv = 0.5 * np.abs(new - pi).sum(1)
        assert (tv <= beta + 1e-12).all()  # [DPI] Sec. 3.2: D_TV <= beta for every state
        np.testing.assert_allclose(tv, beta * (1 - pi[np.arange(S), greedy]), atol=1e-12)
        np.testing.assert_allclose(new.sum(1), 1.0, atol=1e-12)
        assert (new >= 0).all()


def test_mixture_policy_is_the_explicit_mixture_of_its_classifiers():
    """pi_n = (1 - beta)^n pi_0 + sum_k beta (1 - beta)^(n-1-k) pi*_k, summed here directly."""
    rng = np.random.default_rng(5)
    S, A, beta = 64, 4, 0.2
    psi = features(S)
    classifiers = rng.normal(size=(7, psi.shape[1], A))
    n = len(classifiers)
    explicit = (1 - beta) ** n * np.full((S, A), 1 / A)
    for k, W in enumerate(classifiers):
        explicit += beta * (1 - beta) ** (n - 1 - k) * np.eye(A)[(psi @ W).argmin(1)]
    np.testing.assert_allclose(mixture_policy(classifiers, psi, beta), explicit, atol=1e-12)


def test_classifier_recovers_a_known_linear_cost_structure():
    rng = np.random.default_rng(6)
    S, A = 256, 5
    psi = features(S)
    W_true = rng.normal(size=(psi.shape[1], A))
    states = rng.integers(S, size=2000)
    targets = psi[states] @ W_true + 0.01 * rng.normal(size=(2000, A))
    W = fit_regressors(psi[states], targets, ridge=1e-9)
    np.testing.assert_allclose(W, W_true, atol=0.005)  # noise 0.01 over 2000 samples
    costs = psi @ W_true
    margin = np.sort(costs, 1)[:, 1] - costs.min(1)
    clear = margin > 0.05  # states whose best action is not a near-tie
    assert clear.mean() > 0.8
    assert (classify(psi, W)[clear] == costs.argmin(1)[clear]).all()
    # a cost that adds any per-state baseline v(s) = psi(s) . u has the same classifier
    u = rng.normal(size=psi.shape[1])
    W_shift = fit_regressors(psi[states], targets + (psi[states] @ u)[:, None], ridge=1e-9)
    assert (classify(psi, W_shift) == classify(psi, W)).all()


def test_transition_counts_give_the_maximum_likelihood_model():
    counts = TransitionCounts(num_states=4, num_actions=2)
    s = np.array([0, 0, 0, 1, 3, 0])
    a = np.array([1, 1, 1, 0, 1, 1])
    c = np.array([0.2, 0.2, 0.2, 0.7, 0.1, 0.2])
    s2 = np.array([2, 2, 3, 1, 0, 2])
    counts.add(s[:3], a[:3], c[:3], s2[:3])
    counts.add(s[3:], a[3:], c[3:], s2[3:])  # counts accumulate over calls
    model = counts.model(np.full(4, 0.25), 0.9)
    P = dense(model)
    np.testing.assert_allclose(P[0, 1], [0, 0, 0.75, 0.25])  # 3 of 4 to state 2
    np.testing.assert_allclose(P[1, 0], [0, 1, 0, 0])
    np.testing.assert_allclose(P[3, 1], [1, 0, 0, 0])
    np.testing.assert_allclose(P[2, 0], [0, 0, 1, 0])  # unvisited: a self-loop
    np.testing.assert_allclose(P.sum(-1), 1.0)
    assert model.costs[0, 1] == pytest.approx(0.2) and model.costs[1, 0] == pytest.approx(0.7)
    assert model.costs[2, 0] == pytest.approx(c.mean())  # unvisited: the mean observed cost
    assert counts.coverage() == pytest.approx(3 / 8)


# -- the experiment -------------------------------------------------------------------
def test_aggrevated_vi_beats_cpi_at_equal_samples_on_small_garnets(log_dir):
    """[DPI Sec. 6.1] claim on 3 small Garnets (64 states, 5 actions), 15k transitions each:
    at the episode count CPI ends with, AGGREVATED-VI's policy costs less on every MDP.
    (Measured: CPI improves J by < 0.3, AGGREVATED-VI by > 1.5 on each.)"""
    args = Args(num_states=64, num_mdps=3, total_steps=15_000, cpi_states=50, vi_episodes=50, log_dir=log_dir, log_every=10**9)
    out = train(args)
    mdps = load_checkpoint(os.path.join(out["run_dir"], "model.pt"))["state"]["mdps"]
    for result in mdps:
        cpi, vi = result["cpi"], result["aggrevated_vi"]
        episodes = int(cpi["episodes"][-1])
        k = int(np.searchsorted(vi["episodes"].numpy(), episodes, side="right")) - 1
        assert vi["episodes"][k] <= episodes and k >= 10
        assert float(vi["costs"][k]) < float(cpi["costs"][-1]) - 0.5
        assert float(vi["costs"][k]) < float(vi["costs"][0]) - 1.0  # it really learned
    assert out["cost_aggrevated_vi"] < out["cost_cpi"]


def test_end_to_end_writes_csv_png_events_and_a_model_that_eval_only_reproduces(log_dir, capsys):
    out = train(small_args(log_dir))
    run_dir = out["run_dir"]
    assert out["num_updates"] > 4 and out["global_step"] >= 2 * 2 * 3_000
    with open(os.path.join(run_dir, "curves.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {r["algorithm"] for r in rows} == set(FIG1A)
    for algo in FIG1A:
        mine = [r for r in rows if r["algorithm"] == algo]
        assert len(mine) >= 2 and int(mine[0]["episodes"]) == 0
        assert all(int(r["num_mdps"]) == 2 for r in mine)
        assert float(mine[-1]["cost_mean"]) == pytest.approx(out[f"cost_{algo}"])
        assert float(mine[0]["log2_cost_mean"]) == pytest.approx(np.log2(float(mine[0]["cost_mean"])))
    with open(os.path.join(run_dir, "fig1a.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"charts/cost_cpi", "charts/cost_aggrevated_vi", "charts/cost_optimal"} <= tags
    assert "losses/regression_cpi" in tags and "stats/model_coverage" in tags
    last = events.Scalars("charts/cost_aggrevated_vi")[-1]
    assert last.value == pytest.approx(out["cost_aggrevated_vi"], rel=1e-6)  # float32 storage
    # the saved mixtures, rebuilt and evaluated again, give exactly the trained costs
    model = os.path.join(run_dir, "model.pt")
    capsys.readouterr()
    assert main(["--checkpoint", model, "--eval-only"]) == 0
    assert "cost_aggrevated_vi" in capsys.readouterr().out
    again = train(parse_args(["--checkpoint", model, "--eval-only"]))
    for algo in FIG1A:
        assert again[f"cost_{algo}"] == out[f"cost_{algo}"]
    assert again["cost_optimal"] == out["cost_optimal"]


def test_resumed_run_ends_identical_to_the_uninterrupted_one(log_dir):
    full = train(small_args(log_dir, num_mdps=2, seed=3))
    part = train(small_args(log_dir, num_mdps=1, seed=3))  # "interrupted" after one MDP
    resume = os.path.join(part["run_dir"], "resume.pt")
    assert main(["--resume", resume, "--num-mdps", "2"]) == 0
    with open(os.path.join(full["run_dir"], "curves.csv")) as f:
        expected = f.read()
    with open(os.path.join(part["run_dir"], "curves.csv")) as f:
        assert f.read() == expected


def test_checkpoint_continues_its_experiment_in_a_new_directory(log_dir, capsys):
    """--checkpoint without --eval-only keeps the checkpoint's finished MDPs and runs the others, in a new run
    directory, so the curves equal those of the uninterrupted experiment."""
    full = train(small_args(log_dir, num_mdps=2, seed=3))
    part = train(small_args(log_dir, num_mdps=1, seed=3))
    capsys.readouterr()
    assert main(["--checkpoint", os.path.join(part["run_dir"], "model.pt"), "--num-mdps", "2"]) == 0
    out = capsys.readouterr().out
    run_dir = out.rsplit("| run ", 1)[1].strip()
    assert "continuing" in out and "mdp 1/2" not in out and "mdp 2/2" in out  # the first MDP was not rerun
    assert len({full["run_dir"], part["run_dir"], run_dir}) == 3
    with open(os.path.join(full["run_dir"], "curves.csv")) as f, open(os.path.join(run_dir, "curves.csv")) as g:
        assert g.read() == f.read()


def test_same_seed_gives_identical_results(log_dir):
    a = train(small_args(log_dir, seed=5))
    b = train(small_args(log_dir, seed=5))
    c = train(small_args(log_dir, seed=6))
    keys = ["cost_cpi", "cost_aggrevated_vi", "cost_optimal", "global_step", "num_updates"]
    assert [a[k] for k in keys] == [b[k] for k in keys]
    assert a["cost_optimal"] != c["cost_optimal"]  # another seed draws other MDPs
    pa = torch.load(os.path.join(a["run_dir"], "model.pt"), weights_only=True)
    pb = torch.load(os.path.join(b["run_dir"], "model.pt"), weights_only=True)
    for ra, rb in zip(pa["state"]["mdps"], pb["state"]["mdps"]):
        for algo in FIG1A:
            assert torch.equal(ra[algo]["classifiers"], rb[algo]["classifiers"])


# -- the ablation (--algorithms): where AGGREVATED-VI's gain comes from --------------------
# cpi_model regresses A^pi_n on AGGREVATED-VI's learned model (soft VI at mu = inf); cpi_exact and cpi_exact_visited
# the exact Q^pi_n of the true MDP. Oracles: the learned model counted here from the raw transitions and solved
# densely, Q^pi by Bellman iteration on the dense true model.
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
    np.testing.assert_allclose(V, V_hat, atol=1e-8)  # the sweeps stop at 1e-10: |V - V^pi| <= 1e-10 gamma / (1 - gamma)
    np.testing.assert_allclose(targets, (Q_hat - V_hat[:, None])[states], atol=1e-8)
    assert (episodes, steps) == (60, len(data.states))
    # pi_n's own advantage averages to zero under pi_n; A^eta of a finite mu does not
    assert np.abs((pi * (Q_hat - V_hat[:, None])).sum(1)).max() < 1e-12
    # and mu = inf is the limit of eq. 10's soft VI: a large mu comes close, the paper's mu does not
    model = counts.model(mdp.rho0, gamma)
    _, _, eta, _ = value_iteration(model, None, np.inf, pi)
    np.testing.assert_allclose(eta, pi, rtol=1e-14)  # eta_n = pi_n, renormalised: rounding only
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
    # a linear solve against iteration stopped at 1e-12 per sweep (error <= 1e-12 gamma / (1 - gamma)) and rounding
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


# -- entry point ----------------------------------------------------------------------
def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--num-states" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["--total-steps", "0"],
        ["--num-states", "1"],
        ["--num-actions", "1"],
        ["--branching", "0"],
        ["--num-states", "10", "--branching", "11"],
        ["--num-mdps", "0"],
        ["--gamma", "1.0"],
        ["--beta", "0"],
        ["--beta", "1.5"],
        ["--mu", "-0.1"],
        ["--ridge", "0"],
        ["--cpi-states", "0"],
        ["--env", "CartPole-v1"],
        ["--num-envs", "2"],
        ["--cuda"],
        ["--capture-video"],
        ["--eval-only"],
        ["--checkpoint", "no/such/model.pt", "--eval-only"],
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_status_2(argv, capsys, log_dir):
    assert main([*argv, "--log-dir", log_dir]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not glob.glob(os.path.join(log_dir, "*"))  # nothing was started
