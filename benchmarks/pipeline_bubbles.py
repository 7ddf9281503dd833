"""Pipeline bubbles, measured: train-step throughput of 1 stage vs 2 stages (one thread per process).

    python benchmarks/pipeline_bubbles.py            # the README's numbers (a few minutes on 2 cores)
    python benchmarks/pipeline_bubbles.py --tiny     # a seconds-long smoke run, not a measurement

With p stages and m microbatches a pipeline is busy m of every m + p - 1 time slots, so its ideal
speedup over one stage is p * m / (m + p - 1). "1 stage" is the plain single-process Perceiver on the
whole batch; "2 stages" is percnb.pipeline (gloo, 1F1B; GPipe at m=1, where 1F1B needs m >= p).
Everything runs in ONE launch of 2 processes, and each 2-stage setting is timed right after its own
1-stage run, so that a machine whose load changes affects both sides of a ratio alike; with
--rounds R the whole sweep repeats R times and each speedup is the median of its R ratios.
"""
import argparse
import os
import statistics

import torch

from percnb.models import PerceiverConfig
from percnb.pipeline import PipelineJob, module_costs, plan_pipeline, run_pipelines

TARGET = 1.6   # issue 17's target for 2 stages at 8 microbatches


def build(tiny: bool):
    if tiny:
        dims = dict(input_len=16, input_dim=16, latent_len=8, latent_dim=16, output_dim=16, ffw_latent=32,
                    ffw_output=32, num_heads=2, num_layers=2)
        batch = 8
    else:
        dims = dict(input_len=128, input_dim=256, latent_len=128, latent_dim=256, output_dim=256, ffw_latent=1024,
                    ffw_output=1024, num_heads=8, num_layers=7)
        # the cut is plan_pipeline's, balanced by matmul FLOPs (percnb.cost): encoder + 3 processors |
        # 4 processors + the one-query decoder, whose compute is small
        batch = 32
    config = PerceiverConfig(n_classes=10, seed=0, **dims)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, config.input_len, config.input_dim, generator=g)
    targets = torch.randint(0, 10, (batch,), generator=g)
    return config, inputs, targets


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model and batch: a smoke run, not a measurement")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2, help="repetitions of the sweep (median ratio)")
    args = parser.parse_args()
    config, inputs, targets = build(args.tiny)
    one_stage = plan_pipeline(config, 1, schedule="gpipe", n_microbatches=1)
    jobs = []
    for _ in range(args.rounds):
        for m in args.microbatches:
            two_stages = plan_pipeline(config, 2, schedule="1f1b" if m >= 2 else "gpipe", n_microbatches=m,
                                       batch_size=len(inputs))
            jobs += [PipelineJob(plan, inputs, targets, steps=args.steps + 1) for plan in (one_stage, two_stages)]
    load_before = os.getloadavg()[0]
    results = run_pipelines(jobs, threads=1)
    print(f"model: {config.num_layers} latent layers, D={config.latent_dim}, {config.latent_len} latents, "
          f"{config.input_len} inputs, batch {len(inputs)}; 1 thread per process; "
          f"stages of {results[1].stage_parameters} parameters; {args.rounds} round(s) of {args.steps} steps")
    costs, cut = module_costs(config), jobs[1].plan.split_points
    shares = [sum(costs[i] for i in jobs[1].plan.stage_indices(s)) / sum(costs) for s in range(2)]
    print(f"2-stage cut by estimated compute: split points {cut}, stage shares of the matmul FLOPs "
          + " / ".join(f"{share:.1%}" for share in shares))
    print(f"load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'microbatches':>12} {'1-stage s/step':>15} {'2-stage s/step':>15} {'speedup':>8} {'ideal':>6} "
          f"{'of ideal':>9} {'2-stage cores':>14}")
    seconds = [statistics.median(result.seconds_per_step[1:]) for result in results]   # step 0 warms up
    # CPU seconds over wall seconds: the cores the 2 processes actually got (2 stages need up to 2; on a
    # busy machine they get fewer, and then no bubble arithmetic can show)
    cores = [sum(r.cpu_seconds_per_step[1:]) / sum(r.seconds_per_step[1:]) for r in results]
    speedups = {}
    for i, m in enumerate(args.microbatches):
        pairs = [(seconds[2 * j], seconds[2 * j + 1]) for j in range(i, len(jobs) // 2, len(args.microbatches))]
        one, two = (statistics.median(side) for side in zip(*pairs))
        used = statistics.median(cores[2 * j + 1] for j in range(i, len(jobs) // 2, len(args.microbatches)))
        speedups[m] = statistics.median(a / b for a, b in pairs)
        ideal = 2 * m / (m + 1)
        print(f"{m:>12} {one:>15.3f} {two:>15.3f} {speedups[m]:>7.2f}x {ideal:>5.2f}x {speedups[m] / ideal:>8.0%} "
              f"{used:>14.2f}")
    if 8 in speedups:
        verdict = "meets" if speedups[8] >= TARGET else "misses"
        print(f"2 stages at 8 microbatches: {speedups[8]:.2f}x the 1-stage throughput "
              f"({verdict} the {TARGET}x target; ideal 1.78x)")

if __name__ == "__main__":
    main()
