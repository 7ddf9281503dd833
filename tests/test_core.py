"""Unit tests of percnb's core: config, encodings, blocks and models."""
import math

import pytest
import torch

from percnb import fast
from percnb.config import PerceiverConfig
from percnb.data.text import IGNORE
from percnb.encodings import build_position_encoding, fourier_features, sinusoid_encoding
from percnb.models import (
    Block,
    DecoderBlock,
    Embeddings,
    EncoderBlock,
    Perceiver,
    PerceiverImage,
    PerceiverMLM,
    ProcessorBlock,
    attention,
    get_sequential_from_config,
    image_config,
    model_key,
)

torch.set_num_threads(1)

TINY = dict(input_len=12, input_dim=6, latent_len=4, latent_dim=8, output_len=3, output_dim=8, ffw_latent=16,
            ffw_output=16, num_heads=2, num_layers=2, n_classes=5, seed=0)
MAX_GAP = 1e-5  # fp32 fused kernels vs explicit softmax: differences are rounding only


def tiny(**changes) -> PerceiverConfig:
    return PerceiverConfig(**{**TINY, **changes})


def tokens_config(**changes) -> PerceiverConfig:
    base = dict(TINY, input_type="tokens", input_num_tokens=20, output_len=12, decoder_reduction=None,
                n_classes=20)
    return PerceiverConfig(**{**base, **changes})


# --------------------------------------------------------------------------- config

def test_config_json_round_trip():
    config = image_config(1, 8, 8, 10, max_resolution=(8, 8), share_weights=True)
    again = PerceiverConfig.from_json(config.to_json())
    assert again == config and isinstance(again.input_shape, tuple)


def test_config_replace_validates():
    with pytest.raises(ValueError, match="latent_dim=10 is not divisible by num_heads=4"):
        tiny().replace(latent_dim=10, num_heads=4)


@pytest.mark.parametrize("field, value, message", [
    ("latent_dim", 7, "latent_dim=7 is not divisible by num_heads=2"),
    ("input_len", 0, "input_len must be an int >= 1, got 0"),
    ("num_layers", True, "num_layers must be an int"),
    ("input_type", "image", "input_type must be one of"),
    ("decoder_reduction", "median", "decoder_reduction must be one of"),
    ("pos_encoding", "rotary", "pos_encoding must be one of"),
    ("dropout", 1.0, "dropout must be a float in"),
    ("pos_init_std", -1.0, "pos_init_std must be a finite float > 0"),
    ("token_init_std", 0.0, "token_init_std must be a finite float > 0"),
    ("queries_from_latents", "yes", "queries_from_latents must be True or False"),
    ("decoder_residual", 1, "decoder_residual must be True or False"),
    ("n_classes", None, "decoder_projection=True needs n_classes"),
    ("input_num_tokens", 5, "input_num_tokens=5 is only used with input_type='tokens'"),
])
def test_config_rejects_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        tiny(**{field: value})


def test_config_tokens_need_vocabulary():
    with pytest.raises(ValueError, match="needs input_num_tokens"):
        tiny(input_type="tokens")


def test_config_fourier_needs_matching_grid():
    with pytest.raises(ValueError, match="needs input_shape"):
        tiny(pos_encoding="fourier")
    with pytest.raises(ValueError, match=r"input_shape=\(3, 3\) has 9 positions but input_len=12"):
        tiny(pos_encoding="fourier", input_shape=(3, 3))


def test_config_unknown_field_in_dict():
    with pytest.raises(ValueError, match="unknown PerceiverConfig field"):
        PerceiverConfig.from_dict({**TINY, "latents": 3})


# --------------------------------------------------------------------------- encodings

def test_sinusoid_matches_formula():
    table = sinusoid_encoding(10, 6)
    p, i = 7, 2  # channel 2i = sin(p / 10000^(2i/d)), 2i+1 = cos
    assert table[p, 2 * i] == pytest.approx(math.sin(p / 10000 ** (2 * i / 6)), abs=1e-6)
    assert table[p, 2 * i + 1] == pytest.approx(math.cos(p / 10000 ** (2 * i / 6)), abs=1e-6)


