"""Entry: ``python -m stepwise.study study=<name|file.yaml> [seeds=3] [key=value ...]`` (also under
``accelerate launch -m stepwise.study ...``): run the variants of a study over seeds and report mean +- std.

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
schema (:mod:`stepwise.study_records`): a bad one stops the command with one line naming the file and the
field, exit 2.

Sharing: the runs of one seed share their common prefix. Each step's identity is a hash of its resolved
config (without bookkeeping keys, the blocks the step does not read and ``ADDED_OPTIONS`` at their old
behaviour) in which every path to an earlier
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

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf

from stepwise.config import CONFIG_DIR, ConfigError, load_config, prepare_run_dir
from stepwise.stages.all import TRAINING_STEPS, set_resume, step_config, step_done
from stepwise.utils import cpu_threads
from stepwise.study_records import RecordError, check_result, read_log, read_metrics, read_result, read_wall_time
from stepwise.utils import run_lock
from stepwise.utils.io import atomic_write_json, atomic_write_text
from stepwise.utils.signals import exit_on_signals

STEPS = ("pretrain", "select", "finetune", "distill")
OPTIONS = ("study", "seeds", "variants", "name", "report", "dry_run", "jobs")
RESERVED = ("seed", "exp", "stage", "run_dir", "resume", "overwrite")  # set by the study for each run
# Keys that never change what a step computes (logging, checkpoint cadence, loader workers: samples are
# seeded per item, evaluations and checkpoints leave the RNG streams alone), so changing them keeps the runs.
BOOKKEEPING = ("run_dir", "exp", "output_root", "resume", "overwrite", "data.num_workers", "data.preflight",
               "data.preflight_decode_max", "stage.trackers", "stage.log_every", "stage.keep_last",
               "stage.checkpoint_every_steps", "stage.eval_every_epochs")
# Options added after studies were recorded, with the value at which a run computes what it computed before the
# option existed: at that value the option stays out of the run's identity, so adding it keeps recorded runs.
ADDED_OPTIONS = {"head.others": "uniform",
                 # BACL's loss form (the focal adaptation: heads/bacl.py) and the public code's confusion rows
                 "head.fg_gamma": 0.0, "head.normalize": "num_boxes", "head.unseen_rows": "uniform",
                 # BAGS's rule for a duplicate query of an object (heads/bags.py)
                 "head.duplicates": "others", "head.duplicate_iou": 0.5,
                 # the built-in val split's density of verified-absent classes (data/synthetic.py)
                 "data.negatives": "preset"}
NOT_READ = {"pretrain": ("stepwise", "distill"), "select": ("stepwise.rfs", "distill"),
            "finetune": ("distill",), "distill": ()}  # root blocks a step does not read (dropped from its hash)
WALL_TIME_NAME = "wall_time.json"
RESULT_NAME = "result.json"  # a finished variant's record in its directory: all the report reads of its runs
FILE_KEYS = ("description", "seeds", "base", "steps", "plot", "variants", "pool", "compare")
VARIANT_KEYS = ("description", "from", "steps", "overrides", "step_overrides")


# ------------------------------------------------------------------------------------------ study file
@dataclass(frozen=True)
class Variant:
    """One row of a study: the overrides on the ``stage=all`` config and the steps it runs, in order."""

    name: str
    steps: tuple[str, ...]
    overrides: tuple[str, ...]
    description: str = ""
    step_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)  # step -> its own overrides

    @property
    def final_step(self) -> str:
        """The last training step: the model the variant's row reports."""
        return [s for s in self.steps if s in TRAINING_STEPS][-1]


@dataclass(frozen=True)
class Study:
    """A parsed study file."""

    name: str
    path: Path
    description: str
    seeds: int
    base: tuple[str, ...]
    variants: dict[str, Variant]
    plot: tuple[str, ...]
    pool: str | None = None  # the study directory whose seed<k>/shared/ holds the runs (None: its own)
    compare: tuple[str, ...] = ()  # variants the report's paired-difference tables are taken against


def study_path(spec: str) -> Path:
    """``configs/study/<spec>.yaml`` for a name, ``spec`` itself for a path to a YAML file."""
    if spec.endswith((".yaml", ".yml")) or os.sep in spec:
        path = Path(spec)
    else:
        path = CONFIG_DIR / "study" / f"{spec}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "study").glob("*.yaml"))
        raise ConfigError(f"study {spec!r}: no file {path} (studies in {CONFIG_DIR / 'study'}: {', '.join(known)})")
    return path


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings, got {value!r}")
    return tuple(value)


