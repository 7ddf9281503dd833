"""Where percnb's train step spends its time: torch.profiler over compare_peers' model, grouped by kind.

    python benchmarks/profile_step.py             # M=1,024, batch 8, 2 threads (about a minute)
    python benchmarks/profile_step.py --tiny      # seconds: a smoke run, not a measurement

The model is benchmarks/compare_peers.py's (64 channels x M inputs, 256 latents x 256, 6 latent layers of
8 heads, MLP hidden 1,536), trained as `percnb.train.fit` trains it: AdamW from `percnb.train.adamw`
(fused). After warm-up steps, the profiler records --steps train steps (zero_grad, forward, backward,
optimizer step). Each aten operator's *self* time (time inside it, not in the operators it calls) is
put in one group: matrix products (mm, addmm, bmm, linear's kernels), the fused attention kernel
(scaled_dot_product_attention: its matmuls and softmax together), LayerNorm, GELU, softmax, the
optimizer, element-wise arithmetic and reductions, copies and layout changes, and the rest. The groups'
shares of the profiled time say how far the step is from a matmul-bound one; the script also prints
the measured fp32 matmul peak (compare_peers' 2048 x 2048 probe) and the rate of the matrix-product
group alone, so "matmuls at their own speed" and "everything else" can be told apart.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_peers as cp  # noqa: E402  (the sibling benchmark's model, data and matmul probe)

# First match wins: (group, pattern on the aten operator's name).
GROUPS = [
    ("fused attention", r"scaled_dot_product|flash_attention|_efficient_attention"),
    ("matrix products", r"^aten::(mm|addmm|bmm|baddbmm|addmv|mv|dot|_addmm_activation)$"),
    ("LayerNorm", r"layer_norm"),
    ("GELU", r"gelu"),
    ("softmax", r"softmax"),
    ("optimizer", r"adam|_foreach_|Optimizer"),
    ("copies and layout", r"^aten::(copy_|clone|contiguous|cat|stack|_to_copy|empty_like|index_select|"
                          r"as_strided_scatter|_unsafe_view|reshape|view|t|transpose|permute|expand|"
                          r"unsqueeze|squeeze|split|chunk|narrow|slice|select|detach|alias|as_strided)$"),
    ("element-wise and reductions", r"^aten::(add|add_|mul|mul_|div|div_|sub|rsub|sum|mean|fill_|zero_|zeros_like|"
                                    r"ones_like|neg|sqrt|rsqrt|pow|exp|log|where|masked_fill|nll_loss|_log_softmax|"
                                    r"_log_softmax_backward_data|nll_loss_forward|nll_loss_backward|addcmul_|"
                                    r"addcdiv_|lerp_|threshold_backward|maximum|clamp|argmax|mse_loss)"),
]


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name):
            return group
    return "other (autograd and dispatch)"


def profile(dims: cp.Dims, m: int, batch: int, threads: int, warmup: int, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from percnb import cost
    from percnb.train import adamw
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = cp.build_percnb(dims, m)
    optimizer = adamw([{"params": list(model.parameters())}], lr=1e-3)
    x, y = cp._data(dims, batch, m)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    plain = (time.perf_counter() - start) / steps                # the same steps without the profiler
    with torch_profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(steps):
            step()
    shares, group_flops = defaultdict(float), defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::") or "Optimizer" in event.key or "adam" in event.key.lower():
            group = group_of(event.key)
            shares[group] += event.self_cpu_time_total / 1e6 / steps
            group_flops[group] += (event.flops or 0) / steps                 # the profiler counts mm/addmm/bmm
    total = sum(shares.values())
    flops = cost.estimate(cp.percnb_config(dims, m), batch).train_flops
    return {"plain": plain, "shares": dict(shares), "total": total, "flops": flops,
            "matmul_flops": group_flops["matrix products"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=1024, help="input length M (default 1024)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="profiled train steps (default 5)")
    parser.add_argument("--tiny", action="store_true", help="tiny model: a smoke run, not a measurement")
    args = parser.parse_args(argv)
    for name in ("m", "batch", "threads", "warmup", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    dims, m = (cp.TINY, 64) if args.tiny else (cp.Dims(), args.m)
    result = profile(dims, m, args.batch, args.threads, args.warmup, args.steps)
    peak = cp.matmul_peak(256 if args.tiny else 2048) * 1e9       # FLOP/s
    print(f"percnb train step, compare_peers' model at M={m:,}, batch {args.batch}, {args.threads} threads, "
          f"fused AdamW: {result['plain']:.3f} s/step without the profiler, {result['total']:.3f} s of operator "
          f"time per step under it")
    print(f"matmul FLOPs per step (cost.estimate, the textbook count): {result['flops'] / 1e9:.1f} G; "
          f"{result['flops'] / result['plain'] / 1e9:.0f} GFLOP/s = {result['flops'] / result['plain'] / peak:.0%} of "
          f"the measured fp32 matmul peak ({peak / 1e9:.1f} GFLOP/s)")
    print(f"{'group':<32}{'s/step':>8}{'share':>8}")
    for group, seconds in sorted(result["shares"].items(), key=lambda kv: -kv[1]):
        print(f"{group:<32}{seconds:>8.3f}{seconds / result['total']:>8.1%}")
    mm_time = result["shares"].get("matrix products", 0)
    if mm_time:
        rate = result["matmul_flops"] / mm_time
        print(f"the matrix products alone: {result['matmul_flops'] / 1e9:.1f} GFLOP per step at "
              f"{rate / 1e9:.0f} GFLOP/s ({rate / peak:.0%} of the peak: these shapes, e.g. 2,048 x 256 by "
              f"256 x 1,536, run below the 2,048 x 2,048 probe's rate)")
    matmul_time = mm_time + result["shares"].get("fused attention", 0)
    print(f"matrix products and fused attention together: {matmul_time / result['total']:.0%} of the operator time; "
          f"the rest ({1 - matmul_time / result['total']:.0%}) is what a matmul-bound step would not spend")
    return 0


if __name__ == "__main__":
    sys.exit(main())
