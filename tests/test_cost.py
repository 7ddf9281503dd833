"""percnb.cost predicts from a config's shapes alone: parameters exactly as the model counts them, matmul
FLOPs exactly as torch.utils.flop_counter counts the textbook code, and the activations autograd saves.
Peak memory against a measured process is checked by benchmarks/cost_check.py (a measurement, not a test)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from percnb import cost, fast, hub
from percnb.config import PerceiverConfig, image_config, mlm_config
from percnb.models import Perceiver, PerceiverImage, PerceiverMLM

torch.set_num_threads(1)

CONFIGS = {
    "default": PerceiverConfig(),
    "image": image_config(1, 8, 8, 10, input_dim=32, latent_dim=32, output_dim=32, ffw_latent=64, ffw_output=64),
    "mlm": mlm_config(32, 64, input_dim=32, latent_dim=32, output_dim=32, ffw_latent=64, ffw_output=64),
    "mlm eot": mlm_config(32, 64, input_dim=32, latent_dim=32, output_dim=32, decoder_reduction="eot",
                          queries_from_latents=False),
    "shared": PerceiverConfig(share_weights=True, num_layers=3),
    "latent pool": PerceiverConfig(decoder_type="latent_pool"),
    "projected raw": PerceiverConfig(input_channels=3, pos_encoding="sinusoid"),
    "per-query outputs": PerceiverConfig(decoder_reduction=None, output_len=5, decoder_residual=True),
    "no head": PerceiverConfig(decoder_projection=False, n_classes=None),
    "long input": PerceiverConfig(input_len=256, latent_len=4, pos_encoding="none"),
    # the options of DeepMind's released models (issue 18), each on its own
    "cross widths": PerceiverConfig(cross_qk_channels=4, cross_v_channels=6, cross_heads=2),
    "cross widths, input space": PerceiverConfig(input_len=256, pos_encoding="none", cross_qk_channels=4,
                                                 cross_v_channels=12, cross_heads=2),
    "self q/k width": PerceiverConfig(self_qk_channels=4),
    "decoder widths": PerceiverConfig(decoder_heads=4, decoder_qk_channels=4, decoder_v_channels=12),
    "ffw cross": PerceiverConfig(ffw_cross=7),
    "no query residual": PerceiverConfig(query_residual=False),
    "layers per block": PerceiverConfig(num_layers=4, layers_per_block=2),
    "unprojected fourier": PerceiverConfig(input_len=9, input_shape=(3, 3), input_channels=2, pos_encoding="fourier",
                                           fourier_bands=2, input_dim=12, input_projection=False),
    "sine-only fourier": PerceiverConfig(input_len=9, input_shape=(3, 3), input_channels=2, pos_encoding="fourier",
                                         fourier_bands=2, fourier_sine_only=True),
    "projection forced": PerceiverConfig(input_projection=True),
    "pos concat": PerceiverConfig(input_channels=3, pos_concat_dim=3),
    "tied embeddings": PerceiverConfig(input_type="tokens", input_num_tokens=20, input_len=12, output_len=12,
                                       decoder_reduction=None, n_classes=20, decoder_projection=False,
                                       tie_embeddings=True),
    "tied embeddings eot": PerceiverConfig(input_type="tokens", input_num_tokens=20, input_len=12, output_len=12,
                                           decoder_reduction="eot", n_classes=20, decoder_projection=False,
                                           tie_embeddings=True),
}


def example_input(c: PerceiverConfig, batch: int) -> torch.Tensor:
    if c.input_type == "tokens":
        return torch.randint(0, c.input_num_tokens, (batch, c.input_len))
    return torch.randn(batch, c.input_len, c.input_channels or c.input_dim)


def counted_flops(c: PerceiverConfig, batch: int):
    model = Perceiver(c, fast=False)          # the textbook code: plain matmuls, which the counter knows
    with FlopCounterMode(display=False) as forward:
        out = model(example_input(c, batch))
    with FlopCounterMode(display=False) as backward:
        out.square().sum().backward()
    return forward.get_total_flops(), forward.get_total_flops() + backward.get_total_flops()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameters_equal_the_models_count(name):
    c = CONFIGS[name]
    model = Perceiver(c)
    assert cost.parameters(c) == model.num_parameters()
    assert cost.parameters(c, trainable_only=True) == model.num_parameters(include_non_trainable=False)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flops_equal_torchs_flop_counter(name):
    c = CONFIGS[name]
    inference, train = counted_flops(c, batch=2)
    assert cost.flops(c, batch=2, train=False) == inference
    assert cost.flops(c, batch=2, train=True) == train


@settings(max_examples=25, deadline=None)
@given(input_len=st.sampled_from([8, 16, 48]), latent_len=st.integers(1, 6), heads=st.sampled_from([1, 2, 4]),
       layers=st.integers(1, 3), ffw=st.integers(1, 40), pos=st.sampled_from(["trainable", "sinusoid", "none"]),
       pool=st.booleans(), channels=st.sampled_from([None, 3]))
def test_parameters_and_flops_match_for_any_config(input_len, latent_len, heads, layers, ffw, pos, pool, channels):
    c = PerceiverConfig(input_len=input_len, latent_len=latent_len, latent_dim=4 * heads, num_heads=heads,
                        cross_heads=heads, output_dim=4 * heads, num_layers=layers, ffw_latent=ffw, ffw_output=ffw,
                        pos_encoding=pos, input_channels=channels,
                        decoder_type="latent_pool" if pool else "attention")
    assert cost.parameters(c) == Perceiver(c).num_parameters()
    assert (cost.flops(c, 3, train=False), cost.flops(c, 3, train=True)) == counted_flops(c, 3)


@settings(max_examples=25, deadline=None)
@given(heads=st.sampled_from([1, 2]), qk=st.sampled_from([None, 2, 4, 8]), v=st.sampled_from([None, 2, 6]),
       self_qk=st.sampled_from([None, 2, 4]),
       decoder=st.tuples(st.sampled_from([None, 1, 2]), st.sampled_from([None, 2, 4]), st.sampled_from([None, 6])),
       ffw_cross=st.sampled_from([None, 3]), residual=st.booleans(), period=st.sampled_from([None, 1, 2]),
       input_side=st.sampled_from(["plain", "unprojected fourier", "sine-only fourier", "concat", "tied"]),
       input_len=st.sampled_from([4, 64]))
def test_parameters_and_flops_match_for_any_pretrained_option(heads, qk, v, self_qk, decoder, ffw_cross, residual,
                                                              period, input_side, input_len):
    sides = {
        "plain": dict(pos_encoding="none"),
        "unprojected fourier": dict(input_shape=(input_len // 2, 2), input_channels=2, pos_encoding="fourier",
                                    fourier_bands=1, input_projection=False),
        "sine-only fourier": dict(input_shape=(input_len,), input_channels=3, pos_encoding="fourier", fourier_bands=2,
                                  fourier_sine_only=True),
        "concat": dict(input_channels=3, pos_concat_dim=2),
        "tied": dict(input_type="tokens", input_num_tokens=11, output_len=input_len, output_dim=8,
                     decoder_reduction=None, n_classes=11, decoder_projection=False, tie_embeddings=True),
    }
    decoder_heads, decoder_qk, decoder_v = decoder
    fields = dict(input_len=input_len, input_dim=8, latent_len=3, latent_dim=8, output_dim=4, num_heads=2,
                  num_layers=2, ffw_latent=5, ffw_output=6, cross_heads=heads, cross_qk_channels=qk, cross_v_channels=v,
                  self_qk_channels=self_qk, decoder_heads=decoder_heads, decoder_qk_channels=decoder_qk,
                  decoder_v_channels=decoder_v, ffw_cross=ffw_cross, query_residual=residual, layers_per_block=period)
    c = PerceiverConfig(**{**fields, **sides[input_side]})
    model = Perceiver(c)
    assert cost.parameters(c) == model.num_parameters()
    assert cost.parameters(c, trainable_only=True) == model.num_parameters(include_non_trainable=False)
    assert (cost.flops(c, 2, train=False), cost.flops(c, 2, train=True)) == counted_flops(c, 2)


@pytest.mark.parametrize("name, count", [
    ("deepmind/language-perceiver", 201_108_230),
    ("deepmind/vision-perceiver-fourier", 48_440_627),
    ("deepmind/vision-perceiver-learned", 62_190_056),
])
def test_full_size_pretrained_architectures_are_counted_exactly(name, count):
    # the released checkpoints' trainable parameters (tests/test_hub.py); the Fourier table is fixed
    c = hub.full_size_config(name)
    with torch.device("meta"):
        model = (PerceiverMLM if c.input_type == "tokens" else PerceiverImage)(c)
    assert cost.parameters(c, trainable_only=True) == hub.parameter_count(model) == count
    assert cost.parameters(c) == model.num_parameters()


def saved_elements(block, kv: torch.Tensor, q: torch.Tensor) -> int:
    """Elements of the distinct tensors autograd keeps for backward of block(kv, q), weights and inputs left out."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(kv, q)
    exclude = {t.untyped_storage().data_ptr() for t in [*block.parameters(), kv, q]}
    return sum(n for ptr, n in storages.items() if ptr not in exclude)