def test_fourier_features_layout():
    feats = fourier_features((4, 5), num_bands=3)
    assert feats.shape == (20, 2 * (2 * 3 + 1))
    assert torch.equal(feats[0, :2], torch.tensor([-1.0, -1.0]))      # raw coordinates first
    assert torch.equal(feats[-1, :2], torch.tensor([1.0, 1.0]))
    # last band of axis 0 is the Nyquist frequency 4 / 2 = 2: sin(pi * 2 * x)
    x = feats[:, 0]
    assert torch.allclose(feats[:, 2 + 2], torch.sin(math.pi * 2 * x), atol=1e-6)


def test_build_position_encoding_kinds():
    config = tiny(pos_encoding="fourier", input_len=12, input_shape=(3, 4))
    trainable = build_position_encoding("trainable", config, 12, 6)
    fixed = build_position_encoding("sinusoid", config, 12, 6)
    fourier = build_position_encoding("fourier", config, 12, None)
    assert trainable.requires_grad and not fixed.requires_grad and not fourier.requires_grad
    assert trainable.shape == fixed.shape == (12, 6) and fourier.shape == (12, config.fourier_dim)
    assert trainable.std().item() == pytest.approx(0.02, rel=0.5)


def test_build_position_encoding_rejects_unknown_type():
    with pytest.raises(ValueError, match="position_encoding_type must be one of"):
        build_position_encoding("learned", tiny(), 12, 6)


# --------------------------------------------------------------------------- attention and Block

def qkv(batch=3, heads=2, n=4, m=9, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, d, generator=g, requires_grad=True) for length in (n, m, m)]


def test_attention_rows_sum_to_one():
    _, weights = attention(*qkv(), need_weights=True)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 2, 4), atol=1e-6)


def test_masked_keys_get_zero_weight():
    mask = torch.rand(3, 9, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[:, 0] = True
    _, weights = attention(*qkv(), mask=mask, need_weights=True)
    assert torch.all(weights.masked_select(~mask[:, None, None, :].expand_as(weights)) == 0)


def textbook_attention(q, k, v, mask):
    return attention(q, k, v, mask)[0]


@pytest.mark.parametrize("attend", [textbook_attention, fast.attention], ids=["textbook", "fused"])
def test_masked_values_cannot_change_output(attend):
    q, k, v = qkv()
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[:, 5:] = False
    out = attend(q, k, v, mask)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 5:] += 100.0
    v2[:, :, 5:] -= 100.0
    assert torch.allclose(out, attend(q, k2, v2, mask), atol=1e-6)


@pytest.mark.parametrize("attend", [textbook_attention, fast.attention], ids=["textbook", "fused"])
def test_all_masked_sample_stays_finite(attend):
    q, k, v = qkv()
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1] = False
    out = attend(q, k, v, mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.all(out[1] == 0)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_all_masked_sample_gets_zero_weights():
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1] = False
    _, weights = attention(*qkv(), mask=mask, need_weights=True)
    assert torch.all(weights[1] == 0) and torch.allclose(weights[0].sum(-1), torch.ones(2, 4))


def test_block_shapes():
    block = Block(kv_dim=6, q_dim=8, num_heads=4, ffw_dim=16)
    out, weights = block(torch.randn(2, 11, 6), torch.randn(2, 3, 8), need_weights=True)
    assert out.shape == (2, 3, 8) and weights.shape == (2, 4, 3, 11)


def test_block_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="q_dim=10 is not divisible by num_heads=4"):
        Block(6, 10, 4, 16)


Q_SHAPE, KV_SHAPE = r"q must have shape \(batch, q_len, q_dim=8\)", r"kv must have shape \(batch=2, kv_len, kv_dim=6\)"


