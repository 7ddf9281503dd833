"""percnb.hub: transformers' Perceivers (random small ones, built here: no network) convert to percnb models
that compute the same logits and the same attention maps; the full-size architectures have the released
checkpoints' parameter counts; the converted models are plain percnb models (save/load, explorer, untie)."""
import math
import random

import pytest
import torch
from torch import nn

# transformers comes with the hub extra, which `make test` installs: a missing one fails here, never skips
from transformers import PerceiverConfig as HFConfig
from transformers import (
    PerceiverForImageClassificationFourier,
    PerceiverForImageClassificationLearned,
    PerceiverForMaskedLM,
    PerceiverTokenizer,
)
from transformers.models.perceiver import modeling_perceiver as mp
from transformers.utils import logging as hf_logging

from percnb import hub
from percnb.models import Perceiver, PerceiverImage, PerceiverMLM, get_sequential_from_config

torch.set_num_threads(1)
hf_logging.set_verbosity_error()

ATOL = 1e-5   # the float32 bar, for logits of size ~1; a logit of size L carries ~L * 1e-7 rounding per
              # operation, so logits are compared within ATOL * max(1, max|logit|) (the tied-embedding MLM
              # logits reach 40-80 with the stressed weights below). Attention maps lie in [0, 1]: ATOL as is.


@torch.no_grad()
def stress_(model: nn.Module, seed: int) -> None:
    """Weights far from transformers' init (at which the maps are uniform to 1e-3 and would prove little):
    Linear std 1.5/sqrt(fan_in), LayerNorm weights 1 +- 0.2, biases 0.1, tables std 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if "layernorm" in name and name.endswith("weight"):
            p.copy_(1 + 0.2 * r)
        elif p.dim() == 1:
            p.copy_(0.1 * r)
        elif "latents" in name or "position_embeddings" in name or "embeddings.weight" in name:
            p.copy_(r)
        else:
            p.copy_(r * 1.5 / math.sqrt(p[0].numel()))


def assert_same(hf_model, model, percnb_inputs, hf_inputs, mask=None, vocab_order=None):
    """Logits (the fast path and the explicit one) and every attention map equal transformers'."""
    with torch.no_grad():
        out = hf_model(inputs=hf_inputs, attention_mask=mask, output_attentions=True)
        kwargs = {} if mask is None else {"attention_mask": mask}
        fast = model(percnb_inputs, **kwargs)
        explicit, maps = model(percnb_inputs, return_attentions=True, **kwargs)
    ref = out.logits if vocab_order is None else out.logits[..., vocab_order]
    scale = max(1.0, ref.abs().max().item())
    for logits in (fast, explicit):
        assert logits.shape == ref.shape and (logits - ref).abs().max() <= ATOL * scale
    hf_maps = [out.cross_attentions[0], *out.attentions, out.cross_attentions[1]]
    assert len(maps) == len(hf_maps)
    for a, b in zip(maps, hf_maps):
        assert a.shape == b.shape and (a - b).abs().max() <= ATOL
    return ref


def random_mlm(seed: int) -> PerceiverForMaskedLM:
    """A small PerceiverForMaskedLM; odd seeds replace the class's hard-coded decoder (8 heads, residual
    off) by other heads, widths, MLP widening and residual."""
    rng = random.Random(seed)
    heads, cross_heads = rng.choice([1, 2, 4]), rng.choice([1, 2, 4])
    d_latents, d_model = rng.choice([16, 32]), rng.choice([8, 16])
    qk = rng.choice([None, 8])
    if qk is None and d_model % cross_heads:      # cross q/k then default to d_model
        cross_heads = 1
    cfg = HFConfig(num_latents=rng.choice([3, 5]), d_latents=d_latents, d_model=d_model,
                   num_blocks=rng.choice([1, 2]), num_self_attends_per_block=rng.choice([1, 2]),
                   num_self_attention_heads=heads, num_cross_attention_heads=cross_heads, qk_channels=qk,
                   v_channels=d_latents if qk else None, self_attention_widening_factor=rng.choice([1, 2]),
                   cross_attention_widening_factor=rng.choice([1, 3]), use_query_residual=rng.choice([True, False]),
                   vocab_size=262, max_position_embeddings=16)
    model = PerceiverForMaskedLM(cfg)
    if seed % 2:
        dh = rng.choice([1, 2, 4])
        model.perceiver.decoder = mp.PerceiverBasicDecoder(
            cfg, output_num_channels=d_latents, output_index_dims=16, num_channels=d_model, qk_channels=dh * 4,
            v_channels=d_model, num_heads=dh, widening_factor=2, use_query_residual=True, final_project=False,
            trainable_position_encoding_kwargs={"num_channels": d_model, "index_dims": 16})
    stress_(model, seed)
    return model.eval()


