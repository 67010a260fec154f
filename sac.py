"""Soft Actor-Critic (SAC) for continuous control, in one file.

References:
    [SAC] Haarnoja, Zhou, Hartikainen, Tucker, Ha, Tan, Kumar, Zhu, Gupta, Abbeel, Levine 2018,
        "Soft Actor-Critic Algorithms and Applications", arXiv:1812.05905 (not in shared/papers;
        cited by section and objective name: J_Q, J_pi, J(alpha)).
    [TreePI] Springenberg, Heess et al. 2020, "Local Search for Policy Iteration in Continuous
        Control": Table 2 lists SAC as a baseline (the flags that select it are below).
    [CleanRL] Huang et al. 2022, sac_continuous_action.py: argument names, the delayed policy
        update (--policy-frequency) and the log-std squashing.

Algorithm (one environment step; the function that does each line in brackets):
    1. Act a ~ pi(.|s) (uniform random before `learning_starts`) and store (s, a, r, s',
       terminated) with s' the true last observation of an ended episode      [ReplayBuffer]
    2. Soft target y = r + gamma (1 - terminated) (min_e Qbar_e(s', a') - alpha log pi(a'|s')),
       a' ~ pi(.|s')                                                            [soft_q_target]
    3. Critic step on J_Q = sum_e E[(Q_e(s, a) - y)^2] / 2, both critics in one pass [update_critic]
    4. Actor step on J_pi = E[alpha log pi(a~|s) - min_e Q_e(s, a~)], a~ the tanh-squashed
       reparameterised sample                                       [squashed_gaussian, update_actor]
    5. Temperature step on J(alpha) = E[-alpha (log pi(a~|s) + Hbar)], Hbar = -|A|  [update_actor]
    6. Targets Qbar <- tau Q + (1 - tau) Qbar                                    [soft_update]

Shapes: B batch, O observation size, A action size, E number of critics (2).

Usage:
    python sac.py --env HalfCheetah-v5
    python sac.py --env Hopper-v5 --total-steps 300000 --seed 2
    python sac.py --env HalfCheetah-v5 --checkpoint runs/<run>/model.pt --eval-only
    python sac.py --resume runs/<run>/resume.pt
    [TreePI] Table 2 baseline: --hidden-sizes 256 256 256 --layer-norm --activation elu
        --target-entropy-scale 0.5 --batch-size 512 --tau 1 --target-network-frequency 200
    [CleanRL] defaults: --q-lr 1e-3 --alpha-lr 1e-3 --policy-frequency 2
    python sac.py --bf16        # bfloat16 matrix products (CPUs with AVX512-BF16 or AMX, GPUs)

Deviations from the paper:
    - The log standard deviation is squashed into [LOG_STD_MIN, LOG_STD_MAX] by tanh, as in
      CleanRL and Spinning Up; the authors' code clips it to [-20, 2].
    - `--policy-frequency k` (TD3's delayed update, CleanRL's name) does k actor steps every k
      critic steps; the default 1 is the paper's one actor step per critic step.
    - With several envs each vector step adds num_envs transitions and does num_envs gradient
      steps, so the paper's one update per environment step holds for any --num-envs.
"""

# == 1. Imports ========================================================================
import dataclasses
import difflib
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch import nn
from torch.utils.tensorboard import SummaryWriter

ALGO = "sac"
CHECKPOINT_FORMAT = 1


# == 2. Arguments ======================================================================
class UsageError(Exception):
    """Bad user input: `main` prints it as one line on stderr and returns 2."""