def _steps(value: Any, where: str) -> tuple[str, ...]:
    steps = _strings(value, where)
    unknown = [s for s in steps if s not in STEPS]
    if unknown or len(set(steps)) != len(steps) or not any(s in TRAINING_STEPS for s in steps):
        raise ConfigError(f"{where}: {list(steps)} must be distinct steps of {list(STEPS)} with at least one "
                          f"training step" + (f" (unknown: {unknown})" if unknown else ""))
    return steps


def load_study(spec: str) -> Study:
    """Parse and check a study file (``spec``: a name under ``configs/study/`` or a path).

    Raises:
        ConfigError: naming the file and the key that is wrong.
    """
    path = study_path(spec)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"study file {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"study file {path}: expected a mapping with keys {list(FILE_KEYS)}")
    unknown = sorted(set(raw) - set(FILE_KEYS))
    if unknown:
        raise ConfigError(f"study file {path}: unknown keys {unknown} (known: {list(FILE_KEYS)})")
    entries = raw.get("variants")
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"study file {path}: 'variants' must map variant names to their settings")
    default_steps = _steps(raw.get("steps", list(STEPS)), f"{path}: steps")

    def resolve(name: str, chain: tuple[str, ...] = ()) -> Variant:
        where = f"{path}: variants.{name}"
        if name in chain:
            raise ConfigError(f"{where}: 'from' forms a cycle {' -> '.join((*chain, name))}")
        if name not in entries:
            raise ConfigError(f"{path}: variants.{chain[-1]}: 'from: {name}' names no variant")
        entry = entries[name] or {}
        if not isinstance(entry, dict) or set(entry) - set(VARIANT_KEYS):
            raise ConfigError(f"{where}: expected a mapping with keys {list(VARIANT_KEYS)}, got {entry!r}")
        if name == "shared" or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{where}: variant names are letters, digits, '_' and '-' (and not 'shared')")
        parent = resolve(entry["from"], (*chain, name)) if entry.get("from") else None
        steps = _steps(entry["steps"], f"{where}.steps") if "steps" in entry else \
            (parent.steps if parent else default_steps)
        overrides = (parent.overrides if parent else ()) + _strings(entry.get("overrides"), f"{where}.overrides")
        own = entry.get("step_overrides") or {}
        if not isinstance(own, dict) or set(own) - set(STEPS):
            raise ConfigError(f"{where}.step_overrides: expected a mapping from steps {list(STEPS)} to override "
                              f"lists, got {own!r}")
        per_step = dict(parent.step_overrides) if parent else {}
        for step, values in own.items():
            per_step[step] = per_step.get(step, ()) + _strings(values, f"{where}.step_overrides.{step}")
        return Variant(name, steps, overrides, str(entry.get("description", "")), per_step)

    variants = {name: resolve(str(name)) for name in entries}
    plot = _strings(raw.get("plot"), f"{path}: plot") or tuple(list(variants)[:4])
    missing = [v for v in plot if v not in variants]
    if missing:
        raise ConfigError(f"{path}: plot names unknown variants {missing}")
    seeds = raw.get("seeds", 3)
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"{path}: seeds must be a positive integer, got {seeds!r}")
    compare = _strings(raw.get("compare"), f"{path}: compare")
    if [v for v in compare if v not in variants]:
        raise ConfigError(f"{path}: compare names unknown variants {[v for v in compare if v not in variants]}")
    pool = raw.get("pool")
    if pool is not None and (not isinstance(pool, str) or not pool or "/" in pool or pool.startswith(".")):
        raise ConfigError(f"{path}: pool must be the name of a study directory under output_root, got {pool!r}")
    return Study(path.stem, path, str(raw.get("description", "")).strip(), seeds,
                 _strings(raw.get("base"), f"{path}: base"), variants, plot, pool, compare)


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class StepRun:
    """One run of one step for one seed; every variant whose step has the same identity uses it."""

    step: str
    key: str              # "<step>-<hash>": the step's identity
    seed: int
    dir: Path             # <output_root>/<study>/seed<k>/shared/<key>
    config: DictConfig    # the resolved step config, paths to earlier steps pointing at their run dirs
    variants: list[str] = field(default_factory=list)

    def status(self) -> str:
        """``done``, ``in use by PID n on host h`` (another process owns the run directory), ``resumes at step
        N`` / ``scores.jsonl exists`` (interrupted) or ``to do``."""
        from stepwise.checkpoint import list_checkpoints

        if step_done(self.config):
            return "done"
        owner = run_lock.owner(self.dir)
        if owner is not None:
            return f"in use by {owner.split(' (since')[0]}"
        if self.step == "select":
            return "scores.jsonl exists" if (self.dir / "scores.jsonl").is_file() else "to do"
        found = list_checkpoints(self.dir)
        return f"resumes at step {found[-1][0]}" if found else "to do"


