"""percnb.data: token ids of any integer dtype, windows and images that are refused clearly when they
cannot make sense (instead of a NaN, a wrapped byte or a ZeroDivisionError later)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from percnb.data.images import ImageSplits, RandomShift
from percnb.data.text import (
    BYTES,
    IGNORE,
    MASK_ID,
    ByteMasker,
    RandomWindows,
    fixed_windows,
    masked_eval_set,
    neighbour_predict,
    unigram_predict,
)

# Integer dtypes that can hold every byte id; int8 holds 0..127 only and is drawn with smaller ids.
BYTE_DTYPES = [torch.uint8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32]


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(BYTE_DTYPES + [torch.int8]), batch=st.integers(1, 4), seq=st.integers(1, 48),
       seed=st.integers(0, 2 ** 31), rate=st.floats(0.01, 0.99), span=st.integers(1, 4))
def test_masker_scores_exactly_the_chosen_positions_whatever_the_dtype(dtype, batch, seq, seed, rate, span):
    high = 128 if dtype == torch.int8 else BYTES
    windows = torch.randint(0, high, (batch, seq), generator=torch.Generator().manual_seed(seed))
    masker = ByteMasker(rate=rate, span=span)
    inputs, targets = masker.mask(windows.to(dtype), torch.Generator().manual_seed(seed))
    chosen = masker.chosen((batch, seq), torch.Generator().manual_seed(seed))   # mask's first draw
    assert inputs.dtype == targets.dtype == torch.long
    assert torch.equal(targets == IGNORE, ~chosen)                     # IGNORE exactly where not chosen
    assert torch.equal(targets[chosen], windows[chosen])               # the original byte where chosen
    assert torch.equal(inputs[~chosen], windows[~chosen])              # unchosen bytes untouched
    assert bool(((inputs >= 0) & (inputs <= MASK_ID)).all())
    as_long = masker.mask(windows, torch.Generator().manual_seed(seed))
    assert torch.equal(inputs, as_long[0]) and torch.equal(targets, as_long[1])   # dtype changes nothing


@pytest.mark.parametrize("windows, error, message", [
    (torch.rand(2, 8), ValueError, r"windows must be a \(batch, seq\) tensor of byte ids .* torch.float32"),
    (torch.zeros(2, 8, dtype=torch.bool), ValueError, "torch.bool"),
    (torch.full((2, 8), MASK_ID), ValueError, r"byte ids in \[0, 256\), got values from 256 to 256"),
    (torch.full((2, 8), -1), ValueError, "got values from -1"),
    (torch.zeros(8, dtype=torch.uint8), ValueError, "got shape"),
    ([[1, 2, 3]], TypeError, "got list"),
])
def test_masker_refuses_windows_that_are_not_bytes(windows, error, message):
    with pytest.raises(error, match=message):
        ByteMasker().mask(windows)


@pytest.mark.parametrize("seq_len", [0, -3, True, 2.0])
def test_windows_refuse_a_seq_len_that_is_not_a_positive_int(seq_len):
    data = torch.arange(100) % 256
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        RandomWindows(data, seq_len, length=4)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        fixed_windows(data, seq_len)


def test_windows_refuse_a_seq_len_longer_than_the_data():
    data = torch.arange(10)
    with pytest.raises(ValueError, match="data must be longer than seq_len=32, got 10 ids"):
        RandomWindows(data, 32, length=4)
    with pytest.raises(ValueError, match="data has 10 bytes, fewer than seq_len=32"):
        fixed_windows(data, 32)


@pytest.mark.parametrize("max_windows", [0, -1])
def test_fixed_windows_refuse_a_nonpositive_max_windows(max_windows):
    with pytest.raises(ValueError, match="max_windows must be an int >= 1"):
        fixed_windows(torch.arange(100), 10, max_windows=max_windows)


def test_windows_refuse_float_data():
    with pytest.raises(ValueError, match=r"data must be a 1-D tensor of byte ids .* torch.float32"):
        RandomWindows(torch.rand(100), 8, length=4)
    with pytest.raises(ValueError, match=r"data must be a 1-D tensor of byte ids"):
        fixed_windows(torch.rand(100), 8)


@pytest.mark.parametrize("dtype", BYTE_DTYPES)
def test_text_of_any_integer_dtype_gives_the_same_windows_eval_set_and_baselines_as_long(dtype):
    text = torch.randint(0, BYTES, (700,), generator=torch.Generator().manual_seed(0))
    small = text.to(dtype)
    torch.manual_seed(1)
    window = RandomWindows(small, 16, length=3)[0][0]
    torch.manual_seed(1)
    assert window.dtype == torch.long and torch.equal(window, RandomWindows(text, 16, length=3)[0][0])
    assert torch.equal(fixed_windows(small, 16, max_windows=5), fixed_windows(text, 16, max_windows=5))
    inputs, targets = masked_eval_set(small, 16, ByteMasker(), seed=2)
    expected = masked_eval_set(text, 16, ByteMasker(), seed=2)
    assert torch.equal(inputs, expected[0]) and torch.equal(targets, expected[1])
    assert torch.equal(neighbour_predict(small, inputs), neighbour_predict(text, inputs))
    assert torch.equal(unigram_predict(small, inputs), unigram_predict(text, inputs))


def _splits(train_images, labels=None):
    labels = torch.zeros(len(train_images), dtype=torch.long) if labels is None else labels
    pair = (train_images, labels)
    return ImageSplits(pair, pair, pair, classes=("a", "b"))


def test_standardized_refuses_constant_training_images():
    splits = _splits(torch.full((20, 1, 8, 8), 0.3))
    with pytest.raises(ValueError, match=r"training images are constant \(every pixel is 0.3, std 0\)"):
        splits.standardized()


def test_standardized_refuses_nonfinite_training_images():
    images = torch.rand(20, 1, 8, 8)
    images[3, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="hold NaN or inf"):
        _splits(images).standardized()


def test_standardized_of_a_tiny_spread_is_finite():
    images = torch.full((20, 1, 8, 8), 0.5)
    images[0, 0, 0, 0] = 0.5 + 2 ** -20                 # not constant: standardising is asked for, and exact
    result = _splits(images).standardized()
    assert bool(torch.isfinite(result.train[0]).all()) and abs(float(result.train[0].std()) - 1) < 1e-3


def test_image_splits_cast_float64_images_to_float32():
    images = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    splits = _splits(images, torch.arange(6, dtype=torch.int32) % 2)
    assert splits.train[0].dtype == torch.float32 and splits.train[1].dtype == torch.long
    assert torch.equal(splits.train[0], images.float())
    assert splits.standardized().test[0].dtype == torch.float32


@pytest.mark.parametrize("images, labels, message", [
    (torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8), None, r"float tensor, got torch.uint8; .* / 255"),
    (torch.rand(6, 8, 8), None, r"\(n, channels, height, width\), got shape \(6, 8, 8\); .*unsqueeze\(1\)"),
    (torch.rand(6, 1, 8, 8), torch.zeros(6), r"labels must be a \(n,\) tensor of integer class ids"),
    (torch.rand(6, 1, 8, 8), torch.zeros(5, dtype=torch.long), "6 images but 5 labels"),
])
def test_image_splits_refuse_images_and_labels_that_do_not_fit(images, labels, message):
    with pytest.raises(ValueError, match=message):
        _splits(images, labels)


def test_random_shift_refuses_integer_images():
    with pytest.raises(ValueError, match="RandomShift needs float images .* torch.uint8"):
        RandomShift(p=1.0, fill=-0.5)([torch.zeros(4, 1, 8, 8, dtype=torch.uint8), None])


def test_random_shift_keeps_float64_images_float64():
    # An augmentation only moves pixels: it keeps the dtype it is given (ImageSplits is where dtypes are set).
    torch.manual_seed(0)
    images = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    assert RandomShift(p=1.0)([images, None])[0].dtype == torch.float64
