"""The benchmark scripts run at tiny sizes, so they cannot rot (no timing is asserted)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_bubbles_smoke():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pipeline_bubbles.py"), "--tiny",
                          "--microbatches", "1", "2", "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1 stage:" in out.stdout and out.stdout.count("x ") >= 2
