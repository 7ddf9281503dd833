"""Perceiver IO on pixel sets (notebook 06): Fourier features at any coordinates, pixel sets with masks,
bilinear pixel targets, PerceiverImageIO and its training step."""
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from percnb import Perceiver, PerceiverImageIO, image_io_config
from percnb.data import PixelSet, pixel_set, pixels_at, random_keep
from percnb.encodings import fourier_encode, fourier_features, grid_coordinates
from percnb.train import fit, image_io_step


def small_model(seed=0, **overrides):
    config = image_io_config(1, 8, 8, 10, latent_len=4, latent_dim=16, input_dim=16, output_dim=16, ffw_latent=32,
                             ffw_output=32, num_layers=1, num_heads=2, cross_heads=2, seed=seed, **overrides)
    return PerceiverImageIO(config, pixel_mean=0.3, pixel_std=0.4).eval()


def random_sets(batch=3, queries=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 1, 8, 8, generator=g)
    keep = random_keep(batch, 64, torch.rand(batch, generator=g) * 0.9 + 0.1, g)
    return images, pixel_set(images, keep), torch.rand(batch, queries, 2, generator=g) * 2 - 1


# --------------------------------------------------------------------------- encodings

def test_grid_coordinates_are_raster_order_in_unit_square():
    grid = grid_coordinates((2, 3))
    assert grid.shape == (6, 2) and grid.dtype == torch.float32
    assert grid[:3, 0].tolist() == [-1, -1, -1] and grid[:3, 1].tolist() == [-1, 0, 1]    # last axis fastest
    assert grid[-1].tolist() == [1, 1]


@pytest.mark.parametrize("shape", [(8, 8), (5, 7), (16,), (3, 4, 5)])
def test_fourier_encode_on_grid_points_equals_fourier_features(shape):
    expected = fourier_features(shape, 6)                          # max_resolution = shape
    exact = fourier_encode(grid_coordinates(shape, torch.float64), 6, shape).float()
    assert torch.equal(exact, expected)
    # float32 coordinates are off by <= 6e-8 (rounding near 1); times pi * the top frequency (<= 8) < 1.6e-6
    assert torch.allclose(fourier_encode(grid_coordinates(shape), 6, shape), expected, atol=1.6e-6)


@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=3), concat=st.booleans())
def test_fourier_encode_encodes_each_point_on_its_own(lead, concat):
    coords = torch.rand(*lead, 5, 2, dtype=torch.float64) * 2 - 1
    out = fourier_encode(coords, 3, (8, 4), concat_pos=concat)
    assert out.shape == (*lead, 5, 2 * 2 * 3 + 2 * concat)             # sin and cos of 2 axes x 3 bands (+ x)
    flat = fourier_encode(coords.reshape(-1, 2), 3, (8, 4), concat_pos=concat)
    assert torch.equal(out.reshape(-1, out.shape[-1]), flat)


def test_fourier_encode_rejects_bad_arguments():
    with pytest.raises(TypeError, match="coords must be a floating-point tensor"):
        fourier_encode(torch.zeros(4, 2, dtype=torch.long), 6, (8, 8))
    with pytest.raises(ValueError, match="one entry per axis of max_resolution"):
        fourier_encode(torch.zeros(4, 3), 6, (8, 8))
    with pytest.raises(ValueError, match="num_bands"):
        fourier_encode(torch.zeros(4, 2), 0, (8, 8))
    with pytest.raises(ValueError, match="max_resolution"):
        fourier_encode(torch.zeros(4, 2), 6, (8, 0))


# --------------------------------------------------------------------------- pixel sets

def test_random_keep_keeps_round_fraction_and_at_least_one():
    keep = random_keep(4, 64, torch.tensor([0.001, 0.1, 0.5, 1.0]), torch.Generator().manual_seed(0))
    assert keep.dtype == torch.bool and keep.sum(1).tolist() == [1, 6, 32, 64]


def test_random_keep_rejects_fractions_outside_unit_interval():
    with pytest.raises(ValueError, match=r"fractions must be floats in \(0, 1\]"):
        random_keep(2, 64, torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="fractions must have shape"):
        random_keep(3, 64, torch.tensor([0.5, 0.5]))


