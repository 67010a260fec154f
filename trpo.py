# /// script
# requires-python = ">=3.10"
# dependencies = ["torch>=2.6", "numpy>=1.26", "gymnasium[mujoco]>=1.1,<2", "mujoco>=4.0.1", "tensorboard>=2.14", "tyro>=0.9", "dm-control>=1.0.52", "shimmy[dm-control]>=2.0.1", "moviepy>=2"]
# ///
"""Trust Region Policy Optimization (TRPO) with the single-path and vine estimators, in one file.

References:
    [TRPO] Schulman, Levine, Moritz, Jordan, Abbeel 2015, "Trust Region Policy Optimization", arXiv:1502.05477: Sec. 5-6,
        App. C (conjugate gradient, line search, Fisher-vector products), App. D (policies), Table 2 (parameters).
    [GAE] Schulman, Moritz, Levine, Jordan, Abbeel 2016, arXiv:1506.02438: the single path's A and learned V (TRPO-GAE).
    [SB3C], [SpinUp] Stable-Baselines3-contrib's and Spinning Up's TRPO: CG damping, line search and V fit (not in [TRPO]).
    [TreePI] Springenberg, Heess et al. 2020, arXiv:2010.05545: Table 2's network options (--activation, --layer-norm).
    [DPI] Sun, Gordon, Boots, Bagnell 2018, arXiv:1805.10755: TRPO-GAE as its baseline (Sec. 6.2; --eval-horizon scores the
        first T steps, DPI's training horizon) and robust policy optimisation (Sec. 6.3; --robust, dpi_ilqr.py's variants).

Algorithm (one iteration; in brackets the function doing each line):
    1. Roll out pi_old, num_steps steps in each of num_envs envs; the vine saves the states, the trunk [Rollout, Simulator]
    2. Single path [TRPO Sec. 5.1]: A_t = GAE(gamma, lambda) of a learned V (lambda = 1: Monte Carlo Q minus V)  [gae]
       Vine [Sec. 5.2]: K actions at each of R trunk states (q = pi for Box actions, uniform for Discrete), each taken
       in the restored state, then pi for L - 1 steps, noise shared by the K; Q = return  [vine_actions, vine_rollouts]
    3. L(theta) = mean_t rho_t A_t, rho = pi_theta / pi_old [eq. 14]                              [single_path_objective]
       vine: L(theta) = mean_r sum_k w_rk Q_rk / sum_k w_rk, w = pi_theta / q [eq. 15-16]              [vine_surrogate]
    4. s = A^-1 g, g = grad L, by 10 conjugate-gradient steps on products with A, the Hessian of the mean
       KL(pi_old || pi_theta) on 10% of the states [App. C, C.1]                [conjugate_gradient, fisher_vector_product]
    5. Step beta s, beta = sqrt(2 delta / s^T A s), shrunk by 0.8 until L improves and the mean KL <= delta, else
       theta_old is kept [App. C]                                                            [update_policy, line_search]
    6. Single path: fit V to R_t = A_t + V_old(s_t), 10 epochs of 32 minibatch Adam steps on (V - R)^2 / 2 [update_value]
Shapes: T steps, N envs, B states, O observation, A action (or number of actions), D distribution parameters (2A or A),
P policy parameters; vine: R rollout-set states (the paper's N), K actions per state, L branch length, Z simulator state.

Deviations from the paper:
    - Single path: GAE and a learned V [GAE], not Monte Carlo returns; advantages normalised per batch ([SB3C], [SpinUp]).
    - 5,000 env steps per iteration (Table 2: 50k-1M single path, a 16 x 1000 trunk): 1M steps make its 200 iterations.
    - ppo.py's networks (2 x 64 tanh units; paper: 1 x 30 or 50) and normalisers: `diff ppo.py trpo.py` shows the rest.
    - The vine's KL and Fisher use all trunk states (a larger sample than the R); a branch stops at its time limit.
    - Gaussian actions are clipped to the bounds in the env only; log-probabilities and ratios use the unclipped sample.
"""

import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import gymnasium as gym
import mujoco  # the vine saves and restores MuJoCo states
import numpy as np
import torch
from gymnasium.envs.mujoco.mujoco_env import MujocoEnv
from torch import Tensor, nn
from torch.optim import Optimizer

ALGO = "trpo"
ACTION_SPACES = (gym.spaces.Box, gym.spaces.Discrete)  # a Gaussian for Box actions, a categorical for Discrete ones


