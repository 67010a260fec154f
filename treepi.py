"""TreePI: tree search for policy improvement in continuous action spaces, in one file.

References:
    [TreePI] Springenberg, Heess, Mankowitz, Merel, Byravan, Abdolmaleki, Kay, Degrave,
        Schrittwieser, Tassa, Buchli, Belov, Riedmiller 2020, "Local Search for Policy Iteration
        in Continuous Control", arXiv:2010.05545 (Alg. 1 the search, eq. 3-6, App. A.2 the
        estimator, App. A.3 Alg. 2 the training loop, App. B and Table 1 the networks).
    [MPO] Abdolmaleki, Springenberg, Tassa, Munos, Heess, Riedmiller 2018, "Maximum a Posteriori
        Policy Optimisation": the sampled-action E-step that TreePI recovers at depth 1, and the
        KL-bounded M-step; this file shares mpo.py's code and names for both.
    [ACME] Hoffman et al. 2020, acme/jax/losses/mpo.py: the softplus duals, their learning rate
        and clamp, the clipped critic input (as in mpo.py).

Names: mpo.py's names hold for the shared policy machinery, so the paper's symbols map as
    alpha (search temperature, fixed)  -> eta          (MPO's temperature)
    eta (trust-region multiplier)      -> alpha_mean   (MPO's M-step multiplier)
    eps_KL                             -> epsilon_mean
    pi^(i), Q-hat^pi_pi(i)             -> actor_target, critic_target (pi', Q')

Algorithm (one environment step; the function that does each line in brackets):
    1. Act a ~ pi^(i)(.|s) (--act policy, TreePI/pi), or search from the env's current state
       and draw a from the root's weights (--act search, TreePI/search)       [select_actions]
    2. Store the step per env in time order                                  [SnippetReplay]
    3. updates_per_step times: sample B snippets (o_1, a_1, r_1, ..., o_T, a_T, r_T); states
       s_t = f_trans(f_enc(o_1), a_1..a_{t-1}) (--model learned) or s_t = o_t (--model true)
                                                                         [LatentModel.unroll]
    4. L_r = (r_t - r(s_t, a_t))^2, learned model only                                [update]
    5. L_Q = (r_t + gamma (1 - terminated_t) E_{a ~ pi^(i)} Q'(s_{t+1}, a) - Q(s_t, a_t))^2
                                                                                   [q_target]
    6. E-step: search from s_t (Alg. 1), depth K, M actions per node, N rollouts; a rollout
       descends by drawing among a node's incomplete actions with p ∝ exp(Q-hat / alpha)
       (eq. 4), inserts one node (M actions from pi^(i), values Q') and backs up
       V = alpha log mean_j exp(Q-hat_j / alpha), Q-hat[s, a] = r + gamma (1 - terminated) V;
       the root gives actions a_j and weights w_j = softmax(Q-hat_j / alpha)
                                                           [run_search, search, root_weights]
    7. M-step: L_pi = -sum_j w_j log pi(a_j|s_t) + eta_KL (KL[pi^(i)(.|s_t) || pi(.|s_t)] - eps_KL),
       eta_KL by gradient ascent (eq. 6)                      [gaussian_kl_decoupled, kl_penalty]
    8. Every target_network_frequency updates Q' <- Q; every policy_target_frequency updates
       pi^(i+1) <- pi                                                                     [train]

Shapes: B batch (snippets, or searched roots), T snippet length, O observation size, A action
size, M actions per node, K depth, N rollouts, C node capacity of a tree, L latent size, S node
state size (L, or O + P for the simulator's [observation | P physics numbers]).

Usage:
    python treepi.py --env HalfCheetah-v5
    python treepi.py --env Hopper-v5 --act search --seed 2
    python treepi.py --env Hopper-v5 --model true --act search
    python treepi.py --env HalfCheetah-v5 --depth 1      (MPO+Predictive, [TreePI] Fig. 1)
    python treepi.py --env HalfCheetah-v5 --checkpoint runs/<run>/model.pt --eval-only
    python treepi.py --resume runs/<run>/resume.pt
    [TreePI] Table 1 and Fig. 1 (a GPU workload): --model-sizes 256 256 --policy-hidden-sizes
        256 256 256 --critic-hidden-sizes 256 256 256 --batch-size 256 --num-rollouts 100
        --search-states 0 --updates-per-step 10 --target-network-frequency 200
        --policy-target-frequency 500 --cuda

Resolved inconsistencies of the paper:
    - N = 100 rollouts (Table 1), not the 200 of Sec. 6.1's text: Table 1 is the list the
      authors say holds for all experiments ("All parameters are listed in Table 1").
    - Periods: Table 1's "target network update period 200" is the Q target; Sec. 5's "after
      500 steps we set pi^(i+1) = pi_theta" is the policy round. Alg. 2 copies both at one
      rate: equal --target-network-frequency and --policy-target-frequency recover it.
    - Rewards: eq. 3, Sec. 4 and Alg. 1 write r(s) and eq. 6 r_phi(s_t); we use the transition
      reward r(s_t, a_t) in the model, the tree and the TD target alike, with the critic's
      terminal convention, so the tree backs up exactly what the critic learns.
    - eq. 6 prints E_pi[Q'(s_t, .)] inside the TD target; the target is taken at s_{t+1}.
    - Alg. 1 descending "while s in T[d], d < K" would insert at depth K; nodes live at depths
      0 .. K-1 (Sec. 4's tree: Q-hat^K = r + gamma V-hat^{K-1}, leaves Q^pi), and complete
      subtrees are skipped, so N = full_tree_size(M, K) <= M^K rollouts give the exact tree.

Deviations from the paper:
    - Termination: gymnasium's Hopper or InvertedPendulum end episodes, which the control suite
      never does. The learned reward network also predicts a termination logit (trained by
      cross-entropy); the tree uses gamma (1 - p_terminated) where the TD target uses
      gamma (1 - terminated); the true model uses the env's own termination.
    - Cost on a CPU: 64-wide networks, batch 64, N = 32, one update per env step, and a search
      from `--search-states 16` states of each batch (paper: 256, 256, 100, 10 and all); the
      policy loss then averages over the searched states, the KL bound over all of them. With
      one update per env step instead of ten, the target periods are cut tenfold (20 and 50
      updates, paper: 200 and 500) so that Q' and pi^(i) advance at the paper's pace per env
      step. --help names every paper value and the Usage line above restores them.
    - With the true model the policy loss stays eq. 6's searched one: Sec. 6.2's switch to the
      likelihood of actor-searched actions serves its 16 distributed actors, not one learner.
    - Acting starts with the initial pi^(i) or search (no uniform warm-up), as mpo.py does;
      `learning_starts` only delays the gradient steps.
    - The latent states of the TD target come from the online model (no gradient); only the Q
      head has a target copy (eq. 6's phi'_Q), and every loss trains the representation.
    - The multiplier of eq. 6 (alpha_mean) is softplus of a parameter that takes Adam steps at
      --dual-lr and is clamped below, as in mpo.py and ACME; the paper says only that it is
      optimised "via gradient descent / ascent" with the other parameters.
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
import mujoco
import mujoco.rollout
import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch import nn
from torch.utils.tensorboard import SummaryWriter

ALGO = "treepi"
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
    # Model and acting [TreePI Sec. 5, 6.1, 6.2]
    model: Literal["learned", "true"] = "learned"
    """Search model: a learned latent model (Sec. 5) or the MuJoCo simulator itself, stepped
    from saved states (Sec. 6.2)."""
    act: Literal["policy", "search"] = "policy"
    """Act with pi^(i) (TreePI/pi) or with an action drawn from a search at every step
    (TreePI/search); evaluation uses the greedy form of the same rule."""
    # Networks [TreePI Table 1, App. B]
    model_sizes: tuple[int, ...] = (64, 64)
    """Layer sizes of the encoder and of the transition; the last is the latent size (paper:
    256 256, Table 1's 256-LN-256; 64 wide for a CPU: an update is about 4x cheaper)."""
    policy_hidden_sizes: tuple[int, ...] = (64, 64, 64)
    """Hidden layer sizes of the policy (paper: 256 256 256, Table 1's 256-LN-256-256)."""
    critic_hidden_sizes: tuple[int, ...] = (64, 64, 64)
    """Hidden layer sizes of the Q-function and of the reward network (paper: 256 256 256)."""
    activation: Literal["relu", "elu", "tanh"] = "elu"
    """Hidden activation [TreePI Table 1: elu]."""
    layer_norm: bool = True
    """LayerNorm after the first hidden layer of every network [TreePI Table 1: 'LN']."""
    full_covariance: bool = False
    """Gaussian policy with a full covariance (Cholesky factor) instead of a diagonal [MPO App. D]
    ([TreePI] App. B: diagonal)."""
    # Replay [TreePI Sec. 5, Table 1]
    buffer_size: int = 2_000_000
    """Replay capacity in transitions [TreePI Table 1: 2e6]; memory is taken for no more than
    total_steps of them."""
    batch_size: int = 64
    """Snippets per gradient step (paper: 256, Table 1; 64 for a CPU)."""
    snippet_length: int = 5
    """Steps T of a snippet, over which the latent model is unrolled (paper: not given)."""
    learning_starts: int = 5_000
    """Env steps (acting with the initial pi^(i) or search) before gradient steps begin (paper:
    not given)."""
    updates_per_step: int = 1
    """Gradient steps per env step (paper: 10 in Fig. 1, 1-20 in Fig. 2; 1 keeps a CPU run
    usable)."""
    gamma: float = 0.99
    """Discount factor gamma of the TD target and of the tree [TreePI Table 1]."""
    target_network_frequency: int = 20
    """Gradient steps between copies Q' <- Q (paper: 200, Table 1, at 10 updates per env step:
    every 20 env steps; 20 keeps that pace at one update per step)."""
    policy_target_frequency: int = 50
    """Gradient steps between policy rounds pi^(i+1) <- pi (paper: 500, Sec. 5, at 10 updates
    per env step: every 50 env steps; 50 keeps that pace at one update per step)."""
    q_lr: float = 3e-4
    """Adam learning rate of the Q-function, the reward network and the model [TreePI Table 1]."""
    policy_lr: float = 3e-4
    """Adam learning rate of the policy [TreePI Table 1]."""
    # Search, the E-step [TreePI Alg. 1, Table 1]
    num_samples: int = 20
    """Branching factor M: actions sampled from pi^(i) per node, and for E_pi Q' [TreePI Table 1]."""
    depth: int = 10
    """Maximum depth K of the tree; 1 gives MPO+Predictive's one-step weights [TreePI Table 1]."""
    num_rollouts: int = 32
    """Rollouts N per search, the one that inserts the root included (paper: 100, Table 1;
    Sec. 6.1 says 200; each rollout costs a model and a network call, so 32 for a CPU)."""
    eta: float = 0.1
    """Temperature of the search's softmax and soft backup: alpha of [TreePI] (Table 1: 0.1),
    MPO's eta held fixed."""
    search_states: int = 16
    """States of each batch that are searched, from its start (0: all batch_size x
    snippet_length, the paper; a search per state is what makes a CPU update slow)."""
    # M-step trust region [TreePI eq. 6, MPO App. D]
    epsilon_mean: float = 0.005
    """Bound eps_KL on KL(pi^(i) || pi) [TreePI Sec. 5: 0.005]; with --epsilon-cov, the bound on
    its mean part only [MPO]."""
    epsilon_cov: float | None = None
    """Bound on the covariance part of KL(pi^(i) || pi) (None: one bound on the whole KL, as
    [TreePI] eq. 6; a value: MPO's decoupled bounds, [TreePI] Table 2's MPO uses 1e-4)."""
    dual_lr: float = 1e-2
    """Adam learning rate of the dual parameters log_alpha_mean and log_alpha_cov (paper: not
    given; ACME)."""
    alpha_mean_init: float = 1.0
    """Initial multiplier alpha_mean of the (whole or mean) KL bound: eta of [TreePI] eq. 6
    (paper: not given; ACME: 10)."""
    alpha_cov_init: float = 100.0
    """Initial multiplier alpha_cov of the covariance KL bound (ACME: 1000): large, so that the
    small epsilon_cov holds from the start; it then falls while the bound is slack."""


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
    if len(args.model_sizes) < 2 or min(args.model_sizes) <= 0:
        raise UsageError(f"--model-sizes needs two or more positive sizes, got {args.model_sizes}")
    if min(args.policy_hidden_sizes + args.critic_hidden_sizes, default=0) <= 0:
        raise UsageError("--policy-hidden-sizes and --critic-hidden-sizes must be positive")
    if args.buffer_size <= 0 or args.batch_size <= 0:
        raise UsageError("--buffer-size and --batch-size must be positive")
    if args.snippet_length <= 0:
        raise UsageError(f"--snippet-length must be positive, got {args.snippet_length}")
    if args.buffer_size < args.num_envs * args.snippet_length:
        raise UsageError("--buffer-size must hold --snippet-length steps of every env")
    if args.learning_starts < 0 or args.updates_per_step < 0:
        raise UsageError("--learning-starts and --updates-per-step must be >= 0")
    if not 0.0 <= args.gamma <= 1.0:
        raise UsageError(f"--gamma must be in [0, 1], got {args.gamma}")
    if min(args.target_network_frequency, args.policy_target_frequency) <= 0:
        raise UsageError("--target-network-frequency and --policy-target-frequency must be positive")
    if min(args.q_lr, args.policy_lr, args.dual_lr) <= 0:
        raise UsageError("learning rates must be positive")
    if min(args.num_samples, args.depth, args.num_rollouts) <= 0:
        raise UsageError("--num-samples, --depth and --num-rollouts must be positive")
    if args.eta <= 0 or args.search_states < 0:
        raise UsageError("--eta must be positive and --search-states >= 0")
    if args.epsilon_mean <= 0 or (args.epsilon_cov is not None and args.epsilon_cov <= 0):
        raise UsageError("--epsilon-mean and --epsilon-cov must be positive")
    if min(args.alpha_mean_init, args.alpha_cov_init) <= 0:
        raise UsageError("--alpha-mean-init and --alpha-cov-init must be positive")


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
    """TreePI needs flat Box observations and a bounded Box action space."""
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise UsageError(f"{env_id} has observation space {obs_space}; this script needs a flat Box")
    if not isinstance(action_space, gym.spaces.Box):
        raise UsageError(f"{env_id} has a {type(action_space).__name__} action space; TreePI needs a continuous (Box) one")
    if not (np.isfinite(action_space.low).all() and np.isfinite(action_space.high).all()):
        raise UsageError(f"{env_id} has unbounded actions; TreePI clips actions to finite bounds")


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


# The true model's observation, reward and termination of gymnasium's v5 MuJoCo envs, vectorised
# over a batch of (qpos before, qpos after, qvel after, action) and reading the env's own weights.
# They restate each env's step() (gymnasium 1.4 source); tests compare them with env.step.
# Envs not listed here are stepped through their own step() from a restored state instead.
Array = np.ndarray  # [n, ...] batches of states or actions
Outcome = tuple[np.ndarray, np.ndarray, np.ndarray]  # observations, rewards, terminated


def _forward_velocity(env: gym.Env, qpos0: Array, qpos: Array) -> Array:
    return (qpos[:, 0] - qpos0[:, 0]) / env.dt


def _ctrl_cost(env: gym.Env, actions: Array) -> Array:
    return env._ctrl_cost_weight * np.square(actions).sum(1)


def _half_cheetah(env: gym.Env, qpos0: Array, qpos: Array, qvel: Array, actions: Array) -> Outcome:
    reward = env._forward_reward_weight * _forward_velocity(env, qpos0, qpos)
    position = qpos[:, 1:] if env._exclude_current_positions_from_observation else qpos
    obs = np.concatenate([position, qvel], 1)
    return obs, reward - _ctrl_cost(env, actions), np.zeros(len(qpos), dtype=bool)


def _swimmer(env: gym.Env, qpos0: Array, qpos: Array, qvel: Array, actions: Array) -> Outcome:
    reward = env._forward_reward_weight * _forward_velocity(env, qpos0, qpos)
    position = qpos[:, 2:] if env._exclude_current_positions_from_observation else qpos
    obs = np.concatenate([position, qvel], 1)
    return obs, reward - _ctrl_cost(env, actions), np.zeros(len(qpos), dtype=bool)


def _hopper_walker(env: gym.Env, qpos0: Array, qpos: Array, qvel: Array, actions: Array) -> Outcome:
    z, angle = qpos[:, 1], qpos[:, 2]
    healthy = (env._healthy_z_range[0] < z) & (z < env._healthy_z_range[1])
    healthy &= (env._healthy_angle_range[0] < angle) & (angle < env._healthy_angle_range[1])
    if hasattr(env, "_healthy_state_range"):  # Hopper also bounds state_vector()[2:]
        state = np.concatenate([qpos, qvel], 1)[:, 2:]
        low, high = env._healthy_state_range
        healthy &= ((low < state) & (state < high)).all(1)
    reward = env._forward_reward_weight * _forward_velocity(env, qpos0, qpos)
    reward = reward + env._healthy_reward * healthy - _ctrl_cost(env, actions)
    position = qpos[:, 1:] if env._exclude_current_positions_from_observation else qpos
    obs = np.concatenate([position, np.clip(qvel, -10, 10)], 1)
    return obs, reward, ~healthy & env._terminate_when_unhealthy


def _inverted_pendulum(env: gym.Env, qpos0: Array, qpos: Array, qvel: Array, actions: Array) -> Outcome:
    obs = np.concatenate([qpos, qvel], 1)
    terminated = ~np.isfinite(obs).all(1) | (np.abs(obs[:, 1]) > 0.2)
    return obs, (~terminated).astype(np.float64), terminated


FAST_ENVS = {  # entry point of the env class -> its vectorised step outcome
    "gymnasium.envs.mujoco.half_cheetah_v5:HalfCheetahEnv": _half_cheetah,
    "gymnasium.envs.mujoco.swimmer_v5:SwimmerEnv": _swimmer,
    "gymnasium.envs.mujoco.hopper_v5:HopperEnv": _hopper_walker,
    "gymnasium.envs.mujoco.walker2d_v5:Walker2dEnv": _hopper_walker,
    "gymnasium.envs.mujoco.inverted_pendulum_v5:InvertedPendulumEnv": _inverted_pendulum,
}
STATE_SPEC = mujoco.mjtState.mjSTATE_FULLPHYSICS  # time, qpos, qvel, act, ...: what rollout steps


class Simulator:
    """The true model [TreePI Sec. 6.2]: copies of the env's MuJoCo simulation stepped from saved
    states. A node state is [observation (O) | mj_getState(FULLPHYSICS) (P)] in float64.

    Envs in FAST_ENVS take frame_skip mj_steps per env step on a bare MjData, and their reward,
    termination and observation are recomputed from the states. With one thread a plain loop of
    mj_setState / mj_step does this (as fast per state as `mujoco.rollout`, without its ~0.3 ms
    per call); with --threads > 1 `mujoco.rollout` steps all states in parallel in C. Any
    other gymnasium MujocoEnv is stepped by its own step() on a private copy after
    mj_setState: slower, but exact for any MuJoCo task. Nothing here runs through the TimeLimit
    wrapper, so a search never advances an episode's step counter (GYMNASIUM_NOTES).
    """

    def __init__(self, env_id: str, threads: int):
        env = make_env(env_id).unwrapped
        if not isinstance(env, gym.envs.mujoco.MujocoEnv):
            raise UsageError(
                f"--model true steps saved MuJoCo states (mj_getState/mj_setState), and {env_id} "
                "is not a MuJoCo env; use --model learned"
            )
        env.reset(seed=0)
        self.env, self.mj_model = env, env.model
        self.obs_dim = env.observation_space.shape[0]
        low = torch.as_tensor(env.action_space.low, dtype=torch.float32).flatten()
        high = torch.as_tensor(env.action_space.high, dtype=torch.float32).flatten()
        # GaussianActor.env_action's numbers, so a searched action is the one the env executes
        self.action_scale, self.action_bias = (high - low) / 2, (high + low) / 2
        entry = f"{type(env).__module__}:{type(env).__name__}"
        self.outcome = FAST_ENVS.get(entry)
        self.thread_data = [mujoco.MjData(self.mj_model) for _ in range(threads)]  # one per thread
        self.state_size = mujoco.mj_stateSize(self.mj_model, STATE_SPEC)
        start = mujoco.mj_stateSize(self.mj_model, mujoco.mjtState.mjSTATE_TIME)
        self.qpos = slice(start, start + self.mj_model.nq)
        self.qvel = slice(self.qpos.stop, self.qpos.stop + self.mj_model.nv)

    def physics(self, env: gym.Env) -> np.ndarray:
        """The saved state of a (wrapped) env's simulation [P]."""
        state = np.empty(self.state_size)
        mujoco.mj_getState(env.unwrapped.model, env.unwrapped.data, state, STATE_SPEC)
        return state

    def features(self, states: torch.Tensor) -> torch.Tensor:
        """The networks' input at a node: its observation [n, O] (float32)."""
        return states[:, : self.obs_dim].float()

    def step(self, states: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One env step from each node state: next states [n, S], rewards [n] and continuation
        1 - terminated [n], the env's own reward and termination."""
        physics = states[:, self.obs_dim :].cpu().numpy()  # [n, P]
        # the env's action [n, A], float32 as the training loop passes it to env.step
        acts = (actions.cpu().clamp(-1.0, 1.0) * self.action_scale + self.action_bias).numpy()
        if self.outcome is not None and len(self.thread_data) > 1:
            control = np.repeat(acts[:, None].astype(np.float64), self.env.frame_skip, axis=1)
            # [n, frame_skip, P]: the state after each mj_step; the last one ends the env step
            trajectory, _ = mujoco.rollout.rollout(self.mj_model, self.thread_data, physics, control, persistent_pool=True)
            next_physics = trajectory[:, -1]
        elif self.outcome is not None:
            next_physics, data = np.empty_like(physics), self.thread_data[0]
            for i in range(len(physics)):
                mujoco.mj_setState(self.mj_model, data, physics[i], STATE_SPEC)
                data.qacc_warmstart[:] = 0.0  # as a fresh rollout: independent of the last row
                data.ctrl[:] = acts[i]
                mujoco.mj_step(self.mj_model, data, nstep=self.env.frame_skip)
                mujoco.mj_getState(self.mj_model, data, next_physics[i], STATE_SPEC)
        if self.outcome is not None:
            obs, rewards, terminated = self.outcome(
                self.env, physics[:, self.qpos], next_physics[:, self.qpos], next_physics[:, self.qvel], acts
            )
        else:
            env, data = self.env, self.env.data
            next_physics = np.empty_like(physics)
            obs, rewards = np.empty((len(physics), self.obs_dim)), np.empty(len(physics))
            terminated = np.empty(len(physics), dtype=bool)
            for i in range(len(physics)):
                mujoco.mj_setState(self.mj_model, data, physics[i], STATE_SPEC)
                mujoco.mj_forward(self.mj_model, data)  # positions the env reads before stepping
                obs[i], rewards[i], terminated[i], _, _ = env.step(acts[i])
                mujoco.mj_getState(self.mj_model, data, next_physics[i], STATE_SPEC)
        next_states = torch.from_numpy(np.concatenate([obs, next_physics], 1))
        return next_states, torch.from_numpy(rewards), torch.from_numpy(1.0 - terminated)

    def roots(self, obs: np.ndarray, physics: np.ndarray) -> torch.Tensor:
        """Node states [n, S] from observations [n, O] and saved physics [n, P]."""
        return torch.from_numpy(np.concatenate([obs, physics], 1).astype(np.float64))


# == 4. Networks =======================================================================
ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh}
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
    """Gaussian policy pi(a|s) = N(mean(s), L(s) L(s)^T) on actions rescaled to [-1, 1]^A
    [MPO App. D]: L is diagonal, or with --full-covariance a full lower-triangular Cholesky
    factor; its diagonal goes through softplus. Samples are unbounded (the replay stores them and
    their log-probability); the env executes them clipped to its bounds.

    The distribution parameters `params` are the pair (mean [B, A], scale_tril [B, A, A]).
    """

    def __init__(self, obs_dim: int, action_space: gym.spaces.Box, args: Args):
        super().__init__()
        self.action_dim = self.critic_action_dim = int(np.prod(action_space.shape))
        self.full_covariance = args.full_covariance
        size = self.action_dim
        num_scale = size * (size + 1) // 2 if args.full_covariance else size  # entries of L
        self.trunk = mlp(obs_dim, args.policy_hidden_sizes, args.activation, args.layer_norm)
        self.head = nn.Linear(args.policy_hidden_sizes[-1], size + num_scale)  # mean, L
        low = torch.as_tensor(action_space.low, dtype=torch.float32).flatten()
        high = torch.as_tensor(action_space.high, dtype=torch.float32).flatten()
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw = self.head(self.trunk(obs)).split([self.action_dim, self.head.out_features - self.action_dim], dim=-1)
        if not self.full_covariance:
            return mean, torch.diag_embed(F.softplus(raw) + SCALE_MIN)  # [B, A], [B, A, A]
        rows, cols = torch.tril_indices(self.action_dim, self.action_dim, device=obs.device)
        tril = raw.new_zeros(*raw.shape[:-1], self.action_dim, self.action_dim)
        tril[..., rows, cols] = raw  # [B, A, A]
        diagonal = F.softplus(tril.diagonal(dim1=-2, dim2=-1)) + SCALE_MIN  # [MPO App. D]
        return mean, tril.tril(-1) + torch.diag_embed(diagonal)

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An action a ~ pi(.|s) [B, A] (unclipped) and its log-probability [B]."""
        params = self(obs)
        actions = self.candidates(params, 1)[0]  # [B, 1, A]
        return actions[:, 0], self.log_prob(params, actions)[:, 0]

    def candidates(self, params: tuple[torch.Tensor, torch.Tensor], num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """M actions a_j ~ pi(.|s) per state [B, M, A] and their prior weights log(1/M) [B, M]
        in the E-step: the samples stand in for the integral over actions [MPO Alg. 2, line 11]."""
        mean, scale_tril = params
        noise = torch.randn(*mean.shape[:-1], num_samples, self.action_dim, device=mean.device)
        actions = mean.unsqueeze(-2) + noise @ scale_tril.transpose(-2, -1)  # a = mean + L noise
        return actions, torch.full(actions.shape[:-1], -float(np.log(num_samples)), device=mean.device)

    def log_prob(self, params: tuple[torch.Tensor, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        """log pi(a_j|s) [B, M] of actions [B, M, A]."""
        return gaussian_log_prob(actions, *params)

    def kl_terms(
        self, params_old: tuple[torch.Tensor, torch.Tensor], params: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mean and covariance parts C_mean, C_cov [B] of KL(pi_old || pi) [MPO eq. 27]."""
        return gaussian_kl_decoupled(*params_old, *params)

    def entropy(self, params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """H = A log(2 pi e) / 2 + sum_i log L_ii  [B]."""
        log_diagonal = params[1].diagonal(dim1=-2, dim2=-1).log()
        return 0.5 * self.action_dim * float(np.log(2 * np.pi * np.e)) + log_diagonal.sum(-1)

    def critic_input(self, actions: torch.Tensor) -> torch.Tensor:
        """The action the env executes, in [-1, 1]: Q(s, a) = Q(s, clip(a)) holds exactly, so the
        critic never extrapolates outside the bounds (ACME clips the critic's input too)."""
        return actions.clamp(-1.0, 1.0)

    def env_action(self, actions: torch.Tensor) -> torch.Tensor:
        """The executed action: clipped to [-1, 1] and rescaled to the env's bounds."""
        return self.critic_input(actions) * self.action_scale + self.action_bias

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """The mean, executed as env_action, used for evaluation."""
        return self.env_action(self(obs)[0])


Actor = GaussianActor


class Critic(nn.Module):
    """Q(s, a), an MLP on [s, a] [MPO Sec. 4; one Q-function, no twin]. The first layer is
    split into its state and action columns, so the M actions of one state share the state's
    half: obs [N, 1, O] against actions [N, M, A] gives Q [N, M] in one pass."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        width = args.critic_hidden_sizes[0]
        self.obs_layer = nn.Linear(obs_dim, width)
        self.action_layer = nn.Linear(action_dim, width, bias=False)
        bound = (obs_dim + action_dim) ** -0.5  # nn.Linear's initialisation of the joint layer
        for p in (*self.obs_layer.parameters(), self.action_layer.weight):
            nn.init.uniform_(p, -bound, bound)
        self.norm = nn.LayerNorm(width) if args.layer_norm else nn.Identity()
        self.act = ACTIVATIONS[args.activation]()
        self.body = mlp(width, args.critic_hidden_sizes[1:], args.activation, False)
        self.head = nn.Linear(args.critic_hidden_sizes[-1], 1)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = self.action_layer(actions).add_(self.obs_layer(obs))  # broadcast: [N, M, H] or [B, H]
        return self.head(self.body(self.act(self.norm(x)))).squeeze(-1)  # [N, M] or [B]


class LatentModel(nn.Module):
    """The learned model [TreePI Sec. 5, App. B]: encoder s_1 = f_enc(o_1), transition
    s_{t+1} = s_t + f_trans(s_t, a_t) (a predicted delta), and a reward network r(s_t, a_t)
    whose second output is the termination logit (our addition, see Deviations). The policy
    and the Q-function read these latent states."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        sizes, latent = args.model_sizes, args.model_sizes[-1]
        self.encoder = mlp(obs_dim, sizes, args.activation, args.layer_norm)
        self.transition = nn.Sequential(
            mlp(latent + action_dim, sizes[:-1], args.activation, args.layer_norm), nn.Linear(sizes[-2], latent)
        )
        self.reward = nn.Sequential(
            mlp(latent + action_dim, args.critic_hidden_sizes, args.activation, args.layer_norm),
            nn.Linear(args.critic_hidden_sizes[-1], 2),
        )

    def features(self, states: torch.Tensor) -> torch.Tensor:
        """The networks' input at a search node: the latent state itself."""
        return states

    def predict(self, states: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next latent, reward and termination logit of (s, a), actions clipped as executed:
        [n, L], [n], [n]."""
        inputs = torch.cat([states, actions.clamp(-1.0, 1.0)], -1)
        reward, logit = self.reward(inputs).unbind(-1)
        return states + self.transition(inputs), reward, logit

    def step(self, states: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The search's model call: next states, rewards and continuation 1 - p(terminated)."""
        next_states, reward, logit = self.predict(states, actions)
        return next_states, reward, torch.sigmoid(-logit)

    def unroll(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """s_t = f(o_1, a_1..a_{t-1}) [TreePI Sec. 5]: latents [B, T+1, L] for t = 1..T+1,
        predicted rewards and termination logits [B, T], from o_1 [B, O] and actions [B, T, A]."""
        states, rewards, logits = [self.encoder(obs)], [], []
        for t in range(actions.shape[1]):
            next_state, reward, logit = self.predict(states[-1], actions[:, t])
            states.append(next_state)
            rewards.append(reward)
            logits.append(logit)
        return torch.stack(states, 1), torch.stack(rewards, 1), torch.stack(logits, 1)


# == 5. Storage ========================================================================
class Batch(NamedTuple):
    obs: torch.Tensor  # [B, T, O]
    actions: torch.Tensor  # [B, T, A], the policy's samples as stored (before clipping)
    rewards: torch.Tensor  # [B, T]
    next_obs: torch.Tensor  # [B, T, O]
    terminated: torch.Tensor  # [B, T], 1.0 where the MDP ended (no bootstrap)
    valid: torch.Tensor  # [B, T], 1.0 for the steps that belong to the snippet
    physics: torch.Tensor  # [B, T, P], the simulator's state at obs (--model true; else P = 0)


class SnippetReplay:
    """Ring buffer of transitions in time order per env ([rows, num_envs, ...]), sampled as
    snippets of T consecutive steps of one env, the trajectories the model unrolls over
    [TreePI Sec. 5]. A snippet stops after the first episode end (terminated or truncated) and
    at the newest row, so it never joins two episodes; next_obs is stored per row, so the last
    step of an episode keeps its true last observation. With --model true each row also keeps
    the simulator's state, where the searches of the update start."""

    COLUMNS = ("obs", "actions", "rewards", "next_obs", "terminated", "ended", "physics")

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        obs_dim: int,
        action_dim: int,
        physics_dim: int,
        snippet_length: int,
        device: torch.device,
    ):
        self.rows, self.num_envs, self.length = capacity // num_envs, num_envs, snippet_length
        self.pos, self.size = 0, 0  # in rows (one row = one vector step)
        widths = {"obs": (obs_dim,), "actions": (action_dim,), "next_obs": (obs_dim,)}
        widths["physics"] = (physics_dim,)
        self.data = {
            name: torch.zeros(
                self.rows,
                num_envs,
                *widths.get(name, ()),
                device=device,
                dtype=torch.float64 if name == "physics" else torch.float32,  # mj_getState's
            )
            for name in self.COLUMNS
        }

    def add(self, **columns: np.ndarray | torch.Tensor) -> None:
        """Store one vector step: one array per column with leading size num_envs."""
        for name, column in self.data.items():
            column[self.pos] = torch.as_tensor(columns[name], dtype=column.dtype)
        self.pos = (self.pos + 1) % self.rows
        self.size = min(self.size + 1, self.rows)

    def sample(self, batch_size: int) -> Batch:
        """batch_size snippets: start row and env uniform with replacement; step k is valid when
        a row after the start holds it and no episode ended at the steps before it."""
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
        return {"pos": self.pos, "size": self.size, "data": {k: v[: self.size] for k, v in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.size = state["pos"], state["size"]
        for name, column in self.data.items():
            column[: self.size] = state["data"][name].to(column.device)
        # The saving run stopped mid-episode and a resumed run starts fresh episodes, so the
        # newest row ends its snippets (as a truncation would: it still bootstraps).
        if self.size:
            self.data["ended"][(self.pos - 1) % self.rows] = 1.0


# == 6. Algorithm ======================================================================
DUAL_MIN = 1e-8  # added to softplus in dual_variable, so that eta and alpha stay positive (ACME)
LOG_DUAL_MIN = -18.0  # lower clamp of the dual parameters after each step (ACME's clamp)


def gaussian_log_prob(actions: torch.Tensor, mean: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """log N(a; mean, L L^T) = -|L^-1 (a - mean)|^2 / 2 - sum_i log L_ii - A log(2 pi) / 2.

    The Gaussian policy of [MPO App. D] with Sigma = L L^T. One triangular solve per state
    serves all M actions of that state.
    Shapes: actions [B, M, A]; mean [B, A]; scale_tril L [B, A, A] (lower triangular, positive
    diagonal); returns [B, M].
    """
    diff = (actions - mean.unsqueeze(-2)).transpose(-2, -1)  # [B, A, M]
    z = torch.linalg.solve_triangular(scale_tril, diff, upper=False)  # [B, A, M]
    log_det = scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1, keepdim=True)  # [B, 1]
    return -0.5 * z.pow(2).sum(-2) - log_det - 0.5 * mean.shape[-1] * float(np.log(2 * np.pi))


def gaussian_kl_decoupled(
    mean_old: torch.Tensor, scale_tril_old: torch.Tensor, mean: torch.Tensor, scale_tril: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(pi_old || pi) of two Gaussians split into a mean and a covariance part [MPO App. D,
    eq. 27], KL = C_mean + C_cov:
        C_mean = (mean - mean_old)^T Sigma^-1 (mean - mean_old) / 2,
        C_cov  = (tr(Sigma^-1 Sigma_old) - A + log(|Sigma| / |Sigma_old|)) / 2,
    with Sigma = L L^T the online and Sigma_old the old (target) covariance. The extracted paper
    text prints the two labels swapped; this is the assignment that makes "mean" and "cov"
    mean what they say. (ACME puts Sigma_old into C_mean instead, which decouples the gradients
    fully but makes the sum differ from the KL once Sigma moves; we keep the paper's exact sum.)
    Symbols: mu_i, Sigma_i = mean_old, L_old L_old^T; mu, Sigma = mean, L L^T; n = A.
    Shapes: mean_old, mean [B, A]; scale_tril_old, scale_tril [B, A, A]; returns two [B].
    """
    diff = (mean - mean_old).unsqueeze(-1)  # [B, A, 1]
    # |L^-1 (mean - mean_old)|^2 is the Mahalanobis term, |L^-1 L_old|_F^2 = tr(Sigma^-1 Sigma_old)
    whitened = torch.linalg.solve_triangular(
        scale_tril, torch.cat([diff, scale_tril_old], dim=-1), upper=False
    )  # [B, A, 1 + A]
    log_det_ratio = 2 * (scale_tril.diagonal(dim1=-2, dim2=-1).log() - scale_tril_old.diagonal(dim1=-2, dim2=-1).log()).sum(
        -1
    )  # log |Sigma| / |Sigma_old|
    kl_mean = 0.5 * whitened[..., 0].pow(2).sum(-1)
    kl_cov = 0.5 * (whitened[..., 1:].pow(2).sum((-2, -1)) - mean.shape[-1] + log_det_ratio)
    return kl_mean, kl_cov


def e_step_weights(q: torch.Tensor, eta: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """The non-parametric E-step solution on the candidates, normalised per state:
        q(a_j|s) = prior_j exp(Q(s, a_j) / eta) / sum_k prior_k exp(Q(s, a_k) / eta)
    [MPO eq. 8: q_i(a|s) proportional to pi(a|s, theta_i) exp(Q_theta_i(s, a) / eta*)].
    Symbols: eta the temperature (alpha of [TreePI], fixed). Shapes: q, log_prior [B, M]; eta
    scalar; returns [B, M].
    """
    return torch.softmax(q / eta + log_prior, dim=-1)


def dual_variable(log_dual: torch.Tensor) -> torch.Tensor:
    """A positive dual variable (eta, alpha_mean, alpha_cov) from its parameter:
        eta = softplus(log_eta) + DUAL_MIN
    as in [ACME], which also calls the parameters log_* though softplus, not exp, maps them.
    A multiplier then grows at most linearly while its bound is violated; with exp it grows
    exponentially (alpha_cov reached 1e23 on HalfCheetah-v5 here, and Adam's second moment of
    its gradient overflowed to inf, freezing it). Shapes: any; returns the same shape.
    """
    return F.softplus(log_dual) + DUAL_MIN


def kl_penalty(kl: torch.Tensor, alpha: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Lagrangian term alpha (epsilon - E_s KL) of the M-step [MPO App. D.3], split for
    simultaneous gradient steps: the policy minimises sg(alpha) E_s KL, the multiplier
    minimises alpha (epsilon - sg(E_s KL)), so alpha grows while the bound is violated.
    Symbols: eta_mu / eta_Sigma of App. D.3 = alpha (alpha_mean / alpha_cov here, as eta is the
    E-step's temperature), epsilon_mu / epsilon_Sigma = epsilon, C_mu / C_Sigma = kl.
    Shapes: kl [B]; alpha scalar; returns (policy term, multiplier loss), two scalars.
    """
    kl = kl.mean()
    return alpha.detach() * kl, alpha * (epsilon - kl.detach())


def q_target(rewards: torch.Tensor, terminated: torch.Tensor, next_q: torch.Tensor, gamma: float) -> torch.Tensor:
    """y = r_t + gamma (1 - terminated_t) mean_k Q'(s_{t+1}, a_k), a_k ~ pi^(i)(.|s_{t+1}).

    [TreePI eq. 6, L_Q]: the TD target with the expectation over pi^(i) estimated by samples.
    A truncated episode still bootstraps: only `terminated` masks. The tree backs up the same
    quantity, Q[parent, a] = r + gamma (1 - terminated) V(child) (`search`).
    Shapes: rewards, terminated [...]; next_q [..., M]; returns [...].
    """
    return rewards + gamma * (1.0 - terminated) * next_q.mean(-1)


def full_tree_size(num_actions: int, depth: int) -> int:
    """Nodes of the full tree, sum_{d < K} M^d: the rollouts after which the search is exact."""
    return sum(num_actions**d for d in range(depth))


def log_mean_exp(x: np.ndarray) -> np.ndarray:
    """log (1/M) sum_j exp(x_j) over the last axis, stable for large |x|."""
    peak = x.max(-1, keepdims=True)
    return (peak + np.log(np.exp(x - peak).sum(-1, keepdims=True) / x.shape[-1]))[..., 0]


class Tree(NamedTuple):
    """B search trees in fixed-capacity node arrays (node 0 is the root). The bookkeeping is
    numpy on the host: a rollout does a few hundred tiny integer and float operations, about
    1 us each in numpy against 5 us for a torch CPU op or one kernel launch on a GPU. Node
    states and actions stay torch tensors on the device of the model that made them."""

    states: torch.Tensor  # [B, C, S] node states s
    actions: torch.Tensor  # [B, C, M, A] actions a^{1:M} ~ pi^(i)(.|s) of each node
    q: np.ndarray  # [B, C, M] Q-hat[s, a^j]: Q'(s, a^j) at insertion, then r + gamma V(child)
    rewards: np.ndarray  # [B, C] r of the transition from the parent into the node
    discounts: np.ndarray  # [B, C] gamma (1 - terminated) of that transition
    parent: np.ndarray  # [B, C] parent node (-1 for the root)
    slot: np.ndarray  # [B, C] which of the parent's M actions leads to the node
    children: np.ndarray  # [B, C, M] node that each action leads to (-1: not expanded)
    complete: np.ndarray  # [B, C, M] the action's subtree is fully expanded: never revisited
    depth: np.ndarray  # [B, C] node depth d in 0 .. K-1
    size: np.ndarray  # [B] nodes in use


def search(
    roots: torch.Tensor,
    propose: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    expand: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]],
    num_rollouts: int,
    depth: int,
    eta: float,
    gamma: float,
    uniforms: np.ndarray | None = None,
) -> Tree:
    """TreePI's search from B root states at once [TreePI Alg. 1, Sec. 4].

    Each of the N rollouts after the first (which inserts the roots):
      forward rollout: from the root, draw action j among the node's incomplete actions with
        p_j ∝ exp(Q-hat[s, a^j] / eta) (eq. 4, by Gumbel-max) and follow it while it leads to
        a node; the first action that leads nowhere is expanded,
      insert: s' = f(s, a^j), r(s, a^j) and terminated from the model (one call for all trees);
        the new node draws a^{1:M} ~ pi^(i)(.|s') and sets Q-hat[s', a^k] = Q'(s', a^k),
      soft backup to the root: V(s') = eta log (1/M) sum_k exp(Q-hat[s', a^k] / eta),
        Q-hat[s, a^j] = r(s, a^j) + gamma (1 - terminated) V(s').
    Nodes live at depths 0 .. K-1 and a depth K-1 node keeps Q', so the root holds K-step
    estimates (K = 1: Q' itself, MPO's E-step). An action is complete once the node it leads to
    is at depth K-1, terminal, or has M complete actions; complete actions are never drawn again
    ("preventing fully expanded subtrees from being revisited", Sec. 4), so each rollout adds a
    node and after full_tree_size(M, K) rollouts the root's Q-hat is exactly the full-tree
    estimator Q-hat^K(s, a) = r + gamma V-hat^{K-1}(f(s, a)) of Sec. 4.

    Symbols: alpha of [TreePI] = eta (MPO's name for the temperature); M = num_samples from
    propose; N = num_rollouts; K = depth; Q^pi_pi(i) = Q' (the target critic).
    Args:
        roots: [B, S] root states (latents, or the simulator's [obs | physics]).
        propose: states [n, S] -> (actions [n, M, A] ~ pi^(i), Q'(s, a) [n, M]).
        expand: (states [n, S], actions [n, A]) -> (next states [n, S], rewards [n],
            continuation 1 - terminated [n]).
        uniforms: optional [N-1, K-1, B, M] numbers in (0, 1] for the Gumbel draws (tests pass
            them to compare searches); by default drawn from numpy's global generator.
    Returns: the Tree; the root's actions are `actions[:, 0]`, its weights `root_weights`.
    """
    num_trees, device = roots.shape[0], roots.device
    root_actions, root_q = propose(roots)  # [B, M, A], [B, M]
    num_actions = root_q.shape[1]
    capacity = min(num_rollouts, full_tree_size(num_actions, depth))
    states = roots.new_zeros(num_trees, capacity, *roots.shape[1:])
    actions = root_actions.new_zeros(num_trees, capacity, *root_actions.shape[1:])
    states[:, 0], actions[:, 0] = roots, root_actions
    q = np.zeros((num_trees, capacity, num_actions))
    q[:, 0] = root_q.cpu().numpy()
    rewards, discounts = np.zeros((num_trees, capacity)), np.zeros((num_trees, capacity))
    parent = np.full((num_trees, capacity), -1)
    slot = np.zeros((num_trees, capacity), dtype=np.int64)
    children = np.full((num_trees, capacity, num_actions), -1)
    complete = np.zeros((num_trees, capacity, num_actions), dtype=bool)
    complete[:, 0] = depth == 1  # the root is at depth K-1 = 0: Q' is final
    node_depth = np.zeros((num_trees, capacity), dtype=np.int64)
    size = np.ones(num_trees, dtype=np.int64)
    # Flat views [B*C, ...] of the same memory: node n of tree b is row b*C + n, so a single
    # fancy index reads or writes one node of every tree.
    qf, cf, kf = (x.reshape(-1, num_actions) for x in (q, complete, children))
    rf, df, pf, sf = (x.reshape(-1) for x in (rewards, discounts, parent, slot))
    for i in range(1, num_rollouts):  # rollout 0 inserted the roots
        trees = np.flatnonzero(~complete[:, 0].all(1))  # a complete root has nothing to add
        if trees.size == 0:
            break
        u = uniforms[i - 1][:, trees] if uniforms is not None else 1.0 - np.random.random((depth - 1, trees.size, num_actions))
        gumbel = -np.log(-np.log(u))  # [K-1, n, M]
        base = trees * capacity  # the root's row of each tree searched
        # forward rollout [TreePI Alg. 1]: descend through expanded, incomplete actions
        row, leaf_slot = base.copy(), np.zeros(trees.size, dtype=np.int64)
        down = np.arange(trees.size)  # trees still descending
        for d in range(depth - 1):  # a depth K-1 node is complete: never descended into
            at = row[down]
            logits = np.where(cf[at], -np.inf, qf[at] / eta + gumbel[d, down])
            j = logits.argmax(1)  # [eq. 4] a ~ Categorical(softmax(Q-hat / alpha))
            child = kf[at, j]
            leaf_slot[down] = j
            go_on = child >= 0
            down = down[go_on]
            row[down] = base[down] + child[go_on]
            if down.size == 0:
                break
        # insert [TreePI Alg. 1]: one model call and one policy/critic call for all trees
        node, new = row - base, size[trees]  # [n] the expanded node and the new one
        b_state, b_action = torch.from_numpy(trees).to(device), torch.from_numpy(trees)
        b_action = b_action.to(actions.device)
        next_states, reward, cont = expand(
            states[b_state, torch.from_numpy(node).to(device)],
            actions[b_action, torch.from_numpy(node).to(actions.device), torch.from_numpy(leaf_slot).to(actions.device)],
        )
        new_actions, new_q = propose(next_states)
        states[b_state, torch.from_numpy(new).to(device)] = next_states.to(states.dtype)
        actions[b_action, torch.from_numpy(new).to(actions.device)] = new_actions
        cont, new_row = cont.cpu().numpy(), base + new
        qf[new_row] = new_q.cpu().numpy()
        rf[new_row], df[new_row] = reward.cpu().numpy(), gamma * cont
        pf[new_row], sf[new_row], kf[row, leaf_slot] = node, leaf_slot, new
        node_depth[trees, new] = node_depth[trees, node] + 1
        cf[new_row] = ((node_depth[trees, new] == depth - 1) | (cont == 0))[:, None]
        size[trees] += 1
        # soft backup to the root [TreePI Alg. 1]
        row, up = new_row, np.arange(trees.size)  # trees still climbing
        while up.size:
            at = row[up]
            value = eta * log_mean_exp(qf[at] / eta)  # V(s') = alpha log mean exp(Q-hat / alpha)
            above = base[up] + pf[at]  # the parent's row
            qf[above, sf[at]] = rf[at] + df[at] * value  # Q-hat = r + gamma (1 - term) V(s')
            cf[above, sf[at]] = cf[at].all(1)
            row[up] = above
            up = up[pf[at] > 0]
    return Tree(states, actions, q, rewards, discounts, parent, slot, children, complete, node_depth, size)


def root_weights(tree: Tree, eta: float) -> torch.Tensor:
    """The root's normalised weights w^j = softmax_j(Q-hat[root, a^j] / eta) [TreePI eq. 4]:
    MPO's E-step weights with the search's Q-hat in place of Q' [B, M]."""
    q = torch.from_numpy(tree.q[:, 0])  # float64, as the tree backs up
    log_prior = torch.full_like(q, -float(np.log(q.shape[1])))  # M samples of pi^(i)
    weights = e_step_weights(q, torch.tensor(eta, dtype=q.dtype), log_prior)
    return weights.to(device=tree.actions.device, dtype=torch.float32)


# == 7. Updates ========================================================================
@torch.no_grad()
def run_search(
    roots: torch.Tensor, model: LatentModel | Simulator, actor_target: Actor, critic_target: Critic, args: Args
) -> Tree:
    """`search` with pi^(i) and Q' [TreePI Alg. 1's inputs] on the learned or the true model."""
    device = actor_target.action_scale.device

    def propose(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = model.features(states).to(device)  # [n, X]
        actions, _ = actor_target.candidates(actor_target(x), args.num_samples)  # [n, M, A]
        return actions, critic_target(x.unsqueeze(1), actor_target.critic_input(actions))

    return search(roots, propose, model.step, args.num_rollouts, args.depth, args.eta, args.gamma)


def search_roots(batch: Batch, states: torch.Tensor, simulator: Simulator | None, count: int) -> torch.Tensor:
    """Root states [n, S] at the first `count` valid steps of the batch (0: all of them), in
    the order of batch.valid.flatten(): the latents (no gradient), or the simulator's
    [obs | physics]."""
    mask = batch.valid.flatten().bool()
    limit = count or int(mask.sum())
    if simulator is None:
        return states.flatten(0, 1)[mask][:limit].detach()
    obs = batch.obs.flatten(0, 1)[mask][:limit].cpu().numpy()
    return simulator.roots(obs, batch.physics.flatten(0, 1)[mask][:limit].cpu().numpy())


def update(
    actor: Actor,
    actor_target: Actor,
    critic: Critic,
    critic_target: Critic,
    model: LatentModel | None,
    simulator: Simulator | None,
    actor_opt: torch.optim.Optimizer,
    critic_opt: torch.optim.Optimizer,
    dual_opt: torch.optim.Optimizer,
    log_alpha_mean: torch.Tensor,
    log_alpha_cov: torch.Tensor,
    batch: Batch,
    args: Args,
) -> dict[str, torch.Tensor]:
    """One gradient step on L = sum_t L_r + L_Q + L_pi [TreePI eq. 6]: the model, the critic
    and the policy in one backward pass (they share the latent states), and the multipliers on
    alpha (epsilon - KL), which are then clamped from below."""
    valid, count = batch.valid, batch.valid.sum()
    metrics = {}
    # s_t: the latent unroll from o_1 on the stored actions [TreePI Sec. 5], or the true state
    if model is not None:
        latents, rewards, logits = model.unroll(batch.obs[:, 0], batch.actions)  # [B, T+1, L]
        states, next_states = latents[:, :-1], latents[:, 1:].detach()
        reward_loss = ((rewards - batch.rewards).pow(2) * valid).sum() / count  # [eq. 6] L_r
        # Deviation: a termination head, so that the tree stops where the env would
        term_loss = F.binary_cross_entropy_with_logits(logits, batch.terminated, reduction="none")
        model_loss = reward_loss + (term_loss * valid).sum() / count
        metrics["losses/reward"] = reward_loss.detach()
    else:
        states, next_states = batch.obs, batch.next_obs
        model_loss = torch.zeros((), device=count.device)
    flat_states = states.flatten(0, 1)  # [B T, X]
    # L_Q [eq. 6]: TD to r_t + gamma (1 - terminated_t) E_{a ~ pi^(i)} Q'(s_{t+1}, a)
    with torch.no_grad():
        next_flat = next_states.flatten(0, 1)
        next_actions, _ = actor_target.candidates(actor_target(next_flat), args.num_samples)
        next_q = critic_target(next_flat.unsqueeze(1), actor_target.critic_input(next_actions))
        target = q_target(batch.rewards, batch.terminated, next_q.view(*valid.shape, -1), args.gamma)
    q = critic(flat_states, actor_target.critic_input(batch.actions.flatten(0, 1)))  # [B T]
    q_loss = ((q.view_as(valid) - target).pow(2) * valid).sum() / count
    # E-step [TreePI Alg. 1]: a search from each root replaces MPO's softmax(Q'/eta) weights
    roots = search_roots(batch, states, simulator, args.search_states)
    tree = run_search(roots, simulator if model is None else model, actor_target, critic_target, args)
    actions, weights = tree.actions[:, 0], root_weights(tree, args.eta)  # [n, M, A], [n, M]
    # M-step [TreePI eq. 6, MPO eq. 10]: weighted maximum likelihood of the searched actions,
    # under the KL bound to pi^(i) on every valid state (R of [TreePI eq. 6])
    mask = valid.flatten().bool()
    with torch.no_grad():
        params_old = actor_target(flat_states[mask])
    params = actor(flat_states[mask])  # the roots are the first len(roots) valid states
    root_params = tuple(p[: len(roots)] for p in params)
    policy_loss = -(weights * actor.log_prob(root_params, actions)).sum(-1).mean()
    kl_mean, kl_cov = actor.kl_terms(params_old, params)  # [n_valid] each
    if args.epsilon_cov is None:  # [TreePI eq. 6] one bound on the whole KL
        kl_mean, kl_cov = kl_mean + kl_cov, None
    alpha_mean, alpha_cov = dual_variable(log_alpha_mean), dual_variable(log_alpha_cov)
    penalty, alpha_loss = kl_penalty(kl_mean, alpha_mean, args.epsilon_mean)
    metrics.update({"stats/kl_mean": kl_mean.detach().mean(), "stats/alpha_mean": alpha_mean.detach()})
    if kl_cov is not None:
        penalty_cov, alpha_loss_cov = kl_penalty(kl_cov, alpha_cov, args.epsilon_cov)
        penalty, alpha_loss = penalty + penalty_cov, alpha_loss + alpha_loss_cov
        metrics.update({"stats/kl_cov": kl_cov.detach().mean(), "stats/alpha_cov": alpha_cov.detach()})
    # disjoint parameters: one backward serves the model, critic, policy and dual steps
    actor_opt.zero_grad(set_to_none=True)
    critic_opt.zero_grad(set_to_none=True)
    dual_opt.zero_grad(set_to_none=True)
    (model_loss + q_loss + policy_loss + penalty + alpha_loss).backward()
    actor_opt.step()
    critic_opt.step()
    dual_opt.step()
    with torch.no_grad():
        for log_dual in (log_alpha_mean, log_alpha_cov):
            log_dual.clamp_(min=LOG_DUAL_MIN)
    log_prior = -float(np.log(args.num_samples))
    kl_q = (torch.xlogy(weights, weights) - weights * log_prior).sum(-1).mean()  # KL(q || pi')
    metrics.update(
        {
            "losses/q": q_loss.detach(),
            "losses/policy": policy_loss.detach(),
            "losses/dual": alpha_loss.detach(),
            "stats/q_mean": (q.detach().view_as(valid) * valid).sum() / count,
            "stats/kl_q": kl_q,
            "stats/entropy": actor.entropy(params).detach().mean(),
        }
    )
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
    """Networks, their targets pi^(i) and Q', the learned model and the dual variables, by the
    names their state is saved under; the policy and Q read latents or true observations."""
    in_dim = args.model_sizes[-1] if args.model == "learned" else obs_dim
    actor = GaussianActor(in_dim, action_space, args).to(device)
    actor_target = GaussianActor(in_dim, action_space, args).to(device)
    actor_target.load_state_dict(actor.state_dict())
    actor_target.requires_grad_(False)
    critic = Critic(in_dim, actor.critic_action_dim, args).to(device)
    critic_target = Critic(in_dim, actor.critic_action_dim, args).to(device)
    critic_target.load_state_dict(critic.state_dict())
    critic_target.requires_grad_(False)

    def log_dual(init: float) -> torch.Tensor:
        """The parameter whose dual_variable is init: the inverse softplus, written stably."""
        value = max(init - DUAL_MIN, DUAL_MIN)
        return torch.tensor(value + np.log(-np.expm1(-value)), device=device, requires_grad=True)

    agent = {
        "actor": actor,
        "actor_target": actor_target,
        "critic": critic,
        "critic_target": critic_target,
        "log_alpha_mean": log_dual(args.alpha_mean_init),
        "log_alpha_cov": log_dual(args.alpha_cov_init),
    }
    if args.model == "learned":
        agent["model"] = LatentModel(obs_dim, actor.action_dim, args).to(device)
    return agent


@torch.no_grad()
def select_actions(
    agent: dict, simulator: Simulator | None, args: Args, obs: np.ndarray, physics: np.ndarray, greedy: bool
) -> torch.Tensor:
    """Actions [n, A] (unclipped, in [-1, 1] units) for observations [n, O] and the simulator's
    saved states [n, P]: a ~ pi^(i) (--act policy, [TreePI Alg. 2]) or a ~ mu-hat_K, the
    search's root weights (--act search, eq. 4); greedy: the mean, or the heaviest root action."""
    actor_target = agent["actor_target"]
    x = torch.as_tensor(obs, dtype=torch.float32, device=actor_target.action_scale.device)
    if args.model == "learned":
        x = agent["model"].encoder(x)
    if args.act == "policy":
        return actor_target(x)[0] if greedy else actor_target.sample(x)[0]
    roots = x if simulator is None else simulator.roots(obs, physics)
    model = agent["model"] if simulator is None else simulator
    tree = run_search(roots, model, actor_target, agent["critic_target"], args)
    weights = root_weights(tree, args.eta)  # [n, M]
    j = weights.argmax(1) if greedy else torch.multinomial(weights, 1)[:, 0]
    return tree.actions[torch.arange(len(j), device=j.device), 0, j]


def policy_fn(agent: dict, simulator: Simulator | None, args: Args, env: gym.Env) -> Callable[[np.ndarray], np.ndarray]:
    """act(obs) -> action by the greedy rule of --act, for `evaluate` on `env` (where a search
    with --model true starts: from env's own simulation state)."""

    def act(obs: np.ndarray) -> np.ndarray:
        physics = simulator.physics(env)[None] if simulator is not None else obs[None, :0]
        actions = select_actions(agent, simulator, args, obs[None], physics, greedy=True)
        return agent["actor_target"].env_action(actions)[0].cpu().numpy()

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
    simulator = Simulator(args.env, args.threads) if args.model == "true" else None
    agent = make_agent(args, env.observation_space.shape[0], env.action_space, device)
    load_agent_state(agent, payload["state"])
    returns = evaluate(policy_fn(agent, simulator, args, env), env, args.eval_episodes, args.seed + 10_000)
    env.close()
    print(
        f"eval over {len(returns)} episodes: mean {np.mean(returns):.1f} | returns " + " ".join(f"{r:.1f}" for r in returns),
        flush=True,
    )
    return {"eval_return": float(np.mean(returns)), "eval_returns": returns}


def train(args: Args) -> dict:
    """Train TreePI; returns the final metrics, counters and the run directory."""
    # -- setup: seeds, device, run directory, writer
    seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda else "cpu")
    resume = load_checkpoint(args.resume, args.env) if args.resume else None
    # -- environments
    envs = make_vec_env(args.env, args.num_envs)
    check_spaces(args.env, envs.single_observation_space, envs.single_action_space)
    simulator = Simulator(args.env, args.threads) if args.model == "true" else None
    run_dir, writer = open_run(args)
    video_dir = os.path.join(run_dir, "videos") if args.capture_video else None
    eval_env = make_eval_env(args.env, video_dir, args.eval_episodes)
    obs_dim = envs.single_observation_space.shape[0]
    # -- networks and optimizers
    agent = make_agent(args, obs_dim, envs.single_action_space, device)
    actor, actor_target, critic, critic_target = (agent[k] for k in ("actor", "actor_target", "critic", "critic_target"))
    log_alpha_mean, log_alpha_cov = (agent[k] for k in ("log_alpha_mean", "log_alpha_cov"))
    model = agent.get("model")  # None with --model true
    # fused Adam: one kernel per step for all parameters instead of several per tensor
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=True)
    # the model learns from every loss through the latents; its step rides with the critic's
    critic_params = [*critic.parameters(), *(model.parameters() if model is not None else [])]
    critic_opt = torch.optim.Adam(critic_params, lr=args.q_lr, fused=True)
    dual_opt = torch.optim.Adam([log_alpha_mean, log_alpha_cov], lr=args.dual_lr, fused=True)
    optimizers = {"actor_opt": actor_opt, "critic_opt": critic_opt, "dual_opt": dual_opt}
    # -- storage: never more rows than the run can fill (Table 1's 2e6 would be 0.5 GB)
    rb = SnippetReplay(
        min(args.buffer_size, args.total_steps + args.num_envs * args.snippet_length),
        args.num_envs,
        obs_dim,
        actor.action_dim,
        simulator.state_size if simulator is not None else 0,
        args.snippet_length,
        device,
    )
    global_step, num_updates = 0, 0
    if resume is not None:
        load_agent_state(agent, resume["state"])
        for name, opt in optimizers.items():
            if opt is not None:
                opt.load_state_dict(resume["train"][name])
        rb.load_state_dict(resume["train"]["replay"])
        set_rng_state(resume["train"]["rng"])
        global_step, num_updates = resume["global_step"], resume["train"]["num_updates"]
    act = policy_fn(agent, simulator, args, eval_env)
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
        # act: with pi^(i), or a search from each env's current state [TreePI Alg. 2]
        physics = (
            np.stack([simulator.physics(env) for env in envs.envs]) if simulator is not None else np.zeros((args.num_envs, 0))
        )
        actions = select_actions(agent, simulator, args, obs, physics, greedy=False)
        # step: the env executes the action clipped to its bounds; the replay keeps the sample
        next_obs, rewards, terminated, truncated, infos = envs.step(actor.env_action(actions).cpu().numpy())
        global_step += args.num_envs
        ended = terminated | truncated
        for episode_return, length in stats.update(rewards, ended):
            progress.add_episode(global_step, episode_return, length)
        # store: an ended episode's true last observation, never the next episode's first
        real_next_obs = next_obs.copy()
        for i in np.flatnonzero(ended):
            real_next_obs[i] = infos["final_obs"][i]
        rb.add(
            obs=obs,
            actions=actions,
            rewards=rewards,
            next_obs=real_next_obs,
            terminated=terminated,
            ended=ended,
            physics=physics,
        )
        obs = next_obs
        # update: updates_per_step gradient steps on eq. 6 per environment step
        if global_step >= args.learning_starts:
            for _ in range(args.updates_per_step * args.num_envs):
                batch = rb.sample(args.batch_size)
                progress.add_metrics(
                    update(
                        actor,
                        actor_target,
                        critic,
                        critic_target,
                        model,
                        simulator,
                        actor_opt,
                        critic_opt,
                        dual_opt,
                        log_alpha_mean,
                        log_alpha_cov,
                        batch,
                        args,
                    )
                )
                num_updates += 1
                if num_updates % args.target_network_frequency == 0:
                    critic_target.load_state_dict(critic.state_dict())  # Q' <- Q [Table 1]
                if num_updates % args.policy_target_frequency == 0:
                    actor_target.load_state_dict(actor.state_dict())  # pi^(i+1) <- pi [Sec. 5]
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
