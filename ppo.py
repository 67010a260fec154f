# /// script
# requires-python = ">=3.10"
# dependencies = ["torch>=2.6", "numpy>=1.26", "gymnasium[mujoco]>=1.1,<2", "mujoco>=4.0.1", "tensorboard>=2.14", "tyro>=0.9", "dm-control>=1.0.52", "shimmy[dm-control]>=2.0.1", "moviepy>=2"]
# ///
"""Proximal Policy Optimization (PPO, clipped objective) with GAE, in one file.

References:
    [PPO] Schulman, Wolski, Dhariwal, Radford, Klimov 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347:
        L^CLIP eq. 7, the combined loss eq. 9, GAE eq. 11-12, the MuJoCo settings Table 3.
    [GAE] Schulman, Moritz, Levine, Jordan, Abbeel 2016, arXiv:1506.02438: generalized advantage estimation (eq. 16).
    [TreePI] Springenberg, Heess et al. 2020, arXiv:2010.05545: Table 2's PPO baseline (--activation, --layer-norm).
    [CleanRL] Huang et al. 2022, ppo_continuous_action.py / ppo.py: argument names and baselines' ppo2 details.

Algorithm (one iteration; in brackets the function doing each line; shapes: T steps, N envs, B minibatch, O obs, A action):
    1. Roll out pi_old, num_steps steps in each of num_envs envs: normalised observations, actions, log pi_old(a|s), scaled
       rewards (+ gamma V(final obs) at a truncation), V(s), episode ends [Actor.sample, RunningMeanStd, RewardScaler, Rollout]
    2. A_t = sum_l (gamma lambda)^l delta_{t+l}, delta_t = r_t + gamma V(s_{t+1}) - V(s_t), cut at episode ends;
       returns R_t = A_t + V(s_t)                                                                                   [gae]
    3. update_epochs epochs of minibatch Adam steps on -L^CLIP + vf_coef (V - R)^2 / 2 - ent_coef H[pi], with
       L^CLIP = E[min(rho A, clip(rho, 1 - eps, 1 + eps) A)], rho = pi(a|s) / pi_old(a|s); stop early once the
       approximate KL exceeds target_kl (if set)                                [clipped_surrogate, value_loss, update_ppo]

Deviations from the paper:
    - baselines ppo2's (and CleanRL's) details: observation normalisation, reward scaling, value clipping, orthogonal
      initialisation, advantage normalisation, the annealed learning rate, gradient clipping.
    - A time limit is not a terminal state: a truncated step's reward gets gamma V(final obs) (CleanRL, baselines: terminal).
"""

from dataclasses import dataclass
from typing import Literal, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

ALGO = "ppo"
ACTION_SPACES = (gym.spaces.Box, gym.spaces.Discrete)  # a Gaussian for Box actions, a categorical for Discrete ones


# == 1. Arguments ==========================================================================================
@dataclass
class Args:
    # -- algorithm ----------------------------------------------------------------------------------------
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
    rollout_size = args.num_envs * args.num_steps
    counts = min(args.num_steps, args.update_epochs, args.num_minibatches)
    scales = min(args.learning_rate, args.clip_coef, args.max_grad_norm)
    return [
        (min(args.hidden_sizes, default=0) > 0, f"--hidden-sizes must be positive, got {args.hidden_sizes}"),
        (counts > 0, "--num-steps, --update-epochs and --num-minibatches must be positive"),
        (args.num_minibatches <= rollout_size, f"--num-minibatches must be at most the rollout's {rollout_size} steps"),
        (0.0 <= args.gamma <= 1.0 and 0.0 <= args.gae_lambda <= 1.0, "--gamma and --gae-lambda must be in [0, 1]"),
        (scales > 0, "--learning-rate, --clip-coef and --max-grad-norm must be positive"),
        (args.target_kl is None or args.target_kl > 0, f"--target-kl must be positive, got {args.target_kl}"),
    ]


