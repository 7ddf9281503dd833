"""The Perceiver (Jaegle et al. 2021) and Perceiver IO decoders, with gperc's public API.

Data flow, as an `nn.Sequential` of tuple-passing blocks (so that it can be cut into pipeline stages):

    Embeddings     (input_array, attention_mask, output_array)
                -> (input_array, attention_mask, latent_array, output_array)
    EncoderBlock   cross-attention: latents (batch, latent_len, latent_dim) read the inputs
                -> (latent_array, output_array, attentions)
    ProcessorBlock self-attention over the latents, num_layers times
                -> (latent_array, output_array, attentions)
    DecoderBlock   cross-attention: output queries read the latents, then reduction and projection
                -> (logits, attentions)

`attentions` is None when no attention weights are wanted (the fast path through
`scaled_dot_product_attention`) and a list of `(batch, heads, q_len, kv_len)` maps otherwise.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import PerceiverConfig
from .encodings import build_position_encoding

__all__ = [
    "PerceiverConfig", "build_position_encoding", "attention", "GeluMLP", "Block", "Embeddings", "EncoderBlock",
    "ProcessorBlock", "DecoderBlock", "get_sequential_from_config", "Perceiver", "PerceiverImage",
    "PerceiverMLM", "image_config", "mlm_config", "get_distributed_model",
]

Attentions = Optional[List[torch.Tensor]]


# --------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _seeded(seed: int, index: int) -> Iterator[None]:
    """Run initialisation under its own seed per module, so that a pipeline rank that builds only
    its own stage gets exactly the weights the whole model would have."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + index)
        yield


def _unpack(inputs: tuple, names: Sequence[str], owner: str) -> tuple:
    """Accept either positional arguments or the single tuple that `nn.Sequential` passes on."""
    if len(inputs) == 1 and isinstance(inputs[0], tuple):
        inputs = inputs[0]
    if len(inputs) != len(names):
        raise TypeError(f"{owner}.forward takes ({', '.join(names)}) as arguments or as one tuple, "
                        f"got {len(inputs)} item(s)")
    return inputs


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)} and dtype {t.dtype}"


