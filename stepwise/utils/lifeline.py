"""A child process that ends with its parent: the study's job processes never outlive the study.

:func:`die_with_parent` is the first thing a job runs (before its heavy imports). Two mechanisms, so that a
``kill -9`` of the parent, the OOM killer or a batch scheduler killing it leaves no job training beside the
study that is started again:

* Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: the kernel sends SIGTERM the moment the parent dies. The call
  is followed by the race check (the parent may have died before it): when the parent is no longer the
  expected PID, the job stops at once. The signal is tied to the parent *thread* that started the job
  (the study starts its jobs from its main thread).
* everywhere: a daemon thread that checks ``os.getppid()`` every ``poll_s`` seconds; once the parent is
  gone it sends this process SIGTERM (at once where the kernel signal is not available, else after
  ``grace_s`` as a second try), and ends the process with ``os._exit(143)`` when it has not ended
  ``grace_s`` seconds after that.

SIGTERM is what ``stop_jobs`` sends: under :func:`stepwise.utils.signals.exit_on_signals` the job unwinds,
writes its wall time and leaves its last checkpoint to resume from; its run directory's lock
(:mod:`stepwise.utils.run_lock`) goes with the process. :func:`run_stoppable` then ends the process at once
(``os._exit``): the interpreter's own teardown of torch and the data takes seconds (3-9 s measured on the tiny
preset), long enough for a study started again at once to find the job still there.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

PR_SET_PDEATHSIG = 1
PARENT_ENV = "STEPWISE_PARENT_PID"


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel for ``sig`` when the parent thread dies (Linux); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _stop(reason: str) -> None:
    print(f"stepwise: {reason}: stopping this job", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def _watch(parent_pid: int, kernel_signal: bool, poll_s: float, grace_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    if kernel_signal:  # SIGTERM is on its way (or handled already): a second one only if it did not end us
        time.sleep(grace_s)
    _stop(f"the study process (PID {parent_pid}) is gone")
    time.sleep(grace_s)
    print("stepwise: the job did not end after SIGTERM; exiting", file=sys.stderr, flush=True)
    os._exit(128 + signal.SIGTERM)


def die_with_parent(parent_pid: int | None = None, poll_s: float = 1.0, grace_s: float = 60.0,
                    kernel_signal: bool = True) -> bool:
    """Make this process end when ``parent_pid`` (default ``$STEPWISE_PARENT_PID``, else the current parent)
    ends; returns whether the kernel's parent-death signal is set (``kernel_signal=False``: watchdog only)."""
    if parent_pid is None:
        parent_pid = int(os.environ.get(PARENT_ENV) or os.getppid())
    armed = kernel_signal and set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        _stop(f"the study process (PID {parent_pid}) ended before this job started")
        return armed
    threading.Thread(target=_watch, args=(parent_pid, armed, poll_s, grace_s), name="stepwise-lifeline",
                     daemon=True).start()
    return armed


def run_stoppable(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; when a signal stopped it (``SystemExit`` with a status >= 128, as
    :func:`~stepwise.utils.signals.exit_on_signals` raises, or ``KeyboardInterrupt``) the process ends right
    after ``fn`` has unwound, with that status, skipping the interpreter's slow teardown."""
    try:
        return fn(*args)
    except (SystemExit, KeyboardInterrupt) as err:
        code = 130 if isinstance(err, KeyboardInterrupt) else err.code
        if isinstance(code, int) and code >= 128:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)
        raise
