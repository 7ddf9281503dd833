"""Pipeline parallelism on CPU processes (gloo): exact against the single-process Perceiver.

Starting processes costs seconds each (every one imports torch), so all the runs that succeed share
ONE launch of 3 processes (`run_pipelines`, module fixture); only the failure test launches again.
"""
import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from percnb.config import PerceiverConfig
from percnb.models import Perceiver
from percnb.pipeline import (
    INIT_TIMEOUT,
    PipelineJob,
    StageModule,
    balanced_split,
    choose_backend,
    idle_fractions,
    microbatches_in_flight,
    module_parameter_counts,
    plan_pipeline,
    reference_step,
    run_pipeline,
    run_pipelines,
)

RELATIVE = 1e-5  # fp32 sums in another order across microbatches: rounding only


def config(**changes):
    base = dict(input_len=16, input_dim=8, latent_len=4, latent_dim=16, output_dim=16, ffw_latent=32,
                ffw_output=32, num_heads=2, num_layers=3, n_classes=5, seed=0)
    return PerceiverConfig(**{**base, **changes})


def batch(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 16, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def padding_mask(n=8):
    """Sample i attends to its first 16 - i positions: every row differs, none is empty."""
    return torch.arange(16).expand(n, 16) < (16 - torch.arange(n)).unsqueeze(1)


# name -> (config, stages, split_points, schedule, microbatches, uses the padding mask)
CASES = {
    "2 stages gpipe": (config(), 2, None, "gpipe", 4, False),
    "2 stages 1f1b": (config(), 2, None, "1f1b", 4, False),
    "3 stages gpipe": (config(), 3, None, "gpipe", 4, False),
    "3 stages 1f1b": (config(), 3, None, "1f1b", 4, False),
    # a cut right after the embeddings carries (inputs, mask, latents, queries); a padding mask must survive it
    "3 stages cut after embeddings, masked": (config(), 3, [0, 1, 4], "1f1b", 4, True),
    # the paper's pooling decoder has no queries: boundaries carry the latents alone
    "2 stages latent_pool": (config(decoder_type="latent_pool"), 2, None, "gpipe", 2, False),
}


@pytest.fixture(autouse=True)
def one_thread():
    """The workers use one thread each; so does the reference (tiny ops on a busy 2-core machine are
    much slower with two spinning OpenMP threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs():
    inputs, targets = batch()
    jobs = [PipelineJob(plan_pipeline(cfg, stages, split, schedule, m), inputs, targets,
                        padding_mask() if masked else None, steps=1)
            for cfg, stages, split, schedule, m, masked in CASES.values()]
    jobs.append(PipelineJob(plan_pipeline(config(), 2, schedule="gpipe", n_microbatches=2), inputs, targets,
                            steps=0, infer=True))
    results = run_pipelines(jobs)
    return dict(zip([*CASES, "inference"], results))


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_loss_and_gradients_equal_single_process(runs, case):
    cfg, *_, masked = CASES[case]
    inputs, targets = batch()
    loss, grads = reference_step(cfg, inputs, targets, padding_mask() if masked else None)
    result = runs[case]
    assert result.losses[0] == pytest.approx(loss, rel=RELATIVE)
    assert set(result.grads) == set(grads)
    for name, grad in grads.items():
        gap = (result.grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert gap < RELATIVE, (name, gap.item())


def test_inference_forward_returns_the_models_logits(runs):
    inputs, _ = batch()
    expected = Perceiver(config()).eval()(inputs)
    torch.testing.assert_close(runs["inference"].outputs, expected, rtol=1e-5, atol=1e-6)


def test_timeline_events_cover_every_microbatch(runs):
    events = runs["3 stages 1f1b"].events
    assert len(events) == 3                                     # one list per stage ...
    for stage in events:
        (step,) = stage                                         # ... of one list per step
        kinds = {(kind, mb) for kind, mb, _ in step}
        for kind in ("forward_start", "forward_end", "backward_start", "backward_end"):
            assert {mb for k, mb in kinds if k == kind} == {0, 1, 2, 3}, kind
        times = {(kind, mb): t for kind, mb, t in step}
        assert all(times[("forward_start", mb)] <= times[("forward_end", mb)] <= times[("backward_start", mb)]
                   <= times[("backward_end", mb)] for mb in range(4))


def test_gpipe_holds_every_microbatch_and_1f1b_at_most_the_stages_ahead(runs):
    gpipe = [microbatches_in_flight(stage[0]) for stage in runs["3 stages gpipe"].events]
    one_f_one_b = [microbatches_in_flight(stage[0]) for stage in runs["3 stages 1f1b"].events]
    assert gpipe == [4, 4, 4]
    assert all(1 <= alive <= 3 - s for s, alive in enumerate(one_f_one_b)), one_f_one_b


def test_idle_fractions_from_a_constructed_timeline():
    # stage 0 busy 0-1 and 2-3, stage 1 busy 1-2 and 3-4: each idle half of a 4-unit step
    kinds = ("forward_start", "forward_end", "backward_start", "backward_end")
    events = [[(kind, 0, t) for kind, t in zip(kinds, (0.0, 1.0, 2.0, 3.0))],
              [(kind, 0, t) for kind, t in zip(kinds, (1.0, 2.0, 3.0, 4.0))]]
    assert idle_fractions(events) == pytest.approx([0.5, 0.5])
    assert microbatches_in_flight(events[0]) == 1


def test_a_stage_holds_its_entries_of_the_models_state_dict():
    plan = plan_pipeline(config(), 2, split_points=[0, 3])
    full = Perceiver(config()).state_dict()
    stages = [StageModule(plan, s).model_state_dict() for s in range(2)]
    assert sorted(stages[0].keys() | stages[1].keys()) == sorted(full) and not stages[0].keys() & stages[1].keys()
    assert all(torch.equal(value, full[key]) for stage in stages for key, value in stage.items())


def test_each_rank_builds_about_its_share_of_parameters(runs):
    counts = runs["2 stages 1f1b"].stage_parameters
    total = Perceiver(config()).num_parameters()
    assert sum(counts) == total
    # cut by parameters (the default cut balances compute: tests/test_planning.py)
    by_parameters = balanced_split(module_parameter_counts(config(num_layers=6)), 3)
    plan = plan_pipeline(config(num_layers=6), 3, split_points=by_parameters)
    sizes = [sum(p.numel() for p in StageModule(plan, s).parameters()) for s in range(3)]
    total = Perceiver(config(num_layers=6)).num_parameters()
    assert sum(sizes) == total
    assert all(abs(size - total / 3) < 0.1 * total for size in sizes), sizes


def test_balanced_split_minimises_the_largest_stage():
    assert balanced_split([1, 10, 10, 10, 10, 1], 2) == [0, 3]
    assert balanced_split([5, 5, 5], 3) == [0, 1, 2]
    counts = module_parameter_counts(config())
    assert len(counts) == 3 + 3 and sum(counts) == Perceiver(config()).num_parameters()
    assert counts[2] == sum(p.numel() for p in Perceiver(config()).processors[0].parameters())


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


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_microbatches=3), "batch size 8 is not divisible by n_microbatches=3"),
    (dict(num_stages=9), "more than the model's 6 modules"),
    (dict(schedule="interleaved"), "schedule must be one of"),
    (dict(num_stages=3, n_microbatches=2), "needs n_microbatches >= num_stages"),
    (dict(attention_mask=torch.ones(8, 15)), r"attention_mask must have shape \(batch, input_len\)"),
])
def test_run_pipeline_checks_settings_before_starting(monkeypatch, kwargs, message):
    def no_processes(*args, **kw):
        raise AssertionError("a process was started")
    monkeypatch.setattr(mp, "start_processes", no_processes)
    inputs, targets = batch()
    with pytest.raises(ValueError, match=message):
        run_pipeline(config(), inputs, targets, **{"num_stages": 2, **kwargs})


def test_a_failing_worker_ends_the_run_with_its_error(monkeypatch):
    # every bad setting is refused before start-up now, so make the last stage fail inside its step; fork
    # carries this monkeypatch into the workers
    from percnb.pipeline import launch
    real_train_steps = launch.train_steps

    def last_stage_fails(model, *args, **kwargs):
        if model.is_last:
            raise RuntimeError("the last stage failed on purpose")
        return real_train_steps(model, *args, **kwargs)

    monkeypatch.setattr(launch, "train_steps", last_stage_fails)
    # The first stage waits for a gradient that never comes. Give its collectives a 30-minute timeout: a
    # run that ends in minutes (start-up under heavy load took ~2 min here) was stopped by the launcher,
    # not by the timeout. The gap (minutes vs half an hour) keeps this from depending on the machine's load.
    slow_timeout = timedelta(minutes=30)
    monkeypatch.setattr(launch, "INIT_TIMEOUT", slow_timeout)
    inputs, targets = batch()
    start = time.perf_counter()
    with pytest.raises(mp.ProcessRaisedException, match="the last stage failed on purpose"):
        run_pipeline(config(), inputs, targets, 2, n_microbatches=2, start_method="fork")
    assert time.perf_counter() - start < slow_timeout.total_seconds() / 2


def test_backend_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    backend, device_of = choose_backend(2)
    assert backend == "nccl" and device_of(1) == torch.device("cuda", 1)
    assert choose_backend(4)[0] == "nccl"
    assert choose_backend(5)[0] == "gloo"                       # fewer GPUs than stages: all on CPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    backend, device_of = choose_backend(2)
    assert backend == "gloo" and device_of(1) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_backend(1)[0] == "gloo"


def test_nccl_binds_each_process_to_its_gpu_before_init(monkeypatch):
    from percnb.pipeline import launch
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(launch.dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend, kw["device_id"], kw["timeout"])))
    launch.init_process_group("nccl", torch.device("cuda", 1), rank=1, world_size=2)
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl", torch.device("cuda", 1), INIT_TIMEOUT)]


def test_command_line_help():
    out = subprocess.run([sys.executable, "-m", "percnb.pipeline", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--schedule" in out.stdout and "torchrun" in out.stdout


def test_command_line_rejects_bad_settings_before_starting():
    out = subprocess.run([sys.executable, "-m", "percnb.pipeline", "--stages", "3", "--microbatches", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "needs n_microbatches >= num_stages" in out.stderr, out.stderr[-1000:]


def test_workers_start_with_a_passive_omp_wait_policy_unless_the_user_set_one(monkeypatch):
    import torch.multiprocessing

    from percnb.pipeline.launch import worker_environment
    seen = []

    class Started(Exception):
        pass

    def fake_start_processes(*args, **kwargs):
        seen.append(os.environ.get("OMP_WAIT_POLICY"))
        raise Started
    monkeypatch.setattr(torch.multiprocessing, "start_processes", fake_start_processes)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    config = PerceiverConfig(input_len=8, input_dim=8, latent_len=4, latent_dim=8, num_layers=2, n_classes=3)
    job = PipelineJob(plan_pipeline(config, 2, n_microbatches=2), torch.randn(4, 8, 8),
                      torch.zeros(4, dtype=torch.long))
    with pytest.raises(Started):
        run_pipelines([job])
    assert seen == ["PASSIVE"] and "OMP_WAIT_POLICY" not in os.environ      # set for the workers, then restored
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with worker_environment():
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"                   # the user's choice wins
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_error_reported_is_the_failing_stages_not_its_peers_lost_connection(tmp_path):
    # torch reports whichever worker it sees first; a stage whose peer died fails too, with gloo's
    # "Connection closed by peer": the launcher reports the stage that failed for its own reason
    import pickle
    import types

    from percnb.pipeline.launch import _root_cause
    files = []
    for rank, trace in enumerate(["RuntimeError: [gloo] Connection closed by peer [127.0.0.1]:7078",
                                  "RuntimeError: the last stage failed on purpose"]):
        path = tmp_path / f"error{rank}"
        path.write_bytes(pickle.dumps(trace))
        files.append(str(path))
    context = types.SimpleNamespace(error_files=files, processes=[types.SimpleNamespace(pid=10),
                                                                 types.SimpleNamespace(pid=11)])
    seen = mp.ProcessRaisedException("-- Process 0: Connection closed by peer", 0, 10)
    cause = _root_cause(seen, context)
    assert isinstance(cause, mp.ProcessRaisedException) and cause.error_index == 1
    assert "the last stage failed on purpose" in str(cause)
    own = mp.ProcessRaisedException("-- Process 1: the last stage failed on purpose", 1, 11)
    assert _root_cause(own, context) is None                       # already the cause: kept as it is
