"""percnb.cost against measurement, and what activation checkpointing and a fused optimizer buy.

    python benchmarks/cost_check.py            # the README's numbers (about 10 minutes on 2 cores)
    python benchmarks/cost_check.py --tiny     # seconds: a smoke run, not a measurement

The model is benchmarks/compare_peers.py's (M inputs of 64 channels, 256 latents x 256, 6 latent layers,
batch 8, 2 threads), each measurement in a fresh process run by compare_peers' workers.

1. Prediction: at every M (1,024 .. 65,536 by doubling), with checkpointing off and on, `percnb.cost`'s
   matmul FLOPs per train and inference step against torch.utils.flop_counter on the textbook code, and
   its peak train memory against the measured one: compare_peers' peak resident memory during warm-up +
   train steps minus the resident memory before them (the kernel's high-water mark), with glibc told to
   hand freed blocks back at once (MALLOC_MMAP_THRESHOLD_=131072), so that resident memory follows the
   live tensors, which is what cost.py counts, rather than the allocator's cache of freed ones.
2. Checkpointing: percnb's train step with `checkpoint_activations` on and off, in lockstep (taking
   turns step by step, so both see the same load), and its peak memory measured both ways (as above,
   and with the default allocator, as compare_peers measures). Targets: memory <= 0.5x, time <= 1.4x.
3. The optimizer: AdamW's default per-parameter loop (what compare_peers gives every library) against
   the fused AdamW that percnb.train.fit uses, in lockstep at M=1,024.
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_peers as cp  # noqa: E402  (the sibling benchmark's workers and model)

TOLERANCE = 0.15                       # prediction vs measurement
TARGET_MEMORY, TARGET_TIME = 0.5, 1.4  # checkpointing vs not
TRIMMED = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def predict(dims: cp.Dims, m: int, batch: int, checkpoint: bool):
    from percnb import cost
    return cost.estimate(cp.percnb_config(dims, m, checkpoint), batch)


def prediction(args, base) -> dict:
    measured_flops = cp.run_worker(dict(base, kind="flops", library="percnb", sizes=args.sizes))["flops"]
    rows, worst = [], 0.0
    print(f"\n1. percnb.cost's prediction against measurement (batch {args.batch}):")
    print(f"  {'M':>7} {'checkpoint':>10} {'train GFLOP pred/meas':>22} {'infer GFLOP pred/meas':>22} "
          f"{'peak MiB pred/meas':>19} {'error':>6}")
    for m in args.sizes:
        for checkpoint in (False, True):
            est = predict(args.dims, m, args.batch, checkpoint)
            mem = cp.run_worker(dict(base, kind="memory", library="percnb", m=m, checkpoint=checkpoint), TRIMMED)
            flops = {k: v * args.batch for k, v in measured_flops[str(m)].items()}
            errors = [est.train_flops / flops["train"] - 1, est.inference_flops / flops["inference"] - 1,
                      est.peak_train_bytes / 2**20 / mem["peak_mb"] - 1]
            worst = max(worst, *map(abs, errors))
            rows.append(dict(m=m, checkpoint=checkpoint, predicted=dataclasses.asdict(est), flops=flops,
                             peak_mib=mem["peak_mb"]))
            print(f"  {m:>7,} {str(checkpoint):>10} {est.train_flops / 1e9:>10.1f} / {flops['train'] / 1e9:<9.1f} "
                  f"{est.inference_flops / 1e9:>10.1f} / {flops['inference'] / 1e9:<9.1f} "
                  f"{est.peak_train_bytes / 2**20:>8.0f} / {mem['peak_mb']:<8.0f} {errors[2]:>+6.0%}", flush=True)
    print(f"  largest error {worst:.1%}: {'meets' if worst <= TOLERANCE else 'MISSES'} the {TOLERANCE:.0%} target"
          + ("  [tiny run: not a measurement]" if args.tiny else ""))
    return {"rows": rows, "largest_error": worst}


def checkpointing(args, run) -> dict:
    print(f"\n2. activation checkpointing on vs off (lockstep, {args.steps} timed train steps after {args.warmup} "
          f"warm-up; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs):")
    results = {}
    for m in args.checkpoint_sizes:
        jobs = {False: dict(run, library="percnb", m=m), True: dict(run, library="percnb", m=m, checkpoint=True)}
        session = cp.lockstep(jobs, args.warmup, args.steps, 0)
        time_ratio = statistics.median(b / a for a, b in zip(session[False]["train"], session[True]["train"]))
        memory = {}
        for allocator, env in (("trimmed", TRIMMED), ("default", {})):
            peaks = {ck: cp.run_worker(dict(job, kind="memory"), env)["peak_mb"] for ck, job in jobs.items()}
            memory[allocator] = (peaks[False], peaks[True])
        seconds = tuple(statistics.median(session[ck]["train"]) for ck in (False, True))
        results[m] = dict(seconds=seconds, time_ratio=time_ratio, memory=memory)
        mem_ratio = memory["trimmed"][1] / memory["trimmed"][0]
        print(f"  M={m:<7,} train step {results[m]['seconds'][0]:.3f} -> {results[m]['seconds'][1]:.3f} s "
              f"({time_ratio:.2f}x; target <= {TARGET_TIME}x: {'meets' if time_ratio <= TARGET_TIME else 'MISSES'}); "
              f"peak {memory['trimmed'][0]:.0f} -> {memory['trimmed'][1]:.0f} MiB ({mem_ratio:.2f}x; target <= "
              f"{TARGET_MEMORY}x: {'meets' if mem_ratio <= TARGET_MEMORY else 'MISSES'}); default allocator "
              f"{memory['default'][0]:.0f} -> {memory['default'][1]:.0f} MiB "
              f"({memory['default'][1] / memory['default'][0]:.2f}x)", flush=True)
    return results


def optimizer(args, run) -> dict:
    m = args.sizes[0]
    jobs = {"default": dict(run, library="percnb", m=m), "fused": dict(run, library="percnb", m=m,
                                                                       optimizer={"fused": True})}
    session = cp.lockstep(jobs, args.warmup, args.steps, 0)
    ratio = statistics.median(a / b for a, b in zip(session["default"]["train"], session["fused"]["train"]))
    print(f"\n3. AdamW at M={m:,}: train step {statistics.median(session['default']['train']):.3f} s with the default "
          f"per-parameter loop, {statistics.median(session['fused']['train']):.3f} s fused ({ratio:.2f}x faster, "
          "lockstep)")
    return {"seconds": {k: statistics.median(v["train"]) for k, v in session.items()}, "speedup": ratio}


PARTS = {"prediction": prediction, "checkpointing": checkpointing, "optimizer": optimizer}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", help="input lengths M predicted (default 1024 .. 65536)")
    parser.add_argument("--checkpoint-sizes", type=int, nargs="*", help="M timed with checkpointing (4096 16384)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, help="timed (and memory-measured) train steps (default 4)")
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes: a smoke run, not a measurement")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which of 1-3 to run")
    parser.add_argument("--out", type=Path, default=cp.ROOT / "benchmarks" / "out")
    args = parser.parse_args(argv)
    args.dims = cp.TINY if args.tiny else cp.Dims()
    args.sizes = args.sizes or ([64, 128] if args.tiny else [1024 * 2 ** i for i in range(7)])
    if args.checkpoint_sizes is None:
        args.checkpoint_sizes = [128] if args.tiny else [4096, 16384]
    args.steps = args.steps or (1 if args.tiny else 4)
    if min(args.sizes + args.checkpoint_sizes + [args.batch, args.threads, args.steps]) < 1 or args.warmup < 0:
        parser.error("sizes, batch, threads and steps must be >= 1, warmup >= 0")
    print(f"percnb on compare_peers' model ({args.dims}), batch {args.batch}, {args.threads} threads; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (a shared machine is noisy: ratios come "
          "from lockstep runs)")
    base = dict(dims=dataclasses.asdict(args.dims), threads=args.threads)
    run = dict(base, batch=args.batch, warmup=args.warmup, steps=args.steps, matmul_n=256 if args.tiny else 2048)
    results = {part: PARTS[part](args, run) for part in args.parts}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cost_check_{'_'.join(args.parts)}.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
