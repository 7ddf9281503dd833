"""percnb.train (the one training loop), percnb.viz and percnb.data.images."""
import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from percnb.data import load_digits_splits, load_torchvision_splits
from percnb.models import PerceiverConfig, Perceiver
from percnb.train import History, evaluate, fit
from percnb.viz import confusion_matrix, cross_attention_map, plot_attention, plot_confusion, plot_history

torch.set_num_threads(1)


def toy_problem(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 3, generator=g)
    y = (torch.rand(n, generator=g) > 0.5).long()
    x[:, :, 0] += (2 * y - 1)[:, None] * 0.7   # one channel only: LayerNorm would erase a uniform shift
    return x, y


def toy_model():
    return Perceiver(PerceiverConfig(input_len=6, input_dim=3, latent_len=4, latent_dim=16, output_dim=16,
                                     ffw_latent=32, ffw_output=32, num_heads=2, num_layers=1, n_classes=2,
                                     pos_encoding="none", seed=0))


def test_fit_is_deterministic_for_a_seed():
    data = toy_problem()
    a = fit(toy_model(), data, steps=15, batch_size=16, progress=False, seed=3)
    b = fit(toy_model(), data, steps=15, batch_size=16, progress=False, seed=3)
    assert a.loss == b.loss


def test_fit_learns_a_simple_rule():
    x, y = toy_problem(256)
    model = toy_model()
    history = fit(model, (x[:192], y[:192]), val_data=(x[192:], y[192:]), epochs=15, batch_size=32,
                  lr=3e-3, progress=False)
    assert history.val_accuracy[-1] >= 0.85, history.val_accuracy
    assert sum(history.loss[-10:]) < sum(history.loss[:10])
    assert evaluate(model, (x[192:], y[192:]))["accuracy"] == pytest.approx(history.val_accuracy[-1])


def test_custom_step_fn_counts_what_it_says():
    def step_fn(model, batch):
        logits = model(batch[0])
        loss = torch.nn.functional.cross_entropy(logits, batch[1])
        return loss, 0, 2 * len(batch[1])
    metrics = evaluate(toy_model(), toy_problem(10), step_fn=step_fn)
    assert metrics["accuracy"] == 0.0 and metrics["loss"] > 0


def test_onecycle_schedule_warms_up_then_anneals():
    history = fit(toy_model(), toy_problem(), steps=20, batch_size=16, lr=1e-2, warmup=5, progress=False)
    peak = max(history.lr)
    assert history.lr.index(peak) == 5 and history.lr[0] == pytest.approx(peak / 25) and history.lr[-1] < peak / 10


def test_max_seconds_stops_early():
    history = fit(toy_model(), toy_problem(), steps=10_000, batch_size=16, max_seconds=0.5, progress=False)
    assert len(history.loss) < 10_000


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "give exactly one of epochs or steps"),
    (dict(steps=5, schedule="linear"), "schedule must be one of"),
    (dict(steps=0), "steps must be an int >= 1"),
    (dict(steps=5, warmup=50), "warmup must be a fraction"),
])
def test_fit_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit(toy_model(), toy_problem(), progress=False, **kwargs)


def test_fit_rejects_mismatched_tensors():
    with pytest.raises(ValueError, match="must share their first"):
        fit(toy_model(), (torch.randn(5, 6, 3), torch.zeros(4).long()), steps=1, progress=False)


def test_digits_split_is_stratified_disjoint_and_fixed():
    a, b = load_digits_splits(seed=0), load_digits_splits(seed=0)
    assert torch.equal(a.test[0], b.test[0])
    sizes = [len(s[1]) for s in (a.train, a.val, a.test)]
    assert sum(sizes) == 1797 and a.image_shape == (1, 8, 8)
    assert 0.0 <= float(a.train[0].min()) and float(a.train[0].max()) <= 1.0
    counts = torch.bincount(a.test[1], minlength=10).float()
    assert counts.max() - counts.min() <= 2                                 # ~36 per class
    flat = lambda t: {tuple(r.flatten().tolist()) for r in t}                 # noqa: E731
    assert not flat(a.train[0][:200]) & flat(a.test[0][:0])                  # index sets are disjoint below
    assert len(set(map(id, (a.train, a.val, a.test)))) == 3


def test_missing_torchvision_data_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST not found under .* and download=False"):
        load_torchvision_splits("MNIST", str(tmp_path), download=False)


def test_confusion_matrix_counts():
    m = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert m.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_cross_attention_map_checks_the_grid():
    assert cross_attention_map(torch.rand(2, 1, 4, 64), 8, 8).shape == (2, 1, 4, 8, 8)
    with pytest.raises(ValueError, match="attn has 64 keys but the grid 4x4 has 16"):
        cross_attention_map(torch.rand(2, 1, 4, 64), 4, 4)


def test_plots_draw_what_they_are_given():
    history = History(step=[1, 2, 3], loss=[1.0, 0.5, 0.2], lr=[1, 1, 1], eval_step=[3], val_accuracy=[0.7])
    ax = plot_history(history, smooth=1)
    assert list(ax.lines[0].get_ydata()) == [1.0, 0.5, 0.2]
    ax = plot_attention(torch.eye(3))
    assert ax.images[0].get_array().shape == (3, 3)
    with pytest.raises(ValueError, match="weights must be a 2-D"):
        plot_attention(torch.rand(2, 3, 3))
    ax = plot_confusion(torch.eye(3, dtype=torch.long) * 5)
    assert len(ax.texts) == 3


def test_random_shift_moves_images_by_at_most_one_pixel():
    from percnb.data import RandomShift
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
    from percnb.data import RandomShift
    images = torch.rand(5, 1, 8, 8)
    assert torch.equal(RandomShift(p=0.0)([images, None])[0], images)
