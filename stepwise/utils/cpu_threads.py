"""torch's CPU thread count, kept at the cores that other processes leave free.

Why: torch's intra-op pool is libgomp's (OpenMP). At the end of each parallel region its threads wait for one
another at a barrier, spinning (up to ``GOMP_SPINCOUNT``, 300,000 iterations by default) before they sleep.
When another process holds one of the cores, one of our threads is descheduled while the other spins at the
barrier waiting for it, so a parallel region can last a scheduler time slice instead of microseconds: two
threads on two cores beside one busy process train 3-5x slower than one thread would, and beside another
multi-threaded process up to 40x slower. Sleeping waits (``OMP_WAIT_POLICY=PASSIVE``) cure the busy case but
cost ~40 % on an idle machine, and a lower spin count does not cure it; no fixed setting is right for both
(bench/cpu_contention.py measures them).

So the count follows the load: every ``interval_s`` seconds (checked between training or evaluation steps, on
the thread that runs them, since OpenMP's thread count is a per-thread setting) the CPU time the usable CPUs
spent busy (``/proc/stat``) minus this process's own is the load of the other processes; torch gets the cores
they leave free, rounded (at least 1, at most the starting count). It drops at once and rises only after two
samples agree, so a short burst does not flap it. An idle machine keeps the starting count, so results are
unchanged there; a run whose count changed records every count it used (thread counts change float summation
order).

Settings, read once at the first step of a process: ``STEPWISE_CPU_THREADS=auto`` (default) adapts,
``fixed`` leaves torch's count alone (bit-reproducible runs on a shared machine); ``OMP_NUM_THREADS`` (or
``torch.set_num_threads`` before the first step) sets the maximum. Only CPU runs adapt.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ENV = "STEPWISE_CPU_THREADS"
MODES = ("auto", "fixed")
PROC_STAT = Path("/proc/stat")
# /proc/stat columns after the cpu name: user nice system idle iowait irq softirq steal (guest is inside user).
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


@dataclass(frozen=True)
class CpuSample:
    """CPU time counters at one moment, in seconds."""

    wall: float  # time.monotonic()
    busy: float  # CPU time the usable CPUs spent busy since boot (every process)
    own: float   # CPU time this process has used (all its threads)


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask; ``range(os.cpu_count())`` where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cgroup_cpu_limit() -> float | None:
    """The CPU quota of this process's cgroup in CPUs (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None without one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def read_sample(cpus: list[int], stat: Path = PROC_STAT) -> CpuSample | None:
    """Busy time of ``cpus`` (the per-CPU lines of ``/proc/stat``) and this process's CPU time; None where
    ``/proc/stat`` cannot be read (not Linux)."""
    wanted = {f"cpu{i}" for i in cpus}
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name in wanted:
            fields = rest.split()
            ticks += sum(int(fields[i]) for i in _BUSY_COLUMNS if i < len(fields))
    times = os.times()
    return CpuSample(time.monotonic(), ticks / os.sysconf("SC_CLK_TCK"), times.user + times.system)


def other_load(before: CpuSample, after: CpuSample) -> float:
    """CPUs the other processes kept busy between two samples (>= 0)."""
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    return max(0.0, ((after.busy - before.busy) - (after.own - before.own)) / wall)


def threads_for(load: float, cpus: float, maximum: int) -> int:
    """The thread count for ``cpus`` usable CPUs of which other processes keep ``load`` busy: the free cores
    rounded to the nearest (so a process using over half a core takes one away), between 1 and ``maximum``."""
    return max(1, min(maximum, math.floor(cpus - load + 0.5)))


