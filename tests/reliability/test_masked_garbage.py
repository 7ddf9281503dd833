"""What a mask promises: values at masked input positions (attention_mask False) change no output and no
gradient, whatever they are (padding is often garbage: NaN, inf, 1e30), on both attention paths (the
textbook code of percnb/models.py, and percnb/fast.py's kernels), with and without attention maps; and a
sample with every position masked still gets the documented zero attention."""
import pytest
import torch

from percnb.config import PerceiverConfig
from percnb.models import Block, Perceiver, PerceiverMLM, mlm_config

GARBAGE = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30, -1e30])


def dirtied(inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`inputs` with every masked value replaced by one of GARBAGE, in turn."""
    garbage = GARBAGE[torch.arange(inputs.numel()) % len(GARBAGE)].view(inputs.shape)
    return torch.where(mask[..., None], inputs, garbage)


def config(**changes) -> PerceiverConfig:
    base = dict(input_len=12, input_dim=6, latent_len=4, latent_dim=8, output_dim=8, ffw_latent=16,
                ffw_output=16, num_heads=2, cross_heads=2, num_layers=2, n_classes=5)
    return PerceiverConfig(**{**base, **changes})


def padded_batch():
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(3, 12, 6, generator=g)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, 7:] = False          # padding at the end
    mask[1, ::3] = False         # holes anywhere
    mask[2, :] = False           # nothing to attend to at all
    return inputs, mask


def run(model, inputs, mask, return_attentions):
    """Logits, every attention map, and the gradients of the parameters and the inputs."""
    model.zero_grad()
    inputs = inputs.clone().requires_grad_(True)
    out = model(inputs, mask, return_attentions=return_attentions)
    logits, maps = out if return_attentions else (out, [])
    logits.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), [m.detach() for m in maps], grads, inputs.grad


@pytest.mark.parametrize("fast, return_attentions", [(True, False), (False, False), (False, True), (True, True)])
@pytest.mark.parametrize("pos_encoding", ["trainable", "none"])
def test_masked_values_change_no_output_and_no_gradient(fast, return_attentions, pos_encoding):
    model = Perceiver(config(pos_encoding=pos_encoding), fast=fast)
    inputs, mask = padded_batch()
    dirty = dirtied(inputs, mask)
    clean_run, dirty_run = run(model, inputs, mask, return_attentions), run(model, dirty, mask, return_attentions)
    # bit-identical: the masked positions are zeroed before anything reads them
    assert torch.equal(clean_run[0], dirty_run[0])
    assert all(torch.equal(a, b) for a, b in zip(clean_run[1], dirty_run[1]))
    for name, grad in dirty_run[2].items():
        assert torch.equal(grad, clean_run[2][name]), name
    assert torch.isfinite(dirty_run[3]).all() and (dirty_run[3][~mask] == 0).all()


@pytest.mark.parametrize("fast", [True, False])
def test_a_block_ignores_what_masked_keys_hold(fast):
    block = Block(6, 8, 2, 16, add_residual=True, fast=fast)
    inputs, mask = padded_batch()
    q = torch.randn(3, 4, 8)
    dirty = dirtied(inputs, mask).requires_grad_(True)
    out, _ = block(dirty, q, mask, need_weights=not fast)
    out.sum().backward()
    assert torch.equal(out, block(inputs, q, mask)[0]) and torch.isfinite(dirty.grad).all()


def test_a_sample_with_every_position_masked_gets_zero_attention_even_over_garbage():
    # the documented behaviour (percnb.models.attention): no key to attend to -> zero weights, zero output
    model = Perceiver(config(), fast=False)
    inputs, mask = padded_batch()
    dirty = dirtied(inputs, mask)
    logits, maps = model(dirty, mask, return_attentions=True)
    assert torch.isfinite(logits).all()
    assert (maps[0][2] == 0).all() and maps[0][:2].sum(-1).allclose(torch.tensor(1.0))
    alone = model(torch.zeros(1, 12, 6), torch.zeros(1, 12, dtype=torch.bool))[0]
    torch.testing.assert_close(logits[2], alone, atol=1e-6, rtol=1e-5)   # batch of 3 vs 1: matmul rounding


def test_fast_and_textbook_paths_agree_on_garbage_inputs():
    inputs, mask = padded_batch()
    dirty = dirtied(inputs, mask)
    fast, slow = Perceiver(config(), fast=True), Perceiver(config(), fast=False)
    torch.testing.assert_close(fast(dirty, mask), slow(dirty, mask), atol=1e-5, rtol=1e-5)  # kernel rounding


def test_token_models_ignore_masked_positions_too():
    model = PerceiverMLM(mlm_config(12, 50, input_dim=8, latent_dim=8, output_dim=8, ffw_latent=16, ffw_output=16,
                                    num_heads=2, cross_heads=2, num_layers=1, latent_len=3))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 8:] = False
    other = tokens.masked_fill(~mask, 7)
    # a masked position's own output still reads its query; every unmasked position's output is unchanged
    assert torch.equal(model(tokens, mask)[:, :8], model(other, mask)[:, :8])