@pytest.mark.parametrize("kv, q, mask, message", [
    (torch.randn(2, 11, 6), torch.randn(2, 3, 7), None, Q_SHAPE + r", got shape \(2, 3, 7\)"),         # q too wide
    (torch.randn(2, 11, 6), torch.randn(3, 8), None, Q_SHAPE + r", got shape \(3, 8\)"),               # no batch axis
    (torch.randn(2, 11, 5), torch.randn(2, 3, 8), None, KV_SHAPE + r", got shape \(2, 11, 5\)"),      # kv too narrow
    (torch.randn(3, 11, 6), torch.randn(2, 3, 8), None, KV_SHAPE + r", got shape \(3, 11, 6\)"),      # other batch
    (torch.randn(2, 11, 6), torch.randn(2, 3, 8), torch.ones(2, 10, dtype=torch.bool),
     r"attn_mask must have shape \(batch, input_len\) = \(2, 11\), got shape \(2, 10\)"),
])
@pytest.mark.parametrize("need_weights", [False, True])
def test_block_names_the_argument_whose_shape_is_wrong(kv, q, mask, message, need_weights):
    block = Block(kv_dim=6, q_dim=8, num_heads=2, ffw_dim=16)
    with pytest.raises(ValueError, match=message):
        block(kv, q, mask, need_weights=need_weights)


# --------------------------------------------------------------------------- sequential blocks

def test_sequential_blocks_pass_seed_tuples():
    config = tiny()
    x = torch.randn(2, 12, 6)
    emb = Embeddings(config)(x)
    assert [t.shape if t is not None else None for t in emb] == [(2, 12, 6), None, (2, 4, 8), (2, 3, 8)]
    latent, out_array, att = EncoderBlock(config)(emb)
    assert latent.shape == (2, 4, 8) and out_array.shape == (2, 3, 8) and att is None
    latent, out_array, att = ProcessorBlock(config)((latent, out_array, []))
    assert latent.shape == (2, 4, 8) and att[0].shape == (2, 2, 4, 4)
    logits, att = DecoderBlock(config)(latent, out_array, att)
    assert logits.shape == (2, 5) and att[1].shape == (2, 1, 3, 4)


def test_sequential_runs_as_nn_sequential():
    config = tiny()
    seq = get_sequential_from_config(config)
    logits, att = seq(torch.randn(2, 12, 6))
    assert logits.shape == (2, 5) and att is None
    assert len(seq) == config.num_layers + 3


@pytest.mark.parametrize("config", [
    tiny(), tiny(share_weights=True, num_layers=3), tiny(decoder_type="latent_pool"),
    tokens_config(pos_encoding="sinusoid", latents_from_inputs=True, input_dim=8, queries_from_latents=True,
                  decoder_residual=True),
    image_config(2, 4, 3, 5, input_dim=8, latent_dim=8, output_dim=8, num_heads=2, num_layers=1)])
def test_sequential_pieces_hold_the_models_weights_and_compute_its_logits(config):
    model, sequential = Perceiver(config).eval(), get_sequential_from_config(config).eval()
    state = {model_key(k): v for k, v in sequential.state_dict().items()}
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    g = torch.Generator().manual_seed(0)
    if config.input_type == "tokens":
        x = torch.randint(0, config.input_num_tokens, (3, config.input_len), generator=g)
    else:
        x = torch.randn(3, config.input_len, config.input_channels or config.input_dim, generator=g)
    mask = torch.rand(3, config.input_len, generator=g) > 0.3
    logits, _ = sequential((x, mask))
    assert torch.equal(logits, model(x, mask))


def test_subset_of_modules_has_the_full_models_weights():
    config = tiny(num_layers=3)
    full = get_sequential_from_config(config)
    part = get_sequential_from_config(config, indices=[2, 3, 5])
    full_state = full.state_dict()
    for name, value in part.state_dict().items():
        assert torch.equal(value, full_state[name]), name


# --------------------------------------------------------------------------- models

@pytest.mark.parametrize("reduction", ["mean", "max", "sum", "first", "last", "eot", None])
@pytest.mark.parametrize("residual, projection", [(False, True), (True, False)])
def test_perceiver_output_shapes(reduction, residual, projection):
    config = tiny(decoder_reduction=reduction, decoder_residual=residual, decoder_projection=projection,
                  output_len=12 if reduction == "eot" else 3)
    logits, maps = Perceiver(config)(torch.randn(2, 12, 6), return_attentions=True)
    width = 5 if projection else 8
    assert logits.shape == ((2, width) if reduction else (2, 3, width))
    queries = 1 if reduction == "eot" else 3
    assert [m.shape for m in maps] == [(2, 1, 4, 12), (2, 2, 4, 4), (2, 2, 4, 4), (2, 1, queries, 4)]


