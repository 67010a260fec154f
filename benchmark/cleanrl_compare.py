"""sac.py and ppo.py against CleanRL, side by side on one machine: speed and returns.

CleanRL (https://github.com/vwxyzjn/cleanrl) needs its own virtual environment, because it
expects gymnasium 0.29 and the `-v4` MuJoCo envs:

    git clone https://github.com/vwxyzjn/cleanrl ../cleanrl
    python -m venv ../cleanrl/venv
    ../cleanrl/venv/bin/pip install torch==2.13.0 gymnasium==0.29.1 mujoco==2.3.7 "numpy<2" \
        tyro tensorboard

Then, from the repository root:

    python benchmark/cleanrl_compare.py speed --algo sac --threads 2     # updates/s, both files
    python benchmark/cleanrl_compare.py speed --algo ppo --threads 1     # env steps/s
    python benchmark/cleanrl_compare.py learn                             # 3 seeds x 2 envs x 2 algos
    python benchmark/cleanrl_compare.py summary                           # the returns table

Both implementations get the same hyperparameters: CleanRL's (ours with `--q-lr 1e-3
--alpha-lr 1e-3 --policy-frequency 2` for SAC; ppo.py's defaults are already CleanRL's).

Speed is measured the same way for both: each script runs to two budgets N1 < N2 and the rate
is (N2 - N1) / (t2 - t1) of process wall time, so imports, env creation and (for SAC) the
random steps before learning starts cancel. For SAC every env step after `learning_starts` is
one gradient step of the critics, so that rate is updates per second.

`learn` runs every (algo, env, seed, implementation) as its own process, `--jobs` at a time,
with one torch thread each; a run whose log says it finished is not run again. `summary` reads
the tensorboard events of both (`charts/episodic_return`, which both write) and prints the mean
training return of the episodes that ended in the last 10% of the budget, and the mean over the
whole run (a proxy for the area under the learning curve), per seed and over seeds.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Args:
    mode: tyro.conf.Positional[Literal["speed", "learn", "summary"]]
    """speed: updates/s (SAC) or steps/s (PPO) of both; learn: the training runs; summary:
    the returns table from the runs that `learn` wrote"""
    algo: Literal["sac", "ppo", "both"] = "both"
    """which algorithm(s); `speed` needs one of sac, ppo"""
    cleanrl_dir: str = "../cleanrl"
    """a checkout of github.com/vwxyzjn/cleanrl"""
    cleanrl_python: str = "../cleanrl/venv/bin/python"
    """the Python of CleanRL's virtual environment (gymnasium 0.29, mujoco 2.3)"""
    python: str = sys.executable
    """the Python that runs our files"""
    out: str = "runs_cleanrl_compare"
    """where `learn` writes logs and tensorboard runs, and `summary` reads them"""
    threads: int = 1
    """torch CPU threads for both implementations (OMP_NUM_THREADS and ours' --threads)"""
    reps: int = 3
    """speed: repetitions, alternating the two implementations; the median is reported"""
    env: str = "HalfCheetah"
    """speed: the env, without version (ours runs -v5, CleanRL -v4)"""
    sac_updates: tuple[int, int] = (500, 3500)
    """speed, SAC: the two budgets N1, N2 counted in updates after learning starts"""
    ppo_steps: tuple[int, int] = (4096, 24576)
    """speed, PPO: the two budgets N1, N2 in env steps (multiples of the 2048-step rollout)"""
    envs: tuple[str, ...] = ("HalfCheetah", "Hopper")
    """learn/summary: envs, without version"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """learn/summary: seeds, the same for both implementations"""
    sac_total_steps: int = 20_000
    """learn: env steps per SAC run (learning starts after 5000)"""
    ppo_total_steps: int = 300_000
    """learn: env steps per PPO run"""
    jobs: int = 2
    """learn: runs at once (one per CPU core)"""


LEARNING_STARTS = 5_000  # CleanRL's and sac.py's default


def env_for(threads: int, cleanrl: Args | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if cleanrl is not None:
        env["PYTHONPATH"] = os.path.abspath(cleanrl.cleanrl_dir)
    return env


def cleanrl_cmd(args: Args, algo: str, env_id: str, steps: int, seed: int) -> list[str]:
    script = {"sac": "sac_continuous_action.py", "ppo": "ppo_continuous_action.py"}[algo]
    return [args.cleanrl_python, os.path.join(os.path.abspath(args.cleanrl_dir), "cleanrl", script),
            "--env-id", f"{env_id}-v4", "--total-timesteps", str(steps), "--seed", str(seed),
            "--no-cuda"]  # fmt: skip


def ours_cmd(args: Args, algo: str, env_id: str, steps: int, seed: int) -> list[str]:
    cmd = [args.python, os.path.join(ROOT, f"{algo}.py"), "--env", f"{env_id}-v5",
           "--total-steps", str(steps), "--seed", str(seed), "--threads", str(args.threads),
           "--checkpoint-every", "0"]  # fmt: skip
    if algo == "sac":  # CleanRL's SAC settings; the defaults are the paper's
        cmd += ["--q-lr", "1e-3", "--alpha-lr", "1e-3", "--policy-frequency", "2"]
    return cmd


# -- speed ---------------------------------------------------------------------------------------
def wall_time(cmd: list[str], env: dict, cwd: str) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def speed(args: Args) -> None:
    if args.algo == "both":
        sys.exit("error: speed measures one algorithm at a time: --algo sac or --algo ppo")
    offset = LEARNING_STARTS if args.algo == "sac" else 0
    n1, n2 = args.sac_updates if args.algo == "sac" else args.ppo_steps
    scratch = os.path.abspath(os.path.join(args.out, "speed"))
    os.makedirs(scratch, exist_ok=True)
    quiet = ["--eval-every", "0", "--no-save-model", "--log-dir", os.path.join(scratch, "runs")]

    def rate(impl: str) -> float:
        times = []
        for n in (n1, n2):
            if impl == "cleanrl":
                cmd = cleanrl_cmd(args, args.algo, args.env, offset + n, 1)
                times.append(wall_time(cmd, env_for(args.threads, args), scratch))
            else:
                cmd = ours_cmd(args, args.algo, args.env, offset + n, 1) + quiet
                times.append(wall_time(cmd, env_for(args.threads), scratch))
        return (n2 - n1) / (times[1] - times[0])

    unit = "updates/s" if args.algo == "sac" else "env steps/s"
    rates: dict[str, list[float]] = {"cleanrl": [], "ours": []}
    for rep in range(args.reps):
        for impl in ("cleanrl", "ours"):
            rates[impl].append(rate(impl))
        ratio = rates["ours"][-1] / rates["cleanrl"][-1]
        print(f"rep {rep + 1}/{args.reps}: CleanRL {rates['cleanrl'][-1]:.1f}, "
              f"ours {rates['ours'][-1]:.1f} {unit}, ratio {ratio:.2f}", flush=True)  # fmt: skip
    clean, ours = statistics.median(rates["cleanrl"]), statistics.median(rates["ours"])
    print(f"{args.algo} {args.env} threads {args.threads}: median {unit} CleanRL {clean:.1f}, "
          f"ours {ours:.1f}, ratio {ours / clean:.2f}")  # fmt: skip


# -- learn ---------------------------------------------------------------------------------------
def algos(args: Args) -> list[str]:
    return ["ppo", "sac"] if args.algo == "both" else [args.algo]


def budget(args: Args, algo: str) -> int:
    return args.sac_total_steps if algo == "sac" else args.ppo_total_steps


def learn(args: Args) -> None:
    out = os.path.abspath(args.out)
    for sub in ("logs", "ours", "cleanrl"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    jobs = []
    for algo in algos(args):
        for env_id in args.envs:
            for seed in args.seeds:
                steps = budget(args, algo)
                for impl in ("ours", "cleanrl"):  # pairs side by side: same load for both
                    log = os.path.join(out, "logs", f"{algo}_{impl}_{env_id}_{seed}_{steps}.log")
                    if os.path.exists(log + ".done"):
                        continue
                    if impl == "ours":
                        cmd = ours_cmd(args, algo, env_id, steps, seed)
                        every = "10000" if algo == "sac" else "50000"  # CleanRL does not evaluate
                        cmd += ["--eval-every", every, "--eval-episodes", "5"]
                        cmd += ["--log-dir", os.path.join(out, "ours")]
                        jobs.append((cmd, env_for(args.threads), out, log))
                    else:
                        cmd = cleanrl_cmd(args, algo, env_id, steps, seed)
                        jobs.append((cmd, env_for(args.threads, args), os.path.join(out, "cleanrl"), log))  # fmt: skip
    print(f"{len(jobs)} runs to do, {args.jobs} at a time; logs in {out}/logs", flush=True)

    def run(job: tuple) -> None:
        cmd, env, cwd, log = job
        start = time.perf_counter()
        with open(log, "w") as f:
            code = subprocess.run(
                cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False
            ).returncode
        minutes = (time.perf_counter() - start) / 60
        if code == 0:
            open(log + ".done", "w").close()
        print(f"{'done' if code == 0 else f'FAILED ({code})'} in {minutes:.1f} min: "
              f"{os.path.basename(log)}", flush=True)  # fmt: skip

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, jobs))


# -- summary -------------------------------------------------------------------------------------
def episodic_returns(run_dir: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    if "charts/episodic_return" not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars("charts/episodic_return")]


def summary(args: Args) -> None:
    out = os.path.abspath(args.out)
    roots = {"ours": os.path.join(out, "ours"), "CleanRL": os.path.join(out, "cleanrl", "runs")}
    print("| algo | env | impl | steps | last 10% return (mean ± sd) | per seed | mean over run |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for algo in algos(args):
        steps = budget(args, algo)
        for env_id in args.envs:
            for impl, root in roots.items():
                finals, means, seeds = [], [], []
                for seed in args.seeds:
                    pattern = os.path.join(root, f"{env_id}-v?__{algo}*__{seed}__*")
                    for run_dir in sorted(glob.glob(pattern)):
                        returns = episodic_returns(run_dir)
                        if not returns or returns[-1][0] < 0.97 * steps:
                            continue  # unfinished, or another budget
                        last = [r for s, r in returns if s >= 0.9 * steps]
                        finals.append(statistics.mean(last))
                        means.append(statistics.mean(r for _, r in returns))
                        seeds.append(seed)
                        break
                if not finals:
                    continue
                sd = statistics.stdev(finals) if len(finals) > 1 else float("nan")
                per_seed = ", ".join(f"{s}: {f:.0f}" for s, f in zip(seeds, finals))
                print(f"| {algo} | {env_id} | {impl} | {steps:,} | {statistics.mean(finals):.0f} ± "
                      f"{sd:.0f} | {per_seed} | {statistics.mean(means):.0f} |")  # fmt: skip


def main() -> None:
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    if args.mode != "summary" and not os.path.exists(args.cleanrl_python):
        sys.exit(f"error: no CleanRL Python at {args.cleanrl_python} (see --help for the setup)")
    {"speed": speed, "learn": learn, "summary": summary}[args.mode](args)


if __name__ == "__main__":
    main()
