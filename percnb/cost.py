"""What a Perceiver costs before it is built: parameters, FLOPs per step and peak train memory, computed
from a `PerceiverConfig`'s shapes alone (no tensor is allocated), so that "will it fit?" has an answer
before the first step.

Counted, per module of the seed's sequential layout (embeddings, encoder, processors..., decoder):

- parameters: every weight, bias, LayerNorm, latent array, query array and position table, processors
  that share weights (`sharing_period`: share_weights, layers_per_block) counted once, a tied head's matrix
  (tie_embeddings) counted once: exactly `Perceiver(config).num_parameters()`. Every block is shaped as the
  model builds it, with its own heads, query/key and value widths, MLP width and residual
  (`PerceiverConfig.widths`), and the input side with its projection (input_projection, pos_concat_dim) and
  Fourier features (fourier_sine_only).
- FLOPs: the matrix multiplications of the textbook code (`fast=False`), 2 per multiply-add, as
  `torch.utils.flop_counter` counts them: the linear layers, the scores q k^T and the weighted sum of
  the values. A train step is the forward plus a backward that does each matmul twice (the gradient of
  each operand), once where the operand is the raw input, which needs no gradient. Elementwise work
  (LayerNorm, softmax, GELU, the optimizer) is left out: it is a few percent of the FLOPs, but not of
  the time (notebook 05 and the README's profile say how much).
- peak train memory (float32, the fast kernels of percnb/fast.py, no dropout): AdamW's two moments and
  the gradients of the trainable parameters, the activations autograd saves for backward (each block's
  are listed in `BlockShape.saved`), and the gradient buffers a block's backward holds
  at once; walked through backward module by module (a module's saved tensors are freed as its gradients
  appear), the largest sum is the peak. With `checkpoint_activations` a block keeps only its inputs and
  one block at a time holds its activations again. Not counted: the inputs themselves, the weights
  (both exist before the step) and the allocator's own slack (see benchmarks/cost_check.py, which
  measures it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from . import checks, fast
from .config import PerceiverConfig
from .models import sharing_period

BYTES = 4                      # float32


def checks_config(c: PerceiverConfig) -> None:
    if not isinstance(c, PerceiverConfig):
        raise TypeError(f"config must be a PerceiverConfig, got {type(c).__name__}")


# --------------------------------------------------------------------------- one block

@dataclass(frozen=True)
class BlockShape:
    """A `Block`'s sizes: q_len queries of width q_dim read kv_len keys of width kv_dim, with num_heads heads,
    queries and keys compared at width qk_dim, values v_dim wide (projected back to q_dim by W_o), an MLP
    of `hidden`, and the residual of the attention output (`add_residual`). The field names are `Block`'s, so
    `fast.input_space_is_cheaper` reads a BlockShape as it reads a Block."""

    kv_dim: int
    q_dim: int
    num_heads: int
    hidden: int
    q_len: int
    kv_len: int
    self_attention: bool
    add_residual: bool
    qk_dim: int
    v_dim: int

    @property
    def in_input_space(self) -> bool:
        """Whether the fast kernels attend in the kv_dim-wide input space: the rule `fast.block_forward` applies."""
        return not self.self_attention and fast.input_space_is_cheaper(self, self.q_len, self.kv_len)

    def parameters(self) -> int:
        d, c, h, a, b = self.q_dim, self.kv_dim, self.hidden, self.qk_dim, self.v_dim
        if self.self_attention:
            attention = (d + 1) * (2 * a + b)                          # qkv
        else:
            attention = 2 * c + (d + 1) * a + (c + 1) * (a + b)      # ln_kv, q, kv
        return 2 * d + attention + (b + 1) * d + 2 * d + (d * h + h) + (h * d + d)   # ln_q, proj, ln_mlp, mlp

    def forward_flops(self) -> int:
        """Matmul FLOPs per sample of the textbook block."""
        d, c, h, n, m, a, b = self.q_dim, self.kv_dim, self.hidden, self.q_len, self.kv_len, self.qk_dim, self.v_dim
        projections = 2 * n * d * (2 * a + b) if self.self_attention else 2 * n * d * a + 2 * m * c * (a + b)
        return projections + 2 * n * m * (a + b) + 2 * n * b * d + 4 * n * d * h

    @property
    def fused_attention(self) -> bool:
        """Whether `F.scaled_dot_product_attention` runs its fused CPU kernel, which keeps a log-sum-exp per
        query and head for backward: it needs queries, keys and values of one head width (always so in the
        input space). Otherwise it falls back to its math path, which keeps the (q_len, kv_len) weights."""
        return self.in_input_space or self.qk_dim // self.num_heads == self.v_dim // self.num_heads

    def saved(self) -> Tuple[int, int]:
        """Elements per sample the fast block saves for backward: (per query, per key), its inputs excluded.
        Every block keeps per query LN(q), the attention output (v_dim), the residual sum (or, without the
        residual, the projected attention output), its LN, the MLP's pre-GELU hidden, two LayerNorms' mean
        and 1/std, and a log-sum-exp per head (the weights, kv_len per head, when the attention is not
        `fused_attention`). Self-attention adds the q/k/v; a cross-attention on projections adds per query
        its queries and per key LN(kv), its statistics and the keys and values; one in the input space adds
        per query its queries, W_k^T q and its attention output (kv_dim wide per head; with more than one
        head also the output's copy that the value einsum makes), and per key LN(kv) and its statistics."""
        d, c, h, hid, a, b = self.q_dim, self.kv_dim, self.num_heads, self.hidden, self.qk_dim, self.v_dim
        common = 3 * d + b + hid + 4 + h * (1 if self.fused_attention else self.kv_len)
        if self.self_attention:
            return common + 2 * a + b, 0
        if self.in_input_space:
            return common + a + (2 if h == 1 else 3) * h * c, c + 2
        return common + a, c + a + b + 2

    def backward_buffers(self) -> Tuple[int, int]:
        """Elements per sample of gradients a block's backward holds at once, beyond what it saved: per
        query the gradients of the hidden layer, of the attention output and of the projections of the
        queries (self-attention: the fused q/k/v), and of the weights when the attention is not fused; per
        key, in the input space, the gradients of LN(kv) as keys and as values (autograd sums them in
        place), else of LN(kv), the keys and values."""
        d, c, hid, a, b = self.q_dim, self.kv_dim, self.hidden, self.qk_dim, self.v_dim
        weights = 0 if self.fused_attention else self.num_heads * self.kv_len
        if self.self_attention:
            return hid + 2 * a + b + weights, 0
        return hid + d + a + b + weights, (2 * c if self.in_input_space else c + a + b)


def block_shape(c: PerceiverConfig, part: str) -> Optional[BlockShape]:
    """The BlockShape of part 'encoder', 'processor' or 'decoder' (None when the latents are pooled), as
    `percnb.models` builds it (`encoder_block`, `processor_block`, `decoder_block`), with the decoder's
    query count as run: one per sample with decoder_reduction='eot'."""
    heads, qk, v, ffw = c.widths(part)
    if part == "encoder":
        return BlockShape(c.input_dim, c.latent_dim, heads, ffw, c.latent_len, c.input_len, False, c.query_residual,
                          qk, v)
    if part == "processor":
        return BlockShape(c.latent_dim, c.latent_dim, heads, ffw, c.latent_len, c.latent_len, True, True, qk, v)
    if c.decoder_type != "attention":
        return None
    queries = 1 if c.decoder_reduction == "eot" else c.output_len
    return BlockShape(c.latent_dim, c.output_dim, heads, ffw, queries, c.latent_len, False, c.decoder_residual, qk, v)


def blocks(c: PerceiverConfig) -> Tuple[BlockShape, BlockShape, Optional[BlockShape]]:
    """(encoder, one processor, decoder or None) of a config (`block_shape`)."""
    return block_shape(c, "encoder"), block_shape(c, "processor"), block_shape(c, "decoder")


# --------------------------------------------------------------------------- the model's modules

def _projection(c: PerceiverConfig) -> Optional[Tuple[int, int]]:
    """(input, output) width of the raw-input projection `InputEmbedding.input_proj`, or None when there is none:
    raw features (with any Fourier features concatenated) to input_dim, less the pos_concat_dim channels a
    concatenated position table fills."""
    if c.input_type == "tokens":
        return None
    proj_in = (c.input_channels or c.input_dim) + (c.fourier_dim if c.pos_encoding == "fourier" else 0)
    project = c.input_projection
    if project is None:        # the model's rule (InputEmbedding): project when the width differs or asked to
        project = proj_in != c.input_dim or c.input_channels is not None
    return (proj_in, c.input_dim - (c.pos_concat_dim or 0)) if project else None


def _head(c: PerceiverConfig) -> Tuple[int, int, int]:
    """(rows per sample, input width, outputs) of the output head's matmul: the Linear of decoder_projection or
    the tied embedding matrix of tie_embeddings; (0, 0, 0) without a head."""
    if not (c.decoder_projection or c.tie_embeddings):
        return 0, 0, 0
    width = c.output_dim if c.decoder_type == "attention" else c.latent_dim
    rows = c.output_len if c.decoder_type == "attention" and c.decoder_reduction is None else 1
    return rows, width, c.n_classes


def module_parameters(c: PerceiverConfig, trainable_only: bool = False) -> List[int]:
    """Parameters of each sequential module (embeddings with the latent and query arrays, encoder,
    processors..., decoder with the norm and head): processors that share weights (`sharing_period`)
    counted once, in the first that uses them; a tied head's matrix counted once, in the embeddings."""
    checks_config(c)
    encoder, processor, decoder = blocks(c)
    embed = c.latent_len * c.latent_dim + (c.output_len * c.output_dim if decoder else 0)
    if c.input_type == "tokens":
        embed += c.input_num_tokens * c.input_dim
    projection = _projection(c)
    if projection is not None:
        embed += (projection[0] + 1) * projection[1]
    if c.pos_encoding == "trainable" or (c.pos_encoding == "sinusoid" and not trainable_only):
        embed += c.input_len * (c.pos_concat_dim or c.input_dim)
    if c.pos_encoding == "fourier" and not trainable_only:
        embed += c.input_len * c.fourier_dim
    out = (decoder.parameters() if decoder else 2 * c.latent_dim)
    _, width, classes = _head(c)
    out += (width + 1) * classes if c.decoder_projection else 0
    out += classes if c.tie_embeddings else 0                      # the bias; the matrix is the token embedding
    period = sharing_period(c)
    processors = [processor.parameters() if layer < period else 0 for layer in range(c.num_layers)]
    return [embed, encoder.parameters(), *processors, out]


def parameters(c: PerceiverConfig, trainable_only: bool = False) -> int:
    """Parameters of `Perceiver(c)` (equals its `num_parameters()`; trainable_only leaves out fixed tables)."""
    return sum(module_parameters(c, trainable_only))


def module_flops(c: PerceiverConfig, batch: int = 1, train: bool = True) -> List[int]:
    """Matmul FLOPs of each sequential module for one step on `batch` samples (train: forward and backward)."""
    checks_config(c)
    checks.positive_int("batch", batch)
    encoder, processor, decoder = blocks(c)
    projection = _projection(c)
    # the raw input needs no gradient: the projection's backward computes the weight's gradient only
    embed = 2 * c.input_len * projection[0] * projection[1] if projection is not None else 0
    embed *= 2 if train else 1
    rows, width, classes = _head(c)
    out = 2 * rows * width * classes                 # the head: both operands need gradients (tied ones too)
    out += decoder.forward_flops() if decoder else 0
    factor = 3 if train else 1
    per_sample = [embed, factor * encoder.forward_flops(), *[factor * processor.forward_flops()] * c.num_layers,
                  factor * out]
    return [batch * f for f in per_sample]


def flops(c: PerceiverConfig, batch: int = 1, train: bool = True) -> int:
    """Matmul FLOPs of one step on `batch` samples: a train step (forward + backward) or an inference step."""
    return sum(module_flops(c, batch, train))


def peak_train_memory(c: PerceiverConfig, batch: int, checkpoint: Optional[bool] = None) -> int:
    """Bytes a train step (forward, backward, AdamW step) adds at its peak to a process holding the model and
    the batch, in float32 on the fast kernels; `checkpoint` defaults to c.checkpoint_activations. What is
    counted is in the module docstring."""
    checks_config(c)
    checks.positive_int("batch", batch)
    checkpoint = c.checkpoint_activations if checkpoint is None else checks.boolean("checkpoint", checkpoint)
    encoder, processor, decoder = blocks(c)
    grads = module_parameters(c, trainable_only=True)
    n, d = c.latent_len, c.latent_dim

    def saved(block: BlockShape) -> int:
        per_query, per_key = block.saved()
        return per_query * block.q_len + per_key * block.kv_len

    def buffers(block: BlockShape) -> int:
        per_query, per_key = block.backward_buffers()
        return per_query * block.q_len + per_key * block.kv_len

    # embeddings: the embedded inputs (when not the raw input itself), what the projection keeps for its
    # weight's gradient (the raw input with its Fourier features), the latents seeded from the inputs
    projection = _projection(c)
    embedded = c.input_len * c.input_dim if (c.input_type == "tokens" or projection is not None
                                              or c.pos_encoding != "none") else 0
    embed = embedded + (c.input_len * projection[0] if c.pos_encoding == "fourier" and projection else 0)
    embed += n * d if c.latents_from_inputs else 0
    rows, width, classes = _head(c)
    head = rows * width + 2 * rows * classes
    if decoder is None:
        out, out_buffers = 2 * d + head, 0
    else:
        out = saved(decoder) + n * d + head       # + the last latents, its keys' input
        out_buffers = buffers(decoder)
    # (saved for backward, held during the module's backward) per module, in forward order; a block's
    # input is the previous block's output, counted there (the encoder's: the latent array, a parameter)
    layers = [(saved(encoder), buffers(encoder))] + [(saved(processor) + n * d, buffers(processor))] * c.num_layers
    if checkpoint:
        recompute = max(s for s, _ in layers)
        layers = [(0, b + recompute) for _, b in layers[:1]] + [(n * d, b + recompute) for _, b in layers[1:]]
    modules = [(embed, 0), *layers, (out, out_buffers)]
    peak = 0
    for i in range(len(modules) - 1, -1, -1):  # backward runs the modules in reverse
        live = sum(s for s, _ in modules[:i + 1]) * batch + modules[i][1] * batch + sum(grads[i:])
        peak = max(peak, live)
    optimizer = 2 * sum(grads)                 # AdamW's exp_avg and exp_avg_sq
    return BYTES * (optimizer + max(peak, sum(grads)))


# --------------------------------------------------------------------------- the summary

@dataclass(frozen=True)
class Estimate:
    """What `estimate` predicts for one config and batch."""

    parameters: int
    train_flops: int
    inference_flops: int
    peak_train_bytes: int

    def fits(self, budget_bytes: float) -> bool:
        """Whether the predicted peak train memory is within `budget_bytes`."""
        return self.peak_train_bytes <= budget_bytes

    def __str__(self) -> str:
        return (f"{self.parameters:,} parameters; {self.train_flops / 1e9:.3g} GFLOP per train step, "
                f"{self.inference_flops / 1e9:.3g} per inference step; peak train memory "
                f"{self.peak_train_bytes / 2**20:,.0f} MiB")


def estimate(c: PerceiverConfig, batch: int, input_len: Optional[int] = None,
             checkpoint: Optional[bool] = None) -> Estimate:
    """Parameters, matmul FLOPs per train and inference step, and peak train memory (bytes) of
    `Perceiver(c)` on batches of `batch` samples, optionally at another `input_len` (the config with that
    field replaced, validated again)."""
    c = c if input_len is None else c.replace(input_len=input_len)
    return Estimate(parameters(c), flops(c, batch, True), flops(c, batch, False),
                    peak_train_memory(c, batch, checkpoint))
