# /// script
# requires-python = ">=3.10"
# dependencies = ["torch>=2.6", "numpy>=1.26", "gymnasium[mujoco]>=1.1,<2", "mujoco>=4.0.1", "tensorboard>=2.14", "tyro>=0.9", "dm-control>=1.0.52", "shimmy[dm-control]>=2.0.1", "moviepy>=2"]
# ///
"""Dual Policy Iteration with iLQR on learned local models (AGGREVATED-ILQR), in one file.

References:
    [DPI] Sun, Gordon, Boots, Bagnell 2018, "Dual Policy Iteration", arXiv:1805.10755: Sec. 5.1 model-based optimal
        control with local linear models (eq. 8-10), Sec. 5.2 natural-gradient imitation (eq. 11-12), Sec. 6.3 robust
        policy optimisation. Its settings (App. B) are not in the text we have: our defaults say so.
    [iLQR] lecture notes on local models and KL-constrained trajectory optimisation (Bayesian linear dynamics with a
        GMM / normal-inverse-Wishart prior, "KL-divergences between trajectories", dual gradient descent).
    [GPS] Levine, Abbeel 2014, "Learning Neural Network Policies with Guided Policy Search under Unknown Dynamics",
        and its code (cbfinn/gps), followed where the papers are silent.
    [TRPO] Schulman et al. 2015, arXiv:1502.05477, App. C: conjugate gradient on Fisher-vector products.

Algorithm (one iteration; the function that does each line in brackets):
    1. Run pi_n (Gaussian MLP, state-independent std) for N episodes of horizon T in each training env      [rollout]
    2. Refit the dynamics prior: a GMM over (s, a, s') of recent episodes, all t                            [gmm_fit]
    3. Fit s_{t+1} ~ N(A_t s_t + B_t a_t + c_t, Sigma_t) per t, NIW posterior [DPI eq. 8] [prior_moments, fit_dynamics]
    4. Quadratic c, linearised pi_n, c' = c / mu - log pi_n [DPI eq. 10]  [quadratic_cost, linearize_policy, augmented_cost]
    5. LQR backward pass on c': eta_t = N(K_t s + k_t, Q_aa^-1)                                         [lqr_backward]
    6. Search mu so that sum_t gamma^t E KL(eta_t || pi_n) = alpha [DPI eq. 9]  [trajectory_kl, solve_eta, dual_search]
    7. Evaluate eta under the model with the true cost: A_t = Q_t - V_t                  [lqr_evaluate, disadvantage]
    8. L(theta) = E_s E_{a~pi_theta} A_t(s, a), analytic for a Gaussian [DPI eq. 11]          [expected_disadvantage]
    9. theta <- theta_n - sqrt(beta / g'F^-1 g) F^-1 g [DPI eq. 12] [conjugate_gradient, fisher_vector_product, update_actor]
    --robust [DPI Sec. 6.3]: steps 2-8 per perturbed training env (one model, mu and eta each), one step 9 on the
    summed L; held-out test variants are only evaluated.

Shapes: N episodes, T time steps, O observation size, A action size, Y = O + A, D = 2 O + A (one transition),
K mixture components, M prior points, B states in a batch, P policy parameters.

Deviations from the paper (each marked where it happens): the known cost c(s, a) [DPI Sec. 2] is written per env from its
reward (COSTS); pi_n in -log pi_n and the KL is linearised per step (GPS); A^eta is for the true cost c, not the augmented c';
states in L(theta) weigh the same, not gamma^t; TRPO's line search checks the step; c is expanded exactly at the samples (GPS),
not regressed; mu comes from GPS's bracket search, not projected gradient ascent; training episodes are cut at --horizon T
(charts/eval_return_horizon scores the first T steps of the evaluation episodes, charts/eval_return all of them).
Changes to GPS: a dynamics ridge relative to each input's variance, GMM components with a pseudo-point of the global covariance
started from a k-means step, the NIW mean shrunk to the prior's. The robust variants are ours.
"""

import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import gymnasium as gym
import mujoco
import numpy as np
import torch
from torch import Tensor, nn

ALGO = "dpi_ilqr"
ACTION_SPACES = (gym.spaces.Box,)  # the LQR plans in continuous actions


# == 1. Arguments ==========================================================================================
@dataclass
class Args:
    # -- algorithm ----------------------------------------------------------------------------------------
    # Reactive policy [DPI Sec. 6.2: "a two-layer neural network"]
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layer sizes of the policy mean (paper: two layers, sizes not given)."""
    activation: Literal["relu", "elu", "tanh"] = "tanh"
    """Hidden activation of the policy mean."""
    init_log_std: float = 0.0
    """Initial log standard deviation of the state-independent Gaussian policy."""
    # Rollouts [DPI Sec. 5, Alg. 1]; --num-envs of them run in lockstep
    episodes: int = 10
    """N: episodes of pi_n per iteration in each training env (paper: App. B.4, not in text)."""
    horizon: int = 200
    """T: steps per training episode and LQR horizon ([DPI Sec. 7]: "relatively short")."""
    gamma: float = 0.99
    """Discount gamma inside the LQR recursion and the KL sum [DPI eq. 9]."""
    # Local dynamics [DPI eq. 8; iLQR: GMM / normal-inverse-Wishart prior; GPS defaults]
    prior_strength: float = 1.0
    """Pseudo-samples m = n0 of the NIW prior at each step ([GPS]: 1; 0: plain regression)."""
    prior_episodes: int = 20
    """Recent episodes (all t) the GMM prior is fitted on ([GPS] max_samples: 20)."""
    prior_max_clusters: int = 20
    """Most GMM components ([GPS] max_clusters: 20 in its MuJoCo examples)."""
    prior_min_samples_per_cluster: int = 40
    """Transitions per GMM component; fewer clusters when data is short ([GPS]: 40)."""
    prior_em_iters: int = 20
    """Most EM iterations per GMM refit, warm-started from the last fit ([GPS]: 100)."""
    dynamics_reg: float = 1e-6
    """Relative ridge on the (s, a) covariance before conditioning ([GPS]: 1e-6, absolute)."""
    # Trajectory optimisation [DPI eq. 9-10]
    alpha: float = 10.0
    """alpha: bound on sum_t gamma^t E KL(eta_t || pi_n) (paper: not given; GPS ~0.2/step)."""
    kl_tolerance: float = 0.1
    """The dual search stops when |KL - alpha| <= this fraction of alpha ([GPS]: 0.1)."""
    dual_iters: int = 50
    """Most LQR passes of the dual search on mu ([GPS]: 50)."""
    # Natural-gradient imitation [DPI eq. 11-12; TRPO App. C]
    beta: float = 0.02
    """beta: bound on (theta - theta_n)' F (theta - theta_n), i.e. 2x TRPO's delta."""
    cg_iters: int = 10
    """Conjugate-gradient iterations for the direction s = F^-1 g [TRPO App. C]."""
    cg_damping: float = 0.1
    """Damping lambda of the Fisher, F + lambda I (paper: not given; as trpo.py)."""
    line_search: bool = True
    """Backtrack until L(theta) decreases and 2 KL <= beta (paper: a plain step; as trpo.py)."""
    backtrack_coef: float = 0.8
    """Line-search shrink factor (as trpo.py)."""
    backtrack_iters: int = 10
    """Line-search steps tried before the update is rejected (as trpo.py)."""
    # Robust policy optimisation [DPI Sec. 6.3: 10 perturbed envs, 7 to train, 3 to test]
    robust: bool = False
    """Train on perturbed variants of --env (one model and eta each) and test on others."""
    robust_train_variants: int = 7
    """Training variants M."""
    robust_test_variants: int = 3
    """Held-out test variants, evaluated only."""
    robust_mass_range: tuple[float, float] = (0.5, 1.5)
    """Range of the uniform mass scale of the variants."""
    robust_length_range: tuple[float, float] = (0.5, 1.5)
    """Range of the uniform pole-length scale (InvertedPendulum-v5 only)."""
    # -- shared: identical in every file ------------------------------------------------------------------
    env: str = "InvertedPendulum-v5"
    """Gymnasium id of the task (`module:Env-v0` imports `module` first, for an env it registers)."""
    seed: int = 1
    """Seed for python, numpy, torch and the environments."""
    total_steps: int = 100_000
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
    counts = (args.prior_episodes, args.prior_max_clusters, args.prior_min_samples_per_cluster, args.prior_em_iters)
    positive = (args.alpha, args.beta, args.dual_iters, args.cg_iters, args.backtrack_iters)
    non_negative = (args.prior_strength, args.dynamics_reg, args.cg_damping)
    variants = (args.robust_train_variants, args.robust_test_variants)
    ranges = (args.robust_mass_range, args.robust_length_range)
    return [
        (not args.cuda, f"{ALGO}.py runs on the CPU: its LQR and fits are small and sequential"),
        (args.env in COSTS, f"{args.env} has no known cost in {ALGO}.py; supported: {', '.join(COSTS)}"),
        (min(args.hidden_sizes, default=0) > 0, f"--hidden-sizes must be positive, got {args.hidden_sizes}"),
        (args.episodes >= 2 and args.horizon > 0, "--episodes must be >= 2 and --horizon positive"),
        (0.0 < args.gamma <= 1.0, f"--gamma must be in (0, 1], got {args.gamma}"),
        (min(counts) > 0, "the --prior-* counts (episodes, max clusters, samples per cluster, EM iterations) must be > 0"),
        (min(positive) > 0, "--alpha, --beta, --dual-iters, --cg-iters and --backtrack-iters must be positive"),
        (min(non_negative) >= 0, "--prior-strength, --dynamics-reg and --cg-damping must be >= 0"),
        (0.0 < args.kl_tolerance < 1.0, f"--kl-tolerance must be in (0, 1), got {args.kl_tolerance}"),
        (0.0 < args.backtrack_coef < 1.0, f"--backtrack-coef must be in (0, 1), got {args.backtrack_coef}"),
        (not args.robust or min(variants) > 0, "--robust needs positive --robust-train-variants and --robust-test-variants"),
        (not args.robust or not args.env.startswith("dm_control/"), "--robust perturbs gymnasium's models, not the suite's"),
        (all(0.0 < low <= high for low, high in ranges), "--robust-mass-range and --robust-length-range need 0 < low <= high"),
    ]


# == 2. Environment ========================================================================================
# LinearQuadratic-v0, where the optimal cost is known: a point mass in the plane, x = (position, velocity) in R^4,
# u = force in R^2, x' = A x + B u + w, w ~ N(0, LQ_NOISE_STD^2 I), reward -(x'Qx + u'Ru), no termination.
LQ_ENV_ID = "LinearQuadratic-v0"
LQ_DT, LQ_HORIZON = 0.1, 50  # seconds per step; steps per episode (a TimeLimit truncation)
LQ_STATE_COST, LQ_ACTION_COST = (1.0, 1.0, 0.1, 0.1), 0.1  # diagonal of Q, and R = 0.1 I
LQ_NOISE_STD = 0.05  # std of each component of the process noise w
LQ_INIT_RANGE = (1.0, 1.0, 0.5, 0.5)  # x_0 ~ uniform in [-range, range] per component
LQ_ACTION_BOUND = 10.0  # |u_i| <= 10; the optimal controller stays well inside


def lq_matrices(mass: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A [4, 4] and B [4, 2] of the point mass (explicit Euler; the velocity feels u / mass)."""
    eye = np.eye(2)
    return np.block([[eye, LQ_DT * eye], [np.zeros((2, 2)), eye]]), np.vstack([np.zeros((2, 2)), LQ_DT / mass * eye])


