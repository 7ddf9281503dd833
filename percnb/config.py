"""`PerceiverConfig`: every size and switch of a Perceiver, validated once, JSON round-trippable; and the
ready configs the notebooks use, `image_config`, `image_io_config` and `mlm_config`."""
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

    # ----------------------------------------------------------------- attention widths (DeepMind's options)
    # Perceiver IO gives each attention its own query/key width and value width, and DeepMind's released
    # models use them (deepmind/language-perceiver: q/k 256 against latents 1280). None keeps percnb's
    # plain rule: every width is the query side's width. percnb.hub fills these in from transformers.
    #: Query/key width of the encoder cross-attention (None: latent_dim).
    cross_qk_channels: Optional[int] = None
    #: Value width of the encoder cross-attention; its output projection maps it back to latent_dim
    #: (None: cross_qk_channels, or latent_dim when that is None too).
    cross_v_channels: Optional[int] = None
    #: Query/key width of the latent self-attention (None: latent_dim); its values stay latent_dim wide.
    self_qk_channels: Optional[int] = None
    #: Heads of the decoder cross-attention (None: cross_heads). DeepMind's MLM decodes with 8, its
    #: image classifiers with 1, whatever the encoder uses.
    decoder_heads: Optional[int] = None
    #: Query/key width of the decoder cross-attention (None: output_dim).
    decoder_qk_channels: Optional[int] = None
    #: Value width of the decoder cross-attention, projected back to output_dim (None: decoder_qk_channels,
    #: or output_dim).
    decoder_v_channels: Optional[int] = None
    #: Hidden width of the encoder cross-attention's MLP (None: ffw_latent, shared with the processors).
    ffw_cross: Optional[int] = None
    #: Whether the encoder's attention output adds the latents back (a residual; DeepMind's
    #: use_query_residual). False: the latents are replaced by what they read.
    query_residual: bool = True
    #: The processors' weights repeat with this period: processor i uses the weights of processor
    #: i % layers_per_block (DeepMind's num_blocks x num_self_attends_per_block; the vision Perceivers
    #: apply 6 distinct layers 8 times). None: every processor has its own weights; 1 is share_weights.
    layers_per_block: Optional[int] = None

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
    #: Whether raw inputs (with their Fourier features) pass through a linear layer to input_dim. None:
    #: when their width differs from input_dim or input_channels is set; False: never (DeepMind's Fourier
    #: image Perceiver reads pixels + features as they are, so input_dim must equal that width).
    input_projection: Optional[bool] = None

    # ----------------------------------------------------------------- position encoding
    #: "trainable" (a learned table), "sinusoid" (Vaswani et al.'s fixed table), "fourier" (features of
    #: the input_shape grid concatenated to raw inputs) or "none" (a set: permutation invariant).
    pos_encoding: str = "trainable"
    #: Frequency bands per grid axis of the Fourier features.
    fourier_bands: int = 6
    #: Per axis, the resolution whose Nyquist frequency is the highest band (default: input_shape).
    max_resolution: Optional[Tuple[int, ...]] = None
    #: Fourier features without the cosines (DeepMind's sine_only): d * (fourier_bands + 1) channels.
    fourier_sine_only: bool = False
    #: Concatenate a trainable position table this wide to the projected raw inputs instead of adding one
    #: (DeepMind's learned-position image Perceiver: pixels -> 256 channels, then 256 position channels).
    #: Needs pos_encoding='trainable' and raw inputs; input_proj then maps to input_dim - pos_concat_dim.
    pos_concat_dim: Optional[int] = None

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
    #: The head reuses the input embedding matrix: logits = outputs @ token_embedding.T + a bias
    #: (DeepMind's language Perceiver). Needs token inputs, decoder_projection=False, output_dim ==
    #: input_dim and n_classes == input_num_tokens.
    tie_embeddings: bool = False

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
        """Channels of the Fourier position features: d * (2 * fourier_bands + 1) for a d-D grid
        (d * (fourier_bands + 1) with fourier_sine_only)."""
        if self.input_shape is None:
            return 0
        return len(self.input_shape) * ((1 if self.fourier_sine_only else 2) * self.fourier_bands + 1)

    def widths(self, part: str) -> Tuple[int, int, int, int]:
        """(heads, query/key width, value width, MLP hidden width) of part 'encoder', 'processor' or
        'decoder', with the None fields resolved to their defaults."""
        if part == "encoder":
            qk = self.cross_qk_channels or self.latent_dim
            return self.cross_heads, qk, self.cross_v_channels or qk, self.ffw_cross or self.ffw_latent
        if part == "processor":
            return self.num_heads, self.self_qk_channels or self.latent_dim, self.latent_dim, self.ffw_latent
        qk = self.decoder_qk_channels or self.output_dim
        return self.decoder_heads or self.cross_heads, qk, self.decoder_v_channels or qk, self.ffw_output

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

