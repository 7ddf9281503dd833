"""Where percnb computes: one answer for `fit`, `evaluate` and the notebooks.

`default_device()` is the first CUDA GPU when torch sees one, else the CPU; `resolve_device(device)`
turns a user's `device=` (None, a string or a torch.device) into a torch.device and refuses a GPU that
is not there; `autocast(device, enabled)` is bfloat16 mixed precision on that device (`fit(amp=True)`);
`describe(device)` is the line a notebook prints. Pipelines pick their devices per rank in
`percnb.pipeline.choose_backend` (NCCL needs one GPU per stage).
"""
from __future__ import annotations

import contextlib
import os
from typing import ContextManager, Optional, Union

import torch

DeviceLike = Union[str, torch.device]


def default_device() -> torch.device:
    """The first CUDA device when one is available (a GPU runtime on Colab or Kaggle, a workstation),
    else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: Optional[DeviceLike] = None) -> torch.device:
    """`device` as a torch.device; None means `default_device()`. A CUDA device that this machine does
    not have is a ValueError now, not an error deep inside the first step."""
    if device is None:
        return default_device()
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be None, a string such as 'cpu' or 'cuda', or a torch.device, "
                        f"got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device={device!r} is not a device torch knows ({error})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= count:
            raise ValueError(f"device={str(device)!r} asks for CUDA device {index}, but this machine has {count} "
                             "CUDA device(s); pass device=None to use a GPU only when there is one")
    return device


def autocast(device: torch.device, enabled: bool = True) -> ContextManager:
    """bfloat16 autocast on `device` (CUDA or CPU): matrix products and convolutions run in bfloat16,
    losses and softmax-style reductions stay float32 (torch's autocast lists); no gradient scaler is
    needed, since bfloat16 has float32's exponent range. enabled=False is a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"amp (bfloat16 autocast) runs on 'cuda' or 'cpu', got device {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"amp=True needs bfloat16, which {torch.cuda.get_device_name(device)} does not support; "
                         "train with amp=False (float32)")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def describe(device: Optional[torch.device] = None) -> str:
    """A one-line description of `device` (default: `default_device()`) for a notebook's setup cell,
    e.g. 'cuda:0 (Tesla T4), 2 CUDA devices' or 'cpu (2 torch threads, 2 cores)'."""
    device = resolve_device(device)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        return f"{device} ({torch.cuda.get_device_name(device)}), {count} CUDA device{'s' * (count != 1)}"
    threads, cores = torch.get_num_threads(), os.cpu_count()
    return f"{device} ({threads} torch thread{'s' * (threads != 1)}, {cores} core{'s' * (cores != 1)})"
