"""Conservative Policy Iteration versus AGGREVATED-VI on random Garnet MDPs, in one file.

References:
    [DPI] Sun, Gordon, Boots, Bagnell 2018, "Dual Policy Iteration": Sec. 3.2 (eq. 5-6, the
        conservative update), Sec. 5.1 (eq. 9-10, the trust-region cost c'), Sec. 6.1 and Fig. 1a
        (this experiment). Its App. B.1 (the experiment's constants) is not in shared/papers.
    [CPI] Kakade, Langford 2002, "Approximately Optimal Approximate Reinforcement Learning" (not
        in shared/papers): the mixture update, sampling s ~ d_pi by rollouts with stopping
        probability 1 - gamma, and unbiased Q estimates from such rollouts.
    [Garnet] Archibald, McKinnon, Thomas 1995 and Scherrer 2014, "Approximate Policy Iteration
        Schemes: A Comparison" ([DPI] ref. 7): random MDPs with a branching factor.

Algorithm (per iteration n, on each of M MDPs; the function that does each line in brackets):
    1. Garnet MDP: b random next states per (s, a) with probabilities from a random partition
       of [0, 1], costs c(s, a) ~ U(0, 1), rho0 uniform                           [make_garnet]
    2. Features psi(s) = (binary encoding of s, 1); pi_0 uniform                      [features]
    CPI [CPI; DPI Sec. 6.1]:
    3. N states s_i ~ d_pi_n: episodes from rho0 that stop w.p. 1 - gamma    [sample_visitation]
    4. Qhat(s_i, a), every a: take a in s_i, follow pi_n, sum costs until it stops  [estimate_q]
    5. One linear regressor per action, pi*_n(s) = argmin_a w_a . psi(s)  [fit_regressors, classify]
    6. pi_{n+1} = (1 - beta) pi_n + beta pi*_n [DPI eq. 6], an exact table  [conservative_update]
    AGGREVATED-VI [DPI Sec. 3.3, 6.1]:
    3'. N' episodes of pi_n from rho0; every transition goes into P_hat  [TransitionCounts.model]
    4'. eta_n by exact soft value iteration under P_hat on c' = c / mu - log pi_n [DPI eq. 10]
                                                                               [value_iteration]
    5'. A^eta = Q - V of that VI at the visited states; steps 5-6 with A^eta    [aggrevated_vi_step]
    Both: J(pi_n) = rho0^T (I - gamma P_pi)^-1 c_pi after every update, by a linear solve
    [evaluate_policy]; Fig. 1a plots its mean and standard error over the M MDPs against
    episodes [summarize, write_results], J(pi*) by policy iteration        [policy_iteration]

Shapes: S states, A actions, F features (bits + 1), K non-zeros of a sparse transition model,
N sampled states, R rollouts per (state, action), E episodes, T transitions.

Usage:
    python cpi_garnet.py                                 # Fig. 1a: 10 MDPs, 1000 states, 5 actions
    python cpi_garnet.py --num-states 256 --num-mdps 3 --total-steps 100000
    python cpi_garnet.py --checkpoint runs/<run>/model.pt --eval-only
    python cpi_garnet.py --resume runs/<run>/resume.pt

Outputs in the run directory: curves.csv and fig1a.png (mean and standard error over the MDPs
of the cost against episodes, log2 scale), the same scalars in tensorboard, args.json, model.pt
and resume.pt. The saved model is the MDPs' seeds and, per MDP and algorithm, every classifier
W_k of the mixture: --eval-only regenerates the MDPs, rebuilds each mixture (bit for bit the
trained table) and evaluates it exactly. resume.pt holds the finished MDPs; a resumed run
continues with the next MDP and ends identical to an uninterrupted one.

Choices the paper leaves open (its App. B.1 is missing); each is a flag or named here:
    - Garnet: b = 5, c(s, a) ~ U(0, 1), rho0 uniform, gamma = 0.95 (ALGO_NOTES 4.1); beta = 0.1
      for both algorithms, no line search ([DPI] Sec. 6.1: beta tuned, value not given).
    - Budget: --total-steps transitions per MDP and algorithm, in expectation: a fixed number
      of iterations [num_iterations], so that all MDPs' curves share their x values. An
      episode is one rollout that stops w.p. 1 - gamma before each action, from rho0 or, for
      CPI's Q estimates, from a sampled state with a chosen first action (the [CPI] restart
      model); the x-axis counts both kinds, as Fig. 1a counts episodes.
    - CPI: the A rollouts from one state share their random length (common random numbers,
      --common-horizon): every Qhat stays unbiased and the differences between actions, all
      that the argmin sees, lose the variance of the horizon (std 1.1 instead of 8.5 at the
      default sizes). Qhat is regressed rather than Ahat = Qhat - Vhat: with all actions
      observed at the same states, least squares is linear in the targets, so the argmin is
      the same.
    - AGGREVATED-VI: P_hat(s'|s, a) = n(s, a, s') / n(s, a) over all transitions so far, c_hat
      the mean observed cost, an unvisited (s, a) a self-loop with the mean observed cost.
      eta_n uses the trust-region cost c' of [DPI eq. 10] with a fixed mu (--mu 0.5, in cost
      units; --mu 0 is plain VI), and A^eta = Q - V is that VI's own (soft) Q and V.
    - AGGREVATED-VI regresses on every state its episodes visited (a step-t state survives
      w.p. gamma^t, so the visits sample d_pi_n); CPI on the episodes' last states, because
      each costs A further rollouts.

Deviations from the paper:
    - [DPI] eq. 9 adapts mu by dual ascent to meet a trust region alpha that the experiment
      does not state; mu is fixed instead. beta bounds the step of pi either way (eq. 6).
    - [DPI] eq. 10 prints "- sum_t gamma^t E[H(eta)]" with H the negative entropy; the KL term
      of eq. 9 gives "+", so eta(a|s) is proportional to pi_n(a|s) exp(-Q(s, a) / mu).
    - The Fig. 1a scalars in tensorboard (charts/cost_*) use episodes as their step, the
      paper's x-axis, since global_step differs between the MDPs they average.
    - Shared arguments without meaning here: --env must stay Garnet, --num-envs 1, no --cuda,
      no --capture-video; --eval-every and --eval-episodes are unused (every iterate is
      evaluated exactly); resume.pt is written after each finished MDP, the point where
      resuming is exact, whenever --checkpoint-every is positive.
"""