@pytest.mark.parametrize("kv_len", [8, 512])            # the projected and the input-space encoder kernel
@pytest.mark.parametrize("widths", [
    dict(),
    dict(cross_qk_channels=8, cross_v_channels=24, query_residual=False, self_qk_channels=8),  # q/k and v differ:
    dict(cross_heads=1, cross_qk_channels=16, cross_v_channels=32),                            # the unfused kernel
    dict(cross_heads=4, cross_qk_channels=8, cross_v_channels=16, self_qk_channels=16),
])
def test_saved_activations_of_a_block_are_what_cost_counts(kv_len, widths):
    c = PerceiverConfig(input_len=kv_len, input_dim=8, latent_len=16, latent_dim=32, ffw_latent=96, num_heads=4,
                        **{"cross_heads": 2, **widths})
    encoder, processor, _ = cost.blocks(c)
    model = Perceiver(c)
    assert encoder.in_input_space == fast.input_space_is_cheaper(model.encoder, 16, kv_len)
    z = torch.randn(2, 16, 32, requires_grad=True)
    kv = torch.randn(2, kv_len, 8)
    per_query, per_key = processor.saved()
    assert saved_elements(model.processors[0], z, z) == 2 * 16 * per_query
    per_query, per_key = encoder.saved()
    assert saved_elements(model.encoder, kv, z) == 2 * (16 * per_query + kv_len * per_key)


