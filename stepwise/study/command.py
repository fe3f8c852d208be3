"""``python -m stepwise.study study=<name|file.yaml> [seeds=N|[a,b]] [variants=a,b] [name=dir] [pool=dir]
[report=true] [dry_run=true] [jobs=N] [key=value ...]``: arguments (:mod:`stepwise.cli`), then plan, run (this process or
the pool), report. Exit 2 on a bad argument, study file, record or busy study directory; 1 when a run failed."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from stepwise import cli
from stepwise.cli import UsageError, parse_bool
from stepwise.config import ConfigError
from stepwise.study.execute import run_plan
from stepwise.study.plan import build_plan, plan_text
from stepwise.study.pool import run_plan_jobs
from stepwise.study.records import RecordError
from stepwise.study.report import write_report
from stepwise.study.spec import check_pool, load_study
from stepwise.utils import cpu_threads, run_lock

OPTIONS = ("study", "seeds", "variants", "name", "pool", "report", "dry_run", "jobs")
RESERVED = ("seed", "exp", "stage", "run_dir", "resume", "overwrite")  # set by the study for each run


def parse_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``key=value`` arguments (:func:`stepwise.cli.parse_args`) into study options and config overrides
    (in order; reserved keys refused)."""
    options, overrides = {}, []
    for item in argv:
        key, value = next(iter(cli.parse_args([item]).items()))
        if key in OPTIONS:
            options[key] = value
        elif key in RESERVED:
            raise ConfigError(f"{key}= is set by the study for every run (seeds=N, variants=..., name=...)")
        else:
            overrides.append(item)
    if "study" not in options:
        raise ConfigError("study=<name or file.yaml> is required (studies: configs/study/*.yaml)")
    return options, overrides


def parse_seeds(value: str) -> list[int]:
    """``seeds=N`` -> seeds 0..N-1; ``seeds=[a,b]`` -> exactly those (one seed of a study per process or machine:
    every run lives in its seed's directory, so several commands on different seeds never share a run)."""
    if value.isdigit() and int(value) >= 1:
        return list(range(int(value)))
    if value.startswith("[") and value.endswith("]"):
        items = [v.strip() for v in value[1:-1].split(",") if v.strip()]
        if items and all(v.isdigit() for v in items) and len(set(items)) == len(items):
            return sorted(int(v) for v in items)
    raise ConfigError(f"seeds={value}: expected a positive integer N (seeds 0..N-1) or a list of distinct seeds "
                      "like [1,2]")


def parse_jobs(value: str) -> int:
    """``jobs=N``: a positive integer."""
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"jobs={value}: expected a positive integer (runs at once)")
    return int(value)


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the system has one)."""
    return len(cpu_threads.usable_cpus())


def visible_gpus() -> list[str]:
    """The GPUs a job may be given: the entries of ``CUDA_VISIBLE_DEVICES``, else 0..count-1."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(k) for k in range(torch.cuda.device_count())]


STUDY_BUSY_HINT = ("a study runs there already: wait for it or stop it (one command runs several seeds: seeds=[a,b] "
                   "jobs=N), or write elsewhere with name=<dir>")


def check_jobs(jobs: int, state: Any, training: bool) -> list[str]:
    """The GPUs the jobs get (none without CUDA); exit 2 for ``jobs=N`` under several processes or with fewer
    GPUs than jobs; a warning for more jobs than usable CPUs (when it trains)."""
    import torch

    if jobs > 1 and state.num_processes > 1:
        state.print(f"stepwise: study: jobs={jobs} runs each run in a process of its own; under accelerate launch "
                    f"with {state.num_processes} processes every run already uses them all: drop jobs= or launch "
                    "with python -m stepwise.study")
        raise SystemExit(2)
    devices = visible_gpus() if torch.cuda.is_available() else []
    if jobs > 1 and devices and jobs > len(devices):
        print(f"stepwise: study: jobs={jobs} but {len(devices)} GPU(s) visible: one GPU per job", file=sys.stderr)
        raise SystemExit(2)
    cpus = available_cpus()
    if jobs > cpus and training:
        print(f"stepwise: study: warning: jobs={jobs} but {cpus} CPU(s) usable here: each job gets 1 thread and "
              f"they take turns on the cores, each run slower than with jobs={cpus}", file=sys.stderr, flush=True)
    return devices


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run (or plan, or report) a study; returns the report summary on rank 0 (None for a dry run)."""
    import torch
    from accelerate import PartialState

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        options, overrides = parse_args(argv)
        study = load_study(options["study"])
        if "pool" in options:  # the study directory whose runs this one shares (the file's `pool:`)
            study = replace(study, pool=check_pool(options["pool"], "pool="))
        seeds = parse_seeds(str(options.get("seeds", study.seeds)))
        chosen = [v for v in options.get("variants", "").strip("[]").split(",") if v.strip()]
        plan = build_plan(study, seeds, overrides, options.get("name"),
                          [v.strip() for v in chosen] or None)
        dry_run = parse_bool("dry_run", options.get("dry_run", "false"))
        report_only = parse_bool("report", options.get("report", "false"))
        jobs = parse_jobs(options.get("jobs", "1"))
    except (ConfigError, UsageError) as err:
        print(f"stepwise: study: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    state = PartialState(cpu=not torch.cuda.is_available())
    devices = check_jobs(jobs, state, not dry_run and not report_only)
    out_dir = Path(plan[0].dir).parents[1]
    try:
        if not dry_run:  # one study process per study directory; its runs are locked by whoever runs them
            run_lock.hold_on_rank0(out_dir, state.is_main_process, what="study directory", hint=STUDY_BUSY_HINT)
        state.print(plan_text(study, plan))
        if dry_run:
            return None
        if report_only:
            failed = {}
        elif jobs > 1:
            failed = run_plan_jobs(plan, state, jobs, max(1, available_cpus() // jobs), devices)
        else:
            failed = run_plan(plan, state)
        summary = None
        if state.is_main_process:
            command = "python -m stepwise.study " + " ".join(argv)
            summary = write_report(study, plan, out_dir, command, failed)
            print(f"stepwise: study report {out_dir / 'study.md'} ({out_dir / 'study.json'}, "
                  f"{out_dir / 'study.png'})")
            print((out_dir / "study.md").read_text())
        state.wait_for_everyone()
    except (ConfigError, RecordError, run_lock.DirectoryBusy) as err:  # a file or directory the message names
        print(f"stepwise: study: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        state.destroy_process_group()
        run_lock.release_all()
    if failed:
        print(f"stepwise: study: {len(failed)} run(s) failed: " + "; ".join(
            f"{path.name}: {error}" for path, error in failed.items()), file=sys.stderr)
        raise SystemExit(1)
    return summary