# == 1. Imports ========================================================================
import csv
import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

ALGO = "cpi_garnet"
CHECKPOINT_FORMAT = 1
ALGORITHMS = ("cpi", "aggrevated_vi")  # the two curves of [DPI] Fig. 1a
VI_TOL = 1e-10  # value iteration stops when a sweep moves V by less (cost units)


# == 2. Arguments ======================================================================
class UsageError(Exception):
    """Bad user input: `main` prints it as one line on stderr and returns 2."""


@dataclass
class Args:
    # -- shared: identical in every file ---------------------------------------------
    env: str = "Garnet"
    """Gymnasium id of the task."""
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
    """Write resume.pt (everything needed to continue) every this many env steps (0: never)."""
    checkpoint: str | None = None
    """A model.pt or resume.pt to load; its saved arguments become the defaults."""
    eval_only: bool = False
    """With --checkpoint: evaluate the loaded policy, print the returns and exit."""
    resume: str | None = None
    """A resume.pt to continue training from, in its run directory."""
    capture_video: bool = False
    """Record evaluation episodes to <run>/videos (needs a rendering backend)."""
    # -- algorithm ---------------------------------------------------------------------
    # Garnet MDPs [DPI Sec. 6.1: ten MDPs, 1000 states, 5 actions; the rest ALGO_NOTES 4.1]
    num_states: int = 1000
    """Number of states |S| of each Garnet MDP."""
    num_actions: int = 5
    """Number of actions |A|."""
    branching: int = 5
    """Branching factor b: next states reachable from each (s, a) (paper: not given)."""
    num_mdps: int = 10
    """Number of random MDPs that the curves average over."""
    gamma: float = 0.95
    """Discount factor gamma; rollouts stop with probability 1 - gamma (paper: not given)."""
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


