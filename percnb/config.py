"""`PerceiverConfig`: every size and switch of a Perceiver, validated once, JSON round-trippable; and the
two ready configs the notebooks use, `image_config` and `mlm_config`."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

from . import checks

INPUT_TYPES = ("raw", "tokens")
POS_ENCODINGS = ("trainable", "sinusoid", "fourier", "none")
DECODER_TYPES = ("attention", "latent_pool")
DECODER_REDUCTIONS = ("mean", "max", "sum", "first", "last", "eot", None)


@dataclass
class PerceiverConfig:
    """Sizes and switches of a Perceiver (gperc's fields plus a few of percnb's).

    Shapes: inputs are `(batch, input_len, input_channels or input_dim)` raw features or
    `(batch, input_len)` token ids; `latent_len` latents of width `latent_dim` read them through
    cross-attention, `num_layers` self-attention blocks process the latents, and `output_len`
    queries of width `output_dim` read the latents back out. With a `decoder_reduction` the output
    axis is pooled, giving `(batch, n_classes)`, otherwise `(batch, output_len, n_classes)`.
    Every field is checked when the config is made (and by `replace`): a bad value raises a
    ValueError naming the field, its value and what is allowed. Each field's `#:` comment documents it
    (Sphinx reads these as the attributes' docstrings).
    """

    # ----------------------------------------------------------------- sizes
    #: M: positions in an input (pixels of an image, bytes of a window).
    input_len: int = 64
    #: Width of an embedded input position (raw features are projected to it when they differ).
    input_dim: int = 8
    #: N: latents that read the inputs. The cost of reading grows like N * M, not M * M.
    latent_len: int = 4
    #: Width of a latent, and of the self-attention blocks that process them.
    latent_dim: int = 16
    #: Learned output queries of the attention decoder (one per position for a per-position output).
    output_len: int = 1
    #: Width of an output query.
    output_dim: int = 8
    #: Hidden width of the MLP in the encoder and processor blocks.
    ffw_latent: int = 32
    #: Hidden width of the MLP in the decoder block.
    ffw_output: int = 32
    #: Heads of the latent self-attention blocks (latent_dim must be divisible by it).
    num_heads: int = 2
    #: Latent self-attention blocks (processors) after the encoder.
    num_layers: int = 2
    #: Heads of the encoder and decoder cross-attentions (1, as in the Perceiver paper).
    cross_heads: int = 1

    # ----------------------------------------------------------------- input
    #: "raw": floats (batch, input_len, features); "tokens": integer ids (batch, input_len).
    input_type: str = "raw"
    #: Vocabulary size of token inputs (input_type='tokens' only).
    input_num_tokens: Optional[int] = None
    #: Features per raw input position when they differ from input_dim: a linear layer maps them
    #: (after any Fourier features are concatenated) to input_dim. None: input_dim features.
    input_channels: Optional[int] = None
    #: The grid the inputs lie on, e.g. (8, 8) for 8x8 images (its product must be input_len); the
    #: Fourier features need it.
    input_shape: Optional[Tuple[int, ...]] = None

    # ----------------------------------------------------------------- position encoding
    #: "trainable" (a learned table), "sinusoid" (Vaswani et al.'s fixed table), "fourier" (features of
    #: the input_shape grid concatenated to raw inputs) or "none" (a set: permutation invariant).
    pos_encoding: str = "trainable"
    #: Frequency bands per grid axis of the Fourier features.
    fourier_bands: int = 6
    #: Per axis, the resolution whose Nyquist frequency is the highest band (default: input_shape).
    max_resolution: Optional[Tuple[int, ...]] = None

    # ----------------------------------------------------------------- decoder
    #: "attention": Perceiver IO, output queries cross-attend to the latents; "latent_pool": the
    #: Perceiver paper's classifier (and perceiver-pytorch's), the latents are pooled with
    #: decoder_reduction, normalised and projected (output_len, output_dim and ffw_output are unused).
    decoder_type: str = "attention"
    #: How the decoded queries (or, with latent_pool, the latents) are pooled: "mean", "max", "sum",
    #: "first", "last", "eot" (each sample's last unmasked position; needs output_len == input_len) or
    #: None (no pooling: one output per query).
    decoder_reduction: Optional[str] = "mean"
    #: Whether the decoder's attention output adds its queries back (a residual), as the encoder's does.
    decoder_residual: bool = False
    #: Whether a linear head maps the decoded width to n_classes (False: outputs keep their width).
    decoder_projection: bool = True
    #: Output size of the head (classes, or the vocabulary of a language model).
    n_classes: Optional[int] = 10

    # ----------------------------------------------------------------- initialisation and regularisation
    #: Seed of the initial weights; each part of the model has its own seed derived from it, so a
    #: pipeline stage built alone has the weights the whole model has.
    seed: int = 4
    #: Standard deviation of a trainable position table and of the learned output queries.
    pos_init_std: float = 0.02
    #: Standard deviation of the latent array: 1.0 so that the latents start distinct (notebook 03's
    #: first exercise compares 0.02, with which a digits model sat at chance for epochs).
    latent_init_std: float = 1.0
    #: Standard deviation of the token embeddings. None: the scale of the position codes they are
    #: added to (pos_init_std for a trainable table, 1/sqrt(2), the RMS of the sinusoid one, 1 without
    #: positions).
    token_init_std: Optional[float] = None
    #: Dropout on attention weights and after each block's projection and MLP, in [0, 1).
    dropout: float = 0.0

    # ----------------------------------------------------------------- research switches
    #: One self-attention block reused num_layers times (as the Perceiver paper shares its latent blocks).
    share_weights: bool = False
    #: Each latent starts as its learned vector plus the mean of the embedded inputs in its own window
    #: of input_len / latent_len consecutive positions, so that every latent holds local content before
    #: the first cross-attention (Perceiver AR seeds its latents from inputs too). It ties latents to
    #: input order: needs input_len divisible by latent_len and input_dim == latent_dim.
    latents_from_inputs: bool = False
    #: The decoder-side twin of latents_from_inputs: the output query at position p also carries, in
    #: its residual, the latent of p's window (p // (output_len / latent_len)), so each output starts from
    #: the processed content of its own neighbourhood (as a Funnel Transformer's up-sampling does). Needs
    #: output_len divisible by latent_len, output_dim == latent_dim and decoder_residual=True. Notebook 04
    #: measures what each switch buys a byte-level masked language model.
    queries_from_latents: bool = False

    # ----------------------------------------------------------------- memory
    #: Activation checkpointing: in training, the encoder and processor blocks keep only their inputs
    #: for backward and run again during it (torch.utils.checkpoint, dropout replayed with the same
    #: random state), trading about a third more compute for the activations of every block. The
    #: function, its gradients and the saved weights are the same with it on or off; `percnb.cost`
    #: predicts the memory either way.
    checkpoint_activations: bool = False

    def __post_init__(self) -> None:
        # JSON gives lists; the config keeps tuples so equal configs compare equal.
        for name in ("input_shape", "max_resolution"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, its value and what is allowed: first each field
        on its own (`FIELD_RULES`), then the fields that must agree with each other (`CROSS_FIELD_RULES`)."""
        for name, rule in FIELD_RULES.items():
            rule(name, getattr(self, name))
        for rule in CROSS_FIELD_RULES:
            rule(self)

    @property
    def fourier_dim(self) -> int:
        """Channels of the Fourier position features: d * (2 * fourier_bands + 1) for a d-D grid."""
        if self.input_shape is None:
            return 0
        return len(self.input_shape) * (2 * self.fourier_bands + 1)

    def replace(self, **changes: Any) -> PerceiverConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PerceiverConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PerceiverConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> PerceiverConfig:
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------- validation

FIELD_RULES: Dict[str, Callable[[str, Any], Any]] = {
    **{name: checks.positive_int for name in ("input_len", "input_dim", "latent_len", "latent_dim", "output_len",
                                              "output_dim", "ffw_latent", "ffw_output", "num_heads", "num_layers",
                                              "cross_heads", "fourier_bands")},
    "dropout": checks.fraction,
    "input_type": partial(checks.choice, allowed=INPUT_TYPES),
    "input_num_tokens": checks.optional(checks.positive_int),
    "input_channels": checks.optional(checks.positive_int),
    "input_shape": checks.optional(checks.int_tuple),
    "pos_encoding": partial(checks.choice, allowed=POS_ENCODINGS),
    "max_resolution": checks.optional(checks.int_tuple),
    "decoder_type": partial(checks.choice, allowed=DECODER_TYPES),
    "decoder_reduction": partial(checks.choice, allowed=DECODER_REDUCTIONS),
    "decoder_residual": checks.boolean,
    "decoder_projection": checks.boolean,
    "n_classes": checks.optional(checks.positive_int),
    "seed": partial(checks.int_at_least, minimum=0),
    "pos_init_std": checks.positive_float,
    "latent_init_std": checks.positive_float,
    "token_init_std": checks.optional(checks.positive_float),
    "share_weights": checks.boolean,
    "latents_from_inputs": checks.boolean,
    "queries_from_latents": checks.boolean,
    "checkpoint_activations": checks.boolean,
}
"""Each field's own rule: rule(name, value) raises a ValueError that names the field."""


def heads_divide_widths(c: PerceiverConfig) -> None:
    """Each head gets width / heads channels, so the widths must divide evenly."""
    for width, heads in (("latent_dim", "num_heads"), ("latent_dim", "cross_heads"), ("output_dim", "cross_heads")):
        value, count = getattr(c, width), getattr(c, heads)
        if value % count:
            raise ValueError(f"{width}={value} is not divisible by {heads}={count}; each head gets {width} / {heads} "
                             f"channels, so pick e.g. {width}={count * max(1, round(value / count))}")


def input_type_fits(c: PerceiverConfig) -> None:
    """Token inputs need a vocabulary and no raw-feature settings; raw inputs no vocabulary."""
    if c.input_type == "tokens":
        if c.input_num_tokens is None:
            raise ValueError("input_type='tokens' needs input_num_tokens (the vocabulary size), got None")
        if c.input_channels is not None:
            raise ValueError(f"input_channels={c.input_channels} applies to raw inputs only; "
                             "token inputs are embedded to input_dim, so leave it None")
        if c.pos_encoding == "fourier":
            raise ValueError("pos_encoding='fourier' needs raw inputs on a grid; with input_type='tokens' "
                             "use 'trainable' or 'sinusoid'")
    elif c.input_num_tokens is not None:
        raise ValueError(f"input_num_tokens={c.input_num_tokens} is only used with input_type='tokens', "
                         "got input_type='raw'")


def grid_fits(c: PerceiverConfig) -> None:
    """input_shape must hold input_len positions; Fourier features need the grid, and only they use
    max_resolution."""
    if c.pos_encoding == "fourier" and c.input_shape is None:
        raise ValueError("pos_encoding='fourier' needs input_shape, the grid the inputs lie on "
                         "(e.g. (8, 8) for 8x8 images), got None")
    if c.input_shape is not None and math.prod(c.input_shape) != c.input_len:
        raise ValueError(f"input_shape={c.input_shape} has {math.prod(c.input_shape)} positions "
                         f"but input_len={c.input_len}")
    if c.max_resolution is not None:
        if c.pos_encoding != "fourier":
            raise ValueError(f"max_resolution is only used with pos_encoding='fourier', "
                             f"got pos_encoding={c.pos_encoding!r}")
        if len(c.max_resolution) != len(c.input_shape):
            raise ValueError(f"max_resolution={c.max_resolution} needs one entry per axis of "
                             f"input_shape={c.input_shape}")


def decoder_fits(c: PerceiverConfig) -> None:
    """A pooling decoder needs a pooling reduction; a head needs its size; 'eot' one query per input."""
    if c.decoder_type == "latent_pool" and c.decoder_reduction in (None, "eot"):
        raise ValueError(f"decoder_type='latent_pool' pools the latents, so decoder_reduction must be one of "
                         f"('mean', 'max', 'sum', 'first', 'last'), got {c.decoder_reduction!r}")
    if c.decoder_projection and c.n_classes is None:
        raise ValueError("decoder_projection=True needs n_classes (the output size), got None")
    if c.decoder_reduction == "eot" and c.output_len != c.input_len:
        raise ValueError(f"decoder_reduction='eot' picks the output at each sample's last unmasked input "
                         f"position, so output_len must equal input_len={c.input_len}, got {c.output_len}")


def window_switches_fit(c: PerceiverConfig) -> None:
    """latents_from_inputs and queries_from_latents give each latent a window of consecutive positions (of
    the inputs, or of the output queries) and add vectors of latent_dim to ones of the other side's width;
    queries_from_latents adds to the queries' residual, one query per position."""
    if c.queries_from_latents and (c.decoder_type != "attention" or not c.decoder_residual):
        raise ValueError("queries_from_latents adds each query's window latent to the query's residual, so it "
                         f"needs decoder_type='attention' and decoder_residual=True, got decoder_type="
                         f"{c.decoder_type!r}, decoder_residual={c.decoder_residual}")
    for switch, length, width, adds in (("latents_from_inputs", "input_len", "input_dim",
                                         "mean input embeddings to the latents"),
                                        ("queries_from_latents", "output_len", "output_dim", "latents to the queries")):
        if not getattr(c, switch):
            continue
        if getattr(c, length) % c.latent_len:
            raise ValueError(f"{switch} gives each latent a window of {length} / latent_len positions, so "
                             f"{length}={getattr(c, length)} must be divisible by latent_len={c.latent_len}")
        if getattr(c, width) != c.latent_dim:
            raise ValueError(f"{switch} adds {adds}, so {width}={getattr(c, width)} must equal "
                             f"latent_dim={c.latent_dim}")
    if c.queries_from_latents and c.decoder_reduction == "eot":
        raise ValueError("queries_from_latents needs each query's position; decoder_reduction='eot' keeps "
                         "one query per sample, so use another reduction or None")


CROSS_FIELD_RULES = (heads_divide_widths, input_type_fits, grid_fits, decoder_fits, window_switches_fit)
"""The rules between fields, in the order `validate` applies them."""


# --------------------------------------------------------------------------- ready configs

def image_config(channels: int, height: int, width: int, n_classes: int, **overrides) -> PerceiverConfig:
    """A PerceiverConfig for `PerceiverImage` on (channels, height, width) images; any field can be
    overridden. The defaults are the ones the digits notebook trains."""
    fields = dict(input_len=height * width, input_shape=(height, width), input_channels=channels,
                  input_dim=96, latent_len=32, latent_dim=96, output_len=1, output_dim=96,
                  ffw_latent=384, ffw_output=384, num_heads=4, num_layers=4, cross_heads=1,
                  pos_encoding="fourier", fourier_bands=6, decoder_reduction="mean", n_classes=n_classes)
    fields.update(overrides)
    return PerceiverConfig(**fields)


def mlm_config(seq_len: int, vocab_size: int, **overrides) -> PerceiverConfig:
    """A PerceiverConfig for `PerceiverMLM` on (batch, seq_len) token ids over `vocab_size` tokens;
    any field can be overridden. The defaults are the byte model of notebook 04 and
    scripts/train_mlm.py: one latent per 4 tokens (seq_len must be divisible by 4), width 256, 4
    cross-attention heads, sinusoid positions, latents seeded from their input windows and queries
    from their window's latent (notebook 04 measures what each of these buys)."""
    fields = dict(input_len=seq_len, input_type="tokens", input_num_tokens=vocab_size, output_len=seq_len,
                  n_classes=vocab_size, decoder_reduction=None, input_dim=256, latent_len=max(1, seq_len // 4),
                  latent_dim=256, output_dim=256, ffw_latent=1024, ffw_output=1024, num_heads=8, num_layers=4,
                  cross_heads=4, pos_encoding="sinusoid", latents_from_inputs=True, queries_from_latents=True,
                  decoder_residual=True)
    fields.update(overrides)
    return PerceiverConfig(**fields)
