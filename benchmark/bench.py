"""Benchmark runner: the training runs behind each comparison, their CSV, figures and tables.

A comparison (COMPARISONS below) is a set of lines (a variant and a tensorboard tag) on a set of
envs, seeds and a step budget. A variant (VARIANTS) is one of the scripts with fixed flags. The
runner starts every (variant, env, seed, steps) that is not finished as its own process, one
torch thread each, `--jobs` at a time; it never imports the scripts.

Usage (from anywhere; paths are relative to the current directory):
    python benchmark/bench.py list                          # comparisons and the runs they need
    python benchmark/bench.py run trpo_fig4 --jobs 2        # run what is not finished
    python benchmark/bench.py run mpo_vs_sac_ppo --seeds 1 --steps 20000 --envs Walker2d-v5
    python benchmark/bench.py run treepi_fig1_suite --variants mpo sac   # some variants only
    python benchmark/bench.py csv trpo_fig4                 # runs/bench/csv/trpo_fig4.csv
    python benchmark/bench.py plot trpo_fig4                # benchmark/figures/trpo_fig4.{png,md}
    python benchmark/bench.py plot treepi_fig1_suite --envs dm_control/cartpole-swingup-v0
                                            # benchmark/figures/treepi_fig1_suite__cartpole-swingup-v0.{png,md}

Layout under --out (default runs/bench):
    runs/<variant>/<env>/seed<S>_<N>/     one run: run.log, done.json and the script's own
        <env>__<algo>__<S>__<stamp>/      run directory (tensorboard events, resume.pt, ...)
    csv/<comparison>.csv                  variant,env,seed,tag,step,wall,value
and, for each finished run, its record in the repository (--results, default benchmark/results):
    <variant>/<env>/<run>.csv             tag,step,wall,value of the run's `charts/` scalars, <run> the
                                          name of its directory under runs/ (seed<S>_<N>, and a flags hash)

The records are what to commit: a run directory holds replay buffers and checkpoints and is lost
with the machine, while a finished run with a record is never run again, and `csv` and `plot`
read it as if its directory were there. So a comparison of many hours can be finished over
several machines: commit the new records after each session.

A run's identity is (variant, env, seed, steps, flags), not the comparison, so two comparisons
that need the same run share it. A comparison's `extra_args` and `variant_args` change the
command, so they add a short hash of those flags to the directory name. A run is finished when done.json exists (exit
status 0); an unfinished one is resumed from its resume.pt with `--resume`, or deleted and
started again when it has none. Ctrl-C, or `kill` (SIGTERM) of the runner, which passes it on, stops the running
scripts after they write resume.pt and starts no other run. The cleanrl_* comparisons' runs are made by
benchmark/cleanrl_compare.py (CleanRL needs its own virtual environment); `csv` and `plot`
read them like any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field, replace
from typing import Annotated

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmark", "results")  # the finished runs' records, committed


class UsageError(Exception):
    """Bad user input: `main` prints it as one line on stderr and returns 2."""


# == Config ==========================================================================
@dataclass(frozen=True)
class Variant:
    """One script with fixed flags."""

    script: str
    """File name of the script in the repository root."""
    args: tuple[str, ...] = ()
    """Flags added to every run of this variant."""
    doc: str = ""
    """What the variant is, in a few words."""
    env_args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Flags added only on the given env (after `args`)."""


@dataclass(frozen=True)
class Line:
    """One curve of a comparison: a variant's tensorboard tag."""

    label: str
    variant: str
    tag: str = "charts/eval_return"


@dataclass(frozen=True)
class Comparison:
    """Lines on envs, over seeds, each run for `steps` env steps (transitions for Garnet)."""

    title: str
    lines: tuple[Line, ...]
    envs: tuple[str, ...]
    steps: int
    seeds: tuple[int, ...] = (1, 2, 3)
    extra_args: tuple[str, ...] = ()
    wall_clock: bool = False
    paper: str = ""
    serial: bool = False
    """Run one process at a time whatever --jobs says (timings must not compete)."""
    published: dict[tuple[str, str], tuple[int, float, str]] = field(default_factory=dict)
    """Quoted results: (line label, env) -> (steps, return, where it is quoted)."""
    env_steps: dict[str, int] = field(default_factory=dict)
    """Budgets of the envs that differ from `steps`."""
    y_label: str = ""
    """The quantity on the y axis (default: the first line's tag without its prefix)."""
    log_y: bool = False
    """A logarithmic y axis (rates that differ by orders of magnitude)."""
    x_label: str = "env steps"
    """What the scripts log as the step (cpi_garnet.py: episodes per MDP), or what `x_tag` counts."""
    x_tag: str = ""
    """A counter the scripts log (0 at step 0) to plot against instead of the step: each point's x is its value at that
    step, interpolated between its events (trpo.py's charts/iteration, charts/sim_steps); rates in the table per unit."""
    made_by: str = ""
    """The command that makes this comparison's runs where `run` cannot (CleanRL needs its own
    virtual environment); `csv` and `plot` read them as any other."""
    variant_steps: dict[str, int] = field(default_factory=dict)
    """Budgets of the variants that differ, on every env (`speed`, where only the rate matters; a vine's shorter trunk)."""
    variant_args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Flags added to one variant's runs in this comparison only (part of the run's identity)."""
    panel_titles: dict[str, str] = field(default_factory=dict)
    """Titles of the env's panel and table that differ from the env id (the paper's figure letter, say)."""

    def budget(self, env: str, override: int | None = None, variant: str = "") -> int:
        """Env steps per run: the command line's --steps, else the variant's, the env's, steps."""
        return override or self.variant_steps.get(variant, self.env_steps.get(env, self.steps))


