"""What the course site needs beyond Sphinx + myst-nb: it works offline and cannot go stale.

- `course-notebooks` directive: the table of chapters on the index page, each one's title, "You will
  learn" and run time read from the notebook's own title cell.
- The API reference: one page per public module of percnb, found by walking the package at build time
  (a module added or moved gets its page without editing the site).
- Offline pages: the Colab badge image is this site's own SVG; MathJax 3, require.js and the Jupyter
  widget manager are copied from docs/node_modules (pinned in docs/package.json) into _static/npm/.
- A saved widget gets a note that a static page has no kernel, with the command that makes it live.
"""
from __future__ import annotations

import importlib
import json
import pkgutil
import re
import shutil
from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.errors import ConfigError
from sphinx.transforms import SphinxTransform
from sphinx.util.docutils import SphinxDirective

DOCS = Path(__file__).resolve().parents[1]
NOTEBOOKS = DOCS / "notebooks"                         # a link to the repository's notebooks/
NODE_MODULES = DOCS / "node_modules"
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
LOCAL_BADGE = "/_static/colab-badge.svg"               # "/" = relative to docs/: Sphinx copies it per page
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
# Widgets that only show something (a tqdm bar is an HBox of HTML + FloatProgress): no note needed.
DISPLAY_ONLY = {"LayoutModel", "HTMLModel", "HTMLStyleModel", "LabelModel", "LabelStyleModel", "ImageModel",
                "BoxModel", "HBoxModel", "VBoxModel", "FloatProgressModel", "IntProgressModel",
                "ProgressStyleModel", "OutputModel"}
# What the pages load, copied from docs/node_modules: (files, folder under _static/npm/ to put them in).
# The widget bundle keeps its node_modules layout: require.js's base URL is _static/npm/ (percnb-widgets.js).
# Its Font Awesome files are requested next to the URL of whichever module loads the icon font first:
# the named modules (@jupyter-widgets/base, .../controls) resolve to _static/npm/@jupyter-widgets/, the
# bundle's own file to .../html-manager/dist/. Both were seen here, on different pages and runs, so the
# fonts are copied to both folders.
WIDGETS = "@jupyter-widgets/html-manager/dist"
VENDOR = [
    ("requirejs/require.js", "."),
    ("mathjax/es5/tex-mml-chtml.js", "mathjax"),
    *((f"mathjax/es5/{folder}", "mathjax") for folder in ("input", "output", "ui", "a11y", "sre")),  # loaded on use
    (f"{WIDGETS}/embed-amd.js", WIDGETS),
    *((f"{WIDGETS}/*.{ext}", folder) for ext in ("woff2", "woff", "ttf", "eot", "svg")
      for folder in (WIDGETS, "@jupyter-widgets")),
]
RUNS_IN = re.compile(r"\*\*Runs in:\*\*\s*(about \d+ minutes?)")
LEARN = re.compile(r"\*\*You will learn:\*\*\s*(.+?)(?:\s+\*\*Runs in:|$)", re.DOTALL)


# ------------------------------------------------------------------------------ the chapter table
def notebook_summary(path: Path) -> dict:
    """Title, what it teaches and run time, from a notebook's first (title) cell."""
    cell = json.loads(path.read_text(encoding="utf-8"))["cells"][0]
    text = "".join(cell["source"])
    title = text.splitlines()[0].lstrip("# ").strip()
    runs_in, learn = RUNS_IN.search(text), LEARN.search(text)
    if cell["cell_type"] != "markdown" or not runs_in or not learn:
        raise ValueError(f"{path.name}: the first cell must be the title cell with '**You will learn:**' "
                         "and '**Runs in:** about N minutes' (see tests/test_notebooks.py)")
    return {"title": title, "learn": " ".join(learn.group(1).split()), "runs_in": runs_in.group(1)}


def _row(*cells: nodes.Node) -> nodes.row:
    row = nodes.row()
    for content in cells:
        row += nodes.entry("", content)
    return row


