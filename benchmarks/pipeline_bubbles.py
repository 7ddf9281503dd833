"""Pipeline bubbles, measured: train-step throughput of 1 stage vs 2 stages (one thread per process).

    python benchmarks/pipeline_bubbles.py            # the README's numbers (a few minutes on 2 cores)
    python benchmarks/pipeline_bubbles.py --tiny     # a seconds-long smoke run

With p stages and m microbatches a pipeline is busy m of every m + p - 1 time slots, so its ideal
speedup over one stage is p * m / (m + p - 1). 1 stage is the plain single-process Perceiver on the
whole batch; 2 stages run percnb.pipeline (gloo, 1F1B, GPipe at m=1 where 1F1B needs m >= p).
"""
import argparse
import statistics
import time

import torch

from percnb.models import Perceiver, PerceiverConfig
from percnb.pipeline import default_loss, run_pipeline


def single_stage_seconds(config, inputs, targets, steps):
    torch.set_num_threads(1)
    model = Perceiver(config)
    mask = torch.ones(inputs.shape[:2])
    times = []
    for _ in range(steps + 1):                       # the first step is a warm-up
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        default_loss(model(inputs, mask), targets).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model and batch: a smoke run, not a measurement")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    args = parser.parse_args()
    if args.tiny:
        dims = dict(input_len=16, input_dim=16, latent_len=8, latent_dim=16, output_dim=16, ffw_latent=32,
                    ffw_output=32, num_heads=2, num_layers=2)
        batch = 8
    else:
        dims = dict(input_len=128, input_dim=256, latent_len=128, latent_dim=256, output_dim=256, ffw_latent=1024,
                    ffw_output=1024, num_heads=8, num_layers=8)
        batch = 32
    config = PerceiverConfig(n_classes=10, seed=0, **dims)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, config.input_len, config.input_dim, generator=g)
    targets = torch.randint(0, 10, (batch,), generator=g)
    one = single_stage_seconds(config, inputs, targets, args.steps)
    print(f"model: {dims['num_layers']} latent layers, D={dims['latent_dim']}, batch {batch}; 1 thread per process")
    print(f"1 stage: {one:.3f} s/step ({batch / one:.1f} samples/s)")
    print(f"{'microbatches':>12} {'2-stage s/step':>15} {'speedup':>8} {'ideal':>6} {'of ideal':>9}")
    speedups = {}
    for m in args.microbatches:
        schedule = "1f1b" if m >= 2 else "gpipe"
        result = run_pipeline(config, inputs, targets, 2, schedule=schedule, n_microbatches=m,
                              steps=args.steps + 1, threads=1)
        two = statistics.median(result.seconds_per_step[1:])
        ideal = 2 * m / (m + 1)
        speedups[m] = one / two
        print(f"{m:>12} {two:>15.3f} {speedups[m]:>7.2f}x {ideal:>5.2f}x {speedups[m] / ideal:>8.0%}")
    if 8 in speedups:
        print(f"2 stages at 8 microbatches: {speedups[8]:.2f}x the 1-stage throughput (target >= 1.5x, ideal 1.78x)")


if __name__ == "__main__":
    main()
