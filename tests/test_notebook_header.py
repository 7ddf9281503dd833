"""Every notebook's setup cell is the one `python -m percnb.notebook_header` writes from pyproject.toml
(so its version pin is the package's), and that cell does the right thing on Colab, on Kaggle and
elsewhere. Colab and Kaggle are simulated (a fake google.colab module, a fake pip): no network."""
import json
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest

import percnb
from percnb import notebook_header

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def run_setup_cell(monkeypatch, colab: bool = False, kaggle: bool = False) -> dict:
    """Execute the setup cell with pip replaced by a recorder; returns what it did."""
    did = {"pip": [], "widget_manager": 0}

    def fake_run(command, check=False, **kwargs):
        did["pip"].append(list(command))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    if colab:
        output = types.SimpleNamespace(enable_custom_widget_manager=lambda: did.__setitem__(
            "widget_manager", did["widget_manager"] + 1))
        google = types.ModuleType("google")
        colab_module = types.ModuleType("google.colab")
        colab_module.output = output
        google.colab = colab_module
        monkeypatch.setitem(sys.modules, "google", google)
        monkeypatch.setitem(sys.modules, "google.colab", colab_module)
    if kaggle:
        monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    exec(compile(notebook_header.expected_source(ROOT), "setup cell", "exec"), {})
    return did


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_starts_with_the_generated_setup_cell(path):
    notebook = json.loads(path.read_text())
    assert notebook_header.problems(notebook, notebook_header.expected_source(ROOT, notebook)) == []


def test_a_notebook_that_imports_the_hub_installs_the_hub_extra():
    needs = {p.name: notebook_header.extras_needed(json.loads(p.read_text())) for p in NOTEBOOKS}
    assert needs["07_pretrained_perceiver.ipynb"] == ("hub",)
    assert all(extras == () for name, extras in needs.items() if name != "07_pretrained_perceiver.ipynb")
    assert set(notebook_header.EXTRA_IMPORTS) <= set(PROJECT["optional-dependencies"])
    spec = notebook_header.install_spec(PROJECT["version"], PROJECT["urls"]["Repository"], ("hub",))
    assert spec == f"percnb[hub] @ git+{PROJECT['urls']['Repository']}@v{PROJECT['version']}"
    setup = json.loads(NOTEBOOKS[-1].read_text())
    assert json.dumps(spec) in "".join(next(c for c in setup["cells"] if c["cell_type"] == "code")["source"])


@pytest.mark.parametrize("line, extras", [
    ("import transformers", ("hub",)), ("from transformers import PerceiverConfig", ("hub",)),
    ("from percnb import hub", ("hub",)), ("from percnb import assets, hub", ("hub",)),
    ("import percnb.hub as h", ("hub",)), ("from percnb.models import Perceiver", ()),
    ("# transformers is not needed here", ()), ("import transformers_lite", ()),
])
def test_extras_are_read_from_the_imports(line, extras):
    notebook = {"cells": [{"cell_type": "markdown", "source": ["import transformers"]},
                          {"cell_type": "code", "source": [line]}]}
    assert notebook_header.extras_needed(notebook) == extras


def test_the_pin_is_pyprojects_version_and_repository():
    spec = notebook_header.install_spec(PROJECT["version"], PROJECT["urls"]["Repository"])
    assert spec == f"percnb @ git+{PROJECT['urls']['Repository']}@v{PROJECT['version']}"
    assert json.dumps(spec) in notebook_header.expected_source(ROOT)
    assert percnb.__version__ == PROJECT["version"]


def test_on_colab_the_cell_installs_this_version_keeping_torch_and_enables_widgets(monkeypatch):
    did = run_setup_cell(monkeypatch, colab=True)
    spec = notebook_header.install_spec(PROJECT["version"], PROJECT["urls"]["Repository"])
    assert did["pip"] == [[sys.executable, "-m", "pip", "install", "-q", spec]]
    # no --upgrade/-U and no torch requirement: pip keeps a preinstalled torch that satisfies percnb's
    assert not any(a in ("-U", "--upgrade", "--force-reinstall") or a.startswith("torch") for a in did["pip"][0])
    assert did["widget_manager"] == 1


