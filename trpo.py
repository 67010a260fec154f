"""Trust Region Policy Optimization (TRPO) with the single-path and vine estimators, in one file.

References:
    [TRPO] Schulman, Levine, Moritz, Jordan, Abbeel 2015, "Trust Region Policy Optimization",
        ICML (shared/papers/003): Sec. 5.1 single path, Sec. 5.2 vine, Sec. 6 practical
        algorithm, App. C conjugate gradient and line search, App. C.1 Fisher-vector
        products, App. D policies, Table 2 parameters.
    [GAE] Schulman, Moritz, Levine, Jordan, Abbeel 2016, "High-Dimensional Continuous Control
        Using Generalized Advantage Estimation", ICLR (not in shared/papers): the advantages
        and the learned value function of the single-path estimator (TRPO-GAE, the baseline
        of [DPI] Sec. 6.2).
    [SB3C] Stable-Baselines3-contrib TRPO and [SpinUp] Spinning Up TRPO: CG damping 0.1,
        backtracking coefficient 0.8 and at most 10 backtracking steps (the paper gives none).

Algorithm (one iteration; the function that does each line in brackets):
    1. Roll out pi_old for T steps in E envs; the vine also saves the simulator state of
       every step (the "trunk")                                      [RolloutBuffer, Simulator]
    2. Single path: A_t = GAE(gamma, lambda) with a learned V; Q - V is the [TRPO Sec. 5.1]
       Monte Carlo estimate at lambda = 1                                                [gae]
       Vine: pick N trunk states, K actions per state (q = pi for continuous actions,
       uniform for discrete), restore each state and roll out L steps after each action,
       the K branches of a state sharing their noise; Q_nk = discounted branch return
                                                                        [vine_rollouts]
    3. Surrogate L(theta): mean_t r_t(theta) A_t, r = pi_theta / pi_old [TRPO eq. 14]
       [surrogate]; vine: mean_n sum_k w_nk Q_nk / sum_k w_nk, w = pi_theta / q
       [TRPO eq. 15-16]                                                    [vine_surrogate]
    4. g = grad L; s = A^-1 g by 10 conjugate-gradient steps on Fisher-vector products, the
       Hessian of the mean KL on a 10% subsample   [conjugate_gradient, fisher_vector_product]
    5. Full step beta s with beta = sqrt(2 delta / s^T A s); shrink it until L improves and
       mean KL(pi_old || pi_theta) <= delta, else keep theta_old [TRPO App. C]   [line_search]
    6. Single path: fit V to the GAE returns by minibatch Adam                  [update_value]

Shapes: T rollout steps, E envs, B = T * E batch, O observation size, A action size (Box) or
number of actions (Discrete), D distribution parameters per state (2A or A), N rollout-set
states, K actions per state, L branch length, P policy parameters.

Usage:
    python trpo.py --env Hopper-v5
    python trpo.py --env Hopper-v5 --estimator vine
    python trpo.py --env Swimmer-v5 --estimator vine --vine-states 125 --vine-rollout-length 50
    python trpo.py --env CartPole-v1 --total-steps 100000 --num-steps 2000
    python trpo.py --env Hopper-v5 --checkpoint runs/<run>/model.pt --eval-only
    python trpo.py --resume runs/<run>/resume.pt
    [TRPO] Table 2 batch sizes: single path --num-steps 50000 (Swimmer) or 1000000 (Hopper);
        vine trunk 16 x 1000 steps: --num-steps 16000

Deviations from the paper:
    - Single path uses GAE(gamma, lambda) advantages with a learned value function [GAE]; the
      paper uses Monte Carlo returns Q (--gae-lambda 1 gives returns minus the baseline V).
      Advantages are normalised per batch (--no-norm-adv to turn off), as in [SB3C]/[SpinUp].
    - 5,000 env steps per iteration by default instead of Table 2's 50,000-1,000,000, so that
      the default 1M-step run makes the paper's 200 policy iterations.
    - Networks: two hidden layers of 64 tanh units for the policy mean and for V, as ppo.py;
      the paper used one hidden layer of 30 (Swimmer) or 50 (Hopper/Walker) units.
    - Observations are normalised by running statistics, updated once per iteration (so the
      policy is fixed while it collects data) and frozen at evaluation (--no-norm-obs: off).
    - The vine estimates the KL constraint and the Fisher matrix on all trunk states, a larger
      sample of the same state distribution than the N rollout-set states.
    - A branch stops where the episode it branches from would hit its time limit.
    - Gaussian actions are clipped to the action bounds in the env only; the unclipped sample
      is what the log-probabilities and the importance ratios use.
"""

# == 1. Imports ========================================================================
import dataclasses
import difflib
import functools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import mujoco  # the vine saves and restores MuJoCo states
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter

ALGO = "trpo"
CHECKPOINT_FORMAT = 1


# == 2. Arguments ======================================================================
class UsageError(Exception):
    """Bad user input: `main` prints it as one line on stderr and returns 2."""


