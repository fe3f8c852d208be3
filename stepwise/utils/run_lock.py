"""One owner per directory: an OS file lock that a training, selection or study process holds on the
directory it writes into, for as long as it runs.

The lock is ``fcntl.flock`` on ``<dir>/.owner.lock``. The kernel drops it when the process ends, however it
ends (``kill -9``, the OOM killer, a scheduler), so a stale lock never needs clearing by hand. The file holds
the owner's PID, host and start time, for the message a second process gets:

    stepwise: run directory runs/r1/pretrain is in use by PID 4242 on host gpu7 (since 2026-12-06 12:30:01);
    ...

Rules kept here: the lock file is never deleted, renamed or replaced (an ``flock`` belongs to one inode: a
new file would let a second owner in); a process holds a directory once (``hold`` again is a no-op, and the
same process may check :func:`owner` without disturbing its own lock); the descriptor is not inherited
across ``exec`` (job processes take their own locks). A child made with ``fork`` and no ``exec`` (a DataLoader
worker) shares it until it exits. Where the file system refuses locks (some network mounts), a warning says
so once and the process goes on unlocked.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".owner.lock"

_held: dict[str, int] = {}   # realpath of a directory -> descriptor of its lock file, for this process
_warned: set[str] = set()


class DirectoryBusy(RuntimeError):
    """Another process owns the directory; ``str(err)`` is one line naming it and the owner."""

    def __init__(self, message: str, directory: str | os.PathLike = "", owner: str = "") -> None:
        super().__init__(message)
        self.directory = Path(directory) if directory else None
        self.owner = owner


def _key(directory: Path) -> str:
    return os.path.realpath(directory)


def _owner_text(fd: int) -> str:
    """``PID n on host h (since ...)`` from an open lock file (its owner writes it just after locking)."""
    for attempt in range(20):
        try:
            raw = os.pread(fd, 4096, 0)
            info = json.loads(raw) if raw.strip() else None
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and "pid" in info:
            since = f" (since {info['since']})" if info.get("since") else ""
            return f"PID {info['pid']} on host {info.get('host', '?')}{since}"
        time.sleep(0.01 * (attempt + 1))  # the owner locked it a moment ago and is writing its name
    return "another process (its PID is not recorded yet)"


def _open(directory: Path, create: bool) -> int | None:
    path = directory / LOCK_NAME
    try:
        return os.open(path, (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY, 0o644)
    except FileNotFoundError:
        if create:
            raise
        return None
    except PermissionError:
        if create and path.is_file():  # a lock file copied from another user: flock works read-only too
            return _open(directory, create=False)
        if create:
            raise
        return None
    except OSError:
        if create:
            raise
        return None


def _busy(directory: Path, owner: str, what: str, hint: str) -> DirectoryBusy:
    return DirectoryBusy(f"{what} {directory} is in use by {owner}; {hint}", directory, owner)


def hold(directory: str | os.PathLike, what: str = "run directory",
         hint: str = "wait for it to finish or stop it, or use another exp=") -> Path:
    """Take the lock of ``directory`` (created if missing) for this process, until :func:`release` or exit.

    Raises:
        DirectoryBusy: another process holds it (one line: the directory, the owner's PID, host and start).
    """
    directory = Path(directory)
    key = _key(directory)
    if key in _held:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    fd = _open(directory, create=True)
    if fd is None:
        raise PermissionError(errno.EACCES, f"cannot open the lock file {directory / LOCK_NAME}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _owner_text(fd)
        os.close(fd)
        raise _busy(directory, owner, what, hint) from None
    except OSError as err:  # ENOLCK, EOPNOTSUPP: a file system without locks
        os.close(fd)
        if key not in _warned:
            _warned.add(key)
            print(f"stepwise: warning: cannot lock {directory / LOCK_NAME} ({os.strerror(err.errno or errno.EIO)}): "
                  "a second process in this directory would not be stopped", file=sys.stderr, flush=True)
        return directory
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300]}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError:
        pass  # the lock is what counts; the owner's name is for the message only
    _held[key] = fd
    return directory


def release(directory: str | os.PathLike) -> None:
    """Give up this process's lock of ``directory`` (nothing when it holds none). The file stays."""
    fd = _held.pop(_key(Path(directory)), None)
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def release_all() -> None:
    """Give up every lock this process holds (an entry point's ``finally``; the kernel does it at exit)."""
    for key in list(_held):
        release(key)


def holds(directory: str | os.PathLike) -> bool:
    """True when this process holds the lock of ``directory``."""
    return _key(Path(directory)) in _held


def owner(directory: str | os.PathLike) -> str | None:
    """``PID n on host h (since ...)`` of another process holding ``directory``; None when it is free or this
    process holds it. Takes nothing: the lock is tried and let go at once."""
    directory = Path(directory)
    if _key(directory) in _held or not directory.is_dir():
        return None
    fd = _open(directory, create=False)
    if fd is None:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _owner_text(fd)
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def launch_rank() -> int:
    """This process's rank as its launcher set it (``RANK`` of torchrun / ``accelerate launch``, MPI's), 0 when
    started alone: before the process group exists, only rank 0 may take a sibling's lock for a stranger's."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def check_free(directory: str | os.PathLike, what: str = "run directory",
               hint: str = "wait for it to finish or stop it, or use another exp=") -> None:
    """DirectoryBusy when another process holds ``directory`` (nothing is taken). Checked on rank 0 only (see
    :func:`launch_rank`): the others are refused with it by :func:`hold_on_rank0`."""
    if launch_rank() != 0:
        return
    found = owner(directory)
    if found is not None:
        raise _busy(Path(directory), found, what, hint)


def hold_on_rank0(directory: str | os.PathLike, is_main_process: bool = True, what: str = "run directory",
                  hint: str = "wait for it to finish or stop it, or use another exp=") -> None:
    """:func:`hold` on the main process only; under several processes (an initialised ``torch.distributed``
    group) every process calls this and every one raises the same DirectoryBusy when rank 0 could not take it,
    so none waits in a collective for a rank that has left."""
    message: Any = None
    if is_main_process:
        try:
            hold(directory, what, hint)
        except DirectoryBusy as err:
            message = str(err)
    try:
        import torch.distributed as dist

        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    except ImportError:  # pragma: no cover - torch is a dependency
        several = False
    if several:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message])[0]
    if message is not None:
        raise DirectoryBusy(message, directory)
