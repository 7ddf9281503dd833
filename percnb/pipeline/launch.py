"""Launching pipelines: process groups (backend choice, timeout), the one training loop that single-process,
stage and torchrun runs share (`train_steps`), and `run_pipelines` / `run_pipeline`, which start one local
process per stage (a file rendezvous in a temporary folder), train, and bring back losses, gradients and
timelines.

No process outlives its run: every setting is checked before any process starts (`check_job`); a worker
that raises ends the others; an interrupt (SIGINT, what JupyterLab's "interrupt kernel" sends) ends every
worker before KeyboardInterrupt reaches the caller; a worker whose launcher dies, even by SIGKILL, exits
within a second (`exit_with_parent`); every process group has a timeout (INIT_TIMEOUT)."""
from __future__ import annotations

import os
import pickle
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing import ProcessRaisedException

from .. import checks
from ..config import PerceiverConfig
from ..models import InputEmbedding, Perceiver
from .planning import PipelinePlan, plan_pipeline
from .stages import default_loss, get_distributed_model

# Also the limit of every collective and send/recv: a rank whose peer died stops waiting after it.
INIT_TIMEOUT = timedelta(seconds=60)
START_METHODS = ("spawn", "forkserver", "fork")
ORPHAN_EXIT_CODE = 75       # what a worker exits with when its launcher has died
STOP_SECONDS = 5.0          # how long an interrupted run waits for a worker after SIGTERM before SIGKILL


def choose_backend(num_stages: int) -> Tuple[str, Callable[[int], torch.device]]:
    """NCCL with one GPU per rank when there are at least `num_stages` CUDA devices, else gloo on CPU.

    Returns (backend, device_of) where device_of(local_rank) is the rank's device.
    """
    if torch.cuda.is_available() and torch.cuda.device_count() >= num_stages:
        return "nccl", lambda local_rank: torch.device("cuda", local_rank)
    return "gloo", lambda local_rank: torch.device("cpu")


def exit_with_parent(launcher_pipe=None, poll_seconds: float = 0.5) -> threading.Thread:
    """End this process (exit code ORPHAN_EXIT_CODE) as soon as its launcher is gone, from a daemon thread,
    whatever the main thread is doing (even waiting inside a collective, where signals are not handled).

    launcher_pipe: the read end of a pipe whose write end only the launcher holds (`run_pipelines`); it
    reads end-of-file when the launcher closes it or dies, on every start method (a forkserver worker's
    parent is the fork server, not the launcher). None (torchrun): poll os.getppid(), which changes when
    the parent (torchrun's agent) dies.
    """
    parent = os.getppid()

    def watch() -> None:
        if launcher_pipe is not None:
            try:
                launcher_pipe.recv_bytes()     # the launcher never writes: this returns only by EOFError
            except (EOFError, OSError):
                pass
        else:
            while os.getppid() == parent != 1:    # 1: reparented to init, the parent died before this started
                time.sleep(poll_seconds)
        print(f"percnb pipeline worker {os.getpid()}: the launcher is gone, exiting", file=sys.stderr, flush=True)
        os._exit(ORPHAN_EXIT_CODE)

    thread = threading.Thread(target=watch, name="percnb-exit-with-parent", daemon=True)
    thread.start()
    return thread


def init_process_group(backend: str, device: torch.device, **kwargs) -> None:
    """`torch.distributed.init_process_group` with the timeout always set and, for NCCL, the
    process bound to its GPU first (NCCL collectives and split groups need a device per rank)."""
    if backend == "nccl":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(backend, timeout=INIT_TIMEOUT, **kwargs)


