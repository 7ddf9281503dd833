"""scripts/train_mlm.py refuses bad options, unwritable or clashing outputs and replacing a shipped file
before any training, and writes what it does write atomically."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from percnb.models import FORMAT, PerceiverMLM

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = [ROOT / "percnb" / "assets" / name for name in ("mlm_bytes.pt", "mlm_bytes.json", "mlm_study.json")]


class TrainingStarted(Exception):
    """Raised instead of training: reaching it means the script did not refuse."""


@pytest.fixture
def script(monkeypatch):
    """The script as a module, with training (in-process and the study's process pool) replaced by a tripwire."""
    spec = importlib.util.spec_from_file_location("train_mlm_under_test", ROOT / "scripts" / "train_mlm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def tripwire(*args, **kwargs):
        raise TrainingStarted

    monkeypatch.setattr(module, "train", tripwire)
    monkeypatch.setattr(module, "ProcessPoolExecutor", tripwire)
    return module


def refused(script, argv, capsys) -> str:
    """Run main(argv), expect a usage error (exit 2) before training; return its message."""
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("option, value", [
    ("--steps", "0"), ("--steps", "-5"), ("--batch-size", "0"), ("--batch-size", "-4"), ("--lr", "0"),
    ("--lr", "-1e-3"), ("--lr", "nan"), ("--lr", "inf"), ("--eval-every", "0"), ("--threads", "0"),
    ("--workers", "0"), ("--warmup", "-1"), ("--seed", "-1"), ("--steps", "1.5"),
])
def test_a_zero_negative_or_malformed_option_is_a_usage_error(script, capsys, tmp_path, option, value):
    message = refused(script, [option, value, "--out", str(tmp_path / "m.pt")], capsys)
    assert f"argument {option}:" in message


def test_only_needs_the_study_and_an_existing_entry(script, capsys, tmp_path):
    assert "--only picks study entries" in refused(script, ["--only", "1", "--out", str(tmp_path / "m.pt")], capsys)
    message = refused(script, ["--study", "--only", "99", "--out", str(tmp_path / "s.json")], capsys)
    assert "the study has entries 0..7, got 99" in message


def test_steps_zero_from_the_command_line_exits_2_without_training(tmp_path):
    # The reproduction, as a user types it: it used to train the default 4,000 steps.
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_mlm.py"), "--steps", "0", "--out",
                             str(tmp_path / "m.pt")], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and "argument --steps: must be >= 1, got 0" in result.stderr
    assert os.listdir(tmp_path) == []


def _stamps():
    return [(p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None for p in SHIPPED]


@pytest.mark.parametrize("argv", [[], ["--steps", "5"], ["--study"], ["--study", "--only", "3"],
                                  # its report is shipped:
                                  ["--out", str(ROOT / "percnb" / "assets" / "mlm_bytes.tmp")]])
def test_the_shipped_files_are_not_replaced_without_the_flag(script, capsys, argv):
    before = _stamps()
    message = refused(script, argv, capsys)
    assert "would overwrite the shipped" in message and "--overwrite-shipped" in message
    assert _stamps() == before


def _fake_checkout(script, monkeypatch, tmp_path, names):
    monkeypatch.setattr(script, "ROOT", tmp_path)
    (tmp_path / "percnb" / "assets").mkdir(parents=True)
    for name in names:
        (tmp_path / "percnb" / "assets" / name).write_text("shipped")


def test_overwrite_shipped_lets_a_run_replace_them(script, monkeypatch, tmp_path):
    _fake_checkout(script, monkeypatch, tmp_path, ["mlm_bytes.pt", "mlm_bytes.json", "mlm_study.json"])
    with pytest.raises(TrainingStarted):
        script.main(["--overwrite-shipped", "--steps", "5"])
    with pytest.raises(TrainingStarted):
        script.main(["--study", "--overwrite-shipped"])


def test_a_missing_shipped_file_is_made_without_the_flag(script, monkeypatch, tmp_path):
    # Notebook 04 tells a user without the checkpoint to run the script: nothing is replaced then.
    _fake_checkout(script, monkeypatch, tmp_path, [])
    with pytest.raises(TrainingStarted):
        script.main(["--steps", "5"])


def test_a_report_path_equal_to_the_checkpoint_is_refused(script, capsys, tmp_path):
    message = refused(script, ["--out", str(tmp_path / "m.json"), "--steps", "5"], capsys)
    assert "would make the report" in message and "overwrite the checkpoint" in message


@pytest.mark.parametrize("make_out, message", [
    (lambda tmp: (tmp / "taken").write_text("") or tmp / "taken" / "m.pt", "taken is a file, not a folder"),
    (lambda tmp: tmp, "is a folder; give a file name inside it"),
    (lambda tmp: Path("/proc/percnb-test/m.pt"), "cannot write"),
])
def test_an_unwritable_out_is_refused_before_training(script, capsys, tmp_path, make_out, message):
    out = make_out(tmp_path)
    assert message in refused(script, ["--out", str(out), "--steps", "5"], capsys)


def test_a_missing_out_folder_is_made_before_training(script, tmp_path):
    with pytest.raises(TrainingStarted):
        script.main(["--out", str(tmp_path / "runs" / "a" / "m.pt"), "--steps", "5"])
    assert (tmp_path / "runs" / "a").is_dir() and os.listdir(tmp_path / "runs" / "a") == []


def test_a_short_run_writes_a_loadable_checkpoint_and_its_report(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("train_mlm_short_run", ROOT / "scripts" / "train_mlm.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "SEQ_LEN", 32)            # a small model: the run is about files, not accuracy
    out = tmp_path / "run" / "m.pt"
    script.main(["--steps", "2", "--batch-size", "4", "--eval-every", "1", "--warmup", "0", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["steps"] == 2 and report["file_bytes"] == out.stat().st_size
    assert isinstance(PerceiverMLM.load(out), PerceiverMLM)
    assert sorted(os.listdir(out.parent)) == ["m.json", "m.pt"]          # no temporary file left behind
    assert torch.load(out, weights_only=True)["format"] == FORMAT
