"""Files that ship inside the percnb package, so a notebook needs no repository checkout: the trained
byte-level masked language model with its JSON report, the design study behind notebook 04's table,
and a snapshot of the English text the model was trained and tested on.

    model = PerceiverMLM.from_pretrained("bytes-mlm")   # or percnb.assets.load_pretrained("bytes-mlm")
    report = percnb.assets.report("bytes-mlm")          # command, run time, curves, test accuracy
    study = percnb.assets.study()                       # scripts/train_mlm.py --study
    docs = percnb.assets.topics()                       # {title: text}, the corpus of load_text_splits()

The corpus is `pydoc_data.topics` of Python 3.11, compressed; its sha256 is checked on every load,
so the document split, the baselines and the checkpoint's test score are the same on every Python
(each CPython release rewrites those topics). `scripts/snapshot_corpus.py` made it;
`scripts/train_mlm.py --overwrite-shipped` remakes the model files here.
"""
from __future__ import annotations

import hashlib
import json
import lzma
from functools import lru_cache
from importlib import resources
from typing import Dict

# name -> (checkpoint file, its report); a report is the checkpoint's path with .json
PRETRAINED = {"bytes-mlm": "mlm_bytes.pt"}
STUDY = "mlm_study.json"
TOPICS = "pydoc_topics_3.11.json.xz"
TOPICS_SHA256 = "dfc7ab5ef1ba5960f5d68169caf102aa6b07a1dcd47ce830def0f21fc804fb39"


def _file(name: str):
    return resources.files(__name__).joinpath(name)


def _checkpoint_name(name: str) -> str:
    if name not in PRETRAINED:
        raise ValueError(f"name must be one of {sorted(PRETRAINED)} (the models shipped with percnb), got {name!r}")
    return PRETRAINED[name]


def checkpoint(name: str = "bytes-mlm") -> bytes:
    """The raw bytes of a shipped checkpoint (what `Perceiver.save` wrote); `load_pretrained` rebuilds it."""
    return _file(_checkpoint_name(name)).read_bytes()


def report(name: str = "bytes-mlm") -> dict:
    """The JSON report `scripts/train_mlm.py` wrote beside a shipped checkpoint, as a dict: its command,
    machine, seconds, steps, config, learning curves (`history`), test accuracy and baselines."""
    return json.loads(_file(_checkpoint_name(name).removesuffix(".pt") + ".json").read_text(encoding="utf-8"))


def study() -> dict:
    """The design study (`scripts/train_mlm.py --study`) as a dict: its command and settings, and under
    `results` each variant's changes, steps and validation accuracy curve."""
    return json.loads(_file(STUDY).read_text(encoding="utf-8"))


def load_pretrained(name: str = "bytes-mlm", map_location="cpu"):
    """The shipped model `name`, rebuilt by `Perceiver.load` (its own class, eval mode, float32 weights
    as saved); `PerceiverMLM.from_pretrained(name)` is the same call."""
    import io

    from ..models import Perceiver
    return Perceiver.load(io.BytesIO(checkpoint(name)), map_location=map_location)


@lru_cache(maxsize=1)
def _topics_json() -> str:
    blob = _file(TOPICS).read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != TOPICS_SHA256:
        raise ValueError(f"the shipped corpus {TOPICS} has sha256 {digest}, expected {TOPICS_SHA256}: the file "
                         "is damaged or was replaced; reinstall percnb (or rerun scripts/snapshot_corpus.py and "
                         "update TOPICS_SHA256 on purpose)")
    return lzma.decompress(blob).decode("utf-8")


def topics() -> Dict[str, str]:
    """The 79 Python documentation topics of Python 3.11 (`pydoc_data.topics`, the text behind
    `help("if")`), title -> text: about 0.47 MB of English, the corpus of `load_text_splits()`."""
    return dict(json.loads(_topics_json())["topics"])
