# /// script
# requires-python = ">=3.10"
# dependencies = ["torch>=2.6", "numpy>=1.26", "gymnasium[mujoco]>=1.1,<2", "mujoco>=4.0.1", "tensorboard>=2.14", "tyro>=0.9", "dm-control>=1.0.52", "shimmy[dm-control]>=2.0.1", "moviepy>=2"]
# ///
"""Soft Actor-Critic (SAC) for continuous control, in one file.

References:
    [SAC] Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications", arXiv:1812.05905: Sec. 4-5, 7, App. D.
    [TreePI] Springenberg, Heess et al. 2020, arXiv:2010.05545: Table 2's SAC baseline (flags in README).
    [CleanRL] Huang et al. 2022, sac_continuous_action.py: argument names, --policy-frequency, log-std squashing.

Algorithm (one env step; in brackets the function doing each line; shapes: B batch, O obs, A action, E critics):
    1. Act a ~ pi(.|s) (uniform random before `learning_starts`) and store (s, a, r, s', terminated)
       with s' the true last observation of an ended episode                          [ReplayBuffer]
    2. Soft target y = r + gamma (1 - terminated) (min_e Qbar_e(s', a') - alpha log pi(a'|s')),
       a' ~ pi(.|s')                                                                  [soft_q_target]
    3. Critic step on J_Q = sum_e E[(Q_e(s, a) - y)^2] / 2, both critics in one pass       [update_critic]
    4. Actor step on J_pi = E[alpha log pi(a~|s) - min_e Q_e(s, a~)], a~ the tanh-squashed
       reparameterised sample                                             [squashed_gaussian, update_actor]
    5. Temperature step on J(alpha) = E[-alpha (log pi(a~|s) + Hbar)], Hbar = -|A|        [update_actor]
    6. Targets Qbar <- tau Q + (1 - tau) Qbar                                            [soft_update]

Deviations from the paper:
    - log std is squashed into [LOG_STD_MIN, LOG_STD_MAX] by tanh (CleanRL, Spinning Up); the authors clip to [-20, 2].
    - `--policy-frequency k` (TD3's delayed update) does k actor steps every k critic steps; 1 is the paper's.
    - Each vector step adds num_envs transitions and does num_envs gradient steps: one update per env step.
"""

from dataclasses import dataclass
from typing import Literal, NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

ALGO = "sac"
ACTION_SPACES = (gym.spaces.Box,)  # a tanh-squashed Gaussian needs continuous, bounded actions


# == 1. Arguments ==========================================================================================
@dataclass
class Args:
    # -- algorithm ----------------------------------------------------------------------------------------
    # Networks [SAC Sec. 7: two hidden layers of 256 ReLU units]
    hidden_sizes: tuple[int, ...] = (256, 256)
    """Hidden layer sizes of the actor and of each critic."""
    activation: Literal["relu", "elu", "tanh"] = "relu"
    """Hidden activation ([TreePI] Table 2 uses elu)."""
    layer_norm: bool = False
    """LayerNorm after the first hidden layer (the 'LN' of [TreePI] Table 2)."""
    bf16: bool = False
    """Updates' matrix products in bfloat16 (weights, Q, log pi, losses, Adam stay float32); paper: float32."""
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
    # -- shared: identical in every file ------------------------------------------------------------------
    env: str = "HalfCheetah-v5"
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
    return [
        (min(args.hidden_sizes, default=0) > 0, f"--hidden-sizes must be positive, got {args.hidden_sizes}"),
        (0 < args.batch_size <= args.buffer_size, "--batch-size must be positive and at most --buffer-size"),
        (args.learning_starts >= 0, f"--learning-starts must be >= 0, got {args.learning_starts}"),
        (0.0 <= args.gamma <= 1.0, f"--gamma must be in [0, 1], got {args.gamma}"),
        (0.0 < args.tau <= 1.0, f"--tau must be in (0, 1], got {args.tau}"),
        (min(args.q_lr, args.policy_lr, args.alpha_lr) > 0, "learning rates must be positive"),
        (min(args.policy_frequency, args.target_network_frequency) > 0, "--policy/target-network-frequency must be > 0"),
    ]