@dataclass
class Args:
    # -- shared: identical in every file ---------------------------------------------
    env: str = "HalfCheetah-v5"
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
    # Networks [SAC Sec. 7: two hidden layers of 256 ReLU units]
    hidden_sizes: tuple[int, ...] = (256, 256)
    """Hidden layer sizes of the actor and of each critic."""
    activation: Literal["relu", "elu", "tanh"] = "relu"
    """Hidden activation ([TreePI] Table 2 uses elu)."""
    layer_norm: bool = False
    """LayerNorm after the first hidden layer (the 'LN' of [TreePI] Table 2)."""
    bf16: bool = False
    """Matrix products of the updates in bfloat16 (torch.autocast), for speed on CPUs with
    AVX512-BF16 or AMX and on GPUs; weights, Q-values, log-probabilities, losses and Adam stay
    float32. Off by default: the paper's and CleanRL's arithmetic is float32."""
    # Replay [SAC Sec. 7]
    buffer_size: int = 1_000_000
    """Replay buffer capacity in transitions."""
    batch_size: int = 256
    """Transitions per gradient step."""
    learning_starts: int = 5_000
    """Env steps of uniform random actions before learning starts (CleanRL's value)."""
    # Soft Q-learning [SAC Sec. 4-5]
    gamma: float = 0.99
    """Discount factor gamma."""
    tau: float = 0.005
    """Target smoothing coefficient tau (1: hard copy)."""
    target_network_frequency: int = 1
    """Gradient steps between target updates ([TreePI] Table 2: 200 with tau 1)."""
    q_lr: float = 3e-4
    """Adam learning rate of the critics (paper: 3e-4; CleanRL: 1e-3)."""
    policy_lr: float = 3e-4
    """Adam learning rate of the actor."""
    policy_frequency: int = 1
    """Do this many actor steps every this many critic steps (1: the paper; CleanRL: 2)."""
    # Temperature [SAC Sec. 5]
    autotune: bool = True
    """Learn the temperature alpha towards the target entropy (starting from alpha = 1)."""
    alpha: float = 0.2
    """Fixed temperature alpha, used with --no-autotune."""
    alpha_lr: float = 3e-4
    """Adam learning rate of log alpha (paper: 3e-4; CleanRL: 1e-3)."""
    target_entropy_scale: float = 1.0
    """Target entropy Hbar = -scale * |A| (paper: 1; [TreePI] Table 2: 0.5)."""


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
    if args.buffer_size <= 0 or args.batch_size <= 0:
        raise UsageError("--buffer-size and --batch-size must be positive")
    if args.batch_size > args.buffer_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}")
    if args.learning_starts < 0:
        raise UsageError(f"--learning-starts must be >= 0, got {args.learning_starts}")
    if not 0.0 <= args.gamma <= 1.0:
        raise UsageError(f"--gamma must be in [0, 1], got {args.gamma}")
    if not 0.0 < args.tau <= 1.0:
        raise UsageError(f"--tau must be in (0, 1], got {args.tau}")
    if min(args.q_lr, args.policy_lr, args.alpha_lr) <= 0:
        raise UsageError("learning rates must be positive")
    if args.policy_frequency <= 0 or args.target_network_frequency <= 0:
        raise UsageError("--policy-frequency and --target-network-frequency must be positive")


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
    """SAC needs flat Box observations and a bounded Box action space."""
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise UsageError(f"{env_id} has observation space {obs_space}; this script needs a flat Box")
    if not isinstance(action_space, gym.spaces.Box):
        raise UsageError(
            f"{env_id} has a {type(action_space).__name__} action space; SAC needs a continuous "
            "(Box) one (ppo.py handles discrete actions)"
        )
    if not (np.isfinite(action_space.low).all() and np.isfinite(action_space.high).all()):
        raise UsageError(f"{env_id} has unbounded actions; SAC's tanh policy needs finite bounds")


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


# == 4. Networks =======================================================================
ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh}
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # log-std range (CleanRL / Spinning Up; paper code: -20, 2)


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