def test_pixel_set_holds_the_kept_pixels_first_in_raster_order():
    images = torch.rand(3, 1, 8, 8)
    keep = random_keep(3, 64, torch.tensor([0.2, 0.5, 0.9]), torch.Generator().manual_seed(1))
    values, coords, mask = pixel_set(images, keep)
    assert values.shape == (3, int(keep.sum(1).max()), 1) and coords.shape[:2] == mask.shape == values.shape[:2]
    assert mask.sum(1).tolist() == keep.sum(1).tolist()
    grid = grid_coordinates((8, 8))
    for i in range(3):
        n = int(keep[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert torch.equal(values[i, :n, 0], images[i, 0].flatten()[keep[i]])
        assert torch.equal(coords[i, :n], grid[keep[i]])


def test_pixel_set_pads_to_a_given_length_and_is_a_named_tuple():
    images = torch.rand(2, 3, 4, 4)
    out = pixel_set(images, torch.ones(2, 16, dtype=torch.bool), pad_to=20)
    assert isinstance(out, PixelSet) and out.values.shape == (2, 20, 3) and out.mask.sum().item() == 32


def test_pixel_set_rejects_bad_keep_and_short_padding():
    images = torch.rand(2, 1, 8, 8)
    with pytest.raises(TypeError, match="keep must be a bool tensor"):
        pixel_set(images, torch.ones(2, 64))
    with pytest.raises(ValueError, match="keep must have shape"):
        pixel_set(images, torch.ones(2, 63, dtype=torch.bool))
    with pytest.raises(ValueError, match="pad_to must be an int >= 64"):
        pixel_set(images, torch.ones(2, 64, dtype=torch.bool), pad_to=10)


def test_pixels_at_grid_points_are_the_pixels():
    images = torch.rand(2, 3, 5, 7)
    at = pixels_at(images, grid_coordinates((5, 7)).expand(2, -1, -1))
    # the float32 grid point (x + 1) / 2 * (size - 1) lands within 2e-7 of the integer pixel index
    assert torch.allclose(at, images.flatten(2).transpose(1, 2), atol=1e-6)


def test_pixels_at_a_midpoint_is_the_mean_of_its_neighbours():
    images = torch.rand(1, 1, 8, 8)
    step = 2 / 7
    row, col = -1 + 3 * step, -1 + 4.5 * step                 # between pixels (3, 4) and (3, 5)
    at = pixels_at(images, torch.tensor([[[row, col]]]))
    assert torch.allclose(at[0, 0, 0], images[0, 0, 3, 4:6].mean(), atol=1e-6)


def test_pixels_at_rejects_coordinates_without_two_axes():
    with pytest.raises(ValueError, match=r"coords must have shape \(batch=1, queries, 2 = \(row, col\)=2\)"):
        pixels_at(torch.rand(1, 1, 8, 8), torch.zeros(1, 4, 3))


# --------------------------------------------------------------------------- the model

@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 64), q=st.integers(0, 40), batch=st.integers(1, 3))
def test_model_shapes_for_any_set_and_query_count(m, q, batch):
    model = small_model()
    g = torch.Generator().manual_seed(m * 100 + q)
    logits, pixels = model(torch.rand(batch, m, 1, generator=g), torch.rand(batch, m, 2, generator=g) * 2 - 1,
                           None, torch.rand(batch, q, 2, generator=g) * 2 - 1)
    assert logits.shape == (batch, 10) and pixels.shape == (batch, q, 1)


def test_padded_items_change_nothing():
    model = small_model()
    _, (values, coords, mask), queries = random_sets()
    with torch.no_grad():
        logits, pixels = model(values, coords, mask, queries)
        garbage = ~mask[..., None]
        noisy = model(torch.where(garbage, 1e3, values), torch.where(garbage, -0.3, coords), mask, queries)
        longer = model(torch.cat([values, torch.randn(3, 7, 1)], 1), torch.cat([coords, torch.rand(3, 7, 2)], 1),
                       torch.cat([mask, torch.zeros(3, 7, dtype=torch.bool)], 1), queries)
    for other in (noisy, longer):
        # masked keys get exactly zero weight; atol 1e-6 because a longer key axis changes fp32 summation order
        assert torch.allclose(other[0], logits, atol=1e-6) and torch.allclose(other[1], pixels, atol=1e-6)


def test_the_set_order_does_not_matter():
    model = small_model()
    _, (values, coords, mask), queries = random_sets()
    perm = torch.randperm(values.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = model(values, coords, mask, queries)
        b = model(values[:, perm], coords[:, perm], mask[:, perm], queries)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)   # fp32 sums reordered


def test_each_query_is_answered_on_its_own():
    model = small_model()
    _, pixels_in, queries = random_sets(queries=9)
    with torch.no_grad():
        logits, pixels = model(*pixels_in, queries)
        alone = [model(*pixels_in, queries[:, i:i + 1])[1] for i in range(9)]
        no_pixels, empty = model(*pixels_in, queries[:, :0])
    # atol 1e-5: the fast kernels pick their path by query count, with another fp32 summation order
    assert torch.allclose(torch.cat(alone, 1), pixels, atol=1e-5)
    assert torch.allclose(no_pixels, logits, atol=1e-5) and empty.shape == (3, 0, 1)


