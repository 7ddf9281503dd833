"""Real images, offline first: scikit-learn's 8x8 digits by default, torchvision MNIST / CIFAR-10 on request."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch

from .. import checks
from ..encodings import grid_coordinates

Split = Tuple[torch.Tensor, torch.Tensor]


def _as_split(split, name: str) -> Split:
    """(images, labels) as (n, channels, height, width) float32 and (n,) long.

    Any float dtype is cast to float32, the dtype of the models' weights (float64 pixels would fail
    in the first layer, or double every later cost); integer images are refused rather than cast,
    since only the caller knows their scale (uint8 0..255, 16 gray levels, ...)."""
    if not (isinstance(split, (tuple, list)) and len(split) == 2
            and all(isinstance(t, torch.Tensor) for t in split)):
        raise TypeError(f"{name} must be an (images, labels) pair of tensors, got {type(split).__name__}")
    images, labels = split
    if images.dim() != 4:
        raise ValueError(f"{name} images must be (n, channels, height, width), got shape {tuple(images.shape)}; "
                         "give one-channel images a channel axis with images.unsqueeze(1)")
    if not images.is_floating_point():
        raise ValueError(f"{name} images must be a float tensor, got {images.dtype}; scale integer pixels to "
                         "floats first (e.g. images.float() / 255 for 8-bit pixels)")
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} labels must be a (n,) tensor of integer class ids, got shape "
                         f"{tuple(labels.shape)} and dtype {labels.dtype}")
    if len(images) != len(labels):
        raise ValueError(f"{name} has {len(images)} images but {len(labels)} labels; they must pair up")
    return images.float(), labels.long()


@dataclass
class ImageSplits:
    """Train/validation/test tensors: images (n, channels, height, width) float, labels (n,) long.

    Loaders return pixels in [0, 1] (pixel_mean 0, pixel_std 1); `standardized()` rescales them.
    Splits given by hand are checked: float images of any dtype become float32, integer labels long;
    integer images are refused (their scale is the caller's to set).
    """

    train: Split
    val: Split
    test: Split
    classes: Tuple[str, ...]
    pixel_mean: float = 0.0
    pixel_std: float = 1.0

    def __post_init__(self):
        self.train, self.val, self.test = (_as_split(getattr(self, n), n) for n in ("train", "val", "test"))

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.train[0].shape[1:])

    @property
    def background(self) -> float:
        """The value a black (0) pixel has in these tensors: the fill for shifted-in pixels."""
        return -self.pixel_mean / self.pixel_std

    def standardized(self) -> ImageSplits:
        """All splits shifted and scaled by the training images' pixel mean and std (one number each).

        Why: a Perceiver concatenates each pixel's value to its Fourier position features (values
        in [-1, 1], 26 channels for 2-D with 6 bands); raw [0, 1] digits (mean 0.3, std 0.4) are a
        faint signal next to them, and training sat near chance for the first epochs. Only the
        training split's statistics are used, so nothing leaks from validation or test.

        Constant training images (std 0) raise ValueError: they carry no signal to rescale, and
        dividing by 0 (or by a clamped tiny std) would turn any other split into NaN or huge values.
        """
        images = self.train[0]
        if images.numel() == 0:
            raise ValueError("the training split has no images: nothing to take a mean and std from")
        low, high = float(images.min()), float(images.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"the training images hold NaN or inf (pixels from {low} to {high}); clean them first")
        # Compared exactly: a float std of identical pixels can come out as rounding noise, not 0.
        if low == high:
            raise ValueError(f"the training images are constant (every pixel is {low:g}, std 0): there is no "
                             "spread to standardise, and dividing by 0 would give NaN; use the splits as they are")
        mean, std = float(images.mean()), float(images.std())
        scale = lambda split: ((split[0] - mean) / std, split[1])  # noqa: E731
        return ImageSplits(scale(self.train), scale(self.val), scale(self.test), self.classes,
                           pixel_mean=mean, pixel_std=std)


def _stratified_split(labels: np.ndarray, fractions: Tuple[float, float, float], seed: int):
    """Indices of train/val/test with each class split in the same proportions."""
    rng = np.random.default_rng(seed)
    parts = ([], [], [])
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(fractions[1] * len(idx)))
        n_test = int(round(fractions[2] * len(idx)))
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val:n_val + n_test])
        parts[0].append(idx[n_val + n_test:])
    return [np.sort(np.concatenate(p)) for p in parts]


def load_digits_splits(val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> ImageSplits:
    """The 1,797 real 8x8 digits shipped with scikit-learn, split by class (stratified) and seed.

    Images are (n, 1, 8, 8) floats in [0, 1] (the raw 0..16 gray levels divided by 16).
    The default split is 70/10/20 train/val/test; the same seed always gives the same split.
    """
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be in [0, 1) and sum below 1, "
                         f"got {val_fraction} and {test_fraction}")
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train, val, test = _stratified_split(digits.target, (1 - val_fraction - test_fraction, val_fraction,
                                                         test_fraction), seed)
    return ImageSplits(*[(images[i], labels[i]) for i in (train, val, test)],
                       classes=tuple(str(c) for c in range(10)))


def load_torchvision_splits(name: str, root: str, download: bool = False, val_fraction: float = 0.1,
                            seed: int = 0) -> ImageSplits:
    """MNIST or CIFAR-10 from torchvision, as tensors; an opt-in path that needs the files.

    The official test set is the test split; the validation split is a stratified part of the
    official training set. With download=False and no data under `root`, raises FileNotFoundError
    saying where the data was looked for and how to fetch it.
    """
    import torchvision
    datasets = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}
    key = name.lower().replace("-", "")
    if key not in datasets:
        raise ValueError(f"name must be one of {sorted(datasets)}, got {name!r}")
    try:
        train_set = datasets[key](root, train=True, download=download)
        test_set = datasets[key](root, train=False, download=download)
    except RuntimeError as error:
        raise FileNotFoundError(
            f"{name} not found under {os.path.abspath(root)!r} and download=False; pass download=True "
            f"(needs internet) or put the torchvision {name} files there ({error})") from None

    def tensors(dataset):
        data = torch.as_tensor(np.asarray(dataset.data))
        images = (data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)).float() / 255.0
        return images, torch.as_tensor(np.asarray(dataset.targets), dtype=torch.long)

    images, labels = tensors(train_set)
    train_idx, val_idx, _ = _stratified_split(labels.numpy(), (1 - val_fraction, val_fraction, 0.0), seed)
    return ImageSplits((images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx]),
                       tensors(test_set), classes=tuple(str(c) for c in train_set.classes))


class RandomShift:
    """Training augmentation: move each image (independently) by up to `max_shift` pixels, with
    probability `p`; vacated pixels get `fill` (the background: 0 for raw [0, 1] digits, the
    normalised background value for standardised images). Call on an (images, labels) batch;
    labels pass through. Draws from torch's global generator, which `fit(seed=...)` seeds.

    Shifting a whole batch the same way hurt on 8x8 digits; per-sample shifts of a
    random half of the batch are what notebook 03 uses.
    """

    def __init__(self, max_shift: int = 1, p: float = 0.5, fill: float = 0.0):
        if max_shift < 0 or not 0 <= p <= 1:
            raise ValueError(f"max_shift must be >= 0 and p in [0, 1], got {max_shift} and {p}")
        self.max_shift, self.p, self.fill = max_shift, p, float(fill)

    def __call__(self, batch):
        images, *rest = batch
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"RandomShift needs float images (batch, channels, height, width), got shape "
                             f"{tuple(images.shape)} and dtype {images.dtype}; the fill {self.fill} would be "
                             "rounded into integer pixels")
        n, _, h, w = images.shape
        s = self.max_shift
        padded = torch.nn.functional.pad(images, (s, s, s, s), value=self.fill)
        dy = torch.randint(-s, s + 1, (n,))
        dx = torch.randint(-s, s + 1, (n,))
        keep = torch.rand(n) >= self.p
        dy[keep], dx[keep] = 0, 0
        rows = (torch.arange(h)[None, :] + s - dy[:, None])                     # (n, h)
        cols = (torch.arange(w)[None, :] + s - dx[:, None])                     # (n, w)
        idx = torch.arange(n)[:, None, None]
        shifted = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        return [shifted, *rest]


# --------------------------------------------------------------------------- pixel sets (Perceiver IO, notebook 06)

class PixelSet(NamedTuple):
    """Some pixels of each image as a padded set: values (batch, M, channels), coords (batch, M, 2) as
    (row, col) in [-1, 1], mask (batch, M) bool (True = a real pixel, False = padding)."""

    values: torch.Tensor
    coords: torch.Tensor
    mask: torch.Tensor


def random_keep(batch: int, num_positions: int, fractions: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Which positions each sample keeps: (batch, num_positions) bool, row i with exactly
    max(1, round(fractions[i] * num_positions)) True, chosen uniformly at random.

    fractions: (batch,) floats in (0, 1]. At least one position is kept, so that no set is empty.
    """
    checks.positive_int("batch", batch)
    checks.positive_int("num_positions", num_positions)
    checks.shape("fractions", fractions, (("batch", batch),))
    if not fractions.is_floating_point() or not bool(((fractions > 0) & (fractions <= 1)).all()):
        raise ValueError(f"fractions must be floats in (0, 1], got {checks.describe(fractions)} with values from "
                         f"{float(fractions.min()):g} to {float(fractions.max()):g}")
    counts = (fractions * num_positions).round().clamp(1, num_positions).long()          # (batch,)
    ranks = torch.rand(batch, num_positions, generator=generator).argsort(1).argsort(1)  # a random permutation
    return ranks < counts[:, None]