class Actor(nn.Module):
    """Tanh-squashed diagonal Gaussian policy pi(a|s) [SAC App. C]."""

    def __init__(self, obs_dim: int, action_space: gym.spaces.Box, args: Args):
        super().__init__()
        action_dim = int(np.prod(action_space.shape))
        self.trunk = mlp(obs_dim, args.hidden_sizes, args.activation, args.layer_norm)
        self.head = nn.Linear(args.hidden_sizes[-1], 2 * action_dim)  # mean and log std
        low = torch.as_tensor(action_space.low, dtype=torch.float32)
        high = torch.as_tensor(action_space.high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 even under --bf16, so that the log-probability is computed in float32
        mean, log_std = self.head(self.trunk(obs)).float().chunk(2, dim=-1)  # [B, A] each
        # tanh keeps log std in [LOG_STD_MIN, LOG_STD_MAX] with a gradient everywhere (CleanRL)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        return mean, log_std

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action in the env's bounds and its log-probability [B]."""
        mean, log_std = self(obs)
        noise = torch.randn_like(mean)
        return squashed_gaussian(mean, log_std, noise, self.action_scale, self.action_bias)

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """The squashed mean, used for evaluation."""
        mean, _ = self(obs)
        return torch.tanh(mean) * self.action_scale + self.action_bias


class Critic(nn.Module):
    """E soft Q-functions Q_e(s, a) with stacked weights [E, in, out], evaluated in one batched
    pass (one matmul per layer for all critics instead of one per critic)."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args, num_critics: int = 2):
        super().__init__()
        sizes = [obs_dim + action_dim, *args.hidden_sizes, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = fan_in**-0.5  # nn.Linear's default initialisation, per critic
            self.weights.append(nn.Parameter(torch.empty(num_critics, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_critics, 1, fan_out).uniform_(-bound, bound)))
        width = args.hidden_sizes[0]
        self.norm_weight = nn.Parameter(torch.ones(num_critics, 1, width)) if args.layer_norm else None
        self.norm_bias = nn.Parameter(torch.zeros(num_critics, 1, width)) if args.layer_norm else None
        self.act = ACTIVATIONS[args.activation]()

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, actions], dim=-1)  # [B, O + A]
        x = torch.baddbmm(self.biases[0], x.expand(len(self.biases[0]), *x.shape), self.weights[0])
        if self.norm_weight is not None:  # [E, B, H]
            x = F.layer_norm(x, x.shape[-1:]) * self.norm_weight + self.norm_bias
        for w, b in zip(self.weights[1:-1], self.biases[1:-1]):
            x = torch.baddbmm(b, self.act(x), w)  # [E, B, H]
        # The output layer as multiply-and-sum: a bmm with one output column has a slow
        # backward on the CPU (an outer product done as a matmul of inner size 1). Its float32
        # weights make Q float32 under --bf16 too.
        return (self.act(x) * self.weights[-1].transpose(1, 2)).sum(-1) + self.biases[-1].squeeze(-1)  # [E, B]


# == 5. Storage ========================================================================
class Batch(NamedTuple):
    obs: torch.Tensor  # [B, O]
    actions: torch.Tensor  # [B, A]
    rewards: torch.Tensor  # [B]
    next_obs: torch.Tensor  # [B, O]
    terminated: torch.Tensor  # [B], 1.0 where the MDP ended (no bootstrap)


class ReplayBuffer:
    """Preallocated ring buffer of transitions. next_obs is stored per row, so a row never
    pairs an observation with the first observation of the next episode."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, device: torch.device):
        self.capacity, self.pos, self.size = capacity, 0, 0
        self.data = Batch(
            obs=torch.zeros(capacity, obs_dim, device=device),
            actions=torch.zeros(capacity, action_dim, device=device),
            rewards=torch.zeros(capacity, device=device),
            next_obs=torch.zeros(capacity, obs_dim, device=device),
            terminated=torch.zeros(capacity, device=device),
        )

    def add(self, **rows: np.ndarray) -> None:
        """Store n transitions given as arrays with leading size n (the fields of Batch)."""
        n, end = len(rows["rewards"]), self.pos + len(rows["rewards"])
        idx = slice(self.pos, end) if end <= self.capacity else torch.arange(self.pos, end) % self.capacity
        for name, column in zip(Batch._fields, self.data):
            column[idx] = torch.as_tensor(rows[name], dtype=torch.float32)
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int) -> Batch:
        """batch_size transitions drawn uniformly with replacement."""
        idx = torch.randint(0, self.size, (batch_size,), device=self.data.rewards.device)
        return Batch(*(column[idx] for column in self.data))

    def state_dict(self) -> dict:
        return {"pos": self.pos, "size": self.size, "data": [c[: self.size] for c in self.data]}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.size = state["pos"], state["size"]
        for column, saved in zip(self.data, state["data"]):
            column[: self.size] = saved.to(column.device)


