"""Options for any classifier head: tau-normalisation of class weights and metric learning.

* Tau-normalisation (Kang et al. 2020, the BAGS paper's baseline): every class weight row w_j becomes
  w_j / ||w_j||^tau, biases untouched; tau = 0 changes nothing, tau = 1 gives unit-norm rows
  (``ClassifierHead.tau_normalize_``: by default on ``class_weight_rows()`` when they are a view of a
  parameter, the sigmoid head; grouped heads override it to touch only the class rows).
* Metric learning (hybrid BAGS paper, research option): :class:`MetricLearningHead` wraps any head,
  keeps a centre per class (an EMA of the final-layer query features of the queries matched to it),
  adds a center loss ``loss_center`` on those features, and at inference can replace the class scores
  by a k-NN score over the class centres (``knn``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from stepwise.heads.base import ClassifierHead, matched_labels


# ------------------------------------------------------------------------------------ tau-normalisation
def class_weight_norms(head: ClassifierHead) -> torch.Tensor:
    """(C,) L2 norm of each class's weight row (``head.class_weight_rows()``), float32 on the CPU."""
    return head.class_weight_rows().detach().float().norm(dim=1).cpu()


def tau_normalize_(head: ClassifierHead, tau: float) -> None:
    """Divide each class weight row of ``head`` by its L2 norm ** ``tau``, in place; biases untouched
    (``head.tau_normalize_``; ValueError for a negative tau, TypeError for a head that cannot)."""
    tau = float(tau)
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    head.tau_normalize_(tau)


def classifier_heads(model: nn.Module) -> list[tuple[str, ClassifierHead]]:
    """The outermost classifier heads of ``model`` (a head wrapped by another one is left out), by name."""
    heads: list[tuple[str, ClassifierHead]] = []
    for name, module in model.named_modules():
        if isinstance(module, ClassifierHead) and not any(name.startswith(outer + ".") for outer, _ in heads):
            heads.append((name, module))
    return heads


def tau_normalized(model: nn.Module, tau: float) -> nn.Module:
    """A deep copy of ``model`` with every classifier head tau-normalised (``model`` is left as it is)."""
    model = copy.deepcopy(model)
    heads = classifier_heads(model)
    if not heads:
        raise ValueError(f"{type(model).__name__} has no classifier head to tau-normalise")
    for _, head in heads:
        tau_normalize_(head, tau)
    return model


