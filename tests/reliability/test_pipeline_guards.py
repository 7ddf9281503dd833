"""Pipeline settings fail before any process starts (a worker would find them only after seconds of
start-up), the command line answers bad numbers with a usage error, and every process group has a
timeout."""
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from percnb.config import PerceiverConfig
from percnb.pipeline import INIT_TIMEOUT, PipelineJob, plan_pipeline, run_pipeline, run_pipelines


def config(**changes):
    base = dict(input_len=16, input_dim=8, latent_len=4, latent_dim=16, output_dim=16, ffw_latent=32,
                ffw_output=32, num_heads=2, num_layers=3, n_classes=5, seed=0)
    return PerceiverConfig(**{**base, **changes})


@pytest.fixture
def no_processes(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a process was started")
    monkeypatch.setattr(mp, "start_processes", refuse)


def batch(n=8):
    return torch.randn(n, 16, 8), torch.randint(0, 5, (n,))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(lr=float("nan")), ValueError, "lr must be a finite float > 0, got nan"),
    (dict(lr=0.0), ValueError, "lr must be a finite float > 0"),
    (dict(threads=0), ValueError, "threads must be an int >= 1, got 0"),
    (dict(steps=-1), ValueError, "steps must be an int >= 0, got -1"),
    (dict(split_points=[0, 2.5]), ValueError, r"split_points\[1\] must be an int >= 0, got 2.5"),
    (dict(infer=1), ValueError, "infer must be True or False"),
    (dict(start_method="thread"), ValueError, "start_method must be one of"),
    (dict(inputs=torch.randn(0, 16, 8), targets=torch.zeros(0, dtype=torch.long)), ValueError,
     "inputs: input_array has an empty batch"),
    (dict(inputs=torch.randn(8, 16, 7)), ValueError, "inputs: input_array has 7 features per position"),
    (dict(inputs=torch.randn(8, 15, 8)), ValueError, "inputs: input_array has 15 positions"),
    (dict(inputs=torch.randint(0, 5, (8, 16, 8))), TypeError, "inputs: input_type='raw' needs a floating-point"),
    (dict(targets=torch.randint(0, 5, (8, 2))), ValueError, r"targets must have shape \(8,\)"),
    (dict(targets=torch.randn(8)), TypeError, "targets must be an integer tensor of class ids"),
    (dict(targets=torch.full((8,), 5)), ValueError, r"targets must be class ids in \[0, n_classes=5\), got min 5"),
])
def test_bad_run_settings_fail_before_any_process_starts(no_processes, kwargs, error, message):
    inputs, targets = batch()
    kwargs = {"inputs": inputs, "targets": targets, **kwargs}
    with pytest.raises(error, match=message):
        run_pipeline(config(), num_stages=2, n_microbatches=2, **kwargs)


def test_a_job_list_names_the_job_whose_setting_is_bad(no_processes):
    inputs, targets = batch()
    good = PipelineJob(plan_pipeline(config(), 2, n_microbatches=2), inputs, targets)
    bad = PipelineJob(plan_pipeline(config(), 2, n_microbatches=2), inputs, targets, lr=float("inf"))
    with pytest.raises(ValueError, match=r"jobs\[1\]\.lr must be a finite float > 0, got inf"):
        run_pipelines([good, bad])


@pytest.mark.parametrize("argument, value", [("--layers", "0"), ("--steps", "-1"), ("--batch", "-4"),
                                             ("--stages", "0"), ("--microbatches", "0"), ("--lr", "nan")])
def test_the_command_line_answers_bad_numbers_with_a_usage_error(no_processes, capsys, argument, value):
    from percnb.pipeline.__main__ import main
    with pytest.raises(SystemExit) as exit_:
        main([argument, value])
    assert exit_.value.code == 2 and f"argument {argument}: expected" in capsys.readouterr().err


def test_the_command_line_usage_error_has_no_traceback():
    out = subprocess.run([sys.executable, "-m", "percnb.pipeline", "--layers", "0"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "argument --layers: expected an integer >= 1, got '0'" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr[-2000:]


def test_every_stage_group_gets_the_worlds_timeout(monkeypatch):
    from percnb.pipeline import launch
    calls = []
    monkeypatch.setattr(launch.dist, "new_group", lambda ranks, **kwargs: calls.append((ranks, kwargs)))
    launch.stage_group(range(2))
    assert calls == [([0, 1], {"timeout": INIT_TIMEOUT})]