class LinearQuadraticEnv(gym.Env):
    def __init__(self, mass: float = 1.0):
        self.a, self.b = lq_matrices(mass)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float64)
        self.action_space = gym.spaces.Box(-LQ_ACTION_BOUND, LQ_ACTION_BOUND, (2,), np.float32)
        self.x = np.zeros(4)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.x = self.np_random.uniform(-1.0, 1.0, 4) * np.array(LQ_INIT_RANGE)
        return self.x.copy(), {}

    def step(self, action):
        u = np.clip(np.asarray(action, dtype=np.float64), -LQ_ACTION_BOUND, LQ_ACTION_BOUND)
        cost = self.x @ (np.array(LQ_STATE_COST) * self.x) + LQ_ACTION_COST * u @ u
        noise = LQ_NOISE_STD * self.np_random.standard_normal(4)
        self.x = self.a @ self.x + self.b @ u + noise
        return self.x.copy(), -float(cost), False, False, {}


def register_envs() -> None:
    """Register LinearQuadratic-v0 on first use (not at import: importing has no side effects)."""
    if LQ_ENV_ID not in gym.registry:
        gym.register(LQ_ENV_ID, entry_point=LinearQuadraticEnv, max_episode_steps=LQ_HORIZON)


# The known cost c(s, a) of each env [DPI Sec. 2] from its reward (gymnasium 1.4 v5, dm-control 1.0.52): obs, actions -> [...].
# Deviation (README, Costs): a per-step cost, without termination or time limits; velocities at s_t, not (x' - x) / dt.
PENDULUM_ANGLE_LIMIT = 0.2  # InvertedPendulum-v5 terminates when |angle| > 0.2 rad
PENDULUM_RAIL_COST = 0.1  # weight of x^2, keeps the cart off the rail ends (|x| <= 1)
PENDULUM_ACTION_COST = 1e-3  # small control cost, conditions Q_aa
HOPPER_ANGLE_LIMIT = 0.2  # Hopper-v5 is unhealthy when |torso angle| > 0.2 rad
CostFn = Callable[[Tensor, Tensor], Tensor]  # c(obs [..., O], actions [..., A]) -> [...]


def cartpole_swingup_cost(obs: Tensor, actions: Tensor) -> Tensor:
    """Minus dm_control's smooth cartpole reward (suite/cartpole.py; tolerance with bounds 0 and a Gaussian sigmoid is
    g(z, m) = 0.1^((z / m)^2)): upright (cos + 1) / 2, centred (1 + g(x, 2)) / 2, small control (4 + 1 - u^2) / 5 (its
    quadratic tolerance, for |u| <= 1: the action bounds), small velocity (1 + g(angle', 5)) / 2, multiplied.
    obs = (x, cos, sin, x', angle'): the suite's position and velocity, flattened in sorted key order. The suite rewards
    step t at (s_{t+1}, a_t); like every cost here, c is charged at (s_t, a_t)."""
    tolerance = lambda z, margin: 0.1 ** ((z / margin) ** 2)
    upright, centred = (obs[..., 1] + 1) / 2, (1 + tolerance(obs[..., 0], 2.0)) / 2
    small_control = (5 - (actions**2).sum(-1)) / 5
    small_velocity = (1 + tolerance(obs[..., 4], 5.0)) / 2
    return -upright * centred * small_control * small_velocity


COSTS: dict[str, CostFn] = {
    # obs = (x, angle, x', angle'); the env's flat +1 while |angle| <= 0.2 is useless to an LQR: a smooth surrogate
    "InvertedPendulum-v5": lambda obs, actions: (
        -1.0
        + (obs[..., 1] / PENDULUM_ANGLE_LIMIT) ** 2
        + PENDULUM_RAIL_COST * obs[..., 0] ** 2
        + PENDULUM_ACTION_COST * (actions**2).sum(-1)
    ),
    "Swimmer-v5": lambda obs, actions: -obs[..., 3] + 1e-4 * (actions**2).sum(-1),  # -x velocity (qvel[0] after qpos[2:])
    # -1 - x velocity (obs[5]) + 1e-3 |a|^2 + a quadratic torso-angle term for the healthy range the LQR cannot see
    "Hopper-v5": lambda obs, actions: (
        -1.0 - obs[..., 5] + 1e-3 * (actions**2).sum(-1) + (obs[..., 1] / HOPPER_ANGLE_LIMIT) ** 2
    ),
    "HalfCheetah-v5": lambda obs, actions: -obs[..., 8] + 0.1 * (actions**2).sum(-1),  # -x velocity (qvel[0] after qpos[1:])
    # x'Qx + u'Ru: exactly minus the env's reward (the action is inside its bounds)
    LQ_ENV_ID: lambda obs, actions: (
        (torch.tensor(LQ_STATE_COST, dtype=obs.dtype) * obs**2).sum(-1) + LQ_ACTION_COST * (actions**2).sum(-1)
    ),
    "dm_control/cartpole-swingup-v0": cartpole_swingup_cost,  # exactly minus the reward, smooth inside the action bounds
}


def make_variant_env(env_id: str, mass_scale: float, length_scale: float) -> gym.Env:
    """An env with perturbed physics [DPI Sec. 6.3: pole mass and length]. InvertedPendulum-v5: the pole `length_scale`
    times as long (and heavy: masses come from geom volumes), then `mass_scale` times as heavy; other MuJoCo envs: every
    body's mass and inertia times `mass_scale`; LinearQuadratic-v0: the mass."""
    if env_id == LQ_ENV_ID:
        return gym.make(env_id, mass=mass_scale)
    if env_id != "InvertedPendulum-v5":
        env = gym.make(env_id)
        bodies = slice(1, None)  # every body but the world
    else:
        xml = (Path(gym.__file__).parent / "envs" / "mujoco" / "assets" / "inverted_pendulum.xml").read_text()
        pole = 'fromto="0 0 0 0.001 0 0.6"'  # the pole geom, from the hinge up
        if xml.count(pole) != 1:
            raise RuntimeError("gymnasium's inverted_pendulum.xml no longer has the pole geom")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "inverted_pendulum.xml"
            path.write_text(xml.replace(pole, f'fromto="0 0 0 0.001 0 {0.6 * length_scale}"'))
            env = gym.make(env_id, xml_file=str(path))  # the model is compiled here
        bodies = [env.unwrapped.model.body("pole").id]
    model = env.unwrapped.model
    model.body_mass[bodies] *= mass_scale
    model.body_inertia[bodies] *= mass_scale
    mujoco.mj_setConst(model, env.unwrapped.data)  # derived constants (subtree masses, ...)
    return env


def robust_variants(args: Args) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(mass_scale, length_scale) of the training and the held-out test variants, uniform in the ranges, from their own
    generator; the test variants first, so a seed gives one test set for any number of training variants."""
    rng = np.random.default_rng(args.seed)
    params = []
    for _ in range(args.robust_test_variants + args.robust_train_variants):
        mass, length = rng.uniform(*args.robust_mass_range), rng.uniform(*args.robust_length_range)
        params.append((float(mass), float(length) if args.env == "InvertedPendulum-v5" else 1.0))
    return params[args.robust_test_variants :], params[: args.robust_test_variants]


class FirstStepsReturn(gym.Wrapper):
    """Records the undiscounted return of the first `steps` steps of each episode, one per reset, in `returns`."""

    def __init__(self, env: gym.Env, steps: int):
        super().__init__(env)
        self.steps, self.returns, self.elapsed = steps, [], 0

    def reset(self, **kwargs):
        self.returns.append(0.0)
        self.elapsed = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.returns[-1] += float(reward) if self.elapsed < self.steps else 0.0
        self.elapsed += 1
        return obs, reward, terminated, truncated, info


class TrainingEnvs(NamedTuple):
    """--num-envs copies of each training env and (--robust) the held-out test variants; no vector env: see `rollout`."""

    train: list[list[gym.Env]]
    test: list[gym.Env]

    def close(self) -> None:
        for env in [env for group in self.train for env in group] + self.test:
            env.close()


# == 3. Networks ===========================================================================================
ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh}


class Actor(nn.Module):
    """pi(a|s) = N(mean(s), diag(exp(log_std)^2)) with a state-independent log std ([TRPO] App. D), so that -log pi
    is a quadratic with one precision for all states [DPI eq. 10]."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: tuple[int, ...], activation: str, init_log_std: float):
        super().__init__()
        sizes = [obs_dim, *hidden_sizes]
        self.trunk = nn.Sequential()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            self.trunk.extend([nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()])
        self.head = nn.Linear(hidden_sizes[-1], action_dim)
        with torch.no_grad():  # a small last layer starts the mean near zero (baselines ppo2)
            self.head.weight.mul_(0.01)
            self.head.bias.zero_()
        self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))

    def forward(self, obs: Tensor) -> Tensor:
        """The Gaussian mean [B, A] (the deterministic action, before clipping to the bounds)."""
        return self.head(self.trunk(obs))

    def sample(self, obs: Tensor) -> Tensor:
        """An action a ~ pi(.|s) [B, A] (unclipped; `rollout` clips)."""
        mean = self(obs)
        return mean + self.log_std.exp() * torch.randn_like(mean)


