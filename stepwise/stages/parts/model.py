"""The detector a training stage trains: :func:`stepwise.models.build_detector` (network, criterion,
post-processing) with the stage's starting weights and trainable parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from accelerate import Accelerator

from stepwise.checkpoint import load_checkpoint, load_model_weights, resolve_checkpoint
from stepwise.config import starting_point
from stepwise.models import Detector, build_detector, freeze_batch_norm, trainable_only


def build_model(cfg: Any, categories: Any, accelerator: Accelerator, init_from: str | None = None,
                reinit: Sequence[str] = ()) -> Detector:
    """The detector (``Detector``: network, criterion, post-processing) with ``init_from`` weights (default
    the stage's starting point, root ``init_from`` else ``stage.init_from``:
    :func:`stepwise.config.starting_point`; report printed) and only the ``stage.trainable`` parameter
    prefixes trainable. The criterion averages ``num_boxes`` over processes by Accelerate.

    ``reinit``: parameter-name prefixes *not* loaded (they keep their fresh initialisation, e.g. a class
    head re-trained from scratch); tensors whose shape differs from the checkpoint's are skipped anyway.
    When the backbone is entirely frozen its BatchNorm layers are frozen too (statistics included), so a
    frozen part of the model stays bitwise unchanged in training mode.
    """
    detector = build_detector(cfg.model, cfg.head, categories, cfg.loss,
                              reduce_fn=lambda t: accelerator.reduce(t, reduction="mean"))
    model = detector.model
    prefixes = cfg.stage.trainable
    if prefixes and not any(p.rstrip(".") == "backbone" or p.startswith("backbone.") for p in prefixes):
        freeze_batch_norm(model.backbone)
    source = init_from if init_from is not None else starting_point(cfg, "init_from")
    if source:
        load_initial_weights(model, source, reinit, accelerator)
    if prefixes:
        names = trainable_only(model, list(prefixes))
        accelerator.print(f"stepwise: training {len(names)} parameter tensors under {list(prefixes)}")
    return detector


def load_initial_weights(model: Any, source: str, reinit: Sequence[str], accelerator: Accelerator) -> None:
    """Load the checkpoint ``source`` (file or run directory) into ``model`` except the ``reinit`` prefixes."""
    state = load_checkpoint(resolve_checkpoint(source))
    if reinit:
        skip = tuple(p.rstrip(".") for p in reinit)
        state["model"] = {k: v for k, v in state["model"].items()
                          if not any(k == p or k.startswith(p + ".") for p in skip)}
        state.pop("head_state", None)
        accelerator.print(f"stepwise: re-initialising {list(skip)} instead of loading them")
    state["__source__"] = str(resolve_checkpoint(source))
    accelerator.print(f"stepwise: init_from {load_model_weights(model, state)}")
