"""Signals as exceptions, so that ``finally`` clauses run when a job scheduler or a user stops a process."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def exit_on_signals() -> Iterator[list[int]]:
    """Within the block, SIGTERM and SIGHUP raise ``SystemExit(128 + signum)`` and SIGINT ``KeyboardInterrupt``
    so ``finally`` clauses run (only where they have their default handler, and only in the main thread);
    restored afterwards.

    Yields the list of signals received. Python prints and drops an exception raised while the main thread
    runs a ``__del__`` or weakref callback (a pool or progress bar being collected), so a signal can arrive
    without interrupting anything: check the list before committing the block's work.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        raise_for_signal(signum)

    previous = {}
    for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL),
                         (getattr(signal, "SIGHUP", None), signal.SIG_DFL)):
        if sig is not None and signal.getsignal(sig) == default:
            previous[sig] = signal.signal(sig, on_signal)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def raise_for_signal(signum: int) -> None:
    """Raise what :func:`exit_on_signals` raises for ``signum``."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)
