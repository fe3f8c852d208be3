"""``jobs=N``: a plan's runs in up to N processes at once (:func:`run_plan_jobs`), each a new Python process
bound to the study's life (:mod:`stepwise.utils.lifeline`) that runs one step (:func:`run_job_file` ->
:func:`stepwise.study.execute.run_step`) with 1/N of the CPU threads and, where GPUs are visible, GPU k
for slot k; output in ``<study>/seed<k>/logs/<run>.log``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from stepwise.stages import registry
from stepwise.stages.all import step_done
from stepwise.study.execute import BUSY_HINT, link_variant, run_step
from stepwise.study.plan import StepRun, VariantRun, distinct_runs
from stepwise.study.records import RESULT_NAME, load_result, record_result
from stepwise.utils import run_lock
from stepwise.utils.io import atomic_write_text
from stepwise.utils.signals import exit_on_signals


def ordered_needs(plan: Sequence[VariantRun]) -> tuple[list[StepRun], dict[Path, set[Path]]]:
    """The distinct runs of ``plan``, pre-trainings first, then selections, fine-tunes and distillations (plan
    order within a step), and per run directory the run directories it reads (the variant's earlier step)."""
    needs: dict[Path, set[Path]] = {}
    for vr in plan:
        previous = None
        for run in vr.runs.values():
            needs.setdefault(run.dir, set()).update({previous.dir} if previous else set())
            previous = run
    order = registry.stage_names()
    return sorted(distinct_runs(plan), key=lambda run: order.index(run.step)), needs


@dataclass
class Job:
    """A step run in its own process (``jobs=N``)."""

    run: StepRun
    process: Any          # subprocess.Popen (or a test's stand-in with poll() / send_signal() / wait() / kill())
    log: Path
    start: float = field(default_factory=time.perf_counter)


def job_env(slot: int, threads: int, devices: Sequence[str]) -> dict[str, str]:
    """The environment of the job in ``slot``: ``threads`` CPU threads; GPU ``devices[slot]`` when GPUs are used."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = devices[slot]
    return env


def launch_job(run: StepRun, slot: int, threads: int, devices: Sequence[str]) -> Job:
    """Start ``run`` in a new Python process (:func:`run_job_file`); its output is appended to
    ``<seed dir>/logs/<key>.log``. The job's first act is :func:`stepwise.utils.lifeline.die_with_parent`
    (before torch loads): it ends when this process ends, however this process ends."""
    logs = run.dir.parent.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec = logs / f"{run.key}.yaml"
    atomic_write_text(spec, OmegaConf.to_yaml(OmegaConf.create({
        "step": run.step, "key": run.key, "seed": run.seed, "dir": str(run.dir), "variants": list(run.variants),
        "threads": threads, "config": run.config})), "job file")
    log = logs / f"{run.key}.log"
    with open(log, "a") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", JOB_COMMAND, str(spec), str(os.getpid())], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=job_env(slot, threads, devices))
    return Job(run, process, log)


# A job's process: bound to its parent's life first (argv[2]: the study's PID), then the step; stopped by a
# signal, it ends as soon as the step has unwound (wall time written).
JOB_COMMAND = ("import sys; from stepwise.utils.lifeline import die_with_parent, run_stoppable; "
               "die_with_parent(int(sys.argv[2])); from stepwise.study.pool import run_job_file; "
               "run_stoppable(run_job_file, sys.argv[1])")


def run_job_file(path: str) -> None:
    """A job's process: run the step that :func:`launch_job` described in the YAML file ``path``."""
    import torch
    from accelerate import PartialState

    spec = OmegaConf.load(path)
    torch.set_num_threads(int(spec.threads))
    config = spec.config
    OmegaConf.set_struct(config, True)
    run = StepRun(str(spec.step), str(spec.key), int(spec.seed), Path(spec.dir), config, list(spec.variants))
    with exit_on_signals():  # SIGTERM from stop_jobs or a scheduler: the run's wall time is still written
        run_step(run, PartialState(cpu=not torch.cuda.is_available()))


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "")


def stop_jobs(jobs: Mapping[int, Job], grace_s: float = 60.0, settle_s: float = 5.0) -> None:
    """Stop the jobs still running: ``settle_s`` seconds for those that got the same interrupt (Ctrl-C reaches
    the whole process group) to end by themselves, then SIGTERM (which, unlike SIGINT, a study started under
    nohup does not ignore; the job writes its wall time and resumes from its last checkpoint next time), then
    a kill after ``grace_s`` more seconds."""
    for sig, wait_s in ((None, settle_s), (signal.SIGTERM, grace_s)):
        for job in jobs.values():
            if sig is not None and job.process.poll() is None:
                job.process.send_signal(sig)
        deadline = time.monotonic() + wait_s
        for job in jobs.values():
            try:
                job.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    for job in jobs.values():
        if job.process.poll() is None:
            job.process.kill()
            job.process.wait()


