"""What notebooks need ships inside the package and loads through percnb's API, never through a path
relative to a checkout: the byte MLM, its reports, and the English corpus, the same on every Python."""
import sys
import types

import pytest

from percnb import assets
from percnb.config import PerceiverConfig
from percnb.data.text import load_text_splits
from percnb.models import Perceiver, PerceiverImage, PerceiverMLM


def test_from_pretrained_rebuilds_the_shipped_model_its_report_describes():
    model = PerceiverMLM.from_pretrained("bytes-mlm")
    report = assets.report("bytes-mlm")
    assert isinstance(model, PerceiverMLM) and not model.training
    # The report predates later config fields: those hold their defaults, the rest must agree.
    assert model.config.to_dict() == PerceiverConfig.from_dict(report["config"]).to_dict()
    assert model.num_parameters() == report["parameters"]
    assert len(assets.checkpoint("bytes-mlm")) == report["file_bytes"]


def test_from_pretrained_refuses_an_unknown_name_and_the_wrong_class():
    with pytest.raises(ValueError, match="name must be one of \\['bytes-mlm'\\]"):
        PerceiverMLM.from_pretrained("bytes-mlm-large")
    with pytest.raises(ValueError, match="is a PerceiverMLM, which PerceiverImage.from_pretrained cannot return"):
        PerceiverImage.from_pretrained("bytes-mlm")
    assert isinstance(Perceiver.from_pretrained("bytes-mlm"), PerceiverMLM)


def test_the_study_lists_every_variant_with_its_curve():
    study = assets.study()
    assert study["command"].startswith("python scripts/train_mlm.py --study")
    assert all(len(r["val_step"]) == len(r["val_accuracy"]) > 0 for r in study["results"].values())


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the snapshot is Python 3.11's pydoc_data.topics")
def test_the_corpus_snapshot_is_python_311s_pydoc_topics():
    from pydoc_data.topics import topics
    assert assets.topics() == dict(topics) and len(topics) == 79


def test_the_text_splits_come_from_the_snapshot_whatever_this_python_ships(monkeypatch):
    before = load_text_splits(seed=0)
    other = types.ModuleType("pydoc_data.topics")
    other.topics = {"if": "another Python's text", "for": "rewritten", "while": "differently"}
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", other)
    after = load_text_splits(seed=0)
    assert after.documents == before.documents and after.sizes() == before.sizes()
    assert after.test.equal(before.test)


def test_a_damaged_corpus_snapshot_is_refused_by_its_sha256(monkeypatch, tmp_path):
    damaged = bytearray(assets._file(assets.TOPICS).read_bytes())
    damaged[100] ^= 1
    (tmp_path / assets.TOPICS).write_bytes(bytes(damaged))
    monkeypatch.setattr(assets, "_file", lambda name: tmp_path / name)
    assets._topics_json.cache_clear()
    try:
        with pytest.raises(ValueError, match="is damaged or was replaced"):
            assets.topics()
    finally:
        assets._topics_json.cache_clear()