SEED_LIMIT = 2 ** 32
"""Seeds are in [0, SEED_LIMIT): part p of a model is seeded with seed * 1_000_003 + p (`percnb.models.seeded`),
which must fit the 64 bits of torch.manual_seed."""
INIT_STD_MAX = 1e3
"""Largest standard deviation of initial weights: beyond about 1e19 a LayerNorm's variance overflows float32
(NaN outputs), and long before that training cannot recover."""


def seed_in_range(name: str, value: Any) -> int:
    """`value` as an int in [0, SEED_LIMIT)."""
    checks.int_at_least(name, value, 0)
    if value >= SEED_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**32), got {value}: each part of the model is seeded "
                         f"with {name} * 1_000_003 + part, which must fit torch.manual_seed's 64 bits")
    return int(value)


def init_std(name: str, value: Any) -> float:
    """`value` as a standard deviation of initial weights: finite, > 0 and below INIT_STD_MAX."""
    checks.positive_float(name, value)
    return checks.real(name, value, minimum=0, strict=True, maximum=INIT_STD_MAX,
                       hint=" (larger initial weights overflow float32 inside LayerNorm and attention)")


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
    "seed": seed_in_range,
    "pos_init_std": init_std,
    "latent_init_std": init_std,
    "token_init_std": checks.optional(init_std),
    **{name: checks.optional(checks.positive_int) for name in (
        "cross_qk_channels", "cross_v_channels", "self_qk_channels", "decoder_heads", "decoder_qk_channels",
        "decoder_v_channels", "ffw_cross", "layers_per_block", "pos_concat_dim")},
    "query_residual": checks.boolean,
    "input_projection": checks.optional(checks.boolean),
    "fourier_sine_only": checks.boolean,
    "tie_embeddings": checks.boolean,
    "share_weights": checks.boolean,
    "latents_from_inputs": checks.boolean,
    "queries_from_latents": checks.boolean,
    "checkpoint_activations": checks.boolean,
}
"""Each field's own rule: rule(name, value) raises a ValueError that names the field."""


def heads_divide_widths(c: PerceiverConfig) -> None:
    """Each head gets width / heads channels, so the query/key and value widths must divide evenly."""
    cross_qk = "cross_qk_channels" if c.cross_qk_channels else "latent_dim"
    decoder_qk = "decoder_qk_channels" if c.decoder_qk_channels else "output_dim"
    decoder_heads = "decoder_heads" if c.decoder_heads else "cross_heads"
    pairs = [("latent_dim", "num_heads"), ("self_qk_channels" if c.self_qk_channels else "latent_dim", "num_heads"),
             (cross_qk, "cross_heads"), ("cross_v_channels" if c.cross_v_channels else cross_qk, "cross_heads")]
    if c.decoder_type == "attention":
        pairs += [(decoder_qk, decoder_heads),
                  ("decoder_v_channels" if c.decoder_v_channels else decoder_qk, decoder_heads)]
    for width, heads in pairs:
        value, count = getattr(c, width), getattr(c, heads)
        if value % count:
            raise ValueError(f"{width}={value} is not divisible by {heads}={count}; each head gets {width} / {heads} "
                             f"channels, so pick e.g. {width}={count * max(1, round(value / count))}")


def weight_sharing_fits(c: PerceiverConfig) -> None:
    """layers_per_block repeats the processors' weights with that period: it must divide num_layers, and
    share_weights (period 1) may not ask for another."""
    if c.layers_per_block is None:
        return
    if c.share_weights and c.layers_per_block != 1:
        raise ValueError(f"share_weights=True is layers_per_block=1, got layers_per_block={c.layers_per_block}; "
                         "set one of the two")
    if c.num_layers % c.layers_per_block:
        raise ValueError(f"num_layers={c.num_layers} must be a multiple of layers_per_block={c.layers_per_block} "
                         "(the processors repeat in blocks of that many)")


