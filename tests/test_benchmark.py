"""benchmark/bench.py: the pure functions against hand-made data, and one tiny comparison end
to end (sac.py and ppo.py on Pendulum-v1, 2 seeds, 384 steps, 2 jobs: about 30 s in all)."""

import dataclasses
import glob
import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 384  # 6 PPO rollouts of 64 steps; SAC learns from step 100


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "benchmark", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses and tyro resolve annotations through it
    spec.loader.exec_module(module)
    return module


bench = load_bench()


@pytest.fixture(scope="module", autouse=True)
def results_outside_the_repository(tmp_path_factory):
    """The finished runs' records of this module's runs go to a scratch directory, not benchmark/results."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "RESULTS", str(tmp_path_factory.mktemp("results")))
        yield bench.RESULTS


# -- pure functions ----------------------------------------------------------------------------
def test_bootstrap_ci_matches_enumeration_of_all_resamples():
    """3 seeds have 27 equally likely resamples: the percentile interval of many random ones
    must land on the enumerated distribution's quantiles (values chosen so no quantile sits
    on a jump of its CDF: the 25% and 75% points fall 0.009 inside a step, ~6 sd at n=1e5)."""
    x = np.array([[1.0], [2.0], [7.0]])
    means = np.sort([x[list(idx), 0].mean() for idx in itertools.product(range(3), repeat=3)])
    q25, q75 = means[int(np.ceil(0.25 * 27)) - 1], means[int(np.ceil(0.75 * 27)) - 1]
    mean, lo, hi = bench.bootstrap_ci(x, n=100_000, level=0.5, seed=1)
    assert mean[0] == pytest.approx(10 / 3)
    assert (lo[0], hi[0]) == (pytest.approx(q25), pytest.approx(q75))
    # at 95% the tails are below 1/27, the mass of the all-min and all-max resamples
    _, lo, hi = bench.bootstrap_ci(x, n=100_000, level=0.95, seed=1)
    assert (lo[0], hi[0]) == (1.0, 7.0)


def test_bootstrap_ci_is_seeded_and_per_grid_point():
    values = np.array([[0.0, 10.0], [1.0, 20.0], [2.0, 60.0]])
    a, b = bench.bootstrap_ci(values), bench.bootstrap_ci(values)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    mean, lo, hi = a
    np.testing.assert_allclose(mean, [1.0, 30.0])
    assert np.all(lo <= mean) and np.all(mean <= hi) and hi[1] - lo[1] > hi[0] - lo[0]


def test_bin_episodes_averages_per_bin_and_carries_forward():
    # bins of [0, 100]: [0, 25) [25, 50) [50, 75) [75, 100]
    centres, means = bench.bin_episodes(np.array([10, 20, 60, 75, 100]), np.array([1.0, 3.0, 5.0, 6.0, 8.0]), 100, bins=4)
    np.testing.assert_allclose(centres, [12.5, 37.5, 62.5, 87.5])
    np.testing.assert_allclose(means, [2.0, 2.0, 5.0, 7.0])  # bin 1 empty: carried forward
    _, means = bench.bin_episodes(np.array([60]), np.array([4.0]), 100, bins=4)
    np.testing.assert_array_equal(means, [np.nan, np.nan, 4.0, 4.0])  # nothing before


def test_speed_is_the_rate_over_the_second_half_of_each_run():
    """A run of 1000 steps: 500 warm-up steps in 1 s, then 500 steps in 50 s (10 steps/s); a
    second seed twice as fast; the rate ignores the warm-up and averages the seeds."""
    steps = np.arange(0, 1001, 100.0)
    wall = np.where(steps <= 500, steps / 500, 1 + (steps - 500) / 10)
    data = {}
    for seed, factor in ((1, 1.0), (2, 0.5)):
        rows = np.stack([steps, wall * factor, np.zeros_like(steps)], axis=1)
        data["v", "E", seed, "charts/eval_return"] = rows[::2]
        data["v", "E", seed, "charts/SPS"] = rows[1::2]
    assert bench.speed(data, "v", "E", [1]) == pytest.approx(10.0)
    assert bench.speed(data, "v", "E", [1, 2]) == pytest.approx((10.0 + 20.0) / 2)
    assert np.isnan(bench.speed(data, "v", "E", [3]))


def test_along_tag_puts_each_point_at_the_counter_interpolated_from_zero():
    """A counter logged at steps 100 and 300 (values 1 and 2): a point at step 50 is at 0.5 (from (0, 0)), at 200 at 1.5,
    at 400 at 2 (clamped); walls and values stay; a run without the counter is left out."""
    counter = np.array([[100.0, 1.0, 1.0], [300.0, 3.0, 2.0]])
    points = np.array([[50.0, 0.5, 7.0], [200.0, 2.0, 8.0], [400.0, 4.0, 9.0]])
    data = {("v", "E", 1, "c"): counter, ("v", "E", 1, "y"): points, ("w", "E", 1, "y"): points}
    out = bench.along_tag(data, "c")
    np.testing.assert_array_equal(out["v", "E", 1, "y"], [[0.5, 0.5, 7.0], [1.5, 2.0, 8.0], [2.0, 4.0, 9.0]])
    np.testing.assert_array_equal(out["v", "E", 1, "c"][:, 0], [1.0, 2.0])
    assert ("w", "E", 1, "y") not in out


def test_merge_events_lets_the_resumed_file_replace_the_lost_part(tmp_path):
    """Run A logs steps 0..10, is checkpointed at 5 and dies; the resumed B logs 6..15 later."""
    from torch.utils.tensorboard import SummaryWriter

    for name, steps, value, wall in (("a", range(11), 1.0, 1000.0), ("b", range(6, 16), 2.0, 2000.0)):  # fmt: skip
        writer = SummaryWriter(str(tmp_path / name))
        for s in steps:
            writer.add_scalar("charts/eval_return", value, s, walltime=wall + s)
        writer.close()
    files = [bench.read_events(p) for p in sorted(glob.glob(str(tmp_path / "*" / "events*")))]
    merged = bench.merge_events(files[::-1])  # given in the wrong order: sorted by wall time
    steps = [s for s, _, _ in merged["charts/eval_return"]]
    values = [v for _, _, v in merged["charts/eval_return"]]
    assert steps == list(range(16))
    assert values == [1.0] * 6 + [2.0] * 10


def test_runs_are_shared_between_comparisons_and_errors_exit_2(tmp_path, monkeypatch, capsys):
    a = bench.Comparison("a", (bench.Line("SAC", "sac"),), envs=("Hopper-v5",), steps=100)
    b = bench.Comparison("b", (bench.Line("x", "sac"), bench.Line("y", "ppo")), ("Hopper-v5",), 100)
    run_a = bench.plan(a, (1,), a.envs, 100, str(tmp_path))
    run_b = bench.plan(b, (1,), b.envs, 100, str(tmp_path))
    assert run_a[0].dir == run_b[0].dir and len(run_b) == 2
    monkeypatch.setitem(bench.COMPARISONS, "a", a)
    for argv in (["run", "nope"], ["run", "a", "--envs", "Walker2d-v5"], ["run", "a", "--variants", "ppo"], ["csv", "a", "--out", str(tmp_path)], ["plot", "a", "--out", str(tmp_path)]):  # fmt: skip
        assert bench.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_budgets_per_env_and_variant_and_their_flags_make_distinct_runs(tmp_path):
    comp = bench.Comparison(
        "c", (bench.Line("SAC", "sac"), bench.Line("MPO", "mpo")), ("Hopper-v5", "Swimmer-v5"),
        steps=100, env_steps={"Swimmer-v5": 300}, variant_steps={"mpo": 50},
        variant_args={"mpo": ("--learning-starts", "10")},
    )  # fmt: skip
    runs = {(r.variant, r.env): r for r in bench.plan(comp, (1,), comp.envs, None, str(tmp_path))}
    assert runs["sac", "Hopper-v5"].steps == 100 and runs["sac", "Swimmer-v5"].steps == 300
    assert runs["mpo", "Hopper-v5"].steps == 50 and runs["mpo", "Swimmer-v5"].steps == 50
    assert "--learning-starts" in runs["mpo", "Hopper-v5"].cmd
    assert "--learning-starts" not in runs["sac", "Hopper-v5"].cmd
    plain = bench.Comparison("p", (bench.Line("MPO", "mpo"),), ("Hopper-v5",), steps=50)
    (same_budget,) = bench.plan(plain, (1,), plain.envs, None, str(tmp_path))
    assert same_budget.dir != runs["mpo", "Hopper-v5"].dir  # other flags, another run
    overridden = bench.plan(comp, (1,), comp.envs, 7, str(tmp_path))
    assert {r.steps for r in overridden} == {7}


def test_every_planned_command_is_one_its_script_accepts(tmp_path):
    # a mistyped flag or a bad value in a variant would otherwise fail only when its run starts, maybe hours in
    scripts, checked = {}, 0
    for comp in bench.COMPARISONS.values():
        if comp.made_by:  # run by cleanrl_compare.py, partly with CleanRL's scripts
            continue
        for run in bench.plan(comp, comp.seeds, comp.envs, None, str(tmp_path)):
            path = run.cmd[1]
            if path not in scripts:
                spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
                scripts[path] = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(scripts[path])
            script = scripts[path]
            args = script.tyro.cli(script.Args, args=list(run.cmd[2:]))
            script.check_args(args)  # raises UsageError with the script's one-line message
            assert (args.env, args.seed, args.total_steps) == (run.env, run.seed, run.steps)
            checked += 1
    assert checked > 100 and len(scripts) >= 6


def test_comparisons_made_elsewhere_are_refused_by_run(tmp_path, capsys):
    assert bench.COMPARISONS["cleanrl_sac"].made_by
    assert bench.main(["run", "cleanrl_sac", "--out", str(tmp_path)]) == 2
    assert "cleanrl_compare.py learn" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(tmp_path, "runs"))


def load_cleanrl_compare():
    spec = importlib.util.spec_from_file_location("cleanrl_compare", os.path.join(ROOT, "benchmark", "cleanrl_compare.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["cleanrl_compare"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("algo", ["sac", "ppo"])
def test_gymnasium1_patch_reads_what_gymnasium_1_gives(tmp_path, algo, capsys):
    """CleanRL's SAC and PPO patched for gymnasium 1.x: the file is patched or refused with a
    clear message, and the patched lines, run against gymnasium 1.x's vector env, log the ended
    episodes' returns (SAC the first ended env's, PPO every one's) and, for SAC, store the true
    final observation (not the next episode's first)."""
    import gymnasium as gym

    cc = load_cleanrl_compare()
    patch = cc.GYMNASIUM1_PATCH[algo]
    cleanrl = tmp_path / "cleanrl"
    (cleanrl / "cleanrl").mkdir(parents=True)
    script = cleanrl / "cleanrl" / cc.FILES[algo]
    script.write_text("\n#\n".join(old for old, _ in patch))
    args = cc.Args(mode="learn", stack="ours", cleanrl_dir=str(cleanrl), out=str(tmp_path))
    cmd = cc.cleanrl_cmd(args, algo, "Hopper", 30_000, 4)
    assert cmd[0] == args.python and cmd[2:4] == ["--env-id", "Hopper-v5"]
    with open(cmd[1]) as f:
        patched = f.read()
    assert all(new in patched and old not in patched for old, new in patch)
    script.write_text("a different file")
    with pytest.raises(SystemExit) as refused:
        cc.cleanrl_for_gymnasium1(args, algo)
    assert refused.value.code == 2 and "not the CleanRL file" in capsys.readouterr().err

    def make(steps):
        return lambda: gym.wrappers.RecordEpisodeStatistics(gym.make("Pendulum-v1", max_episode_steps=steps))

    assert "autoreset_mode=gym.vector.AutoresetMode.SAME_STEP" in patch[0][1]
    lengths, steps = ((5, 5), 5) if algo == "sac" else ((6, 3), 6)  # PPO's: one env ends twice, the last step both
    envs = gym.vector.SyncVectorEnv([make(n) for n in lengths], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    logged, expected = [], []

    class Writer:
        def add_scalar(self, tag, value, step):
            logged.append((tag, float(value), step))

    envs.reset(seed=0)
    singles = [make(n)() for n in lengths]  # the same episodes without a vector env: the truth
    for i, single in enumerate(singles):
        single.reset(seed=i)
    returns = np.zeros(2)
    for global_step in range(steps):
        actions = envs.action_space.sample()
        next_obs, reward, terminations, truncations, infos = envs.step(actions)
        true_last = [single.step(action)[0] for single, action in zip(singles, actions)]
        returns += reward
        ended = np.flatnonzero(terminations | truncations)
        expected += [(lengths[i], returns[i], global_step) for i in (ended[:1] if algo == "sac" else ended)]
        if "final_info" in infos:
            namespace = {"infos": infos, "np": np, "writer": Writer(), "global_step": global_step}
            exec("for _ in [0]:\n" + patch[1][1], namespace)  # noqa: S102 (the patch)
        for i in ended:  # the vector env resets an ended env from its own generator; so do the singles
            returns[i] = 0.0
            singles[i].reset()
    assert len(expected) == (1 if algo == "sac" else 3)  # PPO: env 1 at steps 2 and 5, env 0 at 5
    lengths_logged = [(value, step) for tag, value, step in logged if tag == "charts/episodic_length"]
    returns_logged = [(value, step) for tag, value, step in logged if tag == "charts/episodic_return"]
    assert lengths_logged == [(n, step) for n, _, step in expected]
    assert returns_logged == [(pytest.approx(r, rel=1e-5), step) for _, r, step in expected]
    if algo == "sac":
        final = eval(patch[2][1] + "[0]", {"infos": infos})
        assert final == pytest.approx(true_last[0])
        assert not np.allclose(final, next_obs[0])  # next_obs holds the next episode's first
    else:  # 1.x's TransformObservation needs the space: the file's line fails there, the patched one clips
        normalized = gym.wrappers.NormalizeObservation(make(5)())
        with pytest.raises(TypeError):
            eval("gym.wrappers." + patch[2][0], {"gym": gym, "np": np, "env": normalized})
        clipped = eval("gym.wrappers." + patch[2][1], {"gym": gym, "np": np, "env": normalized})
        assert clipped.observation_space == normalized.observation_space
        assert np.array_equal(clipped.observation(np.array([20.0, -30.0, 5.0])), [10.0, -10.0, 5.0])
        obs, _ = clipped.reset(seed=0)
        assert obs.shape == (3,) and np.abs(obs).max() <= 10


def test_cleanrl_learn_stops_on_sigterm_and_resumes_ours(tmp_path, monkeypatch, capsys):
    """cleanrl_compare.py learn under `kill`: our running script gets SIGTERM and writes resume.pt, no queued run starts,
    exit 130; the same command then continues ours from its resume.pt (and runs CleanRL's afresh). A comparison that
    is not of the two variants is refused with exit 2."""
    import signal
    import threading

    cc = load_cleanrl_compare()
    monkeypatch.setattr(cc.bench, "RESULTS", str(tmp_path / "results"))
    comp = cc.bench.Comparison("t", (cc.bench.Line("sac.py", "sac_cleanrl"), cc.bench.Line("CleanRL", "cleanrl_sac_gymnasium1")),
                               envs=("HalfCheetah-v5",), steps=1_000_000, seeds=(1,))  # fmt: skip
    monkeypatch.setitem(cc.bench.COMPARISONS, "t", comp)
    total = ["1000000"]  # ours' budget, lowered for the second call

    def ours_cmd(args, algo, env_id, steps, seed):  # a small sac.py on Pendulum, in place of the -v5 task
        return [sys.executable, os.path.join(ROOT, "sac.py"), "--env", "Pendulum-v1", "--total-steps", total[0],
                "--learning-starts", "100", "--batch-size", "32", "--hidden-sizes", "32", "32", "--log-every", "50"]  # fmt: skip

    monkeypatch.setattr(cc, "ours_cmd", ours_cmd)
    monkeypatch.setattr(cc, "cleanrl_cmd", lambda *a: [sys.executable, "-c", "pass"])
    args = cc.Args("learn", algo="sac", stack="ours", comparison="t", envs=("HalfCheetah",), jobs=1, out=str(tmp_path))
    ours_dir = os.path.join(tmp_path, "runs", "sac_cleanrl", "HalfCheetah-v5", "seed1_1000000")
    theirs_dir = os.path.join(tmp_path, "runs", "cleanrl_sac_gymnasium1", "HalfCheetah-v5", "seed1_1000000")

    def kill_once_training():
        log = os.path.join(ours_dir, "run.log")
        while not os.path.exists(log) or bench.last_step(log) < 150:
            threading.Event().wait(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=kill_once_training, daemon=True).start()
    with pytest.raises(SystemExit) as stopped:
        cc.learn(args)
    assert stopped.value.code == 130 and "stopped" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before
    resume = cc.bench.resume_file(ours_dir)
    assert resume is not None and not os.path.exists(os.path.join(ours_dir, "done.json"))
    assert not os.path.exists(theirs_dir)  # queued, never started
    total[0] = "300"
    cc.learn(args)
    with open(os.path.join(ours_dir, "done.json")) as f:
        assert json.load(f)["command"][-2:] == ["--resume", resume]
    assert os.path.exists(os.path.join(theirs_dir, "done.json"))
    assert len(glob.glob(os.path.join(ours_dir, "*", "events.out.tfevents.*"))) == 2  # one run directory, resumed
    with pytest.raises(SystemExit) as refused:
        cc.learn(dataclasses.replace(args, comparison="cleanrl_ppo_same_stack"))
    assert refused.value.code == 2 and "is not a bench.py comparison" in capsys.readouterr().err


def test_sac_update_flop_count_matches_torch_flop_counter():
    """sac_update_speed.py's hand count of one update's matrix-product FLOPs (a critic step and
    an actor step) equals what torch's FlopCounterMode sees sac.py's update functions do."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = importlib.util.spec_from_file_location("sac_update_speed", os.path.join(ROOT, "benchmark", "sac_update_speed.py"))
    speed = importlib.util.module_from_spec(spec)
    sys.modules["sac_update_speed"] = speed
    spec.loader.exec_module(speed)
    sac = speed.sac
    cfg = sac.Args()
    space = sac.gym.spaces.Box(-1.0, 1.0, (speed.ACT,))
    nets = (cfg.hidden_sizes, cfg.activation, cfg.layer_norm)
    actor, critic, target = (
        sac.Actor(speed.OBS, space, *nets),
        sac.Critic(speed.OBS, speed.ACT, *nets),
        sac.Critic(speed.OBS, speed.ACT, *nets),
    )
    log_alpha = torch.tensor(0.0, requires_grad=True)
    opts = [torch.optim.Adam(p, lr=1e-3) for p in (actor.parameters(), critic.parameters())]
    rb = sac.ReplayBuffer(512, speed.OBS, speed.ACT, torch.device("cpu"))
    rb.add(obs=np.ones((512, speed.OBS)), actions=np.zeros((512, speed.ACT)),
           rewards=np.zeros(512), next_obs=np.ones((512, speed.OBS)), terminated=np.zeros(512))  # fmt: skip
    batch = rb.sample(256)
    with FlopCounterMode(display=False) as counter:
        sac.update_critic(actor, critic, target, opts[1], batch, torch.tensor(0.1), 0.99)
        sac.update_actor(actor, critic, opts[0], log_alpha, None, batch.obs, -6.0)
    assert counter.get_total_flops() == speed.flops_per_update()


def load_critic_bias():
    spec = importlib.util.spec_from_file_location("critic_bias", os.path.join(ROOT, "benchmark", "critic_bias.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["critic_bias"] = module  # tyro resolves Args' annotations through it
    spec.loader.exec_module(module)
    return module


def test_critic_bias_returns_match_a_double_sum():
    """critic_bias.py's G_t against sum_{k>=t} gamma^(k-t) r_k + sum_{k>t} gamma^(k-t) bonus_k, term by term."""
    rng = np.random.default_rng(0)
    rewards, bonus, gamma, n = rng.normal(size=7), rng.normal(size=7), 0.9, 7
    brute = [sum(gamma ** (k - t) * (rewards[k] + (bonus[k] if k > t else 0.0)) for k in range(t, n)) for t in range(n)]
    assert load_critic_bias().discounted_returns(rewards, bonus, gamma) == pytest.approx(brute, rel=1e-12)


@pytest.mark.parametrize("algo", ["mpo", "sac"])
def test_critic_bias_counts_only_steps_with_an_observed_tail(algo, tmp_path, capsys):
    """critic_bias.py end to end on a tiny run's model.pt: Pendulum-v1 truncates every episode at 200 steps; at
    gamma 0.9 the tail after 44 steps weighs under 1%, so each episode gives its first 156 steps; the bias printed is
    mean Q - mean G. A missing file, no file, or a torch file of no algorithm here: one line and exit 2."""
    module = importlib.import_module(algo)
    nets = (
        dict(policy_hidden_sizes=(16,), critic_hidden_sizes=(16,), num_critics=2)
        if algo == "mpo"
        else dict(hidden_sizes=(16,))
    )
    result = module.train(module.Args(env="Pendulum-v1", total_steps=300, learning_starts=100, batch_size=16, gamma=0.9,
                                      eval_episodes=1, log_dir=str(tmp_path), **nets))  # fmt: skip
    capsys.readouterr()
    critic_bias = load_critic_bias()
    assert critic_bias.main([os.path.join(result["run_dir"], "model.pt"), "--episodes", "2"]) == 0
    line = capsys.readouterr().out.strip().split(": ", 1)[1]
    fields = dict(field.split(" ", 1) for field in line.split(" | "))
    assert fields["length"] == "200" and fields["steps"] == str(2 * (200 - 44))
    q, g, bias = float(fields["Q"]), float(fields["G"]), float(fields["bias"].split(" ")[0])
    assert np.isfinite([q, g]).all() and bias == pytest.approx(q - g, abs=0.11)
    other = str(tmp_path / "other.pt")
    torch.save({"algo": "ppo"}, other)
    for argv in ([], [str(tmp_path / "missing.pt")], [other]):
        assert critic_bias.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1


# -- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A registered two-algorithm comparison, run once by `run tiny --jobs 2`."""
    common = ("--eval-every", "300", "--eval-episodes", "1", "--log-every", "100")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(bench.VARIANTS, "tiny_sac", bench.Variant("sac.py", (
            "--learning-starts", "100", "--batch-size", "32", "--hidden-sizes", "32", "32",
            "--buffer-size", "1000", *common)))  # fmt: skip
        mp.setitem(bench.VARIANTS, "tiny_ppo", bench.Variant("ppo.py", (
            "--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "1", *common)))  # fmt: skip
        comp = bench.Comparison(
            "tiny",
            (bench.Line("SAC", "tiny_sac"), bench.Line("PPO", "tiny_ppo"),
             bench.Line("SAC train", "tiny_sac", "charts/episodic_return")),
            envs=("Pendulum-v1",), steps=STEPS, seeds=(1, 2), wall_clock=True,
        )  # fmt: skip
        mp.setitem(bench.COMPARISONS, "tiny", comp)
        out = str(tmp_path_factory.mktemp("bench"))
        code = bench.main(["run", "tiny", "--out", out, "--jobs", "2"])
        yield out, comp, code


def runs_of(out, comp):
    return bench.plan(comp, comp.seeds, comp.envs, comp.steps, out)


def read_rows(out):
    with open(os.path.join(out, "csv", "tiny.csv")) as f:
        header = next(f).strip().split(",")
        return [dict(zip(header, row.strip().split(","))) for row in f]


def test_run_finishes_every_run(tiny):
    out, comp, code = tiny
    assert code == 0
    for run in runs_of(out, comp):
        with open(os.path.join(run.dir, "done.json")) as f:
            done = json.load(f)
        assert done["exit_status"] == 0 and done["wall_seconds"] > 0
        assert "--threads" in done["command"] and run.dir in done["command"]
        assert os.path.exists(os.path.join(run.dir, "run.log"))


def test_csv_has_every_run_with_monotone_steps(tiny):
    out, _, _ = tiny
    assert bench.main(["csv", "tiny", "--out", out]) == 0
    rows = read_rows(out)
    for variant, seed in itertools.product(("tiny_sac", "tiny_ppo"), ("1", "2")):
        mine = [r for r in rows if (r["variant"], r["seed"]) == (variant, seed)]
        for tag in ("charts/eval_return", "charts/episodic_return", "charts/SPS"):
            steps = [int(r["step"]) for r in mine if r["tag"] == tag]
            assert steps and steps == sorted(steps), (variant, seed, tag)
        walls = [float(r["wall"]) for r in mine]
        assert min(walls) == 0.0


def test_plot_writes_png_and_one_table_row_per_line(tiny, tmp_path, capsys):
    out, comp, _ = tiny
    assert bench.main(["csv", "tiny", "--out", out]) == 0
    assert bench.main(["plot", "tiny", "--out", out, "--figures", str(tmp_path)]) == 0
    png = tmp_path / "tiny.png"
    assert png.stat().st_size > 1000
    table = (tmp_path / "tiny.md").read_text()
    for line in comp.lines:
        assert sum(row.startswith(f"| {line.label} |") for row in table.splitlines()) == 1
    assert "| SAC |" in capsys.readouterr().out


def test_the_figure_of_some_envs_is_named_by_them_and_leaves_the_whole_comparisons_alone(tmp_path):
    comp = bench.Comparison(
        "two", (bench.Line("SAC", "sac"),), envs=("Pendulum-v1", "dm_control/cartpole-swingup-v0"), steps=20
    )
    steps = np.arange(0, 21, 5.0)
    data = {("sac", env, seed, "charts/eval_return"): np.stack([steps, steps, steps * seed], 1)
            for env in comp.envs for seed in (1, 2)}  # fmt: skip
    whole = bench.plot(comp, "two", data, comp.envs, None, str(tmp_path))
    assert whole == (str(tmp_path / "two.png"), str(tmp_path / "two.md"))
    before = (tmp_path / "two.png").read_bytes()
    png, md = bench.plot(comp, "two", data, ("dm_control/cartpole-swingup-v0",), None, str(tmp_path))
    assert (png, md) == (str(tmp_path / "two__cartpole-swingup-v0.png"), str(tmp_path / "two__cartpole-swingup-v0.md"))
    assert (tmp_path / "two.png").read_bytes() == before
    table = (tmp_path / "two__cartpole-swingup-v0.md").read_text()
    assert "Pendulum-v1" not in table and "cartpole-swingup-v0" in table


def test_table_gives_the_mean_over_training_with_its_interval_over_seeds(tmp_path):
    # seed s's curve is s * step on steps 0..20: its area over the range is s * 10, so the seeds' means over training
    # are 10 and 20; resampling two seeds gives 10, 15 or 20, so the 95% interval is [10, 20] around their mean 15
    comp = bench.Comparison("lin", (bench.Line("SAC", "sac"),), envs=("Pendulum-v1",), steps=20)
    steps = np.arange(0, 21, 5.0)
    data = {("sac", "Pendulum-v1", seed, "charts/eval_return"): np.stack([steps, steps, steps * seed], 1) for seed in (1, 2)}
    _, md = bench.plot(comp, "lin", data, comp.envs, None, str(tmp_path))
    with open(md) as f:
        row = next(line for line in f if line.startswith("| SAC |")).split(" | ")
    assert row[1] == "30.0 ± 10.0 [20.0, 40.0]"  # final: 20 and 40
    assert row[3] == "15.0 ± 5 [10.0, 20.0]"


def test_second_run_starts_no_process(tiny, monkeypatch):
    out, comp, _ = tiny
    mtimes = [os.path.getmtime(os.path.join(r.dir, "done.json")) for r in runs_of(out, comp)]

    def no_popen(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(bench.subprocess, "Popen", no_popen)
    assert bench.main(["run", "tiny", "--out", out]) == 0
    assert mtimes == [os.path.getmtime(os.path.join(r.dir, "done.json")) for r in runs_of(out, comp)]


def test_variants_runs_only_those_variants(tiny, monkeypatch):
    out, _, _ = tiny
    started = []
    monkeypatch.setattr(bench, "run_all", lambda runs, jobs, nice: started.extend(runs) or 0)
    assert bench.main(["run", "tiny", "--out", out, "--variants", "tiny_ppo"]) == 0
    assert sorted((r.variant, r.seed) for r in started) == [("tiny_ppo", 1), ("tiny_ppo", 2)]
    started.clear()
    assert bench.main(["run", "tiny", "--out", out]) == 0
    assert {r.variant for r in started} == {"tiny_sac", "tiny_ppo"}


def test_unfinished_run_without_resume_file_starts_over(tiny):
    out, comp, _ = tiny
    run = next(r for r in runs_of(out, comp) if (r.variant, r.seed) == ("tiny_ppo", 2))
    os.remove(os.path.join(run.dir, "done.json"))
    os.remove(run.record)
    for path in glob.glob(os.path.join(run.dir, "*", "resume.pt")):
        os.remove(path)
    open(os.path.join(run.dir, "stale"), "w").close()
    assert bench.main(["run", "tiny", "--out", out]) == 0
    assert not os.path.exists(os.path.join(run.dir, "stale"))  # the directory was cleared
    with open(os.path.join(run.dir, "done.json")) as f:
        assert "--resume" not in json.load(f)["command"]
    assert len(glob.glob(os.path.join(run.dir, "*", "events.out.tfevents*"))) == 1


def test_interrupted_run_is_resumed_and_its_csv_has_no_duplicate_steps(tiny):
    """The run stops at step 200 with a resume.pt; a third events file stands for the part
    logged after the checkpoint and lost (value -999 at the final step): it must be dropped."""
    from torch.utils.tensorboard import SummaryWriter

    out, comp, _ = tiny
    run = next(r for r in runs_of(out, comp) if (r.variant, r.seed) == ("tiny_sac", 1))
    subprocess.run(["rm", "-rf", run.dir, run.record], check=True)
    os.makedirs(run.dir)
    cmd = list(run.cmd)
    cmd[cmd.index("--total-steps") + 1] = "200"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run(cmd, cwd=run.dir, env=env, check=True, capture_output=True)
    (sub,) = bench.script_dirs(run.dir)
    assert os.path.exists(os.path.join(sub, "resume.pt"))
    writer = SummaryWriter(sub)
    for tag in ("charts/eval_return", "charts/episodic_return", "charts/SPS"):
        writer.add_scalar(tag, -999.0, STEPS)
    writer.close()

    assert bench.main(["run", "tiny", "--out", out]) == 0
    with open(os.path.join(run.dir, "done.json")) as f:
        command = json.load(f)["command"]
    assert command[-2:] == ["--resume", os.path.join(sub, "resume.pt")]
    assert bench.script_dirs(run.dir) == [sub]  # the same run directory, a third events file
    assert len(glob.glob(os.path.join(sub, "events.out.tfevents*"))) == 3

    assert bench.main(["csv", "tiny", "--out", out]) == 0
    mine = [r for r in read_rows(out) if (r["variant"], r["seed"]) == ("tiny_sac", "1")]
    assert all(float(r["value"]) != -999.0 for r in mine)
    for tag in {r["tag"] for r in mine}:
        steps = [int(r["step"]) for r in mine if r["tag"] == tag]
        assert steps == sorted(set(steps)), tag  # strictly increasing: no step twice
    eval_steps = [int(r["step"]) for r in mine if r["tag"] == "charts/eval_return"]
    assert eval_steps[0] <= 200 and eval_steps[-1] == STEPS  # both parts are there


def test_a_run_lost_with_its_machine_is_read_from_its_record_and_not_run_again(tiny, monkeypatch, tmp_path, capsys):
    """Each finished run leaves a record (tag,step,wall,value of its charts/ scalars) under RESULTS. With the run
    directories gone, `run` starts nothing, `list` says recorded, and `csv` gives the rows it gave from the events."""
    out, comp, _ = tiny
    runs = runs_of(out, comp)
    assert bench.main(["csv", "tiny", "--out", out]) == 0
    before = read_rows(out)
    for run in runs:  # the record holds every charts/ event of the run, as the events files do
        with open(run.record) as f:
            assert next(f) == "tag,step,wall,value\n"
            recorded = [line.rstrip("\n").split(",") for line in f]
        events = bench.run_scalars(run)
        assert {tag for tag, *_ in recorded} == {tag for tag in events if tag.startswith("charts/")}
        for tag, step, wall, value in recorded:
            assert (int(step), float(value)) in [(s, v) for s, _, v in events[tag]]
    moved = tmp_path / "machine_lost"
    os.rename(os.path.join(out, "runs"), moved)
    try:

        def no_popen(*args, **kwargs):
            raise AssertionError("a recorded run was started again")

        monkeypatch.setattr(bench.subprocess, "Popen", no_popen)
        assert bench.main(["run", "tiny", "--out", out]) == 0
        assert "4 runs: 4 done, 0 to run" in capsys.readouterr().out
        bench.list_comparisons(out)
        assert f"recorded tiny_ppo/Pendulum-v1/seed2 {STEPS} steps" in capsys.readouterr().out
        os.remove(os.path.join(out, "csv", "tiny.csv"))
        assert bench.main(["csv", "tiny", "--out", out]) == 0
        assert read_rows(out) == before
        os.remove(runs[0].record)  # neither a run directory nor a record: not finished
        with pytest.raises(AssertionError, match="started again"):
            bench.main(["run", "tiny", "--out", out, "--jobs", "1"])
    finally:
        shutil.rmtree(os.path.join(out, "runs"), ignore_errors=True)
        os.rename(moved, os.path.join(out, "runs"))
        bench.write_record(runs[0])


def test_failed_run_is_reported_and_the_command_exits_nonzero(tiny, monkeypatch, capsys):
    """A broken variant fails (tyro rejects its flag); the finished tiny_sac run it shares with
    the tiny comparison is not started again, and the failure's log tail is printed."""
    out, _, _ = tiny
    monkeypatch.setitem(bench.VARIANTS, "broken", bench.Variant("sac.py", ("--no-such-flag",)))
    both = bench.Comparison(
        "fails",
        (bench.Line("SAC", "tiny_sac"), bench.Line("broken", "broken")),
        envs=("Pendulum-v1",),
        steps=STEPS,
        seeds=(1,),
    )
    monkeypatch.setitem(bench.COMPARISONS, "fails", both)
    assert bench.main(["run", "fails", "--out", out]) == 1
    printed = capsys.readouterr().out
    assert "2 runs: 1 done, 1 to run" in printed
    assert "FAILED  broken/Pendulum-v1/seed1 (exit 2)" in printed and "no-such-flag" in printed
    (broken,) = [r for r in bench.plan(both, (1,), both.envs, STEPS, out) if r.variant == "broken"]
    assert not os.path.exists(os.path.join(broken.dir, "done.json"))


def test_same_metrics_reads_every_scalar_once_and_names_the_first_difference(tmp_path):
    """benchmark/same_metrics.py: a point logged twice at the same step with the same value counts once, timing
    tags are skipped, and a changed value is reported at its index."""
    from torch.utils.tensorboard import SummaryWriter

    spec = importlib.util.spec_from_file_location("same_metrics", os.path.join(ROOT, "benchmark", "same_metrics.py"))
    same = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(same)
    writer = SummaryWriter(str(tmp_path))
    for step, value in [(1, 0.5), (2, 1.5), (2, 1.5), (3, 2.5)]:
        writer.add_scalar("charts/eval_return", value, step)
    writer.add_scalar("charts/SPS", 123.0, 1)
    writer.close()
    read = same.scalars(str(tmp_path))
    assert read == {"charts/eval_return": [(1, 0.5), (2, 1.5), (3, 2.5)]}
    assert same.differences(read, read) == []
    changed = {"charts/eval_return": [(1, 0.5), (2, 1.25), (3, 2.5)]}
    (line,) = same.differences(read, changed)
    assert line.startswith("charts/eval_return: point 1: [(2, 1.5)] against [(2, 1.25)]")


def test_a_comparison_runs_on_a_control_suite_task(tmp_path, monkeypatch):
    """bench.py runs, reads and plots a `dm_control/...` env: the id's slash makes nested run directories."""
    monkeypatch.setitem(bench.VARIANTS, "tiny_sac", bench.Variant("sac.py", (
        "--learning-starts", "1000", "--batch-size", "16", "--hidden-sizes", "16", "--eval-every", "1000",
        "--eval-episodes", "1", "--log-every", "500")))  # fmt: skip
    env = "dm_control/cartpole-swingup-v0"
    comp = bench.Comparison("tiny_suite", (bench.Line("SAC", "tiny_sac"),), envs=(env,), steps=1100, seeds=(1,))
    monkeypatch.setitem(bench.COMPARISONS, "tiny_suite", comp)
    out = str(tmp_path / "bench")
    assert bench.main(["run", "tiny_suite", "--out", out]) == 0
    assert bench.main(["csv", "tiny_suite", "--out", out]) == 0
    with open(os.path.join(out, "csv", "tiny_suite.csv")) as f:
        rows = [line.strip().split(",") for line in f][1:]
    returns = [row for row in rows if row[3] == "charts/episodic_return"]
    assert len(returns) == 1 and returns[0][1] == env and int(returns[0][4]) == 1000  # the one 1000-step episode
    assert bench.main(["plot", "tiny_suite", "--out", out, "--figures", str(tmp_path)]) == 0
    assert (tmp_path / "tiny_suite.png").stat().st_size > 1000


def test_a_comparison_plotted_against_trpo_iterations(tmp_path, monkeypatch):
    """trpo.py's two estimators with different batches (64 and 32 steps) for 256 steps: against charts/iteration the table
    ends at 256 / 64 = 4 and 256 / 32 = 8 iterations, against the step at 256 for both."""
    common = ("--eval-every", "128", "--eval-episodes", "1", "--hidden-sizes", "8")
    monkeypatch.setitem(bench.VARIANTS, "tiny_single", bench.Variant("trpo.py", ("--num-steps", "64", *common)))
    vine = ("--estimator", "vine", "--num-steps", "32", "--vine-states", "4", "--vine-rollout-length", "5", *common)
    monkeypatch.setitem(bench.VARIANTS, "tiny_vine", bench.Variant("trpo.py", vine))
    lines = (bench.Line("single path", "tiny_single"), bench.Line("vine", "tiny_vine"))
    per_step = bench.Comparison("tiny_trpo", lines, envs=("Pendulum-v1",), steps=256, seeds=(1,))
    per_iteration = dataclasses.replace(per_step, x_tag="charts/iteration", x_label="iterations")
    out, figures = str(tmp_path / "out"), tmp_path / "figures"
    for name, comp in (("tiny_trpo", per_step), ("tiny_trpo_iter", per_iteration)):
        monkeypatch.setitem(bench.COMPARISONS, name, comp)
        assert bench.main(["run", name, "--out", out]) == bench.main(["csv", name, "--out", out]) == 0
        assert bench.main(["plot", name, "--out", out, "--figures", str(figures)]) == 0
    tables = {name: (figures / f"{name}.md").read_text() for name in ("tiny_trpo", "tiny_trpo_iter")}
    last = {
        name: [row.split(" | ")[2] for row in text.splitlines() if row.startswith("| ")][2:] for name, text in tables.items()
    }
    assert last == {"tiny_trpo": ["256", "256"], "tiny_trpo_iter": ["4", "8"]}
    assert "| iterations/s, 2nd half |" in tables["tiny_trpo_iter"]


def test_sigterm_stops_the_runner_and_its_runs_with_resume_files(tmp_path, monkeypatch, capsys):
    """`kill` of a runner in the background (where SIGINT is ignored): the running script gets SIGTERM, writes resume.pt
    and stops; no queued run starts; `run` exits 130 with one line, and the same command would continue the run."""
    import signal
    import threading

    monkeypatch.setitem(bench.VARIANTS, "long_sac", bench.Variant("sac.py", (
        "--learning-starts", "100", "--batch-size", "32", "--hidden-sizes", "32", "32", "--log-every", "50")))  # fmt: skip
    comp = bench.Comparison("long", (bench.Line("SAC", "long_sac"),), envs=("Pendulum-v1",), steps=1_000_000, seeds=(1, 2))
    monkeypatch.setitem(bench.COMPARISONS, "long", comp)
    out = str(tmp_path)
    first, second = runs_of(out, comp)

    def kill_once_training():  # SIGTERM to this process once the first run has printed a step past learning_starts
        log = os.path.join(first.dir, "run.log")
        while not os.path.exists(log) or bench.last_step(log) < 150:
            threading.Event().wait(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=kill_once_training, daemon=True).start()
    assert bench.main(["run", "long", "--out", out, "--jobs", "1"]) == 130
    assert "stopped" in capsys.readouterr().err
    assert bench.resume_file(first.dir) is not None and not bench.is_done(first)
    assert not os.path.exists(second.dir)  # queued, never started
    assert signal.getsignal(signal.SIGTERM) == before  # the runner's handler is gone
