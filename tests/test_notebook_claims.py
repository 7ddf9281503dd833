"""The course's asserts test claims: none checks only constants, none checks wall-clock time; every exercise
has a hidden solution (code solutions run with the notebook); every notebook has a summary, references and
links to its neighbours."""
import ast
import builtins
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
BUILTINS = set(dir(builtins)) | {"math", "np", "torch"}
WALL_CLOCK = re.compile(r"(^|_)(seconds?|secs?|times?|elapsed|duration|perf_counter|wall|ms)($|_)", re.I)
EXERCISE = re.compile(r"^(\d+)\. ", re.M)


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _source(cell):
    return "".join(cell["source"])


def _asserts(path):
    """(cell index, assert node, source) for every assert in the notebook's code cells."""
    for index, cell in enumerate(_cells(path)):
        if cell["cell_type"] != "code":
            continue
        # shell escapes and magics are not Python: blank them, keeping the line numbers
        text = "\n".join(line[:len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("!", "%"))
                         else line for line in _source(cell).splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Assert):
                yield index, node, ast.get_source_segment(text, node)


def only_constants(node: ast.Assert) -> bool:
    """True when the assert's test reads no variable: only literals and builtins like abs()."""
    names = {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
    return not (names - BUILTINS)


def reads_the_clock(node: ast.Assert) -> bool:
    """True when the assert's test names a time measurement (a variable, attribute or key about seconds)."""
    words = [n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)]
    words += [n.attr for n in ast.walk(node.test) if isinstance(n, ast.Attribute)]
    words += [w for n in ast.walk(node.test) if isinstance(n, ast.Constant) and isinstance(n.value, str)
              for w in re.split(r"\W+", n.value)]
    return any(WALL_CLOCK.search(w) for w in words if w)


def test_the_scanner_tells_claims_from_constants_and_clocks():
    def parse(text):
        return ast.parse(text).body[0]
    assert only_constants(parse("assert abs(2 * 8 / (8 + 1) - 1.78) < 0.01"))
    assert not only_constants(parse("assert acc > 0.9"))
    assert reads_the_clock(parse("assert seconds[128] > 1.3 * seconds[8]"))
    assert reads_the_clock(parse("assert history.seconds < 60"))
    assert reads_the_clock(parse('assert slope["seconds (fused)"] < 2'))
    assert not reads_the_clock(parse("assert step_flops[128] > 1.3 * step_flops[8]"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_assert_checks_only_constants(path):
    bad = [f"cell {i}: {text}" for i, node, text in _asserts(path) if only_constants(node)]
    assert not bad, f"{path.name}: asserts that cannot fail (they read no result):\n" + "\n".join(bad)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_assert_on_wall_clock_time(path):
    bad = [f"cell {i}: {text}" for i, node, text in _asserts(path) if reads_the_clock(node)]
    assert not bad, f"{path.name}: assert on counts, bytes or FLOPs and plot the time instead:\n" + "\n".join(bad)


def _exercises(path):
    """(number, markdown cell index, the cell's text) for every numbered exercise after '## Exercises'."""
    cells = _cells(path)
    start = next((i for i, c in enumerate(cells)
                  if c["cell_type"] == "markdown" and "## Exercises" in _source(c)), None)
    if start is None:
        return []
    return [(int(m.group(1)), i, _source(cells[i])) for i in range(start, len(cells))
            if cells[i]["cell_type"] == "markdown" for m in EXERCISE.finditer(_source(cells[i]))]


EXERCISED = [p for p in NOTEBOOKS if "★" in p.read_text()]   # the notebooks converted to this format


@pytest.mark.parametrize("path", EXERCISED, ids=lambda p: p.name)
def test_every_exercise_has_a_difficulty_and_a_hidden_solution(path):
    cells = _cells(path)
    exercises = _exercises(path)
    assert exercises, f"{path.name}: no numbered exercises"
    for number, index, text in exercises:
        body = text[text.index(f"{number}. "):]
        assert body[len(f"{number}. "):].startswith("★"), f"{path.name}: exercise {number} has no difficulty mark"
        if "<details>" in body:
            continue
        following = cells[index + 1] if index + 1 < len(cells) else {}
        meta = following.get("metadata", {})
        assert following.get("cell_type") == "code" and "solution" in meta.get("tags", []), \
            f"{path.name}: exercise {number} needs a <details> solution or a solution code cell right after it"
        assert meta.get("jupyter", {}).get("source_hidden") and meta.get("jupyter", {}).get("outputs_hidden"), \
            f"{path.name}: exercise {number}'s solution must be collapsed (source and outputs hidden)"


@pytest.mark.parametrize("path", EXERCISED, ids=lambda p: p.name)
def test_notebook_has_summary_references_and_links_to_its_neighbours(path):
    markdown = "\n".join(_source(c) for c in _cells(path) if c["cell_type"] == "markdown")
    assert "## Summary" in markdown and "## References" in markdown, path.name
    assert re.search(r"## References\n(\* .*https://\S+\n?)+", markdown), f"{path.name}: references need links"
    assert "Next:" in markdown, f"{path.name}: link to the next notebook"
    for target in re.findall(r"\]\((\d\d_[\w]+\.ipynb)\)", markdown):
        assert (ROOT / "notebooks" / target).exists(), f"{path.name} links to missing {target}"
