"""`python -m percnb.pipeline` and `torchrun --nproc-per-node N -m percnb.pipeline`: train a small Perceiver on
random data with pipeline parallelism (see --help)."""
from __future__ import annotations

import argparse
import os
from typing import Callable, Optional, Sequence

import torch

from .. import checks
from ..config import PerceiverConfig
from .launch import reference_step, run_pipeline, run_under_torchrun
from .planning import PIPELINE_SCHEDULES, plan_pipeline


def demo_config(layers: int) -> PerceiverConfig:
    return PerceiverConfig(input_len=64, input_dim=32, latent_len=16, latent_dim=64, output_dim=64, ffw_latent=128,
                           ffw_output=128, num_heads=4, num_layers=layers, n_classes=10, seed=0)


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= minimum, else a usage error (exit 2) that says so."""
    def parse(text: str) -> int:
        try:
            return checks.int_at_least("value", int(text), minimum)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    return parse


def _positive_float(text: str) -> float:
    try:
        return checks.positive_float("value", float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}") from None


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m percnb.pipeline",
        description="Train a small Perceiver on random data with pipeline parallelism. Under torchrun "
                    "(`torchrun --nproc-per-node 2 -m percnb.pipeline`, one stage per process) it uses the "
                    "launched ranks; run directly, it starts --stages local processes itself and compares the "
                    "first loss with the single-process model's. NCCL with one GPU per rank when there are at "
                    "least as many GPUs as stages, else gloo on CPU.")
    positive = _at_least(1)
    parser.add_argument("--stages", type=positive, default=None,
                        help="pipeline stages (= processes); default 2, or torchrun's world size")
    parser.add_argument("--schedule", choices=PIPELINE_SCHEDULES, default="1f1b")
    parser.add_argument("--microbatches", type=positive, default=4, help="microbatches per step (1f1b: >= stages)")
    parser.add_argument("--layers", type=positive, default=4, help="latent self-attention layers")
    parser.add_argument("--batch", type=positive, default=16, help="batch size (divisible by --microbatches)")
    parser.add_argument("--steps", type=_at_least(0), default=3)
    parser.add_argument("--lr", type=_positive_float, default=1e-3, help="AdamW learning rate")
    args = parser.parse_args(argv)
    config = demo_config(args.layers)
    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(args.batch, 64, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    stages = int(os.environ["WORLD_SIZE"]) if torchrun else (2 if args.stages is None else args.stages)
    try:   # bad settings end here, with a usage message, before any process group or process starts
        if torchrun and args.stages not in (None, stages):
            raise ValueError(f"--stages {args.stages} differs from torchrun's {stages} processes (one stage each)")
        plan_pipeline(config, stages, None, args.schedule, args.microbatches, batch_size=args.batch)
    except ValueError as error:
        parser.error(str(error))
    if torchrun:
        run_under_torchrun(config, inputs, targets, args.schedule, args.microbatches, args.steps, args.lr)
        return
    result = run_pipeline(config, inputs, targets, stages, schedule=args.schedule,
                          n_microbatches=args.microbatches, steps=args.steps, lr=args.lr)
    loss, _ = reference_step(config, inputs, targets)
    for step, value in enumerate(result.losses):
        print(f"step {step}: loss {value:.4f}")
    print(f"single-process loss at step 0: {loss:.4f}; stage parameters: {result.stage_parameters}")


if __name__ == "__main__":
    main()
