"""A study's plan: every (seed, variant) with its step runs (:func:`build_plan`), the runs of one seed
sharing their common prefix (equal identities, :mod:`stepwise.study.identity`, are one run), and the dry
run's listing (:func:`plan_text`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from stepwise import config as config_module
from stepwise.checkpoint import list_checkpoints
from stepwise.config import ConfigError, load_config
from stepwise.stages import registry
from stepwise.stages.all import step_config, step_done
from stepwise.study.identity import identity_tree, map_paths, run_key
from stepwise.study.records import load_result, wall_seconds
from stepwise.study.spec import Study, Variant
from stepwise.utils import run_lock


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
        if step_done(self.config):
            return "done"
        owner = run_lock.owner(self.dir)
        if owner is not None:
            return f"in use by {owner.split(' (since')[0]}"
        stage = registry.get(self.step)
        if not stage.trains:
            return f"{stage.progress} exists" if stage.progress and (self.dir / stage.progress).is_file() else "to do"
        found = list_checkpoints(self.dir)
        return f"resumes at step {found[-1][0]}" if found else "to do"


@dataclass
class VariantRun:
    """A variant on one seed: its directory and its steps' runs in order."""

    variant: Variant
    seed: int
    dir: Path             # <output_root>/<study>/seed<k>/<variant>
    runs: dict[str, StepRun]

def plan_variant(study_dir: Path, variant: Variant, seed: int, configs: Mapping[str, DictConfig],
                 shared: dict[str, StepRun], pool_dir: Path | None = None,
                 defaults: Mapping[str, Callable[[], DictConfig]] | None = None) -> VariantRun:
    """The runs of ``variant`` on ``seed`` from its composed ``stage=all`` config per step (``{step: cfg}``;
    one object for all steps unless the variant has ``step_overrides``); runs already in ``shared`` (same
    seed, same identity) are reused, new ones added to it. Runs live in ``<pool_dir>/seed<k>/shared/``
    (default ``pool_dir``: ``study_dir``), the variant's links in ``study_dir``. ``defaults[step]()``: the
    step's config of the same groups without overrides (new keys at their default stay out of the identity)."""
    seed_dir = (pool_dir or study_dir) / f"seed{seed}"
    first = configs[variant.steps[0]]
    prefix = f"{first.output_root}/{first.exp}/"
    runs: dict[str, StepRun] = {}
    for step in variant.steps:
        tree = OmegaConf.to_container(step_config(configs[step], step), resolve=True)
        tree.pop("run_dir")  # <prefix><step> itself; set to the shared run directory below
        paths = functools.partial(_upstream_paths, tree, prefix, runs, variant, step)
        default = _default_tree(defaults[step], step) if defaults and step in defaults else None
        key = run_key(step, identity_tree(registry.get(step), paths(True), default))
        if key not in shared:
            resolved = paths(False)
            resolved["run_dir"] = str(seed_dir / "shared" / key)
            config = OmegaConf.create(resolved)
            OmegaConf.set_struct(config, True)
            shared[key] = StepRun(step, key, seed, seed_dir / "shared" / key, config)
        shared[key].variants.append(variant.name)
        runs[step] = shared[key]
    return VariantRun(variant, seed, study_dir / f"seed{seed}" / variant.name, runs)


def _upstream_paths(tree: dict, prefix: str, runs: Mapping[str, StepRun], variant: Variant, step: str,
                    as_key: bool) -> dict:
    """``tree`` with every path ``<prefix><earlier step>[/rest]`` replaced by that step's run: its identity
    ``<key>`` (``as_key``, for the hash) or its directory; ConfigError for a step the variant does not run."""
    def upstream(name: str, rest: str) -> str:
        if name not in runs:
            raise ConfigError(f"study variant {variant.name!r}: step {step} reads {prefix}{name}"
                              f"{'/' + rest if rest else ''}, but {name} is not an earlier step of the "
                              f"variant (steps: {list(variant.steps)})")
        base = f"<{runs[name].key}>" if as_key else str(runs[name].dir)
        return f"{base}/{rest}" if rest else base

    return map_paths(tree, prefix, registry.stage_names(), upstream)