class SingleProcess:
    """The plain `Perceiver` behind `DistributedPerceiver`'s interface: the 1-stage baseline a pipeline
    is measured against, trained by the same loop."""

    is_first = is_last = True
    events: List[tuple] = []

    def __init__(self, config: PerceiverConfig, device: torch.device):
        self.module, self.device = Perceiver(config).to(device), device

    def named_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        return self.module.named_parameters()

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None) -> float:
        mask = None if attention_mask is None else attention_mask.to(self.device)
        loss = default_loss(self.module.train()(inputs.to(self.device), mask), targets.to(self.device))
        loss.backward()
        return loss.item()

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self.module.eval()(inputs.to(self.device), mask)


def train_steps(model, inputs: Optional[torch.Tensor], targets: Optional[torch.Tensor],
                attention_mask: Optional[torch.Tensor] = None, steps: int = 1, lr: float = 1e-3,
                infer: bool = False, group=None, on_step: Optional[Callable[[int, float], None]] = None) -> dict:
    """The one training loop: `steps` AdamW steps (lr, no weight decay: the update percnb.train.fit makes
    with weight_decay=0) of `model`, a `DistributedPerceiver` stage or a `SingleProcess`, on one batch,
    then with `infer` an inference pass. Stages start each step together (a barrier of `group`), so that
    their timings compare. `on_step(step, loss)` is called on the last stage.

    Returns this rank's record: losses (None off the last stage), the first step's gradients by the
    name they have in `Perceiver`, per-step events, wall and CPU seconds, parameter count, outputs.
    """
    optimizer = torch.optim.AdamW([p for _, p in model.named_parameters()], lr=lr, weight_decay=0.0)
    inputs, attention_mask = (inputs, attention_mask) if model.is_first else (None, None)
    targets = targets if model.is_last else None
    losses, grads, events, seconds, cpu = [], {}, [], [], []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        if not isinstance(model, SingleProcess):
            dist.barrier(group=group)
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(model.train_step(inputs, targets, attention_mask))
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        events.append(list(model.events))
        if step == 0:
            grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        if on_step is not None and model.is_last:
            on_step(step, losses[-1])
    outputs = model.forward(inputs, attention_mask) if infer else None
    return {"losses": losses, "grads": grads, "events": events, "seconds": seconds, "cpu": cpu,
            "parameters": sum(p.numel() for p in model.module.parameters()),
            "outputs": None if outputs is None else outputs.cpu()}


@dataclass
class PipelineJob:
    """One run for `run_pipelines`: train `steps` AdamW steps (lr, no weight decay) of `plan` on one
    batch (inputs (batch, input_len, features) or token ids, targets, optional attention_mask
    (batch, input_len)), then with `infer` an inference pass. A plan with 1 stage runs the plain
    `Perceiver` instead (the baseline a pipeline is measured against)."""

    plan: PipelinePlan
    inputs: torch.Tensor
    targets: torch.Tensor
    attention_mask: Optional[torch.Tensor] = None
    steps: int = 1
    lr: float = 1e-3
    infer: bool = False


@dataclass
class PipelineResult:
    """What a run brings back: one loss per step, the gradients of the first step (name -> tensor, over
    all stages, names as in `Perceiver`), each stage's parameter count, per-stage lists (one per step)
    of (kind, microbatch, unix_time) events, the slowest rank's seconds per step, the CPU seconds all
    ranks used per step (over seconds_per_step: how many cores the run got), and with `infer` the
    logits of an inference pass after training."""

    losses: List[float]
    grads: Dict[str, torch.Tensor]
    stage_parameters: List[int]
    events: List[List[List[tuple]]]
    seconds_per_step: List[float]
    cpu_seconds_per_step: List[float]
    outputs: Optional[torch.Tensor] = None


