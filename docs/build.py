"""Build the course site: `python docs/build.py [OUTDIR]` (default docs/_build/html); `make site` runs it.

Installs the pinned JavaScript (docs/package-lock.json) with `npm ci` when docs/node_modules is missing or
was installed from another lock file, then runs Sphinx from scratch (-E: the chapter table and the API
pages are derived from files Sphinx does not track) with warnings as errors. Nothing is downloaded at
page load: open OUTDIR/index.html from disk.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
NODE_MODULES = DOCS / "node_modules"
STAMP = NODE_MODULES / ".percnb-lock.sha256"      # the lock file node_modules was installed from


def _lock_hash() -> str:
    return hashlib.sha256((DOCS / "package-lock.json").read_bytes()).hexdigest()


def install_assets() -> None:
    """`npm ci` in docs/ unless node_modules already matches package-lock.json."""
    if STAMP.exists() and STAMP.read_text() == _lock_hash():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is needed to install the site's JavaScript (docs/package.json): install Node.js")
    # --ignore-scripts: the packages are copied as files, none needs its install script.
    subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                   cwd=DOCS, check=True)
    STAMP.write_text(_lock_hash())


def build(outdir: Path) -> None:
    """Render the site into outdir; raises CalledProcessError on any Sphinx warning."""
    install_assets()
    subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-E", "-W", "--keep-going", "-q",
                    "-d", str(outdir / ".doctrees"), str(DOCS), str(outdir)], check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", nargs="?", type=Path, default=DOCS / "_build" / "html")
    args = parser.parse_args(argv)
    build(args.outdir.resolve())
    print(f"site built: open {args.outdir.resolve() / 'index.html'}")


if __name__ == "__main__":
    main()
