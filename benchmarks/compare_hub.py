"""The full-size language Perceiver (deepmind/language-perceiver's architecture) in percnb vs in transformers:
inference on the same 2048-byte input, after percnb.hub's conversion.

    pip install -e ".[hub]"
    nice -n 10 python benchmarks/compare_hub.py            # the README's ratio (about 1 minute on 2 cores)
    python benchmarks/compare_hub.py --tiny --runs 1       # seconds: a smoke run, not a measurement

The weights are transformers' own random initialisation of the hub's widths (q/k 256, v 1280, 201M
parameters): the checkpoint is not downloaded, and timing does not depend on the weights' values. The
input is 2048 bytes of Python's own docs with 15% of them masked, batch 1, no_grad. Before timing, the
script checks that the two models agree (logits within 1e-5 relative to max|logit|). Three cases run in
turn, `--runs` times, interleaved so that a shared machine's changing load hits each alike: transformers,
percnb decoding all 2048 positions, percnb decoding only the masked positions (PerceiverMLM's
`positions=`, which transformers' model does not have). Reported: median wall and CPU seconds and
the speed-up, the median of per-run ratios against transformers.
"""
import argparse
import statistics
import time
import warnings

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="interleaved timed runs (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-byte model: a smoke run")
    args = parser.parse_args()
    if args.runs < 1 or args.threads < 1:
        parser.error("--runs and --threads must be >= 1")
    from transformers import PerceiverConfig, PerceiverForMaskedLM
    from transformers.utils import logging as hf_logging

    from percnb import hub
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = dict(qk_channels=256, v_channels=1280)             # deepmind/language-perceiver's config.json
    if args.tiny:
        sizes.update(num_self_attends_per_block=2, max_position_embeddings=64, d_latents=64, d_model=32,
                     num_latents=16, qk_channels=32, v_channels=64)
    reference = PerceiverForMaskedLM(PerceiverConfig(**sizes)).eval()
    model = hub.from_transformers(reference, byte_ids=False)   # transformers' ids: the same input for both
    length = reference.config.max_position_embeddings
    print(f"parameters: transformers {reference.num_parameters():,}, percnb {hub.parameter_count(model):,}; "
          f"{args.threads} threads, torch {torch.__version__}")

    import pydoc_data.topics
    text = "".join(pydoc_data.topics.topics.values()).encode("utf-8")[:length]
    ids = torch.tensor([[b + 6 for b in text]])                # PerceiverTokenizer: byte + 6 special ids
    masked = torch.randperm(length, generator=torch.Generator().manual_seed(0))[:length * 15 // 100].sort().values
    ids[0, masked] = 3                                          # [MASK]
    with torch.no_grad():
        ref = reference(inputs=ids).logits
        gap = (model(ids) - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    print(f"agreement: max|d logits| / max(1, max|logit|) = {gap:.1e}")
    if gap > 1e-5:
        raise SystemExit(f"the converted model disagrees with transformers ({gap:.1e}); not timing it")

    cases = {
        "transformers": lambda: reference(inputs=ids),
        f"percnb (all {length} outputs)": lambda: model(ids),
        f"percnb ({len(masked)} masked outputs)": lambda: model(ids, positions=masked[None]),
    }
    wall = {k: [] for k in cases}
    cpu = {k: [] for k in cases}
    with torch.no_grad():
        for fn in cases.values():                               # warm-up
            fn()
        for _ in range(args.runs):
            for name, fn in cases.items():
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
    print(f"{'':<30} {'wall s':>8} {'CPU s':>8} {'speed-up':>9}   (medians of {args.runs} interleaved runs; "
          "a shared machine: ratios, not seconds, carry over)")
    for name in cases:
        ratio = statistics.median(a / b for a, b in zip(wall["transformers"], wall[name]))
        print(f"{name:<30} {statistics.median(wall[name]):8.3f} {statistics.median(cpu[name]):8.3f} {ratio:8.2f}x")


if __name__ == "__main__":
    main()
