# /// script
# requires-python = ">=3.10"
# dependencies = ["torch>=2.6", "numpy>=1.26", "gymnasium[mujoco]>=1.1,<2", "mujoco>=4.0.1", "tensorboard>=2.14", "tyro>=0.9", "dm-control>=1.0.52", "shimmy[dm-control]>=2.0.1", "moviepy>=2"]
# ///
"""Maximum a posteriori Policy Optimisation (MPO) for continuous and discrete control, in one file.

References:
    [MPO] Abdolmaleki, Springenberg, Tassa, Munos, Heess, Riedmiller 2018, "Maximum a Posteriori Policy Optimisation",
        arXiv:1806.06920 (E-step eq. 7-9, M-step eq. 10-12, decoupled KL App. D, Retrace eq. 13, Table 2, Alg. 2).
    [TreePI] Springenberg, Heess et al. 2020, arXiv:2010.05545, Table 2: MPO as a baseline (README: the flags that select it).
    [Retrace] Munos, Stepleton, Harutyunyan, Bellemare 2016, arXiv:1606.02647: the trace c = lambda min(1, pi / b).
    [TD3] Fujimoto, van Hoof, Meger 2018, arXiv:1802.09477, Sec. 4.2: clipped double Q (here only with --num-critics 2).
    [ACME] Hoffman et al. 2020, arXiv:2006.00979, acme/agents/jax/mpo: followed where the paper is silent.

Algorithm (one environment step; the function that does each line in brackets):
    1. Act a ~ pi(.|s), execute a clipped to the env's bounds; store (s, a, log b(a|s), r, s', terminated, ended) per env
       in time order, b = pi at acting time; sample ceil(B / T) snippets of T steps within one episode [SnippetReplay]
    2. Retrace target (eq. 13) of every step t from the targets pi', Q': Q_ret(t) = Q'(s_t, a_t) + sum_{j>=t} gamma^(j-t)
       (prod_{k=t+1..j} c_k) [r_j + gamma V'(s_{j+1}) - Q'(s_j, a_j)], c_k = lambda min(1, pi'(a_k|s_k) / b(a_k|s_k)),
       V'(s) = mean_j Q'(s, a_j) on the samples of line 3                                                [retrace_target]
    3. E-step (eq. 7-9) at every s_t: M actions a_j ~ pi'(.|s_t) (all, weighted by pi', if discrete), q_j = softmax_j(
       Q'(s, a_j) / eta), g(eta) = eta eps + eta mean_s log mean_j exp(Q'(s, a_j) / eta)   [temperature_dual, e_step_weights]
    4. M-step (eq. 10-12, App. D): L_pi = -mean_s sum_j q_j log pi(a_j|s) + alpha_mean C_mean + alpha_cov C_cov, with
       KL(pi' || pi) = C_mean + C_cov                                                  [gaussian_kl_decoupled, kl_penalty]
    5. One step on (Q(s_t, a_t) - Q_ret(t))^2 / 2 + g(eta) + L_pi + each alpha (eps - C), means over all valid t  [update]
    6. Every `target_network_frequency` gradient steps: pi' <- pi, Q' <- Q                       [MPO Alg. 2, line 25]

Shapes: B batch ((s_t, a_t) pairs), T snippet length, M candidate actions per state (all n if discrete), O obs, A action.

Deviations from the paper:
    - eta, alpha_mean, alpha_cov = softplus(log_eta, log_alpha_*) + 1e-8 (ACME's form and names), Adam at --dual-lr (paper: not
      given), log_* clamped below at -18 (ACME). Actions are rescaled to [-1, 1]; the critic sees the clipped action the env
      executes (ACME), the replay and log b(a|s) the unclipped sample; a discrete one goes one-hot (paper: a DQN torso).
    - Left open by the paper: T = 5, M = 20 (ACME), B = 256 ([TreePI] Table 2), ReLU (ACME, [TreePI]: ELU); no warm-up.
      One update per env step (per env), as sac.py (Alg. 2: 1000 gradient steps per batch of trajectories, then target copy).
    - Every valid step t of a snippet trains Q, the E-step and the M-step (eq. 13's loss is over all (s_t, a_t) drawn; ACME:
      every step), ceil(B / T) snippets keeping B pairs; one sample set per state serves V' and the E-step (Alg. 2, l. 11: M
      actions "for estimating integrals"): 4-5x fewer Q' evaluations than step 0 alone with two sample sets.
    - One Q-function, as the paper; --num-critics 2 trains two to the same Q_ret and reads Q' as their minimum in lines 2-3
      (clipped double Q [TD3]): at 100k env steps on Walker2d-v5 one critic overestimates the return by 11-56%, and two
      raise the mean return over training on each of 3 seeds (295 to 395; sac.py 465), at 0.72x the env steps/s; on
      HalfCheetah-v5, where one critic already underestimates, two lower that mean on each of 3 seeds (867 to 772; README).
    - Single-machine setting: --num-critics 2 --target-network-frequency 25 (the default stays one critic, Alg. 2's 1000)
      raises the mean return over 100k env steps from 295 to 701 on Walker2d-v5 (3 seeds, one lower; sac.py 465), from
      867 to 2386 on HalfCheetah-v5 (3 seeds; sac.py 2855) and from 401 to 684 on cartpole-swingup (3 seeds; sac.py 576;
      README).
    - A diagonal covariance unless --full-covariance (App. D: a full Cholesky factor). Not for speed (3% per update here):
      at 10k steps on Walker2d-v5 the full one learned less (3 seeds; README).
    - Retrace and the E-step use pi' (the paper's pi(a|s, theta_i)), as ACME does; C_mean uses the online covariance, as
      eq. 27 has it, so C_mean + C_cov = KL(pi' || pi) exactly (ACME: the target covariance in C_mean).
"""

