"""DeepMind's pretrained Perceivers, from the `transformers` library into plain percnb models, exactly.

`load("deepmind/language-perceiver")` downloads a checkpoint with transformers' own `from_pretrained`
(a local folder written by `save_pretrained` works too) and returns the percnb model that computes the
same function; `from_transformers(model)` converts a transformers model already in memory. Supported:
`PerceiverForMaskedLM` (the byte-level language Perceiver, 201M parameters),
`PerceiverForImageClassificationFourier` and `PerceiverForImageClassificationLearned` (ImageNet).
The result is an ordinary `PerceiverMLM` / `PerceiverImage`: `return_attentions`, the attention
explorer and `save`/`load` work on it. Its attention maps are transformers' `cross_attentions[0]`,
`*attentions`, `cross_attentions[1]`, in that order.

What differs, by design: a sample whose every input is masked gets zero attention weights in percnb,
where transformers spreads them evenly over the masked inputs; dropout acts on more places in percnb, so
fine-tuning with dropout is not transformers' (inference is). The learned-position image model's
`positions_projection` (a Linear applied to a trainable table) is folded into the table: the same function
with 65,792 fewer parameters. Needs the optional extra `percnb[hub]` (transformers).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .config import PerceiverConfig
from .data.text import MASK_ID
from .models import Perceiver, PerceiverImage, PerceiverMLM

SUPPORTED = ("PerceiverForMaskedLM", "PerceiverForImageClassificationFourier",
             "PerceiverForImageClassificationLearned")

# PerceiverTokenizer's ids: 0 [PAD], 1 [BOS], 2 [EOS], 3 [MASK], 4 [CLS], 5 [SEP], then byte b at b + 6.
# percnb's (percnb.data.text): byte b at b, [MASK] at 256; the other specials follow. BYTE_ORDER[i] is the
# transformers id of percnb id i, so permuting the vocabulary rows by it makes the model speak percnb's ids.
BYTE_ORDER = torch.tensor(list(range(6, 262)) + [3, 0, 1, 2, 4, 5])
SPECIAL_IDS = {"[MASK]": MASK_ID, "[PAD]": 257, "[BOS]": 258, "[EOS]": 259, "[CLS]": 260, "[SEP]": 261}


def _transformers_perceiver():
    try:
        from transformers.models.perceiver import modeling_perceiver
    except ImportError as error:  # pragma: no cover - the extra is installed where this is tested
        raise ImportError("percnb.hub needs transformers: pip install 'percnb[hub]'") from error
    return modeling_perceiver


def _layer_shape(layer) -> dict:
    """Heads, widths and residual of one transformers PerceiverLayer, read from its modules: the classes
    hard-code some of them (the decoders' heads, widths and residuals) instead of reading the config."""
    a = layer.attention.self
    return dict(heads=a.num_heads, qk=a.qk_channels, v=a.v_channels, ffw=layer.mlp.dense1.out_features,
                residual=layer.attention.use_query_residual, q_dim=a.query.in_features, kv_dim=a.key.in_features)


def _check_supported(model) -> None:
    name = type(model).__name__
    if name not in SUPPORTED:
        raise TypeError(f"model must be one of transformers' {SUPPORTED}, got {name}")


def config_from_transformers(model, image_size: Optional[Tuple[int, int]] = None) -> PerceiverConfig:
    """The PerceiverConfig of a transformers Perceiver of a supported class (`SUPPORTED`).

    image_size: (height, width) of the images a Fourier image model will read (transformers computes
    the Fourier features per call; percnb keeps a table for one grid); default (224, 224), ImageNet's.
    Raises TypeError for another class, ValueError for settings percnb does not reproduce.
    """
    _check_supported(model)
    mp = _transformers_perceiver()
    p, hc = model.perceiver, model.config
    enc, proc = _layer_shape(p.encoder.cross_attention), _layer_shape(p.encoder.self_attends[0])
    if proc["v"] != hc.d_latents:
        raise ValueError(f"self-attention value width {proc['v']} != d_latents {hc.d_latents}: transformers "
                         "cannot run this model either")
    per_block = len(p.encoder.self_attends)
    common = dict(latent_len=hc.num_latents, latent_dim=hc.d_latents, num_layers=hc.num_blocks * per_block,
                  num_heads=proc["heads"], ffw_latent=proc["ffw"], self_qk_channels=proc["qk"],
                  layers_per_block=per_block if hc.num_blocks > 1 else None, cross_heads=enc["heads"],
                  cross_qk_channels=enc["qk"], cross_v_channels=enc["v"], ffw_cross=enc["ffw"],
                  query_residual=enc["residual"], input_dim=enc["kv_dim"], dropout=0.0)
    pre = p.input_preprocessor
    if isinstance(pre, mp.PerceiverTextPreprocessor):
        d = _layer_shape(p.decoder.decoding_cross_attention)
        return PerceiverConfig(
            input_type="tokens", input_num_tokens=hc.vocab_size, input_len=hc.max_position_embeddings,
            pos_encoding="trainable", output_len=p.decoder.output_position_encodings.position_embeddings.shape[0],
            output_dim=d["q_dim"], ffw_output=d["ffw"], decoder_heads=d["heads"], decoder_qk_channels=d["qk"],
            decoder_v_channels=d["v"], decoder_residual=d["residual"], decoder_reduction=None,
            decoder_projection=False, tie_embeddings=True, n_classes=hc.vocab_size, **common)
    dec = p.decoder.decoder
    d = _layer_shape(dec.decoding_cross_attention)
    head = dict(input_type="raw", input_channels=pre.in_channels, output_len=1, output_dim=d["q_dim"],
                ffw_output=d["ffw"], decoder_heads=d["heads"], decoder_qk_channels=d["qk"], decoder_v_channels=d["v"],
                decoder_residual=d["residual"], decoder_reduction="first", n_classes=dec.final_layer.out_features)
    if pre.spatial_downsample != 1:
        raise ValueError(f"spatial_downsample={pre.spatial_downsample}: only 1 is supported (every checkpoint uses 1)")
    if pre.prep_type == "pixels" and pre.position_encoding_type == "fourier":
        shape = tuple(image_size or (224, 224))
        pe = pre.position_embeddings
        return PerceiverConfig(pos_encoding="fourier", input_shape=shape, input_len=math.prod(shape),
                               input_projection=False, fourier_bands=pe.num_bands,
                               max_resolution=tuple(pe.max_resolution), fourier_sine_only=pe.sine_only,
                               **head, **common)
    # learned positions (the class checked above): a 1x1 convolution, then a trainable table concatenated
    side = math.isqrt(pre.position_embeddings.position_embeddings.shape[0])
    return PerceiverConfig(pos_encoding="trainable", input_shape=(side, side), input_len=side * side,
                           pos_concat_dim=pre.num_channels - pre.out_channels, **head, **common)


def _block_weights(prefix: str, layer, self_attention: bool) -> dict:
    """percnb Block state-dict entries from one transformers PerceiverLayer (q, k, v fused as percnb fuses them)."""
    a, out, mlp = layer.attention.self, layer.attention.output.dense, layer.mlp
    s = {"ln_q": a.layernorm1, "proj": out, "ln_mlp": layer.layernorm, "mlp.0": mlp.dense1, "mlp.2": mlp.dense2}
    if not self_attention:
        s.update(ln_kv=a.layernorm2, q=a.query)
    state = {f"{prefix}.{name}.{p}": getattr(module, p) for name, module in s.items() for p in ("weight", "bias")}
    fused = ("qkv", [a.query, a.key, a.value]) if self_attention else ("kv", [a.key, a.value])
    for p in ("weight", "bias"):
        state[f"{prefix}.{fused[0]}.{p}"] = torch.cat([getattr(m, p) for m in fused[1]])
    return state


@torch.no_grad()
def from_transformers(model, image_size: Optional[Tuple[int, int]] = None, byte_ids: bool = True
                      ) -> Union[PerceiverMLM, PerceiverImage]:
    """A percnb model, in eval mode, computing what the transformers Perceiver `model` computes.

    model: a transformers `PerceiverForMaskedLM`, `...ImageClassificationFourier` or `...Learned`.
    Returns PerceiverMLM ((batch, input_len) ids -> (batch, input_len, vocab) logits) or PerceiverImage
    ((batch, 3, height, width) -> (batch, classes)). image_size: see `config_from_transformers`.
    byte_ids (language model): reorder the vocabulary to percnb's byte ids (bytes 0..255, [MASK] 256, then
    `SPECIAL_IDS`), so `percnb.data.text` and the explorer's byte labels work; False keeps transformers' ids.
    The weights are copied, and the Fourier table is transformers' own float32 one (percnb's float64-computed
    table differs by up to 5e-5, which moves logits by ~1e-4). The model is built on the meta device and the
    weights assigned, so no time goes into an initialisation that is overwritten.
    """
    config = config_from_transformers(model, image_size)
    p = model.perceiver
    state = {"latents": p.embeddings.latents}
    state.update(_block_weights("encoder", p.encoder.cross_attention, False))
    for i in range(config.num_layers):     # repeated layers are one module, listed under each index
        state.update(_block_weights(f"processors.{i}", p.encoder.self_attends[i % len(p.encoder.self_attends)], True))
    pre = p.input_preprocessor
    if config.input_type == "tokens":
        order = BYTE_ORDER if byte_ids and config.input_num_tokens == len(BYTE_ORDER) else slice(None)
        if byte_ids and isinstance(order, slice):
            raise ValueError(f"byte_ids=True needs the byte vocabulary of {len(BYTE_ORDER)} ids, got "
                             f"{config.input_num_tokens}; pass byte_ids=False")
        state.update({"embed.token_embedding.weight": pre.embeddings.weight[order],
                      "embed.pos_emb": pre.position_embeddings.weight,
                      "queries": p.decoder.output_position_encodings.position_embeddings,
                      "head_bias": model.embedding_decoder.bias[order]})
        state.update(_block_weights("decoder", p.decoder.decoding_cross_attention, False))
        target = PerceiverMLM
    else:
        dec = p.decoder.decoder
        state.update({"queries": dec.output_position_encodings.position_embeddings,
                      "head.weight": dec.final_layer.weight, "head.bias": dec.final_layer.bias})
        state.update(_block_weights("decoder", dec.decoding_cross_attention, False))
        if config.pos_encoding == "fourier":
            state["embed.fourier"] = pre.position_embeddings(config.input_shape, 1, device="cpu",
                                                             dtype=torch.float32)[0]
        else:
            conv = pre.convnet_1x1                                # a 1x1 convolution is a per-pixel Linear
            state["embed.input_proj.weight"], state["embed.input_proj.bias"] = conv.weight.flatten(1), conv.bias
            # positions_projection(table) folded into the table: the same function of the pixels
            state["embed.pos_emb"] = pre.positions_projection(pre.position_embeddings.position_embeddings)
        target = PerceiverImage
    with torch.device("meta"):
        percnb_model = target(config)
    copies = {}       # one copy per transformers tensor, so repeated layers stay one module
    for value in state.values():
        if id(value) not in copies:
            copies[id(value)] = value.detach().to("cpu", torch.float32).clone()
    # assign=True puts these tensors in place of the meta ones (each Parameter keeps its requires_grad)
    percnb_model.load_state_dict({k: copies[id(v)] for k, v in state.items()}, strict=True, assign=True)
    return percnb_model.eval()


def load(name_or_path: str, *, image_size: Optional[Tuple[int, int]] = None, byte_ids: bool = True,
         **from_pretrained_kwargs) -> Union[PerceiverMLM, PerceiverImage]:
    """Download (or read from a local folder) a transformers Perceiver and convert it (`from_transformers`).

    name_or_path: a hub name such as "deepmind/language-perceiver", "deepmind/vision-perceiver-fourier"
    or "deepmind/vision-perceiver-learned", or a folder written by transformers' `save_pretrained`.
    from_pretrained_kwargs go to transformers' `from_pretrained` (revision=, cache_dir=,
    local_files_only=, ...). The class comes from the checkpoint's config (`architectures`).
    """
    import transformers
    config = transformers.AutoConfig.from_pretrained(name_or_path, **from_pretrained_kwargs)
    names = [a for a in (config.architectures or []) if a in SUPPORTED]
    if not names:
        raise ValueError(f"{name_or_path!r} holds {config.architectures}, none of the supported {SUPPORTED}")
    model = getattr(transformers, names[0]).from_pretrained(name_or_path, config=config, **from_pretrained_kwargs)
    converted = from_transformers(model.eval(), image_size=image_size, byte_ids=byte_ids)
    del model                                     # the transformers copy is not kept (about 0.8 GB for the MLM)
    return converted


def untie(model: Perceiver) -> Perceiver:
    """A copy of a tie_embeddings model whose head is its own Linear (a copy of the input embedding matrix
    and the bias): the same function, for layouts that keep the embeddings and the head apart (the seed's
    nn.Sequential, a pipeline). The language Perceiver gains 768 x 262 parameters."""
    if not isinstance(model, Perceiver) or not model.config.tie_embeddings:
        raise ValueError("untie needs a percnb Perceiver built with tie_embeddings=True")
    config = model.config.replace(tie_embeddings=False, decoder_projection=True)
    state = dict(model.state_dict())
    state["head.weight"] = state["embed.token_embedding.weight"].clone()
    state["head.bias"] = state.pop("head_bias")
    untied = type(model)(config)
    untied.load_state_dict(state, strict=True)
    return untied.eval()


def encode_text(text: Union[str, bytes], length: int = 2048) -> Tuple[torch.Tensor, torch.Tensor]:
    """What PerceiverTokenizer(padding='max_length') gives, in percnb's byte ids: ([CLS] bytes [SEP] [PAD]...,
    the 0/1 attention mask), two (length,) long tensors. Raises ValueError when the text does not fit."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if len(data) + 2 > length:
        raise ValueError(f"text has {len(data)} bytes; with [CLS] and [SEP] it needs length >= {len(data) + 2}, "
                         f"got length={length}")
    ids = torch.full((length,), SPECIAL_IDS["[PAD]"], dtype=torch.long)
    ids[:len(data) + 2] = torch.tensor([SPECIAL_IDS["[CLS]"], *data, SPECIAL_IDS["[SEP]"]], dtype=torch.long)
    mask = torch.zeros(length, dtype=torch.long)
    mask[:len(data) + 2] = 1
    return ids, mask


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters, a shared tensor counted once: what transformers' `num_parameters()` counts
    (percnb's fixed Fourier table is not trainable, so it is not counted)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def full_size_config(name: str) -> PerceiverConfig:
    """The percnb config of a released checkpoint's architecture, without downloading anything:
    "deepmind/language-perceiver", "deepmind/vision-perceiver-fourier" or "deepmind/vision-perceiver-learned".
    The widths are those of the hub's config.json files (the language model's q/k 256 and v 1280 are not
    transformers' PerceiverConfig() defaults, which make a 269M-parameter model instead of the 201M one)."""
    latent = dict(dropout=0.0, num_heads=8)
    if name == "deepmind/language-perceiver":
        return PerceiverConfig(
            input_type="tokens", input_num_tokens=262, input_len=2048, input_dim=768, pos_encoding="trainable",
            latent_len=256, latent_dim=1280, cross_heads=8, cross_qk_channels=256, cross_v_channels=1280,
            ffw_cross=1280, num_layers=26, self_qk_channels=256, ffw_latent=1280, output_len=2048, output_dim=768,
            decoder_heads=8, decoder_qk_channels=256, decoder_v_channels=768, ffw_output=768, decoder_residual=False,
            decoder_projection=False, tie_embeddings=True, n_classes=262, decoder_reduction=None, **latent)
    image = dict(input_type="raw", input_channels=3, input_shape=(224, 224), input_len=224 * 224, latent_len=512,
                 latent_dim=1024, cross_heads=1, ffw_cross=1024, num_layers=48, layers_per_block=6,
                 ffw_latent=1024, output_len=1, output_dim=1024, decoder_heads=1, ffw_output=1024,
                 decoder_residual=True, decoder_reduction="first", n_classes=1000, **latent)
    if name == "deepmind/vision-perceiver-fourier":
        return PerceiverConfig(input_dim=261, pos_encoding="fourier", fourier_bands=64, max_resolution=(224, 224),
                               input_projection=False, cross_qk_channels=261, cross_v_channels=261, **image)
    if name == "deepmind/vision-perceiver-learned":
        return PerceiverConfig(input_dim=512, pos_encoding="trainable", pos_concat_dim=256, cross_qk_channels=512,
                               cross_v_channels=512, **image)
    raise ValueError(f"name must be one of 'deepmind/language-perceiver', 'deepmind/vision-perceiver-fourier', "
                     f"'deepmind/vision-perceiver-learned', got {name!r}")


__all__ = ["SUPPORTED", "BYTE_ORDER", "SPECIAL_IDS", "config_from_transformers", "from_transformers", "load",
           "untie", "encode_text", "parameter_count", "full_size_config"]
