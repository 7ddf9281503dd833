"""percnb against the Perceiver peers: train and inference time and peak memory of the same model.

    pip install -e ".[bench]"                                  # perceiver-pytorch and transformers
    python benchmarks/compare_peers.py                         # the README's table (about 25 minutes on 2 cores)
    python benchmarks/compare_peers.py --tiny --libraries percnb   # seconds: a smoke run, not a measurement

The model, built by each library: one cross-attention (1 head) from M inputs of C=64 channels into
N=256 latents of width D=256, 6 latent self-attention layers with 8 heads, an MLP after every
attention, pre-LayerNorm, mean over the latents, LayerNorm and Linear to 10 classes.
perceiver-pytorch's feed-forward is GEGLU with mult 4 (Linear(D, 8D), GEGLU, Linear(4D, D)); a GELU
MLP with hidden width 6D has the same 12 D^2 weights and multiply-adds per token, so percnb and
transformers get 6D ("MLP widening 4" in GEGLU terms). transformers' PerceiverModel has no such
head: the benchmark puts the same mean + LayerNorm + Linear on its last_hidden_state.

Before timing anything the script counts each model's parameters per component and its matmul
FLOPs per step (torch.utils.flop_counter; percnb's on its textbook code, `fast=False`, which does
the peers' math) and refuses to compare models that differ by more than 2%.

Every (library, M) runs in a fresh subprocess (batch 8, 2 threads, the same data, AdamW with its
defaults): a warm-up step, then timed train steps (zero_grad, forward, backward, optimizer step)
and inference steps (eval, inference_mode), reported as medians. The libraries' processes at one M
run in lockstep: each runs one step while the others wait, in turn, so step i of every library sees
the same load (a shared machine's load changes within seconds); speedups are medians of these
per-step ratios. Peak memory is measured in another fresh subprocess running the same train steps:
the peak resident memory during the steps minus the resident memory after the model, optimizer and
data were built (after a gc). Everything repeats --rounds times with fresh processes.
"""
import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("percnb", "perceiver-pytorch", "transformers")
MODULES = {"percnb": "percnb", "perceiver-pytorch": "perceiver_pytorch", "transformers": "transformers"}
TOLERANCE = 0.02          # parameters and FLOPs must agree this closely
TARGET_SPEEDUP = 1.3      # at M >= TARGET_FROM: percnb's train step vs the fastest peer's
TARGET_MEMORY = 0.7       # at M >= TARGET_FROM: percnb's peak memory vs the leanest peer's
TARGET_FROM = 4096


@dataclasses.dataclass(frozen=True)
class Dims:
    channels: int = 64       # C, per input
    latents: int = 256       # N
    width: int = 256         # D
    layers: int = 6          # latent self-attention layers
    heads: int = 8           # latent heads (the cross-attention has 1)
    classes: int = 10

    @property
    def hidden(self) -> int:  # GELU MLP hidden width with the weights of perceiver-pytorch's GEGLU mult 4
        return 6 * self.width


TINY = Dims(channels=16, latents=16, width=64, layers=2, heads=2)   # wide enough for biases to stay within 2%


# --------------------------------------------------------------------------- the three models

def percnb_config(dims: Dims, m: int, checkpoint: bool = False):
    from percnb.models import PerceiverConfig
    return PerceiverConfig(
        input_len=m, input_dim=dims.channels, latent_len=dims.latents, latent_dim=dims.width, num_heads=dims.heads,
        cross_heads=1, num_layers=dims.layers, ffw_latent=dims.hidden, pos_encoding="none",
        decoder_type="latent_pool", decoder_reduction="mean", n_classes=dims.classes,
        checkpoint_activations=checkpoint)


def build_percnb(dims: Dims, m: int, checkpoint: bool = False):
    from percnb.models import Perceiver
    return Perceiver(percnb_config(dims, m, checkpoint))


