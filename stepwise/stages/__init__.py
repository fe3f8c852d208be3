"""Pipeline stages. Each module ``stepwise.stages.<name>`` has ``run(cfg) -> dict`` and is chosen by
``stage=<name>`` (``python -m stepwise.run stage=pretrain ...``); a stage that does not train declares
``OUTPUTS``, the files in its run directory that mean it is done (a training stage is done when
``TRAINING_OUTPUTS`` exist)."""

from __future__ import annotations

import importlib
from importlib.resources import files
from types import ModuleType

from stepwise.config import ConfigError

TRAINING_OUTPUTS = ("checkpoint_final.pt", "eval/metrics.json")


def stage_module(name: str) -> ModuleType:
    """``stepwise.stages.<name>``; ConfigError naming the stages that exist when there is none."""
    try:
        return importlib.import_module(f"stepwise.stages.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"stepwise.stages.{name}":
            raise
        known = sorted(p.name[:-3] for p in files("stepwise.stages").iterdir()
                       if p.name.endswith(".py") and p.name not in ("__init__.py", "common.py"))
        raise ConfigError(f"unknown stage {name!r}; available: {', '.join(known)}") from None


def stage_outputs(name: str) -> tuple[str, ...]:
    """The files (relative to the run directory) whose existence means stage ``name`` is done."""
    return tuple(getattr(stage_module(name), "OUTPUTS", TRAINING_OUTPUTS))
