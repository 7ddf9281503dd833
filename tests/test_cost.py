"""percnb.cost predicts from a config's shapes alone: parameters exactly as the model counts them, matmul
FLOPs exactly as torch.utils.flop_counter counts the textbook code, and the activations autograd saves.
Peak memory against a measured process is checked by benchmarks/cost_check.py (a measurement, not a test)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from percnb import cost
from percnb.config import PerceiverConfig, image_config, mlm_config
from percnb.models import Perceiver

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
def test_saved_activations_of_a_block_are_what_cost_counts(kv_len):
    c = PerceiverConfig(input_len=kv_len, input_dim=8, latent_len=16, latent_dim=32, ffw_latent=96, num_heads=4,
                        cross_heads=2)
    encoder, processor, _ = cost.blocks(c)
    assert encoder.in_input_space == (kv_len == 512)
    model = Perceiver(c)
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