@dataclass
class VariantRun:
    """A variant on one seed: its directory and its steps' runs in order."""

    variant: Variant
    seed: int
    dir: Path             # <output_root>/<study>/seed<k>/<variant>
    runs: dict[str, StepRun]


def _select(tree: dict, dotted: str) -> Any:
    """The value at ``dotted`` in a nested dict, None where a part is missing."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _drop(tree: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.get(part, {})
    tree.pop(last, None)


def _map_paths(obj: Any, prefix: str, fn: Any) -> Any:
    """Replace every string ``<prefix><step>[/rest]`` in a nested container by ``fn(step, rest)``."""
    if isinstance(obj, dict):
        return {k: _map_paths(v, prefix, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_paths(v, prefix, fn) for v in obj]
    if isinstance(obj, str) and obj.startswith(prefix):
        step, _, rest = obj[len(prefix):].partition("/")
        if step in STEPS:
            return fn(step, rest)
    return obj


def plan_variant(study_dir: Path, variant: Variant, seed: int, configs: Mapping[str, DictConfig],
                 shared: dict[str, StepRun], pool_dir: Path | None = None) -> VariantRun:
    """The runs of ``variant`` on ``seed`` from its composed ``stage=all`` config per step (``{step: cfg}``;
    one object for all steps unless the variant has ``step_overrides``); runs already in ``shared`` (same
    seed, same identity) are reused, new ones added to it. Runs live in ``<pool_dir>/seed<k>/shared/``
    (default ``pool_dir``: ``study_dir``), the variant's links in ``study_dir``."""
    seed_dir = (pool_dir or study_dir) / f"seed{seed}"
    first = configs[variant.steps[0]]
    prefix = f"{first.output_root}/{first.exp}/"
    runs: dict[str, StepRun] = {}
    for step in variant.steps:
        tree = OmegaConf.to_container(step_config(configs[step], step), resolve=True)
        tree.pop("run_dir")  # <prefix><step> itself; set to the shared run directory below

        def upstream(name: str, rest: str, as_key: bool) -> str:
            if name not in runs:
                raise ConfigError(f"study variant {variant.name!r}: step {step} reads {prefix}{name}"
                                  f"{'/' + rest if rest else ''}, but {name} is not an earlier step of the "
                                  f"variant (steps: {list(variant.steps)})")
            base = f"<{runs[name].key}>" if as_key else str(runs[name].dir)
            return f"{base}/{rest}" if rest else base

        identity = _map_paths(tree, prefix, lambda n, r: upstream(n, r, True))
        for key in (*BOOKKEEPING, *NOT_READ[step]):
            _drop(identity, key)
        for key, old_behaviour in ADDED_OPTIONS.items():
            if _select(identity, key) == old_behaviour:
                _drop(identity, key)
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
        key = f"{step}-{digest}"
        if key not in shared:
            resolved = _map_paths(tree, prefix, lambda n, r: upstream(n, r, False))
            resolved["run_dir"] = str(seed_dir / "shared" / key)
            config = OmegaConf.create(resolved)
            OmegaConf.set_struct(config, True)
            shared[key] = StepRun(step, key, seed, seed_dir / "shared" / key, config)
        shared[key].variants.append(variant.name)
        runs[step] = shared[key]
    return VariantRun(variant, seed, study_dir / f"seed{seed}" / variant.name, runs)


