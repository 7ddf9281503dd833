"""Measured timelines of pipeline steps: each stage records (kind, microbatch, unix_time) events for the
start and end of every microbatch's forward and backward (`EventRecorder`); `phase_boxes` pairs them
into boxes, from which `idle_fractions` (the measured bubble), `microbatches_in_flight` (activations
held at once) and `percnb.viz.plot_pipeline_timeline` are computed."""
from __future__ import annotations

import time
from typing import List, Sequence, Tuple

import torch

EVENT_KINDS = ("forward_start", "forward_end", "backward_start", "backward_end")


class _BackwardProbe(torch.autograd.Function):
    """Identity that records the time when backward reaches it (the end of a stage's backward)."""

    @staticmethod
    def forward(ctx, probe, x, recorder, mb):
        ctx.recorder, ctx.mb = recorder, mb
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.recorder.add("backward_end", ctx.mb)
        return None, grad, None, None


class EventRecorder:
    """One stage's events for one step: `events` is a list of (kind, microbatch, unix_time), kinds in
    EVENT_KINDS; each forward call is the next microbatch. On a GPU these are the times the work was
    queued, not finished: CUDA runs asynchronously."""

    def __init__(self):
        self.events: List[tuple] = []
        self.calls = 0

    def add(self, kind: str, mb: int) -> None:
        self.events.append((kind, mb, time.time()))

    def forward_started(self) -> int:
        """Record a forward's start; returns its microbatch number."""
        mb, self.calls = self.calls, self.calls + 1
        self.add("forward_start", mb)
        return mb

    def probe_input(self, inputs: torch.Tensor, mb: int) -> torch.Tensor:
        """`inputs` through an identity that records when backward reaches it: the end of the stage's
        backward (its input is reached last). Use the result in place of `inputs`."""
        probe = torch.zeros((), requires_grad=True)
        return _BackwardProbe.apply(probe, inputs, self, mb)

    def probe_output(self, outputs: torch.Tensor, mb: int) -> None:
        """Record when backward reaches `outputs`: the start of the stage's backward."""
        if outputs.requires_grad:
            outputs.register_hook(lambda g: self.add("backward_start", mb) or g)

    def reset(self) -> None:
        self.events, self.calls = [], 0

    def drop_extra_calls(self, n_microbatches: int) -> None:
        """Keep the events of the last `n_microbatches` forward calls, numbered from 0. On its first
        step a schedule runs each stage once more, before the microbatches, to learn the shapes it
        will send and receive (torch.distributed.pipelining's metadata inference)."""
        extra = self.calls - n_microbatches
        if extra > 0:
            self.events = [(kind, mb - extra, t) for kind, mb, t in self.events if mb >= extra]
            self.calls = n_microbatches


def phase_boxes(events: Sequence[tuple]) -> List[Tuple[str, int, float, float]]:
    """(phase, microbatch, start, end) of each forward and backward of one stage's step whose start and
    end were both recorded; phase is "forward" or "backward"."""
    marks = {(kind, mb): t for kind, mb, t in events}
    boxes = []
    for (kind, mb), start in marks.items():
        if kind.endswith("_start"):
            phase = kind[:-len("_start")]
            end = marks.get((phase + "_end", mb))
            if end is not None:
                boxes.append((phase, mb, start, end))
    return boxes


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
    return [1 - sum(end - start for _, _, start, end in phase_boxes(stage)) / span for stage in step_events]
