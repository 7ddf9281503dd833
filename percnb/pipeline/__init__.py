"""Pipeline-parallel Perceiver on `torch.distributed.pipelining` (GPipe and 1F1B schedules).

The Perceiver is the seed's `nn.Sequential` of num_layers + 3 modules (embeddings, encoder, processors,
decoder; see the end of percnb/models.py). A pipeline cuts it into contiguous stages, one per process
(rank); each rank builds only its own modules (per-part seeding makes them equal to the single-process
model's), and a batch is cut into microbatches that flow through the stages so that stages work at
the same time.

    planning.py   module parameter counts, balanced split points, `plan_pipeline` (every check, before any process)
    stages.py     `StageModule`, `DistributedPerceiver`, `get_distributed_model` (inside a process group)
    launch.py     process groups, the one training loop, `run_pipelines` / `run_pipeline` (local processes)
    timeline.py   per-microbatch events, `idle_fractions`, `microbatches_in_flight`
    __main__.py   `python -m percnb.pipeline` / `torchrun ... -m percnb.pipeline`
"""
from .launch import (
    INIT_TIMEOUT,
    PipelineJob,
    PipelineResult,
    SingleProcess,
    choose_backend,
    init_process_group,
    reference_step,
    run_pipeline,
    run_pipelines,
    run_under_torchrun,
    train_steps,
)
from .planning import (
    PIPELINE_SCHEDULES,
    PipelinePlan,
    balanced_split,
    module_costs,
    module_parameter_counts,
    plan_pipeline,
    split_with_work,
)
from .stages import DistributedPerceiver, StageModule, default_loss, get_distributed_model
from .timeline import EVENT_KINDS, EventRecorder, idle_fractions, microbatches_in_flight, phase_boxes

__all__ = [
    "INIT_TIMEOUT", "PipelineJob", "PipelineResult", "SingleProcess", "choose_backend", "init_process_group",
    "reference_step", "run_pipeline", "run_pipelines", "run_under_torchrun", "train_steps", "PIPELINE_SCHEDULES",
    "PipelinePlan", "balanced_split", "module_costs", "module_parameter_counts", "split_with_work", "plan_pipeline",
    "DistributedPerceiver", "StageModule", "default_loss", "get_distributed_model", "EVENT_KINDS", "EventRecorder",
    "idle_fractions", "microbatches_in_flight", "phase_boxes",
]