def random_image(seed: int, learned: bool, side: int):
    """A small image classifier; with learned=False and an odd seed, a custom Fourier preprocessor (other
    bands, max_resolution, sine_only, one channel) and decoder (heads, q/k width) replace the class's."""
    rng = random.Random(seed)
    cfg = HFConfig(num_latents=rng.choice([4, 6]), d_latents=16, num_blocks=rng.choice([1, 3]),
                   num_self_attends_per_block=rng.choice([1, 2]), num_self_attention_heads=rng.choice([1, 2, 4]),
                   num_cross_attention_heads=1, cross_attention_widening_factor=rng.choice([1, 3]),
                   use_query_residual=rng.choice([True, False]), num_labels=5, image_size=side)
    channels = 3
    if learned:
        model = PerceiverForImageClassificationLearned(cfg)
    else:
        model = PerceiverForImageClassificationFourier(cfg)
        if seed % 2:
            channels = 1
            pre = mp.PerceiverImagePreprocessor(
                cfg, prep_type="pixels", spatial_downsample=1, in_channels=1,
                fourier_position_encoding_kwargs=dict(num_bands=rng.choice([2, 5]), max_resolution=(32, 16),
                                                      concat_pos=True, sine_only=True))
            dec = mp.PerceiverClassificationDecoder(
                cfg, num_channels=16, num_heads=2, qk_channels=8, use_query_residual=True,
                trainable_position_encoding_kwargs={"num_channels": 16, "index_dims": 1})
            model.perceiver = mp.PerceiverModel(cfg, input_preprocessor=pre, decoder=dec)
    stress_(model, seed)
    return model.eval(), channels


# --------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("seed", range(4))
def test_masked_lm_logits_and_maps_equal_transformers(seed):
    hf_model = random_mlm(seed)
    model = hub.from_transformers(hf_model, byte_ids=False)
    assert isinstance(model, PerceiverMLM)
    ids = torch.randint(0, 262, (3, 16), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, 8:] = 0                               # padding at the end
    mask[1, ::3] = 0                              # scattered holes
    assert_same(hf_model, model, ids, ids)
    assert_same(hf_model, model, ids, ids, mask)


def test_byte_ids_reorder_the_vocabulary_exactly():
    hf_model = random_mlm(1)
    model = hub.from_transformers(hf_model)       # byte_ids=True: percnb's ids in, percnb's order out
    hf_ids = torch.randint(0, 262, (2, 16), generator=torch.Generator().manual_seed(0))
    percnb_ids = hub.BYTE_ORDER.argsort()[hf_ids]
    assert_same(hf_model, model, percnb_ids, hf_ids, vocab_order=hub.BYTE_ORDER)


def test_shorter_input_equals_padding_with_a_mask():
    # transformers reads fewer than max_position_embeddings ids; percnb pads them and masks the pads
    hf_model = random_mlm(2)
    model = hub.from_transformers(hf_model, byte_ids=False)
    ids = torch.randint(0, 262, (2, 11), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 11), torch.zeros(2, 5)], dim=1)
    with torch.no_grad():
        ref = hf_model(inputs=ids).logits
        logits, maps = model(padded, attention_mask=mask, return_attentions=True)
    assert (logits - ref).abs().max() <= ATOL * max(1.0, ref.abs().max().item())
    assert maps[0][..., 11:].abs().max() == 0     # the pads get exactly zero weight


