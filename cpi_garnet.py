# /// script
# requires-python = ">=3.10"
# dependencies = ["torch>=2.6", "numpy>=1.26", "gymnasium[mujoco]>=1.1,<2", "mujoco>=4.0.1", "tensorboard>=2.14", "tyro>=0.9", "moviepy>=2", "matplotlib>=3.8"]
# ///
"""Conservative Policy Iteration against AGGREVATED-VI on random Garnet MDPs ([DPI] Fig. 1a), in one file.

References:
    [DPI] Sun, Gordon, Boots, Bagnell 2018, "Dual Policy Iteration", arXiv:1805.10755: Sec. 3.2 (eq. 5-6, the
        conservative update), Sec. 5.1 (eq. 9-10, the cost c'), Sec. 6.1 and Fig. 1a (this experiment).
    [CPI] Kakade, Langford 2002, "Approximately Optimal Approximate Reinforcement Learning", ICML: the mixture
        update, s ~ d_pi from rollouts that stop w.p. 1 - gamma, unbiased Q estimates from such rollouts.
    [Garnet] Archibald, McKinnon, Thomas 1995; Scherrer 2014 ([DPI] ref. 7): random MDPs with a branching factor.

Algorithm (iteration n on each of the M MDPs; the function that does each line in brackets):
    1. Garnet MDP, b random next states per (s, a); psi(s) = (binary code of s, 1); pi_0 uniform [make_garnet]
    2. CPI [CPI; DPI Sec. 6.1]: N states s_i ~ d_pi_n (ends of episodes from rho0 that stop w.p. 1 - gamma), and
       Qhat(s_i, a) for every a: take a in s_i, follow pi_n, sum the costs until it stops          [cpi_targets]
    2'. AGGREVATED-VI [DPI Sec. 3.3, 6.1]: N' episodes of pi_n; all transitions so far give P_hat [DPI eq. 2];
       eta_n by exact soft VI under P_hat on c' = c / mu - log pi_n [DPI eq. 10]; A^eta = Q - V of that VI at the
       visited states                                                           [model_targets, value_iteration]
    3. Both: one linear regressor per action on those targets, pi*_n(s) = argmin_a w_a . psi(s) [DPI eq. 5], and
       pi_{n+1} = (1 - beta) pi_n + beta pi*_n [DPI eq. 6] as a table  [fit_regressors, classify, conservative_update]
    4. J(pi_{n+1}) = rho0^T (I - gamma P_pi)^-1 c_pi, a linear solve [policy_cost]; Fig. 1a plots its mean and
       standard error over the MDPs against episodes [write_figure]
    Ablation (--algorithms), where AGGREVATED-VI's gain comes from: cpi_model is 2' with eta_n = pi_n (mu = inf, the
    alpha = 0 of [DPI Sec. 3.3 (a)]: A^pi_n on the learned model, by iterative evaluation); cpi_exact is 2 with the
    exact Q^pi_n (a linear solve) in place of Qhat, for CPI's episodes; cpi_exact_visited also regresses at every
    state its episodes visit, as 2' does                                                              [cpi_targets]

Shapes: S states, A actions, F features (bits + 1), K non-zeros of a sparse transition model, N sampled states,
R rollouts per (state, action), E episodes, T transitions.

Deviations from the paper (and choices it leaves to its App. B.1, which this file does not take values from):
    - [DPI] eq. 9 adapts mu by dual ascent to meet a trust region alpha that Sec. 6.1 does not state; mu is fixed.
    - [DPI] eq. 10 prints "- sum_t gamma^t E[H(eta)]", H the negative entropy; eq. 9's KL term gives "+".
    - --total-steps is the budget per MDP and algorithm in expected transitions, spent as a fixed number of
      iterations so that the MDPs' curves share their x values: episodes, from rho0 or CPI's Q rollouts alike.
    - CPI's A rollouts from one state share their random length (--common-horizon); it regresses Qhat, not Qhat - Vhat
      (least squares is linear in the targets, so with every action observed the argmin is the same).
    - Shared flags, documented as in every file, mean here: --env Garnet, --num-envs 1, no --cuda or --capture-video;
      no --eval-every or --eval-episodes (every iterate is evaluated exactly); --log-every counts one run's transitions;
      a positive --checkpoint-every writes resume.pt after each MDP, where resuming is exact (Ctrl-C writes none)."""

import csv
import functools
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from numpy.random import Generator
from torch import Tensor

ALGO = "cpi_garnet"
# the two curves of [DPI] Fig. 1a, then the ablation's; each draws from its own stream (the index)
ALGORITHMS = ("cpi", "aggrevated_vi", "cpi_model", "cpi_exact", "cpi_exact_visited")
CPI_DATA = ("cpi", "cpi_exact", "cpi_exact_visited")  # the curves that spend CPI's episodes; the others AGGREVATED-VI's
LABELS = dict(
    cpi="CPI",
    aggrevated_vi="AGGREVATED-VI",
    cpi_model="CPI, A^pi on the learned model",
    cpi_exact="CPI, exact Q^pi",
    cpi_exact_visited="CPI, exact Q^pi at every visited state",
)
VI_TOL = 1e-10  # value iteration stops when a sweep moves V by less (cost units)


