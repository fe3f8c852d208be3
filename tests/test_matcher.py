"""Hungarian matcher: hand-made assignments, permutation invariance, empty images, cost through head.scores."""

import itertools

import pytest
import torch

from stepwise.heads import SigmoidFocalHead
from stepwise.heads.base import ClassifierHead
from stepwise.models.criterion import SetCriterion
from stepwise.models.matcher import HungarianMatcher
from stepwise.models.outputs import DetectorOutput

TARGET_BOXES = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.3, 0.2, 0.3], [0.5, 0.8, 0.4, 0.2]])
TARGET_LABELS = torch.tensor([0, 2, 1])


def make_scores(num_queries, num_classes, hot):
    """(1, Q, C) scores 0.05 everywhere except 0.9 at (query, class) pairs in ``hot``."""
    scores = torch.full((1, num_queries, num_classes), 0.05)
    for q, c in hot:
        scores[0, q, c] = 0.9
    return scores


def obvious_case():
    """Queries 3, 0, 4 hold exact copies of targets 0, 1, 2 with confident right classes; 1, 2 are junk."""
    boxes = torch.tensor([[[0.7, 0.3, 0.2, 0.3], [0.9, 0.9, 0.05, 0.05], [0.1, 0.9, 0.05, 0.1],
                           [0.2, 0.2, 0.1, 0.1], [0.5, 0.8, 0.4, 0.2]]])
    scores = make_scores(5, 3, [(3, 0), (0, 2), (4, 1)])
    return scores, boxes, [{"labels": TARGET_LABELS, "boxes": TARGET_BOXES}]


def pairs(match):
    return sorted(zip(match[0].tolist(), match[1].tolist()))


def test_obvious_assignment_recovered():
    scores, boxes, targets = obvious_case()
    (match,) = HungarianMatcher()(scores, boxes, targets)
    assert match[0].dtype == torch.long and match[1].dtype == torch.long
    assert pairs(match) == [(0, 1), (3, 0), (4, 2)]


def test_target_and_query_permutation_invariance():
    scores, boxes, targets = obvious_case()
    matcher = HungarianMatcher()
    base = dict(pairs(matcher(scores, boxes, targets)[0]))
    t_perm, q_perm = torch.tensor([2, 0, 1]), torch.tensor([4, 2, 0, 1, 3])
    permuted = [{"labels": TARGET_LABELS[t_perm], "boxes": TARGET_BOXES[t_perm]}]
    (match,) = matcher(scores[:, q_perm], boxes[:, q_perm], permuted)
    # Map back: permuted query i is original q_perm[i], permuted target j is original t_perm[j].
    recovered = {q_perm[q].item(): t_perm[t].item() for q, t in pairs(match)}
    assert recovered == base


def test_assignment_is_optimal_against_brute_force():
    torch.manual_seed(0)
    matcher = HungarianMatcher()
    scores = torch.rand(1, 5, 4)
    boxes = torch.cat([torch.rand(1, 5, 2) * 0.6 + 0.2, torch.rand(1, 5, 2) * 0.2 + 0.05], -1)
    targets = [{"labels": torch.tensor([3, 0, 3]), "boxes": TARGET_BOXES}]
    (match,) = matcher(scores, boxes, targets)
    cost = matcher.cost(scores[0], boxes[0], targets[0]["labels"], TARGET_BOXES)
    best = min(sum(cost[q, t] for t, q in enumerate(qs)) for qs in itertools.permutations(range(5), 3))
    assert cost[match[0], match[1]].sum().item() == pytest.approx(best.item(), abs=1e-5)


def test_cost_matches_formula_for_one_entry():
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, alpha=0.25, gamma=2)
    scores = torch.tensor([[0.3, 0.6]])
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])  # xyxy (0.4, 0.4, 0.6, 0.6)
    tgt = torch.tensor([[0.55, 0.5, 0.2, 0.2]])  # xyxy (0.45, 0.4, 0.65, 0.6)
    p = 0.6
    focal = 0.25 * (1 - p) ** 2 * -torch.log(torch.tensor(p)) - 0.75 * p ** 2 * -torch.log(torch.tensor(1 - p))
    iou = (0.15 * 0.2) / (2 * 0.04 - 0.15 * 0.2)
    giou = iou - (0.25 * 0.2 - (2 * 0.04 - 0.15 * 0.2)) / (0.25 * 0.2)
    expected = 2 * focal + 5 * 0.05 - 2 * giou
    assert matcher.cost(scores, box, torch.tensor([1]), tgt).item() == pytest.approx(expected.item(), rel=1e-5)


def test_images_without_targets_and_more_targets_than_queries():
    scores, boxes, targets = obvious_case()
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    matches = HungarianMatcher()(scores.expand(2, -1, -1), boxes.expand(2, -1, -1), [empty, targets[0]])
    assert matches[0][0].numel() == 0 and matches[0][1].numel() == 0
    assert pairs(matches[1]) == [(0, 1), (3, 0), (4, 2)]
    (few,) = HungarianMatcher()(scores[:, :2], boxes[:, :2], targets)  # Q=2 < T=3: two matched
    assert len(few[0]) == 2 and len(set(few[1].tolist())) == 2


def test_non_finite_cost_names_the_image():
    scores, boxes, targets = obvious_case()
    boxes = boxes.clone()
    boxes[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="image 77"):
        HungarianMatcher()(scores, boxes, [{**targets[0], "image_id": torch.tensor(77)}])


def test_non_finite_cost_blames_the_predictions_first():
    from stepwise.utils.finite import NonFiniteCostError

    scores, boxes, targets = obvious_case()
    nan_scores = scores.clone()
    nan_scores[0, 2, 1] = float("nan")
    with pytest.raises(NonFiniteCostError, match="image 77: .*predictions are non-finite .*diverged"):
        HungarianMatcher()(nan_scores, boxes, [{**targets[0], "image_id": 77}])
    bad_target = {**targets[0], "boxes": targets[0]["boxes"].clone(), "image_id": 78}
    bad_target["boxes"][1, 2] = float("inf")
    with pytest.raises(NonFiniteCostError, match="image 78: .*finite predictions: a target box"):
        HungarianMatcher()(scores, boxes, [bad_target])


class InvertedHead(SigmoidFocalHead):
    """A head whose scores are not the sigmoid: proves matching goes through ``head.scores``."""

    def scores(self, logits):
        return 1 - logits.sigmoid()


def test_criterion_matching_uses_head_scores():
    # Two queries with identical boxes on one target of class 0: only the class score decides.
    logits = torch.tensor([[[4.0, -4.0], [-4.0, -4.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    outputs = DetectorOutput(logits=[logits], boxes=[boxes], query_features=[torch.zeros(1, 2, 4)])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    sigmoid = SetCriterion(HungarianMatcher(), SigmoidFocalHead(4, 2), {})
    inverted = SetCriterion(HungarianMatcher(), InvertedHead(4, 2), {})
    assert sigmoid.match(outputs, targets)[0][0].tolist() == [0]
    assert inverted.match(outputs, targets)[0][0].tolist() == [1]


def test_head_interface_is_abstract():
    class Incomplete(ClassifierHead):
        def forward(self, query_features):
            return query_features

    with pytest.raises(TypeError):
        Incomplete()
