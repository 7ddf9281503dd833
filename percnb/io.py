"""Files written all at once: a reader sees the old file or the new one, never half of one.

`atomic_write(path, write_fn)` lets `write_fn` fill a temporary file in the same folder, flushes it to
disk (fsync), then renames it over `path` with `os.replace`, which POSIX and Windows make atomic
within one file system. A write that fails part-way (disk full, file size limit, an exception, Ctrl-C)
removes its temporary file and leaves the previous `path` as it was. `atomic_save(obj, path)` is
`torch.save` done that way; `check_writable(path)` says before a long run whether that write can work.
`save_checkpoint` and `read_checkpoint` are the file side of `Perceiver.save` / `Perceiver.load`:
atomic, with a fingerprint of the config, and errors that name the file and what is wrong with it.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import secrets
import stat
import zipfile
from typing import Any, BinaryIO, Callable, Sequence, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]


def _target(path: PathLike) -> str:
    # Through a symlink, replace the file it points to (as an in-place write would), not the link.
    return os.path.realpath(os.fspath(path))


def _open_temporary(target: str):
    """A new, empty file beside `target`, created with the umask's usual permissions (0o666 & ~umask),
    or the target's own when it exists, so that replacing a file does not change who can read it."""
    folder, name = os.path.split(target)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None
    while True:
        temporary = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as error:
            raise type(error)(error.errno, f"cannot write {target!r}: no file can be created in its folder "
                                           f"{folder!r} ({error.strerror})") from None
        if mode is not None:
            os.chmod(temporary, mode)
        return temporary, os.fdopen(fd, "wb")


def _sync_folder(folder: str) -> None:
    # The rename itself lives in the folder's entry table: sync it too, where the platform allows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write_fn: Callable[[BinaryIO], Any]) -> None:
    """Write the file at `path` all at once: `write_fn(f)` writes to `f`, a binary file in the same
    folder; `path` changes only when write_fn returns, to exactly what it wrote.

    On any exception (KeyboardInterrupt included) the temporary file is removed, `path` keeps its
    previous content (or stays absent) and the exception propagates.
    """
    target = _target(path)
    if os.path.isdir(target):
        raise IsADirectoryError(f"path={os.fspath(path)!r} is a folder; give a file name inside it")
    temporary, f = _open_temporary(target)
    try:
        with f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    _sync_folder(os.path.dirname(target))


def atomic_save(obj: Any, path: PathLike) -> None:
    """`torch.save(obj, path)`, atomically (see `atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def check_writable(path: PathLike) -> None:
    """Raise a ValueError saying why `atomic_write(path, ...)` could not work, before any work is done:
    `path` is a folder, or its folder is missing, not a folder, or refuses a new file. Writes nothing
    that stays (a probe file is created and removed)."""
    target = _target(path)
    folder = os.path.dirname(target)
    if os.path.isdir(target):
        raise ValueError(f"{os.fspath(path)!r} is a folder; give a file name inside it")
    if not os.path.isdir(folder):
        what = "does not exist" if not os.path.exists(folder) else "is not a folder"
        raise ValueError(f"cannot write {os.fspath(path)!r}: its folder {folder!r} {what}")
    try:
        temporary, f = _open_temporary(target)
    except OSError as error:
        raise ValueError(str(error)) from None
    f.close()
    os.unlink(temporary)


# --------------------------------------------------------------------------- checkpoints

def config_fingerprint(config: dict) -> str:
    """A short hash of a config dict (its JSON with sorted keys): a checkpoint stores it beside the config,
    so that a config edited afterwards (heads, residuals, sharing, position encoding: edits that keep every
    weight's shape, so the weights still load) is caught instead of silently changing the outputs."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(payload: dict, path: Union[PathLike, BinaryIO]) -> None:
    """`torch.save(payload + its config's fingerprint, path)`, atomically (`atomic_save`) when `path` is
    a path; an open binary file (e.g. inside your own `atomic_write`) is written as it is."""
    payload = {**payload, "fingerprint": config_fingerprint(payload["config"])}
    if hasattr(path, "write"):
        torch.save(payload, path)
    else:
        atomic_save(payload, path)


def read_checkpoint(path: PathLike, map_location: Any, formats: Sequence[str]) -> dict:
    """The dict `save_checkpoint` wrote to `path` (tensors on `map_location`), checked: a ValueError names
    the file and what is wrong with it (empty, truncated or not a checkpoint, another format, an entry
    missing, a config that no longer matches its fingerprint). Files written before fingerprints
    (percnb/1, early percnb/2) have none and load as they are. `path` may also be an open binary file
    (e.g. `io.BytesIO` of a checkpoint shipped in the package)."""
    in_memory = hasattr(path, "read")
    name = f"<{type(path).__name__}>" if in_memory else os.fspath(path)
    if not in_memory and os.path.isfile(name):
        if os.path.getsize(name) == 0:
            raise ValueError(f"cannot load {name!r}: the file is empty (0 bytes); was its save interrupted?")
        if not zipfile.is_zipfile(name):     # torch.save writes a zip archive, whose directory is at its end
            raise ValueError(f"cannot load {name!r} ({os.path.getsize(name)} bytes): it is not a complete torch "
                             "checkpoint (not a whole zip archive: truncated by an interrupted copy or a full "
                             "disk, or another kind of file)")
    try:
        payload = torch.load(path if in_memory else name, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise                                 # these already name the file and say what is wrong
    except (pickle.UnpicklingError, OSError, EOFError, RuntimeError, KeyError, ValueError) as error:
        # e.g. pickled code, which weights_only refuses to run, or a damaged archive
        raise ValueError(f"cannot load {name!r}: {type(error).__name__}: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") not in formats:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{name!r} is not a file written by percnb's Perceiver.save: its format is {found!r}, "
                         f"expected one of {tuple(formats)}")
    missing = [key for key in ("class", "config", "state_dict") if key not in payload]
    if missing:
        raise ValueError(f"{name!r} is a {payload['format']} checkpoint without its {missing} entr"
                         f"{'y' if len(missing) == 1 else 'ies'}; it was not written by Perceiver.save")
    stored = payload.get("fingerprint")
    if stored is not None and stored != config_fingerprint(payload["config"]):
        raise ValueError(f"{name!r}: its config does not match the fingerprint saved with it (the config was "
                         f"edited after saving); these weights were trained with another config")
    return payload