DPI_HORIZON = ("--eval-horizon", "200")  # trpo.py's charts/eval_return_horizon over dpi_ilqr.py's default T
# MPO+Predictive's E-step and bounds on treepi.py's networks [TreePI Table 2]
ELU = ("--activation", "elu")  # [TreePI] Table 1's activation
MPO_PREDICTIVE = ("--e-step", "mpo", "--epsilon", "0.1", "--epsilon-cov", "1e-4", "--policy-target-frequency", "20", *ELU)
VARIANTS: dict[str, Variant] = {
    "sac": Variant("sac.py", doc="SAC with the paper's settings"),
    "sac_cleanrl": Variant(
        "sac.py", ("--q-lr", "1e-3", "--alpha-lr", "1e-3", "--policy-frequency", "2"), doc="SAC with CleanRL's settings"
    ),
    "sac_cleanrl_bf16": Variant(
        "sac.py",
        ("--q-lr", "1e-3", "--alpha-lr", "1e-3", "--policy-frequency", "2", "--bf16"),
        doc="SAC with CleanRL's settings, matrix products in bfloat16",
    ),
    "ppo": Variant("ppo.py", doc="PPO (defaults are CleanRL's)"),
    "mpo": Variant("mpo.py", doc="MPO"),
    "mpo_target100": Variant(
        "mpo.py", ("--target-network-frequency", "100"), doc="MPO with ACME's target periods (100 updates, not Alg. 2's 1000)"
    ),
    "mpo_target25": Variant(
        "mpo.py", ("--target-network-frequency", "25"), doc="MPO with its targets copied every 25 updates (Alg. 2: 1000)"
    ),
    "mpo_target100_cov1e3": Variant(
        "mpo.py",
        ("--target-network-frequency", "100", "--epsilon-cov", "1e-3"),
        doc="MPO with ACME's target periods and a 10x looser covariance bound (Table 2: 1e-4)",
    ),
    "mpo_cov1e2": Variant(
        "mpo.py",
        ("--epsilon-cov", "1e-2"),
        doc="MPO with a 100x looser covariance bound (Table 2: 1e-4): its exploration noise may shrink faster",
    ),
    "mpo_twin_q": Variant(
        "mpo.py",
        ("--num-critics", "2"),
        doc="MPO with two Q-functions, their minimum read as Q' (clipped double Q; the paper: one)",
    ),
    "mpo_twin_q_target25": Variant(
        "mpo.py",
        ("--num-critics", "2", "--target-network-frequency", "25"),
        doc="MPO with two Q-functions and its targets copied every 25 updates (the paper: one, every 1000)",
    ),
    # treepi.py's lines with Table 1's ELU, as their records ran (the CPU default is ReLU since; treepi_pi_relu)
    "treepi_pi": Variant("treepi.py", ("--act", "policy", *ELU), doc="TreePI acting with the policy"),
    "treepi_pi_relu": Variant(
        "treepi.py", ("--act", "policy", "--activation", "relu"), doc="TreePI/π with ReLU for Table 1's ELU (speed)"
    ),
    "treepi_search": Variant("treepi.py", ("--act", "search", *ELU), doc="TreePI acting by search"),
    "treepi_depth1": Variant("treepi.py", ("--depth", "1", *ELU), doc="TreePI(1)/π: depth 1 at the fixed α"),
    "treepi_true": Variant(
        "treepi.py", ("--model", "true", *ELU), doc="TreePI/π searching the simulator itself ([TreePI] Sec. 6.2)"
    ),
    "mpo_predictive": Variant(
        "treepi.py",
        MPO_PREDICTIVE,
        doc="MPO+Predictive ([TreePI] Table 2: E-step 0.1, mean 0.005, cov 1e-4, both targets every 200 at 10 updates/step)",
    ),
    "mpo_e_step_true_obs": Variant(
        "treepi.py",
        ("--model", "true", *MPO_PREDICTIVE),
        doc="MPO+Predictive's E-step and M-step on the true observations: no latent model, no search",
    ),
    "trpo_single": Variant("trpo.py", doc="TRPO, single-path estimator"),
    "trpo_vine": Variant(
        "trpo.py",
        ("--estimator", "vine", "--vine-states", "125"),
        doc="TRPO, vine estimator",
        env_args={"Swimmer-v5": ("--vine-rollout-length", "50")},
    ),
    # [TRPO] Table 2's batches: single path N paths of 1000 steps, one env each; the vine's trunk 16 x 1000, R states x 4
    # branches; evaluated every 5 iterations. Hopper: the paper's 1000 paths and 2500 Q-values divided by 10.
    "trpo_single_table2": Variant(
        "trpo.py",
        ("--num-steps", "1000"),
        doc="TRPO single path at [TRPO] Table 2's batch (Swimmer 50 paths x 1000; Hopper 100, the paper's 1000 / 10)",
        env_args={
            "Swimmer-v5": ("--num-envs", "50", "--eval-every", "250000"),
            "Hopper-v5": ("--num-envs", "100", "--eval-every", "500000"),
        },
    ),
    "trpo_vine_table2": Variant(
        "trpo.py",
        ("--estimator", "vine", "--num-envs", "16", "--num-steps", "1000", "--vine-actions", "4", "--eval-every", "80000"),
        doc="TRPO vine at [TRPO] Table 2's batch (trunk 16 x 1000; Swimmer 125 x 4 x 50; Hopper 62 x 4 x 100, 2500 Q / 10)",
        env_args={
            "Swimmer-v5": ("--vine-states", "125", "--vine-rollout-length", "50"),
            "Hopper-v5": ("--vine-states", "62", "--vine-rollout-length", "100"),
        },
    ),
    # [DPI] Sec. 6.2-6.3: TRPO-GAE also scored over the first T = 200 steps, the horizon AGGREVATED-ILQR trains on
    "trpo_gae": Variant("trpo.py", ("--num-steps", "2000", *DPI_HORIZON), doc="TRPO-GAE, the DPI baseline"),
    "dpi_ilqr": Variant("dpi_ilqr.py", ("--num-envs", "10"), doc="AGGREVATED-ILQR"),
    "trpo_gae_robust": Variant(
        "trpo.py",
        ("--num-steps", "300", *DPI_HORIZON, "--robust"),
        doc="TRPO-GAE on the 7 training variants (300 steps each per batch), tested on 3 held-out ones",
    ),
    "trpo_gae_one_variant": Variant(
        "trpo.py",
        ("--num-steps", "2000", *DPI_HORIZON, "--robust", "--robust-train-variants", "1"),
        doc="TRPO-GAE on one training variant, tested on the same 3 held-out ones",
    ),
    "dpi_ilqr_robust": Variant(
        "dpi_ilqr.py", ("--num-envs", "10", "--robust"), doc="AGGREVATED-ILQR on the 7 training variants, tested on 3 others"
    ),
    "dpi_ilqr_one_variant": Variant(
        "dpi_ilqr.py",
        ("--num-envs", "10", "--robust", "--robust-train-variants", "1"),
        doc="AGGREVATED-ILQR on one training variant ([DPI] Fig. 2's non-robust), tested on the same 3",
    ),
    "cpi_garnet": Variant("cpi_garnet.py", doc="CPI and AGGREVATED-VI on Garnet MDPs"),
    # CleanRL's files on the -v4 envs under gymnasium 0.29, stored under the -v5 name so they
    # share a subplot with ours; benchmark/cleanrl_compare.py runs them (made_by below)
    "cleanrl_sac": Variant("../cleanrl/cleanrl/sac_continuous_action.py", doc="CleanRL's SAC"),
    "cleanrl_ppo": Variant("../cleanrl/cleanrl/ppo_continuous_action.py", doc="CleanRL's PPO"),
    "cleanrl_sac_gymnasium1": Variant(
        "runs/bench/cleanrl_gymnasium1/sac_continuous_action.py",
        doc="CleanRL's SAC patched for gymnasium 1.x, on the -v5 envs (our stack)",
    ),
    "cleanrl_ppo_gymnasium1": Variant(
        "runs/bench/cleanrl_gymnasium1/ppo_continuous_action.py",
        doc="CleanRL's PPO patched for gymnasium 1.x, on the -v5 envs (our stack)",
    ),
}

# Budgets are what a 2-core CPU runs in an afternoon, far below the papers'; `--steps` overrides.
# docs.cleanrl.dev (docs/rl-algorithms/sac.md and docs/benchmark/ppo_continuous_action.md at
# CleanRL fe8d8a0): mean ± sd over 3 seeds of the training episodic return after 1M steps;
# SAC on the -v2 envs, PPO on -v4. Drawn as levels: the budgets here are far shorter.
CLEANRL_PUBLISHED = {
    "sac": {
        ("CleanRL", "HalfCheetah-v5"): (1_000_000, 9634.89, "-v2, 1M steps"),
        ("CleanRL", "Hopper-v5"): (1_000_000, 2310.46, "-v2, 1M steps"),
    },
    "ppo": {
        ("CleanRL", "HalfCheetah-v5"): (1_000_000, 1442.64, "-v4, 1M steps"),
        ("CleanRL", "Hopper-v5"): (1_000_000, 2382.86, "-v4, 1M steps"),
    },
}
OFF_POLICY_SHORT = ("--learning-starts", "1000")  # `speed`: reach the learning phase quickly


def evaluate_every(steps: int) -> tuple[str, ...]:
    """The evaluation flags every learning-curve comparison uses: 5 episodes every `steps`."""
    return ("--eval-every", str(steps), "--eval-episodes", "5")


