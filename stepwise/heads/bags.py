"""Balanced group softmax heads: BAGS (Li et al., CVPR 2020) and hybrid BAGS (Gaba 2025).

Classes are split into N groups by training instance count (see ``grouping``); each group gets an extra
"others" slot, and a background group G0 = {foreground, no-object} decides whether a query is an object.
One linear layer has K = C + N + 2 outputs, laid out as

    [G0: foreground, no-object | G_1: its classes in id order, others | ... | G_N: ..., others]

* Scores (matching and post-processing): p_j = p_fg x softmax over j's group, "others" dropped, in
  class-id order.
* Training, per layer: G0 sees every query (matched: foreground, unmatched: no-object) with a sigmoid
  focal loss (``g0_loss=focal``, default) or DETR's cross-entropy with the no-object term down-weighted by
  ``eos_coef`` (``g0_loss=ce``) — only a handful of 100-300 queries are matched, far more unbalanced than
  a two-stage detector's RoIs. Group n is active when a matched query's class is in it: its positives
  target their class, and ``beta`` x #positives "others" samples are drawn (torch RNG) from the other
  queries (unmatched ones and those matched to classes of other groups): uniformly (``others=uniform``,
  the paper's rule) or other groups' matches first (``others=foreground_first``; with ~3 % of DETR's
  queries matched, uniform draws almost never show a group another group's object, which a two-stage
  detector's 25 %-foreground RoI batches do). A group with no positive gives no loss. Each active group's
  softmax cross-entropy is averaged over its own samples; ``loss_ce`` = G0 loss + the sum over active groups.
* Duplicates (``duplicates``, decoder layers): an unmatched query whose box has IoU >= ``duplicate_iou``
  with a GT box (its best) is a duplicate of that object. Set prediction trains it as no-object, so
  ``others`` (default) treats it as the paper treats a background proposal: an "others" candidate like
  any unmatched query. ``gt_class`` (the rule for a two-stage RoI, which NMS later de-duplicates): a
  positive of its GT's class in the GT's group (and a foreign object, like a matched query, for the
  other groups), G0 keeping it no-object; ``exclude``: left out of the GT's group (neither positive nor
  "others"), an "others" candidate elsewhere. At convergence ``others`` scores best: with no NMS,
  ``gt_class`` teaches the groups to score duplicates high (docs/faithfulness.md). The criterion
  supplies each query's best GT and IoU (``needs_query_overlaps``) for the other two; encoder proposals
  keep the ``others`` rule (class-agnostic, every label 0).
* Two-stage encoder proposals (``layer="enc"``, every label 0): the same rule, so G0 learns
  foreground/no-object and class 0's group learns class 0 vs "others"; the encoder ranks its proposals by
  ``logits[..., 0]``, which is G0's foreground log-odds (see ``forward``).

Hybrid BAGS uses bins from exact k-means on log instance counts and, inside the bins, inverse-frequency
class weights normalised to mean 1 within each bin and/or a softmax focal loss (both optional).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from stepwise.heads.base import ClassifierHead, ignored_queries, matched_labels
from stepwise.heads.grouping import groups_from_edges, groups_from_kmeans

G0_LOSSES = ("focal", "ce")
OTHERS_SAMPLING = ("uniform", "foreground_first")
DUPLICATES = ("gt_class", "exclude", "others")
NUM_G0 = 2  # G0's outputs: foreground, no-object


@dataclass
class GroupSamples:
    """One active group's training samples over the flattened (B*Q) queries.

    Attributes:
        rows: (S,) query indices: the group's positives first, then the sampled "others".
        cols: (S,) target column among the group columns (output index - 2).
        weights: (S,) per-sample loss weight (class weight of positives, 1 for "others").
        num_positive: how many of ``rows`` are positives.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    weights: torch.Tensor
    num_positive: int