# == 1. Arguments ==========================================================================================
@dataclass
class Args:
    # -- algorithm ----------------------------------------------------------------------------------------
    # Garnet MDPs [DPI Sec. 6.1: ten MDPs, 1000 states, 5 actions]; b = 5, c(s, a) ~ U(0, 1), rho0 uniform and
    # gamma = 0.95 are this file's choices, not taken from [DPI] App. B.1 (the experiment's setup)
    num_states: int = 1000
    """Number of states |S| of each Garnet MDP."""
    num_actions: int = 5
    """Number of actions |A|."""
    branching: int = 5
    """Branching factor b: next states reachable from each (s, a)."""
    num_mdps: int = 10
    """Number of random MDPs that the curves average over."""
    gamma: float = 0.95
    """Discount factor gamma; rollouts stop with probability 1 - gamma."""
    # Conservative update [DPI eq. 6], the same for both algorithms, no line search [DPI Sec. 6.1]
    beta: float = 0.1
    """Mixture step size beta, the same for both algorithms (paper: tuned, value not given)."""
    ridge: float = 1e-3
    """Ridge penalty of the per-action linear regressions (a numerical guard)."""
    # CPI [CPI; DPI Sec. 6.1]
    cpi_states: int = 200
    """States sampled from d_pi per CPI iteration; each costs 1 + |A| * q_rollouts episodes."""
    q_rollouts: int = 1
    """Monte Carlo rollouts per (state, action) for CPI's Q estimates."""
    common_horizon: bool = True
    """The |A| rollouts from one state share their random length (common random numbers)."""
    # AGGREVATED-VI [DPI Sec. 6.1, eq. 10]
    vi_episodes: int = 200
    """Episodes of pi_n from rho0 per AGGREVATED-VI iteration (all of them fill P_hat)."""
    mu: float = 0.5
    """Temperature mu of c' = c / mu - log pi_n [DPI eq. 10], in cost units (0: plain VI)."""
    # Which curves run on every MDP (the last one's cost is the run's eval_return)
    algorithms: tuple[Literal[ALGORITHMS], ...] = ("cpi", "aggrevated_vi")
    """cpi (Monte Carlo Q^pi), aggrevated_vi (A^eta), and the ablation's cpi_model (A^pi on AGGREVATED-VI's learned
    model), cpi_exact (exact Q^pi at CPI's states, for its episodes), cpi_exact_visited (the same at every visited state)."""
    # -- shared: identical in every file ------------------------------------------------------------------
    env: str = "Garnet"
    """Gymnasium id of the task (`module:Env-v0` imports `module` first, for an env it registers)."""
    seed: int = 1
    """Seed for python, numpy, torch and the environments."""
    total_steps: int = 500_000
    """Environment steps to train for, summed over all parallel envs."""
    num_envs: int = 1
    """Parallel training environments (a gymnasium SyncVectorEnv)."""
    cuda: bool = False
    """Train on the GPU (an error when torch sees none)."""
    threads: int = 1
    """Torch CPU threads; small networks are often fastest on one."""
    log_dir: str = "runs"
    """Directory that receives one subdirectory per run (tensorboard events, args, models)."""
    log_every: int = 5_000
    """Print a progress line and write losses to tensorboard every this many env steps."""
    eval_every: int = 10_000
    """Evaluate the deterministic policy every this many env steps (0: only at the end)."""
    eval_episodes: int = 10
    """Episodes per evaluation."""
    save_model: bool = True
    """Write model.pt (weights and statistics for evaluation) at each evaluation and the end."""
    checkpoint_every: int = 100_000
    """Write resume.pt (everything needed to continue) every this many env steps (0: only on a signal)."""
    checkpoint: str | None = None
    """A model.pt or resume.pt to fine-tune, or to evaluate with --eval-only; its saved arguments become defaults."""
    eval_only: bool = False
    """With --checkpoint: evaluate the loaded policy, print the returns and exit."""
    resume: str | None = None
    """A resume.pt to continue training from, in its run directory (Ctrl-C writes one)."""
    capture_video: bool = False
    """Record evaluation episodes to <run>/videos (needs a rendering backend)."""


def algorithm_checks(args: Args) -> list[tuple[bool, str]]:
    """(condition, message) for each algorithm argument; `check_args` raises the first that fails."""
    return [
        (args.env == "Garnet", f"--env {args.env!r} does not apply: this script makes Garnet MDPs (see --num-states)"),
        (args.num_envs == 1, "--num-envs does not apply: rollouts are batched inside one process"),
        (not args.cuda, "--cuda does not apply: the experiment is tabular numpy on the CPU"),
        (not args.capture_video, "--capture-video does not apply: Garnet MDPs have nothing to render"),
        (min(args.num_states, args.num_actions) >= 2, "--num-states and --num-actions must be at least 2"),
        (1 <= args.branching <= args.num_states, f"--branching must be in [1, --num-states], got {args.branching}"),
        (0.0 < args.gamma < 1.0, f"--gamma must be in (0, 1), got {args.gamma}"),
        (0.0 < args.beta <= 1.0, f"--beta must be in (0, 1], got {args.beta}"),
        (args.ridge > 0, f"--ridge must be positive, got {args.ridge}"),
        (args.num_mdps > 0, f"--num-mdps must be positive, got {args.num_mdps}"),
        (min(args.cpi_states, args.q_rollouts, args.vi_episodes) > 0, "--cpi-states, --q-rollouts, --vi-episodes must be > 0"),
        (args.mu >= 0, f"--mu must be >= 0, got {args.mu}"),
        (0 < len(args.algorithms) == len(set(args.algorithms)), f"--algorithms must name curves once each: {args.algorithms}"),
    ]


# == 2. Environment ========================================================================================
class MDP(NamedTuple):
    """A finite discounted MDP in cost form with sparse transitions: P(cols[k] | s, a) = probs[k] for
    rows[k] = s * A + a, no next state twice for one (s, a). Shapes: rows, cols, probs [K]; costs [S, A]; rho0 [S]."""

    rows: np.ndarray
    cols: np.ndarray
    probs: np.ndarray
    costs: np.ndarray
    rho0: np.ndarray
    gamma: float


def make_garnet(num_states: int, num_actions: int, branching: int, gamma: float, seed: int) -> MDP:
    """A Garnet(S, A, b) MDP [Garnet], the same for the same arguments: each (s, a) reaches b distinct next states
    drawn uniformly without replacement, with the gaps between b - 1 sorted U(0, 1) cut points of [0, 1] as their
    probabilities (a uniform point of the simplex); c(s, a) ~ U(0, 1), rho0 uniform."""
    rng = np.random.default_rng(seed)
    S, A, b = num_states, num_actions, branching
    # Floyd's algorithm, vectorised over the S * A rows: a uniform b-subset of range(S) in O(b^2) per row, where
    # argsort of S keys per row would take S * A * S memory
    next_states = np.empty((S * A, b), dtype=np.int64)
    for k, j in enumerate(range(S - b, S)):
        t = rng.integers(0, j + 1, size=S * A)
        taken = (next_states[:, :k] == t[:, None]).any(axis=1)
        next_states[:, k] = np.where(taken, j, t)
    next_states.sort(axis=1)
    cuts = np.sort(rng.random((S * A, b - 1)), axis=1)
    probs = np.diff(cuts, axis=1, prepend=0.0, append=1.0)  # [S * A, b], a random partition of [0, 1]
    costs = rng.random((S, A))
    return MDP(np.repeat(np.arange(S * A), b), next_states.ravel(), probs.ravel(), costs, np.full(S, 1.0 / S), gamma)


