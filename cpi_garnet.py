# /// script
# requires-python = ">=3.10"
# dependencies = ["torch>=2.6", "numpy>=1.26", "gymnasium[mujoco]>=1.1,<2", "mujoco>=3.1", "tensorboard>=2.14", "tyro>=0.9", "moviepy>=2", "matplotlib>=3.8"]
# ///
"""Conservative Policy Iteration against AGGREVATED-VI on random Garnet MDPs ([DPI] Fig. 1a), in one file.

References:
    [DPI] Sun, Gordon, Boots, Bagnell 2018, "Dual Policy Iteration", arXiv:1805.10755: Sec. 3.2 (eq. 5-6, the
        conservative update), Sec. 5.1 (eq. 9-10, the cost c'), Sec. 6.1 and Fig. 1a (this experiment).
    [CPI] Kakade, Langford 2002, "Approximately Optimal Approximate Reinforcement Learning", ICML: the mixture
        update, s ~ d_pi from rollouts that stop w.p. 1 - gamma, unbiased Q estimates from such rollouts.
    [Garnet] Archibald, McKinnon, Thomas 1995; Scherrer 2014, "Approximate Policy Iteration Schemes: A
        Comparison" ([DPI] ref. 7): random MDPs with a branching factor.

Algorithm (iteration n on each of the M MDPs; the function that does each line in brackets):
    1. Garnet MDP with b random next states per (s, a); psi(s) = (binary code of s, 1); pi_0 uniform [make_garnet]
    CPI [CPI; DPI Sec. 6.1]:
    2. N states s_i ~ d_pi_n: episodes from rho0 that stop w.p. 1 - gamma                    [sample_visitation]
    3. Qhat(s_i, a) for every a: take a in s_i, follow pi_n, sum the costs until it stops           [estimate_q]
    4. One linear regressor per action, pi*_n(s) = argmin_a w_a . psi(s)              [fit_regressors, classify]
    5. pi_{n+1} = (1 - beta) pi_n + beta pi*_n [DPI eq. 6], exactly, as a table   [conservative_update, cpi_step]
    AGGREVATED-VI [DPI Sec. 3.3, 6.1]:
    2'. N' episodes of pi_n from rho0; all their transitions so far give P_hat [DPI eq. 2]     [TransitionCounts]
    3'. eta_n by exact soft value iteration under P_hat on c' = c / mu - log pi_n [DPI eq. 10]   [value_iteration]
    4'. A^eta = Q - V of that VI at the visited states, then steps 4-5 with A^eta          [aggrevated_vi_step]
    Both: J(pi_n) = rho0^T (I - gamma P_pi)^-1 c_pi by a linear solve after every update [policy_cost]; Fig. 1a
    is its mean and standard error over the MDPs against episodes [summarize, write_results].

Shapes: S states, A actions, F features (bits + 1), K non-zeros of a sparse transition model, N sampled states,
R rollouts per (state, action), E episodes, T transitions.

Deviations from the paper (and choices it leaves to its App. B.1, which this file does not take values from):
    - [DPI] eq. 9 adapts mu by dual ascent to meet a trust region alpha that Sec. 6.1 does not state; mu is fixed.
    - [DPI] eq. 10 prints "- sum_t gamma^t E[H(eta)]" with H the negative entropy; the KL term of eq. 9 gives "+",
      so eta(a|s) is proportional to pi_n(a|s) exp(-Q(s, a) / mu).
    - The budget is --total-steps transitions per MDP and algorithm in expectation, spent as a fixed number of
      iterations so that the MDPs' curves share their x values: episodes, from rho0 or CPI's Q rollouts alike.
    - CPI's A rollouts from one state share their random length (--common-horizon) and it regresses Qhat, not
      Qhat - Vhat: least squares is linear in the targets, so with every action observed the argmin is the same.
    - Tabular: --env stays Garnet, --num-envs 1, no --cuda or --capture-video; --eval-every and --eval-episodes
      are unused (every iterate is evaluated exactly); resume.pt is written after each MDP, where resuming is exact.
"""

import csv
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

ALGO = "cpi_garnet"
ALGORITHMS = ("cpi", "aggrevated_vi")  # the two curves of [DPI] Fig. 1a
VI_TOL = 1e-10  # value iteration stops when a sweep moves V by less (cost units)


