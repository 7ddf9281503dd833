"""Pipeline-parallel Perceiver on `torch.distributed.pipelining` (GPipe and 1F1B schedules).

The Perceiver is an `nn.Sequential` of num_layers + 3 modules (embeddings, encoder, processors,
decoder). A pipeline cuts it into contiguous stages, one per process (rank); each rank builds only
its own modules (per-module seeding makes them equal to the single-process model's), and a batch is
cut into microbatches that flow through the stages so that stages work at the same time.

What crosses a stage boundary is always a tuple of tensors, fixed by where the cut is: after the
embeddings `(inputs, mask, latents[, queries])`, after any later module `(latents[, queries])`
(queries only with decoder_type='attention'). The mask is a bool tensor (batch, input_len),
True = attend; a batch given without a mask travels with an all-True one, which attends exactly
where no mask does. Attention maps are not carried (pipelines train; use `Perceiver` to look).

Entry points: `get_distributed_model` (inside an initialised process group: this rank's stage and
schedule), `run_pipeline` / `run_pipelines` (start N local processes, train, return losses,
gradients and per-microbatch timings) and `python -m percnb.pipeline` / `torchrun ... -m
percnb.pipeline`.
"""
from __future__ import annotations

import argparse
import itertools
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import PerceiverConfig
from .models import Perceiver, _check_mask, get_sequential_from_config

SCHEDULES = ("gpipe", "1f1b")
# Also the limit of every collective and send/recv: a rank whose peer died stops waiting after it.
INIT_TIMEOUT = timedelta(seconds=60)


# --------------------------------------------------------------------------- planning (no processes)

def module_parameter_counts(config: PerceiverConfig) -> List[int]:
    """Parameters of each sequential module (embeddings, encoder, processors..., decoder), built on
    the meta device so that nothing is allocated."""
    with torch.device("meta"):
        modules = list(get_sequential_from_config(config))
    return [sum(p.numel() for p in m.parameters()) for m in modules]


def balanced_split(counts: Sequence[int], num_stages: int) -> List[int]:
    """First module index of each stage: contiguous stages whose largest parameter count is smallest."""
    n = len(counts)
    best, best_cost = None, None
    for cuts in itertools.combinations(range(1, n), num_stages - 1):
        bounds = (0, *cuts, n)
        cost = max(sum(counts[a:b]) for a, b in zip(bounds, bounds[1:]))
        if best_cost is None or cost < best_cost:
            best, best_cost = [0, *cuts], cost
    return best


@dataclass
class PipelinePlan:
    """A validated pipeline: which modules each stage holds, and how a step is scheduled."""

    config: PerceiverConfig
    num_stages: int
    split_points: List[int]
    schedule: str = "1f1b"
    n_microbatches: int = 4

    def stage_indices(self, stage: int) -> List[int]:
        bounds = self.split_points + [self.config.num_layers + 3]
        return list(range(bounds[stage], bounds[stage + 1]))


def plan_pipeline(config: PerceiverConfig, num_stages: int, split_points: Optional[Sequence[int]] = None,
                  schedule: str = "1f1b", n_microbatches: int = 4, batch_size: Optional[int] = None) -> PipelinePlan:
    """Check the settings and cut the model; every error here comes before any process starts.

    split_points: the first module index of each stage (starting with 0), e.g. [0, 4] for two
    stages; by default stages are balanced by parameter count.
    """
    if not isinstance(config, PerceiverConfig):
        raise TypeError(f"config must be a PerceiverConfig, got {type(config).__name__}")
    modules = config.num_layers + 3
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
    if num_stages > modules:
        raise ValueError(f"num_stages={num_stages} is more than the model's {modules} modules (embeddings, "
                         f"encoder, {config.num_layers} processors, decoder); use at most {modules} stages")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(n_microbatches, bool) or not isinstance(n_microbatches, int) or n_microbatches < 1:
        raise ValueError(f"n_microbatches must be an int >= 1, got {n_microbatches!r}")
    if schedule == "1f1b" and n_microbatches < num_stages:
        raise ValueError(f"schedule '1f1b' needs n_microbatches >= num_stages, got {n_microbatches} < {num_stages}")
    if batch_size is not None and batch_size % n_microbatches:
        raise ValueError(f"batch size {batch_size} is not divisible by n_microbatches={n_microbatches}")
    if split_points is None:
        split_points = balanced_split(module_parameter_counts(config), num_stages)
    split_points = list(split_points)
    if (len(split_points) != num_stages or split_points[0] != 0 or split_points != sorted(set(split_points))
            or split_points[-1] >= modules):
        raise ValueError(f"split_points must be {num_stages} increasing module indices starting at 0 and below "
                         f"{modules}, got {split_points}")
    plan = PipelinePlan(config, num_stages, split_points, schedule, n_microbatches)
    if config.share_weights and config.num_layers > 1:
        holders = {s for s in range(num_stages) for i in plan.stage_indices(s) if 2 <= i < modules - 1}
        if len(holders) > 1:
            raise ValueError("share_weights=True reuses one processor block, so all processors must sit in one "
                             f"stage; stages {sorted(holders)} hold processors with split_points={split_points}")
    return plan



