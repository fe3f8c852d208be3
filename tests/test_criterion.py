"""Sigmoid focal head loss and SetCriterion: values, key names, weights, gradients, normalisation."""

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from stepwise.config import load_config
from stepwise.heads import SigmoidFocalHead
from stepwise.models.criterion import SetCriterion, build_criterion, expand_weights
from stepwise.models.matcher import HungarianMatcher
from stepwise.models.outputs import DetectorOutput

C, Q, B, D = 4, 6, 2, 8


def make_targets():
    return [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]),
         "image_id": 11},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]), "image_id": 12},
    ]


def make_outputs(num_layers=3, two_stage=True, seed=0):
    """Random outputs whose tensors are leaves with requires_grad, to check gradients reach them."""
    gen = torch.Generator().manual_seed(seed)
    logits = [torch.randn(B, Q, C, generator=gen).requires_grad_() for _ in range(num_layers)]
    boxes = [(torch.rand(B, Q, 4, generator=gen) * 0.4 + 0.2).requires_grad_() for _ in range(num_layers)]
    enc_logits = enc_boxes = None
    if two_stage:
        enc_logits = torch.randn(B, 10, C, generator=gen).requires_grad_()
        enc_boxes = (torch.rand(B, 10, 4, generator=gen) * 0.4 + 0.2).requires_grad_()
    return DetectorOutput(logits=logits, boxes=boxes, query_features=[torch.zeros(B, Q, D)] * num_layers,
                          enc_logits=enc_logits, enc_boxes=enc_boxes)


def make_criterion(num_layers=3, two_stage=True, aux_loss=True, reduce_fn=None, ce=2.0):
    cfg = load_config([f"loss.ce={ce}", f"loss.aux_loss={str(aux_loss).lower()}"]).loss
    return build_criterion(cfg, SigmoidFocalHead(D, C), num_layers=num_layers, two_stage=two_stage,
                           reduce_fn=reduce_fn)


def test_focal_loss_by_hand_and_as_the_original():
    head = SigmoidFocalHead(D, 2)
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.0]]])  # 1 image, 2 queries, 2 classes
    matches = [(torch.tensor([1]), torch.tensor([0]))]
    targets = [{"labels": torch.tensor([1]), "boxes": torch.zeros(1, 4)}]
    num_boxes = 2.0

    def term(x, positive, alpha=0.25, gamma=2.0):
        p = 1 / (1 + math.exp(-x))
        return alpha * (1 - p) ** gamma * -math.log(p) if positive else (1 - alpha) * p ** gamma * -math.log(1 - p)

    by_hand = (term(0.5, False) + term(-1.0, False) + term(2.0, False) + term(0.0, True)) / num_boxes
    loss = head.loss(logits, matches, targets, num_boxes)["loss_ce"]
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # Deformable DETR: sigmoid_focal_loss(...).mean(1).sum() / num_boxes * Q
    onehot = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    original = sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2, reduction="none").mean(1).sum() / num_boxes * 2
    assert loss.item() == pytest.approx(original.item(), rel=1e-6)


def test_focal_loss_rejects_label_outside_head():
    head = SigmoidFocalHead(D, 2)
    targets = [{"labels": torch.tensor([5]), "boxes": torch.zeros(1, 4), "image_id": 42}]
    with pytest.raises(ValueError, match="image 42"):
        head.loss(torch.zeros(1, 3, 2), [(torch.tensor([0]), torch.tensor([0]))], targets, 1.0)


def test_key_names_for_layers_and_encoder():
    losses = make_criterion()(make_outputs(), make_targets())
    names = {"loss_ce", "loss_bbox", "loss_giou"}
    expected = names | {f"{n}_{s}" for n in names for s in ("0", "1", "enc")} | {"class_error", "cardinality_error"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())


def test_without_aux_loss_only_final_and_encoder():
    criterion = make_criterion(aux_loss=False)
    losses = criterion(make_outputs(), make_targets())
    assert not any(k.endswith(("_0", "_1")) for k in losses)
    assert "loss_ce_enc" in losses and "loss_ce_0" not in criterion.weight_dict


