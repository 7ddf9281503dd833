"""One small training loop for every notebook and script: `fit` and `evaluate`.

A task is a model plus a `step_fn(model, batch) -> (loss, n_correct, n_counted)`; the default is
classification with cross-entropy on `(inputs, targets)` batches; the masked language model passes
`masked_lm_step`, which decodes and scores only the masked positions, and Perceiver IO on pixel sets
`image_io_step`, which asks for a class and for pixels in one pass.
"""
from __future__ import annotations

import itertools
import math
import numbers
import time
from collections.abc import Sized
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import checks
from .data.images import pixel_set, pixels_at, random_keep
from .data.text import IGNORE
from .device import autocast, resolve_device
from .encodings import grid_coordinates

StepFn = Callable[[nn.Module, Sequence[torch.Tensor]], Tuple[torch.Tensor, int, int]]
Data = Union[Dataset, DataLoader, Tuple[torch.Tensor, ...]]
LR_SCHEDULES = ("onecycle", "cosine", "constant")


def classification_step(model: nn.Module, batch: Sequence[torch.Tensor],
                        label_smoothing: float = 0.0) -> Tuple[torch.Tensor, int, int]:
    """Cross-entropy of `model(inputs)` (batch, classes) against `targets` (batch,)."""
    inputs, targets = batch[0], batch[1]
    logits = model(inputs)
    loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    return loss, int((logits.argmax(-1) == targets).sum()), targets.numel()


def masked_lm_step(model: nn.Module, batch: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, int, int]:
    """Cross-entropy over the scored positions of an `(inputs, targets)` batch of a `PerceiverMLM`.

    inputs, targets: (batch, seq) long; targets hold IGNORE where nothing is scored (see
    `percnb.data.text.ByteMasker`). Only the scored positions are decoded (`positions=`): each row's
    scored positions first, padded with unscored ones to the longest row.
    """
    inputs, targets = batch[0], batch[1]
    scored = targets != IGNORE
    k = max(1, int(scored.sum(1).max()))
    # A stable sort on "not scored" puts each row's scored positions first, in order.
    positions = torch.sort((~scored).to(torch.uint8), dim=1, stable=True).indices[:, :k]
    picked = targets.gather(1, positions)
    logits = model(inputs, positions=positions)
    loss = F.cross_entropy(logits.flatten(0, 1), picked.flatten(), ignore_index=IGNORE)
    counted = picked != IGNORE
    return loss, int(((logits.argmax(-1) == picked) & counted).sum()), int(counted.sum())


def image_io_step(model: nn.Module, batch: Sequence[torch.Tensor], *, pixel_weight: float = 100.0,
                  fractions: Tuple[float, float] = (0.1, 1.0), grid_queries: int = 32,
                  random_queries: int = 16) -> Tuple[torch.Tensor, int, int]:
    """One Perceiver IO step on an `(images, labels)` batch for a `PerceiverImageIO`: each image shows a
    random fraction of its pixels, drawn uniformly from `fractions`, and the model answers its class
    query and pixel queries in one pass.

    images: (batch, channels, height, width) in their own units (the targets); labels: (batch,) long.
    The pixel queries are `grid_queries` grid pixels (the same random ones for the batch, seen or not)
    and `random_queries` uniform points of [-1, 1]^2 whose targets are bilinear (`pixels_at`): a model
    only answers between pixels if it was asked there. Loss: cross-entropy + pixel_weight * MSE.
    Draws from torch's global generator, which `fit(seed=...)` seeds. For `fit(step_fn=...)` bind the
    settings with functools.partial.
    """
    checks.real("pixel_weight", pixel_weight, minimum=0.0, strict=False, hint="; 0 trains the class query only")
    if not (isinstance(fractions, (tuple, list)) and len(fractions) == 2):
        raise ValueError(f"fractions must be a (low, high) pair, got {fractions!r}")
    low, high = (checks.real(f"fractions[{i}]", f, minimum=0.0, strict=True) for i, f in enumerate(fractions))
    if not low <= high <= 1:
        raise ValueError(f"fractions must be (low, high) with 0 < low <= high <= 1, got {fractions!r}")
    checks.int_at_least("grid_queries", grid_queries, 0)
    checks.int_at_least("random_queries", random_queries, 0)
    images, labels = batch[0], batch[1]
    checks.shape("images", images, ("batch", "channels", "height", "width"))
    b, _, h, w = images.shape
    if grid_queries > h * w:
        raise ValueError(f"grid_queries={grid_queries} asks for more grid pixels than an image has ({h * w})")
    keep = random_keep(b, h * w, low + (high - low) * torch.rand(b))
    grid = grid_coordinates((h, w), images.dtype)[torch.randperm(h * w)[:grid_queries]]
    queries = torch.cat([grid.to(images.device).expand(b, -1, -1),
                         torch.rand(b, random_queries, 2, dtype=images.dtype, device=images.device) * 2 - 1], 1)
    logits, pixels = model(*pixel_set(images, keep.to(images.device)), queries)
    loss = F.cross_entropy(logits, labels)
    if queries.shape[1]:
        loss = loss + pixel_weight * F.mse_loss(pixels, pixels_at(images, queries))
    return loss, int((logits.argmax(-1) == labels).sum()), labels.numel()