def check_args(args: Args) -> None:
    """Raise UsageError for values no run can use."""
    if args.total_steps <= 0:
        raise UsageError(f"--total-steps must be positive, got {args.total_steps}")
    if args.num_envs <= 0:
        raise UsageError(f"--num-envs must be positive, got {args.num_envs}")
    if args.threads <= 0:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    if args.log_every <= 0:
        raise UsageError(f"--log-every must be positive, got {args.log_every}")
    if args.eval_every < 0 or args.checkpoint_every < 0:
        raise UsageError("--eval-every and --checkpoint-every must be >= 0")
    if args.eval_episodes <= 0:
        raise UsageError(f"--eval-episodes must be positive, got {args.eval_episodes}")
    if args.eval_only and args.checkpoint is None:
        raise UsageError("--eval-only needs --checkpoint PATH")
    if args.resume is not None and args.checkpoint is not None:
        raise UsageError("give either --resume or --checkpoint, not both")
    if args.cuda and not torch.cuda.is_available():
        raise UsageError("--cuda was given but torch sees no CUDA device")
    # -- algorithm ---------------------------------------------------------------------
    # shared arguments that cannot apply to a tabular experiment
    if args.env != "Garnet":
        raise UsageError(
            f"--env {args.env!r} does not apply: this script generates Garnet MDPs "
            "(set their sizes with --num-states, --num-actions, --branching)"
        )
    if args.num_envs != 1:
        raise UsageError("--num-envs does not apply: rollouts are batched inside one process")
    if args.cuda:
        raise UsageError("--cuda does not apply: the experiment is tabular numpy on the CPU")
    if args.capture_video:
        raise UsageError("--capture-video does not apply: Garnet MDPs have nothing to render")
    if args.num_states < 2 or args.num_actions < 2:
        raise UsageError("--num-states and --num-actions must be at least 2")
    if not 1 <= args.branching <= args.num_states:
        raise UsageError(f"--branching must be in [1, --num-states={args.num_states}], got {args.branching}")
    if args.num_mdps <= 0:
        raise UsageError(f"--num-mdps must be positive, got {args.num_mdps}")
    if not 0.0 < args.gamma < 1.0:
        raise UsageError(f"--gamma must be in (0, 1), got {args.gamma}")
    if not 0.0 < args.beta <= 1.0:
        raise UsageError(f"--beta must be in (0, 1], got {args.beta}")
    if args.ridge <= 0:
        raise UsageError(f"--ridge must be positive, got {args.ridge}")
    if min(args.cpi_states, args.q_rollouts, args.vi_episodes) <= 0:
        raise UsageError("--cpi-states, --q-rollouts and --vi-episodes must be positive")
    if args.mu < 0:
        raise UsageError(f"--mu must be >= 0, got {args.mu}")


# == 3. Environment ====================================================================
class MDP(NamedTuple):
    """A finite discounted MDP in cost form with sparse transitions.

    P(cols[k] | s, a) = probs[k] for rows[k] = s * A + a; the same (s, a) may not repeat a
    next state. Shapes: rows, cols, probs [K]; costs [S, A]; rho0 [S].
    """

    rows: np.ndarray
    cols: np.ndarray
    probs: np.ndarray
    costs: np.ndarray
    rho0: np.ndarray
    gamma: float


