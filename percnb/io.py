"""Files written all at once: a reader sees the old file or the new one, never half of one.

`atomic_write(path, write_fn)` lets `write_fn` fill a temporary file in the same folder, flushes it to
disk (fsync), then renames it over `path` with `os.replace`, which POSIX and Windows make atomic
within one file system. A write that fails part-way (disk full, file size limit, an exception, Ctrl-C)
removes its temporary file and leaves the previous `path` as it was. `atomic_save(obj, path)` is
`torch.save` done that way; `check_writable(path)` says before a long run whether that write can work.
"""
from __future__ import annotations

import os
import secrets
import stat
from typing import Any, BinaryIO, Callable, Union

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