# == 1. Arguments ==========================================================================================
@dataclass
class Args:
    # -- algorithm ----------------------------------------------------------------------------------------
    # Garnet MDPs [DPI Sec. 6.1: ten MDPs, 1000 states, 5 actions; its App. B.1 sets b, gamma and the costs,
    # here b = 5, c(s, a) ~ U(0, 1), rho0 uniform and gamma = 0.95 instead]
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
    """A model.pt or resume.pt whose weights to fine-tune (or, with --eval-only, evaluate); its saved
    arguments become the defaults."""
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
        (args.num_mdps > 0, f"--num-mdps must be positive, got {args.num_mdps}"),
        (0.0 < args.gamma < 1.0, f"--gamma must be in (0, 1), got {args.gamma}"),
        (0.0 < args.beta <= 1.0, f"--beta must be in (0, 1], got {args.beta}"),
        (args.ridge > 0, f"--ridge must be positive, got {args.ridge}"),
        (min(args.cpi_states, args.q_rollouts, args.vi_episodes) > 0, "--cpi-states, --q-rollouts, --vi-episodes must be > 0"),
        (args.mu >= 0, f"--mu must be >= 0, got {args.mu}"),
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
    """A Garnet(S, A, b) MDP [Garnet], the same for the same arguments.

    Each (s, a) reaches b distinct next states drawn uniformly without replacement; their probabilities are the
    gaps between b - 1 sorted U(0, 1) cut points of [0, 1] (a uniform point of the simplex). Costs c(s, a) ~ U(0, 1)
    and rho0 uniform: this file's choices ([DPI] App. B.1 has the paper's).
    """
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
    edges = np.concatenate([np.zeros((S * A, 1)), cuts, np.ones((S * A, 1))], axis=1)
    probs = np.diff(edges, axis=1)  # [S * A, b], a random partition of [0, 1]
    costs = rng.random((S, A))
    rows = np.repeat(np.arange(S * A), b)
    return MDP(rows=rows, cols=next_states.ravel(), probs=probs.ravel(), costs=costs, rho0=np.full(S, 1.0 / S), gamma=gamma)


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
    mdp: MDP,
    pi: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    first_actions: np.ndarray | None,
    rng: np.random.Generator,
) -> Rollouts:
    """E episodes of pi [S, A] on mdp, advanced together; episode i makes lengths[i] transitions, the first with
    first_actions[i] when given. The MDP must have b non-zeros per (s, a), as a Garnet does. Shapes: starts,
    lengths, first_actions [E]."""
    S, A = mdp.costs.shape
    b = len(mdp.cols) // (S * A)
    assert len(mdp.cols) == S * A * b, "rollouts need b non-zeros per (s, a)"
    next_table = mdp.cols.reshape(S * A, b)
    prob_table = mdp.probs.reshape(S * A, b)
    s = np.array(starts, dtype=np.int64)
    total = np.zeros(len(s))
    steps: list[tuple[np.ndarray, ...]] = []
    for t in range(int(lengths.max(initial=0))):
        alive = np.flatnonzero(lengths > t)
        st = s[alive]
        if t == 0 and first_actions is not None:
            a = np.asarray(first_actions)[alive]
        else:
            a = sample_rows(pi[st], rng.random(alive.size))
        row = st * A + a
        s2 = next_table[row, sample_rows(prob_table[row], rng.random(alive.size))]
        c = mdp.costs[st, a]
        total[alive] += c
        s[alive] = s2
        steps.append((st, a, c, s2))
    if steps:
        states, actions, costs, next_states = (np.concatenate(x) for x in zip(*steps))
    else:  # every episode stopped before its first action
        states = actions = next_states = np.zeros(0, dtype=np.int64)
        costs = np.zeros(0)
    return Rollouts(s, total, states, actions, costs, next_states)