def pixel_set(images: torch.Tensor, keep: torch.Tensor, pad_to: Optional[int] = None) -> PixelSet:
    """The kept pixels of each image as a padded set with a mask, ready for a Perceiver.

    images: (batch, channels, height, width); keep: (batch, height * width) bool, raster order.
    Returns PixelSet(values (batch, M, channels), coords (batch, M, 2), mask (batch, M)) with M the
    most pixels any image keeps (or `pad_to`, which must be at least that). Each row holds its kept
    pixels first, in raster order; the padding repeats pixel 0 and is masked out.
    """
    checks.shape("images", images, ("batch", "channels", "height", "width"))
    b, c, h, w = images.shape
    checks.shape("keep", keep, (("batch", b), ("height * width", h * w)))
    if keep.dtype != torch.bool:
        raise TypeError(f"keep must be a bool tensor (True = the pixel is seen), got {checks.describe(keep)}")
    counts = keep.sum(1)
    most = int(counts.max())
    if pad_to is not None:
        checks.int_at_least("pad_to", pad_to, most)
    m = most if pad_to is None else pad_to
    # A stable sort on "not kept" puts each row's kept pixels first, in raster order.
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    if m > h * w:                      # padding beyond the image: repeat pixel 0 (masked anyway)
        order = torch.cat([order, order.new_zeros(b, m - h * w)], 1)
    order = order[:, :m]
    mask = torch.arange(m, device=keep.device)[None, :] < counts[:, None]
    values = images.flatten(2).transpose(1, 2).gather(1, order[..., None].expand(-1, -1, c))
    coords = grid_coordinates((h, w), images.dtype).to(images.device)[order]
    return PixelSet(values, coords, mask)


def pixels_at(images: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Pixel values at continuous (row, col) coordinates in [-1, 1], by bilinear interpolation.

    images: (batch, channels, height, width); coords: (batch, queries, 2) -> (batch, queries, channels).
    -1 and 1 are the centres of the first and last pixels (align_corners=True), so on the grid points
    of `grid_coordinates` the pixels come back exactly, and between them their weighted mean.
    """
    checks.shape("images", images, ("batch", "channels", "height", "width"))
    checks.shape("coords", coords, (("batch", len(images)), "queries", ("2 = (row, col)", 2)))
    if not images.is_floating_point() or coords.dtype != images.dtype:
        raise TypeError(f"images and coords must be floats of one dtype, got images {checks.describe(images)} "
                        f"and coords {checks.describe(coords)}")
    grid = coords.flip(-1)[:, :, None, :]          # grid_sample reads (x, y) = (col, row)
    out = torch.nn.functional.grid_sample(images, grid, mode="bilinear", align_corners=True)  # (b, c, Q, 1)
    return out[..., 0].transpose(1, 2)
