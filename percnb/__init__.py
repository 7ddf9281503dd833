"""percnb: a small, exact, fast Perceiver library and a course of notebooks that teach it.

The model is in `percnb.models` (the textbook code) and `percnb.fast` (kernels that compute the same
thing faster); its settings in `percnb.config`; training in `percnb.train`; pipeline parallelism in
`percnb.pipeline`; data in `percnb.data`; plots and widgets in `percnb.viz` and `percnb.widgets`; DeepMind's
pretrained Perceivers, converted from `transformers`, in `percnb.hub` (the optional extra `percnb[hub]`).
"""
from .config import PerceiverConfig, image_config, image_io_config, mlm_config
from .encodings import build_position_encoding, fourier_encode, fourier_features, grid_coordinates, sinusoid_encoding
from .models import (
    Block,
    DecoderBlock,
    Embeddings,
    EncoderBlock,
    Perceiver,
    PerceiverImage,
    PerceiverImageIO,
    PerceiverMLM,
    ProcessorBlock,
    get_distributed_model,
    get_sequential_from_config,
)

__version__ = "0.1.0"
__all__ = [
    "PerceiverConfig", "build_position_encoding", "fourier_encode", "fourier_features", "grid_coordinates",
    "sinusoid_encoding", "Block", "Embeddings",
    "EncoderBlock", "ProcessorBlock", "DecoderBlock", "get_sequential_from_config", "Perceiver", "PerceiverImage",
    "PerceiverMLM", "PerceiverImageIO", "image_config", "image_io_config", "mlm_config", "get_distributed_model",
]