def build_perceiver_pytorch(dims: Dims, m: int):
    from perceiver_pytorch import Perceiver
    # depth=1 with self_per_cross_attn=6: one cross-attention + its feed-forward, then 6 self-attention
    # blocks; fourier_encode_data=False leaves the C channels as they are (the frequency arguments are unused)
    return Perceiver(input_channels=dims.channels, input_axis=1, num_freq_bands=6, max_freq=10.0, depth=1,
                     num_latents=dims.latents, latent_dim=dims.width, cross_heads=1, cross_dim_head=dims.width,
                     latent_heads=dims.heads, latent_dim_head=dims.width // dims.heads, num_classes=dims.classes,
                     attn_dropout=0.0, ff_dropout=0.0, weight_tie_layers=False, fourier_encode_data=False,
                     self_per_cross_attn=dims.layers, final_classifier_head=True)


def build_transformers(dims: Dims, m: int):
    import torch
    from transformers import PerceiverConfig, PerceiverModel

    class TransformersPerceiver(torch.nn.Module):
        """PerceiverModel (no decoder) plus the head the other two have: mean over the latents,
        LayerNorm, Linear. Inputs (batch, M, C) go in as they are (no preprocessor)."""

        def __init__(self):
            super().__init__()
            self.perceiver = PerceiverModel(PerceiverConfig(
                num_latents=dims.latents, d_latents=dims.width, d_model=dims.channels, num_blocks=1,
                num_self_attends_per_block=dims.layers, num_self_attention_heads=dims.heads,
                num_cross_attention_heads=1,
                # the default "kv" would give the cross-attention's queries and keys C channels, not D
                cross_attention_shape_for_attention="q",
                cross_attention_widening_factor=dims.hidden // dims.width,
                self_attention_widening_factor=dims.hidden // dims.width,
                attention_probs_dropout_prob=0.0))          # the default is 0.1
            self.norm = torch.nn.LayerNorm(dims.width)
            self.head = torch.nn.Linear(dims.width, dims.classes)

        def forward(self, x):
            return self.head(self.norm(self.perceiver(inputs=x).last_hidden_state.mean(dim=1)))

    return TransformersPerceiver()


BUILDERS: Dict[str, Callable] = {"percnb": build_percnb, "perceiver-pytorch": build_perceiver_pytorch,
                                 "transformers": build_transformers}

# Which component each parameter belongs to (first match wins), and the knob that sets its size.
COMPONENTS = {
    "percnb": [(r"^latents$", "latent array"), (r"^encoder\.(ln_mlp|mlp)\.", "cross MLP"),
               (r"^encoder\.", "cross-attention"), (r"^processors\.\d+\.(ln_mlp|mlp)\.", "latent MLPs"),
               (r"^processors\.", "latent attention"), (r"^(norm|head)\.", "head")],
    "perceiver-pytorch": [(r"^latents$", "latent array"), (r"\.cross_ff\.", "cross MLP"),
                          (r"\.cross_attn\.", "cross-attention"), (r"self_attns\.\d+\.1\.", "latent MLPs"),
                          (r"self_attns\.\d+\.0\.", "latent attention"), (r"^to_logits\.", "head")],
    "transformers": [(r"embeddings\.latents", "latent array"), (r"cross_attention\.(layernorm|mlp)\.", "cross MLP"),
                     (r"cross_attention\.attention\.", "cross-attention"),
                     (r"self_attends\.\d+\.(layernorm|mlp)\.", "latent MLPs"),
                     (r"self_attends\.\d+\.attention\.", "latent attention"), (r"^(norm|head)\.", "head")],
}
KNOBS = {"latent array": "latents x width", "cross-attention": "cross heads, head width, input channels",
         "cross MLP": "MLP hidden width (widening) of the cross block",
         "latent attention": "latent layers, latent heads x head width",
         "latent MLPs": "latent layers, MLP hidden width (widening)", "head": "classes"}


def components(library: str, model) -> Dict[str, int]:
    counts = {name: 0 for name in KNOBS}
    for name, p in model.named_parameters():
        component = next((c for pattern, c in COMPONENTS[library] if re.search(pattern, name)), None)
        if component is None:
            raise RuntimeError(f"{library}: parameter {name} belongs to no component; extend COMPONENTS")
        counts[component] += p.numel()
    return counts


