"""Proximal Policy Optimization (PPO, clipped objective) with GAE, in one file.

References:
    [PPO] Schulman, Wolski, Dhariwal, Radford, Klimov 2017, "Proximal Policy Optimization
        Algorithms", arXiv:1707.06347 (not in shared/papers; cited by equation number).
    [GAE] Schulman, Moritz, Levine, Jordan, Abbeel 2016, "High-Dimensional Continuous Control
        Using Generalized Advantage Estimation", arXiv:1506.02438.
    [TreePI] Springenberg, Heess et al. 2020, "Local Search for Policy Iteration in Continuous
        Control": Table 2 lists PPO as a baseline.
    [CleanRL] Huang et al. 2022, ppo_continuous_action.py / ppo.py: argument names and the
        implementation details of OpenAI baselines' ppo2 (orthogonal initialisation, observation
        and reward normalisation, value clipping, advantage normalisation, annealed learning
        rate, gradient clipping).

Algorithm (one iteration; the function that does each line in brackets):
    1. Roll out pi_old for num_steps steps in each of num_envs envs, storing normalised
       observations, actions, log pi_old(a|s), scaled rewards, V(s) and episode ends
       [RolloutBuffer, RunningMeanStd]; a truncated step's reward gets + gamma V(final obs)
    2. Advantages A_t = sum_l (gamma lambda)^l delta_{t+l}, delta_t = r_t + gamma V(s_{t+1}) - V(s_t),
       cut at episode ends; returns R_t = A_t + V(s_t)                                  [gae]
    3. For update_epochs epochs over shuffled minibatches: the clipped surrogate
       L^CLIP = E[min(rho A, clip(rho, 1 - eps, 1 + eps) A)], rho = pi(a|s) / pi_old(a|s),
       plus vf_coef times the (clipped) value loss minus ent_coef times the entropy
       [clipped_surrogate, value_loss, update_ppo]
    4. Optionally stop the epochs early once the approximate KL exceeds target_kl  [update_ppo]

Shapes: T steps per env per rollout, N envs, B minibatch, O observation size, A action size.

Usage:
    python ppo.py --env HalfCheetah-v5
    python ppo.py --env CartPole-v1 --num-envs 4 --num-steps 128 --total-steps 200000
    python ppo.py --env HalfCheetah-v5 --checkpoint runs/<run>/model.pt --eval-only
    python ppo.py --resume runs/<run>/resume.pt

Deviations from the paper:
    - Observation normalisation, reward scaling, value clipping, orthogonal initialisation and
      gradient clipping come from OpenAI baselines' ppo2 (and CleanRL), not from the paper.
    - A truncated episode (time limit) bootstraps: its last reward gets gamma V(final obs) added,
      where CleanRL and baselines treat the time limit as a terminal state.
    - The running statistics are kept in the file (tensors saved in the checkpoint and frozen at
      evaluation) instead of gymnasium's NormalizeObservation / NormalizeReward wrappers.
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
import tyro
from torch import nn
from torch.utils.tensorboard import SummaryWriter

ALGO = "ppo"
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
    # Networks [PPO Sec. 6.1: two hidden layers of 64 tanh units]
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layer sizes of the policy and of the value network."""
    activation: Literal["relu", "elu", "tanh"] = "tanh"
    """Hidden activation ([TreePI] Table 2 uses elu)."""
    layer_norm: bool = False
    """LayerNorm after the first hidden layer (the 'LN' of [TreePI] Table 2)."""
    # Rollouts [PPO Table 3]
    num_steps: int = 2048
    """Steps per env in each rollout (the horizon T)."""
    gamma: float = 0.99
    """Discount factor gamma."""
    gae_lambda: float = 0.95
    """GAE parameter lambda (1: Monte Carlo returns minus V)."""
    # Optimisation [PPO Table 3; eq. 7 and 9]
    learning_rate: float = 3e-4
    """Adam learning rate."""
    anneal_lr: bool = True
    """Decay the learning rate linearly to 0 over the run (baselines ppo2)."""
    update_epochs: int = 10
    """Epochs over each rollout."""
    num_minibatches: int = 32
    """Minibatches per epoch (minibatch size = num_envs * num_steps / num_minibatches)."""
    clip_coef: float = 0.2
    """Clipping parameter epsilon of the surrogate objective."""
    clip_vloss: bool = True
    """Clip the value update to +-clip_coef around the old values (baselines ppo2)."""
    norm_adv: bool = True
    """Normalise the advantages within each minibatch."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient c2."""
    vf_coef: float = 0.5
    """Value loss coefficient c1."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clipping threshold."""
    target_kl: float | None = None
    """Stop the epochs of an update early when the approximate KL exceeds this."""
    # Normalisation (baselines VecNormalize)
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
    if args.num_steps <= 0 or args.update_epochs <= 0 or args.num_minibatches <= 0:
        raise UsageError("--num-steps, --update-epochs and --num-minibatches must be positive")
    if args.num_minibatches > args.num_envs * args.num_steps:
        raise UsageError(
            f"--num-minibatches {args.num_minibatches} is larger than the rollout "
            f"({args.num_envs} envs x {args.num_steps} steps)"
        )
    if not 0.0 <= args.gamma <= 1.0 or not 0.0 <= args.gae_lambda <= 1.0:
        raise UsageError("--gamma and --gae-lambda must be in [0, 1]")
    if args.learning_rate <= 0 or args.clip_coef <= 0 or args.max_grad_norm <= 0:
        raise UsageError("--learning-rate, --clip-coef and --max-grad-norm must be positive")
    if args.target_kl is not None and args.target_kl <= 0:
        raise UsageError(f"--target-kl must be positive, got {args.target_kl}")


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
    """PPO needs flat Box observations and a Box or Discrete action space."""
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise UsageError(f"{env_id} has observation space {obs_space}; this script needs a flat Box")
    if not isinstance(action_space, (gym.spaces.Box, gym.spaces.Discrete)):
        raise UsageError(f"{env_id} has a {type(action_space).__name__} action space; PPO here needs a Box or a Discrete one")
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) != 1:
        raise UsageError(f"{env_id} has actions of shape {action_space.shape}; PPO needs a flat Box")


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
ADAM_EPS = 1e-5  # Adam epsilon of baselines ppo2 and CleanRL (PyTorch's default is 1e-8)


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
    """pi(a|s): a diagonal Gaussian with a state-independent log std for Box actions [PPO Sec. 6.1],
    a categorical over logits for Discrete ones."""

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


