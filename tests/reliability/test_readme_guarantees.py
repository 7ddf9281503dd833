"""The README's Guarantees section names, for each promise, the test file that checks it: those files exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_file_the_guarantees_name_exists():
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Guarantees\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert section, "README has no '## Guarantees' section"
    named = re.findall(r"`(tests/[\w/]+\.py)`", section.group(1))
    assert len(named) >= 7
    assert [n for n in named if not (ROOT / n).is_file()] == []