# --------------------------------------------------------------------------- measurements (in a worker)

def _data(dims: Dims, batch: int, m: int):
    import torch
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, m, dims.channels, generator=g), torch.randint(0, dims.classes, (batch,), generator=g)


def _setup(job: dict):
    import torch
    torch.set_num_threads(job["threads"])
    dims = Dims(**job["dims"])
    torch.manual_seed(0)
    # only percnb has the activation-checkpointing switch (benchmarks/cost_check.py turns it on)
    model = BUILDERS[job["library"]](dims, job["m"], **({"checkpoint": True} if job.get("checkpoint") else {}))
    optimizer = torch.optim.AdamW(model.parameters(), **job.get("optimizer", {}))
    x, y = _data(dims, job["batch"], job["m"])

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    def inference_step():
        with torch.inference_mode():
            model(x)

    return model, train_step, inference_step


def flop_counts(job: dict) -> dict:
    """Parameters per component, and matmul FLOPs per train and inference step at each M (batch 1:
    FLOPs are proportional to the batch). For percnb, "model" FLOPs run its textbook code
    (`fast=False`: plain matmuls, the same math as the peers'); "executed" FLOPs run its fast
    kernels (percnb.fast), counting the CPU SDPA kernel, which torch's counter does not know, with
    torch's own formulas (the backward one includes the scores SDPA recomputes)."""
    import torch
    import torch.nn.functional as F
    from torch.utils import flop_counter
    torch.set_num_threads(job["threads"])
    dims = Dims(**job["dims"])
    aten = torch.ops.aten
    cpu_sdpa = {aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
                aten._scaled_dot_product_flash_attention_for_cpu_backward:
                lambda grad, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(
                    grad, q, k, v)}
    result = {"flops": {}, "executed_flops": {}}
    for m in job["sizes"]:
        torch.manual_seed(0)
        model = BUILDERS[job["library"]](dims, m)
        result["components"] = components(job["library"], model)
        result["version"], result["torch"] = _version(job["library"]), torch.__version__
        x, y = _data(dims, 1, m)
        # percnb: "flops" on its textbook code (fast=False), "executed_flops" on its fast kernels
        runs = {"flops": False, "executed_flops": True} if job["library"] == "percnb" else {"flops": None}
        for key, fast in runs.items():
            if fast is not None:
                model.fast = fast
            # the forward's FLOPs are the inference step's (no dropout; counted with autograd on, as
            # torch's module tracker fails on views of parameters made under no_grad)
            with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as forward_counter:
                loss = F.cross_entropy(model(x), y)
            with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as backward_counter:
                loss.backward()
            inference = forward_counter.get_total_flops()
            result[key][str(m)] = {"train": inference + backward_counter.get_total_flops(), "inference": inference}
    return result


