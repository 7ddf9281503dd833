"""What a Perceiver costs before it is built: parameters, FLOPs per step and peak train memory, computed
from a `PerceiverConfig`'s shapes alone (no tensor is allocated), so that "will it fit?" has an answer
before the first step.

Counted, per module of the seed's sequential layout (embeddings, encoder, processors..., decoder):
- parameters: every weight, bias, LayerNorm, latent array, query array and position table, a shared
  processor counted once: exactly `Perceiver(config).num_parameters()`.
- FLOPs: the matrix multiplications of the textbook code (`fast=False`), 2 per multiply-add, as
  `torch.utils.flop_counter` counts them: the linear layers, the scores q k^T and the weighted sum of
  the values. A train step is the forward plus a backward that does each matmul twice (the gradient of
  each operand), once where the operand is the raw input, which needs no gradient. Elementwise work
  (LayerNorm, softmax, GELU, the optimizer) is left out: it is a few percent of the FLOPs, but not of
  the time (notebook 05 and the README's profile say how much).
- peak train memory (float32, the fast kernels of percnb/fast.py, no dropout): AdamW's two moments and
  the gradients of the trainable parameters, the activations autograd saves for backward (each block's
  are listed in `saved_per_query` and `saved_per_key`), and the gradient buffers a block's backward holds
  at once; walked through backward module by module (a module's saved tensors are freed as its gradients
  appear), the largest sum is the peak. With `checkpoint_activations` a block keeps only its inputs and
  one block at a time holds its activations again. Not counted: the inputs themselves, the weights
  (both exist before the step) and the allocator's own slack (see benchmarks/cost_check.py, which
  measures it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from . import checks
from .config import PerceiverConfig

BYTES = 4                      # float32


def checks_config(c: PerceiverConfig) -> None:
    if not isinstance(c, PerceiverConfig):
        raise TypeError(f"config must be a PerceiverConfig, got {type(c).__name__}")


# --------------------------------------------------------------------------- one block

@dataclass(frozen=True)
class BlockShape:
    """A `Block`'s sizes: q_len queries of width q_dim read kv_len keys of width kv_dim."""

    kv_dim: int
    q_dim: int
    heads: int
    hidden: int
    q_len: int
    kv_len: int
    self_attention: bool
    add_residual: bool = True

    @property
    def in_input_space(self) -> bool:
        """Whether the fast kernels attend in the kv_dim-wide input space (`fast.input_space_is_cheaper`)."""
        d, c, h, n, m = self.q_dim, self.kv_dim, self.heads, self.q_len, self.kv_len
        return not self.self_attention and 2 * n * c * d + 2 * h * n * m * c < 2 * m * c * d + 2 * n * m * d

    def parameters(self) -> int:
        d, c, h = self.q_dim, self.kv_dim, self.hidden
        attention = d * 3 * d + 3 * d if self.self_attention else 2 * c + d * d + d + c * 2 * d + 2 * d
        return 2 * d + attention + d * d + d + 2 * d + (d * h + h) + (h * d + d)

    def forward_flops(self) -> int:
        """Matmul FLOPs per sample of the textbook block."""
        d, c, h, n, m = self.q_dim, self.kv_dim, self.hidden, self.q_len, self.kv_len
        projections = 2 * n * d * 3 * d if self.self_attention else 2 * n * d * d + 2 * m * c * 2 * d
        return projections + 4 * n * m * d + 2 * n * d * d + 4 * n * d * h

    def saved(self) -> Tuple[int, int]:
        """Elements per sample the fast block saves for backward: (per query, per key), its input q excluded.
        Self-attention: LN(q), the fused q/k/v, the attention output, the residual sum, its LN, the MLP's
        pre-GELU hidden, plus two LayerNorms' mean and 1/std and a log-sum-exp per head. A cross-attention
        in the input space keeps per query W_k^T q and its attention output (kv_dim wide per head; with more
        than one head also the output's copy that the value einsum makes) instead, and per key LN(kv) and
        its statistics; one on projections keeps per key LN(kv) and the keys and values."""
        d, c, h, hid = self.q_dim, self.kv_dim, self.heads, self.hidden
        if self.self_attention:
            return 7 * d + hid + 4 + h, 0
        if self.in_input_space:
            return 5 * d + hid + (2 if h == 1 else 3) * h * c + 4 + h, c + 2
        return 5 * d + hid + 4 + h, c + 2 * d + 2

    def backward_buffers(self) -> Tuple[int, int]:
        """Elements per sample of gradients a block's backward holds at once, beyond what it saved: per
        query the gradients of the hidden layer and of the fused projections; per key, in the input space,
        the gradients of LN(kv) as keys and as values (autograd sums them in place), else of LN(kv), the
        keys and values."""
        d, c, hid = self.q_dim, self.kv_dim, self.hidden
        per_key = 2 * c if self.in_input_space else (0 if self.self_attention else c + 2 * d)
        return hid + 3 * d, per_key