def against_cleanrl(
    algo: str, ours: str, title: str, steps: int, hopper_steps: int, stack: str = "cleanrl", seeds: tuple[int, ...] = (1, 2, 3)
) -> Comparison:
    """Our file against CleanRL's of the same algorithm, training episodes on HalfCheetah and
    Hopper; the runs are made by cleanrl_compare.py (CleanRL needs its own environment, or with
    `--stack ours` a patched copy of its file)."""
    episodes = "charts/episodic_return"
    theirs = f"cleanrl_{algo}" if stack == "cleanrl" else f"cleanrl_{algo}_gymnasium1"
    return Comparison(
        f"{title} (training episodes)",
        (Line(f"{algo}.py", ours, episodes), Line("CleanRL", theirs, episodes)),
        envs=("HalfCheetah-v5", "Hopper-v5"),
        steps=steps,
        seeds=seeds,
        env_steps={"Hopper-v5": hopper_steps},
        made_by=f"python benchmark/cleanrl_compare.py learn --algo {algo} --stack {stack}",
        published=CLEANRL_PUBLISHED[algo],
    )


def on_one_stack(algo: str, ours: str, steps: int, hopper_steps: int, seeds: int = 8, name: str = "") -> Comparison:
    """Our file against CleanRL's patched copy, both on our simulator stack, seeds 1..seeds; name: the comparison's, when
    it is not the default one of cleanrl_compare.py's --algo and --stack."""
    title = f"{algo.upper()} against CleanRL's on one simulator stack (-v5, gymnasium 1.x, mujoco 3)"
    comp = against_cleanrl(algo, ours, title, steps, hopper_steps, stack="ours", seeds=tuple(range(1, seeds + 1)))
    return replace(comp, made_by=f"{comp.made_by} --comparison {name}") if name else comp


def trpo_fig4_table2(x_tag: str, x_label: str) -> Comparison:
    """[TRPO] Fig. 4 at Table 2's batches, 200 iterations (the paper's), against `x_tag`; the two axes share runs."""
    return Comparison(
        f"TRPO: single path vs vine at [TRPO] Table 2's batches (Hopper's / 10), 200 iterations, against {x_label}",
        (Line("single path", "trpo_single_table2"), Line("vine", "trpo_vine_table2")),
        envs=("Swimmer-v5", "Hopper-v5"),
        steps=200 * 16_000,
        env_steps={"Swimmer-v5": 200 * 50_000, "Hopper-v5": 200 * 100_000},  # the single path's; the vine's trunk below
        variant_steps={"trpo_vine_table2": 200 * 16_000},
        extra_args=("--eval-episodes", "5"),
        x_tag=x_tag,
        x_label=x_label,
        paper="[TRPO] Fig. 4 (per iteration) and Table 2: Swimmer at its batches, Hopper's single-path paths and vine "
        "Q-values / 10 (100 paths, 62 x 4 branches), the vine's 16 x 1000 trunk on both; simulator steps count the "
        "vine's branches too (charts/sim_steps)",
    )


def dpi_fig1(tag: str, scored: str) -> Comparison:
    """[DPI] Fig. 1 b, e-g: AGGREVATED-ILQR against TRPO-GAE, the evaluation episodes scored over `scored` (`tag`); the
    two scores come from the same runs. The panels carry the paper's letters (Sec. 6: cart-pole b, hover c, funnel d,
    Swimmer e, Hopper f, Half-Cheetah g); InvertedPendulum-v5 stands in for the cart-pole."""
    return Comparison(
        f"DPI: AGGREVATED-ILQR vs TRPO-GAE, evaluation return over {scored}",
        (Line("AGGREVATED-ILQR", "dpi_ilqr", tag), Line("TRPO-GAE", "trpo_gae", tag)),
        envs=("InvertedPendulum-v5", "Swimmer-v5", "Hopper-v5", "HalfCheetah-v5"),
        steps=30_000,
        env_steps={"Swimmer-v5": 100_000, "Hopper-v5": 100_000, "HalfCheetah-v5": 300_000},
        extra_args=evaluate_every(4_000),
        paper="[DPI] Fig. 1b, e-g",
        y_label="eval return" + (", first 200 steps" if tag.endswith("horizon") else ""),
        panel_titles={
            "InvertedPendulum-v5": "InvertedPendulum-v5 (cart-pole, Fig. 1b)",
            "Swimmer-v5": "Swimmer-v5 (Fig. 1e)",
            "Hopper-v5": "Hopper-v5 (Fig. 1f)",
            "HalfCheetah-v5": "HalfCheetah-v5 (Fig. 1g)",
        },
    )


def dpi_fig2(tag: str, scored: str) -> Comparison:
    """[DPI] Fig. 2: robust policy optimisation on InvertedPendulum-v5 (cart-pole) variants of pole mass and length, 7 to
    train on and 3 held out (the same for every line of a seed); `tag` scores the held-out variants over `scored`."""
    return Comparison(
        f"DPI robust: return on 3 held-out variants over {scored}",
        (
            Line("AGGREVATED-ILQR, 7 variants", "dpi_ilqr_robust", tag),
            Line("AGGREVATED-ILQR, 1 variant (non-robust)", "dpi_ilqr_one_variant", tag),
            Line("TRPO-GAE, 7 variants", "trpo_gae_robust", tag),
            Line("TRPO-GAE, 1 variant", "trpo_gae_one_variant", tag),
        ),
        envs=("InvertedPendulum-v5",),
        steps=100_000,
        extra_args=("--eval-every", "10000", "--eval-episodes", "2"),  # 10 variants are evaluated each time
        paper="[DPI] Fig. 2 (cart-pole; there also helicopter funnel)",
        y_label="held-out eval return" + (", first 200 steps" if tag.endswith("horizon") else ""),
    )


# the baselines of [TreePI] Fig. 1, in two comparisons
TREEPI_BASELINES = (Line("MPO+Predictive", "mpo_predictive"), Line("MPO", "mpo"), Line("SAC", "sac"))
MPO_PAPER, MPO_PERIOD_25 = Line("MPO, period 1000 (paper)", "mpo"), Line("MPO, period 25", "mpo_target25")  # target periods
MPO_SINGLE_MACHINE = Line("MPO, two Q-functions, period 25", "mpo_twin_q_target25")  # mpo.py's single-machine setting
# the 100k-step runs on the suite's tasks: resume.pt every 10 episodes, so that a run stopped without a signal loses at
# most 10k steps; the comparisons that use these flags share their runs of the same variant
SUITE_ARGS = (*evaluate_every(10_000), "--checkpoint-every", "10000")
# TreePI/π with Table 1's ELU against ReLU (cheaper on a CPU), and SAC for scale
ACTIVATION_LINES = (
    Line("TreePI/π, ELU (Table 1)", "treepi_pi"),
    Line("TreePI/π, ReLU (the CPU default)", "treepi_pi_relu"),
    Line("SAC", "sac"),
)

# cpi_fig1a and cpi_ablation share their runs: each draws CPI, AGGREVATED-VI and the ablation's three CPI curves
# on the same 4 Garnet MDPs per seed (cpi_garnet.py's curves are independent: adding some changes none)
GARNET_CURVES = ("cpi", "aggrevated_vi", "cpi_model", "cpi_exact", "cpi_exact_visited")
GARNET_RUNS = dict(
    envs=("Garnet",),
    steps=500_000,
    seeds=(1, 2, 3, 4, 5),
    extra_args=("--num-mdps", "4", "--algorithms", *GARNET_CURVES),
    x_label="episodes per MDP",
)


def garnet_lines(tag: str, curves: dict[str, str]) -> tuple[Line, ...]:
    """cpi_garnet.py's curves (its --algorithms) as lines: the scalar charts/<tag>_<curve> of each, labelled."""
    return tuple(Line(label, "cpi_garnet", f"charts/{tag}_{curve}") for curve, label in curves.items())