def make_garnet(num_states: int, num_actions: int, branching: int, gamma: float, seed: int) -> MDP:
    """A Garnet(S, A, b) MDP [Garnet], the same for the same arguments.

    Each (s, a) reaches b distinct next states drawn uniformly without replacement; their
    probabilities are the gaps between b - 1 sorted U(0, 1) cut points of [0, 1] (a uniform
    point of the simplex). Costs c(s, a) ~ U(0, 1), rho0 uniform (ALGO_NOTES 4.1).
    """
    rng = np.random.default_rng(seed)
    S, A, b = num_states, num_actions, branching
    # Floyd's algorithm, vectorised over the S * A rows: a uniform b-subset of range(S) in
    # O(b^2) per row, where argsort of S keys per row would take S * A * S memory
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
    return MDP(
        rows=np.repeat(np.arange(S * A), b),
        cols=next_states.ravel(),
        probs=probs.ravel(),
        costs=costs,
        rho0=np.full(S, 1.0 / S),
        gamma=gamma,
    )


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
    """E episodes of pi [S, A] on mdp, advanced together; episode i makes lengths[i] transitions.

    With first_actions, each episode's first action is that one instead of a draw from pi.
    The MDP must have the same number b of non-zeros per (s, a), as a Garnet does.
    Shapes: starts, lengths, first_actions [E].
    """
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

    An episode stops in s_t with probability (1 - gamma) gamma^t, so end_states ~ d_pi, and it
    reaches s_t with probability gamma^t, so all its visited states sample d_pi as well.
    """
    starts = rng.choice(len(mdp.rho0), size=num_episodes, p=mdp.rho0)
    lengths = rng.geometric(1.0 - mdp.gamma, size=num_episodes) - 1  # P(length >= t) = gamma^t
    return rollouts(mdp, pi, starts, lengths, None, rng)


def estimate_q(
    mdp: MDP, pi: np.ndarray, states: np.ndarray, num_rollouts: int, common_horizon: bool, rng: np.random.Generator
) -> tuple[np.ndarray, Rollouts]:
    """Qhat(s_i, a) for every action: the mean over num_rollouts episodes that take a in s_i,
    then follow pi, of the undiscounted cost until the episode stops [CPI].

    The episode makes L >= 1 transitions with P(L > t) = gamma^t, so the step-t cost counts with
    probability gamma^t and the sum is an unbiased estimate of Q^pi(s_i, a). With
    common_horizon, the A episodes of one (state, repetition) share L (common random numbers):
    each estimate stays unbiased and their differences, which are all the argmin over actions
    sees, lose the variance of the random horizon. Shapes: states [N]; Qhat [N, A].
    """
    A = mdp.costs.shape[1]
    N, R = len(states), num_rollouts
    shape = (N, R, 1) if common_horizon else (N, R, A)
    lengths = np.broadcast_to(rng.geometric(1.0 - mdp.gamma, size=shape), (N, R, A))
    # episode i * R * A + r * A + a starts in states[i] with action a
    q = rollouts(mdp, pi, np.repeat(states, R * A), lengths.ravel(), np.tile(np.arange(A), N * R), rng)
    return q.total_costs.reshape(N, R, A).mean(axis=1), q


# == 4. Networks =======================================================================
def features(num_states: int) -> np.ndarray:
    """psi(s) = (binary encoding of s in ceil(log2 S) bits [DPI Sec. 6.1], 1 as a bias): [S, F]."""
    bits = max(1, math.ceil(math.log2(num_states)))
    s = np.arange(num_states)[:, None]
    binary = (s >> np.arange(bits)[None, :]) & 1  # [S, bits], least significant bit first
    return np.concatenate([binary, np.ones((num_states, 1))], axis=1).astype(np.float64)


def fit_regressors(psi: np.ndarray, targets: np.ndarray, ridge: float) -> np.ndarray:
    """One ridge regression per action: w_a = argmin sum_i (w_a . psi_i - y_ia)^2 + ridge |w_a|^2.

    Regression-based cost-sensitive classification [CPI; DPI Sec. 6.1]. All actions share the
    design matrix, so one solve gives every w_a. Shapes: psi [N, F], targets [N, A]; W [F, A].
    """
    gram = psi.T @ psi + ridge * np.eye(psi.shape[1])
    return np.linalg.solve(gram, psi.T @ targets)


def classify(psi: np.ndarray, W: np.ndarray) -> np.ndarray:
    """The linear classifier pi*(s) = argmin_a w_a . psi(s): [S] from psi [S, F], W [F, A]."""
    return np.argmin(psi @ W, axis=1)


# == 5. Storage ========================================================================
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
        """The maximum-likelihood model P_hat = n(s, a, s') / n(s, a) [DPI eq. 2], c_hat the mean
        observed cost; an unvisited (s, a) is a self-loop with the mean observed cost."""
        rows, cols = self.keys // self.S, self.keys % self.S
        probs = self.counts / self.visits[rows]
        seen = self.visits > 0
        mean_cost = self.cost_sum[seen].sum() / self.visits[seen].sum() if seen.any() else 0.5
        costs = np.where(seen, self.cost_sum / np.maximum(self.visits, 1), mean_cost)
        unseen = np.flatnonzero(~seen)  # Choice: self-loops; the paper does not say
        return MDP(
            rows=np.concatenate([rows, unseen]),
            cols=np.concatenate([cols, unseen // self.A]),
            probs=np.concatenate([probs, np.ones(len(unseen))]),
            costs=costs.reshape(self.S, self.A),
            rho0=rho0,
            gamma=gamma,
        )


# == 6. Algorithm ======================================================================
def bellman_q(mdp: MDP, V: np.ndarray) -> np.ndarray:
    """Q(s, a) = c(s, a) + gamma sum_s' P(s'|s, a) V(s'), the sparse backup: [S, A] from V [S]."""
    S, A = mdp.costs.shape
    expected = np.bincount(mdp.rows, weights=mdp.probs * V[mdp.cols], minlength=S * A)
    return mdp.costs + mdp.gamma * expected.reshape(S, A)


def value_iteration(
    mdp: MDP, V: np.ndarray | None = None, mu: float = 0.0, prior: np.ndarray | None = None, tol: float = VI_TOL
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Exact (soft) value iteration: the fixed point of [DPI eq. 10] with temperature mu.

    mu = 0: V(s) = min_a Q(s, a), eta greedy (plain VI). mu > 0, the KL-regularised problem
    [DPI eq. 9] min_eta E[sum_t gamma^t (c + mu log(eta / pi_n))] (eq. 10 times mu):
        Q(s, a) = c(s, a) + gamma sum_s' P(s'|s, a) V(s'),
        V(s) = -mu log sum_a pi_n(a|s) exp(-Q(s, a) / mu),
        eta(a|s) = pi_n(a|s) exp(-(Q(s, a) - V(s)) / mu).
    Symbols: pi_n -> prior [S, A]; mu -> mu (cost units, c' = c / mu - log pi_n). Stops when a
    sweep moves V by less than tol, so |V - V*| <= tol gamma / (1 - gamma).
    Returns V [S], Q [S, A], eta [S, A] and the number of sweeps.
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
    """Howard's policy iteration: exact evaluation by a linear solve, then greedy improvement.

    Terminates in finitely many steps at the optimal V* [S] and a deterministic greedy policy
    [S] (an action switches only on a strict improvement, so ties cannot cycle).
    """
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


def conservative_update(pi: np.ndarray, greedy: np.ndarray, beta: float) -> np.ndarray:
    """pi_{n+1} = (1 - beta) pi_n + beta pi*_n [DPI eq. 6; CPI], exactly, as a table.

    pi*_n is deterministic: greedy [S] holds its action. Every state then moves by
    D_TV(pi_{n+1}(.|s), pi_n(.|s)) = beta (1 - pi_n(greedy(s)|s)) <= beta ([DPI] Sec. 3.2).
    Shapes: pi [S, A]; returns [S, A].
    """
    out = (1.0 - beta) * pi
    out[np.arange(len(greedy)), greedy] += beta
    return out


def mixture_policy(classifiers: np.ndarray, psi: np.ndarray, beta: float) -> np.ndarray:
    """The mixture (1 - beta)^n pi_0 + sum_k beta (1 - beta)^(n-1-k) pi*_k as an [S, A] table.

    Rebuilt from the stored classifiers W_k [n, F, A] by the same sequence of conservative
    updates as training, so it equals the trained table bit for bit. pi_0 is uniform.
    """
    A = classifiers.shape[-1]
    pi = np.full((psi.shape[0], A), 1.0 / A)
    for W in classifiers:
        pi = conservative_update(pi, classify(psi, W), beta)
    return pi


# == 7. Updates ========================================================================
def cpi_step(
    mdp: MDP, pi: np.ndarray, psi: np.ndarray, args: Args, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, float], int, int]:
    """One CPI iteration [CPI; DPI Sec. 6.1] with Monte Carlo Q^pi_n.

    Returns pi_{n+1}, the classifier W [F, A], metrics, episodes and transitions used.
    """
    states = sample_visitation(mdp, pi, args.cpi_states, rng)  # s_i ~ d_pi_n
    q_hat, q = estimate_q(mdp, pi, states.end_states, args.q_rollouts, args.common_horizon, rng)
    W = fit_regressors(psi[states.end_states], q_hat, args.ridge)
    residual = psi[states.end_states] @ W - q_hat
    pi_next = conservative_update(pi, classify(psi, W), args.beta)  # [DPI eq. 6]
    metrics = {"losses/regression_cpi": float((residual**2).mean())}
    episodes = args.cpi_states * (1 + mdp.costs.shape[1] * args.q_rollouts)
    return pi_next, W, metrics, episodes, len(states.states) + len(q.states)


def aggrevated_vi_step(
    mdp: MDP,
    pi: np.ndarray,
    psi: np.ndarray,
    counts: TransitionCounts,
    V: np.ndarray | None,
    args: Args,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float], int, int]:
    """One AGGREVATED-VI iteration [DPI Sec. 3.3 steps 1-3, Sec. 6.1].

    Fit P_hat on all transitions so far [DPI eq. 2], eta_n by exact VI under P_hat and c'
    [DPI eq. 10], A^eta = Q - V, then the CPI classification and update with A^eta in place of
    A^pi [DPI eq. 5-6]. V is the previous iteration's value, a warm start for the VI.
    Returns pi_{n+1}, W [F, A], V, metrics, episodes and transitions used.
    """
    data = sample_visitation(mdp, pi, args.vi_episodes, rng)
    counts.add(data.states, data.actions, data.costs, data.next_states)
    model = counts.model(mdp.rho0, mdp.gamma)  # [DPI eq. 2] tabular MLE
    V, Q, _, sweeps = value_iteration(model, V, args.mu, pi)  # eta_n [DPI eq. 10]
    advantage = Q - V[:, None]  # A^eta(s, a) from the VI's own Q and V
    visited = np.concatenate([data.states, data.end_states])  # a sample of d_pi_n
    W = fit_regressors(psi[visited], advantage[visited], args.ridge)
    residual = psi[visited] @ W - advantage[visited]
    pi_next = conservative_update(pi, classify(psi, W), args.beta)  # [DPI eq. 6]
    metrics = {
        "losses/regression_aggrevated_vi": float((residual**2).mean()),
        "stats/model_coverage": counts.coverage(),
        "stats/vi_sweeps": float(sweeps),
    }
    return pi_next, W, V, metrics, args.vi_episodes, len(data.states)


# == 8. Evaluation =====================================================================
def transition_matrix(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    """P_pi(s, s') = sum_a pi(a|s) P(s'|s, a) as a dense [S, S] matrix."""
    S, A = mdp.costs.shape
    weights = pi.ravel()[mdp.rows] * mdp.probs
    flat = np.bincount((mdp.rows // A) * S + mdp.cols, weights=weights, minlength=S * S)
    return flat.reshape(S, S)


def evaluate_policy(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    """V^pi = (I - gamma P_pi)^-1 c_pi by a linear solve: [S] from pi [S, A].

    torch.linalg.solve in float64, because its threads follow --threads: numpy's BLAS threads
    cannot be set after import, and oversubscribe a shared CPU.
    """
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


# == 9. Checkpoints ====================================================================
def save_checkpoint(path: str, payload: dict) -> None:
    """torch.save to a temporary file, then rename: a killed run never leaves a broken file."""
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, env: str | None = None, device: str | torch.device = "cpu") -> dict:
    """Load a checkpoint of this algorithm (and of `env`, when given) with weights_only=True."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 (whatever makes the file unreadable: one clear line)
        raise UsageError(f"cannot read checkpoint {path}: {type(e).__name__}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a checkpoint of this repository (format {CHECKPOINT_FORMAT})")
    if payload["algo"] != ALGO:
        raise UsageError(f"{path} is a {payload['algo']} checkpoint, not {ALGO}")
    if env is not None and payload["env"] != env:
        raise UsageError(f"{path} was trained on {payload['env']}, not {env}")
    return payload


# == 10. Training ======================================================================
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_run(args: Args) -> tuple[str, SummaryWriter]:
    """The run directory (a new one, or the resumed run's) and its tensorboard writer."""
    if args.resume is not None:
        run_dir = os.path.dirname(os.path.abspath(args.resume))
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = os.path.join(args.log_dir, f"{args.env}__{ALGO}__{args.seed}__{stamp}")
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=2)
    writer = SummaryWriter(run_dir)
    table = "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items())
    writer.add_text("args", f"|argument|value|\n|-|-|\n{table}")
    return run_dir, writer


def saved_args(args: Args) -> dict:
    """Arguments stored in a checkpoint: the run's settings without the load/resume paths."""
    return dataclasses.asdict(dataclasses.replace(args, checkpoint=None, resume=None, eval_only=False))


class Progress:
    """Averages metrics between log lines and writes the log line.

    Adapted from sac.py: metrics arrive as floats (numpy, no device to sync) and are counted
    per key (the two algorithms log different keys), and the line names the MDP, the
    algorithm and the exact cost of its policy instead of returns.
    """

    def __init__(self, writer: SummaryWriter, start_step: int, start_updates: int):
        self.writer, self.sums, self.counts = writer, {}, {}
        self.last = (time.perf_counter(), start_step, start_updates)

    def add_metrics(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def log(self, global_step: int, num_updates: int, where: str, cost: float) -> None:
        now = time.perf_counter()
        t0, step0, updates0 = self.last
        sps = (global_step - step0) / max(now - t0, 1e-9)
        ups = (num_updates - updates0) / max(now - t0, 1e-9)
        self.writer.add_scalar("charts/SPS", sps, global_step)
        self.writer.add_scalar("charts/updates_per_second", ups, global_step)
        for k, v in self.sums.items():
            self.writer.add_scalar(k, v / self.counts[k], global_step)
        print(f"step {global_step} | {where} | cost {cost:.4f} | SPS {sps:.0f} | updates/s {ups:.1f}", flush=True)
        self.sums, self.counts = {}, {}
        self.last = (now, global_step, num_updates)


def mdp_seeds(seed: int, num_mdps: int) -> list[int]:
    """One seed per Garnet MDP, derived from --seed (independent streams for different seeds)."""
    return [int(x) for x in np.random.SeedSequence(seed).generate_state(num_mdps)]


def num_iterations(args: Args, algo: str) -> int:
    """Iterations that spend args.total_steps transitions in expectation, at least one.

    An episode from rho0 makes gamma / (1 - gamma) transitions on average, a Q rollout
    1 / (1 - gamma). A fixed count (rather than stopping at the budget) gives every MDP the
    same iterations, so the curves average over the MDPs at the same numbers of episodes.
    """
    if algo == "cpi":  # N episodes from rho0, then N A R Q rollouts
        transitions = args.cpi_states * (args.gamma + args.num_actions * args.q_rollouts)
    else:
        transitions = args.vi_episodes * args.gamma
    transitions /= 1.0 - args.gamma  # expected transitions per iteration
    return max(1, math.ceil(args.total_steps / transitions))


def run_mdp(
    mdp: MDP, mdp_seed: int, algo: str, args: Args, progress: Progress, counters: dict[str, int], where: str
) -> dict[str, torch.Tensor]:
    """Train one algorithm on one MDP for num_iterations(args, algo) iterations.

    Its own random stream (seeded by the MDP's seed and the algorithm) makes the result
    independent of what ran before, so a resumed experiment repeats the uninterrupted one.
    Returns the curve (episodes, steps, cost per iterate) and the classifiers, as tensors.
    """
    rng = np.random.default_rng([mdp_seed, ALGORITHMS.index(algo)])
    S, A = mdp.costs.shape
    psi = features(S)
    pi = np.full((S, A), 1.0 / A)  # pi_0 uniform: every mixture keeps (1 - beta)^n of it
    counts = TransitionCounts(S, A)
    V = None
    episodes, steps = [0], [0]
    costs = [policy_cost(mdp, pi)]
    classifiers = []
    next_log = args.log_every
    for _ in range(num_iterations(args, algo)):
        if algo == "cpi":
            pi, W, metrics, used_episodes, used_steps = cpi_step(mdp, pi, psi, args, rng)
        else:
            pi, W, V, metrics, used_episodes, used_steps = aggrevated_vi_step(mdp, pi, psi, counts, V, args, rng)
        classifiers.append(W)
        episodes.append(episodes[-1] + used_episodes)
        steps.append(steps[-1] + used_steps)
        costs.append(policy_cost(mdp, pi))
        counters["global_step"] += used_steps
        counters["num_updates"] += 1
        progress.add_metrics(metrics)
        if steps[-1] >= next_log:
            progress.log(
                counters["global_step"], counters["num_updates"], f"{where} | {algo} | episodes {episodes[-1]}", costs[-1]
            )
            next_log += args.log_every
    return {
        "episodes": torch.tensor(episodes),
        "steps": torch.tensor(steps),
        "costs": torch.tensor(costs, dtype=torch.float64),
        "classifiers": torch.from_numpy(np.stack(classifiers)),
    }


def summarize(results: list[dict]) -> list[dict]:
    """Fig. 1a's rows: per algorithm and iteration, the episodes so far, and the mean and
    standard error of the cost over the MDPs (which share their iterations and episodes)."""
    rows = []
    optimal = float(np.mean([r["optimal_cost"] for r in results]))
    for algo in ALGORITHMS:
        n = len(results[0][algo]["costs"])
        if any(len(r[algo]["costs"]) != n for r in results):
            raise UsageError("the resumed MDPs ran other budgets: resume with the same arguments")
        costs = np.stack([r[algo]["costs"][:n].numpy() for r in results])  # [M, n]
        steps = np.stack([r[algo]["steps"][:n].numpy() for r in results])
        episodes = results[0][algo]["episodes"][:n].numpy()
        M = len(results)
        se = costs.std(axis=0, ddof=1) / np.sqrt(M) if M > 1 else np.zeros(n)
        for k in range(n):
            mean = float(costs[:, k].mean())
            rows.append(
                {
                    "algorithm": algo,
                    "iteration": k,
                    "episodes": int(episodes[k]),
                    "env_steps": float(steps[:, k].mean()),
                    "cost_mean": mean,
                    "cost_se": float(se[k]),
                    "log2_cost_mean": math.log2(mean),
                    "optimal_cost_mean": optimal,
                    "num_mdps": M,
                }
            )
    return rows


def write_results(rows: list[dict], run_dir: str, writer: SummaryWriter, title: str) -> None:
    """curves.csv, fig1a.png and the same scalars in tensorboard (step = episodes)."""
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
    # imported here: matplotlib is slow to import and only this function needs it
    import matplotlib

    matplotlib.use("Agg")  # no display; a PNG file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = {"cpi": "CPI", "aggrevated_vi": "AGGREVATED-VI"}
    for algo in ALGORITHMS:
        mine = [r for r in rows if r["algorithm"] == algo]
        x = np.array([r["episodes"] for r in mine])
        mean = np.array([r["cost_mean"] for r in mine])
        se = np.array([r["cost_se"] for r in mine])
        ax.plot(x, np.log2(mean), label=labels[algo])
        ax.fill_between(x, np.log2(mean - se), np.log2(mean + se), alpha=0.3)
    # J* as text, not a line: the tabular optimum is far below what linear classifiers reach
    optimal = rows[0]["optimal_cost_mean"]
    ax.plot([], [], " ", label=f"optimal policy: log2 J* = {math.log2(optimal):.2f}")
    ax.set_xlabel("episodes")
    ax.set_ylabel("log2 cost J(pi) (mean +- s.e.)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "fig1a.png"), dpi=120)
    plt.close(fig)


def evaluate_only(args: Args) -> dict:
    """--eval-only: regenerate the MDPs, rebuild every mixture from its classifiers, and
    evaluate it exactly; prints and returns the costs."""
    payload = load_checkpoint(args.checkpoint, args.env)
    psi = features(args.num_states)
    out: dict[str, list[float]] = {algo: [] for algo in ALGORITHMS}
    out["optimal"] = []
    for i, result in enumerate(payload["state"]["mdps"]):
        mdp = make_garnet(args.num_states, args.num_actions, args.branching, args.gamma, result["mdp_seed"])
        out["optimal"].append(float(mdp.rho0 @ policy_iteration(mdp)[0]))
        for algo in ALGORITHMS:
            pi = mixture_policy(result[algo]["classifiers"].numpy(), psi, args.beta)
            out[algo].append(policy_cost(mdp, pi))
        print(
            f"mdp {i + 1} (seed {result['mdp_seed']}) | cpi {out['cpi'][-1]:.4f} | "
            f"aggrevated_vi {out['aggrevated_vi'][-1]:.4f} | optimal {out['optimal'][-1]:.4f}",
            flush=True,
        )
    means = {f"cost_{k}": float(np.mean(v)) for k, v in out.items()}
    print(" | ".join(f"{k} {v:.4f}" for k, v in means.items()), flush=True)
    return {**means, "costs": out}


def train(args: Args) -> dict:
    """Run the whole experiment; returns the final mean costs, counters and the run directory."""
    # -- setup: seeds, device, run directory, writer
    seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    resume = load_checkpoint(args.resume, args.env) if args.resume else None
    run_dir, writer = open_run(args)
    # -- environments: one seed per Garnet; each MDP is generated when its turn comes
    seeds = mdp_seeds(args.seed, args.num_mdps)
    # -- storage: the finished MDPs' curves and classifiers (a resumed run starts from them)
    results: list[dict] = []
    counters = {"global_step": 0, "num_updates": 0}
    if resume is not None:
        results = list(resume["state"]["mdps"])
        counters = dict(resume["train"]["counters"])
    progress = Progress(writer, counters["global_step"], counters["num_updates"])

    def payload(with_train_state: bool) -> dict:
        out = {
            "format": CHECKPOINT_FORMAT,
            "algo": ALGO,
            "env": args.env,
            "args": saved_args(args),
            "global_step": counters["global_step"],
            "state": {"mdps": results},
            "obs_norm": None,
        }
        if with_train_state:
            out["train"] = {"counters": dict(counters)}
        return out

    # -- loop: every MDP, both algorithms on the same MDP
    for i in range(len(results), args.num_mdps):
        mdp = make_garnet(args.num_states, args.num_actions, args.branching, args.gamma, seeds[i])
        optimal_cost = float(mdp.rho0 @ policy_iteration(mdp)[0])
        result = {"mdp_seed": seeds[i], "optimal_cost": optimal_cost}
        for algo in ALGORITHMS:
            where = f"mdp {i + 1}/{args.num_mdps}"
            result[algo] = run_mdp(mdp, seeds[i], algo, args, progress, counters, where)
            print(
                f"{where} | {algo} | episodes {int(result[algo]['episodes'][-1])} | "
                f"cost {float(result[algo]['costs'][-1]):.4f} | optimal {optimal_cost:.4f}",
                flush=True,
            )
        results.append(result)
        if args.checkpoint_every:
            save_checkpoint(os.path.join(run_dir, "resume.pt"), payload(with_train_state=True))
    # -- finish: Fig. 1a (CSV, PNG, tensorboard), save, close
    rows = summarize(results)
    title = (
        f"[DPI] Fig. 1a: {args.num_mdps} Garnet MDPs, |S|={args.num_states}, "
        f"|A|={args.num_actions}, b={args.branching}, gamma={args.gamma}, beta={args.beta}"
    )
    write_results(rows, run_dir, writer, title)
    if args.save_model:
        save_checkpoint(os.path.join(run_dir, "model.pt"), payload(with_train_state=False))
    writer.close()
    final = {f"cost_{algo}": float(np.mean([r[algo]["costs"][-1].item() for r in results])) for algo in ALGORITHMS}
    final["cost_optimal"] = float(np.mean([r["optimal_cost"] for r in results]))
    print("done: " + " | ".join(f"{k} {v:.4f}" for k, v in final.items()) + f" | run {run_dir}", flush=True)
    return {
        **final,
        "global_step": counters["global_step"],
        "num_updates": counters["num_updates"],
        "eval_return": -final["cost_aggrevated_vi"],  # the cross-file key: minus [DPI]'s cost
        "run_dir": run_dir,
    }


# == 11. Entry point ===================================================================
def parse_args(argv: list[str] | None) -> Args:
    """tyro parse; with --checkpoint or --resume the saved run's arguments become the defaults,
    so flags given now override them and everything else matches the saved run."""
    args = tyro.cli(Args, args=argv)
    path = args.resume or args.checkpoint
    if path is not None:
        saved = load_checkpoint(path)["args"]
        fields = {f.name for f in dataclasses.fields(Args)}
        defaults = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})
        args = tyro.cli(Args, args=argv, default=defaults)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        check_args(args)
        evaluate_only(args) if args.eval_only else train(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
