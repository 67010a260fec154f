"""Search throughput of treepi.py against the raw cost of what a search calls.

For B root states and N rollouts a search makes N-1 model calls (B transitions each) and N
policy/critic calls (B*M actions each). This script times, interleaved and repeated so that
a shared machine's load hits both sides alike:
  search   treepi.search from B roots with pi^(i) and Q' (treepi.proposals), wall time;
  network  the same network calls without a tree: N x (model step + policy samples + critic)
           on B rows (learned model), or N x (policy samples + critic) (true model);
  physics  (true model) the N-1 env steps of B states alone: the Simulator's restore of each
           saved state and frame_skip mj_steps on its MjData, no observation or reward;
  alternating (true model) the same physics and network calls in the search's order, each
           rollout's B env steps then its network pass on B rows, so that each side finds the
           CPU's caches as the other left them, as in a search;
and reports roots searched per second, model transitions per second, and the ratios
raw / search (1 = the search costs no more than what it calls).

    python benchmark/treepi_speed.py --model learned --roots 1 16 64
    python benchmark/treepi_speed.py --model true --env HalfCheetah-v5 --roots 1 16 64
    python benchmark/treepi_speed.py --roots 16 64 --flags="--num-rollouts 100 --model-sizes
        256 256 --policy-hidden-sizes 256 256 256 --critic-hidden-sizes 256 256 256"

Measured with the defaults (M=20, K=10, N=16, 64-wide nets, one torch thread) on a 2-core VM with
nothing else running, 2026-12-06; B = 1 / 16 / 64 roots:
    learned: 8.5 / 12.2 / 24 ms per search, 118 / 1312 / 2629 roots/s; network/search 0.58 / 0.66 / 0.74
    true (HalfCheetah-v5): 8.4 / 22 / 63 ms, 119 / 724 / 1016 roots/s; (mj_step+network)/search 0.42 / 0.60 / 0.71
(with N=32, the default before: learned 16-19 / 28-30 / 57-58 ms, true 18 / 46 ms at B = 1 / 16, on a shared VM).
With treepi.MLP (its layers' forward called directly, no nn.Module call dispatch), three runs interleaved with the
version before it: learned B = 16 11.8-12.3 ms against 13.1-17.2, network/search 0.60-0.64 (both sides faster);
true (mj_step+network)/search 0.54-0.59 at B = 16 either way.
2026-12-07, nine runs with the other jobs paused: (mj_step+network)/search 0.58-0.64 at B = 16 and 0.66-0.78 at 64;
the two alternating take 1.08-1.23 times the sum of the two timed apart (each finds the caches as the other left
them) and are 0.65-0.75 of a search at B = 16, 0.71-0.80 at 64 (and one outlier, 1.03). The Simulator's saved
states of the FAST_ENVS no longer carry xpos and xipos (their steps read qpos and qvel only): the same trees, search times within this noise.
The rest is the tree's bookkeeping, whose numpy calls per level of a descent and backup do not
depend on B: a profile of training (Hopper-v5, trees ~8 levels deep once Q is trained) puts
~35% of a search in search()'s own numpy work and ~60% in the network calls (ELU ~25% of
those, the linear layers ~25%); the true model adds the saved-state copies and the numpy
recomputation of observations and rewards (a line profile of Simulator.step, HalfCheetah-v5,
16 states: mj_step 63%, mj_setState / mj_getState and the carried arrays 24%). Tried and not
kept (2026-12-06): every node's Gumbel draw at once and the path followed by child pointers,
with the backup's rows gathered once; the trees were identical bit for bit and a search took
1.00-1.02 times as long (real trees of a Hopper-v5 run, 4-5 levels deep), so the bookkeeping's
cost is the number of numpy calls per rollout, not how they are arranged. Tried and not kept (2026-12-07): for the
FAST_ENVS, the action written into the saved states' ctrl and mj_setState / mj_step / mj_getState called without
the Simulator's per-state wrappers, and the Gumbel noise transformed per level only for the trees still descending
(the same trees): in CPU time, seven runs interleaved with the code before beside two benchmark jobs,
(mj_step+network)/search 0.55-0.67 against 0.55-0.70 at B = 16, no gain beyond the noise.
Tried and not kept (2026-12-07, the second VM): torch.compile (inductor's CPU code, dynamic=False) of the search's
propose (policy and critic on 16 states, 20 actions each) and of the learned model's step: propose 0.79-0.91 of eager's
CPU time, the step 1.04-1.13, after 22 s of compiling; the networks' cost at these sizes is their arithmetic on the
critic's 320 rows, not torch's per-operator dispatch, so compiling cannot buy the 1.25x that 0.5x sac.py needs here.
--bf16 (interleaved with float32): with the paper's 256-wide networks a search of B = 16 / 64
roots takes 0.89 / 0.84 of float32's time and B = 1 twice as long; with the 64-wide defaults
bfloat16 is slower at every B (autocast's casts cost more than the smaller products save).
"""

import argparse
import os
import statistics
import sys
import time

import mujoco
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import treepi


