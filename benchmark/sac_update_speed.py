"""sac.py's gradient updates alone, without an environment: updates per second and a profile.

Runs sac.py's own update functions (critic step, CleanRL's two actor steps every second
update, target update) on a replay buffer of random transitions with HalfCheetah's sizes
(17 observations, 6 actions) and CleanRL's settings, on one CPU thread:

    python benchmark/sac_update_speed.py                       # float32, eager
    python benchmark/sac_update_speed.py --mode bf16           # what sac.py --bf16 does
    python benchmark/sac_update_speed.py --mode compile        # torch.compile'd networks
    python benchmark/sac_update_speed.py --mode max-autotune   # ... with autotuned products
    python benchmark/sac_update_speed.py --profile             # where an update's time goes

Each repetition times `--updates` updates after a warm-up; the median is reported. With
--profile, torch.profiler's table of the operators' own time over 200 updates is printed
and the share of the matrix products (mm, addmm, bmm, baddbmm) with their GFLOP/s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import time
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sac  # from the repository root (not a package), put on sys.path above

OBS, ACT = 17, 6  # HalfCheetah-v5
PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


@dataclasses.dataclass
class Args:
    mode: Literal["eager", "bf16", "compile", "max-autotune"] = "eager"
    """eager: float32 as sac.py runs by default; bf16: under torch.autocast as sac.py --bf16;
    compile: actor and critic wrapped in torch.compile; max-autotune: the same with inductor's
    own matrix-product kernels tried too (mode max-autotune-no-cudagraphs)"""
    updates: int = 300
    """updates per repetition"""
    reps: int = 5
    """repetitions (the median is reported)"""
    threads: int = 1
    """torch CPU threads"""
    profile: bool = False
    """print where the time of 200 updates goes instead of timing"""


def make_updates(args: Args):
    """A function that runs n of sac.py's updates with CleanRL's settings."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = sac.Args(q_lr=1e-3, alpha_lr=1e-3, policy_frequency=2)
    space = gym.spaces.Box(-1.0, 1.0, (ACT,), np.float32)
    nets = (cfg.hidden_sizes, cfg.activation, cfg.layer_norm)  # built in train()'s order
    critic, target = sac.Critic(OBS, ACT, *nets), sac.Critic(OBS, ACT, *nets)
    target.load_state_dict(critic.state_dict())
    target.requires_grad_(False)
    log_alpha = torch.tensor(0.0, requires_grad=True)
    actor = sac.Actor(OBS, space, *nets)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=cfg.policy_lr, fused=True)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.q_lr, fused=True)
    alpha_opt = torch.optim.Adam([log_alpha], lr=cfg.alpha_lr, fused=True)
    if args.mode in ("compile", "max-autotune"):
        options = {"mode": "max-autotune-no-cudagraphs"} if args.mode == "max-autotune" else {}
        for net in (actor, critic, target):
            net.forward = torch.compile(net.forward, **options)
    n = 20_000
    rb = sac.ReplayBuffer(n, OBS, ACT, torch.device("cpu"))
    rb.add(
        obs=rng.normal(size=(n, OBS)),
        actions=rng.uniform(-1, 1, (n, ACT)),
        rewards=rng.normal(size=n),
        next_obs=rng.normal(size=(n, OBS)),
        terminated=(rng.random(n) < 0.01).astype(np.float32),
    )
    precision = (lambda: torch.autocast("cpu", torch.bfloat16)) if args.mode == "bf16" else contextlib.nullcontext

    def run(k: int) -> None:
        with precision():
            for u in range(1, k + 1):
                batch = rb.sample(cfg.batch_size)
                alpha = log_alpha.detach().exp()
                sac.update_critic(actor, critic, target, critic_opt, batch, alpha, cfg.gamma)
                if u % cfg.policy_frequency == 0:
                    for _ in range(cfg.policy_frequency):
                        sac.update_actor(actor, critic, actor_opt, log_alpha, alpha_opt, batch.obs, -ACT)
                sac.soft_update(target, critic, cfg.tau)

    return run


def flops_per_update(batch: int = 256, hidden: int = 256) -> float:
    """Multiply-adds x 2 of the products in one update (critic step + one actor step on
    average), counted layer by layer: forward, input gradient where needed, weight gradient."""
    q_in, layer = OBS + ACT, 2 * batch * hidden * hidden
    actor_fwd = 2 * batch * (OBS * hidden + 2 * ACT * hidden) + layer
    critic_fwd = 2 * (2 * batch * q_in * hidden + layer)  # two critics
    critic_step = actor_fwd + 2 * critic_fwd + 2 * (2 * layer + 2 * batch * q_in * hidden)
    actor_step = (
        actor_fwd
        + critic_fwd
        + 2 * (layer + 2 * batch * q_in * hidden)  # critics: input gradients only
        + 2 * layer
        + 2 * 2 * batch * 2 * ACT * hidden
        + 2 * batch * OBS * hidden  # actor
    )
    return critic_step + actor_step


def main() -> None:
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    torch.set_num_threads(args.threads)
    run = make_updates(args)
    run(100)  # warm-up (and compilation)
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            run(200)
        events = prof.key_averages()
        print(events.table(sort_by="self_cpu_time_total", row_limit=25))
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        products = sum(e.self_cpu_time_total for e in events if e.key in PRODUCTS) / 1e6
        print(f"per update: {total / 200 * 1e3:.1f} ms in operators, of which products "
              f"{products / 200 * 1e3:.1f} ms at {flops_per_update() * 200 / products / 1e9:.0f} "
              "GFLOP/s")  # fmt: skip
        return
    rates = []
    for _ in range(args.reps):
        start = time.perf_counter()
        run(args.updates)
        rates.append(args.updates / (time.perf_counter() - start))
    print(f"{args.mode}: updates/s {' '.join(f'{r:.1f}' for r in rates)}; "
          f"median {statistics.median(rates):.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