def build_plan(study: Study, seeds: Sequence[int], overrides: Sequence[str], name: str | None = None,
               variants: Sequence[str] | None = None) -> list[VariantRun]:
    """Every (seed, variant) of the study with its step runs, seed by seed in the study's variant order."""
    names = list(variants) if variants else list(study.variants)
    unknown = [v for v in names if v not in study.variants]
    if unknown:
        raise ConfigError(f"variants={','.join(unknown)}: not in {study.path} (has {', '.join(study.variants)})")
    plan = []
    for seed in seeds:
        shared: dict[str, StepRun] = {}
        for vname in names:
            variant = study.variants[vname]
            composed: dict[tuple[str, ...], DictConfig] = {}  # by the step's extra overrides: one, usually
            configs: dict[str, DictConfig] = {}
            for step in variant.steps:
                extra = variant.step_overrides.get(step, ())
                if extra not in composed:
                    try:
                        composed[extra] = load_config(["stage=all", *study.base, *variant.overrides, *extra,
                                                       *overrides, f"seed={seed}",
                                                       f"exp={name or study.name}/seed{seed}/{vname}"])
                    except ConfigError as err:
                        where = f", step {step} (step_overrides {list(extra)})" if extra else ""
                        raise ConfigError(f"study {study.path}, variant {vname!r}{where}: {err}") from None
                configs[step] = composed[extra]
            root = Path(configs[variant.steps[0]].output_root)
            plan.append(plan_variant(root / (name or study.name), variant, seed, configs, shared,
                                     root / study.pool if study.pool else None))
    return plan


def distinct_runs(plan: Sequence[VariantRun]) -> list[StepRun]:
    """Each step run of the plan once, in the order the study runs them."""
    seen: dict[Path, StepRun] = {}
    for vr in plan:
        for run in vr.runs.values():
            seen.setdefault(run.dir, run)
    return list(seen.values())


def describe(run: StepRun) -> str:
    """A short description of what a step run trains: epochs, max_steps, training file, sampling."""
    stage = run.config.stage
    if run.step == "select":
        return f"score with {Path(str(stage.checkpoint)).name}"
    train = stage.get("train_ann") or run.config.data.train_ann
    train = "all" if train == run.config.data.train_ann else Path(str(train)).name
    rfs = stage.get("rfs") if run.step != "pretrain" else run.config.data.rfs_threshold
    rfs = "uniform" if rfs is None else rfs
    steps = f" max_steps={stage.max_steps}" if stage.get("max_steps") else ""
    head = run.config.head.name
    return f"epochs={stage.epochs}{steps} lr={stage.lr:g} train={train} rfs={rfs}" + \
        ("" if head == "sigmoid" else f" head={head}")


def plan_text(study: Study, plan: Sequence[VariantRun]) -> str:
    """The dry-run listing: per seed every distinct run, its status, what it trains and who shares it."""
    runs = distinct_runs(plan)
    recorded = {(vr.seed, vr.variant.name) for vr in plan if load_result(vr) is not None}
    status = {run.dir: run.status() for run in runs}
    for run in runs:  # needed only by variants whose result.json records them: nothing left to run
        if status[run.dir] != "done" and all((run.seed, v) in recorded for v in run.variants):
            status[run.dir] = "recorded"
    seeds = sorted({vr.seed for vr in plan})
    variants = list(dict.fromkeys(vr.variant.name for vr in plan))
    lines = [f"study {study.name} ({study.path}): {len(variants)} variants x {len(seeds)} seeds = "
             f"{len(plan)} rows from {len(runs)} distinct runs"]
    for seed in seeds:
        lines.append(f"seed {seed}:")
        for run in (r for r in runs if r.seed == seed):
            lines.append(f"  {run.key:<19} {status[run.dir]:<20} {describe(run):<60} "
                         f"<- {', '.join(run.variants)}")
    todo: dict[str, list[int]] = {}
    for run in runs:
        if status[run.dir] not in ("done", "recorded"):
            todo.setdefault(run.step, []).append(int(run.config.stage.get("epochs", 0) or 0))
    done = sum(s in ("done", "recorded") for s in status.values())
    lines.append(f"{done} of {len(runs)} runs done; still to run: " + (", ".join(
        f"{len(e)} {step}" + (f" ({sum(e)} epochs)" if step in TRAINING_STEPS else "")
        for step, e in todo.items()) or "nothing"))
    lines += time_estimate(runs, status, todo)
    return "\n".join(lines)