# == 4. Storage ============================================================================================
class Rollouts(NamedTuple):  # N episodes from resets, time-aligned, float64 for the fits; rows past an end are zero
    obs: Tensor  # [N, T + 1, O], obs[:, t + 1] the true next observation of step t
    actions: Tensor  # [N, T, A] executed (clipped) actions
    mask: Tensor  # [N, T] bool, True where step t was taken


def rollout(envs: list[gym.Env], sample_actions: Callable, horizon: int, seeds: np.ndarray) -> tuple[Rollouts, dict]:
    """len(seeds) episodes of sample_actions(obs [n, O]) -> actions [n, A], each from env.reset(seed) at t = 0 (one
    model per time step) and cut at `horizon` steps, len(envs) at a time in lockstep. Returns the rollouts and, in the
    order they ended, the episodes' returns and lengths as gymnasium's RecordEpisodeStatistics infos."""
    space = envs[0].action_space
    obs = np.zeros((len(seeds), horizon + 1, envs[0].observation_space.shape[0]))
    actions = np.zeros((len(seeds), horizon, space.shape[0]))
    mask = np.zeros((len(seeds), horizon), dtype=bool)
    returns, ended = np.zeros(len(seeds)), []
    for start in range(0, len(seeds), len(envs)):
        group = np.arange(start, min(start + len(envs), len(seeds)))
        for j, i in enumerate(group):
            obs[i, 0] = envs[j].reset(seed=int(seeds[i]))[0]
        alive = np.ones(len(group), dtype=bool)
        for t in range(horizon):
            live = np.flatnonzero(alive)
            # the env gets, and the model is fitted on, the action inside the bounds
            chosen = np.clip(sample_actions(obs[group[live], t]), space.low, space.high)
            for j, action in zip(live, chosen):
                next_obs, reward, terminated, truncated, _ = envs[j].step(action)
                i = group[j]
                obs[i, t + 1], actions[i, t], mask[i, t] = next_obs, action, True
                returns[i] += reward
                # Deviation: cut at the LQR horizon T (one model per step; [DPI Sec. 7] "relatively short")
                if terminated or truncated or t == horizon - 1:
                    alive[j] = False
                    ended.append(i)
            if not alive.any():
                break
    infos = {"episode": {"r": returns[ended], "l": mask.sum(1)[ended]}, "_episode": np.ones(len(ended), dtype=bool)}
    return Rollouts(torch.as_tensor(obs), torch.as_tensor(actions), torch.as_tensor(mask)), infos  # float64


class PriorBuffer:
    """Transitions (s_t, a_t, s_{t+1}) of the last `capacity` episodes, all t, each [L, D], and the GMM prior last fitted
    on them ([iLQR] "fit a global GMM using all samples of all iterations"; [GPS] keeps the last 20 episodes)."""

    def __init__(self, capacity: int):
        self.capacity, self.episodes, self.gmm = capacity, [], None

    def add(self, rollouts: Rollouts) -> None:
        for obs, actions, mask in zip(*rollouts):
            length = int(mask.sum())
            self.episodes.append(torch.cat([obs[:length], actions[:length], obs[1 : length + 1]], 1))
        self.episodes = self.episodes[-self.capacity :]

    def state_dict(self) -> dict:
        return {"episodes": list(self.episodes), "gmm": None if self.gmm is None else list(self.gmm)}

    def load_state_dict(self, state: dict) -> None:
        self.episodes, self.gmm = list(state["episodes"]), None if state["gmm"] is None else GMM(*state["gmm"])


# == 5. Algorithm ==========================================================================================
GMM_MAX_POINTS = 5_000  # EM runs on at most this many prior points (an even subsample)
GMM_TOL = 1e-3  # EM stops when the mean log-likelihood per point improves by less
VARIANCE_FLOOR = 1e-12  # the ridge of an input that did not vary at all
MU_BOUNDS = (1e-8, 1e16)  # bracket of the dual search on mu ([GPS] min_eta, max_eta)
MU_INIT = 1.0  # mu before the first search ([GPS] initial eta)
LOG_2PI = float(np.log(2 * np.pi))
CG_RESIDUAL_TOL = 1e-10  # stop CG once |r|^2 is below this (modular_rl; as trpo.py)
STEP_EPS = 1e-12  # guards sqrt(beta / g'F^-1 g) against g'F^-1 g = 0 (as trpo.py)


class GMM(NamedTuple):  # Gaussian mixture sum_k w_k N(mu_k, Sigma_k) over transitions (s, a, s')
    log_weights: Tensor  # [K]
    means: Tensor  # [K, D]
    covs: Tensor  # [K, D, D]


class Dynamics(NamedTuple):  # s' ~ N(F_t [s; a] + f_t, cov_t), F_t = [A_t B_t], f_t = c_t [DPI eq. 8] (names of [GPS])
    F: Tensor  # [T, O, Y]
    f: Tensor  # [T, O]
    cov: Tensor  # [T, O, O]


class Quadratic(NamedTuple):  # a quadratic in y = [s; a] per step: q_t(y) = 1/2 y'C_t y + c_t'y + c0_t
    C: Tensor  # [T, Y, Y]
    c: Tensor  # [T, Y]
    c0: Tensor  # [T]


class LinearGaussianPolicy(NamedTuple):  # eta_t(a|s) = N(K_t s + k_t, cov_t) [DPI Sec. 5]
    K: Tensor  # [T, A, O]
    k: Tensor  # [T, A]
    cov: Tensor  # [T, A, A]


class ValueFunction(NamedTuple):  # V_t(s) = 1/2 s'V_xx s + v_x's + v0 per step
    V_xx: Tensor  # [T, O, O]
    v_x: Tensor  # [T, O]
    v0: Tensor  # [T]


def sym(m: Tensor) -> Tensor:
    """(M + M') / 2 over the last two dims ([GPS] symmetrises after every product)."""
    return 0.5 * (m + m.transpose(-1, -2))


def masked_mean(x: Tensor, w: Tensor) -> Tensor:
    """Mean over dim 1 weighted by the mask w: x [T, N, ...], w [T, N] -> [T, ...]."""
    w = w.to(x.dtype).reshape(*w.shape, *([1] * (x.dim() - 2)))
    return (w * x).sum(1) / w.sum(1).clamp_min(1.0)


def gmm_log_prob(points: Tensor, gmm: GMM) -> Tensor:
    """log w_k + log N(x_m; mu_k, Sigma_k) for every point and component: [M, D] -> [M, K]."""
    chol = torch.linalg.cholesky(gmm.covs)  # [K, D, D], Sigma_k = L L'
    eye = torch.eye(points.shape[1], dtype=points.dtype)
    inv_t = torch.linalg.solve_triangular(chol, eye, upper=False).transpose(1, 2)  # L^-T
    num, (clusters, dim) = len(points), gmm.means.shape
    # L_k^-1 (x - mu_k) for all k in one matrix product: [M, D] @ [D, K D] -> [M, K, D]
    z = (points @ inv_t.transpose(0, 1).reshape(dim, -1)).reshape(num, clusters, dim)
    z = z - (gmm.means[:, None] @ inv_t)[:, 0]
    log_det = torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)  # [K]
    log_n = -0.5 * z.pow(2).sum(2) - log_det - 0.5 * dim * LOG_2PI  # [M, K]
    return log_n + gmm.log_weights


def gmm_fit(points: Tensor, clusters: int, iters: int, init: GMM | None) -> GMM:
    """Gaussian mixture over transitions by EM, the prior's source [iLQR "fit a global GMM"]: E-step r_mk = w_k N(x_m; mu_k,
    Sigma_k) / sum_j w_j N(x_m; mu_j, Sigma_j); M-step (MAP, a pseudo-point of the global covariance S) N_k = sum_m r_mk,
    mu_k = sum_m r_mk x_m / N_k, w_k = N_k / M, Sigma_k = (sum_m r_mk (x_m - mu_k)(x_m - mu_k)' + S) / (N_k + 1). Starts
    from `init` if it has K components, else from each point assigned to the nearest of K random points (torch's generator;
    [GPS] assigns at random, so every mean starts near the global mean); stops when the mean log-likelihood gains less than
    GMM_TOL. Shapes: points [M, D] float64 -> GMM with K = clusters."""
    num, dim = points.shape
    centre = points.mean(0)
    x = points - centre  # EM on centred points keeps the second moments well conditioned
    global_cov = x.T @ x / num + 1e-6 * torch.eye(dim, dtype=points.dtype)
    if init is not None and init.means.shape == (clusters, dim):
        gmm, resp = GMM(init.log_weights, init.means - centre, init.covs), None
    else:  # each point to the nearest of K distinct random points (one k-means step)
        nearest = torch.cdist(x, x[torch.randperm(num)[:clusters]]).argmin(1)
        resp = nn.functional.one_hot(nearest, clusters).to(x.dtype)
    last = -float("inf")
    for _ in range(iters):
        if resp is None:  # E-step
            log_p = gmm_log_prob(x, gmm)  # [M, K]
            log_norm = torch.logsumexp(log_p, 1, keepdim=True)
            resp = (log_p - log_norm).exp()
            mean_ll = float(log_norm.mean())
            if mean_ll - last < GMM_TOL:
                break
            last = mean_ll
        # M-step: scatter_k = sum_m r_mk x_m x_m' - N_k mu_k mu_k'
        n_k = resp.sum(0).clamp_min(1e-12)  # [K]
        means = resp.T @ x / n_k[:, None]  # [K, D]
        weighted = (resp[:, :, None] * x[:, None]).reshape(num, -1)  # [M, K D]
        second = (weighted.T @ x).reshape(clusters, dim, dim)  # sum_m r_mk x_m x_m'
        scatter = second - n_k[:, None, None] * means[:, :, None] * means[:, None, :]
        # Deviation from [GPS] (1e-6 I, reseeding; the paper is silent): the pseudo-point conditions a sparse component
        covs = sym((scatter + global_cov) / (n_k + 1.0)[:, None, None])
        gmm, resp = GMM(torch.log(n_k / num), means, covs), None
    return GMM(gmm.log_weights, gmm.means + centre, gmm.covs)


