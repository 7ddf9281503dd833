"""The Perceiver (Jaegle et al. 2021) and Perceiver IO (2022), read top to bottom: attention, the MLP,
the pre-LayerNorm block, then the model, which reads its inputs into a few latents, thinks in the latents
and reads them back out. Fast kernels that compute the same thing live in percnb/fast.py; each is tested
equal to the code here. The seed's nn.Sequential pieces, for pipelines, follow; Perceiver IO on pixel sets
(notebook 06) closes the file.

Shapes: inputs (batch, M, input_dim), latents (batch, N, latent_dim), decoder queries (batch, O, output_dim).
"""
from __future__ import annotations

import contextlib
import math
import re
from collections import OrderedDict
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint
from torch import nn

from . import checks, fast, io
from .config import PerceiverConfig, image_config, image_io_config, mlm_config
from .encodings import build_position_encoding, fourier_encode, grid_coordinates

__all__ = [
    "PerceiverConfig", "build_position_encoding", "attention", "MLP", "Block", "Perceiver", "PerceiverImage",
    "PerceiverMLM", "PerceiverImageIO", "image_config", "image_io_config", "mlm_config",
    "InputEmbedding", "Embeddings", "EncoderBlock", "ProcessorBlock",
    "DecoderBlock", "get_sequential_from_config", "get_distributed_model",
]

FORMAT = "percnb/2"          # what `Perceiver.save` writes; `load` also reads "percnb/1" (the seed's layout)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, need_weights: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """softmax(q k^T / sqrt(d)) v, the softmax over the keys.

    q: (batch, heads, q_len, d), k: (batch, heads, kv_len, d), v: (batch, heads, kv_len, d_v);
    mask: (batch, kv_len) bool, True = attend. Returns (out (batch, heads, q_len, d_v), the weights
    (batch, heads, q_len, kv_len) if need_weights else None). Masked keys get exactly zero weight.
    A sample with no key to attend to gets zero weights and a zero output, not the NaN of a softmax
    over a row of -inf.
    """
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5               # (batch, heads, q_len, kv_len)
    if mask is not None:
        has_key = mask.any(dim=-1)[:, None, None, None]                  # (batch, 1, 1, 1)
        # A sample with no key attends everywhere (finite), and its weights are zeroed below.
        scores = scores.masked_fill(~(mask[:, None, None, :] | ~has_key), float("-inf"))
    weights = scores.softmax(dim=-1)
    if mask is not None:
        weights = weights * has_key
    dropped = nn.functional.dropout(weights, dropout_p) if dropout_p > 0 else weights
    return dropped @ v, (weights if need_weights else None)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, len, D) -> (batch, heads, len, D / heads)."""
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, len, d) -> (batch, len, heads * d)."""
    return x.transpose(1, 2).flatten(2)


class MLP(nn.Sequential):
    """Linear(dim, hidden), GELU, Linear(hidden, dim), Dropout: (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))


