"""The README's quick start is executed, so it cannot go stale."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_readme_starts_with_the_two_commands():
    first = _section("Two commands")
    assert "make lab" in first and "make test" in first


def test_quick_start_runs():
    blocks = re.findall(r"```python\n(.*?)```", _section("Quick start"), flags=re.S)
    assert blocks, "the Quick start section has no python block"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_mlm_figures_are_the_checkpoint_reports():
    """Every figure of the MLM section is read from the JSON files the training script wrote."""
    import json
    root = README.parent
    section = _section("Byte-level masked language model")
    report = json.loads((root / "percnb" / "assets" / "mlm_bytes.json").read_text())
    study = json.loads((root / "percnb" / "assets" / "mlm_study.json").read_text())["results"]
    figures = [report["test_accuracy"], *report["baselines"].values()]
    figures += [r["val_accuracy"][-1] for r in study.values()]
    for value in figures:
        assert f"{value:.3f}" in section, f"{value:.3f} (from the reports) is not in the README's MLM section"
    assert f"{report['steps']:,} steps" in section and f"{round(report['seconds'] / 60)} min" in section
    assert f"{report['file_bytes'] / 1e6:.1f} MB" in section and f"{report['parameters']:,} parameters" in section
    assert report["command"] in section


def test_run_it_elsewhere_pins_pyprojects_release_and_its_code_runs():
    import inspect
    import tomllib

    from percnb import device, notebook_header, train
    section = _section("Run it elsewhere")
    project = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
    spec = notebook_header.install_spec(project["version"], project["urls"]["Repository"])
    assert re.findall(r"pip install (.+)", section) == [f'"{spec}"']
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.S):
        exec(compile(block, "README.md", "exec"), {})
    assert callable(device.default_device) and "amp" in inspect.signature(train.fit).parameters
    assert "amp" in inspect.signature(train.evaluate).parameters
    assert (README.parent / "tests" / "test_wheel.py").is_file() and "15 MB" in section