# == 6. Algorithm ======================================================================
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


def clipped_surrogate(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip: float
) -> torch.Tensor:
    """Negated L^CLIP = -E[min(rho A, clip(rho, 1 - eps, 1 + eps) A)], rho = pi / pi_old [PPO eq. 7]."""
    ratio = torch.exp(log_probs - old_log_probs)
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return -torch.min(ratio * advantages, clipped * advantages).mean()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float | None) -> torch.Tensor:
    """(V - R)^2 / 2, or with clip the max of that and (V_old + clip(V - V_old, +-clip) - R)^2 / 2
    (baselines ppo2's value clipping; [PPO eq. 9] has the plain squared error)."""
    loss = (values - returns).pow(2)
    if clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        loss = torch.max(loss, (clipped - returns).pow(2))
    return 0.5 * loss.mean()


# == 7. Updates ========================================================================
def update_ppo(
    actor: Actor,
    value: Value,
    optimizer: torch.optim.Optimizer,
    data: Rollout,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    args: Args,
) -> tuple[dict[str, torch.Tensor], int]:
    """update_epochs epochs of minibatch Adam steps on eq. 9's combined loss; returns the metrics
    (averaged over the steps taken) and the number of gradient steps."""
    flat = Rollout(*(x.flatten(0, 1) for x in data))  # [T * N, ...]
    advantages, returns = advantages.flatten(), returns.flatten()
    size = advantages.shape[0]
    minibatch = size // args.num_minibatches
    params = [*actor.parameters(), *value.parameters()]
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    for _ in range(args.update_epochs):
        perm = torch.randperm(size)
        for start in range(0, minibatch * args.num_minibatches, minibatch):
            idx = perm[start : start + minibatch]
            log_probs, entropy = actor.log_prob_entropy(flat.obs[idx], flat.actions[idx])
            adv = advantages[idx]
            if args.norm_adv:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            pg_loss = clipped_surrogate(log_probs, flat.log_probs[idx], adv, args.clip_coef)
            v_clip = args.clip_coef if args.clip_vloss else None
            v_loss = value_loss(value(flat.obs[idx]), flat.values[idx], returns[idx], v_clip)
            loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss  # [PPO eq. 9]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                log_ratio = log_probs - flat.log_probs[idx]
                approx_kl = (log_ratio.exp() - 1 - log_ratio).mean()  # k3 estimator (Schulman)
                metrics = {
                    "losses/policy": pg_loss.detach(),
                    "losses/value": v_loss.detach(),
                    "stats/entropy": entropy.detach().mean(),
                    "stats/kl": approx_kl,
                    "stats/clipfrac": ((log_ratio.exp() - 1).abs() > args.clip_coef).float().mean(),
                    "stats/grad_norm": grad_norm,
                }
            for k, v in metrics.items():
                sums[k] = sums[k] + v if k in sums else v
            steps += 1
        if args.target_kl is not None and approx_kl.item() > args.target_kl:
            break  # [PPO Sec. 4 / baselines] early stop on the approximate KL
    return {k: v / steps for k, v in sums.items()}, steps


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
    """Networks, by the names their state is saved under."""
    return {"actor": Actor(obs_dim, action_space, args).to(device), "value": Value(obs_dim, args).to(device)}


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
    """Train PPO; returns the final metrics, counters and the run directory."""
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
    action_space = envs.single_action_space
    # -- networks and optimizers
    agent = make_agent(args, obs_dim, action_space, device)
    actor, value = agent["actor"], agent["value"]
    optimizer = torch.optim.Adam([*actor.parameters(), *value.parameters()], lr=args.learning_rate, eps=ADAM_EPS, fused=True)
    obs_rms = RunningMeanStd((obs_dim,))
    reward_scaler = RewardScaler(args.num_envs, args.gamma, args.reward_clip)
    # -- storage
    data = make_rollout(args.num_steps, args.num_envs, obs_dim, action_space)
    data = Rollout(*(x.to(device) for x in data))
    global_step, num_updates = 0, 0
    if resume is not None:
        load_agent_state(agent, resume["state"])
        optimizer.load_state_dict(resume["train"]["optimizer"])
        obs_rms.load_state_dict(resume["train"]["obs_rms"])
        reward_scaler.rms.load_state_dict(resume["train"]["reward_rms"])
        set_rng_state(resume["train"]["rng"])
        global_step, num_updates = resume["global_step"], resume["train"]["num_updates"]
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
            out["train"] = {"optimizer": optimizer.state_dict()}
            out["train"].update(
                num_updates=num_updates,
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
        if args.anneal_lr:  # linear decay to 0 over the run (baselines ppo2)
            optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - global_step / args.total_steps)
        for t in range(args.num_steps):
            # act
            with torch.no_grad():
                actions, log_probs = actor.sample(obs)
                values = value(obs)
            env_actions = actions.cpu().numpy()
            if not actor.discrete:  # the env gets the clipped action, pi_old keeps the sample
                env_actions = np.clip(env_actions, action_space.low, action_space.high)
            # step
            next_obs, rewards, terminated, truncated, infos = envs.step(env_actions)
            global_step += args.num_envs
            ended = terminated | truncated
            for episode_return, length in stats.update(rewards, ended):
                progress.add_episode(global_step, episode_return, length)
            if args.norm_reward:
                rewards = reward_scaler(rewards, ended)
            rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
            # a time limit is not an MDP end: bootstrap from the true last observation
            cut = np.flatnonzero(truncated & ~terminated)
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
        # update
        with torch.no_grad():
            advantages, returns = gae(data.rewards, data.values, data.dones, value(obs), args.gamma, args.gae_lambda)
        metrics, steps = update_ppo(actor, value, optimizer, data, advantages, returns, args)
        num_updates += steps
        progress.add_metrics(metrics)
        # log, evaluate and save
        if global_step >= next_log:
            progress.writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
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