def check_job(job: PipelineJob, name: str = "") -> None:
    """Raise a ValueError or TypeError for any setting of `job` that a worker would trip over only after its
    start-up (seconds per process): split points, steps, lr, infer, and the batch's shapes, dtypes and
    ranges against the config. `name` prefixes the settings' names in messages (e.g. "jobs[2].")."""
    if not isinstance(job, PipelineJob):
        raise TypeError(f"{name or 'job'} must be a PipelineJob, got {type(job).__name__}")
    plan, inputs, targets = job.plan, job.inputs, job.targets
    if not isinstance(plan, PipelinePlan):
        raise TypeError(f"{name}plan must be a PipelinePlan (from plan_pipeline), got {type(plan).__name__}")
    config = plan.config
    split_points = [checks.int_at_least(f"{name}split_points[{k}]", point, 0)
                    for k, point in enumerate(plan.split_points)]
    checks.int_at_least(f"{name}steps", job.steps, 0)
    checks.positive_float(f"{name}lr", job.lr)
    checks.boolean(f"{name}infer", job.infer)
    with torch.device("meta"):                              # the input checks of the model, no weights
        embedding = InputEmbedding(config)
    try:
        embedding.check(inputs)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{name}inputs: {error}") from None
    plan_pipeline(config, plan.num_stages, split_points, plan.schedule, plan.n_microbatches, batch_size=len(inputs))
    wanted = (len(inputs),) if config.decoder_reduction is not None else (len(inputs), config.output_len)
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"{name}targets must be an integer tensor of class ids with shape {wanted}, "
                        f"got {checks.describe(targets)}")
    if tuple(targets.shape) != wanted:
        raise ValueError(f"{name}targets must have shape {wanted} (one class id per "
                         f"{'sample' if len(wanted) == 1 else 'output position'}), got {checks.describe(targets)}")
    classes = config.n_classes if config.decoder_projection else None
    if classes is not None and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= classes):
        raise ValueError(f"{name}targets must be class ids in [0, n_classes={classes}), got min "
                         f"{int(targets.min())} and max {int(targets.max())}")
    if job.attention_mask is not None:
        checks.attention_mask(job.attention_mask, inputs.shape[0], inputs.shape[1], name=f"{name}attention_mask")


def stage_group(ranks: Sequence[int]):
    """A process group of `ranks` (collective over the whole world), with the world's timeout: new_group
    would otherwise give it the backend's default (30 minutes for gloo), so a dead peer would hang it."""
    return dist.new_group(list(ranks), timeout=INIT_TIMEOUT)


def _worker(rank: int, world: int, jobs: List[PipelineJob], threads: int, out_dir: str, launcher_pipe,
            inherited_writer) -> None:
    """One process of `run_pipelines`: runs every job whose stages include this rank, in order; exits as soon
    as the launcher is gone (`exit_with_parent`)."""
    if inherited_writer is not None:    # fork copied the launcher's end of the pipe: only the launcher may hold it
        inherited_writer.close()
    exit_with_parent(launcher_pipe)
    torch.set_num_threads(threads)
    backend, device_of = choose_backend(world)
    device = device_of(rank)
    init_process_group(backend, device, init_method="file://" + os.path.join(out_dir, "rendezvous"),
                       rank=rank, world_size=world)
    try:
        for j, job in enumerate(jobs):
            plan = job.plan
            # new_group is collective over the whole world: every rank creates every job's group
            group = stage_group(range(plan.num_stages)) if 1 < plan.num_stages < world else None
            if rank < plan.num_stages:
                if plan.num_stages == 1:
                    model = SingleProcess(plan.config, device)
                else:
                    model = get_distributed_model(plan.config, plan.num_stages, split_points=plan.split_points,
                                                  schedule=plan.schedule, n_microbatches=plan.n_microbatches,
                                                  device=device, group=group)
                record = train_steps(model, job.inputs, job.targets, job.attention_mask, job.steps, job.lr,
                                     job.infer, group)
                torch.save(record, os.path.join(out_dir, f"job{j}_rank{rank}.pt"))
            dist.barrier()                    # idle ranks wait here: jobs never overlap in time
    finally:
        dist.destroy_process_group()


