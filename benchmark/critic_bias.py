"""How far a trained critic's Q(s, a) lies from the return that follows, on the states its policy visits.

For each model.pt of mpo.py or sac.py, this runs the stochastic policy whose values the critic learns (mpo.py: the
target policy pi', whose Q the critic fits by Retrace; sac.py: the actor) for a few episodes in a fresh env (the file's
own make_env, seeds 777, 778, ...) and compares, at every step t, the critic's value of the action taken with the
discounted return observed from t on:
    mpo.py:  Q(s_t, a_t) (one Q-function, or the minimum of --num-critics; the action clipped as the env runs it)
             against G_t = sum_k gamma^k r_{t+k}
    sac.py:  min_e Q_e(s_t, a_t) against the soft return G_t = r_t + sum_{k>=1} gamma^k (r_{t+k} - alpha log pi(a_{t+k}|s_{t+k}))
A truncated episode contributes only the steps whose unseen tail weighs under 1% (gamma^k < 0.01, k >= 459 at
gamma = 0.99); an episode that ends by termination contributes every step. One line per model: the episodes' mean
length, the steps compared, mean Q, mean G, the bias mean(Q - G) and the bias relative to mean |G|.

    python benchmark/critic_bias.py runs/bench/runs/mpo/Walker2d-v5/seed*/*/model.pt runs/bench/runs/sac/Walker2d-v5/seed*/*/model.pt
"""

import dataclasses
import importlib
import math
import os
import sys

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # mpo.py, sac.py: the repository root

ALGOS = ("mpo", "sac")


@dataclasses.dataclass
class Args:
    models: tyro.conf.Positional[tuple[str, ...]]
    """model.pt (or resume.pt) files of mpo.py or sac.py runs"""
    episodes: int = 10
    """episodes per model"""
    seed: int = 777
    """seed of the first episode (the i-th: seed + i) and of the policy's samples"""


def discounted_returns(rewards: np.ndarray, bonus: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = r_t + gamma (bonus_{t+1} + G_{t+1}), G_{T-1} = r_{T-1}: the return from t on, with a soft critic's entropy
    bonus -alpha log pi of every later action (zeros for mpo.py)."""
    returns, g = np.zeros(len(rewards)), 0.0
    for t in reversed(range(len(rewards))):
        g = rewards[t] + (gamma * (bonus[t + 1] + g) if t + 1 < len(rewards) else 0.0)
        returns[t] = g
    return returns


def load(path: str):
    """The model's saved arguments, act(obs) -> (env action, Q of the action, bonus) and its env."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    algo = payload.get("algo") if isinstance(payload, dict) else None
    if algo not in ALGOS:
        raise ValueError(f"{path} is not a model.pt of {' or '.join(f'{a}.py' for a in ALGOS)}")
    module, args, state = importlib.import_module(algo), payload["args"], payload["state"]
    env = module.make_env(payload["env"])
    obs_dim, space = env.observation_space.shape[0], env.action_space
    if algo == "mpo":
        policy = (obs_dim, space, tuple(args["policy_hidden_sizes"]), args["activation"], args["layer_norm"])
        actor = module.GaussianActor(*policy, args["full_covariance"]) if space.shape else module.CategoricalActor(*policy)
        value = (tuple(args["critic_hidden_sizes"]), args["activation"], args["layer_norm"], args["num_critics"])
        critic = module.Critic(obs_dim, actor.critic_action_dim, *value)
        actor.load_state_dict(state["actor_target"])  # pi', whose Q the critic learns
        critic.load_state_dict(state["critic"])

        def act(obs: torch.Tensor):
            actions, _ = actor.sample(obs)
            return actor.env_action(actions), critic(obs, actor.critic_input(actions)).amin(0), torch.zeros(1)

    else:
        nets = (tuple(args["hidden_sizes"]), args["activation"], args["layer_norm"])
        actor, critic = module.Actor(obs_dim, space, *nets), module.Critic(obs_dim, int(np.prod(space.shape)), *nets)
        actor.load_state_dict(state["actor"])
        critic.load_state_dict(state["critic"])
        alpha = float(state["log_alpha"].exp())

        def act(obs: torch.Tensor):
            actions, log_prob = actor.sample(obs)
            return actions, critic(obs, actions).amin(0), -alpha * log_prob

    return args, act, env


@torch.no_grad()
def measure(path: str, episodes: int, seed: int) -> dict:
    """Mean Q and mean G over the compared steps of `episodes` episodes, their difference and the episodes' lengths."""
    args, act, env = load(path)
    torch.manual_seed(seed)
    tail = math.ceil(math.log(0.01) / math.log(args["gamma"])) if args["gamma"] < 1 else math.inf  # gamma^tail < 1%
    q_all, g_all, lengths = [], [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        values, rewards, bonus, terminated, truncated = [], [], [], False, False
        while not (terminated or truncated):
            action, q, b = act(torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0))
            obs, reward, terminated, truncated, _ = env.step(action[0].numpy())
            values.append(q.item())
            rewards.append(float(reward))
            bonus.append(b.item())
        returns = discounted_returns(np.array(rewards), np.array(bonus), args["gamma"])
        keep = len(rewards) if terminated else max(len(rewards) - tail, 0)
        q_all += values[:keep]
        g_all += returns[:keep].tolist()
        lengths.append(len(rewards))
    env.close()
    if not q_all:
        raise ValueError(f"no step has its return observed: episodes of {np.mean(lengths):.0f} steps all truncated")
    q, g = np.array(q_all), np.array(g_all)
    bias, scale = float((q - g).mean()), float(np.abs(g).mean())  # scale 0: a sparse task with no reward seen
    return dict(length=float(np.mean(lengths)), steps=len(q), q=float(q.mean()), g=float(g.mean()), bias=bias,
                relative=bias / scale if scale > 0 else float("nan"))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(Args, args=argv)
    problems = [] if args.models else ["give one or more model.pt files"]
    problems += [f"{path}: not found" for path in args.models if not os.path.isfile(path)]
    problems += [] if args.episodes > 0 else [f"--episodes must be positive, got {args.episodes}"]
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    for path in args.models:
        try:
            m = measure(path, args.episodes, args.seed)
        except (ValueError, KeyError, RuntimeError) as e:  # not a model of ours, or of another version of the file
            print(f"error: {path}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
            return 2
        print(
            f"{path}: length {m['length']:.0f} | steps {m['steps']} | Q {m['q']:.1f} | G {m['g']:.1f} | "
            f"bias {m['bias']:+.1f} ({m['relative']:+.0%} of |G|)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