def test_eot_reduction_picks_last_unmasked_position():
    config = tiny(decoder_reduction="eot", output_len=12, decoder_projection=False, pos_encoding="none")
    model = Perceiver(config).eval()
    x = torch.randn(2, 12, 6)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 7:] = False
    eot = model(x, mask)
    all_outputs = Perceiver(config.replace(decoder_reduction=None))
    all_outputs.load_state_dict(model.state_dict())
    full = all_outputs(x, mask)
    assert torch.allclose(eot[0], full[0, 6], atol=1e-6) and torch.allclose(eot[1], full[1, 11], atol=1e-6)


def test_fast_and_explicit_perceiver_agree_with_mask():
    model = Perceiver(tiny())
    x = torch.randn(3, 12, 6)
    mask = torch.rand(3, 12) > 0.3
    fast = model(x, mask.long())
    slow, _ = model(x, mask, return_attentions=True)
    assert torch.allclose(fast, slow, atol=MAX_GAP)


def test_output_array_replaces_learned_queries():
    model = Perceiver(tiny(decoder_reduction=None))
    logits = model(torch.randn(2, 12, 6), output_array=torch.randn(2, 7, 8))
    assert logits.shape == (2, 7, 5)


def test_cross_attention_without_positions_is_permutation_invariant():
    model = Perceiver(tiny(pos_encoding="none")).eval()
    x = torch.randn(2, 12, 6)
    mask = torch.rand(2, 12) > 0.3
    reference = model(x, mask)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        perm = torch.randperm(12, generator=g)
        assert torch.allclose(model(x[:, perm], mask[:, perm]), reference, atol=1e-5)


def test_positions_break_permutation_invariance():
    model = Perceiver(tiny(pos_encoding="sinusoid")).eval()
    x = torch.randn(2, 12, 6)
    assert not torch.allclose(model(x[:, torch.arange(11, -1, -1)]), model(x), atol=1e-4)


def test_masked_inputs_cannot_change_perceiver_output():
    model = Perceiver(tiny()).eval()
    x = torch.randn(2, 12, 6)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 8:] = False
    changed = x.clone()
    changed[:, 8:] = torch.randn(2, 4, 6) * 50
    assert torch.allclose(model(x, mask), model(changed, mask), atol=1e-6)


@pytest.mark.parametrize("need", [False, True])
def test_all_masked_sample_gives_finite_outputs_and_gradients(need):
    model = Perceiver(tiny())
    mask = torch.ones(2, 12)
    mask[1] = 0
    out = model(torch.randn(2, 12, 6), mask, return_attentions=need)
    logits = out[0] if need else out
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = PerceiverImage(image_config(1, 4, 4, 3, input_dim=8, latent_dim=8, latent_len=4, output_dim=8,
                                        ffw_latent=16, ffw_output=16, num_heads=2, num_layers=1))
    path = tmp_path / "model.pt"
    model.save(str(path))
    payload = torch.load(path, weights_only=True)
    assert payload["class"] == "PerceiverImage"
    again = Perceiver.load(str(path))
    assert type(again) is PerceiverImage and again.config == model.config
    images = torch.rand(2, 1, 4, 4)
    assert torch.equal(again(images), model.eval()(images))


def test_load_rejects_wrong_class(tmp_path):
    path = tmp_path / "model.pt"
    Perceiver(tiny()).save(str(path))
    with pytest.raises(ValueError, match="PerceiverMLM.load cannot return"):
        PerceiverMLM.load(str(path))


def test_same_seed_same_init_different_seed_different_init():
    a, b, c = Perceiver(tiny()), Perceiver(tiny()), Perceiver(tiny(seed=1))
    pairs = list(zip(a.state_dict().values(), b.state_dict().values(), c.state_dict().values()))
    assert all(torch.equal(x, y) for x, y, _ in pairs)
    assert not all(torch.equal(x, z) for x, _, z in pairs)


def test_init_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Perceiver(tiny())
    assert torch.equal(torch.rand(3), expected)