# == 1. Arguments ==========================================================================================
@dataclass
class Args:
    # -- algorithm ----------------------------------------------------------------------------------------
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
    """Steps per env per rollout: the single-path batch or the vine's trunk (Table 2: 50k-1M, or a 16 x 1000 trunk)."""
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
    """K, actions per rollout-set state, one branch each (Table 2: 4; Discrete: min(K, n) distinct actions)."""
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
    # Evaluation over a horizon, for [DPI] Sec. 6.2's comparison with a policy trained on T-step episodes
    eval_horizon: int = 0
    """Also log charts/eval_return_horizon, the return of the first this many steps of each evaluation episode (0: off)."""
    # Robust policy optimisation [DPI Sec. 6.3: 10 perturbed envs, 7 to train, 3 to test], the variants of dpi_ilqr.py
    robust: bool = False
    """Train on perturbed variants of --env (--num-envs copies of each, one batch) and test on held-out ones."""
    robust_train_variants: int = 7
    """Training variants M."""
    robust_test_variants: int = 3
    """Held-out test variants, evaluated only."""
    robust_mass_range: tuple[float, float] = (0.5, 1.5)
    """Range of the uniform mass scale of the variants."""
    robust_length_range: tuple[float, float] = (0.5, 1.5)
    """Range of the uniform pole-length scale (InvertedPendulum-v5 only)."""
    # -- shared: identical in every file ------------------------------------------------------------------
    env: str = "Hopper-v5"
    """Gymnasium id of the task (`module:Env-v0` imports `module` first, for an env it registers)."""
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
    rollout_size, vine = args.num_envs * args.num_steps, args.estimator == "vine"
    trust_region = args.delta > 0 and args.cg_iters > 0 and args.cg_damping >= 0 and args.backtrack_iters > 0
    value_fit = min(args.value_lr, args.value_epochs, args.value_minibatches) > 0
    variants = (args.robust_train_variants, args.robust_test_variants)
    ranges = (args.robust_mass_range, args.robust_length_range)
    return [
        (min(args.hidden_sizes, default=0) > 0, f"--hidden-sizes must be positive, got {args.hidden_sizes}"),
        (args.num_steps > 0, f"--num-steps must be positive, got {args.num_steps}"),
        (0.0 <= args.gamma <= 1.0 and 0.0 <= args.gae_lambda <= 1.0, "--gamma and --gae-lambda must be in [0, 1]"),
        (not vine or 0 < args.vine_states <= rollout_size, f"--vine-states must be in [1, {rollout_size}], the trunk's size"),
        (not vine or args.vine_actions >= 2, "--vine-actions must be >= 2 (with one the vine's surrogate is constant)"),
        (not vine or args.vine_rollout_length > 0, "--vine-rollout-length must be positive"),
        (trust_region, "--delta, --cg-iters and --backtrack-iters must be positive, --cg-damping >= 0"),
        (0.0 < args.fisher_fraction <= 1.0, f"--fisher-fraction must be in (0, 1], got {args.fisher_fraction}"),
        (0.0 < args.backtrack_coef < 1.0, f"--backtrack-coef must be in (0, 1), got {args.backtrack_coef}"),
        (value_fit, "--value-lr, --value-epochs and --value-minibatches must be positive"),
        (args.value_minibatches <= rollout_size, f"--value-minibatches must be at most the rollout's {rollout_size} steps"),
        (args.eval_horizon >= 0, f"--eval-horizon must be >= 0, got {args.eval_horizon}"),
        (not args.robust or min(variants) > 0, "--robust needs positive --robust-train-variants and --robust-test-variants"),
        (not args.robust or not args.env.startswith("dm_control/"), "--robust perturbs gymnasium's models, not the suite's"),
        (not args.robust or not vine, "--robust takes the single path: the vine's branches restore states in one simulator"),
        (all(0.0 < low <= high for low, high in ranges), "--robust-mass-range and --robust-length-range need 0 < low <= high"),
    ]