def prior_moments(gmm: GMM, points: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """NIW prior mean mu0_t and scatter Phi_t at each step from the GMM [iLQR; GPS]: w_tk = mean over the samples at t
    of their responsibilities, mu0_t = sum_k w_tk mu_k, Phi_t = sum_k w_tk (Sigma_k + (mu_k - mu0_t)(mu_k - mu0_t)').
    Shapes: points [T, N, D], mask [T, N] -> mu0 [T, D], Phi [T, D, D]."""
    steps, num, dim = points.shape
    log_p = gmm_log_prob(points.reshape(-1, dim), gmm)  # [T N, K]
    resp = (log_p - torch.logsumexp(log_p, 1, keepdim=True)).exp().reshape(steps, num, -1)
    w = masked_mean(resp, mask)  # [T, K]
    mu0 = w @ gmm.means  # [T, D]
    diff = gmm.means[None] - mu0[:, None]  # [T, K, D]
    phi = torch.einsum("tk,kde->tde", w, gmm.covs) + torch.einsum("tk,tkd,tke->tde", w, diff, diff)
    return mu0, sym(phi)


def fit_dynamics(points: Tensor, mask: Tensor, mu0: Tensor, phi: Tensor, n0: float, reg: float, obs_dim: int) -> Dynamics:
    """Per-step linear-Gaussian dynamics from a normal-inverse-Wishart posterior [DPI eq. 8]. With n_t samples y_i = (s_t,
    a_t, s_{t+1}), their mean m and scatter S, and the prior (mu0_t, Phi_t) worth m0 = n0 samples (`n0`, [iLQR; GPS]):
    Sigma = (S + m0 Phi + n m0 / (n + m0) (m - mu0)(m - mu0)') / (n + n0), mu = (n m + m0 mu0) / (n + m0). Conditioning
    on (s, a): F = Sigma_{s',y} Sigma_{y,y}^-1 (reg * diag(Sigma_{y,y}) added, a ridge on standardised inputs), f =
    mu_{s'} - F mu_y, cov = Sigma_{s',s'} - F Sigma_{y,y} F'. Shapes: points [T, N, D], mask [T, N] (a sample per step
    unless n0 > 0), mu0 [T, D], phi [T, D, D] -> F [T, O, Y], f [T, O], cov [T, O, O]."""
    w = mask.to(points.dtype)  # [T, N]
    n = w.sum(1)  # [T]
    mean = masked_mean(points, mask)  # [T, D]
    diff = (points - mean[:, None]) * w[..., None]  # masked rows are zero
    scatter = diff.transpose(1, 2) @ diff  # [T, D, D]
    shift = mean - mu0
    coef = (n * n0 / (n + n0).clamp_min(1e-12))[:, None, None]
    sigma = (scatter + n0 * phi + coef * shift[:, :, None] * shift[:, None, :]) / (n + n0)[:, None, None]
    # Deviation from [GPS] (the sample mean): the posterior mean, defined even at a step that one episode reached
    mu = (n[:, None] * mean + n0 * mu0) / (n + n0)[:, None]
    sigma = sym(sigma)
    y = points.shape[2] - obs_dim
    # Deviation from [GPS] (reg * I): relative to each input's variance, since converged states barely move (README)
    variance = torch.diagonal(sigma[:, :y, :y], dim1=1, dim2=2).clamp_min(VARIANCE_FLOOR)
    s_yy = sigma[:, :y, :y] + reg * torch.diag_embed(variance)
    s_xy = sigma[:, y:, :y]  # [T, O, Y]
    F = torch.linalg.solve(s_yy, s_xy.transpose(1, 2)).transpose(1, 2)  # s_yy symmetric
    f = mu[:, y:] - (F @ mu[:, :y, None])[..., 0]
    cov = sym(sigma[:, y:, y:] - F @ s_yy @ F.transpose(1, 2))
    return Dynamics(F, f, cov)


def quadratic_cost(cost_fn: CostFn, obs: Tensor, actions: Tensor, mask: Tensor) -> Quadratic:
    """Second-order expansion of c around every sample y^ = [s; a], re-centred and averaged per step [GPS]: c(y) ~ 1/2 y'H y
    + (g - H y^)'y + (c(y^) - g'y^ + 1/2 y^'H y^), g and H the gradient and Hessian at y^ (exact for the quadratic costs of
    COSTS). Shapes: obs [T, N, O], actions [T, N, A], mask [T, N] -> [T, Y, Y], [T, Y], [T]."""
    # Deviation: [DPI Sec. 5.1] fits a quadratic to sampled costs; c is known, so its exact local expansion is used
    obs_dim = obs.shape[-1]
    y = torch.cat([obs, actions], -1).detach().requires_grad_(True)  # [T, N, Y]
    # Samples are independent: grad of the summed cost = each sample's gradient; a backward pass per input dim = a Hessian row
    with torch.enable_grad():
        value = cost_fn(y[..., :obs_dim], y[..., obs_dim:])  # [T, N]
        (grad,) = torch.autograd.grad(value.sum(), y, create_graph=True)  # [T, N, Y]
        rows = [torch.autograd.grad(g.sum(), y, retain_graph=True, allow_unused=True)[0] for g in grad.unbind(-1)]
    hess = torch.stack([torch.zeros_like(y) if r is None else r for r in rows], -2)
    y, value, grad, hess = y.detach(), value.detach(), grad.detach(), hess.detach()
    hy = (hess @ y[..., None])[..., 0]  # [T, N, Y]
    c0 = value - (grad * y).sum(-1) + 0.5 * (hy * y).sum(-1)
    return Quadratic(masked_mean(sym(hess), mask), masked_mean(grad - hy, mask), masked_mean(c0, mask))


def linearize_policy(actor: Actor, obs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Linear mean of pi_n per step, mean(s) ~ Kbar_t s + kbar_t near the samples at t: Kbar_t = mean_i J(s_i), kbar_t =
    mean_i (mean(s_i) - J(s_i) s_i), J the Jacobian of the mean (GPS fits the same line by regression).
    Shapes: obs [T, N, O], mask [T, N] -> Kbar [T, A, O], kbar [T, A] (float64)."""
    # Deviation: -log pi_n of eq. 10 must be quadratic in (s, a); the paper is silent, GPS linearises the mean
    x = obs.float().requires_grad_(True)  # [T, N, O]
    with torch.enable_grad():
        mean = actor(x)  # [T, N, A]
        # one backward pass per action dim gives that row of every sample's Jacobian
        rows = [torch.autograd.grad(m.sum(), x, retain_graph=True)[0] for m in mean.unbind(-1)]
    jac = torch.stack(rows, -2).double()  # [T, N, A, O]
    offset = mean.detach().double() - (jac @ obs[..., None])[..., 0]
    return masked_mean(jac, mask), masked_mean(offset, mask)


def augmented_cost(cost: Quadratic, mu: float, pi_bar: LinearGaussianPolicy) -> Quadratic:
    """c'(s, a) = c(s, a) / mu - log pi_n(a|s) as a quadratic [DPI eq. 10; GPS compute_costs]. With pi_n(a|s) =
    N(Kbar s + kbar, Pbar^-1), -log pi_n = 1/2 (a - Kbar s - kbar)'Pbar(...) + const: blocks [[Kbar'Pbar Kbar,
    -Kbar'Pbar], [-Pbar Kbar, Pbar]], [Kbar'Pbar kbar; -Pbar kbar], 1/2 kbar'Pbar kbar + 1/2 log|2 pi Pbar^-1|.
    Shapes: cost [T, Y, Y], pi_bar (Kbar [T, A, O], kbar [T, A], cov [T, A, A]) -> Quadratic."""
    Kbar, kbar = pi_bar.K, pi_bar.k
    precision = torch.linalg.inv(pi_bar.cov)  # Pbar [T, A, A]
    pk = precision @ Kbar  # [T, A, O]
    top = torch.cat([Kbar.transpose(1, 2) @ pk, -pk.transpose(1, 2)], 2)
    bottom = torch.cat([-pk, precision], 2)
    pkk = (precision @ kbar[..., None])[..., 0]  # [T, A]
    kl_c = torch.cat([(Kbar.transpose(1, 2) @ pkk[..., None])[..., 0], -pkk], 1)
    kl_c0 = 0.5 * (kbar * pkk).sum(1) + 0.5 * torch.logdet(2 * np.pi * pi_bar.cov)
    return Quadratic(cost.C / mu + torch.cat([top, bottom], 1), cost.c / mu + kl_c, cost.c0 / mu + kl_c0)


def lqr_backward(dynamics: Dynamics, cost: Quadratic, gamma: float) -> tuple[LinearGaussianPolicy, ValueFunction] | None:
    """Maximum-entropy LQR on the model [DPI eq. 10; GPS backward]; None if Q_aa is not PD (no ridge: README). From
    V_T = 0, for t = T-1 .. 0: Q_yy = C_t + gamma F_t'V_xx F_t, q_y = c_t + gamma F_t'(v_x + V_xx f_t), K_t = -Q_aa^-1
    Q_as, k_t = -Q_aa^-1 q_a, cov_t = Q_aa^-1 (exp(-Q) normalised minimises E[c'] - entropy), V_xx = Q_ss + Q_sa K_t,
    v_x = q_s + Q_sa k_t; v0 is certainty-equivalent (no noise, no entropy): V_0(s) is the optimal deterministic cost.
    Shapes: F [T, O, Y], f [T, O], C [T, Y, Y], c [T, Y], c0 [T] -> K [T, A, O], k [T, A], cov [T, A, A], V_xx [T, O, O],
    v_x [T, O], v0 [T]."""
    steps, obs_dim, _ = dynamics.F.shape
    V_xx, v_x, v0 = cost.C.new_zeros(obs_dim, obs_dim), cost.C.new_zeros(obs_dim), cost.C.new_zeros(())  # V_T = 0
    out = []  # (K, k, cov, V_xx, v_x, v0) per step, from t = T-1 down
    for t in reversed(range(steps)):
        F, f = dynamics.F[t], dynamics.f[t]
        Q = sym(cost.C[t] + gamma * F.T @ V_xx @ F)  # [Y, Y]
        q = cost.c[t] + gamma * F.T @ (v_x + V_xx @ f)  # [Y]
        q0 = cost.c0[t] + gamma * (0.5 * f @ V_xx @ f + v_x @ f + v0)
        Q_aa, Q_as, q_a = Q[obs_dim:, obs_dim:], Q[obs_dim:, :obs_dim], q[obs_dim:]
        chol, info = torch.linalg.cholesky_ex(Q_aa)
        if info.item() != 0:
            return None  # [GPS] raises eta (our mu) when Q_aa is not PD: see dual_search
        K = -torch.cholesky_solve(Q_as, chol)  # [A, O]
        k = -torch.cholesky_solve(q_a[:, None], chol)[:, 0]  # [A]
        V_xx = sym(Q[:obs_dim, :obs_dim] + Q_as.T @ K)
        v_x = q[:obs_dim] + Q_as.T @ k
        v0 = q0 + 0.5 * k @ Q_aa @ k + q_a @ k
        out.append((K, k, torch.cholesky_inverse(chol), V_xx, v_x, v0))
    K, k, cov, V_xx, v_x, v0 = (torch.stack(values[::-1]) for values in zip(*out))
    return LinearGaussianPolicy(K, k, sym(cov)), ValueFunction(V_xx, v_x, v0)


def lqr_evaluate(
    dynamics: Dynamics, cost: Quadratic, policy: LinearGaussianPolicy, gamma: float
) -> tuple[Quadratic, ValueFunction]:
    """Q_t and V_t of a linear-Gaussian policy under the noisy model: Q_t(s, a) = c_t(s, a) + gamma E V_{t+1}(s'),
    E V(s') = V(F y + f) + 1/2 tr(V_xx cov_t); V_t(s) = E_{a ~ eta_t} Q_t(s, a) = Q_t(s, K s + k) + 1/2 tr(Q_aa
    cov^eta_t), i.e. with M = [I; K], m = [0; k]: V_xx = M'Q_yy M, v_x = M'(Q_yy m + q_y), v0 = q0 + 1/2 m'Q_yy m
    + q_y'm + 1/2 tr(Q_aa cov^eta). Shapes as lqr_backward; returns Q (C [T, Y, Y], c [T, Y], c0 [T]) and V."""
    steps, obs_dim, _ = dynamics.F.shape
    V_xx, v_x, v0 = cost.C.new_zeros(obs_dim, obs_dim), cost.C.new_zeros(obs_dim), cost.C.new_zeros(())  # V_T = 0
    eye = torch.eye(obs_dim, dtype=cost.C.dtype)
    out = []  # (Q, q, q0, V_xx, v_x, v0) per step, from t = T-1 down
    for t in reversed(range(steps)):
        F, f = dynamics.F[t], dynamics.f[t]
        noise = 0.5 * torch.trace(V_xx @ dynamics.cov[t])
        Q = sym(cost.C[t] + gamma * F.T @ V_xx @ F)
        q = cost.c[t] + gamma * F.T @ (v_x + V_xx @ f)
        q0 = cost.c0[t] + gamma * (0.5 * f @ V_xx @ f + v_x @ f + noise + v0)
        M = torch.cat([eye, policy.K[t]], 0)  # [Y, O]
        m = torch.cat([v_x.new_zeros(obs_dim), policy.k[t]])  # [Y]
        V_xx = sym(M.T @ Q @ M)
        v_x = M.T @ (Q @ m + q)
        v0 = q0 + 0.5 * m @ Q @ m + q @ m + 0.5 * torch.trace(Q[obs_dim:, obs_dim:] @ policy.cov[t])
        out.append((Q, q, q0, V_xx, v_x, v0))
    C, c, c0, V_xx, v_x, v0 = (torch.stack(values[::-1]) for values in zip(*out))
    return Quadratic(C, c, c0), ValueFunction(V_xx, v_x, v0)


def disadvantage(Q: Quadratic, V: ValueFunction) -> Quadratic:
    """A_t(s, a) = Q_t(s, a) - V_t(s), a quadratic in y = [s; a] [DPI Sec. 5.1]: Q [T, Y, Y], V [T, O, O] -> Quadratic."""
    obs_dim = V.V_xx.shape[1]
    C, c = Q.C.clone(), Q.c.clone()
    C[:, :obs_dim, :obs_dim] -= V.V_xx
    c[:, :obs_dim] -= V.v_x
    return Quadratic(C, c, Q.c0 - V.v0)


def forward_marginals(
    dynamics: Dynamics, policy: LinearGaussianPolicy, x0_mean: Tensor, x0_cov: Tensor
) -> tuple[Tensor, Tensor]:
    """State marginals N(mu_t, Sigma_t) of eta under the model [GPS forward pass]: mu_{t+1} = F_t [mu_t; K_t mu_t + k_t]
    + f_t, Sigma_{t+1} = F_t [[S, S K'], [K S, K S K' + cov_t]] F_t' + cov^dyn_t (S = Sigma_t).
    Shapes: x0_mean [O], x0_cov [O, O] -> mu [T, O], Sigma [T, O, O]."""
    mus, sigmas, mu, sigma = [], [], x0_mean, x0_cov
    for t in range(len(dynamics.F)):
        mus.append(mu)
        sigmas.append(sigma)
        K = policy.K[t]
        y_mean = torch.cat([mu, K @ mu + policy.k[t]])
        sk = sigma @ K.T
        y_cov = torch.cat([torch.cat([sigma, sk], 1), torch.cat([sk.T, K @ sk + policy.cov[t]], 1)], 0)
        mu = dynamics.F[t] @ y_mean + dynamics.f[t]
        sigma = sym(dynamics.F[t] @ y_cov @ dynamics.F[t].T + dynamics.cov[t])
    return torch.stack(mus), torch.stack(sigmas)


def trajectory_kl(policy: LinearGaussianPolicy, pi_bar: LinearGaussianPolicy, mu: Tensor, sigma: Tensor) -> Tensor:
    """E_{s ~ N(mu_t, Sigma_t)} KL(eta_t(.|s) || pi_n(.|s)) per step [DPI eq. 9; iLQR; GPS]; with dK = Kbar - K_t,
    dk = kbar - k_t, Pbar = cov_bar^-1 (the dynamics and s_0 are shared and cancel):
    KL_t = 1/2 [tr(Pbar cov_t) + (dK mu + dk)'Pbar(dK mu + dk) + tr(dK'Pbar dK Sigma_t) - A + log|cov_bar| - log|cov_t|].
    Shapes: K [T, A, O], k [T, A], cov [T, A, A], mu [T, O], sigma [T, O, O] -> [T]."""
    precision = torch.linalg.inv(pi_bar.cov)  # [T, A, A]
    dK = pi_bar.K - policy.K
    d = (dK @ mu[..., None])[..., 0] + pi_bar.k - policy.k  # [T, A]
    trace_cov = torch.einsum("tab,tba->t", precision, policy.cov)
    mean_term = torch.einsum("ta,tab,tb->t", d, precision, d)
    state_term = torch.einsum("tao,tab,tbp,tpo->t", dK, precision, dK, sigma)
    log_det = torch.logdet(pi_bar.cov) - torch.logdet(policy.cov)
    kl = 0.5 * (trace_cov + mean_term + state_term - policy.k.shape[1] + log_det)
    return kl.clamp_min(0.0)


def solve_eta(
    mu: float, dynamics: Dynamics, cost: Quadratic, pi_bar: LinearGaussianPolicy, x0_mean: Tensor, x0_cov: Tensor, gamma: float
) -> tuple[float, LinearGaussianPolicy] | None:
    """eta for one mu and its KL sum_t gamma^t E KL(eta_t || pi_n) [DPI eq. 9-10]: LQR on c' = c / mu - log pi_n, then
    eta's state marginals under the model from s_0 ~ N(x0_mean [O], x0_cov [O, O]); None when Q_aa is not PD."""
    if (result := lqr_backward(dynamics, augmented_cost(cost, mu, pi_bar), gamma)) is None:
        return None
    eta = result[0]
    kl = trajectory_kl(eta, pi_bar, *forward_marginals(dynamics, eta, x0_mean, x0_cov))
    discount = gamma ** torch.arange(len(kl), dtype=kl.dtype)
    return float((discount * kl).sum()), eta


def dual_search(solve: Callable, alpha: float, mu: float, tol: float, max_iters: int) -> tuple[float, object, float, int]:
    """mu with |KL(mu) - alpha| <= tol * alpha [DPI eq. 9; GPS bracket search]. KL(mu) falls as mu grows (more weight on
    -log pi_n); solve(mu) returns (KL, solution), or None when Q_aa is not PD, which [GPS] answers by raising mu (more weight
    on the PD term Pbar). Bracket [lo, hi] from MU_BOUNDS: KL > alpha (or None): lo = mu, mu = min(sqrt(lo hi), 10 lo);
    KL < alpha: hi = mu, mu = max(sqrt(lo hi), hi / 10). Returns the last mu within the tolerance, else the last below
    alpha (feasible), else the last PD one; its solution and KL; the passes used."""
    # Deviation: [DPI Sec. 5.1] ascends "by projected gradient"; [GPS]'s bracket reaches KL = alpha in far fewer passes
    lo, hi = MU_BOUNDS
    best, fallback, iters = None, None, 0  # (mu, solution, KL) below alpha, and of any PD pass
    for iters in range(1, max_iters + 1):
        result = solve(mu)
        if result is not None:
            kl, solution = result
            fallback = (mu, solution, kl)
            if abs(kl - alpha) <= tol * alpha:
                return mu, solution, kl, iters
            if kl < alpha:
                best = (mu, solution, kl)
        if result is None or result[0] > alpha:  # mu too small: lo = mu, mu = min(sqrt(lo hi), 10 lo)
            lo, mu = mu, min(float(np.sqrt(mu * hi)), 10.0 * mu)
        else:  # hi = mu, mu = max(sqrt(lo hi), hi / 10)
            hi, mu = mu, max(float(np.sqrt(lo * mu)), 0.1 * mu)
    chosen = best if best is not None else fallback
    if chosen is None:
        raise RuntimeError("Q_aa was not positive definite for any mu: the model is degenerate")
    return (*chosen, iters)


def expected_disadvantage(A: Quadratic, obs: Tensor, steps: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """E_{a ~ N(mean, diag(var))} A_t(s, a) in closed form [DPI eq. 11, the inner expectation], differentiable in mean
    and var: with y = [s; mean], 1/2 y'A_yy y + 1/2 sum_j A_aa,jj var_j + a_y'y + a0.
    Shapes: A [T, ...], obs [B, O], steps [B] (the time index t of each state), mean [B, A], var [A] -> [B]."""
    y = torch.cat([obs, mean], 1)  # [B, Y]
    C = A.C[steps]  # [B, Y, Y]
    obs_dim = obs.shape[1]
    quad = 0.5 * (y * (C @ y[..., None])[..., 0]).sum(1)
    noise = 0.5 * (torch.diagonal(C[:, obs_dim:, obs_dim:], dim1=1, dim2=2) * var).sum(1)
    return quad + noise + (A.c[steps] * y).sum(1) + A.c0[steps]


def gaussian_kl(mean_old: Tensor, log_std_old: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """KL(N_old || N) = sum_i log(s_i / s_old_i) + (s_old_i^2 + (m_old_i - m_i)^2) / (2 s_i^2) - 1/2 for diagonal
    Gaussians: [B, A] each -> [B]."""
    var_ratio = torch.exp(2 * (log_std_old - log_std))
    mahalanobis = ((mean_old - mean) * torch.exp(-log_std)).pow(2)
    return (log_std - log_std_old + 0.5 * (var_ratio + mahalanobis) - 0.5).sum(-1)


def conjugate_gradient(avp: Callable[[Tensor], Tensor], b: Tensor, iters: int) -> Tensor:
    """x ~ A^-1 b for A symmetric positive definite, from products avp(v) = A v: [TRPO App. C] conjugate gradient from
    x_0 = 0 for `iters` steps (the paper: 10), stopping early once |b - A x|^2 < CG_RESIDUAL_TOL. Shapes: b, x [P]."""
    x, r, p = torch.zeros_like(b), b.clone(), b.clone()  # the solution, the residual b - A x, the search direction
    rr = r @ r
    for _ in range(iters):
        if rr < CG_RESIDUAL_TOL:
            break
        ap = avp(p)
        alpha = rr / (p @ ap)
        x, r = x + alpha * p, r - alpha * ap
        rr_new = r @ r
        p, rr = r + (rr_new / rr) * p, rr_new
    return x


def fisher_vector_product(kl_grad: Tensor, params: list[Tensor], v: Tensor, damping: float) -> Tensor:
    """(A + damping I) v, A = d^2/dtheta^2 mean_s KL(pi_old(.|s) || pi_theta(.|s)) at theta_old [TRPO App. C.1]: kl_grad
    = dKL/dtheta (create_graph=True at theta_old) differentiated along v. There eq. 57's second term vanishes: this is
    the Fisher J^T M J v, M the distribution parameters' Fisher. Shapes: kl_grad, v [P]; params the P parameters."""
    hvp = torch.autograd.grad(kl_grad @ v, params, retain_graph=True)
    return torch.cat([h.reshape(-1) for h in hvp]) + damping * v


@torch.no_grad()
def set_parameters(params: list[Tensor], theta: Tensor) -> None:
    """Copy theta [P] into params in place (vector_to_parameters' views into theta can change matmul rounding)."""
    for p, chunk in zip(params, theta.split([p.numel() for p in params])):
        p.copy_(chunk.view_as(p))


# == 6. Updates ============================================================================================
class Imitation(NamedTuple):  # what the natural-gradient step needs from one training env
    A: Quadratic  # A^eta per step [T, ...]
    obs: Tensor  # [B, O] states visited by pi_n
    steps: Tensor  # [B] their time index


def update_eta(
    rollouts: Rollouts, actor: Actor, cost_fn: CostFn, prior: PriorBuffer, mu: float, args: Args
) -> tuple[Imitation, float, dict[str, Tensor]]:
    """Steps 2-7 for one training env: refit the GMM prior (in `prior`), fit the local model, search mu and solve for
    eta, evaluate A^eta; the imitation target, the new mu and metrics."""
    steps = int(rollouts.mask.sum(0).nonzero().max()) + 1  # LQR horizon: the longest episode
    obs = rollouts.obs[:, : steps + 1].transpose(0, 1)  # [T + 1, N, O]
    actions = rollouts.actions[:, :steps].transpose(0, 1)  # [T, N, A]
    mask = rollouts.mask[:, :steps].T  # [T, N]
    obs_dim = obs.shape[-1]
    points = torch.cat([obs[:-1], actions, obs[1:]], -1)  # [T, N, D]
    # 2. the GMM prior on recent transitions (an even subsample when there are many)
    prior.add(rollouts)
    data = torch.cat(prior.episodes)  # [M, D]
    data = data[:: max(1, -(-len(data) // GMM_MAX_POINTS))]
    clusters = max(1, min(args.prior_max_clusters, len(data) // args.prior_min_samples_per_cluster))
    prior.gmm = gmm_fit(data, clusters, args.prior_em_iters, prior.gmm)
    # 3. local linear-Gaussian dynamics [DPI eq. 8]
    mu0, phi = prior_moments(prior.gmm, points, mask)
    dynamics = fit_dynamics(points, mask, mu0, phi, args.prior_strength, args.dynamics_reg, obs_dim)
    pred = (dynamics.F[:, None] @ points[..., :-obs_dim, None])[..., 0] + dynamics.f[:, None]
    residual = masked_mean((pred - points[..., -obs_dim:]).pow(2).sum(-1), mask)
    x0, x0_mean = obs[0], obs[0].mean(0)  # [N, O], [O]: every episode has step 0
    x0_cov = sym(torch.cov(x0.T).reshape(obs_dim, obs_dim)) + 1e-6 * torch.eye(obs_dim, dtype=x0.dtype)
    # 4. true cost and linearised pi_n [DPI eq. 10]
    cost = quadratic_cost(cost_fn, obs[:-1], actions, mask)
    Kbar, kbar = linearize_policy(actor, obs[:-1], mask)
    cov_bar = torch.diag((2 * actor.log_std.detach().double()).exp())  # [A, A]
    pi_bar = LinearGaussianPolicy(Kbar, kbar, cov_bar.expand(steps, -1, -1))
    # 5-6. LQR on c' inside the search on mu [DPI eq. 9-10]
    solve = lambda m: solve_eta(m, dynamics, cost, pi_bar, x0_mean, x0_cov, args.gamma)
    mu, eta, kl, dual_iters = dual_search(solve, args.alpha, mu, args.kl_tolerance, args.dual_iters)
    # 7. A^eta = Q - V of eta under the model [DPI Sec. 5.1]. Deviation (paper open): true cost c, not c', E_{a~eta} A^eta = 0
    Q, V = lqr_evaluate(dynamics, cost, eta, args.gamma)
    _, V_pi = lqr_evaluate(dynamics, cost, pi_bar, args.gamma)
    flat_mask = rollouts.mask[:, :steps]
    time_index = torch.arange(steps).expand(len(flat_mask), -1)
    imitation = Imitation(disadvantage(Q, V), rollouts.obs[:, :steps][flat_mask].float(), time_index[flat_mask])
    # E_{s ~ N(x0_mean, x0_cov)} V_0(s) = 1/2 m'V_xx m + 1/2 tr(V_xx cov) + v_x'm + v0: the model's cost of an episode
    model_cost = lambda V: (
        0.5 * x0_mean @ V.V_xx[0] @ x0_mean + 0.5 * torch.trace(V.V_xx[0] @ x0_cov) + V.v_x[0] @ x0_mean + V.v0[0]
    )
    metrics = {
        "stats/mu": torch.tensor(mu),
        "stats/kl_eta": torch.tensor(kl),
        "stats/dual_iters": torch.tensor(float(dual_iters)),
        "stats/model_cost_pi": model_cost(V_pi),
        "stats/model_cost_eta": model_cost(V),
        "stats/dynamics_residual": residual.mean(),
        "stats/prior_clusters": torch.tensor(float(clusters)),
        "stats/episode_cost": (cost_fn(rollouts.obs[:, :-1], rollouts.actions) * rollouts.mask).sum(1).mean(),
    }
    return imitation, mu, metrics


def surrogate(actor: Actor, targets: list[Imitation]) -> Tensor:
    """L(theta) = sum over training envs of mean_s E_{a ~ pi_theta} A^eta_t(s, a) [DPI eq. 11; Sec. 6.3]."""
    # Deviation: every visited state weighs the same (TRPO practice), not gamma^t (late states would get almost none)
    var = (2 * actor.log_std).exp().double()
    total = torch.zeros((), dtype=torch.float64)
    for target in targets:
        mean = actor(target.obs).double()
        total = total + expected_disadvantage(target.A, target.obs.double(), target.steps, mean, var).mean()
    return total


def update_actor(actor: Actor, targets: list[Imitation], args: Args) -> dict[str, Tensor]:
    """One natural-gradient step on the cost L(theta) s.t. (theta - theta_n)'F(theta - theta_n) <= beta [DPI eq. 11-12]
    as trpo.py's update_policy: s = F^-1 g by CG, theta = theta_n - sqrt(beta / s'Fs) s, then (--line-search) TRPO's
    backtracking on -L with the KL bound beta / 2 (the second-order model of the constraint is 2 KL)."""
    params = list(actor.parameters())
    theta_old = torch.cat([p.detach().reshape(-1) for p in params])
    obs = torch.cat([target.obs for target in targets])  # the states of every training env
    with torch.no_grad():
        mean_old = actor(obs)  # [B, A], pi_theta_n in every KL below
        log_std_old = actor.log_std.expand_as(mean_old).clone()
    mean_kl = lambda: gaussian_kl(mean_old, log_std_old, actor(obs), actor.log_std.expand_as(mean_old)).mean()
    loss_old = surrogate(actor, targets)  # L(theta_n), a cost
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss_old, params)]).float()
    kl_grad = torch.cat([x.reshape(-1) for x in torch.autograd.grad(mean_kl(), params, create_graph=True)])
    # [DPI eq. 11] F_theta_n, the Hessian of E_s KL(pi_theta_n, pi_theta) at theta_n
    fvp = functools.partial(fisher_vector_product, kl_grad, params, damping=args.cg_damping)
    step_dir = conjugate_gradient(fvp, g, args.cg_iters)  # s ~ F^-1 g
    full_step = -torch.sqrt(args.beta / (step_dir @ fvp(step_dir)).clamp_min(STEP_EPS)) * step_dir  # [DPI eq. 12]
    evaluate_step = torch.no_grad()(lambda: (-surrogate(actor, targets), mean_kl()))  # (-L, KL): -L to maximise, as TRPO
    loss_old, fraction = loss_old.detach(), 1.0
    if not args.line_search:  # the paper's plain step
        set_parameters(params, theta_old + full_step)
    else:  # Deviation: [TRPO App. C] backtracking, so that a step whose quadratic KL model is wrong cannot make pi worse
        for fraction in (args.backtrack_coef**j for j in range(args.backtrack_iters)):  # the first with L and KL in bounds
            set_parameters(params, theta_old + fraction * full_step)
            neg_loss_new, kl = evaluate_step()
            if bool(kl <= args.beta / 2) and bool(neg_loss_new > -loss_old):
                break
        else:  # none: theta_n restored exactly
            set_parameters(params, theta_old)
            fraction = 0.0
    neg_loss_new, kl = evaluate_step()
    metrics = {"losses/policy": -neg_loss_new, "stats/surrogate_improvement": loss_old + neg_loss_new, "stats/kl": kl}
    metrics |= {"stats/entropy": (log_std_old[0] + 0.5 * (1.0 + LOG_2PI)).sum(), "stats/step_fraction": torch.tensor(fraction)}
    return metrics | {"stats/line_search_rejected": torch.tensor(float(fraction == 0.0)), "stats/grad_norm": g.norm()}


# == 7. Training ===========================================================================================
def evaluation_scores(act: Callable, env: gym.Env, args: Args, device: torch.device) -> tuple[float, float]:
    """Mean undiscounted return of the evaluation episodes (the plumbing's: seeds seed + 10000 + i) and of their first T
    = --horizon steps, the part that training episodes cover."""
    first_steps = FirstStepsReturn(env, args.horizon)
    returns = evaluate(act, first_steps, args.eval_episodes, args.seed + 10_000, device)
    return float(np.mean(returns)), float(np.mean(first_steps.returns))


def evaluate_variants(act: Callable, envs: TrainingEnvs, args: Args, device: torch.device) -> dict[str, float]:
    """--robust's evaluation [DPI Sec. 6.3]: charts/eval_return (and _horizon, over the first T steps) is the mean
    return over the held-out test variants, charts/eval_return_train over the training ones (on a training env:
    rollouts reseed)."""
    train_return = float(np.mean([evaluation_scores(act, group[0], args, device)[0] for group in envs.train]))
    test_returns, test_horizon_returns = np.mean([evaluation_scores(act, env, args, device) for env in envs.test], axis=0)
    return {
        "charts/eval_return_train": train_return,
        "charts/eval_return": float(test_returns),
        "charts/eval_return_horizon": float(test_horizon_returns),
    }


def train(args: Args) -> dict:
    """Train AGGREVATED-ILQR; returns the final metrics, counters, mu of each training env and the run directory."""
    register_envs()  # LinearQuadratic-v0
    device = setup(args)  # seeds, torch threads, device
    # -- environments: --num-envs lockstep copies of each training env (the perturbed variants with --robust)
    train_params, test_params = robust_variants(args) if args.robust else ([(1.0, 1.0)], [])
    variant = lambda params: make_variant_env(args.env, *params) if args.robust else make_env(args.env)
    envs = TrainingEnvs(
        [[variant(params) for _ in range(args.num_envs)] for params in train_params],
        [make_variant_env(args.env, *params) for params in test_params],  # [DPI Sec. 6.3] held out, only evaluated
    )
    space = envs.train[0][0].action_space
    obs_dim, action_dim = envs.train[0][0].observation_space.shape[0], space.shape[0]
    # -- networks (no optimizer: the natural-gradient step is by hand); eta is rebuilt every iteration
    actor = Actor(obs_dim, action_dim, args.hidden_sizes, args.activation, args.init_log_std).to(device)
    low, high = (torch.as_tensor(bound, device=device) for bound in (space.low, space.high))
    # -- storage: the dynamics prior and the dual variable mu of each training env [DPI eq. 8-9]
    priors = {f"prior_{v}": PriorBuffer(args.prior_episodes) for v in range(len(train_params))}
    mus = torch.full((len(train_params),), MU_INIT, dtype=torch.float64)
    # -- run: directory, logging, evaluation, saving, resume (below the fence); act: the mean, clipped to the bounds
    act = lambda obs: actor(obs.float()).clamp(low, high)
    explore = torch.no_grad()(lambda obs: actor.sample(torch.as_tensor(obs, dtype=torch.float32, device=device)).numpy())

    def eval_fn() -> dict[str, float]:  # both scores of the evaluation episodes (on the variants with --robust)
        if args.robust:
            return evaluate_variants(act, envs, args, device)
        full, horizon = evaluation_scores(act, run.eval_env, args, device)  # run.eval_env: the plumbing's, opened by start
        return {"charts/eval_return": full, "charts/eval_return_horizon": horizon}

    run = Run(args, envs, model=dict(actor=actor), train_state=dict(mu=mus, **priors), act=act, eval_fn=eval_fn)
    if args.eval_only:
        return run.evaluate_only()
    global_step, num_updates = run.start()
    while global_step < args.total_steps:  # one DPI iteration per pass [DPI Alg. 1]
        targets, eta_metrics = [], {}
        for v, (group, prior) in enumerate(zip(envs.train, priors.values())):
            # act, step, store: N episodes of pi_n from resets
            seeds = np.random.randint(0, 2**31 - 1, size=args.episodes)
            rollouts, infos = rollout(group, explore, args.horizon, seeds)
            global_step += int(rollouts.mask.sum())
            run.add_episodes(global_step, infos)
            # update (a): local model, eta and A^eta for this env [DPI Sec. 5.1]
            target, mus[v], metrics = update_eta(rollouts, actor, COSTS[args.env], prior, float(mus[v]), args)
            for k, value in metrics.items():  # the mean over training envs
                eta_metrics[k] = eta_metrics.get(k, 0.0) + value / len(envs.train)
            targets.append(target)
        # update (b): one natural-gradient step of pi on the summed L [DPI Sec. 5.2, 6.3]
        run.add_metrics({**eta_metrics, **update_actor(actor, targets, args)})
        num_updates += 1
        run.step(global_step, num_updates)  # log, evaluate and save as scheduled; stop on a signal
    return {**run.finish(global_step, num_updates), "mu": mus.tolist()}


# ======== run plumbing below: identical in every file, not needed to read the algorithm ========
import contextlib
import dataclasses
import difflib
import importlib
import io
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable

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


def make_env(env_id: str, render_mode: str | None = None) -> gym.Env:
    """One gymnasium env whose spaces this algorithm takes; `module:Env-v0` imports `module` first (an env it
    registers), `dm_control/<domain>-<task>-v0` imports shimmy (the DeepMind Control Suite). A Dict observation (the
    suite's) is flattened: its keys in sorted order, each value flattened, concatenated. An unknown id, a module that
    fails to import or a missing dependency is a UsageError."""
    module, _, name = env_id.rpartition(":")
    module = module or ("shimmy" if name.startswith("dm_control/") else "")  # shimmy registers the suite's ids
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; dm_control reads it once, at import
    try:
        importlib.import_module(module) if module else None  # the module registers the user's env
    except Exception as e:  # noqa: BLE001 (whatever the user's module raises: one line)
        raise UsageError(f"cannot import {module} for --env {env_id}: {type(e).__name__}: {e}") from None
    if name not in gym.registry:
        close = difflib.get_close_matches(name, list(gym.registry), n=3, cutoff=0.6)
        raise UsageError(f"unknown env id {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    try:
        env = gym.make(name, **({} if render_mode is None else {"render_mode": render_mode}))
    except gym.error.DependencyNotInstalled as e:
        raise UsageError(f"{name} needs a package that is not installed: {e}") from None
    except Exception as e:  # noqa: BLE001 (an env whose constructor refuses its arguments: one line)
        raise UsageError(f"cannot make {name}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if isinstance(env.observation_space, gym.spaces.Dict):  # gymnasium's Dict keeps its keys sorted
        env = gym.wrappers.FlattenObservation(env)
    space, needs = env.action_space, " or ".join(space.__name__ for space in ACTION_SPACES)
    if not isinstance(env.observation_space, gym.spaces.Box) or len(env.observation_space.shape) != 1:
        raise UsageError(f"{name} has observation space {env.observation_space}; {ALGO} needs a flat Box")
    flat_bounded_box = isinstance(space, gym.spaces.Box) and len(space.shape) == 1 and space.is_bounded()
    if not isinstance(space, ACTION_SPACES) or (isinstance(space, gym.spaces.Box) and not flat_bounded_box):
        raise UsageError(f"{name} has the action space {space}; {ALGO} needs a {needs} (flat and bounded if a Box)")
    return env


def make_vec_env(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """Training envs, SAME_STEP autoreset: an ended episode's last observation is in infos["final_obs"] and
    the returned observation starts the next one; its return and length are in infos["episode"]."""
    envs = [lambda: make_env(env_id) for _ in range(num_envs)]
    envs = gym.vector.SyncVectorEnv(envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


def make_eval_env(env_id: str, video_dir: str | None, episodes: int) -> gym.Env:
    """The evaluation env; with video_dir, the first of every `episodes` episodes is recorded there, or,
    where rendering cannot start, one line is printed and the run goes on without."""
    if video_dir is None:
        return make_env(env_id)
    env = make_env(env_id, "rgb_array")
    try:
        env.reset(seed=0)
        env.render()  # fails here without a GL backend
        trigger = lambda episode: episode % episodes == 0
        return gym.wrappers.RecordVideo(env, video_dir, episode_trigger=trigger, name_prefix="eval")
    except Exception as e:  # noqa: BLE001 (no GL backend, moviepy missing, ...)
        print(f"video capture disabled: {type(e).__name__}: {e}".splitlines()[0], flush=True)
        env.close()
        return make_env(env_id)


@torch.no_grad()
def evaluate(act: Callable[[Tensor], Tensor], env: gym.Env, episodes: int, seed: int, device: torch.device) -> list[float]:
    """Undiscounted returns of `episodes` episodes of the deterministic act(obs) -> action, reset with seed + i."""
    returns = []
    for i in range(episodes):
        (obs, _), total, done = env.reset(seed=seed + i), 0.0, False
        while not done:
            action = act(torch.as_tensor(obs, device=device)).cpu().numpy()  # in the env's dtype
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    return returns


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
    """Everything around `train`'s loop: run directory, tensorboard, progress line, evaluation and saving as scheduled,
    --resume, --checkpoint (fine-tuning or --eval-only), SIGINT and SIGTERM, the final evaluation. model: what model.pt
    saves; train_state: what resume.pt adds (optimizers, storage, statistics); both by name, as modules, tensors or
    objects with state_dict. act: obs -> deterministic action, for evaluation. eval_fn: for an algorithm that
    evaluates otherwise (on several envs): () -> {tag: value}, charts/eval_return among them."""

    def __init__(
        self, args: Args, envs: object, model: dict, train_state: dict, act: Callable, eval_fn: Callable | None = None
    ):
        self.args, self.envs, self.model, self.train_state = args, envs, model, train_state
        self.act, self.eval_fn = act, eval_fn
        self.device = torch.device("cuda" if args.cuda else "cpu")
        self.sums, self.counts, self.returns, self.eval_return, self.eval_step = {}, {}, [], float("nan"), None
        self.writer, self.eval_env, self.stop_signal, self.handlers = None, None, None, {}
        if args.checkpoint is not None:
            load_state(model, load_checkpoint(args.checkpoint, args.env)["state"], args.checkpoint)

    def start(self) -> tuple[int, int]:
        """Open the run directory (new, or --resume's, restored), catch signals; return (global_step, num_updates)."""
        args, global_step, num_updates = self.args, 0, 0
        if args.resume is not None:
            saved = load_checkpoint(args.resume, args.env, training=True)
            load_state(self.model, saved["state"], args.resume)
            load_state(self.train_state, saved["train"], args.resume)
            rng = saved["train"]["rng"]
            kind, key, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(rng["python"])
            torch.set_rng_state(rng["torch"])
            global_step, num_updates = saved["global_step"], saved["train"]["num_updates"]
            self.run_dir = os.path.dirname(os.path.abspath(args.resume))
        else:  # a new directory, even for runs started in the same second: -2, -3, ...
            name = f"{args.env.replace('/', '-')}__{ALGO}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"  # dm_control/... too
            run_dir = os.path.join(args.log_dir, name)
            self.run_dir = next(d for d in (run_dir, *(f"{run_dir}-{i}" for i in range(2, 10_000))) if not os.path.exists(d))
            if args.checkpoint is not None:
                print(f"fine-tuning {args.checkpoint}: its weights; optimizers, storage and step count start afresh")
        try:  # a resumed run records its new arguments (a longer --total-steps, say)
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "args.json"), "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=2)
        except OSError as e:
            raise UsageError(f"cannot write the run directory {self.run_dir}: {e.strerror}") from None
        self.writer = SummaryWriter(self.run_dir)
        table = "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items())
        self.writer.add_text("args", f"|argument|value|\n|-|-|\n{table}")
        video_dir = os.path.join(self.run_dir, "videos") if args.capture_video else None
        self.eval_env = make_eval_env(args.env, video_dir, args.eval_episodes)
        self.last = (time.perf_counter(), global_step, num_updates)
        every = (args.log_every, args.eval_every, args.checkpoint_every)  # multiples of each, after --resume too
        self.next_log, self.next_eval, self.next_save = ((global_step // n + 1) * n if n else 0 for n in every)
        for sig in (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ():
            self.handlers[sig] = signal.signal(sig, self.on_signal)
        return global_step, num_updates

    def on_signal(self, signum: int, frame: object) -> None:
        """A first SIGINT or SIGTERM stops at the end of the step, after writing resume.pt; a second one at once."""
        if self.stop_signal is not None:
            raise KeyboardInterrupt
        self.stop_signal = signum

    def add_metrics(self, metrics: dict[str, Tensor]) -> None:
        """Sum an update's metric tensors until the next log line (no host sync per update)."""
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1  # per key: updates log different keys

    def add_episodes(self, global_step: int, infos: dict) -> None:
        """Log the training episodes that ended at this step (from gymnasium's RecordEpisodeStatistics)."""
        for i in np.flatnonzero(infos.get("_episode", [])):
            self.returns.append(float(infos["episode"]["r"][i]))
            self.writer.add_scalar("charts/episodic_return", self.returns[-1], global_step)
            self.writer.add_scalar("charts/episodic_length", int(infos["episode"]["l"][i]), global_step)

    def step(self, global_step: int, num_updates: int) -> None:
        """End of a loop step: log, evaluate and save as scheduled; then, after a signal, write resume.pt and stop."""
        args = self.args
        if global_step >= self.next_log:
            self.log(global_step, num_updates)
            self.next_log += args.log_every
        if args.eval_every and global_step >= self.next_eval:
            self.evaluate(global_step, num_updates)
            self.next_eval += args.eval_every
        if args.checkpoint_every and global_step >= self.next_save:
            self.save(global_step, num_updates, True)
            self.next_save += args.checkpoint_every
        if self.stop_signal is not None:  # after this step's scheduled work, so that a resumed run keeps its schedule
            path, name = self.save(global_step, num_updates, True), signal.Signals(self.stop_signal).name
            self.close()
            raise Stopped(f"{name}: stopped at step {global_step}; continue with --resume {path}", 128 + self.stop_signal)

    def log(self, global_step: int, num_updates: int) -> None:
        """The progress line; the metrics' means since the last line to tensorboard."""
        now, (t0, step0, updates0) = time.perf_counter(), self.last
        sps, ups = (global_step - step0) / max(now - t0, 1e-9), (num_updates - updates0) / max(now - t0, 1e-9)
        self.writer.add_scalar("charts/SPS", sps, global_step)
        self.writer.add_scalar("charts/updates_per_second", ups, global_step)
        for k, v in self.sums.items():
            self.writer.add_scalar(k, (v / self.counts[k]).item(), global_step)
        ret = f"{np.mean(self.returns):.1f}" if self.returns else "-"
        line = f"step {global_step} | return {ret} | eval {self.eval_return:.1f} | SPS {sps:.0f} | updates/s {ups:.0f}"
        print(line, flush=True)
        self.sums, self.counts, self.returns, self.last = {}, {}, [], (now, global_step, num_updates)

    def evaluate(self, global_step: int, num_updates: int) -> None:
        """Evaluate on the evaluation env (seeds seed + 10000 + i) or by eval_fn, log the scores, write model.pt."""
        args = self.args
        if self.eval_fn is not None:
            scores = self.eval_fn()
        else:
            returns = evaluate(self.act, self.eval_env, args.eval_episodes, args.seed + 10_000, self.device)
            scores = {"charts/eval_return": float(np.mean(returns))}
        for tag, value in scores.items():
            self.writer.add_scalar(tag, value, global_step)
        self.eval_return, self.eval_step = scores["charts/eval_return"], global_step
        if args.save_model:
            self.save(global_step, num_updates, False)

    def save(self, global_step: int, num_updates: int, training: bool) -> str:
        """model.pt, or resume.pt with the training state, counters and random states; atomic (write, rename)."""
        args = dataclasses.asdict(dataclasses.replace(self.args, checkpoint=None, resume=None, eval_only=False))
        payload = dict(format=CHECKPOINT_FORMAT, algo=ALGO, env=self.args.env, args=args, global_step=global_step)
        payload["state"] = state_of(self.model)
        if training:
            kind, key, pos, has_gauss, gauss = np.random.get_state()  # as tensors and plain values, for weights_only
            numpy = [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss]
            rng = dict(python=random.getstate(), numpy=numpy, torch=torch.get_rng_state())
            payload["train"] = dict(state_of(self.train_state), num_updates=num_updates, rng=rng)
        path = os.path.join(self.run_dir, "resume.pt" if training else "model.pt")
        torch.save(payload, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
        return path

    def finish(self, global_step: int, num_updates: int) -> dict:
        """The final evaluation (unless this step had one), log line and resume.pt; close; the results."""
        if self.eval_step != global_step:
            self.evaluate(global_step, num_updates)
        if global_step > self.last[1]:
            self.log(global_step, num_updates)
        print(f"done: step {global_step} | eval {self.eval_return:.1f} | run {self.run_dir}", flush=True)
        if self.args.checkpoint_every:
            self.save(global_step, num_updates, True)
        self.close()
        return dict(global_step=global_step, num_updates=num_updates, eval_return=self.eval_return, run_dir=self.run_dir)

    def evaluate_only(self) -> dict:
        """--eval-only: evaluate the --checkpoint weights and print the returns (videos beside the checkpoint)."""
        args, folder = self.args, os.path.dirname(self.args.checkpoint)
        video_dir = os.path.join(folder, "videos") if args.capture_video else None
        self.eval_env = make_eval_env(args.env, video_dir, args.eval_episodes)
        returns = evaluate(self.act, self.eval_env, args.eval_episodes, args.seed + 10_000, self.device)
        self.close()
        print(f"eval over {len(returns)} episodes: mean {np.mean(returns):.1f} | returns", *(f"{r:.1f}" for r in returns))
        return {"eval_return": float(np.mean(returns)), "eval_returns": returns}

    def close(self) -> None:
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        for closable in (c for c in (self.envs, self.eval_env, self.writer) if c is not None):
            closable.close()


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
