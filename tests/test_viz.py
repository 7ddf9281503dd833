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


def test_architecture_figure_labels_every_part_with_the_config_sizes():
    from percnb.config import PerceiverConfig
    from percnb.viz import plot_architecture
    config = PerceiverConfig(input_len=64, input_dim=8, latent_len=4, latent_dim=16, num_layers=3, output_len=5)
    texts = " ".join(t.get_text() for t in plot_architecture(config).texts)
    for part in ("M=64", "C=8", "N=4", "D=16", "L=3 x self-attention", "O=5 queries", "output queries"):
        assert part in texts, part
    pooled = " ".join(t.get_text() for t in plot_architecture(config.replace(decoder_type="latent_pool")).texts)
    assert "mean of" in pooled and "output queries" not in pooled
    assert "M x C" in " ".join(t.get_text() for t in plot_architecture().texts).replace("\n", " ")
