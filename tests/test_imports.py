"""percnb's modules import alone, in a fresh interpreter, and import each other without a cycle; the model
(percnb.models) never pulls in the pipeline."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "percnb"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


def start_importing(module: str) -> subprocess.Popen:
    """A fresh interpreter that imports `module` alone and prints the percnb modules it then holds."""
    code = (f"import json, sys; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('percnb'))))")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=PACKAGE.parent)


@pytest.fixture(scope="module")
def loaded():
    """module -> the percnb modules loaded by importing it alone; the interpreters run 4 at a time (each
    imports torch, which takes seconds)."""
    results, pending = {}, list(MODULES)
    while pending:
        batch, pending = pending[:4], pending[4:]
        for module, process in [(m, start_importing(m)) for m in batch]:
            out, err = process.communicate(timeout=180)
            assert process.returncode == 0, f"import {module} alone failed:\n{err[-2000:]}"
            results[module] = json.loads(out.splitlines()[-1])
    return results


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(loaded, module):
    assert module in loaded[module]


def test_the_model_does_not_import_the_pipeline(loaded):
    assert not [m for m in loaded["percnb.models"] if m.startswith("percnb.pipeline")], loaded["percnb.models"]


def module_level_imports(path: Path) -> set:
    """The percnb modules `path` imports when it is imported (imports inside functions run later, if at all)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("percnb")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("percnb"):
                continue
            # `from . import checks` imports the module percnb.checks; `from .models import X`, percnb.models
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return found - {name}


def test_no_import_cycle():
    graph = {module_name(p): module_level_imports(p) for p in PACKAGE.rglob("*.py")}
    assert graph["percnb.models"] >= {"percnb.checks", "percnb.fast", "percnb.config"}   # the reader sees edges
    visiting, done, cycles = set(), set(), []

    def visit(node, path):
        if node in visiting:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        visiting.add(node)
        for child in sorted(graph.get(node, ())):
            visit(child, path + [node])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    assert not cycles, cycles