class CourseNotebooks(SphinxDirective):
    """A table of every notebooks/NN_*.ipynb: linked title, what you will learn, run time."""

    def run(self) -> list[nodes.Node]:
        paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
        if not paths:
            raise self.error(f"no notebooks in {NOTEBOOKS}")
        table, group = nodes.table(classes=["percnb-course"]), nodes.tgroup(cols=3)
        table += group
        for width in (30, 55, 15):
            group += nodes.colspec(colwidth=width)
        head, body = nodes.thead(), nodes.tbody()
        head += _row(*(nodes.paragraph(text=t) for t in ("notebook", "you will learn", "runs in")))
        for path in paths:
            self.env.note_dependency(str(path))
            info = notebook_summary(path)
            link = addnodes.pending_xref("", nodes.inline(text=info["title"]), refdomain="std", reftype="doc",
                                         reftarget=f"/notebooks/{path.stem}", refexplicit=True)
            body += _row(nodes.paragraph("", "", link), nodes.paragraph(text=info["learn"]),
                         nodes.paragraph(text=info["runs_in"]))
        group += head
        group += body
        return [table]


# ------------------------------------------------------------------------------ the API pages
def public_modules(package: str = "percnb") -> list[str]:
    """percnb and every module under it whose dotted name has no part starting with "_"."""
    root = importlib.import_module(package)
    names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, prefix=package + ".")]
    return sorted(n for n in names if not any(part.startswith("_") for part in n.split(".")))


def _write_if_changed(path: Path, text: str) -> None:
    # Unchanged files keep their mtime, so Sphinx does not re-read them.
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def write_api_pages(app: Sphinx) -> None:
    """docs/api/<module>.rst per public module, and docs/api/index.rst listing them (git-ignored)."""
    out = Path(app.srcdir) / "api"
    out.mkdir(exist_ok=True)
    modules = public_modules()
    for stale in set(out.glob("*.rst")) - {out / f"{m}.rst" for m in modules} - {out / "index.rst"}:
        stale.unlink()
    for module in modules:
        _write_if_changed(out / f"{module}.rst", f"{module}\n{'=' * len(module)}\n\n.. automodule:: {module}\n")
    toc = "\n".join(f"   {m}" for m in modules)
    _write_if_changed(out / "index.rst", (
        "API reference\n=============\n\n"
        "Generated from percnb's docstrings: one page per public module, found by walking the package.\n\n"
        f".. toctree::\n   :maxdepth: 1\n\n{toc}\n"))


CODE_SPAN = re.compile(r"(`[^`]+`)")
UNCLOSED_STARS = re.compile(r"(?<![^\s(\[{,=])\*{1,2}(?=\w)")      # *tensors, **kwargs (not 2 * x)


def markdown_style_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    """percnb's docstrings are plain text with Markdown-style `code` (conf.py: default_role = "code").
    Two habits of that style are broken reStructuredText: a code span with a letter right after it
    (`Job`s) and a star before a name (forward(*tensors), **kwargs) that reStructuredText takes for
    unclosed emphasis. Separate the one with an escaped space, escape the other."""
    for i, line in enumerate(lines):
        parts = CODE_SPAN.split(line)             # text, code, text, code, ..., text
        for j in range(0, len(parts), 2):
            parts[j] = UNCLOSED_STARS.sub(lambda m: "\\*" * len(m.group()), parts[j])
        for j in range(1, len(parts), 2):
            if parts[j + 1][:1].isalnum():
                parts[j] += "\\ "
            if parts[j - 1][-1:].isalnum():
                parts[j] = "\\ " + parts[j]
        lines[i] = "".join(parts)


