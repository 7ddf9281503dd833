"""Plots people would rather look at than read: attention heatmaps, cross-attention over images,
training curves, confusion matrices (matplotlib)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch


def _axes(ax, figsize=(4, 3.2)):
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def cross_attention_map(attn: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Fold one cross-attention map back onto the image grid.

    attn: (batch, heads, latents, height * width) weights from `Perceiver(..., return_attentions=True)`.
    Returns (batch, heads, latents, height, width).
    """
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4:
        raise ValueError(f"attn must be a (batch, heads, latents, keys) tensor, got "
                         f"{tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__}")
    if attn.shape[-1] != height * width:
        raise ValueError(
            f"attn has {attn.shape[-1]} keys but the grid {height}x{width} has {height * width}; "
            "pass the encoder's cross-attention map (the first one returned)")
    return attn.unflatten(-1, (height, width))


def plot_attention(weights, ax=None, title: Optional[str] = None, xlabels: Optional[Sequence[str]] = None,
                   ylabels: Optional[Sequence[str]] = None, xlabel: str = "key", ylabel: str = "query",
                   cmap: str = "viridis"):
    """Heatmap of one (queries, keys) attention matrix; rows are queries, columns keys."""
    w = np.asarray(torch.as_tensor(weights).detach().cpu())
    if w.ndim != 2:
        raise ValueError(f"weights must be a 2-D (queries, keys) matrix, got shape {w.shape}; pick one sample and head")
    ax = _axes(ax)
    image = ax.imshow(w, cmap=cmap, aspect="auto", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels)), list(xlabels), fontsize=7)
    if ylabels is not None:
        ax.set_yticks(range(len(ylabels)), list(ylabels), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax


def plot_cross_attention(image: torch.Tensor, attn: torch.Tensor, latents: Sequence[int], head: Optional[int] = None,
                         axes=None, alpha: float = 0.6, titles: Optional[Sequence[str]] = None):
    """The image, then for each latent its cross-attention over the pixels overlaid on the image.

    image: (channels, height, width) in [0, 1]; attn: (heads, latents, height * width) for that image
    (the first map returned, one sample). head=None averages the heads.
    """
    import matplotlib.pyplot as plt
    if image.dim() != 3:
        raise ValueError(f"image must be (channels, height, width), got shape {tuple(image.shape)}")
    _, height, width = image.shape
    maps = cross_attention_map(attn.unsqueeze(0), height, width)[0]          # (heads, latents, h, w)
    maps = maps.mean(0) if head is None else maps[head]
    if axes is None:
        _, axes = plt.subplots(1, len(latents) + 1, figsize=(1.9 * (len(latents) + 1), 2.1))
    shown = _image_for_display(image)
    axes[0].imshow(shown, cmap="gray")
    axes[0].set_title("input")
    for k, (ax, latent) in enumerate(zip(axes[1:], latents)):
        ax.imshow(shown, cmap="gray")
        ax.imshow(maps[latent].detach().cpu().numpy(), cmap="magma", alpha=alpha, interpolation="nearest")
        ax.set_title(titles[k] if titles else f"latent {latent}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    return axes


def _image_for_display(image: torch.Tensor) -> np.ndarray:
    array = image.detach().cpu().numpy()
    return array[0] if array.shape[0] == 1 else np.clip(array.transpose(1, 2, 0), 0, 1)


def plot_history(history, ax=None, baselines: Optional[Dict[str, float]] = None, smooth: int = 10):
    """Training loss (smoothed over `smooth` steps) and validation accuracy against steps.

    `baselines` {"name": accuracy} are drawn as dashed lines on the accuracy axis.
    """
    ax = _axes(ax, figsize=(6, 3.2))
    loss = np.asarray(history.loss, dtype=float)
    if smooth > 1 and len(loss) >= smooth:
        loss = np.convolve(loss, np.ones(smooth) / smooth, mode="valid")
        steps = np.asarray(history.step[smooth - 1:])
    else:
        steps = np.asarray(history.step)
    ax.plot(steps, loss, color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    if history.val_accuracy:
        right = ax.twinx()
        right.plot(history.eval_step, history.val_accuracy, "o-", color="tab:orange", ms=3, label="val accuracy")
        for name, value in (baselines or {}).items():
            right.axhline(value, ls="--", lw=1, color="gray")
            right.annotate(name, (history.eval_step[0], value), fontsize=8, color="gray", va="bottom")
        right.set_ylabel("val accuracy", color="tab:orange")
        right.set_ylim(0, 1)
    return ax


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts; row = true class, column = predicted class."""
    predictions, targets = torch.as_tensor(predictions).flatten(), torch.as_tensor(targets).flatten()
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions and targets must have the same length, got {predictions.numel()} "
                         f"and {targets.numel()}")
    counts = torch.bincount(targets * num_classes + predictions, minlength=num_classes ** 2)
    return counts.view(num_classes, num_classes)


def plot_confusion(matrix: torch.Tensor, classes: Optional[Sequence[str]] = None, ax=None):
    """Confusion matrix heatmap with counts written in the cells."""
    m = np.asarray(matrix)
    ax = _axes(ax, figsize=(4.2, 3.8))
    ax.imshow(m, cmap="Blues")
    classes = classes or [str(i) for i in range(len(m))]
    ax.set_xticks(range(len(m)), classes)
    ax.set_yticks(range(len(m)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(m)):
        for j in range(len(m)):
            if m[i, j]:
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > m.max() / 2 else "black")
    return ax


def plot_pipeline_timeline(events, ax=None, title: Optional[str] = None):
    """Gantt chart of one pipeline step from measured events: a row per stage, a box per microbatch's
    forward (blue) and backward (orange), numbered by microbatch.

    events: one list per stage of (kind, microbatch, unix_time) with kinds forward_start/forward_end/
    backward_start/backward_end, as recorded by `percnb.pipeline` (`PipelineResult.events[stage][step]`),
    paired into boxes by `percnb.pipeline.timeline.phase_boxes`.
    Returns the axes; times are in milliseconds from the first event.
    """
    ax = _axes(ax, figsize=(9, 1 + 0.7 * len(events)))
    from .pipeline.timeline import phase_boxes
    t0 = min(t for stage in events for _, _, t in stage)
    for row, stage in enumerate(events):
        for phase, mb, start, end in phase_boxes(stage):
            color = "tab:blue" if phase == "forward" else "tab:orange"
            left, width = (start - t0) * 1e3, max((end - start) * 1e3, 1e-3)
            ax.barh(row, width, left=left, height=0.7, color=color, edgecolor="black", linewidth=0.5)
            ax.text(left + width / 2, row, str(mb), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(events)), [f"stage {s}" for s in range(len(events))])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color="tab:blue", label="forward"), Patch(color="tab:orange", label="backward")],
              loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def plot_architecture(config=None, ax=None):
    """Draw the whole Perceiver: inputs and the latent array meet in the encoder's cross-attention, the
    processor's self-attention blocks work on the latents only, and the decoder's output queries read
    the latents (or, with decoder_type="latent_pool", the latents are averaged).

    config: a `PerceiverConfig` whose sizes label the arrays (M inputs, N latents, ...), or None for the
    symbols alone. Returns the matplotlib Axes; its texts name every part, for tests to read.
    """
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    ax = _axes(ax, figsize=(11, 3.6))

    def size(symbol, value):
        return symbol if config is None else f"{symbol}={value}"
    c = config
    pooled = c is not None and c.decoder_type == "latent_pool"
    layers = size("L", None if c is None else c.num_layers)
    boxes = {  # name: (x, y, text, color)
        "inputs": (0.0, 0.05, f"input array\n{size('M', c and c.input_len)} x {size('C', c and c.input_dim)}",
                   "#d9d9d9"),
        "latents": (0.0, 0.62, f"latent array\n{size('N', c and c.latent_len)} x {size('D', c and c.latent_dim)}\n"
                    "(learned)", "#fdd0a2"),
        "encoder": (0.27, 0.33, "encoder\ncross-attention\nN queries x M keys"
                    + ("" if c is None else f"\n({c.cross_heads} heads)"),
                    "#9ecae1"),
        "processor": (0.52, 0.33, f"processor\n{layers} x self-attention\nN x N, independent of M", "#a1d99b"),
        "decoder": (0.77, 0.33, "decoder: mean of\nthe latents -> logits" if pooled else
                    f"decoder\ncross-attention\n{size('O', c and c.output_len)} queries x N keys", "#bcbddc"),
        "queries": (0.77, 0.78, "output queries\n(position codes)", "#fdd0a2"),
    }
    if pooled:
        del boxes["queries"]
    w, h = 0.2, 0.3
    for name, (x, y, text, color) in boxes.items():
        ax.add_patch(FancyBboxPatch((x, y), w, h if name not in ("queries",) else 0.18,
                                    boxstyle="round,pad=0.01", fc=color, ec="black", lw=0.8))
        ax.text(x + w / 2, y + (h if name != "queries" else 0.18) / 2, text, ha="center", va="center", fontsize=8)

    def arrow(start, end, label=None):
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, lw=1))
        if label:
            ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.03, label, ha="center", fontsize=7)
    arrow((0.2, 0.2), (0.27, 0.4), "keys, values")
    arrow((0.2, 0.77), (0.27, 0.56), "queries")
    arrow((0.47, 0.48), (0.52, 0.48))
    arrow((0.72, 0.48), (0.77, 0.48), "latents")
    if not pooled:
        arrow((0.87, 0.78), (0.87, 0.64), "queries")
    arrow((0.97, 0.48), (1.02, 0.48))
    ax.text(1.03, 0.48, "outputs", va="center", fontsize=8)
    ax.set_xlim(-0.02, 1.12)
    ax.set_ylim(0, 1)
    ax.axis("off")
    return ax
