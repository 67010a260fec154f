"""Data efficiency at equal env steps: TreePI/pi, TreePI/search and MPO+Predictive (treepi.py
--depth 1) against mpo.py and sac.py, several seeds each, the same env, budget and evaluation.

Each run is the script's own command line with --total-steps, --learning-starts, --eval-every,
--eval-episodes and --seed set alike; the table reads charts/eval_return from each run's
tensorboard events and prints the mean and standard error over seeds at every evaluation.
Runs go `--jobs` at a time, each niced; a script found in none of --script-dirs is skipped.

    python benchmark/treepi_compare.py --env InvertedPendulum-v5 --total-steps 2000 \
        --learning-starts 500 --eval-every 500 --seeds 1 2 3 --jobs 2

Measured (treepi.py of commit 4f3853f, mpo.py of c46e861, 2-core VM at load 5-9, 2026-11-22),
InvertedPendulum-v5, --total-steps 2000 --learning-starts 500 --eval-every 500, seeds 1-3, eval
return mean ± standard error (5 greedy episodes; 3 for TreePI/search):
    TreePI/pi       7 ± 2   70 ± 6    90 ± 18   89 ± 10     (1.6-2.2 updates/s)
    TreePI/search   2 ± 0   52 ± 15   56 ± 16   72 ± 26     (1.2-2.3 env steps/s)
    MPO+Predictive  7 ± 2   77 ± 17   80 ± 7    78 ± 9      (5.4-7.6 updates/s)
    MPO             11 ± 4  6 ± 2     4 ± 1     21 ± 3      (1.8-3.1 updates/s)
    SAC             11 ± 1  78 ± 41   90 ± 7    101 ± 24    (9-17 updates/s)
at 500, 1000, 1500, 2000 env steps: too short a budget to separate TreePI, MPO+Predictive and
SAC; it does not reproduce [TreePI] Fig. 1's TreePI/search >= MPO+Predictive ordering.
"""

import argparse
import glob
import os
import subprocess
import sys
import time

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (script, its own flags); treepi.py's defaults are its CPU defaults
ALGOS = {
    "TreePI/pi": ("treepi.py", []),
    "TreePI/search": ("treepi.py", ["--act", "search"]),
    "MPO+Predictive": ("treepi.py", ["--depth", "1"]),
    "MPO": ("mpo.py", []),
    "SAC": ("sac.py", []),
}


def algo_dir(log_dir: str, name: str) -> str:
    return os.path.join(log_dir, name.replace("/", "_").replace("+", "_"))


def eval_curve(run_dir: str) -> dict[int, float]:
    """charts/eval_return by global_step from a run's tensorboard events."""
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    if "charts/eval_return" not in events.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in events.Scalars("charts/eval_return")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", default="InvertedPendulum-v5")
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--total-steps", type=int, default=3000)
    parser.add_argument("--learning-starts", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--search-eval-episodes", type=int, default=3, help="TreePI/search only")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--table-only", action="store_true", help="only print the table of the runs in --log-dir"
    )
    parser.add_argument("--log-dir", default="runs/compare")
    parser.add_argument(
        "--script-dirs", nargs="+", default=[ROOT], help="where to look for each script, in order"
    )
    cli = parser.parse_args()
    queue = []
    for name in [] if cli.table_only else cli.algos:
        script, flags = ALGOS[name]
        found = [os.path.join(d, script) for d in cli.script_dirs]
        found = [p for p in found if os.path.exists(p)]
        if not found:
            print(f"skipping {name}: no {script} in {cli.script_dirs}", flush=True)
            continue
        path = found[0]
        episodes = cli.search_eval_episodes if "--act" in flags else cli.eval_episodes
        for seed in cli.seeds:
            argv = [
                *("nice", "-n", "10", sys.executable, path, *flags),
                *("--env", cli.env, "--seed", str(seed), "--threads", "1"),
                *("--total-steps", str(cli.total_steps)),
                *("--learning-starts", str(cli.learning_starts)),
                *("--eval-every", str(cli.eval_every), "--eval-episodes", str(episodes)),
                *("--log-every", str(cli.eval_every), "--checkpoint-every", "0"),
                *("--log-dir", algo_dir(cli.log_dir, name)),
            ]
            queue.append((name, seed, argv))
    running = []
    while queue or running:
        while queue and len(running) < cli.jobs:
            name, seed, argv = queue.pop(0)
            print(" ".join(argv[3:]), flush=True)
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            running.append((name, seed, proc, time.perf_counter()))
        time.sleep(1.0)
        for item in list(running):
            name, seed, proc, start = item
            if proc.poll() is None:
                continue
            running.remove(item)
            lines = [line for line in proc.stdout.read().splitlines() if line.startswith("done:")]
            run_dir = lines[-1].split("| run ")[-1] if lines else None
            minutes = (time.perf_counter() - start) / 60
            print(f"{name} seed {seed}: exit {proc.returncode}, {minutes:.1f} min, {run_dir}")
    # every run under log_dir that reached --total-steps: separate invocations make one table
    runs = {}
    for name in cli.algos:
        for run_dir in sorted(glob.glob(os.path.join(algo_dir(cli.log_dir, name), "*", ""))):
            curve = eval_curve(run_dir)
            if curve and max(curve) >= cli.total_steps:
                runs.setdefault(name, []).append(curve)
    steps = sorted({s for curves in runs.values() for curve in curves for s in curve})
    print(f"\n{cli.env}: eval return by env step, mean ± standard error over seeds")
    print("| algorithm | " + " | ".join(str(s) for s in steps) + " |")
    print("| --- |" + " --- |" * len(steps))
    for name, curves in runs.items():
        cells = []
        for s in steps:
            values = np.array([c[s] for c in curves if s in c])
            sem = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
            cells.append(f"{values.mean():.0f} ± {sem:.0f}" if len(values) else "-")
        print(f"| {name} ({len(curves)} seeds) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
