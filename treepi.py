# /// script
# requires-python = ">=3.10"
# dependencies = ["torch>=2.6", "numpy>=1.26", "gymnasium[mujoco]>=1.1,<2", "mujoco>=4.0.1", "tensorboard>=2.14", "tyro>=0.9", "dm-control>=1.0.52", "shimmy[dm-control]>=2.0.1", "moviepy>=2"]
# ///
"""TreePI: tree search for policy improvement in continuous action spaces, in one file.

References:
    [TreePI] Springenberg, Heess, Mankowitz, Merel, Byravan, Abdolmaleki, Kay, Degrave, Schrittwieser, Tassa, Buchli,
        Belov, Riedmiller 2020, "Local Search for Policy Iteration in Continuous Control", arXiv:2010.05545 (Alg. 1 the
        search, eq. 3-6, App. A.2 the estimator, App. A.3 Alg. 2 the training loop, App. B and Table 1 the networks).
    [MPO] Abdolmaleki, Springenberg, Tassa, Munos, Heess, Riedmiller 2018, "Maximum a Posteriori Policy Optimisation",
        arXiv:1806.06920: the sampled-action E-step (--e-step mpo: MPO+Predictive) and the KL-bounded M-step, as in mpo.py.
    [ACME] Hoffman et al. 2020, arXiv:2006.00979, acme/jax/losses/mpo.py: the softplus duals, their learning rate, clamp.
    [MuZero] Schrittwieser et al. 2020, arXiv:1911.08265: its value target z_t = u_{t+1} + ... + gamma^n nu_{t+n} bootstraps
        from the search value nu_{t+n} at the observed o_{t+n}, not at the unrolled latent (--bootstrap-state).

Names: the paper's fixed search temperature alpha is `temperature`; its trust-region multiplier eta keeps mpo.py's (and
ACME's) name `alpha_mean` (`alpha_cov` for MPO's covariance bound), MPO's E-step temperature is mpo.py's `eta`, so that
`diff mpo.py treepi.py` shows the search and the model; pi^(i), Q-hat^pi_pi(i) are `actor_target`, `critic_target`.

Algorithm (one environment step; the function that does each line in brackets):
    1. Act a ~ pi^(i)(.|s) (--act policy: TreePI/pi) or by the root weights of a search from the env's state (--act
       search: TreePI/search); store the step per env in time order                 [select_actions, SnippetReplay]
    2. updates_per_step times, on B snippets of T steps: s_t = f_trans(f_enc(o_1), a_1..a_{t-1}) (--model learned) or
       the true state (--model true); L_r = (r_t - r(s_t, a_t))^2 (learned model); L_Q = (r_t + gamma (1 - terminated_t)
       E_{pi^(i)} Q'(s_{t+1}, .) - Q(s_t, a_t))^2, s_{t+1} = f_enc(o_{t+1}) (learned)  [LatentModel.unroll, q_target]
    3. E-step: a search (Alg. 1) from valid s_t drawn at random, M actions per node, depth K, N rollouts; the root's
       actions a_j, weights w_j = softmax_j(Q-hat_j / alpha) (eq. 4)                 [proposals, search, root_weights]
       or, --e-step mpo (MPO+Predictive, Sec. 6.1, App. D), at every valid s_t: a_j ~ pi^(i), w_j = softmax_j(Q'(s_t,
       a_j) / eta), eta by a step on MPO's dual g(eta) at bound epsilon (eq. 9)       [temperature_dual, e_step_weights]
    4. M-step (eq. 6): L_pi = -sum_j w_j log pi(a_j|s_t) + alpha_mean (KL[pi^(i) || pi] - eps_KL) (or MPO's separate
       mean and covariance bounds); one step on L_r + L_Q + L_pi, the multipliers by gradient ascent  [update, kl_penalty]
    5. Q' <- Q every target_network_frequency updates, pi^(i+1) <- pi every policy_target_frequency updates    [train]

Shapes: B batch (snippets, or searched roots), T snippet length, O observation, A action, M actions per node, K depth,
N rollouts, C nodes per tree, L latent size, S node state (L, or O + P: the simulator's [observation | P physics]).

Readings of inconsistencies in the paper, and deviations from it:
    - N = 100 (Table 1 "lists all parameters"; Sec. 6.1: 200); Table 1's period 200 is Q''s, Sec. 5's 500 pi^(i)'s; the
      transition reward r(s_t, a_t) everywhere (eq. 3, Alg. 1: r(s)); the TD target at s_{t+1} (eq. 6 prints s_t), with
      a learned model at f_enc(o_{t+1}) of the observed o_{t+1} (MuZero's bootstrap; eq. 6's unrolled f(o_1, a_1..a_t),
      --bootstrap-state unrolled, left TreePI/pi near 100-200 on InvertedDoublePendulum-v5, where this balances it).
    - Gymnasium ends Hopper episodes (the control suite never does): a termination head gives the tree gamma (1 - p);
      the true model uses the env's own termination. alpha is in reward units, tuned on the suite's [0, 1]: --reward-scale.
    - CPU defaults (--help names each paper value): 64-wide networks, batch 64, N = 16, one update per env step with
      target periods 20 and 50 (the paper's pace at 10 updates per step), a search from 16 random states per batch,
      ReLU for Table 1's ELU (whose expm1 costs a CPU ~3 ns an element: 18% of an update's operator time).
      E_{pi^(i)} Q'(s_{t+1}, .) in L_Q, whose sample count eq. 6 leaves open, averages 4 actions (M = 20 made the TD
      target a quarter of an update's time).
    - With the true model the policy loss stays eq. 6's (Sec. 6.2's switch serves 16 distributed actors). No uniform
      warm-up. The duals are softplus of parameters with Adam steps at --dual-lr, clamped below (ACME; no rate given).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium.envs.mujoco.mujoco_env import MujocoEnv
from torch import Tensor, nn
from torch.optim import Optimizer

ALGO = "treepi"
ACTION_SPACES = (gym.spaces.Box,)  # a Gaussian policy, its actions clipped to the env's bounds


# == 1. Arguments ==========================================================================================
@dataclass
class Args:
    # -- algorithm ----------------------------------------------------------------------------------------
    # Model and acting [TreePI Sec. 5, 6.1, 6.2]
    model: Literal["learned", "true"] = "learned"
    """Search model: a learned latent model (Sec. 5) or the MuJoCo simulator itself, stepped from saved states (Sec. 6.2)."""
    act: Literal["policy", "search"] = "policy"
    """Act with pi^(i) (TreePI/pi) or by a search at every step (TreePI/search); evaluation uses the greedy form."""
    e_step: Literal["search", "mpo"] = "search"
    """TreePI's search, or MPO's E-step on all valid states: MPO+Predictive [TreePI Sec. 6.1; Table 2: --epsilon-cov 1e-4]."""
    reward_scale: float = 1.0
    """Factor on rewards before they are stored or searched, alpha's unit: 1/r_max (Hopper-v5: 0.25) gives [0, 1] per step."""
    # Networks [TreePI Table 1, App. B]
    model_sizes: tuple[int, ...] = (64, 64)
    """Encoder and transition layers, the last the latent size (paper: 256 256; 64 for a CPU: an update is 4x cheaper)."""
    policy_hidden_sizes: tuple[int, ...] = (64, 64, 64)
    """Hidden layer sizes of the policy (paper: 256 256 256, Table 1's 256-LN-256-256)."""
    critic_hidden_sizes: tuple[int, ...] = (64, 64, 64)
    """Hidden layer sizes of the Q-function and of the reward network (paper: 256 256 256)."""
    activation: Literal["relu", "elu", "tanh"] = "relu"
    """Hidden activation (paper: elu, Table 1; relu for a CPU: 1.18x the env steps/s, learning alike; see README)."""
    layer_norm: bool = True
    """LayerNorm after the first hidden layer of every network [TreePI Table 1: 'LN']."""
    full_covariance: bool = False
    """Gaussian policy with a full covariance (Cholesky factor) [MPO App. D] ([TreePI] App. B: diagonal)."""
    bf16: bool = False
    """The searches' network passes in bfloat16 matrix products (tree, samples, updates stay float32); paper: float32."""
    # Replay [TreePI Sec. 5, Table 1]
    buffer_size: int = 2_000_000
    """Replay capacity in transitions [TreePI Table 1: 2e6]; memory is taken for no more than total_steps of them."""
    batch_size: int = 64
    """Snippets per gradient step (paper: 256, Table 1; 64 for a CPU)."""
    snippet_length: int = 5
    """Steps T of a snippet, over which the latent model is unrolled (paper: not given)."""
    learning_starts: int = 5_000
    """Env steps (acting with the initial pi^(i) or search) before gradient steps begin (paper: not given)."""
    updates_per_step: int = 1
    """Gradient steps per env step (paper: 10 in Fig. 1, 1-20 in Fig. 2; 1 keeps a CPU run usable)."""
    gamma: float = 0.99
    """Discount factor gamma of the TD target and of the tree [TreePI Table 1]."""
    target_network_frequency: int = 20
    """Gradient steps between copies Q' <- Q (paper: 200, Table 1, at 10 updates per env step: the same pace)."""
    target_samples: int = 4
    """Actions a ~ pi^(i) per next state for E_pi Q'(s_{t+1}, .) in L_Q's target (eq. 6 gives no count; M = 20: 1.3x the update)."""
    bootstrap_state: Literal["observed", "unrolled"] = "observed"
    """The learned model's s_{t+1} in L_Q's target: f_enc(o_{t+1}) of the observed o_{t+1} (as MuZero bootstraps), or
    the unroll's f(o_1, a_1..a_t) (eq. 6's notation read literally; it stalls on InvertedDoublePendulum-v5); no gradient."""
    policy_target_frequency: int = 50
    """Gradient steps between policy rounds pi^(i+1) <- pi (paper: 500, Sec. 5, at 10 updates per env step)."""
    q_lr: float = 3e-4
    """Adam learning rate of the Q-function, the reward network and the model [TreePI Table 1]."""
    policy_lr: float = 3e-4
    """Adam learning rate of the policy [TreePI Table 1]."""
    # Search, the E-step [TreePI Alg. 1, Table 1]
    num_samples: int = 20
    """Branching factor M: actions sampled from pi^(i) per node, and for E_pi Q' [TreePI Table 1]."""
    depth: int = 10
    """Maximum depth K of the tree [TreePI Table 1]; 1 is TreePI(1): MPO's one-step weights at the fixed alpha (Fig. 1)."""
    num_rollouts: int = 16
    """Rollouts N per search, the root's included (paper: 100, Table 1; Sec. 6.1: 200; 16 for a CPU)."""
    # exp(Q-hat / alpha): the control suite pays [0, 1] per step; a trained Hopper-v5 3-4, HalfCheetah-v5 ~10, where 0.1
    # is nearly greedy (Hopper-v5: KL(w || 1/M) 2.3-2.9 of log 20 = 3.0); --reward-scale 1/r_max restores the paper's regime
    temperature: float = 0.1
    """Search temperature alpha, fixed [TreePI Table 1: 0.1], in reward units: tuned for rewards in [0, 1] per step."""
    search_states: int = 16
    """Valid states of each batch searched, drawn at random (0: all B x T, the paper; the search is an update's cost)."""
    # M-step trust region [TreePI eq. 6, MPO App. D]
    epsilon_mean: float = 0.005
    """Bound eps_KL on KL(pi^(i) || pi) [TreePI Sec. 5: 0.005]; with --epsilon-cov, the bound on its mean part only."""
    epsilon_cov: float | None = None
    """Bound on the covariance part of the KL (None: one bound on the whole KL, [TreePI] eq. 6; MPO's Table 2: 1e-4)."""
    dual_lr: float = 1e-2
    """Adam learning rate of the multipliers' parameters log_alpha_mean and log_alpha_cov (paper: not given; ACME)."""
    alpha_mean_init: float = 1.0
    """Initial multiplier alpha_mean of the (whole or mean) KL bound, eta of [TreePI] eq. 6 (paper: not given; ACME: 10)."""
    alpha_cov_init: float = 100.0
    """Initial multiplier alpha_cov of the covariance bound (ACME: 1000): large, so that epsilon_cov holds from the start."""
    # MPO's E-step (--e-step mpo) [MPO eq. 7-9]
    epsilon: float = 0.1
    """KL bound epsilon of the non-parametric E-step [MPO eq. 7; Table 2: 0.1]."""
    eta_init: float = 1.0
    """Initial temperature eta (ACME: 10)."""
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
    positive = ["batch_size", "snippet_length", "target_network_frequency", "policy_target_frequency", "num_samples"]
    positive += ["target_samples", "depth", "num_rollouts", "temperature", "epsilon_mean", "alpha_mean_init", "q_lr"]
    positive += ["policy_lr", "dual_lr", "epsilon", "eta_init", "reward_scale"]
    nonnegative = min(args.learning_starts, args.updates_per_step, args.search_states) >= 0
    covariance_bound = args.alpha_cov_init > 0 and (args.epsilon_cov is None or args.epsilon_cov > 0)
    return [
        (len(args.model_sizes) >= 2 and min(args.model_sizes) > 0, "--model-sizes needs two or more positive sizes"),
        (min(args.policy_hidden_sizes + args.critic_hidden_sizes, default=0) > 0, "--*-hidden-sizes must be positive"),
        *((getattr(args, k) > 0, f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}") for k in positive),
        (covariance_bound, "--alpha-cov-init and --epsilon-cov must be positive"),
        (args.buffer_size >= args.num_envs * args.snippet_length, "--buffer-size must hold --snippet-length steps per env"),
        (nonnegative, "--learning-starts, --updates-per-step and --search-states must be >= 0"),
        (0.0 <= args.gamma <= 1.0, f"--gamma must be in [0, 1], got {args.gamma}"),
    ]


# == 2. Networks ===========================================================================================
ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh}
SCALE_MIN = 1e-6  # the least standard deviation (Cholesky diagonal): a numerical guard (ACME's value)
Sizes = tuple[int, ...]  # layer widths
Plan = Callable[[Tensor], tuple[Tensor, Tensor]]  # the E-step: roots [n, S] -> root actions [n, M, A], weights [n, M]


