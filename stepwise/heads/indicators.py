"""BACL's long-term indicators (Table II of Qi et al., "Balanced Classification") and the pairwise margins.

Every indicator answers "how dominant is class i": a larger value means a stronger (head-like) class.

* ``image_freq`` f_i, ``instance_freq`` F_i: static training-set counts (full original training set).
* ``instance_count`` N_i: cumulative number of training samples of class i seen so far.
* ``score`` s_i: EMA (momentum gamma) of the mean sigmoid probability of the ground-truth channel over the
  step's samples of class i; a class's first observation is copied.
* ``tpr`` TPR_i: cumulative fraction of class-i samples whose argmax over the C foreground logits is i.
* ``confusion`` M (C, C), the default, soft-label form: M_ij = mean over samples of class i of
  softmax_j(z_1..z_C), the softmax over the foreground logits only.

Margins (Eq. 7): delta_ij = alpha * log(l_j / l_i) for a sample of class i and another class j; for the
confusion matrix l_i = M_ji and l_j = M_ij, so delta_ij = alpha * log(M_ij / M_ji). A strong i gives a
negative delta_ij (less suppression of the weaker j). As in the public code (``FCBL.forward``), both values
are clamped at ``eps`` = 1e-3 before the log, and a class never seen has a confusion row of zeros
(``unseen_rows="zero"``; ``"uniform"``: 1 / C, stepwise's earlier choice).

All dynamic statistics are kept every step (they are cheap), whichever indicator drives the margins: the
FHM draws classes by 1 - M_ii, and switching the indicator between stages keeps a meaningful history.
Per-step increments are summed over processes (``all_reduce_sum``) before they are applied, so every
process holds identical statistics; cumulative sums are float64 (float32 stops counting past ~1e7).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

INDICATORS = ("confusion", "image_freq", "instance_freq", "instance_count", "score", "tpr")
UNSEEN_ROWS = ("zero", "uniform")


def restore_tensors(owner: Any, state: dict[str, Any], names: Sequence[str], prefix: str, context: str) -> None:
    """Set ``owner.<name>`` from ``state[prefix + name]`` for every name, on the owner's device and dtype.

    Raises ValueError naming the key when it is missing or its shape differs (``context`` describes the
    expected size, e.g. "40 classes").
    """
    for name in names:
        key = prefix + name
        if key not in state:
            raise ValueError(f"head state lacks {key!r}")
        own, value = getattr(owner, name), torch.as_tensor(state[key])
        if value.shape != own.shape:
            raise ValueError(f"head state {key!r} has shape {tuple(value.shape)}, expected {tuple(own.shape)} "
                             f"({context})")
        setattr(owner, name, value.to(device=own.device, dtype=own.dtype).clone())


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes in place when torch.distributed is initialised; identity otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class LongTermIndicators:
    """Long-term indicator statistics for C classes (plain tensors, moved to the logits' device on use).

    Args:
        num_classes: C.
        image_counts, instance_counts: (C,) static training-set counts (None: unknown, zeros; the
            frequency indicators then refuse to run).
        momentum: gamma of the mean-classification-score EMA.
        eps: floor on indicator values before the log ratio (bounds the margin at alpha * log(1 / eps)); the
            public code's clamp is 1e-3.
        unseen_rows: the confusion-matrix row of a class never seen: ``zero`` (the public code's
            ``cm_numerator / num_gt.clamp(min=1)``) or ``uniform`` (1 / C).
    """

    _DYNAMIC = ("confusion_sum", "class_count", "tpr_hits", "score_ema")
    _STATIC = ("image_counts", "instance_counts")

    def __init__(self, num_classes: int, image_counts: Sequence[int] | None = None,
                 instance_counts: Sequence[int] | None = None, momentum: float = 0.9, eps: float = 1e-3,
                 unseen_rows: str = "zero"):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"score momentum must be in [0, 1), got {momentum}")
        if unseen_rows not in UNSEEN_ROWS:
            raise ValueError(f"unknown unseen_rows {unseen_rows!r}; choose one of {UNSEEN_ROWS}")
        self.num_classes, self.momentum, self.eps = num_classes, float(momentum), float(eps)
        self.unseen_rows = unseen_rows
        self.image_counts = self._counts(image_counts, "image_counts")
        self.instance_counts = self._counts(instance_counts, "instance_counts")
        self.reset()

    def _counts(self, counts: Sequence[int] | None, name: str) -> torch.Tensor:
        if counts is None:
            return torch.zeros(self.num_classes, dtype=torch.float64)
        out = torch.as_tensor(list(counts), dtype=torch.float64)
        if out.shape != (self.num_classes,):
            raise ValueError(f"{name} has {out.numel()} entries for {self.num_classes} classes")
        return out

    def reset(self) -> None:
        """Forget every dynamic statistic (static counts stay)."""
        c = self.num_classes
        self.confusion_sum = torch.zeros(c, c, dtype=torch.float64)  # row i: summed softmax of class-i samples
        self.class_count = torch.zeros(c, dtype=torch.float64)       # N_i
        self.tpr_hits = torch.zeros(c, dtype=torch.float64)          # samples of i with argmax i
        self.score_ema = torch.zeros(c, dtype=torch.float32)         # s_i (valid where class_count > 0)

    # ------------------------------------------------------------------------------------------ state
    def to(self, device: torch.device) -> LongTermIndicators:
        """Move every statistic to ``device`` (no-op when already there)."""
        for name in (*self._DYNAMIC, *self._STATIC):
            value = getattr(self, name)
            if value.device != device:
                setattr(self, name, value.to(device))
        return self

    def state(self) -> dict[str, torch.Tensor]:
        """CPU copies of every statistic, dynamic and static."""
        return {name: getattr(self, name).detach().cpu().clone() for name in (*self._DYNAMIC, *self._STATIC)}

    def load_state(self, state: dict[str, Any], prefix: str = "") -> None:
        """Restore :meth:`state`; a missing key or a shape mismatch raises ValueError naming the key."""
        restore_tensors(self, state, (*self._DYNAMIC, *self._STATIC), prefix, f"{self.num_classes} classes")

    # ----------------------------------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, fg_logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one step's samples: ``fg_logits`` (N, C) foreground logits, ``labels`` (N,) in [0, C).

        Every process must call this once per step (with N = 0 if it has no samples): the increments are
        summed over processes.
        """
        c = self.num_classes
        device = fg_logits.device
        self.to(device)
        z = fg_logits.detach().float()
        labels = labels.to(device)
        increments = torch.zeros(c * c + 3 * c, dtype=torch.float32, device=device)
        conf, count, hits, score = increments.split([c * c, c, c, c])
        conf.view(c, c).index_add_(0, labels, z.softmax(-1))
        count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float32))
        hits.index_add_(0, labels, (z.argmax(-1) == labels).float())
        p_gt = z.gather(1, labels[:, None]).squeeze(1).sigmoid() if len(labels) else z.new_zeros(0)
        score.index_add_(0, labels, p_gt)
        all_reduce_sum(increments)

        seen = count > 0
        batch_mean = score / count.clamp_min(1.0)
        first = seen & (self.class_count == 0)
        ema = self.momentum * self.score_ema + (1.0 - self.momentum) * batch_mean
        self.score_ema = torch.where(first, batch_mean, torch.where(seen, ema, self.score_ema))
        self.confusion_sum += conf.view(c, c).double()
        self.class_count += count.double()
        self.tpr_hits += hits.double()

    # ----------------------------------------------------------------------------------------- values
    def confusion(self, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Soft confusion matrix M (C, C), or only M[rows] (N, C) / M[:, cols] (C, N); rows of classes never
        seen are 0 (``unseen_rows="zero"``) or uniform 1 / C. Only the asked-for part is computed (C = 1203 on
        LVIS)."""
        sums, count = self.confusion_sum, self.class_count
        if rows is not None:
            sums, count = sums[rows], count[rows]
        if cols is not None:
            sums = sums[:, cols]
        count = count[:, None]
        return torch.where(count > 0, sums / count.clamp_min(1.0), self._unseen_value)

    @property
    def _unseen_value(self) -> float:
        return 0.0 if self.unseen_rows == "zero" else 1.0 / self.num_classes

    def accuracy(self) -> torch.Tensor:
        """(C,) M_ii, the soft per-class accuracy (0 or 1 / C for classes never seen, as ``unseen_rows``)."""
        count = self.class_count
        return torch.where(count > 0, self.confusion_sum.diagonal() / count.clamp_min(1.0), self._unseen_value)

    def vector(self, name: str) -> torch.Tensor:
        """(C,) value of a one-dimensional indicator (larger = stronger class), before the eps floor."""
        if name in ("image_freq", "instance_freq"):
            counts = self.image_counts if name == "image_freq" else self.instance_counts
            if not bool(counts.any()):
                raise ValueError(f"indicator {name!r} needs the training set's counts (build the head with "
                                 f"categories=)")
            return counts.clamp_min(1.0)
        if name == "instance_count":
            return self.class_count.clamp_min(1.0)
        if name in ("score", "tpr"):
            seen = self.class_count > 0
            value = (self.score_ema.double() if name == "score"
                     else self.tpr_hits / self.class_count.clamp_min(1.0))
            # Classes not seen yet count as average: no margin from missing information.
            fill = value[seen].mean() if bool(seen.any()) else value.new_tensor(1.0)
            return torch.where(seen, value, fill)
        raise ValueError(f"unknown indicator {name!r}; choose one of {INDICATORS}")

    def log_ratio(self, name: str, labels: torch.Tensor) -> torch.Tensor:
        """(N, C) log(l_j / l_i) for samples of classes ``labels`` (N,) = i against every class j.

        For ``confusion``: log(M_ij / M_ji). Values are floored at ``eps`` before the log.
        """
        labels = labels.to(self.class_count.device)
        if name == "confusion":
            m_ij = self.confusion(rows=labels)          # (N, C): how class-i samples score every j
            m_ji = self.confusion(cols=labels).T        # (N, C): how every j's samples score i
            return (m_ij.clamp_min(self.eps).log() - m_ji.clamp_min(self.eps).log()).float()
        log_l = self.vector(name).clamp_min(self.eps).log()
        return (log_l[None, :] - log_l[labels, None]).float()