def blocks(c: PerceiverConfig) -> Tuple[BlockShape, BlockShape, Optional[BlockShape]]:
    """(encoder, one processor, decoder or None) of a config, with the decoder's query count as run:
    one per sample with decoder_reduction='eot'."""
    encoder = BlockShape(c.input_dim, c.latent_dim, c.cross_heads, c.ffw_latent, c.latent_len, c.input_len, False)
    processor = BlockShape(c.latent_dim, c.latent_dim, c.num_heads, c.ffw_latent, c.latent_len, c.latent_len, True)
    decoder = None
    if c.decoder_type == "attention":
        queries = 1 if c.decoder_reduction == "eot" else c.output_len
        decoder = BlockShape(c.latent_dim, c.output_dim, c.cross_heads, c.ffw_output, queries, c.latent_len, False,
                             c.decoder_residual)
    return encoder, processor, decoder


# --------------------------------------------------------------------------- the model's modules

def _embedding_in(c: PerceiverConfig) -> Optional[int]:
    """Input width of the raw-input projection, or None when there is none."""
    if c.input_type == "tokens":
        return None
    proj_in = (c.input_channels or c.input_dim) + (c.fourier_dim if c.pos_encoding == "fourier" else 0)
    return proj_in if proj_in != c.input_dim or c.input_channels is not None else None


def _head(c: PerceiverConfig) -> Tuple[int, int]:
    """(rows per sample, input width) of the output head."""
    width = c.output_dim if c.decoder_type == "attention" else c.latent_dim
    rows = c.output_len if c.decoder_type == "attention" and c.decoder_reduction is None else 1
    return rows, width


def module_parameters(c: PerceiverConfig, trainable_only: bool = False) -> List[int]:
    """Parameters of each sequential module (embeddings with the latent and query arrays, encoder,
    processors..., decoder with the norm and head); a shared processor counted once, in the first."""
    checks_config(c)
    encoder, processor, decoder = blocks(c)
    embed = c.latent_len * c.latent_dim + (c.output_len * c.output_dim if decoder else 0)
    if c.input_type == "tokens":
        embed += c.input_num_tokens * c.input_dim
    proj_in = _embedding_in(c)
    if proj_in is not None:
        embed += (proj_in + 1) * c.input_dim
    if c.pos_encoding == "trainable" or (c.pos_encoding == "sinusoid" and not trainable_only):
        embed += c.input_len * c.input_dim
    if c.pos_encoding == "fourier" and not trainable_only:
        embed += c.input_len * c.fourier_dim
    rows, width = _head(c)
    out = (decoder.parameters() if decoder else 2 * c.latent_dim)
    out += (width + 1) * c.n_classes if c.decoder_projection else 0
    processors = [processor.parameters() if layer == 0 or not c.share_weights else 0 for layer in range(c.num_layers)]
    return [embed, encoder.parameters(), *processors, out]


def parameters(c: PerceiverConfig, trainable_only: bool = False) -> int:
    """Parameters of `Perceiver(c)` (equals its `num_parameters()`; trainable_only leaves out fixed tables)."""
    return sum(module_parameters(c, trainable_only))


def module_flops(c: PerceiverConfig, batch: int = 1, train: bool = True) -> List[int]:
    """Matmul FLOPs of each sequential module for one step on `batch` samples (train: forward and backward)."""
    checks_config(c)
    checks.positive_int("batch", batch)
    encoder, processor, decoder = blocks(c)
    proj_in = _embedding_in(c)
    # the raw input needs no gradient: the projection's backward computes the weight's gradient only
    embed = 2 * c.input_len * proj_in * c.input_dim if proj_in is not None else 0
    embed *= 2 if train else 1
    rows, width = _head(c)
    out = 2 * rows * width * c.n_classes if c.decoder_projection else 0
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

    # embeddings: the embedded inputs (when not the raw input itself), the latents seeded from them
    proj_in = _embedding_in(c)
    embedded = c.input_len * c.input_dim if (c.input_type == "tokens" or proj_in is not None
                                              or c.pos_encoding in ("trainable", "sinusoid")) else 0
    embed = embedded + (c.input_len * proj_in if c.pos_encoding == "fourier" and proj_in else 0)
    embed += n * d if c.latents_from_inputs else 0
    rows, width = _head(c)
    head = (rows * width + 2 * rows * c.n_classes) if c.decoder_projection else 0
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