def _check_mask(attention_mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Validate a (batch, length) key mask of bools or 0/1 and return it as bool (True = attend)."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor of shape ({batch}, {length}), "
                        f"got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask must have shape (batch, input_len) = ({batch}, {length}), "
                         f"got {_describe(attention_mask)}")
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_complex():
        raise TypeError(f"attention_mask must be bool or 0/1 numbers, got dtype {attention_mask.dtype}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)].flatten()[:3].tolist()
        raise ValueError(f"attention_mask must hold only 0/1 (or bools; 1 = attend), found values such as {bad}")
    return attention_mask != 0


def _window_means(x: torch.Tensor, attention_mask: Optional[torch.Tensor], windows: int) -> torch.Tensor:
    """(batch, length, dim) -> (batch, windows, dim): the mean of each run of length / windows positions,
    over unmasked positions only (a window with none gives zeros, so masked inputs never leak in)."""
    batch, length, dim = x.shape
    if attention_mask is None:
        return x.view(batch, windows, length // windows, dim).mean(2)
    keep = attention_mask.view(batch, windows, length // windows, 1)
    total = torch.where(keep, x.view(batch, windows, length // windows, dim), 0.0).sum(2)
    return total / keep.sum(2).clamp(min=1).to(x.dtype)


# --------------------------------------------------------------------------- attention

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, need_weights: bool = False, scale: Optional[float] = None
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Multi-head scaled dot-product attention, softmax over keys.

    q, k: (batch, heads, q_len / kv_len, head_dim); v: (batch, heads, kv_len, v_dim); key_mask: (batch, kv_len)
    bool, True = attend; scale multiplies the scores (default head_dim ** -0.5).
    Returns (out (batch, heads, q_len, v_dim), weights or None). Without
    `need_weights` it runs `scaled_dot_product_attention` (fused, no (q_len, kv_len) matrix kept for
    backward on CPU/CUDA kernels that support it); with it, an explicit softmax that returns the
    weights `(batch, heads, q_len, kv_len)`. Masked keys get exactly zero weight. A sample with no
    key to attend to gets a zero output (and zero weights) rather than the NaN of softmax over -inf.
    """
    mask4 = has_key = None
    if key_mask is not None:
        has_key = key_mask.any(dim=-1)                                   # (batch,)
        # Let fully masked samples attend everywhere (finite), then zero their output below.
        mask4 = (key_mask | ~has_key[:, None])[:, None, None, :]
        has_key = has_key[:, None, None, None].to(q.dtype)
    if need_weights:
        scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if mask4 is not None:
            scores = scores.masked_fill(~mask4, float("-inf"))
        weights = scores.softmax(dim=-1)
        if has_key is not None:
            weights = weights * has_key
        dropped = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
        return torch.matmul(dropped, v), weights
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask4, dropout_p=dropout_p, scale=scale)
    if has_key is not None:
        out = out * has_key
    return out, None


class _GeluMLPFunction(torch.autograd.Function):
    """linear(gelu(linear(x, w1, b1)), w2, b2), keeping only x and the pre-GELU hidden h for backward.

    Autograd would also keep gelu(h), which is as big as h (hidden = 4-6x the width): the largest
    activation of a latent block. Backward recomputes it from h, one cheap elementwise pass.
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


class GeluMLP(nn.Sequential):
    """Linear(dim, hidden) -> GELU -> Linear(hidden, dim) -> Dropout: the nn.Sequential it looks like
    (same weights and names, mlp.0 and mlp.2), whose forward keeps half the activations for backward
    (`_GeluMLPFunction`). x: (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, _, second, drop = self
        return drop(_GeluMLPFunction.apply(x, first.weight, first.bias, second.weight, second.bias))


class Block(nn.Module):
    """Pre-LayerNorm attention + MLP block, for cross-attention (q reads kv) and self-attention.

    kv: (batch, kv_len, kv_dim), q: (batch, q_len, q_dim) -> out (batch, q_len, q_dim).
    `add_residual` adds q to the attention output (the Perceiver's latents keep their identity
    through cross-attention; a decoder may or may not want that); the MLP always has its residual.
    With `self_attention=True` the block reads its own input (kv must be q or None), with one
    LayerNorm and one fused q/k/v projection. `forward(..., need_weights=True)` also returns the
    attention weights (batch, num_heads, q_len, kv_len) through the explicit path; otherwise the
    second item is None and the fused SDPA kernel runs. Both paths share all weights.

    On the fast path, a cross-attention whose inputs are narrower than its heads (a Perceiver
    encoder: few input channels, one wide head) attends in the input space when that takes fewer
    multiply-adds (`_attend_in_input_space`): the same function, without the (kv_len, 2 * q_dim)
    keys and values, so faster and leaner. Dropout on the attention weights keeps the projected path.
    """

    def __init__(self, kv_dim: int, q_dim: int, num_heads: int, ffw_dim: int, dropout: float = 0.0,
                 add_residual: bool = False, *, self_attention: bool = False):
        super().__init__()
        for name, value in (("kv_dim", kv_dim), ("q_dim", q_dim), ("num_heads", num_heads), ("ffw_dim", ffw_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if q_dim % num_heads:
            raise ValueError(f"q_dim={q_dim} is not divisible by num_heads={num_heads}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if self_attention and kv_dim != q_dim:
            raise ValueError(f"self-attention needs kv_dim == q_dim, got kv_dim={kv_dim}, q_dim={q_dim}")
        self.kv_dim, self.q_dim, self.num_heads = kv_dim, q_dim, num_heads
        self.dropout, self.add_residual, self.self_attention = dropout, add_residual, self_attention
        self.ln_q = nn.LayerNorm(q_dim)
        if self_attention:
            self.qkv = nn.Linear(q_dim, 3 * q_dim)
        else:
            self.ln_kv = nn.LayerNorm(kv_dim)
            self.q = nn.Linear(q_dim, q_dim)
            self.kv = nn.Linear(kv_dim, 2 * q_dim)
        self.proj = nn.Linear(q_dim, q_dim)
        self.ln_mlp = nn.LayerNorm(q_dim)
        self.mlp = GeluMLP(q_dim, ffw_dim, dropout)
        self.drop = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor, parts: int) -> Tuple[torch.Tensor, ...]:
        # (batch, len, parts * q_dim) -> parts x (batch, heads, len, head_dim), as views.
        b, n, _ = x.shape
        return x.view(b, n, parts, self.num_heads, self.q_dim // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)

    def _input_space_is_cheaper(self, q_len: int, kv_len: int) -> bool:
        # Multiply-adds per sample. Projected: keys and values (kv_len x kv_dim x 2 q_dim), then scores and
        # weighted sum (2 x q_len x kv_len x q_dim). Input space: W_k folded into the queries and W_v applied
        # after the sum (2 x q_len x kv_dim x q_dim), scores and sum per head (2 x heads x q_len x kv_len x kv_dim).
        d, c, h = self.q_dim, self.kv_dim, self.num_heads
        return 2 * q_len * c * d + 2 * h * q_len * kv_len * c < 2 * kv_len * c * d + 2 * q_len * kv_len * d

    def _attend_in_input_space(self, kv: torch.Tensor, q: torch.Tensor,
                               attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Cross-attention on the normalised inputs x (kv_dim wide) instead of their projections.

        Per head, softmax(q . (W_k x + b_k)) (W_v x + b_v) = softmax((W_k^T q) . x) x W_v^T + b_v: q . b_k is
        the same for every key, so the softmax ignores it, and without dropout the weights sum to 1, so b_v
        passes through. All heads read the same x, so they become extra queries of one SDPA call.
        Returns (batch, q_len, q_dim) before the output projection, as the projected path does.
        """
        b, n, _ = q.shape
        h, d, c = self.num_heads, self.q_dim // self.num_heads, self.kv_dim
        w_k, w_v = self.kv.weight.view(2, h, d, c).unbind(0)
        qh = self.q(self.ln_q(q)).view(b, n, h, d)
        q_in = torch.einsum("bnhd,hdc->bhnc", qh, w_k).reshape(b, 1, h * n, c)
        x = self.ln_kv(kv).unsqueeze(1)                                    # (batch, 1, kv_len, kv_dim)
        out, _ = attention(q_in, x, x, attn_mask, scale=d ** -0.5)        # (batch, 1, heads * q_len, kv_dim)
        out = torch.einsum("bhnc,hdc->bnhd", out.view(b, h, n, c), w_v) + self.kv.bias.view(2, h, d)[1]
        if attn_mask is not None:                 # a sample with no key to attend to gets zero, b_v included
            out = out * attn_mask.any(dim=-1).to(out.dtype)[:, None, None, None]
        return out.flatten(2)

    def forward(self, kv: Optional[torch.Tensor], q: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                need_weights: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.self_attention and kv is not None and kv is not q:
            raise ValueError("a self-attention Block reads its own input: pass kv=q (the same tensor) or kv=None")
        dropout_p = self.dropout if self.training else 0.0
        if (not self.self_attention and not need_weights and dropout_p == 0
                and self._input_space_is_cheaper(q.shape[1], kv.shape[1])):
            out, weights = self._attend_in_input_space(kv, q, attn_mask), None
        else:
            if self.self_attention:
                qh, k, v = self._heads(self.qkv(self.ln_q(q)), 3)
            else:
                (qh,) = self._heads(self.q(self.ln_q(q)), 1)
                k, v = self._heads(self.kv(self.ln_kv(kv)), 2)
            out, weights = attention(qh, k, v, attn_mask, dropout_p, need_weights)
            # (batch, heads, q_len, dim) -> (batch, q_len, q_dim): a view, no copy, after the fused SDPA
            # kernels (CPU, CUDA), which lay their output out as (batch, q_len, heads, dim)
            out = out.transpose(1, 2).flatten(2)
        out = self.drop(self.proj(out))
        if self.add_residual:
            out = out + q
        out = out + self.mlp(self.ln_mlp(out))
        return out, weights


# --------------------------------------------------------------------------- the sequential blocks

class Embeddings(nn.Module):
    """Checks and embeds the inputs, and holds the latent array and the default output queries.

    forward(input_array, attention_mask=None, output_array=None), or one tuple of the three, returns
    (input_array (batch, input_len, input_dim), attention_mask (batch, input_len) bool or None,
    latent_array (batch, latent_len, latent_dim), output_array (batch, output_len, output_dim)).
    Raw inputs are (batch, input_len, input_channels or input_dim) floats; token inputs are
    (batch, input_len) integer ids. `output_array` (batch, any_len, output_dim) replaces the
    learned queries (Perceiver IO). With decoder_reduction='eot' only the query at each sample's
    last unmasked position is kept: queries do not interact, so this equals decoding all and picking.
    """

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        c = self.config = config
        self.token_embedding = self.input_proj = None
        self.pos_emb = self.fourier = None
        if c.input_type == "tokens":
            self.token_embedding = nn.Embedding(c.input_num_tokens, c.input_dim)
            # Tokens start on the scale of the position codes added to them: a fixed sinusoid table has
            # RMS 1/sqrt(2), and tokens 35x smaller than that are a faint signal next to it (a byte MLM
            # sat on the unigram plateau longer: notebook 04).
            std = c.token_init_std or {"trainable": c.pos_init_std, "sinusoid": 0.5 ** 0.5}.get(c.pos_encoding, 1.0)
            nn.init.normal_(self.token_embedding.weight, std=std)
            self.in_features = None
        else:
            self.in_features = c.input_channels or c.input_dim
            proj_in = self.in_features
            if c.pos_encoding == "fourier":
                self.fourier = build_position_encoding("fourier", c, c.input_len, None)
                proj_in += self.fourier.shape[1]
            if proj_in != c.input_dim or c.input_channels is not None:
                self.input_proj = nn.Linear(proj_in, c.input_dim)
        if c.pos_encoding in ("trainable", "sinusoid"):
            self.pos_emb = build_position_encoding(c.pos_encoding, c, c.input_len, c.input_dim)
        self.latent_array = nn.Parameter(torch.randn(c.latent_len, c.latent_dim) * c.latent_init_std)
        # A pooling decoder has no queries; its output_array slot carries the latents' pooling spec: None.
        self.output_array = (nn.Parameter(torch.randn(c.output_len, c.output_dim) * c.pos_init_std)
                             if c.decoder_type == "attention" else None)

    def _check_input(self, x: torch.Tensor) -> None:
        c = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input_array must be a torch.Tensor, got {type(x).__name__}")
        if c.input_type == "tokens":
            if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
                raise TypeError(f"input_type='tokens' needs integer token ids (torch.long), got {x.dtype}")
            if x.dim() != 2:
                raise ValueError(f"token input_array must be (batch, input_len), got {_describe(x)}")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= c.input_num_tokens):
                raise ValueError(f"token ids must be in [0, input_num_tokens={c.input_num_tokens}), "
                                 f"got min {int(x.min())} and max {int(x.max())}")
        else:
            if not x.is_floating_point():
                raise TypeError(f"input_type='raw' needs a floating-point input_array, got {x.dtype}; "
                                "convert with .float() (or set input_type='tokens' for ids)")
            if x.dim() != 3:
                raise ValueError(f"raw input_array must be (batch, input_len, {self.in_features}), got {_describe(x)}")
            if x.shape[-1] != self.in_features:
                raise ValueError(f"input_array has {x.shape[-1]} features per position but the config expects "
                                 f"{self.in_features} (input_channels or input_dim), got {_describe(x)}")
        if (self.pos_emb is not None or self.fourier is not None) and x.shape[1] != c.input_len:
            raise ValueError(f"input_array has {x.shape[1]} positions but the {c.pos_encoding} position "
                             f"encoding has input_len={c.input_len}, got {_describe(x)}")
        if x.shape[0] == 0:
            raise ValueError("input_array has an empty batch")

    def forward(self, *inputs) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        if len(inputs) == 1 and isinstance(inputs[0], tuple):
            inputs = inputs[0]
        if not 1 <= len(inputs) <= 3:
            raise TypeError(f"Embeddings.forward takes (input_array, attention_mask=None, output_array=None), "
                            f"got {len(inputs)} items")
        input_array, attention_mask, output_array = (tuple(inputs) + (None, None))[:3]
        c = self.config
        self._check_input(input_array)
        batch, length = input_array.shape[:2]
        if attention_mask is not None:
            attention_mask = _check_mask(attention_mask, batch, length)

        if self.token_embedding is not None:
            x = self.token_embedding(input_array)
        else:
            x = input_array
            if self.fourier is not None:
                x = torch.cat([x, self.fourier.to(x.dtype).expand(batch, -1, -1)], dim=-1)
            if self.input_proj is not None:
                x = self.input_proj(x)
        if self.pos_emb is not None:
            x = x + self.pos_emb

        if c.decoder_type == "latent_pool":
            if output_array is not None:
                raise ValueError("output_array (decoder queries) needs decoder_type='attention'; "
                                 "this config pools the latents instead")
            queries = None
        elif output_array is None:
            queries = self.output_array.expand(batch, -1, -1)
        else:
            if not isinstance(output_array, torch.Tensor) or not output_array.is_floating_point():
                raise TypeError(f"output_array must be a floating-point torch.Tensor, got "
                                f"{getattr(output_array, 'dtype', type(output_array).__name__)}")
            if output_array.dim() != 3 or output_array.shape[0] != batch or output_array.shape[2] != c.output_dim:
                raise ValueError(f"output_array must be (batch={batch}, queries, output_dim={c.output_dim}), "
                                 f"got {_describe(output_array)}")
            queries = output_array
        if c.decoder_reduction == "eot" and queries is not None:
            if queries.shape[1] != length:
                raise ValueError(f"decoder_reduction='eot' needs one output query per input position "
                                 f"({length}), got {queries.shape[1]}")
            if attention_mask is None:
                last = torch.full((batch,), length - 1, device=x.device)
            else:  # index of the last True; an all-False row falls back to the last position
                last = length - 1 - attention_mask.flip(-1).long().argmax(-1)
            queries = queries.gather(1, last.view(batch, 1, 1).expand(batch, 1, queries.shape[2]))
        latents = self.latent_array.expand(batch, -1, -1)
        if c.latents_from_inputs:
            latents = latents + _window_means(x, attention_mask, c.latent_len)
        return x, attention_mask, latents, queries


class EncoderBlock(nn.Module):
    """Cross-attention from the latents to the inputs (heads: config.cross_heads).

    forward(input_array, attention_mask, latent_array, output_array), or one tuple of the four,
    returns (latent_array (batch, latent_len, latent_dim), output_array, attentions). With
    need_weights=True attentions is [the (batch, cross_heads, latent_len, input_len) map], else None.
    """

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        c = config
        self.block = Block(c.input_dim, c.latent_dim, c.cross_heads, c.ffw_latent, c.dropout, add_residual=True)

    def forward(self, *inputs, need_weights: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Attentions]:
        input_array, attention_mask, latent_array, output_array = _unpack(
            inputs, ("input_array", "attention_mask", "latent_array", "output_array"), "EncoderBlock")
        latent_array, weights = self.block(input_array, latent_array, attention_mask, need_weights)
        return latent_array, output_array, ([weights] if need_weights else None)


class ProcessorBlock(nn.Module):
    """Self-attention over the latents (heads: config.num_heads).

    forward(latent_array, output_array, attentions), or one tuple of the three, returns the same
    three; when attentions is a list, this block's (batch, num_heads, latent_len, latent_len) map is
    appended (in a new list), when it is None the fast path runs.
    """

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        c = config
        self.block = Block(c.latent_dim, c.latent_dim, c.num_heads, c.ffw_latent, c.dropout,
                           add_residual=True, self_attention=True)

    def forward(self, *inputs) -> Tuple[torch.Tensor, torch.Tensor, Attentions]:
        latent_array, output_array, attentions = _unpack(
            inputs, ("latent_array", "output_array", "attentions"), "ProcessorBlock")
        latent_array, weights = self.block(latent_array, latent_array, None, attentions is not None)
        return latent_array, output_array, (None if attentions is None else attentions + [weights])


class DecoderBlock(nn.Module):
    """Cross-attention from the output queries to the latents, then reduction and projection.

    forward(latent_array, output_array, attentions), or one tuple of the three, returns
    (logits, attentions): logits are (batch, n_classes) with a decoder_reduction and
    (batch, output_len, n_classes) without (output_dim instead of n_classes when
    decoder_projection is False). The reduction pools the decoded queries before the projection.
    With decoder_type='latent_pool' there is no cross-attention: the latents themselves are pooled,
    normalised and projected (the Perceiver paper's classifier). With config.queries_from_latents, the
    query for position p first gets the latent of p's window added; `query_positions` (batch, queries)
    says which positions the queries stand for (default: all output_len of them, in order).
    """

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        c = self.config = config
        if c.decoder_type == "attention":
            self.block = Block(c.latent_dim, c.output_dim, c.cross_heads, c.ffw_output, c.dropout,
                               add_residual=c.decoder_residual)
            width = c.output_dim
        else:  # pre-LN blocks leave the residual stream unnormalised: normalise before the head
            self.norm = nn.LayerNorm(c.latent_dim)
            width = c.latent_dim
        self.projection = nn.Linear(width, c.n_classes) if c.decoder_projection else None

    def forward(self, *inputs, query_positions: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Attentions]:
        latent_array, output_array, attentions = _unpack(
            inputs, ("latent_array", "output_array", "attentions"), "DecoderBlock")
        c = self.config
        if c.queries_from_latents:
            window = c.output_len // c.latent_len
            if query_positions is None:
                if output_array.shape[1] != c.output_len:
                    raise ValueError(f"queries_from_latents needs the positions of {output_array.shape[1]} custom "
                                     f"queries (query_positions); without them there must be output_len={c.output_len}")
                output_array = output_array + latent_array.repeat_interleave(window, dim=1)
            else:
                index = (query_positions // window)[..., None].expand(-1, -1, latent_array.shape[-1])
                output_array = output_array + latent_array.gather(1, index)
        if c.decoder_type == "attention":
            out, weights = self.block(latent_array, output_array, None, attentions is not None)
            attentions = None if attentions is None else attentions + [weights]
        else:
            out = latent_array
        reduction = self.config.decoder_reduction
        if reduction == "mean":
            out = out.mean(dim=1)
        elif reduction == "max":
            out = out.max(dim=1).values
        elif reduction == "sum":
            out = out.sum(dim=1)
        elif reduction in ("first", "eot"):   # Embeddings kept only the eot query, so it is first
            out = out[:, 0]
        elif reduction == "last":
            out = out[:, -1]
        if self.config.decoder_type == "latent_pool":
            out = self.norm(out)
        if self.projection is not None:
            out = self.projection(out)
        return out, attentions


def get_sequential_from_config(config: PerceiverConfig, indices: Optional[Sequence[int]] = None) -> nn.Sequential:
    """The Perceiver as `nn.Sequential(embeddings, encoder, processor_0 .. processor_{L-1}, decoder)`.

    Each module is initialised under its own seed derived from `config.seed` and its index, so
    `indices` (a subset of range(num_layers + 3)) builds just those modules with the very weights
    the full model has: a pipeline rank builds only its stage. With `config.share_weights` the
    processors are one module repeated (its index is 2).
    """
    if not isinstance(config, PerceiverConfig):
        raise TypeError(f"config must be a PerceiverConfig, got {type(config).__name__}")
    total = config.num_layers + 3
    wanted = list(range(total)) if indices is None else list(indices)
    if not wanted or any(not 0 <= i < total for i in wanted) or wanted != sorted(set(wanted)):
        raise ValueError(f"indices must be increasing module indices in [0, {total}), got {indices}")
    shared = None
    modules: "OrderedDict[str, nn.Module]" = OrderedDict()
    for i in wanted:
        if i == 0:
            name, make = "embeddings", Embeddings
        elif i == 1:
            name, make = "encoder", EncoderBlock
        elif i == total - 1:
            name, make = "decoder", DecoderBlock
        else:
            name, make = f"processor_{i - 2}", ProcessorBlock
        if make is ProcessorBlock and config.share_weights:
            if shared is None:
                with _seeded(config.seed, 2):
                    shared = ProcessorBlock(config)
            modules[name] = shared
            continue
        with _seeded(config.seed, i):
            modules[name] = make(config)
    return nn.Sequential(modules)


# --------------------------------------------------------------------------- the models

class Perceiver(nn.Module):
    """The Perceiver: inputs -> latents (cross-attention) -> latents (self-attention) -> outputs.

    forward(input_array, attention_mask=None, output_array=None, return_attentions=False):
    input_array is (batch, input_len, features) floats or (batch, input_len) token ids,
    attention_mask (batch, input_len) bool or 0/1 (1 = attend), output_array optional queries
    (batch, queries, output_dim). Returns logits, (batch, n_classes) or (batch, output_len,
    n_classes) without decoder_reduction; with return_attentions, (logits, maps): the encoder's
    cross-attention (batch, cross_heads, latent_len, input_len), each processor's
    (batch, num_heads, latent_len, latent_len) and, with decoder_type='attention', the decoder's
    (batch, cross_heads, queries, latent_len).
    """

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        if not isinstance(config, PerceiverConfig):
            raise TypeError(f"config must be a PerceiverConfig, got {type(config).__name__}")
        self.config = config
        self.model = get_sequential_from_config(config)

    def forward(self, input_array: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                output_array: Optional[torch.Tensor] = None, return_attentions: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
        return self._run(input_array, attention_mask, output_array, return_attentions)

    def _run(self, input_array, attention_mask, output_array, return_attentions: bool,
             query_positions: Optional[torch.Tensor] = None):
        if not isinstance(return_attentions, bool):
            raise TypeError(f"return_attentions must be True or False, got {return_attentions!r}")
        blocks = list(self.model)
        h = blocks[0](input_array, attention_mask, output_array)
        h = blocks[1](*h, need_weights=return_attentions)
        for block in blocks[2:-1]:
            h = block(h)
        logits, attentions = blocks[-1](h, query_positions=query_positions)
        return (logits, attentions) if return_attentions else logits

    def num_parameters(self, include_non_trainable: bool = True) -> int:
        """Number of parameters, a shared weight counted once; fixed position tables count as
        non-trainable."""
        return sum(p.numel() for p in self.parameters() if include_non_trainable or p.requires_grad)

    def save(self, path: str, dtype: Optional[torch.dtype] = None) -> None:
        """Write weights and config to `path`, loadable with `torch.load(path, weights_only=True)`
        and restored by `Perceiver.load(path)`.

        dtype=torch.float16 (or bfloat16) stores the floating-point weights rounded to that type, at
        half the size; `load` puts them back into float32 parameters, so the loaded model is the
        rounded one (evaluate that one). The default keeps every weight exactly.
        """
        state = self.state_dict()
        if dtype is not None:
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.float16, got {dtype!r}")
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        torch.save({"format": "percnb/1", "class": type(self).__name__, "config": self.config.to_dict(),
                    "state_dict": state}, path)

    @classmethod
    def load(cls, path: str, map_location: Union[str, torch.device] = "cpu") -> "Perceiver":
        """Rebuild the model saved by `save` (its own class: Perceiver, PerceiverImage or
        PerceiverMLM), in eval mode, with bit-identical weights."""
        payload = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != "percnb/1":
            raise ValueError(f"{path} is not a file written by percnb's Perceiver.save")
        classes = {k.__name__: k for k in (Perceiver, PerceiverImage, PerceiverMLM)}
        target = classes.get(payload["class"])
        if target is None or not issubclass(target, cls):
            raise ValueError(f"{path} holds a {payload['class']}, which {cls.__name__}.load cannot return; "
                             f"use {payload['class'] if target else 'Perceiver'}.load")
        model = target(PerceiverConfig.from_dict(payload["config"]))
        model.load_state_dict(payload["state_dict"])
        return model.eval()


class PerceiverImage(Perceiver):
    """Image classifier: (batch, channels, height, width) raw pixels -> (batch, n_classes) logits.

    Pixels become a set of height*width vectors of `channels` values; their places come back as
    2-D Fourier features concatenated to each pixel (pos_encoding='fourier'). The config needs
    input_shape=(height, width), input_len=height*width and input_channels=channels (a linear
    layer maps pixels + features to input_dim). Use `image_config` for a ready config.
    """

    def __init__(self, config: PerceiverConfig):
        if config.input_type != "raw" or config.input_shape is None or len(config.input_shape) != 2:
            raise ValueError("PerceiverImage needs input_type='raw' and input_shape=(height, width), "
                             f"got input_type={config.input_type!r}, input_shape={config.input_shape}")
        super().__init__(config)

    def forward(self, images: torch.Tensor, return_attentions: bool = False):  # type: ignore[override]
        c = self.config
        channels = c.input_channels or c.input_dim
        expected = (channels, *c.input_shape)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (batch, {', '.join(map(str, expected))}), "
                            f"got {type(images).__name__}")
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be (batch, channels, height, width) = (batch, "
                             f"{', '.join(map(str, expected))}), got {_describe(images)}")
        return super().forward(images.flatten(2).transpose(1, 2), return_attentions=return_attentions)


class PerceiverMLM(Perceiver):
    """Masked language model: (batch, seq) token ids -> (batch, seq, vocab) logits.

    One output query per position (output_len = input_len, no decoder_reduction, n_classes =
    input_num_tokens). forward(tokens, attention_mask=None, positions=None, return_attentions=False).
    `positions` (batch, k) long picks the positions to decode: the logits are then (batch, k, vocab).
    Output queries do not attend to each other, so this equals decoding every position and picking
    those k, at k / seq of the decoder's cost: training scores only the masked positions, so it
    decodes only those (see `percnb.train.masked_lm_step`).
    """

    def __init__(self, config: PerceiverConfig):
        if config.input_type != "tokens" or config.decoder_reduction is not None:
            raise ValueError("PerceiverMLM needs input_type='tokens' and decoder_reduction=None, got "
                             f"input_type={config.input_type!r}, decoder_reduction={config.decoder_reduction!r}")
        if config.output_len != config.input_len or config.n_classes != config.input_num_tokens:
            raise ValueError(f"PerceiverMLM needs output_len == input_len ({config.input_len}) and n_classes == "
                             f"input_num_tokens ({config.input_num_tokens}), got output_len={config.output_len}, "
                             f"n_classes={config.n_classes}")
        super().__init__(config)

    def forward(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,  # type: ignore[override]
                positions: Optional[torch.Tensor] = None, return_attentions: bool = False):
        queries = None
        if positions is not None:
            seq = self.config.output_len
            if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.is_floating_point() \
                    or positions.dtype == torch.bool:
                raise TypeError("positions must be a (batch, k) integer tensor of positions to decode, got "
                                f"{_describe(positions) if isinstance(positions, torch.Tensor) else type(positions).__name__}")
            if isinstance(tokens, torch.Tensor) and positions.shape[0] != tokens.shape[0]:
                raise ValueError(f"positions must have one row per sample ({tokens.shape[0]}), got {_describe(positions)}")
            if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= seq):
                raise ValueError(f"positions must be in [0, {seq}), got min {int(positions.min())} and "
                                 f"max {int(positions.max())}")
            queries = self.model.embeddings.output_array[positions]
        return self._run(tokens, attention_mask, queries, return_attentions, query_positions=positions)


def image_config(channels: int, height: int, width: int, n_classes: int, **overrides) -> PerceiverConfig:
    """A PerceiverConfig for `PerceiverImage` on (channels, height, width) images; any field can be
    overridden. The defaults are the ones the digits notebook trains."""
    fields = dict(input_len=height * width, input_shape=(height, width), input_channels=channels,
                  input_dim=96, latent_len=32, latent_dim=96, output_len=1, output_dim=96,
                  ffw_latent=384, ffw_output=384, num_heads=4, num_layers=4, cross_heads=1,
                  pos_encoding="fourier", fourier_bands=6, decoder_reduction="mean", n_classes=n_classes)
    fields.update(overrides)
    return PerceiverConfig(**fields)


def mlm_config(seq_len: int, vocab_size: int, **overrides) -> PerceiverConfig:
    """A PerceiverConfig for `PerceiverMLM` on (batch, seq_len) token ids over `vocab_size` tokens;
    any field can be overridden. The defaults are the byte model of notebook 04 and
    scripts/train_mlm.py: one latent per 4 tokens (seq_len must be divisible by 4), width 256, 4
    cross-attention heads, sinusoid positions, latents seeded from their input windows and queries
    from their window's latent (notebook 04 measures what each of these buys)."""
    fields = dict(input_len=seq_len, input_type="tokens", input_num_tokens=vocab_size, output_len=seq_len,
                  n_classes=vocab_size, decoder_reduction=None, input_dim=256, latent_len=max(1, seq_len // 4),
                  latent_dim=256, output_dim=256, ffw_latent=1024, ffw_output=1024, num_heads=8, num_layers=4,
                  cross_heads=4, pos_encoding="sinusoid", latents_from_inputs=True, queries_from_latents=True,
                  decoder_residual=True)
    fields.update(overrides)
    return PerceiverConfig(**fields)


def get_distributed_model(config: PerceiverConfig, *args, **kwargs):
    """Pipeline-parallel Perceiver on `torch.distributed.pipelining`; see `percnb.pipeline`."""
    from .pipeline import get_distributed_model as build
    return build(config, *args, **kwargs)