class ThreadGovernor:
    """Sets torch's intra-op thread count from the other processes' load; call :meth:`tick` between steps.

    ``set_threads`` / ``get_threads`` default to torch's; ``sample`` to :func:`read_sample` over ``cpus``.
    """

    def __init__(self, maximum: int, cpus: float, *, interval_s: float = 1.0,
                 sample: Callable[[], CpuSample | None], set_threads: Callable[[int], None],
                 log: Callable[[str], None] | None = None, log_every_s: float = 60.0) -> None:
        self.maximum = maximum
        self.cpus = cpus
        self.interval_s = interval_s
        self._sample = sample
        self._set_threads = set_threads
        self._log = log
        self._log_every_s = log_every_s
        self.threads = maximum
        self.used = {maximum}
        self._last = sample()
        self._pending: int | None = None  # a higher count seen once; applied when the next sample agrees
        self._last_log = -math.inf
        self._quiet_changes = 0

    def tick(self) -> int:
        """Re-sample when ``interval_s`` has passed and change the thread count if the load asks; returns it."""
        if self._last is None or time.monotonic() - self._last.wall < self.interval_s:
            return self.threads
        now = self._sample()
        if now is None:
            return self.threads
        load = other_load(self._last, now)
        self._last = now
        wanted = threads_for(load, self.cpus, self.maximum)
        if wanted > self.threads and self._pending != wanted:
            self._pending = wanted  # rise only when two samples in a row agree
            return self.threads
        self._pending = None
        if wanted != self.threads:
            self._change(wanted, load)
        return self.threads

    def _change(self, threads: int, load: float) -> None:
        previous, self.threads = self.threads, threads
        self.used.add(threads)
        self._set_threads(threads)
        if self._log is None:
            return
        if time.monotonic() - self._last_log < self._log_every_s:
            self._quiet_changes += 1
            return
        more = f" ({self._quiet_changes} more changes since the last message)" if self._quiet_changes else ""
        self._log(f"stepwise: other processes keep {load:.1f} of {self.cpus:g} CPUs busy: "
                  f"torch threads {previous} -> {threads}{more}")
        self._last_log, self._quiet_changes = time.monotonic(), 0


_governor: ThreadGovernor | None = None
_started = False


def mode() -> str:
    """``STEPWISE_CPU_THREADS``: ``auto`` (default) or ``fixed``; a ValueError naming the variable otherwise."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(MODES)}")
    return value


def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)  # above any progress bar


def start() -> ThreadGovernor | None:
    """Create the process's governor (once) and log the setting; None in ``fixed`` mode or without /proc/stat."""
    global _governor, _started
    if _started:
        return _governor
    _started = True
    import torch

    cpus_list = usable_cpus()
    quota = cgroup_cpu_limit()
    cpus = float(len(cpus_list)) if quota is None else min(float(len(cpus_list)), quota)
    maximum = torch.get_num_threads()
    if mode() == "fixed":
        _log(f"stepwise: CPU threads: {maximum} (fixed by {ENV}=fixed; {cpus:g} usable CPUs)")
        return None
    if quota is not None and quota < len(cpus_list):
        # /proc/stat covers the whole CPU set, most of which other cgroups may use: no load to read, only a cap.
        fitted = max(1, min(maximum, math.floor(quota)))
        torch.set_num_threads(fitted)
        _log(f"stepwise: CPU threads: {fitted} (a cgroup quota of {quota:g} CPUs; not adapted to the load)")
        return None
    if read_sample(cpus_list) is None:
        _log(f"stepwise: CPU threads: {maximum} (no /proc/stat: not adapted to the load)")
        return None
    _governor = ThreadGovernor(maximum, cpus, sample=lambda: read_sample(cpus_list),
                               set_threads=torch.set_num_threads, log=_log)
    _log(f"stepwise: CPU threads: up to {maximum} of {cpus:g} usable CPUs, fewer while other processes keep "
         f"cores busy ({ENV}=fixed keeps {maximum})")
    return _governor


def keep(threads: int) -> None:
    """Set torch's count to ``threads`` and keep it for the rest of this process (no governor), whatever
    ``STEPWISE_CPU_THREADS`` says; child processes are not affected."""
    global _governor, _started
    import torch

    torch.set_num_threads(threads)
    _governor, _started = None, True


def tick(device: object = "cpu") -> None:
    """Between two steps of a CPU run: start the governor on the first call, then let it re-sample. A no-op on
    other devices."""
    if getattr(device, "type", device) != "cpu":
        return
    governor = _governor if _started else start()
    if governor is not None:
        governor.tick()


def used_counts() -> set[int]:
    """Every intra-op thread count this process has trained or evaluated with so far (torch's current one
    when nothing adapted)."""
    import torch

    return set(_governor.used) if _governor is not None else {torch.get_num_threads()}


def reset_used() -> None:
    """Forget the counts used so far (a new step of the same process starts its own record)."""
    if _governor is not None:
        _governor.used = {_governor.threads}


def threads_now(maximum: int, seconds: float = 0.5) -> int:
    """The count :class:`ThreadGovernor` would choose from the other processes' load over the next ``seconds``
    (``maximum`` where the load cannot be read): for a process that must keep one count throughout, such as a
    test session comparing weights bit for bit, chosen once at its start."""
    cpus = usable_cpus()
    before = read_sample(cpus)
    if before is None:
        return maximum
    time.sleep(seconds)
    return threads_for(other_load(before, read_sample(cpus)), len(cpus), maximum)