def test_on_kaggle_the_cell_installs_without_colabs_widget_manager(monkeypatch):
    did = run_setup_cell(monkeypatch, kaggle=True)
    assert len(did["pip"]) == 1 and did["widget_manager"] == 0


def test_elsewhere_the_cell_does_nothing(monkeypatch):
    did = run_setup_cell(monkeypatch)
    assert did == {"pip": [], "widget_manager": 0}
    assert "google.colab" not in sys.modules


def test_the_tool_inserts_the_cell_once_and_replaces_it_in_place(tmp_path):
    notebook = {"cells": [{"cell_type": "markdown", "id": "t", "metadata": {}, "source": ["# title"]},
                          {"cell_type": "code", "id": "c", "metadata": {}, "outputs": [], "execution_count": None,
                           "source": ["import torch"]}],
                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "01_x.ipynb"
    path.write_text(json.dumps(notebook))
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    assert notebook_header.main(["--root", str(tmp_path), str(path)]) == 0
    first = path.read_text()
    assert notebook_header.main(["--root", str(tmp_path), str(path)]) == 0
    assert path.read_text() == first                                   # idempotent
    cells = json.loads(first)["cells"]
    assert [c["id"] for c in cells] == ["t", notebook_header.CELL_ID, "c"]
    assert notebook_header.main(["--root", str(tmp_path), "--check", str(path)]) == 0


def test_check_refuses_a_stale_pin_and_a_second_colab_install(tmp_path, capsys):
    stale = notebook_header.setup_cell_source("0.0.1", PROJECT["urls"]["Repository"])
    legacy = 'if "google.colab" in sys.modules:\n    !pip install -q git+https://github.com/percnb/percnb'
    notebook = {"cells": [{"cell_type": "code", "id": "s", "metadata": {}, "outputs": [], "execution_count": None,
                           "source": stale.splitlines(True)},
                          {"cell_type": "code", "id": "old", "metadata": {}, "outputs": [], "execution_count": None,
                           "source": legacy.splitlines(True)}],
                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "02_x.ipynb"
    path.write_text(json.dumps(notebook))
    assert notebook_header.main(["--root", str(ROOT), "--check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "first code cell is not the setup cell" in out and "cell 'old' installs packages too" in out


def test_check_lets_a_later_cell_ask_whether_it_runs_on_colab(tmp_path):
    setup = notebook_header.setup_cell_source(PROJECT["version"], PROJECT["urls"]["Repository"])
    asks = 'ONLINE = "google.colab" in sys.modules'
    notebook = {"cells": [{"cell_type": "code", "id": "s", "metadata": {}, "outputs": [], "execution_count": None,
                           "source": setup.splitlines(True)},
                          {"cell_type": "code", "id": "asks", "metadata": {}, "outputs": [], "execution_count": None,
                           "source": [asks]}],
                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "07_x.ipynb"
    path.write_text(json.dumps(notebook))
    assert notebook_header.main(["--root", str(ROOT), "--check", str(path)]) == 0


def test_an_interrupted_write_leaves_the_notebook_as_it_was(tmp_path, monkeypatch):
    notebook = {"cells": [{"cell_type": "code", "id": "c", "metadata": {}, "outputs": [], "execution_count": None,
                           "source": ["import torch"]}], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "01_x.ipynb"
    path.write_text(json.dumps(notebook))
    before = path.read_bytes()
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())

    def interrupted(f):
        f.write(b'{"cells": [')                                 # half a notebook, then Ctrl-C
        raise KeyboardInterrupt

    real = notebook_header.atomic_write
    monkeypatch.setattr(notebook_header, "atomic_write", lambda p, write_fn: real(p, interrupted))
    with pytest.raises(KeyboardInterrupt):
        notebook_header.main(["--root", str(tmp_path), str(path)])
    assert path.read_bytes() == before                                   # the notebook as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01_x.ipynb", "pyproject.toml"]   # no temporary left