# == 2. Networks ===========================================================================================
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
    """pi(a|s) [PPO Sec. 6.1]: a diagonal Gaussian, state-independent log std (Box actions), or a categorical (Discrete)."""

    def __init__(self, obs_dim: int, space: gym.Space, hidden_sizes: tuple[int, ...], activation: str, layer_norm: bool):
        super().__init__()
        self.discrete = isinstance(space, gym.spaces.Discrete)
        out_dim = int(space.n) if self.discrete else int(np.prod(space.shape))
        self.trunk = orthogonal_init(mlp(obs_dim, hidden_sizes, activation, layer_norm), np.sqrt(2))
        # a small last layer starts the policy near uniform / zero mean (baselines ppo2)
        self.head = orthogonal_init(nn.Linear(hidden_sizes[-1], out_dim), 0.01)
        self.log_std = None if self.discrete else nn.Parameter(torch.zeros(out_dim))
        if not self.discrete:  # the env's bounds, which the mean action of an evaluation is clipped to
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


# == 4. Algorithm ==========================================================================================
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
    """Generalized advantage estimation, cut at episode ends [PPO eq. 11-12; GAE eq. 16]:
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


def clipped_surrogate(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip: float) -> Tensor:
    """Negated L^CLIP = -E[min(rho A, clip(rho, 1 - eps, 1 + eps) A)], rho = pi / pi_old [PPO eq. 7]."""
    ratio = torch.exp(log_probs - old_log_probs)
    return -torch.min(ratio * advantages, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages).mean()


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None) -> Tensor:
    """(V - R)^2 / 2, or with clip the max of that and (V_old + clip(V - V_old, +-clip) - R)^2 / 2
    (baselines ppo2's value clipping; [PPO eq. 9] has the plain squared error)."""
    loss = (values - returns).pow(2)
    if clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        loss = torch.max(loss, (clipped - returns).pow(2))
    return 0.5 * loss.mean()


# == 5. Updates ============================================================================================
def update_ppo(
    actor: Actor, value: Value, optimizer: Optimizer, rollout: Rollout, advantages: Tensor, returns: Tensor, args: Args
) -> tuple[dict[str, Tensor], int]:
    """update_epochs epochs of minibatch Adam steps on [PPO eq. 9]'s combined loss; returns the metrics (averaged over the
    steps taken) and the number of gradient steps."""
    flat = Rollout(*(x.flatten(0, 1) for x in rollout))  # [T * N, ...]
    advantages, returns = advantages.flatten(), returns.flatten()
    params, history, v_clip = [*actor.parameters(), *value.parameters()], [], args.clip_coef if args.clip_vloss else None
    num_minibatches, minibatch = args.num_minibatches, len(advantages) // args.num_minibatches
    for _ in range(args.update_epochs):  # the remainder of each epoch's permutation is left out
        for idx in torch.randperm(len(advantages))[: minibatch * num_minibatches].view(num_minibatches, minibatch):
            log_probs, entropy = actor.log_prob_entropy(flat.obs[idx], flat.actions[idx])
            adv = advantages[idx]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8) if args.norm_adv else adv
            pg_loss = clipped_surrogate(log_probs, flat.log_probs[idx], adv, args.clip_coef)
            v_loss = value_loss(value(flat.obs[idx]), flat.values[idx], returns[idx], v_clip)
            loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss  # [PPO eq. 9]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            log_ratio = (log_probs - flat.log_probs[idx]).detach()
            approx_kl = (log_ratio.exp() - 1 - log_ratio).mean()  # k3 estimator (Schulman)
            clipfrac = ((log_ratio.exp() - 1).abs() > args.clip_coef).float().mean()
            history.append(torch.stack([pg_loss, v_loss, entropy.mean(), approx_kl, clipfrac, grad_norm]).detach())
        if args.target_kl is not None and approx_kl.item() > args.target_kl:
            break  # early stop on the approximate KL (Spinning Up, CleanRL; [PPO Sec. 4] adapts a KL penalty instead)
    names = ("losses/policy", "losses/value", "stats/entropy", "stats/kl", "stats/clipfrac", "stats/grad_norm")
    return dict(zip(names, sum(history) / len(history))), len(history)


