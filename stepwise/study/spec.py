"""Study files (``configs/study/<name>.yaml``; format: docs/interfaces.md, "Studies"): :func:`load_study`
parses and checks one into a :class:`Study` of :class:`Variant` rows. Steps are the stages of
:mod:`stepwise.stages.registry`; a variant's default steps are its ``PIPELINE``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stepwise.config import CONFIG_DIR, ConfigError
from stepwise.stages import registry

FILE_KEYS = ("description", "seeds", "base", "steps", "plot", "variants", "pool", "compare")
VARIANT_KEYS = ("description", "from", "steps", "overrides", "step_overrides")


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
        return [s for s in self.steps if s in registry.training_stages()][-1]


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
    known = registry.stage_names()
    unknown = [s for s in steps if s not in known]
    if unknown or len(set(steps)) != len(steps) or not any(s in registry.training_stages() for s in steps):
        raise ConfigError(f"{where}: {list(steps)} must be distinct steps of {list(known)} with at least one "
                          f"training step" + (f" (unknown: {unknown})" if unknown else ""))
    return steps


def _resolve(path: Path, entries: dict, default_steps: tuple[str, ...], name: str, chain: tuple[str, ...] = ()
             ) -> Variant:
    """Variant ``name`` of the study file ``path`` (``entries``: its ``variants`` mapping), ``from`` resolved."""
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
    parent = _resolve(path, entries, default_steps, entry["from"], (*chain, name)) if entry.get("from") else None
    steps = _steps(entry["steps"], f"{where}.steps") if "steps" in entry else \
        (parent.steps if parent else default_steps)
    overrides = (parent.overrides if parent else ()) + _strings(entry.get("overrides"), f"{where}.overrides")
    own = entry.get("step_overrides") or {}
    if not isinstance(own, dict) or set(own) - set(registry.stage_names()):
        raise ConfigError(f"{where}.step_overrides: expected a mapping from steps "
                          f"{list(registry.stage_names())} to override lists, got {own!r}")
    per_step = dict(parent.step_overrides) if parent else {}
    for step, values in own.items():
        per_step[step] = per_step.get(step, ()) + _strings(values, f"{where}.step_overrides.{step}")
    return Variant(name, steps, overrides, str(entry.get("description", "")), per_step)


def check_pool(pool: object, where: str) -> str:
    """``pool`` (a study file's or the command's): the name of a study directory under ``output_root``."""
    if not isinstance(pool, str) or not pool or "/" in pool or pool.startswith("."):
        raise ConfigError(f"{where} must be the name of a study directory under output_root, got {pool!r}")
    return pool


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
    default_steps = _steps(raw.get("steps", list(registry.PIPELINE)), f"{path}: steps")

    variants = {name: _resolve(path, entries, default_steps, str(name)) for name in entries}
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
    if pool is not None:
        check_pool(pool, f"{path}: pool")
    return Study(path.stem, path, str(raw.get("description", "")).strip(), seeds,
                 _strings(raw.get("base"), f"{path}: base"), variants, plot, pool, compare)