def test_weight_sharing_reuses_one_processor():
    shared = Perceiver(tiny(share_weights=True, num_layers=4))
    separate = Perceiver(tiny(num_layers=4))
    blocks = list(shared.processors)
    assert len(blocks) == 4 and all(b is blocks[0] for b in blocks)
    per_block = sum(p.numel() for p in blocks[0].parameters())
    assert separate.num_parameters() - shared.num_parameters() == 3 * per_block


def test_num_parameters_counts_fixed_tables_as_non_trainable():
    model = Perceiver(tiny(pos_encoding="sinusoid"))
    assert model.num_parameters() - model.num_parameters(include_non_trainable=False) == 12 * 6


def test_perceiver_image_and_mlm_shapes():
    image = PerceiverImage(image_config(3, 4, 5, 7, input_dim=8, latent_dim=8, latent_len=4, output_dim=8,
                                        ffw_latent=16, ffw_output=16, num_heads=2, num_layers=1))
    logits, maps = image(torch.rand(2, 3, 4, 5), return_attentions=True)
    assert logits.shape == (2, 7) and maps[0].shape == (2, 1, 4, 20)
    mlm = PerceiverMLM(tokens_config())
    logits, maps = mlm(torch.randint(0, 20, (2, 12)), return_attentions=True)
    assert logits.shape == (2, 12, 20) and maps[-1].shape == (2, 1, 12, 4)


def _overfit(model, inputs, targets, steps=150):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_classifier_overfits_a_fixed_batch():
    torch.manual_seed(0)
    losses = _overfit(Perceiver(tiny()), torch.randn(8, 12, 6), torch.randint(0, 5, (8,)))
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_tiny_mlm_overfits_a_fixed_batch():
    torch.manual_seed(0)
    tokens = torch.randint(0, 20, (4, 12))
    # 200 steps sat on the knee of the curve (loss 3.0 -> 0.33); by 300 it is at 0.01
    losses = _overfit(PerceiverMLM(tokens_config(latent_len=12)), tokens, tokens, steps=300)
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


# --------------------------------------------------------------------------- bad inputs

@pytest.fixture(scope="module")
def raw_model():
    return Perceiver(tiny())


@pytest.mark.parametrize("make_input, error, message", [
    (lambda: torch.randn(12, 6), ValueError, r"raw input_array must be \(batch, input_len, 6\), got shape \(12, 6\)"),
    (lambda: torch.randn(2, 12, 7), ValueError, "input_array has 7 features per position but the config expects 6"),
    (lambda: torch.randn(2, 10, 6), ValueError, "input_array has 10 positions but the trainable position"),
    (lambda: torch.ones(2, 12, 6, dtype=torch.long), TypeError, "needs a floating-point input_array, got torch.int64"),
    (lambda: [[0.0] * 6] * 12, TypeError, "input_array must be a torch.Tensor, got list"),
    (lambda: torch.randn(0, 12, 6), ValueError, "input_array has an empty batch"),
])
def test_bad_raw_inputs_raise(raw_model, make_input, error, message):
    with pytest.raises(error, match=message):
        raw_model(make_input())


@pytest.mark.parametrize("mask, error, message", [
    (torch.ones(2, 11), ValueError, r"attention_mask must have shape \(batch, input_len\) = \(2, 12\)"),
    (torch.full((2, 12), 2.0), ValueError, "attention_mask must hold only 0/1"),
    ([[1] * 12] * 2, TypeError, "attention_mask must be a torch.Tensor"),
])
def test_bad_masks_raise(raw_model, mask, error, message):
    with pytest.raises(error, match=message):
        raw_model(torch.randn(2, 12, 6), mask)


def test_bad_output_array_raises(raw_model):
    with pytest.raises(ValueError, match=r"output_array must be \(batch=2, queries, output_dim=8\)"):
        raw_model(torch.randn(2, 12, 6), output_array=torch.randn(2, 3, 5))


def test_bad_return_attentions_raises(raw_model):
    with pytest.raises(TypeError, match="return_attentions must be True or False"):
        raw_model(torch.randn(2, 12, 6), return_attentions="yes")