# == 6. Algorithm ======================================================================
def squashed_gaussian(
    mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Action a = scale * tanh(u) + bias with u = mean + std * noise, and log pi(a|s).

    [SAC App. C] change of variables: log pi(a|s) = log N(u; mean, std)
        - sum_i log(scale_i (1 - tanh(u_i)^2)),
    with log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), exact and stable for large |u|.
    Shapes: mean, log_std, noise [B, A]; scale, bias [A]; returns a [B, A], log pi [B].
    """
    u = mean + log_std.exp() * noise
    log_normal = -0.5 * noise.pow(2) - log_std - 0.5 * np.log(2 * np.pi)
    log_det = torch.log(scale) + 2 * (np.log(2.0) - u - F.softplus(-2 * u))
    return torch.tanh(u) * scale + bias, (log_normal - log_det).sum(-1)


def soft_q_target(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    next_q: torch.Tensor,
    next_log_prob: torch.Tensor,
    alpha: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """y = r + gamma (1 - terminated) (min_e Qbar_e(s', a') - alpha log pi(a'|s')).

    [SAC Sec. 4-5] the soft Bellman backup with the soft value V(s') = E[Q(s', a') - alpha log pi],
    estimated with one a' ~ pi(.|s') and the minimum over the target critics (clipped double Q).
    A truncated episode still bootstraps: only `terminated` masks.
    Shapes: rewards, terminated, next_log_prob [B]; next_q [E, B]; alpha scalar; returns [B].
    """
    next_v = next_q.min(dim=0).values - alpha * next_log_prob
    return rewards + gamma * (1.0 - terminated) * next_v


@torch.no_grad()
def soft_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """Polyak averaging Qbar <- tau Q + (1 - tau) Qbar, in place [SAC Sec. 5]."""
    for t, p in zip(target.parameters(), online.parameters()):
        t.lerp_(p, tau)


# == 7. Updates ========================================================================
def update_critic(
    actor: Actor,
    critic: Critic,
    critic_target: Critic,
    critic_opt: torch.optim.Optimizer,
    batch: Batch,
    alpha: torch.Tensor,
    gamma: float,
) -> dict[str, torch.Tensor]:
    """One Adam step on J_Q for all critics at once."""
    with torch.no_grad():
        next_actions, next_log_prob = actor.sample(batch.next_obs)
        next_q = critic_target(batch.next_obs, next_actions)  # [E, B]
        target = soft_q_target(batch.rewards, batch.terminated, next_q, next_log_prob, alpha, gamma)
    q = critic(batch.obs, batch.actions)  # [E, B]
    loss = 0.5 * (q - target).pow(2).mean(dim=1).sum()  # [SAC J_Q], summed over critics
    critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    critic_opt.step()
    return {"losses/q": loss.detach(), "stats/q_mean": q.detach().mean()}


def update_actor(
    actor: Actor,
    critic: Critic,
    actor_opt: torch.optim.Optimizer,
    log_alpha: torch.Tensor,
    alpha_opt: torch.optim.Optimizer | None,
    obs: torch.Tensor,
    target_entropy: float,
) -> dict[str, torch.Tensor]:
    """One Adam step on J_pi and, when alpha is learned, one on J(alpha), from the same sample."""
    critic.requires_grad_(False)  # the actor loss differentiates Q w.r.t. actions only
    actions, log_prob = actor.sample(obs)
    q = critic(obs, actions).min(dim=0).values  # [B]
    alpha = log_alpha.exp()
    loss = (alpha.detach() * log_prob - q).mean()  # [SAC J_pi]
    critic.requires_grad_(True)
    metrics = {"losses/policy": loss.detach(), "stats/entropy": -log_prob.detach().mean()}
    if alpha_opt is not None:
        alpha_loss = -(alpha * (log_prob.detach() + target_entropy)).mean()  # [SAC J(alpha)]
        loss = loss + alpha_loss  # disjoint parameters: one backward serves both steps
        metrics["losses/alpha"] = alpha_loss.detach()
        alpha_opt.zero_grad(set_to_none=True)
    actor_opt.zero_grad(set_to_none=True)
    loss.backward()
    actor_opt.step()
    if alpha_opt is not None:
        alpha_opt.step()
    metrics["stats/alpha"] = alpha.detach()
    return metrics


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


def make_agent(args: Args, obs_dim: int, action_space: gym.spaces.Box, device: torch.device) -> dict:
    """Networks and the temperature, by the names their state is saved under."""
    action_dim = int(np.prod(action_space.shape))
    critic = Critic(obs_dim, action_dim, args).to(device)
    critic_target = Critic(obs_dim, action_dim, args).to(device)
    critic_target.load_state_dict(critic.state_dict())
    critic_target.requires_grad_(False)
    alpha = 1.0 if args.autotune else args.alpha  # softlearning and CleanRL start at alpha = 1
    log_alpha = torch.tensor(float(np.log(alpha)), device=device, requires_grad=args.autotune)
    actor = Actor(obs_dim, action_space, args).to(device)
    return {"actor": actor, "critic": critic, "critic_target": critic_target, "log_alpha": log_alpha}


def policy_fn(actor: Actor, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """act(obs) -> action with the deterministic (mean) action, for `evaluate`."""

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
        return actor.deterministic(obs_t).cpu().numpy()

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


def evaluate_only(args: Args) -> dict:
    """--eval-only: load the checkpoint's policy and evaluate it."""
    device = torch.device("cuda" if args.cuda else "cpu")
    payload = load_checkpoint(args.checkpoint, args.env, device)
    video_dir = os.path.join(os.path.dirname(args.checkpoint), "videos") if args.capture_video else None
    env = make_eval_env(args.env, video_dir, args.eval_episodes)
    check_spaces(args.env, env.observation_space, env.action_space)
    agent = make_agent(args, env.observation_space.shape[0], env.action_space, device)
    load_agent_state(agent, payload["state"])
    returns = evaluate(policy_fn(agent["actor"], device), env, args.eval_episodes, args.seed + 10_000)
    env.close()
    print(
        f"eval over {len(returns)} episodes: mean {np.mean(returns):.1f} | returns " + " ".join(f"{r:.1f}" for r in returns),
        flush=True,
    )
    return {"eval_return": float(np.mean(returns)), "eval_returns": returns}


