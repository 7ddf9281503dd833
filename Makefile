# Two commands: `make lab` and `make test`. Both create .venv when missing and install percnb into it.
# `make site` builds the course as a static website (docs/build.py; open docs/_build/html/index.html).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Idle OpenMP threads sleep instead of spinning: when two multi-threaded processes share the cores
# (a notebook kernel and a pipeline worker, or another job on a shared machine), spinning threads
# slowed training steps 5-6x here; passive waiting keeps them near their own speed.
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY

# `make lab PORT=9000 IP=0.0.0.0 TOKEN=...`: where JupyterLab listens (defaults: 127.0.0.1:8888, a new
# random token each start). scripts/lab.py passes --allow-root only to root and prints the URL to open.
PORT ?= 8888
IP ?= 127.0.0.1
TOKEN ?=

.PHONY: lab lint test test-browser site setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,docs,hub]"
	$(PY) -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

lab: $(STAMP)
	$(PY) scripts/lab.py --port "$(PORT)" --ip "$(IP)" $(if $(TOKEN),--token "$(TOKEN)")

# ruff, configured in pyproject.toml; `make test` runs it first
lint: $(STAMP)
	$(PY) -m ruff check percnb tests scripts benchmarks

# tests/ includes tests/test_wheel.py: the wheel, pip-installed into a fresh venv, runs every notebook
# from a folder outside the repository (the Colab-like path); the nbval line below runs them in place.
test: lint
	$(PY) -m pytest tests/ -q
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then \
		$(PY) -m pytest --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider notebooks/ -q; \
	else echo "no notebooks yet"; fi

# The browser test alone (JupyterLab + Debian's Chromium); `make test` runs it too when Chromium is installed.
test-browser: $(STAMP)
	$(PY) -m pytest tests/browser -q

# The course site, offline: `npm ci` in docs/ when its packages are missing or stale, then Sphinx
# (warnings are errors) renders the committed notebooks without running them.
site: $(STAMP)
	$(PY) docs/build.py

clean:
	rm -rf $(VENV)
