"""The install the README's first command makes is light (issue 25): the package's own dependencies are what training
and generation need on a CPU; the test-only and GPU-kernel packages come with the `test` (or their own) extra."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"triton", "transformers", "pytest", "scikit-learn", "tokenizers", "matplotlib"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_core_dependencies_are_light():
    names = {_name(r) for r in _project()["dependencies"]}
    assert names == {"torch", "numpy", "safetensors", "tqdm"}, names
    assert not names & HEAVY


def test_the_test_extra_brings_the_test_and_kernel_packages():
    extras = _project()["optional-dependencies"]
    assert {_name(r) for r in extras["test"]} >= {"pytest", "triton", "transformers", "tokenizers", "matplotlib"}
    assert {_name(r) for r in extras["plot"]} == {"matplotlib"}


def test_the_readmes_first_command_installs_no_test_extra():
    text = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    train = [line for line in first if "mambakit train" in line]
    assert len(train) == 1 and "[test]" not in train[0] and ".[plot]" in train[0], first
    assert any("[test]" in line and "pytest" in line for line in first), first


def test_the_folders_the_commands_write_are_ignored():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "runs/" in ignored and "explain/" in ignored
