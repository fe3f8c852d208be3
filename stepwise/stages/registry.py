"""The map of the steps: one :class:`Stage` declaration per stage, read by ``stage=all``
(:mod:`stepwise.stages.all`), the study planner (:mod:`stepwise.study.plan`), the record schema
(:mod:`stepwise.study.records`), ``overwrite=true`` (:func:`stepwise.config.clear_run_dir`) and the docs.

A declaration says what the stage is (its module's ``run(cfg)``), whether it trains, which files in its run
directory mean it is finished (``outputs``), which files an ``overwrite=true`` deletes (``clears``), which
root config blocks it reads (``reads``: a study hashes exactly these into the run's identity, so a key in a
block the stage does not read never changes its runs) and which stages' run directories it reads by default
(``inputs``: ``{key of its stage node: stage}``, e.g. ``init_from: pretrain``; the ``configs/stage/<name>.yaml``
paths ``${output_root}/${exp}/<stage>`` say the same, checked by ``tests/test_stages_registry.py``).

Adding a stage: its module, one :func:`register` call below, ``configs/stage/<name>.yaml`` (and the
``<name>@<name>`` default of ``configs/stage/all.yaml``), a test (docs/architecture.md, "Walk-through: add a
stage"). Import-light: no torch here (the study's records and ``stepwise.config`` read it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

TRAINING_OUTPUTS = ("checkpoint_final.pt", "eval/metrics.json")  # a training stage is done when both exist
RUN_FILES = ("checkpoints", "checkpoint_final.pt", "metrics.jsonl", "eval")  # what overwrite=true deletes
# The root blocks a training stage reads (``stage`` is its own node). Bookkeeping (run_dir, exp, output_root,
# resume, overwrite) is never read into a result.
MODEL_BLOCKS = ("seed", "init_from", "checkpoint", "loss", "model", "head", "data", "stage")


def describe_training(cfg: Any) -> str:
    """A training step in one line: epochs, max_steps, lr, training file, sampling, head (when not sigmoid)."""
    stage = cfg.stage
    train = stage.get("train_ann") or cfg.data.train_ann
    train = "all" if train == cfg.data.train_ann else Path(str(train)).name
    rfs = stage.get("rfs") if "rfs" in stage else cfg.data.rfs_threshold  # replay-set sampling, else the data's
    rfs = "uniform" if rfs is None else rfs
    steps = f" max_steps={stage.max_steps}" if stage.get("max_steps") else ""
    head = cfg.head.name
    return f"epochs={stage.epochs}{steps} lr={stage.lr:g} train={train} rfs={rfs}" + \
        ("" if head == "sigmoid" else f" head={head}")


def describe_scoring(cfg: Any) -> str:
    """A scoring step in one line: the checkpoint it scores with."""
    return f"score with {Path(str(cfg.stage.checkpoint)).name}"


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline (see the module docstring)."""

    name: str
    trains: bool = True
    outputs: tuple[str, ...] = TRAINING_OUTPUTS
    reads: tuple[str, ...] = MODEL_BLOCKS
    ignores: tuple[str, ...] = ()  # dotted keys inside ``reads`` the stage does not read
    inputs: Mapping[str, str] = field(default_factory=dict)
    clears: tuple[str, ...] = RUN_FILES
    progress: str | None = None  # a non-training stage's file that shows an interrupted run ("<file> exists")
    module: str = ""  # default: stepwise.stages.<name>
    describe: Callable[[Any], str] = describe_training

    def load(self) -> Any:
        """The stage's module (``run(cfg)``)."""
        return importlib.import_module(self.module or f"stepwise.stages.{self.name}")

    def run(self, cfg: Any) -> Any:
        """``<module>.run(cfg)``: the stage's result (a training stage's final metrics)."""
        return self.load().run(cfg)

    def done(self, run_dir: str | Path) -> bool:
        """True when every file of ``outputs`` exists in ``run_dir``."""
        return all((Path(run_dir) / name).is_file() for name in self.outputs)


_STAGES: dict[str, Stage] = {}
STAGES: Mapping[str, Stage] = MappingProxyType(_STAGES)  # name -> declaration, in pipeline order


def register(stage: Stage) -> Stage:
    """Add (or replace) a stage's declaration; returns it."""
    _STAGES[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    """Remove a declaration (tests that register a stage of their own)."""
    _STAGES.pop(name, None)


def stage_names() -> tuple[str, ...]:
    """Every registered stage, in pipeline order."""
    return tuple(_STAGES)


def training_stages() -> tuple[str, ...]:
    """The registered stages that train."""
    return tuple(name for name, stage in _STAGES.items() if stage.trains)


def get(name: str) -> Stage:
    """The declaration of ``name``; KeyError naming the registered stages when there is none."""
    try:
        return _STAGES[name]
    except KeyError:
        raise KeyError(f"stage {name!r} is not registered (stages: {', '.join(_STAGES)})") from None


# The step-wise pipeline: the default steps of stage=all (configs/stage/all.yaml ``steps``) and of a study variant.
PIPELINE = ("pretrain", "select", "finetune", "distill")

register(Stage("pretrain", reads=MODEL_BLOCKS))
register(Stage("select", trains=False, outputs=("d_head.json", "d_tail.json"), reads=(*MODEL_BLOCKS, "stepwise"),
               ignores=("stepwise.rfs",), inputs={"checkpoint": "pretrain"}, progress="scores.jsonl",
               describe=describe_scoring))
register(Stage("finetune", reads=(*MODEL_BLOCKS, "stepwise"), inputs={"init_from": "pretrain", "train_ann": "select"}))
register(Stage("distill", reads=(*MODEL_BLOCKS, "stepwise", "distill"),
               inputs={"init_from": "finetune", "teacher": "finetune", "train_ann": "select"}))