def sample_visitation(mdp: MDP, pi: np.ndarray, num_episodes: int, rng: np.random.Generator) -> Rollouts:
    """Episodes of pi from rho0 that stop before each action with probability 1 - gamma [CPI].

    An episode stops in s_t with probability (1 - gamma) gamma^t, so end_states ~ d_pi, and it reaches s_t with
    probability gamma^t, so all its visited states sample d_pi as well.
    """
    starts = rng.choice(len(mdp.rho0), size=num_episodes, p=mdp.rho0)
    lengths = rng.geometric(1.0 - mdp.gamma, size=num_episodes) - 1  # P(length >= t) = gamma^t
    return rollouts(mdp, pi, starts, lengths, None, rng)


def estimate_q(
    mdp: MDP, pi: np.ndarray, states: np.ndarray, num_rollouts: int, common_horizon: bool, rng: np.random.Generator
) -> tuple[np.ndarray, Rollouts]:
    """Qhat(s_i, a) for every action: the mean over num_rollouts episodes that take a in s_i, then follow pi, of the
    undiscounted cost until the episode stops [CPI].

    The episode makes L >= 1 transitions with P(L > t) = gamma^t, so the step-t cost counts with probability gamma^t
    and the sum is an unbiased estimate of Q^pi(s_i, a). With common_horizon the A episodes of one (state,
    repetition) share L (common random numbers): each estimate stays unbiased and their differences, all that the
    argmin over actions sees, lose the variance of the random horizon. Shapes: states [N]; Qhat [N, A].
    """
    A = mdp.costs.shape[1]
    N, R = len(states), num_rollouts
    shape = (N, R, 1) if common_horizon else (N, R, A)
    lengths = np.broadcast_to(rng.geometric(1.0 - mdp.gamma, size=shape), (N, R, A))
    # episode i * R * A + r * A + a starts in states[i] with action a
    q = rollouts(mdp, pi, np.repeat(states, R * A), lengths.ravel(), np.tile(np.arange(A), N * R), rng)
    return q.total_costs.reshape(N, R, A).mean(axis=1), q


# == 3. Policy =============================================================================================
def features(num_states: int) -> np.ndarray:
    """psi(s) = (binary encoding of s in ceil(log2 S) bits [DPI Sec. 6.1], 1 as a bias): [S, F]."""
    bits = max(1, math.ceil(math.log2(num_states)))
    s = np.arange(num_states)[:, None]
    binary = (s >> np.arange(bits)[None, :]) & 1  # [S, bits], least significant bit first
    return np.concatenate([binary, np.ones((num_states, 1))], axis=1).astype(np.float64)


def fit_regressors(psi: np.ndarray, targets: np.ndarray, ridge: float) -> np.ndarray:
    """One ridge regression per action, w_a = argmin sum_i (w_a . psi_i - y_ia)^2 + ridge |w_a|^2: the
    regression-based cost-sensitive classification of [CPI; DPI Sec. 6.1]. All actions share the design matrix,
    so one solve gives every w_a. Shapes: psi [N, F], targets [N, A]; W [F, A]."""
    gram = psi.T @ psi + ridge * np.eye(psi.shape[1])
    return np.linalg.solve(gram, psi.T @ targets)


def classify(psi: np.ndarray, W: np.ndarray) -> np.ndarray:
    """The linear classifier pi*(s) = argmin_a w_a . psi(s): [S] from psi [S, F], W [F, A]."""
    return np.argmin(psi @ W, axis=1)


