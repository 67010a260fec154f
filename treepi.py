"""TreePI: tree search for policy improvement in continuous action spaces, in one file.

References:
    [TreePI] Springenberg, Heess, Mankowitz, Merel, Byravan, Abdolmaleki, Kay, Degrave,
        Schrittwieser, Tassa, Buchli, Belov, Riedmiller 2020, "Local Search for Policy Iteration
        in Continuous Control", arXiv:2010.05545 (Alg. 1 the search, eq. 3-6, App. A.3 Alg. 2
        the training loop, App. B and Table 1 the networks and hyperparameters).
    [MPO] Abdolmaleki, Springenberg, Tassa, Munos, Heess, Riedmiller 2018, "Maximum a Posteriori
        Policy Optimisation": the sampled-action E-step that TreePI recovers at depth 1 and the
        KL trust region of the M-step.
    [ACME] google-deepmind/acme, MPO losses: the softplus-free dual parametrisation is ours, the
        sg() split of the trust-region term follows its `compute_parametric_kl_penalty_and_dual_loss`.

Algorithm (one environment step; the function that does each line in brackets):
    1. Act with pi^(i) (--act policy, TreePI/pi), or search from the current state and sample
       the executed action from the root's weights (--act search, TreePI/search)  [act_fn, search]
    2. Store the step in a replay of per-env sequences                             [SnippetReplay]
    3. updates_per_step times: sample snippets (o_1, a_1, r_1, ..., o_T, a_T, r_T); latent
       states s_t = f_trans(f_enc(o_1), a_1..a_{t-1}) (--model learned) or the true
       observations (--model true)                                             [LatentModel.unroll]
    4. L_r = (r_t - r(s_t, a_t))^2 (learned model only)                                  [update]
    5. L_Q = (r_t + gamma (1 - terminated_t) E_{a ~ pi^(i)} Qbar(s_{t+1}, a) - Q(s_t, a_t))^2
                                                                                     [q_target]
    6. Search from s_t [TreePI Alg. 1]: a tree of depth K, branching M, N rollouts; each rollout
       descends by sampling among a node's incomplete actions with p ∝ exp(Q/alpha) (eq. 4),
       inserts one node (M actions from pi^(i), Q from Qbar), and backs up
       V = alpha log mean_j exp(Q_j/alpha), Q[parent, a] = r + gamma V               [search]
    7. L_pi = -sum_j w_j log pi_theta(a_j|s_t) + eta (KL[pi^(i)(.|s_t) || pi_theta(.|s_t)] - eps)
       with (a_j, w_j) the root's actions and normalised weights; eta by gradient ascent
                                                                     [gaussian_kl, update]
    8. Every target_network_frequency updates Qbar <- Q; every policy_target_frequency updates
       pi^(i+1) <- pi_theta                                                              [train]

Shapes: B batch of snippets (or of searched roots), T snippet length, O observation size,
A action size, M actions per node, K maximum depth, N rollouts, C node capacity of a tree,
L latent size, S node-state size (L, or O + P for the simulator with P physics numbers).

Usage:
    python treepi.py --env HalfCheetah-v5
    python treepi.py --env Hopper-v5 --act search --seed 2
    python treepi.py --env Hopper-v5 --model true --act search
    python treepi.py --env HalfCheetah-v5 --depth 1 (MPO+Predictive: weights softmax(Q/alpha))
    python treepi.py --env HalfCheetah-v5 --checkpoint runs/<run>/model.pt --eval-only
    python treepi.py --resume runs/<run>/resume.pt
    [TreePI] Table 1 (a GPU workload): --model-sizes 256 256 --head-sizes 256 256 256
        --batch-size 256 --search-states 0 --num-rollouts 100 --updates-per-step 10 --cuda

Resolved inconsistencies of the paper:
    - N = 100 rollouts (Table 1) rather than the 200 of Sec. 6.1's text: the table is the
      summary the authors tuned on Walker and fixed ("All parameters are listed in Table 1").
    - Target periods: Table 1's "target network update period 200" is the Q target; Sec. 5's
      "after 500 steps we set pi^(i+1) = pi_theta" is the policy round. Alg. 2 copies both at
      one rate; --policy-target-frequency 200 recovers it.
    - Rewards: the paper writes r(s) in eq. 3, Sec. 4 and Alg. 1, and r_phi(s_t) in eq. 6; we use
      the transition reward r(s_t, a_t) everywhere, exactly as in the critic's TD target, so
      the tree and the critic back up the same quantity.
    - eq. 6 prints E_pi[Qbar(s_t, .)] inside the TD target; the target is at s_{t+1}.

Deviations from the paper:
    - Termination: gymnasium's Hopper or Walker2d end episodes, which the control suite never
      does. The learned model also predicts termination (a logit next to the reward, trained
      by cross-entropy); the tree uses gamma (1 - p_terminated) where the critic's target uses
      gamma (1 - terminated), and the true model uses the env's own termination.
    - Cost on a CPU: the defaults search `--search-states 16` of each batch's states (paper:
      all), use smaller networks and batches and one update per env step (paper: 10); every
      reduced default names the paper's value in --help, and the Usage line above restores them.
    - The policy loss runs on the searched states only; the trust-region KL on all states.
"""

# == 1. Imports ========================================================================
import dataclasses
import difflib
import json
import math
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
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

