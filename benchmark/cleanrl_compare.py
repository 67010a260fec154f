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
    python benchmark/cleanrl_compare.py learn --algo sac                  # 3 seeds x 2 envs, both
    python benchmark/bench.py csv cleanrl_sac && python benchmark/bench.py plot cleanrl_sac

With `--stack ours` CleanRL's SAC or PPO runs on our simulator stack instead (-v5 envs,
gymnasium 1.x, mujoco 3, the Python that runs our files): a copy of its file is patched for
gymnasium 1.x's API (same-step autoreset, which 0.29 did by default; the `final_obs` and
`final_info` keys that replaced `final_observation` and the list of final infos; for PPO the
observation space that 1.x's TransformObservation takes) and nothing else, so a difference in
returns is the two implementations' and not the simulators':

    python benchmark/cleanrl_compare.py learn --algo sac --stack ours     # 8 seeds x 2 envs
    python benchmark/cleanrl_compare.py speed --algo sac --stack ours     # both on HalfCheetah-v5
    python benchmark/bench.py csv cleanrl_sac_same_stack && python benchmark/bench.py plot cleanrl_sac_same_stack
    python benchmark/cleanrl_compare.py learn --algo ppo --stack ours     # 300k steps, 8 seeds x 2 envs
    python benchmark/bench.py csv cleanrl_ppo_same_stack && python benchmark/bench.py plot cleanrl_ppo_same_stack
    python benchmark/cleanrl_compare.py learn --algo sac --stack ours --comparison cleanrl_sac_same_stack_300k