@pytest.mark.parametrize("tokens, error, message", [
    (torch.randint(0, 20, (2, 12)).float(), TypeError, "needs integer token ids"),
    (torch.full((2, 12), 20), ValueError, r"token ids must be in \[0, input_num_tokens=20\)"),
    (torch.full((2, 12), -1), ValueError, "token ids must be in"),
    (torch.randint(0, 20, (2, 12, 1)), ValueError, r"token input_array must be \(batch, input_len\)"),
])
def test_bad_tokens_raise(tokens, error, message):
    with pytest.raises(error, match=message):
        PerceiverMLM(tokens_config())(tokens)


def test_bad_image_shape_raises():
    model = PerceiverImage(image_config(1, 4, 4, 3, input_dim=8, latent_dim=8, output_dim=8, num_heads=2,
                                        num_layers=1))
    with pytest.raises(ValueError, match=r"images must be \(batch, channels, height, width\) = \(batch, 1, 4, 4\)"):
        model(torch.rand(2, 4, 4))


def test_mlm_rejects_pooled_config():
    with pytest.raises(ValueError, match="PerceiverMLM needs input_type='tokens' and decoder_reduction=None"):
        PerceiverMLM(tiny())


def test_self_attention_block_rejects_other_kv():
    block = Block(8, 8, 2, 16, self_attention=True)
    with pytest.raises(ValueError, match="a self-attention Block reads its own input"):
        block(torch.randn(1, 3, 8), torch.randn(1, 3, 8))


def test_latent_pool_decoder_pools_the_latents():
    config = tiny(decoder_type="latent_pool", decoder_reduction="mean")
    model = Perceiver(config).eval()
    logits, maps = model(torch.randn(2, 12, 6), return_attentions=True)
    assert logits.shape == (2, 5) and len(maps) == 1 + config.num_layers   # no decoder map
    assert model.queries is None and model.decoder is None
    with pytest.raises(ValueError, match="output_array .* needs decoder_type='attention'"):
        model(torch.randn(2, 12, 6), output_array=torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="decoder_type='latent_pool' pools the latents"):
        tiny(decoder_type="latent_pool", decoder_reduction=None)


# --------------------------------------------------------------------------- latents from inputs, MLM positions

def test_latents_from_inputs_add_each_windows_mean_embedding():
    config = tokens_config(latents_from_inputs=True, input_dim=8, latent_len=4)
    emb = Embeddings(config)
    tokens = torch.randint(0, 20, (2, 12))
    x, _, latents, _ = emb(tokens)
    expected = emb.latent_array + x.view(2, 4, 3, 8).mean(2)
    assert torch.allclose(latents, expected, atol=1e-6)