def timed(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["learned", "true"], default="learned")
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--roots", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flags", default="", help='treepi.py flags, e.g. --flags="--depth 5"')
    cli = parser.parse_args()
    torch.set_num_threads(1)
    flags = ["--env", cli.env, "--model", cli.model, *cli.flags.split()]
    args = treepi.tyro.cli(treepi.Args, args=flags)
    env = treepi.make_env(cli.env)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    # pi^(i), Q' and the search's model, built as treepi.train builds them
    in_dim = args.model_sizes[-1] if cli.model == "learned" else obs_dim
    policy = (args.policy_hidden_sizes, args.activation, args.layer_norm, args.full_covariance)
    actor = treepi.GaussianActor(in_dim, env.action_space, *policy).requires_grad_(False)
    critic = treepi.Critic(in_dim, action_dim, args.critic_hidden_sizes, args.activation, args.layer_norm).requires_grad_(
        False
    )
    simulator = treepi.Simulator(cli.env) if cli.model == "true" else None
    latent = (obs_dim, action_dim, args.model_sizes, args.critic_hidden_sizes, args.activation, args.layer_norm)
    model = treepi.LatentModel(*latent).requires_grad_(False) if simulator is None else simulator
    propose = treepi.proposals(actor, critic, model.features, args.num_samples, args.bf16)
    precision = torch.autocast("cpu", torch.bfloat16, enabled=args.bf16)  # --flags=--bf16: as treepi.train sets it
    step = precision(model.step) if simulator is None else model.step
    n = args.num_rollouts
    print(
        f"{cli.model} model, {cli.env}, M={args.num_samples} K={args.depth} N={n}, "
        f"nets {args.policy_hidden_sizes}/{args.critic_hidden_sizes}/{args.model_sizes}, "
        f"torch threads 1{', bf16' if args.bf16 else ''}"
    )
    for num_roots in cli.roots:
        # roots: states visited by random actions
        obs_rows, physics_rows = [], []
        obs, _ = env.reset(seed=0)
        for i in range(num_roots):
            for _ in range(5):
                obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
                if terminated or truncated:
                    obs, _ = env.reset(seed=i + 1)
            obs_rows.append(obs)
            physics_rows.append(simulator.physics(env) if simulator else np.zeros(0))
        obs_rows, physics_rows = np.stack(obs_rows), np.stack(physics_rows)
        roots = model.roots(torch.as_tensor(obs_rows, dtype=torch.float32), physics_rows)  # latents, or [obs | physics]
        features = model.features(roots).float()
        actions = actor.candidates(actor(features), args.num_samples)[0]

        def network_pass():  # one rollout's policy samples and critic on B rows
            sampled, _ = actor.candidates(actor(features), args.num_samples)
            critic(features.unsqueeze(1), actor.critic_input(sampled))

        @torch.inference_mode()  # as treepi.train runs its searches
        @precision
        def networks():
            for i in range(n):
                if simulator is None and i > 0:
                    model.step(roots, actions[:, 0])
                network_pass()

        @torch.inference_mode()  # as treepi.train runs its searches
        def search():
            treepi.search(roots, propose, step, n, args.depth, args.temperature, args.gamma)

        results = {"search": [], "network": [], "mj_step": [], "alternating": []}
        if simulator is not None:
            controls = actions[:, 0].clamp(-1, 1) * simulator.action_scale + simulator.action_bias
            controls = np.repeat(controls.numpy()[:, None].astype(np.float64), model.env.frame_skip, 1)

            def physics_of_one_rollout():
                for b in range(num_roots):
                    model.restore(physics_rows[b])
                    model.data.ctrl[:] = controls[b, 0]
                    mujoco.mj_step(model.mj_model, model.data, nstep=model.env.frame_skip)

            def mj_step():
                for _ in range(n - 1):
                    physics_of_one_rollout()

            @torch.inference_mode()
            def alternating():  # the same calls in the search's order: each rollout's physics, then its network pass
                network_pass()
                for _ in range(n - 1):
                    physics_of_one_rollout()
                    network_pass()

        for _ in range(cli.repeats):  # interleaved: load changes hit every side alike
            results["search"].append(timed(search, 1))
            results["network"].append(timed(networks, 1))
            if simulator is not None:
                results["mj_step"].append(timed(mj_step, 1))
                results["alternating"].append(timed(alternating, 1))
        t = {k: statistics.median(v) for k, v in results.items() if v}
        transitions = num_roots * (n - 1)
        line = (
            f"B={num_roots:4d}: search {t['search'] * 1e3:8.1f} ms | {num_roots / t['search']:8.1f} "
            f"roots/s | {transitions / t['search']:9.0f} transitions/s | network only "
            f"{t['network'] * 1e3:7.1f} ms"
        )
        if simulator is None:
            line += f" | network/search {t['network'] / t['search']:.2f}"
        else:
            line += (
                f" | physics: mj_step {t['mj_step'] * 1e3:7.1f} ms | mj_step/search "
                f"{t['mj_step'] / t['search']:.2f}, (mj_step+network)/search "
                f"{(t['mj_step'] + t['network']) / t['search']:.2f} | the two alternating {t['alternating'] * 1e3:7.1f} "
                f"ms: /search {t['alternating'] / t['search']:.2f}"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
