"""The files a study reads back, each checked against one schema when read (``msgspec`` structs).

* ``<variant dir>/result.json`` — a finished variant's record (:class:`ResultRecord`, written by
  :func:`stepwise.study.record_result` and checked against the same schema before it is written);
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

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Generic, Iterator, Optional, TypeVar, Union

import msgspec

T = TypeVar("T")
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


class PerStep(msgspec.Struct, Generic[T], forbid_unknown_fields=True):
    """A value per step of a variant (every key optional, no other key)."""

    pretrain: Union[T, msgspec.UnsetType] = msgspec.UNSET
    select: Union[T, msgspec.UnsetType] = msgspec.UNSET
    finetune: Union[T, msgspec.UnsetType] = msgspec.UNSET
    distill: Union[T, msgspec.UnsetType] = msgspec.UNSET


class CurvePoint(msgspec.Struct):
    """One evaluation of a training step: epochs trained when it ran, and its metrics."""

    epoch: Count
    metrics: Metrics


class ClassRow(msgspec.Struct):
    """A row of ``per_class.csv`` as :func:`stepwise.analysis.steps.read_per_class` reads it."""

    id: Union[str, int]
    train_instances: Count
    ap: Value


class ResultRecord(msgspec.Struct):
    """``result.json``: everything the report reads of a finished variant on one seed."""

    variant: str
    seed: Count
    runs: PerStep[str]
    metrics: Metrics
    per_class: Optional[list[ClassRow]]
    wall_seconds: PerStep[Optional[Seconds]]
    optimizer_steps: PerStep[Optional[Count]]
    curves: PerStep[list[CurvePoint]]


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
    """A variant's ``result.json`` (:class:`ResultRecord`)."""
    return load(path, ResultRecord, "study result record", RESULT_HINT)


def check_result(record: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """``record`` when it fits :class:`ResultRecord` (checked before it is written to ``path``)."""
    return check(record, ResultRecord, path, "study result record")


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