def sample_rows(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF sample of one column per row of probs [n, k] with uniforms u [n]."""
    cdf = np.cumsum(probs, axis=1)
    return np.minimum((u[:, None] >= cdf).sum(axis=1), probs.shape[1] - 1)  # [n]


class Rollouts(NamedTuple):
    end_states: np.ndarray  # [E] the state each episode stopped in
    total_costs: np.ndarray  # [E] undiscounted sum of the episode's costs
    states: np.ndarray  # [T] every transition (s, a, c, s') of every episode
    actions: np.ndarray  # [T]
    costs: np.ndarray  # [T]
    next_states: np.ndarray  # [T]


def rollouts(
    mdp: MDP, pi: np.ndarray, starts: np.ndarray, lengths: np.ndarray, first: np.ndarray | None, rng: Generator
) -> Rollouts:
    """E episodes of pi [S, A] on mdp (b non-zeros per (s, a), as a Garnet), advanced together: episode i makes
    lengths[i] transitions, the first with action first[i] when given. Shapes: starts, lengths, first [E]."""
    S, A = mdp.costs.shape
    b = len(mdp.cols) // (S * A)
    assert len(mdp.cols) == S * A * b, "rollouts need b non-zeros per (s, a)"
    next_table, prob_table = mdp.cols.reshape(S * A, b), mdp.probs.reshape(S * A, b)
    s, total = np.array(starts, dtype=np.int64), np.zeros(len(starts))
    # (s, a, c, s') of every step; an empty first entry for episodes that all stop before their first action
    steps = [(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=np.int64))]
    for t in range(int(lengths.max(initial=0))):
        alive = np.flatnonzero(lengths > t)
        st = s[alive]
        a = np.asarray(first)[alive] if t == 0 and first is not None else sample_rows(pi[st], rng.random(alive.size))
        row = st * A + a
        s2 = next_table[row, sample_rows(prob_table[row], rng.random(alive.size))]
        c = mdp.costs[st, a]
        total[alive] += c
        s[alive] = s2
        steps.append((st, a, c, s2))
    return Rollouts(s, total, *(np.concatenate(x) for x in zip(*steps)))


def sample_visitation(mdp: MDP, pi: np.ndarray, num_episodes: int, rng: Generator) -> Rollouts:
    """Episodes of pi from rho0 that stop before each action w.p. 1 - gamma [CPI]: they stop in s_t w.p. (1 - gamma)
    gamma^t, so end_states ~ d_pi, and reach s_t w.p. gamma^t, so all the visited states sample d_pi too."""
    starts = rng.choice(len(mdp.rho0), size=num_episodes, p=mdp.rho0)
    lengths = rng.geometric(1.0 - mdp.gamma, size=num_episodes) - 1  # P(length >= t) = gamma^t
    return rollouts(mdp, pi, starts, lengths, None, rng)


def estimate_q(
    mdp: MDP, pi: np.ndarray, states: np.ndarray, num_rollouts: int, common_horizon: bool, rng: Generator
) -> tuple[np.ndarray, Rollouts]:
    """Qhat(s_i, a) for every action [CPI]: the mean over num_rollouts episodes that take a in s_i, then follow pi,
    of the undiscounted cost until the episode stops. It makes L >= 1 transitions, P(L > t) = gamma^t, so the step-t
    cost counts w.p. gamma^t: an unbiased estimate of Q^pi(s_i, a). With common_horizon the A episodes of one (state,
    repetition) share L (common random numbers): their differences, all that the argmin over actions sees, lose the
    variance of the random horizon. Shapes: states [N]; Qhat [N, A]."""
    N, R, A = len(states), num_rollouts, mdp.costs.shape[1]
    shape = (N, R, 1) if common_horizon else (N, R, A)
    lengths = np.broadcast_to(rng.geometric(1.0 - mdp.gamma, size=shape), (N, R, A))
    # episode i * R * A + r * A + a starts in states[i] with action a
    q = rollouts(mdp, pi, np.repeat(states, R * A), lengths.ravel(), np.tile(np.arange(A), N * R), rng)
    return q.total_costs.reshape(N, R, A).mean(axis=1), q


# == 3. Policy =============================================================================================
def features(num_states: int) -> np.ndarray:
    """psi(s) = (binary encoding of s in ceil(log2 S) bits [DPI Sec. 6.1], 1 as a bias): [S, F]."""
    bits = max(1, math.ceil(math.log2(num_states)))
    binary = (np.arange(num_states)[:, None] >> np.arange(bits)[None, :]) & 1  # [S, bits], least significant first
    return np.concatenate([binary, np.ones((num_states, 1))], axis=1).astype(np.float64)


def fit_regressors(psi: np.ndarray, targets: np.ndarray, ridge: float) -> np.ndarray:
    """Regression-based cost-sensitive classification [CPI; DPI Sec. 6.1]: one ridge regression per action, w_a =
    argmin sum_i (w_a . psi_i - y_ia)^2 + ridge |w_a|^2, one solve for all. Shapes: psi [N, F], targets [N, A]; W [F, A]."""
    gram = psi.T @ psi + ridge * np.eye(psi.shape[1])
    return np.linalg.solve(gram, psi.T @ targets)


def classify(psi: np.ndarray, W: np.ndarray) -> np.ndarray:
    """The linear classifier pi*(s) = argmin_a w_a . psi(s): [S] from psi [S, F], W [F, A]."""
    return np.argmin(psi @ W, axis=1)


def conservative_update(pi: np.ndarray, greedy: np.ndarray, beta: float) -> np.ndarray:
    """pi_{n+1} = (1 - beta) pi_n + beta pi*_n [DPI eq. 6; CPI], exactly, as a table; pi*_n is deterministic,
    greedy [S] its action. Every state moves by D_TV(pi_{n+1}(.|s), pi_n(.|s)) = beta (1 - pi_n(greedy(s)|s)) <= beta
    ([DPI] Sec. 3.2). Shapes: pi [S, A]; returns [S, A]."""
    out = (1.0 - beta) * pi
    out[np.arange(len(greedy)), greedy] += beta
    return out


def mixture_policy(classifiers: np.ndarray, psi: np.ndarray, beta: float) -> np.ndarray:
    """The mixture (1 - beta)^n pi_0 + sum_k beta (1 - beta)^(n-1-k) pi*_k as an [S, A] table, pi_0 uniform,
    rebuilt from the classifiers W_k [n, F, A] by the updates of training: bit for bit the trained table."""
    A = classifiers.shape[-1]
    pi = np.full((psi.shape[0], A), 1.0 / A)
    for W in classifiers:
        pi = conservative_update(pi, classify(psi, W), beta)
    return pi


# == 4. Storage ============================================================================================
class TransitionCounts:
    """Counts n(s, a, s') and summed costs of every transition seen so far, as a sparse table."""

    def __init__(self, num_states: int, num_actions: int):
        self.S, self.A = num_states, num_actions
        # keys (s * A + a) * S + s', sorted and unique, and their counts n(s, a, s'): [K] each
        self.keys, self.counts = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        self.cost_sum = np.zeros(num_states * num_actions)  # [S * A]
        self.visits = np.zeros(num_states * num_actions, dtype=np.int64)  # n(s, a)

    def add(self, states: np.ndarray, actions: np.ndarray, costs: np.ndarray, next_states: np.ndarray) -> None:
        rows = states * self.A + actions
        self.keys, inverse = np.unique(np.concatenate([self.keys, rows * self.S + next_states]), return_inverse=True)
        weights = np.concatenate([self.counts, np.ones(len(rows), dtype=np.int64)])
        self.counts = np.bincount(inverse, weights=weights, minlength=len(self.keys)).astype(np.int64)
        self.cost_sum += np.bincount(rows, weights=costs, minlength=self.S * self.A)
        self.visits += np.bincount(rows, minlength=self.S * self.A)

    def coverage(self) -> float:
        """Fraction of the state-action pairs visited at least once."""
        return float((self.visits > 0).mean())

    def model(self, rho0: np.ndarray, gamma: float) -> MDP:
        """The maximum-likelihood model P_hat = n(s, a, s') / n(s, a) [DPI eq. 2], c_hat the mean observed cost; an
        unvisited (s, a) is a self-loop with the mean observed cost (the paper does not say)."""
        rows, cols = self.keys // self.S, self.keys % self.S
        probs = self.counts / self.visits[rows]
        seen = self.visits > 0
        mean_cost = self.cost_sum[seen].sum() / self.visits[seen].sum() if seen.any() else 0.5
        costs = np.where(seen, self.cost_sum / np.maximum(self.visits, 1), mean_cost).reshape(self.S, self.A)
        unseen = np.flatnonzero(~seen)
        rows, cols = np.concatenate([rows, unseen]), np.concatenate([cols, unseen // self.A])
        return MDP(rows, cols, np.concatenate([probs, np.ones(len(unseen))]), costs, rho0, gamma)


class Results(list):
    """The finished MDPs (model.pt): per MDP its seed, J(pi*) and, per algorithm, its curve and classifiers W_k."""

    state_dict = list.copy  # the saved form: a plain list

    def load_state_dict(self, state: list[dict]) -> None:
        self[:] = state


# == 5. Algorithm ==========================================================================================
def bellman_q(mdp: MDP, V: np.ndarray) -> np.ndarray:
    """Q(s, a) = c(s, a) + gamma sum_s' P(s'|s, a) V(s'), the sparse backup: [S, A] from V [S]."""
    S, A = mdp.costs.shape
    expected = np.bincount(mdp.rows, weights=mdp.probs * V[mdp.cols], minlength=S * A)
    return mdp.costs + mdp.gamma * expected.reshape(S, A)


def value_iteration(
    mdp: MDP, V: np.ndarray | None = None, mu: float = 0.0, prior: np.ndarray | None = None, tol: float = VI_TOL
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Exact (soft) value iteration, the fixed point of [DPI eq. 10] with temperature mu. mu = 0: plain VI, V(s) =
    min_a Q(s, a), eta greedy. mu > 0: [DPI eq. 9] min_eta E[sum_t gamma^t (c + mu log(eta / pi_n))] (eq. 10 times mu):
        Q(s, a) = c(s, a) + gamma sum_s' P(s'|s, a) V(s'),
        V(s) = -mu log sum_a pi_n(a|s) exp(-Q(s, a) / mu),
        eta(a|s) = pi_n(a|s) exp(-(Q(s, a) - V(s)) / mu).
    mu = inf, their limit: eta = pi_n, V(s) = sum_a pi_n(a|s) Q(s, a), the iterative evaluation of pi_n (V^pi_n, Q^pi_n).
    Symbols: pi_n -> prior [S, A]; mu -> mu (cost units, c' = c / mu - log pi_n). Stops when a sweep moves V by
    less than tol, so |V - V*| <= tol gamma / (1 - gamma). Returns V [S], Q [S, A], eta [S, A], the sweeps."""
    S, A = mdp.costs.shape
    V = np.zeros(S) if V is None else V.copy()
    log_prior, sweeps, delta = None, 0, np.inf
    if mu > 0:
        assert prior is not None, "soft value iteration needs the prior pi_n"
        with np.errstate(divide="ignore"):
            log_prior = np.log(prior)  # -inf where pi_n has no mass: that action is excluded
    while delta >= tol:
        Q = bellman_q(mdp, V)
        # functools.reduce over the A columns: numpy reduces a short last axis ten times slower
        if log_prior is None:
            V_new = functools.reduce(np.minimum, Q.T)  # min_a Q(s, a)
        elif math.isinf(mu):
            V_new = sum(prior.T * Q.T)  # sum_a pi_n(a|s) Q(s, a)
        else:
            z = log_prior - Q / mu  # [S, A]
            z_max = functools.reduce(np.maximum, z.T)  # [S]
            V_new = -mu * (z_max + np.log(sum(np.exp(z.T - z_max))))
        sweeps, delta, V = sweeps + 1, np.abs(V_new - V).max(), V_new
    Q = bellman_q(mdp, V)
    if log_prior is None:
        return V, Q, np.eye(A)[Q.argmin(axis=1)], sweeps
    eta = np.exp(log_prior - (Q - V[:, None]) / mu)
    return V, Q, eta / eta.sum(axis=1, keepdims=True), sweeps  # normalised up to the VI tolerance already


def policy_iteration(mdp: MDP) -> tuple[np.ndarray, np.ndarray]:
    """Howard's policy iteration (exact evaluation, then greedy improvement): the optimal V* [S] and a deterministic
    greedy policy [S], in finitely many steps (an action switches only on a strict improvement: ties cannot cycle)."""
    S, A = mdp.costs.shape
    policy = np.zeros(S, dtype=np.int64)
    while True:
        V = evaluate_policy(mdp, np.eye(A)[policy])
        Q = bellman_q(mdp, V)
        best = Q.argmin(axis=1)
        improve = Q[np.arange(S), best] < Q[np.arange(S), policy] - 1e-12 * (1 + np.abs(V))
        if not improve.any():
            return V, policy
        policy = np.where(improve, best, policy)


def transition_matrix(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    """P_pi(s, s') = sum_a pi(a|s) P(s'|s, a) as a dense [S, S] matrix."""
    S, A = mdp.costs.shape
    flat = np.bincount((mdp.rows // A) * S + mdp.cols, weights=pi.ravel()[mdp.rows] * mdp.probs, minlength=S * S)
    return flat.reshape(S, S)


def evaluate_policy(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    """V^pi = (I - gamma P_pi)^-1 c_pi by a linear solve: [S] from pi [S, A]. torch.linalg.solve in float64, because
    its threads follow --threads: numpy's BLAS threads cannot be set after import, and oversubscribe a shared CPU."""
    system = np.eye(len(pi)) - mdp.gamma * transition_matrix(mdp, pi)
    return torch.linalg.solve(torch.from_numpy(system), torch.from_numpy((pi * mdp.costs).sum(axis=1))).numpy()


def policy_cost(mdp: MDP, pi: np.ndarray) -> float:
    """J(pi) = rho0^T V^pi, the expected discounted cost from rho0."""
    return float(mdp.rho0 @ evaluate_policy(mdp, pi))


def discounted_visitation(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    """d_pi = (1 - gamma) rho0^T (I - gamma P_pi)^-1 [DPI Sec. 2]: [S], sums to 1."""
    system = (np.eye(len(pi)) - mdp.gamma * transition_matrix(mdp, pi)).T
    return (1.0 - mdp.gamma) * torch.linalg.solve(torch.from_numpy(system), torch.from_numpy(mdp.rho0)).numpy()


# == 6. Updates ============================================================================================
def cpi_targets(
    algo: str, mdp: MDP, pi: np.ndarray, num_states: int, num_rollouts: int, common_horizon: bool, rng: Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, float], int, int]:
    """CPI's regression data [CPI; DPI Sec. 6.1]: states s_i ~ d_pi_n (the last states of episodes from rho0) and
    Monte Carlo Qhat^pi_n(s_i, a). The ablation's oracles replace Qhat by its expectation Q^pi_n = c + gamma P V^pi_n
    (a linear solve): cpi_exact at the same states, cpi_exact_visited at every state the episodes visited (d_pi_n, as
    AGGREVATED-VI's); both are charged the rollouts they replace, at their mean 1 / (1 - gamma) transitions. Returns
    the states [N], targets [N, A], metrics, episodes and transitions used."""
    data = sample_visitation(mdp, pi, num_states, rng)
    num_q_rollouts = num_states * mdp.costs.shape[1] * num_rollouts
    episodes = num_states + num_q_rollouts
    if algo == "cpi":
        q_hat, q = estimate_q(mdp, pi, data.end_states, num_rollouts, common_horizon, rng)
        return data.end_states, q_hat, {}, episodes, len(data.states) + len(q.states)
    states = data.end_states if algo == "cpi_exact" else np.concatenate([data.states, data.end_states])
    q_steps = round(num_q_rollouts / (1.0 - mdp.gamma))
    return states, bellman_q(mdp, evaluate_policy(mdp, pi))[states], {}, episodes, len(data.states) + q_steps


def model_targets(
    mdp: MDP, pi: np.ndarray, counts: TransitionCounts, V: np.ndarray | None, num_episodes: int, mu: float, rng: Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, float], int, int, np.ndarray]:
    """AGGREVATED-VI's regression data [DPI Sec. 3.3 steps 1-2, Sec. 6.1]: P_hat from all transitions so far [DPI eq. 2],
    eta_n by VI under P_hat and c' [DPI eq. 10] warm-started at V, A^eta = Q - V at every visited state (step t is
    reached w.p. gamma^t: d_pi_n); mu = inf (the ablation's cpi_model): eta_n = pi_n, A^pi_n on P_hat. Returns the
    states [N], targets [N, A], metrics, episodes, transitions, V [S]."""
    data = sample_visitation(mdp, pi, num_episodes, rng)
    counts.add(data.states, data.actions, data.costs, data.next_states)
    V, Q, _, sweeps = value_iteration(counts.model(mdp.rho0, mdp.gamma), V, mu, pi)  # eta_n [DPI eq. 10]
    visited = np.concatenate([data.states, data.end_states])  # a sample of d_pi_n
    metrics = {"stats/model_coverage": counts.coverage(), "stats/vi_sweeps": float(sweeps)}
    return visited, (Q - V[:, None])[visited], metrics, num_episodes, len(data.states), V


# == 7. Training ===========================================================================================
def num_iterations(args: Args, algo: str) -> int:
    """Iterations that spend args.total_steps transitions in expectation, at least one: an episode from rho0 makes
    gamma / (1 - gamma) transitions on average, a Q rollout 1 / (1 - gamma); CPI runs N of the first and N A R of the
    second (cpi_exact is charged the same). A fixed count (rather than stopping at the budget) gives every MDP the same
    iterations and episodes."""
    cpi = args.cpi_states * (args.gamma + args.num_actions * args.q_rollouts)
    transitions = cpi if algo in CPI_DATA else args.vi_episodes * args.gamma  # times 1 / (1 - gamma) below
    return max(1, math.ceil(args.total_steps / (transitions / (1.0 - args.gamma))))


def write_figure(results: list[dict], algorithms: tuple[str, ...], run_dir: str, writer: "SummaryWriter", title: str) -> None:
    """[DPI] Fig. 1a as curves.csv, fig1a.png and tensorboard scalars (step: episodes): per algorithm and iteration,
    the episodes so far and the mean and standard error of the cost over the MDPs (which share their iterations)."""
    from matplotlib.figure import Figure  # here: slow to import, and only this function needs it (no pyplot, no display)

    rows, M, optimal = [], len(results), float(np.mean([r["optimal_cost"] for r in results]))
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for algo in algorithms:
        if len({len(r[algo]["costs"]) for r in results}) > 1:
            raise UsageError("the resumed MDPs ran other budgets: resume with the same arguments")
        costs, steps = (np.stack([r[algo][key].numpy() for r in results]) for key in ("costs", "steps"))  # [M, n]
        episodes, n = results[0][algo]["episodes"].numpy(), costs.shape[1]
        mean = np.array([costs[:, k].mean() for k in range(n)])
        se = costs.std(axis=0, ddof=1) / np.sqrt(M) if M > 1 else np.zeros(n)
        for k, (step, cost, cost_se) in enumerate(zip(episodes.tolist(), mean.tolist(), se.tolist())):
            row = dict(algorithm=algo, iteration=k, episodes=step, env_steps=float(steps[:, k].mean()), cost_mean=cost)
            rows.append(row | dict(cost_se=cost_se, log2_cost_mean=math.log2(cost), optimal_cost_mean=optimal, num_mdps=M))
            writer.add_scalar(f"charts/cost_{algo}", cost, step)
            writer.add_scalar(f"charts/cost_se_{algo}", cost_se, step)
            writer.add_scalar(f"charts/log2_cost_{algo}", math.log2(cost), step)
            writer.add_scalar("charts/cost_optimal", optimal, step)
        ax.plot(episodes, np.log2(mean), label=LABELS[algo])
        ax.fill_between(episodes, np.log2(mean - se), np.log2(mean + se), alpha=0.3)
    with open(os.path.join(run_dir, "curves.csv"), "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(rows[0]))
        out.writeheader()
        out.writerows(rows)
    # J* as text, not a line: the tabular optimum is far below what linear classifiers reach
    ax.plot([], [], " ", label=f"optimal policy: log2 J* = {math.log2(optimal):.2f}")
    ax.set(xlabel="episodes", ylabel="log2 cost J(pi) (mean +- s.e.)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "fig1a.png"), dpi=120)


def check_curves(results: list[dict], algorithms: tuple[str, ...]) -> None:
    """Refuse a checkpoint whose finished MDPs lack one of the curves asked for."""
    missing = [algo for algo in algorithms if any(algo not in r for r in results)]
    if missing:
        raise UsageError(f"the checkpoint's MDPs did not run {', '.join(missing)}: give the --algorithms they ran")


def evaluate_only(results: list[dict], psi: np.ndarray, args: Args) -> dict:
    """--eval-only: regenerate each saved MDP, rebuild its mixtures from their classifiers (bit for bit the trained
    tables) and evaluate them exactly; print and return the costs."""
    check_curves(results, args.algorithms)
    costs: dict[str, list[float]] = {name: [] for name in (*args.algorithms, "optimal")}
    for i, result in enumerate(results):
        mdp = make_garnet(args.num_states, args.num_actions, args.branching, args.gamma, result["mdp_seed"])
        for algo in args.algorithms:
            costs[algo].append(policy_cost(mdp, mixture_policy(result[algo]["classifiers"].numpy(), psi, args.beta)))
        costs["optimal"].append(float(mdp.rho0 @ policy_iteration(mdp)[0]))
        print(f"mdp {i + 1} (seed {result['mdp_seed']}) | " + " | ".join(f"{k} {v[-1]:.4f}" for k, v in costs.items()))
    means = {f"cost_{name}": float(np.mean(v)) for name, v in costs.items()}
    print(" | ".join(f"{k} {v:.4f}" for k, v in means.items()), flush=True)
    return {**means, "costs": costs, "eval_return": -means[f"cost_{args.algorithms[-1]}"]}


def train(args: Args) -> dict:
    """The algorithms on every Garnet MDP, then Fig. 1a; returns the final mean costs, counters and the run directory."""
    setup(args)  # seeds and torch threads; the MDPs and rollouts draw from their own seeded generators
    # -- environments: one seed per Garnet MDP (independent streams for different --seed), built in its turn
    seeds = [int(x) for x in np.random.SeedSequence(args.seed).generate_state(args.num_mdps)]
    psi = features(args.num_states)  # [S, F]
    # -- storage: the finished MDPs (model.pt); a resumed run continues after them
    results = Results()
    run = Run(args, model=dict(mdps=results), train_state={})
    if args.eval_only:
        return evaluate_only(results, psi, args)
    global_step, num_updates = run.start()
    check_curves(results, args.algorithms)
    for i in range(len(results), args.num_mdps):
        mdp = make_garnet(args.num_states, args.num_actions, args.branching, args.gamma, seeds[i])
        optimal = float(mdp.rho0 @ policy_iteration(mdp)[0])  # J(pi*)
        result = {"mdp_seed": seeds[i], "optimal_cost": optimal}
        for algo in args.algorithms:
            # its own random stream: the result does not depend on what ran before, so resuming is exact
            rng = np.random.default_rng([seeds[i], ALGORITHMS.index(algo)])
            pi = np.full((args.num_states, args.num_actions), 1.0 / args.num_actions)  # pi_0 uniform
            counts, V = TransitionCounts(args.num_states, args.num_actions), None  # AGGREVATED-VI's data and warm start
            where = f"mdp {i + 1}/{args.num_mdps} | {algo}"
            episodes, steps, costs, classifiers, next_log = [0], [0], [policy_cost(mdp, pi)], [], args.log_every
            for _ in range(num_iterations(args, algo)):
                if algo in CPI_DATA:  # Q^pi_n by Monte Carlo (cpi_exact*: exactly)
                    data = cpi_targets(algo, mdp, pi, args.cpi_states, args.q_rollouts, args.common_horizon, rng)
                else:  # A^eta_n under the learned model: the only difference [DPI Sec. 6.1] (cpi_model: A^pi_n there)
                    mu = args.mu if algo == "aggrevated_vi" else math.inf
                    *data, V = model_targets(mdp, pi, counts, V, args.vi_episodes, mu, rng)
                states, targets, metrics, used_episodes, used_steps = data
                # [DPI eq. 5-6], the same for both: the classifier pi*_n fitted at the states, the conservative update
                W = fit_regressors(psi[states], targets, args.ridge)
                pi = conservative_update(pi, classify(psi, W), args.beta)
                metrics[f"losses/regression_{algo}"] = float(((psi[states] @ W - targets) ** 2).mean())
                classifiers.append(W)
                episodes.append(episodes[-1] + used_episodes)
                steps.append(steps[-1] + used_steps)
                costs.append(policy_cost(mdp, pi))  # exact J(pi_{n+1})
                global_step, num_updates = global_step + used_steps, num_updates + 1
                run.add_metrics({k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})
                if steps[-1] >= next_log:  # every log_every transitions of this run
                    run.log(global_step, num_updates, f"{where} | episodes {episodes[-1]} | cost {costs[-1]:.4f}")
                    next_log += args.log_every
            curve = dict(episodes=torch.tensor(episodes), steps=torch.tensor(steps), costs=torch.tensor(np.array(costs)))
            result[algo] = dict(curve, classifiers=torch.from_numpy(np.stack(classifiers)))  # costs float64, W_k [n, F, A]
            print(f"{where} | episodes {episodes[-1]} | cost {costs[-1]:.4f} | optimal {optimal:.4f}", flush=True)
        results.append(result)
        if args.checkpoint_every:  # after each MDP, where resuming is exact
            run.save(global_step, num_updates, True)
    # -- Fig. 1a (curves.csv, fig1a.png, tensorboard) and model.pt
    sizes = f"|S|={args.num_states}, |A|={args.num_actions}, b={args.branching}, gamma={args.gamma}, beta={args.beta}"
    write_figure(results, args.algorithms, run.run_dir, run.writer, f"[DPI] Fig. 1a: {args.num_mdps} Garnet MDPs, {sizes}")
    if args.save_model:
        run.save(global_step, num_updates, False)
    run.writer.close()
    final = {f"cost_{algo}": float(np.mean([r[algo]["costs"][-1].item() for r in results])) for algo in args.algorithms}
    final["cost_optimal"] = float(np.mean([r["optimal_cost"] for r in results]))
    print("done: " + " | ".join(f"{k} {v:.4f}" for k, v in final.items()) + f" | run {run.run_dir}", flush=True)
    final |= dict(
        eval_return=-final[f"cost_{args.algorithms[-1]}"], global_step=global_step, num_updates=num_updates
    )  # every file's keys
    return dict(final, run_dir=run.run_dir)


# ======== run plumbing below: identical in every file, not needed to read the algorithm ========
import contextlib
import dataclasses
import io
import json
import os
import random
import sys
import time

import tyro
from torch.utils.tensorboard import SummaryWriter

CHECKPOINT_FORMAT = 2  # 2: model and training state saved by name


class UsageError(Exception):
    """Bad user input: `main` prints it as one line on stderr and returns 2."""


class Stopped(Exception):
    """Stopped(message, exit code): a SIGINT or SIGTERM ended training after resume.pt was written."""


def check_args(args: Args) -> None:
    """Raise UsageError with the first failed check: the shared arguments', then the algorithm's."""
    positive = min(args.total_steps, args.num_envs, args.threads, args.log_every, args.eval_episodes) > 0
    checks = [
        (positive, "--total-steps, --num-envs, --threads, --log-every and --eval-episodes must be positive"),
        (min(args.eval_every, args.checkpoint_every) >= 0, "--eval-every and --checkpoint-every must be >= 0"),
        (args.checkpoint is not None or not args.eval_only, "--eval-only needs --checkpoint PATH"),
        (args.resume is None or args.checkpoint is None, "give either --resume or --checkpoint, not both"),
        (not os.path.exists(args.log_dir) or os.path.isdir(args.log_dir), f"--log-dir {args.log_dir} is not a directory"),
        (not args.cuda or torch.cuda.is_available(), "--cuda was given but torch sees no CUDA device"),
        *algorithm_checks(args),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def load_checkpoint(path: str, env: str | None = None, training: bool = False) -> dict:
    """A checkpoint of this algorithm (of `env`, and with training state, if asked), read with weights_only."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (whatever makes the file unreadable: one clear line)
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:160]
        raise UsageError(f"cannot read checkpoint {path}: truncated, corrupted or not a torch file ({reason})") from None
    payload = payload if isinstance(payload, dict) else {}
    problems = [
        (not {"format", "algo", "env", "args", "state"} <= payload.keys(), "is not a checkpoint of this repository"),
        (payload.get("format") != CHECKPOINT_FORMAT, f"has format {payload.get('format')}, not {CHECKPOINT_FORMAT}"),
        (payload.get("algo") != ALGO, f"is a {payload.get('algo')} checkpoint, not {ALGO}"),
        (env is not None and payload.get("env") != env, f"was trained on {payload.get('env')}, not {env}"),
        (training and "train" not in payload, "holds no training state (a model.pt?): give it to --checkpoint to fine-tune"),
    ]
    for problem, message in problems:
        if problem:
            raise UsageError(f"{path} {message}")
    return payload


def state_of(things: dict) -> dict:
    """The saved form of modules, optimizers and storage (their state_dict) and of tensors, by name."""
    return {k: v.detach() if isinstance(v, Tensor) else v.state_dict() for k, v in things.items() if v is not None}


def load_state(things: dict, state: dict, path: str) -> None:
    """Load `state_of`'s output back in place; a checkpoint that does not fit is a UsageError."""
    try:
        for k, v in things.items():
            if isinstance(v, Tensor):
                v.data.copy_(state[k])
            elif v is not None:
                v.load_state_dict(state[k])
    except (KeyError, RuntimeError, ValueError) as e:
        raise UsageError(f"{path} does not fit this run's networks: {str(e).splitlines()[0][:160]}") from None


def setup(args: Args) -> torch.device:
    """Seed python, numpy and torch, set torch's CPU threads, and return the device."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    return torch.device("cuda" if args.cuda else "cpu")


class Run:
    """sac.py's Run for a tabular experiment: run directory, tensorboard, progress line, model.pt, resume.pt, --resume,
    --checkpoint (continuing its experiment, or --eval-only). No env, evaluation schedule, signal handlers or random
    states: `train` evaluates every iterate exactly and saves resume.pt after each MDP (Ctrl-C stops at once)."""

    def __init__(self, args: Args, model: dict, train_state: dict):
        self.args, self.model, self.train_state, self.sums, self.counts = args, model, train_state, {}, {}
        if args.checkpoint is not None:
            load_state(model, load_checkpoint(args.checkpoint, args.env)["state"], args.checkpoint)

    def start(self) -> tuple[int, int]:
        """Open the run directory (new, or the resumed run's) and restore --resume; return (global_step, num_updates)."""
        args, global_step, num_updates = self.args, 0, 0
        if args.resume is not None:
            saved = load_checkpoint(args.resume, args.env, training=True)
            load_state(self.model, saved["state"], args.resume)
            load_state(self.train_state, saved["train"], args.resume)
            global_step, num_updates = saved["global_step"], saved["train"]["num_updates"]
            self.run_dir = os.path.dirname(os.path.abspath(args.resume))
        else:  # a new directory, even for runs started in the same second: -2, -3, ...
            run_dir = os.path.join(args.log_dir, f"{args.env}__{ALGO}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}")
            self.run_dir = next(d for d in (run_dir, *(f"{run_dir}-{i}" for i in range(2, 10_000))) if not os.path.exists(d))
            if args.checkpoint is not None:
                print(f"continuing {args.checkpoint}: its finished MDPs are kept, the step count starts afresh")
        try:  # a resumed run records its new arguments (a larger --num-mdps, say)
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "args.json"), "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=2)
        except OSError as e:
            raise UsageError(f"cannot write the run directory {self.run_dir}: {e.strerror}") from None
        self.writer = SummaryWriter(self.run_dir)
        table = "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items())
        self.writer.add_text("args", f"|argument|value|\n|-|-|\n{table}")
        self.last = (time.perf_counter(), global_step, num_updates)
        return global_step, num_updates

    def add_metrics(self, metrics: dict[str, Tensor]) -> None:
        """Sum an update's metric tensors until the next log line (no host sync per update)."""
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1  # per key: updates log different keys

    def log(self, global_step: int, num_updates: int, where: str) -> None:
        """The progress line (`where`: MDP, algorithm, episodes, cost); the metrics' means since the last line."""
        now, (t0, step0, updates0) = time.perf_counter(), self.last
        sps, ups = (global_step - step0) / max(now - t0, 1e-9), (num_updates - updates0) / max(now - t0, 1e-9)
        self.writer.add_scalar("charts/SPS", sps, global_step)
        self.writer.add_scalar("charts/updates_per_second", ups, global_step)
        for k, v in self.sums.items():
            self.writer.add_scalar(k, (v / self.counts[k]).item(), global_step)
        print(f"step {global_step} | {where} | SPS {sps:.0f} | updates/s {ups:.1f}", flush=True)
        self.sums, self.counts, self.last = {}, {}, (now, global_step, num_updates)

    def save(self, global_step: int, num_updates: int, training: bool) -> str:
        """model.pt, or resume.pt with the training state and counters; atomic (write, rename)."""
        args = dataclasses.asdict(dataclasses.replace(self.args, checkpoint=None, resume=None, eval_only=False))
        payload = dict(format=CHECKPOINT_FORMAT, algo=ALGO, env=self.args.env, args=args, global_step=global_step)
        payload["state"] = state_of(self.model)
        if training:
            payload["train"] = dict(state_of(self.train_state), num_updates=num_updates)
        path = os.path.join(self.run_dir, "resume.pt" if training else "model.pt")
        torch.save(payload, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
        return path


def command_line(argv: list[str] | None, defaults: Args | None = None) -> Args:
    """tyro's parse, its usage errors (a box of several lines: a wrong type or choice, an unknown flag) turned into
    one line, the box's message (UsageError)."""
    box = io.StringIO()
    try:
        with contextlib.redirect_stderr(box):
            args = tyro.cli(Args, args=argv, **({} if defaults is None else dict(default=defaults)))
    except SystemExit as e:
        if not e.code:  # --help
            raise
        rows = [row.strip("│ ") for row in box.getvalue().splitlines()[1:]]  # below the box's title
        end = next((i for i, row in enumerate(rows) if row.startswith(("─", "╰"))), len(rows))
        raise UsageError(" ".join(rows[:end]) or box.getvalue().strip()) from None
    print(box.getvalue(), end="", file=sys.stderr)  # tyro's warnings, if any
    return args


def parse_args(argv: list[str] | None) -> Args:
    """tyro parse; with --checkpoint or --resume the saved run's arguments become the defaults, so flags given
    now override them and everything else matches the saved run."""
    args = command_line(argv)
    if args.resume or args.checkpoint:
        saved = load_checkpoint(args.resume or args.checkpoint, training=args.resume is not None)["args"]
        fields = {f.name for f in dataclasses.fields(Args)}
        defaults = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})
        args = command_line(argv, defaults)
    return args


def main(argv: list[str] | None = None) -> int:
    with contextlib.suppress(ImportError):  # gymnasium's half_cheetah.xml uses an attribute mujoco 4 deprecates
        import mujoco

        warn = lambda text: None if "settotalmass" in text else print(f"WARNING: {text}", file=sys.stderr)
        mujoco.set_mju_user_warning(warn)
    try:
        args = parse_args(argv)
        check_args(args)
        train(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(e.args[0], file=sys.stderr)
        return e.args[1]
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print("interrupted: nothing written since the last resume.pt", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