class Block(nn.Module):
    """Pre-LayerNorm attention + MLP block, for cross-attention (q reads kv) and self-attention:

        x = q + W_o MHA(LN(q), LN(kv))        (the residual q only with add_residual)
        out = x + MLP(LN(x))

    kv: (batch, kv_len, kv_dim), q: (batch, q_len, q_dim), attn_mask: (batch, kv_len) bool or 0/1,
    True = attend -> (out (batch, q_len, q_dim), weights (batch, num_heads, q_len, kv_len) or None).
    `add_residual` adds q to the attention output (the Perceiver's latents keep their identity
    through cross-attention; a decoder may or may not want that); the MLP always has its residual.
    With `self_attention=True` the block reads its own input (kv must be q or None), with one
    LayerNorm and one fused q/k/v projection. `need_weights=True` returns the attention weights.
    `qk_dim` and `v_dim` (default q_dim, and v_dim = qk_dim) are the widths queries and keys, and
    values, are projected to: Perceiver IO compares queries and keys in a narrower space than the
    latents (DeepMind's language model: 256 of 1280) to save compute; W_o maps v_dim back to q_dim.
    `fast` (default True): without need_weights, run percnb/fast.py's kernels, which compute the same
    function with less time and memory; False runs the code below. `checkpoint=True`: when gradients
    are recorded, keep only the block's inputs for backward and compute it again there (activation
    checkpointing: the activations of the block for one more forward pass; the same outputs and gradients).
    """

    def __init__(self, kv_dim: int, q_dim: int, num_heads: int, ffw_dim: int, dropout: float = 0.0,
                 add_residual: bool = False, *, self_attention: bool = False, fast: bool = True,
                 qk_dim: Optional[int] = None, v_dim: Optional[int] = None, checkpoint: bool = False):
        super().__init__()
        qk_dim = q_dim if qk_dim is None else qk_dim
        v_dim = qk_dim if v_dim is None else v_dim
        for name, value in (("kv_dim", kv_dim), ("q_dim", q_dim), ("num_heads", num_heads), ("ffw_dim", ffw_dim),
                            ("qk_dim", qk_dim), ("v_dim", v_dim)):
            checks.positive_int(name, value)
        for name, value in (("qk_dim" if qk_dim != q_dim else "q_dim", qk_dim), ("v_dim", v_dim)):
            if value % num_heads:
                raise ValueError(f"{name}={value} is not divisible by num_heads={num_heads}")
        checks.fraction("dropout", dropout)
        if self_attention and kv_dim != q_dim:
            raise ValueError(f"self-attention needs kv_dim == q_dim, got kv_dim={kv_dim}, q_dim={q_dim}")
        self.kv_dim, self.q_dim, self.num_heads, self.qk_dim, self.v_dim = kv_dim, q_dim, num_heads, qk_dim, v_dim
        self.dropout, self.add_residual, self.self_attention, self.fast = dropout, add_residual, self_attention, fast
        self.checkpoint = checkpoint
        self.ln_q = nn.LayerNorm(q_dim)
        if self_attention:
            self.qkv = nn.Linear(q_dim, 2 * qk_dim + v_dim)  # [W_q | W_k | W_v], one matmul
        else:
            self.ln_kv = nn.LayerNorm(kv_dim)
            self.q = nn.Linear(q_dim, qk_dim)
            self.kv = nn.Linear(kv_dim, qk_dim + v_dim)      # [W_k | W_v]
        self.proj = nn.Linear(v_dim, q_dim)                  # W_o
        self.ln_mlp = nn.LayerNorm(q_dim)
        self.mlp = MLP(q_dim, ffw_dim, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, kv: Optional[torch.Tensor], q: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                need_weights: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        kv, attn_mask = self.check(kv, q, attn_mask)
        if attn_mask is not None and not self.self_attention:  # masked keys get zero weight, but 0 * NaN is NaN:
            kv = kv.masked_fill(~attn_mask[..., None], 0.0)      # zero what they hold
        if self.checkpoint and not need_weights and torch.is_grad_enabled():
            # backward reruns `attend` from kv and q, with the random state of this call (same dropout)
            return torch.utils.checkpoint.checkpoint(self.attend, kv, q, attn_mask, use_reentrant=False)
        return self.attend(kv, q, attn_mask, need_weights)

    def attend(self, kv: torch.Tensor, q: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
               need_weights: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`forward` on checked inputs, without checkpointing: (out, weights or None)."""
        if self.fast and not need_weights:
            return fast.block_forward(self, kv, q, attn_mask), None
        if self.self_attention:
            qs, ks, vs = self.qkv(self.ln_q(q)).split([self.qk_dim, self.qk_dim, self.v_dim], dim=-1)
        else:
            qs = self.q(self.ln_q(q))
            ks, vs = self.kv(self.ln_kv(kv)).split([self.qk_dim, self.v_dim], dim=-1)
        h = self.num_heads
        dropout_p = self.dropout if self.training else 0.0
        out, weights = attention(split_heads(qs, h), split_heads(ks, h), split_heads(vs, h), attn_mask, dropout_p,
                                 need_weights)
        x = self.drop(self.proj(merge_heads(out)))
        if self.add_residual:
            x = x + q
        return x + self.mlp(self.ln_mlp(x)), weights

    def check(self, kv, q, attn_mask) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Raise a ValueError naming the argument whose shape does not fit; return (kv, the mask as bool)."""
        checks.shape("q", q, ("batch", "q_len", ("q_dim", self.q_dim)))
        if self.self_attention:
            if kv is not None and kv is not q:
                raise ValueError("a self-attention Block reads its own input: pass kv=q (the same tensor) or kv=None")
            kv = q
        else:
            checks.shape("kv", kv, (("batch", len(q)), "kv_len", ("kv_dim", self.kv_dim)))
        if attn_mask is not None:
            attn_mask = checks.attention_mask(attn_mask, len(q), kv.shape[1], name="attn_mask")
        return kv, attn_mask


# --------------------------------------------------------------------------- the Perceiver

@contextlib.contextmanager
def seeded(config: PerceiverConfig, part: int) -> Iterator[None]:
    """Initialise one part of a Perceiver under its own seed, derived from config.seed and the part's index
    (0: the input side, 1: the encoder, 2 .. num_layers + 1: the processors, num_layers + 2: the output
    side), leaving the global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed * 1_000_003 + part)
        yield


class Perceiver(nn.Module):
    """The Perceiver: inputs -> latents (cross-attention) -> latents (self-attention) -> outputs.

    forward(input_array, attention_mask=None, output_array=None, return_attentions=False):
    input_array is (batch, input_len, features) floats or (batch, input_len) token ids,
    attention_mask (batch, input_len) bool or 0/1 (1 = attend), output_array optional queries
    (batch, queries, output_dim) replacing the learned ones (Perceiver IO). Returns logits,
    (batch, n_classes) or (batch, output_len, n_classes) without decoder_reduction; with
    return_attentions, (logits, maps): the encoder's cross-attention (batch, cross_heads, latent_len,
    input_len), each processor's (batch, num_heads, latent_len, latent_len) and, with
    decoder_type='attention', the decoder's (batch, decoder_heads or cross_heads, queries, latent_len).
    `fast` (default True) runs percnb/fast.py's kernels where no maps are asked for; `model.fast = False`
    runs the textbook code of this file everywhere. Both compute the same function.
    """

    def __init__(self, config: PerceiverConfig, fast: bool = True):
        super().__init__()
        if not isinstance(config, PerceiverConfig):
            raise TypeError(f"config must be a PerceiverConfig, got {type(config).__name__}")
        c = self.config = config
        # Each part is initialised under its own seed (`seeded`), so that the seed's nn.Sequential pieces at the
        # end of this file, which a pipeline rank builds only for its own stage, get the very weights of this model.
        with seeded(c, 0):
            self.embed = InputEmbedding(c)                  # inputs -> (batch, M, input_dim)
            self.latents = latent_array(c)                  # (N, latent_dim), learned
            self.queries = output_queries(c)                # (O, output_dim) learned decoder queries, or None
        with seeded(c, 1):
            self.encoder = encoder_block(c)                 # the latents read the inputs
        self.processors = nn.ModuleList()                   # the latents read each other, num_layers times
        period = sharing_period(c)                          # weights repeat every `period` processors
        for layer in range(c.num_layers):
            with seeded(c, 2 + layer):
                shared = layer >= period
                self.processors.append(self.processors[layer % period] if shared else processor_block(c))
        with seeded(c, c.num_layers + 2):
            self.decoder = decoder_block(c)                 # the queries read the latents (None: pool them)
            self.norm = nn.LayerNorm(c.latent_dim) if self.decoder is None else None
            self.head = output_head(c)                      # (..., n_classes), or None
            # tie_embeddings: the logits are read off the input embedding matrix, plus a bias per token
            self.head_bias = nn.Parameter(torch.zeros(c.n_classes)) if c.tie_embeddings else None
        self.fast = fast

    def forward(self, input_array: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                output_array: Optional[torch.Tensor] = None, return_attentions: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
        c = self.config
        if not isinstance(return_attentions, bool):
            raise TypeError(f"return_attentions must be True or False, got {return_attentions!r}")
        if output_array is not None and self.decoder is None:
            raise ValueError("output_array (decoder queries) needs decoder_type='attention'; "
                             "this config pools the latents instead")
        maps = []                                                        # attention weights, when asked for
        x, mask = self.embed(input_array, attention_mask)                # (batch, M, input_dim), (batch, M) bool
        z = self.latents.expand(len(x), -1, -1)                          # (batch, N, latent_dim)
        if c.latents_from_inputs:                                        # each latent + the mean of its window
            z = z + window_means(x, mask, c.latent_len)
        z, weights = self.encoder(x, z, mask, need_weights=return_attentions)
        maps.append(weights)
        for block in self.processors:
            z, weights = block(z, z, need_weights=return_attentions)
            maps.append(weights)
        if self.decoder is None:                                         # the Perceiver paper's classifier
            out = self.norm(pool(z, c.decoder_reduction))
        else:                                                            # Perceiver IO's decoder
            queries = self.decoder_queries(z, output_array)              # (batch, O, output_dim)
            if c.decoder_reduction == "eot":                             # decode only the last unmasked position
                queries = last_unmasked(queries, mask, x.shape[1])
            out, weights = self.decoder(z, queries, need_weights=return_attentions)
            maps.append(weights)
            out = pool(out, c.decoder_reduction)
        if c.tie_embeddings:                                             # DeepMind's MLM: one matrix in and out
            logits = out @ self.embed.token_embedding.weight.t() + self.head_bias
        else:
            logits = out if self.head is None else self.head(out)
        return (logits, maps) if return_attentions else logits

    def decoder_queries(self, latents: torch.Tensor, output_array: Optional[torch.Tensor]) -> torch.Tensor:
        """The decoder's queries (batch, queries, output_dim): the learned ones, or `output_array`; with
        queries_from_latents each one plus the latent of its window. Subclasses may read `output_array`
        as another description of what to decode (PerceiverMLM: positions)."""
        if output_array is None:
            queries = self.queries.expand(len(latents), -1, -1)
        else:
            queries = custom_queries(output_array, len(latents), self.config.output_dim)
        if self.config.queries_from_latents:
            queries = add_window_latents(queries, latents, self.config)
        return queries

    @property
    def fast(self) -> bool:
        """True when every block runs percnb/fast.py's kernels (where no maps are asked for); set it to
        switch them all (False: the textbook code of percnb/models.py)."""
        return all(block.fast for block in self.modules() if isinstance(block, Block))

    @fast.setter
    def fast(self, value: bool) -> None:
        checks.boolean("fast", value)
        for block in self.modules():
            if isinstance(block, Block):
                block.fast = value

    def num_parameters(self, include_non_trainable: bool = True) -> int:
        """Number of parameters, a shared weight counted once; fixed position tables count as
        non-trainable."""
        return sum(p.numel() for p in self.parameters() if include_non_trainable or p.requires_grad)

    def save(self, path: str, dtype: Optional[torch.dtype] = None) -> None:
        """Write weights and config to `path`, loadable with `torch.load(path, weights_only=True)`
        and restored by `Perceiver.load(path)`. The write is atomic (`percnb.io.save_checkpoint`): a reader
        sees the previous file or the new one, never half of one, and a save that fails part-way (disk
        full, Ctrl-C) leaves the previous file as it was. `path` may also be an open binary file.

        dtype=torch.float16 (or bfloat16) stores the floating-point weights rounded to that type, at
        half the size; `load` puts them back into float32 parameters, so the loaded model is the
        rounded one (evaluate that one). The default keeps every weight exactly.
        """
        state = self.state_dict()
        if dtype is not None:
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.float16, got {dtype!r}")
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        io.save_checkpoint({"format": FORMAT, "class": type(self).__name__, "config": self.config.to_dict(),
                            "state_dict": state}, path)

    @classmethod
    def load(cls, path: str, map_location: Union[str, torch.device] = "cpu") -> Perceiver:
        """Rebuild the model saved by `save` (its own class: Perceiver, PerceiverImage, PerceiverMLM or
        PerceiverImageIO), in eval mode, with bit-identical weights. Files of the seed's layout
        ("percnb/1", before percnb/2) load too: their keys are converted (`model_key`). The model is built
        on the device `map_location` puts the weights on. A ValueError names the file and what is wrong
        with it, including a config edited after saving (`percnb.io.read_checkpoint`)."""
        payload = io.read_checkpoint(path, map_location, (FORMAT, "percnb/1"))
        classes = {k.__name__: k for k in (Perceiver, PerceiverImage, PerceiverMLM, PerceiverImageIO)}
        target = classes.get(payload["class"])
        if target is None or not issubclass(target, cls):
            raise ValueError(f"{path} holds a {payload['class']}, which {cls.__name__}.load cannot return; "
                             f"use {payload['class'] if target else 'Perceiver'}.load")
        state = payload["state_dict"]
        if payload["format"] == "percnb/1":       # the seed's nn.Sequential, held as `model`
            state = {model_key(k.removeprefix("model.")): v for k, v in state.items()}
        with torch.device(next(iter(state.values())).device):     # where map_location put the weights
            model = target(PerceiverConfig.from_dict(payload["config"]))
        model.load_state_dict(state)
        return model.eval()

    @classmethod
    def from_pretrained(cls, name: str = "bytes-mlm", map_location: Union[str, torch.device] = "cpu") -> Perceiver:
        """A model that ships inside the package (`percnb.assets.PRETRAINED`; "bytes-mlm" is notebook
        04's byte-level PerceiverMLM), rebuilt as `load` does; `percnb.assets.report(name)` is its report."""
        from . import assets
        model = assets.load_pretrained(name, map_location)
        if not isinstance(model, cls):
            raise ValueError(f"{name!r} is a {type(model).__name__}, which {cls.__name__}.from_pretrained cannot "
                             f"return; use {type(model).__name__}.from_pretrained")
        return model


class PerceiverImage(Perceiver):
    """Image classifier: (batch, channels, height, width) raw pixels -> (batch, n_classes) logits.

    Pixels become a set of height*width vectors of `channels` values; their places come back as
    2-D Fourier features concatenated to each pixel (pos_encoding='fourier'). The config needs
    input_shape=(height, width), input_len=height*width and input_channels=channels (a linear
    layer maps pixels + features to input_dim). Use `image_config` for a ready config.
    """

    def __init__(self, config: PerceiverConfig, fast: bool = True):
        if config.input_type != "raw" or config.input_shape is None or len(config.input_shape) != 2:
            raise ValueError("PerceiverImage needs input_type='raw' and input_shape=(height, width), "
                             f"got input_type={config.input_type!r}, input_shape={config.input_shape}")
        super().__init__(config, fast)

    def forward(self, images: torch.Tensor, return_attentions: bool = False):  # type: ignore[override]
        c = self.config
        expected = ", ".join(map(str, (c.input_channels or c.input_dim, *c.input_shape)))
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (batch, {expected}), got {type(images).__name__}")
        if not images.is_floating_point():      # uint8 pixels are 0..255: the scale is the caller's choice
            raise TypeError(f"images must be floating point (e.g. pixels scaled to [0, 1]), got images of dtype "
                            f"{images.dtype}; convert with images.float() / 255")
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.input_channels or c.input_dim, *c.input_shape):
            raise ValueError(f"images must be (batch, channels, height, width) = (batch, {expected}), "
                             f"got {checks.describe(images)}")
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

    def __init__(self, config: PerceiverConfig, fast: bool = True):
        if config.input_type != "tokens" or config.decoder_reduction is not None:
            raise ValueError("PerceiverMLM needs input_type='tokens' and decoder_reduction=None, got "
                             f"input_type={config.input_type!r}, decoder_reduction={config.decoder_reduction!r}")
        if config.output_len != config.input_len or config.n_classes != config.input_num_tokens:
            raise ValueError(f"PerceiverMLM needs output_len == input_len ({config.input_len}) and n_classes == "
                             f"input_num_tokens ({config.input_num_tokens}), got output_len={config.output_len}, "
                             f"n_classes={config.n_classes}")
        super().__init__(config, fast)

    def forward(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,  # type: ignore[override]
                positions: Optional[torch.Tensor] = None, return_attentions: bool = False):
        if positions is not None:
            seq = self.config.output_len
            if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.is_floating_point() \
                    or positions.dtype == torch.bool:
                raise TypeError(f"positions must be a (batch, k) integer tensor of positions to decode, got "
                                f"{checks.describe(positions)}")
            if isinstance(tokens, torch.Tensor) and positions.shape[0] != tokens.shape[0]:
                raise ValueError(f"positions must have one row per sample ({tokens.shape[0]}), "
                                 f"got {checks.describe(positions)}")
            if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= seq):
                raise ValueError(f"positions must be in [0, {seq}), got min {int(positions.min())} and "
                                 f"max {int(positions.max())}")
        return super().forward(tokens, attention_mask, positions, return_attentions)

    def decoder_queries(self, latents: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
        """The learned queries of `positions` (batch, k) (all positions when None), each plus the latent of
        its window with queries_from_latents: (batch, k, output_dim)."""
        if positions is None:
            return super().decoder_queries(latents, None)
        queries = self.queries[positions]
        if self.config.queries_from_latents:
            queries = add_window_latents(queries, latents, self.config, positions)
        return queries


# --------------------------------------------------------------------------- the parts, built once each

def latent_array(c: PerceiverConfig) -> nn.Parameter:
    """The learned latents (latent_len, latent_dim), std latent_init_std so that they start distinct."""
    return nn.Parameter(torch.randn(c.latent_len, c.latent_dim) * c.latent_init_std)


def output_queries(c: PerceiverConfig) -> Optional[nn.Parameter]:
    """The decoder's learned queries (output_len, output_dim); None when the latents are pooled instead."""
    if c.decoder_type != "attention":
        return None
    return nn.Parameter(torch.randn(c.output_len, c.output_dim) * c.pos_init_std)


def encoder_block(c: PerceiverConfig) -> Block:
    """Cross-attention: the latents (q) read the inputs (kv), with cross_heads heads (widths: `c.widths`)."""
    heads, qk, v, ffw = c.widths("encoder")
    return Block(c.input_dim, c.latent_dim, heads, ffw, c.dropout, add_residual=c.query_residual, qk_dim=qk, v_dim=v,
                 checkpoint=c.checkpoint_activations)


def processor_block(c: PerceiverConfig) -> Block:
    """Self-attention over the latents, with num_heads heads."""
    heads, qk, v, ffw = c.widths("processor")
    return Block(c.latent_dim, c.latent_dim, heads, ffw, c.dropout, add_residual=True, self_attention=True,
                 qk_dim=qk, v_dim=v, checkpoint=c.checkpoint_activations)


def sharing_period(c: PerceiverConfig) -> int:
    """Processor i uses the weights of processor i % period: 1 with share_weights, layers_per_block when
    set (DeepMind's blocks of layers applied num_layers / layers_per_block times), else num_layers."""
    return 1 if c.share_weights else (c.layers_per_block or c.num_layers)


def decoder_block(c: PerceiverConfig) -> Optional[Block]:
    """Cross-attention: the output queries (q) read the latents (kv); None when the latents are pooled."""
    if c.decoder_type != "attention":
        return None
    heads, qk, v, ffw = c.widths("decoder")
    return Block(c.latent_dim, c.output_dim, heads, ffw, c.dropout, add_residual=c.decoder_residual,
                 qk_dim=qk, v_dim=v)


def output_head(c: PerceiverConfig) -> Optional[nn.Linear]:
    """The projection of the decoded (or pooled) width to n_classes; None without decoder_projection."""
    if not c.decoder_projection:
        return None
    return nn.Linear(c.output_dim if c.decoder_type == "attention" else c.latent_dim, c.n_classes)


class InputEmbedding(nn.Module):
    """Checks and embeds the inputs: forward(input_array, attention_mask=None) -> (x (batch, input_len,
    input_dim), the mask as bool (batch, input_len) or None).

    Token ids (batch, input_len) look up a learned table; raw features (batch, input_len, input_channels
    or input_dim) get the Fourier features of their grid position concatenated (pos_encoding='fourier')
    and a linear map to input_dim when their width differs (`input_projection` decides otherwise); then
    a trainable or sinusoid position table is added (or, with pos_concat_dim, concatenated).
    """

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        c = self.config = config
        self.token_embedding = self.input_proj = self.pos_emb = self.fourier = None
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
            project = c.input_projection
            if project is None:   # percnb's rule: project when the width differs or input_channels asks for it
                project = proj_in != c.input_dim or c.input_channels is not None
            if project:
                # with pos_concat_dim the positions fill the last channels, so the pixels get the rest
                self.input_proj = nn.Linear(proj_in, c.input_dim - (c.pos_concat_dim or 0))
        if c.pos_encoding in ("trainable", "sinusoid"):
            self.pos_emb = build_position_encoding(c.pos_encoding, c, c.input_len, c.pos_concat_dim or c.input_dim)

    def forward(self, input_array: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        input_array = self.check(input_array)
        batch, length = input_array.shape[:2]
        if attention_mask is not None:
            attention_mask = checks.attention_mask(attention_mask, batch, length)
        if self.token_embedding is not None:
            x = self.token_embedding(input_array)
        else:   # padding may hold anything (NaN, inf): zeroed, it changes no output and no gradient
            x = input_array if attention_mask is None else input_array.masked_fill(~attention_mask[..., None], 0.0)
            if self.fourier is not None:
                x = torch.cat([x, self.fourier.to(x.dtype).expand(batch, -1, -1)], dim=-1)
            if self.input_proj is not None:
                x = self.input_proj(x)
        if self.config.pos_concat_dim is not None:  # DeepMind's learned-position images: concatenated, not added
            x = torch.cat([x, self.pos_emb.expand(batch, -1, -1)], dim=-1)
        elif self.pos_emb is not None:
            x = x + self.pos_emb
        return x, attention_mask

    def check(self, x: torch.Tensor) -> torch.Tensor:
        """Raise a TypeError or ValueError saying how `x` differs from what the config expects; return it
        as the embedding reads it: token ids of any integer dtype as torch.long (after the range check),
        floats in the dtype of the weights (float64 data into a float32 model, say)."""
        c = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input_array must be a torch.Tensor, got {type(x).__name__}")
        if c.input_type == "tokens":
            if x.dtype in (torch.bool, torch.uint64) or x.is_floating_point() or x.is_complex():
                raise TypeError(f"input_type='tokens' needs integer token ids (torch.long, or an integer dtype "
                                f"up to 32 bits), got input_array of dtype {x.dtype}")
            x = x.long()
            if x.dim() != 2:
                raise ValueError(f"token input_array must be (batch, input_len), got {checks.describe(x)}")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= c.input_num_tokens):
                raise ValueError(f"token ids must be in [0, input_num_tokens={c.input_num_tokens}), "
                                 f"got min {int(x.min())} and max {int(x.max())}")
        else:
            if not x.is_floating_point():
                raise TypeError(f"input_type='raw' needs a floating-point input_array, got {x.dtype}; "
                                "convert with .float() (or set input_type='tokens' for ids)")
            if x.dim() != 3:
                raise ValueError(f"raw input_array must be (batch, input_len, {self.in_features}), "
                                 f"got {checks.describe(x)}")
            if x.shape[-1] != self.in_features:
                raise ValueError(f"input_array has {x.shape[-1]} features per position but the config expects "
                                 f"{self.in_features} (input_channels or input_dim), got {checks.describe(x)}")
        if (self.pos_emb is not None or self.fourier is not None) and x.shape[1] != c.input_len:
            raise ValueError(f"input_array has {x.shape[1]} positions but the {c.pos_encoding} position "
                             f"encoding has input_len={c.input_len}, got {checks.describe(x)}")
        if x.shape[0] == 0:
            raise ValueError("input_array has an empty batch")
        if x.is_floating_point():
            return x.to(next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.get_default_dtype()))
        return x


