"""`PerceiverConfig`: every size and switch of a Perceiver, validated once, JSON round-trippable."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

INPUT_TYPES = ("raw", "tokens")
DECODER_REDUCTIONS = ("mean", "max", "sum", "first", "last", "eot", None)
POS_ENCODINGS = ("trainable", "sinusoid", "fourier", "none")
DECODER_TYPES = ("attention", "latent_pool")


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    # bool is an int subclass; True as a size is always a bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_divisible(name: str, value: int, heads_name: str, heads: int) -> None:
    if value % heads:
        raise ValueError(
            f"{name}={value} is not divisible by {heads_name}={heads}; each head gets {name} / {heads_name} "
            f"channels, so pick e.g. {name}={heads * max(1, round(value / heads))}")


@dataclass
class PerceiverConfig:
    """Sizes and switches of a Perceiver (gperc's fields plus a few of percnb's).

    Shapes: inputs are `(batch, input_len, input_channels or input_dim)` raw features or
    `(batch, input_len)` token ids; `latent_len` latents of width `latent_dim` read them through
    cross-attention, `num_layers` self-attention blocks process the latents, and `output_len`
    queries of width `output_dim` read the latents back out. With a `decoder_reduction` the output
    axis is pooled, giving `(batch, n_classes)`, otherwise `(batch, output_len, n_classes)`.

    percnb's additions: `pos_encoding` ("trainable", "sinusoid", "fourier" or "none"),
    `share_weights` (one self-attention block reused `num_layers` times), `cross_heads` (heads of the
    encoder and decoder cross-attentions, 1 as in the paper), `latent_init_std` (1.0, so that the
    latents start distinct; notebook 03's first exercise compares 0.02), `input_channels` (raw feature size when it
    differs from `input_dim`: a linear layer maps it, after Fourier features are concatenated),
    `input_shape`, `fourier_bands` and `max_resolution` (the grid of the Fourier features),
    `decoder_type`: "attention" (Perceiver IO: output queries cross-attend to the latents) or
    "latent_pool" (Perceiver paper, perceiver-pytorch: pool the latents with decoder_reduction,
    LayerNorm, project; output_len, output_dim and ffw_output are then unused).
    `latents_from_inputs` (False): each latent starts as its learned vector plus the mean of the
    embedded inputs in its own window of input_len / latent_len consecutive positions, so that every
    latent holds local content before the first cross-attention (Perceiver AR seeds its latents from
    inputs too). It ties latents to input order, so it needs input_len divisible by latent_len and
    input_dim == latent_dim. `token_init_std` (None: the scale of the position codes the tokens are
    added to, pos_init_std for a trainable table, 1/sqrt(2), its RMS, for the sinusoid one, 1 without
    positions). `queries_from_latents` (False) is the decoder-side twin of latents_from_inputs: the output query
    at position p also carries, in its residual, the latent of p's window (p // (output_len / latent_len)),
    so each output starts from the processed content of its own neighbourhood, as the up-sampling of
    a Funnel Transformer does; it needs output_len divisible by latent_len, output_dim == latent_dim
    and decoder_residual=True. Notebook 04 measures what each buys a byte-level masked language model.
    """

    input_len: int = 64
    input_dim: int = 8
    latent_len: int = 4
    latent_dim: int = 16
    output_len: int = 1
    output_dim: int = 8
    ffw_latent: int = 32
    ffw_output: int = 32
    num_heads: int = 2
    num_layers: int = 2
    input_type: str = "raw"
    input_num_tokens: Optional[int] = None
    decoder_reduction: Optional[str] = "mean"
    decoder_residual: bool = False
    decoder_projection: bool = True
    n_classes: Optional[int] = 10
    pos_init_std: float = 0.02
    dropout: float = 0.0
    seed: int = 4
    pos_encoding: str = "trainable"
    share_weights: bool = False
    cross_heads: int = 1
    latent_init_std: float = 1.0
    input_channels: Optional[int] = None
    input_shape: Optional[Tuple[int, ...]] = None
    fourier_bands: int = 6
    max_resolution: Optional[Tuple[int, ...]] = None
    decoder_type: str = "attention"
    latents_from_inputs: bool = False
    queries_from_latents: bool = False
    token_init_std: Optional[float] = None

    def __post_init__(self) -> None:
        # JSON gives lists; the config keeps tuples so equal configs compare equal.
        if isinstance(self.input_shape, list):
            self.input_shape = tuple(self.input_shape)
        if isinstance(self.max_resolution, list):
            self.max_resolution = tuple(self.max_resolution)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, its value and what is allowed."""
        for name in ("input_len", "input_dim", "latent_len", "latent_dim", "output_len", "output_dim",
                     "ffw_latent", "ffw_output", "num_heads", "num_layers", "cross_heads", "fourier_bands"):
            _check_int(name, getattr(self, name))
        _check_int("seed", self.seed, minimum=0)
        _check_choice("input_type", self.input_type, INPUT_TYPES)
        _check_choice("decoder_reduction", self.decoder_reduction, DECODER_REDUCTIONS)
        _check_choice("pos_encoding", self.pos_encoding, POS_ENCODINGS)
        _check_choice("decoder_type", self.decoder_type, DECODER_TYPES)
        if self.decoder_type == "latent_pool" and self.decoder_reduction in (None, "eot"):
            raise ValueError(f"decoder_type='latent_pool' pools the latents, so decoder_reduction must be one of "
                             f"('mean', 'max', 'sum', 'first', 'last'), got {self.decoder_reduction!r}")
        for name in ("decoder_residual", "decoder_projection", "share_weights", "latents_from_inputs",
                     "queries_from_latents"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("pos_init_std", "latent_init_std", "token_init_std"):
            value = getattr(self, name)
            if name == "token_init_std" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        _check_divisible("latent_dim", self.latent_dim, "num_heads", self.num_heads)
        _check_divisible("latent_dim", self.latent_dim, "cross_heads", self.cross_heads)
        _check_divisible("output_dim", self.output_dim, "cross_heads", self.cross_heads)
        if self.latents_from_inputs:
            if self.input_len % self.latent_len:
                raise ValueError(f"latents_from_inputs gives each latent a window of input_len / latent_len inputs, so "
                                 f"input_len={self.input_len} must be divisible by latent_len={self.latent_len}")
            if self.input_dim != self.latent_dim:
                raise ValueError(f"latents_from_inputs adds mean input embeddings to the latents, so input_dim="
                                 f"{self.input_dim} must equal latent_dim={self.latent_dim}")
        if self.queries_from_latents:
            if self.decoder_type != "attention" or not self.decoder_residual:
                raise ValueError("queries_from_latents adds each query's window latent to the query's residual, so it "
                                 f"needs decoder_type='attention' and decoder_residual=True, got decoder_type="
                                 f"{self.decoder_type!r}, decoder_residual={self.decoder_residual}")
            if self.output_len % self.latent_len:
                raise ValueError(f"queries_from_latents gives each latent a window of output_len / latent_len queries, so "
                                 f"output_len={self.output_len} must be divisible by latent_len={self.latent_len}")
            if self.output_dim != self.latent_dim:
                raise ValueError(f"queries_from_latents adds latents to the queries, so output_dim={self.output_dim} "
                                 f"must equal latent_dim={self.latent_dim}")
            if self.decoder_reduction == "eot":
                raise ValueError("queries_from_latents needs each query's position; decoder_reduction='eot' keeps "
                                 "one query per sample, so use another reduction or None")
        if self.input_type == "tokens":
            if self.input_num_tokens is None:
                raise ValueError("input_type='tokens' needs input_num_tokens (the vocabulary size), got None")
            _check_int("input_num_tokens", self.input_num_tokens)
            if self.input_channels is not None:
                raise ValueError(f"input_channels={self.input_channels} applies to raw inputs only; "
                                 "token inputs are embedded to input_dim, so leave it None")
            if self.pos_encoding == "fourier":
                raise ValueError("pos_encoding='fourier' needs raw inputs on a grid; with input_type='tokens' "
                                 "use 'trainable' or 'sinusoid'")
        elif self.input_num_tokens is not None:
            raise ValueError(f"input_num_tokens={self.input_num_tokens} is only used with input_type='tokens', "
                             "got input_type='raw'")
        if self.input_channels is not None:
            _check_int("input_channels", self.input_channels)
        if self.decoder_projection:
            if self.n_classes is None:
                raise ValueError("decoder_projection=True needs n_classes (the output size), got None")
            _check_int("n_classes", self.n_classes)
        if self.decoder_reduction == "eot" and self.output_len != self.input_len:
            raise ValueError(f"decoder_reduction='eot' picks the output at each sample's last unmasked input "
                             f"position, so output_len must equal input_len={self.input_len}, got {self.output_len}")
        if self.pos_encoding == "fourier":
            if self.input_shape is None:
                raise ValueError("pos_encoding='fourier' needs input_shape, the grid the inputs lie on "
                                 f"(e.g. (8, 8) for 8x8 images), got None")
            self._check_shape("input_shape", self.input_shape)
            if math.prod(self.input_shape) != self.input_len:
                raise ValueError(f"input_shape={self.input_shape} has {math.prod(self.input_shape)} positions "
                                 f"but input_len={self.input_len}")
            if self.max_resolution is not None:
                self._check_shape("max_resolution", self.max_resolution)
                if len(self.max_resolution) != len(self.input_shape):
                    raise ValueError(f"max_resolution={self.max_resolution} needs one entry per axis of "
                                     f"input_shape={self.input_shape}")
        else:
            for name in ("input_shape", "max_resolution"):
                if getattr(self, name) is not None and name == "max_resolution":
                    raise ValueError(f"max_resolution is only used with pos_encoding='fourier', "
                                     f"got pos_encoding={self.pos_encoding!r}")
            if self.input_shape is not None:
                self._check_shape("input_shape", self.input_shape)
                if math.prod(self.input_shape) != self.input_len:
                    raise ValueError(f"input_shape={self.input_shape} has {math.prod(self.input_shape)} "
                                     f"positions but input_len={self.input_len}")

    @staticmethod
    def _check_shape(name: str, shape: Any) -> None:
        if not isinstance(shape, tuple) or not shape or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {shape!r}")

    @property
    def fourier_dim(self) -> int:
        """Channels of the Fourier position features: d * (2 * fourier_bands + 1) for a d-D grid."""
        if self.input_shape is None:
            return 0
        return len(self.input_shape) * (2 * self.fourier_bands + 1)

    def replace(self, **changes: Any) -> "PerceiverConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PerceiverConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PerceiverConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "PerceiverConfig":
        return cls.from_dict(json.loads(text))
