"""Atomic writes: a killed process never leaves a half-written checkpoint, annotation or report.

A failed write (disk full, quota, read-only file system, I/O error) raises :class:`WriteError`, an
``OSError`` with the same ``errno`` whose message names the target path and says the reason in words
("no space left on device"); the previous file at that path, if any, is left as it was.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class WriteError(OSError):
    """Writing a file failed; ``str(err)`` names the path and the reason, ``err.errno`` is the OS's."""

    def __init__(self, code: int | None, message: str, path: str | os.PathLike) -> None:
        super().__init__(code, message)
        self.filename = os.fspath(path)

    def __str__(self) -> str:
        return self.strerror


def write_error(path: str | os.PathLike, err: OSError, what: str = "file") -> WriteError:
    """A :class:`WriteError` for a failed write of ``path`` (``err``: the OS error that stopped it)."""
    if isinstance(err, WriteError):
        return err
    path = Path(path)
    code = err.errno
    reason = "no space left on device" if code in _NO_SPACE else (err.strerror or str(err) or type(err).__name__)
    free = free_bytes(path.parent) if code in _NO_SPACE else None
    where = f" ({free / 2**20:.1f} MiB free there)" if free is not None else ""
    return WriteError(code, f"cannot write {what} {path}: {reason}{where}; a previous {path.name}, if any, "
                            f"is unchanged", path)


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes available to this user on the file system holding ``folder`` (its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_free_space(path: str | os.PathLike, needed: int, what: str = "file") -> None:
    """Raise :class:`WriteError` (ENOSPC) when the file system of ``path`` has less than ``needed`` bytes free."""
    free = free_bytes(Path(path).parent)
    if free is not None and free < needed:
        raise WriteError(errno.ENOSPC, f"cannot write {what} {path}: no space left on device (it needs about "
                                       f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free there)", path)


def _file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under this process's umask (mkstemp's is 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


@contextmanager
def atomic_path(path: str | os.PathLike, what: str = "file") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    An ``OSError`` raised while writing (or renaming) becomes a :class:`WriteError` naming ``path``
    (``what`` says what it is, e.g. "checkpoint").
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, FILE_MODE)  # readable as a plainly written file would be, not 0600
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise write_error(path, err, what) from err
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file") -> None:
    """Write ``text`` to ``path`` atomically (:class:`WriteError` naming ``path`` on failure)."""
    with atomic_path(path, what) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None, what: str = "JSON file") -> None:
    """Serialise ``obj`` as JSON to ``path`` atomically (:class:`WriteError` naming ``path`` on failure)."""
    with atomic_path(path, what) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Load JSON with an error that names the file (missing, unreadable or invalid)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from err
    except OSError as err:
        raise OSError(f"{what} {path} cannot be read: {err}") from err