def test_decoding_some_positions_equals_picking_them():
    hf_model = random_mlm(3)
    model = hub.from_transformers(hf_model, byte_ids=False)
    ids = torch.randint(0, 262, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 5, 15], [3, 4, 9]])
    with torch.no_grad():
        ref = hf_model(inputs=ids).logits.gather(1, positions[..., None].expand(-1, -1, 262))
        part = model(ids, positions=positions)
    assert (part - ref).abs().max() <= ATOL * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("seed, side", [(0, 4), (1, 5), (2, 7), (3, 6)])
def test_fourier_image_classifier_equals_transformers(seed, side):
    hf_model, channels = random_image(seed, learned=False, side=side)
    model = hub.from_transformers(hf_model, image_size=(side, side))
    assert isinstance(model, PerceiverImage) and model.embed.input_proj is None
    images = torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(seed))
    assert_same(hf_model, model, images, images)


@pytest.mark.parametrize("seed, side", [(0, 3), (1, 5)])
def test_learned_image_classifier_equals_transformers(seed, side):
    hf_model, _ = random_image(seed, learned=True, side=side)
    model = hub.from_transformers(hf_model)
    images = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(seed))
    assert_same(hf_model, model, images, images)


def test_a_wrong_conversion_fails_the_comparison():
    # the comparison has power: key rows of the encoder permuted (heads mixed up) must be caught
    hf_model = random_mlm(0)
    model = hub.from_transformers(hf_model, byte_ids=False)
    with torch.no_grad():
        qk = model.encoder.qk_dim
        model.encoder.kv.weight[:qk] = model.encoder.kv.weight[:qk].flip(0)
    ids = torch.randint(0, 262, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError):
        assert_same(hf_model, model, ids, ids)


def test_a_fully_masked_sample_attends_nowhere_in_percnb():
    # the documented divergence: transformers spreads such a row evenly over the masked inputs
    hf_model = random_mlm(0)
    model = hub.from_transformers(hf_model, byte_ids=False)
    ids, mask = torch.randint(0, 262, (2, 16)), torch.ones(2, 16)
    mask[1] = 0
    with torch.no_grad():
        hf_map = hf_model(inputs=ids, attention_mask=mask, output_attentions=True).cross_attentions[0][1]
        _, maps = model(ids, attention_mask=mask, return_attentions=True)
    assert torch.allclose(hf_map, torch.full_like(hf_map, 1 / 16)) and maps[0][1].abs().max() == 0


def test_unsupported_models_are_refused():
    with pytest.raises(TypeError, match="must be one of transformers'"):
        hub.from_transformers(nn.Linear(2, 2))


# --------------------------------------------------------------------------- full size

@pytest.mark.parametrize("name, count", [
    ("deepmind/language-perceiver", 201_108_230),
    ("deepmind/vision-perceiver-fourier", 48_440_627),
    ("deepmind/vision-perceiver-learned", 62_255_848 - 65_792),   # positions_projection folded into the table
])
def test_full_size_architectures_have_the_released_parameter_counts(name, count):
    config = hub.full_size_config(name)
    with torch.device("meta"):
        model = (PerceiverMLM if config.input_type == "tokens" else PerceiverImage)(config)
    assert hub.parameter_count(model) == count


def test_the_language_perceiver_is_not_transformers_default_config():
    # PerceiverConfig() leaves q/k and v widths unset (None: 768/1280 wide), the hub's checkpoint sets 256/1280
    with torch.device("meta"):
        default = PerceiverForMaskedLM(HFConfig())
        released = PerceiverForMaskedLM(HFConfig(qk_channels=256, v_channels=1280))
    assert default.num_parameters() == 269_319_430 and released.num_parameters() == 201_108_230
    assert hub.config_from_transformers(released) == hub.full_size_config("deepmind/language-perceiver")