def train(args: Args) -> dict:
    """Train SAC; returns the final metrics, counters and the run directory."""
    # -- setup: seeds, device, run directory, writer
    seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda else "cpu")
    resume = load_checkpoint(args.resume, args.env) if args.resume else None
    # -- environments
    envs = make_vec_env(args.env, args.num_envs)
    check_spaces(args.env, envs.single_observation_space, envs.single_action_space)
    run_dir, writer = open_run(args)
    video_dir = os.path.join(run_dir, "videos") if args.capture_video else None
    eval_env = make_eval_env(args.env, video_dir, args.eval_episodes)
    obs_dim = envs.single_observation_space.shape[0]
    envs.action_space.seed(args.seed)  # the uniform actions before learning starts
    # -- networks and optimizers
    agent = make_agent(args, obs_dim, envs.single_action_space, device)
    actor, critic, critic_target, log_alpha = (agent[k] for k in ("actor", "critic", "critic_target", "log_alpha"))
    # fused Adam: one kernel per step for all parameters instead of several per tensor
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=True)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.q_lr, fused=True)
    alpha_opt = torch.optim.Adam([log_alpha], lr=args.alpha_lr, fused=True) if args.autotune else None
    optimizers = {"actor_opt": actor_opt, "critic_opt": critic_opt, "alpha_opt": alpha_opt}
    # --bf16: the update steps under torch.autocast (bfloat16 matrix products); off, a no-op
    precision = torch.autocast(device.type, torch.bfloat16, enabled=args.bf16)
    critic_step, actor_step = precision(update_critic), precision(update_actor)
    target_entropy = -args.target_entropy_scale * float(np.prod(envs.single_action_space.shape))
    # -- storage
    rb = ReplayBuffer(args.buffer_size, obs_dim, int(np.prod(envs.single_action_space.shape)), device)
    global_step, num_updates = 0, 0
    if resume is not None:
        load_agent_state(agent, resume["state"])
        for name, opt in optimizers.items():
            if opt is not None:
                opt.load_state_dict(resume["train"][name])
        rb.load_state_dict(resume["train"]["replay"])
        set_rng_state(resume["train"]["rng"])
        global_step, num_updates = resume["global_step"], resume["train"]["num_updates"]
    act = policy_fn(actor, device)
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
            "obs_norm": None,
        }
        if with_train_state:
            out["train"] = {name: opt.state_dict() for name, opt in optimizers.items() if opt is not None}
            out["train"].update(num_updates=num_updates, replay=rb.state_dict(), rng=rng_state())
        return out

    # -- loop
    obs, _ = envs.reset(seed=args.seed + global_step)  # a resumed run starts fresh episodes
    next_eval = global_step + args.eval_every if args.eval_every else None
    next_log = global_step + args.log_every
    next_ckpt = global_step + args.checkpoint_every if args.checkpoint_every else None
    while global_step < args.total_steps:
        # act
        if global_step < args.learning_starts:
            actions = envs.action_space.sample()
        else:
            with torch.no_grad():
                actions = actor.sample(torch.as_tensor(obs, dtype=torch.float32, device=device))[0].cpu().numpy()
        # step
        next_obs, rewards, terminated, truncated, infos = envs.step(actions)
        global_step += args.num_envs
        ended = terminated | truncated
        for episode_return, length in stats.update(rewards, ended):
            progress.add_episode(global_step, episode_return, length)
        # store: an ended episode's true last observation, never the next episode's first
        real_next_obs = next_obs.copy()
        for i in np.flatnonzero(ended):
            real_next_obs[i] = infos["final_obs"][i]
        rb.add(obs=obs, actions=actions, rewards=rewards, next_obs=real_next_obs, terminated=terminated)
        obs = next_obs
        # update: one gradient step per environment step
        if global_step >= args.learning_starts:
            for _ in range(args.num_envs):
                batch = rb.sample(args.batch_size)
                alpha = log_alpha.detach().exp()
                progress.add_metrics(critic_step(actor, critic, critic_target, critic_opt, batch, alpha, args.gamma))
                num_updates += 1
                if num_updates % args.policy_frequency == 0:
                    for _ in range(args.policy_frequency):
                        progress.add_metrics(
                            actor_step(actor, critic, actor_opt, log_alpha, alpha_opt, batch.obs, target_entropy)
                        )
                if num_updates % args.target_network_frequency == 0:
                    soft_update(critic_target, critic, args.tau)
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
    return {"global_step": global_step, "num_updates": num_updates, "eval_return": progress.eval_return, "run_dir": run_dir}


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
