"""Running a plan in this process (:func:`run_plan`; every process under ``accelerate launch``): each
distinct run once, in plan order, through :func:`run_step` (:func:`stepwise.stages.run_stage` with the
session's wall time recorded). The process pool (``jobs=N``) is :mod:`stepwise.study.pool`."""

from __future__ import annotations

import gc
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from stepwise.config import ConfigError
from stepwise.stages import run_stage
from stepwise.stages.all import set_resume, step_done
from stepwise.study.plan import StepRun, VariantRun
from stepwise.study.records import RESULT_NAME, add_session, load_result, record_result
from stepwise.utils import cpu_threads, run_lock
from stepwise.utils.io import atomic_write_json


def link_variant(vr: VariantRun) -> None:
    """``<variant dir>/<step>`` -> ``../shared/<key>`` for each step (re-pointed when the plan changed) and
    ``variant.json`` (rank 0 only). Links are a convenience: the runs' configs hold the real paths."""
    vr.dir.mkdir(parents=True, exist_ok=True)
    for step, run in vr.runs.items():
        link = vr.dir / step
        target = os.path.relpath(run.dir, vr.dir)
        if link.is_symlink():
            if os.readlink(link) == target:
                continue
            link.unlink()
        elif link.exists():
            raise ConfigError(f"{link} exists and is not a link to a study run; move it away")
        try:
            link.symlink_to(target, target_is_directory=True)
        except OSError:  # a file system without links: variant.json still says where each step is
            pass
    atomic_write_json(vr.dir / "variant.json", {
        "variant": vr.variant.name, "seed": vr.seed, "steps": {s: str(r.dir) for s, r in vr.runs.items()},
        "final_step": vr.variant.final_step, "overrides": list(vr.variant.overrides),
        "step_overrides": {s: list(o) for s, o in vr.variant.step_overrides.items()}}, indent=1)


BUSY_HINT = "not started: run the study again once that process has ended"


def busy_error(err: BaseException) -> str | None:
    """The failure text of a run that another process owns (its lock held: the run is not started), else None."""
    return str(err) if isinstance(err, run_lock.DirectoryBusy) else None


def run_step(run: StepRun, state: Any) -> None:
    """Run one step unless its outputs exist; an interrupted step resumes from its last checkpoint. The wall
    time and thread count of each session, an interrupted or failed one included, are added to
    ``<run dir>/wall_time.json``. Rank 0 owns the run directory first (:mod:`stepwise.utils.run_lock`; the
    lock stays until the process ends or :func:`run_plan` releases it): DirectoryBusy, and nothing read or
    written, when another process runs it. The run itself is :func:`stepwise.stages.run_stage`."""
    run_lock.hold_on_rank0(run.dir, state.is_main_process, hint=BUSY_HINT)
    if step_done(run.config):
        state.print(f"stepwise: study: {run.key} (seed {run.seed}) done, skipping")
        return
    cfg = run.config.copy()
    set_resume(cfg)
    state.print(f"stepwise: study: {run.key} (seed {run.seed}; {', '.join(run.variants)}) -> {run.dir}"
                + (" (resuming)" if cfg.resume else ""))
    run_stage(cfg, state, session=lambda _: timed_session(run.dir, state))
    gc.collect()


@contextmanager
def timed_session(run_dir: Path, state: Any) -> Iterator[None]:
    """Around a run: its wall time and thread counts are added to ``wall_time.json`` however it ends (an
    interrupted session's time counts too: the run resumes from its checkpoint next time)."""
    start = time.perf_counter()
    cpu_threads.reset_used()  # this session's counts only
    try:
        yield
    finally:
        if state.is_main_process and run_dir.is_dir():
            add_session(run_dir, time.perf_counter() - start)


def run_plan(plan: Sequence[VariantRun], state: Any) -> dict[Path, str]:
    """Every run of the plan once, seed by seed in variant order (all processes call this).

    A run that raises is recorded and the study goes on with the rows that do not depend on it (with one
    process; with several, only a non-finite loss, which every process raises together, is survivable).
    Returns ``{run dir: error}`` of the failed runs.
    """
    from stepwise.engine import NonFiniteLossError

    finished: set[Path] = set()
    failed: dict[Path, str] = {}
    for vr in plan:
        if load_result(vr) is not None:
            state.print(f"stepwise: study: {vr.variant.name} seed {vr.seed}: recorded in {vr.dir / RESULT_NAME}, "
                        "skipping")
            continue
        if state.is_main_process:
            link_variant(vr)
        state.wait_for_everyone()
        for run in vr.runs.values():
            if run.dir in failed:
                state.print(f"stepwise: study: {vr.variant.name} seed {vr.seed}: skipped, {run.key} failed")
                break
            if run.dir in finished:
                continue
            try:
                run_step(run, state)
            except Exception as err:  # noqa: BLE001 - recorded, reported, and the exit status says so
                if state.num_processes > 1 and not isinstance(err, (NonFiniteLossError, run_lock.DirectoryBusy)):
                    raise
                failed[run.dir] = busy_error(err) or f"{type(err).__name__}: {err}"
                state.print(f"stepwise: study: {run.key} (seed {run.seed}) FAILED: {failed[run.dir]}")
                break
            finally:
                run_lock.release(run.dir)  # the run's next owner may be another process
            finished.add(run.dir)
        if state.is_main_process and step_done(vr.runs[vr.variant.final_step].config):
            record_result(vr)
    return failed