def time_estimate(runs: Sequence[StepRun], status: Mapping[Path, str], todo: Mapping[str, list[int]]) -> list[str]:
    """Lines with the measured wall time of the finished runs and, from it, the time the rest should take
    (seconds per epoch of each training step, seconds per selection; the same data and model assumed)."""
    spent: dict[str, list[tuple[float, int]]] = {}
    for run in runs:
        seconds = wall_seconds(run.dir) if status[run.dir] == "done" else None
        if seconds is not None:
            spent.setdefault(run.step, []).append((seconds, int(run.config.stage.get("epochs", 1) or 1)))
    if not spent:
        return []
    rate = {step: sum(s for s, _ in v) / (sum(e for _, e in v) if step in TRAINING_STEPS else len(v))
            for step, v in spent.items()}
    total = sum(s for v in spent.values() for s, _ in v)
    lines = [f"measured on finished runs: {total / 60:.1f} min; " + ", ".join(
        f"{step} {r:.0f} s/{'epoch' if step in TRAINING_STEPS else 'run'}" for step, r in rate.items())]
    if todo and all(step in rate for step in todo):
        left = sum(rate[step] * (sum(e) if step in TRAINING_STEPS else len(e)) for step, e in todo.items())
        lines.append(f"estimated for the rest: {left / 60:.1f} min (runs with a checkpoint take less)")
    return lines


# ----------------------------------------------------------------------------------------- execution
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


def wall_seconds(run_dir: Path) -> float | None:
    """Seconds the study spent running this step (``wall_time.json``, summed over resumed sessions)."""
    path = run_dir / WALL_TIME_NAME
    return float(read_wall_time(path)["seconds"]) if path.is_file() else None


def run_threads(run_dir: Path) -> list[int]:
    """The CPU thread counts this step has run with (``wall_time.json``; one entry per distinct count)."""
    path = run_dir / WALL_TIME_NAME
    return list(read_wall_time(path).get("threads", [])) if path.is_file() else []


def add_session(run_dir: Path, seconds: float) -> None:
    """Add one session's wall time and torch's CPU thread count to ``<run dir>/wall_time.json``. The thread
    count is kept because it changes float summation order: the same seed and config are bit-for-bit
    reproducible on one machine only at the same count (docs/study.md); a session whose count followed the
    machine's load (stepwise/utils/cpu_threads.py) adds every count it used."""
    atomic_write_json(run_dir / WALL_TIME_NAME,
                      {"seconds": (wall_seconds(run_dir) or 0.0) + seconds,
                       "threads": sorted({*run_threads(run_dir), *cpu_threads.used_counts()})})


BUSY_HINT = "not started: run the study again once that process has ended"


def busy_error(err: BaseException) -> str | None:
    """The failure text of a run that another process owns (its lock held: the run is not started), else None."""
    return str(err) if isinstance(err, run_lock.DirectoryBusy) else None


def run_step(run: StepRun, state: Any) -> None:
    """Run one step unless its outputs exist; an interrupted step resumes from its last checkpoint. The wall
    time and thread count of each session, an interrupted or failed one included, are added to
    ``<run dir>/wall_time.json``. Rank 0 owns the run directory first (:mod:`stepwise.utils.run_lock`; the
    lock stays until the process ends or :func:`run_plan` releases it): DirectoryBusy, and nothing read or
    written, when another process runs it."""
    run_lock.hold_on_rank0(run.dir, state.is_main_process, hint=BUSY_HINT)
    if step_done(run.config):
        state.print(f"stepwise: study: {run.key} (seed {run.seed}) done, skipping")
        return
    cfg = run.config.copy()
    set_resume(cfg)
    state.print(f"stepwise: study: {run.key} (seed {run.seed}; {', '.join(run.variants)}) -> {run.dir}"
                + (" (resuming)" if cfg.resume else ""))
    prepare_run_dir(cfg, state.is_main_process)
    state.wait_for_everyone()
    start = time.perf_counter()
    cpu_threads.reset_used()  # this session's counts only
    try:
        importlib.import_module(f"stepwise.stages.{run.step}").run(cfg)
        state.wait_for_everyone()
    finally:  # an interrupted session's time counts too: the run resumes from its checkpoint next time
        if state.is_main_process and run.dir.is_dir():
            add_session(run.dir, time.perf_counter() - start)
    gc.collect()


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


