"""PerceiverConfig refuses what would fail later: initial scales that overflow to NaN, seeds that overflow
the per-part seeding; and a fuzz test: every config either raises ValueError/TypeError when made, or
builds a model whose forward, backward, attention maps and save/load round trip work."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from percnb.config import INIT_STD_MAX, SEED_LIMIT, PerceiverConfig
from percnb.models import Perceiver


@pytest.mark.parametrize("field, value", [
    ("latent_init_std", 1e20), ("pos_init_std", 1e30), ("token_init_std", 1e25), ("latent_init_std", INIT_STD_MAX),
])
def test_initial_scales_that_overflow_are_refused_with_the_allowed_range(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a finite number in \(0, 1000\), got"):
        PerceiverConfig(**{field: value})


def test_the_largest_allowed_scales_give_a_finite_model():
    just_below = math.nextafter(INIT_STD_MAX, 0)
    model = Perceiver(PerceiverConfig(latent_init_std=just_below, pos_init_std=just_below))
    assert torch.isfinite(model(torch.randn(2, 64, 8))).all()


@pytest.mark.parametrize("seed", [2 ** 53, SEED_LIMIT, 2 ** 64])
def test_seeds_that_would_overflow_the_per_part_seeding_are_refused(seed):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\)"):
        PerceiverConfig(seed=seed)


def test_the_largest_allowed_seed_builds():
    Perceiver(PerceiverConfig(seed=SEED_LIMIT - 1, num_layers=1))


# ------------------------------------------------------------------ fuzz

def mostly(valid: list, invalid: list):
    """Valid values three times as often as invalid ones, so that enough examples build a model."""
    return st.sampled_from(valid * 3 + invalid)


small = mostly([1, 2, 4], [0, -1])
CONFIGS = st.fixed_dictionaries({}, optional={
    "input_len": mostly([4, 6, 8], [0, -1]),
    "input_dim": small, "latent_len": small, "latent_dim": mostly([2, 4, 8], [0, 3]),
    "output_len": small, "output_dim": mostly([2, 4, 8], [0, 3]), "ffw_latent": small,
    "ffw_output": small, "num_heads": small, "num_layers": mostly([1, 2], [0]), "cross_heads": small,
    "input_type": mostly(["raw", "tokens"], ["pixels"]),
    "input_num_tokens": mostly([None, 5], [0]),
    "input_channels": mostly([None, 3], [0]),
    "input_shape": mostly([None, (2, 2), (4,), (2, 4), [2, 4]], [(0,)]),
    "pos_encoding": mostly(["trainable", "sinusoid", "fourier", "none"], ["rope"]),
    "fourier_bands": mostly([1, 2], [0]),
    "max_resolution": mostly([None, (4,), (2, 2)], []),
    "decoder_type": mostly(["attention", "latent_pool"], []),
    "decoder_reduction": mostly(["mean", "max", "sum", "first", "last", "eot", None], ["median"]),
    "decoder_residual": mostly([False, True], [1]),
    "decoder_projection": st.booleans(),
    "n_classes": mostly([None, 3], [0]),
    "seed": mostly([0, 7], [-1, 2 ** 40]),
    "pos_init_std": mostly([0.02, 1.0, 999.0], [0.0, 1e30, float("nan")]),
    "latent_init_std": mostly([1.0, 999.0], [1e20, float("inf")]),
    "token_init_std": mostly([None, 0.5], [1e25]),
    "dropout": mostly([0.0, 0.1], [1.0, -0.1]),
    "share_weights": st.booleans(),
    "latents_from_inputs": st.booleans(),
    "queries_from_latents": st.booleans(),
})


def inputs_for(config: PerceiverConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if config.input_type == "tokens":
        return torch.randint(0, config.input_num_tokens, (2, config.input_len), generator=g)
    return torch.randn(2, config.input_len, config.input_channels or config.input_dim, generator=g)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=CONFIGS)
def test_every_config_is_refused_or_builds_a_working_model(fields, tmp_path_factory):
    try:
        config = PerceiverConfig(**fields)
    except (ValueError, TypeError):
        return
    model = Perceiver(config)
    inputs, mask = inputs_for(config), torch.ones(2, config.input_len, dtype=torch.bool)
    mask[0, -1] = False
    out = model(inputs, mask)
    assert torch.isfinite(out).all(), fields
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), fields
    logits, maps = model.eval()(inputs, mask, return_attentions=True)
    assert len(maps) == 1 + config.num_layers + (config.decoder_type == "attention")
    path = tmp_path_factory.mktemp("fuzz") / "model.pt"
    model.save(path)
    again = Perceiver.load(path)
    assert again.config == config and torch.equal(again(inputs, mask, return_attentions=True)[0], logits)
