"""Does a refactor change numbers? Run the same short trainings on two revisions and compare every scalar.

Each named run trains one algorithm file for a few hundred steps with fixed flags (RUNS below), once in a git
worktree of the reference revision and once in the current checkout, and compares every tensorboard scalar
point for point (timing tags excluded). A refactor must print IDENTICAL for every run on the CPU. A point that
the reference logged twice at the same step with the same value counts once (before the reshape of issue 14 the
final evaluation could repeat the last scheduled one).

    python benchmark/same_metrics.py --ref 09f51a6                   # every run in RUNS
    python benchmark/same_metrics.py --ref HEAD~3 sac ppo_hopper     # some of them
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = ["--eval-episodes", "1"]
RUNS = {  # name: (file, flags); short, and past learning_starts so that updates run
    "sac": ("sac.py", ["--env", "Pendulum-v1", "--total-steps", "1500", "--learning-starts", "500", "--batch-size", "64",
                       "--hidden-sizes", "64", "64", "--eval-every", "1000", "--log-every", "250", *EVAL]),
    "sac_halfcheetah": ("sac.py", ["--env", "HalfCheetah-v5", "--total-steps", "700", "--learning-starts", "300",
                                   "--batch-size", "64", "--hidden-sizes", "64", "64", "--eval-every", "500",
                                   "--log-every", "100", "--num-envs", "2", *EVAL]),
    "ppo": ("ppo.py", ["--env", "Pendulum-v1", "--total-steps", "4096", "--eval-every", "2048", "--log-every", "1024", *EVAL]),
    "ppo_hopper": ("ppo.py", ["--env", "Hopper-v5", "--total-steps", "4096", "--num-envs", "2", "--num-steps", "512",
                              "--eval-every", "2048", "--log-every", "1024", *EVAL]),
    "mpo": ("mpo.py", ["--env", "Pendulum-v1", "--total-steps", "800", "--learning-starts", "300", "--batch-size", "16",
                       "--eval-every", "400", "--log-every", "200", *EVAL]),
    "mpo_hopper": ("mpo.py", ["--env", "Hopper-v5", "--total-steps", "500", "--learning-starts", "300", "--batch-size", "16",
                              "--eval-every", "400", "--log-every", "100", "--num-envs", "2", *EVAL]),
    "treepi": ("treepi.py", ["--env", "InvertedPendulum-v5", "--total-steps", "400", "--learning-starts", "200",
                             "--eval-every", "200", "--log-every", "100", *EVAL]),
    "treepi_true_model": ("treepi.py", ["--env", "InvertedPendulum-v5", "--model", "true", "--total-steps", "300",
                                        "--learning-starts", "200", "--eval-every", "150", "--log-every", "100", *EVAL]),
    "treepi_true_suite": ("treepi.py", ["--env", "dm_control/finger-turn_hard-v0", "--model", "true", "--act", "search",
                                        "--total-steps", "120", "--learning-starts", "60", "--num-rollouts", "8",
                                        "--eval-every", "0", "--log-every", "60", *EVAL]),
    "treepi_true_ant": ("treepi.py", ["--env", "Ant-v5", "--model", "true", "--total-steps", "120", "--learning-starts", "60",
                                      "--num-rollouts", "8", "--eval-every", "0", "--log-every", "60", *EVAL]),
    "trpo": ("trpo.py", ["--env", "Pendulum-v1", "--total-steps", "6000", "--eval-every", "3000", "--log-every", "1000", *EVAL]),
    "trpo_vine_hopper": ("trpo.py", ["--env", "Hopper-v5", "--estimator", "vine", "--num-steps", "1000", "--total-steps",
                                     "3000", "--vine-states", "10", "--eval-every", "1500", "--log-every", "1000", *EVAL]),
    "trpo_vine_suite": ("trpo.py", ["--env", "dm_control/finger-turn_hard-v0", "--estimator", "vine", "--num-steps", "1000",
                                    "--total-steps", "2000", "--vine-states", "10", "--vine-rollout-length", "20",
                                    "--eval-every", "0", "--log-every", "1000", *EVAL]),
    "dpi_ilqr": ("dpi_ilqr.py", ["--env", "InvertedPendulum-v5", "--total-steps", "2000", "--eval-every", "1000",
                                 "--log-every", "500", *EVAL]),
    "cpi_garnet": ("cpi_garnet.py", ["--num-states", "32", "--num-mdps", "2", "--total-steps", "3000", "--cpi-states", "20",
                                     "--vi-episodes", "20"]),
}  # fmt: skip
TIMING = ("SPS", "updates_per_second")


def scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every event file under log_dir, timing tags excluded, repeated points once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)):
        events = EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if not any(t in tag for t in TIMING):
                out.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return {tag: [p for i, p in enumerate(points) if i == 0 or p != points[i - 1]] for tag, points in out.items()}


def differences(a: dict, b: dict) -> list[str]:
    """Tags whose points differ between two `scalars` results, with the first differing point."""
    out = []
    for tag in sorted(set(a) | set(b)):
        pa, pb = a.get(tag, []), b.get(tag, [])
        if pa != pb:
            first = next((i for i, (x, y) in enumerate(zip(pa, pb)) if x != y), min(len(pa), len(pb)))
            out.append(
                f"{tag}: point {first}: {pa[first : first + 1]} against {pb[first : first + 1]} ({len(pa)} and {len(pb)} points)"
            )
    return out


def train(checkout: str, name: str) -> dict:
    script, flags = RUNS[name]
    log_dir = tempfile.mkdtemp(prefix=f"same_metrics_{name}_")
    cmd = [sys.executable, script, *flags, "--seed", "1", "--threads", "1", "--log-dir", log_dir]
    done = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: {name} failed in {checkout}: {done.stderr.strip().splitlines()[-1:]}")
    return scalars(log_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", required=True, help="the revision to compare against (a commit, tag or branch)")
    parser.add_argument("runs", nargs="*", help=f"runs to compare (default: all of {', '.join(RUNS)})")
    args = parser.parse_args(argv)
    unknown = [name for name in args.runs if name not in RUNS]
    if unknown:
        print(f"error: unknown runs {unknown}; known: {', '.join(RUNS)}", file=sys.stderr)
        return 2
    reference = tempfile.mkdtemp(prefix="same_metrics_ref_")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", reference, args.ref], check=True, capture_output=True)
    try:
        changed = 0
        for name in args.runs or list(RUNS):
            before, after = train(reference, name), train(ROOT, name)
            diff = differences(before, after)
            changed += bool(diff)
            print(f"{name}: {'DIFFERENT' if diff else 'IDENTICAL'} ({len(after)} tags)", *diff, sep="\n    ", flush=True)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", reference], check=False, capture_output=True)
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
