"""Pipeline-parallel Perceiver on `torch.distributed.pipelining` (GPipe and 1F1B schedules).

The Perceiver is an `nn.Sequential` of num_layers + 3 modules (embeddings, encoder, processors,
decoder). A pipeline cuts it into contiguous stages, one per process (rank); each rank builds only
its own modules (per-module seeding makes them equal to the single-process model's), and a batch is
cut into microbatches that flow through the stages so that stages work at the same time.

What crosses a stage boundary is always a tuple of tensors, fixed by where the cut is: after the
embeddings `(inputs, mask, latents[, queries])`, after any later module `(latents[, queries])`
(queries only with decoder_type='attention'). The mask travels as 0/1 floats (gloo sends no
bools); a batch without a mask gets an all-ones one. No sentinel values.

Entry points: `get_distributed_model` (inside an initialised process group: this rank's stage and
schedule), `run_pipeline` (starts N local processes, trains, returns losses, gradients and
per-microbatch timings) and `python -m percnb.pipeline` / `torchrun ... -m percnb.pipeline`.
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
from .models import Perceiver, get_sequential_from_config

SCHEDULES = ("gpipe", "1f1b")
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
    """NCCL with one GPU per rank when there are at least `num_stages` CUDA devices, else gloo on CPU."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= num_stages:
        return "nccl", lambda rank: torch.device("cuda", rank)
    return "gloo", lambda rank: torch.device("cpu")


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
    """The modules of one stage, with tensor-only inputs and outputs (see the module docstring)."""

    def __init__(self, plan: PipelinePlan, stage: int):
        super().__init__()
        self.config, self.indices = plan.config, plan.stage_indices(stage)
        self.model = get_sequential_from_config(plan.config, self.indices)
        self.events: List[tuple] = []     # (kind, microbatch, time) for timelines
        self._mb = 0

    def _has_queries(self) -> bool:
        return self.config.decoder_type == "attention"

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
            h = self.model[0](inputs, mask != 0, None)
            rest = list(self.model)[1:]
        elif first == 1:
            inputs, mask, latents, *queries = tensors
            h = (inputs, mask != 0, latents, queries[0] if queries else None)
            rest = list(self.model)
        else:
            latents, *queries = tensors
            h = (latents, queries[0] if queries else None, None)
            rest = list(self.model)
        for module in rest:
            h = module(h)
        out = tuple(t.contiguous() for t in self._pack(h))     # send/recv need contiguous buffers
        if recording:
            out[0].register_hook(lambda g, mb=mb: self.events.append(("backward_start", mb, time.time())) or g)
        self.events.append(("forward_end", mb, time.time()))
        return out if len(out) > 1 else out[0]

    def _pack(self, h) -> Tuple[torch.Tensor, ...]:
        last = self.indices[-1]
        if last == self.config.num_layers + 2:             # decoder: (logits, attentions)
            return (h[0],)
        if last == 0:                                     # embeddings: (x, mask, latents, queries)
            x, mask, latents, queries = h
            mask = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
            return (x, mask, latents) + ((queries,) if queries is not None else ())
        latents, queries = h[0], h[1]
        return (latents,) + ((queries,) if queries is not None else ())

    def reset_events(self) -> None:
        self.events, self._mb = [], 0


