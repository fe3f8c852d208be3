"""The files a study reads back, each checked against one schema when read (``msgspec`` structs), and the
functions that write and find them.

* ``<variant dir>/result.json`` — a finished variant's record (:func:`result_schema`: ``ResultRecord``
  with a value per registered stage; written by :func:`record_result` and checked against the same schema
  before it is written, found by :func:`load_result`);
* ``<run dir>/eval/metrics.json`` — an evaluation's metrics (:class:`Metrics`: the report's columns are
  numbers or null; other keys, ``meta`` and ``warnings``, are kept as they are);
* ``<run dir>/wall_time.json`` — the study's sessions in a run (:class:`WallTime`);
* ``<run dir>/metrics.jsonl`` — the training log (:func:`read_log`: every complete line is JSON; ``eval``
  lines carry ``epoch`` and ``metrics``).

A file that fails its schema raises :class:`RecordError`, one line naming the file and the field
(``runs/s/seed0/ft/result.json: field metrics.AP: expected `float | null`, got `str`; ...``). Such a file is
never taken for a missing one: ``{}`` is an error too. The readers return plain JSON values (dicts), the
shape the report code uses.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterator, Optional, Union

import msgspec

from stepwise.analysis.steps import read_per_class
from stepwise.stages import registry
from stepwise.utils import cpu_threads
from stepwise.utils.io import atomic_write_json

if TYPE_CHECKING:
    from stepwise.study.plan import VariantRun

WALL_TIME_NAME = "wall_time.json"
RESULT_NAME = "result.json"  # a finished variant's record in its directory: all the report reads of its runs

Seconds = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Value = Optional[float]  # a metric: a fraction (an int is accepted), or null where nothing was evaluated


class RecordError(ValueError):
    """A study file is unreadable or does not fit its schema; ``str(err)`` names the file and the field."""


class Metrics(msgspec.Struct):
    """An evaluation's ``metrics.json`` (the report's columns; any other key is kept unchecked)."""

    AP: Value
    AP50: Value = None
    APr: Value = None
    APc: Value = None
    APf: Value = None
    AP1: Value = None
    AP2: Value = None
    AP3: Value = None
    AP4: Value = None


class CurvePoint(msgspec.Struct):
    """One evaluation of a training step: epochs trained when it ran, and its metrics."""

    epoch: Count
    metrics: Metrics


class ClassRow(msgspec.Struct):
    """A row of ``per_class.csv`` as :func:`stepwise.analysis.steps.read_per_class` reads it."""

    id: Union[str, int]
    train_instances: Count
    ap: Value


def _per_step(name: str, value: Any, steps: tuple[str, ...]) -> type:
    """A value per step of a variant: every key optional, no key that is not a stage."""
    return msgspec.defstruct(name, [(step, Union[value, msgspec.UnsetType], msgspec.UNSET) for step in steps],
                             forbid_unknown_fields=True)


@functools.lru_cache(maxsize=8)
def result_schema(steps: tuple[str, ...] | None = None) -> type:
    """``result.json``: everything the report reads of a finished variant on one seed, with a value per step
    of ``steps`` (default: the registered stages, :mod:`stepwise.stages.registry`)."""
    steps = registry.stage_names() if steps is None else steps
    return msgspec.defstruct("ResultRecord", [
        ("variant", str), ("seed", Count), ("runs", _per_step("Runs", str, steps)), ("metrics", Metrics),
        ("per_class", Optional[list[ClassRow]]), ("wall_seconds", _per_step("WallSeconds", Optional[Seconds], steps)),
        ("optimizer_steps", _per_step("OptimizerSteps", Optional[Count], steps)),
        ("curves", _per_step("Curves", list[CurvePoint], steps))])


class WallTime(msgspec.Struct):
    """``wall_time.json``: seconds the study spent in a run (all sessions) and the CPU thread counts used."""

    seconds: Seconds
    threads: list[Count] = []


class EvalLine(msgspec.Struct):
    """An ``eval`` line of ``metrics.jsonl`` (other keys unchecked)."""

    epoch: Count
    metrics: Metrics
    step_in_epoch: Count = 0


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`$")


def _where(err: msgspec.ValidationError) -> tuple[str, str]:
    """(field, problem) of a msgspec validation message: ``field metrics.AP``, ``expected `float | null`...``."""
    match = _AT.match(str(err))
    what, path = (match.group("what"), (match.group("path") or "").lstrip(".")) if match else (str(err), "")
    for pattern, problem in ((_MISSING, "missing"), (_UNKNOWN, "unknown key")):
        found = pattern.match(what)
        if found:
            return ".".join(p for p in (path, found.group("field")) if p), problem
    return path or "(the whole file)", what[:1].lower() + what[1:]


def check(obj: Any, schema: type, path: str | Path, what: str, hint: str = "") -> Any:
    """``obj`` (JSON values) when it fits ``schema``; RecordError naming ``path`` and the field otherwise."""
    try:
        msgspec.convert(obj, type=schema)
    except msgspec.ValidationError as err:
        field, problem = _where(err)
        raise RecordError(f"{path}: {what}: field {field}: {problem}{hint}") from None
    return obj


def _nan_to_none(value: float) -> Any:
    return None if math.isnan(value) else value


def load(path: str | Path, schema: type, what: str, hint: str = "") -> Any:
    """Read the JSON file ``path`` and :func:`check` it; RecordError when unreadable, not JSON or off-schema.
    (NaN, which ``json.dump`` writes for an undefined metric, reads as null.)"""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise RecordError(f"{path}: {what} cannot be read: {err.strerror or err}{hint}") from None
    try:
        obj = json.loads(text, parse_constant=lambda name: _nan_to_none(float(name)))
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}: {what} is not valid JSON ({err}){hint}") from None
    return check(obj, schema, path, what, hint)


RESULT_HINT = "; fix it, or delete it to re-run the variant"


def read_result(path: str | Path) -> dict[str, Any]:
    """A variant's ``result.json`` (:func:`result_schema`)."""
    return load(path, result_schema(registry.stage_names()), "study result record", RESULT_HINT)