# ------------------------------------------------------------------------------------- metric learning
class MetricLearningHead(ClassifierHead):
    """Any head plus class centres: center loss while training, optional k-NN scores at inference.

    Centres: (C, D) buffer, EMA of the matched final-layer query features (``layer == ""`` only, so the
    criterion's head owns them); a class's first batch sets its centre to its mean. Distances are mean
    squared differences per feature dimension. ``loss_center`` = sum over matched queries of the distance
    to their (updated, detached) class centre / num_boxes: it pulls features, not centres, so it only acts
    when the decoder trains (with a frozen decoder the centres are plain class means, an NCM classifier).

    k-NN (``knn=True``): the logits become [inner logits (K), -distance to each centre (C)] and
    p_j = objectness x softmax over the ``knn_k`` nearest centres of -distance / ``knn_temperature``
    (0 for the others), where objectness = the inner head's highest class score. Classes never matched
    have no centre and score 0. Only the criterion's (final-layer) copy has centres, and only its scores
    reach post-processing; per-layer copies and encoder proposals keep the inner head's behaviour otherwise.
    """

    CENTER_KEYS = ("centers", "center_count")

    def __init__(self, head: ClassifierHead, in_dim: int, center_weight: float = 0.1, momentum: float = 0.1,
                 knn: bool = False, knn_k: int = 5, knn_temperature: float = 1.0):
        super().__init__()
        if not 0 < momentum <= 1 or knn_k < 1 or knn_temperature <= 0 or center_weight < 0:
            raise ValueError(f"metric_learning: need 0 < momentum <= 1, knn_k >= 1, knn_temperature > 0, "
                             f"center_weight >= 0; got {momentum}, {knn_k}, {knn_temperature}, {center_weight}")
        self.head = head
        self.num_classes = head.num_classes
        self.center_weight, self.momentum = float(center_weight), float(momentum)
        self.knn, self.knn_k, self.knn_temperature = bool(knn), int(knn_k), float(knn_temperature)
        self.register_buffer("centers", torch.zeros(self.num_classes, in_dim))
        self.register_buffer("center_count", torch.zeros(self.num_classes, dtype=torch.long))

    @classmethod
    def from_config(cls, cfg_head, in_dim: int, num_classes: int, head: ClassifierHead | None = None,
                    **context) -> MetricLearningHead:
        """``head`` (built from the same ``cfg_head`` node) wrapped with ``cfg_head.metric_learning``."""
        if head is None:
            raise ValueError("MetricLearningHead.from_config wraps a head: pass head=")
        m = cfg_head.metric_learning
        return cls(head, in_dim, center_weight=float(m.center_weight), momentum=float(m.momentum), knn=bool(m.knn),
                   knn_k=int(m.knn_k), knn_temperature=float(m.knn_temperature))

    @property
    def supports_ignore(self) -> bool:  # type: ignore[override]
        """Whether the inner head honours ``targets[b]["ignore_queries"]`` (the center loss only sees matches)."""
        return self.head.supports_ignore

    @property
    def needs_query_overlaps(self) -> bool:  # type: ignore[override]
        """Whether the inner head reads ``query_gt`` / ``query_iou`` (the targets pass through to it)."""
        return self.head.needs_query_overlaps

    @property
    def num_outputs(self) -> int:  # type: ignore[override]
        return self.head.num_outputs + (self.num_classes if self.knn else 0)

    @property
    def loss_weights(self) -> dict[str, float]:
        return {**self.head.loss_weights, "loss_center": self.center_weight}

    def center_distances(self, features: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., C) mean squared difference to each class centre (+inf without a centre)."""
        f = features.float()
        dist = (f.pow(2).sum(-1, keepdim=True) - 2 * f @ self.centers.t() + self.centers.pow(2).sum(-1))
        dist = dist.clamp_min(0) / f.shape[-1]
        return dist.masked_fill(self.center_count == 0, float("inf"))

    def forward(self, query_features: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., K) inner logits, or (..., K + C) with the negated centre distances in k-NN mode."""
        logits = self.head(query_features)
        if not self.knn:
            return logits
        return torch.cat([logits, -self.center_distances(query_features).to(logits.dtype)], dim=-1)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., K[+C]) -> (..., C) the inner head's scores, or the k-NN scores (see the class docstring)."""
        width = self.head.num_outputs
        if not self.knn:
            return self.head.scores(logits)
        objectness = self.head.scores(logits[..., :width]).amax(-1, keepdim=True)
        closeness = logits[..., width:].float() / self.knn_temperature
        values, index = closeness.topk(min(self.knn_k, self.num_classes), dim=-1)
        share = torch.softmax(values, dim=-1).nan_to_num(0.0)  # no centre at all: 0, not NaN
        return torch.zeros_like(closeness).scatter(-1, index, share) * objectness

    def loss(self, logits, matches, targets, num_boxes, features=None, layer="") -> dict[str, torch.Tensor]:
        """The inner head's losses; on the final layer also ``loss_center`` (and the centre update)."""
        width = self.head.num_outputs
        losses = dict(self.head.loss(logits[..., :width], matches, targets, num_boxes, features=features,
                                     layer=layer))
        if layer == "" and features is not None:
            labels = matched_labels(matches, targets, features.shape[1], fill=self.num_classes,
                                    num_labels=self.num_classes, device=features.device)
            matched = labels < self.num_classes
            feats, classes = features[matched].float(), labels[matched]
            self.update_centers(feats.detach(), classes)
            dist = (feats - self.centers[classes]).pow(2).mean(-1)
            losses["loss_center"] = dist.sum() / num_boxes + features.sum() * 0  # stays a graph node
        return losses

    @torch.no_grad()
    def update_centers(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Move each class's centre toward the mean of its (N, D) ``features`` (EMA); (N,) ``labels``."""
        if labels.numel() == 0:
            return
        labels = labels.to(self.centers.device)
        count = torch.bincount(labels, minlength=self.num_classes)
        sums = torch.zeros_like(self.centers).index_add_(0, labels, features.to(self.centers))
        present = count > 0
        mean = sums[present] / count[present].unsqueeze(1)
        old = self.centers[present]
        first = (self.center_count[present] == 0).unsqueeze(1)
        self.centers[present] = torch.where(first, mean, old + self.momentum * (mean - old))
        self.center_count += count

    def class_weight_rows(self) -> torch.Tensor:
        """The inner head's (C, D) class weight rows."""
        return self.head.class_weight_rows()

    def tau_normalize_(self, tau: float) -> None:
        """Tau-normalise the inner head (the centres are not weights and stay as they are)."""
        self.head.tau_normalize_(tau)

    @property
    def state(self) -> dict[str, Any]:
        return {}  # the inner head's state is saved under its own module name

    def load_state(self, state: dict[str, Any]) -> None:
        if state:  # saved from the plain (unwrapped) head under this module's name
            self.head.load_state(state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Weights saved from the plain head (``<prefix>linear.weight``) belong to ``<prefix>head.``; ones
        # whose shape does not fit are dropped (reported as missing, like any shape mismatch).
        inner = self.head.state_dict()
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if rest in self.CENTER_KEYS or rest.startswith("head."):
                continue
            value = state_dict.pop(key)
            if rest in inner and getattr(value, "shape", None) == inner[rest].shape:
                state_dict[prefix + "head." + rest] = value
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def with_metric_learning(head: ClassifierHead, cfg_head: Any, in_dim: int) -> ClassifierHead:
    """``head`` wrapped in :class:`MetricLearningHead` when ``cfg_head.metric_learning.enabled``; else ``head``."""
    if not bool(cfg_head.metric_learning.enabled):
        return head
    return MetricLearningHead.from_config(cfg_head, in_dim, head.num_classes, head=head)


def with_knn(model: nn.Module, enabled: bool = True) -> nn.Module:
    """A deep copy of ``model`` whose metric-learning heads score by k-NN over class centres.

    Raises:
        ValueError: the model has no metric-learning head, or none of them has a class centre (the model
            was not trained with ``head.metric_learning.enabled=true``).
    """
    model = copy.deepcopy(model)
    heads = [m for m in model.modules() if isinstance(m, MetricLearningHead)]
    if not heads:
        raise ValueError("knn needs a model trained with head.metric_learning.enabled=true (no class centres)")
    if enabled and not any(int(h.center_count.sum()) > 0 for h in heads):
        raise ValueError("knn: the metric-learning heads have no class centre yet (never trained)")
    for head in heads:
        head.knn = enabled
    return model
