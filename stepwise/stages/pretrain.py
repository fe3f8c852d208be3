"""Stage 0, ``stage=pretrain``: train the whole detector on all training data, evaluate on val.

Writes into ``runs/<exp>/pretrain/``: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step_*.pt``
(resumable), ``checkpoint_final.pt`` (what ``stage=select``/``finetune`` read via ``init_from``),
``eval/metrics.json``, ``eval/per_class.csv``, ``eval/predictions.json`` and TensorBoard logs.
"""

from __future__ import annotations

from typing import Any

from stepwise.engine import TrainSettings, make_accelerator
from stepwise.stages.parts import StageParts, build_datasets, build_loaders, build_model, ensure_data, make_trainer


def run(cfg: Any) -> dict[str, Any] | None:
    """Train and evaluate as ``cfg`` says; returns the final val metrics (AP, APr, APc, APf, AP1..AP4, ...)."""
    settings = TrainSettings.from_config(cfg)
    accelerator = make_accelerator(settings, cfg.run_dir)
    ensure_data(cfg, accelerator)
    train_ds, val_ds = build_datasets(cfg)
    train_loader, val_loader = build_loaders(cfg, train_ds, val_ds)
    detector = build_model(cfg, train_ds.categories, accelerator)
    parts = StageParts(cfg, settings, accelerator, train_ds.categories, detector, train_loader, val_loader)
    return make_trainer(parts).fit()
