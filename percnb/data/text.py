"""Real English text as UTF-8 bytes, offline: the Python documentation topics of CPython 3.11
(`pydoc_data.topics`, about 0.47 MB, shipped as a snapshot in `percnb.assets`) or any text file;
BERT-style masking shared by training and evaluation; and the two count baselines a masked byte model has to beat."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import checks

BYTES = 256                 # ids 0..255 are the bytes themselves
MASK_ID = 256               # the [MASK] token
VOCAB_SIZE = 257            # what a PerceiverMLM over bytes needs as input_num_tokens and n_classes
IGNORE = -100               # target of a position that is not scored (F.cross_entropy's ignore_index)
SEPARATOR = b"\n\n"         # between documents when a split is concatenated


def encode(text: Union[str, bytes]) -> torch.Tensor:
    """UTF-8 bytes of `text` as a (len,) long tensor of ids in [0, 256)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.tensor(list(data), dtype=torch.long)


def _as_ids(ids, name: str, dims: int, shape: str) -> torch.Tensor:
    """`ids` as a long tensor of `dims` dimensions: any integer dtype is accepted (uint8 is the natural
    one for bytes) and cast; float, bool and complex tensors are refused, since ids are counts."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a {shape} tensor of byte ids, got {type(ids).__name__}")
    if ids.dim() != dims or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be a {shape} tensor of byte ids (any integer dtype), got shape "
                         f"{tuple(ids.shape)} and dtype {ids.dtype}")
    return ids.long()


def decode(ids: Union[torch.Tensor, Sequence[int]], mask_char: str = "█") -> str:
    """Text of byte ids; [MASK] shows as `mask_char`, broken UTF-8 as U+FFFD."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    out, run = [], bytearray()
    for i in ids:
        if 0 <= i < BYTES:
            run.append(i)
            continue
        out.append(run.decode("utf-8", errors="replace"))
        run = bytearray()
        out.append(mask_char if i == MASK_ID else "?")
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)


@dataclass
class TextSplits:
    """Byte ids of the train/validation/test text, each a (len,) long tensor, split by document so
    that no test sentence was ever seen in training; `documents` names each split's documents."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    documents: Dict[str, List[str]]

    def sizes(self) -> Dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _documents(path: Optional[Union[str, os.PathLike]]) -> Dict[str, str]:
    if path is None:
        # The shipped snapshot, not this interpreter's pydoc_data: every CPython release rewrites those
        # topics, and the split, the baselines and the shipped model's test score must not move with it.
        from ..assets import topics
        return topics()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path={path!r} is not a file; pass a UTF-8 text file or None for the "
                                "Python documentation topics")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    # A plain file has no document boundaries of its own: blank lines make paragraphs its documents.
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return {f"paragraph {i}": p for i, p in enumerate(paragraphs)}


def load_text_splits(path: Optional[Union[str, os.PathLike]] = None, val_fraction: float = 0.1,
                     test_fraction: float = 0.1, seed: int = 0) -> TextSplits:
    """Documents of real text, shuffled by `seed` and dealt into test, validation and train until each
    of test and validation holds about its fraction of the bytes (whole documents only).

    path=None: the 79 Python documentation topics of Python 3.11's `pydoc_data.topics`, from the snapshot
    that ships with percnb (`percnb.assets.topics()`), so the splits are the same on every Python.
    A path: a UTF-8 text file whose blank-line separated paragraphs are the documents. Each split is
    its documents' UTF-8 bytes joined by a blank line.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be in (0, 1) and sum below 1, "
                         f"got {val_fraction} and {test_fraction}")
    docs = _documents(path)
    if len(docs) < 3:
        raise ValueError(f"need at least 3 documents to split by document, found {len(docs)} in {path!r}")
    names = sorted(docs)
    order = np.random.default_rng(seed).permutation(len(names))
    encoded = {n: docs[n].encode("utf-8") for n in names}
    total = sum(len(b) for b in encoded.values())
    chosen: Dict[str, List[str]] = {"test": [], "val": [], "train": []}
    targets = {"test": test_fraction * total, "val": val_fraction * total}
    filled = {"test": 0, "val": 0}
    for i in order:
        name = names[i]
        for split in ("test", "val"):
            if filled[split] < targets[split]:
                chosen[split].append(name)
                filled[split] += len(encoded[name])
                break
        else:
            chosen["train"].append(name)
    if not chosen["train"]:
        raise ValueError("no document is left for training; lower val_fraction/test_fraction or give more text")
    joined = {k: encode(SEPARATOR.join(encoded[n] for n in v)) for k, v in chosen.items()}
    return TextSplits(joined["train"], joined["val"], joined["test"], chosen)