def ordered_needs(plan: Sequence[VariantRun]) -> tuple[list[StepRun], dict[Path, set[Path]]]:
    """The distinct runs of ``plan``, pre-trainings first, then selections, fine-tunes and distillations (plan
    order within a step), and per run directory the run directories it reads (the variant's earlier step)."""
    needs: dict[Path, set[Path]] = {}
    for vr in plan:
        previous = None
        for run in vr.runs.values():
            needs.setdefault(run.dir, set()).update({previous.dir} if previous else set())
            previous = run
    return sorted(distinct_runs(plan), key=lambda run: STEPS.index(run.step)), needs


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
               "die_with_parent(int(sys.argv[2])); from stepwise.study import run_job_file; "
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
    from stepwise.stages.common import ensure_builtin_data

    for data in {json.dumps(OmegaConf.to_container(run.config.data), sort_keys=True): run.config.data
                 for run in distinct_runs(plan)}.values():
        ensure_builtin_data(data)


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
                for slot, job in list(running.items()):
                    code = job.process.poll()
                    if code is None:
                        continue
                    del running[slot]
                    minutes = (time.perf_counter() - job.start) / 60
                    if code == 0 and step_done(job.run.config):
                        finished.add(job.run.dir)
                        state.print(f"stepwise: study: [{slot}] {job.run.key} (seed {job.run.seed}) done in "
                                    f"{minutes:.1f} min")
                    else:
                        failed[job.run.dir] = f"exit status {code}: {_last_line(job.log)} (log: {job.log})"
                        state.print(f"stepwise: study: [{slot}] {job.run.key} (seed {job.run.seed}) FAILED after "
                                    f"{minutes:.1f} min: {failed[job.run.dir]}")
        finally:
            stop_jobs(running)
    for vr in pending:
        broken = next((run for run in vr.runs.values() if run.dir in failed), None)
        if broken is not None:
            state.print(f"stepwise: study: {vr.variant.name} seed {vr.seed}: skipped, {broken.key} failed")
    return failed


# -------------------------------------------------------------------------------------------- report
def run_keys(vr: VariantRun) -> dict[str, str]:
    """``{step: run identity}`` of a variant on one seed."""
    return {step: run.key for step, run in vr.runs.items()}


def record_result(vr: VariantRun) -> dict[str, Any]:
    """Write ``<variant dir>/result.json`` from the variant's finished run directories and return it: the
    final step's ``eval/metrics.json`` and per-class rows, and per step its identity, wall time, optimizer
    steps and evaluation curve."""
    from stepwise.analysis.steps import read_per_class

    final = vr.runs[vr.variant.final_step]
    table = final.dir / "eval" / "per_class.csv"
    record = {
        "variant": vr.variant.name, "seed": vr.seed, "runs": run_keys(vr),
        "metrics": read_metrics(final.dir / "eval" / "metrics.json"),
        "per_class": read_per_class(table) if table.is_file() else None,
        "wall_seconds": {s: wall_seconds(r.dir) for s, r in vr.runs.items()},
        "optimizer_steps": {s: optimizer_steps(r.dir) for s, r in vr.runs.items() if s in TRAINING_STEPS},
        "curves": {s: eval_curve(r.dir) for s, r in vr.runs.items() if s in TRAINING_STEPS}}
    vr.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(vr.dir / RESULT_NAME, check_result(record, vr.dir / RESULT_NAME), indent=1)
    return record


def load_result(vr: VariantRun) -> dict[str, Any] | None:
    """The record of the runs the plan has now (same identities): the variant's own ``result.json``, else one
    of another variant in the seed directory that holds the runs (this study's, or its ``pool``'s: the heads
    study finds study=stepwise's ``baseline`` record for its ``sigmoid`` row). None if there is none (not yet,
    or only records of other configs: the runs are planned again).

    Every record looked at is checked (:func:`stepwise.study_records.read_result`): one that is not valid JSON
    or does not fit the schema (``{}`` included) raises RecordError naming the file and the field, never
    counts as missing."""
    keys = run_keys(vr)
    seed_dir = next(iter(vr.runs.values())).dir.parents[1]  # <study or pool>/seed<k>
    for path in (vr.dir / RESULT_NAME, *sorted(seed_dir.glob(f"*/{RESULT_NAME}"))):
        if not path.is_file():
            continue
        record = read_result(path)
        if record["runs"] == keys:
            return record
    return None