@contextmanager
def worker_environment() -> Iterator[None]:
    """Start worker processes inside this: they get OMP_WAIT_POLICY=PASSIVE unless the user set a policy.

    A worker's OpenMP threads otherwise spin-wait between parallel regions; pipeline stages wait for each
    other all the time, so spinning workers steal the cores the other stages need (the Makefile sets it
    for `make`, but a notebook opened any other way did not). Spawned children copy os.environ when they
    start; the parent's own setting is restored on exit.
    """
    user_value = os.environ.get("OMP_WAIT_POLICY")
    if user_value is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        yield
    finally:
        if user_value is None:
            os.environ.pop("OMP_WAIT_POLICY", None)


def run_pipelines(jobs: Sequence[PipelineJob], threads: int = 1, start_method: str = "spawn") -> List[PipelineResult]:
    """Run several `PipelineJob`s one after another in ONE set of local processes (as many as the
    largest job has stages; a smaller job uses the first ranks while the others wait).

    Starting processes costs seconds (each imports torch), so tests and benchmarks batch their runs
    here. Every job is checked before any process starts (`check_job`); NCCL on GPUs when there are
    enough, else gloo on CPU, `threads` threads per process, started by `start_method` ("spawn",
    "forkserver" or "fork"). A worker that raises ends every process and its error is re-raised here
    (as torch.multiprocessing.ProcessRaisedException); collectives time out after INIT_TIMEOUT, so a
    failure never hangs. An interrupt (KeyboardInterrupt, e.g. JupyterLab's "interrupt kernel") or any
    other exception here ends every worker, then propagates; if this process is killed outright, the
    workers see their pipe close and exit.
    """
    import torch.multiprocessing as mp
    jobs = list(jobs)
    if not jobs:
        raise ValueError("jobs is empty: give at least one PipelineJob")
    for i, job in enumerate(jobs):
        check_job(job, f"jobs[{i}].")
    checks.positive_int("threads", threads)
    checks.choice("start_method", start_method, START_METHODS)
    world = max(job.plan.num_stages for job in jobs)
    with tempfile.TemporaryDirectory() as out_dir:
        with worker_environment():
            _start_and_join(mp, start_method, (world, jobs, threads, out_dir), world)
        results = []
        for j, job in enumerate(jobs):
            parts = [torch.load(os.path.join(out_dir, f"job{j}_rank{r}.pt"), weights_only=False)
                     for r in range(job.plan.num_stages)]
            results.append(PipelineResult(
                losses=parts[-1]["losses"], grads={n: g for part in parts for n, g in part["grads"].items()},
                stage_parameters=[p["parameters"] for p in parts], events=[p["events"] for p in parts],
                seconds_per_step=[max(s) for s in zip(*(p["seconds"] for p in parts))],
                cpu_seconds_per_step=[sum(s) for s in zip(*(p["cpu"] for p in parts))],
                outputs=parts[-1]["outputs"]))
    return results


def _start_and_join(mp, start_method: str, args: tuple, nprocs: int) -> None:
    """Start `nprocs` workers `_worker(rank, *args, pipe, writer)` and wait for them; on any exception here
    (KeyboardInterrupt included) stop them all (closing the pipe they watch, SIGTERM, SIGKILL after
    STOP_SECONDS) and re-raise."""
    reader, writer = mp.get_context(start_method).Pipe(duplex=False)
    context = None
    try:
        context = mp.start_processes(_worker, args=(*args, reader, writer if start_method == "fork" else None),
                                     nprocs=nprocs, join=False, start_method=start_method)
        while not context.join(timeout=1.0):
            pass
    except BaseException as error:
        writer.close()                       # every worker's watcher reads end-of-file and exits
        for process in context.processes if context is not None else []:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + STOP_SECONDS
        for process in context.processes if context is not None else []:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        cause = _root_cause(error, context)
        if cause is not None:
            raise cause from error
        raise
    finally:
        writer.close()
        reader.close()


# What a stage raises when another stage died first: a consequence, not the cause
_PEER_DIED = ("Connection closed by peer", "remote worker crashing", "Connection reset by peer")


