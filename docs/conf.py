"""Sphinx configuration of the course site: the committed notebooks (never executed here), an index, and
the API reference from percnb's docstrings. Build it with `make site` (or `python docs/build.py`), which
installs the pinned JavaScript (docs/package.json) with `npm ci` first; docs/_ext/percnb_site.py holds
what is specific to this site (the course table, the API pages, the offline assets)."""
import sys
import tomllib
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))          # document the percnb of this checkout, not an installed one

project = "percnb"
author = "the percnb authors"
copyright = "the percnb authors (MIT licence)"

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.mathjax", "percnb_site"]
# notebooks/ is linked as docs/notebooks; docs/node_modules holds the npm packages (their files are
# copied into _static by percnb_site, never read as pages).
exclude_patterns = ["_build", "node_modules", "**/.ipynb_checkpoints"]

# The notebooks are committed executed (tests/test_notebooks.py checks it): render their saved outputs.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]

# percnb's docstrings write `name` for code, as Markdown does.
default_role = "code"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    # Each object is documented once, in the module that defines it: a package's __all__ re-exports
    # (percnb, percnb.data) would otherwise document it twice.
    "ignore-module-all": True,
}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False   # else every forward() shows torch.nn.Module.forward's generic note

html_theme = "sphinx_book_theme"
html_title = "percnb: a Perceiver course"
html_static_path = ["_static"]
html_theme_options = {
    # written once, in pyproject's [project.urls] (tests/test_notebooks.py checks the Colab badges against it)
    "repository_url": tomllib.loads((DOCS.parent / "pyproject.toml").read_text())["project"]["urls"]["Repository"],
    "use_repository_button": True,
    "show_toc_level": 2,
}
# The notebooks' figures are drawn on white; unset, the theme also logs a console error on every page.
html_context = {"default_mode": "light"}

# Every script a page loads is served from _static (copied there by percnb_site from docs/node_modules).
mathjax_path = "npm/mathjax/tex-mml-chtml.js"
mathjax_config_path = "_static/mathjax-config.js"
nb_ipywidgets_js = {
    "npm/require.js": {},
    "percnb-widgets.js": {},                      # require.js's base path: before the bundle loads
    "npm/@jupyter-widgets/html-manager/dist/embed-amd.js": {},
}
