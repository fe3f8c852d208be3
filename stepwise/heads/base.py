"""The classifier-head interface the detector, matcher, criterion and post-processing talk to.

Contract (every head — sigmoid, BAGS, hybrid BAGS, BACL — honours it; nothing outside a head assumes
sigmoid logits):

* ``logits = head(query_features)``: (..., D) -> (..., K). K (``num_outputs``) is the head's own logit
  width: C for sigmoid, C + N + 2 for BAGS, C + 1 for BACL. Only the head interprets these logits.
* ``scores = head.scores(logits)``: (..., K) -> (..., C) class probabilities in [0, 1], one column per
  contiguous class index in class order, with no background/"others" column. Both the Hungarian matcher
  (focal-form class cost) and post-processing (top-k over queries x classes) use exactly these scores, so
  matching and inference agree for every head.
* ``head.loss(logits, matches, targets, num_boxes)``: named, **unweighted** classification losses for one
  layer's (B, Q, K) logits. ``matches[b] = (query_idx, target_idx)``, long tensors (on the CPU, from the
  matcher); ``targets[b]["labels"]`` (T_b,) contiguous class indices. Losses are normalised by
  ``num_boxes`` (the mean number of GT boxes per process, already all-reduced, >= 1) and must stay
  connected to ``logits`` even when nothing is matched. The main classification loss is ``"loss_ce"``
  (weighted by the config's ``loss.ce``); any other key the head returns must appear in
  ``head.loss_weights``. The criterion adds the per-layer suffix (``_0``, ``_enc``) itself.
* The criterion holds the final decoder layer's head and calls *its* ``loss`` for every layer's logits
  (with ``features=``/``layer=``), so that head instance is the single owner of any statistics; the
  per-layer copies only map features to logits.
* ``HeadClass.from_config(cfg_head, in_dim, num_classes, **context)`` builds a head from its ``configs/head``
  node (``context``: ``categories`` for heads that need the training counts); ``stepwise.heads.HEADS`` names it.

Optional capabilities, each declared here with a default body (a head overrides what it supports):

* ``supports_ignore`` (False): the head honours ``targets[b]["ignore_queries"]`` (:func:`ignored_queries`),
  leaving queries matched to "ignore" boxes out of every loss term;
* ``needs_query_overlaps`` (False): for the decoder layers the criterion adds ``targets[b]["query_gt"]``
  (Q,) long, each query's best-overlapping GT box (-1 when the image has none), and
  ``targets[b]["query_iou"]`` (Q,) its IoU (BAGS's duplicate rule: an unmatched query on an object);
* ``loss_weights`` ({}): weights of the losses it returns besides ``loss_ce``;
* ``class_logits(logits)``: (..., K) -> (..., C) per-class logits (what a softmax over classes reads);
* ``class_weight_rows()`` / ``tau_normalize_(tau)``: the (C, D) class weight rows, and their
  tau-normalisation in place;
* ``state`` / ``load_state`` ({} / refuses any key): statistics outside the parameters (BACL's indicators,
  FHM) that a checkpoint must carry as ``head_state``. They are plain tensors, not registered buffers, on
  purpose: DDP broadcasts every buffer from rank 0 before each forward (LVIS: 1203 x 1203 float64 per head
  copy), and the per-layer copies would put them into every checkpoint's weights.

``tests/test_head_contract.py`` checks every registered head against this contract.

The two-stage encoder proposals are class-agnostic: the criterion calls ``scores``/``loss`` on the
encoder logits with every label set to 0, so a head must accept any label < K there.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any

import torch
from torch import nn


class ClassifierHead(nn.Module, metaclass=ABCMeta):
    """Maps decoder query features to logits, logits to class scores, and (logits, matches) to losses.

    Subclasses implement ``from_config``, ``forward``, ``scores`` and ``loss`` (instantiating one that does
    not raises ``TypeError``); ``num_classes`` is C and ``num_outputs`` is K, the logit width.
    """

    num_classes: int
    num_outputs: int
    supports_ignore: bool = False
    needs_query_overlaps: bool = False

    @classmethod
    @abstractmethod
    def from_config(cls, cfg_head: Any, in_dim: int, num_classes: int, **context: Any) -> ClassifierHead:
        """The head of a ``configs/head/*.yaml`` node for ``in_dim``-d query features and C classes."""

    @abstractmethod
    def forward(self, query_features: torch.Tensor) -> torch.Tensor:
        """(..., D) query features -> (..., K) logits."""

    @abstractmethod
    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., K) logits -> (..., C) class scores in [0, 1], used by matching and post-processing."""

    @abstractmethod
    def loss(
        self,
        logits: torch.Tensor,
        matches: list[tuple[torch.Tensor, torch.Tensor]],
        targets: list[dict[str, torch.Tensor]],
        num_boxes: float,
        features: torch.Tensor | None = None,
        layer: str = "",
    ) -> dict[str, torch.Tensor]:
        """Named, unweighted classification losses for one layer's (B, Q, K) logits.

        ``matches[b] = (query_idx, target_idx)`` from the matcher; ``targets[b]["labels"]`` are contiguous.
        ``features`` (B, Q, D): the query features the logits were computed from (None for the two-stage
        encoder proposals), for heads that learn from features (BACL's FHM, center loss). ``layer``: which
        layer this is, as the loss-name suffix: "" the final decoder layer, "0".."L-2" the earlier ones,
        "enc" the encoder proposals; a head that keeps running statistics updates them once per step
        (on ``layer == ""``).
        Returns at least ``"loss_ce"`` (a scalar tensor); see the module docstring for the full contract.
        """

    @property
    def loss_weights(self) -> dict[str, float]:
        """Weights of the losses this head returns besides ``"loss_ce"`` (e.g. an auxiliary term); none."""
        return {}

    @property
    def state(self) -> dict[str, Any]:
        """Statistics the head keeps outside its parameters (checkpointed); empty by default."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what ``state`` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but got keys {sorted(state)}")

    def class_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., C) per-class logits: the logits themselves when K == C, else log of the scores."""
        if logits.shape[-1] == self.num_classes:
            return logits
        return self.scores(logits).clamp_min(1e-12).log()

    def class_weight_rows(self) -> torch.Tensor:
        """(C, D) the classifier weight row of each class, in class order (weight-norm plots, tau-norm).

        Default: the weight of a ``linear`` layer whose outputs are exactly the C class logits (the sigmoid
        head), returned as the parameter itself; any other head must override this.
        """
        linear = getattr(self, "linear", None)
        if isinstance(linear, nn.Linear) and linear.out_features == self.num_classes == self.num_outputs:
            return linear.weight
        raise NotImplementedError(f"{type(self).__name__} does not expose per-class weight rows: implement "
                                  f"class_weight_rows() -> (C, D) on it")

    @torch.no_grad()
    def tau_normalize_(self, tau: float) -> None:
        """Divide each class weight row by its L2 norm ** ``tau`` in place (biases untouched).

        Default: on ``class_weight_rows()`` when they are a view of one of the head's parameters; a head
        whose rows are not (a copy) must override this, else TypeError.
        """
        rows = self.class_weight_rows()
        storages = {p.untyped_storage().data_ptr() for p in self.parameters()}
        if rows.untyped_storage().data_ptr() not in storages:
            raise TypeError(f"{type(self).__name__}: class_weight_rows() is not a view of a parameter; implement "
                            f"tau_normalize_(tau) on the head to support tau-normalisation")
        rows.div_(rows.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(tau))


def matched_labels(
    matches: list[tuple[torch.Tensor, torch.Tensor]],
    targets: list[dict[str, torch.Tensor]],
    num_queries: int,
    fill: int,
    num_labels: int,
    device: torch.device,
) -> torch.Tensor:
    """(B, Q) long tensor: the matched target's label for each query, ``fill`` for unmatched queries.

    Helper for heads' losses. Raises ValueError naming the image when a label is outside [0, num_labels).
    """
    out = torch.full((len(targets), num_queries), fill, dtype=torch.long, device=device)
    for b, ((query_idx, target_idx), target) in enumerate(zip(matches, targets)):
        labels = target["labels"][target_idx.to(target["labels"].device)]
        bad = labels[(labels < 0) | (labels >= num_labels)]
        if bad.numel():
            image = target.get("image_id", b)
            raise ValueError(f"image {_as_int(image)}: label {bad[0].item()} outside the head's "
                             f"{num_labels} classes")
        out[b, query_idx.to(device)] = labels.to(device)
    return out


def ignored_queries(targets: list[dict[str, Any]], batch: int, queries: int, device: torch.device) -> torch.Tensor:
    """(B, Q) bool: the queries the criterion marked ``ignore_queries`` (matched to "ignore" boxes), which a
    head with ``supports_ignore`` leaves out of every loss term."""
    out = torch.zeros(batch, queries, dtype=torch.bool, device=device)
    for b, target in enumerate(targets):
        if "ignore_queries" in target:
            out[b] = target["ignore_queries"].to(device=device, dtype=torch.bool)
    return out


def _as_int(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