# ------------------------------------------------------------------------------ notebook pages
class OfflineNotebookPages(SphinxTransform):
    """The Colab badge image from this site; a note under each saved interactive widget."""

    default_priority = 500

    def apply(self) -> None:
        for image in self.document.findall(nodes.image):
            if image["uri"] == COLAB_BADGE:
                image["uri"] = LOCAL_BADGE
        path = Path(self.env.doc2path(self.env.docname))
        if path.suffix != ".ipynb":
            return
        state = (json.loads(path.read_text(encoding="utf-8"))["metadata"].get("widgets", {})
                 .get(WIDGET_STATE, {}).get("state", {}))
        for raw in list(self.document.findall(nodes.raw)):
            match = re.search(rf'<script type="{re.escape(WIDGET_VIEW)}">(.*?)</script>', raw.astext(), re.DOTALL)
            if match and _is_interactive(json.loads(match.group(1))["model_id"], state):
                bundle = raw                 # the output's mime bundle: one child per mime type, the
                while bundle.get("nb_element") != "mime_bundle":   # best chosen when the page is written
                    bundle = bundle.parent
                bundle.parent.insert(bundle.parent.index(bundle) + 1, self._note())

    def _note(self) -> nodes.Node:
        notebook = f"notebooks/{Path(self.env.docname).name}.ipynb"
        note = nodes.paragraph(classes=["percnb-static-widget"])
        note += nodes.strong(text="A saved snapshot: ")
        note += nodes.Text("this page has no Python kernel behind it, so these controls do not respond. "
                           "To use them, run ")
        note += nodes.literal(text="make lab")
        note += nodes.Text(" in the repository and open ")
        note += nodes.literal(text=notebook)
        note += nodes.Text(" (or open it in Colab with the badge at the top).")
        return note


def _is_interactive(model_id: str, state: dict) -> bool:
    """True when the saved widget (or one of its children) is a control a reader would try to move."""
    seen, todo = set(), [model_id]
    while todo:
        model = state.get(todo.pop(), {})
        name = model.get("model_name", "")
        if name and name not in DISPLAY_ONLY:
            return True
        for value in model.get("state", {}).values():
            for ref in value if isinstance(value, list) else [value]:
                if isinstance(ref, str) and ref.startswith("IPY_MODEL_") and ref[10:] not in seen:
                    seen.add(ref[10:])
                    todo.append(ref[10:])
    return False


# ------------------------------------------------------------------------------ offline assets
def check_vendor(app: Sphinx) -> None:
    missing = [pattern for pattern, _ in VENDOR if not any(NODE_MODULES.glob(pattern))]
    if missing:
        raise ConfigError(f"docs/node_modules lacks {missing}: build with `make site` or `python docs/build.py`, "
                          "which run `npm ci` in docs/ first")


def copy_vendor(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    for pattern, folder in VENDOR:
        target = Path(app.outdir) / "_static" / "npm" / folder
        target.mkdir(parents=True, exist_ok=True)
        for source in NODE_MODULES.glob(pattern):
            if source.is_dir():
                shutil.copytree(source, target / source.name, dirs_exist_ok=True)
            else:
                shutil.copy2(source, target)


def link_sibling_notebooks(app: Sphinx, docname: str, source: list[str]) -> None:
    """A notebook links its neighbours as `[label](NN_name.ipynb)` (what JupyterLab, GitHub and Colab
    follow). In the site, docs/notebooks is a link to the repository's folder, and MyST resolves such a
    path through it to a file outside the site's sources: make each a {doc} reference to the chapter."""
    if docname.startswith("notebooks/"):
        source[0] = re.sub(r'\[([^\]`<>"\n]+)\]\((\d\d_[A-Za-z0-9_]+)\.ipynb\)', r"{doc}`\1 <\2>`", source[0])


def setup(app: Sphinx) -> dict:
    app.add_directive("course-notebooks", CourseNotebooks)
    app.add_transform(OfflineNotebookPages)
    app.connect("builder-inited", check_vendor)
    app.connect("builder-inited", write_api_pages)
    app.connect("source-read", link_sibling_notebooks)
    app.connect("autodoc-process-docstring", markdown_style_docstring)
    app.connect("build-finished", copy_vendor)
    app.add_css_file("percnb.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