def test_weight_dict_and_weighted_total():
    criterion = make_criterion(ce=3.0)
    weights = criterion.weight_dict
    assert weights["loss_ce"] == weights["loss_ce_1"] == weights["loss_ce_enc"] == 3.0
    assert weights["loss_bbox_0"] == 5.0 and weights["loss_giou_enc"] == 2.0
    assert "class_error" not in weights
    losses = criterion(make_outputs(), make_targets())
    expected = sum(v * weights[k] for k, v in losses.items() if k in weights)
    assert criterion.total(losses).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(KeyError, match="loss_ce_2"):
        criterion.total({**losses, "loss_ce_2": torch.tensor(1.0)})


def test_expand_weights_and_extra_head_losses():
    assert set(expand_weights({"loss_a": 1.0}, 3, aux_loss=True, two_stage=False)) == {"loss_a", "loss_a_0", "loss_a_1"}

    class ExtraHead(SigmoidFocalHead):
        @property
        def loss_weights(self):
            return {"loss_extra": 0.5}

    cfg = load_config([]).loss
    criterion = build_criterion(cfg, ExtraHead(D, C), num_layers=2, two_stage=True)
    assert criterion.weight_dict["loss_extra_0"] == criterion.weight_dict["loss_extra_enc"] == 0.5


def test_gradients_reach_every_layer_and_the_encoder():
    outputs = make_outputs()
    criterion = make_criterion()
    criterion.total(criterion(outputs, make_targets())).backward()
    for tensor in [*outputs.logits, *outputs.boxes, outputs.enc_logits, outputs.enc_boxes]:
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_num_boxes_uses_reduce_fn_and_clamps():
    seen = []

    def fake_mean(count):
        seen.append(count.item())
        return count * 2  # as if the other process had three times as many boxes

    outputs, targets = make_outputs(), make_targets()
    local = make_criterion()(outputs, targets)
    reduced = make_criterion(reduce_fn=fake_mean)(outputs, targets)
    assert seen == [3.0]
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_giou_0", "loss_ce_enc"):
        assert reduced[key].item() == pytest.approx(local[key].item() / 2, rel=1e-6)
    assert make_criterion(reduce_fn=lambda c: c * 0).num_boxes(targets, torch.device("cpu")) == 1.0


def test_no_targets_anywhere_gives_finite_losses_and_gradients():
    outputs = make_outputs()
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)} for _ in range(B)]
    criterion = make_criterion()
    losses = criterion(outputs, empty)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou_enc"].item() == 0
    criterion.total(losses).backward()
    assert outputs.logits[-1].grad.abs().sum() > 0  # every query is pushed towards "no object"


def test_perfect_predictions_have_zero_box_loss_and_class_error():
    targets = make_targets()
    boxes = torch.full((B, Q, 4), 0.1)
    logits = torch.full((B, Q, C), -8.0)
    for b, t in enumerate(targets):
        boxes[b, : len(t["labels"])] = t["boxes"]
        logits[b, torch.arange(len(t["labels"])), t["labels"]] = 8.0
    outputs = DetectorOutput(logits=[logits], boxes=[boxes], query_features=[torch.zeros(B, Q, D)])
    losses = make_criterion(num_layers=1, two_stage=False)(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-5)  # GIoU loss has an eps
    assert losses["class_error"].item() == 0 and losses["cardinality_error"].item() == 0
    assert losses["loss_ce"].item() < 1e-3


def test_match_returns_final_layer_matches():
    outputs, targets = make_outputs(), make_targets()
    criterion = make_criterion()
    direct = HungarianMatcher()(outputs.logits[-1].sigmoid(), outputs.boxes[-1], targets)
    for (q1, t1), (q2, t2) in zip(criterion.match(outputs, targets), direct):
        assert q1.tolist() == q2.tolist() and t1.tolist() == t2.tolist()


def test_unknown_loss_name_rejected():
    with pytest.raises(ValueError, match="masks"):
        SetCriterion(HungarianMatcher(), SigmoidFocalHead(D, C), {}, losses=("labels", "masks"))