# == 2. Networks ===========================================================================================
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

    def __init__(
        self, obs_dim: int, action_space: gym.spaces.Box, hidden_sizes: tuple[int, ...], activation: str, layer_norm: bool
    ):
        super().__init__()
        action_dim = int(np.prod(action_space.shape))
        self.trunk = mlp(obs_dim, hidden_sizes, activation, layer_norm)
        self.head = nn.Linear(hidden_sizes[-1], 2 * action_dim)  # mean and log std
        low, high = (torch.as_tensor(bound, dtype=torch.float32) for bound in (action_space.low, action_space.high))
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        # float32 even under --bf16, so that the log-probability is computed in float32
        mean, log_std = self.head(self.trunk(obs)).float().chunk(2, dim=-1)  # [B, A] each
        # tanh keeps log std in [LOG_STD_MIN, LOG_STD_MAX] with a gradient everywhere (CleanRL)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        return mean, log_std

    def sample(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """A reparameterised action in the env's bounds and its log-probability [B]."""
        mean, log_std = self(obs)
        return squashed_gaussian(mean, log_std, torch.randn_like(mean), self.action_scale, self.action_bias)

    def deterministic(self, obs: Tensor) -> Tensor:
        """The squashed mean, used for evaluation."""
        return torch.tanh(self(obs)[0]) * self.action_scale + self.action_bias


class Critic(nn.Module):
    """E soft Q-functions Q_e(s, a) with stacked weights [E, in, out]: one batched matmul per layer for all."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: tuple[int, ...], activation: str, layer_norm: bool):
        super().__init__()
        num_critics = 2  # [SAC Sec. 5] two Q-functions, whose minimum is used (clipped double Q)
        sizes = [obs_dim + action_dim, *hidden_sizes, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = fan_in**-0.5  # nn.Linear's default initialisation, per critic
            self.weights.append(nn.Parameter(torch.empty(num_critics, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_critics, 1, fan_out).uniform_(-bound, bound)))
        width = hidden_sizes[0]
        self.norm_weight = nn.Parameter(torch.ones(num_critics, 1, width)) if layer_norm else None
        self.norm_bias = nn.Parameter(torch.zeros(num_critics, 1, width)) if layer_norm else None
        self.activation = ACTIVATIONS[activation]()

    def forward(self, obs: Tensor, actions: Tensor) -> Tensor:
        x = torch.cat([obs, actions], dim=-1)  # [B, O + A]
        x = torch.baddbmm(self.biases[0], x.expand(len(self.biases[0]), *x.shape), self.weights[0])
        if self.norm_weight is not None:  # [E, B, H]
            x = F.layer_norm(x, x.shape[-1:]) * self.norm_weight + self.norm_bias
        for w, b in zip(self.weights[1:-1], self.biases[1:-1]):
            x = torch.baddbmm(b, self.activation(x), w)  # [E, B, H]
        # Output layer as multiply-and-sum: a bmm with one output column has a slow backward on the CPU (an
        # outer product done as a matmul of inner size 1). Its float32 weights make Q float32 under --bf16.
        return (self.activation(x) * self.weights[-1].transpose(1, 2)).sum(-1) + self.biases[-1].squeeze(-1)  # [E, B]


# == 3. Storage ============================================================================================
class Batch(NamedTuple):
    obs: Tensor  # [B, O]
    actions: Tensor  # [B, A]
    rewards: Tensor  # [B]
    next_obs: Tensor  # [B, O]
    terminated: Tensor  # [B], 1.0 where the MDP ended (no bootstrap)


class ReplayBuffer:
    """Preallocated ring buffer of transitions; next_obs is stored per row, never the next episode's first."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, device: torch.device):
        self.capacity, self.pos, self.size = capacity, 0, 0
        shapes = Batch(obs=(obs_dim,), actions=(action_dim,), rewards=(), next_obs=(obs_dim,), terminated=())
        self.data = Batch(*(torch.zeros(capacity, *shape, device=device) for shape in shapes))

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
        # clone: a saved slice would carry its whole preallocated storage into resume.pt
        return {"pos": self.pos, "size": self.size, "data": [c[: self.size].clone() for c in self.data]}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.size = state["pos"], state["size"]
        for column, saved in zip(self.data, state["data"]):
            column[: self.size] = saved.to(column.device)


# == 4. Algorithm ==========================================================================================
def squashed_gaussian(mean: Tensor, log_std: Tensor, noise: Tensor, scale: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
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
    rewards: Tensor, terminated: Tensor, next_q: Tensor, next_log_prob: Tensor, alpha: Tensor, gamma: float
) -> Tensor:
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


# == 5. Updates ============================================================================================
def update_critic(
    actor: Actor, critic: Critic, critic_target: Critic, critic_opt: Optimizer, batch: Batch, alpha: Tensor, gamma: float
) -> dict[str, Tensor]:
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
    actor_opt: Optimizer,
    log_alpha: Tensor,
    alpha_opt: Optimizer | None,
    obs: Tensor,
    target_entropy: float,
) -> dict[str, Tensor]:
    """One Adam step on J_pi and, when alpha is learned, one on J(alpha), from the same sample."""
    critic.requires_grad_(False)  # the actor loss differentiates Q w.r.t. actions only
    actions, log_prob = actor.sample(obs)
    q = critic(obs, actions).min(dim=0).values  # [B]
    alpha = log_alpha.exp()
    loss = (alpha.detach() * log_prob - q).mean()  # [SAC J_pi]
    critic.requires_grad_(True)
    metrics = {"losses/policy": loss.detach(), "stats/entropy": -log_prob.detach().mean(), "stats/alpha": alpha.detach()}
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
    return metrics