# --------------------------------------------------------------------------- a plain percnb model

def test_converted_model_saves_and_loads_bit_identically(tmp_path):
    hf_model, _ = random_image(1, learned=False, side=5)
    model = hub.from_transformers(hf_model, image_size=(5, 5))
    model.save(tmp_path / "m.pt")
    again = PerceiverImage.load(tmp_path / "m.pt")
    state, loaded = model.state_dict(), again.state_dict()
    assert state.keys() == loaded.keys() and all(torch.equal(state[k], loaded[k]) for k in state)
    assert not again.embed.fourier.requires_grad           # transformers' float32 table, kept as it was


def test_repeated_layers_stay_one_module_after_conversion():
    hf_model, _ = random_image(0, learned=True, side=3)
    model = hub.from_transformers(hf_model)
    c = model.config
    assert c.num_layers > c.layers_per_block or c.layers_per_block is None
    period = c.layers_per_block or c.num_layers
    assert all(model.processors[i] is model.processors[i % period] for i in range(c.num_layers))


def test_explorer_opens_on_a_converted_model():
    pytest.importorskip("ipywidgets")
    from percnb.widgets import AttentionExplorer
    model = hub.from_transformers(random_mlm(0))
    ids, _ = hub.encode_text("a b c", length=16)
    explorer = AttentionExplorer(model, ids[None])
    assert len(explorer.layer.options) == model.config.num_layers + 2 and explorer.image_data().size > 0


def test_loader_reads_a_saved_transformers_folder(tmp_path):
    hf_model = random_mlm(2)                      # an even seed: the class's own decoder, which from_pretrained builds
    hf_model.save_pretrained(tmp_path)
    loaded = hub.load(str(tmp_path))
    direct = hub.from_transformers(hf_model)
    ids = torch.randint(0, 262, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids), direct(ids))


def test_untie_gives_the_same_function_with_its_own_head():
    model = hub.from_transformers(random_mlm(0))
    untied = hub.untie(model)
    ids = torch.randint(0, 262, (2, 16))
    with torch.no_grad():
        assert torch.equal(untied(ids), model(ids))
    assert untied.head.weight.data_ptr() != model.embed.token_embedding.weight.data_ptr()
    assert len(get_sequential_from_config(untied.config)) == untied.config.num_layers + 3


def test_tied_model_cannot_be_cut_into_stages():
    with pytest.raises(ValueError, match=r"percnb.hub.untie\(model\)"):
        get_sequential_from_config(hub.full_size_config("deepmind/language-perceiver").replace(num_layers=1))


def test_encode_text_matches_the_perceiver_tokenizer():
    text = "Perceivers read bytes: é"
    hf = PerceiverTokenizer()(text, padding="max_length", max_length=40, return_tensors="pt")
    ids, mask = hub.encode_text(text, length=40)
    assert torch.equal(hub.BYTE_ORDER[ids], hf["input_ids"][0]) and torch.equal(mask, hf["attention_mask"][0])
    with pytest.raises(ValueError, match="needs length >= 27"):
        hub.encode_text(text, length=10)


def test_untie_refuses_an_untied_model():
    with pytest.raises(ValueError, match="tie_embeddings=True"):
        hub.untie(Perceiver(hub.full_size_config("deepmind/language-perceiver").replace(
            tie_embeddings=False, decoder_projection=True, num_layers=1, input_len=8, output_len=8)))


def test_compare_hub_benchmark_smoke():
    # a 2-layer model, one run: the script cannot rot (its timings are not asserted)
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_hub.py"
    out = subprocess.run([sys.executable, str(script), "--tiny", "--runs", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("transformers", "percnb"))]
    assert len(rows) == 3 and rows[0][-1] == "1.00x" and all(row[-1].endswith("x") for row in rows), out.stdout