@dataclass
class History:
    """What `fit` saw: per-step train loss and learning rate, per-evaluation validation metrics."""

    step: List[int] = field(default_factory=list)
    loss: List[float] = field(default_factory=list)
    lr: List[float] = field(default_factory=list)
    train_accuracy: List[float] = field(default_factory=list)
    eval_step: List[int] = field(default_factory=list)
    val_loss: List[float] = field(default_factory=list)
    val_accuracy: List[float] = field(default_factory=list)
    seconds: float = 0.0

    def plot(self, ax=None, **kwargs):
        """Training curves (see `percnb.viz.plot_history`)."""
        from .viz import plot_history
        return plot_history(self, ax=ax, **kwargs)


def _as_loader(data: Data, batch_size: int, shuffle: bool, generator: Optional[torch.Generator], name: str):
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, tuple):
        if not data or not all(isinstance(t, torch.Tensor) for t in data):
            raise TypeError(f"{name} as a tuple must hold tensors (inputs, targets, ...), got "
                            f"{[type(t).__name__ for t in data]}")
        if len({len(t) for t in data}) != 1:
            raise ValueError(f"{name} tensors must share their first (sample) dimension, got "
                             f"{[tuple(t.shape) for t in data]}")
        data = TensorDataset(*data)
    if not isinstance(data, Dataset):
        raise TypeError(f"{name} must be a Dataset, a DataLoader or a tuple of tensors, got {type(data).__name__}")
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)


def _lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at `step` (0-based) of `total`."""
    if schedule == "constant":
        return min(1.0, (step + 1) / warmup) if warmup else 1.0
    if step < warmup:
        start = 0.04 if schedule == "onecycle" else 0.0   # one-cycle starts at peak/25
        return start + (1 - start) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _to(batch, device):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in batch]


def _home(model: nn.Module) -> Optional[torch.device]:
    """The device the model's first parameter (or buffer) is on: where fit and evaluate hand it back."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return None if first is None else first.device


def _run_device(device, home: Optional[torch.device]) -> torch.device:
    # A model the user already put on a GPU stays there; otherwise percnb's default (CUDA when present).
    if device is None and home is not None and home.type == "cuda":
        return home
    return resolve_device(device)


def _warmup_steps(warmup, total: int) -> int:
    """`warmup` as a step count: a fraction in [0, 1) of `total`, or a whole number of steps <= total."""
    message = f"warmup must be a fraction in [0, 1) or a step count <= {total}, got {warmup!r}"
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Real):
        raise TypeError(message)
    if isinstance(warmup, float) and 0 <= warmup < 1:
        return int(round(warmup * total))
    if not (float(warmup).is_integer() and 0 <= warmup <= total):
        raise ValueError(message)
    return int(warmup)


def _module_modes(model: nn.Module) -> Dict[nn.Module, bool]:
    # Every module's own flag: model.train(flag) would flatten a deliberately frozen (eval) submodule.
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: Dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


def _check_gradients(model: nn.Module, step: int, loss: torch.Tensor) -> None:
    """Raise FloatingPointError before the update when a gradient holds NaN or inf.

    One fused norm per parameter and one host sync; only when a norm is not finite are the tensors
    themselves searched (a norm can overflow to inf on finite but huge gradients: those pass).
    """
    named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if not named:
        return
    norms = torch._foreach_norm([g for _, g in named])
    if bool(torch.isfinite(torch.stack(norms)).all()):
        return
    for (name, grad), norm in zip(named, norms):
        if not bool(torch.isfinite(norm)) and not bool(torch.isfinite(grad).all()):
            raise FloatingPointError(
                f"the gradient of {name} holds NaN or inf at step {step}, while the loss was finite "
                f"({loss.item():.4g}); the update was not applied. A step in the model or step_fn has no "
                f"finite derivative there (sqrt or log at 0, a division by 0, a row of -inf scores): "
                f"lowering lr will not help; find that operation (torch.autograd.detect_anomaly names it)")


