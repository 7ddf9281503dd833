"""Position encodings: trainable tables, fixed sinusoids (Vaswani et al.) and Fourier features for
N-D grids and for any continuous coordinates (Jaegle et al., Perceiver, section 3.2; Perceiver IO queries)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from . import checks
from .config import PerceiverConfig

ENCODING_TYPES = ("trainable", "sinusoid", "fourier")


def sinusoid_encoding(num_positions: int, dim: int) -> torch.Tensor:
    """Fixed sin/cos table of Vaswani et al.: (num_positions, dim).

    Channel 2i is sin(p / 10000^(2i/dim)) and 2i+1 its cos; an odd `dim` drops the last cos.
    """
    checks.positive_int("num_positions", num_positions)
    checks.positive_int("dim", dim)
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_positions, dim + dim % 2, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table[:, :dim].float()


def grid_coordinates(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The points of an N-D grid in [-1, 1]: (prod(shape), d), raster ("ij") order, the last axis fastest.

    For an image, shape=(height, width) gives (row, col) pairs: point i is pixel i of
    `images.flatten(2)`. Both ends of each axis are pixel centres (-1 the first, 1 the last).
    """
    shape = tuple(int(s) for s in shape) if isinstance(shape, (tuple, list)) else shape
    checks.int_tuple("shape", shape)
    axes = [torch.linspace(-1.0, 1.0, s, dtype=torch.float64) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape)).to(dtype)


def fourier_encode(coords: torch.Tensor, num_bands: int, max_resolution: Sequence[int],
                   concat_pos: bool = True, sine_only: bool = False) -> torch.Tensor:
    """Fourier features of points at any continuous coordinates: (..., d) -> (..., d * (2 * num_bands + 1)).

    Per axis, `num_bands` frequencies spaced linearly from 1 to max_resolution / 2 (that axis's
    Nyquist frequency), each giving sin(pi f x) and cos(pi f x); with `concat_pos` the coordinate
    itself comes first. Channel order [coords (d), sin (d * bands), cos (d * bands)], bands fastest
    within an axis: on grid points this is `fourier_features`, so a query between pixels is encoded
    on the same scale as the pixels. `sine_only` (DeepMind's option) leaves the cosines out.
    Computed in float64, returned in coords' dtype.
    """
    if not isinstance(coords, torch.Tensor) or not coords.is_floating_point() or coords.dim() == 0:
        raise TypeError(f"coords must be a floating-point tensor (..., d) of coordinates in [-1, 1], "
                        f"got {checks.describe(coords)}")
    checks.positive_int("num_bands", num_bands)
    max_resolution = checks.int_tuple("max_resolution", tuple(max_resolution))
    if coords.shape[-1] != len(max_resolution):
        raise ValueError(f"coords must end in one entry per axis of max_resolution={max_resolution} "
                         f"({len(max_resolution)}), got {checks.describe(coords)}")
    checks.boolean("concat_pos", concat_pos)
    checks.boolean("sine_only", sine_only)
    pos = coords.to(torch.float64)
    freqs = torch.stack([torch.linspace(1.0, r / 2.0, num_bands, dtype=torch.float64, device=coords.device)
                         for r in max_resolution])                                         # (d, bands)
    angles = math.pi * pos[..., :, None] * freqs                                           # (..., d, bands)
    parts = [torch.sin(angles).flatten(-2)] + ([] if sine_only else [torch.cos(angles).flatten(-2)])
    if concat_pos:
        parts.insert(0, pos)
    return torch.cat(parts, dim=-1).to(coords.dtype)


def fourier_features(shape: Sequence[int], num_bands: int, max_resolution: Optional[Sequence[int]] = None,
                     concat_pos: bool = True, sine_only: bool = False) -> torch.Tensor:
    """Fourier position features of every point of an N-D grid: (prod(shape), d * (2 * num_bands + 1)).

    Each axis is sampled on [-1, 1] (`grid_coordinates`) and encoded by `fourier_encode`: for each
    axis, `num_bands` frequencies are spaced linearly from 1 to max_resolution / 2 (the Nyquist
    frequency of that axis) and each gives sin(pi f x) and cos(pi f x). With `concat_pos` the raw
    coordinate is appended, as in the Perceiver paper. The channel order is [coords (d), sin (d *
    bands), cos (d * bands)], bands fastest within an axis.
    """
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape must be a non-empty sequence of positive ints, got {shape}")
    checks.positive_int("num_bands", num_bands)
    max_resolution = shape if max_resolution is None else tuple(max_resolution)
    if len(max_resolution) != len(shape):
        raise ValueError(f"max_resolution={max_resolution} needs one entry per axis of shape={shape}")
    return fourier_encode(grid_coordinates(shape, torch.float64), num_bands, max_resolution, concat_pos,
                          sine_only).float()


def build_position_encoding(position_encoding_type: str, config: PerceiverConfig,
                            num_index_items: int, emb_dim: Optional[int]) -> nn.Parameter:
    """A position table usable as an `nn.Embedding` weight: (num_index_items, emb_dim).

    "trainable": normal(0, config.pos_init_std), learned. "sinusoid": the fixed table of Vaswani et
    al. "fourier": Fourier features of the grid `config.input_shape` (`config.fourier_bands` bands
    up to `config.max_resolution`); its width is fixed by the grid, so `emb_dim` may be None and
    otherwise must equal `config.fourier_dim`. Fixed tables come back with requires_grad=False.
    """
    if not isinstance(config, PerceiverConfig):
        raise TypeError(f"config must be a PerceiverConfig, got {type(config).__name__}")
    checks.choice("position_encoding_type", position_encoding_type, ENCODING_TYPES)
    checks.positive_int("num_index_items", num_index_items)
    if position_encoding_type == "fourier":
        shape = config.input_shape or (num_index_items,)
        if math.prod(shape) != num_index_items:
            raise ValueError(f"num_index_items={num_index_items} but config.input_shape={shape} has "
                             f"{math.prod(shape)} positions")
        table = fourier_features(shape, config.fourier_bands, config.max_resolution,
                                 sine_only=config.fourier_sine_only)
        if emb_dim is not None and emb_dim != table.shape[1]:
            raise ValueError(f"emb_dim={emb_dim} but Fourier features of a {len(shape)}-D grid with "
                             f"{config.fourier_bands} bands have {table.shape[1]} channels; "
                             f"pass None or {table.shape[1]}")
        return nn.Parameter(table, requires_grad=False)
    checks.positive_int("emb_dim", emb_dim)
    if position_encoding_type == "trainable":
        return nn.Parameter(torch.randn(num_index_items, emb_dim) * config.pos_init_std)
    return nn.Parameter(sinusoid_encoding(num_index_items, emb_dim), requires_grad=False)
