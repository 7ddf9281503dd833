"""AttentionExplorer without a browser: moving a control changes what is drawn."""
import numpy as np
import pytest
import torch

from percnb.models import PerceiverConfig, PerceiverImage, PerceiverMLM, image_config
from percnb.widgets import AttentionExplorer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def image_explorer():
    model = PerceiverImage(image_config(1, 8, 8, 10, input_dim=16, latent_len=6, latent_dim=16, output_dim=16,
                                        ffw_latent=32, ffw_output=32, num_heads=2, num_layers=2, cross_heads=2))
    images = torch.rand(4, 1, 8, 8)
    return AttentionExplorer(model, images, labels=torch.tensor([0, 1, 2, 3]))


def test_explorer_draws_a_png_and_caption(image_explorer):
    assert image_explorer.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert "prediction" in image_explorer.caption.value and "label <b>0</b>" in image_explorer.caption.value
    assert "percnb-attention-explorer" in image_explorer.widget._dom_classes


def test_moving_the_latent_changes_the_map(image_explorer):
    before, png = image_explorer.image_data().copy(), image_explorer.image.value
    image_explorer.latent.value = 3
    assert image_explorer.image_data().shape == (8, 8)
    assert not np.allclose(image_explorer.image_data(), before)
    assert image_explorer.image.value != png


def test_moving_the_sample_changes_the_map_and_caption(image_explorer):
    before, caption = image_explorer.image_data().copy(), image_explorer.caption.value
    image_explorer.sample.value = 2
    assert not np.allclose(image_explorer.image_data(), before)
    assert "label <b>2</b>" in image_explorer.caption.value and image_explorer.caption.value != caption


def test_head_choice_and_mean_agree(image_explorer):
    image_explorer.layer.value = "encoder"
    image_explorer.mean_latents.value = False
    maps = []
    for head in (0, 1):
        image_explorer.head.value = head
        maps.append(image_explorer.image_data())
    image_explorer.head.value = "mean"
    assert np.allclose(image_explorer.image_data(), (maps[0] + maps[1]) / 2, atol=1e-6)


@pytest.mark.parametrize("layer", ["encoder", "processor 0", "processor 1", "decoder"])
def test_every_layer_gives_a_distribution_over_pixels(image_explorer, layer):
    image_explorer.layer.value = layer
    assert image_explorer.image_data().sum() == pytest.approx(1.0, abs=1e-5)


def test_explorer_on_token_sequences_follows_position():
    config = PerceiverConfig(input_type="tokens", input_num_tokens=257, input_len=16, output_len=16,
                             decoder_reduction=None, n_classes=257, input_dim=16, latent_len=4, latent_dim=16,
                             output_dim=16, num_heads=2, num_layers=1)
    tokens = torch.tensor([list(b"hello perceiver!"), list(b"masked language.")])
    explorer = AttentionExplorer(PerceiverMLM(config), tokens)
    assert explorer.per_position and explorer.image_data().shape == (16,)
    explorer.layer.value = "decoder"
    first = explorer.image_data().copy()
    explorer.position.value = 9
    assert not np.allclose(explorer.image_data(), first)
    assert explorer.probabilities().shape == (257,)


def test_explorer_rejects_bad_inputs():
    model = PerceiverImage(image_config(1, 8, 8, 10, num_layers=1))
    with pytest.raises(ValueError, match=r"inputs must be images \(n, channels, height, width\)"):
        AttentionExplorer(model, torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="labels has 1 entries but inputs has 2 samples"):
        AttentionExplorer(model, torch.rand(2, 1, 8, 8), labels=torch.tensor([1]))


def test_explorer_with_a_pooling_head_has_no_decoder_layer():
    model = PerceiverImage(image_config(1, 8, 8, 10, input_dim=16, latent_len=4, latent_dim=16, num_heads=2,
                                        num_layers=2, decoder_type="latent_pool"))
    explorer = AttentionExplorer(model, torch.rand(2, 1, 8, 8))
    assert list(explorer.layer.options) == ["encoder", "processor 0", "processor 1"]
    explorer.layer.value = "processor 1"
    assert explorer.image_data().sum() == pytest.approx(1.0, abs=1e-5)


def test_each_layer_offers_its_own_heads():
    # image_config's defaults: 1 cross-attention head, 4 latent heads
    model = PerceiverImage(image_config(1, 8, 8, 10, input_dim=16, latent_len=4, latent_dim=16, output_dim=16,
                                        ffw_latent=32, ffw_output=32, num_layers=2))
    explorer = AttentionExplorer(model, torch.rand(2, 1, 8, 8))
    assert list(explorer.head.options) == ["mean", 0]
    explorer.layer.value = "processor 1"
    assert list(explorer.head.options) == ["mean", 0, 1, 2, 3]
    maps = {}
    for head in range(4):
        explorer.head.value = head
        maps[head] = explorer.image_data().copy()
    assert not np.allclose(maps[3], maps[0]) and explorer.caption.value.endswith("head 3")
    explorer.layer.value = "decoder"                      # 1 head: head 3 is not there, the mean is shown
    assert list(explorer.head.options) == ["mean", 0] and explorer.head.value == "mean"
    assert explorer.image_data().sum() == pytest.approx(1.0, abs=1e-5)


def test_byte_labels_read_at_a_glance():
    from percnb.data.text import MASK_ID
    from percnb.widgets import _byte_label, _cell_label
    assert [_byte_label(t) for t in b"a Z\n\t"] == ["a", "␣", "Z", "↵", "→"]
    assert _byte_label(MASK_ID) == "█" and _byte_label(7) == "\\x07" and _byte_label(0xC3) == "\\xc3"
    assert _byte_label(300) == "<300>"
    # in the map's cells a space stays blank and a byte without a glyph is a dot: one character per cell
    assert [_cell_label(t) for t in [ord(" "), ord("\n"), 7, 0xC3, MASK_ID, ord("q")]] == [" ", "↵", "·", "·", "█", "q"]


def test_the_text_map_labels_every_byte_and_frames_the_query():
    from matplotlib.figure import Figure
    config = PerceiverConfig(input_type="tokens", input_num_tokens=257, input_len=16, output_len=16,
                             decoder_reduction=None, n_classes=257, input_dim=16, latent_len=4, latent_dim=16,
                             output_dim=16, num_heads=2, num_layers=1)
    tokens = torch.tensor([list(b"hello perceiver!")])
    explorer = AttentionExplorer(PerceiverMLM(config), tokens)
    explorer.layer.value, explorer.position.value = "decoder", 9
    ax = Figure().add_subplot()
    explorer._draw_sequence(ax, tokens[0], explorer.image_data())
    assert "".join(t.get_text() for t in ax.texts) == "hello perceiver!"
    (frame,) = ax.patches                                  # the query's cell: row 0, column 9
    assert frame.get_xy() == (8.5, -0.5) and frame.get_width() == frame.get_height() == 1
    explorer.layer.value = "encoder"                       # a latent's map: no query to frame
    ax = Figure().add_subplot()
    explorer._draw_sequence(ax, tokens[0], explorer.image_data())
    assert not ax.patches