def test_latents_from_inputs_ignore_masked_inputs():
    model = PerceiverMLM(tokens_config(latents_from_inputs=True, input_dim=8, latent_len=4)).eval()
    tokens = torch.randint(0, 20, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 6:] = False                                  # sample 0: windows 2 and 3 hold only padding
    other = tokens.clone()
    other[0, 6:] = (tokens[0, 6:] + 7) % 20
    for weights in (False, True):
        a, b = model(tokens, mask, return_attentions=weights), model(other, mask, return_attentions=weights)
        a, b = (a[0], b[0]) if weights else (a, b)
        assert torch.allclose(a, b, atol=1e-5)
    mask[1] = False                                      # an all-masked sample stays finite
    model(tokens, mask).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("changes, message", [
    (dict(latent_len=5), "input_len=12 must be divisible by latent_len=5"),
    (dict(latent_len=4, input_dim=6), "input_dim=6 must equal latent_dim=8"),
])
def test_latents_from_inputs_config_checks(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny(latents_from_inputs=True, **changes)


def test_mlm_positions_equal_full_decoding_picked():
    model = PerceiverMLM(tokens_config()).eval()
    tokens = torch.randint(0, 20, (3, 12))
    positions = torch.tensor([[0, 5, 11], [2, 2, 3], [7, 1, 0]])
    full = model(tokens)
    picked = model(tokens, positions=positions)
    assert picked.shape == (3, 3, 20)
    assert torch.allclose(picked, full.gather(1, positions[..., None].expand(-1, -1, 20)), atol=1e-5)


@pytest.mark.parametrize("positions, error, message", [
    (torch.tensor([[0, 12]] * 2), ValueError, r"positions must be in \[0, 12\)"),
    (torch.zeros(2, 2), TypeError, "positions must be a \\(batch, k\\) integer tensor"),
    (torch.zeros(3, 2, dtype=torch.long), ValueError, r"one row per sample \(2\)"),
])
def test_mlm_rejects_bad_positions(positions, error, message):
    model = PerceiverMLM(tokens_config())
    with pytest.raises(error, match=message):
        model(torch.randint(0, 20, (2, 12)), positions=positions)


def test_masked_lm_step_scores_only_masked_positions():
    from percnb.train import masked_lm_step
    model = PerceiverMLM(tokens_config()).eval()
    tokens = torch.randint(0, 20, (4, 12))
    targets = torch.full_like(tokens, IGNORE)
    targets[0, [1, 4]] = tokens[0, [1, 4]]
    targets[2, 7] = 3
    loss, correct, counted = masked_lm_step(model, (tokens, targets))
    full = model(tokens)
    expected = torch.nn.functional.cross_entropy(full.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    assert counted == 3 and torch.allclose(loss, expected, atol=1e-5)
    assert correct == int(((full.argmax(-1) == targets) & (targets != IGNORE)).sum())


def test_half_precision_save_is_half_the_size_and_loads_the_rounded_model(tmp_path):
    model = PerceiverMLM(tokens_config(input_dim=64, latent_dim=64, output_dim=64, ffw_latent=128, ffw_output=128))
    model.save(tmp_path / "full.pt")
    model.save(tmp_path / "half.pt", dtype=torch.float16)
    assert (tmp_path / "half.pt").stat().st_size < 0.6 * (tmp_path / "full.pt").stat().st_size
    loaded = Perceiver.load(tmp_path / "half.pt")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(p.detach().half().float(), q.detach()), name
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        model.save(tmp_path / "bad.pt", dtype=torch.int8)


def test_queries_from_latents_add_each_querys_window_latent():
    config = tokens_config(queries_from_latents=True, decoder_residual=True, latent_len=4)
    model = PerceiverMLM(config).eval()
    tokens = torch.randint(0, 20, (2, 12))
    x, _ = model.embed(tokens)
    latents, _ = model.encoder(x, model.latents.expand(2, -1, -1))
    for block in model.processors:
        latents, _ = block(latents, latents)
    expected, _ = model.decoder(latents, model.queries.expand(2, -1, -1) + latents.repeat_interleave(3, dim=1))
    expected = model.head(expected)
    assert torch.allclose(model(tokens), expected, atol=1e-5)
    positions = torch.tensor([[11, 0], [4, 5]])
    picked = model(tokens, positions=positions)
    assert torch.allclose(picked, expected.gather(1, positions[..., None].expand(-1, -1, 20)), atol=1e-5)


@pytest.mark.parametrize("changes, message", [
    (dict(), "needs decoder_type='attention' and decoder_residual=True"),
    (dict(decoder_residual=True, latent_len=5), "output_len=3 must be divisible by latent_len=5"),
    (dict(decoder_residual=True, output_dim=16, output_len=4), "output_dim=16 must equal latent_dim=8"),
])
def test_queries_from_latents_config_checks(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny(queries_from_latents=True, **changes)


def test_queries_from_latents_need_positions_for_custom_queries():
    model = Perceiver(tiny(queries_from_latents=True, decoder_residual=True, output_len=4, latent_len=4))
    with pytest.raises(ValueError, match="needs the positions of 2 custom queries"):
        model(torch.randn(2, 12, 6), output_array=torch.randn(2, 2, 8))


@pytest.mark.parametrize("pos_encoding, expected", [("trainable", 0.02), ("sinusoid", 0.5 ** 0.5), ("none", 1.0)])
def test_token_embeddings_start_on_the_scale_of_their_positions(pos_encoding, expected):
    emb = Embeddings(tokens_config(input_num_tokens=500, input_dim=64, pos_encoding=pos_encoding))
    assert emb.token_embedding.weight.std().item() == pytest.approx(expected, rel=0.05)
    custom = Embeddings(tokens_config(input_num_tokens=500, input_dim=64, token_init_std=0.3))
    assert custom.token_embedding.weight.std().item() == pytest.approx(0.3, rel=0.05)