def check_result(record: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """``record`` when it fits :func:`result_schema` (checked before it is written to ``path``)."""
    return check(record, result_schema(registry.stage_names()), path, "study result record")


def read_metrics(path: str | Path) -> dict[str, Any]:
    """An evaluation's ``metrics.json`` (:class:`Metrics`)."""
    return load(path, Metrics, "evaluation metrics", "; re-run the step's evaluation (delete its eval/)")


def read_wall_time(path: str | Path) -> dict[str, Any]:
    """A run's ``wall_time.json`` (:class:`WallTime`)."""
    return load(path, WallTime, "wall-time record", "; fix it or delete it (the run's wall time is then unknown)")


def read_log(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, in order. A last line without its newline (a process killed while
    writing it) is skipped; any other line that is not a JSON object, or an ``eval`` line without an integer
    ``epoch`` and its ``metrics``, raises RecordError naming the file and the line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines(keepends=True)
    except OSError as err:
        raise RecordError(f"{path}: training log cannot be read: {err.strerror or err}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=lambda name: _nan_to_none(float(name)))
        except json.JSONDecodeError as err:
            if number == len(lines) and not line.endswith("\n"):
                return  # cut off by a kill
            raise RecordError(f"{path}: training log: line {number} is not valid JSON ({err})") from None
        if not isinstance(record, dict):
            raise RecordError(f"{path}: training log: line {number} is not a JSON object")
        if record.get("type") == "eval":
            check(record, EvalLine, path, f"training log: line {number} (an evaluation)")
        yield record


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


def run_keys(vr: VariantRun) -> dict[str, str]:
    """``{step: run identity}`` of a variant on one seed."""
    return {step: run.key for step, run in vr.runs.items()}


def record_result(vr: VariantRun) -> dict[str, Any]:
    """Write ``<variant dir>/result.json`` from the variant's finished run directories and return it: the
    final step's ``eval/metrics.json`` and per-class rows, and per step its identity, wall time, optimizer
    steps and evaluation curve."""
    final = vr.runs[vr.variant.final_step]
    table = final.dir / "eval" / "per_class.csv"
    record = {
        "variant": vr.variant.name, "seed": vr.seed, "runs": run_keys(vr),
        "metrics": read_metrics(final.dir / "eval" / "metrics.json"),
        "per_class": read_per_class(table) if table.is_file() else None,
        "wall_seconds": {s: wall_seconds(r.dir) for s, r in vr.runs.items()},
        "optimizer_steps": {s: optimizer_steps(r.dir) for s, r in vr.runs.items() if registry.get(s).trains},
        "curves": {s: eval_curve(r.dir) for s, r in vr.runs.items() if registry.get(s).trains}}
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
    final = vr.runs[vr.variant.final_step]
    if record is None and registry.get(final.step).done(final.dir):
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