def variant_result(vr: VariantRun) -> dict[str, Any] | None:
    """The variant's record: ``result.json``, else written now from its finished runs; None if unfinished."""
    record = load_result(vr)
    if record is None and step_done(vr.runs[vr.variant.final_step].config):
        record = record_result(vr)
    return record


def optimizer_steps(run_dir: Path) -> int | None:
    """The global step of the last record of ``metrics.jsonl`` (the optimizer steps the run trained)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for last in read_log(path):  # noqa: B007 - the last record is the one wanted
        pass
    return None if last is None else last.get("global_step")


def collect(plan: Sequence[VariantRun], failed: Mapping[Path, str] | None = None
            ) -> tuple[dict[str, Any], dict[str, list[list[dict]]], list[str], dict[str, dict[str, Any]]]:
    """(results for :func:`stepwise.analysis.study.summarize`, per-class tables per variant, pending rows,
    ``{"<seed>/<run key>": {"seconds", "curve"}}`` of every run a record or run directory tells of;
    ``failed``: errors of runs that failed in this invocation, named in the pending rows)."""
    from stepwise.analysis.steps import COLUMNS

    results: dict[str, Any] = {}
    per_class: dict[str, list[list[dict]]] = {}
    pending = []
    runs: dict[str, dict[str, Any]] = {}
    for vr in plan:
        v = vr.variant
        entry = results.setdefault(v.name, {"steps": list(v.steps), "overrides": list(v.overrides),
                                            "step_overrides": {s: list(o) for s, o in v.step_overrides.items()},
                                            "description": v.description, "per_seed": {}, "runs": {}})
        record = variant_result(vr)
        if record is None:
            failed = failed or {}
            pending.append(f"{v.name} seed {vr.seed}: " + ", ".join(
                f"{r.key} " + (f"FAILED ({failed[r.dir]})" if r.dir in failed else r.status())
                for r in vr.runs.values() if not step_done(r.config)))
            continue
        row = {c: record["metrics"].get(c) for c in COLUMNS}
        row["optimizer_steps"] = record["optimizer_steps"]
        row["wall_seconds"] = record["wall_seconds"]
        entry["per_seed"][str(vr.seed)] = row
        entry["runs"][str(vr.seed)] = record["runs"]
        if record["per_class"] is not None:
            per_class.setdefault(v.name, []).append(record["per_class"])
        for step, key in record["runs"].items():
            runs[f"{vr.seed}/{key}"] = {"seconds": record["wall_seconds"].get(step),
                                        "curve": record["curves"].get(step, [])}
    return results, per_class, pending, runs


def eval_curve(run_dir: Path) -> list[dict[str, Any]]:
    """The evaluations a training run logged in ``metrics.jsonl``, in order: ``{"epoch", "metrics"}`` per
    evaluation (``epoch`` = epochs trained when it ran; the final one included)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    curve: dict[int, dict[str, Any]] = {}
    for record in read_log(path):
        if record.get("type") == "eval":  # a resumed run may repeat an evaluation: the last one counts
            epochs = int(record["epoch"]) + (1 if record.get("step_in_epoch") else 0)
            curve[epochs] = {"epoch": epochs, "metrics": record["metrics"]}
    return [curve[k] for k in sorted(curve)]


