"""One rank's share of a pipeline: `StageModule` (the stage's modules, tensors in and out, timed) and
`DistributedPerceiver` (the stage plus its `torch.distributed.pipelining` schedule), made by
`get_distributed_model` inside an initialised process group.

What crosses a stage boundary is a tuple of tensors: the seed's tuple (see the end of percnb/models.py)
without its None items. After the embeddings `(inputs, mask, latents[, queries])`, after any later
module `(latents[, queries])` (queries only with decoder_type='attention'). The mask is a bool tensor
(batch, input_len), True = attend; a batch given without a mask travels with an all-True one, which
attends exactly where no mask does. Attention maps are not carried (pipelines train; use `Perceiver`
to look).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..config import PerceiverConfig
from ..models import get_sequential_from_config, model_key
from .planning import PipelinePlan, plan_pipeline
from .timeline import EventRecorder


def default_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; for per-position logits (batch, seq, classes) over every position."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class StageModule(nn.Module):
    """The modules of one stage, with tensor-only inputs and outputs (see the module docstring).

    forward(*tensors): the first stage takes (input_array, mask (batch, input_len) bool); a later
    stage takes what the previous one returned. The last stage returns the logits. `model` holds the
    stage's modules of `get_sequential_from_config` (the seed's names; `model_state_dict` and
    `model_named_parameters` give them under `Perceiver`'s). Each call records (kind, microbatch,
    unix_time) events in `events` (see `percnb.pipeline.timeline`), the backward ones when autograd
    runs through the stage.
    """

    def __init__(self, plan: PipelinePlan, stage: int):
        super().__init__()
        self.config, self.indices = plan.config, plan.stage_indices(stage)
        self.model = get_sequential_from_config(plan.config, self.indices)
        self.recorder = EventRecorder()

    @property
    def events(self) -> List[tuple]:
        return self.recorder.events

    def forward(self, *tensors: torch.Tensor):
        mb = self.recorder.forward_started()
        recording = torch.is_grad_enabled()
        if recording:
            tensors = (self.recorder.probe_input(tensors[0], mb),) + tensors[1:]
        h = self.model(tensors)
        out = tuple(t.contiguous() for t in h if t is not None)     # send/recv need contiguous buffers
        if recording:
            self.recorder.probe_output(out[0], mb)
        self.recorder.add("forward_end", mb)
        return out if len(out) > 1 else out[0]

    def model_named_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """(name in `Perceiver(config)`, parameter) for this stage's parameters."""
        for name, parameter in self.model.named_parameters():
            yield model_key(name), parameter

    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        """This stage's entries of `Perceiver(config).state_dict()`, under the same keys."""
        return {model_key(name): value for name, value in self.model.state_dict().items()}


@dataclass
class DistributedPerceiver:
    """This rank's share of a pipeline-parallel Perceiver.

    `train_step(inputs, targets, attention_mask=None)` runs one schedule step (forward and backward of
    every microbatch) and returns the mean loss on the last stage (None elsewhere); the gradients
    are left on `module`'s parameters for your optimizer, and `events` holds the step's
    per-microbatch timings. `forward(inputs, attention_mask=None)` is an inference pass returning
    the logits (batch, n_classes) on the last stage. Pass inputs (and the mask, if any) on the first
    rank and targets on the last; other ranks pass nothing. The batch must split into
    `plan.n_microbatches` equal microbatches.
    """

    plan: PipelinePlan
    rank: int
    module: StageModule
    stage: object
    schedule: object
    device: torch.device
    _inference: Optional[object] = field(default=None, repr=False)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.plan.num_stages - 1

    @property
    def events(self) -> List[tuple]:
        return self.module.events

    def named_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """(name in `Perceiver(config)`, parameter) for this rank's parameters."""
        return self.module.model_named_parameters()

    def _first_args(self, inputs, attention_mask):
        if inputs is None:
            raise ValueError("the first rank must pass inputs")
        if inputs.shape[0] % self.plan.n_microbatches:
            raise ValueError(f"batch size {inputs.shape[0]} is not divisible by n_microbatches="
                             f"{self.plan.n_microbatches}")
        if attention_mask is None:
            attention_mask = torch.ones(inputs.shape[:2], dtype=torch.bool)
        attention_mask = checks.attention_mask(attention_mask, inputs.shape[0], inputs.shape[1])
        return inputs.to(self.device), attention_mask.to(self.device)

    def train_step(self, inputs: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None,
                   attention_mask: Optional[torch.Tensor] = None) -> Optional[float]:
        self.module.train()
        self.module.recorder.reset()
        losses: List[torch.Tensor] = []
        if self.is_last and targets is None:
            raise ValueError("the last rank must pass targets")
        target = targets.to(self.device) if self.is_last else None
        if self.is_first:
            self.schedule.step(*self._first_args(inputs, attention_mask), target=target, losses=losses)
        else:
            self.schedule.step(target=target, losses=losses)
        self.module.recorder.drop_extra_calls(self.plan.n_microbatches)
        return float(torch.stack([loss.detach() for loss in losses]).mean()) if self.is_last else None

    @torch.no_grad()
    def forward(self, inputs: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        self.module.eval()
        self.module.recorder.reset()
        if self._inference is None:   # a schedule without loss_fn only runs forward passes
            from torch.distributed.pipelining import ScheduleGPipe
            self._inference = ScheduleGPipe(self.stage, self.plan.n_microbatches)
        if self.is_first:
            out = self._inference.step(*self._first_args(inputs, attention_mask))
        else:
            out = self._inference.step()
        self.module.recorder.drop_extra_calls(self.plan.n_microbatches)
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
    return DistributedPerceiver(plan, rank, module, stage, make(stage, n_microbatches, loss_fn=loss_fn), device)
