"""The Colab-like path, in CI: percnb built as a wheel, pip-installed (not editable) into a fresh venv,
and every notebook run by nbval from a folder outside the repository with that venv's Python.

Torch and the other dependencies are gigabytes: the fresh venv borrows them from the venv running this
test (a .pth file adds a folder of links to its site-packages, minus percnb's own editable install), so
pip still resolves the wheel's requirements against them, offline (`--no-index`), and percnb itself is
imported only from the wheel. The wheel must stay under 15 MB.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_WHEEL_BYTES = 15_000_000
ASSETS = ["percnb/assets/mlm_bytes.pt", "percnb/assets/mlm_bytes.json", "percnb/assets/mlm_study.json",
          "percnb/assets/pydoc_topics_3.11.json.xz"]


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _clean_env() -> dict:
    # No PYTHONPATH (a worktree sets it to the checkout) and no virtualenv of the caller's.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _borrowed_site_packages(farm: Path) -> None:
    """Links to every entry of this interpreter's site-packages except percnb's (its editable install)."""
    farm.mkdir()
    for folder in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        for entry in Path(folder).iterdir():
            if "percnb" in entry.name.lower() or (farm / entry.name).exists():
                continue
            (farm / entry.name).symlink_to(entry)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(wheel path, the fresh venv's python), built and installed once for this module's tests."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"                 # a copy: building in the checkout would leave build/ and egg-info
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "percnb", source / "percnb", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(base / "dist"), str(source)],
         env=_clean_env())
    wheel = next((base / "dist").glob("percnb-*.whl"))

    venv = base / "venv"
    # --without-pip: the venv's own pip and setuptools would shadow the borrowed ones (torch needs setuptools>=77)
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=_clean_env())
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        env=_clean_env()).stdout.strip())
    _borrowed_site_packages(base / "borrowed")
    (purelib / "zz_borrowed.pth").write_text(f"import site; site.addsitedir({str(base / 'borrowed')!r})\n")
    # [hub]: notebook 07's setup cell installs percnb[hub] (transformers), as a learner's pip would
    _run([str(python), "-m", "pip", "install", "--no-index", "--quiet", f"{wheel}[hub]"], env=_clean_env(), cwd=base)
    return wheel, python


def test_the_wheel_is_small_and_carries_the_assets(wheel_venv):
    wheel, _ = wheel_venv
    assert wheel.stat().st_size < MAX_WHEEL_BYTES, f"{wheel.name} is {wheel.stat().st_size:,} bytes"
    names = zipfile.ZipFile(wheel).namelist()
    assert all(asset in names for asset in ASSETS), sorted(set(ASSETS) - set(names))
    assert not any(name.startswith(("tests/", "notebooks/", "scripts/", "checkpoints/")) for name in names)


def test_the_fresh_venv_imports_the_wheels_percnb_with_its_assets(wheel_venv, tmp_path):
    _, python = wheel_venv
    venv = python.parent.parent
    probe = ("import json, percnb, percnb.assets as a\n"
             "from percnb.data.text import load_text_splits\n"
             "from percnb.models import PerceiverMLM\n"
             "m = PerceiverMLM.from_pretrained('bytes-mlm')\n"
             "print(json.dumps({'file': percnb.__file__, 'steps': a.report('bytes-mlm')['steps'],\n"
             "                  'sizes': load_text_splits(seed=0).sizes(), 'class': type(m).__name__}))\n")
    found = json.loads(_run([str(python), "-c", probe], env=_clean_env(), cwd=tmp_path).stdout)
    assert Path(found["file"]).resolve().is_relative_to(venv.resolve()), found["file"]
    assert not Path(found["file"]).resolve().is_relative_to(ROOT), found["file"]
    from percnb import assets
    from percnb.data.text import load_text_splits
    assert found["steps"] == assets.report("bytes-mlm")["steps"] and found["class"] == "PerceiverMLM"
    assert found["sizes"] == load_text_splits(seed=0).sizes()


def test_the_notebooks_run_from_a_pip_install_outside_the_repo(wheel_venv, tmp_path):
    _, python = wheel_venv
    folder = tmp_path / "course"
    shutil.copytree(ROOT / "notebooks", folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    assert list(folder.glob("*.ipynb")), "no notebooks to run"
    env = {**_clean_env(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    result = subprocess.run(
        [str(python), "-m", "pytest", "--nbval-lax", "--nbval-current-env", "--nbval-sanitize-with",
         str(ROOT / "tests" / "nbval_sanitize.cfg"), "-p", "no:cacheprovider", "-q", "--rootdir", str(folder),
         str(folder)], cwd=folder, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