COMPARISONS: dict[str, Comparison] = {
    "treepi_fig1": Comparison(
        "TreePI/search, TreePI/π and TreePI(1)/π against MPO+Predictive, MPO and SAC",
        (
            Line("TreePI/search", "treepi_search"),
            Line("TreePI/π", "treepi_pi"),
            Line("TreePI(1)/π", "treepi_depth1"),
            *TREEPI_BASELINES,
        ),
        envs=("InvertedPendulum-v5",),
        steps=1_500,
        extra_args=("--learning-starts", "500", *evaluate_every(250)),
        wall_clock=True,
        paper="[TreePI] Fig. 1",
    ),
    "treepi_fig1_suite": Comparison(
        "TreePI against MPO+Predictive, MPO and SAC on the paper's tasks",
        (
            Line("TreePI/search", "treepi_search"),
            Line("TreePI/π", "treepi_pi"),
            Line("TreePI/π, true model (Sec. 6.2)", "treepi_true"),  # the search without the learned model's errors
            *TREEPI_BASELINES,
        ),
        envs=("dm_control/cartpole-swingup-v0", "dm_control/finger-turn_hard-v0"),
        steps=100_000,
        extra_args=SUITE_ARGS,
        x_label="env steps (1000 per episode)",
        paper="[TreePI] Fig. 1 (its x axis in episodes of 1000 steps)",
    ),
    "treepi_models": Comparison(
        "TreePI/π with the learned model and with the simulator, against the same E-step on latents and observations",
        (
            Line("TreePI/π, true model", "treepi_true"),
            Line("TreePI/π, learned model", "treepi_pi"),
            Line("MPO E-step, true observations", "mpo_e_step_true_obs"),
            *TREEPI_BASELINES,
        ),
        envs=("InvertedDoublePendulum-v5",),
        steps=15_000,
        extra_args=evaluate_every(2_500),
        paper="[TreePI] Sec. 6.2 (the true model) against Sec. 5 (the learned one)",
    ),
    "treepi_activation": Comparison(
        "TreePI/π with Table 1's ELU and with ReLU, which is cheaper on a CPU",
        ACTIVATION_LINES,
        envs=("InvertedDoublePendulum-v5",),
        steps=15_000,
        extra_args=evaluate_every(2_500),  # treepi_models' runs of TreePI/π and SAC
        paper="[TreePI] Table 1 (ELU activations)",
    ),
    "treepi_activation_suite": Comparison(
        "TreePI/π with Table 1's ELU and with ReLU on cartpole-swingup",
        ACTIVATION_LINES,
        envs=("dm_control/cartpole-swingup-v0",),
        steps=100_000,
        extra_args=SUITE_ARGS,  # treepi_fig1_suite's runs of TreePI/π and SAC
        x_label="env steps (1000 per episode)",
        paper="[TreePI] Table 1 (ELU activations)",
    ),
    "mpo_vs_sac_ppo": Comparison(
        "MPO against SAC and PPO",
        (Line("MPO", "mpo"), Line("SAC", "sac"), Line("PPO", "ppo")),
        envs=("HalfCheetah-v5", "Walker2d-v5"),
        steps=10_000,
        extra_args=evaluate_every(2_500),
        paper="[MPO] Fig. 4 (there against DDPG, NAF, PPO and SVG; SAC is the later baseline)",
    ),
    "mpo_vs_sac_ppo_100k": Comparison(
        "MPO with the paper's settings and with its single-machine setting against SAC and PPO, at 100k env steps",
        (MPO_PAPER, MPO_SINGLE_MACHINE, Line("SAC", "sac"), Line("PPO", "ppo")),
        envs=("HalfCheetah-v5", "Walker2d-v5", "dm_control/cartpole-swingup-v0"),
        steps=100_000,
        extra_args=SUITE_ARGS,  # the suite task's MPO and SAC runs are treepi_fig1_suite's
        paper="[MPO] Fig. 4 (there against DDPG, NAF, PPO and SVG; SAC is the later baseline)",
    ),
    "mpo_exploration_100k": Comparison(
        "MPO's exploration: the paper's covariance bound, a 100x looser one and a shorter target period, against SAC",
        (MPO_PAPER, Line("MPO, ε_Σ 1e-2", "mpo_cov1e2"), MPO_PERIOD_25, Line("SAC", "sac")),
        envs=("Walker2d-v5", "HalfCheetah-v5"),
        steps=100_000,
        extra_args=SUITE_ARGS,  # the other MPO comparisons' runs of the paper's MPO, period 25 and SAC
        paper="[MPO] App. D (a much smaller bound on the covariance 'to keep the exploration'), Table 2 (ε_Σ 1e-4)",
    ),
    "mpo_critic_100k": Comparison(
        "MPO's critic: the paper's one Q-function against two with their minimum as Q' (clipped double Q), against SAC",
        (MPO_PAPER, Line("MPO, two Q-functions (min)", "mpo_twin_q"), Line("SAC", "sac")),
        envs=("Walker2d-v5", "HalfCheetah-v5"),
        steps=100_000,
        extra_args=SUITE_ARGS,  # mpo_vs_sac_ppo_100k's runs of the paper's MPO and SAC
        paper="[MPO] Sec. 4 (one Q-function, Retrace); [TD3] Sec. 4.2 (clipped double Q, which sac.py uses)",
    ),
    "mpo_single_machine_100k": Comparison(
        "MPO's two single-machine changes, alone and together: two Q-functions (min) and the target period 25, against SAC",
        (MPO_PAPER, Line("MPO, two Q-functions (min)", "mpo_twin_q"), MPO_PERIOD_25, MPO_SINGLE_MACHINE, Line("SAC", "sac")),
        envs=("Walker2d-v5", "HalfCheetah-v5"),
        steps=100_000,
        extra_args=SUITE_ARGS,  # every line's runs are shared with the other MPO comparisons
        paper="[MPO] Sec. 4 (one Q-function), Alg. 2 (targets copied every 1000 updates); [TD3] Sec. 4.2",
    ),
    "mpo_target_period": Comparison(
        "MPO with the paper's target period (1000 updates), ACME's (100), 25, and a looser covariance bound, against SAC",
        (
            MPO_PAPER,
            Line("MPO, period 100 (ACME)", "mpo_target100"),
            Line("MPO, period 100, ε_Σ 1e-3", "mpo_target100_cov1e3"),
            MPO_PERIOD_25,
            Line("SAC", "sac"),
        ),
        envs=("InvertedDoublePendulum-v5", "Walker2d-v5"),
        steps=15_000,
        extra_args=evaluate_every(2_500),
        paper="[MPO] Alg. 2 (target networks copied every 1000 updates) against ACME's MPOConfig (100)",
    ),
    "trpo_fig4": Comparison(
        "TRPO: single path vs vine",
        (Line("single path", "trpo_single"), Line("vine", "trpo_vine")),
        envs=("Swimmer-v5", "Hopper-v5"),
        steps=200_000,
        extra_args=evaluate_every(10_000),
        paper="[TRPO] Fig. 4",
    ),
    "trpo_fig4_table2": trpo_fig4_table2("charts/iteration", "policy iterations"),
    "trpo_fig4_table2_steps": trpo_fig4_table2("charts/sim_steps", "simulator steps"),
    "dpi_fig1": dpi_fig1("charts/eval_return", "the full episode (the env's time limit)"),
    "dpi_fig1_horizon": dpi_fig1("charts/eval_return_horizon", "the first T = 200 steps, the horizon DPI trains on"),
    "dpi_fig2": dpi_fig2("charts/eval_return", "the full episode"),
    "dpi_fig2_horizon": dpi_fig2("charts/eval_return_horizon", "the first T = 200 steps"),
    "cpi_fig1a": Comparison(
        "DPI on Garnet MDPs: CPI vs AGGREVATED-VI (log2 of the cost, lower is better)",
        garnet_lines("log2_cost", {"cpi": "CPI", "aggrevated_vi": "AGGREVATED-VI"}),
        y_label="log2 cost",
        paper="[DPI] Fig. 1a, its axes: log2 of the cost J(pi) against episodes (each seed averages 4 random MDPs)",
        **GARNET_RUNS,
    ),
    "cpi_ablation": Comparison(
        "Where AGGREVATED-VI's gain over CPI comes from (cost, lower is better)",
        garnet_lines(
            "cost",
            {
                "cpi": "CPI (Monte Carlo Q^pi)",
                "cpi_exact": "CPI, exact Q^pi",
                "cpi_exact_visited": "CPI, exact Q^pi at every visited state",
                "cpi_model": "CPI, A^pi on the learned model",
                "aggrevated_vi": "AGGREVATED-VI (A^eta on the learned model)",
            },
        ),
        y_label="cost",
        paper="[DPI] Sec. 6.1 names A^eta for A^pi as the difference; the same runs as cpi_fig1a",
        **GARNET_RUNS,
    ),
    # cpi_garnet.py is left out: it has no MuJoCo env.
    "speed": Comparison(
        "Speed of every algorithm on Hopper-v5 (one run at a time)",
        (
            Line("SAC", "sac", "charts/SPS"),
            Line("PPO", "ppo", "charts/SPS"),
            Line("MPO", "mpo", "charts/SPS"),
            Line("TreePI/π (ELU)", "treepi_pi", "charts/SPS"),
            Line("TRPO", "trpo_single", "charts/SPS"),
            Line("AGGREVATED-ILQR", "dpi_ilqr", "charts/SPS"),
        ),
        envs=("Hopper-v5",),
        steps=10_000,
        y_label="env steps/s",
        log_y=True,
        variant_steps={"mpo": 3_000, "treepi_pi": 2_000},
        variant_args={"sac": OFF_POLICY_SHORT, "mpo": OFF_POLICY_SHORT, "treepi_pi": OFF_POLICY_SHORT},
        extra_args=("--log-every", "500", "--eval-every", "0", "--eval-episodes", "1"),
        seeds=(1,),
        serial=True,
    ),
    "cleanrl_sac": against_cleanrl(
        "sac", "sac_cleanrl", "SAC against CleanRL's, side by side, CleanRL's settings", 15_000, 30_000
    ),
    "cleanrl_ppo": against_cleanrl("ppo", "ppo", "PPO against CleanRL's, side by side", 300_000, 150_000),
    "sac_bf16": Comparison(
        "sac.py with its updates' matrix products in bfloat16 (--bf16) and in float32, CleanRL's settings (training episodes)",
        (
            Line("float32", "sac_cleanrl", "charts/episodic_return"),
            Line("--bf16", "sac_cleanrl_bf16", "charts/episodic_return"),
        ),
        envs=("HalfCheetah-v5", "Hopper-v5"),
        steps=15_000,
        env_steps={"Hopper-v5": 30_000},
    ),
    "cleanrl_sac_same_stack": on_one_stack("sac", "sac_cleanrl", 15_000, 30_000),
    "cleanrl_ppo_same_stack": on_one_stack("ppo", "ppo", 300_000, 300_000),
    # SAC at PPO's budget: 12 runs of about 70 minutes on one core (cleanrl_compare.py --comparison; ours resumes)
    "cleanrl_sac_same_stack_300k": on_one_stack("sac", "sac_cleanrl", 300_000, 300_000, 3, "cleanrl_sac_same_stack_300k"),
}


