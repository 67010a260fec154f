"""Trust Region Policy Optimization (TRPO) with the single-path and vine estimators, in one file.

References:
    [TRPO] Schulman, Levine, Moritz, Jordan, Abbeel 2015, "Trust Region Policy Optimization",
        ICML (shared/papers/003): Sec. 5.1 single path, Sec. 5.2 vine, Sec. 6 practical
        algorithm, App. C conjugate gradient and line search, App. C.1 Fisher-vector
        products, App. D policies, Table 2 parameters.
    [GAE] Schulman, Moritz, Levine, Jordan, Abbeel 2016, "High-Dimensional Continuous Control
        Using Generalized Advantage Estimation", arXiv:1506.02438: the advantages and the
        learned value function of the single-path estimator (TRPO-GAE, the baseline of [DPI]
        Sec. 6.2).
    [SB3C] Stable-Baselines3-contrib TRPO and [SpinUp] Spinning Up TRPO: CG damping 0.1, line
        search factor 0.8 and at most 10 backtracking steps (the paper gives none of them), and
        the value-function fit.
    ppo.py: the rollout, GAE, observation and reward normalisation and the policy network are
        its code, so that `diff ppo.py trpo.py` shows the trust-region update and the vine.

Algorithm (one iteration; the function that does each line in brackets):
    1. Roll out pi_old for num_steps steps in each of num_envs envs [Rollout]; the vine also
       saves every step's simulator state (the "trunk")                   [Trunk, Simulator]
    2. Single path [TRPO Sec. 5.1]: advantages A_t = GAE(gamma, lambda) with a learned V;
       lambda = 1 gives the paper's Monte Carlo Q minus a baseline                     [gae]
       Vine [TRPO Sec. 5.2]: R trunk states; at each, K actions (q = pi for Box actions,
       uniform for Discrete ones); restore the state, take the action, follow pi for L - 1
       steps, the K branches of a state sharing their noise; Q = discounted branch return
                                                                [vine_batch, vine_rollouts]
    3. Surrogate L(theta) = mean_t rho_t A_t, rho = pi_theta / pi_old [TRPO eq. 14]
       [surrogate]; vine: mean_r sum_k w_rk Q_rk / sum_k w_rk, w = pi_theta / q
       [TRPO eq. 15-16]                                                    [vine_surrogate]
    4. g = grad L; s = A^-1 g by 10 conjugate-gradient steps on Fisher-vector products, the
       Hessian of the mean KL(pi_old || pi_theta) on a 10% subsample of the states
                                                 [conjugate_gradient, fisher_vector_product]
    5. Full step beta s, beta = sqrt(2 delta / s^T A s); shrink it by 0.8 until L improves
       and the mean KL <= delta, else keep theta_old [TRPO App. C]  [update_policy, line_search]
    6. Single path, after the policy step: fit V to the returns R_t = A_t + V_old(s_t) with
       10 epochs of 32 minibatch Adam steps (lr 1e-3) on (V - R)^2 / 2        [update_value]

Shapes: T steps per env per rollout, N envs, B states in a batch, O observation size, A action
size (or number of actions), D distribution parameters per state (2A or A), P policy
parameters; vine: R rollout-set states (the paper's N), K actions per state, L branch length,
Z simulator-state size.

Usage:
    python trpo.py --env Hopper-v5
    python trpo.py --env Hopper-v5 --estimator vine
    python trpo.py --env Swimmer-v5 --estimator vine --vine-states 125 --vine-rollout-length 50
    python trpo.py --env CartPole-v1 --num-steps 2000 --total-steps 20000
    python trpo.py --env Hopper-v5 --checkpoint runs/<run>/model.pt --eval-only
    python trpo.py --resume runs/<run>/resume.pt
    [TRPO] Table 2 batches: single path --num-steps 50000 (Swimmer) or 1000000 (Hopper); vine
        trunk of 16 x 1000 steps: --num-steps 16000 (Swimmer: --vine-states 125
        --vine-rollout-length 50; Hopper, Walker: the defaults)

Deviations from the paper:
    - Single path uses GAE(gamma, lambda) advantages and a learned V [GAE] instead of plain
      Monte Carlo returns (--gae-lambda 1 gives returns minus V); the advantages of a batch are
      normalised ([SB3C], [SpinUp]; --no-norm-adv turns it off).
    - 5,000 env steps per iteration instead of Table 2's 50,000-1,000,000 (single path) or
      16 x 1000 (the vine's trunk), so that the default 1M-step run makes the paper's 200
      policy iterations; --num-steps sets either.
    - Networks, orthogonal initialisation and observation and reward normalisation are
      ppo.py's (two hidden layers of 64 tanh units; the paper used one layer of 30 or 50).
      Reward scaling rescales V's targets; the policy step is normalised to delta anyway.
    - The vine estimates the KL constraint and the Fisher matrix on all trunk states, a larger
      sample of the same state distribution than the R rollout-set states, and a branch stops
      where the episode it branches from would hit its time limit.
    - Gaussian actions are clipped to the bounds in the env only; log-probabilities and
      importance ratios use the unclipped sample.
"""