def group_layout(class_group: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output columns of the grouped layout (see the module docstring).

    Args:
        class_group: (C,) group index 0..num_groups-1 of each class.
        num_groups: N (groups without classes keep their "others" slot).

    Returns:
        class_output (C,): output column of each class; others_output (N,): output column of each group's
        "others"; output_group (C + N,): group of each column after G0's two.
    """
    class_output = torch.empty_like(class_group)
    others_output = torch.empty(num_groups, dtype=torch.long)
    output_group = torch.empty(len(class_group) + num_groups, dtype=torch.long)
    col = NUM_G0
    for n in range(num_groups):
        members = (class_group == n).nonzero().flatten()  # ascending class index
        class_output[members] = torch.arange(col, col + len(members))
        output_group[col - NUM_G0: col - NUM_G0 + len(members) + 1] = n
        col += len(members)
        others_output[n] = col
        col += 1
    return class_output, others_output, output_group


class GroupSoftmaxHead(ClassifierHead):
    """Balanced group softmax over given class groups (BAGS; hybrid BAGS with class weights / focal).

    Args:
        in_dim: D, the query feature size.
        class_group: (C,) group 0..N-1 of each class (rarest group first).
        num_groups: N; default ``class_group.max() + 1``.
        beta: "others" samples per positive in each active group (BAGS: 8).
        others: how they are drawn: ``uniform`` over the candidates, or ``foreground_first`` (queries matched
            to other groups' classes before unmatched ones, each set in random order).
        g0_loss: ``focal`` (sigmoid focal on the foreground log-odds, summed / num_boxes) or ``ce``
            (DETR's weighted cross-entropy: no-object weight ``eos_coef``, mean over the weights).
        g0_alpha, g0_gamma: the G0 focal loss's alpha and gamma.
        eos_coef: the no-object weight of ``g0_loss=ce``.
        prior_prob: initial foreground probability p_fg (G0's bias), as the sigmoid head's prior.
        class_weight: (C,) loss weight of each class as a positive in its group (default all 1).
        focal_gamma: > 0 turns each group's cross-entropy into softmax focal loss (1 - p_t)^gamma CE.
        duplicates: what an unmatched query on an object (IoU >= ``duplicate_iou`` with a GT box) is inside
            the groups: ``others`` | ``gt_class`` | ``exclude`` (see the module docstring).
    """

    supports_ignore = True  # honours targets[b]["ignore_queries"]: such queries get no loss at all

    def __init__(self, in_dim: int, class_group: torch.Tensor | Sequence[int], num_groups: int | None = None,
                 beta: float = 8.0, others: str = "uniform", g0_loss: str = "focal", g0_alpha: float = 0.25, g0_gamma: float = 2.0,
                 eos_coef: float = 0.1, prior_prob: float = 0.01,
                 class_weight: torch.Tensor | Sequence[float] | None = None, focal_gamma: float = 0.0,
                 duplicates: str = "others", duplicate_iou: float = 0.5):
        super().__init__()
        class_group = torch.as_tensor(class_group, dtype=torch.long)
        num_groups = int(class_group.max()) + 1 if num_groups is None else int(num_groups)
        if class_group.dim() != 1 or len(class_group) < 1 or class_group.min() < 0 or class_group.max() >= num_groups:
            raise ValueError(f"class_group must be a (C,) tensor of group indices in [0, {num_groups})")
        if others not in OTHERS_SAMPLING:
            raise ValueError(f"others must be one of {OTHERS_SAMPLING}, got {others!r}")
        if g0_loss not in G0_LOSSES:
            raise ValueError(f"g0_loss must be one of {G0_LOSSES}, got {g0_loss!r}")
        if duplicates not in DUPLICATES:
            raise ValueError(f"duplicates must be one of {DUPLICATES}, got {duplicates!r}")
        if not 0 < duplicate_iou <= 1:
            raise ValueError(f"duplicate_iou must be in (0, 1], got {duplicate_iou}")
        if beta < 0 or not 0 < prior_prob < 1 or focal_gamma < 0 or eos_coef <= 0:
            raise ValueError(f"need beta >= 0, 0 < prior_prob < 1, focal_gamma >= 0, eos_coef > 0; got beta={beta}, "
                             f"prior_prob={prior_prob}, focal_gamma={focal_gamma}, eos_coef={eos_coef}")
        self.num_classes = len(class_group)
        self.num_groups = num_groups
        self.num_outputs = self.num_classes + num_groups + NUM_G0
        self.others, self.duplicates, self.duplicate_iou = others, duplicates, float(duplicate_iou)
        self.beta, self.g0_loss, self.g0_alpha, self.g0_gamma = float(beta), g0_loss, g0_alpha, g0_gamma
        self.eos_coef, self.prior_prob, self.focal_gamma = float(eos_coef), float(prior_prob), float(focal_gamma)
        weight = torch.ones(self.num_classes) if class_weight is None else torch.as_tensor(class_weight).float()
        if weight.shape != (self.num_classes,) or (weight < 0).any():
            raise ValueError(f"class_weight must be {self.num_classes} non-negative numbers")
        class_output, others_output, output_group = group_layout(class_group, num_groups)
        # Derived from the training annotations: buffers, so every checkpoint carries the grouping.
        self.register_buffer("class_group", class_group)
        self.register_buffer("class_output", class_output)
        self.register_buffer("others_output", others_output)
        self.register_buffer("output_group", output_group)
        self.register_buffer("class_weight", weight)
        self.linear = nn.Linear(in_dim, self.num_outputs)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg_head, in_dim: int, num_classes: int, categories: Any = None,
                    **context) -> GroupSoftmaxHead:
        """Groups by the fixed instance-count ``edges`` (BAGS) of the training ``categories``."""
        edges = [float(e) for e in cfg_head.edges]
        groups = groups_from_edges(instance_counts(categories, num_classes, "bags"), edges)
        return cls(in_dim, groups, num_groups=len(edges) + 1, **_common_options(cfg_head))

    @property
    def needs_query_overlaps(self) -> bool:
        """The criterion adds each query's best GT and IoU to the targets (the duplicate rule needs them)."""
        return self.duplicates != "others"

    def reset_parameters(self) -> None:
        """nn.Linear's default weights; biases 0 except G0's, which starts p_fg at ``prior_prob``."""
        self.linear.reset_parameters()
        nn.init.zeros_(self.linear.bias)
        with torch.no_grad():
            self.linear.bias[0] = -math.log((1 - self.prior_prob) / self.prior_prob)

    # ------------------------------------------------------------------------------------- inference
    def forward(self, query_features: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., K) logits. G0's pair (z_fg, z_no) is returned as (z_fg - z_no, 0): the same
        2-way softmax, with column 0 the foreground log-odds (the two-stage encoder ranks proposals by it)."""
        z = self.linear(query_features)
        log_odds = z[..., :1] - z[..., 1:2]
        return torch.cat([log_odds, torch.zeros_like(log_odds), z[..., NUM_G0:]], dim=-1)

    def foreground_log_odds(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (...,) log p_fg - log p_no-object of G0's softmax."""
        logits = _upcast(logits)
        return logits[..., 0] - logits[..., 1]

    def group_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., C + N) log-softmax of each class/"others" column within its own group."""
        z = _upcast(logits[..., NUM_G0:])
        index = self.output_group.expand_as(z)
        shape = (*z.shape[:-1], self.num_groups)
        peak = z.new_full(shape, -math.inf).scatter_reduce(-1, index, z.detach(), "amax")
        shifted = z - peak.index_select(-1, self.output_group)
        total = z.new_zeros(shape).scatter_add(-1, index, shifted.exp())
        return shifted - total.log().index_select(-1, self.output_group)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., K) logits -> (..., C) p_fg(G0) x p_j(softmax in j's group), "others" dropped, class order."""
        p_fg = torch.sigmoid(self.foreground_log_odds(logits))
        p_class = self.group_log_probs(logits).index_select(-1, self.class_output - NUM_G0).exp()
        return p_fg.unsqueeze(-1) * p_class

    def class_weight_rows(self) -> torch.Tensor:
        """(C, D) the class rows of the linear layer, in class order (G0 and "others" rows left out)."""
        return self.linear.weight[self.class_output]

    @torch.no_grad()
    def tau_normalize_(self, tau: float) -> None:
        """Divide each class row by its L2 norm ** tau in place; biases, G0 and "others" rows untouched."""
        rows = self.linear.weight[self.class_output]
        self.linear.weight[self.class_output] = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(tau)

    # -------------------------------------------------------------------------------------- training
    def sample_groups(self, labels: torch.Tensor, valid: torch.Tensor,
                      duplicate: torch.Tensor | None = None) -> list[GroupSamples | None]:
        """Training samples of every group over flattened queries (None for an inactive group).

        Args:
            labels: (M,) long matched class per query, C for unmatched (no-object).
            valid: (M,) bool, False for queries left out of every loss (matched to an "ignore" box).
            duplicate: (M,) long class of the GT an unmatched query duplicates (IoU >= ``duplicate_iou``), C
                for none; None: no duplicates (the ``others`` rule).

        Positives of group n: the queries of its classes (matched ones, and with ``duplicates="gt_class"``
        the duplicates of its objects too). "Others" candidates of group n: valid queries that are not its
        positives (with ``duplicates="exclude"``, not the duplicates of its objects either).
        ``floor(beta * P_n)`` of them are drawn without replacement with the torch RNG of ``labels``' device
        (all of them when there are fewer): uniformly, or with ``others="foreground_first"`` the queries on
        an object (other groups' matches, and their duplicates under ``gt_class``) before any other one.
        """
        c = self.num_classes
        if duplicate is not None and self.duplicates == "gt_class":
            labels = torch.where(labels < c, labels, duplicate)  # a duplicate takes its GT's class
        matched = (labels < c) & valid
        group = torch.where(matched, self.class_group[labels.clamp(max=c - 1)], -1)
        excluded = None
        if duplicate is not None and self.duplicates == "exclude":
            excluded = torch.where((duplicate < c) & valid, self.class_group[duplicate.clamp(max=c - 1)], -1)
        positives = torch.bincount(group[matched], minlength=self.num_groups).tolist()
        num_valid = int(valid.sum())
        out: list[GroupSamples | None] = []
        for n, num_pos in enumerate(positives):
            if num_pos == 0:
                out.append(None)
                continue
            is_pos = group == n
            pos_rows = is_pos.nonzero().flatten()
            candidates = valid & ~is_pos
            if excluded is not None:
                candidates = candidates & (excluded != n)
            num_candidates = num_valid - num_pos if excluded is None else int(candidates.sum())
            num_others = min(int(self.beta * num_pos), num_candidates)
            if num_others == num_candidates:
                other_rows = candidates.nonzero().flatten()
            else:
                keys = torch.rand(labels.shape, device=labels.device).masked_fill(~candidates, 2.0)
                if self.others == "foreground_first":
                    keys = keys - (matched & candidates).float()  # in [-1, 0): drawn before every unmatched query
                other_rows = keys.topk(num_others, largest=False).indices.sort().values
            pos_labels = labels[pos_rows]
            cols = torch.cat([self.class_output[pos_labels],
                              self.others_output[n].expand(len(other_rows))]) - NUM_G0
            weights = torch.cat([self.class_weight[pos_labels], self.class_weight.new_ones(len(other_rows))])
            out.append(GroupSamples(torch.cat([pos_rows, other_rows]), cols, weights, num_pos))
        return out

    def duplicate_labels(self, targets: list[dict[str, torch.Tensor]], labels: torch.Tensor) -> torch.Tensor | None:
        """(B, Q) long: for an unmatched query with IoU >= ``duplicate_iou`` with a GT box (its best one, from
        the criterion's ``query_gt`` / ``query_iou``), that GT's class; C elsewhere. None under the ``others``
        rule or without overlaps in the targets (encoder proposals, a criterion that supplies none)."""
        if self.duplicates == "others" or not all("query_iou" in t for t in targets):
            return None
        out = torch.full_like(labels, self.num_classes)
        for b, target in enumerate(targets):
            iou, best = target["query_iou"].to(labels.device), target["query_gt"].to(labels.device)
            hit = (iou >= self.duplicate_iou) & (best >= 0) & (labels[b] == self.num_classes)
            gt_labels = target["labels"].to(labels.device)
            out[b, hit] = gt_labels[best[hit]]
        return out

    def loss(self, logits, matches, targets, num_boxes, features=None, layer="") -> dict[str, torch.Tensor]:
        """``loss_ce`` = G0 loss + sum over active groups of their sample-averaged softmax CE (or focal).

        Args:
            logits: (B, Q, K) of one layer; matches/targets/num_boxes as in ``ClassifierHead.loss``.
        """
        batch, queries, width = logits.shape
        if width != self.num_outputs:
            raise ValueError(f"{type(self).__name__}: logits have {width} columns, expected {self.num_outputs} "
                             f"(C={self.num_classes} + N={self.num_groups} + 2)")
        labels = matched_labels(matches, targets, queries, fill=self.num_classes, num_labels=self.num_classes,
                                device=logits.device)
        valid = ~ignored_queries(targets, batch, queries, logits.device)
        loss = self.g0_loss_value(self.foreground_log_odds(logits), labels < self.num_classes, valid, num_boxes)
        log_probs = self.group_log_probs(logits).flatten(0, -2)
        duplicate = self.duplicate_labels(targets, labels) if layer != "enc" else None
        for samples in self.sample_groups(labels.flatten(), valid.flatten(),
                                          None if duplicate is None else duplicate.flatten()):
            if samples is None:
                continue  # no positive in the batch: the group gives no loss
            log_p = log_probs[samples.rows, samples.cols]
            per_sample = -log_p
            if self.focal_gamma > 0:
                per_sample = per_sample * (1 - log_p.exp()).pow(self.focal_gamma)
            loss = loss + (samples.weights * per_sample).sum() / len(samples.rows)
        return {"loss_ce": loss}

    def g0_loss_value(self, log_odds: torch.Tensor, foreground: torch.Tensor, valid: torch.Tensor,
                      num_boxes: float) -> torch.Tensor:
        """G0's loss from (B, Q) foreground log-odds, (B, Q) bool foreground targets and validity."""
        target = foreground.float()
        if self.g0_loss == "focal":
            per_query = sigmoid_focal_loss(log_odds, target, alpha=self.g0_alpha, gamma=self.g0_gamma,
                                           reduction="none")
            return (per_query * valid).sum() / num_boxes
        # DETR: cross-entropy over (object, no-object) with the no-object class weighted by eos_coef.
        weight = torch.where(foreground, 1.0, self.eos_coef) * valid
        per_query = F.binary_cross_entropy_with_logits(log_odds, target, reduction="none")
        return (weight * per_query).sum() / weight.sum().clamp_min(1e-12)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the softmaxes and losses (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def instance_counts(categories: Any, num_classes: int, head: str) -> list[int]:
    """The training instance counts of the build context's ``categories`` (a clear error without them)."""
    counts = getattr(categories, "instance_counts", None)
    if counts is None:
        raise ValueError(f"head={head} groups classes by training instance count: build it with the training "
                         f"categories (build_head(..., categories=CategoryMap))")
    if len(counts) != num_classes:
        raise ValueError(f"head={head}: {len(counts)} category counts for {num_classes} classes")
    return [int(c) for c in counts]


def _common_options(cfg_head) -> dict[str, Any]:
    # configs saved before ``others`` / ``duplicates`` existed (checkpoints, study plans) drew "others"
    # uniformly and treated every unmatched query as a candidate "others"
    return {"beta": float(cfg_head.beta), "others": str(cfg_head.get("others", "uniform")),
            "g0_loss": str(cfg_head.g0_loss), "g0_alpha": float(cfg_head.g0_alpha),
            "g0_gamma": float(cfg_head.g0_gamma), "eos_coef": float(cfg_head.eos_coef),
            "prior_prob": float(cfg_head.prior_prob), "duplicates": str(cfg_head.get("duplicates", "others")),
            "duplicate_iou": float(cfg_head.get("duplicate_iou", 0.5))}


class BAGSHead(GroupSoftmaxHead):
    """BAGS: groups by fixed instance-count ``head.edges`` (10, 100, 1000 -> 4 groups; the inherited
    ``from_config``)."""


class HybridBAGSHead(GroupSoftmaxHead):
    """Hybrid BAGS: bins from k-means on log instance counts; class weights and/or focal loss in bins."""

    @classmethod
    def from_config(cls, cfg_head, in_dim: int, num_classes: int, categories: Any = None,
                    **context) -> HybridBAGSHead:
        counts = instance_counts(categories, num_classes, "hybrid_bags")
        bins = groups_from_kmeans(counts, int(cfg_head.num_bins))
        weight = None
        if bool(cfg_head.class_weights):
            weight = bin_class_weights(counts, bins, float(cfg_head.class_weight_power))
        return cls(in_dim, bins, class_weight=weight, focal_gamma=float(cfg_head.focal_gamma),
                   **_common_options(cfg_head))


def bin_class_weights(instance_counts: Sequence[int], bins: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """(C,) inverse-frequency weights max(count, 1) ** -power, scaled to mean 1 within each bin."""
    raw = torch.tensor([max(int(c), 1) for c in instance_counts], dtype=torch.float64).pow(-power)
    num_bins = int(bins.max()) + 1
    mean = torch.zeros(num_bins, dtype=torch.float64).index_add(0, bins, raw) / torch.bincount(bins, minlength=num_bins)
    return (raw / mean[bins]).float()