# == Running =========================================================================
@dataclass(frozen=True)
class Run:
    """One training process: its identity, directory and command (without --resume)."""

    variant: str
    env: str
    seed: int
    steps: int
    dir: str
    cmd: tuple[str, ...]
    record: str
    """The finished run's charts/ scalars (tag,step,wall,value), kept in the repository."""


def get_comparison(name: str) -> Comparison:
    """The comparison called `name`, or a UsageError naming the known ones."""
    if name not in COMPARISONS:
        raise UsageError(f"unknown comparison {name!r}; known: {', '.join(COMPARISONS)}")
    return COMPARISONS[name]


def select(
    comp: Comparison, seeds: tuple[int, ...] | None, envs: tuple[str, ...] | None, steps: int | None
) -> tuple[tuple[int, ...], tuple[str, ...], int | None]:
    """The comparison's seeds, envs and budget, with the command line's overrides checked."""
    for env in envs or ():
        if env not in comp.envs:
            raise UsageError(f"env {env!r} is not in this comparison; its envs: {comp.envs}")
    if steps is not None and steps <= 0:
        raise UsageError(f"--steps must be positive, got {steps}")
    return seeds or comp.seeds, envs or comp.envs, steps


def record_path(variant: str, env: str, leaf: str, results: str | None = None) -> str:
    """Where the record of the run <out>/runs/<variant>/<env>/<leaf> is kept (RESULTS unless `results`)."""
    return os.path.join(results or RESULTS, variant, env, leaf + ".csv")


def plan(
    comp: Comparison, seeds: tuple[int, ...], envs: tuple[str, ...], steps: int | None, out: str,
    python: str = sys.executable, results: str | None = None,
) -> list[Run]:  # fmt: skip
    """Every run the comparison needs, one per (variant, env, seed), in a fixed order; `steps`
    overrides the comparison's budgets; their records under `results` (default RESULTS)."""
    runs = []
    for env in envs:
        for name in dict.fromkeys(line.variant for line in comp.lines):  # two tags: one run
            variant = VARIANTS[name]
            env_budget = comp.budget(env, steps, name)
            extra = (*comp.variant_args.get(name, ()), *comp.extra_args)
            for seed in seeds:
                leaf = f"seed{seed}_{env_budget}"
                if extra:  # another command, so another run
                    leaf += "_" + hashlib.sha1(" ".join(extra).encode()).hexdigest()[:8]
                run_dir = os.path.join(os.path.abspath(out), "runs", name, env, leaf)
                cmd = (
                    python, os.path.join(ROOT, variant.script), "--env", env, "--seed", str(seed),
                    "--total-steps", str(env_budget), "--threads", "1", "--log-dir", run_dir,
                    *variant.args, *variant.env_args.get(env, ()), *extra,
                )  # fmt: skip
                runs.append(Run(name, env, seed, env_budget, run_dir, cmd, record_path(name, env, leaf, results)))
    return runs


def is_done(run: Run) -> bool:
    """Finished here (done.json), or on another machine (its record)."""
    return os.path.exists(os.path.join(run.dir, "done.json")) or os.path.exists(run.record)


def script_dirs(run_dir: str) -> list[str]:
    """The script's own run directories inside a run's directory (one, unless a bug)."""
    if not os.path.isdir(run_dir):
        return []
    subs = [os.path.join(run_dir, d) for d in sorted(os.listdir(run_dir))]
    return [d for d in subs if os.path.isdir(d)]


def resume_file(run_dir: str) -> str | None:
    """The resume.pt of an interrupted run in run_dir, if it wrote one (cleanrl_compare.py's runs too)."""
    for sub in script_dirs(run_dir):
        if os.path.exists(os.path.join(sub, "resume.pt")):
            return os.path.join(sub, "resume.pt")
    return None


