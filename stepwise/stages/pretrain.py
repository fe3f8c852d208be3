"""Stage 0, ``stage=pretrain``: train the whole detector on all training data, evaluate on val.

Writes into ``runs/<exp>/pretrain/``: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step_*.pt``
(resumable), ``checkpoint_final.pt`` (what ``stage=select``/``finetune`` read via ``init_from``),
``eval/metrics.json``, ``eval/per_class.csv``, ``eval/predictions.json`` and TensorBoard logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stepwise.engine import Trainer, TrainSettings, make_accelerator
from stepwise.stages import common


def run(cfg: Any) -> dict[str, Any] | None:
    """Train and evaluate as ``cfg`` says; returns the final val metrics (AP, APr, APc, APf, AP1..AP4, ...)."""
    settings = TrainSettings.from_config(cfg)
    run_dir = Path(cfg.run_dir)
    accelerator = make_accelerator(settings, run_dir)
    common.ensure_data(cfg, accelerator)
    train_ds, val_ds = common.build_datasets(cfg)
    train_loader, val_loader = common.build_loaders(cfg, train_ds, val_ds)
    categories = train_ds.categories
    model = common.build_model(cfg, categories, accelerator)
    trainer = Trainer(
        accelerator, model, common.build_criterion(cfg, model, accelerator), train_loader, settings, run_dir,
        param_groups=common.optimizer_groups(cfg, model), val_loader=val_loader,
        predict_fn=common.detection_predictor(model, categories),
        evaluate_fn=common.lvis_evaluator(cfg.data.val_ann, cfg.data.train_ann),
        categories=categories, config=cfg)
    return trainer.fit()
