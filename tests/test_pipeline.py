"""Pipeline parallelism on CPU processes (gloo): exact against the single-process Perceiver."""
import subprocess
import sys
import time

import pytest
import torch

from percnb.config import PerceiverConfig
from percnb.pipeline import (StageModule, balanced_split, choose_backend, module_parameter_counts, plan_pipeline,
                             reference_step, run_pipeline)

RELATIVE = 1e-5  # fp32 sums in another order across microbatches: rounding only


def config(**changes):
    base = dict(input_len=16, input_dim=8, latent_len=4, latent_dim=16, output_dim=16, ffw_latent=32,
                ffw_output=32, num_heads=2, num_layers=3, n_classes=5, seed=0)
    return PerceiverConfig(**{**base, **changes})


def batch(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 16, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_loss_and_gradients_equal_single_process(stages, schedule):
    inputs, targets = batch()
    result = run_pipeline(config(), inputs, targets, stages, schedule=schedule, n_microbatches=4)
    loss, grads = reference_step(config(), inputs, targets)
    assert result.losses[0] == pytest.approx(loss, rel=RELATIVE)
    assert set(result.grads) == set(grads)
    for name, grad in grads.items():
        gap = (result.grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert gap < RELATIVE, (name, gap.item())


def test_each_rank_builds_about_its_share_of_parameters():
    plan = plan_pipeline(config(num_layers=6), 2)
    sizes = [sum(p.numel() for p in StageModule(plan, s).parameters()) for s in range(2)]
    total = sum(module_parameter_counts(config(num_layers=6)))
    assert sum(sizes) == total
    assert all(abs(size - total / 2) < 0.2 * total for size in sizes), sizes


def test_balanced_split_minimises_the_largest_stage():
    assert balanced_split([1, 10, 10, 10, 10, 1], 2) == [0, 3]
    assert balanced_split([5, 5, 5], 3) == [0, 1, 2]


def test_inference_forward_returns_the_models_logits():
    from percnb.models import Perceiver
    inputs, targets = batch()
    result = run_pipeline(config(), inputs, targets, 2, n_microbatches=2, infer=True)
    expected = Perceiver(config()).eval()(inputs, torch.ones(8, 16))
    assert torch.allclose(result.outputs, expected, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_stages=7), "num_stages=7 is more than the model's 6 modules"),
    (dict(num_stages=2, schedule="zero-bubble"), "schedule must be one of"),
    (dict(num_stages=3, schedule="1f1b", n_microbatches=2), "needs n_microbatches >= num_stages"),
    (dict(num_stages=2, batch_size=10, n_microbatches=4), "batch size 10 is not divisible by n_microbatches=4"),
    (dict(num_stages=2, split_points=[1, 3]), "split_points must be 2 increasing module indices starting at 0"),
])
def test_bad_settings_fail_before_any_process_starts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_pipeline(config(), **kwargs)


def test_shared_weights_must_stay_in_one_stage():
    with pytest.raises(ValueError, match="all processors must sit in one stage"):
        plan_pipeline(config(share_weights=True), 2, split_points=[0, 3])


def test_run_pipeline_checks_batch_before_starting():
    inputs, targets = batch(10)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="not divisible"):
        run_pipeline(config(), inputs, targets, 2, n_microbatches=4)
    assert time.perf_counter() - start < 5       # no process was started (generous bound)


def test_a_failing_worker_ends_the_run_with_its_error():
    inputs, targets = batch()
    targets[0] = 99                               # the last stage's loss raises on an out-of-range class
    with pytest.raises(Exception, match="out of bounds|Target 99"):
        run_pipeline(config(), inputs, targets, 2, n_microbatches=2)


def test_backend_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    backend, device_of = choose_backend(2)
    assert backend == "nccl" and device_of(1) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    backend, device_of = choose_backend(2)
    assert backend == "gloo" and device_of(1) == torch.device("cpu")


def test_command_line_help():
    out = subprocess.run([sys.executable, "-m", "percnb.pipeline", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--schedule" in out.stdout and "torchrun" in out.stdout
