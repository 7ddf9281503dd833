"""percnb.data.images: the digits split, the torchvision opt-in path, augmentation."""
import numpy as np
import pytest
import torch

from percnb.data import RandomShift, load_digits_splits, load_torchvision_splits
from percnb.data.images import _stratified_split


def test_digits_split_is_fixed_by_seed_and_in_unit_range():
    a, b, c = load_digits_splits(seed=0), load_digits_splits(seed=0), load_digits_splits(seed=1)
    assert torch.equal(a.test[0], b.test[0]) and torch.equal(a.train[1], b.train[1])
    assert not torch.equal(a.test[0], c.test[0])
    assert a.image_shape == (1, 8, 8) and a.train[0].dtype == torch.float32 and a.train[1].dtype == torch.long
    assert 0.0 <= float(a.train[0].min()) and float(a.train[0].max()) == 1.0
    sizes = [len(s[1]) for s in (a.train, a.val, a.test)]
    assert sum(sizes) == 1797
    assert all(abs(n - share * 1797) <= 5 for n, share in zip(sizes, (0.7, 0.1, 0.2)))   # rounded per class


def test_stratified_split_is_a_partition_with_equal_class_shares():
    labels = np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])   # digits' counts
    train, val, test = _stratified_split(labels, (0.7, 0.1, 0.2), seed=0)
    together = np.concatenate([train, val, test])
    assert len(together) == len(labels) and len(np.unique(together)) == len(labels)     # disjoint, complete
    for part, share in ((val, 0.1), (test, 0.2)):
        per_class = np.bincount(labels[part], minlength=10) / np.bincount(labels)
        assert np.all(np.abs(per_class - share) <= 0.5 / 174 + 1e-9)                  # rounding only


def test_digits_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="val_fraction and test_fraction"):
        load_digits_splits(val_fraction=0.5, test_fraction=0.5)


def test_missing_torchvision_data_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST not found under .* and download=False"):
        load_torchvision_splits("MNIST", str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match="pass download=True"):
        load_torchvision_splits("cifar10", str(tmp_path), download=False)
    with pytest.raises(ValueError, match="name must be one of"):
        load_torchvision_splits("imagenet", str(tmp_path))


def test_random_shift_moves_images_by_at_most_one_pixel():
    torch.manual_seed(0)
    images = torch.zeros(64, 1, 8, 8)
    images[:, 0, 4, 4] = 1.0
    shifted, labels = RandomShift(max_shift=1, p=0.5)([images, torch.arange(64)])
    positions = shifted[:, 0].flatten(1).argmax(1)
    rows, cols = positions // 8, positions % 8
    assert torch.equal(labels, torch.arange(64)) and torch.all(shifted.sum((1, 2, 3)) == 1)
    assert torch.all((rows - 4).abs() <= 1) and torch.all((cols - 4).abs() <= 1)
    moved = ((rows != 4) | (cols != 4)).float().mean()
    assert 0.2 < moved < 0.6                                  # about p * 8/9 of the images move


def test_random_shift_with_p_zero_is_identity():
    images = torch.rand(5, 1, 8, 8)
    assert torch.equal(RandomShift(p=0.0)([images, None])[0], images)


def test_random_shift_fills_vacated_pixels_with_the_background():
    torch.manual_seed(0)
    images = torch.full((32, 1, 8, 8), -0.5)                  # a standardised, empty background
    shifted, _ = RandomShift(max_shift=1, p=1.0, fill=-0.5)([images, None])
    assert torch.all(shifted == -0.5)
    shifted, _ = RandomShift(max_shift=1, p=1.0)([images, None])
    assert torch.any(shifted == 0.0)                          # the default fill is 0: raw [0, 1] images


def test_standardized_uses_training_statistics_only():
    raw = load_digits_splits(seed=0)
    data = raw.standardized()
    assert abs(float(data.train[0].mean())) < 1e-5 and abs(float(data.train[0].std()) - 1) < 1e-5
    assert torch.allclose(data.test[0] * data.pixel_std + data.pixel_mean, raw.test[0], atol=1e-6)
    assert float(data.train[0].min()) == pytest.approx(data.background)      # black pixels
    assert torch.equal(data.val[1], raw.val[1]) and raw.background == 0.0
