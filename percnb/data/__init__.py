"""Offline-first data: real images (`percnb.data.images`) and real text (`percnb.data.text`)."""
from .images import (
    ImageSplits,
    PixelSet,
    RandomShift,
    load_digits_splits,
    load_torchvision_splits,
    pixel_set,
    pixels_at,
    random_keep,
)
from .text import ByteMasker, RandomWindows, TextSplits, load_text_splits, masked_eval_set

__all__ = ["ImageSplits", "PixelSet", "RandomShift", "pixel_set", "pixels_at", "random_keep",
           "load_digits_splits", "load_torchvision_splits", "ByteMasker", "RandomWindows",
           "TextSplits", "load_text_splits", "masked_eval_set"]
