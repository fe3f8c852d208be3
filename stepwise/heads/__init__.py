"""Classifier heads behind one interface (see base.ClassifierHead); ``build_head`` picks one by name."""

from __future__ import annotations

from stepwise.heads.bacl import BACLHead
from stepwise.heads.bags import BAGSHead, HybridBAGSHead
from stepwise.heads.base import ClassifierHead
from stepwise.heads.inference import MetricLearningHead, with_metric_learning
from stepwise.heads.sigmoid import SigmoidFocalHead

HEADS: dict[str, type[ClassifierHead]] = {
    "sigmoid": SigmoidFocalHead,
    "bags": BAGSHead,
    "hybrid_bags": HybridBAGSHead,
    "bacl": BACLHead,
}


def build_head(cfg_head, in_dim: int, num_classes: int, **context) -> ClassifierHead:
    """Build the head named ``cfg_head.name`` reading ``in_dim``-d query features for ``num_classes``.

    ``context`` carries what data-dependent heads need (e.g. ``categories`` for grouped heads). With
    ``cfg_head.metric_learning.enabled`` the head is wrapped in ``MetricLearningHead`` (any head).
    """
    name = cfg_head.name
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")
    head = HEADS[name].from_config(cfg_head, in_dim, num_classes, **context)
    return with_metric_learning(head, cfg_head, in_dim)


__all__ = ["HEADS", "BAGSHead", "ClassifierHead", "HybridBAGSHead", "MetricLearningHead", "SigmoidFocalHead",
           "build_head"]