def last_step(log: str) -> int:
    """The last `step N` printed to a run.log (0 if none yet); reads only the file's tail."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return 0
    found = re.findall(r"\bstep (\d+)", tail)
    return int(found[-1]) if found else 0


def log_tail(log: str, lines: int = 15) -> str:
    try:
        with open(log, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no run.log)"


def start(run: Run, nice: int) -> tuple[subprocess.Popen, tuple[str, ...], float]:
    """Start a run: resume it from its resume.pt, or clear its directory and begin afresh."""
    resume = resume_file(run.dir)
    if resume is None and os.path.exists(run.dir):
        shutil.rmtree(run.dir)
    os.makedirs(run.dir, exist_ok=True)
    cmd = run.cmd + (("--resume", resume) if resume else ())
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(os.path.join(run.dir, "run.log"), "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        niced = ("nice", "-n", str(nice)) if nice else ()
        proc = subprocess.Popen(niced + cmd, cwd=run.dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, cmd, time.time()


def name_of(run: Run) -> str:
    return f"{run.variant}/{run.env}/seed{run.seed}"


def run_all(runs: list[Run], jobs: int, nice: int = 0, status_every: float = 5.0) -> int:
    """Run every unfinished run, `jobs` at a time; the number that failed."""
    queue = [r for r in runs if not is_done(r)]
    done, failed = len(runs) - len(queue), []
    print(f"{len(runs)} runs: {done} done, {len(queue)} to run, {jobs} at a time", flush=True)
    running: dict[Run, tuple[subprocess.Popen, tuple[str, ...], float]] = {}
    last_status, last_counts = 0.0, None

    def stop(signum, frame):  # `kill` of the runner: pass SIGTERM on, so that each script writes resume.pt and stops
        for proc, _, _ in running.values():
            proc.terminate()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                run = queue.pop(0)
                running[run] = start(run, nice)
            for run, (proc, cmd, began) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[run]
                wall = time.time() - began
                if code == 0:
                    done += 1
                    record = {
                        "command": list(cmd),
                        "exit_status": 0,
                        "wall_seconds": round(wall, 1),
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    }
                    with open(os.path.join(run.dir, "done.json"), "w") as f:
                        json.dump(record, f, indent=2)
                    write_record(run)
                    print(f"done    {name_of(run)} in {wall / 60:.1f} min; commit {run.record}", flush=True)
                else:
                    failed.append(run)
                    log = os.path.join(run.dir, "run.log")
                    print(f"FAILED  {name_of(run)} (exit {code}) after {wall / 60:.1f} min; "
                          f"{log} ends:\n{log_tail(log)}", flush=True)  # fmt: skip
            counts = (done, len(running), len(queue), len(failed))
            now = time.time()
            if running and (counts != last_counts or now - last_status >= status_every):
                percent = ", ".join(
                    f"{name_of(r)} {min(100, 100 * last_step(os.path.join(r.dir, 'run.log')) / r.steps):.0f}%" for r in running
                )
                print(f"[{time.strftime('%H:%M:%S')}] done {done} | running {len(running)} | "
                      f"queued {len(queue)} | failed {len(failed)} | {percent}", flush=True)  # fmt: skip
                last_status, last_counts = now, counts
            time.sleep(0.2)
    except KeyboardInterrupt:  # the children got the same SIGINT (Ctrl-C) or SIGTERM (stop); wait so their files close
        for proc, _, _ in running.values():
            proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"finished: {done} done, {len(failed)} failed", flush=True)
    return len(failed)


# == Reading =========================================================================
def read_events(path: str) -> dict[str, list[tuple[int, float, float]]]:
    """Scalars of one events file: tag -> [(step, wall_time, value)], all of them kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(path, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.wall_time, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def merge_events(files: list[dict[str, list[tuple[int, float, float]]]]) -> dict[str, list[tuple[int, float, float]]]:
    """One run's scalars from its events files (a resumed run has several).

    Files are ordered by their first event's wall time; from each file the events at steps >=
    the first step of the next file are dropped (they were lost when the run was interrupted
    and the resumed part logs them again), so the later file replaces them.
    """

    def first_wall(scalars: dict) -> float:
        walls = [ev[1] for events in scalars.values() for ev in events]
        return min(walls) if walls else float("inf")

    files = sorted((f for f in files if f), key=first_wall)
    merged: dict[str, list[tuple[int, float, float]]] = {}
    for i, scalars in enumerate(files):
        later = [ev[0] for f in files[i + 1 : i + 2] for events in f.values() for ev in events]
        cut = min(later) if later else None
        for tag, events in scalars.items():
            keep = [ev for ev in events if cut is None or ev[0] < cut]
            merged.setdefault(tag, []).extend(keep)
    return merged


def run_scalars(run: Run) -> dict[str, list[tuple[int, float, float]]]:
    """The merged scalars of a finished run, wall times as seconds since its first event."""
    paths = [
        os.path.join(sub, name)
        for sub in script_dirs(run.dir)
        for name in sorted(os.listdir(sub))
        if name.startswith("events.out.tfevents")
    ]
    merged = merge_events([read_events(p) for p in paths])
    walls = [ev[1] for events in merged.values() for ev in events]
    t0 = min(walls) if walls else 0.0
    return {tag: [(s, w - t0, v) for s, w, v in events] for tag, events in merged.items()}


def write_record(run: Run) -> None:
    """The run's record from its tensorboard events: tag,step,wall,value of its `charts/` scalars."""
    os.makedirs(os.path.dirname(run.record), exist_ok=True)
    with open(run.record + ".tmp", "w") as f:
        f.write("tag,step,wall,value\n")
        for tag, events in sorted(run_scalars(run).items()):
            if tag.startswith("charts/"):
                f.writelines(f"{tag},{step},{wall:.3f},{value!r}\n" for step, wall, value in events)
    os.replace(run.record + ".tmp", run.record)


def write_csv(runs: list[Run], path: str) -> int:
    """variant,env,seed,tag,step,wall,value of the finished runs' records (written afresh from the events of the
    runs finished here); row count."""
    for run in runs:
        if os.path.exists(os.path.join(run.dir, "done.json")):
            write_record(run)
    finished = [r for r in runs if os.path.exists(r.record)]
    if not finished:
        raise UsageError("no finished runs for this selection; `run` it first")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = 0
    with open(path + ".tmp", "w") as f:
        f.write("variant,env,seed,tag,step,wall,value\n")
        for run in finished:
            with open(run.record) as record:
                next(record)
                for row in record:
                    f.write(f"{run.variant},{run.env},{run.seed},{row}")
                    rows += 1
    os.replace(path + ".tmp", path)
    return rows


def read_csv(path: str) -> dict[tuple[str, str, int, str], np.ndarray]:
    """(variant, env, seed, tag) -> array [n, 3] of (step, wall, value), sorted by step."""
    if not os.path.exists(path):
        raise UsageError(f"no {path}; run `csv` first")
    raw: dict[tuple[str, str, int, str], list[tuple[float, float, float]]] = {}
    with open(path) as f:
        next(f)
        for row in f:
            variant, env, seed, tag, step, wall, value = row.rstrip("\n").split(",")
            raw.setdefault((variant, env, int(seed), tag), []).append((float(step), float(wall), float(value)))
    out = {}
    for key, rows in raw.items():
        arr = np.array(rows)
        out[key] = arr[np.argsort(arr[:, 0], kind="stable")]
    return out


# == Plotting ========================================================================
N_BINS = 30  # bins of the step axis for per-episode returns
N_GRID = 50  # points of the common grid for regularly logged metrics and for wall-clock axes
N_BOOT = 2000  # bootstrap resamples
CI_LEVEL = 0.95


def bootstrap_ci(
    values: np.ndarray, n: int = N_BOOT, level: float = CI_LEVEL, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds and its percentile bootstrap interval, resampling seeds.

    values [S, T] (S seeds, T grid points) -> mean, lo, hi, each [T]: draw S seeds with
    replacement n times, average each draw, take the (1 - level)/2 and (1 + level)/2 quantiles.
    """
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.shape[0], size=(n, values.shape[0]))  # [n, S]
    means = values[idx].mean(axis=1)  # [n, T]
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return values.mean(axis=0), lo, hi


def bin_episodes(steps: np.ndarray, returns: np.ndarray, total: float, bins: int = N_BINS):
    """Per-episode returns onto `bins` equal bins of [0, total]: (bin centres, mean per bin).

    An episode counts in the bin its end step falls in (the last bin includes `total`); an empty
    bin carries the previous bin's value forward, and is NaN before the first episode.
    """
    edges = np.linspace(0.0, total, bins + 1)
    which = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, bins - 1)
    means = np.full(bins, np.nan)
    for b in range(bins):
        if np.any(which == b):
            means[b] = returns[which == b].mean()
        elif b > 0:
            means[b] = means[b - 1]
    return (edges[:-1] + edges[1:]) / 2, means


def curves(
    data: dict, variant: str, env: str, tag: str, seeds: list[int], total: float
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Every seed's curve on one step grid: (grid [T], values [S, T], each seed's events)."""
    per_seed = [data[(variant, env, s, tag)] for s in seeds]
    if tag == "charts/episodic_return":
        grid = bin_episodes(np.zeros(0), np.zeros(0), total)[0]
        values = np.stack([bin_episodes(ev[:, 0], ev[:, 2], total)[1] for ev in per_seed])
        keep = ~np.isnan(values).any(axis=0)  # grid points before some seed's first episode
        return grid[keep], values[:, keep], per_seed
    same = all(len(ev) == len(per_seed[0]) and np.all(ev[:, 0] == per_seed[0][:, 0]) for ev in per_seed)  # fmt: skip
    if same:
        grid = per_seed[0][:, 0]
    else:
        lo, hi = max(ev[0, 0] for ev in per_seed), min(ev[-1, 0] for ev in per_seed)
        grid = np.linspace(lo, hi, N_GRID)
    values = np.stack([np.interp(grid, ev[:, 0], ev[:, 2]) for ev in per_seed])
    return grid, values, per_seed


def to_wall_clock(grid: np.ndarray, values: np.ndarray, per_seed: list[np.ndarray]):
    """The same curves against seconds: each seed's step -> wall map, then one common grid."""
    walls = [np.interp(grid, ev[:, 0], ev[:, 1]) for ev in per_seed]
    wall_grid = np.linspace(max(w[0] for w in walls), min(w[-1] for w in walls), N_GRID)
    return wall_grid, np.stack([np.interp(wall_grid, w, v) for w, v in zip(walls, values)])


def along_tag(data: dict, x_tag: str) -> dict:
    """The data with each event's step replaced by its run's `x_tag` at that step: the tag's events, with (0, 0) first,
    interpolated linearly (clamped past its last event); the runs without the tag are left out."""
    out = {}
    for (variant, env, seed, tag), events in data.items():
        counter = data.get((variant, env, seed, x_tag))
        if counter is not None:
            x = np.interp(events[:, 0], np.r_[0.0, counter[:, 0]], np.r_[0.0, counter[:, 2]])
            out[(variant, env, seed, tag)] = np.column_stack([x, events[:, 1:]])
    return out


def speed(data: dict, variant: str, env: str, seeds: list[int]) -> float:
    """Steps/second over the second half of each run (off-policy warm-up and start-up excluded),
    from the wall times of its events: (N - N/2) / (t(N) - t(N/2)); the mean over seeds."""
    rates = []
    for s in seeds:
        runs = [ev[:, :2] for (v, e, seed, _), ev in data.items() if (v, e, seed) == (variant, env, s)]
        if not runs:
            continue
        points = np.concatenate(runs)
        points = points[np.argsort(points[:, 0], kind="stable")]  # (step, wall)
        end, mid = points[-1, 0], points[-1, 0] / 2
        seconds = points[:, 1].max() - np.interp(mid, points[:, 0], points[:, 1])
        if seconds > 0:
            rates.append((end - mid) / seconds)
    return float(np.mean(rates)) if rates else float("nan")


def summarise(data: dict, comp: Comparison, env: str, steps: int | None) -> list[dict]:
    """Per line on one env: curves and the table's numbers."""
    out = []
    for line in comp.lines:
        seeds = sorted(s for v, e, s, t in data if (v, e, t) == (line.variant, env, line.tag))
        if not seeds:
            continue
        total = comp.budget(env, steps, line.variant)
        if comp.x_tag:  # episodes are binned over the counter's range
            total = max(data[(line.variant, env, s, comp.x_tag)][-1, 0] for s in seeds)
        grid, values, per_seed = curves(data, line.variant, env, line.tag, seeds, total)
        if len(grid) == 0:
            continue
        mean, lo, hi = bootstrap_ci(values)
        span = grid[-1] - grid[0]
        auc = np.trapezoid(values, grid, axis=1) / span if span > 0 else values[:, 0]  # each seed's [S]
        out.append({
            "line": line, "seeds": seeds, "grid": grid, "values": values, "per_seed": per_seed,
            "mean": mean, "lo": lo, "hi": hi, "auc": [float(x[0]) for x in bootstrap_ci(auc[:, None])],  # mean, lo, hi
            # CleanRL's SPS is a running average from the start, ours a windowed rate: no column
            "sps": float("nan") if comp.made_by else speed(data, line.variant, env, seeds),
        })  # fmt: skip
    return out


def num(x: float) -> str:
    """Returns in whole numbers, costs and small returns with three significant digits."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def interval(mean: float, lo: float, hi: float) -> str:
    """A mean over seeds with its 95% bootstrap interval: half its width after ±, then its ends."""
    return f"{num(mean)} ± {num((hi - lo) / 2)} [{num(lo)}, {num(hi)}]"


def table(comp: Comparison, env: str, rows: list[dict]) -> str:
    """The markdown table of one env."""
    text = [
        f"### {comp.panel_titles.get(env, env)}",
        "",
        (
            f"| line | final {comp.y_label or comp.lines[0].tag.split('/')[-1]} (mean ± 95% CI) | last of {comp.x_label} | "
            f"mean over training (mean ± 95% CI) | {comp.x_label}/s, 2nd half | seeds |"
        ),
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        final = interval(r["mean"][-1], r["lo"][-1], r["hi"][-1])
        sps = "–" if np.isnan(r["sps"]) else f"{r['sps']:.0f}" if r["sps"] >= 1 else f"{r['sps']:.2g}"  # iterations/s
        text.append(f"| {r['line'].label} | {final} | {r['grid'][-1]:.0f} | {interval(*r['auc'])} | "
                    f"{sps} | {len(r['seeds'])} |")  # fmt: skip
    for (label, penv), (steps, value, note) in comp.published.items():
        if penv == env:
            text.append(f"| {label} (published: {note}) | {num(value)} | {steps} | | | |")
    return "\n".join(text) + "\n"


def plot(comp: Comparison, name: str, data: dict, envs: tuple[str, ...], steps: int | None,
         figures: str) -> tuple[str, str]:  # fmt: skip
    """Write <figures>/<stem>.png and <figures>/<stem>.md; return their paths. The stem is the comparison's name, with
    the envs' names after it where they are a subset (`--envs`), so that the figure of one env never replaces another's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = along_tag(data, comp.x_tag) if comp.x_tag else data
    summaries = {env: summarise(data, comp, env, steps) for env in envs}
    if not any(summaries.values()):
        raise UsageError(f"no data for comparison {name!r} in the CSV")
    nrows = 2 if comp.wall_clock else 1
    fig, axes = plt.subplots(nrows, len(envs), figsize=(max(5.5, 4 * len(envs)), 3 * nrows), squeeze=False)
    colors = {line.label: f"C{i}" for i, line in enumerate(comp.lines)}
    for col, env in enumerate(envs):
        for r in summaries[env]:
            c, label = colors[r["line"].label], r["line"].label
            ax = axes[0, col]
            ax.plot(r["grid"], r["mean"], color=c, label=label)
            ax.fill_between(r["grid"], r["lo"], r["hi"], color=c, alpha=0.2, linewidth=0)
            if comp.wall_clock:
                wall_grid, wall_values = to_wall_clock(r["grid"], r["values"], r["per_seed"])
                mean, lo, hi = bootstrap_ci(wall_values)
                axes[1, col].plot(wall_grid, mean, color=c, label=label)
                axes[1, col].fill_between(wall_grid, lo, hi, color=c, alpha=0.2, linewidth=0)
        for (label, penv), (_, value, note) in comp.published.items():
            if penv == env:  # as text: a level at 1M steps would squash these short curves
                axes[0, col].text(0.02, 0.97, f"{label} published: {value:.0f} ({note})",
                                  transform=axes[0, col].transAxes, va="top", fontsize=7)  # fmt: skip
        ylabel = comp.y_label or comp.lines[0].tag.split("/")[-1]
        axes[0, col].set(title=comp.panel_titles.get(env, env), xlabel=comp.x_label, ylabel=ylabel)
        if comp.wall_clock:
            axes[1, col].set(xlabel="wall-clock seconds", ylabel=ylabel)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            if comp.log_y:
                ax.set_yscale("log")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(textwrap.fill(comp.title, int(15 * fig.get_figwidth())), fontsize=9)  # wrapped to the figure's width
    fig.tight_layout()
    os.makedirs(figures, exist_ok=True)
    stem = name if set(envs) == set(comp.envs) else "__".join([name, *(env.split("/")[-1] for env in envs)])
    png, md = os.path.join(figures, f"{stem}.png"), os.path.join(figures, f"{stem}.md")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    head = f"## {comp.title}\n\n{comp.paper + '. ' if comp.paper else ''}"

    def budgets(env: str) -> str:  # one number per env, or one per line where they differ
        per_line = {line.label: comp.budget(env, steps, line.variant) for line in comp.lines}
        if len(set(per_line.values())) == 1:
            return f"{env} {per_line[comp.lines[0].label]:,}"
        return f"{env} (" + ", ".join(f"{label} {n:,}" for label, n in per_line.items()) + ")"

    head += f"Env steps per run: {', '.join(map(budgets, envs))}; mean over seeds, 95% bootstrap CI over seeds; "
    head += "'mean over training' is the area under the curve divided by the step range.\n\n"
    text = head + "\n".join(table(comp, env, summaries[env]) for env in envs if summaries[env])
    with open(md, "w") as f:
        f.write(text)
    print(text)
    return png, md


# == CLI =============================================================================
@dataclass
class Select:
    name: tyro.conf.Positional[str]
    """Name of the comparison (see `list`)."""
    seeds: tuple[int, ...] | None = None
    """Seeds to use instead of the comparison's."""
    envs: tuple[str, ...] | None = None
    """A subset of the comparison's envs."""
    steps: int | None = None
    """Env steps per run instead of the comparison's budget."""
    out: str = "runs/bench"
    """Directory of the runs (runs/) and CSV files (csv/)."""
    results: str | None = None
    """Directory of the finished runs' records, to commit (default: the repository's benchmark/results)."""


@dataclass
class ListCmd:
    """Print the comparisons and the runs each needs (with their state under --out)."""

    out: str = "runs/bench"
    """Directory of the runs, to show which are done."""
    results: str | None = None
    """Directory of the finished runs' records (default: the repository's benchmark/results)."""


@dataclass
class RunCmd(Select):
    """Run every (variant, env, seed) of a comparison that is not finished."""

    jobs: int = os.cpu_count() or 1
    """Runs at once (one torch thread each); a serial comparison uses 1."""
    nice: int = 0
    """Niceness added to each run's process (0: as this process)."""
    variants: tuple[str, ...] | None = None
    """Only these of the comparison's variants (e.g. the ones whose script is not being changed)."""
    python: str = sys.executable
    """The Python that runs the scripts."""


@dataclass
class CsvCmd(Select):
    """Read the finished runs' tensorboard events into <out>/csv/<name>.csv."""


@dataclass
class PlotCmd(Select):
    """Plot the CSV: <figures>/<name>.png and the table <figures>/<name>.md."""

    figures: str = "benchmark/figures"
    """Directory for the figure and the markdown table."""


Command = (
    Annotated[ListCmd, tyro.conf.subcommand("list")]
    | Annotated[RunCmd, tyro.conf.subcommand("run")]
    | Annotated[CsvCmd, tyro.conf.subcommand("csv")]
    | Annotated[PlotCmd, tyro.conf.subcommand("plot")]
)


def list_comparisons(out: str, results: str | None = None) -> None:
    for name, comp in COMPARISONS.items():
        runs = plan(comp, comp.seeds, comp.envs, None, out, results=results)
        done = sum(is_done(r) for r in runs)
        lines = ", ".join(f"{line.label}={line.variant}" for line in comp.lines)
        print(f"{name}: {comp.title}" + (f" ({comp.paper})" if comp.paper else ""))
        print(f"  lines {lines}; envs {', '.join(comp.envs)}; seeds {comp.seeds}; "
              f"{comp.steps:,} steps{'; serial' if comp.serial else ''}; {done}/{len(runs)} done")  # fmt: skip
        for r in runs:
            state = "done" if is_done(r) else "partial" if os.path.exists(r.dir) else "todo"
            state = "recorded" if state == "done" and not os.path.exists(r.dir) else state
            print(f"    {state:8s} {name_of(r)} {r.steps} steps")


def main(argv: list[str] | None = None) -> int:
    cmd = tyro.cli(Command, args=argv, description=__doc__.split("\n\n")[0])
    try:
        if isinstance(cmd, ListCmd):
            list_comparisons(cmd.out, cmd.results)
            return 0
        comp = get_comparison(cmd.name)
        seeds, envs, steps = select(comp, cmd.seeds, cmd.envs, cmd.steps)
        csv = os.path.join(cmd.out, "csv", f"{cmd.name}.csv")
        if isinstance(cmd, RunCmd):
            if comp.made_by:
                raise UsageError(f"{cmd.name}'s runs are made by `{comp.made_by}`; csv/plot read them")
            if cmd.jobs <= 0:
                raise UsageError(f"--jobs must be positive, got {cmd.jobs}")
            runs = plan(comp, seeds, envs, steps, cmd.out, cmd.python, cmd.results)
            known = tuple(dict.fromkeys(r.variant for r in runs))
            for name in cmd.variants or ():
                if name not in known:
                    raise UsageError(f"variant {name!r} is not in this comparison; its variants: {known}")
            runs = [r for r in runs if r.variant in (cmd.variants or known)]
            return 1 if run_all(runs, 1 if comp.serial else cmd.jobs, cmd.nice) else 0
        if isinstance(cmd, CsvCmd):
            rows = write_csv(plan(comp, seeds, envs, steps, cmd.out, results=cmd.results), csv)
            print(f"{rows} rows -> {csv}")
            return 0
        png, md = plot(comp, cmd.name, read_csv(csv), envs, steps, cmd.figures)
        print(f"-> {png}, {md}")
        return 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM during `run`: no new run started, the running ones wrote resume.pt
        print("stopped: the unfinished runs continue from their resume.pt when the same command runs again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