Both implementations get the same hyperparameters: CleanRL's (ours with `--q-lr 1e-3
--alpha-lr 1e-3 --policy-frequency 2` for SAC; ppo.py's defaults are already CleanRL's).

Speed is measured the same way for both: each script runs to two budgets N1 < N2 and the rate
is (N2 - N1) / (t2 - t1) of process wall time, so imports, env creation and (for SAC) the
random steps before learning starts cancel. For SAC every env step after `learning_starts` is
one gradient step of the critics, so that rate is updates per second.

`learn` runs every (algo, env, seed, implementation) as its own process, `--jobs` at a time,
with one torch thread each, into benchmark/bench.py's layout (`<out>/runs/<variant>/<env>/
seed<S>_<N>/` with run.log and, once it finished, done.json; CleanRL's runs are stored under
the -v5 name so that they share a subplot with ours). A finished run is not run again; an
interrupted one of ours continues from its resume.pt (`kill` passes SIGTERM on to it, Ctrl-C
reaches it directly, and no queued run starts), an interrupted CleanRL run starts over. The
budgets and seeds are those of bench.py's `cleanrl_sac`, `cleanrl_ppo` and
`cleanrl_sac_same_stack` (`cleanrl_ppo_same_stack`; `--comparison` names another of the same
two variants, such as `cleanrl_sac_same_stack_300k`) comparisons, whose `csv` and `plot` then draw both implementations'
training returns (`charts/episodic_return`, which both write) with CleanRL's published
1M-step numbers as reference levels.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "benchmark", "bench.py"))
bench = importlib.util.module_from_spec(_spec)  # the budgets and the run layout are bench.py's
sys.modules["bench"] = bench
_spec.loader.exec_module(bench)


@dataclasses.dataclass
class Args:
    mode: tyro.conf.Positional[Literal["speed", "learn"]]
    """speed: updates/s (SAC) or steps/s (PPO) of both; learn: the training runs of both, for
    `benchmark/bench.py csv/plot cleanrl_sac` (or cleanrl_ppo)"""
    algo: Literal["sac", "ppo", "both"] = "both"
    """which algorithm(s); `speed` needs one of sac, ppo"""
    cleanrl_dir: str = "../cleanrl"
    """a checkout of github.com/vwxyzjn/cleanrl"""
    cleanrl_python: str = "../cleanrl/venv/bin/python"
    """the Python of CleanRL's virtual environment (gymnasium 0.29, mujoco 2.3)"""
    python: str = sys.executable
    """the Python that runs our files"""
    out: str = "runs/bench"
    """where `learn` writes its runs (bench.py's --out) and `speed` its scratch runs"""
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
    """learn: envs, without version"""
    seeds: tuple[int, ...] = ()
    """learn: seeds, the same for both implementations (default: the comparison's)"""
    jobs: int = 2
    """learn: runs at once (one per CPU core)"""
    bf16: bool = False
    """speed: our file with --bf16 (its matrix products in bfloat16; CleanRL's stay float32)"""
    stack: Literal["cleanrl", "ours"] = "cleanrl"
    """cleanrl: CleanRL in its own environment on the -v4 envs; ours: CleanRL's file patched for
    gymnasium 1.x and run by --python on the -v5 envs (bench.py's cleanrl_sac_same_stack and
    cleanrl_ppo_same_stack)"""
    comparison: str = ""
    """learn: another bench.py comparison of the same two variants to run, with its budgets and
    seeds (e.g. cleanrl_sac_same_stack_300k); default: --algo's and --stack's own"""


LEARNING_STARTS = 5_000  # CleanRL's and sac.py's default


def fail(message: str) -> None:
    """A bad input: one line on stderr and exit status 2, as the algorithm files do."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def env_for(threads: int, cleanrl: Args | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if cleanrl is not None:
        env["PYTHONPATH"] = os.path.abspath(cleanrl.cleanrl_dir)
    return env


# CleanRL's files (fe8d8a0) under gymnasium 1.x: (what its file says, what it says instead), per algorithm
SAME_STEP_AUTORESET = (  # 0.29's vector envs reset an ended env in the same step; 1.x's default is the next step
    "for i in range(args.num_envs)]\n    )",
    "for i in range(args.num_envs)],\n        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,\n    )",
)
GYMNASIUM1_PATCH = {
    "sac": (
        SAME_STEP_AUTORESET,
        (  # 1.x gives the final infos as one dict of arrays with a mask, not a list of dicts
            """            for info in infos["final_info"]:
                if info is not None:
                    print(f"global_step={global_step}, episodic_return={info['episode']['r']}")
                    writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
                    writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
                    break""",
            """            for i in np.flatnonzero(infos["_final_info"]):
                episode = infos["final_info"]["episode"]
                print(f"global_step={global_step}, episodic_return={episode['r'][i]}")
                writer.add_scalar("charts/episodic_return", episode["r"][i], global_step)
                writer.add_scalar("charts/episodic_length", episode["l"][i], global_step)
                break""",
        ),
        ('infos["final_observation"]', 'infos["final_obs"]'),  # renamed in 1.x
    ),
    "ppo": (
        SAME_STEP_AUTORESET,
        (  # the final infos as above; PPO logs every ended env's episode, not the first
            """                for info in infos["final_info"]:
                    if info and "episode" in info:
                        print(f"global_step={global_step}, episodic_return={info['episode']['r']}")
                        writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
                        writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)""",
            """                for i in np.flatnonzero(infos["_final_info"]):
                    episode = infos["final_info"]["episode"]
                    print(f"global_step={global_step}, episodic_return={episode['r'][i]}")
                    writer.add_scalar("charts/episodic_return", episode["r"][i], global_step)
                    writer.add_scalar("charts/episodic_length", episode["l"][i], global_step)""",
        ),
        (  # 1.x's TransformObservation takes the transformed observation space (clipping keeps the normalised one)
            "TransformObservation(env, lambda obs: np.clip(obs, -10, 10))",
            "TransformObservation(env, lambda obs: np.clip(obs, -10, 10), env.observation_space)",
        ),
    ),
}
FILES = {"sac": "sac_continuous_action.py", "ppo": "ppo_continuous_action.py"}


def cleanrl_for_gymnasium1(args: Args, algo: str) -> str:
    """A copy of CleanRL's file for `algo` with GYMNASIUM1_PATCH[algo] applied, under --out; returns its path."""
    src = os.path.join(os.path.abspath(args.cleanrl_dir), "cleanrl", FILES[algo])
    with open(src) as f:
        text = f.read()
    for old, new in GYMNASIUM1_PATCH[algo]:
        if text.count(old) != 1:
            fail(f"{src} is not the CleanRL file the gymnasium 1.x patch expects (fe8d8a0); it lacks "
                 f"{old.strip().splitlines()[0]!r}")  # fmt: skip
        text = text.replace(old, new)
    dst = os.path.join(os.path.abspath(args.out), "cleanrl_gymnasium1", FILES[algo])
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "w") as f:
        f.write(text)
    return dst


def cleanrl_cmd(args: Args, algo: str, env_id: str, steps: int, seed: int) -> list[str]:
    if args.stack == "ours":  # the patched copy, our Python, the -v5 env
        python, script, version = args.python, cleanrl_for_gymnasium1(args, algo), "v5"
    else:
        script = os.path.join(os.path.abspath(args.cleanrl_dir), "cleanrl", FILES[algo])
        python, version = args.cleanrl_python, "v4"
    return [python, script, "--env-id", f"{env_id}-{version}", "--total-timesteps", str(steps),
            "--seed", str(seed), "--no-cuda"]  # fmt: skip


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
        fail("speed measures one algorithm at a time: --algo sac or --algo ppo")
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
                cmd += ["--bf16"] if args.bf16 else []
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
# bench.py's comparison and its two variants (ours, CleanRL's), per algorithm and stack
COMPARISONS = {
    ("sac", "cleanrl"): ("cleanrl_sac", "sac_cleanrl", "cleanrl_sac"),
    ("ppo", "cleanrl"): ("cleanrl_ppo", "ppo", "cleanrl_ppo"),
    ("sac", "ours"): ("cleanrl_sac_same_stack", "sac_cleanrl", "cleanrl_sac_gymnasium1"),
    ("ppo", "ours"): ("cleanrl_ppo_same_stack", "ppo", "cleanrl_ppo_gymnasium1"),
}


def algos(args: Args) -> list[str]:
    return ["ppo", "sac"] if args.algo == "both" else [args.algo]


def learn(args: Args) -> None:
    jobs = []
    for algo in algos(args):
        name, *variants = COMPARISONS[algo, args.stack]
        name = args.comparison or name
        comp = bench.COMPARISONS.get(name)
        if comp is None or [line.variant for line in comp.lines] != variants:
            fail(f"--comparison {name} is not a bench.py comparison of {' and '.join(variants)} (--algo {algo} "
                 f"--stack {args.stack})")  # fmt: skip
        for env_id in args.envs:
            steps = comp.budget(f"{env_id}-v5")
            for seed in args.seeds or comp.seeds:
                for impl, variant in zip(("ours", "cleanrl"), variants):  # side by side
                    leaf = f"seed{seed}_{steps}"
                    run_dir = os.path.join(os.path.abspath(args.out), "runs", variant, f"{env_id}-v5", leaf)
                    if os.path.exists(os.path.join(run_dir, "done.json")):
                        continue
                    if os.path.exists(bench.record_path(variant, f"{env_id}-v5", leaf)):
                        continue  # finished on another machine: its record is in the repository
                    if impl == "ours":
                        cmd = ours_cmd(args, algo, env_id, steps, seed)
                        every = "10000" if algo == "sac" else "50000"  # CleanRL does not evaluate
                        cmd += ["--eval-every", every, "--eval-episodes", "5"]
                        cmd += ["--log-dir", run_dir]
                        jobs.append((cmd, env_for(args.threads), run_dir))
                    else:  # CleanRL writes runs/<name>/ under its working directory
                        cmd = cleanrl_cmd(args, algo, env_id, steps, seed)
                        jobs.append((cmd, env_for(args.threads, args), run_dir))
    print(f"{len(jobs)} runs to do, {args.jobs} at a time, in {args.out}/runs", flush=True)
    running: set[subprocess.Popen] = set()
    stopping = threading.Event()

    def run(job: tuple) -> None:
        cmd, env, run_dir = job
        if stopping.is_set():
            return
        resume = bench.resume_file(run_dir)  # ours continues from its resume.pt; an interrupted CleanRL run starts over
        if resume is None and os.path.exists(run_dir):
            shutil.rmtree(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        cmd = cmd + ["--resume", resume] if resume else cmd
        start = time.perf_counter()
        with open(os.path.join(run_dir, "run.log"), "a") as f:
            proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=f, stderr=subprocess.STDOUT)
            running.add(proc)
            code = proc.wait()
            running.discard(proc)
        wall = time.perf_counter() - start
        if stopping.is_set():
            print(f"stopped: {os.path.relpath(run_dir, args.out)}", flush=True)
            return
        inner = os.path.join(run_dir, "runs")
        for name in os.listdir(inner) if os.path.isdir(inner) else []:  # CleanRL's run directory
            os.rename(os.path.join(inner, name), os.path.join(run_dir, name))
        if code == 0:
            record = {"command": cmd, "exit_status": 0, "wall_seconds": round(wall, 1),
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
            with open(os.path.join(run_dir, "done.json"), "w") as f:
                json.dump(record, f, indent=2)
        print(f"{'done' if code == 0 else f'FAILED ({code})'} in {wall / 60:.1f} min: "
              f"{os.path.relpath(run_dir, args.out)}", flush=True)  # fmt: skip

    def stop(signum: int, frame: object) -> None:  # `kill`: pass SIGTERM on (ours writes resume.pt), start nothing more
        stopping.set()
        for proc in list(running):
            proc.terminate()
        raise KeyboardInterrupt

    previous, pool = signal.signal(signal.SIGTERM, stop), ThreadPoolExecutor(args.jobs)
    try:
        list(pool.map(run, jobs))
    except KeyboardInterrupt:  # SIGTERM, or Ctrl-C, which reached the running scripts too
        stopping.set()
        pool.shutdown(wait=True, cancel_futures=True)  # the running scripts end (ours after writing resume.pt)
        print("stopped: the same command continues our unfinished runs from their resume.pt", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        pool.shutdown(wait=True)
        signal.signal(signal.SIGTERM, previous)


def main() -> None:
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    if args.bf16 and args.algo != "sac":
        fail("--bf16 is a flag of sac.py only: use --algo sac")
    if args.stack == "cleanrl" and not os.path.exists(args.cleanrl_python):
        fail(f"no CleanRL Python at {args.cleanrl_python} (see --help for the setup)")
    {"speed": speed, "learn": learn}[args.mode](args)


if __name__ == "__main__":
    main()