# == 6. Training ===========================================================================================
def train(args: Args) -> dict:
    """Train SAC; returns the final metrics, counters and the run directory."""
    device = setup(args)  # seeds, torch threads, device
    # -- environments
    envs = make_vec_env(args.env, args.num_envs)
    obs_dim, action_space = envs.single_observation_space.shape[0], envs.single_action_space
    action_dim = int(np.prod(action_space.shape))
    envs.action_space.seed(args.seed)  # the uniform actions before learning starts
    # -- networks and optimizers
    nets = (args.hidden_sizes, args.activation, args.layer_norm)
    critic = Critic(obs_dim, action_dim, *nets).to(device)
    critic_target = Critic(obs_dim, action_dim, *nets).to(device)
    critic_target.load_state_dict(critic.state_dict())
    critic_target.requires_grad_(False)
    alpha = 1.0 if args.autotune else args.alpha  # softlearning and CleanRL start at alpha = 1
    log_alpha = torch.tensor(float(np.log(alpha)), device=device, requires_grad=args.autotune)
    actor = Actor(obs_dim, action_space, *nets).to(device)
    # fused Adam: one kernel per step for all parameters instead of several per tensor
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=True)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.q_lr, fused=True)
    alpha_opt = torch.optim.Adam([log_alpha], lr=args.alpha_lr, fused=True) if args.autotune else None
    # --bf16: the update steps under torch.autocast (bfloat16 matrix products); off, a no-op
    precision = torch.autocast(device.type, torch.bfloat16, enabled=args.bf16)
    critic_step, actor_step = precision(update_critic), precision(update_actor)
    target_entropy = -args.target_entropy_scale * action_dim
    # -- storage
    replay = ReplayBuffer(args.buffer_size, obs_dim, action_dim, device)
    # -- run: directory, logging, evaluation, saving, resume (below the fence)
    model = dict(actor=actor, critic=critic, critic_target=critic_target, log_alpha=log_alpha)
    train_state = dict(actor_opt=actor_opt, critic_opt=critic_opt, alpha_opt=alpha_opt, replay=replay)
    run = Run(args, envs, model, train_state, act=lambda obs: actor.deterministic(obs.float()))
    if args.eval_only:
        return run.evaluate_only()
    global_step, num_updates = run.start()
    obs, _ = envs.reset(seed=args.seed + global_step)  # a resumed run starts fresh episodes
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
        run.add_episodes(global_step, infos)
        # store: an ended episode's true last observation, never the next episode's first
        real_next_obs = next_obs.copy()
        for i in np.flatnonzero(terminated | truncated):
            real_next_obs[i] = infos["final_obs"][i]
        replay.add(obs=obs, actions=actions, rewards=rewards, next_obs=real_next_obs, terminated=terminated)
        obs = next_obs
        # update: one gradient step per environment step
        if global_step >= args.learning_starts:
            for _ in range(args.num_envs):
                batch = replay.sample(args.batch_size)
                alpha = log_alpha.detach().exp()
                run.add_metrics(critic_step(actor, critic, critic_target, critic_opt, batch, alpha, args.gamma))
                num_updates += 1
                if num_updates % args.policy_frequency == 0:
                    for _ in range(args.policy_frequency):
                        run.add_metrics(actor_step(actor, critic, actor_opt, log_alpha, alpha_opt, batch.obs, target_entropy))
                if num_updates % args.target_network_frequency == 0:
                    soft_update(critic_target, critic, args.tau)
        run.step(global_step, num_updates)  # log, evaluate and save as scheduled; stop on a signal
    return run.finish(global_step, num_updates)


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
