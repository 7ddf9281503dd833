"""Fast kernels for percnb's `Block`: the same function as the textbook code in percnb/models.py, computed
with less time and memory. Each says which textbook computation it equals and why it is faster;
tests/test_fast.py holds each equal to the textbook code (outputs and gradients, with and without masks,
including samples with no key to attend to).

A `Block` runs `block_forward` below when its `fast` switch is on (the default) and no attention
weights are asked for; `Block(..., fast=False)`, `Perceiver(config, fast=False)` or
`model.fast = False` run the textbook code instead. This module does not import percnb.models: it
reads the block's layers by name (ln_q, ln_kv, q, kv or qkv, proj, drop, ln_mlp, mlp).
Activation checkpointing (`PerceiverConfig.checkpoint_activations`) wraps a whole block, these kernels
included, in `Block.forward`: with it on, a block keeps only its inputs and backward reruns `block_forward`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """Equals `percnb.models.attention(q, k, v, mask, dropout_p)[0]` (without dropout; with it, the same
    in distribution), through `F.scaled_dot_product_attention`.

    q: (batch, heads, q_len, d), k: (batch, heads, kv_len, d), v: (batch, heads, kv_len, d_v),
    mask: (batch, kv_len) bool, True = attend; scale multiplies the scores (default d ** -0.5).
    Returns (batch, heads, q_len, d_v). Faster: one fused kernel that never stores the
    (q_len, kv_len) weights for backward (it recomputes them), where the textbook code keeps them.
    A sample with no key to attend to gets a zero output, as in the textbook code: such a row is
    0/0 in a softmax (NaN), and what a fused kernel returns for it differs by backend (zeros on
    torch 2.14's CPU kernel), so the row attends everywhere (finite) and is zeroed afterwards.
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    has_key = mask.any(dim=-1)                                           # (batch,)
    attend = (mask | ~has_key[:, None])[:, None, None, :]                # (batch, 1, 1, kv_len)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout_p, scale=scale)
    return out * has_key[:, None, None, None].to(out.dtype)


class GeluMLPFunction(torch.autograd.Function):
    """linear(gelu(linear(x, w1, b1)), w2, b2): the textbook MLP's Linear, GELU, Linear, keeping only x and
    the pre-GELU hidden h for backward.

    Leaner: autograd would also keep gelu(h), as big as h (hidden = 4-6x the width), the largest
    activation of a latent block; backward recomputes it from h, one cheap elementwise pass.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        h = F.linear(x, w1, b1)
        ctx.save_for_backward(x, h, w1, w2)
        return F.linear(F.gelu(h), w2, b2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x_in, h, w1, w2 = ctx.saved_tensors
        # Under autocast h may be half precision while the weights are float32: compute in h's dtype
        # (autograd casts each gradient back to its input's dtype).
        dtype = h.dtype
        x, h = x_in.reshape(-1, x_in.shape[-1]).to(dtype), h.reshape(-1, h.shape[-1])
        grad_out = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        grad_x = grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        if need_w2:
            grad_w2 = grad_out.t() @ F.gelu(h)
        if need_b2:
            grad_b2 = grad_out.sum(0)
        if need_x or need_w1 or need_b1:
            grad_h = torch.ops.aten.gelu_backward(grad_out @ w2.to(dtype), h)
            if need_x:
                grad_x = (grad_h @ w1.to(dtype)).view(x_in.shape)
            if need_w1:
                grad_w1 = grad_h.t() @ x
            if need_b1:
                grad_b1 = grad_h.sum(0)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def mlp_forward(mlp, x: torch.Tensor) -> torch.Tensor:
    """Equals `mlp(x)` for percnb's `MLP` (Linear, GELU, Linear, Dropout), keeping half the activations
    for backward (`GeluMLPFunction`). x: (..., dim) -> (..., dim)."""
    first, _, second, drop = mlp
    return drop(GeluMLPFunction.apply(x, first.weight, first.bias, second.weight, second.bias))


def input_space_is_cheaper(block, q_len: int, kv_len: int) -> bool:
    """Whether `attend_in_input_space` takes fewer multiply-adds than projecting keys and values.

    Per sample, with w = qk_dim + v_dim: projected, the keys and values (kv_len x kv_dim x w), then scores
    and weighted sum (q_len x kv_len x w); in the input space, W_k folded into the queries and W_v applied
    after the sum (q_len x kv_dim x w), scores and sum per head (2 x heads x q_len x kv_len x kv_dim).
    True for a Perceiver encoder: few input channels, few wide heads, many inputs.
    """
    w, c, h = block.qk_dim + block.v_dim, block.kv_dim, block.num_heads
    return q_len * c * w + 2 * h * q_len * kv_len * c < kv_len * c * w + q_len * kv_len * w


def attend_in_input_space(block, kv: torch.Tensor, q: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Equals a cross-attention Block's multi-head attention before its output projection,
    merge_heads(attention(split_heads(W_q LN(q)), split_heads(W_k x + b_k), split_heads(W_v x + b_v), mask))
    with x = LN_kv(kv), computed on the kv_dim-wide x instead of its q_dim-wide projections.

    Per head, softmax(q . (W_k x + b_k)) (W_v x + b_v) = softmax((W_k^T q) . x) x W_v^T + b_v: q . b_k is the
    same for every key, so the softmax ignores it, and the weights sum to 1, so b_v passes through
    (hence no dropout on the weights here). All heads read the same x, so they become extra queries of
    one fused attention call. Faster and leaner when `input_space_is_cheaper`: no (kv_len, 2 * q_dim)
    keys and values are made or kept. kv: (batch, kv_len, kv_dim), q: (batch, q_len, q_dim) ->
    (batch, q_len, v_dim).
    """
    b, n, _ = q.shape
    h, c = block.num_heads, block.kv_dim
    dk, dv = block.qk_dim // h, block.v_dim // h
    w_k, w_v = block.kv.weight.split([block.qk_dim, block.v_dim])
    qh = block.q(block.ln_q(q)).view(b, n, h, dk)
    q_in = torch.einsum("bnhd,hdc->bhnc", qh, w_k.view(h, dk, c)).reshape(b, 1, h * n, c)
    x = block.ln_kv(kv).unsqueeze(1)                                     # (batch, 1, kv_len, kv_dim)
    out = attention(q_in, x, x, mask, scale=dk ** -0.5)                  # (batch, 1, heads * q_len, kv_dim)
    out = torch.einsum("bhnc,hdc->bnhd", out.view(b, h, n, c), w_v.view(h, dv, c))
    out = out + block.kv.bias[block.qk_dim:].view(h, dv)
    if mask is not None:                       # a sample with no key to attend to gets zero, b_v included
        out = out * mask.any(dim=-1).to(out.dtype)[:, None, None, None]
    return out.flatten(2)


def _heads(block, x: torch.Tensor, parts: int) -> Tuple[torch.Tensor, ...]:
    # The fused projection (batch, len, widths) -> its q, k, v (parts=3), k, v (2) or q (1), each
    # (batch, heads, len, width / heads), as views
    widths = {1: [block.qk_dim], 2: [block.qk_dim, block.v_dim], 3: [block.qk_dim, block.qk_dim, block.v_dim]}[parts]
    b, n, _ = x.shape
    return tuple(part.view(b, n, block.num_heads, -1).transpose(1, 2) for part in x.split(widths, dim=-1))


def block_forward(block, kv: Optional[torch.Tensor], q: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Equals the textbook `Block.forward(kv, q, mask)[0]` of percnb/models.py, with the kernels above:
    `attend_in_input_space` for a cross-attention when it is cheaper (and no dropout is on), else
    `attention` on the fused projections; then the output projection, the residual and `mlp_forward`.
    kv: (batch, kv_len, kv_dim) (ignored by a self-attention block), q: (batch, q_len, q_dim) ->
    (batch, q_len, q_dim).
    """
    dropout_p = block.dropout if block.training else 0.0
    if not block.self_attention and dropout_p == 0 and input_space_is_cheaper(block, q.shape[1], kv.shape[1]):
        out = attend_in_input_space(block, kv, q, mask)
    else:
        if block.self_attention:
            qh, k, v = _heads(block, block.qkv(block.ln_q(q)), 3)
        else:
            (qh,) = _heads(block, block.q(block.ln_q(q)), 1)
            k, v = _heads(block, block.kv(block.ln_kv(kv)), 2)
        # (batch, heads, q_len, d) -> (batch, q_len, v_dim): a view, no copy, after the fused kernels
        # (CPU, CUDA), which lay their output out as (batch, q_len, heads, d)
        out = attention(qh, k, v, mask, dropout_p).transpose(1, 2).flatten(2)
    out = block.drop(block.proj(out))
    if block.add_residual:
        out = out + q
    return out + mlp_forward(block.mlp, block.ln_mlp(out))