def default_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; for per-position logits (batch, seq, classes) over every position."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclass
class DistributedPerceiver:
    """This rank's share of a pipeline-parallel Perceiver.

    `train_step(inputs, targets, attention_mask=None)` runs one schedule step (forward and backward of
    every microbatch) and returns the mean loss on the last stage (None elsewhere); the gradients
    are left on `module`'s parameters for your optimizer. `forward(inputs, attention_mask=None)` is
    an inference pass returning the logits on the last stage. Pass inputs on the first rank and
    targets on the last; other ranks pass nothing.
    """

    plan: PipelinePlan
    rank: int
    module: StageModule
    stage: object
    schedule: object
    device: torch.device
    loss_fn: Callable = field(default=default_loss)
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
            attention_mask = torch.ones(inputs.shape[:2])
        return inputs.to(self.device), attention_mask.to(self.device).float()

    def train_step(self, inputs: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None,
                   attention_mask: Optional[torch.Tensor] = None) -> Optional[float]:
        self.module.train()
        losses: List[torch.Tensor] = []
        target = targets.to(self.device) if self.is_last else None
        if self.is_last and targets is None:
            raise ValueError("the last rank must pass targets")
        if self.is_first:
            self.schedule.step(*self._first_args(inputs, attention_mask), target=target, losses=losses)
        else:
            self.schedule.step(target=target, losses=losses)
        return float(torch.stack([l.detach() for l in losses]).mean()) if self.is_last else None

    @torch.no_grad()
    def forward(self, inputs: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        self.module.eval()
        if self._inference is None:   # a schedule without loss_fn only runs forward passes
            from torch.distributed.pipelining import ScheduleGPipe
            self._inference = ScheduleGPipe(self.stage, self.plan.n_microbatches)
        if self.is_first:
            out = self._inference.step(*self._first_args(inputs, attention_mask))
        else:
            out = self._inference.step()
        return out if self.is_last else None


def get_distributed_model(config: PerceiverConfig, num_stages: Optional[int] = None, *,
                          split_points: Optional[Sequence[int]] = None, schedule: str = "1f1b",
                          n_microbatches: int = 4, loss_fn: Callable = default_loss,
                          device: Optional[torch.device] = None) -> DistributedPerceiver:
    """This rank's stage of a pipeline-parallel Perceiver; call inside an initialised process group.

    Replaces gperc's `torch.distributed.pipeline.sync.Pipe` model, which no longer exists in torch.
    num_stages defaults to the world size (one stage per rank). The rank builds only its own modules,
    with the same weights the single-process `Perceiver(config)` has.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("get_distributed_model needs an initialised process group: launch with torchrun or "
                           "percnb.pipeline.run_pipeline, which call torch.distributed.init_process_group")
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    world, rank = dist.get_world_size(), dist.get_rank()
    num_stages = world if num_stages is None else num_stages
    if num_stages != world:
        raise ValueError(f"num_stages={num_stages} must equal the world size {world} (one stage per rank)")
    plan = plan_pipeline(config, num_stages, split_points, schedule, n_microbatches)
    device = device if device is not None else choose_backend(num_stages)[1](rank)
    module = StageModule(plan, rank).to(device)
    stage = PipelineStage(module, rank, num_stages, device)
    make = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    return DistributedPerceiver(plan, rank, module, stage, make(stage, n_microbatches, loss_fn=loss_fn),
                                device, loss_fn)


# --------------------------------------------------------------------------- launching

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PipelineResult:
    """What `run_pipeline` brings back: one loss per step, the gradients after the first step (name ->
    tensor, over all stages), the stages' parameter counts and per-microbatch events per stage."""

    losses: List[float]
    grads: Dict[str, torch.Tensor]
    stage_parameters: List[int]
    events: List[List[tuple]]
    seconds_per_step: List[float]
    outputs: Optional[torch.Tensor] = None


def _worker(rank: int, plan: PipelinePlan, port: int, inputs: torch.Tensor, targets: torch.Tensor,
            steps: int, lr: float, threads: int, out_dir: str, infer: bool) -> None:
    torch.set_num_threads(threads)
    backend, device_of = choose_backend(plan.num_stages)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=plan.num_stages, timeout=INIT_TIMEOUT)
    try:
        model = get_distributed_model(plan.config, plan.num_stages, split_points=plan.split_points,
                                      schedule=plan.schedule, n_microbatches=plan.n_microbatches,
                                      device=device_of(rank))
        # AdamW without weight decay: the same update percnb.train.fit makes with weight_decay=0
        optimizer = torch.optim.AdamW(model.module.parameters(), lr=lr, weight_decay=0.0)
        losses, grads, events, seconds = [], {}, [], []
        for step in range(steps):
            model.module.reset_events()
            optimizer.zero_grad(set_to_none=True)
            dist.barrier()
            start = time.perf_counter()
            loss = model.train_step(inputs if model.is_first else None, targets if model.is_last else None)
            seconds.append(time.perf_counter() - start)
            losses.append(loss)
            events.append(list(model.module.events))
            if step == 0:
                grads = {n: p.grad.detach().cpu().clone() for n, p in model.module.named_parameters()
                         if p.grad is not None}
            optimizer.step()
        outputs = model.forward(inputs if model.is_first else None) if infer else None
        torch.save({"losses": losses, "grads": grads, "events": events, "seconds": seconds,
                    "parameters": sum(p.numel() for p in model.module.parameters()),
                    "outputs": None if outputs is None else outputs.cpu()}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_pipeline(config: PerceiverConfig, inputs: torch.Tensor, targets: torch.Tensor, num_stages: int = 2, *,
                 split_points: Optional[Sequence[int]] = None, schedule: str = "1f1b", n_microbatches: int = 4,
                 steps: int = 1, lr: float = 1e-3, threads: int = 1, infer: bool = False) -> PipelineResult:
    """Train `steps` AdamW steps (no weight decay) of a `num_stages`-process pipeline on one batch.

    Starts one process per stage (torch.multiprocessing, spawn), NCCL on GPUs when there are enough,
    else gloo on CPU, each with `threads` threads. Settings are checked before any process starts; a
    worker that raises ends every process and re-raises here (init has a 60 s timeout), so a failure
    never hangs. Returns a `PipelineResult` (losses, gradients of the first step, timings, and with
    `infer` the logits of an inference pass after training).
    """
    import torch.multiprocessing as mp
    plan = plan_pipeline(config, num_stages, split_points, schedule, n_microbatches, batch_size=len(inputs))
    if len(targets) != len(inputs):
        raise ValueError(f"inputs and targets must have the same batch size, got {len(inputs)} and {len(targets)}")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(plan, free_port(), inputs, targets, steps, lr, threads, out_dir, infer),
                           nprocs=num_stages, join=True, start_method="spawn")
        parts = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(num_stages)]
    grads = {name: g for part in parts for name, g in part["grads"].items()}
    return PipelineResult(losses=parts[-1]["losses"], grads=grads, stage_parameters=[p["parameters"] for p in parts],
                          events=[p["events"] for p in parts], seconds_per_step=parts[0]["seconds"],
                          outputs=parts[-1]["outputs"])


