"""BACL's classifier head (Qi et al., "Balanced Classification", section III): C foreground sigmoid logits
plus a background logit, the foreground classification balance loss (FCBL) and the feature hallucination
module (FHM).

Logits (..., C + 1): columns 0..C-1 the foreground classes in class order, column C the background.
Scores (Eq. 5): (1 - p_bg) * p_j with p = sigmoid.

Loss of the decoder layers (summed over queries, divided by ``num_boxes``, or with ``normalize="queries"`` by
the number of queries considered):

* a matched query of class i (Eq. 6-9), FCBL:
  -log p_i - log(1 - p_bg) - sum_{j != i} w_j log(1 - sigmoid(z_j + delta_ij)),
  delta_ij = alpha * log(l_j / l_i) from the long-term indicator (see ``indicators.py``),
  w_j = 1 where s_j >= s_i or s_j >= threshold, else 0, with s the short-term indicators: the scores of
  Eq. 5, (1 - p_bg) * sigmoid(z), not margin-adjusted (``weight_prob: sigmoid`` compares raw sigmoids);
  the weights are constants (no gradient). With ``fg_gamma`` > 0 every term gets a focal factor:
  -(1 - p_i)^g log p_i - p_bg^g log(1 - p_bg) - sum_j w_j p'_j^g log(1 - p'_j), p'_j = sigmoid(z_j + delta_ij).
* an unmatched query (``unmatched="eq2"``, the paper's section D: "the loss of background proposals remains
  to be calculated by Eq. (2)"): the background channel says background and every foreground channel says
  no, -log p_bg - sum_j log(1 - p_j); with ``bg_gamma`` > 0 each term gets a focal factor,
  -(1 - p_bg)^gamma log p_bg - sum_j p_j^gamma log(1 - p_j). ``unmatched="background"`` trains only the
  background channel, -(1 - p_bg)^gamma log p_bg (an option: foreground sigmoids are then never pushed down
  by the ~Q unmatched queries of a set-prediction detector).

Why the focal factors (the default, ``bg_gamma = fg_gamma = 2``): the paper's Faster R-CNN averages these
BCE terms over a 512-RoI batch that is up to 25 % foreground (the public ``FCBL`` divides by the RoI count).
Here ~97 of 100 queries are unmatched, the sum is divided by the ~3 GT boxes of an image, and every decoder
layer adds its copy: as plain BCE the classification terms send the trunk 14-16x the gradient the boxes
send (sigmoid focal: 0.8x; ``python -m stepwise.analysis.grad_balance``, docs/study.md "Gradient balance").
The focal factors keep every term and its target and take the easy ones out, as Deformable DETR's sigmoid
focal loss does for the same reason: 3.5-3.7x, and 19.3 AP against 7.9 after 450 steps (small preset, two
seeds). ``normalize="queries"`` (the RoI count's counterpart, a mean over the queries considered) balances
the gradient but starves classification (10.0 AP); ``head=bacl_plain`` is the plain-BCE form with
stepwise's earlier settings, the recorded rows' head.

Initialisation: the public code puts every channel, background included, at probability 0.001 and trains
with SGD, which moves a bias by lr x gradient and leaves that point within a few iterations. Under AdamW a
bias moves at most ~lr per step (5e-4 here: 0.2 over 450 steps), so p_bg = 0.001 stays an offset the
features must undo on ~97 % of the queries (7.4 AP, classification / boxes trunk gradient 5.5x). The
default starts p_bg at 0.99, the background's share of the queries, and the foreground channels at
Deformable DETR's 0.01 (15.9 / 17.5 AP with the public 0.001, 19.4 / 19.2 with 0.01, two seeds);
``prior_prob=0.001 bg_prior_prob=0.001`` is the public code's.

Encoder proposals (``layer == "enc"``, every label 0) get a class-agnostic objectness loss instead: the
two-stage transformer ranks proposals by the raw logit 0 and the matcher scores them with
(1 - p_bg) * p_0, so both channel 0 and the background channel learn "object": sigmoid focal loss
(alpha 0.25, gamma 2, as Deformable DETR's) of z_0 and of -z_bg against matched = 1.

Only the head instance whose ``loss`` gets ``layer == ""`` in training mode (the criterion's, i.e. the
final decoder layer's) updates statistics, once per step and in this order (the paper's Algorithm 1):
FHM statistics from the matched final-layer query features; c classes drawn and m features each
synthesised; the indicators updated from the matched queries' and the synthetic features' logits; then
the losses with the updated indicators. The synthetic features are classified by this head's linear layer
and trained with FCBL as ``loss_fhm``, the mean over the synthetic samples (so all of them together weigh
as much as the step's real matched queries in ``loss_ce``), weighted by ``fhm_weight``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from stepwise.heads.base import ClassifierHead, ignored_queries, matched_labels
from stepwise.heads.fhm import FeatureHallucination
from stepwise.heads.indicators import INDICATORS, LongTermIndicators

WEIGHT_PROBS = ("score", "sigmoid")
UNMATCHED = ("eq2", "background")
NORMALIZERS = ("num_boxes", "queries")
# Values a config saved before a key existed computed with (from_config fills them in for such configs).
OLD_BEHAVIOUR = {"fg_gamma": 0.0, "normalize": "num_boxes", "unseen_rows": "uniform"}
ENC_ALPHA, ENC_GAMMA = 0.25, 2.0  # objectness focal loss of the encoder proposals (Deformable DETR's)


def fcbl_weights(fg_logits: torch.Tensor, bg_logit: torch.Tensor, labels: torch.Tensor, threshold: float,
                 weight_prob: str = "score") -> torch.Tensor:
    """(N, C) auto-adjusted weights w_j (Eq. 9), 0 on the ground-truth column, no gradient.

    ``fg_logits`` (N, C), ``bg_logit`` (N,), ``labels`` (N,). ``weight_prob="score"`` compares the
    short-term indicators (1 - p_bg) * p_j (the paper); ``"sigmoid"`` compares the raw p_j.
    """
    with torch.no_grad():
        prob = fg_logits.float().sigmoid()
        if weight_prob == "score":
            prob = prob * torch.sigmoid(-bg_logit.float())[:, None]
        p_gt = prob.gather(1, labels[:, None])
        weights = ((prob >= p_gt) | (prob >= threshold)).float()
        weights.scatter_(1, labels[:, None], 0.0)
    return weights


def fcbl(fg_logits: torch.Tensor, bg_logit: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor,
         weights: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """(N,) FCBL per sample (Eq. 6): -log p_i - log(1 - p_bg) - sum_{j != i} w_j log(1 - sigmoid(z_j + delta_ij)).

    ``fg_logits`` (N, C), ``bg_logit`` (N,), ``labels`` (N,), ``margins`` (N, C) delta_ij,
    ``weights`` (N, C) w_j (zero on the ground-truth column). ``gamma`` > 0: each term times its focal
    factor, (1 - p_i)^gamma, p_bg^gamma and sigmoid(z_j + delta_ij)^gamma.
    """
    z = fg_logits.float()
    z_gt = z.gather(1, labels[:, None]).squeeze(1)
    z_bg, shifted = bg_logit.float(), z + margins
    positive = F.softplus(-z_gt)                                       # -log sigmoid(z_i)
    foreground = F.softplus(z_bg)                                      # -log(1 - sigmoid(z_bg))
    negatives = F.softplus(shifted)                                    # -log(1 - sigmoid(z_j + delta_ij))
    if gamma > 0:
        positive = positive * (1 - z_gt.sigmoid()) ** gamma
        foreground = foreground * z_bg.sigmoid() ** gamma
        negatives = negatives * shifted.sigmoid() ** gamma
    return positive + foreground + (weights * negatives).sum(1)


class BACLHead(ClassifierHead):
    """Linear layer to C + 1 logits; scores (1 - p_bg) * p_j; loss FCBL (+ FHM); see the module docstring.

    Args:
        in_dim: D; num_classes: C.
        alpha: margin scale; weight_threshold: p_t of Eq. 9; weight_prob: "score" | "sigmoid".
        indicator: one of ``INDICATORS`` (default the soft confusion matrix).
        image_counts, instance_counts: (C,) training-set counts (needed by the frequency indicators).
        score_momentum: gamma of the mean-score indicator; eps: indicator floor before the log ratio.
        unseen_rows: confusion-matrix rows of classes never seen, "zero" (public code) | "uniform" (1 / C).
        prior_prob: initial foreground-channel probability; bg_prior_prob: initial p_bg (the public code puts
            every channel at 0.001, ``bias_init_with_prob(0.001)``; see the module docstring for why not here).
        unmatched: loss of an unmatched query, "eq2" (every channel) | "background" (background channel only).
        bg_gamma: focal exponent of the unmatched queries' terms (0: plain BCE).
        fg_gamma: focal exponent of the matched queries' FCBL terms (0: plain BCE).
        normalize: "num_boxes" (the criterion's GT box count, as the box losses) | "queries" (the number of
            queries considered in the layer: the paper's mean over RoIs).
        fhm: switch the feature hallucination module on; fhm_classes (c), fhm_per_class (m),
            fhm_momentum (beta), fhm_weight (weight of ``loss_fhm``).
    """

    supports_ignore = True  # queries in targets[b]["ignore_queries"] get no loss at all

    def __init__(self, in_dim: int, num_classes: int, alpha: float = 0.85, weight_threshold: float = 0.7,
                 weight_prob: str = "score", indicator: str = "confusion",
                 image_counts: Any = None, instance_counts: Any = None, score_momentum: float = 0.9,
                 eps: float = 1e-3, unseen_rows: str = "zero", prior_prob: float = 0.01,
                 bg_prior_prob: float = 0.99, unmatched: str = "eq2", bg_gamma: float = 2.0,
                 fg_gamma: float = 2.0, normalize: str = "num_boxes", fhm: bool = True, fhm_classes: int = 8,
                 fhm_per_class: int = 12, fhm_momentum: float = 0.9, fhm_weight: float = 1.0):
        super().__init__()
        if indicator not in INDICATORS:
            raise ValueError(f"unknown BACL indicator {indicator!r}; choose one of {INDICATORS}")
        if weight_prob not in WEIGHT_PROBS:
            raise ValueError(f"unknown weight_prob {weight_prob!r}; choose one of {WEIGHT_PROBS}")
        if unmatched not in UNMATCHED:
            raise ValueError(f"unknown BACL unmatched loss {unmatched!r}; choose one of {UNMATCHED}")
        if normalize not in NORMALIZERS:
            raise ValueError(f"unknown BACL normalize {normalize!r}; choose one of {NORMALIZERS}")
        if bg_gamma < 0 or fg_gamma < 0:
            raise ValueError(f"focal exponents must be >= 0, got bg_gamma={bg_gamma}, fg_gamma={fg_gamma}")
        if indicator in ("image_freq", "instance_freq") and (image_counts is None or instance_counts is None):
            raise ValueError(f"indicator {indicator!r} needs the training set's counts (categories=)")
        self.num_classes, self.num_outputs = num_classes, num_classes + 1
        self.alpha, self.weight_threshold, self.weight_prob = float(alpha), float(weight_threshold), weight_prob
        self.indicator, self.unmatched, self.bg_gamma = indicator, unmatched, float(bg_gamma)
        self.fg_gamma, self.normalize = float(fg_gamma), normalize
        self.prior_prob, self.bg_prior_prob = float(prior_prob), float(bg_prior_prob)
        self.fhm_weight = float(fhm_weight)
        self.linear = nn.Linear(in_dim, num_classes + 1)
        self.indicators = LongTermIndicators(num_classes, image_counts, instance_counts, score_momentum, eps,
                                             unseen_rows)
        self.fhm = FeatureHallucination(num_classes, in_dim, fhm_momentum, fhm_classes, fhm_per_class) if fhm else None
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg_head, in_dim: int, num_classes: int, **context) -> BACLHead:
        categories = context.get("categories")
        counts = ({"image_counts": categories.image_counts, "instance_counts": categories.instance_counts}
                  if categories is not None else {})
        keys = ("alpha", "weight_threshold", "weight_prob", "indicator", "score_momentum", "eps", "unseen_rows",
                "prior_prob", "bg_prior_prob", "unmatched", "bg_gamma", "fg_gamma", "normalize", "fhm", "fhm_classes",
                "fhm_per_class", "fhm_momentum", "fhm_weight")
        options = {k: cfg_head[k] for k in keys if k in cfg_head}
        # a config saved before a key existed (a checkpoint's, a recorded study's) computed the old behaviour
        options.update({k: v for k, v in OLD_BEHAVIOUR.items() if k not in cfg_head})
        return cls(in_dim, num_classes, **options, **counts)

    def reset_parameters(self) -> None:
        """Default linear init with prior-probability biases; every statistic forgotten."""
        self.linear.reset_parameters()
        with torch.no_grad():
            self.linear.bias[:-1].fill_(-math.log((1 - self.prior_prob) / self.prior_prob))
            self.linear.bias[-1].fill_(-math.log((1 - self.bg_prior_prob) / self.bg_prior_prob))
        self.indicators.reset()
        if self.fhm is not None:
            self.fhm.reset()

    # ------------------------------------------------------------------------------------- interface
    def forward(self, query_features: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., C + 1) logits (background last)."""
        return self.linear(query_features)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., C + 1) logits -> (..., C) scores (1 - p_bg) * p_j."""
        return torch.sigmoid(-logits[..., -1:]) * logits[..., :-1].sigmoid()

    def class_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., C + 1) -> (..., C) the foreground logits (what a softmax over classes reads, e.g. the
        step-wise class distillation; the same softmax as the soft confusion matrix)."""
        return logits[..., :-1]

    def class_weight_rows(self) -> torch.Tensor:
        """(C, D) the foreground classes' weight rows (no background row)."""
        return self.linear.weight[:-1]

    @property
    def loss_weights(self) -> dict[str, float]:
        return {"loss_fhm": self.fhm_weight} if self.fhm is not None else {}

    def loss(self, logits, matches, targets, num_boxes, features=None, layer="") -> dict[str, torch.Tensor]:
        """Losses of one layer's (B, Q, C + 1) logits; see the module docstring.

        Returns ``loss_ce`` and, for ``layer == ""`` with FHM on, ``loss_fhm``. ``features`` (B, Q, D):
        the final layer's query features (feed the FHM statistics; detached).
        """
        batch, queries, width = logits.shape
        if width != self.num_outputs:
            raise ValueError(f"BACL head expects {self.num_outputs} logits (C + 1), got {width}")
        labels = matched_labels(matches, targets, queries, fill=-1, num_labels=self.num_classes,
                                device=logits.device)
        keep = ~ignored_queries(targets, batch, queries, logits.device)
        if layer == "enc":
            return {"loss_ce": self._objectness_loss(logits, labels >= 0, keep) / num_boxes}

        self._to(logits.device)
        matched = labels >= 0
        fg_logits, bg_logit, gt = logits[matched][:, :-1], logits[matched][:, -1], labels[matched]
        losses = {}
        if layer == "" and self.fhm is not None:
            losses["loss_fhm"] = logits.sum() * 0.0  # stays connected when nothing is synthesised
        if layer == "" and self.training:
            synthetic = self._hallucinate(features, matched, gt)
            fhm_z, fhm_y = self.linear(synthetic[0]).float(), synthetic[1]
            self.indicators.update(torch.cat([fg_logits.detach().float(), fhm_z[:, :-1].detach()]),
                                   torch.cat([gt, fhm_y]))
            if len(fhm_y):
                losses["loss_fhm"] = self._fcbl(fhm_z[:, :-1], fhm_z[:, -1], fhm_y).mean()

        background = self._unmatched_loss(logits[~matched & keep].float())
        foreground = self._fcbl(fg_logits, bg_logit, gt).sum()
        losses["loss_ce"] = (foreground + background) / self._normalizer(keep, num_boxes)
        return losses

    def _normalizer(self, keep: torch.Tensor, num_boxes: float) -> float:
        """``num_boxes``, or the number of queries the layer's loss considered (``normalize="queries"``)."""
        if self.normalize == "queries":
            return max(float(keep.sum()), 1.0)
        return num_boxes

    # ---------------------------------------------------------------------------------------- pieces
    def margins(self, labels: torch.Tensor) -> torch.Tensor:
        """(N, C) delta_ij = alpha * log(l_j / l_i) for samples of classes ``labels`` (N,)."""
        return self.alpha * self.indicators.log_ratio(self.indicator, labels).to(labels.device)

    def _fcbl(self, fg_logits: torch.Tensor, bg_logit: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N,) FCBL of N foreground samples with this head's margins, weights and ``fg_gamma``."""
        weights = fcbl_weights(fg_logits, bg_logit, labels, self.weight_threshold, self.weight_prob)
        return fcbl(fg_logits, bg_logit, labels, self.margins(labels), weights, self.fg_gamma)

    def _unmatched_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Summed loss of N unmatched queries' (N, C + 1) logits (see the module docstring)."""
        z_bg = logits[:, -1]
        loss = ((1 - z_bg.sigmoid()) ** self.bg_gamma * F.softplus(-z_bg)).sum()  # -(1 - p_bg)^g log p_bg
        if self.unmatched == "eq2":
            z = logits[:, :-1]
            loss = loss + (z.sigmoid() ** self.bg_gamma * F.softplus(z)).sum()    # -p_j^g log(1 - p_j)
        return loss

    def _hallucinate(self, features: torch.Tensor | None, matched: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the FHM statistics from the matched ``features`` (B, Q, D), then draw synthetic
        features (k*m, D) and labels (k*m,); none (k = 0) with FHM off."""
        weight = self.linear.weight
        if self.fhm is None:
            return weight.new_zeros(0, weight.shape[1]), labels.new_zeros(0)
        if features is not None:
            self.fhm.update(features.detach()[matched], labels)
        feats, classes = self.fhm.sample(self.indicators.accuracy())
        return feats.to(device=weight.device, dtype=weight.dtype), classes.to(labels.device)

    def _objectness_loss(self, logits: torch.Tensor, matched: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Summed focal objectness of the encoder proposals on channel 0 and on -z_bg (see module docstring)."""
        target = matched.float()
        pairs = torch.stack([logits[..., 0], -logits[..., -1]], -1).float()
        loss = sigmoid_focal_loss(pairs, target[..., None].expand_as(pairs), alpha=ENC_ALPHA, gamma=ENC_GAMMA,
                                  reduction="none")
        return (loss * keep[..., None]).sum()

    def _to(self, device: torch.device) -> None:
        self.indicators.to(device)
        if self.fhm is not None:
            self.fhm.to(device)

    # ----------------------------------------------------------------------------------------- state
    @property
    def state(self) -> dict[str, Any]:
        """Every indicator statistic (``indicators.*``) and FHM statistic (``fhm.*``), on the CPU.

        Empty for a head that has never recorded a sample (the per-layer copies, which the criterion never
        calls with ``layer == ""``): its statistics are the freshly built ones, which ``load_state({})``
        keeps, and a checkpoint does not carry C x C zeros per decoder layer (~14 MB each on LVIS).
        """
        pristine = not bool(self.indicators.class_count.any()) and (self.fhm is None or not bool(self.fhm.count.any()))
        if pristine:
            return {}
        state = {f"indicators.{k}": v for k, v in self.indicators.state().items()}
        if self.fhm is not None:
            state.update(self.fhm.state(prefix="fhm."))
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :attr:`state`. An empty dict (e.g. weights from a checkpoint of another head) keeps the
        current statistics; FHM statistics in ``state`` are ignored when FHM is off, and required when on.

        Raises:
            ValueError: a key is unknown or missing, or a tensor's shape does not fit (the key is named).
        """
        if not state:
            return
        known = {f"indicators.{k}" for k in self.indicators.state()} | {f"fhm.{k}" for k in FeatureHallucination._KEYS}
        unknown = sorted(set(state) - known)
        if unknown:
            raise ValueError(f"BACL head state has unknown keys {unknown}")
        self.indicators.load_state(state, prefix="indicators.")
        if self.fhm is not None:
            self.fhm.load_state(state, prefix="fhm.")