def window_means(x: torch.Tensor, mask: Optional[torch.Tensor], windows: int) -> torch.Tensor:
    """(batch, length, dim) -> (batch, windows, dim): the mean of each run of length / windows positions,
    over unmasked positions only (a window with none gives zeros, so masked inputs never leak in)."""
    batch, length, dim = x.shape
    if mask is None:
        return x.view(batch, windows, length // windows, dim).mean(2)
    keep = mask.view(batch, windows, length // windows, 1)
    total = torch.where(keep, x.view(batch, windows, length // windows, dim), 0.0).sum(2)
    return total / keep.sum(2).clamp(min=1).to(x.dtype)


def custom_queries(output_array: torch.Tensor, batch: int, output_dim: int) -> torch.Tensor:
    """Check Perceiver IO's own decoder queries: (batch, queries, output_dim) floats."""
    if not isinstance(output_array, torch.Tensor) or not output_array.is_floating_point():
        raise TypeError(f"output_array must be a floating-point torch.Tensor, got "
                        f"{getattr(output_array, 'dtype', type(output_array).__name__)}")
    if output_array.dim() != 3 or output_array.shape[0] != batch or output_array.shape[2] != output_dim:
        raise ValueError(f"output_array must be (batch={batch}, queries, output_dim={output_dim}), "
                         f"got {checks.describe(output_array)}")
    return output_array


def add_window_latents(queries: torch.Tensor, latents: torch.Tensor, c: PerceiverConfig,
                       positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """queries_from_latents: the query of position p plus the latent of p's window (p // (output_len /
    latent_len)). queries: (batch, k, output_dim) for `positions` (batch, k), or all output_len in order."""
    window = c.output_len // c.latent_len
    if positions is None:
        if queries.shape[1] != c.output_len:
            raise ValueError(f"queries_from_latents needs the positions of {queries.shape[1]} custom queries; "
                             f"without them there must be output_len={c.output_len} (PerceiverMLM takes positions=)")
        return queries + latents.repeat_interleave(window, dim=1)
    index = (positions // window)[..., None].expand(-1, -1, latents.shape[-1])
    return queries + latents.gather(1, index)


def last_unmasked(queries: torch.Tensor, mask: Optional[torch.Tensor], length: int) -> torch.Tensor:
    """decoder_reduction='eot': of one query per input position (batch, length, dim), the one at each
    sample's last unmasked position (batch, 1, dim). Queries do not interact, so decoding only these
    equals decoding all and picking."""
    batch = len(queries)
    if queries.shape[1] != length:
        raise ValueError(f"decoder_reduction='eot' needs one output query per input position "
                         f"({length}), got {queries.shape[1]}")
    if mask is None:
        last = torch.full((batch,), length - 1, device=queries.device)
    else:  # index of the last True; an all-False row falls back to the last position
        last = length - 1 - mask.flip(-1).long().argmax(-1)
    return queries.gather(1, last.view(batch, 1, 1).expand(batch, 1, queries.shape[2]))


def pool(out: torch.Tensor, reduction: Optional[str]) -> torch.Tensor:
    """decoder_reduction over the query (or latent) axis: (batch, n, dim) -> (batch, dim); None keeps it."""
    if reduction == "mean":
        return out.mean(dim=1)
    if reduction == "max":
        return out.max(dim=1).values
    if reduction == "sum":
        return out.sum(dim=1)
    if reduction in ("first", "eot"):   # 'eot' decoded only the one query it keeps
        return out[:, 0]
    if reduction == "last":
        return out[:, -1]
    return out


# ------------------------------------------------------------------ the seed's nn.Sequential API, for pipelines
#
# gperc's Perceiver is an nn.Sequential of tuple-passing modules, which a pipeline cuts into stages:
#
#     Embeddings      (input_array, attention_mask=None, output_array=None)
#                  -> (input_array, attention_mask, latent_array, output_array)
#     EncoderBlock -> (latent_array, output_array, attentions)
#     ProcessorBlock  (latent_array, output_array, attentions), num_layers times, -> the same three
#     DecoderBlock -> (logits, attentions)
#
# Each takes its items as arguments or as the one tuple nn.Sequential passes on; trailing items that are
# None may be left out, so that a pipeline can send tensors only. `attentions` is None unless the
# encoder was called with need_weights=True. These are thin wrappers over the parts above, built by the
# same functions under the same seeds, so they hold the weights of `Perceiver(config)`; their state-dict
# layout is the seed's (and percnb/1's), which `model_key` maps to the model's.

Attentions = Optional[List[torch.Tensor]]


def _unpack(inputs: tuple, names: Sequence[str], required: int, owner: str) -> tuple:
    """The items of a seed module's call: positional arguments or one tuple, trailing ones None if left out."""
    if len(inputs) == 1 and isinstance(inputs[0], tuple):
        inputs = inputs[0]
    if not required <= len(inputs) <= len(names):
        raise TypeError(f"{owner}.forward takes ({', '.join(names)}) as arguments or as one tuple (the first "
                        f"{required} required), got {len(inputs)} item(s)")
    return tuple(inputs) + (None,) * (len(names) - len(inputs))


class Embeddings(InputEmbedding):
    """The input side: the input embedding, the latent array and the decoder's learned queries.

    (input_array, attention_mask=None, output_array=None) -> (input_array (batch, input_len, input_dim),
    attention_mask (batch, input_len) bool or None, latent_array (batch, latent_len, latent_dim),
    output_array (batch, queries, output_dim) or None when the latents are pooled). With
    decoder_reduction='eot' only the query at each sample's last unmasked position is kept.
    """

    def __init__(self, config: PerceiverConfig):
        super().__init__(config)
        self.latent_array = latent_array(config)
        self.output_array = output_queries(config)

    def forward(self, *inputs) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        input_array, attention_mask, output_array = _unpack(
            inputs, ("input_array", "attention_mask", "output_array"), 1, "Embeddings")
        c = self.config
        x, mask = super().forward(input_array, attention_mask)
        latents = self.latent_array.expand(len(x), -1, -1)
        if c.latents_from_inputs:
            latents = latents + window_means(x, mask, c.latent_len)
        if c.decoder_type == "latent_pool":
            if output_array is not None:
                raise ValueError("output_array (decoder queries) needs decoder_type='attention'; "
                                 "this config pools the latents instead")
            return x, mask, latents, None
        queries = (self.output_array.expand(len(x), -1, -1) if output_array is None
                   else custom_queries(output_array, len(x), c.output_dim))
        if c.decoder_reduction == "eot":
            queries = last_unmasked(queries, mask, x.shape[1])
        return x, mask, latents, queries


class EncoderBlock(nn.Module):
    """(input_array, attention_mask, latent_array, output_array=None) -> (latent_array, output_array,
    attentions): the latents read the inputs. With need_weights=True, attentions is [the encoder's map]."""

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        self.block = encoder_block(config)

    def forward(self, *inputs, need_weights: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor], Attentions]:
        input_array, attention_mask, latent_array, output_array = _unpack(
            inputs, ("input_array", "attention_mask", "latent_array", "output_array"), 3, "EncoderBlock")
        latent_array, weights = self.block(input_array, latent_array, attention_mask, need_weights)
        return latent_array, output_array, ([weights] if need_weights else None)


class ProcessorBlock(nn.Module):
    """(latent_array, output_array=None, attentions=None) -> the same three: the latents read each other;
    when attentions is a list, this block's map is appended (in a new list)."""

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        self.block = processor_block(config)

    def forward(self, *inputs) -> Tuple[torch.Tensor, Optional[torch.Tensor], Attentions]:
        latent_array, output_array, attentions = _unpack(
            inputs, ("latent_array", "output_array", "attentions"), 1, "ProcessorBlock")
        latent_array, weights = self.block(latent_array, latent_array, None, attentions is not None)
        return latent_array, output_array, (None if attentions is None else attentions + [weights])


class DecoderBlock(nn.Module):
    """(latent_array, output_array=None, attentions=None) -> (logits, attentions): the queries read the
    latents (or, with decoder_type='latent_pool', the latents are pooled and normalised), then
    decoder_reduction and the head."""

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        if config.tie_embeddings:
            raise ValueError("tie_embeddings reads the logits off the input embedding, which this layout (and a "
                             "pipeline) keeps in another module, Embeddings; untie the model first: "
                             "percnb.hub.untie(model) gives a copy with its own head, the same function")
        self.config = config
        self.block = decoder_block(config)
        if self.block is None:
            self.norm = nn.LayerNorm(config.latent_dim)
        self.projection = output_head(config)

    def forward(self, *inputs) -> Tuple[torch.Tensor, Attentions]:
        latent_array, output_array, attentions = _unpack(
            inputs, ("latent_array", "output_array", "attentions"), 1, "DecoderBlock")
        c = self.config
        if self.block is None:
            out = self.norm(pool(latent_array, c.decoder_reduction))
        else:
            queries = add_window_latents(output_array, latent_array, c) if c.queries_from_latents else output_array
            out, weights = self.block(latent_array, queries, None, attentions is not None)
            attentions = None if attentions is None else attentions + [weights]
            out = pool(out, c.decoder_reduction)
        return (out if self.projection is None else self.projection(out)), attentions


def get_sequential_from_config(config: PerceiverConfig, indices: Optional[Sequence[int]] = None) -> nn.Sequential:
    """The Perceiver as `nn.Sequential(embeddings, encoder, processor_0 .. processor_{L-1}, decoder)`.

    Module i is initialised under the seed of part i (`seeded`), so `indices` (a subset of
    range(num_layers + 3)) builds just those modules with the very weights `Perceiver(config)` has:
    a pipeline rank builds only its stage. With `config.share_weights` the processors are one module
    repeated (its index is 2); with `config.layers_per_block` processor i is the module of processor
    i % layers_per_block.
    """
    if not isinstance(config, PerceiverConfig):
        raise TypeError(f"config must be a PerceiverConfig, got {type(config).__name__}")
    total = config.num_layers + 3
    wanted = list(range(total)) if indices is None else list(indices)
    if not wanted or any(not 0 <= i < total for i in wanted) or wanted != sorted(set(wanted)):
        raise ValueError(f"indices must be increasing module indices in [0, {total}), got {indices}")
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    shared: dict = {}                     # processor index modulo the sharing period -> its module
    period = sharing_period(config)
    for i in wanted:
        kinds = {0: ("embeddings", Embeddings), 1: ("encoder", EncoderBlock), total - 1: ("decoder", DecoderBlock)}
        name, make = kinds.get(i, (f"processor_{i - 2}", ProcessorBlock))
        if make is ProcessorBlock and period < config.num_layers:
            first = (i - 2) % period
            if first not in shared:
                with seeded(config, 2 + first):
                    shared[first] = ProcessorBlock(config)
            modules[name] = shared[first]
            continue
        with seeded(config, i):
            modules[name] = make(config)
    return nn.Sequential(modules)


_SEQUENTIAL_TO_MODEL = [(re.compile(pattern), replacement) for pattern, replacement in (
    (r"^embeddings\.latent_array$", "latents"),
    (r"^embeddings\.output_array$", "queries"),
    (r"^embeddings\.", "embed."),
    (r"^encoder\.block\.", "encoder."),
    (r"^processor_(\d+)\.block\.", r"processors.\1."),
    (r"^decoder\.block\.", "decoder."),
    (r"^decoder\.norm\.", "norm."),
    (r"^decoder\.projection\.", "head."),
)]


def model_key(sequential_key: str) -> str:
    """The name in `Perceiver(config).state_dict()` of an entry of `get_sequential_from_config(config)`'s,
    e.g. 'processor_1.block.qkv.weight' -> 'processors.1.qkv.weight' (a percnb/1 file's keys are these
    with 'model.' in front)."""
    for pattern, replacement in _SEQUENTIAL_TO_MODEL:
        if pattern.search(sequential_key):
            return pattern.sub(replacement, sequential_key)
    raise ValueError(f"{sequential_key!r} is not a key of the seed's nn.Sequential layout")


def get_distributed_model(config: PerceiverConfig, *args, **kwargs):
    """Pipeline-parallel Perceiver on `torch.distributed.pipelining`; see `percnb.pipeline.get_distributed_model`
    (imported here, when called, so that importing percnb.models does not import the pipeline)."""
    from .pipeline import get_distributed_model as build
    return build(config, *args, **kwargs)


# --------------------------------------------------------------------------- Perceiver IO on pixel sets (notebook 06)

class PerceiverImageIO(Perceiver):
    """Perceiver IO on images: any subset of a picture's pixels in, a class and pixels at any (row, col) out.

    forward(values (batch, M, channels), coords (batch, M, 2), attention_mask (batch, M) or None,
    query_coords (batch, Q, 2), return_attentions=False) -> (logits (batch, n_classes), pixels (batch,
    Q, channels)), plus the attention maps with return_attentions. Each input item is one pixel: its
    values (standardised with `pixel_mean`, `pixel_std`) and the Fourier features of its (row, col)
    in [-1, 1] (`percnb.data.pixel_set` builds padded sets with a mask). The decoder reads the latents
    with Q + 1 queries in one pass: a learned class query, then one query per coordinate, the Fourier
    features of the coordinate through a linear map, so any point (between pixels too) can be asked for.
    Use `image_io_config` for a config; `Perceiver.load` restores it with the pixel statistics.
    """

    def __init__(self, config: PerceiverConfig, fast: bool = True, pixel_mean: float = 0.0, pixel_std: float = 1.0):
        shape = config.input_shape
        if config.pos_encoding != "none" or shape is None or len(shape) != 2 or config.decoder_reduction is not None \
                or config.decoder_projection or config.decoder_type != "attention" or config.n_classes is None:
            raise ValueError("PerceiverImageIO needs pos_encoding='none' (positions come with the pixels), "
                             "input_shape=(height, width), decoder_type='attention', decoder_reduction=None, "
                             "decoder_projection=False and n_classes; use image_io_config")
        channels = (config.input_channels or config.input_dim) - config.fourier_dim
        if channels < 1:
            raise ValueError(f"input_channels must be the pixel channels + {config.fourier_dim} Fourier channels, "
                             f"got {config.input_channels}; use image_io_config")
        super().__init__(config, fast)
        self.channels = channels
        # Buffers, not settings: saved with the weights, so `Perceiver.load` restores them.
        self.register_buffer("pixel_mean", torch.tensor(checks.real("pixel_mean", pixel_mean, minimum=-math.inf,
                                                                    strict=True)))
        self.register_buffer("pixel_std", torch.tensor(checks.positive_float("pixel_std", pixel_std)))
        with seeded(config, config.num_layers + 3):
            self.class_query = nn.Parameter(torch.randn(config.output_dim) * config.pos_init_std)
            self.pixel_query = nn.Linear(config.fourier_dim, config.output_dim)
            self.class_head = nn.Linear(config.output_dim, config.n_classes)
            self.pixel_head = nn.Linear(config.output_dim, channels)

    def encode_position(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) (row, col) in [-1, 1] -> (..., fourier_dim), at the resolution of input_shape."""
        c = self.config
        return fourier_encode(coords, c.fourier_bands, c.input_shape)

    def forward(self, values: torch.Tensor, coords: torch.Tensor,  # type: ignore[override]
                attention_mask: Optional[torch.Tensor], query_coords: torch.Tensor, return_attentions: bool = False):
        checks.shape("values", values, ("batch", "M", ("channels", self.channels)))
        batch, m = values.shape[:2]
        checks.shape("coords", coords, (("batch", batch), ("M", m), ("2 = (row, col)", 2)))
        checks.shape("query_coords", query_coords, (("batch", batch), "queries", ("2 = (row, col)", 2)))
        x = torch.cat([(values - self.pixel_mean) / self.pixel_std, self.encode_position(coords)], dim=-1)
        queries = torch.cat([self.class_query.expand(batch, 1, -1),                   # (batch, 1 + Q, output_dim)
                             self.pixel_query(self.encode_position(query_coords))], dim=1)
        out = super().forward(x, attention_mask, queries, return_attentions)
        out, maps = out if return_attentions else (out, None)
        logits, pixels = self.class_head(out[:, 0]), self.pixel_head(out[:, 1:])
        return (logits, pixels, maps) if return_attentions else (logits, pixels)

    def decode_grid(self, values: torch.Tensor, coords: torch.Tensor, attention_mask: Optional[torch.Tensor],
                    height: int, width: int) -> torch.Tensor:
        """The image at any resolution: the pixel queries of a height x width grid over [-1, 1]^2, decoded
        in one pass -> (batch, channels, height, width). The output size is a choice at inference."""
        grid = grid_coordinates((checks.positive_int("height", height), checks.positive_int("width", width)),
                                values.dtype).to(values.device)
        _, pixels = self(values, coords, attention_mask, grid.expand(len(values), -1, -1))
        return pixels.transpose(1, 2).unflatten(2, (height, width))
