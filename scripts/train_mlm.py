"""Train the byte-level PerceiverMLM that notebook 04 loads, or run the study behind its table.

    python scripts/train_mlm.py --overwrite-shipped          # the shipped checkpoint:
                                                             # percnb/assets/mlm_bytes.pt (+ .json)
    python scripts/train_mlm.py --study --overwrite-shipped  # each design choice for 600 steps, 2 at a time:
                                                             # percnb/assets/mlm_study.json
    python scripts/train_mlm.py --steps 200 --out /tmp/mlm.pt   # a quick run

The shipped files live in the package (percnb/assets/, read through `percnb.assets` and
`PerceiverMLM.from_pretrained("bytes-mlm")`), so a pip-installed percnb has them too.
Replacing one (percnb/assets/mlm_bytes.pt, mlm_bytes.json, mlm_study.json) needs
--overwrite-shipped; a missing one is made without it. Every output path is checked before the first
step, and every file is written atomically (percnb.io): an interrupted run leaves the old file whole.

Text: the Python documentation topics (`pydoc_data.topics` of Python 3.11, the snapshot in percnb.assets),
split by document into train/val/test (`percnb.data.text.load_text_splits`, seed 0). Choices are made on
the validation split; the test split is scored once, at the end of the checkpoint run, from the reloaded file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch

from percnb.data.text import (
    VOCAB_SIZE,
    ByteMasker,
    RandomWindows,
    fixed_windows,
    load_text_splits,
    masked_accuracy,
    masked_eval_set,
    neighbour_predict,
    unigram_predict,
)
from percnb.io import atomic_write, check_writable
from percnb.models import PerceiverMLM, mlm_config
from percnb.train import evaluate, fit, masked_lm_step

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 128

# The study: one change at a time from the plain Perceiver IO set-up to the shipped model, then
# the latent count from a tight bottleneck to none (latent_len = seq_len: one latent per byte).
STUDY = [
    ("Perceiver IO: tokens at std 0.02, learned latents, position-only queries",
     dict(token_init_std=0.02, latents_from_inputs=False, queries_from_latents=False, decoder_residual=False)),
    ("+ tokens on the sinusoid's scale (std 0.71)",
     dict(latents_from_inputs=False, queries_from_latents=False, decoder_residual=False)),
    ("+ latents seeded from their input windows", dict(queries_from_latents=False, decoder_residual=False)),
    ("+ queries read their window's latent (shipped)", dict()),
    ("latent_len 8", dict(latent_len=8)),
    ("latent_len 16", dict(latent_len=16)),
    ("latent_len 64", dict(latent_len=64)),
    ("latent_len 128 (no bottleneck)", dict(latent_len=128)),
]


def baselines(splits, test_inputs, test_targets, seq_len: int) -> dict:
    """The count baselines on the test set: what the model sees, and (easier) the uncorrupted neighbours."""
    clean = fixed_windows(splits.test, seq_len)
    return {"unigram": masked_accuracy(unigram_predict(splits.train, test_inputs), test_targets),
            "neighbours_as_seen": masked_accuracy(neighbour_predict(splits.train, test_inputs), test_targets),
            "neighbours_uncorrupted": masked_accuracy(neighbour_predict(splits.train, clean), test_targets)}


def train(config, splits, args, steps: int, label: str = ""):
    """Train a PerceiverMLM from `config` with fit(): a tqdm bar, or with a `label`, one line per evaluation."""
    def report(step, history):
        if history.eval_step and history.eval_step[-1] == step:
            print(f"  {label}, step {step}: val accuracy {history.val_accuracy[-1]:.3f}", flush=True)

    masker = ByteMasker()
    val = masked_eval_set(splits.val, config.input_len, masker, seed=0)
    model = PerceiverMLM(config)
    train_windows = RandomWindows(splits.train, config.input_len, length=steps * args.batch_size)
    history = fit(model, train_windows, val_data=val, steps=steps, batch_size=args.batch_size, lr=args.lr,
                  schedule="cosine", warmup=min(args.warmup, steps // 4), grad_clip=1.0, augment=masker,
                  step_fn=masked_lm_step, eval_every=args.eval_every, seed=args.seed, progress=not label,
                  callback=report if label else None)
    return model, history


def study_entry(index: int, steps: int, args) -> tuple:
    """Train study entry `index` for `steps` steps; returns (name, what to record)."""
    torch.set_num_threads(args.threads)
    name, changes = STUDY[index]
    config = mlm_config(SEQ_LEN, VOCAB_SIZE, seed=args.seed, **changes)
    model, history = train(config, load_text_splits(seed=0), args, steps, label=name)
    return name, {"changes": changes, "steps": steps, "val_step": history.eval_step,
                  "val_accuracy": history.val_accuracy, "parameters": model.num_parameters(), "order": index}


def write_json(path: Path, obj) -> None:
    """`obj` as indented JSON at `path`, atomically: a report is whole or is the previous one."""
    text = json.dumps(obj, indent=1)
    atomic_write(path, lambda f: f.write(text.encode()))


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def shipped_folder() -> Path:
    """Where the package keeps the files this script made (percnb.assets reads them from there)."""
    return ROOT / "percnb" / "assets"


def shipped_files() -> set:
    """The artefacts this script made and the package ships (notebook 04 and the README read them)."""
    folder = shipped_folder()
    return {(folder / name).resolve() for name in ("mlm_bytes.pt", "mlm_bytes.json", "mlm_study.json")}


def check_outputs(parser: argparse.ArgumentParser, paths: list, overwrite_shipped: bool) -> None:
    """Before any training: every output can be written, no two outputs are one file, and no shipped file
    is replaced without --overwrite-shipped. Missing folders are made (as a later write would need)."""
    resolved = [path.resolve() for path in paths]
    if len(set(resolved)) != len(resolved):
        parser.error(f"--out {paths[0]} would make the report {paths[1]} overwrite the checkpoint; "
                     "give the checkpoint another suffix, e.g. --out mlm.pt")
    replaced = [path for path in resolved if path in shipped_files() and path.exists()]
    if replaced and not overwrite_shipped:
        parser.error(f"this run would overwrite the shipped {', '.join(map(str, replaced))}; pass --out elsewhere "
                     "for a new run, or --overwrite-shipped to regenerate the shipped files on purpose")
    for path in resolved:
        blocking = next((folder for folder in path.parents if folder.exists() and not folder.is_dir()), None)
        if blocking is not None:
            parser.error(f"--out: cannot write {path}: {blocking} is a file, not a folder")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f"--out: cannot write {path}: its folder cannot be made ({error.strerror})")
        try:
            check_writable(path)
        except ValueError as error:
            parser.error(f"--out: {error}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    positive, natural = _int_at_least(1), _int_at_least(0)
    parser.add_argument("--study", action="store_true", help="run the design study instead of the checkpoint")
    parser.add_argument("--steps", type=positive, default=None,
                        help="optimizer steps (default: 4000 for the checkpoint, 600 per study entry)")
    parser.add_argument("--batch-size", type=positive, default=32)
    parser.add_argument("--lr", type=_positive_float, default=2e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup", type=natural, default=300,
                        help="linear warm-up steps, then cosine decay (0: none)")
    parser.add_argument("--eval-every", type=positive, default=None,
                        help="validation every this many steps (default: 100 in the study, 250 otherwise)")
    parser.add_argument("--threads", type=positive, default=1,
                        help="torch threads per process (1: on 2 cores a step is about as fast as with 2, "
                             "and the other core stays free)")
    parser.add_argument("--workers", type=positive, default=2, help="study entries trained at once")
    parser.add_argument("--seed", type=natural, default=0)
    parser.add_argument("--only", type=natural, nargs="*",
                        help=f"study entries to run (indices 0..{len(STUDY) - 1}), default all")
    parser.add_argument("--out", type=Path, default=None,
                        help="checkpoint path (default percnb/assets/mlm_bytes.pt; its report is the same path "
                             "with .json) or study JSON (default percnb/assets/mlm_study.json)")
    parser.add_argument("--overwrite-shipped", action="store_true",
                        help="allow replacing the shipped percnb/assets/mlm_bytes.pt, .json or mlm_study.json")
    args = parser.parse_args(argv)
    if args.only is not None and not args.study:
        parser.error("--only picks study entries; add --study")
    if args.only and max(args.only) >= len(STUDY):
        parser.error(f"--only: the study has entries 0..{len(STUDY) - 1}, got {max(args.only)}")
    if args.study:
        out = args.out or shipped_folder() / "mlm_study.json"
        check_outputs(parser, [out], args.overwrite_shipped)
    else:
        out = args.out or shipped_folder() / "mlm_bytes.pt"
        check_outputs(parser, [out, out.with_suffix(".json")], args.overwrite_shipped)
    if args.eval_every is None:
        args.eval_every = 100 if args.study else 250
    torch.set_num_threads(args.threads)
    splits = load_text_splits(seed=0)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])])
    machine = {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
               "python": platform.python_version(), "load_before": os.getloadavg()[0]}

    if args.study:
        steps = args.steps or 600
        results = json.loads(out.read_text())["results"] if out.exists() and args.only else {}
        wanted = [i for i in range(len(STUDY)) if not args.only or i in args.only]
        # Entries are independent: run them in parallel processes of args.threads threads each.
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(study_entry, i, steps, args): i for i in wanted}
            for future in as_completed(futures):
                name, result = future.result()
                results[name] = result
                print(f"{name:62s} val acc {result['val_accuracy'][-1]:.3f} after {steps} steps", flush=True)
                write_json(out, {"command": command, "machine": machine, "batch_size": args.batch_size,
                                 "lr": args.lr, "warmup": args.warmup, "seq_len": SEQ_LEN, "results": results})
        return

    steps = args.steps or 4000
    config = mlm_config(SEQ_LEN, VOCAB_SIZE, seed=args.seed)
    start = time.perf_counter()
    model, history = train(config, splits, args, steps)
    seconds = time.perf_counter() - start
    atomic_write(out, lambda f: model.save(f, dtype=torch.float16))
    loaded = PerceiverMLM.load(out)                 # the test score is the shipped file's, not the live model's
    test_inputs, test_targets = masked_eval_set(splits.test, SEQ_LEN, ByteMasker(), seed=1)
    test = evaluate(loaded, (test_inputs, test_targets), step_fn=masked_lm_step)
    machine["load_after"] = os.getloadavg()[0]
    report = {"command": command, "machine": machine, "seconds": seconds, "steps": steps,
              "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "config": config.to_dict(),
              "parameters": model.num_parameters(), "file_bytes": out.stat().st_size,
              "history": {"step": history.step, "loss": history.loss, "eval_step": history.eval_step,
                          "val_accuracy": history.val_accuracy, "val_loss": history.val_loss},
              "test_accuracy": test["accuracy"], "test_loss": test["loss"],
              "baselines": baselines(splits, test_inputs, test_targets, SEQ_LEN)}
    write_json(out.with_suffix(".json"), report)
    print(f"{steps} steps in {seconds / 60:.1f} min; test masked-byte accuracy {test['accuracy']:.4f} "
          f"(baselines: {report['baselines']}); {out} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