def choose_backend(num_stages: int) -> Tuple[str, Callable[[int], torch.device]]:
    """NCCL with one GPU per rank when there are at least `num_stages` CUDA devices, else gloo on CPU.

    Returns (backend, device_of) where device_of(local_rank) is the rank's device.
    """
    if torch.cuda.is_available() and torch.cuda.device_count() >= num_stages:
        return "nccl", lambda local_rank: torch.device("cuda", local_rank)
    return "gloo", lambda local_rank: torch.device("cpu")


def init_process_group(backend: str, device: torch.device, **kwargs) -> None:
    """`torch.distributed.init_process_group` with the timeout always set and, for NCCL, the
    process bound to its GPU first (NCCL collectives and split groups need a device per rank)."""
    if backend == "nccl":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(backend, timeout=INIT_TIMEOUT, **kwargs)


# --------------------------------------------------------------------------- one stage

class _BackwardProbe(torch.autograd.Function):
    """Identity that records the time when backward reaches it (the end of a stage's backward)."""

    @staticmethod
    def forward(ctx, probe, x, events, mb):
        ctx.events, ctx.mb = events, mb
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.events.append(("backward_end", ctx.mb, time.time()))
        return None, grad, None, None


class StageModule(nn.Module):
    """The modules of one stage, with tensor-only inputs and outputs (see the module docstring).

    forward(*tensors): the first stage takes (input_array, mask (batch, input_len) bool); a later
    stage takes what the previous one returned. The last stage returns the logits. Each call
    appends (kind, microbatch, unix_time) to `events` for kinds forward_start, forward_end,
    backward_start and backward_end (the backward ones when autograd runs through the stage). On a
    GPU these are the times the work was queued, not finished: CUDA runs asynchronously.
    """

    def __init__(self, plan: PipelinePlan, stage: int):
        super().__init__()
        self.config, self.indices = plan.config, plan.stage_indices(stage)
        self.model = get_sequential_from_config(plan.config, self.indices)
        self.events: List[tuple] = []
        self._mb = 0

    def forward(self, *tensors: torch.Tensor):
        start, mb = time.time(), self._mb
        self._mb += 1
        self.events.append(("forward_start", mb, start))
        recording = torch.is_grad_enabled()
        if recording:  # backward reaches the stage's input last: that is where its backward ends
            probe = torch.zeros((), requires_grad=True)
            tensors = (_BackwardProbe.apply(probe, tensors[0], self.events, mb),) + tensors[1:]
        first = self.indices[0]
        if first == 0:
            inputs, mask = tensors
            h = self.model[0](inputs, mask, None)
            rest = list(self.model)[1:]
        elif first == 1:
            inputs, mask, latents, *queries = tensors
            h = (inputs, mask, latents, queries[0] if queries else None)
            rest = list(self.model)
        else:
            latents, *queries = tensors
            h = (latents, queries[0] if queries else None, None)
            rest = list(self.model)
        for module in rest:
            h = module(h)
        out = tuple(t.contiguous() for t in self._pack(h))     # send/recv need contiguous buffers
        if recording and out[0].requires_grad:
            out[0].register_hook(lambda g, mb=mb: self.events.append(("backward_start", mb, time.time())) or g)
        self.events.append(("forward_end", mb, time.time()))
        return out if len(out) > 1 else out[0]

    def _pack(self, h) -> Tuple[torch.Tensor, ...]:
        last = self.indices[-1]
        if last == self.config.num_layers + 2:             # decoder: (logits, attentions)
            return (h[0],)
        if last == 0:                                     # embeddings: (x, mask, latents, queries)
            x, mask, latents, queries = h
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            return (x, mask, latents) + ((queries,) if queries is not None else ())
        latents, queries = h[0], h[1]
        return (latents,) + ((queries,) if queries is not None else ())

    def reset_events(self) -> None:
        self.events, self._mb = [], 0

    def drop_extra_calls(self, n_microbatches: int) -> None:
        """Keep the events of the last `n_microbatches` forward calls, numbered from 0. On its first
        step a schedule runs each stage once more, before the microbatches, to learn the shapes it
        will send and receive (torch.distributed.pipelining's metadata inference)."""
        extra = self._mb - n_microbatches
        if extra > 0:
            self.events = [(kind, mb - extra, t) for kind, mb, t in self.events if mb >= extra]
            self._mb = n_microbatches


