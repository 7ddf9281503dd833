"""`AttentionExplorer`: an ipywidgets view of where a Perceiver looks, for images and for token sequences."""
from __future__ import annotations

import io
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .data.text import BYTES, MASK_ID
from .models import Perceiver

MEAN = "mean"


def _render_png(draw: Callable, figsize: Tuple[float, float]) -> bytes:
    # A bare Figure on the Agg canvas: nothing leaks into the notebook's inline backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=figsize, dpi=90)
    FigureCanvasAgg(figure)
    draw(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# Byte labels that read at a glance: whitespace as the symbol of what it does, [MASK] as decode() shows it.
_SHOWN = {ord(" "): "␣", ord("\n"): "↵", ord("\t"): "→", MASK_ID: "█"}


def _byte_label(token: int) -> str:
    """A one-glyph label for a byte id where one exists: printable ASCII as itself, space ␣, newline ↵,
    tab →, [MASK] █; other bytes as their escape (``\\x07``, ``\\xc3``), other ids as ``<id>``."""
    if token in _SHOWN:
        return _SHOWN[token]
    if 32 < token < 127:
        return chr(token)
    return f"\\x{token:02x}" if 0 <= token < BYTES else f"<{token}>"


def _cell_label(token: int) -> str:
    """The label drawn in a token's cell of the map: as `_byte_label`, but a space stays blank (so words
    read as words) and a byte without a glyph shows as a dot (an escape does not fit in a cell)."""
    label = _byte_label(token)
    return " " if token == ord(" ") else (label if len(label) == 1 else "·")


class AttentionExplorer:
    """Pick a sample, a layer, a head and a latent (or averages); see where it looks, next to the prediction.

    model: a `Perceiver` (e.g. `PerceiverImage` or `PerceiverMLM`). inputs: images
    (n, channels, height, width) or token ids (n, seq), the way `model` takes them. labels: optional
    (n,) true classes (images) shown in the title. class_names: names of the classes (image) or a
    `decode(token_id) -> str` mapping via `token_labels` for sequences.

    Layers: "encoder" shows the chosen latent's cross-attention over the input (heads: the chosen
    one or their mean). "processor k" shows the latent's self-attention in block k pushed through
    the encoder's head-averaged cross-attention (one step of attention rollout: which inputs the
    latents it reads were reading). "decoder" does the same for the output query at `position`
    (sequences) or the single class query (images). Everything is computed once per sample.
    `explorer.widget` is the ipywidgets container (CSS class "percnb-attention-explorer"); a
    cell that ends with the explorer shows it. `image_data()` returns the map currently drawn.
    """

    def __init__(self, model: Perceiver, inputs: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 class_names: Optional[Sequence[str]] = None, token_labels: Optional[Callable[[int], str]] = None,
                 top_k: int = 5):
        import ipywidgets as w
        if not isinstance(model, Perceiver):
            raise TypeError(f"model must be a percnb Perceiver, got {type(model).__name__}")
        if not isinstance(inputs, torch.Tensor) or inputs.dim() not in (2, 4) or len(inputs) == 0:
            raise ValueError("inputs must be images (n, channels, height, width) or token ids (n, seq), got "
                             f"{tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__}")
        if labels is not None and len(labels) != len(inputs):
            raise ValueError(f"labels has {len(labels)} entries but inputs has {len(inputs)} samples")
        self.model, self.inputs, self.labels = model.eval(), inputs, labels
        self.is_image = inputs.dim() == 4
        self.class_names, self.top_k = class_names, top_k
        self.token_labels = token_labels or _byte_label
        self._cell_labels = token_labels or _cell_label
        self._cache: Dict[int, Tuple[torch.Tensor, List[torch.Tensor]]] = {}
        self._choosing_heads = False
        logits, maps = self._outputs(0)
        has_decoder = model.config.decoder_type == "attention"   # a pooling head has no attention map
        self.num_latents, self.num_layers = maps[0].shape[1], len(maps) - 1 - has_decoder
        self.per_position = logits.dim() == 2          # (seq, vocab): one prediction per position

        layers = ["encoder"] + [f"processor {k}" for k in range(self.num_layers)] + ["decoder"] * has_decoder
        style = {"description_width": "initial"}
        self.sample = w.IntSlider(0, 0, len(inputs) - 1, description="sample", style=style, continuous_update=False)
        self.layer = w.Dropdown(options=layers, value="encoder", description="layer", style=style)
        self.head = w.Dropdown(options=[MEAN], value=MEAN, description="head", style=style)
        self.latent = w.IntSlider(0, 0, self.num_latents - 1, description="latent", style=style,
                                  continuous_update=False)
        self.mean_latents = w.Checkbox(False, description="average latents", style=style)
        self.position = w.IntSlider(0, 0, max(0, logits.shape[0] - 1) if self.per_position else 0,
                                    description="position", style=style, continuous_update=False,
                                    layout=w.Layout(display=None if self.per_position else "none"))
        self.image = w.Image(format="png")
        self.caption = w.HTML()
        controls = [self.sample, self.layer, self.head, self.latent, self.mean_latents, self.position]
        self.widget = w.VBox([w.HBox(controls[:3]), w.HBox(controls[3:]), self.image, self.caption])
        self.widget.add_class("percnb-attention-explorer")
        for control in controls:
            control.observe(self._update, names="value")
        self._update()

    # ---------------------------------------------------------------- state
    @torch.no_grad()
    def _outputs(self, index: int):
        if index not in self._cache:
            logits, maps = self.model(self.inputs[index:index + 1], return_attentions=True)
            self._cache[index] = (logits[0], [m[0] for m in maps])
        return self._cache[index]

    def _heads(self, attn: torch.Tensor) -> torch.Tensor:
        return attn.mean(0) if self.head.value == MEAN else attn[int(self.head.value)]

    def layer_map(self) -> torch.Tensor:
        """The chosen layer's attention weights for the current sample: (heads, queries, keys)."""
        _, maps = self._outputs(self.sample.value)
        layer = self.layer.value
        if layer == "encoder":
            return maps[0]
        return maps[-1] if layer == "decoder" else maps[1 + int(layer.split()[1])]

    def attention_row(self) -> torch.Tensor:
        """The attention over input positions that is drawn now: (input_len,)."""
        cross = self._outputs(self.sample.value)[1][0]               # (heads, latents, inputs)
        rows = self._heads(self.layer_map())
        if self.layer.value != "encoder":
            rows = rows @ cross.mean(0)                              # rollout through the encoder
        if self.layer.value == "decoder":
            return rows[self.position.value if self.per_position else 0]
        return rows.mean(0) if self.mean_latents.value else rows[self.latent.value]

    def image_data(self) -> np.ndarray:
        """The map as drawn: (height, width) for images, (input_len,) for sequences."""
        row = self.attention_row().numpy()
        return row.reshape(self.inputs.shape[2:]) if self.is_image else row

    def probabilities(self) -> torch.Tensor:
        """Class (or, at `position`, token) probabilities of the current sample."""
        logits, _ = self._outputs(self.sample.value)
        if self.per_position:
            logits = logits[self.position.value]
        return logits.softmax(-1)

    # ---------------------------------------------------------------- drawing
    def _update(self, change=None) -> None:
        if self._choosing_heads:              # the head dropdown is being refilled below: draw once, after
            return
        heads = [MEAN] + list(range(self.layer_map().shape[0]))     # this layer's heads
        if list(self.head.options) != heads:
            keep = self.head.value if self.head.value in heads else MEAN
            self._choosing_heads = True
            try:
                self.head.options = heads
                self.head.value = keep
            finally:
                self._choosing_heads = False
        self.latent.disabled = self.mean_latents.value or self.layer.value == "decoder"
        data, probs = self.image_data(), self.probabilities()
        self.image.value = _render_png(lambda fig: self._draw(fig, data, probs), (7.5, 3.0))
        top = probs.topk(min(self.top_k, probs.numel()))
        names = [self._name(int(i)) for i in top.indices]
        truth = ""
        if self.labels is not None:
            truth = f" · label <b>{self._name(int(self.labels[self.sample.value]))}</b>"
        self.caption.value = (f"prediction <b>{names[0]}</b> ({float(top.values[0]):.1%}){truth} · "
                              f"{self.layer.value}, head {self.head.value}")

    def _name(self, index: int) -> str:
        if self.per_position:
            return self.token_labels(index)
        return self.class_names[index] if self.class_names else str(index)

    def _draw(self, fig, data: np.ndarray, probs: torch.Tensor) -> None:
        left, right = fig.add_gridspec(1, 2, width_ratios=[1.6, 1]).subplots()
        sample = self.inputs[self.sample.value]
        if self.is_image:
            picture = sample[0] if sample.shape[0] == 1 else sample.permute(1, 2, 0).clamp(0, 1)
            left.imshow(picture.numpy(), cmap="gray")
            left.imshow(data, cmap="magma", alpha=0.6, interpolation="nearest")
            left.axis("off")
        else:
            self._draw_sequence(left, sample, data)
        what = f"position {self.position.value}" if self.layer.value == "decoder" and self.per_position else (
            "all latents" if self.mean_latents.value else f"latent {self.latent.value}")
        left.set_title(f"{self.layer.value}: {what}", fontsize=9)
        top = probs.topk(min(self.top_k, probs.numel()))
        right.barh(range(len(top.values))[::-1], top.values.numpy(), color="tab:blue")
        right.set_yticks(range(len(top.values))[::-1], [self._name(int(i)) for i in top.indices])
        right.set_xlim(0, 1)
        right.set_title("top probabilities", fontsize=9)

    def _draw_sequence(self, ax, tokens: torch.Tensor, data: np.ndarray) -> None:
        """The map over a token sequence as rows of text: each cell coloured by its weight and labelled
        with its token (up to 512 tokens; longer inputs are drawn without labels, which would not fit).
        White letters with a dark outline read on both ends of the colour map; at `position` (decoder),
        the query's own cell is framed."""
        from matplotlib import patches, patheffects
        n = data.shape[0]
        width = 16 if n <= 128 else 32 if n <= 512 else 64
        rows = -(-n // width)
        grid = np.full(rows * width, np.nan)
        grid[:n] = data
        ax.imshow(grid.reshape(rows, width), cmap="magma", aspect="auto", interpolation="nearest")
        if n <= 512:
            size = 10 if rows <= 8 else 6
            outline = [patheffects.withStroke(linewidth=2.2, foreground="black")]
            for i, token in enumerate(tokens.tolist()):
                ax.text(i % width, i // width, self._cell_labels(token), ha="center", va="center", fontsize=size,
                        family="DejaVu Sans Mono", color="white", path_effects=outline)
        if self.layer.value == "decoder" and self.per_position:
            at = self.position.value
            ax.add_patch(patches.Rectangle((at % width - 0.5, at // width - 0.5), 1, 1, fill=False,
                                           edgecolor="cyan", linewidth=2))
        ax.set_xticks([])
        ax.set_yticks([])

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