def test_checkpointing_predicts_less_memory_and_the_same_flops():
    # many latents, few inputs: the latent blocks' activations dominate, which is what checkpointing drops
    c = PerceiverConfig(input_len=256, latent_len=128, latent_dim=128, ffw_latent=512, num_layers=6)
    plain, checkpointed = cost.estimate(c, 8), cost.estimate(c.replace(checkpoint_activations=True), 8)
    assert checkpointed.peak_train_bytes < 0.6 * plain.peak_train_bytes
    assert checkpointed.train_flops == plain.train_flops and checkpointed.parameters == plain.parameters


def test_memory_grows_with_batch_and_input_length():
    c = PerceiverConfig(input_len=256, pos_encoding="none")
    assert cost.peak_train_memory(c, 2) < cost.peak_train_memory(c, 4)
    assert cost.estimate(c, 4).peak_train_bytes < cost.estimate(c, 4, input_len=4096).peak_train_bytes


def test_estimate_answers_will_it_fit():
    estimate = cost.estimate(PerceiverConfig(), 4)
    assert estimate.fits(estimate.peak_train_bytes) and not estimate.fits(estimate.peak_train_bytes - 1)
    assert "parameters" in str(estimate) and "MiB" in str(estimate)


@pytest.mark.parametrize("bad, error, message", [
    (dict(c="config"), TypeError, "config must be a PerceiverConfig"),
    (dict(batch=0), ValueError, "batch"),
    (dict(batch=2.5), ValueError, "batch"),
])
def test_bad_arguments_are_named(bad, error, message):
    args = {"c": PerceiverConfig(), "batch": 2, **bad}
    with pytest.raises(error, match=message):
        cost.peak_train_memory(args["c"], args["batch"])
