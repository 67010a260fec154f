"""The files diff cleanly: what sac.py defines for every algorithm file is byte-identical in
every other file that defines it (STYLE.md section 1), so `diff mpo.py treepi.py` shows only
the algorithms. Deliberate differences are listed in EXCEPTIONS with their reason."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["ppo.py", "mpo.py", "treepi.py", "trpo.py", "dpi_ilqr.py", "cpi_garnet.py"]
SHARED = [
    "UsageError",
    "make_env",
    "make_vec_env",
    "make_eval_env",
    "EpisodeStats",
    "mlp",
    "evaluate",
    "save_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "seed_everything",
    "open_run",
    "saved_args",
    "Progress",
    "agent_state",
    "load_agent_state",
    "parse_args",
    "main",
]
EXCEPTIONS = {
    # a tabular experiment: float metrics, one line per MDP and algorithm (see its comment)
    ("cpi_garnet.py", "Progress")
}


def source(path: str) -> str:
    with open(path) as f:
        return f.read()


def definitions(text: str) -> dict[str, str]:
    """Top-level function and class definitions by name, as source text."""
    tree = ast.parse(text)
    return {
        node.name: ast.get_source_segment(text, node)
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef))
    }


def shared_args_block(text: str) -> str:
    """The shared half of Args, with the two defaults that may differ (env, total_steps) blanked."""
    block = re.search(r"# -- shared.*?\n(.*?)    # -- algorithm", text, re.DOTALL).group(1)
    block = re.sub(r"(\n    env: str = ).*", r"\1...", "\n" + block)
    return re.sub(r"(\n    total_steps: int = ).*", r"\1...", block)


def shared_check_args(text: str) -> str:
    return re.search(r"(def check_args\(.*?)    # -- algorithm", text, re.DOTALL).group(1)


def present() -> list[str]:
    return [f for f in FILES if os.path.exists(os.path.join(ROOT, f))]


@pytest.mark.parametrize("name", present())
def test_shared_definitions_are_identical_to_sac(name):
    reference = definitions(source(os.path.join(ROOT, "sac.py")))
    mine = definitions(source(os.path.join(ROOT, name)))
    differ = [
        shared
        for shared in SHARED
        if shared in mine and (name, shared) not in EXCEPTIONS and mine[shared] != reference[shared]
    ]
    assert not differ, f"{name} differs from sac.py in {differ}"


@pytest.mark.parametrize("name", present())
def test_shared_arguments_and_checks_are_identical_to_sac(name):
    reference, mine = source(os.path.join(ROOT, "sac.py")), source(os.path.join(ROOT, name))
    assert shared_args_block(mine) == shared_args_block(reference)
    assert shared_check_args(mine) == shared_check_args(reference)


@pytest.mark.parametrize("name", ["sac.py", *present()])
def test_sections_are_numbered_in_order(name):
    banners = re.findall(r"^# == (\d+)\. ", source(os.path.join(ROOT, name)), re.MULTILINE)
    assert [int(b) for b in banners] == list(range(1, 12))


@pytest.mark.parametrize("name", ["sac.py", *present()])
def test_no_script_imports_another(name):
    tree = ast.parse(source(os.path.join(ROOT, name)))
    modules = {os.path.splitext(f)[0] for f in ["sac.py", *FILES]}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & modules
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in modules
