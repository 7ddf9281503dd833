"""percnb.fast computes what the textbook code of percnb.models computes: outputs and gradients, with and
without masks, including samples that have no key to attend to."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from percnb import fast
from percnb.config import PerceiverConfig
from percnb.models import MLP, Block, Perceiver, attention

torch.set_num_threads(1)

MAX_GAP = 1e-5  # fp32: the fused kernels sum in another order than the explicit softmax; rounding only


def weighted_sum(out: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient differs at every output element (a plain sum would hide a permutation)."""
    return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()


def key_mask(batch: int, length: int, empty_sample: bool, seed: int = 1) -> torch.Tensor:
    mask = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask[:, 0] = True
    if empty_sample:
        mask[1] = False                                    # a sample with nothing to attend to
    return mask


def outputs_and_grads(fn, *inputs):
    """fn(*inputs) and the gradients of `weighted_sum` of it for every input (and parameter) given."""
    for t in inputs:
        t.grad = None
    out = fn()
    weighted_sum(out).backward()
    return [out.detach()] + [t.grad.clone() for t in inputs]


def assert_all_close(fast_results, textbook_results, names):
    for name, a, b in zip(names, fast_results, textbook_results):
        assert torch.allclose(a, b, atol=MAX_GAP), (name, (a - b).abs().max().item())


# --------------------------------------------------------------------------- attention

@pytest.mark.parametrize("masked, empty_sample", [(False, False), (True, False), (True, True)])
def test_fused_attention_equals_textbook_attention(masked, empty_sample):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 5, generator=g, requires_grad=True) for n in (4, 9, 9))
    mask = key_mask(3, 9, empty_sample) if masked else None
    textbook = outputs_and_grads(lambda: attention(q, k, v, mask)[0], q, k, v)
    fused = outputs_and_grads(lambda: fast.attention(q, k, v, mask), q, k, v)
    assert_all_close(fused, textbook, ["out", "q.grad", "k.grad", "v.grad"])


def test_fused_attention_gives_a_sample_with_no_key_a_zero_output():
    # torch 2.14's CPU kernel returns zeros for an all-False row, a softmax NaN, other backends may differ:
    # percnb's own handling makes the zero and keeps the gradients finite whatever the kernel does
    q, k, v = (torch.randn(2, 2, n, 4, requires_grad=True) for n in (3, 5, 5))
    mask = torch.tensor([[True, False, True, True, False], [False] * 5])
    out = fast.attention(q, k, v, mask)
    weighted_sum(out).backward()
    assert torch.all(out[1] == 0) and not torch.all(out[0] == 0)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# --------------------------------------------------------------------------- the MLP

def test_lean_mlp_equals_the_textbook_mlp():
    torch.manual_seed(0)
    mlp = MLP(8, 24)
    x = torch.randn(3, 5, 8, requires_grad=True)
    params = list(mlp.parameters())
    textbook = outputs_and_grads(lambda: mlp(x), x, *params)
    lean = outputs_and_grads(lambda: fast.mlp_forward(mlp, x), x, *params)
    for a, b in zip(lean, textbook):
        assert torch.allclose(a, b, atol=1e-6)        # the same kernels; only the GELU is recomputed


def test_lean_mlp_gradcheck():
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 4), (6, 4), (6,), (4, 6), (4,)]              # x, w1, b1, w2, b2
    args = [torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True) for shape in shapes]
    assert torch.autograd.gradcheck(fast.GeluMLPFunction.apply, args)


def test_lean_mlp_saves_half_the_hidden_activations():
    mlp, x = MLP(8, 64), torch.randn(4, 10, 8, requires_grad=True)

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        params = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
        return sum(n for ptr, n in seen.items() if ptr not in params and ptr != x.untyped_storage().data_ptr())

    hidden = 4 * 10 * 64 * 4
    assert saved_bytes(lambda: mlp(x)) == 2 * hidden and saved_bytes(lambda: fast.mlp_forward(mlp, x)) == hidden


def test_lean_mlp_under_autocast_and_no_double_backward():
    mlp, x = MLP(8, 16), torch.randn(2, 3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast.mlp_forward(mlp, x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and mlp[0].weight.grad.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in mlp.parameters())
    (grad,) = torch.autograd.grad(fast.mlp_forward(mlp, x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):                  # refuses, rather than a silently wrong answer
        grad.sum().backward()


# --------------------------------------------------------------------------- the block

def block_results(block, kv, q, mask, use_fast):
    block.fast = use_fast
    inputs = [q] if block.self_attention else [q, kv]
    return outputs_and_grads(lambda: block(kv, q, mask)[0], *inputs, *block.parameters())


@pytest.mark.parametrize("self_attention, kv_dim, heads, masked, empty_sample, regroups", [
    (True, 8, 2, False, False, False),
    (False, 8, 4, False, False, False),      # as many input channels as heads need: keys and values projected
    (False, 8, 4, True, True, False),
    (False, 3, 1, False, False, True),       # few input channels: the input-space regrouping
    (False, 3, 2, True, False, True),
    (False, 3, 1, True, True, True),
])
def test_fast_block_equals_textbook_block(self_attention, kv_dim, heads, masked, empty_sample, regroups):
    torch.manual_seed(0)
    block = Block(kv_dim, 8, heads, 16, add_residual=True, self_attention=self_attention)
    q = torch.randn(3, 4, 8, requires_grad=True)
    kv = q if self_attention else torch.randn(3, 40, kv_dim, requires_grad=True)
    mask = key_mask(3, 40, empty_sample) if masked else None
    if not self_attention:
        assert fast.input_space_is_cheaper(block, 4, 40) == regroups
    names = ["out", "q.grad"] + ([] if self_attention else ["kv.grad"]) + [n for n, _ in block.named_parameters()]
    assert_all_close(block_results(block, kv, q, mask, True), block_results(block, kv, q, mask, False), names)


def test_input_space_regrouping_gradcheck():
    torch.manual_seed(0)
    block = Block(2, 8, 2, 8, add_residual=True).double()
    assert fast.input_space_is_cheaper(block, 3, 5)
    q, kv = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 5, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True, False], [False] * 5])
    assert torch.autograd.gradcheck(lambda x, lat: fast.block_forward(block, x, lat, mask), (kv, q.requires_grad_()))


