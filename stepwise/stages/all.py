"""``stage=all``: pretrain -> select -> finetune -> distill in one command, each step evaluated, then the step
table (``runs/<exp>/all/steps.md``, ``steps.json``) and the AP-by-frequency plot (``ap_by_frequency.png``).

The steps are the stages of :mod:`stepwise.stages.registry`; ``configs/stage/all.yaml`` holds a
``<step>@<step>`` default for each and the ``steps`` it runs (``stage.steps=[pretrain,select]`` runs fewer).
Each step gets the current config with ``stage`` set to its own node ``stage.<step>`` (composed from
``configs/stage/<step>.yaml``; override e.g. ``stage.finetune.epochs=2``) and runs through
:func:`stepwise.stages.run_stage`. A step whose outputs exist is skipped (the registry's ``outputs``: training
steps ``checkpoint_final.pt`` and ``eval/metrics.json``; select: both replay sets); a training step that was
interrupted resumes from its last checkpoint (one without a step checkpoint to resume from starts again:
``overwrite`` is set for it). Root ``init_from``/``checkpoint`` apply to pretrain only: the later steps read
the earlier steps' directories (:func:`stepwise.config.step_sources`, the rule of
:func:`stepwise.config.starting_point`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf, open_dict

from stepwise.analysis.steps import plot_ap_by_frequency, read_per_class, step_table
from stepwise.checkpoint import find_latest
from stepwise.config import ConfigError, step_sources
from stepwise.stages import run_stage, stage_spec
from stepwise.utils.io import atomic_write_json, atomic_write_text


def set_resume(cfg: DictConfig, overwrite: bool = False) -> None:
    """Set ``cfg.resume`` (``run_dir`` holds a training checkpoint: continue from it) and ``cfg.overwrite``
    (start again, deleting an earlier run's outputs: asked for, or nothing to resume from, e.g. a final
    checkpoint without a step checkpoint, stopped by max_steps and interrupted in its evaluation)."""
    with open_dict(cfg):
        cfg.resume = find_latest(Path(cfg.run_dir)) is not None
        cfg.overwrite = overwrite or not cfg.resume


def step_config(cfg: DictConfig, step: str) -> DictConfig:
    """``cfg`` with ``stage`` replaced by its step node ``stage.<step>`` (``configs/stage/<step>.yaml`` with
    any ``stage.<step>.key=value`` overrides)."""
    sub = cfg.copy()
    with open_dict(sub):
        sub.stage = cfg.stage[step]
        step_sources(sub, step)  # root init_from/checkpoint: the first step's only
    set_resume(sub, bool(cfg.overwrite))  # an interrupted step continues
    OmegaConf.set_struct(sub, True)
    return sub


def step_done(sub: DictConfig) -> bool:
    """True when the step's outputs (the registry's ``outputs`` of ``sub.stage.name``) exist."""
    return stage_spec(sub.stage.name).done(sub.run_dir)


def write_step_table(cfg: DictConfig, results: dict[str, Any]) -> None:
    """``steps.md``, ``steps.json`` and ``ap_by_frequency.png`` in ``cfg.run_dir`` (rank 0)."""
    out = Path(cfg.run_dir)
    table = step_table(results)
    print("\nstepwise: step-wise learning, box AP (%) on val after each step\n" + table)
    atomic_write_text(out / "steps.md", table)
    atomic_write_json(out / "steps.json", {s: {k: v for k, v in m.items() if k != "meta"}
                                             for s, m in results.items()}, indent=1)
    per_class = {}
    for step in results:
        path = Path(step_config(cfg, step).run_dir) / "eval" / "per_class.csv"
        if path.is_file():
            per_class[step] = read_per_class(path)
    print(f"stepwise: plot {plot_ap_by_frequency(results, per_class, out / 'ap_by_frequency.png')}")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the steps in order; returns ``{step: metrics}`` for the training steps."""
    state = PartialState()
    steps = list(cfg.stage.steps)
    unknown = [s for s in steps if not isinstance(cfg.stage.get(s), DictConfig)]
    if unknown:
        raise ConfigError(f"stage.steps: unknown steps {unknown} (configs/stage/all.yaml declares "
                          f"{[k for k, v in cfg.stage.items() if isinstance(v, DictConfig)]})")
    results: dict[str, Any] = {}
    for step in steps:
        sub = step_config(cfg, step)
        if step_done(sub):
            state.print(f"stepwise: step {step}: outputs in {sub.run_dir} exist, skipping")
        else:
            state.print(f"stepwise: step {step} -> {sub.run_dir}")
            run_stage(sub, state)
        if stage_spec(sub.stage.name).trains:
            with open(Path(sub.run_dir) / "eval" / "metrics.json") as f:
                results[step] = json.load(f)
    if state.is_main_process and results:
        write_step_table(cfg, results)
    state.wait_for_everyone()
    return results