@dataclass
class Args:
    # -- shared: identical in every file ---------------------------------------------
    env: str = "Hopper-v5"
    """Gymnasium id of the task."""
    seed: int = 1
    """Seed for python, numpy, torch and the environments."""
    total_steps: int = 1_000_000
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
    # Estimator [TRPO Sec. 5]
    estimator: Literal["single-path", "vine"] = "single-path"
    """Q/advantage estimator: single path [TRPO Sec. 5.1] or vine [TRPO Sec. 5.2]."""
    num_steps: int = 5_000
    """Env steps per env per iteration: the single-path batch or the vine's trunk (paper:
    50,000 (Swimmer) to 1,000,000 (Hopper) single-path steps, a 16 x 1000 trunk [Table 2])."""
    gamma: float = 0.99
    """Discount factor gamma [TRPO Table 2]."""
    # Single path [TRPO Sec. 5.1] with GAE [GAE]
    gae_lambda: float = 0.97
    """GAE lambda (1: Monte Carlo returns minus V, the paper's estimator; [SpinUp]: 0.97)."""
    norm_adv: bool = True
    """Normalise the advantages of each batch to mean 0, std 1 ([SB3C], [SpinUp])."""
    value_lr: float = 1e-3
    """Adam learning rate of the value function V ([SB3C], [SpinUp])."""
    value_epochs: int = 10
    """Passes over the batch per iteration when fitting V ([SB3C])."""
    value_batch_size: int = 128
    """Minibatch size when fitting V ([SB3C])."""
    # Vine [TRPO Sec. 5.2; Table 2, Hopper/Walker column]
    vine_states: int = 625
    """N, states in the rollout set (Table 2: 2500 Q-values / 4 actions; Swimmer: 500 / 4)."""
    vine_actions: int = 4
    """K, actions per state, each with its own branch (Table 2: 4; Discrete: min(K, |A|))."""
    vine_rollout_length: int = 100
    """L, env steps per branch, the first action included (Table 2: 100; Swimmer: 50)."""
    # Trust region [TRPO Sec. 6, App. C]
    delta: float = 0.01
    """delta, the bound on the mean KL(pi_old || pi_new) [TRPO Table 2]."""
    cg_iters: int = 10
    """Conjugate-gradient iterations for s = A^-1 g [TRPO App. C: 10]."""
    cg_damping: float = 0.1
    """Damping lambda added to the Fisher, A + lambda I (paper: not given; [SB3C], [SpinUp])."""
    fisher_fraction: float = 0.1
    """Fraction of the batch on which Fisher-vector products are computed [TRPO App. C.1]."""
    backtrack_coef: float = 0.8
    """Line-search shrink factor per step (paper: 'exponentially'; [SB3C], [SpinUp]: 0.8)."""
    backtrack_iters: int = 10
    """Line-search steps before the update is rejected ([SB3C], [SpinUp]: 10)."""
    # Networks [TRPO App. D]
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layer sizes of the policy mean/logits and of V (paper: one layer of 30 or 50)."""
    activation: Literal["relu", "elu", "tanh"] = "tanh"
    """Hidden activation."""
    norm_obs: bool = True
    """Normalise observations by running statistics (saved in checkpoints, frozen at eval)."""


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
    if args.num_steps <= 0:
        raise UsageError(f"--num-steps must be positive, got {args.num_steps}")
    if args.total_steps < args.num_steps * args.num_envs:
        raise UsageError(
            f"--total-steps {args.total_steps} is less than one iteration "
            f"(--num-steps x --num-envs = {args.num_steps * args.num_envs})"
        )
    if not 0.0 <= args.gamma <= 1.0:
        raise UsageError(f"--gamma must be in [0, 1], got {args.gamma}")
    if not 0.0 <= args.gae_lambda <= 1.0:
        raise UsageError(f"--gae-lambda must be in [0, 1], got {args.gae_lambda}")
    if args.value_lr <= 0 or args.value_epochs <= 0 or args.value_batch_size <= 0:
        raise UsageError("--value-lr, --value-epochs and --value-batch-size must be positive")
    if args.estimator == "vine":
        if args.vine_states <= 0 or args.vine_states > args.num_steps * args.num_envs:
            raise UsageError(
                f"--vine-states must be in [1, --num-steps x --num-envs = "
                f"{args.num_steps * args.num_envs}], got {args.vine_states}"
            )
        if args.vine_actions < 2:
            raise UsageError(
                f"--vine-actions must be at least 2 (one action per state has no gradient), "
                f"got {args.vine_actions}"
            )
        if args.vine_rollout_length <= 0:
            raise UsageError(
                f"--vine-rollout-length must be positive, got {args.vine_rollout_length}"
            )
    if args.delta <= 0:
        raise UsageError(f"--delta must be positive, got {args.delta}")
    if args.cg_iters <= 0 or args.cg_damping < 0:
        raise UsageError("--cg-iters must be positive and --cg-damping >= 0")
    if not 0.0 < args.fisher_fraction <= 1.0:
        raise UsageError(f"--fisher-fraction must be in (0, 1], got {args.fisher_fraction}")
    if not 0.0 < args.backtrack_coef < 1.0 or args.backtrack_iters <= 0:
        raise UsageError("--backtrack-coef must be in (0, 1) and --backtrack-iters positive")
    if not args.hidden_sizes or min(args.hidden_sizes) <= 0:
        raise UsageError(f"--hidden-sizes must be positive, got {args.hidden_sizes}")


# == 3. Environment ====================================================================
def make_env(env_id: str, render_mode: str | None = None) -> gym.Env:
    """One gymnasium env; an unknown id or a missing dependency becomes a UsageError."""
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown env id {env_id!r}{hint}")
    try:
        return gym.make(env_id, render_mode=render_mode)
    except gym.error.DependencyNotInstalled as e:
        raise UsageError(f"{env_id} needs a package that is not installed: {e}") from None


def make_vec_env(env_id: str, num_envs: int) -> gym.vector.SyncVectorEnv:
    """Training envs in SAME_STEP autoreset mode: an ended episode's last observation is in
    infos["final_obs"] and the returned observation already starts the next episode."""
    return gym.vector.SyncVectorEnv(
        [lambda: make_env(env_id) for _ in range(num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )


def make_eval_env(env_id: str, video_dir: str | None, episodes: int) -> gym.Env:
    """The evaluation env; with video_dir, the first of every `episodes` episodes is recorded
    there, or, where rendering cannot start, one line is printed and the run goes on without."""
    if video_dir is None:
        return make_env(env_id)
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo rendering (GYMNASIUM_NOTES)
    env = make_env(env_id, "rgb_array")
    try:
        env.reset(seed=0)
        env.render()  # fails here without a GL backend
        trigger = lambda episode: episode % episodes == 0  # noqa: E731
        return gym.wrappers.RecordVideo(env, video_dir, episode_trigger=trigger, name_prefix="eval")
    except Exception as e:  # no GL backend, moviepy missing, ...
        print(f"video capture disabled: {type(e).__name__}: {e}".splitlines()[0], flush=True)
        env.close()
        return make_env(env_id)


def check_spaces(env_id: str, obs_space: gym.Space, action_space: gym.Space) -> None:
    """TRPO needs flat Box observations and a Box or Discrete action space."""
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise UsageError(
            f"{env_id} has observation space {obs_space}; this script needs a flat Box"
        )
    if not isinstance(action_space, (gym.spaces.Box, gym.spaces.Discrete)) or (
        isinstance(action_space, gym.spaces.Box) and len(action_space.shape) != 1
    ):
        raise UsageError(
            f"{env_id} has action space {action_space}; TRPO needs a flat Box or a Discrete one"
        )


class EpisodeStats:
    """Running return and length of each parallel env."""

    def __init__(self, num_envs: int):
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, dtype=np.int64)

    def update(self, rewards: np.ndarray, ended: np.ndarray) -> list[tuple[float, int]]:
        """Add one step's rewards; return (return, length) of the episodes that ended."""
        self.returns += rewards
        self.lengths += 1
        finished = [(float(self.returns[i]), int(self.lengths[i])) for i in np.flatnonzero(ended)]
        self.returns[ended] = 0.0
        self.lengths[ended] = 0
        return finished