# --------------------------------------------------------------------------- masking

class ByteMasker:
    """BERT-style corruption of byte windows, the same for training batches and evaluation sets.

    Of the positions chosen (a fraction `rate` of each window), 80% become [MASK], 10% a random byte
    and 10% stay as they are; only chosen positions are scored. With `span` > 1, whole runs of
    `span` consecutive bytes are chosen (about `rate` of the bytes in all). Call it on an `(windows,)`
    batch, as `fit(augment=...)` does, to get `[inputs, targets]`; `targets` holds the original byte
    at chosen positions and IGNORE (-100) elsewhere. Draws from torch's global generator unless a
    `generator` is given (evaluation sets pass their own, so they are fixed).
    """

    def __init__(self, rate: float = 0.15, span: int = 1, mask_fraction: float = 0.8,
                 random_fraction: float = 0.1):
        if not 0 < rate < 1:
            raise ValueError(f"rate must be in (0, 1), got {rate}")
        checks.positive_int("span", span)
        if not (0 <= mask_fraction and 0 <= random_fraction and mask_fraction + random_fraction <= 1):
            raise ValueError(f"mask_fraction and random_fraction must be >= 0 and sum to at most 1, "
                             f"got {mask_fraction} and {random_fraction}")
        self.rate, self.span = rate, span
        self.mask_fraction, self.random_fraction = mask_fraction, random_fraction

    def chosen(self, shape: Tuple[int, int], generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(batch, seq) bool: the positions to corrupt and score."""
        batch, seq = shape
        if self.span == 1:
            return torch.rand(batch, seq, generator=generator) < self.rate
        starts = torch.rand(batch, seq, generator=generator) < self.rate / self.span
        # A position is chosen when a span started at it or at one of the span-1 positions before it.
        padded = torch.nn.functional.pad(starts.float(), (self.span - 1, 0))[:, None]
        return torch.nn.functional.max_pool1d(padded, self.span, stride=1)[:, 0] > 0

    def mask(self, windows: torch.Tensor, generator: Optional[torch.Generator] = None
             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """windows: (batch, seq) byte ids of any integer dtype (uint8 included) -> (inputs, targets),
        both (batch, seq) long. The same windows give the same result whatever their dtype."""
        windows = _as_ids(windows, "windows", 2, "(batch, seq)")
        if windows.numel() and not (0 <= int(windows.min()) and int(windows.max()) < BYTES):
            raise ValueError(f"windows must hold byte ids in [0, {BYTES}), got values from {int(windows.min())} "
                             f"to {int(windows.max())}; mask raw bytes, not already masked inputs")
        chosen = self.chosen(tuple(windows.shape), generator)
        roll = torch.rand(windows.shape, generator=generator)
        to_mask = chosen & (roll < self.mask_fraction)
        to_random = chosen & (roll >= self.mask_fraction) & (roll < self.mask_fraction + self.random_fraction)
        inputs = windows.clone()
        inputs[to_mask] = MASK_ID
        inputs[to_random] = torch.randint(0, BYTES, (int(to_random.sum()),), generator=generator)
        targets = torch.where(chosen, windows, torch.full_like(windows, IGNORE))
        return inputs, targets

    def __call__(self, batch):
        windows, *rest = batch
        return [*self.mask(windows), *rest]


# --------------------------------------------------------------------------- windows

class RandomWindows(Dataset):
    """`length` windows of `seq_len` bytes at random places of `data` (a new place at every access,
    from torch's global generator, which `fit(seed=...)` seeds). Items are 1-tuples `(window,)`."""

    def __init__(self, data: torch.Tensor, seq_len: int, length: int):
        checks.positive_int("seq_len", seq_len)
        checks.positive_int("length", length)
        data = _as_ids(data, "data", 1, "1-D")
        if len(data) <= seq_len:
            raise ValueError(f"data must be longer than seq_len={seq_len}, got {len(data)} ids; "
                             "give more text or a shorter seq_len")
        self.data, self.seq_len, self.length = data, seq_len, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        start = int(torch.randint(0, len(self.data) - self.seq_len + 1, ()))
        return (self.data[start:start + self.seq_len],)


def fixed_windows(data: torch.Tensor, seq_len: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping (n, seq_len) windows covering `data` from its start (the tail is dropped);
    with `max_windows`, that many spread evenly over the text. data: (len,) ids of any integer dtype;
    the windows are long."""
    checks.positive_int("seq_len", seq_len)
    if max_windows is not None:
        checks.positive_int("max_windows", max_windows)
    data = _as_ids(data, "data", 1, "1-D")
    n = len(data) // seq_len
    if n < 1:
        raise ValueError(f"data has {len(data)} bytes, fewer than seq_len={seq_len}")
    windows = data[:n * seq_len].view(n, seq_len)
    if max_windows is not None and max_windows < n:
        windows = windows[torch.linspace(0, n - 1, max_windows).round().long()]
    return windows


def masked_eval_set(data: torch.Tensor, seq_len: int, masker: ByteMasker, seed: int = 0,
                    max_windows: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fixed (inputs, targets) evaluation set: `fixed_windows` corrupted once with a seeded generator."""
    return masker.mask(fixed_windows(data, seq_len, max_windows), torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- count baselines

def unigram_predict(train: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The most frequent training byte, everywhere: (batch, seq) long predictions."""
    train, inputs = _as_ids(train, "train", 1, "1-D"), _as_ids(inputs, "inputs", 2, "(batch, seq)")
    return torch.full_like(inputs, int(torch.bincount(train, minlength=BYTES).argmax()))


def neighbour_predict(train: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """For each position, the byte seen most often in the training text between the same left and right
    neighbours as in `inputs` (which may themselves be corrupted); when that pair never occurs, the most
    frequent byte after the left neighbour, then the unigram guess. (batch, seq) predictions.

    This is what a model could learn from counts alone, with no more context than two bytes.
    """
    train, inputs = _as_ids(train, "train", 1, "1-D"), _as_ids(inputs, "inputs", 2, "(batch, seq)")
    t = train.numpy().astype(np.int64)
    v = BYTES + 1                                                # a [MASK] neighbour is its own symbol
    trigram = np.zeros((v * v, BYTES), dtype=np.int32)
    np.add.at(trigram, (t[:-2] * v + t[2:], t[1:-1]), 1)
    bigram = np.zeros((v, BYTES), dtype=np.int32)
    np.add.at(bigram, (t[:-1], t[1:]), 1)
    best = np.where(bigram.any(-1), bigram.argmax(-1), int(np.bincount(t, minlength=BYTES).argmax()))
    best = np.where(trigram.any(-1), trigram.argmax(-1), np.repeat(best, v))   # (left * v + right) -> byte
    x = inputs.numpy().astype(np.int64)
    left = np.pad(x, ((0, 0), (1, 0)), constant_values=MASK_ID)[:, :-1]
    right = np.pad(x, ((0, 0), (0, 1)), constant_values=MASK_ID)[:, 1:]
    guess = best[left * v + right]
    return torch.from_numpy(guess).long()


def masked_accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of the scored positions (targets != IGNORE) where predictions equal targets."""
    scored = targets != IGNORE
    if not bool(scored.any()):
        raise ValueError("targets score no position (all are IGNORE)")
    return float((predictions[scored] == targets[scored]).float().mean())
