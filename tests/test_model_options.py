"""The config fields DeepMind's released Perceivers need (percnb.hub fills them in): each one's effect on
the model, its validation, and the fast kernels equal to the textbook code with each of them on."""
import pytest
import torch
from test_fast import assert_all_close, key_mask, outputs_and_grads

from percnb import fast
from percnb.config import PerceiverConfig
from percnb.encodings import fourier_features
from percnb.models import Block, Perceiver, PerceiverImage, PerceiverMLM, get_sequential_from_config

torch.set_num_threads(1)

TINY = dict(input_len=12, input_dim=6, latent_len=4, latent_dim=8, output_len=3, output_dim=8, ffw_latent=16,
            ffw_output=16, num_heads=2, num_layers=2, n_classes=5, seed=0)
IMAGE = dict(TINY, input_len=9, input_shape=(3, 3), input_channels=2, pos_encoding="fourier", fourier_bands=2)
TIED = dict(TINY, input_type="tokens", input_num_tokens=20, output_len=12, output_dim=6, decoder_reduction=None,
            n_classes=20, decoder_projection=False, tie_embeddings=True)


def tiny(**changes) -> PerceiverConfig:
    return PerceiverConfig(**{**TINY, **changes})


# --------------------------------------------------------------------------- widths and heads

def test_cross_channels_set_the_encoder_widths():
    model = Perceiver(tiny(cross_qk_channels=4, cross_v_channels=6, cross_heads=2))
    enc = model.encoder
    assert (enc.q.out_features, enc.kv.out_features, enc.proj.in_features, enc.proj.out_features) == (4, 10, 6, 8)


def test_cross_v_channels_default_to_cross_qk_channels():
    assert Perceiver(tiny(cross_qk_channels=4)).encoder.v_dim == 4


def test_self_qk_channels_narrow_queries_and_keys_not_values():
    block = Perceiver(tiny(self_qk_channels=4)).processors[0]
    assert block.qkv.out_features == 2 * 4 + 8 and block.proj.in_features == 8


def test_decoder_heads_and_channels_set_the_decoder():
    model = Perceiver(tiny(decoder_heads=4, decoder_qk_channels=4, decoder_v_channels=12))
    _, maps = model(torch.randn(2, 12, 6), return_attentions=True)
    assert maps[-1].shape == (2, 4, 3, 4) and maps[0].shape[1] == 1           # the encoder keeps cross_heads=1
    assert model.decoder.kv.out_features == 16 and model.decoder.proj.in_features == 12


def test_ffw_cross_sets_the_encoder_mlp_only():
    model = Perceiver(tiny(ffw_cross=24))
    assert model.encoder.mlp[0].out_features == 24 and model.processors[0].mlp[0].out_features == 16


def test_query_residual_false_drops_the_encoder_residual():
    with_residual, without = Perceiver(tiny()), Perceiver(tiny(query_residual=False))
    assert with_residual.encoder.add_residual and not without.encoder.add_residual
    x = torch.randn(2, 12, 6)
    assert not torch.allclose(with_residual(x), without(x))                   # same weights, another function