class Simulator:
    """Saves, restores and steps the simulator below the TimeLimit wrapper, for the vine.

    MuJoCo: the full integration state (mj_getState/mj_setState with mjSTATE_INTEGRATION:
    qpos, qvel, act, warm start, ctrl, ...), which replays bit-exactly (GYMNASIUM_NOTES).
    Classic control: the env's `state` attribute, its whole dynamic state. Both kinds step
    deterministically (their randomness is drawn at reset only; Acrobot's torque noise is
    off by default), so the policy noise is all that the vine's branches need to share.
    """

    def __init__(self, env: gym.Env, env_id: str):
        self.env = env.unwrapped  # below TimeLimit: restoring a state must not count steps
        if isinstance(getattr(self.env, "model", None), mujoco.MjModel):
            self.kind = "mujoco"
            self.size = mujoco.mj_stateSize(self.env.model, mujoco.mjtState.mjSTATE_INTEGRATION)
        elif type(self.env).__module__.startswith("gymnasium.envs.classic_control"):
            self.kind = "classic"
            if getattr(self.env, "state", None) is None:  # created by the first reset
                self.env.reset(seed=0)
            self.size = len(np.asarray(self.env.state))
        else:
            raise UsageError(
                f"--estimator vine restores simulator states, which this script can do for "
                f"MuJoCo and classic-control envs only; {env_id} is neither"
            )

    def get_state(self) -> np.ndarray:
        if self.kind == "mujoco":
            state = np.empty(self.size)
            mujoco.mj_getState(
                self.env.model, self.env.data, state, mujoco.mjtState.mjSTATE_INTEGRATION
            )
            return state
        return np.array(self.env.state, dtype=np.float64)

    def set_state(self, state: np.ndarray) -> None:
        if self.kind == "mujoco":
            mujoco.mj_setState(
                self.env.model, self.env.data, state, mujoco.mjtState.mjSTATE_INTEGRATION
            )
        else:
            self.env.state = state.copy()
            if hasattr(self.env, "steps_beyond_terminated"):  # CartPole's post-termination count
                self.env.steps_beyond_terminated = None

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """One env step from the current state: (next observation, reward, terminated)."""
        obs, reward, terminated, _, _ = self.env.step(action)
        return obs, float(reward), bool(terminated)


# == 4. Networks =======================================================================
ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh}
INIT_LOG_STD = 0.0  # initial log std r: sigma = 1 ([TRPO App. D] learns r; CleanRL starts at 0)


