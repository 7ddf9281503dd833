"""percnb.io: a file is replaced all at once or not at all, and nothing is left behind."""
import errno
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from percnb.io import atomic_save, atomic_write, check_writable

ROOT = Path(__file__).resolve().parents[2]


def _write_bytes(data: bytes, fail_after: Optional[int] = None):
    """A write_fn that writes `data` in 4 chunks and raises after `fail_after` of them."""
    def write_fn(f):
        chunk = max(1, len(data) // 4)
        for i, start in enumerate(range(0, len(data), chunk)):
            if fail_after is not None and i == fail_after:
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")
            f.write(data[start:start + chunk])
        if fail_after is not None:
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
    return write_fn


def test_atomic_write_replaces_the_file_with_what_write_fn_wrote(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    atomic_write(path, _write_bytes(b"new content"))
    assert path.read_bytes() == b"new content" and os.listdir(tmp_path) == ["a.bin"]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "disk full"), RuntimeError("boom"), KeyboardInterrupt()])
def test_a_write_that_raises_part_way_keeps_the_previous_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "model.pt"
    path.write_bytes(b"the previous good checkpoint")

    def write_fn(f):
        f.write(b"half of a new one")
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, write_fn)
    assert path.read_bytes() == b"the previous good checkpoint"
    assert os.listdir(tmp_path) == ["model.pt"]


def test_a_failed_first_write_leaves_no_file_at_all(tmp_path):
    with pytest.raises(OSError):
        atomic_write(tmp_path / "new.pt", _write_bytes(b"x" * 100, fail_after=2))
    assert os.listdir(tmp_path) == []


def test_a_reader_sees_the_previous_file_while_a_write_is_under_way(tmp_path):
    path = tmp_path / "report.json"
    path.write_bytes(b'{"old": 1}')
    seen = []

    def write_fn(f):
        f.write(b'{"new": ')
        f.flush()
        seen.append(path.read_bytes())            # a reader, in the middle of the write
        f.write(b"2}")

    atomic_write(path, write_fn)
    assert seen == [b'{"old": 1}'] and path.read_bytes() == b'{"new": 2}'


def test_concurrent_saves_never_show_a_loader_half_a_file(tmp_path):
    # The reproduction: two savers in a loop while a third party loads; with in-place writes
    # most loads failed. Every load must now succeed and give one of the saved tensors, whole.
    path = tmp_path / "shared.pt"
    tensors = [torch.full((50_000,), float(i)) for i in range(2)]
    atomic_save(tensors[0], path)
    stop, failures, loads = threading.Event(), [], [0]

    def saver(tensor):
        for _ in range(40):
            atomic_save(tensor, path)

    def loader():
        while not stop.is_set():
            try:
                value = torch.load(path, weights_only=True)
                assert value.shape == (50_000,) and float(value.min()) == float(value.max()) in (0.0, 1.0)
                loads[0] += 1
            except Exception as error:          # noqa: BLE001 - every failure is the finding
                failures.append(repr(error))

    savers = [threading.Thread(target=saver, args=(t,)) for t in tensors]
    reader = threading.Thread(target=loader)
    reader.start()
    for s in savers:
        s.start()
    for s in savers:
        s.join()
    stop.set()
    reader.join()
    assert failures == [] and loads[0] > 0
    assert os.listdir(tmp_path) == ["shared.pt"]


def test_a_save_past_the_file_size_limit_keeps_the_previous_checkpoint(tmp_path):
    # A real part-way failure: RLIMIT_FSIZE makes the kernel refuse the write (EFBIG) mid-file.
    path = tmp_path / "model.pt"
    atomic_save({"w": torch.zeros(10)}, path)
    before = path.read_bytes()
    code = (
        "import resource, signal, sys, torch\n"
        "from percnb.io import atomic_save\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    atomic_save({'w': torch.zeros(1_000_000)}, sys.argv[1])\n"
        "except Exception as error:\n"           # torch's zip writer turns EFBIG into a RuntimeError
        "    print('refused:', error)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.startswith("refused:"), (result.stdout, result.stderr)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model.pt"]


def test_atomic_write_syncs_the_data_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write(tmp_path / "f", _write_bytes(b"data"))
    assert events[:2] == ["fsync", "replace"]


def test_atomic_write_keeps_the_permissions_of_the_file_it_replaces(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")
    path.chmod(0o640)
    atomic_write(path, _write_bytes(b"new"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    umask = os.umask(0)
    os.umask(umask)
    atomic_write(tmp_path / "fresh", _write_bytes(b"new"))
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o666 & ~umask   # as open() would make it


def test_atomic_write_through_a_symlink_replaces_its_target(tmp_path):
    target, link = tmp_path / "real.pt", tmp_path / "link.pt"
    target.write_bytes(b"old")
    link.symlink_to(target)
    atomic_write(link, _write_bytes(b"new"))
    assert link.is_symlink() and target.read_bytes() == b"new"


def test_atomic_save_round_trips_through_torch_load(tmp_path):
    obj = {"format": "x", "state_dict": {"w": torch.randn(3, 4)}}
    atomic_save(obj, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    assert torch.equal(loaded["state_dict"]["w"], obj["state_dict"]["w"])


@settings(max_examples=40, deadline=None)
@given(writes=st.lists(st.tuples(st.binary(max_size=64), st.one_of(st.none(), st.integers(0, 4))),
                       min_size=1, max_size=6))
def test_the_file_always_holds_the_last_write_that_succeeded(tmp_path_factory, writes):
    folder = tmp_path_factory.mktemp("writes")
    path, expected = folder / "f", None
    for data, fail_after in writes:
        try:
            atomic_write(path, _write_bytes(data, fail_after))
            expected = data
        except OSError:
            pass
        assert (path.read_bytes() if path.exists() else None) == expected
        assert os.listdir(folder) == ([] if expected is None else ["f"])


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp, "is a folder"),
    (lambda tmp: tmp / "missing" / "m.pt", "does not exist"),
    (lambda tmp: (tmp / "file").write_text("") or tmp / "file" / "m.pt", "is not a folder"),
])
def test_check_writable_says_why_a_path_cannot_be_written(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        check_writable(make(tmp_path))


def test_check_writable_leaves_nothing_behind(tmp_path):
    check_writable(tmp_path / "m.pt")
    assert os.listdir(tmp_path) == []
