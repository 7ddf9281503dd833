"""Planning a pipeline, before any process starts: parameter counts of the model's sequential modules,
balanced split points, and `plan_pipeline`, which checks every setting and cuts the model into stages."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .. import checks
from ..config import PerceiverConfig
from ..models import get_sequential_from_config, sharing_period

PIPELINE_SCHEDULES = ("gpipe", "1f1b")


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
    checks.positive_int("num_stages", num_stages)
    if num_stages > modules:
        raise ValueError(f"num_stages={num_stages} is more than the model's {modules} modules (embeddings, "
                         f"encoder, {config.num_layers} processors, decoder); use at most {modules} stages")
    checks.choice("schedule", schedule, PIPELINE_SCHEDULES)
    checks.positive_int("n_microbatches", n_microbatches)
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
    period = sharing_period(config)
    for first in range(min(period, config.num_layers)) if period < config.num_layers else ():
        # processors first, first + period, ... are one module: one stage must hold them all
        holders = {s for s in range(num_stages) for i in plan.stage_indices(s)
                   if 2 <= i < modules - 1 and (i - 2) % period == first}
        if len(holders) > 1:
            what = ("share_weights=True reuses one processor block, so all processors" if config.share_weights else
                    f"layers_per_block={period} makes processors {first}, {first + period}, ... one block, so they")
            raise ValueError(f"{what} must sit in one stage; stages {sorted(holders)} hold them with "
                             f"split_points={split_points}")
    return plan
