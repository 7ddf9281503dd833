"""Write the English corpus that ships with percnb: `pydoc_data.topics` of the running Python (3.11 for
the shipped file), sorted and compressed, then print its sha256 for `percnb.assets.TOPICS_SHA256`.

    python scripts/snapshot_corpus.py            # writes percnb/assets/pydoc_topics_<major.minor>.json.xz

Every number of notebook 04 and of the shipped checkpoint's report depends on this text: replacing the
shipped file means retraining (`scripts/train_mlm.py --overwrite-shipped`) and updating the README.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import platform
import sys
from pathlib import Path
from pydoc_data.topics import topics

from percnb.io import atomic_write

ROOT = Path(__file__).resolve().parents[1]


def snapshot() -> bytes:
    """The corpus as the shipped file holds it: xz-compressed JSON, keys sorted, so a rerun on the same
    Python writes the same bytes."""
    document = {"source": "pydoc_data.topics", "python": platform.python_version(),
                "topics": dict(sorted(topics.items()))}
    text = json.dumps(document, indent=0, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return lzma.compress(text, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9)


def main() -> None:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = ROOT / "percnb" / "assets" / f"pydoc_topics_{version}.json.xz"
    blob = snapshot()
    atomic_write(out, lambda f: f.write(blob))
    print(f"{out}: {len(topics)} topics, {len(blob):,} bytes, sha256 {hashlib.sha256(blob).hexdigest()}")


if __name__ == "__main__":
    main()
