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