from dataclasses import dataclass
from functools import partial
from typing import Literal, NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

ALGO = "mpo"
ACTION_SPACES = (gym.spaces.Box, gym.spaces.Discrete)  # a Gaussian policy (bounded Box) or a categorical one


# == 1. Arguments ==========================================================================================
@dataclass
class Args:
    # -- algorithm ----------------------------------------------------------------------------------------
    # Networks [MPO Table 2, control suite; App. D]
    policy_hidden_sizes: tuple[int, ...] = (100, 100)
    """Hidden layer sizes of the policy [MPO Table 2: 100-100; humanoid 200-200]."""
    critic_hidden_sizes: tuple[int, ...] = (200, 200)
    """Hidden layer sizes of the Q-function [MPO Table 2: 200-200; humanoid 300-300]."""
    num_critics: int = 1
    """Q-functions, each trained to Q_ret, their minimum read as Q' (paper: 1; 2: clipped double Q, as sac.py [TD3])."""
    activation: Literal["relu", "elu", "tanh"] = "relu"
    """Hidden activation (paper: not given; ACME and [TreePI] Table 2: elu, slower on a CPU)."""
    layer_norm: bool = False
    """LayerNorm after the first hidden layer (the 'LN' of [TreePI] Table 2)."""
    full_covariance: bool = False
    """A full covariance (Cholesky factor) Gaussian policy instead of a diagonal [MPO App. D]."""
    # Replay and policy evaluation by Retrace [MPO Sec. 4]
    buffer_size: int = 1_000_000
    """Replay buffer capacity in transitions."""
    batch_size: int = 256
    """(s_t, a_t) pairs per step: ceil(B / T) snippets of T steps (paper: not given; [TreePI] Table 2)."""
    learning_starts: int = 5_000
    """Env steps (acting with the initial policy) before gradient steps begin."""
    retrace_steps: int = 5
    """Snippet length N after which eq. 13 bootstraps with Q' (paper: not given; ACME: 5)."""
    retrace_lambda: float = 1.0
    """lambda in the trace c = lambda min(1, pi / b) (paper: 1; ACME: 0.95)."""
    gamma: float = 0.99
    """Discount factor gamma [MPO Table 2]."""
    target_network_frequency: int = 1_000
    """Gradient steps between copies pi' <- pi, Q' <- Q [MPO Alg. 2: 1000; [TreePI]: 200]."""
    q_lr: float = 5e-4
    """Adam learning rate of the Q-function [MPO Table 2: 5e-4; [TreePI] Table 2: 3e-4]."""
    policy_lr: float = 5e-4
    """Adam learning rate of the policy [MPO Table 2: 5e-4; [TreePI] Table 2: 3e-4]."""
    # E-step and M-step [MPO Sec. 3.2, 3.3, App. D]
    num_samples: int = 20
    """Actions M sampled per state for the E-step and for E_pi Q' (paper: not given; ACME: 20)."""
    epsilon: float = 0.1
    """KL bound epsilon of the non-parametric E-step [MPO eq. 7; Table 2: 0.1]."""
    epsilon_mean: float = 0.1
    """Bound epsilon_mu on the mean part of KL(pi' || pi) (categorical: all of it) [MPO Table 2: 0.1; [TreePI]: 0.005]."""
    epsilon_cov: float = 1e-4
    """Bound epsilon_Sigma on the covariance part of KL(pi' || pi) [MPO Table 2: 1e-4]."""
    dual_lr: float = 1e-2
    """Adam learning rate of the dual parameters log_eta, log_alpha_* (paper: not given; ACME)."""
    bf16: bool = False
    """Updates' matrix products in bfloat16 (weights, Q, log pi, losses, Adam stay float32); paper: float32."""
    eta_init: float = 1.0
    """Initial temperature eta (ACME: 10)."""
    alpha_mean_init: float = 1.0
    """Initial multiplier alpha_mean of the mean (or categorical) KL bound (ACME: 10)."""
    alpha_cov_init: float = 100.0
    """Initial multiplier alpha_cov (ACME: 1000): large, so that the small epsilon_cov holds from the start."""
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
    positive = ["batch_size", "retrace_steps", "target_network_frequency", "num_samples", "q_lr", "policy_lr", "dual_lr"]
    positive += ["num_critics", "epsilon", "epsilon_mean", "epsilon_cov", "eta_init", "alpha_mean_init", "alpha_cov_init"]
    return [
        (min(args.policy_hidden_sizes + args.critic_hidden_sizes, default=0) > 0, "--*-hidden-sizes must be positive"),
        *((getattr(args, k) > 0, f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}") for k in positive),
        (args.buffer_size >= args.num_envs * args.retrace_steps, "--buffer-size must hold --retrace-steps steps of every env"),
        (args.learning_starts >= 0, f"--learning-starts must be >= 0, got {args.learning_starts}"),
        (0.0 <= args.retrace_lambda <= 1.0, f"--retrace-lambda must be in [0, 1], got {args.retrace_lambda}"),
        (0.0 <= args.gamma <= 1.0, f"--gamma must be in [0, 1], got {args.gamma}"),
    ]


# == 2. Networks ===========================================================================================
# in place where torch offers it: no fresh activation tensor, whose first touch page-faults on a CPU (same numbers)
ACTIVATIONS = {"relu": partial(nn.ReLU, inplace=True), "elu": partial(nn.ELU, inplace=True), "tanh": nn.Tanh}
SCALE_MIN = 1e-6  # added to the softplus'd Cholesky diagonal: a numerical guard (ACME's value)


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


class GaussianActor(nn.Module):
    """Gaussian policy pi(a|s) = N(mean(s), L(s) L(s)^T) on actions rescaled to [-1, 1]^A [MPO App. D], `params` the pair
    (mean [B, A], scale_tril L [B, A, A]): L is diagonal, or with --full-covariance lower-triangular, its diagonal through
    softplus. Samples are stored unbounded, with their log-probability; the env executes them clipped to its bounds."""

    def __init__(
        self,
        obs_dim: int,
        action_space: gym.spaces.Box,
        hidden_sizes: tuple[int, ...],
        activation: str,
        layer_norm: bool,
        full_covariance: bool,
    ):
        super().__init__()
        size = self.action_dim = self.critic_action_dim = int(np.prod(action_space.shape))
        self.full_covariance = full_covariance
        self.trunk = mlp(obs_dim, hidden_sizes, activation, layer_norm)
        self.head = nn.Linear(hidden_sizes[-1], size + (size * (size + 1) // 2 if full_covariance else size))  # mean, L
        low, high = (torch.as_tensor(bound, dtype=torch.float32).flatten() for bound in (action_space.low, action_space.high))
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        # the weights' dtype (float32) under --bf16 too: samples, log-probabilities and KLs in float32
        out = self.head(self.trunk(obs)).to(self.head.weight.dtype)
        mean, raw = out.split([self.action_dim, self.head.out_features - self.action_dim], dim=-1)
        if not self.full_covariance:
            return mean, torch.diag_embed(F.softplus(raw) + SCALE_MIN)  # [B, A], [B, A, A]
        rows, cols = torch.tril_indices(self.action_dim, self.action_dim, device=obs.device)
        tril = raw.new_zeros(*raw.shape[:-1], self.action_dim, self.action_dim)
        tril[..., rows, cols] = raw  # [B, A, A]
        diagonal = F.softplus(tril.diagonal(dim1=-2, dim2=-1)) + SCALE_MIN  # [MPO App. D]
        return mean, tril.tril(-1) + torch.diag_embed(diagonal)

    def sample(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        params = self(obs)
        actions = self.candidates(params, 1)[0]  # [B, 1, A]
        return actions[:, 0], self.log_prob(params, actions)[:, 0]  # a ~ pi(.|s) [B, A] (unclipped), log pi(a|s) [B]

    def candidates(self, params: tuple[Tensor, Tensor], num_samples: int) -> tuple[Tensor, Tensor]:
        """M actions a_j ~ pi(.|s) [B, M, A] with prior weights log(1/M) [B, M]: the E-step's integral [MPO Alg. 2, l. 11]."""
        mean, scale_tril = params
        noise = torch.randn(*mean.shape[:-1], num_samples, self.action_dim, device=mean.device)
        with torch.autocast(mean.device.type, enabled=False):  # float32 samples under --bf16
            actions = mean.unsqueeze(-2) + noise @ scale_tril.transpose(-2, -1)  # a = mean + L noise
        return actions, torch.full(actions.shape[:-1], -float(np.log(num_samples)), device=mean.device)

    def log_prob(self, params: tuple[Tensor, Tensor], actions: Tensor) -> Tensor:
        return gaussian_log_prob(actions, *params)  # log pi(a_j|s) [B, M] of actions [B, M, A]

    def kl_terms(self, params_old: tuple[Tensor, Tensor], params: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
        return gaussian_kl_decoupled(*params_old, *params)  # C_mean, C_cov [B] of KL(pi_old || pi) [MPO eq. 27]

    def entropy(self, params: tuple[Tensor, Tensor]) -> Tensor:
        log_diagonal = params[1].diagonal(dim1=-2, dim2=-1).log()  # H = A log(2 pi e) / 2 + sum_i log L_ii  [B]
        return 0.5 * self.action_dim * float(np.log(2 * np.pi * np.e)) + log_diagonal.sum(-1)

    def critic_input(self, actions: Tensor) -> Tensor:
        return actions.clamp(-1.0, 1.0)  # as executed: Q(s, a) = Q(s, clip(a)), never extrapolated (ACME clips it too)

    def env_action(self, actions: Tensor) -> Tensor:
        return self.critic_input(actions) * self.action_scale + self.action_bias  # clipped, rescaled to the env's bounds

    def deterministic(self, obs: Tensor) -> Tensor:
        return self.env_action(self(obs)[0])  # the mean, for evaluation


class CategoricalActor(nn.Module):
    """Categorical policy pi(a|s) = softmax(logits(s)) [MPO App. B], `params` the logits [B, n]; an action is stored as its
    index [B, 1] and fed to the critic one-hot. The E-step enumerates all actions, so it is exact."""

    def __init__(
        self, obs_dim: int, action_space: gym.spaces.Discrete, hidden_sizes: tuple[int, ...], activation: str, layer_norm: bool
    ):
        super().__init__()
        self.action_dim, self.num_actions, self.critic_action_dim = 1, int(action_space.n), int(action_space.n)
        self.trunk = mlp(obs_dim, hidden_sizes, activation, layer_norm)
        self.head = nn.Linear(hidden_sizes[-1], self.num_actions)

    def forward(self, obs: Tensor) -> Tensor:
        return self.head(self.trunk(obs)).to(self.head.weight.dtype)  # [B, n], the weights' dtype under --bf16 too

    def sample(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        logits = self(obs)
        actions = torch.multinomial(logits.softmax(-1), 1).float()  # an index a ~ pi(.|s) [B, 1], as a float
        return actions, self.log_prob(logits, actions.unsqueeze(1))[:, 0]  # and log pi(a|s) [B]

    def candidates(self, logits: Tensor, num_samples: int) -> tuple[Tensor, Tensor]:
        """All n actions per state [B, n, 1], prior weights log pi(a|s) [B, n]: the E-step sums over them exactly."""
        actions = torch.arange(self.num_actions, device=logits.device, dtype=torch.float32)
        return actions.expand(*logits.shape[:-1], -1).unsqueeze(-1), logits.log_softmax(-1)

    def log_prob(self, logits: Tensor, actions: Tensor) -> Tensor:
        return logits.log_softmax(-1).gather(-1, actions[..., 0].long())  # log pi(a_j|s) [B, M] of indices [B, M, 1]

    def kl_terms(self, logits_old: Tensor, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        """KL(pi_old || pi) = sum_a pi_old(a) log(pi_old(a) / pi(a)) [B] [MPO eq. 12, App. B]; no covariance part."""
        log_p_old = logits_old.log_softmax(-1)
        return (log_p_old.exp() * (log_p_old - logits.log_softmax(-1))).sum(-1), None  # epsilon_mean bounds all of it

    def entropy(self, logits: Tensor) -> Tensor:
        return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)  # [B]

    def critic_input(self, actions: Tensor) -> Tensor:
        return F.one_hot(actions[..., 0].long(), self.num_actions).to(actions.dtype)  # one-hot [..., n] from indices [..., 1]

    def env_action(self, actions: Tensor) -> Tensor:
        return actions[..., 0].long()

    def deterministic(self, obs: Tensor) -> Tensor:
        return self(obs).argmax(-1)  # the most probable action, for evaluation


class Critic(nn.Module):
    """E Q-functions Q_e(s, a) [MPO Sec. 4: one, E = 1; --num-critics 2: clipped double Q, whose minimum is Q' wherever
    the update reads the target critic]: obs [N, 1, O] and actions [N, M, A] give Q [E, N, M]."""

    def __init__(
        self, obs_dim: int, action_dim: int, hidden_sizes: tuple[int, ...], activation: str, layer_norm: bool, num_critics: int
    ):
        super().__init__()
        member = (obs_dim, action_dim, hidden_sizes, activation, layer_norm)
        self.members = nn.ModuleList(QFunction(*member) for _ in range(num_critics))

    def forward(self, obs: Tensor, actions: Tensor) -> Tensor:
        return torch.stack([member(obs, actions) for member in self.members])  # [E, ...]


class QFunction(nn.Module):
    """Q(s, a), an MLP on [s, a]. The first layer is split into its state and action columns, so that the M actions of a
    state share its half: obs [N, 1, O] and actions [N, M, A] give Q [N, M]."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: tuple[int, ...], activation: str, layer_norm: bool):
        super().__init__()
        width = hidden_sizes[0]
        self.obs_layer = nn.Linear(obs_dim, width)
        self.action_layer = nn.Linear(action_dim, width, bias=False)
        bound = (obs_dim + action_dim) ** -0.5  # nn.Linear's initialisation of the joint layer
        for p in (*self.obs_layer.parameters(), self.action_layer.weight):
            nn.init.uniform_(p, -bound, bound)
        self.norm = nn.LayerNorm(width) if layer_norm else nn.Identity()
        self.activation = ACTIVATIONS[activation]()
        self.body = mlp(width, hidden_sizes[1:], activation, False)
        self.head = nn.Linear(hidden_sizes[-1], 1)

    def forward(self, obs: Tensor, actions: Tensor) -> Tensor:
        x = self.action_layer(actions).add_(self.obs_layer(obs))  # broadcast: [N, M, H] or [B, H]
        q = self.head(self.body(self.activation(self.norm(x))))  # [..., 1]
        return q.to(self.head.weight.dtype).squeeze(-1)  # [N, M] or [B], the weights' dtype under --bf16 too


# == 3. Storage ============================================================================================
class Batch(NamedTuple):
    obs: Tensor  # [B, T, O]
    actions: Tensor  # [B, T, A], the policy's samples as stored (before clipping)
    behaviour_log_prob: Tensor  # [B, T], log b(a|s) stored at acting time [MPO eq. 13]
    rewards: Tensor  # [B, T]
    next_obs: Tensor  # [B, T, O]
    terminated: Tensor  # [B, T], 1.0 where the MDP ended (no bootstrap)
    valid: Tensor  # [B, T], 1.0 for the steps that belong to the snippet


class SnippetReplay:
    """Ring buffer of transitions in time order per env [rows, num_envs, ...], sampled as snippets of T steps of one env,
    the trajectories Retrace needs [MPO Sec. 4]. A snippet stops after the first episode end and at the newest row, so it
    never joins two episodes; next_obs is stored per row, so an episode's last step keeps its true last observation."""

    COLUMNS = ("obs", "actions", "behaviour_log_prob", "rewards", "next_obs", "terminated", "ended")

    def __init__(self, capacity: int, num_envs: int, obs_dim: int, action_dim: int, snippet_length: int, device: torch.device):
        self.rows, self.num_envs, self.length = capacity // num_envs, num_envs, snippet_length
        self.pos, self.size = 0, 0  # in rows (one row = one vector step)
        widths = {"obs": (obs_dim,), "actions": (action_dim,), "next_obs": (obs_dim,)}
        self.data = {name: torch.zeros(self.rows, num_envs, *widths.get(name, ()), device=device) for name in self.COLUMNS}

    def add(self, *columns: np.ndarray | Tensor) -> None:
        """Store one vector step: one array per column of COLUMNS, in that order, with leading size num_envs."""
        for column, values in zip(self.data.values(), columns, strict=True):
            column[self.pos] = torch.as_tensor(values, dtype=torch.float32)
        self.pos = (self.pos + 1) % self.rows
        self.size = min(self.size + 1, self.rows)

    def sample(self, batch_size: int) -> Batch:
        """Snippets from uniform start rows and envs; step k is valid if written after the start, with no end before it."""
        device = self.data["rewards"].device
        start = torch.randint(0, self.size, (batch_size,), device=device)
        env = torch.randint(0, self.num_envs, (batch_size, 1), device=device)
        steps = torch.arange(self.length, device=device)
        rows = (start.unsqueeze(1) + steps) % self.rows  # [B, T]
        snippet = {name: column[rows, env] for name, column in self.data.items()}
        newer = (self.pos - 1 - start) % self.rows  # rows written after the start row
        ended_before = snippet["ended"].cumsum(1) - snippet["ended"]  # [B, T]
        valid = (steps <= newer.unsqueeze(1)) & (ended_before == 0)
        return Batch(**{name: snippet[name] for name in Batch._fields if name != "valid"}, valid=valid.float())

    def state_dict(self) -> dict:
        # clone: a saved slice would carry its whole preallocated storage into resume.pt
        return {"pos": self.pos, "size": self.size, "data": {k: v[: self.size].clone() for k, v in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.size = state["pos"], state["size"]
        for name, column in self.data.items():
            column[: self.size] = state["data"][name].to(column.device)
        if self.size:  # the saving run stopped mid-episode and a resumed run starts afresh: a truncation, bootstrapped
            self.data["ended"][(self.pos - 1) % self.rows] = 1.0


# == 4. Algorithm ==========================================================================================
DUAL_MIN = 1e-8  # added to softplus in dual_variable, so that eta and alpha stay positive (ACME)
LOG_DUAL_MIN = -18.0  # lower clamp of the dual parameters after each step (ACME's clamp)


def gaussian_log_prob(actions: Tensor, mean: Tensor, scale_tril: Tensor) -> Tensor:
    """log N(a; mean, L L^T) = -|L^-1 (a - mean)|^2 / 2 - sum_i log L_ii - A log(2 pi) / 2, the policy of [MPO App. D]
    with Sigma = L L^T; one triangular solve per state serves its M actions. Shapes: actions [B, M, A]; mean [B, A];
    scale_tril L [B, A, A] (lower triangular, positive diagonal); returns [B, M]."""
    diff = (actions - mean.unsqueeze(-2)).transpose(-2, -1)  # [B, A, M]
    z = torch.linalg.solve_triangular(scale_tril, diff, upper=False)  # [B, A, M]
    log_det = scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1, keepdim=True)  # [B, 1]
    return -0.5 * z.pow(2).sum(-2) - log_det - 0.5 * mean.shape[-1] * float(np.log(2 * np.pi))


def gaussian_kl_decoupled(mean_old: Tensor, scale_tril_old: Tensor, mean: Tensor, scale_tril: Tensor) -> tuple[Tensor, Tensor]:
    """KL(pi_old || pi) of two Gaussians split into a mean and a covariance part [MPO App. D, eq. 27], KL = C_mean + C_cov:
        C_mean = (mean - mean_old)^T Sigma^-1 (mean - mean_old) / 2,
        C_cov  = (tr(Sigma^-1 Sigma_old) - A + log(|Sigma| / |Sigma_old|)) / 2,
    Sigma = L L^T the online, Sigma_old = L_old L_old^T the old (target) covariance (ACME's C_mean uses Sigma_old: fully
    decoupled gradients, but a sum that is not the KL). Shapes: mean_old, mean [B, A]; scale_tril_old, scale_tril
    [B, A, A]; returns two [B]."""
    diff = (mean - mean_old).unsqueeze(-1)  # [B, A, 1]
    # |L^-1 (mean - mean_old)|^2 is the Mahalanobis term, |L^-1 L_old|_F^2 = tr(Sigma^-1 Sigma_old)
    whitened = torch.linalg.solve_triangular(scale_tril, torch.cat([diff, scale_tril_old], dim=-1), upper=False)
    log_diagonals = scale_tril.diagonal(dim1=-2, dim2=-1).log() - scale_tril_old.diagonal(dim1=-2, dim2=-1).log()
    log_det_ratio = 2 * log_diagonals.sum(-1)  # log |Sigma| / |Sigma_old|
    kl_mean = 0.5 * whitened[..., 0].pow(2).sum(-1)  # whitened [B, A, 1 + A]
    kl_cov = 0.5 * (whitened[..., 1:].pow(2).sum((-2, -1)) - mean.shape[-1] + log_det_ratio)
    return kl_mean, kl_cov


def temperature_dual(eta: Tensor, q: Tensor, log_prior: Tensor, epsilon: float) -> Tensor:
    """The convex dual of the E-step (eq. 7) on each state's candidates [MPO eq. 9, App. D.2], Q = q (target critic):
        g(eta) = eta epsilon + eta mean_s log sum_j prior_j exp(Q(s, a_j) / eta),
    prior_j = 1/M for M samples of pi_old, pi_old(a_j|s) for all actions of a categorical policy. dg/deta = epsilon -
    mean_s KL(q || pi_old), so the minimiser puts the E-step's KL at epsilon. Shapes: q, log_prior [B, M]; eta, g scalars."""
    return eta * epsilon + eta * torch.logsumexp(q / eta + log_prior, dim=-1).mean()


def e_step_weights(q: Tensor, eta: Tensor, log_prior: Tensor) -> Tensor:
    """The non-parametric E-step [MPO eq. 8: q_i(a|s) proportional to pi(a|s, theta_i) exp(Q_theta_i(s, a) / eta*)] on the
    candidates: q(a_j|s) = prior_j exp(Q(s, a_j) / eta) / sum_k prior_k exp(Q(s, a_k) / eta), normalised per state [B, M]."""
    return torch.softmax(q / eta + log_prior, dim=-1)


def dual_variable(log_dual: Tensor) -> Tensor:
    """A positive dual variable (eta, alpha_mean, alpha_cov) from its parameter: eta = softplus(log_eta) + DUAL_MIN, as in
    [ACME], which also calls the parameters log_*. A multiplier then grows at most linearly while its bound is violated
    (with exp, exponentially, until Adam's second moment overflows). Shapes: any; returns the same shape."""
    return F.softplus(log_dual) + DUAL_MIN


def log_dual(init: float, device: torch.device) -> Tensor:
    """The trainable parameter whose dual_variable is init: the inverse softplus, written stably."""
    value = max(init - DUAL_MIN, DUAL_MIN)
    return torch.tensor(value + np.log(-np.expm1(-value)), device=device, requires_grad=True)


def kl_penalty(kl: Tensor, alpha: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """The Lagrangian term alpha (epsilon - E_s KL) of the M-step [MPO App. D.3], split for simultaneous gradient steps:
    the policy minimises sg(alpha) E_s KL, the multiplier alpha (epsilon - sg(E_s KL)), so alpha grows while the bound is
    violated. Symbols: eta_mu, eta_Sigma of App. D.3 = alpha (eta is the E-step's temperature here); epsilon_mu,
    epsilon_Sigma = epsilon; C_mu, C_Sigma = kl. Shapes: kl [B]; alpha scalar; returns (policy term, multiplier loss)."""
    kl = kl.mean()
    return alpha.detach() * kl, alpha * (epsilon - kl.detach())


def take(params: Tensor | tuple[Tensor, Tensor], index: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    """The rows `index` of a policy's params: the logits [N, n] or the pair (mean [N, A], scale_tril [N, A, A])."""
    return tuple(x[index] for x in params) if isinstance(params, tuple) else params[index]


def retrace_target(
    rewards: Tensor, terminated: Tensor, valid: Tensor, q_taken: Tensor, next_v: Tensor, traces: Tensor, gamma: float
) -> Tensor:
    """Retrace targets for every step of the snippets [MPO eq. 13, with the gamma before E_pi of [Retrace]], by the recursion
        Q_ret(s_k, a_k) = r_k + gamma (1 - terminated_k) [V'(s'_k) + c_{k+1} (Q_ret(s_{k+1}, a_{k+1}) - Q'(s_{k+1}, a_{k+1}))],
    c_{k+1} = 0 where the snippet stops (after T steps: eq. 13's bootstrap with Q'; after an episode end; at the newest
    data). Symbols: c_k = traces = lambda min(1, pi(a_k|s_k) / b(a_k|s_k)); Q' = q_taken, at the stored actions; V'(s') =
    next_v = E_{a ~ pi} Q'(s', a). Shapes: all inputs [B, T]; returns [B, T], 0 where valid is 0."""
    targets = []
    correction = torch.zeros_like(rewards[:, 0])  # c_{k+1} (Q_ret - Q') at step k + 1
    for k in reversed(range(rewards.shape[1])):
        bootstrap = gamma * (1.0 - terminated[:, k]) * (next_v[:, k] + correction)
        targets.append(valid[:, k] * (rewards[:, k] + bootstrap))
        correction = valid[:, k] * traces[:, k] * (targets[-1] - q_taken[:, k])
    return torch.stack(targets[::-1], dim=1)


# == 5. Updates ============================================================================================
VALUE_CHUNK = 64  # states per target-critic call on a CPU (64 states x M = 20 actions is fast)


def update(
    actor: GaussianActor | CategoricalActor,
    actor_target: GaussianActor | CategoricalActor,
    critic: Critic,
    critic_target: Critic,
    optimizers: tuple[Optimizer, Optimizer, Optimizer],
    log_eta: Tensor,
    log_alpha_mean: Tensor,
    log_alpha_cov: Tensor,
    batch: Batch,
    args: Args,
) -> dict[str, Tensor]:
    """One step on (Q(s_t, a_t) - Q_ret)^2 / 2 [MPO Sec. 4, eq. 13], g(eta), the policy's weighted likelihood plus KL
    penalties and alpha (epsilon - C) [MPO Alg. 2, lines 15-20] on every valid step t of the snippets, one backward pass;
    then clamp the duals."""
    # s_0 .. s_T of each snippet: s_{t+1} = s'_t, the stored s_{t+1} wherever step t + 1 is valid [B (T + 1), O]
    states = torch.cat([batch.obs[:, :1], batch.next_obs], dim=1).flatten(0, 1)
    rows = torch.arange(len(states), device=states.device).view(len(batch.obs), -1)[:, :-1].flatten()  # s_t's rows [B T]
    valid = batch.valid.flatten().bool()  # [B T]
    stored = batch.actions.flatten(0, 1)  # a_t [B T, A]
    with torch.no_grad():
        params_old = actor_target(states)  # pi'(.|s) [B (T + 1), ...]
        # [MPO Alg. 2, l. 11] one sample set a_j ~ pi'(.|s) per state (all actions, weighted by pi', if discrete) serves both
        # integrals: V'(s_t) = E_pi' Q'(s_t, .) of Retrace and the E-step at s_t; Q' in chunks on a CPU (page faults)
        actions, log_prior = actor_target.candidates(params_old, args.num_samples)  # [B (T + 1), M, A], [B (T + 1), M]
        chunk = VALUE_CHUNK if states.device.type == "cpu" else len(states)
        pieces = zip(states.unsqueeze(1).split(chunk), actor_target.critic_input(actions).split(chunk))
        q_candidates = torch.cat([critic_target(*piece).amin(0) for piece in pieces])  # Q'(s, a_j) = min_e Q'_e [B (T + 1), M]
        next_v = (log_prior.exp() * q_candidates).sum(-1)[rows + 1].view_as(batch.rewards)  # V'(s'_t) [B, T]
        # [MPO eq. 13] c_t = lambda min(1, pi'(a_t|s_t) / b(a_t|s_t)) [B, T], b stored when acting; pi' as in the E-step (ACME)
        log_pi = actor_target.log_prob(take(params_old, rows), stored.unsqueeze(1)).view_as(batch.rewards)
        traces = args.retrace_lambda * (log_pi - batch.behaviour_log_prob).clamp(max=0.0).exp()
        q_taken = critic_target(states[rows], actor_target.critic_input(stored)).amin(0).view_as(batch.rewards)
        target = retrace_target(batch.rewards, batch.terminated, batch.valid, q_taken, next_v, traces, args.gamma)
    # every valid step t trains the critic, the E-step and the M-step [MPO eq. 13; ACME]: N pairs (s_t, a_t), their samples
    train_rows = rows[valid]  # [N]
    obs, params_old = states[train_rows], take(params_old, train_rows)  # s_t [N, O], pi'(.|s_t)
    actions, log_prior, q_candidates = actions[train_rows], log_prior[train_rows], q_candidates[train_rows]  # [N, M, ...]
    q = critic(obs, actor_target.critic_input(stored[valid]))  # [E, N]
    q_loss = 0.5 * (q - target.flatten()[valid]).pow(2).mean(-1).sum()  # [MPO Sec. 4] squared loss to Q_ret, each Q_e
    # E-step [MPO eq. 8-9]: eta steps on the dual, the weights use its current value (alpha_*: the M-step's)
    eta, alpha_mean, alpha_cov = (dual_variable(x) for x in (log_eta, log_alpha_mean, log_alpha_cov))
    eta_loss = temperature_dual(eta, q_candidates, log_prior, args.epsilon)
    weights = e_step_weights(q_candidates, eta.detach(), log_prior)  # [N, M]
    # M-step [MPO eq. 10, 12]: weighted maximum likelihood of the candidates under the decoupled KL bounds [MPO App. D.3]
    params = actor(obs)
    policy_loss = -(weights * actor.log_prob(params, actions)).sum(-1).mean()
    kl_mean, kl_cov = actor.kl_terms(params_old, params)  # [N] each; no kl_cov when discrete
    penalty, alpha_loss = kl_penalty(kl_mean, alpha_mean, args.epsilon_mean)
    metrics = {"stats/kl_mean": kl_mean.detach().mean(), "stats/alpha_mean": alpha_mean.detach()}
    if kl_cov is not None:
        penalty_cov, alpha_loss_cov = kl_penalty(kl_cov, alpha_cov, args.epsilon_cov)
        penalty, alpha_loss = penalty + penalty_cov, alpha_loss + alpha_loss_cov
        metrics.update({"stats/kl_cov": kl_cov.detach().mean(), "stats/alpha_cov": alpha_cov.detach()})
    dual_loss = eta_loss + alpha_loss
    for optimizer in optimizers:  # the actor's, the critic's, the duals'
        optimizer.zero_grad(set_to_none=True)
    (q_loss + policy_loss + penalty + dual_loss).backward()  # disjoint parameters: one backward serves all
    for optimizer in optimizers:
        optimizer.step()
    with torch.no_grad():
        for parameter in (log_eta, log_alpha_mean, log_alpha_cov):
            parameter.clamp_(min=LOG_DUAL_MIN)
    metrics.update({"losses/q": q_loss.detach(), "losses/policy": policy_loss.detach(), "losses/dual": dual_loss.detach()})
    metrics.update({"stats/q_mean": q.detach().mean(), "stats/eta": eta.detach()})
    metrics["stats/trace"] = traces.flatten()[valid].mean()
    metrics["stats/kl_q"] = (torch.xlogy(weights, weights) - weights * log_prior).sum(-1).mean()  # KL(q || pi')
    metrics["stats/entropy"] = actor.entropy(params).detach().mean()
    return metrics


# == 6. Training ===========================================================================================
def train(args: Args) -> dict:
    """Train MPO; returns the final metrics, counters and the run directory."""
    device = setup(args)  # seeds, torch threads, device
    # -- environments
    envs = make_vec_env(args.env, args.num_envs)
    obs_dim, action_space = envs.single_observation_space.shape[0], envs.single_action_space
    # -- networks and optimizers
    policy = (obs_dim, action_space, args.policy_hidden_sizes, args.activation, args.layer_norm)
    if isinstance(action_space, gym.spaces.Discrete):
        actor, actor_target = CategoricalActor(*policy).to(device), CategoricalActor(*policy).to(device)
    else:
        actor, actor_target = (GaussianActor(*policy, args.full_covariance).to(device) for _ in range(2))
    actor_target.load_state_dict(actor.state_dict())
    actor_target.requires_grad_(False)
    value = (obs_dim, actor.critic_action_dim, args.critic_hidden_sizes, args.activation, args.layer_norm, args.num_critics)
    critic, critic_target = Critic(*value).to(device), Critic(*value).to(device)
    critic_target.load_state_dict(critic.state_dict())
    critic_target.requires_grad_(False)
    log_eta = log_dual(args.eta_init, device)
    log_alpha_mean, log_alpha_cov = log_dual(args.alpha_mean_init, device), log_dual(args.alpha_cov_init, device)
    duals = dict(log_eta=log_eta, log_alpha_mean=log_alpha_mean, log_alpha_cov=log_alpha_cov)
    # fused Adam: one kernel per step for all parameters instead of several per tensor
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=True)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.q_lr, fused=True)
    dual_opt = torch.optim.Adam([log_eta, log_alpha_mean, log_alpha_cov], lr=args.dual_lr, fused=True)
    nets = (actor, actor_target, critic, critic_target, (actor_opt, critic_opt, dual_opt))  # update's inputs
    # --bf16: the update under torch.autocast (bfloat16 matrix products); off, a no-op
    update_step = torch.autocast(device.type, torch.bfloat16, enabled=args.bf16)(update)
    # -- storage
    replay = SnippetReplay(args.buffer_size, args.num_envs, obs_dim, actor.action_dim, args.retrace_steps, device)
    # -- run: directory, logging, evaluation, saving, resume (below the fence)
    model = dict(actor=actor, actor_target=actor_target, critic=critic, critic_target=critic_target, **duals)
    train_state = dict(actor_opt=actor_opt, critic_opt=critic_opt, dual_opt=dual_opt, replay=replay)
    run = Run(args, envs, model=model, train_state=train_state, act=lambda obs: actor.deterministic(obs.float()))
    if args.eval_only:
        return run.evaluate_only()
    global_step, num_updates = run.start()
    obs, _ = envs.reset(seed=args.seed + global_step)  # a resumed run starts fresh episodes
    while global_step < args.total_steps:
        # act: pi from the first step (no uniform warm-up), so b(a|s) is known for every action
        with torch.no_grad():
            actions, log_probs = actor.sample(torch.as_tensor(obs, dtype=torch.float32, device=device))
        # step: the env executes the action clipped to its bounds; the replay keeps the sample
        next_obs, rewards, terminated, truncated, infos = envs.step(actor.env_action(actions).cpu().numpy())
        global_step += args.num_envs
        run.add_episodes(global_step, infos)
        # store: an ended episode's true last observation, never the next episode's first
        ended, real_next_obs = terminated | truncated, next_obs.copy()
        for i in np.flatnonzero(ended):
            real_next_obs[i] = infos["final_obs"][i]
        replay.add(obs, actions, log_probs, rewards, real_next_obs, terminated, ended)  # in the order of COLUMNS
        obs = next_obs
        # update: one critic step, E-step and M-step per environment step
        if global_step >= args.learning_starts:
            for _ in range(args.num_envs):
                batch = replay.sample(-(-args.batch_size // args.retrace_steps))  # ceil(B / T) snippets, >= B pairs
                run.add_metrics(update_step(*nets, log_eta, log_alpha_mean, log_alpha_cov, batch, args))
                num_updates += 1
                if num_updates % args.target_network_frequency == 0:  # [MPO Alg. 2, line 25] pi' <- pi (the M-step's), Q' <- Q
                    actor_target.load_state_dict(actor.state_dict())
                    critic_target.load_state_dict(critic.state_dict())
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
