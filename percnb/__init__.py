"""percnb: a small, exact, fast Perceiver library and a course of notebooks that teach it."""
from .config import PerceiverConfig
from .encodings import build_position_encoding, fourier_features, sinusoid_encoding
from .models import (Block, DecoderBlock, Embeddings, EncoderBlock, Perceiver, PerceiverImage, PerceiverMLM,
                     ProcessorBlock, get_distributed_model, get_sequential_from_config, image_config,
                     mlm_config)

__version__ = "0.1.0"
__all__ = ["PerceiverConfig", "build_position_encoding", "fourier_features", "sinusoid_encoding", "Block",
           "Embeddings", "EncoderBlock", "ProcessorBlock", "DecoderBlock", "get_sequential_from_config",
           "Perceiver", "PerceiverImage", "PerceiverMLM", "image_config", "mlm_config",
           "get_distributed_model"]
