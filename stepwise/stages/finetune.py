"""Step 2, ``stage=finetune``: the head-class expert. Starts from the pretrained model (``stage.init_from``),
trains only ``stage.trainable`` (``input_proj`` and every class head) on the replay set ``stage.train_ann``
(D_head) with step-wise RFS inside it, evaluates, and writes ``runs/<exp>/finetune/`` like pretrain.

With ``stage.train_ann='${data.train_ann}' stage.trainable=[class_embed] stage.reinit=[class_embed]`` the
same stage is the decoupled classifier re-training of the BAGS paper (any ``head=``).

:func:`run_replay_stage` is shared with ``stage=distill``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from stepwise.engine import Trainer, TrainSettings, make_accelerator
from stepwise.stages import common


def full_categories(cfg: Any) -> Any:
    """The category map of the full training file ``data.train_ann``: a replay set holds a subset of the
    annotations, but class frequencies, counts (grouped heads, RFS bins, AP1..AP4) describe the data set."""
    from stepwise.data.categories import CategoryMap
    from stepwise.utils.io import read_json

    data = read_json(cfg.data.train_ann, "training annotation file")
    return CategoryMap.from_annotations(data, source=f"annotation file {cfg.data.train_ann}")


def run_replay_stage(cfg: Any, make_criterion: Callable[..., Any] | None = None,
                     make_forward: Callable[..., Any] | None = None) -> dict[str, Any] | None:
    """Train on ``stage.train_ann`` from ``stage.init_from`` (root ``init_from`` wins) and evaluate.

    ``make_criterion(cfg, model, base_criterion, accelerator)`` and ``make_forward(cfg, model, accelerator)``
    let ``stage=distill`` add the teacher; by default the set criterion and the plain forward are used.
    """
    from stepwise.data import build_dataset
    from stepwise.engine import detection_forward

    settings = TrainSettings.from_config(cfg)
    run_dir = Path(cfg.run_dir)
    accelerator = make_accelerator(settings, run_dir)
    common.ensure_data(cfg, accelerator)
    categories = full_categories(cfg)
    train_ds = build_dataset(cfg.data, "train", ann_file=str(cfg.stage.train_ann), categories=categories)
    val_ds = build_dataset(cfg.data, "val", categories=categories)
    accelerator.print(f"stepwise: {cfg.stage.name} on {cfg.stage.train_ann}: {len(train_ds)} images, "
                      f"RFS threshold {cfg.stage.rfs_threshold}")
    train_loader, val_loader = common.build_loaders(cfg, train_ds, val_ds, rfs_threshold=cfg.stage.rfs_threshold)
    init_from = cfg.get("init_from") or cfg.stage.init_from
    model = common.build_model(cfg, categories, accelerator, init_from=str(init_from),
                               reinit=list(cfg.stage.get("reinit") or ()))
    criterion = common.build_criterion(cfg, model, accelerator)
    if make_criterion is not None:
        criterion = make_criterion(cfg, model, criterion, accelerator, categories)
    forward = make_forward(cfg, model, accelerator) if make_forward is not None else detection_forward
    trainer = Trainer(
        accelerator, model, criterion, train_loader, settings, run_dir,
        param_groups=common.optimizer_groups(cfg, model), val_loader=val_loader,
        predict_fn=common.detection_predictor(model, categories),
        evaluate_fn=common.lvis_evaluator(cfg.data.val_ann, cfg.data.train_ann),
        forward_fn=forward, categories=categories, config=cfg)
    return trainer.fit()


def run(cfg: Any) -> dict[str, Any] | None:
    """Fine-tune and evaluate; returns the final val metrics."""
    return run_replay_stage(cfg)
