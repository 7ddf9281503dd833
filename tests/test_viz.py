"""percnb.viz: attention heatmaps, cross-attention maps, training curves, confusion matrices."""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from percnb.train import History  # noqa: E402
from percnb.viz import confusion_matrix, cross_attention_map, plot_attention, plot_confusion, plot_history  # noqa: E402


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
