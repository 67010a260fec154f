"""Update cost of mpo.py against sac.py, one torch thread, at HalfCheetah-v5 sizes (17-D observations, 6-D actions).

Times K updates of each variant in turn (A B C A B C ...), each on a replay of random transitions, with each file's
defaults, and prints the median time per update and its ratio to sac.py's update_critic + update_actor. A variant is
NAME=PATH[:flag,flag] (PATH a copy of mpo.py, e.g. from `git show main:mpo.py > /tmp/mpo_main.py`).

    python benchmark/mpo_speed.py mpo=mpo.py mpo_bf16=mpo.py:bf16 mpo_full=mpo.py:full_covariance main=/tmp/mpo_main.py
"""

import importlib.util
import os
import statistics
import sys
import time

import gymnasium as gym
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBS, ACT, ROWS = 17, 6, 20_000


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mpo_step(path: str, name: str, flags: list[str]):
    mpo = load(path, name)
    args = mpo.Args(**{flag.removeprefix("no_"): not flag.startswith("no_") for flag in flags})  # e.g. bf16, full_covariance
    space = gym.spaces.Box(-1.0, 1.0, (ACT,), np.float32)
    actor, actor_target = (
        mpo.GaussianActor(OBS, space, args.policy_hidden_sizes, args.activation, False, args.full_covariance) for _ in range(2)
    )
    critic, critic_target = (mpo.Critic(OBS, ACT, args.critic_hidden_sizes, args.activation, False) for _ in range(2))
    actor_target.requires_grad_(False), critic_target.requires_grad_(False)
    duals = [mpo.log_dual(x, torch.device("cpu")) for x in (args.eta_init, args.alpha_mean_init, args.alpha_cov_init)]
    opts = (
        torch.optim.Adam(actor.parameters(), fused=True),
        torch.optim.Adam(critic.parameters(), fused=True),
        torch.optim.Adam(duals, fused=True),
    )
    replay = mpo.SnippetReplay(ROWS, 1, OBS, ACT, args.retrace_steps, torch.device("cpu"))
    for _ in range(ROWS):
        a = torch.randn(1, ACT)
        replay.add(
            np.random.randn(1, OBS),
            a,
            -np.ones(1) * 8,
            np.random.randn(1),
            np.random.randn(1, OBS),
            [0.0],
            [np.random.rand() < 0.001],
        )
    # the number of snippets each version's train() samples
    with open(path) as source:
        all_steps = "ceil(B / T) snippets" in source.read()
    snippets = -(-args.batch_size // args.retrace_steps) if all_steps else args.batch_size
    step = torch.autocast("cpu", torch.bfloat16, enabled=getattr(args, "bf16", False))(mpo.update)
    return lambda: step(actor, actor_target, critic, critic_target, opts, *duals, replay.sample(snippets), args)


def sac_step():
    sac = load(os.path.join(ROOT, "sac.py"), "sac_file")
    args = sac.Args()
    space = gym.spaces.Box(-1.0, 1.0, (ACT,), np.float32)
    nets = (args.hidden_sizes, args.activation, args.layer_norm)
    actor, critic, critic_target = sac.Actor(OBS, space, *nets), sac.Critic(OBS, ACT, *nets), sac.Critic(OBS, ACT, *nets)
    critic_target.requires_grad_(False)
    log_alpha = torch.zeros((), requires_grad=True)
    actor_opt, critic_opt = torch.optim.Adam(actor.parameters(), fused=True), torch.optim.Adam(critic.parameters(), fused=True)
    alpha_opt = torch.optim.Adam([log_alpha], fused=True)
    replay = sac.ReplayBuffer(ROWS, OBS, ACT, torch.device("cpu"))
    for _ in range(ROWS):
        replay.add(
            obs=np.random.randn(1, OBS),
            actions=np.random.uniform(-1, 1, (1, ACT)),
            rewards=np.random.randn(1),
            next_obs=np.random.randn(1, OBS),
            terminated=np.zeros(1),
        )

    def step():
        batch = replay.sample(args.batch_size)
        sac.update_critic(actor, critic, critic_target, critic_opt, batch, log_alpha.detach().exp(), args.gamma)
        sac.update_actor(actor, critic, actor_opt, log_alpha, alpha_opt, batch.obs, -float(ACT))
        sac.soft_update(critic_target, critic, args.tau)

    return step


def main(specs: list[str], updates: int = 20, rounds: int = 15) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0), np.random.seed(0)
    steps = {"sac": sac_step()}
    for spec in specs:
        name, _, rest = spec.partition("=")
        path, _, flags = rest.partition(":")
        steps[name] = mpo_step(path, f"mpo_{name}", [f for f in flags.split(",") if f])
    times = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up
        for _ in range(5):
            step()
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(updates):
                step()
            times[name].append((time.perf_counter() - start) / updates)
    ratios = {name: statistics.median(t / s for t, s in zip(times[name], times["sac"])) for name in steps}
    for name in steps:
        print(f"{name:12s} {1000 * statistics.median(times[name]):7.1f} ms/update   {ratios[name]:5.2f}x sac's time")


if __name__ == "__main__":
    main(sys.argv[1:])