def microbatches_in_flight(events: Sequence[tuple]) -> int:
    """Most microbatches whose forward had ended and whose backward had not, at any moment of one
    stage's step: how many microbatches' activations the stage held at once (GPipe: all of them;
    1F1B: at most the stages from this one to the last).

    events: one stage's (kind, microbatch, unix_time) list for one step, as in `PipelineResult.events`.
    """
    changes = sorted((t, +1 if kind == "forward_end" else -1) for kind, _, t in events
                     if kind in ("forward_end", "backward_end"))
    alive = most = 0
    for _, change in changes:
        alive += change
        most = max(most, alive)
    return most


def idle_fractions(step_events: Sequence[Sequence[tuple]]) -> List[float]:
    """Each stage's idle share of one step: 1 - (time inside its forward and backward boxes) / (the
    step's span, from the first event on any stage to the last). This is the measured bubble (plus
    communication and scheduling overhead); the ideal for equal stages is (p - 1) / (m + p - 1).

    step_events: one (kind, microbatch, unix_time) list per stage for the same step, e.g.
    `[stage[-1] for stage in result.events]`.
    """
    times = [t for stage in step_events for _, _, t in stage]
    span = max(times) - min(times)
    shares = []
    for stage in step_events:
        marks = {(kind, mb): t for kind, mb, t in stage}
        busy = sum(marks[(phase + "_end", mb)] - t for (kind, mb), t in marks.items() if kind.endswith("_start")
                   for phase in [kind[:-len("_start")]] if (phase + "_end", mb) in marks)
        shares.append(1 - busy / span)
    return shares


