"""Perceiver.save and Perceiver.load: atomic saves, errors that name the file and what is wrong with it, a
config fingerprint that catches an edited checkpoint, and the device map_location asks for."""
import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from percnb import io
from percnb.config import PerceiverConfig
from percnb.models import Perceiver

ROOT = Path(__file__).resolve().parents[2]


def tiny(**changes) -> PerceiverConfig:
    base = dict(input_len=12, input_dim=6, latent_len=4, latent_dim=8, output_dim=8, ffw_latent=16,
                ffw_output=16, num_heads=2, num_layers=1, n_classes=5)
    return PerceiverConfig(**{**base, **changes})


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_save_that_fails_part_way_keeps_the_previous_checkpoint(tmp_path):
    # a real failure part-way: a file size limit (RLIMIT_FSIZE) the new, larger checkpoint exceeds
    path = tmp_path / "model.pt"
    script = textwrap.dedent(f"""
        import resource, signal
        from percnb.config import PerceiverConfig
        from percnb.models import Perceiver
        small = PerceiverConfig(input_len=12, input_dim=6, latent_len=4, latent_dim=8, output_dim=8,
                                ffw_latent=16, ffw_output=16, num_heads=2, num_layers=1, n_classes=5)
        Perceiver(small).save({str(path)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past the limit raises OSError(EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))
        try:
            Perceiver(small.replace(num_layers=8, seed=1)).save({str(path)!r})
        except OSError as error:
            print("failed:", error)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert "failed:" in out.stdout, out.stdout + out.stderr[-2000:]
    assert same_weights(Perceiver.load(path), Perceiver(tiny()))
    assert os.listdir(tmp_path) == ["model.pt"]                        # no temporary file left behind


def test_a_failed_save_in_process_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    Perceiver(tiny()).save(path)
    real_save = torch.save

    def half_then_disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(torch, "save", half_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        Perceiver(tiny(seed=1)).save(path)
    monkeypatch.undo()
    assert same_weights(Perceiver.load(path), Perceiver(tiny()))


def test_a_concurrent_reader_never_sees_a_half_written_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    Perceiver(tiny()).save(path)
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from percnb.config import PerceiverConfig
        from percnb.models import Perceiver
        config = PerceiverConfig(input_len=12, input_dim=6, latent_len=4, latent_dim=8, output_dim=8,
                                 ffw_latent=16, ffw_output=16, num_heads=2, num_layers=1, n_classes=5)
        models = [Perceiver(config), Perceiver(config.replace(seed=1))]
        print("ready", flush=True)
        for i in range(120):
            models[i % 2].save({str(path)!r})
    """)], env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    expected = [Perceiver(tiny()), Perceiver(tiny(seed=1))]
    loads, failures = 0, []
    while writer.poll() is None:
        try:
            model = Perceiver.load(path)
        except Exception as error:  # noqa: BLE001 -- any failure is what this test counts
            failures.append(repr(error))
            continue
        loads += 1
        assert any(same_weights(model, e) for e in expected)
    assert writer.wait() == 0
    assert loads > 0 and failures == [], f"{len(failures)} of {loads + len(failures)} loads failed: {failures[:3]}"


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    ("truncated", "not a complete torch checkpoint"),
    (b"not a checkpoint at all", "not a complete torch checkpoint"),
])
def test_a_damaged_file_is_named_with_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "broken.pt"
    if content == "truncated":
        Perceiver(tiny()).save(path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        Perceiver.load(path)
    assert str(path) in str(error.value)


def test_a_payload_without_its_class_is_named_with_what_is_missing(tmp_path):
    path = tmp_path / "classless.pt"
    Perceiver(tiny()).save(path)
    payload = torch.load(path, weights_only=True)
    del payload["class"]
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"without its \['class'\] entry") as error:
        Perceiver.load(path)
    assert str(path) in str(error.value)


def test_a_save_into_a_folder_that_refuses_files_names_the_path(tmp_path, monkeypatch):
    # root ignores a folder's permissions (this machine runs as root), so refuse creation the way a
    # read-only folder does, at the os.open that makes the temporary file
    real_open = os.open

    def read_only_folder(path, flags, *args):
        if str(path).startswith(str(tmp_path)) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only_folder)
    with pytest.raises(PermissionError, match="cannot write") as error:
        Perceiver(tiny()).save(tmp_path / "model.pt")
    assert str(tmp_path / "model.pt") in str(error.value) and "Permission denied" in str(error.value)


def test_a_checkpoint_whose_config_was_edited_is_refused(tmp_path):
    # heads and residuals change no weight's shape: the edited file's weights would load and compute
    # something else
    path = tmp_path / "model.pt"
    Perceiver(tiny(num_heads=2)).save(path)
    payload = torch.load(path, weights_only=True)
    payload["config"]["num_heads"] = 4
    torch.save(payload, path)
    with pytest.raises(ValueError, match="does not match the fingerprint") as error:
        Perceiver.load(path)
    assert str(path) in str(error.value)


def test_the_saved_fingerprint_is_the_configs():
    config = tiny().to_dict()
    assert io.config_fingerprint(config) == io.config_fingerprint(dict(reversed(list(config.items()))))
    assert io.config_fingerprint(config) != io.config_fingerprint({**config, "decoder_residual": True})


def test_checkpoints_without_a_fingerprint_still_load(tmp_path):
    old = Perceiver.load(ROOT / "tests" / "data" / "perceiver_v1.pt")      # percnb/1, before fingerprints
    path = tmp_path / "v2.pt"
    old.save(path)
    payload = torch.load(path, weights_only=True)
    del payload["fingerprint"]                                           # an early percnb/2 file
    torch.save(payload, path)
    assert same_weights(Perceiver.load(path), old)


def test_load_builds_the_model_on_the_device_map_location_asks_for(tmp_path):
    # no GPU here: the meta device stands in for "cuda" (before, the model came back on the CPU)
    path = tmp_path / "model.pt"
    Perceiver(tiny()).save(path)
    model = Perceiver.load(path, map_location="meta")
    assert {p.device.type for p in model.state_dict().values()} == {"meta"}
    assert {p.device.type for p in Perceiver.load(path, map_location="cpu").state_dict().values()} == {"cpu"}


def test_save_into_an_open_file_still_works(tmp_path):
    model = Perceiver(tiny())
    io.atomic_write(tmp_path / "m.pt", lambda f: model.save(f))
    assert same_weights(Perceiver.load(tmp_path / "m.pt"), model)


def test_load_reads_a_checkpoint_from_an_open_file_and_checks_it_too():
    # the package's shipped checkpoints are read from memory (percnb.assets), not from a path
    import io as stdio
    model = Perceiver(tiny())
    buffer = stdio.BytesIO()
    model.save(buffer)
    assert same_weights(Perceiver.load(stdio.BytesIO(buffer.getvalue())), model)
    payload = torch.load(stdio.BytesIO(buffer.getvalue()), weights_only=True)
    payload["config"]["num_heads"] = 4
    edited = stdio.BytesIO()
    torch.save(payload, edited)
    edited.seek(0)
    with pytest.raises(ValueError, match="'<BytesIO>': its config does not match the fingerprint"):
        Perceiver.load(edited)