def test_dropout_keeps_the_projected_path_in_training():
    # Dropped attention weights no longer sum to 1, so b_v would not pass through the regrouping: training
    # with dropout projects keys and values; eval (no dropout) may regroup, and agrees with the textbook.
    torch.manual_seed(0)
    block = Block(3, 16, 1, 32, dropout=0.5, add_residual=True)
    assert fast.input_space_is_cheaper(block, 4, 20)
    q, kv = torch.randn(2, 4, 16), torch.randn(2, 20, 3)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        trained, _ = block(kv, q)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        qh = fast._heads(block, block.q(block.ln_q(q)), 1)[0]
        k, v = fast._heads(block, block.kv(block.ln_kv(kv)), 2)
        projected = fast.attention(qh, k, v, dropout_p=0.5).transpose(1, 2).flatten(2)
        projected = block.drop(block.proj(projected)) + q
        projected = projected + fast.mlp_forward(block.mlp, block.ln_mlp(projected))
    assert torch.allclose(trained, projected, atol=MAX_GAP)
    block.eval()
    assert torch.allclose(block(kv, q)[0], block(kv, q, need_weights=True)[0], atol=MAX_GAP)


# --------------------------------------------------------------------------- the switch

TINY = dict(input_len=12, input_dim=6, latent_len=4, latent_dim=8, output_len=3, output_dim=8, ffw_latent=16,
            ffw_output=16, num_heads=2, num_layers=2, n_classes=5, seed=0)


def test_fast_and_textbook_perceivers_agree_on_outputs_and_gradients():
    model = Perceiver(PerceiverConfig(**TINY))
    x = torch.randn(3, 12, 6)
    mask = key_mask(3, 12, empty_sample=True)
    params = list(model.parameters())
    results = []
    for use_fast in (True, False):
        model.fast = use_fast
        results.append(outputs_and_grads(lambda: model(x, mask), *params))
    assert_all_close(*results, ["logits"] + [n for n, _ in model.named_parameters()])


def test_the_switch_decides_which_code_runs(monkeypatch):
    def refuse(*args):
        raise AssertionError("the fast kernel ran")
    monkeypatch.setattr(fast, "block_forward", refuse)
    x = torch.randn(2, 12, 6)
    textbook = Perceiver(PerceiverConfig(**TINY), fast=False)
    assert textbook.fast is False and textbook(x).shape == (2, 5)
    textbook.fast = True
    assert all(block.fast for block in textbook.processors) and textbook.fast
    textbook(x, return_attentions=True)              # the maps always come from the textbook code
    with pytest.raises(AssertionError, match="the fast kernel ran"):
        textbook(x)
    with pytest.raises(ValueError, match="fast must be True or False"):
        textbook.fast = 1


@settings(max_examples=30, deadline=None)
@given(kv_dim=st.integers(1, 12), heads=st.sampled_from([1, 2, 4]), head_dim=st.integers(1, 6),
       q_len=st.integers(1, 6), kv_len=st.integers(1, 30), batch=st.integers(1, 3), masked=st.booleans(),
       self_attention=st.booleans(), seed=st.integers(0, 2**16))
def test_fast_block_equals_textbook_block_for_any_shape(kv_dim, heads, head_dim, q_len, kv_len, batch, masked,
                                                       self_attention, seed):
    # whichever kernel the cost rule picks, and whatever the mask (samples with no key included); in float64,
    # because a LayerNorm over 1 or 2 channels amplifies float32 rounding past any fixed tolerance
    torch.manual_seed(seed)
    q_dim = heads * head_dim
    block = Block(q_dim if self_attention else kv_dim, q_dim, heads, 2 * q_dim, add_residual=seed % 2 == 0,
                  self_attention=self_attention).double()
    q = torch.randn(batch, q_len, q_dim, dtype=torch.float64, requires_grad=True)
    kv = q if self_attention else torch.randn(batch, kv_len, kv_dim, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(batch, kv.shape[1]) > 0.5 if masked else None
    results = [block_results(block, kv, q, mask, use_fast) for use_fast in (True, False)]
    names = ["out", "q.grad"] + ([] if self_attention else ["kv.grad"]) + [n for n, _ in block.named_parameters()]
    for name, a, b in zip(names, *results):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-7), (name, (a - b).abs().max().item())