def layer_init(layer: nn.Linear, std: float = math.sqrt(2)) -> nn.Linear:
    """Orthogonal weights with gain `std` and zero biases (CleanRL's PPO initialisation)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.zeros_(layer.bias)
    return layer


def mlp(in_dim: int, hidden_sizes: tuple[int, ...], activation: str) -> nn.Sequential:
    """Linear + activation layers."""
    layers: list[nn.Module] = []
    for size in hidden_sizes:
        layers += [layer_init(nn.Linear(in_dim, size)), ACTIVATIONS[activation]()]
        in_dim = size
    return nn.Sequential(*layers)


class GaussianActor(nn.Module):
    """Diagonal Gaussian pi(a|s) = N(mean_theta(s), exp(r)^2), r a state-independent log std.

    [TRPO App. D]: forward returns the distribution parameters mu_theta(s) = [mean, log std]
    of App. C.1 as one tensor [B, D = 2A]; the methods below take that tensor.
    """

    def __init__(self, obs_dim: int, action_space: gym.spaces.Box, args: Args):
        super().__init__()
        action_dim = action_space.shape[0]
        self.mean = nn.Sequential(
            mlp(obs_dim, args.hidden_sizes, args.activation),
            layer_init(nn.Linear(args.hidden_sizes[-1], action_dim), std=0.01),
        )
        self.log_std = nn.Parameter(torch.full((action_dim,), INIT_LOG_STD))
        self.register_buffer("action_low", torch.as_tensor(action_space.low, dtype=torch.float32))
        self.register_buffer("action_high", torch.as_tensor(action_space.high, dtype=torch.float32))
        self.action_shape, self.action_dtype = (action_dim,), torch.float32

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        mean = self.mean(obs)
        return torch.cat([mean, self.log_std.expand_as(mean)], dim=-1)  # [B, 2A]

    def noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Standard normal noise for `shape` actions; sample() turns it into actions."""
        return torch.randn(*shape, *self.action_shape, device=device)

    def sample(self, dist: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        mean, log_std = dist.chunk(2, dim=-1)
        return mean + log_std.exp() * noise

    def log_prob(self, dist: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        mean, log_std = dist.chunk(2, dim=-1)
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def kl(self, dist_old: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """KL(old || new) = sum_i log(s_i / s_old_i) + (s_old_i^2 + (m_old_i - m_i)^2) / (2 s_i^2)
        - 1/2, per state."""
        mean_old, log_std_old = dist_old.chunk(2, dim=-1)
        mean, log_std = dist.chunk(2, dim=-1)
        var_ratio = torch.exp(2 * (log_std_old - log_std))
        mahalanobis = ((mean_old - mean) * torch.exp(-log_std)).pow(2)
        return (log_std - log_std_old + 0.5 * (var_ratio + mahalanobis) - 0.5).sum(-1)

    def entropy(self, dist: torch.Tensor) -> torch.Tensor:
        _, log_std = dist.chunk(2, dim=-1)
        return (log_std + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)

    def deterministic(self, dist: torch.Tensor) -> torch.Tensor:
        return dist.chunk(2, dim=-1)[0]

    def env_action(self, actions: torch.Tensor) -> torch.Tensor:
        """The action sent to the env: the sample clipped to the action bounds."""
        return torch.clamp(actions, self.action_low, self.action_high)


class CategoricalActor(nn.Module):
    """Categorical pi(a|s) = softmax(logits_theta(s)) [TRPO App. D]; dist = logits [B, D = A]."""

    def __init__(self, obs_dim: int, action_space: gym.spaces.Discrete, args: Args):
        super().__init__()
        self.logits = nn.Sequential(
            mlp(obs_dim, args.hidden_sizes, args.activation),
            layer_init(nn.Linear(args.hidden_sizes[-1], int(action_space.n)), std=0.01),
        )
        self.action_shape, self.action_dtype = (), torch.int64

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.logits(obs)  # [B, A]

    def noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Uniform noise u in [0, 1) for `shape` actions; sample() inverts the CDF at u."""
        return torch.rand(*shape, device=device)

    def sample(self, dist: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(dist, dim=-1).cumsum(-1)
        actions = (cdf <= noise.unsqueeze(-1)).sum(-1)  # the first a with cdf(a) > u
        return actions.clamp_max(dist.shape[-1] - 1)  # cdf(A - 1) may round below 1

    def log_prob(self, dist: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(dist, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    def kl(self, dist_old: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """KL(old || new) = sum_a p_old(a) (log p_old(a) - log p(a)), per state."""
        log_p_old = torch.log_softmax(dist_old, -1)
        return (log_p_old.exp() * (log_p_old - torch.log_softmax(dist, -1))).sum(-1)

    def entropy(self, dist: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(dist, -1)
        return -(log_p.exp() * log_p).sum(-1)

    def deterministic(self, dist: torch.Tensor) -> torch.Tensor:
        return dist.argmax(-1)

    def env_action(self, actions: torch.Tensor) -> torch.Tensor:
        return actions


Actor = GaussianActor | CategoricalActor


class Value(nn.Module):
    """State value V(s), the single-path baseline [GAE]."""

    def __init__(self, obs_dim: int, args: Args):
        super().__init__()
        self.net = nn.Sequential(
            mlp(obs_dim, args.hidden_sizes, args.activation),
            layer_init(nn.Linear(args.hidden_sizes[-1], 1), std=1.0),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)  # [B]


# == 5. Storage ========================================================================
OBS_CLIP = 10.0  # normalised observations are clipped to [-10, 10] (gymnasium's wrapper, SB3)
OBS_NORM_EPS = 1e-8  # variance floor of the observation normalisation


class RunningMeanStd:
    """Running mean and variance of observations in plain tensors, so checkpoints can save
    them and evaluation can use them frozen; merged per batch (Chan et al.'s parallel form).
    float32 copies of the shift and scale make normalising one step a few cheap ops."""

    def __init__(self, obs_dim: int, device: torch.device):
        self.mean = torch.zeros(obs_dim, dtype=torch.float64, device=device)
        self.var = torch.ones(obs_dim, dtype=torch.float64, device=device)
        self.count = torch.tensor(1e-4, dtype=torch.float64, device=device)  # as gymnasium
        self._cache()

    def _cache(self) -> None:
        self.shift = self.mean.to(torch.float32)
        self.scale = torch.sqrt(self.var + OBS_NORM_EPS).to(torch.float32)

    def update(self, x: torch.Tensor) -> None:
        x = x.to(torch.float64)
        batch_mean, batch_var, n = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, total = batch_mean - self.mean, self.count + n
        self.mean = self.mean + delta * n / total
        m2 = self.var * self.count + batch_var * n + delta.pow(2) * self.count * n / total
        self.var, self.count = m2 / total, total
        self._cache()

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return ((obs - self.shift) / self.scale).clamp(-OBS_CLIP, OBS_CLIP)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = (
            state[k].to(self.mean.device) for k in ("mean", "var", "count")
        )
        self._cache()


class RolloutBuffer:
    """One iteration's data, [T, E] per step. Raw observations are kept and normalised at
    update time with the statistics the rollout used; what the env returns (rewards, flags)
    stays in numpy until the update, so a step costs no tensor op. The vine's trunk also
    keeps the simulator state of every step and the steps already taken in its episode."""

    def __init__(self, num_steps: int, num_envs: int, obs_dim: int, actor: Actor, state_size: int):
        size, device = (num_steps, num_envs), next(actor.parameters()).device
        self.obs = torch.zeros(*size, obs_dim, device=device)
        self.actions = torch.zeros(
            *size, *actor.action_shape, dtype=actor.action_dtype, device=device
        )
        self.rewards = np.zeros(size, dtype=np.float32)
        self.terminated = np.zeros(size, dtype=np.float32)
        self.truncated = np.zeros(size, dtype=np.float32)  # ended by the time limit only
        self.final_obs = np.zeros((*size, obs_dim), dtype=np.float32)  # where truncated
        self.sim_states = np.zeros((*size, state_size))
        self.elapsed = np.zeros(size, dtype=np.int64)
        self.num_steps, self.pos = num_steps, 0

    def add(self, **rows: torch.Tensor | np.ndarray) -> None:
        """Store one vector step; `rows` are fields of this buffer with leading size E."""
        for name, row in rows.items():
            getattr(self, name)[self.pos] = row
        self.pos += 1

    def full(self) -> bool:
        return self.pos == self.num_steps


# == 6. Algorithm ======================================================================
CG_RESIDUAL_TOL = 1e-10  # stop CG once |r|^2 is below this ([SB3C]; modular_rl)
STEP_EPS = 1e-12  # guards beta = sqrt(2 delta / s^T A s) against s^T A s = 0
ADV_EPS = 1e-8  # guards the advantage normalisation against a zero standard deviation


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    last_value: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages A_t = sum_l (gamma lambda)^l delta_{t+l} within the episode, and A + V.

    [GAE eq. 16] delta_t = r_t + gamma V(s_{t+1}) (1 - d_t) - V(s_t),
    A_t = delta_t + gamma lambda (1 - d_t) A_{t+1}. d_t marks steps at which an episode ended
    either way; a truncated step's r_t already includes gamma V(final observation). With
    lambda = 1, A_t + V(s_t) is the discounted return, [TRPO Sec. 5.1]'s Q estimate.
    Shapes: rewards, values, dones [T, E]; last_value [E] (V of the state after step T-1).
    """
    # the backward recursion runs in numpy: T small tensor ops would cost more than the math
    r, v, d = (x.detach().cpu().numpy() for x in (rewards, values, dones))
    advantages = np.zeros_like(r)
    next_advantage, next_value = np.zeros_like(r[0]), last_value.detach().cpu().numpy()
    for t in reversed(range(len(r))):
        delta = r[t] + gamma * next_value * (1.0 - d[t]) - v[t]
        next_advantage = delta + gamma * gae_lambda * (1.0 - d[t]) * next_advantage
        advantages[t], next_value = next_advantage, v[t]
    advantages = torch.as_tensor(advantages, device=values.device)
    return advantages, advantages + values


def surrogate(
    log_prob: torch.Tensor, log_prob_old: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """L(theta) = mean_t pi_theta(a_t|s_t) / pi_old(a_t|s_t) A_t.

    [TRPO eq. 14] with q = pi_old (single path, Sec. 5.1); advantages in place of Q change L by
    a constant only. Shapes: all [B]; returns a scalar.
    """
    return (torch.exp(log_prob - log_prob_old) * advantages).mean()


def vine_surrogate(
    log_prob: torch.Tensor, log_q: torch.Tensor, q_values: torch.Tensor
) -> torch.Tensor:
    """L(theta) = mean_n sum_k w_nk Q_nk / sum_k w_nk with w_nk = pi_theta(a_nk|s_n) / q(a_nk|s_n).

    [TRPO eq. 16] the self-normalised importance-sampling estimate at each rollout-set state,
    written as softmax_k(log w_nk), which is exact and cannot overflow. With q = pi_old
    (continuous actions) this is eq. 16 itself; with every action of a Discrete space and q
    uniform, sum_k w_nk = 1 / q and it is eq. 15, sum_a pi_theta(a|s_n) Q(s_n, a).
    Shapes: log_prob, log_q, q_values [N, K]; returns a scalar.
    """
    return (torch.softmax(log_prob - log_q, dim=-1) * q_values).sum(-1).mean()


def conjugate_gradient(
    avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int
) -> torch.Tensor:
    """Approximate solution x of A x = b, A symmetric positive definite, from products A v.

    [TRPO App. C] conjugate gradient from x_0 = 0 for `iters` steps (10 in the paper), or
    until |r|^2 < CG_RESIDUAL_TOL. avp: v -> A v. Shapes: b [P]; returns x [P].
    """
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()  # residual b - A x and search direction
    rr = r @ r
    for _ in range(iters):
        if rr < CG_RESIDUAL_TOL:
            break
        ap = avp(p)
        alpha = rr / (p @ ap)
        x += alpha * p
        r -= alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def fisher_vector_product(
    kl_grad: torch.Tensor, params: list[torch.Tensor], v: torch.Tensor, damping: float
) -> torch.Tensor:
    """(A + damping I) v with A = d^2/dtheta^2 mean_s KL(pi_old(.|s) || pi_theta(.|s)) at theta_old.

    [TRPO App. C.1] the Hessian-vector product of the analytic mean KL: kl_grad = dKL/dtheta
    built with create_graph=True, differentiated once more along v. At theta = theta_old the
    second term of eq. 57 vanishes, so this is the Fisher J^T M J v, M the Fisher of the
    distribution parameters. Shapes: kl_grad, v [P]; params the P parameters as tensors.
    """
    hvp = torch.autograd.grad(kl_grad @ v, params, retain_graph=True)
    return torch.cat([h.reshape(-1) for h in hvp]) + damping * v


def line_search(
    actor: nn.Module,
    evaluate_step: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    theta_old: torch.Tensor,
    full_step: torch.Tensor,
    surrogate_old: torch.Tensor,
    delta: float,
    backtrack_coef: float,
    backtrack_iters: int,
) -> float:
    """Set theta = theta_old + c^j full_step for the first j with L(theta) > L(theta_old) and
    mean KL <= delta; if no j < backtrack_iters passes, restore theta_old exactly.

    [TRPO App. C] the line search on L(theta) - X[KL <= delta], starting from the maximal step
    and shrinking it exponentially. evaluate_step() returns (L, mean KL) at the actor's
    current parameters. Shapes: theta_old, full_step [P]. Returns the accepted fraction c^j,
    0.0 when the step is rejected.
    """
    params = list(actor.parameters())
    for j in range(backtrack_iters):
        fraction = backtrack_coef**j
        set_parameters(params, theta_old + fraction * full_step)
        surrogate_new, kl = evaluate_step()
        if bool(kl <= delta) and bool(surrogate_new > surrogate_old):
            return fraction
    set_parameters(params, theta_old)
    return 0.0


@torch.no_grad()
def set_parameters(params: list[torch.Tensor], theta: torch.Tensor) -> None:
    """Copy the flat vector theta [P] into the parameters in place. (vector_to_parameters
    would make them views into theta, whose memory alignment can change matmul rounding.)"""
    for p, chunk in zip(params, theta.split([p.numel() for p in params])):
        p.copy_(chunk.view_as(p))


def vine_rollouts(
    sim: Simulator,
    states: np.ndarray,
    first_actions: np.ndarray,
    act: Callable[[np.ndarray, torch.Tensor], np.ndarray],
    noise: torch.Tensor,
    horizons: np.ndarray,
    gamma: float,
) -> tuple[np.ndarray, int]:
    """Q_nk = sum_{t < L_n} gamma^t r_t of the branch that restores state s_n, takes a_nk,
    then follows the policy; the K branches of s_n share their noise.

    [TRPO Sec. 5.2] rollouts from the rollout set with common random numbers: branch (n, k)
    at step t >= 1 acts with noise[n, t - 1] for every k, so branches of one state differ only
    through their first action. All N K branches advance in lockstep, one batched policy
    call per step; a branch stops when the episode terminates or after L_n = min(L, horizon_n)
    steps. act(obs [M, O], noise [M, ...]) -> env actions [M, ...].
    Shapes: states [N, S]; first_actions [N, K, ...] (env actions); noise [N, L - 1, ...];
    horizons [N] (steps left before the time limit). Returns Q [N, K] and the sim steps taken.
    """
    num_states, num_actions = first_actions.shape[:2]
    branch_states = np.repeat(states, num_actions, axis=0)  # [M = N K, S]
    actions = first_actions.reshape(num_states * num_actions, *first_actions.shape[2:])
    branch_noise = noise.repeat_interleave(num_actions, dim=0)  # [M, L - 1, ...]: CRN
    limits = np.repeat(np.minimum(horizons, noise.shape[1] + 1), num_actions)  # [M]
    q_values = np.zeros(len(branch_states))
    alive = np.ones(len(branch_states), dtype=bool)
    obs, sim_steps = None, 0
    for t in range(noise.shape[1] + 1):
        if t > 0:
            actions = act(obs, branch_noise[:, t - 1])
        for i in np.flatnonzero(alive):
            sim.set_state(branch_states[i])
            next_obs, reward, terminated = sim.step(actions[i])
            if obs is None:
                obs = np.zeros((len(branch_states), len(next_obs)))
            branch_states[i], obs[i] = sim.get_state(), next_obs
            q_values[i] += gamma**t * reward
            alive[i] = not terminated and t + 1 < limits[i]
            sim_steps += 1
        if not alive.any():
            break
    return q_values.reshape(num_states, num_actions), sim_steps


# == 7. Updates ========================================================================
def single_path_objective(actor: Actor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[TRPO eq. 14] on the rollout: states, actions, pi_old log-probabilities, advantages."""
    log_prob = actor.log_prob(actor(batch["obs"]), batch["actions"])
    return surrogate(log_prob, batch["log_prob_old"], batch["advantages"])


def vine_objective(actor: Actor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[TRPO eq. 15-16] on the rollout set: N states, K actions each, log q, Q estimates."""
    dist = actor(batch["obs"]).unsqueeze(1).expand(-1, batch["q_values"].shape[1], -1)
    log_prob = actor.log_prob(dist, batch["actions"])  # [N, K]
    return vine_surrogate(log_prob, batch["log_q"], batch["q_values"])


def update_policy(
    actor: Actor,
    objective: Callable[[], torch.Tensor],
    kl_obs: torch.Tensor,
    delta: float,
    cg_iters: int,
    cg_damping: float,
    fisher_fraction: float,
    backtrack_coef: float,
    backtrack_iters: int,
) -> dict[str, torch.Tensor]:
    """One trust-region step: maximise objective() s.t. mean KL(pi_old || pi_theta) over kl_obs
    <= delta, by CG on Fisher-vector products and a line search [TRPO Sec. 6, App. C]."""
    params = list(actor.parameters())
    theta_old = nn.utils.parameters_to_vector(params).detach().clone()
    with torch.no_grad():
        dist_old = actor(kl_obs)  # [B, D], pi_old held fixed for every KL below
    surrogate_old = objective()
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(surrogate_old, params)])
    # [TRPO App. C.1] the Fisher on a random fraction of the states
    n = max(1, round(fisher_fraction * len(kl_obs)))
    idx = torch.randperm(len(kl_obs), device=kl_obs.device)[:n]
    kl_fisher = actor.kl(dist_old[idx], actor(kl_obs[idx])).mean()
    kl_grad = torch.cat(
        [x.reshape(-1) for x in torch.autograd.grad(kl_fisher, params, create_graph=True)]
    )
    fvp = functools.partial(fisher_vector_product, kl_grad, params, damping=cg_damping)
    step_dir = conjugate_gradient(fvp, g, cg_iters)  # s ~ A^-1 g
    shs = step_dir @ fvp(step_dir)
    full_step = torch.sqrt(2 * delta / shs.clamp_min(STEP_EPS)) * step_dir  # [TRPO App. C]

    @torch.no_grad()
    def evaluate_step() -> tuple[torch.Tensor, torch.Tensor]:
        return objective(), actor.kl(dist_old, actor(kl_obs)).mean()

    fraction = line_search(
        actor,
        evaluate_step,
        theta_old,
        full_step,
        surrogate_old.detach(),
        delta,
        backtrack_coef,
        backtrack_iters,
    )
    surrogate_new, kl = evaluate_step()
    return {
        "losses/policy": -surrogate_new,
        "stats/surrogate_improvement": surrogate_new - surrogate_old.detach(),
        "stats/expected_improvement": fraction * (g @ full_step),
        "stats/kl": kl,
        "stats/step_fraction": torch.tensor(fraction),
        "stats/line_search_rejected": torch.tensor(float(fraction == 0.0)),
        "stats/entropy": actor.entropy(dist_old).mean(),
        "stats/grad_norm": g.norm(),
    }


def update_value(
    value: Value,
    value_opt: torch.optim.Optimizer,
    obs: torch.Tensor,
    returns: torch.Tensor,
    epochs: int,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Fit V to the GAE returns: `epochs` passes of minibatch Adam on (V(s) - R)^2 / 2 [SB3C]."""
    total = torch.zeros((), device=obs.device)
    for _ in range(epochs):
        perm = torch.randperm(len(obs), device=obs.device)
        for start in range(0, len(obs), batch_size):
            idx = perm[start : start + batch_size]
            loss = 0.5 * (value(obs[idx]) - returns[idx]).pow(2).mean()
            value_opt.zero_grad(set_to_none=True)
            loss.backward()
            value_opt.step()
            total = total + loss.detach()
    return {"losses/value": total / (epochs * math.ceil(len(obs) / batch_size))}


# == 8. Evaluation =====================================================================
def evaluate(
    act: Callable[[np.ndarray], np.ndarray], env: gym.Env, episodes: int, seed: int
) -> list[float]:
    """Undiscounted returns of `episodes` episodes of act(obs) -> action, reset with seed + i."""
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


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
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path}: {type(e).__name__}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(
            f"{path} is not a checkpoint of this repository (format {CHECKPOINT_FORMAT})"
        )
    if payload["algo"] != ALGO:
        raise UsageError(f"{path} is a {payload['algo']} checkpoint, not {ALGO}")
    if env is not None and payload["env"] != env:
        raise UsageError(f"{path} was trained on {payload['env']}, not {env}")
    return payload


def rng_state() -> dict:
    """Python, numpy and torch random states as plain values and tensors."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    kind, key, pos, has_gauss, gauss = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


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
    return dataclasses.asdict(
        dataclasses.replace(args, checkpoint=None, resume=None, eval_only=False)
    )


class Progress:
    """Sums metric tensors between log lines (no host sync per step) and writes the log line."""

    def __init__(self, writer: SummaryWriter, start_step: int, start_updates: int):
        self.writer, self.sums, self.count = writer, {}, 0
        self.returns: list[float] = []
        self.eval_return = float("nan")
        self.last = (time.perf_counter(), start_step, start_updates)

    def add_metrics(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def add_episode(self, global_step: int, episode_return: float, length: int) -> None:
        self.writer.add_scalar("charts/episodic_return", episode_return, global_step)
        self.writer.add_scalar("charts/episodic_length", length, global_step)
        self.returns.append(episode_return)

    def add_eval(self, global_step: int, returns: list[float]) -> None:
        self.eval_return = float(np.mean(returns))
        self.writer.add_scalar("charts/eval_return", self.eval_return, global_step)

    def log(self, global_step: int, num_updates: int) -> None:
        now = time.perf_counter()
        t0, step0, updates0 = self.last
        sps = (global_step - step0) / max(now - t0, 1e-9)
        ups = (num_updates - updates0) / max(now - t0, 1e-9)
        self.writer.add_scalar("charts/SPS", sps, global_step)
        self.writer.add_scalar("charts/updates_per_second", ups, global_step)
        for k, v in self.sums.items():
            self.writer.add_scalar(k, (v / self.count).item(), global_step)
        ret = f"{np.mean(self.returns):.1f}" if self.returns else "-"
        print(
            f"step {global_step} | return {ret} | eval {self.eval_return:.1f} | SPS {sps:.0f} | "
            f"updates/s {ups:.0f}",
            flush=True,
        )
        self.sums, self.count, self.returns = {}, 0, []
        self.last = (now, global_step, num_updates)

    def finish(self, global_step: int, num_updates: int, run_dir: str) -> None:
        if global_step > self.last[1]:
            self.log(global_step, num_updates)
        print(f"done: step {global_step} | eval {self.eval_return:.1f} | run {run_dir}", flush=True)


def make_agent(
    args: Args,
    obs_dim: int,
    action_space: gym.spaces.Box | gym.spaces.Discrete,
    device: torch.device,
) -> dict:
    """The policy and, for the single-path estimator, V, by the names their state is saved under."""
    if isinstance(action_space, gym.spaces.Discrete):
        actor = CategoricalActor(obs_dim, action_space, args).to(device)
    else:
        actor = GaussianActor(obs_dim, action_space, args).to(device)
    if args.estimator == "vine":  # the vine's self-normalised estimate needs no baseline
        return {"actor": actor}
    return {"actor": actor, "value": Value(obs_dim, args).to(device)}


def make_obs_norm(args: Args, obs_dim: int, device: torch.device) -> RunningMeanStd | None:
    return RunningMeanStd(obs_dim, device) if args.norm_obs else None


def normalize(obs_norm: RunningMeanStd | None, obs: torch.Tensor) -> torch.Tensor:
    return obs if obs_norm is None else obs_norm.normalize(obs)


def policy_fn(
    actor: Actor, obs_norm: RunningMeanStd | None, device: torch.device
) -> Callable[[np.ndarray], np.ndarray]:
    """act(obs) -> action with the deterministic action (mean or argmax), for `evaluate`."""

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
        dist = actor(normalize(obs_norm, obs_t))
        return actor.env_action(actor.deterministic(dist)).cpu().numpy()

    return act


def agent_state(agent: dict) -> dict:
    return {k: v.state_dict() if isinstance(v, nn.Module) else v.detach() for k, v in agent.items()}


def load_agent_state(agent: dict, state: dict) -> None:
    for k, v in agent.items():
        if isinstance(v, nn.Module):
            v.load_state_dict(state[k])
        else:
            with torch.no_grad():
                v.copy_(state[k])


def single_path_batch(
    actor: Actor,
    value: Value,
    obs_norm: RunningMeanStd | None,
    rollout: RolloutBuffer,
    next_obs: torch.Tensor,
    args: Args,
) -> dict[str, torch.Tensor]:
    """[TRPO Sec. 5.1] the rollout's states and actions with GAE advantages [GAE] and V targets."""
    obs_dim = rollout.obs.shape[-1]
    obs = normalize(obs_norm, rollout.obs.reshape(-1, obs_dim))  # [B, O]
    actions = rollout.actions.reshape(-1, *actor.action_shape)
    rewards, terminated, truncated, final_obs = (
        torch.as_tensor(x, device=obs.device)
        for x in (rollout.rewards, rollout.terminated, rollout.truncated, rollout.final_obs)
    )
    with torch.no_grad():
        values = value(obs).reshape(rewards.shape)  # [T, E]
        last_value = value(normalize(obs_norm, next_obs))  # [E]
        final_values = value(normalize(obs_norm, final_obs)).reshape(rewards.shape)
        # a truncated episode bootstraps: its last reward gets gamma V(final obs)
        rewards = rewards + args.gamma * truncated * final_values
        dones = torch.maximum(terminated, truncated)
        advantages, returns = gae(rewards, values, dones, last_value, args.gamma, args.gae_lambda)
        advantages, returns, values = (x.reshape(-1) for x in (advantages, returns, values))
        explained_variance = 1 - (returns - values).var() / returns.var()
        if args.norm_adv:
            advantages = (advantages - advantages.mean()) / (advantages.std() + ADV_EPS)
        log_prob_old = actor.log_prob(actor(obs), actions)
    return {
        "obs": obs,
        "actions": actions,
        "log_prob_old": log_prob_old,
        "advantages": advantages,
        "returns": returns,
        "explained_variance": explained_variance,
    }


def vine_batch(
    actor: Actor,
    obs_norm: RunningMeanStd | None,
    rollout: RolloutBuffer,
    sim: Simulator,
    max_episode_steps: int,
    args: Args,
) -> tuple[dict[str, torch.Tensor], int]:
    """[TRPO Sec. 5.2] the rollout set, K actions per state and the branches' Q estimates;
    returns them and the simulator steps the branches took."""
    device = rollout.obs.device
    # the rollout set: N distinct trunk states, uniformly
    flat_obs = rollout.obs.reshape(-1, rollout.obs.shape[-1])
    idx = torch.randperm(len(flat_obs), device=device)[: args.vine_states]
    obs = normalize(obs_norm, flat_obs[idx])  # [N, O]
    idx_np = idx.cpu().numpy()
    states = rollout.sim_states.reshape(len(flat_obs), -1)[idx_np]  # [N, S]
    horizons = max_episode_steps - rollout.elapsed.reshape(-1)[idx_np]  # [N]
    n = len(idx)
    with torch.no_grad():
        dist = actor(obs)  # [N, D]
        if isinstance(actor, CategoricalActor):
            # q uniform [TRPO Sec. 5.2]: K distinct actions, all of them when K >= |A| (eq. 15)
            num_actions = dist.shape[-1]
            k = min(args.vine_actions, num_actions)
            actions = torch.rand(n, num_actions, device=device).argsort(-1)[:, :k]  # [N, K]
            log_q = torch.full((n, k), -math.log(num_actions), device=device)
        else:  # q = pi_old [TRPO Sec. 5.2]
            dist_k = dist.unsqueeze(1).expand(-1, args.vine_actions, -1)  # [N, K, D]
            actions = actor.sample(dist_k, actor.noise((n, args.vine_actions), device))  # [N, K, A]
            log_q = actor.log_prob(dist_k, actions)  # [N, K]
        noise = actor.noise(
            (n, args.vine_rollout_length - 1), device
        )  # one sequence per state: CRN

    @torch.no_grad()
    def act(branch_obs: np.ndarray, branch_noise: torch.Tensor) -> np.ndarray:
        branch_obs_t = torch.as_tensor(branch_obs, dtype=torch.float32, device=device)
        branch_actions = actor.sample(actor(normalize(obs_norm, branch_obs_t)), branch_noise)
        return actor.env_action(branch_actions).cpu().numpy()

    q_values, sim_steps = vine_rollouts(
        sim, states, actor.env_action(actions).cpu().numpy(), act, noise, horizons, args.gamma
    )
    batch = {
        "obs": obs,
        "actions": actions,
        "log_q": log_q,
        "q_values": torch.as_tensor(q_values, dtype=torch.float32, device=device),
    }
    return batch, sim_steps


def evaluate_only(args: Args) -> dict:
    """--eval-only: load the checkpoint's policy and evaluate it."""
    device = torch.device("cuda" if args.cuda else "cpu")
    payload = load_checkpoint(args.checkpoint, args.env, device)
    video_dir = (
        os.path.join(os.path.dirname(args.checkpoint), "videos") if args.capture_video else None
    )
    env = make_eval_env(args.env, video_dir, args.eval_episodes)
    check_spaces(args.env, env.observation_space, env.action_space)
    agent = make_agent(args, env.observation_space.shape[0], env.action_space, device)
    load_agent_state(agent, payload["state"])
    obs_norm = make_obs_norm(args, env.observation_space.shape[0], device)
    if obs_norm is not None:
        obs_norm.load_state_dict(payload["obs_norm"])
    returns = evaluate(
        policy_fn(agent["actor"], obs_norm, device), env, args.eval_episodes, args.seed + 10_000
    )
    env.close()
    print(
        f"eval over {len(returns)} episodes: mean {np.mean(returns):.1f} | returns "
        + " ".join(f"{r:.1f}" for r in returns),
        flush=True,
    )
    return {"eval_return": float(np.mean(returns)), "eval_returns": returns}


def train(args: Args) -> dict:
    """Train TRPO; returns the final metrics, counters and the run directory."""
    # -- setup: seeds, device, run directory, writer
    seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda else "cpu")
    resume = load_checkpoint(args.resume, args.env) if args.resume else None
    # -- environments
    envs = make_vec_env(args.env, args.num_envs)
    check_spaces(args.env, envs.single_observation_space, envs.single_action_space)
    vine = args.estimator == "vine"
    # the vine saves each training env's state at every step and branches on its own copy
    trunk_sims = [Simulator(env, args.env) for env in envs.envs] if vine else []
    branch_sim = Simulator(make_env(args.env), args.env) if vine else None
    max_episode_steps = envs.envs[0].spec.max_episode_steps or sys.maxsize
    run_dir, writer = open_run(args)
    video_dir = os.path.join(run_dir, "videos") if args.capture_video else None
    eval_env = make_eval_env(args.env, video_dir, args.eval_episodes)
    obs_dim = envs.single_observation_space.shape[0]
    # -- networks and optimizers
    agent = make_agent(args, obs_dim, envs.single_action_space, device)
    actor, value = agent["actor"], agent.get("value")
    value_opt = (
        torch.optim.Adam(value.parameters(), lr=args.value_lr, fused=True) if value else None
    )
    optimizers = {"value_opt": value_opt}
    obs_norm = make_obs_norm(args, obs_dim, device)
    # -- storage
    rollout = RolloutBuffer(
        args.num_steps, args.num_envs, obs_dim, actor, trunk_sims[0].size if vine else 0
    )
    global_step, num_updates, sim_steps = 0, 0, 0
    if resume is not None:
        load_agent_state(agent, resume["state"])
        for name, opt in optimizers.items():
            if opt is not None:
                opt.load_state_dict(resume["train"][name])
        if obs_norm is not None:
            obs_norm.load_state_dict(resume["obs_norm"])
        set_rng_state(resume["train"]["rng"])
        global_step, num_updates = resume["global_step"], resume["train"]["num_updates"]
        sim_steps = resume["train"]["sim_steps"]
    act = policy_fn(actor, obs_norm, device)
    stats = EpisodeStats(args.num_envs)
    progress = Progress(writer, global_step, num_updates)

    def payload(with_train_state: bool) -> dict:
        out = {
            "format": CHECKPOINT_FORMAT,
            "algo": ALGO,
            "env": args.env,
            "args": saved_args(args),
            "global_step": global_step,
            "state": agent_state(agent),
            "obs_norm": None if obs_norm is None else obs_norm.state_dict(),
        }
        if with_train_state:
            out["train"] = {
                name: opt.state_dict() for name, opt in optimizers.items() if opt is not None
            }
            out["train"].update(num_updates=num_updates, sim_steps=sim_steps, rng=rng_state())
        return out

    # -- loop: whole iterations only, so a run ends with an update
    total_steps = args.total_steps - args.total_steps % (args.num_steps * args.num_envs)
    obs, _ = envs.reset(seed=args.seed + global_step)  # a resumed run starts fresh episodes
    next_eval = global_step + args.eval_every if args.eval_every else None
    next_log = global_step + args.log_every
    next_ckpt = global_step + args.checkpoint_every if args.checkpoint_every else None
    while global_step < total_steps:
        # act: pi_old, with the observation statistics fixed for the whole rollout
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
        if vine:  # the trunk's simulator states, to branch from [TRPO Sec. 5.2]
            rollout.sim_states[rollout.pos] = [sim.get_state() for sim in trunk_sims]
            rollout.elapsed[rollout.pos] = stats.lengths
        with torch.no_grad():
            actions = actor.sample(
                actor(normalize(obs_norm, obs_t)), actor.noise((args.num_envs,), device)
            )
        # step
        next_obs, rewards, terminated, truncated, infos = envs.step(
            actor.env_action(actions).cpu().numpy()
        )
        global_step += args.num_envs
        sim_steps += args.num_envs
        ended = terminated | truncated
        for episode_return, length in stats.update(rewards, ended):
            progress.add_episode(global_step, episode_return, length)
        # store: a truncated episode's true last observation, to bootstrap V from
        truncated_only = truncated & ~terminated  # a terminal step at the limit is terminal
        for i in np.flatnonzero(truncated_only):
            rollout.final_obs[rollout.pos, i] = infos["final_obs"][i]
        rollout.add(
            obs=obs_t,
            actions=actions,
            rewards=rewards,
            terminated=terminated,
            truncated=truncated_only,
        )
        obs = next_obs
        # update: one trust-region step per full rollout
        if rollout.full():
            trunk_obs = normalize(obs_norm, rollout.obs.reshape(-1, obs_dim))  # [B, O]
            if vine:
                batch, branch_steps = vine_batch(
                    actor, obs_norm, rollout, branch_sim, max_episode_steps, args
                )
                sim_steps += branch_steps
                objective = functools.partial(vine_objective, actor, batch)
                progress.add_metrics({"stats/q_mean": batch["q_values"].mean()})
            else:
                next_obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
                batch = single_path_batch(actor, value, obs_norm, rollout, next_obs_t, args)
                objective = functools.partial(single_path_objective, actor, batch)
            progress.add_metrics(
                update_policy(
                    actor,
                    objective,
                    trunk_obs,
                    args.delta,
                    args.cg_iters,
                    args.cg_damping,
                    args.fisher_fraction,
                    args.backtrack_coef,
                    args.backtrack_iters,
                )
            )
            if value is not None:
                progress.add_metrics(
                    update_value(
                        value,
                        value_opt,
                        batch["obs"],
                        batch["returns"],
                        args.value_epochs,
                        args.value_batch_size,
                    )
                )
                progress.add_metrics({"stats/explained_variance": batch["explained_variance"]})
            if obs_norm is not None:  # after the update, which used the rollout's statistics
                obs_norm.update(rollout.obs.reshape(-1, obs_dim))
            rollout.pos = 0
            num_updates += 1
            writer.add_scalar("charts/sim_steps", sim_steps, global_step)
        # log, evaluate and save
        if global_step >= next_log:
            progress.log(global_step, num_updates)
            next_log += args.log_every
        if next_eval is not None and global_step >= next_eval:
            progress.add_eval(
                global_step, evaluate(act, eval_env, args.eval_episodes, args.seed + 10_000)
            )
            if args.save_model:
                save_checkpoint(os.path.join(run_dir, "model.pt"), payload(with_train_state=False))
            next_eval += args.eval_every
        # an on-policy run is resumed between iterations: a partial rollout cannot be saved
        if next_ckpt is not None and global_step >= next_ckpt and rollout.pos == 0:
            save_checkpoint(os.path.join(run_dir, "resume.pt"), payload(with_train_state=True))
            next_ckpt += args.checkpoint_every
    # -- finish: final evaluation, save, close
    progress.add_eval(global_step, evaluate(act, eval_env, args.eval_episodes, args.seed + 10_000))
    progress.finish(global_step, num_updates, run_dir)
    if args.save_model:
        save_checkpoint(os.path.join(run_dir, "model.pt"), payload(with_train_state=False))
    if args.checkpoint_every:
        save_checkpoint(os.path.join(run_dir, "resume.pt"), payload(with_train_state=True))
    envs.close()
    eval_env.close()
    writer.close()
    return {
        "global_step": global_step,
        "num_updates": num_updates,
        "sim_steps": sim_steps,
        "eval_return": progress.eval_return,
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
        defaults = Args(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields}
        )
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