def _version(library: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(library)
    except PackageNotFoundError:                # percnb run from a checkout without pip install
        return "source"


def serve_steps(job: dict) -> None:
    """Build the model, then run one step per command read from stdin ("train", "inference",
    "matmul", "quit"), answering each with a RESULT line: the lockstep parent makes the libraries
    take turns, step by step, so that they all run under the same load."""
    import torch
    model, train_step, inference_step = _setup(job)
    _reply({"ready": True})
    for command in sys.stdin:
        command = command.strip()
        if command == "quit":
            return
        if command == "matmul":                 # the yardstick for percnb's GFLOP/s, under the same load
            _reply({"matmul_gflops": matmul_peak(job["matmul_n"])})
            continue
        if command == "inference" and model.training:
            model.eval()
        step = train_step if command == "train" else inference_step
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        _reply({"s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "load": os.getloadavg()[0],
                "torch": torch.__version__})


def _reply(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def _rss() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except OSError:
        import psutil
        return psutil.Process().memory_info().rss


class PeakRSS:
    """Peak resident memory of this process while the `with` block runs (`.peak`, bytes).

    On Linux the kernel keeps the high-water mark (VmHWM), which writing 5 to /proc/self/clear_refs
    resets: exact, and no sampling thread to slow the steps. Elsewhere a psutil thread samples every
    millisecond (it can miss short peaks).
    """

    def __enter__(self):
        self.method = "kernel high-water mark"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            import psutil
            self.method, self._stop, self.peak = "psutil polling every 1 ms", threading.Event(), _rss()
            process = psutil.Process()

            def poll():
                while not self._stop.wait(0.001):
                    self.peak = max(self.peak, process.memory_info().rss)
            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.method == "kernel high-water mark":
            with open("/proc/self/status") as f:
                self.peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())


def peak_memory(job: dict) -> dict:
    """Peak resident memory during warm-up + train steps, minus the resident memory before them."""
    _, train_step, _ = _setup(job)
    gc.collect()
    baseline = _rss()
    with PeakRSS() as peak:
        for _ in range(job["warmup"] + job["steps"]):
            train_step()
    return {"peak_mb": (peak.peak - baseline) / 2**20, "method": peak.method, "load": os.getloadavg()[0]}


def matmul_peak(n: int, repeats: int = 5) -> float:
    """The best fp32 matmul rate (GFLOP/s) this process gets: n x n matrices, best of `repeats`."""
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


WORKERS = {"flops": flop_counts, "memory": peak_memory}


def _command(job: dict) -> list:
    return [sys.executable, __file__, "--worker", json.dumps(job)]


def _env() -> dict:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_worker(job: dict, env: Optional[dict] = None) -> dict:
    """Run one measurement in a fresh Python process (`env`: extra environment variables) and return its result."""
    out = subprocess.run(_command(job), capture_output=True, text=True, env=dict(_env(), **(env or {})))
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"worker {job['kind']} {job.get('library', '')} M={job.get('m', '')} failed:\n"
                         f"{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


class Server:
    """A fresh Python process holding one model (`serve_steps`), which runs a step when asked."""

    def __init__(self, job: dict):
        self.job, self.errors = job, tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(_command(dict(job, kind="serve")), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.errors, text=True, env=_env())

    def ask(self, command: Optional[str]) -> dict:
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        self.errors.seek(0)
        raise SystemExit(f"worker {self.job['library']} M={self.job['m']} failed:\n{self.errors.read()[-3000:]}")

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait()
        self.errors.close()


def lockstep(jobs: Dict[Any, dict], warmup: int, steps: int, inference_steps: int) -> Dict[Any, dict]:
    """Time several models, one fresh process each, taking turns step by step.

    All processes build their model, then in each cycle every one runs one step while the others
    wait (the order rotates from cycle to cycle): warm-up train steps, timed train steps, one
    untimed inference step, timed inference steps. Step i of every model ran within one cycle, under
    the same load, so per-cycle ratios are fair even on a busy machine. Returns, per key, the lists
    of seconds ("train", "train_cpu", "inference"), the load averages seen and, for percnb, a
    matmul peak measured last.
    """
    servers = {key: Server(job) for key, job in jobs.items()}
    try:
        for server in servers.values():
            server.ask(None)                                    # built and ready
        results = {key: {"train": [], "train_cpu": [], "inference": [], "load": []} for key in jobs}
        keys = list(jobs)
        plan = [("train", None)] * warmup + [("train", "train")] * steps
        if inference_steps:
            plan += [("inference", None)] + [("inference", "inference")] * inference_steps
        for cycle, (command, record) in enumerate(plan):
            for key in keys[cycle % len(keys):] + keys[:cycle % len(keys)]:
                answer = servers[key].ask(command)
                if record:
                    results[key][record].append(answer["s"])
                    results[key]["load"].append(answer["load"])
                    if record == "train":
                        results[key]["train_cpu"].append(answer["cpu_s"])
        for key, job in jobs.items():
            if job["library"] == "percnb":
                results[key]["matmul_gflops"] = servers[key].ask("matmul")["matmul_gflops"]
        return results
    finally:
        for server in servers.values():
            server.close()


# --------------------------------------------------------------------------- checks and statistics

def check_same_model(census: Dict[str, dict], tolerance: float = TOLERANCE) -> List[str]:
    """Why the libraries' models are not the same (empty if they are): a component whose parameters,
    or a size whose FLOPs per step, differ by more than `tolerance` between libraries. A FLOP
    difference is split into the part proportional to M (the cross-attention over the inputs) and
    the fixed part (the latents), fitted on the two smallest sizes, to name the knob."""
    problems = []
    libraries = list(census)
    if len(libraries) < 2:
        return problems

    def spread(values: List[float]) -> float:
        return max(values) / min(values) - 1 if min(values) > 0 else (0.0 if max(values) == 0 else math.inf)

    def listing(values: List[float]) -> str:
        return ", ".join(f"{lib} {v:,.0f}" for lib, v in zip(libraries, values))

    for component, knob in KNOBS.items():
        values = [census[lib]["components"][component] for lib in libraries]
        if spread(values) > tolerance:
            problems.append(f"{component} parameters differ by {spread(values):.1%} ({listing(values)}); "
                            f"check {knob}")
    sizes = sorted(int(m) for m in census[libraries[0]]["flops"])
    for kind in ("train", "inference"):
        for m in sizes:
            values = [census[lib]["flops"][str(m)][kind] for lib in libraries]
            if spread(values) <= tolerance:
                continue
            message = f"{kind} FLOPs per step at M={m:,} differ by {spread(values):.1%} ({listing(values)})"
            if len(sizes) >= 2:
                m0, m1 = sizes[:2]
                per_input = [(census[lib]["flops"][str(m1)][kind] - census[lib]["flops"][str(m0)][kind]) / (m1 - m0)
                             for lib in libraries]
                fixed = [census[lib]["flops"][str(m0)][kind] - p * m0 for lib, p in zip(libraries, per_input)]
                if spread(per_input) > tolerance:
                    message += "; the part proportional to M differs: check cross heads, head width, input channels"
                if spread(fixed) > tolerance:
                    message += "; the part independent of M differs: check latents, latent layers, heads, MLP widening"
            problems.append(message)
    return problems


def loglog_slope(xs: List[float], ys: List[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def linear_fit(xs: List[float], ys: List[float]):
    """Least-squares y = a + b x, and the largest relative deviation of a point from the line."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    return a, b, max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys))


# --------------------------------------------------------------------------- the run

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--sizes", type=int, nargs="+", help="input lengths M compared (default 1024 4096 16384)")
    parser.add_argument("--scaling-sizes", type=int, nargs="*",
                        help="input lengths of percnb's scaling sweep (default 1024 .. 65536 by doubling; "
                             "none: no sweep)")
    parser.add_argument("--batch", type=int, help="default 8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed train steps first")
    parser.add_argument("--steps", type=int, help="timed train steps per run (default 5)")
    parser.add_argument("--inference-steps", type=int, help="timed inference steps per run (default 10)")
    parser.add_argument("--rounds", type=int, help="repetitions of the interleaved comparison (default 2)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny model, sizes and batch: a smoke run, not a measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out",
                        help="where the plot and the raw results (JSON) go")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = dict(sizes=[64, 128] if tiny else [1024, 4096, 16384],
                    scaling_sizes=[64, 128] if tiny else [1024 * 2 ** i for i in range(7)],
                    batch=2 if tiny else 8, steps=2 if tiny else 5, inference_steps=2 if tiny else 10,
                    rounds=1 if tiny else 2)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dims = TINY if tiny else Dims()
    if min(args.sizes + (args.scaling_sizes or [1])) < 1 or min(args.batch, args.threads, args.steps,
                                                                args.inference_steps, args.rounds) < 1:
        parser.error("sizes, batch, threads, steps, inference steps and rounds must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        if job["kind"] == "serve":
            serve_steps(job)
        else:
            _reply(WORKERS[job["kind"]](job))
        return
    missing = [lib for lib in args.libraries if importlib.util.find_spec(MODULES[lib]) is None]
    if missing:
        raise SystemExit(f"not installed: {', '.join(missing)}; install the peers with pip install -e '.[bench]' "
                         "or compare fewer libraries (--libraries percnb)")
    d = args.dims
    print(f"model: {d.channels} channels x M inputs -> cross-attention (1 head) -> {d.latents} latents x {d.width}, "
          f"{d.layers} self-attention layers x {d.heads} heads, MLP hidden {d.hidden} (GELU; = GEGLU widening 4), "
          f"mean + LayerNorm + Linear -> {d.classes} classes")
    print(f"batch {args.batch}, {args.threads} threads, AdamW; {args.warmup} warm-up + median of {args.steps} train "
          f"steps and {args.inference_steps} inference steps; {args.rounds} round(s); "
          f"{os.cpu_count()} CPUs, load average (1 min) {os.getloadavg()[0]:.2f}")
    base = dict(dims=dataclasses.asdict(args.dims), threads=args.threads)
    census = {lib: run_worker(dict(base, kind="flops", library=lib, sizes=args.sizes)) for lib in args.libraries}
    print_census(args, census)
    problems = check_same_model(census)
    if problems:
        print("\nREFUSED: the libraries do not build the same model:\n  " + "\n  ".join(problems))
        raise SystemExit(1)
    if len(args.libraries) > 1:
        print(f"same model: parameters and FLOPs agree within {TOLERANCE:.0%}")

    run = dict(base, batch=args.batch, warmup=args.warmup, steps=args.steps, matmul_n=matmul_size(args))
    times: Dict[tuple, List[dict]] = {}                 # (library, M) -> one lockstep result per round
    memory: Dict[tuple, List[dict]] = {}                # (library, M) -> one memory run per round
    for r in range(args.rounds):
        for m in args.sizes:
            session = lockstep({lib: dict(run, library=lib, m=m) for lib in args.libraries},
                               args.warmup, args.steps, args.inference_steps)
            for lib, result in session.items():
                times.setdefault((lib, m), []).append(result)
            loads = [load for result in session.values() for load in result["load"]]
            print(f"  round {r + 1}, M={m:,}: " + ", ".join(f"{lib} {statistics.median(result['train']):.3f}"
                                                          for lib, result in session.items())
                  + f" s/step (load {min(loads):.2f}..{max(loads):.2f})", flush=True)
        for m in args.sizes:
            for lib in args.libraries[r % len(args.libraries):] + args.libraries[:r % len(args.libraries)]:
                memory.setdefault((lib, m), []).append(run_worker(dict(run, kind="memory", library=lib, m=m)))
    report(args, census, times, memory)
    sweep = scaling(args, run, times, memory) if args.scaling_sizes else {}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare_peers.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "census": census,
         "times": {f"{lib} {m}": v for (lib, m), v in times.items()},
         "memory": {f"{lib} {m}": v for (lib, m), v in memory.items()}, "scaling": sweep}, indent=1))


def print_census(args, census):
    print("versions: " + ", ".join(f"{lib} {c['version']}" for lib, c in census.items())
          + f"; torch {next(iter(census.values()))['torch']}")
    print("\nparameters per component:")
    print(f"  {'component':18}" + "".join(f"{lib:>19}" for lib in census))
    for component in list(KNOBS) + ["total"]:
        values = [sum(c["components"].values()) if component == "total" else c["components"][component]
                  for c in census.values()]
        print(f"  {component:18}" + "".join(f"{v:>19,}" for v in values))
    def gflop(flops):
        return f"{flops * args.batch / 1e9:.4g}"
    print(f"GFLOP per step (matmuls, batch {args.batch}), train / inference:")
    for m in args.sizes:
        print(f"  {f'M={m:,}':18}" + "".join(
            f"{gflop(c['flops'][str(m)]['train']) + ' / ' + gflop(c['flops'][str(m)]['inference']):>19}"
            for c in census.values()))
    if "percnb" in census:
        executed = census["percnb"]["executed_flops"]
        counts = [gflop(executed[str(m)]["train"]) + " / " + gflop(executed[str(m)]["inference"]) for m in args.sizes]
        print(f"percnb's FLOPs are counted on its textbook code (fast=False: plain matmuls, the peers' math); its "
              f"fast kernels execute {', '.join(counts)} (its encoder attends in the {args.dims.channels}-channel "
              "input space: the same function, fewer multiply-adds)")


def matmul_size(args) -> int:
    return 256 if args.tiny else 2048


def seconds(runs: List[dict], what: str) -> float:
    """Median seconds per step over every timed step of every round ("train", "train_cpu", "inference")."""
    return statistics.median(t for run in runs for t in run[what])


def megabytes(runs: List[dict]) -> float:
    return statistics.median(run["peak_mb"] for run in runs)


def report(args, census, times, memory):
    libs, peers = args.libraries, [lib for lib in args.libraries if lib != "percnb"]
    loads = [load for runs in times.values() for run in runs for load in run["load"]]
    print(f"\nresults (medians over {args.rounds} round(s) x {args.steps} train / {args.inference_steps} inference "
          f"steps; load average (1 min) {min(loads):.2f}..{max(loads):.2f} on {os.cpu_count()} CPUs; memory: "
          f"{next(iter(memory.values()))[0]['method']}):")
    print(f"  {'M':>7}  {'library':18} {'train s/step':>12} {'(CPU s)':>8} {'infer s/step':>12} {'train peak MB':>13}")
    for m in args.sizes:
        for lib in libs:
            print(f"  {m:>7,}  {lib:18} {seconds(times[lib, m], 'train'):>12.3f} "
                  f"{seconds(times[lib, m], 'train_cpu'):>8.3f} {seconds(times[lib, m], 'inference'):>12.3f} "
                  f"{megabytes(memory[lib, m]):>13.0f}")
    if "percnb" in libs:
        peak = max(run["matmul_gflops"] for m in args.sizes for run in times["percnb", m])
        print(f"\npercnb's throughput, against a measured fp32 matmul peak of {peak:.1f} GFLOP/s ({args.threads} "
              f"threads: the best {matmul_size(args)}x{matmul_size(args)} matmul rate, measured after each percnb "
              f"timing session):")
        for m in args.sizes:
            step = seconds(times["percnb", m], "train")
            model = census["percnb"]["flops"][str(m)]["train"] * args.batch / step / 1e9
            executed = census["percnb"]["executed_flops"][str(m)]["train"] * args.batch / step / 1e9
            print(f"  M={m:<7,} train: {model:6.3g} GFLOP/s of the model's FLOPs ({model / peak:.0%} of peak); "
                  f"{executed:6.3g} GFLOP/s executed ({executed / peak:.0%})")
    if "percnb" not in libs or not peers:
        print("\n(no percnb-vs-peer ratios: compare percnb with at least one peer)")
        return
    print("\npercnb against the best peer at each M (time: median of the per-cycle ratios; memory: of the "
          "per-round ratios):")
    print(f"  {'M':>7}  {'train speedup':30}  {'inference speedup':30}  {'peak memory ratio':30}")
    verdict = {"speed": [], "memory": [], "no slower": []}
    for m in args.sizes:
        row = []
        for what in ("train", "inference"):
            best = min(peers, key=lambda lib: seconds(times[lib, m], what))
            ratios = [theirs / ours for a, b in zip(times["percnb", m], times[best, m])
                      for ours, theirs in zip(a[what], b[what])]
            row.append((statistics.median(ratios), best))
        best = min(peers, key=lambda lib: megabytes(memory[lib, m]))
        row.append((statistics.median(a["peak_mb"] / b["peak_mb"] for a, b in zip(memory["percnb", m],
                                                                                   memory[best, m])), best))
        print(f"  {m:>7,}  " + "  ".join(f"{f'{value:.2f}x (vs {best})':30}" for value, best in row))
        (train, _), (infer, _), (mem, _) = row
        verdict["no slower"].append(train >= 1 and infer >= 1)
        if m >= TARGET_FROM:
            verdict["speed"].append(train >= TARGET_SPEEDUP)
            verdict["memory"].append(mem <= TARGET_MEMORY)
    def word(oks):
        return "n/a (no size in range)" if not oks else ("meets" if all(oks) else "MISSES")
    print(f"targets: at M >= {TARGET_FROM:,} train step >= {TARGET_SPEEDUP}x faster than the fastest peer: "
          f"{word(verdict['speed'])}; peak memory <= {TARGET_MEMORY}x the leanest peer's: {word(verdict['memory'])}; "
          f"at every M no slower than the fastest peer (train and inference): {word(verdict['no slower'])}"
          + ("  [tiny run: not a measurement]" if args.tiny else ""))


def scaling(args, run, times, memory) -> Dict[int, List[dict]]:
    """percnb alone at every --scaling-sizes M, in lockstep (one process per M, taking turns), --rounds
    times; peak memory from the comparison's runs where it measured that M, else from new runs."""
    sizes = sorted(set(args.scaling_sizes))
    sweep: Dict[int, List[dict]] = {}
    for r in range(args.rounds):
        session = lockstep({m: dict(run, library="percnb", m=m) for m in sizes}, args.warmup, args.steps, 0)
        for m in sizes:
            sweep.setdefault(m, []).append(session[m])
            if ("percnb", m) not in memory or len(memory["percnb", m]) <= r:
                memory.setdefault(("percnb", m), []).append(run_worker(dict(run, kind="memory", library="percnb",
                                                                            m=m)))
        loads = [load for result in session.values() for load in result["load"]]
        print(f"  scaling round {r + 1}: " + ", ".join(f"M={m:,} {statistics.median(session[m]['train']):.3f}"
                                                     for m in sizes)
              + f" s/step (load {min(loads):.2f}..{max(loads):.2f})", flush=True)
    train = [seconds(sweep[m], "train") for m in sizes]
    peak = [megabytes(memory["percnb", m]) for m in sizes]
    print(f"\nhow percnb's train step grows with M (batch {args.batch}; medians over {args.rounds} round(s) x "
          f"{args.steps} steps, all M in lockstep):")
    print(f"  {'M':>7}  {'s/step':>8}  {'peak MB':>8}")
    for m, t, mem in zip(sizes, train, peak):
        print(f"  {m:>7,}  {t:>8.3f}  {mem:>8.0f}")
    if len(sizes) >= 2:
        for name, values, unit in (("time", train, "s"), ("memory", peak, "MB")):
            a, b, worst = linear_fit(sizes, values)
            print(f"  {name}: log-log slope {loglog_slope(sizes, values):.2f} over M = {sizes[0]:,}..{sizes[-1]:,}; "
                  f"linear fit {a:.3g} {unit} + {b * 1024:.3g} {unit} per 1,024 inputs (largest deviation "
                  f"{worst:.0%}); log-log slope between the two largest M {loglog_slope(sizes[-2:], values[-2:]):.2f}")
        plot(args, sizes, train, peak, times, memory)
    return sweep


def plot(args, sizes, train, peak, times, memory):
    """Time and peak memory against M, log-log: percnb's sweep with its linear fit, and every library's
    points from the comparison."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, values, label in ((axes[0], train, "train step (s)"), (axes[1], peak, "peak memory above baseline (MB)")):
        slope = loglog_slope(sizes, values)
        ax.loglog(sizes, values, "o", color="C0", label=f"percnb sweep (log-log slope {slope:.2f})")
        a, b, _ = linear_fit(sizes, values)
        ax.loglog(sizes, [a + b * m for m in sizes], ":", color="C0", label="its linear fit a + b M")
        for i, lib in enumerate(args.libraries):
            points = [megabytes(memory[lib, m]) if ax is axes[1] else seconds(times[lib, m], "train")
                      for m in args.sizes]
            ax.loglog(args.sizes, points, "s--", color=f"C{i + 1}", label=f"{lib} (comparison)")
        ax.set_xlabel("inputs M")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    loads = [load for runs in times.values() for run in runs for load in run["load"]]
    fig.suptitle(f"train step, batch {args.batch}, {args.threads} threads, load average {min(loads):.1f}.."
                 f"{max(loads):.1f} on {os.cpu_count()} CPUs" + (" (tiny smoke run)" if args.tiny else ""))
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "compare_peers_scaling.png"
    fig.savefig(path, dpi=110)
    print(f"  plot: {path}")


if __name__ == "__main__":
    main()