# == 2. Networks ===========================================================================================
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
    """pi(a|s) [TRPO App. D]: a diagonal Gaussian, state-independent log std (Box actions), or a categorical (Discrete)."""

    def __init__(self, obs_dim: int, space: gym.Space, hidden_sizes: tuple[int, ...], activation: str, layer_norm: bool):
        super().__init__()
        self.discrete = isinstance(space, gym.spaces.Discrete)
        out_dim = int(space.n) if self.discrete else int(np.prod(space.shape))
        self.trunk = orthogonal_init(mlp(obs_dim, hidden_sizes, activation, layer_norm), np.sqrt(2))
        # a small last layer starts the policy near uniform / zero mean (baselines ppo2)
        self.head = orthogonal_init(nn.Linear(hidden_sizes[-1], out_dim), 0.01)
        self.log_std = None if self.discrete else nn.Parameter(torch.zeros(out_dim))
        if not self.discrete:  # the env's bounds, which the env's actions are clipped to (log pi keeps the sample)
            self.register_buffer("low", torch.as_tensor(space.low, dtype=torch.float32))
            self.register_buffer("high", torch.as_tensor(space.high, dtype=torch.float32))

    def forward(self, obs: Tensor) -> Tensor:
        """Gaussian mean [B, A] or categorical logits [B, A]."""
        return self.head(self.trunk(obs))

    def log_prob_entropy(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """log pi(a|s) and the entropy of pi(.|s), both [B]."""
        out = self(obs)
        if self.discrete:
            return categorical_log_prob(out, actions), categorical_entropy(out)
        log_std = self.log_std.expand_as(out)
        return gaussian_log_prob(actions, out, log_std), gaussian_entropy(log_std)

    def sample(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """An action a ~ pi(.|s) (unclipped; the env clips) and log pi(a|s) [B]."""
        out = self(obs)
        if self.discrete:
            actions = torch.multinomial(out.softmax(-1), 1).squeeze(-1)
            return actions, categorical_log_prob(out, actions)
        noise = torch.randn_like(out)  # log N(a; mean, std) with (a - mean) / std = noise: no division needed
        return out + self.log_std.exp() * noise, (-0.5 * noise.pow(2) - self.log_std - 0.5 * np.log(2 * np.pi)).sum(-1)

    def deterministic(self, obs: Tensor) -> Tensor:
        """The mean action clipped to the env's bounds, or the most likely one; used for evaluation."""
        out = self(obs)
        return out.argmax(-1) if self.discrete else out.clamp(self.low, self.high)

    def env_action(self, actions: Tensor) -> Tensor:
        """What the env gets: a Box action clipped to its bounds."""
        return actions if self.discrete else actions.clamp(self.low, self.high)

    def dist_params(self, obs: Tensor) -> Tensor:
        """mu_theta(s) of [TRPO App. C.1]: [mean, log std] [B, 2A] for Box actions, the logits [B, A] for Discrete."""
        out = self(obs)
        return out if self.discrete else torch.cat([out, self.log_std.expand_as(out)], dim=-1)

    def kl(self, dist_old: Tensor, dist: Tensor) -> Tensor:
        """KL(pi_old(.|s) || pi(.|s)) [B] from two dist_params outputs: sum_a p_old(a) (log p_old(a) - log p(a)) for the
        categorical, sum_i log(s_i / s_old_i) + (s_old_i^2 + (m_old_i - m_i)^2) / (2 s_i^2) - 1/2 for the Gaussian."""
        if self.discrete:
            log_p_old = dist_old.log_softmax(-1)
            return (log_p_old.exp() * (log_p_old - dist.log_softmax(-1))).sum(-1)
        (mean_old, log_std_old), (mean, log_std) = dist_old.chunk(2, dim=-1), dist.chunk(2, dim=-1)
        var_ratio, mahalanobis = torch.exp(2 * (log_std_old - log_std)), ((mean_old - mean) * torch.exp(-log_std)).pow(2)
        return (log_std - log_std_old + 0.5 * (var_ratio + mahalanobis) - 0.5).sum(-1)

    def noise(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Random numbers for `shape` actions: uniform [*shape] (Discrete) or standard normal [*shape, A] (Box)."""
        return torch.rand(shape, device=device) if self.discrete else torch.randn(*shape, *self.log_std.shape, device=device)

    def sample_with_noise(self, obs: Tensor, noise: Tensor) -> Tensor:
        """a ~ pi(.|s) from given noise, which branches share: mean + std noise, or the inverse CDF at uniform noise."""
        out = self(obs)
        if self.discrete:
            actions = (out.softmax(-1).cumsum(-1) <= noise.unsqueeze(-1)).sum(-1)  # the first a with cdf(a) > u
            return actions.clamp_max(out.shape[-1] - 1)  # in case cdf(n - 1) rounds below u
        return out + self.log_std.exp() * noise


class Value(nn.Module):
    """State-value function V(s)."""

    def __init__(self, obs_dim: int, hidden_sizes: tuple[int, ...], activation: str, layer_norm: bool):
        super().__init__()
        self.trunk = orthogonal_init(mlp(obs_dim, hidden_sizes, activation, layer_norm), np.sqrt(2))
        self.head = orthogonal_init(nn.Linear(hidden_sizes[-1], 1), 1.0)

    def forward(self, obs: Tensor) -> Tensor:
        return self.head(self.trunk(obs)).squeeze(-1)  # [B]


# == 3. Storage ============================================================================================
class RunningMeanStd:
    """Mean and variance of everything seen so far, merged batch by batch (Chan et al. 1979, as baselines'
    VecNormalize). Kept in float64 numpy for speed on the per-step path; state_dict() gives tensors."""

    def __init__(self, shape: tuple[int, ...]):
        self.mean, self.var, self.count = np.zeros(shape), np.ones(shape), 1e-4  # baselines' count: the first batch dominates

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
        return {k: torch.as_tensor(np.asarray(getattr(self, k), dtype=np.float64)) for k in ("mean", "var", "count")}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var = (state[k].double().cpu().numpy().copy() for k in ("mean", "var"))
        self.count = float(state["count"])


class RewardScaler:
    """r / std(G) with G_t = gamma G_{t-1} + r_t the discounted return of each env so far, reset at episode
    ends, then clipped (baselines' VecNormalize)."""

    def __init__(self, num_envs: int, gamma: float, clip: float):
        self.rms, self.gamma, self.clip, self.returns = RunningMeanStd(()), gamma, clip, np.zeros(num_envs)

    def __call__(self, rewards: np.ndarray, ended: np.ndarray) -> np.ndarray:
        self.returns = self.returns * self.gamma + rewards
        self.rms.update(self.returns)
        self.returns[ended] = 0.0
        return np.clip(rewards / np.sqrt(self.rms.var + 1e-8), -self.clip, self.clip).astype(np.float32)


class Rollout(NamedTuple):
    obs: Tensor  # [T, N, O] normalised observations
    actions: Tensor  # [T, N, A] (float) or [T, N] (long)
    log_probs: Tensor  # [T, N] log pi_old(a|s)
    rewards: Tensor  # [T, N] scaled rewards, + gamma V(final obs) at truncations
    dones: Tensor  # [T, N] 1.0 where the episode ended after this step (either way)
    values: Tensor  # [T, N] V_old(s)


# == 4. Environment ========================================================================================
MJ_STATE = mujoco.mjtState.mjSTATE_INTEGRATION  # all mj_step reads: qpos, qvel, act, ctrl, the solver warmstart, ...
# Body positions that Ant-v5 (xpos) and Humanoid-v5 (xipos, its mass centre) read before stepping: after an env step they
# describe the state at the start of its last substep (mj_step computes them, then integrates), which no forward pass from
# the saved state gives back, so a saved state carries them.
CARRIED = ("xpos", "xipos")
MAX_DRAWN = 10_000  # the most model numbers a saved state carries (quadruped-escape's 201 x 201 terrain is refused)


def mujoco_of(env: gym.Env) -> tuple[mujoco.MjModel, mujoco.MjData] | None:
    """The MjModel and MjData of a (wrapped) gymnasium MuJoCo env or control suite task (shimmy), else None."""
    env = env.unwrapped
    if isinstance(env, MujocoEnv):
        return env.model, env.data
    if type(env).__module__ == "shimmy.dm_control_compatibility" and type(env._env).__module__ == "dm_control.rl.control":
        return env._env.physics.model.ptr, env._env.physics.data.ptr
    return None


def drawn_model_fields(env_id: str) -> list[str]:
    """The MjModel arrays that an env draws at reset (a suite task's target) or when it is built (the suite's lqr): those
    that differ across seeded resets or between two envs. A saved state carries them, at most MAX_DRAWN numbers."""
    envs, snapshots = (make_env(env_id), make_env(env_id)), []
    for seed in range(4):
        for env in envs:
            env.reset(seed=seed)
            model = mujoco_of(env)[0]
            snapshots.append({name: np.array(x) for name in dir(model) if isinstance(x := getattr(model, name), np.ndarray)})
    for env in envs:
        env.close()
    fields = [name for name, x in snapshots[0].items() if any(not np.array_equal(s[name], x) for s in snapshots[1:])]
    if (size := sum(snapshots[0][name].size for name in fields)) > MAX_DRAWN:
        raise UsageError(
            f"{env_id} draws {size:,} model numbers ({', '.join(fields)}) per episode: too many to save per state"
        )
    return fields


class Simulator:
    """Saves, restores and steps the simulator below any time limit, for the vine [TRPO Sec. 5.2]: a gymnasium MuJoCo
    env, a DeepMind Control Suite task or a classic-control env's `state`. All step deterministically (randomness is
    drawn at reset; Acrobot's torque noise is off by default), so branches share the policy noise only. A state restored
    in another env replays the observations, rewards and terminations bit-exactly on CartPole-v1, every gymnasium MuJoCo
    v5 env and the suite tasks tested. `time_limit`: the steps of an episode (the spec's or the suite's)."""

    def __init__(self, env: gym.Env, env_id: str):
        self.env = env.unwrapped  # below TimeLimit: restoring a state must not count steps
        self.suite = getattr(self.env, "_env", None)  # dm_control's control.Environment, under shimmy's env
        self.model, self.data = mujoco_of(env) or (None, None)
        self.mujoco = self.model is not None
        if not self.mujoco and not type(self.env).__module__.startswith("gymnasium.envs.classic_control"):
            raise UsageError(f"--estimator vine restores simulator states: MuJoCo and classic-control envs only, not {env_id}")
        self.model_fields = drawn_model_fields(env_id) if self.mujoco else []
        if not self.mujoco and getattr(self.env, "state", None) is None:  # created by the first reset
            self.env.reset(seed=0)
        self.size = len(self.get_state())
        space = self.env.observation_space  # the suite's Dict, flattened as make_env does
        self.flatten = functools.partial(gym.spaces.flatten, space) if isinstance(space, gym.spaces.Dict) else lambda x: x
        self.obs_dim = gym.spaces.flatdim(space)
        limits = (env.spec.max_episode_steps, getattr(self.suite, "_step_limit", None), np.iinfo(np.int64).max)
        self.time_limit = int(min(limit for limit in limits if limit))

    def fields(self) -> list[np.ndarray]:
        """The arrays saved after MJ_STATE (views: writing them writes the simulator)."""
        return [getattr(self.data, f) for f in CARRIED] + [getattr(self.model, f) for f in self.model_fields]

    def get_state(self) -> np.ndarray:
        if not self.mujoco:
            return np.array(self.env.state, dtype=np.float64)
        state = np.empty(mujoco.mj_stateSize(self.model, MJ_STATE))
        mujoco.mj_getState(self.model, self.data, state, MJ_STATE)
        return np.concatenate([state, *(x.ravel() for x in self.fields())])

    def set_state(self, state: np.ndarray) -> None:
        if not self.mujoco:
            self.env.state = state.copy()
            if hasattr(self.env, "steps_beyond_terminated"):  # CartPole's post-termination count
                self.env.steps_beyond_terminated = None
            return
        fields = self.fields()
        parts = np.split(state, np.cumsum([mujoco.mj_stateSize(self.model, MJ_STATE), *(x.size for x in fields)])[:-1])
        for x, part in zip(fields, parts[1:]):
            x.flat[:] = part
        mujoco.mj_setState(self.model, self.data, parts[0], MJ_STATE)
        if self.suite:  # dm_control's step starts with mj_step2 on what mj_step1 derived (physics.step ends with mj_step1)
            mujoco.mj_step1(self.model, self.data)
            self.suite._step_count, self.suite._reset_next_step = 0, False  # the branch horizons apply the time limit

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """The observation (flat), reward and termination of one step."""
        obs, reward, terminated, _, _ = self.env.step(action)
        return self.flatten(obs), float(reward), bool(terminated)


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


def make_variant_env(env_id: str, mass_scale: float, length_scale: float) -> gym.Env:
    """An env with perturbed physics [DPI Sec. 6.3: pole mass and length], as dpi_ilqr.py's. InvertedPendulum-v5: the pole
    `length_scale` times as long (and heavy: masses come from geom volumes), then `mass_scale` times as heavy; other
    gymnasium MuJoCo envs: every body's mass and inertia times `mass_scale`."""
    if env_id != "InvertedPendulum-v5":
        env = make_env(env_id)
        if not isinstance(env.unwrapped, MujocoEnv):
            raise UsageError(f"--robust scales the masses of a gymnasium MuJoCo model; {env_id} has none")
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
    generator; the test variants first, so a seed gives one test set for any number of training variants (as dpi_ilqr.py)."""
    rng = np.random.default_rng(args.seed)
    params = []
    for _ in range(args.robust_test_variants + args.robust_train_variants):
        mass, length = rng.uniform(*args.robust_mass_range), rng.uniform(*args.robust_length_range)
        params.append((float(mass), float(length) if args.env == "InvertedPendulum-v5" else 1.0))
    return params[args.robust_test_variants :], params[: args.robust_test_variants]


def make_variant_vec_env(env_id: str, params: list[tuple[float, float]], num_envs: int) -> gym.vector.VectorEnv:
    """make_vec_env's training envs, `num_envs` copies of each variant in `params`, in that order."""
    makers = [functools.partial(make_variant_env, env_id, *p) for p in params for _ in range(num_envs)]
    envs = gym.vector.SyncVectorEnv(makers, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


# == 5. Algorithm ==========================================================================================
CG_RESIDUAL_TOL = 1e-10  # stop CG once |r|^2 is below this ([SB3C]; modular_rl)
STEP_EPS = 1e-12  # guards beta = sqrt(2 delta / s^T A s) against s^T A s = 0


def gaussian_log_prob(actions: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(a; mean, diag(exp(log_std)^2)) summed over action dimensions: [B, A] -> [B]."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)


def gaussian_entropy(log_std: Tensor) -> Tensor:
    """Entropy of a diagonal Gaussian, sum_i (log_std_i + (1 + log 2 pi) / 2): [B, A] -> [B]."""
    return (log_std + 0.5 * (1.0 + np.log(2 * np.pi))).sum(-1)


def categorical_log_prob(logits: Tensor, actions: Tensor) -> Tensor:
    """log softmax(logits)[a]: [B, A], [B] -> [B]."""
    return logits.log_softmax(-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def categorical_entropy(logits: Tensor) -> Tensor:
    """-sum_a p(a) log p(a): [B, A] -> [B]."""
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def gae(rewards: Tensor, values: Tensor, dones: Tensor, last_value: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation, cut at episode ends [GAE eq. 16]:
        delta_t = r_t + gamma (1 - done_t) V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma lambda (1 - done_t) A_{t+1},
    returns R_t = A_t + V(s_t). done_t: the episode ended after step t, terminated or truncated (a truncated step's
    reward already holds gamma V(final obs)). Shapes: rewards, values, dones [T, N]; last_value [N] = V(s_T); A, R [T, N]."""
    not_done = 1.0 - dones
    next_values = torch.cat([values[1:], last_value.unsqueeze(0)])  # V(s_{t+1})
    deltas = rewards + gamma * not_done * next_values - values
    advantages, next_advantage = torch.zeros_like(rewards), torch.zeros_like(last_value)
    discounts = gamma * lam * not_done
    for t in reversed(range(rewards.shape[0])):
        advantages[t] = next_advantage = deltas[t] + discounts[t] * next_advantage
    return advantages, advantages + values


def vine_surrogate(log_probs: Tensor, log_q: Tensor, q_values: Tensor) -> Tensor:
    """L(theta) = mean_r sum_k w_rk Q_rk / sum_k w_rk, w_rk = pi_theta(a_rk|s_r) / q(a_rk|s_r) [TRPO eq. 16], the
    self-normalised estimate as softmax_k(log w_rk) (exact, no overflow). q = pi_old (Box actions): eq. 16 as printed;
    each Discrete action once, q uniform: eq. 15, sum_a pi_theta(a|s_r) Q(s_r, a). Shapes: all [R, K]; returns a scalar."""
    return (torch.softmax(log_probs - log_q, dim=-1) * q_values).sum(-1).mean()


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


def line_search(
    actor: nn.Module,
    evaluate_step: Callable[[], tuple[Tensor, Tensor]],
    theta_old: Tensor,
    full_step: Tensor,
    surrogate_old: Tensor,
    delta: float,
    backtrack_coef: float,
    backtrack_iters: int,
) -> float:
    """theta = theta_old + c^j full_step for the first j < backtrack_iters with L(theta) > L(theta_old) and mean KL <=
    delta, else theta_old restored exactly; returns c^j, or 0.0 if rejected. [TRPO App. C] the line search on
    L(theta) - X[KL <= delta] from the maximal step down; evaluate_step() gives (L, mean KL) at the current parameters."""
    params = list(actor.parameters())
    for fraction in (backtrack_coef**j for j in range(backtrack_iters)):
        set_parameters(params, theta_old + fraction * full_step)
        surrogate_new, kl = evaluate_step()
        if bool(kl <= delta) and bool(surrogate_new > surrogate_old):
            return fraction
    set_parameters(params, theta_old)
    return 0.0


@torch.no_grad()
def set_parameters(params: list[Tensor], theta: Tensor) -> None:
    """Copy theta [P] into params in place (vector_to_parameters' views into theta can change matmul rounding)."""
    for p, chunk in zip(params, theta.split([p.numel() for p in params])):
        p.copy_(chunk.view_as(p))


@torch.no_grad()
def vine_actions(actor: Actor, obs: Tensor, num_actions: int) -> tuple[Tensor, Tensor]:
    """K actions a_rk at each rollout-set state and log q(a_rk|s_r) [TRPO Sec. 5.2]: K samples of q = pi_old (Box), or K
    distinct actions, all n if K >= n, with q uniform (Discrete; eq. 15). obs [R, O] -> [R, K, A] or [R, K], and [R, K]."""
    if actor.discrete:
        n = actor.head.out_features
        k = min(num_actions, n)
        actions = torch.rand(len(obs), n, device=obs.device).argsort(-1)[:, :k]  # [R, K]
        return actions, torch.full((len(obs), k), -float(np.log(n)), device=obs.device)
    obs_k = obs.unsqueeze(1).expand(-1, num_actions, -1)  # [R, K, O]
    actions = actor.sample_with_noise(obs_k, actor.noise((len(obs), num_actions), obs.device))
    return actions, actor.log_prob_entropy(obs_k, actions)[0]


def vine_rollouts(
    sim: Simulator, states: np.ndarray, first: np.ndarray, act: Callable, noise: Tensor, horizons: np.ndarray, gamma: float
) -> tuple[np.ndarray, int]:
    """Q_rk = sum_{t < L_r} gamma^t r_t of the branch that restores state s_r, takes a_rk, then follows the policy:
    [TRPO Sec. 5.2] with common random numbers, branch (r, k) acts at step t >= 1 with noise[r, t - 1] for every k. All
    branches advance in lockstep, one act(obs [R K, O], noise [R K, ...]) -> env actions per step; one stops when its
    episode terminates or after L_r = min(L, horizon_r) steps. Shapes: states [R, Z]; first [R, K, ...] (env actions
    a_rk); noise [R, L - 1, ...]; horizons [R] (steps left before the time limit). Returns Q [R, K] and the steps taken."""
    num_states, num_actions = first.shape[:2]
    branch_states, actions = np.repeat(states, num_actions, axis=0), first.reshape(-1, *first.shape[2:])  # [R K, ...]
    branch_noise = noise.repeat_interleave(num_actions, dim=0)  # [R K, L - 1, ...]: CRN
    limits = np.repeat(np.minimum(horizons, noise.shape[1] + 1), num_actions)  # [R K]
    q_values, alive, sim_steps = np.zeros(len(actions)), np.ones(len(actions), dtype=bool), 0
    obs = np.zeros((len(actions), sim.obs_dim))  # [R K, O]
    for t in range(noise.shape[1] + 1):
        if t > 0:
            actions = act(obs, branch_noise[:, t - 1])
        for i in np.flatnonzero(alive):
            sim.set_state(branch_states[i])
            obs[i], reward, terminated = sim.step(actions[i])
            branch_states[i] = sim.get_state()
            q_values[i] += gamma**t * reward
            alive[i] = not terminated and t + 1 < limits[i]
            sim_steps += 1
        if not alive.any():
            break
    return q_values.reshape(num_states, num_actions), sim_steps


# == 6. Updates ============================================================================================
def single_path_objective(actor: Actor, batch: dict[str, Tensor]) -> Tensor:
    """L(theta) = mean_t rho_t A_t, rho = pi_theta / pi_old [TRPO eq. 14, Sec. 5.1]; A for Q changes L by a constant only."""
    log_probs, _ = actor.log_prob_entropy(batch["obs"], batch["actions"])
    return (torch.exp(log_probs - batch["log_probs"]) * batch["advantages"]).mean()


def vine_objective(actor: Actor, batch: dict[str, Tensor]) -> Tensor:
    """[TRPO eq. 15-16] on the rollout set: states [R, O], actions, log q and Q, [R, K]."""
    obs = batch["obs"].unsqueeze(1).expand(-1, batch["q_values"].shape[1], -1)  # [R, K, O]
    return vine_surrogate(actor.log_prob_entropy(obs, batch["actions"])[0], batch["log_q"], batch["q_values"])


def update_policy(
    actor: Actor,
    objective: Callable[[], Tensor],
    obs: Tensor,
    delta: float,
    cg_iters: int,
    cg_damping: float,
    fisher_fraction: float,
    backtrack_coef: float,
    backtrack_iters: int,
) -> dict[str, Tensor]:
    """One trust-region step [TRPO Sec. 6, App. C]: max objective() s.t. mean KL(pi_old || pi_theta) <= delta on obs [B, O]."""
    params = list(actor.parameters())
    theta_old = torch.cat([p.detach().reshape(-1) for p in params])
    dist_old = actor.dist_params(obs).detach()  # [B, D], pi_old in every KL below
    surrogate_old = objective()
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(surrogate_old, params)])
    # [TRPO App. C.1] the Fisher on a random fraction of the states
    idx = torch.randperm(len(obs), device=obs.device)[: max(1, round(fisher_fraction * len(obs)))]
    kl_fisher = actor.kl(dist_old[idx], actor.dist_params(obs[idx])).mean()
    kl_grad = torch.cat([x.reshape(-1) for x in torch.autograd.grad(kl_fisher, params, create_graph=True)])
    fvp = functools.partial(fisher_vector_product, kl_grad, params, damping=cg_damping)
    step_dir = conjugate_gradient(fvp, g, cg_iters)  # s ~ A^-1 g
    full_step = torch.sqrt(2 * delta / (step_dir @ fvp(step_dir)).clamp_min(STEP_EPS)) * step_dir  # beta s [TRPO App. C]
    evaluate_step = torch.no_grad()(lambda: (objective(), actor.kl(dist_old, actor.dist_params(obs)).mean()))  # (L, KL)
    surrogate_old = surrogate_old.detach()
    fraction = line_search(actor, evaluate_step, theta_old, full_step, surrogate_old, delta, backtrack_coef, backtrack_iters)
    surrogate_new, kl = evaluate_step()
    entropy = categorical_entropy(dist_old) if actor.discrete else gaussian_entropy(dist_old.chunk(2, dim=-1)[1])
    metrics = {"losses/policy": -surrogate_new, "stats/surrogate_improvement": surrogate_new - surrogate_old}
    metrics |= {"stats/kl": kl, "stats/entropy": entropy.mean(), "stats/step_fraction": torch.tensor(fraction)}
    return metrics | {"stats/line_search_rejected": torch.tensor(float(fraction == 0.0)), "stats/grad_norm": g.norm()}


def update_value(
    value: Value, value_opt: Optimizer, obs: Tensor, returns: Tensor, epochs: int, num_minibatches: int
) -> dict[str, Tensor]:
    """Fit V to the returns R = A + V_old: `epochs` passes of minibatch Adam steps on (V(s) - R)^2 / 2 ([SB3C])."""
    size, total = len(obs), torch.zeros((), device=obs.device)
    minibatch = size // num_minibatches  # the remainder of each epoch's permutation is left out
    for _ in range(epochs):
        for idx in torch.randperm(size, device=obs.device)[: minibatch * num_minibatches].view(num_minibatches, minibatch):
            loss = 0.5 * (value(obs[idx]) - returns[idx]).pow(2).mean()
            value_opt.zero_grad(set_to_none=True)
            loss.backward()
            value_opt.step()
            total = total + loss.detach()
    return {"losses/value": total / (epochs * num_minibatches)}


# == 7. Training ===========================================================================================
def evaluation_scores(act: Callable, env: gym.Env, args: Args, device: torch.device) -> tuple[float, float]:
    """Mean undiscounted return of the evaluation episodes (the plumbing's: seeds seed + 10000 + i) and of their first
    --eval-horizon steps."""
    first_steps = FirstStepsReturn(env, args.eval_horizon)
    returns = evaluate(act, first_steps, args.eval_episodes, args.seed + 10_000, device)
    return float(np.mean(returns)), float(np.mean(first_steps.returns))


def train(args: Args) -> dict:
    """Train TRPO; returns the final metrics, counters and the run directory."""
    device = setup(args)  # seeds, torch threads, device
    # -- environments; the vine saves each training env's state at every step and branches on a copy of its own
    # --robust [DPI Sec. 6.3]: --num-envs copies of each training variant, one rollout; the variants apart to evaluate on
    train_params, test_params = robust_variants(args) if args.robust else ([], [])
    envs = (
        make_variant_vec_env(args.env, train_params, args.num_envs) if args.robust else make_vec_env(args.env, args.num_envs)
    )
    train_variants, test_variants = (
        [make_variant_env(args.env, *p) for p in params] for params in (train_params, test_params)
    )
    num_envs = envs.num_envs  # --num-envs, times the training variants with --robust
    obs_dim, action_space, vine = envs.single_observation_space.shape[0], envs.single_action_space, args.estimator == "vine"
    trunk_sims = [Simulator(env, args.env) for env in envs.unwrapped.envs] if vine else []
    branch_sim = Simulator(make_env(args.env), args.env) if vine else None
    # -- networks, optimizer and normalisers (the vine's Q needs no V)
    nets = (args.hidden_sizes, args.activation, args.layer_norm)
    actor, value = Actor(obs_dim, action_space, *nets).to(device), None if vine else Value(obs_dim, *nets).to(device)
    value_opt = None if vine else torch.optim.Adam(value.parameters(), lr=args.value_lr, fused=True)
    obs_rms, reward_scaler = RunningMeanStd((obs_dim,)), RewardScaler(num_envs, args.gamma, args.reward_clip)
    region = (args.delta, args.cg_iters, args.cg_damping, args.fisher_fraction, args.backtrack_coef, args.backtrack_iters)
    # the vine's branches follow pi with given noise, clipped for the env
    branch_act = lambda obs, noise: actor.env_action(actor.sample_with_noise(observe(obs, update=False), noise)).cpu().numpy()

    def observe(raw: np.ndarray, update: bool = True) -> Tensor:
        """Observations [n, O] normalised, after merging them into the statistics if `update`."""
        if args.norm_obs:
            if update:
                obs_rms.update(raw)
            raw = obs_rms.normalize(raw, args.obs_clip)
        return torch.as_tensor(raw, dtype=torch.float32, device=device)

    # -- storage: the rollout; the vine's trunk, the simulator states [T, N, Z] and their episodes' steps so far [T, N]
    shape = (args.num_steps, num_envs)  # [T, N]
    zeros = lambda *size, dtype=torch.float32: torch.zeros(*shape, *size, dtype=dtype, device=device)
    stored_actions = zeros(dtype=torch.long) if actor.discrete else zeros(*action_space.shape)
    rollout = Rollout(zeros(obs_dim), stored_actions, log_probs=zeros(), rewards=zeros(), dones=zeros(), values=zeros())
    trunk_states = np.zeros((args.num_steps, num_envs, trunk_sims[0].size if vine else 0))
    trunk_elapsed = np.zeros((args.num_steps, num_envs), dtype=np.int64)
    sim_steps = torch.zeros((), dtype=torch.int64)  # trunk and branch steps (a tensor, so that resume.pt keeps it)
    # -- run: directory, logging, evaluation, saving, resume (below the fence)
    model = dict(actor=actor, value=value, obs_rms=obs_rms if args.norm_obs else None)
    train_state = dict(value_opt=value_opt, reward_rms=reward_scaler.rms, sim_steps=sim_steps)
    act = lambda obs: actor.deterministic(observe(obs.cpu().numpy(), update=False))

    def eval_fn() -> dict[str, float]:
        """--robust's and --eval-horizon's scores: on the test variants with --robust, else on the plumbing's env (its
        start opens it); with --robust also charts/eval_return_train, on copies of the training variants (mid-episode)."""
        mean_scores = lambda group: np.mean([evaluation_scores(act, env, args, device) for env in group], axis=0)
        full, horizon = mean_scores(test_variants or [run.eval_env])
        scores = {"charts/eval_return": float(full)}
        scores |= {"charts/eval_return_horizon": float(horizon)} if args.eval_horizon else {}
        scores |= {"charts/eval_return_train": float(mean_scores(train_variants)[0])} if args.robust else {}
        return scores

    custom_eval = args.robust or args.eval_horizon > 0
    run = Run(args, envs, model, train_state, act=act, eval_fn=eval_fn if custom_eval else None)
    if args.eval_only:
        return run.evaluate_only()
    global_step, num_updates = run.start()
    # a resumed run starts fresh episodes; the statistics grow with the steps taken only, so a resume is exact
    obs = observe(envs.reset(seed=args.seed + global_step)[0], update=False)
    while global_step < args.total_steps:
        with torch.no_grad():  # collect a rollout
            for t in range(args.num_steps):
                # act
                if vine:  # the trunk: every state it visits can be restored to branch from
                    trunk_states[t], trunk_elapsed[t] = [sim.get_state() for sim in trunk_sims], envs.episode_lengths
                actions, log_probs = actor.sample(obs)
                values = rollout.values[t] if vine else value(obs)
                # step
                next_obs, rewards, terminated, truncated, infos = envs.step(actor.env_action(actions).cpu().numpy())
                global_step += num_envs
                run.add_episodes(global_step, infos)
                ended = terminated | truncated
                rewards = reward_scaler(rewards, ended) if args.norm_reward else rewards
                rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
                # a time limit is not an MDP end: bootstrap from the true last observation
                cut = [] if vine else np.flatnonzero(truncated & ~terminated)
                if len(cut):
                    rewards[cut] += args.gamma * value(observe(np.stack([infos["final_obs"][i] for i in cut]), update=False))
                # store
                rollout.obs[t], rollout.actions[t], rollout.log_probs[t], rollout.values[t] = obs, actions, log_probs, values
                rollout.rewards[t], rollout.dones[t] = rewards, torch.as_tensor(ended, dtype=torch.float32, device=device)
                obs = observe(next_obs)
        sim_steps += args.num_steps * num_envs
        # update: one trust-region step [TRPO Sec. 6] on the surrogate of either estimator
        flat = Rollout(*(x.flatten(0, 1) for x in rollout))  # [T N, ...]
        if vine:  # [TRPO Sec. 5.2] the rollout set: R distinct trunk states, uniformly
            idx = torch.randperm(len(flat.obs))[: args.vine_states].numpy()
            obs_set = flat.obs[idx]  # [R, O], normalised as the trunk saw them
            actions, log_q = vine_actions(actor, obs_set, args.vine_actions)
            noise = actor.noise((len(idx), args.vine_rollout_length - 1), device)  # common random numbers
            states = trunk_states.reshape(len(flat.obs), -1)[idx]
            horizons = branch_sim.time_limit - trunk_elapsed.flatten()[idx]  # steps left before the episode's time limit
            first = actor.env_action(actions).cpu().numpy()  # [R, K, ...]
            with torch.no_grad():
                q_values, branch_steps = vine_rollouts(branch_sim, states, first, branch_act, noise, horizons, args.gamma)
            sim_steps += branch_steps
            q_values = torch.as_tensor(q_values, dtype=torch.float32, device=device)
            batch = dict(obs=obs_set, actions=actions, log_q=log_q, q_values=q_values)
            metrics = update_policy(actor, functools.partial(vine_objective, actor, batch), flat.obs, *region)
            metrics["stats/q_mean"] = q_values.mean()
        else:
            last_value = value(obs).detach()  # V(s_T)
            advantages, returns = gae(rollout.rewards, rollout.values, rollout.dones, last_value, args.gamma, args.gae_lambda)
            advantages, returns = advantages.flatten(), returns.flatten()
            if args.norm_adv:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            batch = dict(obs=flat.obs, actions=flat.actions, log_probs=flat.log_probs, advantages=advantages)
            metrics = update_policy(actor, functools.partial(single_path_objective, actor, batch), flat.obs, *region)
            metrics |= update_value(value, value_opt, flat.obs, returns, args.value_epochs, args.value_minibatches)
            metrics["stats/explained_variance"] = 1 - (returns - flat.values).var() / returns.var()
        if float(metrics["stats/step_fraction"]) == 0.0:  # [TRPO App. C]: theta_old is kept
            print(f"step {global_step} | line search accepted no step: policy unchanged", flush=True)
        num_updates += 1
        run.add_metrics(metrics)
        run.writer.add_scalar("charts/sim_steps", int(sim_steps), global_step)
        run.writer.add_scalar("charts/iteration", num_updates, global_step)  # [TRPO] Fig. 4's x axis
        run.step(global_step, num_updates)  # log, evaluate and save as scheduled; stop on a signal
    return dict(run.finish(global_step, num_updates), sim_steps=int(sim_steps))


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