import mujoco
import mujoco.rollout

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
    """Search model: a learned latent model (Sec. 5) or the MuJoCo simulator, stepped from saved
    states (Sec. 6.2)."""
    act: Literal["policy", "search"] = "policy"
    """Act with pi^(i) (TreePI/pi) or with an action drawn from a search at every step
    (TreePI/search); evaluation uses the mode of the same rule."""
    # Networks [TreePI Table 1, App. B]
    model_sizes: tuple[int, ...] = (256, 256)
    """Layer sizes of the encoder and of the transition; the last is the latent size
    (Table 1: 256-LN-256, latent 256)."""
    head_sizes: tuple[int, ...] = (256, 256, 256)
    """Hidden sizes of the policy, Q and reward networks (Table 1: 256-LN-256-256)."""
    activation: Literal["relu", "elu", "tanh"] = "elu"
    """Hidden activation (Table 1: elu)."""
    layer_norm: bool = True
    """LayerNorm after the first hidden layer of every network (Table 1: 'LN')."""
    # Search [TreePI Alg. 1, Table 1]
    num_actions: int = 20
    """Branching factor M: actions sampled from pi^(i) at each node (Table 1: 20)."""
    depth: int = 10
    """Maximum depth K; 1 is MPO+Predictive's one-step E-step (Table 1: 10)."""
    num_rollouts: int = 100
    """Rollouts N per search, the root's insertion included (Table 1: 100; Sec. 6.1: 200)."""
    alpha: float = 0.1
    """Temperature alpha of the search's softmax and soft backup (Table 1: 0.1)."""
    search_states: int = 16
    """Latent states searched per update, from the start of the batch (0: all batch_size x
    snippet_length, the paper; 16 keeps a CPU run usable)."""
    # Replay [TreePI Sec. 5, Table 1]
    buffer_size: int = 2_000_000
    """Replay capacity in env steps (Table 1: 2e6); allocated up to total_steps only."""
    batch_size: int = 256
    """Snippets per gradient step (Table 1: 256)."""
    snippet_length: int = 5
    """Steps T of each snippet the latent model is unrolled over (paper: not stated)."""
    learning_starts: int = 5_000
    """Env steps of uniform random actions before learning starts (paper: not stated)."""
    updates_per_step: int = 1
    """Gradient steps per env step (Fig. 1: 10; Fig. 2 sweeps 1-20; 1 for a CPU)."""
    # Losses [TreePI eq. 6]
    gamma: float = 0.99
    """Discount factor gamma of the TD target and of the tree (Table 1: 0.99)."""
    lr: float = 3e-4
    """Adam learning rate of all networks (Table 1: 3e-4)."""
    target_samples: int = 20
    """Actions from pi^(i) that estimate E_pi Qbar(s_{t+1}, .) in the TD target (paper: not
    stated; M)."""
    target_network_frequency: int = 200
    """Gradient steps between copies Qbar <- Q (Table 1: 200)."""
    policy_target_frequency: int = 500
    """Gradient steps between policy rounds pi^(i+1) <- pi_theta (Sec. 5: 500)."""
    # Trust region [TreePI eq. 6, R]
    epsilon: float = 0.005
    """KL bound eps_KL of R = eta (KL[pi^(i) || pi_theta] - eps_KL) (Sec. 5: 0.005)."""
    init_eta: float = 1.0
    """Initial multiplier eta of the trust region (paper: not stated)."""
    dual_lr: float = 1e-2
    """Adam learning rate of log eta (paper: not stated; ACME's dual learning rate)."""


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
    if not args.head_sizes or min(args.head_sizes) <= 0:
        raise UsageError(f"--head-sizes must be positive, got {args.head_sizes}")
    if min(args.num_actions, args.depth, args.num_rollouts) <= 0:
        raise UsageError("--num-actions, --depth and --num-rollouts must be positive")
    if args.alpha <= 0:
        raise UsageError(f"--alpha must be positive, got {args.alpha}")
    if args.search_states < 0:
        raise UsageError(f"--search-states must be >= 0, got {args.search_states}")
    if min(args.buffer_size, args.batch_size, args.snippet_length) <= 0:
        raise UsageError("--buffer-size, --batch-size and --snippet-length must be positive")
    if args.snippet_length > args.buffer_size:
        raise UsageError(
            f"--snippet-length {args.snippet_length} is longer than --buffer-size "
            f"{args.buffer_size}"
        )
    if args.learning_starts < 0:
        raise UsageError(f"--learning-starts must be >= 0, got {args.learning_starts}")
    if args.updates_per_step < 0:
        raise UsageError(f"--updates-per-step must be >= 0, got {args.updates_per_step}")
    if not 0.0 <= args.gamma <= 1.0:
        raise UsageError(f"--gamma must be in [0, 1], got {args.gamma}")
    if min(args.lr, args.dual_lr, args.init_eta, args.epsilon) <= 0:
        raise UsageError("--lr, --dual-lr, --init-eta and --epsilon must be positive")
    if min(args.target_samples, args.target_network_frequency, args.policy_target_frequency) <= 0:
        raise UsageError(
            "--target-samples, --target-network-frequency and --policy-target-frequency must be "
            "positive"
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
    """TreePI needs flat Box observations and a bounded Box action space."""
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise UsageError(
            f"{env_id} has observation space {obs_space}; this script needs a flat Box"
        )
    if not isinstance(action_space, gym.spaces.Box):
        raise UsageError(
            f"{env_id} has a {type(action_space).__name__} action space; TreePI needs a "
            "continuous (Box) one"
        )
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


def env_actions(actions: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Policy actions in [-1, 1] (clipped there, as ACME clips to the action spec) mapped to the
    env's bounds; the simulator and the training loop use this one function, so a searched and
    an executed action are the same numbers."""
    return low + (actions.clamp(-1.0, 1.0) + 1.0) * (high - low) / 2


# The true model's observation, reward and termination of gymnasium's v5 MuJoCo envs, vectorised
# over a batch of (qpos before, qpos after, qvel after, action) and reading the env's own weights.
# They restate each env's step() (gymnasium 1.4 source); tests compare them with env.step.
# Envs not listed here are stepped through their own step() from a restored state instead.
def _forward_velocity(env, qpos0: np.ndarray, qpos: np.ndarray) -> np.ndarray:
    return (qpos[:, 0] - qpos0[:, 0]) / env.dt


def _ctrl_cost(env, actions: np.ndarray) -> np.ndarray:
    return env._ctrl_cost_weight * np.square(actions).sum(1)


def _half_cheetah(env, qpos0, qpos, qvel, actions):
    reward = env._forward_reward_weight * _forward_velocity(env, qpos0, qpos)
    position = qpos[:, 1:] if env._exclude_current_positions_from_observation else qpos
    obs = np.concatenate([position, qvel], 1)
    return obs, reward - _ctrl_cost(env, actions), np.zeros(len(qpos), dtype=bool)


def _swimmer(env, qpos0, qpos, qvel, actions):
    reward = env._forward_reward_weight * _forward_velocity(env, qpos0, qpos)
    position = qpos[:, 2:] if env._exclude_current_positions_from_observation else qpos
    obs = np.concatenate([position, qvel], 1)
    return obs, reward - _ctrl_cost(env, actions), np.zeros(len(qpos), dtype=bool)


def _hopper_walker(env, qpos0, qpos, qvel, actions):
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


def _inverted_pendulum(env, qpos0, qpos, qvel, actions):
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

    Envs in FAST_ENVS are stepped by `mujoco.rollout` (frame_skip mj_steps per env step, in C,
    over all states at once) and their reward, termination and observation are recomputed from
    the states. Any other gymnasium MujocoEnv is stepped by its own step() on a private copy,
    after mj_setState: slower, but exact for any MuJoCo task. The private copies live below the
    TimeLimit wrapper, so searching never advances an episode's step counter.
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
        self.low = torch.as_tensor(env.action_space.low, dtype=torch.float32)
        self.high = torch.as_tensor(env.action_space.high, dtype=torch.float32)
        entry = f"{type(env).__module__}:{type(env).__name__}"
        self.outcome = FAST_ENVS.get(entry)
        self.datas = [mujoco.MjData(self.mj_model) for _ in range(threads)]  # one per thread
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

    def step(
        self, states: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One env step from each node state: next states [n, S], rewards [n] and continuation
        1 - terminated [n], the env's own reward and termination."""
        physics = states[:, self.obs_dim :].cpu().numpy()  # [n, P]
        acts = env_actions(
            actions.cpu(), self.low, self.high
        ).numpy()  # [n, A] float32 as in env.step
        if self.outcome is not None:
            control = np.repeat(acts[:, None].astype(np.float64), self.env.frame_skip, axis=1)
            # [n, frame_skip, P]: the state after each mj_step; the last one ends the env step
            trajectory, _ = mujoco.rollout.rollout(self.mj_model, self.datas, physics, control)
            next_physics = trajectory[:, -1]
            obs, rewards, terminated = self.outcome(
                self.env,
                physics[:, self.qpos],
                next_physics[:, self.qpos],
                next_physics[:, self.qvel],
                acts,
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
MIN_STD = 1e-4  # floor on the policy's standard deviation (numerical guard)


def mlp(
    in_dim: int, hidden_sizes: tuple[int, ...], activation: str, layer_norm: bool
) -> nn.Sequential:
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
    """Gaussian policy pi(a|s) = N(mu(s), diag(std(s)^2)), std = softplus(.) [TreePI App. B],
    in actions scaled to [-1, 1] (unbounded samples; the env gets them clipped)."""

    def __init__(self, in_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.trunk = mlp(in_dim, args.head_sizes, args.activation, args.layer_norm)
        self.mean = nn.Linear(args.head_sizes[-1], action_dim)
        self.std = nn.Linear(args.head_sizes[-1], action_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.mean(h), F.softplus(self.std(h)) + MIN_STD  # [B, A] each

    def sample(self, x: torch.Tensor, num: int) -> torch.Tensor:
        """num actions per state from pi(.|x): [B, num, A]."""
        mean, std = self(x)
        noise = torch.randn(mean.shape[0], num, mean.shape[1], device=mean.device)
        return mean[:, None] + std[:, None] * noise


class Critic(nn.Module):
    """Q(s, a) of the clipped action [TreePI App. B: 256-LN-256-256, action concatenated]."""

    def __init__(self, in_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.trunk = mlp(in_dim + action_dim, args.head_sizes, args.activation, args.layer_norm)
        self.out = nn.Linear(args.head_sizes[-1], 1)

    def forward(self, x: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """x [..., X], actions [..., A] -> Q [...]; x broadcasts over extra action dims."""
        x = x.expand(*actions.shape[:-1], x.shape[-1])
        return self.out(self.trunk(torch.cat([x, actions.clamp(-1.0, 1.0)], -1))).squeeze(-1)


class LatentModel(nn.Module):
    """The learned model [TreePI Sec. 5, App. B]: encoder s_1 = f_enc(o_1), transition
    s_{t+1} = s_t + f_trans(s_t, a_t) (a predicted delta), and a reward network r(s_t, a_t)
    whose second output is the termination logit (our addition, see Deviations)."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        sizes, latent = args.model_sizes, args.model_sizes[-1]
        self.encoder = mlp(obs_dim, sizes, args.activation, args.layer_norm)
        self.transition = nn.Sequential(
            mlp(latent + action_dim, sizes[:-1], args.activation, args.layer_norm),
            nn.Linear(sizes[-2], latent),
        )
        self.reward = nn.Sequential(
            mlp(latent + action_dim, args.head_sizes, args.activation, args.layer_norm),
            nn.Linear(args.head_sizes[-1], 2),
        )

    def features(self, states: torch.Tensor) -> torch.Tensor:
        """The networks' input at a node: the latent state itself."""
        return states

    def predict(
        self, states: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next latent, reward and termination logit of (s, a): [n, L], [n], [n]."""
        sa = torch.cat([states, actions.clamp(-1.0, 1.0)], -1)
        reward, logit = self.reward(sa).unbind(-1)
        return states + self.transition(sa), reward, logit

    def step(
        self, states: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The search's model call: next states, rewards and continuation 1 - p(terminated)."""
        next_states, reward, logit = self.predict(states, actions)
        return next_states, reward, torch.sigmoid(-logit)

    def unroll(
        self, obs: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    actions: torch.Tensor  # [B, T, A] executed actions, clipped to [-1, 1]
    rewards: torch.Tensor  # [B, T]
    next_obs: torch.Tensor  # [B, T, O], the true last observation where an episode ended
    terminated: torch.Tensor  # [B, T], 1.0 where the MDP ended (no bootstrap)
    valid: torch.Tensor  # [B, T], 1.0 until the snippet has crossed the end of an episode
    physics: torch.Tensor  # [B, T, P] saved simulator state of obs (P = 0 without --model true)


class SnippetReplay:
    """Preallocated ring buffer of env steps in time order, one column per parallel env.
    A sample is B snippets of T consecutive steps of one env [TreePI Sec. 5]; `valid` masks the
    steps after an episode ended inside a snippet (they belong to the next episode)."""

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        obs_dim: int,
        action_dim: int,
        physics_dim: int,
        device: torch.device,
    ):
        self.capacity, self.num_envs, self.pos, self.size = capacity, num_envs, 0, 0
        shapes = {
            "obs": (obs_dim,),
            "actions": (action_dim,),
            "rewards": (),
            "next_obs": (obs_dim,),
            "terminated": (),
            "ended": (),  # terminated or truncated
            "physics": (physics_dim,),
        }
        self.data = {
            name: torch.zeros(
                capacity,
                num_envs,
                *shape,
                device=device,
                dtype=torch.float64 if name == "physics" else torch.float32,
            )
            for name, shape in shapes.items()
        }

    def add(self, **rows: np.ndarray) -> None:
        """Store one vector step: arrays with leading size num_envs, one per field of `data`."""
        for name, column in self.data.items():
            column[self.pos] = torch.as_tensor(rows[name], dtype=column.dtype)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, length: int) -> Batch:
        """batch_size snippets of `length` steps, uniform over stored starts and envs."""
        device = self.data["rewards"].device
        start = torch.randint(0, self.size - length + 1, (batch_size, 1), device=device)
        env = torch.randint(0, self.num_envs, (batch_size, 1), device=device)
        oldest = (self.pos - self.size) % self.capacity
        t = (oldest + start + torch.arange(length, device=device)) % self.capacity  # [B, T]
        rows = {name: column[t, env] for name, column in self.data.items()}
        alive = 1.0 - rows["ended"][:, :-1]
        valid = torch.cat([torch.ones_like(alive[:, :1]), alive.cumprod(1)], 1)
        return Batch(
            obs=rows["obs"],
            actions=rows["actions"],
            rewards=rows["rewards"],
            next_obs=rows["next_obs"],
            terminated=rows["terminated"],
            valid=valid,
            physics=rows["physics"],
        )

    def state_dict(self) -> dict:
        return {
            "pos": self.pos,
            "size": self.size,
            "data": {name: column[: self.size] for name, column in self.data.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.size = state["pos"], state["size"]
        for name, column in self.data.items():
            column[: self.size] = state["data"][name].to(column.device)


# == 6. Algorithm ======================================================================
def gaussian_log_prob(mean: torch.Tensor, std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log N(a; mean, diag(std^2)) summed over action dimensions.

    Shapes: mean, std [..., A] (broadcast against actions [..., A]); returns [...].
    """
    z = (actions - mean) / std
    return (-0.5 * z.pow(2) - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_kl(
    mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor, std_q: torch.Tensor
) -> torch.Tensor:
    """KL[p || q] of diagonal Gaussians, summed over action dimensions.

    KL = sum_d log(std_q/std_p) + (std_p^2 + (mean_p - mean_q)^2) / (2 std_q^2) - 1/2.
    [TreePI eq. 6] uses KL[pi^(i)(.|s) || pi_theta(.|s)]: p the old policy, q the new one.
    Shapes: all [..., A]; returns [...].
    """
    var_ratio = (std_p / std_q).pow(2)
    mahalanobis = ((mean_p - mean_q) / std_q).pow(2)
    return 0.5 * (var_ratio + mahalanobis - 1.0 - var_ratio.log()).sum(-1)


def q_target(
    rewards: torch.Tensor, terminated: torch.Tensor, next_q: torch.Tensor, gamma: float
) -> torch.Tensor:
    """y = r_t + gamma (1 - terminated_t) mean_k Qbar(s_{t+1}, a_k), a_k ~ pi^(i)(.|s_{t+1}).

    [TreePI eq. 6, L_Q]: the TD target with the expectation over pi^(i) estimated by samples.
    A truncated episode still bootstraps: only `terminated` masks. The tree backs up the same
    quantity, Q[parent, a] = r + gamma (1 - terminated) V(child) (`search`).
    Shapes: rewards, terminated [...]; next_q [..., K]; returns [...].
    """
    return rewards + gamma * (1.0 - terminated) * next_q.mean(-1)


def full_tree_size(num_actions: int, depth: int) -> int:
    """Nodes of the full tree, sum_{d < K} M^d: the rollouts after which the search is exact."""
    return sum(num_actions**d for d in range(depth))


def log_mean_exp(x: np.ndarray) -> np.ndarray:
    """log (1/M) sum_j exp(x_j) over the last axis, stable for large |x|."""
    peak = x.max(-1)
    return peak + np.log(np.exp(x - peak[..., None]).mean(-1))


class Tree(NamedTuple):
    """B search trees in fixed-capacity node arrays (node 0 is the root). The bookkeeping is
    numpy on the host: a rollout does a few hundred tiny integer and float operations, about
    1 us each in numpy against 5 us for a torch CPU op or one kernel launch on a GPU. Node
    states and actions stay torch tensors on the device of the model that made them."""

    states: torch.Tensor  # [B, C, S] node states s
    actions: torch.Tensor  # [B, C, M, A] actions a^{1:M} ~ pi^(i)(.|s) of each node
    q: np.ndarray  # [B, C, M] Q-hat[s, a^j]: Qbar(s, a^j) at insertion, then r + gamma V(child)
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
    alpha: float,
    gamma: float,
    uniforms: np.ndarray | None = None,
) -> Tree:
    """TreePI's search from B root states at once [TreePI Alg. 1, Sec. 4].

    Each of N rollouts (the first inserts the roots):
      forward rollout: from the root, sample action j among the node's incomplete actions with
        p_j ∝ exp(Q-hat[s, a^j]/alpha) (eq. 4, by Gumbel-max) and follow it while it leads to a
        node; the first action that leads nowhere is expanded,
      insert: s' = f(s, a^j), r, terminated from the model (one call for all trees); the node
        draws a^{1:M} ~ pi^(i)(.|s') and sets Q-hat[s', a^k] = Qbar(s', a^k) (one call),
      soft backup to the root: V(s') = alpha log (1/M) sum_k exp(Q-hat[s', a^k]/alpha),
        Q-hat[s, a^j] = r + gamma (1 - terminated) V(s').
    Nodes exist at depths 0 .. K-1; a depth K-1 node keeps Qbar, so the root's values are K-step
    estimates (K = 1: Qbar itself, MPO's E-step). An action is complete once its node is at
    depth K-1, terminal, or has M complete actions; complete actions are never revisited
    ("preventing fully expanded subtrees from being revisited", Sec. 4), so every rollout adds
    a node, and after full_tree_size(M, K) rollouts the root's Q-hat is the full-tree estimator
    Q-hat^K(s, a) = r + gamma V-hat^{K-1}(f(s, a)) of Sec. 4 exactly.

    Symbols: M actions per node (from propose), N num_rollouts, K depth, alpha, gamma.
    Args:
        roots: [B, S] root states (latents, or the simulator's [obs | physics]).
        propose: states [n, S] -> (actions [n, M, A] ~ pi^(i), Qbar(s, a) [n, M]).
        expand: (states [n, S], actions [n, A]) -> (next states [n, S], rewards [n],
            continuation 1 - terminated [n]).
        uniforms: optional [N-1, K-1, B, M] numbers in (0, 1] for the Gumbel draws (tests pass
            them to compare searches); by default drawn from numpy's global generator.
    Returns: the Tree; the root's actions are `actions[:, 0]`, its weights `root_weights`.
    """
    num_trees, dev = roots.shape[0], roots.device
    root_actions, root_q = propose(roots)  # [B, M, A], [B, M]
    num_actions = root_q.shape[1]
    capacity = min(num_rollouts, full_tree_size(num_actions, depth))
    states = roots.new_zeros(num_trees, capacity, *roots.shape[1:])
    actions = root_actions.new_zeros(num_trees, capacity, *root_actions.shape[1:])
    states[:, 0], actions[:, 0] = roots, root_actions
    # Node arrays [B, C, ...] and flat views [B*C, ...] of the same memory: node n of tree b is
    # row b*C + n, so one fancy index reads a node's M values.
    q = np.zeros((num_trees, capacity, num_actions))
    q[:, 0] = root_q.cpu().numpy()
    rewards, discounts = np.zeros((num_trees, capacity)), np.zeros((num_trees, capacity))
    parent = np.full((num_trees, capacity), -1)
    slot = np.zeros((num_trees, capacity), dtype=np.int64)
    children = np.full((num_trees, capacity, num_actions), -1)
    complete = np.zeros((num_trees, capacity, num_actions), dtype=bool)
    complete[:, 0] = depth == 1  # a depth-1 tree is its root: Qbar is final
    node_depth = np.zeros((num_trees, capacity), dtype=np.int64)
    size = np.ones(num_trees, dtype=np.int64)
    qf, cf, kf = (x.reshape(-1, num_actions) for x in (q, complete, children))
    rf, df, pf, sf = (x.reshape(-1) for x in (rewards, discounts, parent, slot))
    for i in range(1, num_rollouts):  # rollout 0 inserted the roots
        trees = np.flatnonzero(~complete[:, 0].all(1))  # a complete root has nothing to add
        if trees.size == 0:
            break
        u = (
            uniforms[i - 1][:, trees]
            if uniforms is not None
            else 1.0 - np.random.random((depth - 1, trees.size, num_actions))
        )
        gumbel = -np.log(-np.log(u))  # [K-1, n, M]
        base = trees * capacity  # row of each searched tree's root
        # forward rollout [TreePI Alg. 1]: sample with p ∝ exp(Q/alpha) among incomplete actions
        row, leaf_slot = base.copy(), np.zeros(trees.size, dtype=np.int64)
        down = np.arange(trees.size)  # trees still descending
        for d in range(depth - 1):  # a node at depth K-1 is complete: never descended into
            r = row[down]
            logits = qf[r] / alpha + gumbel[d, down]
            logits[cf[r]] = -np.inf
            j = logits.argmax(1)  # [eq. 4] a ~ Categorical(softmax(Q-hat/alpha)), Gumbel-max
            child = kf[r, j]
            leaf_slot[down] = j
            go_on = child >= 0
            down = down[go_on]
            row[down] = base[down] + child[go_on]
            if down.size == 0:
                break
        # insert: one model call and one policy/critic call for all trees [TreePI Alg. 1]
        node = row - base  # [n] the expanded node of each tree
        t_trees, t_node = torch.from_numpy(trees), torch.from_numpy(node)
        t_slot = torch.from_numpy(leaf_slot).to(actions.device)
        next_states, r, cont = expand(
            states[t_trees.to(dev), t_node.to(dev)],
            actions[t_trees.to(actions.device), t_node.to(actions.device), t_slot],
        )
        new_actions, new_q = propose(next_states)
        new = size[trees]
        t_new = torch.from_numpy(new)
        states[t_trees.to(dev), t_new.to(dev)] = next_states.to(states.dtype)
        actions[t_trees.to(actions.device), t_new.to(actions.device)] = new_actions
        cont = cont.cpu().numpy()
        new_row = base + new
        qf[new_row] = new_q.cpu().numpy()
        rf[new_row], df[new_row] = r.cpu().numpy(), gamma * cont
        pf[new_row], sf[new_row] = node, leaf_slot
        kf[row, leaf_slot] = new
        node_depth[trees, new] = node_depth[trees, node] + 1
        cf[new_row] = ((node_depth[trees, new] == depth - 1) | (cont == 0))[:, None]
        size[trees] += 1
        # soft backup to the root [TreePI Alg. 1]
        row, up = new_row, np.arange(trees.size)  # trees still climbing
        while up.size:
            r = row[up]
            value = alpha * log_mean_exp(qf[r] / alpha)  # V(s') = alpha log mean exp(Q/alpha)
            p = base[up] + pf[r]  # the parent's row
            qf[p, sf[r]] = rf[r] + df[r] * value  # Q-hat[s, a] = r + gamma (1 - term) V(s')
            cf[p, sf[r]] = cf[r].all(1)
            row[up] = p
            up = up[pf[r] > 0]
    return Tree(
        states, actions, q, rewards, discounts, parent, slot, children, complete, node_depth, size
    )


def root_weights(tree: Tree, alpha: float) -> torch.Tensor:
    """Normalised weights w^j = softmax_j(Q-hat[root, a^j]/alpha) [TreePI eq. 4]: [B, M]."""
    logits = torch.from_numpy(tree.q[:, 0] / alpha)
    return torch.softmax(logits, -1).to(device=tree.actions.device, dtype=torch.float32)


# == 7. Updates ========================================================================
@torch.no_grad()
def run_search(
    roots: torch.Tensor,
    model: "LatentModel | Simulator",
    actor_target: Actor,
    critic_target: Critic,
    args: Args,
    uniforms: np.ndarray | None = None,
) -> Tree:
    """`search` with pi^(i) and Qbar [TreePI Alg. 1 inputs] on the learned or the true model."""
    device = next(actor_target.parameters()).device

    def propose(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = model.features(states).to(device)  # [n, X]
        actions = actor_target.sample(x, args.num_actions)  # [n, M, A]
        return actions, critic_target(x[:, None], actions)  # [n, M]

    return search(
        roots, propose, model.step, args.num_rollouts, args.depth, args.alpha, args.gamma, uniforms
    )


def search_roots(
    batch: Batch, states: torch.Tensor, simulator: "Simulator | None", count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` valid (snippet, t) pairs of the batch (0: all) as flat indices [n] and
    root states [n, S]: detached latents, or the simulator's [obs | physics]."""
    index = batch.valid.flatten().nonzero().squeeze(1)
    index = index[:count] if count else index
    if simulator is None:
        return index, states.flatten(0, 1)[index].detach()
    obs = batch.obs.flatten(0, 1)[index].cpu().numpy()
    return index, simulator.roots(obs, batch.physics.flatten(0, 1)[index].cpu().numpy())


def update(
    actor: Actor,
    actor_target: Actor,
    critic: Critic,
    critic_target: Critic,
    model: LatentModel | None,
    simulator: "Simulator | None",
    actor_opt: torch.optim.Optimizer,
    critic_opt: torch.optim.Optimizer,
    log_eta: torch.Tensor,
    dual_opt: torch.optim.Optimizer,
    batch: Batch,
    args: Args,
) -> dict[str, torch.Tensor]:
    """One Adam step on L = sum_t L_r + L_Q + L_pi [TreePI eq. 6] and one ascent step on eta."""
    valid = batch.valid
    count = valid.sum()
    metrics = {}
    # states s_t: the latent unroll from o_1 on the observed actions, or the true observations
    if model is not None:
        latents, rewards, logits = model.unroll(batch.obs[:, 0], batch.actions)  # [B, T+1, L]
        states, next_states = latents[:, :-1], latents[:, 1:].detach()
        reward_loss = ((rewards - batch.rewards).pow(2) * valid).sum() / count  # [eq. 6] L_r
        # Deviation: a termination head, so the tree can stop where the env would
        done_loss = F.binary_cross_entropy_with_logits(logits, batch.terminated, reduction="none")
        model_loss = reward_loss + (done_loss * valid).sum() / count
        metrics["losses/reward"] = reward_loss.detach()
    else:
        states, next_states = batch.obs, batch.next_obs
        model_loss = torch.zeros((), device=valid.device)
    # L_Q: TD to r + gamma (1 - terminated) E_{pi^(i)} Qbar(s_{t+1}, .) [eq. 6]
    with torch.no_grad():
        next_actions = actor_target.sample(next_states.flatten(0, 1), args.target_samples)
        next_q = critic_target(next_states.flatten(0, 1)[:, None], next_actions)  # [B*T, K]
        target = q_target(
            batch.rewards, batch.terminated, next_q.view(*valid.shape, -1), args.gamma
        )
    q = critic(states, batch.actions)  # [B, T]
    q_loss = ((q - target).pow(2) * valid).sum() / count
    # L_pi: -sum_j w_j log pi_theta(a_j|s) with (a_j, w_j) from the search [eq. 6]
    index, roots = search_roots(batch, states, simulator, args.search_states)
    tree = run_search(
        roots, model if model is not None else simulator, actor_target, critic_target, args
    )
    weights, search_actions = root_weights(tree, args.alpha), tree.actions[:, 0]  # [n, M(, A)]
    mean, std = actor(states)  # [B, T, A]
    log_prob = gaussian_log_prob(
        mean.flatten(0, 1)[index][:, None], std.flatten(0, 1)[index][:, None], search_actions
    )  # [n, M]
    policy_loss = -(weights * log_prob).sum(1).mean()
    # R = eta (KL[pi^(i)(.|s) || pi_theta(.|s)] - eps_KL): sg(eta) for the policy, sg(KL) for eta
    with torch.no_grad():
        mean_old, std_old = actor_target(states.detach())
    kl = (gaussian_kl(mean_old, std_old, mean, std) * valid).sum() / count
    eta = log_eta.exp()
    loss = model_loss + q_loss + policy_loss + eta.detach() * kl
    dual_loss = eta * (args.epsilon - kl.detach())  # gradient ascent on eta [eq. 6 argmax_eta]
    actor_opt.zero_grad(set_to_none=True)
    critic_opt.zero_grad(set_to_none=True)
    dual_opt.zero_grad(set_to_none=True)
    (loss + dual_loss).backward()  # disjoint parameters: one backward serves all three steps
    actor_opt.step()
    critic_opt.step()
    dual_opt.step()
    entropy = (0.5 * math.log(2 * math.pi * math.e) + std.detach().log()).sum(-1)
    metrics.update(
        {
            "losses/q": q_loss.detach(),
            "losses/policy": policy_loss.detach(),
            "losses/dual": dual_loss.detach(),
            "stats/q_mean": (q.detach() * valid).sum() / count,
            "stats/kl": kl.detach(),
            "stats/eta": eta.detach(),
            "stats/entropy": (entropy * valid).sum() / count,
        }
    )
    return metrics


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
    args: Args, obs_dim: int, action_space: gym.spaces.Box, device: torch.device
) -> dict:
    """Networks, their pi^(i) and Qbar copies and the multiplier, by the names their state is
    saved under; the learned model's heads read latents, the true model's read observations."""
    action_dim = int(np.prod(action_space.shape))
    in_dim = obs_dim if args.model == "true" else args.model_sizes[-1]
    agent = {}
    for name, net in (("actor", Actor), ("critic", Critic)):
        online, target = net(in_dim, action_dim, args).to(device), net(in_dim, action_dim, args)
        target.to(device).load_state_dict(online.state_dict())
        agent[name], agent[f"{name}_target"] = online, target.requires_grad_(False)
    if args.model == "learned":
        agent["model"] = LatentModel(obs_dim, action_dim, args).to(device)
    agent["log_eta"] = torch.tensor(math.log(args.init_eta), device=device, requires_grad=True)
    return agent


@torch.no_grad()
def select_actions(
    agent: dict,
    simulator: Simulator | None,
    args: Args,
    obs: np.ndarray,
    physics: np.ndarray | None,
    greedy: bool,
) -> torch.Tensor:
    """Actions [n, A] in policy units for observations [n, O] (and the simulator's saved states):
    from pi^(i) (--act policy, [TreePI Alg. 2]) or from a search (--act search, a ~ mu-hat_K,
    eq. 4); greedy gives the Gaussian's mean, or the root action of highest weight."""
    actor = agent["actor_target"]
    x = torch.as_tensor(obs, dtype=torch.float32, device=next(actor.parameters()).device)
    if args.model == "learned":
        x = agent["model"].encoder(x)
    if args.act == "policy":
        mean, std = actor(x)
        return mean if greedy else mean + std * torch.randn_like(mean)
    model = agent["model"] if simulator is None else simulator
    roots = x if simulator is None else simulator.roots(obs, physics)
    tree = run_search(roots, model, actor, agent["critic_target"], args)
    weights = root_weights(tree, args.alpha)  # [n, M]
    j = weights.argmax(1) if greedy else torch.multinomial(weights, 1).squeeze(1)
    return tree.actions[torch.arange(len(j), device=j.device), 0, j]


def policy_fn(
    agent: dict, simulator: Simulator | None, args: Args, env: gym.Env
) -> Callable[[np.ndarray], np.ndarray]:
    """act(obs) -> env action with the greedy rule of --act, for `evaluate` on `env` (whose
    simulation the search starts from with --model true)."""
    low = torch.as_tensor(env.action_space.low, dtype=torch.float32)
    high = torch.as_tensor(env.action_space.high, dtype=torch.float32)

    def act(obs: np.ndarray) -> np.ndarray:
        physics = simulator.physics(env)[None] if simulator is not None else None
        actions = select_actions(agent, simulator, args, obs[None], physics, greedy=True)
        return env_actions(actions.cpu(), low, high)[0].numpy()

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
    video_dir = (
        os.path.join(os.path.dirname(args.checkpoint), "videos") if args.capture_video else None
    )
    env = make_eval_env(args.env, video_dir, args.eval_episodes)
    check_spaces(args.env, env.observation_space, env.action_space)
    simulator = Simulator(args.env, args.threads) if args.model == "true" else None
    agent = make_agent(args, env.observation_space.shape[0], env.action_space, device)
    load_agent_state(agent, payload["state"])
    returns = evaluate(
        policy_fn(agent, simulator, args, env), env, args.eval_episodes, args.seed + 10_000
    )
    env.close()
    print(
        f"eval over {len(returns)} episodes: mean {np.mean(returns):.1f} | returns "
        + " ".join(f"{r:.1f}" for r in returns),
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
    action_dim = int(np.prod(envs.single_action_space.shape))
    low = torch.as_tensor(envs.single_action_space.low, dtype=torch.float32)
    high = torch.as_tensor(envs.single_action_space.high, dtype=torch.float32)
    # -- networks and optimizers
    agent = make_agent(args, obs_dim, envs.single_action_space, device)
    actor, actor_target, critic, critic_target, log_eta = (
        agent[k] for k in ("actor", "actor_target", "critic", "critic_target", "log_eta")
    )
    model = agent.get("model")
    # fused Adam: one kernel per step for all parameters instead of several per tensor
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.lr, fused=True)
    # the model's encoder and transition learn from all losses; their step rides with the critic's
    critic_params = [*critic.parameters(), *(model.parameters() if model is not None else [])]
    critic_opt = torch.optim.Adam(critic_params, lr=args.lr, fused=True)
    dual_opt = torch.optim.Adam([log_eta], lr=args.dual_lr, fused=True)
    optimizers = {"actor_opt": actor_opt, "critic_opt": critic_opt, "dual_opt": dual_opt}
    # -- storage: time steps per env column, no more than the run can fill
    capacity = min(args.buffer_size, args.total_steps) // args.num_envs + 1
    physics_dim = simulator.state_size if simulator is not None else 0
    rb = SnippetReplay(capacity, args.num_envs, obs_dim, action_dim, physics_dim, device)
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
            out["train"] = {
                name: opt.state_dict() for name, opt in optimizers.items() if opt is not None
            }
            out["train"].update(num_updates=num_updates, replay=rb.state_dict(), rng=rng_state())
        return out

    # -- loop
    obs, _ = envs.reset(seed=args.seed + global_step)  # a resumed run starts fresh episodes
    next_eval = global_step + args.eval_every if args.eval_every else None
    next_log = global_step + args.log_every
    next_ckpt = global_step + args.checkpoint_every if args.checkpoint_every else None
    while global_step < args.total_steps:
        # act: the simulator's state of each env is where a search starts (and a snippet's root)
        physics = (
            np.stack([simulator.physics(env) for env in envs.envs])
            if simulator is not None
            else np.zeros((args.num_envs, 0))
        )
        if global_step < args.learning_starts:
            actions = torch.rand(args.num_envs, action_dim) * 2 - 1
        else:
            actions = select_actions(agent, simulator, args, obs, physics, greedy=False)
        actions = actions.clamp(-1.0, 1.0).cpu()
        # step
        next_obs, rewards, terminated, truncated, infos = envs.step(
            env_actions(actions, low, high).numpy()
        )
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
            actions=actions.numpy(),
            rewards=rewards,
            next_obs=real_next_obs,
            terminated=terminated,
            ended=ended,
            physics=physics,
        )
        obs = next_obs
        # update: updates_per_step gradient steps per environment step
        if global_step >= args.learning_starts and rb.size >= args.snippet_length:
            for _ in range(args.updates_per_step * args.num_envs):
                batch = rb.sample(args.batch_size, args.snippet_length)
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
                        log_eta,
                        dual_opt,
                        batch,
                        args,
                    )
                )
                num_updates += 1
                if num_updates % args.target_network_frequency == 0:
                    critic_target.load_state_dict(critic.state_dict())  # Qbar <- Q [Table 1]
                if num_updates % args.policy_target_frequency == 0:
                    actor_target.load_state_dict(actor.state_dict())  # pi^(i+1) <- pi_theta
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
