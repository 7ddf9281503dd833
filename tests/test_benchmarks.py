"""The benchmark scripts run at tiny sizes, so they cannot rot (no timing is asserted)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_bubbles_smoke():
    args = ["--tiny", "--microbatches", "1", "2", "--steps", "1", "--rounds", "1"]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pipeline_bubbles.py"), *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [row[0] for row in rows] == ["1", "2"], out.stdout
    for m, row in zip((1, 2), rows):       # speedup and the ideal 2m/(m+1) beside it
        assert row[3].endswith("x") and row[4] == f"{2 * m / (m + 1):.2f}x", row