def reference_step(config: PerceiverConfig, inputs: torch.Tensor, targets: torch.Tensor,
                   loss_fn: Callable = default_loss) -> Tuple[float, Dict[str, torch.Tensor]]:
    """Loss and gradients of the single-process Perceiver on the same batch (to check a pipeline)."""
    model = Perceiver(config)
    mask = torch.ones(inputs.shape[:2])      # the pipeline always carries a mask; use the same one
    loss = loss_fn(model(inputs, mask), targets)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- command line

def _demo_config(layers: int) -> PerceiverConfig:
    return PerceiverConfig(input_len=64, input_dim=32, latent_len=16, latent_dim=64, output_dim=64, ffw_latent=128,
                           ffw_output=128, num_heads=4, num_layers=layers, n_classes=10, seed=0)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m percnb.pipeline",
        description="Train a small Perceiver on random data with pipeline parallelism and check it against the "
                    "single-process model. Under torchrun (one process per stage) it uses the launched ranks; "
                    "run directly, it starts --stages local processes itself.")
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages (= processes), default 2")
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4, help="latent self-attention layers")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    args = parser.parse_args(argv)
    config = _demo_config(args.layers)
    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(args.batch, 64, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:      # under torchrun
        backend, device_of = choose_backend(int(os.environ["WORLD_SIZE"]))
        dist.init_process_group(backend, timeout=INIT_TIMEOUT)
        try:
            model = get_distributed_model(config, split_points=None, schedule=args.schedule,
                                          n_microbatches=args.microbatches, device=device_of(dist.get_rank()))
            optimizer = torch.optim.AdamW(model.module.parameters(), lr=args.lr, weight_decay=0.0)
            for step in range(args.steps):
                optimizer.zero_grad(set_to_none=True)
                loss = model.train_step(inputs if model.is_first else None, targets if model.is_last else None)
                optimizer.step()
                if model.is_last:
                    print(f"step {step}: loss {loss:.4f}", flush=True)
        finally:
            dist.destroy_process_group()
        return
    result = run_pipeline(config, inputs, targets, args.stages, schedule=args.schedule,
                          n_microbatches=args.microbatches, steps=args.steps, lr=args.lr)
    loss, _ = reference_step(config, inputs, targets)
    for step, value in enumerate(result.losses):
        print(f"step {step}: loss {value:.4f}")
    print(f"single-process loss at step 0: {loss:.4f}; stage parameters: {result.stage_parameters}")


if __name__ == "__main__":
    main()
