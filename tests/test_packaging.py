"""The two dependency lists (pyproject for pip, environment.yml for conda/Colab) must agree."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _normalise(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).lower().replace("_", "-")


def _environment_pip_list() -> list:
    # A tiny reader for our own flat file: the entries under "- pip:" are "      - name>=x".
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    entries = []
    for line in lines[start + 1:]:
        match = re.match(r"^\s{4,}- (.+)$", line)
        if not match:
            break
        entries.append(match.group(1).split("#")[0].strip())
    return entries


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # the course's environment: notebook 07 needs the hub extra (transformers)
    expected = project["dependencies"] + extras["dev"] + extras["hub"]
    listed = [e for e in _environment_pip_list() if e != "-e ."]
    assert sorted(map(_normalise, listed)) == sorted(map(_normalise, expected))


def test_environment_yml_installs_percnb_and_python_311():
    text = (ROOT / "environment.yml").read_text()
    assert "name: percnb" in text and "python=3.11" in text and "- -e ." in text


def test_constraints_pin_an_importable_torch_torchvision_pair():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    import torch
    import torchvision
    assert torch.__version__.split("+")[0] == pins["torch"]
    assert torchvision.__version__.split("+")[0] == pins["torchvision"]


def test_ci_runs_exactly_make_test():
    script = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in script.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert "set -euo pipefail" in commands and commands[-1] == "make test"


def test_make_installs_the_extras_the_course_and_its_tests_need():
    # notebook 07 and tests/test_hub.py import transformers (the hub extra); the site needs docs
    makefile = (ROOT / "Makefile").read_text()
    installs = re.search(r'pip install .*-e "\.\[([a-z,]+)\]"', makefile)
    assert installs, "the Makefile's setup no longer installs percnb editable with extras"
    assert set(installs.group(1).split(",")) >= {"dev", "docs", "hub"}


def test_the_hang_guards_are_armed():
    # tests/reliability marks its process tests with @pytest.mark.timeout: only pytest-timeout enforces it
    import importlib.util
    assert importlib.util.find_spec("pytest_timeout") is not None, "pytest-timeout (the dev extra) is missing"