def pretrain_curves(plan: Sequence[VariantRun], recorded: Mapping[str, Mapping[str, Any]] | None = None
                    ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{label: {seed: eval_curve}}`` of every pre-training run of the plan (from its directory, else from
    ``recorded``, :func:`collect`'s runs); a run's label is the first variant (in study order) that uses it,
    e.g. ``baseline`` and ``baseline_rfs``."""
    curves: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for run in distinct_runs(plan):
        if run.step == "pretrain":
            curve = eval_curve(run.dir) or (recorded or {}).get(f"{run.seed}/{run.key}", {}).get("curve", [])
            if curve:
                curves.setdefault(run.variants[0], {})[str(run.seed)] = curve
    return curves


def write_report(study: Study, plan: Sequence[VariantRun], out_dir: Path, command: str = "",
                 failed: Mapping[Path, str] | None = None) -> dict[str, Any]:
    """``study.md``, ``study.json`` and ``study.png`` in ``out_dir`` over the finished rows; returns the summary."""
    from stepwise.analysis.study import average_per_class, plot_curves, plot_study, study_markdown, summarize

    results, tables, pending, recorded = collect(plan, failed)
    summary = summarize(results)
    curves = pretrain_curves(plan, recorded)
    seeds = sorted({vr.seed for vr in plan})
    notes = [f"Study file `{study.path}`; seeds {seeds}; each row's model is the final training step of its "
             "variant's steps.",
             "Values are box AP in % on val; mean ± sample standard deviation (ddof=1) over the seeds that "
             "finished (no ± with one seed). 'steps after pretrain' is the optimizer steps the row trained "
             "after its pre-training (mean over seeds)."]
    times = [wall_seconds(run.dir) or recorded.get(f"{run.seed}/{run.key}", {}).get("seconds")
             for run in distinct_runs(plan)]
    wall = sum(t for t in times if t is not None)
    notes.append(f"Wall time of the runs, each counted once (as recorded in their `{WALL_TIME_NAME}` or the "
                 f"variants' `{RESULT_NAME}`): {wall / 3600:.2f} h over {sum(t is not None for t in times)} of "
                 f"{len(times)} runs.")
    if study.description:
        notes.insert(0, study.description)
    if command:
        notes.append(f"Command: `{command}`")
    atomic_write_text(out_dir / "study.md", study_markdown(summary, f"Study: {study.name}", notes, pending=pending,
                                                           curves=curves, compare=study.compare))
    atomic_write_json(out_dir / "study.json", {
        "study": study.name, "file": str(study.path), "seeds": seeds, "units": "fraction of 1 (AP 0.315 = 31.5 %)",
        "std": "sample standard deviation over seeds (ddof=1); null with fewer than 2 seeds",
        "wall_seconds": wall, "variants": summary, "pretrain_curves": curves, "pending": pending}, indent=1)
    per_class = {v: average_per_class(tables[v]) for v in study.plot if v in tables}
    if any(entry["per_seed"] for entry in summary.values()):
        plot_study(summary, per_class, out_dir / "study.png",
                   reference=next((r for r in study.compare if summary.get(r, {}).get("per_seed")), None))
    if curves:
        plot_curves(curves, out_dir / "pretrain_curves.png")
    return summary


# ---------------------------------------------------------------------------------------------- entry
def parse_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``key=value`` arguments into study options and config overrides (reserved keys refused)."""
    options, overrides = {}, []
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"argument {item!r} is not of the form key=value")
        if key in OPTIONS:
            options[key] = value
        elif key.lstrip("+") in RESERVED:
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


def _flag(options: Mapping[str, str], key: str) -> bool:
    value = options.get(key, "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"{key}={options[key]}: expected true or false")
    return value in ("true", "1", "yes")


STUDY_BUSY_HINT = ("a study runs there already: wait for it or stop it (one command runs several seeds: seeds=[a,b] "
                   "jobs=N), or write elsewhere with name=<dir>")


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run (or plan, or report) a study; returns the report summary on rank 0 (None for a dry run)."""
    import torch
    from accelerate import PartialState

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        options, overrides = parse_args(argv)
        study = load_study(options["study"])
        seeds = parse_seeds(str(options.get("seeds", study.seeds)))
        chosen = [v for v in options.get("variants", "").strip("[]").split(",") if v.strip()]
        plan = build_plan(study, seeds, overrides, options.get("name"),
                          [v.strip() for v in chosen] or None)
        dry_run, report_only = _flag(options, "dry_run"), _flag(options, "report")
        jobs = parse_jobs(options.get("jobs", "1"))
    except ConfigError as err:
        print(f"stepwise: study: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    state = PartialState(cpu=not torch.cuda.is_available())
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
    if jobs > cpus and not dry_run and not report_only:
        print(f"stepwise: study: warning: jobs={jobs} but {cpus} CPU(s) usable here: each job gets 1 thread and "
              f"they take turns on the cores, each run slower than with jobs={cpus}", file=sys.stderr, flush=True)
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


if __name__ == "__main__":
    main()