def conservative_update(pi: np.ndarray, greedy: np.ndarray, beta: float) -> np.ndarray:
    """pi_{n+1} = (1 - beta) pi_n + beta pi*_n [DPI eq. 6; CPI], exactly, as a table.

    pi*_n is deterministic, greedy [S] its action: every state moves by D_TV(pi_{n+1}(.|s), pi_n(.|s)) =
    beta (1 - pi_n(greedy(s)|s)) <= beta ([DPI] Sec. 3.2). Shapes: pi [S, A]; returns [S, A].
    """
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
        self.keys = np.zeros(0, dtype=np.int64)  # (s * A + a) * S + s', sorted and unique
        self.counts = np.zeros(0, dtype=np.int64)  # [K]
        self.cost_sum = np.zeros(num_states * num_actions)  # [S * A]
        self.visits = np.zeros(num_states * num_actions, dtype=np.int64)  # n(s, a)

    def add(self, states: np.ndarray, actions: np.ndarray, costs: np.ndarray, next_states: np.ndarray) -> None:
        rows = states * self.A + actions
        keys, inverse = np.unique(np.concatenate([self.keys, rows * self.S + next_states]), return_inverse=True)
        weights = np.concatenate([self.counts, np.ones(len(rows), dtype=np.int64)])
        self.keys = keys
        self.counts = np.bincount(inverse, weights=weights, minlength=len(keys)).astype(np.int64)
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
        costs = np.where(seen, self.cost_sum / np.maximum(self.visits, 1), mean_cost)
        unseen = np.flatnonzero(~seen)
        return MDP(
            rows=np.concatenate([rows, unseen]),
            cols=np.concatenate([cols, unseen // self.A]),
            probs=np.concatenate([probs, np.ones(len(unseen))]),
            costs=costs.reshape(self.S, self.A),
            rho0=rho0,
            gamma=gamma,
        )


class Results(list):
    """The finished MDPs, all that model.pt holds: per MDP its seed, J(pi*) and, per algorithm, the curve (episodes,
    steps, cost of every iterate) and the classifiers W_k [n, F, A] that rebuild the mixture."""

    def state_dict(self) -> list[dict]:
        return list(self)

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
    """Exact (soft) value iteration: the fixed point of [DPI eq. 10] with temperature mu.

    mu = 0: V(s) = min_a Q(s, a), eta greedy (plain VI). mu > 0, the KL-regularised problem [DPI eq. 9]
    min_eta E[sum_t gamma^t (c + mu log(eta / pi_n))] (eq. 10 times mu):
        Q(s, a) = c(s, a) + gamma sum_s' P(s'|s, a) V(s'),
        V(s) = -mu log sum_a pi_n(a|s) exp(-Q(s, a) / mu),
        eta(a|s) = pi_n(a|s) exp(-(Q(s, a) - V(s)) / mu).
    Symbols: pi_n -> prior [S, A]; mu -> mu (cost units, c' = c / mu - log pi_n). Stops when a sweep moves V by
    less than tol, so |V - V*| <= tol gamma / (1 - gamma). Returns V [S], Q [S, A], eta [S, A], the sweeps.
    """
    S, A = mdp.costs.shape
    V = np.zeros(S) if V is None else V.copy()
    log_prior = None
    if mu > 0:
        assert prior is not None, "soft value iteration needs the prior pi_n"
        with np.errstate(divide="ignore"):
            log_prior = np.log(prior)  # -inf where pi_n has no mass: that action is excluded
    sweeps = 0
    while True:
        Q = bellman_q(mdp, V)
        # functools.reduce over the A columns: numpy reduces a short last axis ten times slower
        if log_prior is None:
            V_new = functools.reduce(np.minimum, Q.T)  # min_a Q(s, a)
        else:
            z = log_prior - Q / mu  # [S, A]
            z_max = functools.reduce(np.maximum, z.T)  # [S]
            V_new = -mu * (z_max + np.log(sum(np.exp(z.T - z_max))))
        sweeps += 1
        delta = np.abs(V_new - V).max()
        V = V_new
        if delta < tol:
            break
    Q = bellman_q(mdp, V)
    if log_prior is None:
        eta = np.eye(A)[Q.argmin(axis=1)]
    else:
        eta = np.exp(log_prior - (Q - V[:, None]) / mu)
        eta /= eta.sum(axis=1, keepdims=True)  # normalised up to the VI tolerance already
    return V, Q, eta, sweeps


def policy_iteration(mdp: MDP) -> tuple[np.ndarray, np.ndarray]:
    """Howard's policy iteration (exact evaluation, then greedy improvement): the optimal V* [S] and a deterministic
    greedy policy [S], in finitely many steps (an action switches only on a strict improvement, so ties cannot cycle)."""
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
    weights = pi.ravel()[mdp.rows] * mdp.probs
    flat = np.bincount((mdp.rows // A) * S + mdp.cols, weights=weights, minlength=S * S)
    return flat.reshape(S, S)


def evaluate_policy(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    """V^pi = (I - gamma P_pi)^-1 c_pi by a linear solve: [S] from pi [S, A]. torch.linalg.solve in float64, because
    its threads follow --threads: numpy's BLAS threads cannot be set after import, and oversubscribe a shared CPU."""
    S = mdp.costs.shape[0]
    system = np.eye(S) - mdp.gamma * transition_matrix(mdp, pi)
    c_pi = (pi * mdp.costs).sum(axis=1)
    return torch.linalg.solve(torch.from_numpy(system), torch.from_numpy(c_pi)).numpy()


def policy_cost(mdp: MDP, pi: np.ndarray) -> float:
    """J(pi) = rho0^T V^pi, the expected discounted cost from rho0."""
    return float(mdp.rho0 @ evaluate_policy(mdp, pi))


def discounted_visitation(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    """d_pi = (1 - gamma) rho0^T (I - gamma P_pi)^-1 [DPI Sec. 2]: [S], sums to 1."""
    S = mdp.costs.shape[0]
    system = (np.eye(S) - mdp.gamma * transition_matrix(mdp, pi)).T
    d = torch.linalg.solve(torch.from_numpy(system), torch.from_numpy(mdp.rho0)).numpy()
    return (1.0 - mdp.gamma) * d


# == 6. Updates ============================================================================================
def cpi_step(
    mdp: MDP,
    pi: np.ndarray,
    psi: np.ndarray,
    num_states: int,
    num_rollouts: int,
    common_horizon: bool,
    ridge: float,
    beta: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, dict[str, float], int, int]:
    """One CPI iteration [CPI; DPI Sec. 6.1] with Monte Carlo Q^pi_n on num_states states s_i ~ d_pi_n.
    Returns pi_{n+1}, the classifier W [F, A], metrics, and the episodes and transitions used."""
    states = sample_visitation(mdp, pi, num_states, rng)  # s_i ~ d_pi_n: the episodes' last states
    q_hat, q = estimate_q(mdp, pi, states.end_states, num_rollouts, common_horizon, rng)
    W = fit_regressors(psi[states.end_states], q_hat, ridge)
    residual = psi[states.end_states] @ W - q_hat
    pi_next = conservative_update(pi, classify(psi, W), beta)  # [DPI eq. 6]
    metrics = {"losses/regression_cpi": float((residual**2).mean())}
    episodes = num_states * (1 + mdp.costs.shape[1] * num_rollouts)
    return pi_next, W, metrics, episodes, len(states.states) + len(q.states)


def aggrevated_vi_step(
    mdp: MDP,
    pi: np.ndarray,
    psi: np.ndarray,
    counts: TransitionCounts,
    V: np.ndarray | None,
    num_episodes: int,
    mu: float,
    ridge: float,
    beta: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float], int, int]:
    """One AGGREVATED-VI iteration [DPI Sec. 3.3 steps 1-3, Sec. 6.1].

    Fit P_hat on all transitions so far [DPI eq. 2], eta_n by exact VI under P_hat and c' [DPI eq. 10], A^eta = Q - V,
    then CPI's classification and update with A^eta in place of A^pi [DPI eq. 5-6], on every state the episodes
    visited (a step-t state survives w.p. gamma^t, so the visits sample d_pi_n). V: the previous iteration's value,
    a warm start for the VI. Returns pi_{n+1}, W [F, A], V, metrics, and the episodes and transitions used.
    """
    data = sample_visitation(mdp, pi, num_episodes, rng)
    counts.add(data.states, data.actions, data.costs, data.next_states)
    model = counts.model(mdp.rho0, mdp.gamma)  # [DPI eq. 2] tabular MLE
    V, Q, _, sweeps = value_iteration(model, V, mu, pi)  # eta_n [DPI eq. 10]
    advantage = Q - V[:, None]  # A^eta(s, a) from the VI's own Q and V
    visited = np.concatenate([data.states, data.end_states])  # a sample of d_pi_n
    W = fit_regressors(psi[visited], advantage[visited], ridge)
    residual = psi[visited] @ W - advantage[visited]
    pi_next = conservative_update(pi, classify(psi, W), beta)  # [DPI eq. 6]
    metrics = {
        "losses/regression_aggrevated_vi": float((residual**2).mean()),
        "stats/model_coverage": counts.coverage(),
        "stats/vi_sweeps": float(sweeps),
    }
    return pi_next, W, V, metrics, num_episodes, len(data.states)


# == 7. Training ===========================================================================================
def num_iterations(args: Args, algo: str) -> int:
    """Iterations that spend args.total_steps transitions in expectation, at least one: an episode from rho0 makes
    gamma / (1 - gamma) transitions on average, a Q rollout 1 / (1 - gamma). A fixed count (rather than stopping at
    the budget) gives every MDP the same iterations, so the curves average over the MDPs at the same episodes."""
    if algo == "cpi":  # N episodes from rho0, then N A R Q rollouts
        transitions = args.cpi_states * (args.gamma + args.num_actions * args.q_rollouts)
    else:
        transitions = args.vi_episodes * args.gamma
    transitions /= 1.0 - args.gamma  # expected transitions per iteration
    return max(1, math.ceil(args.total_steps / transitions))


def summarize(results: list[dict]) -> list[dict]:
    """Fig. 1a's rows: per algorithm and iteration, the episodes so far, and the mean and standard error of the cost
    over the MDPs (which share their iterations and episodes)."""
    rows, optimal, M = [], float(np.mean([r["optimal_cost"] for r in results])), len(results)
    for algo in ALGORITHMS:
        n = len(results[0][algo]["costs"])
        if any(len(r[algo]["costs"]) != n for r in results):
            raise UsageError("the resumed MDPs ran other budgets: resume with the same arguments")
        costs = np.stack([r[algo]["costs"][:n].numpy() for r in results])  # [M, n]
        steps = np.stack([r[algo]["steps"][:n].numpy() for r in results])
        episodes = results[0][algo]["episodes"][:n].numpy()
        se = costs.std(axis=0, ddof=1) / np.sqrt(M) if M > 1 else np.zeros(n)
        for k in range(n):
            mean = float(costs[:, k].mean())
            rows.append(
                dict(algorithm=algo, iteration=k, episodes=int(episodes[k]), env_steps=float(steps[:, k].mean()))
                | dict(cost_mean=mean, cost_se=float(se[k]), log2_cost_mean=math.log2(mean), optimal_cost_mean=optimal)
                | dict(num_mdps=M)
            )
    return rows


def write_results(rows: list[dict], run_dir: str, writer: "SummaryWriter", title: str) -> None:
    """curves.csv, fig1a.png and the same scalars in tensorboard, with episodes as the step (Fig. 1a's x-axis)."""
    with open(os.path.join(run_dir, "curves.csv"), "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(rows[0]))
        out.writeheader()
        out.writerows(rows)
    for row in rows:
        algo, step = row["algorithm"], row["episodes"]
        writer.add_scalar(f"charts/cost_{algo}", row["cost_mean"], step)
        writer.add_scalar(f"charts/cost_se_{algo}", row["cost_se"], step)
        writer.add_scalar(f"charts/log2_cost_{algo}", row["log2_cost_mean"], step)
        writer.add_scalar("charts/cost_optimal", row["optimal_cost_mean"], step)
    import matplotlib  # here: slow to import, and only this function needs it

    matplotlib.use("Agg")  # no display; a PNG file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for algo, label in zip(ALGORITHMS, ("CPI", "AGGREVATED-VI")):
        mine = [r for r in rows if r["algorithm"] == algo]
        x = np.array([r["episodes"] for r in mine])
        mean, se = np.array([r["cost_mean"] for r in mine]), np.array([r["cost_se"] for r in mine])
        ax.plot(x, np.log2(mean), label=label)
        ax.fill_between(x, np.log2(mean - se), np.log2(mean + se), alpha=0.3)
    # J* as text, not a line: the tabular optimum is far below what linear classifiers reach
    ax.plot([], [], " ", label=f"optimal policy: log2 J* = {math.log2(rows[0]['optimal_cost_mean']):.2f}")
    ax.set(xlabel="episodes", ylabel="log2 cost J(pi) (mean +- s.e.)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "fig1a.png"), dpi=120)
    plt.close(fig)


def evaluate_only(results: list[dict], psi: np.ndarray, args: Args) -> dict:
    """--eval-only: regenerate each saved MDP, rebuild its mixtures from their classifiers (bit for bit the trained
    tables) and evaluate them exactly; print and return the costs."""
    costs: dict[str, list[float]] = {name: [] for name in (*ALGORITHMS, "optimal")}
    for i, result in enumerate(results):
        mdp = make_garnet(args.num_states, args.num_actions, args.branching, args.gamma, result["mdp_seed"])
        for algo in ALGORITHMS:
            costs[algo].append(policy_cost(mdp, mixture_policy(result[algo]["classifiers"].numpy(), psi, args.beta)))
        costs["optimal"].append(float(mdp.rho0 @ policy_iteration(mdp)[0]))
        print(f"mdp {i + 1} (seed {result['mdp_seed']}) | " + " | ".join(f"{k} {v[-1]:.4f}" for k, v in costs.items()))
    means = {f"cost_{name}": float(np.mean(v)) for name, v in costs.items()}
    print(" | ".join(f"{k} {v:.4f}" for k, v in means.items()), flush=True)
    return {**means, "costs": costs, "eval_return": -means["cost_aggrevated_vi"]}


def train(args: Args) -> dict:
    """Both algorithms on every Garnet MDP, then Fig. 1a; returns the final mean costs, counters and the run directory."""
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
    for i in range(len(results), args.num_mdps):
        mdp = make_garnet(args.num_states, args.num_actions, args.branching, args.gamma, seeds[i])
        result = {"mdp_seed": seeds[i], "optimal_cost": float(mdp.rho0 @ policy_iteration(mdp)[0])}
        for algo in ALGORITHMS:
            # its own random stream: the result does not depend on what ran before, so resuming is exact
            rng = np.random.default_rng([seeds[i], ALGORITHMS.index(algo)])
            pi = np.full((args.num_states, args.num_actions), 1.0 / args.num_actions)  # pi_0: (1 - beta)^n of it stays
            counts, V, where = (
                TransitionCounts(args.num_states, args.num_actions),
                None,
                f"mdp {i + 1}/{args.num_mdps} | {algo}",
            )
            episodes, steps, costs, classifiers, next_log = [0], [0], [policy_cost(mdp, pi)], [], args.log_every
            for _ in range(num_iterations(args, algo)):
                if algo == "cpi":
                    cpi = (args.cpi_states, args.q_rollouts, args.common_horizon, args.ridge, args.beta)
                    pi, W, metrics, used_episodes, used_steps = cpi_step(mdp, pi, psi, *cpi, rng)
                else:
                    vi = (args.vi_episodes, args.mu, args.ridge, args.beta)
                    pi, W, V, metrics, used_episodes, used_steps = aggrevated_vi_step(mdp, pi, psi, counts, V, *vi, rng)
                classifiers.append(W)
                episodes.append(episodes[-1] + used_episodes)
                steps.append(steps[-1] + used_steps)
                costs.append(policy_cost(mdp, pi))  # exact J(pi_{n+1})
                global_step, num_updates = global_step + used_steps, num_updates + 1
                run.add_metrics({k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})
                if steps[-1] >= next_log:  # every log_every transitions of this run
                    run.log(global_step, num_updates, f"{where} | episodes {episodes[-1]} | cost {costs[-1]:.4f}")
                    next_log += args.log_every
            result[algo] = dict(episodes=torch.tensor(episodes), steps=torch.tensor(steps))
            result[algo] |= dict(
                costs=torch.tensor(costs, dtype=torch.float64), classifiers=torch.tensor(np.stack(classifiers))
            )
            print(
                f"{where} | episodes {episodes[-1]} | cost {costs[-1]:.4f} | optimal {result['optimal_cost']:.4f}", flush=True
            )
        results.append(result)
        if args.checkpoint_every:  # after each MDP, where resuming is exact
            run.save(global_step, num_updates, True)
    # -- Fig. 1a: curves.csv, fig1a.png and tensorboard; model.pt
    title = f"[DPI] Fig. 1a: {args.num_mdps} Garnet MDPs, |S|={args.num_states}, |A|={args.num_actions}, "
    write_results(
        summarize(results), run.run_dir, run.writer, title + f"b={args.branching}, gamma={args.gamma}, beta={args.beta}"
    )
    if args.save_model:
        run.save(global_step, num_updates, False)
    run.close()
    final = {f"cost_{algo}": float(np.mean([r[algo]["costs"][-1].item() for r in results])) for algo in ALGORITHMS}
    final["cost_optimal"] = float(np.mean([r["optimal_cost"] for r in results]))
    print("done: " + " | ".join(f"{k} {v:.4f}" for k, v in final.items()) + f" | run {run.run_dir}", flush=True)
    # eval_return: the key every file returns, here minus [DPI]'s cost
    return dict(
        final, global_step=global_step, num_updates=num_updates, eval_return=-final["cost_aggrevated_vi"], run_dir=run.run_dir
    )


# ======== run plumbing below: identical in every file, not needed to read the algorithm ========
import dataclasses
import json
import os
import random
import sys
import time
import warnings

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
        (
            payload.get("format") != CHECKPOINT_FORMAT,
            f"has format {payload.get('format')}; this file reads {CHECKPOINT_FORMAT}",
        ),
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


def rng_state() -> dict:
    """Python, numpy and torch random states as plain values and tensors (torch.load's weights_only)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    numpy = [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss]
    return {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    kind, key, pos, has_gauss, gauss = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def setup(args: Args) -> torch.device:
    """Seed python, numpy and torch, set torch's CPU threads, and return the device."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    return torch.device("cuda" if args.cuda else "cpu")


class Run:
    """Everything around `train`'s loop: run directory, tensorboard, progress line, saving, --resume, --checkpoint
    (continuing its experiment, or --eval-only). sac.py's Run without an env: `train` evaluates every iterate
    exactly, logs per (MDP, algorithm) run and saves resume.pt after each MDP, where resuming is exact.

    model: what model.pt saves; train_state: what resume.pt adds; both by name, as tensors or objects with
    state_dict."""

    def __init__(self, args: Args, model: dict, train_state: dict):
        self.args, self.model, self.train_state = args, model, train_state
        self.sums, self.counts, self.writer = {}, {}, None
        if args.checkpoint is not None:
            load_state(model, load_checkpoint(args.checkpoint, args.env)["state"], args.checkpoint)

    def start(self) -> tuple[int, int]:
        """Open the run directory (new, or the resumed run's) and restore --resume; return (global_step, num_updates)."""
        args, global_step, num_updates = self.args, 0, 0
        run_dir = os.path.join(args.log_dir, f"{args.env}__{ALGO}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}")
        # a new directory even for runs started in the same second: -2, -3, ...
        self.run_dir = next(d for d in (run_dir, *(f"{run_dir}-{i}" for i in range(2, 10_000))) if not os.path.exists(d))
        if args.resume is not None:
            saved = load_checkpoint(args.resume, args.env, training=True)
            load_state(self.model, saved["state"], args.resume)
            load_state(self.train_state, saved["train"], args.resume)
            set_rng_state(saved["train"]["rng"])
            global_step, num_updates = saved["global_step"], saved["train"]["num_updates"]
            self.run_dir = os.path.dirname(os.path.abspath(args.resume))
        elif args.checkpoint is not None:
            print(f"continuing {args.checkpoint}: its finished MDPs are kept, the others run; step count starts afresh")
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
        """model.pt, or resume.pt with the training state, counters and random states; atomic (write, rename)."""
        args = dataclasses.asdict(dataclasses.replace(self.args, checkpoint=None, resume=None, eval_only=False))
        payload = dict(format=CHECKPOINT_FORMAT, algo=ALGO, env=self.args.env, args=args, global_step=global_step)
        payload["state"] = state_of(self.model)
        if training:
            payload["train"] = dict(state_of(self.train_state), num_updates=num_updates, rng=rng_state())
        path = os.path.join(self.run_dir, "resume.pt" if training else "model.pt")
        torch.save(payload, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
        return path

    def close(self) -> None:
        self.writer.close() if self.writer is not None else None


def parse_args(argv: list[str] | None) -> Args:
    """tyro parse; with --checkpoint or --resume the saved run's arguments become the defaults, so flags given
    now override them and everything else matches the saved run."""
    args = tyro.cli(Args, args=argv)
    if args.resume or args.checkpoint:
        saved = load_checkpoint(args.resume or args.checkpoint, training=args.resume is not None)["args"]
        fields = {f.name for f in dataclasses.fields(Args)}
        defaults = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})
        args = tyro.cli(Args, args=argv, default=defaults)
    return args


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*settotalmass")  # gymnasium's half_cheetah.xml, under mujoco 4
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
