"""The classifier-head interface the detector, matcher, criterion and post-processing talk to."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn


class ClassifierHead(nn.Module):
    """Maps decoder query features to logits, logits to class scores, and (logits, matches) to losses.

    Subclasses implement ``forward``, ``scores`` and ``loss``; ``num_outputs`` is K, the logit width.
    """

    num_classes: int
    num_outputs: int

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
    ) -> dict[str, torch.Tensor]:
        """Named, unweighted classification losses for one layer's (B, Q, K) logits.

        ``matches[b] = (query_idx, target_idx)`` from the matcher; ``targets[b]["labels"]`` are contiguous.
        """

    @property
    def state(self) -> dict[str, Any]:
        """Statistics the head keeps outside its parameters (checkpointed); empty by default."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what ``state`` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but got keys {sorted(state)}")
