"""Every bad input is one line `error: ...` on stderr and exit status 2, never a traceback: the shared
arguments in all seven files, then each algorithm's own (BAD_INPUTS below lists them all)."""

import importlib
import os

import pytest
import torch

FILES = ["sac", "ppo", "mpo", "treepi", "trpo", "dpi_ilqr", "cpi_garnet"]
SHARED = [
    ["--total-steps", "0"],
    ["--num-envs", "0"],
    ["--eval-episodes", "0"],
    ["--eval-every", "-1"],
    ["--log-every", "0"],
    ["--threads", "0"],
    ["--eval-only"],
    ["--resume", "a.pt", "--checkpoint", "b.pt"],
    ["--checkpoint", "{tmp}/missing.pt", "--eval-only"],
    ["--checkpoint", "{tmp}/notes.pt", "--eval-only"],  # a text file, not a checkpoint
    ["--resume", "{tmp}/notes.pt"],
    ["--log-dir", "{tmp}/notes.pt"],  # a file, not a directory
    ["--total-steps", "abc"],  # tyro's own errors (a wrong type, an unknown flag) come as one line too
    ["--no-such-flag"],
]
SHARED_ENV = [
    ["--env", "NoSuchEnv-v0"],
    ["--env", "dm_control/cartpole-swingup-v9"],
    ["--env", "dm_control/compatibility-env-v0"],  # shimmy's generic id: its constructor needs an env object
    ["--env", "no_such_module_here:Thing-v0"],
    ["--env", "HalfCheetah-v9"],
]
ALGORITHM = {
    "sac": [
        ["--env", "CartPole-v1"],
        ["--batch-size", "512", "--buffer-size", "256"],
        ["--tau", "0"],
        ["--gamma", "1.5"],
        ["--hidden-sizes", "0"],
        ["--learning-starts", "-1"],
        ["--q-lr", "0"],
        ["--policy-frequency", "0"],
    ],
    "ppo": [
        ["--num-minibatches", "1000", "--num-steps", "8"],
        ["--gae-lambda", "1.5"],
        ["--clip-coef", "0"],
        ["--target-kl", "0"],
        ["--update-epochs", "0"],
        ["--env", "Pendulum-v1", "--hidden-sizes", "-1"],
    ],
    "mpo": [
        ["--epsilon", "0"],
        ["--num-samples", "0"],
        ["--retrace-lambda", "2"],
        ["--buffer-size", "2", "--retrace-steps", "5"],
        ["--critic-hidden-sizes", "0"],
        ["--dual-lr", "-1"],
    ],
    "treepi": [
        ["--env", "Pendulum-v1", "--model", "true"],  # the true model needs a MuJoCo env
        ["--env", "Ant-v4", "--model", "true"],  # exact replay is tested on the v5 envs only
        ["--env", "dm_control/quadruped-escape-v0", "--model", "true"],  # a terrain per episode: too large to carry
        ["--temperature", "0"],
        ["--depth", "0"],
        ["--model-sizes", "16"],
        ["--search-states", "-1"],
        ["--buffer-size", "2", "--snippet-length", "5"],
        ["--e-step", "mpo", "--epsilon", "0"],
        ["--eta-init", "-1"],
        ["--reward-scale", "0"],
        ["--bootstrap-state", "predicted"],  # not one of tyro's choices
    ],
    "trpo": [
        ["--estimator", "vine", "--vine-actions", "1"],
        ["--estimator", "vine", "--vine-states", "100000"],
        ["--delta", "0"],
        ["--fisher-fraction", "1.5"],
        ["--backtrack-coef", "1"],
        ["--value-minibatches", "0"],
        ["--env", "dm_control/quadruped-escape-v0", "--estimator", "vine"],  # a terrain per episode: not restorable
        ["--eval-horizon", "-1"],
        ["--robust", "--estimator", "vine"],  # the branches restore states in one unperturbed simulator
        ["--robust", "--env", "Pendulum-v1"],  # no MuJoCo model to perturb
        ["--env", "dm_control/cartpole-swingup-v0", "--robust"],  # the variants perturb gymnasium's models
        ["--robust", "--robust-train-variants", "0"],
        ["--robust-length-range", "0", "1"],
    ],
    "dpi_ilqr": [
        ["--env", "Walker2d-v5"],  # no known cost
        ["--env", "dm_control/walker-run-v0"],  # no known cost
        ["--env", "dm_control/cartpole-swingup-v0", "--robust"],  # the variants perturb gymnasium's models
        ["--episodes", "1"],
        ["--kl-tolerance", "1"],
        ["--robust", "--robust-test-variants", "0"],
        ["--robust-mass-range", "2", "1"],
        ["--prior-strength", "-1"],
    ],
    "cpi_garnet": [
        ["--env", "Hopper-v5"],
        ["--num-envs", "2"],
        ["--capture-video"],
        ["--branching", "0"],
        ["--gamma", "1"],
        ["--beta", "0"],
        ["--num-states", "1"],
        ["--algorithms", "cpi", "cpi"],  # a curve twice
        ["--algorithms"],  # no curve
    ],
}
BAD_INPUTS = [(f, argv) for f in FILES for argv in SHARED + (SHARED_ENV if f != "cpi_garnet" else [])]
BAD_INPUTS += [(f, argv) for f, inputs in ALGORITHM.items() for argv in inputs]


def test_at_least_forty_bad_inputs_across_the_seven_files():
    assert len(BAD_INPUTS) >= 40 and {f for f, _ in BAD_INPUTS} == set(FILES)


@pytest.mark.parametrize(("name", "argv"), BAD_INPUTS, ids=[f"{f}:{' '.join(a)}" for f, a in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(name, argv, tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    module = importlib.import_module(name)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--log-dir" not in argv:
        argv += ["--log-dir", str(tmp_path / "runs")]
    code = module.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs")  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="--cuda is valid where torch sees a GPU")
@pytest.mark.parametrize("name", FILES)
def test_cuda_without_a_gpu_is_one_line(name, tmp_path, capsys):
    code = importlib.import_module(name).main(["--cuda", "--log-dir", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "CUDA" in lines[0]
