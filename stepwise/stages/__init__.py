"""Pipeline stages. Each stage is declared once in :mod:`stepwise.stages.registry` (its module's
``run(cfg) -> dict``, whether it trains, the outputs that mean it is done, the config blocks it reads, its
inputs) and chosen by ``stage=<name>`` (``python -m stepwise.run stage=pretrain ...``). :func:`run_stage` is
the one way a stage runs: ``stepwise.run``, ``stage=all`` and ``stepwise.study`` all call it."""

from __future__ import annotations

from contextlib import nullcontext
from types import ModuleType
from typing import Any, Callable, ContextManager

from stepwise.config import ConfigError, prepare_run_dir
from stepwise.stages import registry
from stepwise.stages.registry import TRAINING_OUTPUTS, Stage  # noqa: F401 - the stages' shared names

__all__ = ["TRAINING_OUTPUTS", "Stage", "run_stage", "stage_module", "stage_outputs", "stage_spec"]


def stage_spec(name: str) -> Stage:
    """The registered declaration of stage ``name``; ConfigError naming the stages that exist when there is none."""
    try:
        return registry.get(name)
    except KeyError:
        raise ConfigError(f"unknown stage {name!r}; available: "
                          f"{', '.join(sorted((*registry.stage_names(), 'all')))}") from None


def stage_module(name: str) -> ModuleType:
    """The module that runs stage ``name`` (``all`` too); ConfigError naming the stages when there is none."""
    if name == "all":
        from stepwise.stages import all as module

        return module
    return stage_spec(name).load()


def stage_outputs(name: str) -> tuple[str, ...]:
    """The files (relative to the run directory) whose existence means stage ``name`` is done."""
    return stage_spec(name).outputs


def run_stage(cfg: Any, state: Any, session: Callable[[Any], ContextManager] | None = None) -> Any:
    """Run ``cfg``'s stage in ``cfg.run_dir``: rank 0 takes the directory's lock and prepares it
    (:func:`stepwise.config.prepare_run_dir`: DirectoryBusy when another process owns it, ConfigError over an
    earlier run without resume/overwrite), every process waits, ``<stage>.run(cfg)``, every process waits (no
    process tears the group down while another is in a collective). ``session(cfg)``, when given, is a context
    around the run and the last wait (the study times it). Returns the stage's result."""
    prepare_run_dir(cfg, state.is_main_process)
    state.wait_for_everyone()
    with session(cfg) if session is not None else nullcontext():
        result = stage_module(cfg.stage.name).run(cfg)
        state.wait_for_everyone()
    return result