def ensure_plan_data(plan: Sequence[VariantRun]) -> None:
    """Render every built-in data set the plan reads, once, before jobs start (two jobs must not both render it)."""
    from stepwise.stages.parts.data import ensure_builtin_data

    for data in {json.dumps(OmegaConf.to_container(run.config.data), sort_keys=True): run.config.data
                 for run in distinct_runs(plan)}.values():
        ensure_builtin_data(data)


def reap(running: dict[int, Job], finished: set[Path], failed: dict[Path, str], state: Any) -> None:
    """Take the jobs that have ended out of ``running``: finished (exit 0 and outputs there) or failed (with
    its log's last line)."""
    for slot, job in list(running.items()):
        code = job.process.poll()
        if code is None:
            continue
        del running[slot]
        minutes = (time.perf_counter() - job.start) / 60
        if code == 0 and step_done(job.run.config):
            finished.add(job.run.dir)
            state.print(f"stepwise: study: [{slot}] {job.run.key} (seed {job.run.seed}) done in {minutes:.1f} min")
        else:
            failed[job.run.dir] = f"exit status {code}: {_last_line(job.log)} (log: {job.log})"
            state.print(f"stepwise: study: [{slot}] {job.run.key} (seed {job.run.seed}) FAILED after "
                        f"{minutes:.1f} min: {failed[job.run.dir]}")


def run_plan_jobs(plan: Sequence[VariantRun], state: Any, jobs: int, threads: int, devices: Sequence[str] = (),
                  launch: Any = launch_job, poll_s: float = 1.0) -> dict[Path, str]:
    """:func:`run_plan` with up to ``jobs`` runs at once, each in its own process (one process only).

    A run starts when the runs it reads have finished; pre-trainings first (:func:`ordered_needs`). A run
    whose process fails is recorded with its log's last line, and the runs after it do not start; the rest
    go on. On an interrupt, SIGTERM or SIGHUP the running jobs are stopped (:func:`stop_jobs`) before it
    propagates.
    Returns ``{run dir: error}`` of the failed runs."""
    pending = []
    for vr in plan:
        if load_result(vr) is not None:
            state.print(f"stepwise: study: {vr.variant.name} seed {vr.seed}: recorded in {vr.dir / RESULT_NAME}, "
                        "skipping")
            continue
        link_variant(vr)
        pending.append(vr)
    order, needs = ordered_needs(pending)
    finished = {run.dir for run in order if step_done(run.config)}
    ensure_plan_data(pending)
    failed: dict[Path, str] = {}
    running: dict[int, Job] = {}
    recorded: set[int] = set()
    with exit_on_signals():
        try:
            while True:
                for k, vr in enumerate(pending):
                    if k not in recorded and all(run.dir in finished for run in vr.runs.values()):
                        record_result(vr)
                        recorded.add(k)
                busy = {job.run.dir for job in running.values()}
                for run in order:
                    if len(running) == jobs:
                        break
                    if run.dir in finished or run.dir in failed or run.dir in busy or not needs[run.dir] <= finished:
                        continue
                    owner = run_lock.owner(run.dir)  # another study, command or a job left running: not started
                    if owner is not None:
                        failed[run.dir] = f"run directory {run.dir} is in use by {owner}; {BUSY_HINT}"
                        state.print(f"stepwise: study: {run.key} (seed {run.seed}) FAILED: {failed[run.dir]}")
                        continue
                    slot = min(set(range(jobs)) - set(running))
                    running[slot] = launch(run, slot, threads, devices)
                    busy.add(run.dir)
                    state.print(f"stepwise: study: [{slot}] {run.key} (seed {run.seed}; {', '.join(run.variants)}) "
                                f"-> {run.dir}, log {running[slot].log}")
                if not running:
                    break
                time.sleep(poll_s)
                reap(running, finished, failed, state)
        finally:
            stop_jobs(running)
    for vr in pending:
        broken = next((run for run in vr.runs.values() if run.dir in failed), None)
        if broken is not None:
            state.print(f"stepwise: study: {vr.variant.name} seed {vr.seed}: skipped, {broken.key} failed")
    return failed
