"""The benchmark scripts run at tiny sizes, so they cannot rot (no timing is asserted)."""
import importlib.util
import json
import re
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


def test_compare_peers_smoke_percnb_alone(tmp_path):
    # percnb only (no peer needs to be installed), tiny model, one thread: seconds, not a measurement
    args = ["--tiny", "--libraries", "percnb", "--threads", "1", "--sizes", "64", "--scaling-sizes", "64", "256",
            "--out", str(tmp_path)]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_peers.py"), *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines()
            if line.split()[1:2] == ["percnb"] and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["64"], out.stdout                        # one table row per M
    assert all(float(row[2]) > 0 and float(row[5]) >= 0 for row in rows), rows   # seconds, MB
    assert "GFLOP/s of the model's FLOPs" in out.stdout and out.stdout.count("log-log slope") >= 2
    assert (tmp_path / "compare_peers_scaling.png").stat().st_size > 0
    results = json.loads((tmp_path / "compare_peers.json").read_text())
    census = results["census"]["percnb"]
    assert census["flops"]["64"]["train"] > census["flops"]["64"]["inference"] > 0
    assert sorted(results["scaling"]) == ["256", "64"] and len(results["scaling"]["256"][0]["train"]) == 2


def _compare_peers():
    spec = importlib.util.spec_from_file_location("compare_peers", ROOT / "benchmarks" / "compare_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _census(cross=1000, mlp=5000, per_input=300, fixed=10_000):
    components = {name: 100 for name in _compare_peers().KNOBS}
    components.update({"cross-attention": cross, "latent MLPs": mlp})
    flops = {str(m): {"train": 3 * (fixed + per_input * m), "inference": fixed + per_input * m} for m in (64, 128)}
    return {"components": components, "flops": flops}


def test_compare_peers_accepts_the_same_model():
    assert _compare_peers().check_same_model({"a": _census(), "b": _census(mlp=5050)}) == []   # 1% apart


def test_compare_peers_refuses_and_names_the_knob():
    problems = _compare_peers().check_same_model({"a": _census(), "b": _census(mlp=6000)})
    assert len(problems) == 1 and problems[0].startswith("latent MLPs parameters differ by 20.0%")
    assert "MLP hidden width" in problems[0]
    problems = _compare_peers().check_same_model({"a": _census(), "b": _census(per_input=400)})
    assert problems and all("part proportional to M differs" in p for p in problems)
    assert not any("independent of M" in p for p in problems)


def test_cost_check_smoke(tmp_path):
    # tiny model, one size, one thread: the prediction table and the optimizer comparison print, nothing timed
    args = ["--tiny", "--threads", "1", "--sizes", "64", "--parts", "prediction", "optimizer", "--out", str(tmp_path)]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cost_check.py"), *args],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] == ["64"]]
    assert [row[1] for row in rows] == ["False", "True"], out.stdout
    results = json.loads((tmp_path / "cost_check_prediction_optimizer.json").read_text())
    for row in results["prediction"]["rows"]:          # FLOPs are predicted exactly; memory is measured
        assert row["predicted"]["train_flops"] == row["flops"]["train"] and row["peak_mib"] > 0
    assert results["optimizer"]["speedup"] > 0


def test_profile_step_smoke_groups_every_operator():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--tiny", "--steps", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^(\S.*?)\s+(\d+\.\d{3})\s+(\d+\.\d)%$", out.stdout, flags=re.M)
    groups = {name.strip(): float(share) for name, _, share in rows}
    assert {"matrix products", "GELU", "LayerNorm", "optimizer"} <= set(groups), out.stdout
    assert abs(sum(groups.values()) - 100) < 0.6                       # shares of one total
    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "benchmarks" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert [module.group_of(n) for n in ("aten::addmm", "aten::gelu_backward", "aten::native_layer_norm",
                                         "aten::_fused_adamw_", "aten::copy_", "aten::add_", "aten::foo")] == [
        "matrix products", "GELU", "LayerNorm", "optimizer", "copies and layout", "element-wise and reductions",
        "other (autograd and dispatch)"]


def test_profile_step_refuses_a_zero_setting():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--tiny", "--steps", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--steps must be >= 1, got 0" in out.stderr