def _root_cause(error: BaseException, context) -> Optional[BaseException]:
    """When the worker error torch reported is only a stage noticing that its peer died, the error of a
    worker that failed for its own reason (read from torch's per-process error files), else None."""
    if context is None or not isinstance(error, ProcessRaisedException):
        return None
    if not any(marker in str(error) for marker in _PEER_DIED):
        return None
    for rank, path in enumerate(context.error_files):
        try:
            with open(path, "rb") as file:
                trace = pickle.load(file)
        except (OSError, EOFError, pickle.UnpicklingError, TypeError):
            continue                          # this worker wrote no error
        if isinstance(trace, str) and not any(marker in trace for marker in _PEER_DIED):
            message = f"\n\n-- Process {rank:d} terminated with the following error:\n{trace}"
            return ProcessRaisedException(message, rank, context.processes[rank].pid)
    return None


def run_pipeline(config: PerceiverConfig, inputs: torch.Tensor, targets: torch.Tensor, num_stages: int = 2, *,
                 split_points: Optional[Sequence[int]] = None, schedule: str = "1f1b", n_microbatches: int = 4,
                 steps: int = 1, lr: float = 1e-3, threads: int = 1, infer: bool = False,
                 attention_mask: Optional[torch.Tensor] = None, start_method: str = "spawn") -> PipelineResult:
    """Train `steps` AdamW steps (no weight decay) of a `num_stages`-process pipeline on one batch.

    inputs: (batch, input_len, features) floats or (batch, input_len) token ids; targets: (batch,)
    class ids (or (batch, output_len) without decoder_reduction); attention_mask: (batch, input_len).
    Starts one process per stage (torch.multiprocessing, `start_method`), NCCL on GPUs when there are
    enough, else gloo on CPU, each with `threads` threads. Settings are checked before any process
    starts; a worker that raises ends every process and re-raises here, so a failure never hangs; an
    interrupt ends every worker, then raises KeyboardInterrupt here (see `run_pipelines`). Returns a
    `PipelineResult`; with `infer`, its outputs are the logits of an inference pass after the
    training steps (steps=0: of the initial weights).
    """
    if split_points is not None:
        split_points = [checks.int_at_least(f"split_points[{k}]", p, 0) for k, p in enumerate(split_points)]
    plan = plan_pipeline(config, num_stages, split_points, schedule, n_microbatches, batch_size=len(inputs))
    job = PipelineJob(plan, inputs, targets, attention_mask, steps, lr, infer)
    check_job(job)
    return run_pipelines([job], threads, start_method)[0]


def run_under_torchrun(config: PerceiverConfig, inputs: torch.Tensor, targets: torch.Tensor, schedule: str,
                       n_microbatches: int, steps: int, lr: float) -> None:
    """This process's part of a torchrun launch (one stage per process; torchrun sets RANK, WORLD_SIZE
    and the rendezvous): train `steps` steps and print the loss of each on the last stage."""
    world, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    exit_with_parent()                       # torchrun's agent is the parent: die with it
    backend, device_of = choose_backend(world)
    init_process_group(backend, device_of(local_rank))
    try:
        model = get_distributed_model(config, schedule=schedule, n_microbatches=n_microbatches,
                                      device=device_of(local_rank))
        train_steps(model, inputs, targets, steps=steps, lr=lr,
                    on_step=lambda step, loss: print(f"step {step}: loss {loss:.4f} ({backend}, {world} stages)",
                                                     flush=True))
    finally:
        dist.destroy_process_group()


def reference_step(config: PerceiverConfig, inputs: torch.Tensor, targets: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None,
                   loss_fn: Callable = default_loss) -> Tuple[float, Dict[str, torch.Tensor]]:
    """Loss and gradients of the single-process Perceiver on the same batch (to check a pipeline)."""
    model = Perceiver(config)
    loss = loss_fn(model(inputs, attention_mask), targets)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
