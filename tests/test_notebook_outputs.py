"""Committed notebook outputs are read by everyone (GitHub, Colab, the course site): they must not show
where they were run (a home folder, a checkout, a temp folder, an installed package's folder)."""
import json
import re
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MACHINE_PATHS = re.compile("|".join([
    r"/work/", r"/root/", r"/home/[^/\s'\"]+/", r"/Users/[^/\s'\"]+/", r"/tmp/", r"/var/folders/",
    r"site-packages", r"dist-packages", r"[A-Za-z]:\\{1,2}Users",
    *(re.escape(str(p)) for p in (ROOT, Path.home(), Path(tempfile.gettempdir())) if len(p.parts) >= 2),
]))


def _texts(nb: dict):
    """(where, text) for every text a reader sees: streams, text/* data, tracebacks, saved widget values.
    Base64 payloads (image/png, widget buffers) are skipped: they can contain '/tmp/' by chance."""
    for index, cell in enumerate(nb["cells"]):
        for output in cell.get("outputs", []):
            where = f"cell {index} ({output.get('output_type')})"
            if "text" in output:
                yield where, "".join(output["text"])
            for mime, value in output.get("data", {}).items():
                if mime.startswith("text/") or mime.endswith("json"):
                    yield f"{where} {mime}", value if isinstance(value, str) else json.dumps(value)
            if output.get("output_type") == "error":
                yield where, "\n".join(output.get("traceback", []))
    state = nb["metadata"].get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    for model_id, model in state.items():
        for key, value in model.get("state", {}).items():
            if isinstance(value, str):
                yield f"widget {model_id} {key}", value


def test_the_scan_finds_a_machine_path():
    nb = {"cells": [{"cell_type": "code", "outputs": [
        {"output_type": "stream", "text": ["saved to /home/ada/percnb/ckpt.pt\n"]}]}], "metadata": {}}
    assert [MACHINE_PATHS.search(t) for _, t in _texts(nb)] != [None]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_show_no_path_of_the_machine_they_ran_on(path):
    found = [f"{where}: ...{text[max(0, m.start() - 60):m.end() + 40]!r}..."
             for where, text in _texts(json.loads(path.read_text())) for m in [MACHINE_PATHS.search(text)] if m]
    assert not found, f"{path.name} shows paths of the machine it ran on (print names relative to the repository):\n" \
                      + "\n".join(found)