def adamw(groups: List[dict], lr: float) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel per step for all parameters) where torch has the fused kernel for
    the parameters' device and dtype, else for-each (a few kernels per group): the same update as the
    default per-parameter loop, rounded differently, and faster: the whole train step of
    benchmarks/compare_peers.py's 7.3M-parameter model at M=1,024 was 1.06x faster with it on an idle
    2-core CPU here (`python benchmarks/cost_check.py --parts optimizer`)."""
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, **({"fused": True} if fused else {"foreach": True}))


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, *, step_fn: Optional[StepFn] = None, batch_size: int = 256,
             device: Optional[Union[str, torch.device]] = None, amp: bool = False) -> Dict[str, float]:
    """Mean loss (weighted by counted items) and accuracy of `model` on `data`, in eval mode; the model
    gets its own modes back afterwards, also when a step raises.

    Runs on `device` (default: the model's GPU if it is on one, else `percnb.device.default_device()`:
    CUDA when present, else CPU) and hands the model back on the device it came on; `amp=True`
    evaluates under bfloat16 autocast."""
    checks.positive_int("batch_size", batch_size)
    checks.callable_or_none("step_fn", step_fn)
    checks.boolean("amp", amp)
    step_fn = step_fn or classification_step
    home = _home(model)
    device = _run_device(device, home)
    modes = _module_modes(model)
    model.to(device).eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        for batch in _as_loader(data, batch_size, False, None, "data"):
            with autocast(device, amp):
                loss, n_correct, n = step_fn(model, _to(batch, device))
            total_loss += float(loss) * n
            correct += n_correct
            count += n
    finally:
        _restore_modes(modes)
        if home is not None:
            model.to(home)
    if count == 0:
        raise ValueError("data is empty: nothing to evaluate")
    return {"loss": total_loss / count, "accuracy": correct / count}


def fit(model: nn.Module, train_data: Data, *, val_data: Optional[Data] = None, epochs: Optional[int] = None,
        steps: Optional[int] = None, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.01,
        schedule: str = "onecycle", warmup: Union[float, int] = 0.1, grad_clip: Optional[float] = None,
        label_smoothing: float = 0.0, augment: Optional[Callable] = None, step_fn: Optional[StepFn] = None,
        eval_every: Optional[int] = None, max_seconds: Optional[float] = None, seed: int = 0,
        progress: bool = True, device: Optional[Union[str, torch.device]] = None, amp: bool = False,
        callback: Optional[Callable[[int, History], None]] = None) -> History:
    """Train `model` with AdamW and a learning-rate schedule; returns a `History`.

    Give `epochs` or `steps` (passes over train_data, or optimizer steps). `warmup` is a fraction
    of the steps (float < 1) or a step count (int). `augment(batch) -> batch` runs on training
    batches only. `step_fn(model, batch) -> (loss, n_correct, n_counted)` defines the task
    (default: classification with `label_smoothing`). Validation runs every `eval_every` steps
    (default: once per epoch) and at the end. `max_seconds` stops early (after the current step)
    once that much training time has passed. Same seed, same data order, same result.

    Training runs on `device` (default: the model's GPU if it is on one, else
    `percnb.device.default_device()`: the GPU when there is one, else the CPU); the model is handed
    back on the device it came on, so code after fit keeps using its own tensors. `amp=True` runs
    forward passes under bfloat16 autocast on that device (faster on GPUs with bfloat16 units; the
    weights, their gradients and AdamW's state stay float32).

    Every setting is checked before the first step (a ValueError or TypeError naming it), and so is
    val_data's length. A non-finite loss, or a finite loss whose gradients hold NaN or inf, raises
    FloatingPointError before that update is applied. On return the model is in eval mode; when
    training raises (Ctrl-C included) every module gets back the mode it had, and the bar is closed.
    """
    if (epochs is None) == (steps is None):
        raise ValueError(f"give exactly one of epochs or steps, got epochs={epochs}, steps={steps}")
    for name, value in (("epochs", epochs), ("steps", steps), ("batch_size", batch_size)):
        if value is not None or name == "batch_size":
            checks.positive_int(name, value)
    checks.optional(checks.positive_int)("eval_every", eval_every)
    checks.choice("schedule", schedule, LR_SCHEDULES)
    checks.boolean("amp", amp)
    checks.real("lr", lr, minimum=0.0, strict=True, hint="; AdamW's usual peak is about 1e-3")
    checks.real("weight_decay", weight_decay, minimum=0.0, strict=False, hint="; 0 turns weight decay off")
    if grad_clip is not None:
        checks.real("grad_clip", grad_clip, minimum=0.0, strict=True,
                     hint="; it is the largest gradient norm kept (None: no clipping)")
    checks.real("label_smoothing", label_smoothing, minimum=0.0, strict=False, maximum=1.0)
    if max_seconds is not None:
        checks.real("max_seconds", max_seconds, minimum=0.0, strict=True, hint="; None: no time limit")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    for name, value in (("augment", augment), ("step_fn", step_fn), ("callback", callback)):
        checks.callable_or_none(name, value)
    if step_fn is not None and label_smoothing:
        raise ValueError("label_smoothing applies to the default classification step; "
                         "a custom step_fn handles its own loss")
    home = _home(model)
    device = _run_device(device, home)
    autocast(device, amp)                   # an amp the device cannot do fails here, before any step
    torch.manual_seed(seed)  # dropout masks and anything random in augment
    generator = torch.Generator().manual_seed(seed)
    loader = _as_loader(train_data, batch_size, True, generator, "train_data")
    if len(loader) == 0:
        raise ValueError("train_data is empty")
    if val_data is not None:
        # Built once, as evaluate would build it, so that an empty or ill-typed val_data fails now,
        # not after the first eval_every steps.
        val_data = _as_loader(val_data, 256, False, None, "val_data")
        if isinstance(val_data.dataset, Sized) and len(val_data.dataset) == 0:
            raise ValueError("val_data is empty: nothing to validate on; give it samples or pass val_data=None")
    total = steps if steps is not None else epochs * len(loader)
    warmup_steps = _warmup_steps(warmup, total)
    eval_every = eval_every or len(loader)
    if step_fn is None:
        def step_fn(m, b):
            return classification_step(m, b, label_smoothing)

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    optimizer = adamw([{"params": decay, "weight_decay": weight_decay},
                       {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(schedule, s, total, warmup_steps))

    history = History()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        # Few refreshes: a notebook bar is a widget, and every refresh is a kernel message; thousands of
        # them overflow the output channel's buffer and a test runner (nbval) then loses the cell's end.
        bar = tqdm(total=total, desc="training", leave=True, mininterval=2.0)
    modes = _module_modes(model)
    try:
        model.to(device).train()
        start, step, passes = time.perf_counter(), 0, 0
        while step < total:
            yielded = False
            for batch in loader:
                yielded = True
                batch = _to(batch, device)
                if augment is not None:
                    batch = augment(batch)
                with autocast(device, amp):
                    loss, n_correct, n = step_fn(model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower lr or add grad_clip")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                _check_gradients(model, step, loss)
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                history.lr.append(optimizer.param_groups[0]["lr"])
                optimizer.step()
                scheduler.step()
                step += 1
                history.step.append(step)
                history.loss.append(loss.item())
                history.train_accuracy.append(n_correct / max(n, 1))
                timed_out = max_seconds is not None and time.perf_counter() - start >= max_seconds
                if val_data is not None and (step % eval_every == 0 or step == total or timed_out):
                    metrics = evaluate(model, val_data, step_fn=step_fn, device=device, amp=amp)
                    history.eval_step.append(step)
                    history.val_loss.append(metrics["loss"])
                    history.val_accuracy.append(metrics["accuracy"])
                    model.train()
                if bar is not None:
                    shown = {"loss": f"{history.loss[-1]:.3f}"}
                    if history.val_accuracy:
                        shown["val_acc"] = f"{history.val_accuracy[-1]:.3f}"
                    bar.set_postfix(shown, refresh=False)
                    bar.update(1)
                if callback is not None:
                    callback(step, history)
                if step >= total or timed_out:
                    break
            passes += 1
            if not yielded:
                # Without this, a loader that is used up after one pass makes the while loop spin forever.
                raise ValueError(
                    f"train_data yielded no batch on pass {passes} over it, though its len() is {len(loader)}: "
                    "an iterable that is used up after one pass (an IterableDataset whose __iter__ does not "
                    "start afresh) can feed one pass only; make __iter__ return a new iterator each time, or "
                    "train for at most one pass")
            if max_seconds is not None and time.perf_counter() - start >= max_seconds:
                break
    except BaseException:
        _restore_modes(modes)
        raise
    finally:
        if bar is not None:
            bar.close()
        if home is not None:
            model.to(home)
    history.seconds = time.perf_counter() - start
    model.eval()
    return history
