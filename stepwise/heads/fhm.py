"""BACL's feature hallucination module (FHM): per-class feature statistics and synthetic features.

Where the statistics come from. The paper (a two-stage detector) jitters every ground-truth box 16 times
and runs RoIAlign + the RoI head on those boxes only to collect feature statistics. Deformable DETR has no
box -> feature function to run on jittered boxes: a query's feature comes out of the decoder from its
reference point and its attention to the other queries, so extra "jittered queries" would need another
decoder pass and would change the real queries' self-attention. The statistics therefore come from the
final decoder layer's query features of the queries the Hungarian matcher assigned to a ground-truth box
(detached): exactly the distribution the final classifier sees for real objects, at no extra cost. Not
used: unmatched queries near an object (set prediction trains those duplicates as background, so their
features must not count as the class), and earlier layers' features (another distribution, read by other
heads). That leaves about one sample per object per step, hence the cross-step term below.

Statistics (Eq. 11, extended): each step, for every class i among the samples, the batch mean u_i and
(population) variance v_i of the features are folded into the running mean mu_i and variance var_i:

    mu_i  <- beta * mu_i  + (1 - beta) * u_i
    var_i <- beta * var_i + (1 - beta) * v_i + beta * (1 - beta) * (u_i - mu_i_old) ** 2

The last term (the variance of a beta / (1 - beta) mixture of the old and the new distribution) is an
addition to the paper's Eq. 11: the paper had 16 jittered boxes per instance, so v_i alone measured the
spread; a set-prediction detector gives one matched query per object, often one sample of a class per
step (v_i = 0), and without it var_i would shrink to zero for exactly the tail classes FHM is for. A
class's first observation is copied (mu = u, var = v).

Synthesis (Eq. 12-13): c classes are drawn without replacement with probability proportional to
1 - M_ii (soft accuracy from the confusion matrix), among the classes that have statistics; each gives m
features mu_i + eps * sigma_i with sigma_i = sqrt(var_i) (the reparameterisation trick needs the standard
deviation) and eps ~ N(0, I) from torch's RNG.
"""

from __future__ import annotations

from typing import Any

import torch

from stepwise.heads.indicators import all_reduce_sum, restore_tensors


def sampling_probs(accuracy: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """(C,) class-drawing probabilities: proportional to 1 - accuracy (clamped to [0, 1]) over
    ``available`` (C,) bool classes, zero elsewhere; uniform over ``available`` when every weight is zero;
    all zero when nothing is available."""
    weights = (1.0 - accuracy.double()).clamp(0.0, 1.0) * available
    if float(weights.sum()) <= 0.0:
        weights = available.double()
    total = weights.sum()
    return weights / total if float(total) > 0 else weights


class FeatureHallucination:
    """Running per-class feature statistics (C, D) and the synthetic features drawn from them.

    Args:
        num_classes: C; dim: D, the query feature width.
        momentum: beta, the EMA decay of the statistics.
        num_sampled: c, classes drawn per step; per_class: m, features per drawn class.
    """

    _KEYS = ("mean", "var", "count")

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.9, num_sampled: int = 8,
                 per_class: int = 12):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"FHM momentum must be in [0, 1), got {momentum}")
        if num_sampled < 1 or per_class < 1:
            raise ValueError(f"FHM needs num_sampled >= 1 and per_class >= 1, got {num_sampled}, {per_class}")
        self.num_classes, self.dim = num_classes, dim
        self.momentum, self.num_sampled, self.per_class = float(momentum), int(num_sampled), int(per_class)
        self.reset()

    def reset(self) -> None:
        """Forget every statistic."""
        self.mean = torch.zeros(self.num_classes, self.dim)
        self.var = torch.zeros(self.num_classes, self.dim)
        self.count = torch.zeros(self.num_classes, dtype=torch.float64)  # samples seen per class

    def to(self, device: torch.device) -> FeatureHallucination:
        """Move the statistics to ``device``."""
        for name in self._KEYS:
            value = getattr(self, name)
            if value.device != device:
                setattr(self, name, value.to(device))
        return self

    def state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """CPU copies of mean (C, D), var (C, D) and count (C,), keys prefixed."""
        return {prefix + name: getattr(self, name).detach().cpu().clone() for name in self._KEYS}

    def load_state(self, state: dict[str, Any], prefix: str = "") -> None:
        """Restore :meth:`state`; a missing key or a shape mismatch raises ValueError naming the key."""
        restore_tensors(self, state, self._KEYS, prefix, f"{self.num_classes} classes x {self.dim} features")

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold one step's ``features`` (N, D) of classes ``labels`` (N,) into the statistics.

        Sums over processes first (every process calls this once per step, N may be 0).
        """
        c, d = self.num_classes, self.dim
        device = features.device
        self.to(device)
        x = features.detach().float()
        labels = labels.to(device)
        increments = torch.zeros(2 * c * d + c, device=device)
        total, squares, count = increments.split([c * d, c * d, c])
        total.view(c, d).index_add_(0, labels, x)
        squares.view(c, d).index_add_(0, labels, x * x)
        count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float32))
        all_reduce_sum(increments)

        seen = (count > 0)[:, None]
        n = count.clamp_min(1.0)[:, None]
        u = total.view(c, d) / n
        v = (squares.view(c, d) / n - u * u).clamp_min(0.0)
        b = self.momentum
        first = seen & (self.count == 0)[:, None]
        mean = b * self.mean + (1 - b) * u
        var = b * self.var + (1 - b) * v + b * (1 - b) * (u - self.mean) ** 2
        self.mean = torch.where(first, u, torch.where(seen, mean, self.mean))
        self.var = torch.where(first, v, torch.where(seen, var, self.var))
        self.count += count.double()

    def sample(self, accuracy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthetic features (k * m, D) and their labels (k * m,), k = min(c, classes with statistics).

        ``accuracy`` (C,): M_ii, the soft per-class accuracy that sets the drawing probabilities.
        """
        probs = sampling_probs(accuracy.to(self.count.device), self.count > 0)
        k = min(self.num_sampled, int((probs > 0).sum()))
        if k == 0:
            return self.mean.new_zeros(0, self.dim), torch.zeros(0, dtype=torch.long, device=self.mean.device)
        classes = torch.multinomial(probs.float(), k, replacement=False)
        noise = torch.randn(k, self.per_class, self.dim, device=self.mean.device)
        features = self.mean[classes, None] + noise * self.var[classes, None].sqrt()
        return features.reshape(-1, self.dim), classes.repeat_interleave(self.per_class)
