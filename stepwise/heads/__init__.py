"""Classifier heads behind one interface (see base.ClassifierHead); ``build_head`` picks one by name."""

from __future__ import annotations

from stepwise.heads.bacl import BACLHead
from stepwise.heads.base import ClassifierHead
from stepwise.heads.sigmoid import SigmoidFocalHead

HEADS = {"sigmoid": SigmoidFocalHead}
HEADS["bacl"] = BACLHead


def build_head(cfg_head, in_dim: int, num_classes: int, **context) -> ClassifierHead:
    """Build the head named ``cfg_head.name`` reading ``in_dim``-d query features for ``num_classes``.

    ``context`` carries what data-dependent heads need (e.g. ``categories`` for grouped heads).
    """
    name = cfg_head.name
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")
    return HEADS[name].from_config(cfg_head, in_dim, num_classes, **context)


__all__ = ["ClassifierHead", "SigmoidFocalHead", "build_head", "HEADS"]