def default_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; for per-position logits (batch, seq, classes) over every position."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclass
class DistributedPerceiver:
    """This rank's share of a pipeline-parallel Perceiver.

    `train_step(inputs, targets, attention_mask=None)` runs one schedule step (forward and backward of
    every microbatch) and returns the mean loss on the last stage (None elsewhere); the gradients
    are left on `module`'s parameters for your optimizer, and `module.events` holds the step's
    per-microbatch timings. `forward(inputs, attention_mask=None)` is
    an inference pass returning the logits (batch, n_classes) on the last stage. Pass inputs (and
    the mask, if any) on the first rank and targets on the last; other ranks pass nothing. The batch
    must split into `plan.n_microbatches` equal microbatches.
    """

    plan: PipelinePlan
    rank: int
    module: StageModule
    stage: object
    schedule: object
    device: torch.device
    loss_fn: Callable = field(default=default_loss)
    group: Optional[object] = field(default=None, repr=False)
    _inference: Optional[object] = field(default=None, repr=False)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.plan.num_stages - 1

    def _first_args(self, inputs, attention_mask):
        if inputs is None:
            raise ValueError("the first rank must pass inputs")
        if inputs.shape[0] % self.plan.n_microbatches:
            raise ValueError(f"batch size {inputs.shape[0]} is not divisible by n_microbatches="
                             f"{self.plan.n_microbatches}")
        if attention_mask is None:
            attention_mask = torch.ones(inputs.shape[:2], dtype=torch.bool)
        attention_mask = _check_mask(attention_mask, inputs.shape[0], inputs.shape[1])
        return inputs.to(self.device), attention_mask.to(self.device)

    def train_step(self, inputs: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None,
                   attention_mask: Optional[torch.Tensor] = None) -> Optional[float]:
        self.module.train()
        self.module.reset_events()
        losses: List[torch.Tensor] = []
        if self.is_last and targets is None:
            raise ValueError("the last rank must pass targets")
        target = targets.to(self.device) if self.is_last else None
        if self.is_first:
            self.schedule.step(*self._first_args(inputs, attention_mask), target=target, losses=losses)
        else:
            self.schedule.step(target=target, losses=losses)
        self.module.drop_extra_calls(self.plan.n_microbatches)
        return float(torch.stack([l.detach() for l in losses]).mean()) if self.is_last else None

    @torch.no_grad()
    def forward(self, inputs: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        self.module.eval()
        self.module.reset_events()
        if self._inference is None:   # a schedule without loss_fn only runs forward passes
            from torch.distributed.pipelining import ScheduleGPipe
            self._inference = ScheduleGPipe(self.stage, self.plan.n_microbatches)
        if self.is_first:
            out = self._inference.step(*self._first_args(inputs, attention_mask))
        else:
            out = self._inference.step()
        self.module.drop_extra_calls(self.plan.n_microbatches)
        return out if self.is_last else None


def get_distributed_model(config: PerceiverConfig, num_stages: Optional[int] = None, *,
                          split_points: Optional[Sequence[int]] = None, schedule: str = "1f1b",
                          n_microbatches: int = 4, loss_fn: Callable = default_loss,
                          device: Optional[torch.device] = None, group=None) -> DistributedPerceiver:
    """This rank's stage of a pipeline-parallel Perceiver; call inside an initialised process group.

    Replaces gperc's `torch.distributed.pipeline.sync.Pipe` model, which no longer exists in torch.
    One stage per rank of `group` (default: the whole world); num_stages defaults to its size. The
    rank builds only its own modules, with the same weights the single-process `Perceiver(config)`
    has. `loss_fn(logits, targets)` must average over the microbatch (the schedule averages the
    microbatches' gradients). device defaults to the rank's GPU under NCCL, else the CPU.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("get_distributed_model needs an initialised process group: launch with torchrun or "
                           "percnb.pipeline.run_pipeline, which call torch.distributed.init_process_group")
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    num_stages = world if num_stages is None else num_stages
    if num_stages != world:
        raise ValueError(f"num_stages={num_stages} must equal the process group's size {world} (one stage per rank)")
    plan = plan_pipeline(config, num_stages, split_points, schedule, n_microbatches)
    if device is None and dist.get_backend() == "nccl":     # this process's GPU (torchrun sets LOCAL_RANK)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    elif device is None:
        device = torch.device("cpu")
    module = StageModule(plan, rank).to(device)
    stage = PipelineStage(module, rank, num_stages, device, group=group)
    make = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    return DistributedPerceiver(plan, rank, module, stage, make(stage, n_microbatches, loss_fn=loss_fn),
                                device, loss_fn, group)


# --------------------------------------------------------------------------- launching

def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it), for the rendezvous of local runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _train_single(job: PipelineJob, device: torch.device) -> dict:
    """The 1-stage baseline: the plain Perceiver, same optimizer, same record as a pipeline rank."""
    model = Perceiver(job.plan.config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=0.0)
    inputs, targets = job.inputs.to(device), job.targets.to(device)
    mask = None if job.attention_mask is None else job.attention_mask.to(device)
    losses, grads, seconds, cpu = [], {}, [], []
    for step in range(job.steps):
        optimizer.zero_grad(set_to_none=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = default_loss(model(inputs, mask), targets)
        loss.backward()
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        losses.append(loss.item())
        if step == 0:
            grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
    outputs = model.eval()(inputs, mask).detach().cpu() if job.infer else None
    return {"losses": losses, "grads": grads, "events": [], "seconds": seconds, "cpu": cpu,
            "parameters": model.num_parameters(), "outputs": outputs}


def _train_stage(job: PipelineJob, group, device: torch.device) -> dict:
    plan = job.plan
    model = get_distributed_model(plan.config, plan.num_stages, split_points=plan.split_points,
                                  schedule=plan.schedule, n_microbatches=plan.n_microbatches, device=device,
                                  group=group)
    # AdamW without weight decay: the same update percnb.train.fit makes with weight_decay=0
    optimizer = torch.optim.AdamW(model.module.parameters(), lr=job.lr, weight_decay=0.0)
    inputs = job.inputs if model.is_first else None
    mask = job.attention_mask if model.is_first else None
    targets = job.targets if model.is_last else None
    losses, grads, events, seconds, cpu = [], {}, [], [], []
    for step in range(job.steps):
        optimizer.zero_grad(set_to_none=True)
        dist.barrier(group=group)            # every stage starts the step together: comparable timings
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(model.train_step(inputs, targets, mask))
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        events.append(list(model.module.events))
        if step == 0:
            grads = {n: p.grad.detach().cpu().clone() for n, p in model.module.named_parameters()
                     if p.grad is not None}
        optimizer.step()
    outputs = model.forward(inputs, mask) if job.infer else None
    return {"losses": losses, "grads": grads, "events": events, "seconds": seconds, "cpu": cpu,
            "parameters": sum(p.numel() for p in model.module.parameters()),
            "outputs": None if outputs is None else outputs.cpu()}


def _worker(rank: int, world: int, jobs: List[PipelineJob], port: int, threads: int, out_dir: str) -> None:
    """One process of `run_pipelines`: runs every job whose stages include this rank, in order."""
    torch.set_num_threads(threads)
    backend, device_of = choose_backend(world)
    device = device_of(rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_process_group(backend, device, rank=rank, world_size=world)
    try:
        for j, job in enumerate(jobs):
            stages = job.plan.num_stages
            # new_group is collective over the whole world: every rank creates every job's group
            group = dist.new_group(list(range(stages))) if 1 < stages < world else None
            if rank < stages:
                record = _train_single(job, device) if stages == 1 else _train_stage(job, group, device)
                torch.save(record, os.path.join(out_dir, f"job{j}_rank{rank}.pt"))
            dist.barrier()                    # idle ranks wait here: jobs never overlap in time
    finally:
        dist.destroy_process_group()


def run_pipelines(jobs: Sequence[PipelineJob], threads: int = 1) -> List[PipelineResult]:
    """Run several `PipelineJob`s one after another in ONE set of local processes (as many as the
    largest job has stages; a smaller job uses the first ranks while the others wait).

    Starting processes costs seconds (each imports torch), so tests and benchmarks batch their runs
    here. Every job is checked before any process starts; NCCL on GPUs when there are enough, else
    gloo on CPU, `threads` threads per process. A worker that raises ends every process and its
    error is re-raised here (as torch.multiprocessing.ProcessRaisedException); collectives time out
    after INIT_TIMEOUT, so a failure never hangs.
    """
    import torch.multiprocessing as mp
    jobs = list(jobs)
    if not jobs:
        raise ValueError("jobs is empty: give at least one PipelineJob")
    for i, job in enumerate(jobs):
        if not isinstance(job, PipelineJob):
            raise TypeError(f"jobs[{i}] must be a PipelineJob, got {type(job).__name__}")
        plan, inputs = job.plan, job.inputs
        plan_pipeline(plan.config, plan.num_stages, plan.split_points, plan.schedule, plan.n_microbatches,
                      batch_size=len(inputs))
        if len(job.targets) != len(inputs):
            raise ValueError(f"jobs[{i}]: inputs and targets must have the same batch size, "
                             f"got {len(inputs)} and {len(job.targets)}")
        if job.attention_mask is not None:
            _check_mask(job.attention_mask, inputs.shape[0], inputs.shape[1])
        if isinstance(job.steps, bool) or not isinstance(job.steps, int) or job.steps < 0:
            raise ValueError(f"jobs[{i}]: steps must be an int >= 0, got {job.steps!r}")
    world = max(job.plan.num_stages for job in jobs)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world, jobs, free_port(), threads, out_dir), nprocs=world, join=True,
                           start_method="spawn")
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


def run_pipeline(config: PerceiverConfig, inputs: torch.Tensor, targets: torch.Tensor, num_stages: int = 2, *,
                 split_points: Optional[Sequence[int]] = None, schedule: str = "1f1b", n_microbatches: int = 4,
                 steps: int = 1, lr: float = 1e-3, threads: int = 1, infer: bool = False,
                 attention_mask: Optional[torch.Tensor] = None) -> PipelineResult:
    """Train `steps` AdamW steps (no weight decay) of a `num_stages`-process pipeline on one batch.

    inputs: (batch, input_len, features) floats or (batch, input_len) token ids; targets: (batch,)
    class ids (or (batch, output_len) without decoder_reduction); attention_mask: (batch, input_len).
    Starts one process per stage (torch.multiprocessing, spawn), NCCL on GPUs when there are enough,
    else gloo on CPU, each with `threads` threads. Settings are checked before any process starts; a
    worker that raises ends every process and re-raises here, so a failure never hangs. Returns a
    `PipelineResult`; with `infer`, its outputs are the logits of an inference pass after the
    training steps (steps=0: of the initial weights).
    """
    plan = plan_pipeline(config, num_stages, split_points, schedule, n_microbatches, batch_size=len(inputs))
    return run_pipelines([PipelineJob(plan, inputs, targets, attention_mask, steps, lr, infer)], threads)[0]


def reference_step(config: PerceiverConfig, inputs: torch.Tensor, targets: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None,
                   loss_fn: Callable = default_loss) -> Tuple[float, Dict[str, torch.Tensor]]:
    """Loss and gradients of the single-process Perceiver on the same batch (to check a pipeline)."""
    model = Perceiver(config)
    loss = loss_fn(model(inputs, attention_mask), targets)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- command line

def _demo_config(layers: int) -> PerceiverConfig:
    return PerceiverConfig(input_len=64, input_dim=32, latent_len=16, latent_dim=64, output_dim=64, ffw_latent=128,
                           ffw_output=128, num_heads=4, num_layers=layers, n_classes=10, seed=0)


def _run_under_torchrun(config, inputs, targets, args) -> None:
    world, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    backend, device_of = choose_backend(world)
    init_process_group(backend, device_of(local_rank))
    try:
        model = get_distributed_model(config, schedule=args.schedule, n_microbatches=args.microbatches,
                                      device=device_of(local_rank))
        optimizer = torch.optim.AdamW(model.module.parameters(), lr=args.lr, weight_decay=0.0)
        for step in range(args.steps):
            optimizer.zero_grad(set_to_none=True)
            loss = model.train_step(inputs if model.is_first else None, targets if model.is_last else None)
            optimizer.step()
            if model.is_last:
                print(f"step {step}: loss {loss:.4f} ({backend}, {world} stages)", flush=True)
    finally:
        dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m percnb.pipeline",
        description="Train a small Perceiver on random data with pipeline parallelism. Under torchrun "
                    "(`torchrun --nproc-per-node 2 -m percnb.pipeline`, one stage per process) it uses the "
                    "launched ranks; run directly, it starts --stages local processes itself and compares the "
                    "first loss with the single-process model's. NCCL with one GPU per rank when there are at "
                    "least as many GPUs as stages, else gloo on CPU.")
    parser.add_argument("--stages", type=int, default=None,
                        help="pipeline stages (= processes); default 2, or torchrun's world size")
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    parser.add_argument("--microbatches", type=int, default=4, help="microbatches per step (1f1b: >= stages)")
    parser.add_argument("--layers", type=int, default=4, help="latent self-attention layers")
    parser.add_argument("--batch", type=int, default=16, help="batch size (divisible by --microbatches)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    args = parser.parse_args(argv)
    config = _demo_config(args.layers)
    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(args.batch, 64, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    stages = int(os.environ["WORLD_SIZE"]) if torchrun else (args.stages or 2)
    try:   # bad settings end here, with a usage message, before any process group or process starts
        if torchrun and args.stages not in (None, stages):
            raise ValueError(f"--stages {args.stages} differs from torchrun's {stages} processes (one stage each)")
        plan_pipeline(config, stages, None, args.schedule, args.microbatches, batch_size=args.batch)
    except ValueError as error:
        parser.error(str(error))
    if torchrun:
        _run_under_torchrun(config, inputs, targets, args)
        return
    result = run_pipeline(config, inputs, targets, stages, schedule=args.schedule,
                          n_microbatches=args.microbatches, steps=args.steps, lr=args.lr)
    loss, _ = reference_step(config, inputs, targets)
    for step, value in enumerate(result.losses):
        print(f"step {step}: loss {value:.4f}")
    print(f"single-process loss at step 0: {loss:.4f}; stage parameters: {result.stage_parameters}")


if __name__ == "__main__":
    main()