def input_side_fits(c: PerceiverConfig) -> None:
    """input_projection=False keeps the raw width, pos_concat_dim concatenates a trainable table after the
    projection, tie_embeddings reads the logits off the token embedding: each needs its matching input."""
    if c.input_projection is not None and c.input_type != "raw":
        raise ValueError(f"input_projection={c.input_projection} applies to raw inputs only, got "
                         f"input_type={c.input_type!r}; leave it None")
    if c.input_projection is False:
        width = (c.input_channels or c.input_dim) + (c.fourier_dim if c.pos_encoding == "fourier" else 0)
        if width != c.input_dim or c.pos_concat_dim is not None:
            raise ValueError(f"input_projection=False reads raw inputs as they are: input_dim={c.input_dim} must "
                             f"equal input_channels + the Fourier features = {width} (and pos_concat_dim be None)")
    if c.pos_concat_dim is not None:
        if c.input_type != "raw" or c.pos_encoding != "trainable" or c.pos_concat_dim >= c.input_dim:
            raise ValueError(f"pos_concat_dim={c.pos_concat_dim} concatenates a trainable table to projected raw "
                             f"inputs: it needs input_type='raw', pos_encoding='trainable' and pos_concat_dim < "
                             f"input_dim={c.input_dim}, got input_type={c.input_type!r}, "
                             f"pos_encoding={c.pos_encoding!r}")
    if c.fourier_sine_only and c.pos_encoding != "fourier":
        raise ValueError(f"fourier_sine_only is only used with pos_encoding='fourier', got {c.pos_encoding!r}")
    if c.tie_embeddings and (c.input_type != "tokens" or c.decoder_type != "attention" or c.decoder_projection
                             or c.output_dim != c.input_dim or c.n_classes != c.input_num_tokens):
        raise ValueError("tie_embeddings reads the logits off the input embedding matrix: it needs "
                         "input_type='tokens', decoder_type='attention', decoder_projection=False, output_dim == "
                         f"input_dim and n_classes == input_num_tokens, got input_type={c.input_type!r}, "
                         f"decoder_type={c.decoder_type!r}, decoder_projection={c.decoder_projection}, "
                         f"output_dim={c.output_dim}, input_dim={c.input_dim}, n_classes={c.n_classes}, "
                         f"input_num_tokens={c.input_num_tokens}")


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


CROSS_FIELD_RULES = (heads_divide_widths, input_type_fits, grid_fits, decoder_fits, window_switches_fit,
                     weight_sharing_fits, input_side_fits)
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


def image_io_config(channels: int, height: int, width: int, n_classes: int, **overrides) -> PerceiverConfig:
    """A PerceiverConfig for `PerceiverImageIO`: sets of (channels values + 2-D Fourier position) pixels of
    height x width images in, a class query plus pixel queries out; any field can be overridden.

    The positions travel with the pixels as features (pos_encoding='none'), so a set may hold any
    number of pixels: input_len = height * width is nominal and input_shape = (height, width) sets the
    Fourier resolution. The decoder keeps one output per query (decoder_reduction=None) without a
    shared head (decoder_projection=False): the model's own class and pixel heads read them. The
    defaults are notebook 06's recipe (16 latents of 64, 2 layers, 4 cross-attention heads).
    """
    checks.positive_int("channels", channels)
    fourier_bands = overrides.get("fourier_bands", 6)
    checks.positive_int("fourier_bands", fourier_bands)
    fields = dict(input_len=height * width, input_shape=(height, width),
                  input_channels=channels + 2 * (2 * fourier_bands + 1), input_dim=64, latent_len=16,
                  latent_dim=64, output_len=1, output_dim=64, ffw_latent=256, ffw_output=128, num_heads=4,
                  num_layers=2, cross_heads=4, pos_encoding="none", fourier_bands=fourier_bands,
                  decoder_reduction=None, decoder_projection=False, decoder_residual=True, n_classes=n_classes)
    fields.update(overrides)
    return PerceiverConfig(**fields)
