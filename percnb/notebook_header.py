"""The Colab setup cell of every course notebook, written from one place::

    python -m percnb.notebook_header            # write it into notebooks/*.ipynb (run from the repository root)
    python -m percnb.notebook_header --check    # exit 1, naming each notebook whose cell differs

The cell is each notebook's first code cell. On Colab (`"google.colab" in sys.modules`) and Kaggle (two
T4s for notebook 05's GPU pipeline; `KAGGLE_KERNEL_RUN_TYPE` in the environment) it pip-installs
the percnb release the notebook was written for, `percnb @ git+<repository>@v<version>`, with the
version and repository read from pyproject.toml (so the pin cannot drift from the package) and with
the extras the notebook imports (`percnb[hub]` where a cell imports `transformers` or `percnb.hub`), without
`--upgrade` so that Colab's preinstalled torch stays when it satisfies percnb's requirement; then it
turns on Colab's custom widget manager, without which ipywidgets (the attention explorer) do not
render there (Colab only). Anywhere else it does nothing: `make lab` or `pip install` already provided percnb.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .io import atomic_write

CELL_ID = "percnb-setup"
FIRST_LINE = "# Setup: on Colab or Kaggle, install the percnb this notebook was written for; elsewhere it does nothing."


def project(root: Path) -> dict:
    """pyproject.toml's [project] table of the repository at `root`."""
    import tomllib  # Python 3.11+; the tool runs in the repository's development environment
    path = Path(root) / "pyproject.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python -m percnb.notebook_header` from the repository "
                                "root, or pass --root")
    return tomllib.loads(path.read_text(encoding="utf-8"))["project"]


# An extra is needed where a code cell imports one of its modules (percnb.hub needs transformers).
EXTRA_IMPORTS = {
    "hub": r"^\s*(?:import|from)\s+(?:transformers|percnb\.hub)\b|^\s*from\s+percnb\s+import\s+.*\bhub\b",
}


def extras_needed(notebook: dict) -> Tuple[str, ...]:
    """The optional extras of percnb that `notebook`'s code cells import, sorted (e.g. ``("hub",)``)."""
    code = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    return tuple(sorted(extra for extra, imports in EXTRA_IMPORTS.items() if re.search(imports, code, flags=re.M)))


def install_spec(version: str, repository: str, extras: Sequence[str] = ()) -> str:
    """What pip installs on Colab: the release tag v<version> of the project's repository, with `extras`."""
    name = f"percnb[{','.join(extras)}]" if extras else "percnb"
    return f"{name} @ git+{repository}@v{version}"


TEMPLATE = """\
{first_line}
# Written by `python -m percnb.notebook_header` from pyproject.toml: edit that tool, not this cell.
import os
import subprocess
import sys

on_colab, on_kaggle = "google.colab" in sys.modules, "KAGGLE_KERNEL_RUN_TYPE" in os.environ
if on_colab or on_kaggle:
    # No --upgrade: pip keeps the runtime's own torch when it satisfies percnb's requirement (torch>=2.4).
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", {spec}], check=True)
if on_colab:
    from google.colab import output
    output.enable_custom_widget_manager()  # ipywidgets (the attention explorer) render on Colab"""


def setup_cell_source(version: str, repository: str, extras: Sequence[str] = ()) -> str:
    """The setup cell's Python source for percnb `version` (with `extras`) hosted at `repository`. It installs
    on Colab and on Kaggle (notebook 05's two-GPU runtime; Kaggle sets KAGGLE_KERNEL_RUN_TYPE), nowhere else."""
    return TEMPLATE.format(first_line=FIRST_LINE, spec=json.dumps(install_spec(version, repository, extras)))


def expected_source(root: Path, notebook: Optional[dict] = None, meta: Optional[dict] = None) -> str:
    """The setup cell for the repository at `root` (its pyproject's version and repository URL), installing
    the extras `notebook` imports (none when no notebook is given). `meta`: pyproject's [project] table,
    when the caller has already read it."""
    meta = meta if meta is not None else project(root)
    extras = extras_needed(notebook) if notebook is not None else ()
    return setup_cell_source(meta["version"], meta["urls"]["Repository"], extras)


def _lines(text: str) -> List[str]:
    return text.splitlines(keepends=True)


def _setup_cell_index(cells: list) -> Optional[int]:
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "code" and "".join(cell["source"]).startswith(FIRST_LINE):
            return i
    return None


def apply(notebook: dict, source: str) -> dict:
    """`notebook` (nbformat JSON) with its setup cell set to `source`: replaced where it is, else inserted
    before the first code cell. The cell's outputs are cleared (outside Colab it prints nothing)."""
    cells = notebook["cells"]
    index = _setup_cell_index(cells)
    cell = {"cell_type": "code", "execution_count": None, "id": CELL_ID, "metadata": {}, "outputs": [],
            "source": _lines(source)}
    if index is not None:
        cell["execution_count"] = cells[index].get("execution_count")
        cells[index] = cell
    else:
        first_code = next((i for i, c in enumerate(cells) if c["cell_type"] == "code"), len(cells))
        cells.insert(first_code, cell)
    return notebook


def problems(notebook: dict, source: str) -> List[str]:
    """Why `notebook` does not have exactly this setup cell as its first code cell, and only there."""
    cells = notebook["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    found = []
    if not code or "".join(code[0]["source"]) != source:
        found.append("its first code cell is not the setup cell `python -m percnb.notebook_header` writes")
    for cell in code[1:]:
        text = "".join(cell["source"])
        # Other cells may ask whether they run on Colab (notebook 07 downloads only there by default),
        # but installing is the setup cell's job: a second install could pin another version.
        if "pip install" in text:
            found.append(f"cell {cell.get('id')!r} installs packages too; only the setup cell may")
    return found


def _dump(notebook: dict) -> str:
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"     # as Jupyter writes notebooks


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: <root>/notebooks/*.ipynb")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository (holds pyproject.toml)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook differs")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((args.root / "notebooks").glob("*.ipynb"))
    if not paths:
        parser.error(f"no notebooks found in {args.root / 'notebooks'}")
    meta = project(args.root)                     # read once: every notebook's cell pins the same release
    failed = False
    for path in paths:
        text = path.read_text(encoding="utf-8")
        notebook = json.loads(text)
        source = expected_source(args.root, notebook, meta)
        if args.check:
            for problem in problems(notebook, source):
                print(f"{path}: {problem}")
                failed = True
            continue
        updated = _dump(apply(notebook, source))
        if updated != text:
            # atomically, as percnb writes every file: an interrupted run leaves the notebook as it was
            data = updated.encode("utf-8")
            atomic_write(path, lambda f, data=data: f.write(data))
            print(f"{path}: setup cell written")
        else:
            print(f"{path}: setup cell already current")
        for problem in problems(json.loads(updated), source):
            print(f"{path}: {problem}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
