"""Planning a pipeline, before any process starts: the estimated compute (and parameters) of the model's
sequential modules, split points that balance it, and `plan_pipeline`, which checks every setting and cuts
the model into stages."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .. import checks, cost
from ..config import PerceiverConfig
from ..models import get_sequential_from_config, sharing_period

PIPELINE_SCHEDULES = ("gpipe", "1f1b")


def module_parameter_counts(config: PerceiverConfig) -> List[int]:
    """Parameters of each sequential module (embeddings, encoder, processors..., decoder), built on
    the meta device so that nothing is allocated."""
    with torch.device("meta"):
        modules = list(get_sequential_from_config(config))
    return [sum(p.numel() for p in m.parameters()) for m in modules]


def module_costs(config: PerceiverConfig) -> List[int]:
    """Estimated compute of each sequential module: its matmul FLOPs per train sample (`percnb.cost`),
    what a stage spends its time on. Parameters are a poor proxy: a one-query decoder has as many as a
    latent block and a fraction of its work."""
    return cost.module_flops(config, batch=1, train=True)


def split_with_work(costs: Sequence[float], num_stages: int) -> Tuple[List[int], int]:
    """`balanced_split`, and the number of candidate stages it evaluated (its work, for tests).

    Dynamic programming over prefixes: best[s][j] is the smallest largest-stage cost of cutting the first
    j modules into s stages, min over i of max(best[s - 1][i], cost of modules i..j-1). With n modules and
    p stages that is at most p * n^2 / 2 candidates (40 layers in 10 stages: about 9,000), where trying
    every split is C(n - 1, p - 1) (40 in 10: 900 million)."""
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"num_stages must be in [1, {n}] for {n} modules, got {num_stages}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    start = [[0] * (n + 1) for _ in range(num_stages + 1)]     # where the last stage of best[s][j] starts
    best[0][0] = 0.0
    work = 0
    for s in range(1, num_stages + 1):
        # s stages hold at least s modules and leave at least one for each later stage
        for j in range(s, n - (num_stages - s) + 1):
            for i in range(s - 1, j):
                work += 1
                candidate = max(best[s - 1][i], prefix[j] - prefix[i])
                if candidate < best[s][j]:
                    best[s][j], start[s][j] = candidate, i
    bounds, j = [], n
    for s in range(num_stages, 0, -1):
        j = start[s][j]
        bounds.append(j)
    return bounds[::-1], work


def balanced_split(costs: Sequence[float], num_stages: int) -> List[int]:
    """First module index of each stage: contiguous stages whose largest total cost is the smallest
    possible (exact, in polynomial time: `split_with_work`)."""
    return split_with_work(costs, num_stages)[0]


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
    stages; by default stages are balanced by estimated compute (`module_costs`: matmul FLOPs).
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
        costs = module_costs(config)
        if sharing_period(config) < config.num_layers:
            # processors i and i + period are one module, and stages are contiguous: all processors go in one
            # stage, as one unit, and come back as its first index
            units = [*costs[:2], sum(costs[2:-1]), costs[-1]]
            if num_stages > len(units):
                what = ("share_weights=True" if config.share_weights
                        else f"layers_per_block={config.layers_per_block}")
                raise ValueError(f"{what} keeps the {config.num_layers} processors in one stage, so "
                                 f"at most {len(units)} stages, got num_stages={num_stages}")
            split_points = [(0, 1, 2, modules - 1)[u] for u in balanced_split(units, num_stages)]
        else:
            split_points = balanced_split(costs, num_stages)
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
