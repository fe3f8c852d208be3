"""The classifier-head contract (stepwise/heads/base.py), checked for every head in ``HEADS`` and for the
metric-learning wrapper: a new head registered there gets all of these tests without writing any."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from stepwise.config import load_config
from stepwise.heads import HEADS, build_head

B, Q, D, C = 2, 6, 8, 5
CATEGORIES = SimpleNamespace(image_counts=(40, 12, 5, 2, 1), instance_counts=(2000, 150, 30, 4, 1))
NAMES = sorted(HEADS) + ["sigmoid+metric_learning"]


def make_head(name: str, seed: int = 0):
    head_name, _, wrapper = name.partition("+")
    overrides = [f"head={head_name}"] + (["head.metric_learning.enabled=true"] if wrapper else [])
    torch.manual_seed(seed)
    return build_head(load_config(overrides).head, D, C, categories=CATEGORIES)


def image(labels: list[int], queries: list[int], ignore: list[int] | None = None) -> tuple[tuple, dict]:
    """One image's match (query_idx, target_idx) and target; ``ignore``: queries marked ignore_queries."""
    target = {"labels": torch.tensor(labels, dtype=torch.long), "boxes": torch.rand(len(labels), 4)}
    if ignore is not None:
        target["ignore_queries"] = torch.zeros(Q, dtype=torch.bool)
        target["ignore_queries"][ignore] = True
    return (torch.tensor(queries, dtype=torch.long), torch.arange(len(labels))), target


def step(head, matches, targets, layer: str = "", seed: int = 1):
    """One loss of fresh (B, Q, K) logits from fresh features; returns (losses, logits, features)."""
    torch.manual_seed(seed)
    features = torch.randn(B, Q, D, requires_grad=True)
    logits = head(features)
    logits.retain_grad()
    losses = head.loss(logits, matches, targets, num_boxes=2.0, features=features if layer != "enc" else None,
                       layer=layer)
    return losses, logits, features


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_scores(name):
    head = make_head(name)
    logits = head(torch.randn(B, Q, D))
    assert logits.shape == (B, Q, head.num_outputs) and head.num_classes == C
    scores = head.scores(logits)
    assert scores.shape == (B, Q, C) and torch.isfinite(scores).all()
    assert (scores >= 0).all() and (scores <= 1).all()
    assert head.class_logits(logits).shape == (B, Q, C)
    if head.num_outputs == C:
        assert torch.equal(head.class_logits(logits), logits)


@pytest.mark.parametrize("name", NAMES)
def test_loss_stays_connected_when_nothing_matches(name):
    head = make_head(name).train()
    empty = [image([], []) for _ in range(B)]
    losses, logits, _ = step(head, [m for m, _ in empty], [t for _, t in empty])
    assert "loss_ce" in losses and set(losses) <= {"loss_ce", *head.loss_weights}
    total = sum(v * (head.loss_weights.get(k, 1.0)) for k, v in losses.items())
    assert total.dim() == 0 and torch.isfinite(total)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_matched_loss_trains_the_logits(name):
    head = make_head(name).train()
    pairs = [image([0, 3], [1, 4]), image([4], [0])]
    losses, logits, _ = step(head, [m for m, _ in pairs], [t for _, t in pairs])
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 1].abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_encoder_proposals_have_every_label_zero(name):
    head = make_head(name).train()
    pairs = [image([0, 0], [2, 5]), image([0], [3])]
    losses, logits, _ = step(head, [m for m, _ in pairs], [t for _, t in pairs], layer="enc")
    assert "loss_ce" in losses and torch.isfinite(losses["loss_ce"])
    losses["loss_ce"].backward()
    assert logits.grad[0, 2].abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_ignored_queries_get_no_loss(name):
    head = make_head(name).train()
    if not head.supports_ignore:
        pytest.skip(f"{name} does not honour ignore_queries (the criterion refuses such data for it)")
    pairs = [image([1], [0], ignore=[2, 3]), image([2], [5], ignore=[1])]
    losses, logits, _ = step(head, [m for m, _ in pairs], [t for _, t in pairs])
    losses["loss_ce"].backward()
    assert logits.grad[0, 2:4].abs().sum() == 0 and logits.grad[1, 1].abs().sum() == 0
    assert logits.grad[0, 0].abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip(name):
    head = make_head(name).train()
    pairs = [image([0, 3], [1, 4]), image([4], [0])]
    step(head, [m for m, _ in pairs], [t for _, t in pairs])  # statistics-keeping heads record a step
    buf = io.BytesIO()
    torch.save(head.state, buf)  # checkpoints load with weights_only=True
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = make_head(name, seed=1)
    fresh.load_state(state)
    assert fresh.state.keys() == state.keys()
    assert all(torch.equal(torch.as_tensor(fresh.state[k]), torch.as_tensor(v)) for k, v in state.items())
    before = fresh.state
    fresh.load_state({})  # weights of another head: statistics kept
    assert all(torch.equal(torch.as_tensor(before[k]), torch.as_tensor(fresh.state[k])) for k in before)


@pytest.mark.parametrize("name", NAMES)
def test_tau_normalisation_of_the_class_rows(name):
    head = make_head(name)
    rows = head.class_weight_rows()
    assert rows.shape == (C, D)
    before = rows.detach().clone()
    head.tau_normalize_(0.0)
    assert torch.allclose(head.class_weight_rows(), before)
    head.tau_normalize_(1.0)
    assert torch.allclose(head.class_weight_rows().norm(dim=1), torch.ones(C), atol=1e-5)