def test_textbook_and_fast_paths_agree():
    model = small_model()
    _, pixels_in, queries = random_sets()
    with torch.no_grad():
        fast = model(*pixels_in, queries)
        model.fast = False
        slow = model(*pixels_in, queries)
    assert torch.allclose(fast[0], slow[0], atol=1e-5) and torch.allclose(fast[1], slow[1], atol=1e-5)


def test_return_attentions_gives_encoder_processor_and_decoder_maps():
    model = small_model()
    _, (values, coords, mask), queries = random_sets(queries=5)
    with torch.no_grad():
        logits, pixels, maps = model(values, coords, mask, queries, return_attentions=True)
    m = values.shape[1]
    assert [tuple(a.shape) for a in maps] == [(3, 2, 4, m), (3, 2, 4, 4), (3, 2, 6, 4)]   # decoder: 1 + 5 queries
    assert torch.equal(maps[0] * ~mask[:, None, None, :], torch.zeros_like(maps[0]))     # padding gets no weight


def test_decode_grid_returns_images_of_the_asked_size():
    model = small_model()
    _, pixels_in, _ = random_sets()
    with torch.no_grad():
        fine = model.decode_grid(*pixels_in, 32, 24)
        coarse = model.decode_grid(*pixels_in, 8, 8)
        _, direct = model(*pixels_in, grid_coordinates((8, 8)).expand(3, -1, -1))
    assert fine.shape == (3, 1, 32, 24) and coarse.shape == (3, 1, 8, 8)
    assert torch.allclose(coarse.flatten(2).transpose(1, 2), direct, atol=1e-6)


def test_save_and_load_give_the_same_model(tmp_path):
    model = small_model(seed=3)
    _, pixels_in, queries = random_sets()
    model.save(tmp_path / "io.pt")
    loaded = Perceiver.load(tmp_path / "io.pt")
    assert type(loaded) is PerceiverImageIO and float(loaded.pixel_std) == pytest.approx(0.4)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(*pixels_in, queries), loaded(*pixels_in, queries)))


def test_model_rejects_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="PerceiverImageIO needs pos_encoding='none'"):
        PerceiverImageIO(image_io_config(1, 8, 8, 10, decoder_reduction="mean"))
    with pytest.raises(ValueError, match="pixel_std"):
        PerceiverImageIO(image_io_config(1, 8, 8, 10), pixel_std=0.0)
    model = small_model()
    with pytest.raises(ValueError, match=r"values must have shape \(batch, M, channels=1\)"):
        model(torch.rand(2, 5, 3), torch.rand(2, 5, 2), None, torch.rand(2, 1, 2))
    with pytest.raises(ValueError, match="coords must have shape"):
        model(torch.rand(2, 5, 1), torch.rand(2, 4, 2), None, torch.rand(2, 1, 2))
    with pytest.raises(ValueError, match="query_coords must have shape"):
        model(torch.rand(2, 5, 1), torch.rand(2, 5, 2), None, torch.rand(1, 1, 2))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(torch.rand(2, 5, 1), torch.rand(2, 5, 2), torch.ones(2, 4, dtype=torch.bool), torch.rand(2, 1, 2))


# --------------------------------------------------------------------------- training

def test_image_io_step_trains_with_fit():
    model = small_model()
    g = torch.Generator().manual_seed(0)
    images, labels = (torch.rand(64, 1, 8, 8, generator=g) > 0.5).float(), torch.randint(0, 10, (64,), generator=g)
    step = functools.partial(image_io_step, grid_queries=8, random_queries=4)
    history = fit(model, (images, labels), steps=30, batch_size=16, lr=3e-3, step_fn=step, seed=0, progress=False)
    first, last = sum(history.loss[:5]) / 5, sum(history.loss[-5:]) / 5
    assert last < first, (first, last)       # the pixel MSE of random binary images falls toward their variance


def test_image_io_step_rejects_bad_settings():
    model, batch = small_model(), (torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"fractions must be \(low, high\)"):
        image_io_step(model, batch, fractions=(0.5, 0.2))
    with pytest.raises(ValueError, match="grid_queries=65"):
        image_io_step(model, batch, grid_queries=65)
    with pytest.raises(ValueError, match="pixel_weight"):
        image_io_step(model, batch, pixel_weight=-1.0)
