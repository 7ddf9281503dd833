"""The course stays uniform: every notebook is committed executed, titled, badged, timed and listed."""
import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REPO_URL = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _source(cell):
    return "".join(cell["source"])


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_was_executed_in_order_without_errors(path):
    code = [c for c in _cells(path) if c["cell_type"] == "code" and _source(c).strip()]
    counts = [c.get("execution_count") for c in code]
    assert None not in counts, f"{path.name}: {counts.count(None)} code cells were never executed"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), f"{path.name}: run it top to bottom"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: a committed output is an error"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_title_cell_has_title_badge_and_run_time(path):
    first = _cells(path)[0]
    text = _source(first)
    number = path.name[:2]
    assert first["cell_type"] == "markdown"
    assert re.match(rf"# {number} · \S", text), f"{path.name}: title must start with '# {number} · '"
    badge = f"https://colab.research.google.com/github/{REPO_URL.split('github.com/')[1]}/blob/main/notebooks/{path.name}"
    assert f"]({badge})" in text, f"{path.name}: the Colab badge must link to {badge}"
    assert "colab-badge.svg" in text
    assert "**You will learn:**" in text and re.search(r"\*\*Runs in:\*\* about \d+ minutes?", text)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_ends_with_exercises(path):
    headings = [line for c in _cells(path) if c["cell_type"] == "markdown"
                for line in _source(c).splitlines() if line.startswith("#")]
    assert any("Exercises" in h for h in headings[-3:]), f"{path.name}: an 'Exercises' section comes last"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_checks_its_claims_and_installs_only_on_colab(path):
    code = "\n".join(_source(c) for c in _cells(path) if c["cell_type"] == "code")
    assert "assert " in code, f"{path.name}: claims must be asserted"
    assert '"google.colab" in sys.modules' in code, f"{path.name}: the setup cell installs percnb on Colab only"
    assert "manual_seed" in code, f"{path.name}: seeds are fixed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_readme_lists_the_notebook(path):
    assert f"notebooks/{path.name}" in (ROOT / "README.md").read_text(), f"README does not list {path.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_widgets_carry_their_state_for_static_viewers(path):
    """A widget output shows in a static viewer (GitHub, nbviewer) only if its state was saved."""
    nb = json.loads(path.read_text())
    views = [o["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
             for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    if not views:
        return
    state = nb["metadata"].get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    missing = [v for v in views if v not in state]
    assert not missing, f"{path.name}: execute with --ExecutePreprocessor.store_widget_state=True ({missing})"