def test_default_widths_are_todays_model():
    # None everywhere: the same parameters, bit for bit, as before these fields existed
    plain = Perceiver(tiny())
    spelled = Perceiver(tiny(cross_qk_channels=8, cross_v_channels=8, self_qk_channels=8, decoder_heads=1,
                             decoder_qk_channels=8, decoder_v_channels=8, ffw_cross=16))
    a, b = plain.state_dict(), spelled.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("changes, message", [
    (dict(cross_qk_channels=5, cross_heads=2), "cross_qk_channels=5 is not divisible by cross_heads=2"),
    (dict(cross_v_channels=3, cross_heads=2), "cross_v_channels=3 is not divisible by cross_heads=2"),
    (dict(self_qk_channels=3), "self_qk_channels=3 is not divisible by num_heads=2"),
    (dict(decoder_heads=3), "output_dim=8 is not divisible by decoder_heads=3"),
    (dict(decoder_qk_channels=6, decoder_heads=4), "decoder_qk_channels=6 is not divisible by decoder_heads=4"),
    (dict(cross_qk_channels=0), "cross_qk_channels must be an int >= 1"),
    (dict(ffw_cross=-1), "ffw_cross must be an int >= 1"),
    (dict(query_residual=None), "query_residual must be True or False"),
])
def test_width_fields_are_validated(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny(**changes)


# --------------------------------------------------------------------------- weight sharing

def test_layers_per_block_repeats_the_processors():
    model = Perceiver(tiny(num_layers=6, layers_per_block=2))
    assert all(model.processors[i] is model.processors[i % 2] for i in range(6))
    assert model.processors[0] is not model.processors[1]
    assert model.num_parameters() == Perceiver(tiny(num_layers=2)).num_parameters()


def test_layers_per_block_stage_holds_the_models_weights():
    # a pipeline rank building processors 3 and 4 alone gets the very blocks of Perceiver(config)
    config = tiny(num_layers=6, layers_per_block=2)
    model, stage = Perceiver(config), get_sequential_from_config(config, [5, 6])
    for name, seq_index in (("processor_3", 1), ("processor_4", 0)):
        assert all(torch.equal(a, b) for a, b in zip(getattr(stage, name).block.state_dict().values(),
                                                     model.processors[seq_index].state_dict().values()))


@pytest.mark.parametrize("changes, message", [
    (dict(num_layers=3, layers_per_block=2), "num_layers=3 must be a multiple of layers_per_block=2"),
    (dict(share_weights=True, layers_per_block=2), "share_weights=True is layers_per_block=1"),
    (dict(layers_per_block=0), "layers_per_block must be an int >= 1"),
])
def test_layers_per_block_is_validated(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny(**changes)


def test_pipeline_keeps_repeated_layers_in_one_stage():
    from percnb.pipeline.planning import plan_pipeline
    with pytest.raises(ValueError, match="layers_per_block=2 makes processors 0, 2, ... one block"):
        plan_pipeline(tiny(num_layers=4, layers_per_block=2), 2, split_points=[0, 4])


# --------------------------------------------------------------------------- inputs

def test_input_projection_false_reads_pixels_and_features_as_they_are():
    config = PerceiverConfig(**{**IMAGE, "input_dim": 2 + 2 * (2 * 2 + 1), "input_projection": False})
    model = PerceiverImage(config)
    x = torch.randn(2, 2, 3, 3)
    embedded, _ = model.embed(x.flatten(2).transpose(1, 2))
    assert model.embed.input_proj is None
    assert torch.equal(embedded[..., :2], x.flatten(2).transpose(1, 2))


def test_input_projection_true_projects_even_an_equal_width():
    assert Perceiver(tiny(input_projection=True)).embed.input_proj.in_features == 6


@pytest.mark.parametrize("changes, message", [
    (dict(input_projection=False, input_dim=6), "input_dim=6 must equal input_channels \\+ the Fourier features = 12"),
    (dict(input_type="tokens", input_num_tokens=5, input_projection=True, pos_encoding="trainable",
          input_shape=None, input_channels=None, fourier_bands=6), "applies to raw inputs only"),
])
def test_input_projection_is_validated(changes, message):
    with pytest.raises(ValueError, match=message):
        PerceiverConfig(**{**IMAGE, **changes})


def test_fourier_sine_only_keeps_coordinates_and_sines():
    full, sines = fourier_features((3, 4), 2), fourier_features((3, 4), 2, sine_only=True)
    assert torch.equal(sines, full[:, :2 + 4])
    config = PerceiverConfig(**{**IMAGE, "fourier_sine_only": True})
    assert config.fourier_dim == 2 * (2 + 1) == PerceiverImage(config).embed.fourier.shape[1]


def test_fourier_sine_only_needs_fourier_features():
    with pytest.raises(ValueError, match="fourier_sine_only is only used with pos_encoding='fourier'"):
        tiny(fourier_sine_only=True)


def test_pos_concat_dim_concatenates_a_trainable_table():
    config = PerceiverConfig(**{**IMAGE, "pos_encoding": "trainable", "fourier_bands": 6, "pos_concat_dim": 2})
    model = PerceiverImage(config)
    embedded, _ = model.embed(torch.randn(2, 9, 2))
    assert model.embed.input_proj.out_features == 4 and model.embed.pos_emb.shape == (9, 2)
    assert torch.equal(embedded[..., 4:], model.embed.pos_emb.expand(2, -1, -1))


def test_pos_concat_dim_is_validated():
    with pytest.raises(ValueError, match="pos_concat_dim=6 concatenates a trainable table"):
        tiny(pos_concat_dim=6)


# --------------------------------------------------------------------------- tied embeddings

def test_tied_head_reads_logits_off_the_input_embedding():
    # the same function as a separate Linear head holding a copy of the embedding matrix and the bias
    tied = PerceiverMLM(PerceiverConfig(**TIED))
    with torch.no_grad():
        tied.head_bias.normal_()
    untied = PerceiverMLM(tied.config.replace(tie_embeddings=False, decoder_projection=True))
    state = dict(tied.state_dict(), **{"head.weight": tied.embed.token_embedding.weight,
                                       "head.bias": tied.state_dict()["head_bias"]})
    state.pop("head_bias")
    untied.load_state_dict(state)
    ids = torch.randint(0, 20, (2, 12))
    assert tied.head is None and torch.equal(tied(ids), untied(ids))
    assert tied.num_parameters() == untied.num_parameters() - 20 * 6         # one matrix, counted once


def test_tie_embeddings_is_validated():
    with pytest.raises(ValueError, match="tie_embeddings reads the logits off the input embedding matrix"):
        tiny(tie_embeddings=True, decoder_projection=False)


# --------------------------------------------------------------------------- fast == textbook

@pytest.mark.parametrize("self_attention, kv_dim, qk, v, regroups", [
    (True, 8, 4, 8, False),
    (False, 16, 4, 8, False),                # keys and values projected, qk != v
    (False, 3, 4, 12, True),                 # few input channels: the input-space regrouping with qk != v
    (False, 3, 8, 4, True),
])
@pytest.mark.parametrize("masked", [False, True])
def test_fast_block_with_other_widths_equals_textbook(self_attention, kv_dim, qk, v, regroups, masked):
    torch.manual_seed(0)
    block = Block(kv_dim, 8, 2, 16, add_residual=True, self_attention=self_attention, qk_dim=qk, v_dim=v)
    q = torch.randn(3, 4, 8, requires_grad=True)
    kv = q if self_attention else torch.randn(3, 40, kv_dim, requires_grad=True)
    mask = key_mask(3, 40, empty_sample=True) if masked and not self_attention else None
    if not self_attention:
        assert fast.input_space_is_cheaper(block, 4, 40) == regroups
    inputs = [q] if self_attention else [q, kv]
    results = []
    for use_fast in (True, False):
        block.fast = use_fast
        results.append(outputs_and_grads(lambda: block(kv, q, mask)[0], *inputs, *block.parameters()))
    names = ["out", "q.grad", "kv.grad"][:len(inputs) + 1] + [n for n, _ in block.named_parameters()]
    assert_all_close(*results, names)


@pytest.mark.parametrize("config", [
    PerceiverConfig(**{**TIED, "cross_qk_channels": 4, "cross_v_channels": 8, "self_qk_channels": 4,
                       "decoder_heads": 2, "decoder_qk_channels": 4, "ffw_cross": 8, "query_residual": False,
                       "num_layers": 4, "layers_per_block": 2}),
    PerceiverConfig(**{**IMAGE, "input_projection": False, "fourier_sine_only": True,
                       "input_dim": 2 + 2 * 3, "cross_qk_channels": 4, "decoder_heads": 2}),
    PerceiverConfig(**{**IMAGE, "pos_encoding": "trainable", "fourier_bands": 6, "pos_concat_dim": 2}),
], ids=["tokens-tied", "fourier-unprojected", "learned-concat"])
def test_fast_and_textbook_perceivers_agree_with_the_new_options(config):
    torch.manual_seed(0)
    model = (PerceiverMLM if config.input_type == "tokens" else Perceiver)(config)
    x = torch.randint(0, 20, (3, 12)) if config.input_type == "tokens" else torch.randn(3, 9, 2)
    mask = key_mask(3, x.shape[1], empty_sample=True)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for use_fast in (True, False):
        model.fast = use_fast
        results.append(outputs_and_grads(lambda: model(x, mask), *params))
    assert_all_close(*results, ["logits"] + [n for n, p in model.named_parameters() if p.requires_grad])