def _default_tree(compose: Callable[[], DictConfig], step: str) -> Callable[[], dict]:
    return lambda: OmegaConf.to_container(step_config(compose(), step), resolve=True)


@functools.lru_cache(maxsize=64)
def _defaults_config(config_dir: str, groups: tuple[str, ...]) -> DictConfig:
    """The ``stage=all`` config of these group choices (``head=bags``, ``recipe=...``) and no other override
    (``config_dir``: the configs it was composed from, part of the cache key)."""
    return load_config(["stage=all", *groups])


def group_choices(overrides: Sequence[str]) -> tuple[str, ...]:
    """The overrides that choose a config group option (``head=bags``), in order."""
    return tuple(item for item in overrides if "." not in item.partition("=")[0]
                 and (config_module.CONFIG_DIR / item.partition("=")[0].lstrip("+~")).is_dir())


def compose_variant(study: Study, variant: Variant, seed: int, overrides: Sequence[str], name: str | None
                    ) -> tuple[dict[str, DictConfig], dict[str, Callable[[], DictConfig]]]:
    """The composed ``stage=all`` config of each step of ``variant`` on ``seed`` (one per distinct
    ``step_overrides``) and, per step, the config of its groups without overrides (composed when asked)."""
    composed: dict[tuple[str, ...], DictConfig] = {}  # by the step's extra overrides: one, usually
    configs: dict[str, DictConfig] = {}
    defaults: dict[str, Callable[[], DictConfig]] = {}
    for step in variant.steps:
        extra = variant.step_overrides.get(step, ())
        items = [*study.base, *variant.overrides, *extra, *overrides]
        if extra not in composed:
            try:
                composed[extra] = load_config(["stage=all", *items, f"seed={seed}",
                                               f"exp={name or study.name}/seed{seed}/{variant.name}"])
            except ConfigError as err:
                where = f", step {step} (step_overrides {list(extra)})" if extra else ""
                raise ConfigError(f"study {study.path}, variant {variant.name!r}{where}: {err}") from None
        configs[step] = composed[extra]
        defaults[step] = functools.partial(_defaults_config, str(config_module.CONFIG_DIR), group_choices(items))
    return configs, defaults


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
            configs, defaults = compose_variant(study, variant, seed, overrides, name)
            root = Path(configs[variant.steps[0]].output_root)
            plan.append(plan_variant(root / (name or study.name), variant, seed, configs, shared,
                                     root / study.pool if study.pool else None, defaults))
    return plan


def distinct_runs(plan: Sequence[VariantRun]) -> list[StepRun]:
    """Each step run of the plan once, in the order the study runs them."""
    seen: dict[Path, StepRun] = {}
    for vr in plan:
        for run in vr.runs.values():
            seen.setdefault(run.dir, run)
    return list(seen.values())


def describe(run: StepRun) -> str:
    """A short description of what a step run does (its registry declaration's ``describe``)."""
    return registry.get(run.step).describe(run.config)


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
        f"{len(e)} {step}" + (f" ({sum(e)} epochs)" if registry.get(step).trains else "")
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
    rate = {step: sum(s for s, _ in v) / (sum(e for _, e in v) if registry.get(step).trains else len(v))
            for step, v in spent.items()}
    total = sum(s for v in spent.values() for s, _ in v)
    lines = [f"measured on finished runs: {total / 60:.1f} min; " + ", ".join(
        f"{step} {r:.0f} s/{'epoch' if registry.get(step).trains else 'run'}" for step, r in rate.items())]
    if todo and all(step in rate for step in todo):
        left = sum(rate[step] * (sum(e) if registry.get(step).trains else len(e)) for step, e in todo.items())
        lines.append(f"estimated for the rest: {left / 60:.1f} min (runs with a checkpoint take less)")
    return lines
