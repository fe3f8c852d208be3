"""Entry: ``python -m stepwise.study study=<name|file.yaml> [seeds=3] [key=value ...]`` (also under
``accelerate launch -m stepwise.study ...``): run the variants of a study over seeds and report mean +- std.

The package: :mod:`~stepwise.study.spec` (study files), :mod:`~stepwise.study.plan` and
:mod:`~stepwise.study.identity` (the runs and their identities), :mod:`~stepwise.study.execute` (this
process) and :mod:`~stepwise.study.pool` (``jobs=N``), :mod:`~stepwise.study.records` (the files read back,
one schema), :mod:`~stepwise.study.report` and :mod:`~stepwise.study.tables` (the report),
:mod:`~stepwise.study.command` (the arguments). The steps are the stages of :mod:`stepwise.stages.registry`.

A study is ``configs/study/<name>.yaml`` (format: docs/interfaces.md, "Studies"): named variants, each a list
of overrides on the normal ``stage=all`` config and the steps it runs. Options (the other ``key=value`` are
config overrides applied to every run, after the study's ``base`` and the variant's own overrides):

* ``seeds=N`` — seeds 0..N-1 (default: the study's ``seeds``), the root ``seed`` key of every run (model
  initialisation, sampler order and per-sample augmentation all follow it; the data set does not);
  ``seeds=[1,2]`` — those seeds only (e.g. one seed per process or machine; ``report=true`` with all seeds
  afterwards);
* ``variants=a,b`` — only these variants; ``name=dir`` — write to ``<output_root>/<dir>`` instead of the
  study's name;
* ``report=true`` — train nothing, write the report over the runs that have finished;
* ``dry_run=true`` — train nothing, print the plan: every distinct run, the variants sharing it and
  whether it is done, resumable or still to do;
* ``jobs=N`` — run up to N independent runs at once, each in its own process with 1/N of the CPU threads
  (and, where GPUs are visible, GPU k of the visible ones for job slot k); the pre-trainings go first so
  that no slot idles behind a long one at the end. Each run's output goes to
  ``<study>/seed<k>/logs/<run>.log``. On a 2-core machine two single-thread runs train 1.4x as many images
  per second as one two-thread run (bench/parallel_runs.py). Not under ``accelerate launch`` with several
  processes (there every run already uses all of them).

A run that fails is reported and the rows that do not depend on it go on; the command then exits with
status 1 after writing the report.

One owner (:mod:`stepwise.utils.run_lock`): the study process holds the lock of its study directory from start
to end (a second command there stops with one line naming it, exit 2; not for ``dry_run``), and each run
directory is locked by the process that runs it; a run another process holds is reported, never started. Jobs
end with the study however it ends (:mod:`stepwise.utils.lifeline`). Records read back are checked against one
schema (:mod:`stepwise.study.records`): a bad one stops the command with one line naming the file and the
field, exit 2.

Sharing: the runs of one seed share their common prefix. Each step's identity is a hash of its resolved
config (only the blocks its stage declares it reads, without bookkeeping keys, ``ADDED_OPTIONS`` at their
old behaviour and keys added since at their default: :mod:`stepwise.study.identity`) in which every path to an earlier
step of the variant is replaced by that step's identity; steps of different variants with equal identities
are one run. Every run lives in ``<output_root>/<study>/seed<k>/shared/<step>-<hash>/`` (a study file's
``pool: <other study>`` keeps its runs in that study's ``shared/`` instead, so equal runs of two studies
are trained once);
``<output_root>/<study>/seed<k>/<variant>/`` holds a link per step and ``variant.json``. A finished run is
skipped and an interrupted one resumes, so the same command continues a study. When a variant's last step
finishes, its ``result.json`` records what the report reads (final metrics and per-class table, every
training step's evaluations, optimizer steps and wall time, the identities of its runs); a variant with a
record whose identities match the plan is done even where its run directories are gone, so a study carries
over to another machine or session by copying the ``seed<k>/<variant>/result.json`` files alone. At the end (and with
``report=true``) rank 0 writes ``<output_root>/<study>/study.{md,json,png}`` and ``pretrain_curves.png``
(AP and APr after every pre-training epoch, per seed: is the shared starting point converged?).
"""

from stepwise.study.command import OPTIONS, RESERVED, available_cpus, main, parse_args, parse_jobs, parse_seeds, \
    visible_gpus
from stepwise.study.execute import BUSY_HINT, link_variant, run_plan, run_step
from stepwise.study.identity import ADDED_OPTIONS, BOOKKEEPING
from stepwise.study.plan import StepRun, VariantRun, build_plan, describe, distinct_runs, plan_text, plan_variant
from stepwise.study.pool import Job, job_env, launch_job, run_job_file, run_plan_jobs, stop_jobs
from stepwise.study.records import (RESULT_NAME, WALL_TIME_NAME, RecordError, eval_curve, load_result,
                                    record_result, run_keys, run_threads, wall_seconds)
from stepwise.study.report import collect, pretrain_curves, write_report
from stepwise.study.spec import Study, Variant, load_study

__all__ = ["ADDED_OPTIONS", "BOOKKEEPING", "BUSY_HINT", "Job", "OPTIONS", "RESERVED", "RESULT_NAME", "RecordError",
           "StepRun", "Study", "Variant", "VariantRun", "WALL_TIME_NAME", "available_cpus", "build_plan", "collect",
           "describe", "distinct_runs", "eval_curve", "job_env", "launch_job", "link_variant", "load_result",
           "load_study", "main", "parse_args", "parse_jobs", "parse_seeds", "plan_text", "plan_variant",
           "pretrain_curves", "record_result", "run_job_file", "run_keys", "run_plan", "run_plan_jobs", "run_step",
           "run_threads", "stop_jobs", "visible_gpus", "wall_seconds", "write_report"]
