"""``stage=all``: pretrain -> select -> finetune -> distill in one command, each step evaluated, then the step
table (``runs/<exp>/all/steps.md``, ``steps.json``) and the AP-by-frequency plot (``ap_by_frequency.png``).

Each step gets the current config with ``stage`` set to its own node ``stage.<step>`` (composed from
``configs/stage/<step>.yaml``; override e.g. ``stage.finetune.epochs=2``). A step whose outputs exist is
skipped (training steps: ``checkpoint_final.pt`` and ``eval/metrics.json``; select: both replay sets); a
training step that was interrupted resumes from its last checkpoint (one without a step checkpoint to
resume from starts again: ``overwrite`` is set for it). Root ``init_from``/``checkpoint``
apply to pretrain only: the later steps read the earlier steps' directories.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf, open_dict

from stepwise.checkpoint import find_latest
from stepwise.config import ConfigError, prepare_run_dir
from stepwise.utils.io import atomic_write_json, atomic_write_text

TRAINING_STEPS = ("pretrain", "finetune", "distill")


def step_config(cfg: DictConfig, step: str) -> DictConfig:
    """``cfg`` with ``stage`` replaced by its step node ``stage.<step>`` (``configs/stage/<step>.yaml`` with
    any ``stage.<step>.key=value`` overrides)."""
    sub = cfg.copy()
    with open_dict(sub):
        sub.stage = cfg.stage[step]
        if step != "pretrain":
            sub.init_from = None
            sub.checkpoint = None
        sub.resume = find_latest(Path(sub.run_dir)) is not None  # an interrupted step continues
        # a step with a final checkpoint but no step checkpoint to resume from (stopped by max_steps, then
        # interrupted in its evaluation) is run again from its start
        sub.overwrite = bool(cfg.get("overwrite")) or not sub.resume
    OmegaConf.set_struct(sub, True)
    return sub


def step_done(sub: DictConfig) -> bool:
    """True when the step's outputs exist."""
    run_dir = Path(sub.run_dir)
    if sub.stage.name == "select":
        return (run_dir / "d_head.json").is_file() and (run_dir / "d_tail.json").is_file()
    return (run_dir / "checkpoint_final.pt").is_file() and (run_dir / "eval" / "metrics.json").is_file()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the steps in order; returns ``{step: metrics}`` for the training steps."""
    from stepwise.analysis.steps import plot_ap_by_frequency, read_per_class, step_table

    state = PartialState()
    steps = list(cfg.stage.steps)
    unknown = [s for s in steps if s not in ("pretrain", "select", "finetune", "distill")]
    if unknown:
        raise ConfigError(f"stage.steps: unknown steps {unknown}")
    results: dict[str, Any] = {}
    for step in steps:
        sub = step_config(cfg, step)
        if step_done(sub):
            state.print(f"stepwise: step {step}: outputs in {sub.run_dir} exist, skipping")
        else:
            state.print(f"stepwise: step {step} -> {sub.run_dir}")
            prepare_run_dir(sub, state.is_main_process)
            state.wait_for_everyone()
            importlib.import_module(f"stepwise.stages.{step}").run(sub)
            state.wait_for_everyone()
        if step in TRAINING_STEPS:
            with open(Path(sub.run_dir) / "eval" / "metrics.json") as f:
                results[step] = json.load(f)
    out = Path(cfg.run_dir)
    if state.is_main_process and results:
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
    state.wait_for_everyone()
    return results