class MLP(nn.Sequential):
    """nn.Sequential that calls its layers' forward directly: the same arithmetic without nn.Module.__call__'s dispatch
    (about 2 us a layer), which the search's many small network passes make about 5% of an update at the CPU defaults."""

    def forward(self, x: Tensor) -> Tensor:
        for layer in self:
            x = layer.forward(x)
        return x


def mlp(in_dim: int, hidden_sizes: tuple[int, ...], activation: str, layer_norm: bool) -> MLP:
    """Linear + activation layers; optional LayerNorm after the first Linear ([TreePI] '256-LN')."""
    layers: list[nn.Module] = []
    for i, size in enumerate(hidden_sizes):
        layers.append(nn.Linear(in_dim, size))
        if layer_norm and i == 0:
            layers.append(nn.LayerNorm(size))
        layers.append(ACTIVATIONS[activation]())
        in_dim = size
    return MLP(*layers)


class GaussianActor(nn.Module):
    """Gaussian policy pi(a|s) = N(mean(s), L(s) L(s)^T) on actions rescaled to [-1, 1]^A, `params` the pair (mean [B, A],
    scale_tril L [B, A, A]): a diagonal variance L^2 = softplus(head) [TreePI App. B: N(mu, I softplus(varsigma))], or with
    --full-covariance the Cholesky factor L, lower-triangular with its diagonal through softplus [MPO App. D]. Samples are
    stored unbounded; the env executes them clipped to its bounds."""

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
        size = self.action_dim = int(np.prod(action_space.shape))
        self.full_covariance = full_covariance
        self.trunk = mlp(obs_dim, hidden_sizes, activation, layer_norm)
        self.head = nn.Linear(hidden_sizes[-1], size + (size * (size + 1) // 2 if full_covariance else size))  # mean, L
        low, high = (torch.as_tensor(bound, dtype=torch.float32).flatten() for bound in (action_space.low, action_space.high))
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.head(self.trunk(obs)).float()  # float32 even under --bf16: the samples, their log-probabilities
        mean, raw = out.split([self.action_dim, self.head.out_features - self.action_dim], dim=-1)
        if not self.full_covariance:
            return mean, torch.diag_embed((F.softplus(raw) + SCALE_MIN**2).sqrt())  # [B, A], [B, A, A]: sigma^2 = softplus
        rows, cols = torch.tril_indices(self.action_dim, self.action_dim, device=obs.device)
        tril = raw.new_zeros(*raw.shape[:-1], self.action_dim, self.action_dim)
        tril[..., rows, cols] = raw  # [B, A, A]
        diagonal = F.softplus(tril.diagonal(dim1=-2, dim2=-1)) + SCALE_MIN  # [MPO App. D]
        return mean, tril.tril(-1) + torch.diag_embed(diagonal)

    def candidates(self, params: tuple[Tensor, Tensor], num_samples: int) -> tuple[Tensor, Tensor]:
        """M actions a_j ~ pi(.|s) [B, M, A] with prior weights log(1/M) [B, M]: the E-step's integral [MPO Alg. 2, l. 11]."""
        mean, scale_tril = params
        noise = torch.randn(*mean.shape[:-1], num_samples, self.action_dim, device=mean.device)
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


class Critic(nn.Module):
    """Q(s, a), an MLP on [s, a] [MPO Sec. 4; one Q-function, no twin]. The first layer is split into its state and action
    columns, so that the M actions of a state share its half: obs [N, 1, O] and actions [N, M, A] give Q [N, M]."""

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
        return self.head(self.body(self.activation(self.norm(x)))).squeeze(-1).float()  # [N, M] or [B], float32


class LatentModel(nn.Module):
    """The learned model [TreePI Sec. 5, App. B], whose latent states the policy and Q read: encoder s_1 = f_enc(o_1),
    transition s_{t+1} = s_t + f_trans(s_t, a_t), reward r(s_t, a_t) and a termination logit (see Deviations)."""

    def __init__(self, obs_dim: int, action_dim: int, sizes: Sizes, reward_sizes: Sizes, activation: str, layer_norm: bool):
        super().__init__()
        inputs = sizes[-1] + action_dim  # [s, a]; sizes: encoder and transition, the last the latent size
        self.encoder = mlp(obs_dim, sizes, activation, layer_norm)
        self.transition = MLP(mlp(inputs, sizes[:-1], activation, layer_norm), nn.Linear(sizes[-2], sizes[-1]))
        self.reward = MLP(mlp(inputs, reward_sizes, activation, layer_norm), nn.Linear(reward_sizes[-1], 2))

    def roots(self, obs: Tensor, physics: np.ndarray | None) -> Tensor:
        return self.encoder(obs)  # the search's root states for observations [n, O]: their latents [n, L]

    def features(self, states: Tensor) -> Tensor:
        return states  # the networks' input at a search node: the latent state itself

    def predict(self, states: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Next latent, reward and termination logit of (s, a), actions clipped as executed: [n, L], [n], [n]."""
        inputs = torch.cat([states, actions.clamp(-1.0, 1.0)], -1)
        reward, logit = self.reward(inputs).float().unbind(-1)  # float32 even under --bf16
        return states + self.transition(inputs).float(), reward, logit

    def step(self, states: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        next_states, reward, logit = self.predict(states, actions)
        return next_states, reward, torch.sigmoid(-logit)  # the search's call: continuation 1 - p(terminated)

    def unroll(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """s_t = f(o_1, a_1..a_{t-1}) [TreePI Sec. 5]: latents [B, T+1, L] for t = 1..T+1, predicted rewards and
        termination logits [B, T], from o_1 [B, O] and actions [B, T, A]."""
        states, predictions = [self.encoder(obs)], []
        for t in range(actions.shape[1]):
            predictions.append(self.predict(states[-1], actions[:, t]))  # (next latent, reward, termination logit)
            states.append(predictions[-1][0])
        _, rewards, logits = zip(*predictions)
        return torch.stack(states, 1), torch.stack(rewards, 1), torch.stack(logits, 1)


# == 3. Storage ============================================================================================
class Batch(NamedTuple):
    obs: Tensor  # [B, T, O]
    actions: Tensor  # [B, T, A], the policy's samples as stored (before clipping)
    rewards: Tensor  # [B, T]
    next_obs: Tensor  # [B, T, O]
    terminated: Tensor  # [B, T], 1.0 where the MDP ended (no bootstrap)
    valid: Tensor  # [B, T], 1.0 for the steps that belong to the snippet
    physics: Tensor  # [B, T, P], the simulator's state at obs (--model true; else P = 0), float64 as mj_getState's


class SnippetReplay:
    """Ring buffer of transitions in time order per env [rows, num_envs, ...], sampled as snippets of T steps of one env
    that the model unrolls over [TreePI Sec. 5]; a snippet stops after an episode's end (whose true last observation is
    its next_obs) and at the newest row."""

    COLUMNS = ("obs", "actions", "rewards", "next_obs", "terminated", "ended", "physics")

    def __init__(self, capacity: int, num_envs: int, widths: dict[str, tuple], snippet_length: int, device: torch.device):
        self.rows, self.num_envs, self.length = capacity // num_envs, num_envs, snippet_length
        self.pos, self.size = 0, 0  # in rows (one row = one vector step)
        dtypes = {"physics": torch.float64}  # widths: the row shapes of obs, actions, next_obs, physics; the rest are scalars
        self.data = {
            name: torch.zeros(self.rows, num_envs, *widths.get(name, ()), device=device, dtype=dtypes.get(name, torch.float32))
            for name in self.COLUMNS
        }

    def add(self, *columns: np.ndarray | Tensor) -> None:
        """Store one vector step: one array per column of COLUMNS, in that order, with leading size num_envs."""
        for column, values in zip(self.data.values(), columns, strict=True):
            column[self.pos] = torch.as_tensor(values, dtype=column.dtype)
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
def full_tree_size(num_actions: int, depth: int) -> int:
    return sum(num_actions**d for d in range(depth))  # nodes of the full tree, sum_{d < K} M^d


class Tree(NamedTuple):
    """B search trees in node arrays of fixed capacity, node 0 the root; numpy on the host, states and actions on device."""

    states: Tensor  # [B, C, S] node states s
    actions: Tensor  # [B, C, M, A] actions a^{1:M} ~ pi^(i)(.|s) of each node
    q_hat: np.ndarray  # [B, C, M] Q-hat[s, a^j]: Q'(s, a^j) at insertion, then r + gamma V(child)
    rewards: np.ndarray  # [B, C] r of the transition from the parent into the node
    discounts: np.ndarray  # [B, C] gamma (1 - terminated) of that transition
    parent: np.ndarray  # [B, C] parent node (-1 for the root)
    slot: np.ndarray  # [B, C] which of the parent's M actions leads to the node
    children: np.ndarray  # [B, C, M] node that each action leads to (-1: not expanded)
    complete: np.ndarray  # [B, C, M] the action's subtree is fully expanded: never revisited
    depth: np.ndarray  # [B, C] node depth d in 0 .. K-1
    size: np.ndarray  # [B] nodes in use


def search(
    roots: Tensor,
    propose: Callable[[Tensor], tuple[Tensor, Tensor]],
    expand: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
    num_rollouts: int,
    depth: int,
    temperature: float,
    gamma: float,
    uniforms: np.ndarray | None = None,
) -> Tree:
    """TreePI's search from B root states at once [TreePI Alg. 1, Sec. 4]. Each rollout after the first (which inserts
    the roots) descends from the root, drawing among a node's incomplete actions with p_j ∝ exp(Q-hat[s, a^j] / alpha)
    (eq. 4, by Gumbel-max), to the first action that leads nowhere; inserts s' = f(s, a^j) with r and terminated from
    the model, a^{1:M} ~ pi^(i)(.|s') and Q-hat[s', a^k] = Q'(s', a^k); and backs up to the root
        V(s') = alpha log (1/M) sum_k exp(Q-hat[s', a^k] / alpha),  Q-hat[s, a^j] = r + gamma (1 - terminated) V(s').
    Nodes live at depths 0 .. K-1 (Alg. 1's loop would insert at K), and a depth K-1 node keeps Q' (K = 1: MPO's
    E-step). An action is complete once its node is at depth K-1, terminal or has M complete actions, and is never drawn
    again ("preventing fully expanded subtrees from being revisited", Sec. 4): after full_tree_size(M, K) rollouts the
    root holds exactly the full-tree estimator Q-hat^K(s, a) = r + gamma V-hat^{K-1}(f(s, a)) of Sec. 4. Symbols: alpha
    = temperature, M = num_samples of propose, N = num_rollouts, K = depth, Q^pi_pi(i) = Q'. roots [B, S]: latents, or
    the simulator's [obs | physics]; propose: states [n, S] -> (actions [n, M, A] ~ pi^(i), Q'(s, a) [n, M]); expand:
    (states [n, S], actions [n, A]) -> (next states [n, S], rewards [n], continuation 1 - terminated [n]); uniforms:
    [N-1, K-1, B, M] numbers in (0, 1] for the Gumbel draws (tests pass them; default: numpy's global generator)."""
    num_trees, device = roots.shape[0], roots.device
    root_actions, root_q = propose(roots)  # [B, M, A], [B, M]
    num_actions = root_q.shape[1]
    capacity = min(num_rollouts, full_tree_size(num_actions, depth))
    # Flat node arrays [B C, ...]: node n of tree b is row b C + n, so one fancy index reaches one node of every tree
    rows, root_rows = num_trees * capacity, np.arange(num_trees) * capacity
    rooted = lambda root: torch.cat([root[:, None], root.new_zeros(num_trees, capacity - 1, *root.shape[1:])], 1).flatten(0, 1)
    states, actions = rooted(roots), rooted(root_actions)  # [B C, S], [B C, M, A]: node 0 the root, zeros elsewhere
    q_hat = np.zeros((rows, num_actions))
    q_hat[root_rows] = root_q.cpu().numpy()
    rewards, discounts, size = np.zeros(rows), np.zeros(rows), np.ones(num_trees, dtype=np.int64)
    parent, slot, node_depth = np.full(rows, -1), np.zeros(rows, dtype=np.int64), np.zeros(rows, dtype=np.int64)
    children, complete = np.full((rows, num_actions), -1), np.zeros((rows, num_actions), dtype=bool)
    complete[root_rows] = depth == 1  # the root is at depth K-1 = 0: Q' is final
    for rollout in range(1, num_rollouts):  # rollout 0 inserted the roots
        trees = np.flatnonzero(~complete[root_rows].all(1))  # a complete root has nothing to add
        if trees.size == 0:
            break
        shape = (depth - 1, trees.size, num_actions)
        uniform = uniforms[rollout - 1][:, trees] if uniforms is not None else 1.0 - np.random.random(shape)
        gumbel = -np.log(-np.log(uniform))  # [K-1, n, M]
        base = trees * capacity  # the root's row of each tree searched
        # forward rollout [TreePI Alg. 1]: descend through expanded, incomplete actions; path: (trees, rows, actions)
        row, leaf_slot, path = base.copy(), np.zeros(trees.size, dtype=np.int64), []
        down = np.arange(trees.size)  # trees still descending
        for level in range(depth - 1):  # a depth K-1 node is complete: never descended into
            at = row[down]
            logits = np.where(complete[at], -np.inf, q_hat[at] / temperature + gumbel[level, down])
            chosen = logits.argmax(1)  # [eq. 4] a ~ Categorical(softmax(Q-hat / alpha))
            path.append((down, at, chosen))
            child = children[at, chosen]
            leaf_slot[down] = chosen
            go_on = child >= 0
            down = down[go_on]
            row[down] = base[down] + child[go_on]
            if down.size == 0:
                break
        # insert [TreePI Alg. 1]: one model call and one policy/critic call for all trees
        new_row, expanded = base + size[trees], torch.from_numpy(row)  # the new node's row; the expanded node's
        parent_actions = actions[expanded.to(actions.device), torch.from_numpy(leaf_slot).to(actions.device)]
        next_states, reward, cont = expand(states[expanded.to(device)], parent_actions)
        new_actions, new_q = propose(next_states)
        states[torch.from_numpy(new_row).to(device)] = next_states.to(states.dtype)
        actions[torch.from_numpy(new_row).to(actions.device)] = new_actions
        cont = cont.cpu().numpy()
        q_hat[new_row], rewards[new_row], discounts[new_row] = new_q.cpu().numpy(), reward.cpu().numpy(), gamma * cont
        parent[new_row], slot[new_row], children[row, leaf_slot] = row - base, leaf_slot, size[trees]
        node_depth[new_row] = node_depth[row] + 1
        complete[new_row] = ((node_depth[new_row] == depth - 1) | (cont == 0))[:, None]
        size[trees] += 1
        # soft backup to the root [TreePI Alg. 1] along the path, deepest level first; below: each tree's child row
        below = new_row
        for down, at, chosen in reversed(path):
            child = below[down]
            scaled = q_hat[child] / temperature  # V(s') = alpha log mean_k exp(Q-hat[s', a^k] / alpha), stably:
            peak = scaled.max(-1, keepdims=True)
            value = temperature * (peak + np.log(np.exp(scaled - peak).sum(-1, keepdims=True) / num_actions))[..., 0]
            q_hat[at, chosen] = rewards[child] + discounts[child] * value  # Q-hat = r + gamma (1 - terminated) V(s')
            complete[at, chosen] = complete[child].all(1)
            below[down] = at
    nodes = (states, actions, q_hat, rewards, discounts, parent, slot, children, complete, node_depth)  # [B C, ...]
    return Tree(*(array.reshape(num_trees, capacity, *array.shape[1:]) for array in nodes), size)


def root_weights(tree: Tree, temperature: float) -> Tensor:
    """The root's weights w^j = softmax_j(Q-hat[root, a^j] / alpha + log(1/M)) [B, M] [TreePI eq. 4]: MPO's E-step weights
    (MPO eq. 8, M samples of pi^(i)) with the search's Q-hat for Q' and the fixed alpha for MPO's learned eta."""
    q_hat = torch.from_numpy(tree.q_hat[:, 0])  # float64, as the tree backs up
    log_prior = torch.full_like(q_hat, -float(np.log(q_hat.shape[1])))
    weights = torch.softmax(q_hat / torch.tensor(temperature, dtype=q_hat.dtype) + log_prior, dim=-1)
    return weights.to(device=tree.actions.device, dtype=torch.float32)


def proposals(
    actor_target: GaussianActor, critic_target: Critic, features: Callable, num_samples: int, bf16: bool = False
) -> Callable:
    """The search's `propose` from Alg. 1's inputs pi^(i) and Q' [TreePI Alg. 1]: node states [n, S] -> M actions a ~ pi^(i)
    [n, M, A] and Q'(s, a) [n, M], the networks reading features(states) (latents, or the simulator's observations); bf16:
    their matrix products in bfloat16 (torch.autocast), the actions sampled in float32."""
    device = actor_target.action_scale.device
    precision = torch.autocast(device.type, torch.bfloat16, enabled=bf16)  # off: a no-op

    def propose(states: Tensor) -> tuple[Tensor, Tensor]:
        inputs = features(states).to(device)  # [n, L or O]
        with precision:
            params = actor_target(inputs)
        actions, _ = actor_target.candidates(params, num_samples)  # [n, M, A]
        with precision:
            return actions, critic_target(inputs.unsqueeze(1), actor_target.critic_input(actions))

    return propose


def scaled(step: Callable, reward_scale: float) -> Callable:
    """A model's step, (states [n, S], actions [n, A]) -> (next states, rewards [n], continuation [n]), with its rewards
    times reward_scale: the simulator's, in the scale of the stored rewards that Q learns (--reward-scale)."""

    def expand(states: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        next_states, rewards, continuation = step(states, actions)
        return next_states, reward_scale * rewards, continuation

    return expand


@torch.no_grad()
def select_actions(
    obs: Tensor, physics: np.ndarray | None, model: "SearchModel", actor_target: GaussianActor, plan: Plan | None, greedy: bool
) -> Tensor:
    """Actions [n, A] (unclipped, [-1, 1] units) for observations [n, O] (simulator states [n, P]): a sample (greedy: the mean)
    of pi^(i) (plan None: TreePI/pi [Alg. 2]), or of the root weights of plan's search (greedy: the heaviest; eq. 4)."""
    roots = model.roots(obs, physics)  # latents, or [obs | physics]
    if plan is None:
        params = actor_target(model.features(roots).to(actor_target.action_scale.device))
        return params[0] if greedy else actor_target.candidates(params, 1)[0][:, 0]  # the mean, or a ~ pi^(i)
    actions, weights = plan(roots)
    chosen = weights.argmax(1) if greedy else torch.multinomial(weights, 1)[:, 0]
    return actions[torch.arange(len(chosen), device=chosen.device), chosen]


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
    """The Lagrangian term alpha (epsilon - E_s KL) of the M-step [MPO App. D.3, TreePI eq. 6], split for simultaneous
    gradient steps: the policy minimises sg(alpha) E_s KL, the multiplier alpha (epsilon - sg(E_s KL)), so alpha grows
    while the bound is violated. Symbols: eta_mu, eta_Sigma of [MPO], eta of [TreePI] = alpha; epsilon_mu, epsilon_Sigma,
    eps_KL = epsilon; C_mu, C_Sigma = kl. Shapes: kl [B]; alpha scalar; returns (policy term, multiplier loss)."""
    kl = kl.mean()
    return alpha.detach() * kl, alpha * (epsilon - kl.detach())


def q_target(rewards: Tensor, terminated: Tensor, next_q: Tensor, gamma: float) -> Tensor:
    """y = r_t + gamma (1 - terminated_t) mean_k Q'(s_{t+1}, a_k), a_k ~ pi^(i)(.|s_{t+1}) [TreePI eq. 6, L_Q]; a truncated
    episode still bootstraps, as the tree's Q-hat = r + gamma (1 - terminated) V. Shapes: rewards, terminated [...];
    next_q [..., M]; returns [...]."""
    return rewards + gamma * (1.0 - terminated) * next_q.mean(-1)


# == 5. Updates ============================================================================================
def update(
    actor: GaussianActor,
    actor_target: GaussianActor,
    critic: Critic,
    critic_target: Critic,
    model: "SearchModel",
    plan: Plan,
    optimizers: tuple[Optimizer, Optimizer, Optimizer],
    log_alpha_mean: Tensor,
    log_alpha_cov: Tensor,
    batch: Batch,
    search_states: int,
    num_samples: int,
    target_samples: int,
    gamma: float,
    epsilon_mean: float,
    epsilon_cov: float | None,
    log_eta: Tensor | None = None,
    epsilon: float = 0.1,
    bootstrap_state: str = "observed",
) -> dict[str, Tensor]:
    """One gradient step on L = sum_t L_r + L_Q + L_pi [TreePI eq. 6]: the model, the critic and the policy in one backward
    pass (they share the latent states), and the multipliers on alpha (epsilon - KL); then the duals are clamped. The
    E-step: plan's searches, or with log_eta MPO's [MPO eq. 7-9] (MPO+Predictive), eta on its dual at bound epsilon."""
    valid, count, metrics, learned = batch.valid, batch.valid.sum(), {}, isinstance(model, LatentModel)
    states, next_states, model_loss = batch.obs, batch.next_obs, 0.0  # s_t: the true state (--model true), or
    if learned:  # the latent unroll from o_1 on the stored actions [TreePI Sec. 5]
        latents, rewards, logits = model.unroll(batch.obs[:, 0], batch.actions)  # [B, T+1, L]
        states = latents[:, :-1]
        with torch.no_grad():  # s_{t+1} of the TD target, no gradient: the observed o_{t+1} encoded [MuZero], or the unroll's
            next_states = model.encoder(batch.next_obs) if bootstrap_state == "observed" else latents[:, 1:].detach()
        reward_loss = ((rewards - batch.rewards).pow(2) * valid).sum() / count  # [eq. 6] L_r
        # Deviation: a termination head, so that the tree stops where the env would
        term_loss = F.binary_cross_entropy_with_logits(logits, batch.terminated, reduction="none")
        model_loss = reward_loss + (term_loss * valid).sum() / count
        metrics["losses/reward"] = reward_loss.detach()
    flat_states = states.flatten(0, 1)  # [B T, L or O]
    # L_Q [eq. 6]: TD to r_t + gamma (1 - terminated_t) E_{a ~ pi^(i)} Q'(s_{t+1}, a)
    with torch.no_grad():
        next_flat = next_states.flatten(0, 1)
        next_actions, _ = actor_target.candidates(actor_target(next_flat), target_samples)
        next_q = critic_target(next_flat.unsqueeze(1), actor_target.critic_input(next_actions))
        target = q_target(batch.rewards, batch.terminated, next_q.view(*valid.shape, -1), gamma)
    q = critic(flat_states, actor_target.critic_input(batch.actions.flatten(0, 1)))  # [B T]
    q_loss = ((q.view_as(valid) - target).pow(2) * valid).sum() / count
    mask = valid.flatten().bool()
    valid_states = flat_states[mask]  # [n_valid, L or O]
    with torch.no_grad():
        params_old = actor_target(valid_states)
    if log_eta is None:  # E-step [TreePI Alg. 1]: searches from search_states valid states drawn at random (0: all)
        picked = torch.randperm(len(valid_states), device=valid_states.device)[: search_states or len(valid_states)]
        roots = valid_states[picked].detach()  # latents, or observations
        if not learned:  # the simulator's node states [obs | physics]
            roots = model.roots(roots, batch.physics.flatten(0, 1)[mask][picked].cpu().numpy())
        actions, weights = plan(roots)  # [n, M, A], [n, M]
        eta_loss = 0.0
    else:  # E-step [MPO eq. 8-9] on every valid state: a_j ~ pi^(i), weights softmax_j(Q'(s, a_j) / eta), eta on its dual
        picked = slice(None)
        with torch.no_grad():
            actions, log_prior = actor_target.candidates(params_old, num_samples)  # [n_valid, M, A], [n_valid, M]
            q_candidates = critic_target(valid_states.unsqueeze(1), actor_target.critic_input(actions))  # [n_valid, M]
        eta = dual_variable(log_eta)
        eta_loss = temperature_dual(eta, q_candidates, log_prior, epsilon)
        weights = e_step_weights(q_candidates, eta.detach(), log_prior)  # [n_valid, M]
        metrics["stats/eta"] = eta.detach()
    # M-step [TreePI eq. 6, MPO eq. 10]: weighted maximum likelihood of the E-step's actions at its n states (picked), under
    # the KL bound to pi^(i) on every valid state (R of [TreePI eq. 6])
    params = actor(valid_states)
    policy_loss = -(weights * actor.log_prob(tuple(p[picked] for p in params), actions)).sum(-1).mean()
    kl_mean, kl_cov = actor.kl_terms(params_old, params)  # [n_valid] each
    if epsilon_cov is None:  # [TreePI eq. 6] one bound on the whole KL
        kl_mean, kl_cov = kl_mean + kl_cov, None
    alpha_mean, alpha_cov = dual_variable(log_alpha_mean), dual_variable(log_alpha_cov)
    penalty, alpha_loss = kl_penalty(kl_mean, alpha_mean, epsilon_mean)
    metrics.update({"stats/kl_mean": kl_mean.detach().mean(), "stats/alpha_mean": alpha_mean.detach()})
    if kl_cov is not None:
        penalty_cov, alpha_loss_cov = kl_penalty(kl_cov, alpha_cov, epsilon_cov)
        penalty, alpha_loss = penalty + penalty_cov, alpha_loss + alpha_loss_cov
        metrics.update({"stats/kl_cov": kl_cov.detach().mean(), "stats/alpha_cov": alpha_cov.detach()})
    dual_loss = eta_loss + alpha_loss
    for optimizer in optimizers:  # the actor's, the critic's (and the model's), the duals'
        optimizer.zero_grad(set_to_none=True)
    (model_loss + q_loss + policy_loss + penalty + dual_loss).backward()  # disjoint parameters: one backward serves all
    for optimizer in optimizers:
        optimizer.step()
    with torch.no_grad():
        for parameter in (log_alpha_mean, log_alpha_cov, log_eta):
            if parameter is not None:
                parameter.clamp_(min=LOG_DUAL_MIN)
    metrics.update({"losses/q": q_loss.detach(), "losses/policy": policy_loss.detach(), "losses/dual": dual_loss.detach()})
    metrics["stats/q_mean"] = (q.detach().view_as(valid) * valid).sum() / count
    log_prior = -float(np.log(num_samples))
    metrics["stats/kl_q"] = (torch.xlogy(weights, weights) - weights * log_prior).sum(-1).mean()  # KL(q || pi^(i))
    metrics["stats/entropy"] = actor.entropy(params).detach().mean()
    return metrics


# == 6. True model =========================================================================================
# The observation, reward and termination of gymnasium 1.4's v5 MuJoCo envs' step(), vectorised over batches [n, ...] of
# (qpos before, qpos after, qvel after, action) with the env's own weights, give (obs, rewards, terminated); tests compare
# them with env.step.


def _locomotion(env: gym.Env, qpos0: np.ndarray, qpos: np.ndarray, qvel: np.ndarray, actions: np.ndarray) -> tuple:
    """HalfCheetah and Swimmer (never terminated), Hopper and Walker2d (a healthy reward, terminated when unhealthy)."""
    reward, healthy = env._forward_reward_weight * ((qpos[:, 0] - qpos0[:, 0]) / env.dt), np.ones(len(qpos), dtype=bool)
    if hasattr(env, "_healthy_reward"):
        (z_low, z_high), (angle_low, angle_high) = env._healthy_z_range, env._healthy_angle_range
        z, angle = qpos[:, 1], qpos[:, 2]
        healthy = (z_low < z) & (z < z_high) & (angle_low < angle) & (angle < angle_high)
        if hasattr(env, "_healthy_state_range"):  # Hopper also bounds state_vector()[2:]
            state, (low, high) = np.concatenate([qpos, qvel], 1)[:, 2:], env._healthy_state_range
            healthy &= ((low < state) & (state < high)).all(1)
        reward, qvel = reward + env._healthy_reward * healthy, np.clip(qvel, -10, 10)
    obs = np.concatenate([qpos, qvel], 1)[:, -env.observation_space.shape[0] :]  # without the excluded x (and y) position
    terminated = ~healthy & getattr(env, "_terminate_when_unhealthy", False)
    return obs, reward - env._ctrl_cost_weight * np.square(actions).sum(1), terminated


def _inverted_pendulum(env: gym.Env, qpos0: np.ndarray, qpos: np.ndarray, qvel: np.ndarray, actions: np.ndarray) -> tuple:
    obs = np.concatenate([qpos, qvel], 1)
    terminated = ~np.isfinite(obs).all(1) | (np.abs(obs[:, 1]) > 0.2)
    return obs, (~terminated).astype(np.float64), terminated


LOCOMOTION = ("half_cheetah_v5:HalfCheetahEnv", "swimmer_v5:SwimmerEnv", "hopper_v5:HopperEnv", "walker2d_v5:Walker2dEnv")
FAST_ENVS = {f"gymnasium.envs.mujoco.{entry}": _locomotion for entry in LOCOMOTION}  # env class -> its step outcome
FAST_ENVS["gymnasium.envs.mujoco.inverted_pendulum_v5:InvertedPendulumEnv"] = _inverted_pendulum
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
    """The true model [TreePI Sec. 6.2]: the env's MuJoCo simulation stepped from saved node states [obs (O) | physics (P)]
    in float64, physics = [mj_getState (MJ_STATE) | CARRIED arrays (not FAST_ENVS') | the model arrays that resets randomise
    (a suite task's target)], so that every step returns exactly the env's own observation, reward and termination (tests
    replay them bit for bit). FAST_ENVS by frame_skip mj_steps, other gymnasium v5 envs by their own step(), suite tasks
    by the steps of dm_control's Environment.step with the task's own reward; never through TimeLimit or Environment.step
    (a search is no step)."""

    def __init__(self, env_id: str):
        wrapped = make_env(env_id)
        env, found = wrapped.unwrapped, mujoco_of(wrapped)
        if found is None or (isinstance(env, MujocoEnv) and not type(env).__module__.endswith("_v5")):
            raise UsageError(
                f"--model true steps saved MuJoCo states: it needs a gymnasium v5 MuJoCo env (HalfCheetah-v5, Ant-v5, ...) "
                f"or a control suite task (dm_control/cartpole-swingup-v0, ...), and {env_id} is not one; use --model learned"
            )
        wrapped.reset(seed=0)
        self.env, (self.mj_model, self.data), self.obs_dim = env, found, wrapped.observation_space.shape[0]
        space = env.action_space
        low, high = (torch.as_tensor(bound, dtype=torch.float32).flatten() for bound in (space.low, space.high))
        self.action_scale, self.action_bias = (high - low) / 2, (high + low) / 2  # GaussianActor.env_action's
        self.outcome = FAST_ENVS.get(f"{type(env).__module__}:{type(env).__name__}")
        self.suite, self.model_fields = not isinstance(env, MujocoEnv), drawn_model_fields(env_id)
        self.carried = () if self.outcome is not None else CARRIED  # FAST_ENVS read qpos and qvel only
        parts = [("state", mujoco.mj_stateSize(self.mj_model, MJ_STATE))]
        parts += [(name, getattr(self.data, name).size) for name in self.carried]
        parts += [(name, getattr(self.mj_model, name).size) for name in self.model_fields]
        ends = np.cumsum([size for _, size in parts])
        self.parts = {name: slice(end - size, end) for (name, size), end in zip(parts, ends)}  # where each lies in P
        self.state_size = int(ends[-1])
        start, nq, nv = mujoco.mj_stateSize(self.mj_model, mujoco.mjtState.mjSTATE_TIME), self.mj_model.nq, self.mj_model.nv
        self.qpos, self.qvel = slice(start, start + nq), slice(start + nq, start + nq + nv)  # in a saved state

    def save(self, model: mujoco.MjModel, data: mujoco.MjData, out: np.ndarray) -> None:
        mujoco.mj_getState(model, data, out[self.parts["state"]], MJ_STATE)
        for name in self.carried:
            out[self.parts[name]] = getattr(data, name).ravel()
        for name in self.model_fields:
            out[self.parts[name]] = getattr(model, name).ravel()

    def restore(self, physics: np.ndarray) -> None:
        for name in self.model_fields:
            getattr(self.mj_model, name).flat[:] = physics[self.parts[name]]
        mujoco.mj_setState(self.mj_model, self.data, physics[self.parts["state"]], MJ_STATE)
        for name in self.carried:
            getattr(self.data, name).flat[:] = physics[self.parts[name]]

    def physics(self, env: gym.Env) -> np.ndarray:
        state = np.empty(self.state_size)  # the saved state [P] of a (wrapped) env's simulation
        self.save(*mujoco_of(env), state)
        return state

    def roots(self, obs: Tensor, physics: np.ndarray) -> Tensor:
        return torch.from_numpy(np.concatenate([obs.cpu().numpy(), physics], 1).astype(np.float64))  # [obs | physics]

    def features(self, states: Tensor) -> Tensor:
        return states[:, : self.obs_dim].float()  # the networks' input at a node: its observation [n, O]

    def suite_step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """dm_control's Environment.step without its step count: the task's observation (flattened as make_env's
        wrapper does), reward and termination (discount 0, as shimmy reads it)."""
        environment = self.env._env
        physics, task = environment.physics, environment.task
        mujoco.mj_step1(self.mj_model, self.data)  # physics.step (legacy_step) leaves position and velocity fields fresh
        task.before_step(action, physics)
        physics.step(environment._n_sub_steps)
        task.after_step(physics)
        reward = task.get_reward(physics)
        obs = gym.spaces.flatten(self.env.observation_space, task.get_observation(physics))
        return obs, reward, task.get_termination(physics) == 0

    def step(self, states: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One env step from each node state: next states [n, S], the env's rewards [n] and continuation 1 - terminated [n]."""
        physics = states[:, self.obs_dim :].cpu().numpy()  # [n, P]
        env_actions = (actions.cpu().clamp(-1.0, 1.0) * self.action_scale + self.action_bias).numpy()  # float32, as executed
        next_physics, obs = np.empty_like(physics), np.empty((len(physics), self.obs_dim))
        rewards, terminated = np.empty(len(physics)), np.empty(len(physics), dtype=bool)
        for i in range(len(physics)):
            self.restore(physics[i])
            if self.outcome is not None:  # FAST_ENVS: the env's mj_steps; its outcome below, from qpos and qvel
                self.data.ctrl[:] = env_actions[i]
                mujoco.mj_step(self.mj_model, self.data, nstep=self.env.frame_skip)
            elif self.suite:
                obs[i], rewards[i], terminated[i] = self.suite_step(env_actions[i])
            else:  # the env's own step() on its own data
                obs[i], rewards[i], terminated[i], _, _ = self.env.step(env_actions[i])
            self.save(self.mj_model, self.data, next_physics[i])
        if self.outcome is not None:
            qpos, qvel = next_physics[:, self.qpos], next_physics[:, self.qvel]
            obs, rewards, terminated = self.outcome(self.env, physics[:, self.qpos], qpos, qvel, env_actions)
        next_states = torch.from_numpy(np.concatenate([obs, next_physics], 1))
        return next_states, torch.from_numpy(rewards), torch.from_numpy(1.0 - terminated)


SearchModel = LatentModel | Simulator  # what a search steps: node states, features(states) and step(states, actions)


# == 7. Training ===========================================================================================
def train(args: Args) -> dict:
    """Train TreePI; returns the final metrics, counters and the run directory."""
    device = setup(args)  # seeds, torch threads, device
    # -- environments
    envs = make_vec_env(args.env, args.num_envs)
    obs_dim, action_space = envs.single_observation_space.shape[0], envs.single_action_space
    action_dim, learned = int(np.prod(action_space.shape)), args.model == "learned"
    # -- networks and optimizers: pi and Q read latent states (learned model) or true observations
    in_dim = args.model_sizes[-1] if learned else obs_dim
    policy = (in_dim, action_space, args.policy_hidden_sizes, args.activation, args.layer_norm, args.full_covariance)
    actor, actor_target = (GaussianActor(*policy).to(device) for _ in range(2))
    actor_target.load_state_dict(actor.state_dict())
    actor_target.requires_grad_(False)
    value = (in_dim, action_dim, args.critic_hidden_sizes, args.activation, args.layer_norm)
    critic, critic_target = Critic(*value).to(device), Critic(*value).to(device)
    critic_target.load_state_dict(critic.state_dict())
    critic_target.requires_grad_(False)
    log_alpha_mean, log_alpha_cov = log_dual(args.alpha_mean_init, device), log_dual(args.alpha_cov_init, device)
    log_eta = log_dual(args.eta_init, device) if args.e_step == "mpo" else None  # MPO's E-step temperature [MPO eq. 9]
    # the search's model: the learned one (whose reward network has the critic's hidden sizes), or the simulator
    latent = (obs_dim, action_dim, args.model_sizes, args.critic_hidden_sizes, args.activation, args.layer_norm)
    model = LatentModel(*latent).to(device) if learned else Simulator(args.env)
    # fused Adam: one kernel per step for all parameters instead of several per tensor
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=True)
    # the model learns from every loss through the latents; its step rides with the critic's
    critic_opt = torch.optim.Adam([*critic.parameters(), *(model.parameters() if learned else [])], lr=args.q_lr, fused=True)
    duals = [log_alpha_mean, log_alpha_cov] + ([log_eta] if log_eta is not None else [])
    dual_opt = torch.optim.Adam(duals, lr=args.dual_lr, fused=True)
    propose = proposals(actor_target, critic_target, model.features, args.num_samples, args.bf16)
    # the learned model learns scaled rewards; --bf16: its search passes under torch.autocast too (off, a no-op)
    precision = torch.autocast(device.type, torch.bfloat16, enabled=args.bf16)
    expand = precision(model.step) if learned else scaled(model.step, args.reward_scale)

    def plan(roots: Tensor) -> tuple[Tensor, Tensor]:  # the E-step [TreePI Alg. 1]: a search with pi^(i) and Q' per root
        with torch.inference_mode():  # no_grad without autograd's version counters; clone: a tensor autograd may save
            tree = search(roots, propose, expand, args.num_rollouts, args.depth, args.temperature, args.gamma)
        return tree.actions[:, 0].clone(), root_weights(tree, args.temperature)

    acting = plan if args.act == "search" else None  # TreePI/search acts by searching, TreePI/pi with pi^(i)
    nets = (actor, actor_target, critic, critic_target, model, plan, (actor_opt, critic_opt, dual_opt))  # update's inputs
    numbers = (args.search_states, args.num_samples, args.target_samples, args.gamma, args.epsilon_mean, args.epsilon_cov)
    numbers += (log_eta, args.epsilon, args.bootstrap_state)
    # -- storage: never more rows than the run can fill (Table 1's 2e6 would be 0.5 GB)
    capacity = min(args.buffer_size, args.total_steps + args.num_envs * args.snippet_length)
    widths = dict(obs=(obs_dim,), actions=(action_dim,), next_obs=(obs_dim,), physics=(0 if learned else model.state_size,))
    replay = SnippetReplay(capacity, args.num_envs, widths, args.snippet_length, device)

    def greedy_action(obs: Tensor) -> Tensor:  # evaluation: greedy --act, a search from the evaluation env's own state
        physics = None if learned else model.physics(run.eval_env)[None]
        return actor_target.env_action(select_actions(obs.float()[None], physics, model, actor_target, acting, greedy=True))[0]

    # -- run: directory, logging, evaluation, saving, resume (below the fence)
    saved = dict(actor=actor, actor_target=actor_target, critic=critic, critic_target=critic_target)
    saved.update(model=model if learned else None, log_alpha_mean=log_alpha_mean, log_alpha_cov=log_alpha_cov, log_eta=log_eta)
    train_state = dict(actor_opt=actor_opt, critic_opt=critic_opt, dual_opt=dual_opt, replay=replay)
    run = Run(args, envs, model=saved, train_state=train_state, act=greedy_action)
    if args.eval_only:
        return run.evaluate_only()
    global_step, num_updates = run.start()
    obs, _ = envs.reset(seed=args.seed + global_step)  # a resumed run starts fresh episodes
    while global_step < args.total_steps:
        # act: with pi^(i), or a search from each env's current state [TreePI Alg. 2]
        physics = np.stack([model.physics(env) for env in envs.unwrapped.envs]) if not learned else np.zeros((len(obs), 0))
        observations = torch.as_tensor(obs, dtype=torch.float32, device=device)
        actions = select_actions(observations, physics, model, actor_target, acting, greedy=False)
        # step: the env executes the action clipped to its bounds; the replay keeps the sample
        next_obs, rewards, terminated, truncated, infos = envs.step(actor.env_action(actions).cpu().numpy())
        global_step += args.num_envs
        run.add_episodes(global_step, infos)
        # store: an ended episode's true last observation, never the next episode's first
        ended, real_next_obs = terminated | truncated, next_obs.copy()
        for i in np.flatnonzero(ended):
            real_next_obs[i] = infos["final_obs"][i]
        replay.add(obs, actions, args.reward_scale * rewards, real_next_obs, terminated, ended, physics)  # as COLUMNS
        obs = next_obs
        # update: updates_per_step gradient steps on eq. 6 per environment step
        if global_step >= args.learning_starts:
            for _ in range(args.updates_per_step * args.num_envs):
                batch = replay.sample(args.batch_size)
                run.add_metrics(update(*nets, log_alpha_mean, log_alpha_cov, batch, *numbers))
                num_updates += 1
                if num_updates % args.target_network_frequency == 0:
                    critic_target.load_state_dict(critic.state_dict())  # Q' <- Q [Table 1]
                if num_updates % args.policy_target_frequency == 0:
                    actor_target.load_state_dict(actor.state_dict())  # pi^(i+1) <- pi [Sec. 5]
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