# == 6. Training ===========================================================================================
def train(args: Args) -> dict:
    """Train PPO; returns the final metrics, counters and the run directory."""
    device = setup(args)  # seeds, torch threads, device
    # -- environments
    envs = make_vec_env(args.env, args.num_envs)
    obs_dim, action_space = envs.single_observation_space.shape[0], envs.single_action_space
    # -- networks, optimizer and normalisers
    nets = (args.hidden_sizes, args.activation, args.layer_norm)
    actor, value = Actor(obs_dim, action_space, *nets).to(device), Value(obs_dim, *nets).to(device)
    optimizer = torch.optim.Adam([*actor.parameters(), *value.parameters()], lr=args.learning_rate, eps=ADAM_EPS, fused=True)
    obs_rms, reward_scaler = RunningMeanStd((obs_dim,)), RewardScaler(args.num_envs, args.gamma, args.reward_clip)

    def observe(raw: np.ndarray, update: bool = True) -> Tensor:
        """Observations [n, O] normalised, after merging them into the statistics if `update`."""
        if args.norm_obs:
            if update:
                obs_rms.update(raw)
            raw = obs_rms.normalize(raw, args.obs_clip)
        return torch.as_tensor(raw, dtype=torch.float32, device=device)

    # -- storage: the rollout, preallocated and written in place step by step
    shape = (args.num_steps, args.num_envs)  # [T, N]
    zeros = lambda *size, dtype=torch.float32: torch.zeros(*shape, *size, dtype=dtype, device=device)
    stored_actions = zeros(dtype=torch.long) if actor.discrete else zeros(*action_space.shape)
    rollout = Rollout(zeros(obs_dim), stored_actions, log_probs=zeros(), rewards=zeros(), dones=zeros(), values=zeros())
    # -- run: directory, logging, evaluation, saving, resume (below the fence)
    model = dict(actor=actor, value=value, obs_rms=obs_rms if args.norm_obs else None)
    train_state = dict(optimizer=optimizer, reward_rms=reward_scaler.rms)
    run = Run(args, envs, model, train_state, act=lambda obs: actor.deterministic(observe(obs.cpu().numpy(), update=False)))
    if args.eval_only:
        return run.evaluate_only()
    global_step, num_updates = run.start()
    # a resumed run starts fresh episodes; the statistics grow with the steps taken only, so a resume is exact
    obs = observe(envs.reset(seed=args.seed + global_step)[0], update=False)
    while global_step < args.total_steps:
        if args.anneal_lr:  # linear decay to 0 over the run (baselines ppo2)
            optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - global_step / args.total_steps)
        with torch.no_grad():  # collect a rollout, then its advantages
            for t in range(args.num_steps):
                # act: a Box action is clipped for the env, pi_old keeps the sample
                actions, log_probs = actor.sample(obs)
                values = value(obs)
                env_actions = (actions if actor.discrete else actions.clamp(actor.low, actor.high)).cpu().numpy()
                # step
                next_obs, rewards, terminated, truncated, infos = envs.step(env_actions)
                global_step += args.num_envs
                run.add_episodes(global_step, infos)
                ended = terminated | truncated
                rewards = reward_scaler(rewards, ended) if args.norm_reward else rewards
                rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
                # a time limit is not an MDP end: bootstrap from the true last observation
                cut = np.flatnonzero(truncated & ~terminated)
                if len(cut):
                    rewards[cut] += args.gamma * value(observe(np.stack([infos["final_obs"][i] for i in cut]), update=False))
                # store
                rollout.obs[t], rollout.actions[t], rollout.log_probs[t], rollout.values[t] = obs, actions, log_probs, values
                rollout.rewards[t], rollout.dones[t] = rewards, torch.as_tensor(ended, dtype=torch.float32, device=device)
                obs = observe(next_obs)
            advantages, returns = gae(rollout.rewards, rollout.values, rollout.dones, value(obs), args.gamma, args.gae_lambda)
        # update
        metrics, steps = update_ppo(actor, value, optimizer, rollout, advantages, returns, args)
        num_updates += steps
        run.add_metrics({**metrics, "charts/learning_rate": torch.tensor(optimizer.param_groups[0]["lr"])})
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