# == 1. Imports ========================================================================
import dataclasses
import difflib
import functools
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import gymnasium as gym
import mujoco  # the vine saves and restores MuJoCo states
import numpy as np
import torch
import tyro
from torch import nn
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
    # Networks [TRPO App. D; ppo.py's sizes, the paper's were one layer of 30 or 50 units]
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layer sizes of the policy and of the value network."""
    activation: Literal["relu", "elu", "tanh"] = "tanh"
    """Hidden activation ([TreePI] Table 2 uses elu)."""
    layer_norm: bool = False
    """LayerNorm after the first hidden layer (the 'LN' of [TreePI] Table 2)."""
    # Rollouts [TRPO Sec. 5, Table 2]
    estimator: Literal["single-path", "vine"] = "single-path"
    """How Q is estimated: along the rollout [TRPO Sec. 5.1] or by branch rollouts [Sec. 5.2]."""
    num_steps: int = 5_000
    """Steps per env in each rollout: the single-path batch or the vine's trunk (paper: 50,000
    to 1,000,000 single-path steps, a 16 x 1000-step trunk [Table 2])."""
    gamma: float = 0.99
    """Discount factor gamma [TRPO Table 2]."""
    gae_lambda: float = 0.97
    """GAE parameter lambda (1: Monte Carlo returns minus V, the paper's; [SpinUp]: 0.97)."""
    norm_adv: bool = True
    """Normalise the single-path advantages of each batch to mean 0 and std 1."""
    # Vine [TRPO Sec. 5.2; Table 2, Hopper and Walker columns]
    vine_states: int = 625
    """R, states in the rollout set (Table 2: 2500 Q-values / 4 actions; Swimmer 500 / 4)."""
    vine_actions: int = 4
    """K, actions per rollout-set state, each with its own branch (Table 2: 4; Discrete
    spaces use min(K, n) distinct actions)."""
    vine_rollout_length: int = 100
    """L, env steps per branch, its first action included (Table 2: 100; Swimmer 50)."""
    # Trust region [TRPO Sec. 6, App. C]
    delta: float = 0.01
    """delta, the bound on the mean KL(pi_old || pi_new) [TRPO Table 2]."""
    cg_iters: int = 10
    """Conjugate-gradient iterations for the direction s = A^-1 g [TRPO App. C]."""
    cg_damping: float = 0.1
    """Damping lambda of the Fisher, A + lambda I (paper: not given; [SB3C], [SpinUp])."""
    fisher_fraction: float = 0.1
    """Fraction of the states on which Fisher-vector products are computed [TRPO App. C.1]."""
    backtrack_coef: float = 0.8
    """Line-search shrink factor (paper: 'exponentially'; [SB3C], [SpinUp])."""
    backtrack_iters: int = 10
    """Line-search steps tried before the update is rejected ([SB3C], [SpinUp])."""
    # Value function, single path only [GAE; SB3C]
    value_lr: float = 1e-3
    """Adam learning rate of V ([SB3C], [SpinUp])."""
    value_epochs: int = 10
    """Epochs over each rollout when fitting V ([SB3C])."""
    value_minibatches: int = 32
    """Minibatches per epoch when fitting V (ppo.py's count; [SB3C]: size 128)."""
    # Normalisation (baselines VecNormalize, as ppo.py)
    norm_obs: bool = True
    """Normalise observations with running mean and variance."""
    norm_reward: bool = True
    """Divide rewards by the running std of the discounted return."""
    obs_clip: float = 10.0
    """Clip normalised observations to +-obs_clip."""
    reward_clip: float = 10.0
    """Clip scaled rewards to +-reward_clip."""


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
    if not args.hidden_sizes or min(args.hidden_sizes) <= 0:
        raise UsageError(f"--hidden-sizes must be positive, got {args.hidden_sizes}")
    if args.num_steps <= 0:
        raise UsageError(f"--num-steps must be positive, got {args.num_steps}")
    if not 0.0 <= args.gamma <= 1.0 or not 0.0 <= args.gae_lambda <= 1.0:
        raise UsageError("--gamma and --gae-lambda must be in [0, 1]")
    batch = args.num_envs * args.num_steps
    if args.estimator == "vine":
        if not 0 < args.vine_states <= batch:
            raise UsageError(
                f"--vine-states must be in [1, {batch}] (the trunk: {args.num_envs} envs x "
                f"{args.num_steps} steps), got {args.vine_states}"
            )
        if args.vine_actions < 2:
            raise UsageError(
                f"--vine-actions must be at least 2 (with one action per state the "
                f"self-normalised surrogate is constant), got {args.vine_actions}"
            )
        if args.vine_rollout_length <= 0:
            raise UsageError(f"--vine-rollout-length must be positive, got {args.vine_rollout_length}")
    if args.delta <= 0 or args.cg_iters <= 0 or args.cg_damping < 0:
        raise UsageError("--delta and --cg-iters must be positive and --cg-damping >= 0")
    if not 0.0 < args.fisher_fraction <= 1.0:
        raise UsageError(f"--fisher-fraction must be in (0, 1], got {args.fisher_fraction}")
    if not 0.0 < args.backtrack_coef < 1.0 or args.backtrack_iters <= 0:
        raise UsageError("--backtrack-coef must be in (0, 1) and --backtrack-iters positive")
    if args.value_lr <= 0 or args.value_epochs <= 0 or args.value_minibatches <= 0:
        raise UsageError("--value-lr, --value-epochs and --value-minibatches must be positive")
    if args.value_minibatches > batch:
        raise UsageError(
            f"--value-minibatches {args.value_minibatches} is larger than the rollout "
            f"({args.num_envs} envs x {args.num_steps} steps)"
        )


# == 3. Environment ====================================================================
def make_env(env_id: str, render_mode: str | None = None) -> gym.Env:
    """One gymnasium env; an unknown id or a missing dependency becomes a UsageError."""
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown env id {env_id!r}{hint}")
    kwargs = {} if render_mode is None else {"render_mode": render_mode}
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.DependencyNotInstalled as e:
        raise UsageError(f"{env_id} needs a package that is not installed: {e}") from None


def make_vec_env(env_id: str, num_envs: int) -> gym.vector.SyncVectorEnv:
    """Training envs in SAME_STEP autoreset mode: an ended episode's last observation is in
    infos["final_obs"] and the returned observation already starts the next episode."""
    return gym.vector.SyncVectorEnv(
        [lambda: make_env(env_id) for _ in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
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
        trigger = lambda episode: episode % episodes == 0
        return gym.wrappers.RecordVideo(env, video_dir, episode_trigger=trigger, name_prefix="eval")
    except Exception as e:  # noqa: BLE001 (no GL backend, moviepy missing, ...)
        print(f"video capture disabled: {type(e).__name__}: {e}".splitlines()[0], flush=True)
        env.close()
        return make_env(env_id)


def check_spaces(env_id: str, obs_space: gym.Space, action_space: gym.Space) -> None:
    """TRPO needs flat Box observations and a Box or Discrete action space."""
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise UsageError(f"{env_id} has observation space {obs_space}; this script needs a flat Box")
    if not isinstance(action_space, (gym.spaces.Box, gym.spaces.Discrete)):
        raise UsageError(f"{env_id} has a {type(action_space).__name__} action space; TRPO here needs a Box or a Discrete one")
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) != 1:
        raise UsageError(f"{env_id} has actions of shape {action_space.shape}; TRPO needs a flat Box")


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
            mujoco.mj_getState(self.env.model, self.env.data, state, mujoco.mjtState.mjSTATE_INTEGRATION)
            return state
        return np.array(self.env.state, dtype=np.float64)

    def set_state(self, state: np.ndarray) -> None:
        if self.kind == "mujoco":
            mujoco.mj_setState(self.env.model, self.env.data, state, mujoco.mjtState.mjSTATE_INTEGRATION)
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


def mlp(in_dim: int, hidden_sizes: tuple[int, ...], activation: str, layer_norm: bool) -> nn.Sequential:
    """Linear + activation layers; optional LayerNorm after the first Linear ([TreePI] '256-LN')."""
    layers: list[nn.Module] = []
    for i, size in enumerate(hidden_sizes):
        layers.append(nn.Linear(in_dim, size))
        if layer_norm and i == 0:
            layers.append(nn.LayerNorm(size))
        layers.append(ACTIVATIONS[activation]())
        in_dim = size
    return nn.Sequential(*layers)


def orthogonal_init(module: nn.Module, gain: float) -> nn.Module:
    """Orthogonal weights with the given gain and zero biases for every Linear (baselines ppo2)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, gain)
            nn.init.zeros_(layer.bias)
    return module


class Actor(nn.Module):
    """pi(a|s): a diagonal Gaussian with a state-independent log std for Box actions, a
    categorical over logits for Discrete ones [TRPO App. D]."""

    def __init__(self, obs_dim: int, action_space: gym.Space, args: Args):
        super().__init__()
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        out_dim = int(action_space.n) if self.discrete else int(np.prod(action_space.shape))
        self.trunk = orthogonal_init(mlp(obs_dim, args.hidden_sizes, args.activation, args.layer_norm), np.sqrt(2))
        # a small last layer starts the policy near uniform / zero mean (baselines ppo2)
        self.head = orthogonal_init(nn.Linear(args.hidden_sizes[-1], out_dim), 0.01)
        self.log_std = None if self.discrete else nn.Parameter(torch.zeros(out_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Gaussian mean [B, A] or categorical logits [B, n]."""
        return self.head(self.trunk(obs))

    def log_prob_entropy(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi(a|s) and the entropy of pi(.|s), both [B]."""
        out = self(obs)
        if self.discrete:
            return categorical_log_prob(out, actions), categorical_entropy(out)
        log_std = self.log_std.expand_as(out)
        return gaussian_log_prob(actions, out, log_std), gaussian_entropy(log_std)

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An action a ~ pi(.|s) (unclipped; the env clips) and log pi(a|s) [B]."""
        out = self(obs)
        if self.discrete:
            actions = torch.multinomial(out.softmax(-1), 1).squeeze(-1)
            return actions, categorical_log_prob(out, actions)
        noise = torch.randn_like(out)
        actions = out + self.log_std.exp() * noise
        # log N(a; mean, std) with (a - mean) / std = noise: no division needed
        log_probs = (-0.5 * noise.pow(2) - self.log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
        return actions, log_probs

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """The mean action or the most likely one, used for evaluation."""
        out = self(obs)
        return out.argmax(-1) if self.discrete else out

    def dist_params(self, obs: torch.Tensor) -> torch.Tensor:
        """The distribution parameters mu_theta(s) of [TRPO App. C.1]: [mean, log std] [B, 2A]
        for Box actions, the logits [B, n] for Discrete ones."""
        out = self(obs)
        return out if self.discrete else torch.cat([out, self.log_std.expand_as(out)], dim=-1)

    def kl(self, dist_old: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """KL(pi_old(.|s) || pi(.|s)) per state [B] from two dist_params outputs."""
        if self.discrete:
            return categorical_kl(dist_old, dist)
        return gaussian_kl(*dist_old.chunk(2, dim=-1), *dist.chunk(2, dim=-1))

    def noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The random numbers of `shape` actions: uniform [*shape] for Discrete actions,
        standard normal [*shape, A] for Box ones."""
        if self.discrete:
            return torch.rand(shape, device=device)
        return torch.randn(*shape, *self.log_std.shape, device=device)

    def sample_with_noise(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """a ~ pi(.|s) as a function of given noise, so branches can share it: mean + std noise,
        or the inverse CDF of the categorical at the uniform noise."""
        out = self(obs)
        if self.discrete:
            cdf = out.softmax(-1).cumsum(-1)
            actions = (cdf <= noise.unsqueeze(-1)).sum(-1)  # the first a with cdf(a) > u
            return actions.clamp_max(out.shape[-1] - 1)  # in case cdf(n - 1) rounds below u
        return out + self.log_std.exp() * noise


class Value(nn.Module):
    """State-value function V(s)."""

    def __init__(self, obs_dim: int, args: Args):
        super().__init__()
        self.trunk = orthogonal_init(mlp(obs_dim, args.hidden_sizes, args.activation, args.layer_norm), np.sqrt(2))
        self.head = orthogonal_init(nn.Linear(args.hidden_sizes[-1], 1), 1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(obs)).squeeze(-1)  # [B]


# == 5. Storage ========================================================================
class RunningMeanStd:
    """Mean and variance of everything seen so far, merged batch by batch (Chan et al. 1979, as
    baselines' VecNormalize). Kept in float64 numpy for speed on the per-step path; state_dict()
    gives tensors for the checkpoint."""

    def __init__(self, shape: tuple[int, ...]):
        self.mean = np.zeros(shape)
        self.var = np.ones(shape)
        self.count = 1e-4  # baselines' initial count: the first batch dominates at once

    def update(self, x: np.ndarray) -> None:
        """Merge a batch x [n, *shape]."""
        n = x.shape[0]
        batch_mean = x.sum(axis=0) / n  # sum and square by hand: np.mean / np.var cost more
        batch_var = np.square(x - batch_mean).sum(axis=0) / n
        delta, total = batch_mean - self.mean, self.count + n
        self.mean = self.mean + delta * n / total
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.var, self.count = m2 / total, total

    def normalize(self, x: np.ndarray, clip: float) -> np.ndarray:
        return np.clip((x - self.mean) / np.sqrt(self.var + 1e-8), -clip, clip).astype(np.float32)

    def state_dict(self) -> dict:
        return {
            "mean": torch.as_tensor(np.asarray(self.mean)),
            "var": torch.as_tensor(np.asarray(self.var)),
            "count": torch.tensor(self.count, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict) -> None:
        self.mean = state["mean"].double().cpu().numpy().copy()
        self.var = state["var"].double().cpu().numpy().copy()
        self.count = float(state["count"])


class RewardScaler:
    """r / std(G) with G_t = gamma G_{t-1} + r_t the discounted return of each env so far, reset
    at episode ends, then clipped (baselines' VecNormalize)."""

    def __init__(self, num_envs: int, gamma: float, clip: float):
        self.rms, self.gamma, self.clip = RunningMeanStd(()), gamma, clip
        self.returns = np.zeros(num_envs)

    def __call__(self, rewards: np.ndarray, ended: np.ndarray) -> np.ndarray:
        self.returns = self.returns * self.gamma + rewards
        self.rms.update(self.returns)
        self.returns[ended] = 0.0
        scaled = rewards / np.sqrt(self.rms.var + 1e-8)
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)


class Rollout(NamedTuple):
    obs: torch.Tensor  # [T, N, O] normalised observations
    actions: torch.Tensor  # [T, N, A] (float) or [T, N] (long)
    log_probs: torch.Tensor  # [T, N] log pi_old(a|s)
    rewards: torch.Tensor  # [T, N] scaled rewards, + gamma V(final obs) at truncations
    dones: torch.Tensor  # [T, N] 1.0 where the episode ended after this step (either way)
    values: torch.Tensor  # [T, N] V_old(s)


def make_rollout(num_steps: int, num_envs: int, obs_dim: int, action_space: gym.Space) -> Rollout:
    """Preallocated rollout storage, written in place step by step."""
    discrete = isinstance(action_space, gym.spaces.Discrete)
    tn = (num_steps, num_envs)
    return Rollout(
        obs=torch.zeros(*tn, obs_dim),
        actions=torch.zeros(tn, dtype=torch.long) if discrete else torch.zeros(*tn, *action_space.shape),
        log_probs=torch.zeros(tn),
        rewards=torch.zeros(tn),
        dones=torch.zeros(tn),
        values=torch.zeros(tn),
    )


class Trunk(NamedTuple):
    states: np.ndarray  # [T, N, Z] simulator state before each step
    elapsed: np.ndarray  # [T, N] steps its episode had taken before it


def make_trunk(num_steps: int, num_envs: int, state_size: int) -> Trunk:
    """Storage for the vine's trunk [TRPO Sec. 5.2] (size-0 states for the single path)."""
    return Trunk(states=np.zeros((num_steps, num_envs, state_size)), elapsed=np.zeros((num_steps, num_envs), dtype=np.int64))


# == 6. Algorithm ======================================================================
CG_RESIDUAL_TOL = 1e-10  # stop CG once |r|^2 is below this ([SB3C]; modular_rl)
STEP_EPS = 1e-12  # guards beta = sqrt(2 delta / s^T A s) against s^T A s = 0


def gaussian_log_prob(actions: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(a; mean, diag(exp(log_std)^2)) summed over action dimensions: [B, A] -> [B]."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """Entropy of a diagonal Gaussian, sum_i (log_std_i + (1 + log 2 pi) / 2): [B, A] -> [B]."""
    return (log_std + 0.5 * (1.0 + np.log(2 * np.pi))).sum(-1)


def categorical_log_prob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[a]: [B, n], [B] -> [B]."""
    return logits.log_softmax(-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    """-sum_a p(a) log p(a): [B, n] -> [B]."""
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def gaussian_kl(mean_old: torch.Tensor, log_std_old: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """KL(N_old || N) = sum_i log(s_i / s_old_i) + (s_old_i^2 + (m_old_i - m_i)^2) / (2 s_i^2)
    - 1/2 for diagonal Gaussians: [B, A] each -> [B]."""
    var_ratio = torch.exp(2 * (log_std_old - log_std))
    mahalanobis = ((mean_old - mean) * torch.exp(-log_std)).pow(2)
    return (log_std - log_std_old + 0.5 * (var_ratio + mahalanobis) - 0.5).sum(-1)


def categorical_kl(logits_old: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_old || p) = sum_a p_old(a) (log p_old(a) - log p(a)): [B, n] each -> [B]."""
    log_p_old = logits_old.log_softmax(-1)
    return (log_p_old.exp() * (log_p_old - logits.log_softmax(-1))).sum(-1)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor, gamma: float, gae_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, cut at episode ends [PPO eq. 11-12; GAE eq. 16].

    delta_t = r_t + gamma (1 - done_t) V(s_{t+1}) - V(s_t)
    A_t = delta_t + gamma lambda (1 - done_t) A_{t+1},   returns R_t = A_t + V(s_t).
    done_t marks a step after which the episode ended (terminated or truncated); a truncated
    step's reward already holds gamma V(final obs), so the cut is right for both.
    Shapes: rewards, values, dones [T, N]; last_value [N] = V(s_T); returns two [T, N].
    """
    not_done = 1.0 - dones
    next_values = torch.cat([values[1:], last_value.unsqueeze(0)])  # V(s_{t+1})
    deltas = rewards + gamma * not_done * next_values - values
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(last_value)
    discounts = gamma * gae_lambda * not_done
    for t in reversed(range(rewards.shape[0])):
        next_advantage = deltas[t] + discounts[t] * next_advantage
        advantages[t] = next_advantage
    return advantages, advantages + values


def surrogate(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """L(theta) = mean_t rho_t A_t, rho = pi_theta(a_t|s_t) / pi_old(a_t|s_t) [TRPO eq. 14].

    Single path [TRPO Sec. 5.1]: q = pi_old, and advantages in place of Q change L by a
    constant only. Shapes: all [B]; returns a scalar.
    """
    return (torch.exp(log_probs - old_log_probs) * advantages).mean()


def vine_surrogate(log_probs: torch.Tensor, log_q: torch.Tensor, q_values: torch.Tensor) -> torch.Tensor:
    """L(theta) = mean_r sum_k w_rk Q_rk / sum_k w_rk, w_rk = pi_theta(a_rk|s_r) / q(a_rk|s_r).

    [TRPO eq. 16] the self-normalised importance-sampling estimate at each rollout-set state,
    computed as softmax_k(log w_rk), which is exact and cannot overflow. With q = pi_old (Box
    actions) it is eq. 16 as printed; with every action of a Discrete space once and q uniform,
    sum_k w_rk = 1 / q and it is eq. 15, sum_a pi_theta(a|s_r) Q(s_r, a).
    Shapes: log_probs, log_q, q_values [R, K]; returns a scalar.
    """
    return (torch.softmax(log_probs - log_q, dim=-1) * q_values).sum(-1).mean()


def conjugate_gradient(avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int) -> torch.Tensor:
    """An approximate solution x of A x = b, A symmetric positive definite, from products A v.

    [TRPO App. C] conjugate gradient from x_0 = 0 for `iters` steps (the paper: 10), stopping
    early once |b - A x|^2 < CG_RESIDUAL_TOL. avp: v -> A v. Shapes: b [P]; returns x [P].
    """
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()  # the residual b - A x and the search direction
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


def fisher_vector_product(kl_grad: torch.Tensor, params: list[torch.Tensor], v: torch.Tensor, damping: float) -> torch.Tensor:
    """(A + damping I) v, A = d^2/dtheta^2 mean_s KL(pi_old(.|s) || pi_theta(.|s)) at theta_old.

    [TRPO App. C.1] the Hessian-vector product of the analytic mean KL: kl_grad = dKL/dtheta,
    built with create_graph=True at theta = theta_old, is differentiated once more along v.
    There the second term of eq. 57 vanishes, so this is the Fisher J^T M J v, M the Fisher
    of the distribution parameters. Shapes: kl_grad, v [P]; params the P parameters.
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
    """theta = theta_old + c^j full_step for the first j with L(theta) > L(theta_old) and mean
    KL <= delta; if no j < backtrack_iters passes, theta_old is restored exactly.

    [TRPO App. C] the line search on L(theta) - X[KL <= delta], from the maximal step down,
    shrinking it exponentially. evaluate_step() returns (L, mean KL) at the actor's current
    parameters. Shapes: theta_old, full_step [P]. Returns the accepted c^j, 0.0 if rejected.
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
    """Copy the flat vector theta [P] into the parameters in place (vector_to_parameters would
    make them views into theta, whose memory alignment can change matmul rounding)."""
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
    """Q_rk = sum_{t < L_r} gamma^t r_t of the branch that restores state s_r, takes a_rk and
    then follows the policy, the K branches of s_r sharing their noise.

    [TRPO Sec. 5.2] rollouts from the rollout set with common random numbers: branch (r, k)
    acts at step t >= 1 with noise[r, t - 1] for every k, so the branches of a state differ
    through their first action only. All R K branches advance in lockstep, one batched policy
    call per step; a branch stops when its episode terminates or after L_r = min(L, horizon_r)
    steps. act(obs [R K, O], noise [R K, ...]) -> env actions [R K, ...].
    Shapes: states [R, Z]; first_actions [R, K, ...] (env actions); noise [R, L - 1, ...];
    horizons [R] (steps left before the time limit). Returns Q [R, K] and the steps taken.
    """
    num_states, num_actions = first_actions.shape[:2]
    branch_states = np.repeat(states, num_actions, axis=0)  # [R K, Z]
    actions = first_actions.reshape(num_states * num_actions, *first_actions.shape[2:])
    branch_noise = noise.repeat_interleave(num_actions, dim=0)  # [R K, L - 1, ...]: CRN
    limits = np.repeat(np.minimum(horizons, noise.shape[1] + 1), num_actions)  # [R K]
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
    """[TRPO eq. 14] on the rollout: states, actions, log pi_old(a|s) and advantages, [B]."""
    log_probs, _ = actor.log_prob_entropy(batch["obs"], batch["actions"])
    return surrogate(log_probs, batch["log_probs"], batch["advantages"])


def vine_objective(actor: Actor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[TRPO eq. 15-16] on the rollout set: states [R, O], actions, log q and Q, [R, K]."""
    obs = batch["obs"].unsqueeze(1).expand(-1, batch["q_values"].shape[1], -1)  # [R, K, O]
    log_probs, _ = actor.log_prob_entropy(obs, batch["actions"])
    return vine_surrogate(log_probs, batch["log_q"], batch["q_values"])


def update_policy(
    actor: Actor,
    objective: Callable[[], torch.Tensor],
    obs: torch.Tensor,
    delta: float,
    cg_iters: int,
    cg_damping: float,
    fisher_fraction: float,
    backtrack_coef: float,
    backtrack_iters: int,
) -> dict[str, torch.Tensor]:
    """One trust-region step [TRPO Sec. 6, App. C]: maximise objective() subject to the mean
    KL(pi_old || pi_theta) <= delta over the states obs [B, O]; returns the metrics."""
    params = list(actor.parameters())
    theta_old = torch.cat([p.detach().reshape(-1) for p in params])
    with torch.no_grad():
        dist_old = actor.dist_params(obs)  # [B, D], pi_old in every KL below
    surrogate_old = objective()
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(surrogate_old, params)])
    # [TRPO App. C.1] the Fisher on a random fraction of the states
    idx = torch.randperm(len(obs), device=obs.device)[: max(1, round(fisher_fraction * len(obs)))]
    kl_fisher = actor.kl(dist_old[idx], actor.dist_params(obs[idx])).mean()
    kl_grad = torch.cat([x.reshape(-1) for x in torch.autograd.grad(kl_fisher, params, create_graph=True)])
    fvp = functools.partial(fisher_vector_product, kl_grad, params, damping=cg_damping)
    step_dir = conjugate_gradient(fvp, g, cg_iters)  # s ~ A^-1 g
    curvature = step_dir @ fvp(step_dir)  # s^T A s
    full_step = torch.sqrt(2 * delta / curvature.clamp_min(STEP_EPS)) * step_dir  # [TRPO App. C]

    @torch.no_grad()
    def evaluate_step() -> tuple[torch.Tensor, torch.Tensor]:
        return objective(), actor.kl(dist_old, actor.dist_params(obs)).mean()

    surrogate_old = surrogate_old.detach()
    fraction = line_search(actor, evaluate_step, theta_old, full_step, surrogate_old, delta, backtrack_coef, backtrack_iters)
    surrogate_new, kl = evaluate_step()
    entropy = categorical_entropy(dist_old) if actor.discrete else gaussian_entropy(dist_old.chunk(2, dim=-1)[1])
    return {
        "losses/policy": -surrogate_new,
        "stats/surrogate_improvement": surrogate_new - surrogate_old,
        "stats/kl": kl,
        "stats/entropy": entropy.mean(),
        "stats/step_fraction": torch.tensor(fraction),
        "stats/line_search_rejected": torch.tensor(float(fraction == 0.0)),
        "stats/grad_norm": g.norm(),
    }


def update_value(
    value: Value, value_opt: torch.optim.Optimizer, obs: torch.Tensor, returns: torch.Tensor, epochs: int, num_minibatches: int
) -> dict[str, torch.Tensor]:
    """Fit V to the returns R = A + V_old: `epochs` passes of minibatch Adam steps on
    (V(s) - R)^2 / 2 ([SB3C]; the policy step does not touch V)."""
    size = len(obs)
    minibatch = size // num_minibatches
    total = torch.zeros((), device=obs.device)
    for _ in range(epochs):
        perm = torch.randperm(size, device=obs.device)
        for start in range(0, minibatch * num_minibatches, minibatch):
            idx = perm[start : start + minibatch]
            loss = 0.5 * (value(obs[idx]) - returns[idx]).pow(2).mean()
            value_opt.zero_grad(set_to_none=True)
            loss.backward()
            value_opt.step()
            total = total + loss.detach()
    return {"losses/value": total / (epochs * num_minibatches)}


# == 8. Evaluation =====================================================================
def evaluate(act: Callable[[np.ndarray], np.ndarray], env: gym.Env, episodes: int, seed: int) -> list[float]:
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
    except Exception as e:  # noqa: BLE001 (whatever makes the file unreadable: one clear line)
        raise UsageError(f"cannot read checkpoint {path}: {type(e).__name__}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a checkpoint of this repository (format {CHECKPOINT_FORMAT})")
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
    return dataclasses.asdict(dataclasses.replace(args, checkpoint=None, resume=None, eval_only=False))


class Progress:
    """Sums metric tensors between log lines (no host sync per step) and writes the log line."""

    def __init__(self, writer: SummaryWriter, start_step: int, start_updates: int):
        self.writer, self.sums, self.counts = writer, {}, {}
        self.returns: list[float] = []
        self.eval_return = float("nan")
        self.last = (time.perf_counter(), start_step, start_updates)

    def add_metrics(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1  # per key: updates log different keys

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
            self.writer.add_scalar(k, (v / self.counts[k]).item(), global_step)
        ret = f"{np.mean(self.returns):.1f}" if self.returns else "-"
        print(
            f"step {global_step} | return {ret} | eval {self.eval_return:.1f} | SPS {sps:.0f} | updates/s {ups:.0f}",
            flush=True,
        )
        self.sums, self.counts, self.returns = {}, {}, []
        self.last = (now, global_step, num_updates)

    def finish(self, global_step: int, num_updates: int, run_dir: str) -> None:
        if global_step > self.last[1]:
            self.log(global_step, num_updates)
        print(f"done: step {global_step} | eval {self.eval_return:.1f} | run {run_dir}", flush=True)


def make_agent(args: Args, obs_dim: int, action_space: gym.Space, device: torch.device) -> dict:
    """Networks, by the names their state is saved under (the vine's estimator needs no V)."""
    agent = {"actor": Actor(obs_dim, action_space, args).to(device)}
    if args.estimator == "single-path":
        agent["value"] = Value(obs_dim, args).to(device)
    return agent


def policy_fn(
    actor: Actor, obs_rms: RunningMeanStd | None, args: Args, action_space: gym.Space, device: torch.device
) -> Callable[[np.ndarray], np.ndarray]:
    """act(obs) -> action with the deterministic action and frozen normalisation statistics."""

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        if obs_rms is not None:
            obs = obs_rms.normalize(obs, args.obs_clip)
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
        action = actor.deterministic(obs_t).cpu().numpy()
        if isinstance(action_space, gym.spaces.Box):
            action = np.clip(action, action_space.low, action_space.high)
        return action

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


def vine_batch(
    actor: Actor,
    obs_rms: RunningMeanStd | None,
    data: Rollout,
    trunk: Trunk,
    sim: Simulator,
    max_episode_steps: int,
    args: Args,
    action_space: gym.Space,
) -> tuple[dict[str, torch.Tensor], int]:
    """[TRPO Sec. 5.2] the rollout set, K actions at each of its states and the branches' Q
    estimates; returns them and the simulator steps the branches took."""
    device = data.obs.device

    def env_actions(actions: torch.Tensor) -> np.ndarray:
        actions = actions.cpu().numpy()
        if actor.discrete:
            return actions
        return np.clip(actions, action_space.low, action_space.high)  # pi keeps the sample

    @torch.no_grad()
    def act(obs: np.ndarray, noise: torch.Tensor) -> np.ndarray:
        if obs_rms is not None:
            obs = obs_rms.normalize(obs, args.obs_clip)
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
        return env_actions(actor.sample_with_noise(obs_t, noise))

    # the rollout set: R distinct trunk states, uniformly
    idx = torch.randperm(data.obs.shape[0] * data.obs.shape[1])[: args.vine_states]
    obs = data.obs.flatten(0, 1)[idx.to(device)]  # [R, O], normalised as the trunk saw them
    states = trunk.states.reshape(len(trunk.elapsed.reshape(-1)), -1)[idx.numpy()]  # [R, Z]
    horizons = max_episode_steps - trunk.elapsed.reshape(-1)[idx.numpy()]  # [R]
    num_states = len(idx)
    with torch.no_grad():
        if actor.discrete:  # q uniform: K distinct actions, all n if K >= n (eq. 15)
            n = actor.head.out_features
            k = min(args.vine_actions, n)
            actions = torch.rand(num_states, n, device=device).argsort(-1)[:, :k]  # [R, K]
            log_q = torch.full((num_states, k), -float(np.log(n)), device=device)
        else:  # q = pi_old, the choice [TRPO Sec. 5.2] makes for continuous control
            k = args.vine_actions
            obs_k = obs.unsqueeze(1).expand(-1, k, -1)  # [R, K, O]
            actions = actor.sample_with_noise(obs_k, actor.noise((num_states, k), device))
            log_q, _ = actor.log_prob_entropy(obs_k, actions)  # [R, K]
        noise = actor.noise((num_states, args.vine_rollout_length - 1), device)  # CRN
    q_values, sim_steps = vine_rollouts(sim, states, env_actions(actions), act, noise, horizons, args.gamma)
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
    video_dir = os.path.join(os.path.dirname(args.checkpoint), "videos") if args.capture_video else None
    env = make_eval_env(args.env, video_dir, args.eval_episodes)
    check_spaces(args.env, env.observation_space, env.action_space)
    agent = make_agent(args, env.observation_space.shape[0], env.action_space, device)
    load_agent_state(agent, payload["state"])
    obs_rms = None
    if payload["obs_norm"] is not None:
        obs_rms = RunningMeanStd(env.observation_space.shape)
        obs_rms.load_state_dict(payload["obs_norm"])
    act = policy_fn(agent["actor"], obs_rms, args, env.action_space, device)
    returns = evaluate(act, env, args.eval_episodes, args.seed + 10_000)
    env.close()
    print(
        f"eval over {len(returns)} episodes: mean {np.mean(returns):.1f} | returns " + " ".join(f"{r:.1f}" for r in returns),
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
    action_space = envs.single_action_space
    # -- networks and optimizers
    agent = make_agent(args, obs_dim, action_space, device)
    actor, value = agent["actor"], agent.get("value")  # the vine has no V
    value_opt = torch.optim.Adam(value.parameters(), lr=args.value_lr, fused=True) if value is not None else None
    obs_rms = RunningMeanStd((obs_dim,))
    reward_scaler = RewardScaler(args.num_envs, args.gamma, args.reward_clip)
    # -- storage
    data = make_rollout(args.num_steps, args.num_envs, obs_dim, action_space)
    data = Rollout(*(x.to(device) for x in data))
    trunk = make_trunk(args.num_steps, args.num_envs, trunk_sims[0].size if vine else 0)
    global_step, num_updates, sim_steps = 0, 0, 0
    if resume is not None:
        load_agent_state(agent, resume["state"])
        if value_opt is not None:
            value_opt.load_state_dict(resume["train"]["value_opt"])
        obs_rms.load_state_dict(resume["train"]["obs_rms"])
        reward_scaler.rms.load_state_dict(resume["train"]["reward_rms"])
        set_rng_state(resume["train"]["rng"])
        global_step, num_updates = resume["global_step"], resume["train"]["num_updates"]
        sim_steps = resume["train"]["sim_steps"]
    act = policy_fn(actor, obs_rms if args.norm_obs else None, args, action_space, device)
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
            "obs_norm": obs_rms.state_dict() if args.norm_obs else None,
        }
        if with_train_state:
            out["train"] = {"value_opt": value_opt.state_dict()} if value_opt is not None else {}
            out["train"].update(
                num_updates=num_updates,
                sim_steps=sim_steps,
                obs_rms=obs_rms.state_dict(),
                reward_rms=reward_scaler.rms.state_dict(),
                rng=rng_state(),
            )
        return out

    def observe(raw: np.ndarray, update: bool = True) -> torch.Tensor:
        """Update the observation statistics with a batch and return it normalised."""
        if not args.norm_obs:
            return torch.as_tensor(raw, dtype=torch.float32, device=device)
        if update:
            obs_rms.update(raw)
        return torch.as_tensor(obs_rms.normalize(raw, args.obs_clip), device=device)

    # -- loop
    obs, _ = envs.reset(seed=args.seed + global_step)  # a resumed run starts fresh episodes
    obs = observe(obs, update=False)  # statistics grow with the steps taken, so a resume is exact
    next_eval = global_step + args.eval_every if args.eval_every else None
    next_log = global_step + args.log_every
    next_ckpt = global_step + args.checkpoint_every if args.checkpoint_every else None
    while global_step < args.total_steps:
        for t in range(args.num_steps):
            # act
            if vine:  # the trunk: every state it visits can be restored to branch from
                trunk.states[t] = [sim.get_state() for sim in trunk_sims]
                trunk.elapsed[t] = stats.lengths
            with torch.no_grad():
                actions, log_probs = actor.sample(obs)
                values = value(obs) if value is not None else data.values[t]  # vine: no V
            env_actions = actions.cpu().numpy()
            if not actor.discrete:  # the env gets the clipped action, pi_old keeps the sample
                env_actions = np.clip(env_actions, action_space.low, action_space.high)
            # step
            next_obs, rewards, terminated, truncated, infos = envs.step(env_actions)
            global_step += args.num_envs
            sim_steps += args.num_envs
            ended = terminated | truncated
            for episode_return, length in stats.update(rewards, ended):
                progress.add_episode(global_step, episode_return, length)
            if args.norm_reward:
                rewards = reward_scaler(rewards, ended)
            rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
            # a time limit is not an MDP end: bootstrap from the true last observation
            cut = np.flatnonzero(truncated & ~terminated) if value is not None else []
            if len(cut):
                final = np.stack([infos["final_obs"][i] for i in cut])
                if args.norm_obs:
                    final = obs_rms.normalize(final, args.obs_clip)
                with torch.no_grad():
                    final_t = torch.as_tensor(final, dtype=torch.float32, device=device)
                    rewards[cut] += args.gamma * value(final_t)
            # store
            data.obs[t], data.actions[t], data.log_probs[t] = obs, actions, log_probs
            data.rewards[t], data.values[t] = rewards, values
            data.dones[t] = torch.as_tensor(ended, dtype=torch.float32, device=device)
            obs = observe(next_obs)
        # update: one trust-region step [TRPO Sec. 6] on the surrogate of either estimator
        if vine:
            batch, branch_steps = vine_batch(
                actor, obs_rms if args.norm_obs else None, data, trunk, branch_sim, max_episode_steps, args, action_space
            )
            sim_steps += branch_steps
            objective = functools.partial(vine_objective, actor, batch)
        else:
            with torch.no_grad():
                advantages, returns = gae(data.rewards, data.values, data.dones, value(obs), args.gamma, args.gae_lambda)
            advantages = advantages.flatten()
            if args.norm_adv:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            batch = {
                "obs": data.obs.flatten(0, 1),
                "actions": data.actions.flatten(0, 1),
                "log_probs": data.log_probs.flatten(),
                "advantages": advantages,
            }
            objective = functools.partial(single_path_objective, actor, batch)
        metrics = update_policy(
            actor,
            objective,
            data.obs.flatten(0, 1),
            args.delta,
            args.cg_iters,
            args.cg_damping,
            args.fisher_fraction,
            args.backtrack_coef,
            args.backtrack_iters,
        )
        if vine:
            metrics["stats/q_mean"] = batch["q_values"].mean()
        else:
            returns, old_values = returns.flatten(), data.values.flatten()
            metrics.update(update_value(value, value_opt, batch["obs"], returns, args.value_epochs, args.value_minibatches))
            metrics["stats/explained_variance"] = 1 - (returns - old_values).var() / returns.var()
        if float(metrics["stats/step_fraction"]) == 0.0:  # [TRPO App. C]: theta_old is kept
            print(f"step {global_step} | line search accepted no step: policy unchanged", flush=True)
        num_updates += 1
        progress.add_metrics(metrics)
        writer.add_scalar("charts/sim_steps", sim_steps, global_step)
        # log, evaluate and save
        if global_step >= next_log:
            progress.log(global_step, num_updates)
            next_log += args.log_every
        if next_eval is not None and global_step >= next_eval:
            progress.add_eval(global_step, evaluate(act, eval_env, args.eval_episodes, args.seed + 10_000))
            if args.save_model:
                save_checkpoint(os.path.join(run_dir, "model.pt"), payload(with_train_state=False))
            next_eval += args.eval_every
        if next_ckpt is not None and global_step >= next_ckpt:
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
