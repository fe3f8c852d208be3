"""BAGS / hybrid BAGS heads: groups and bins, label remapping, "others" sampling, losses and scores by hand,
and the matcher and post-processing seeing the same scores."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf

from stepwise.config import load_config
from stepwise.data.categories import CategoryMap
from stepwise.heads import BAGSHead, HybridBAGSHead, build_head
from stepwise.heads.bags import GroupSoftmaxHead, bin_class_weights, group_layout
from stepwise.heads.grouping import groups_from_edges, groups_from_kmeans, kmeans_1d
from stepwise.models.criterion import SetCriterion
from stepwise.models.matcher import HungarianMatcher
from stepwise.models.outputs import DetectorOutput
from stepwise.models.postprocess import PostProcess

D = 4


def categories(counts):
    n = len(counts)
    return CategoryMap(ids=tuple(range(1, n + 1)), names=tuple(f"c{i}" for i in range(n)), frequencies=(None,) * n,
                       image_counts=tuple(counts), instance_counts=tuple(counts))


def sp(x):  # softplus
    return math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# --------------------------------------------------------------------------------------------- groups
def test_groups_from_edges_at_the_edges():
    counts = [0, 9, 10, 99, 100, 999, 1000, 5000]
    assert groups_from_edges(counts).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert groups_from_edges([4, 5, 49, 50], edges=[5, 50]).tolist() == [0, 1, 1, 2]
    for bad in ([], [10, 10], [100, 10], [0, 10]):
        with pytest.raises(ValueError, match="edges"):
            groups_from_edges(counts, bad)


def test_layout_by_hand():
    # classes 1, 4 in group 0; 0, 2 in group 1; 3 in group 2
    class_output, others_output, output_group = group_layout(torch.tensor([1, 0, 1, 2, 0]), 3)
    assert class_output.tolist() == [5, 2, 6, 8, 3]
    assert others_output.tolist() == [4, 7, 9]
    assert output_group.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    # an empty group keeps its "others" slot
    class_output, others_output, _ = group_layout(torch.tensor([0, 0]), 2)
    assert class_output.tolist() == [2, 3] and others_output.tolist() == [4, 5]


def test_from_config_groups_by_instance_count_and_keeps_every_key():
    cfg = load_config(["head=bags"]).head
    cats = categories([3, 15, 150, 1500, 8, 20])
    head = build_head(cfg, D, 6, categories=cats)
    assert isinstance(head, BAGSHead)
    assert head.class_group.tolist() == [0, 1, 2, 3, 0, 1]
    assert head.num_outputs == 6 + 4 + 2 and head(torch.zeros(2, D)).shape == (2, 12)
    assert (head.beta, head.g0_loss, head.eos_coef) == (8.0, "focal", 0.1)
    custom = build_head(load_config(["head=bags", "head.edges=[100]", "head.g0_loss=ce"]).head, D, 6, categories=cats)
    assert custom.class_group.tolist() == [0, 0, 1, 1, 0, 0] and custom.num_outputs == 6 + 2 + 2
    assert custom.g0_loss == "ce"
    with pytest.raises(ValueError, match="instance count"):
        build_head(cfg, D, 6)
    with pytest.raises(ValueError, match="g0_loss"):
        build_head(load_config(["head=bags", "head.g0_loss=sigmoid"]).head, D, 6, categories=cats)


def test_kmeans_bins_by_hand_and_deterministic():
    counts = [1, 1, 2, 100, 120, 5000, 6000]
    assert groups_from_kmeans(counts, 3).tolist() == [0, 0, 0, 1, 1, 2, 2]
    order = [6, 0, 4, 2, 5, 1, 3]
    shuffled = groups_from_kmeans([counts[i] for i in order], 3)
    assert shuffled.tolist() == [[0, 0, 0, 1, 1, 2, 2][i] for i in order]
    many = [int(1.7 ** (i % 23)) + i % 5 for i in range(300)]
    assert torch.equal(groups_from_kmeans(many, 4), groups_from_kmeans(many, 4))
    assert groups_from_kmeans([7, 7, 7], 4).tolist() == [0, 0, 0]  # fewer distinct counts than bins
    assert groups_from_kmeans([0, 1, 10], 2).tolist() == [0, 0, 1]  # 0 counts as 1 (log 0)
    # exact optimum: {0, 1} {10, 11, 12} beats the greedy-looking {0} {1, 10, 11, 12}
    import numpy as np
    labels = kmeans_1d(np.array([0.0, 1.0, 10.0, 11.0, 12.0]), np.ones(5), 2)
    assert labels.tolist() == [0, 0, 1, 1, 1]


def test_hybrid_class_weights_normalised_within_bins():
    weights = bin_class_weights([1, 4, 100, 400], torch.tensor([0, 0, 1, 1]))
    assert weights.tolist() == pytest.approx([1.6, 0.4, 1.6, 0.4])
    half = bin_class_weights([1, 4], torch.tensor([0, 0]), power=0.5)  # 1, 1/2 -> mean 3/4
    assert half.tolist() == pytest.approx([4 / 3, 2 / 3])
    head = build_head(load_config(["head=hybrid_bags", "head.num_bins=2"]).head, D, 4,
                      categories=categories([1, 4, 100, 400]))
    assert isinstance(head, HybridBAGSHead) and head.class_group.tolist() == [0, 0, 1, 1]
    assert head.class_weight.tolist() == pytest.approx([1.6, 0.4, 1.6, 0.4]) and head.num_outputs == 4 + 2 + 2
    plain = build_head(load_config(["head=hybrid_bags", "head.class_weights=false", "head.focal_gamma=2"]).head, D, 4,
                       categories=categories([1, 4, 100, 400]))
    assert plain.class_weight.tolist() == [1, 1, 1, 1] and plain.focal_gamma == 2.0


# ------------------------------------------------------------------------------- targets and sampling
def test_label_remapping_with_others_and_no_object():
    head = GroupSoftmaxHead(D, [1, 0, 1, 2, 0], num_groups=3, beta=100.0)
    C = 5
    # q0 class 1 (G0 of classes), q1 unmatched, q2 class 0, q3 class 4, q4 unmatched, q5 ignored
    labels = torch.tensor([1, C, 0, 4, C, C])
    valid = torch.tensor([True, True, True, True, True, False])
    g0, g1, g2 = head.sample_groups(labels, valid)
    assert g0.rows.tolist() == [0, 3, 1, 2, 4]
    assert g0.cols.tolist() == [0, 1, 2, 2, 2]  # class 1 -> col 2-2, class 4 -> 3-2, others 4-2
    assert g0.num_positive == 2
    assert g1.rows.tolist() == [2, 0, 1, 3, 4]
    assert g1.cols.tolist() == [3, 5, 5, 5, 5]  # class 0 -> col 5-2, others 7-2
    assert g2 is None  # class 3's group has no positive


def test_number_of_sampled_others_and_determinism():
    head = GroupSoftmaxHead(D, [0, 0, 1], beta=8.0)
    labels = torch.full((50,), 3)
    labels[[4, 17, 30]] = torch.tensor([0, 1, 0])
    valid = torch.ones(50, dtype=torch.bool)
    torch.manual_seed(0)
    g0, g1 = head.sample_groups(labels, valid)
    assert g1 is None and g0.num_positive == 3
    others = g0.rows[3:]
    assert len(others) == 24 and len(set(others.tolist())) == 24
    assert not {4, 17, 30} & set(others.tolist())
    assert g0.cols[3:].tolist() == [2] * 24 and g0.weights.tolist() == [1.0] * 27
    torch.manual_seed(0)
    assert torch.equal(head.sample_groups(labels, valid)[0].rows, g0.rows)
    torch.manual_seed(1)
    assert not torch.equal(head.sample_groups(labels, valid)[0].rows, g0.rows)

    head.beta = 2.5  # floor(2.5 * 3) = 7
    assert len(head.sample_groups(labels, valid)[0].rows) == 3 + 7
    few = torch.tensor([0, 3, 3, 2, 3])  # group 0: 1 positive, 4 candidates (incl. group 1's positive) < 8
    g0, g1 = GroupSoftmaxHead(D, [0, 0, 1], beta=8.0).sample_groups(few, torch.ones(5, dtype=torch.bool))
    assert g0.rows.tolist() == [0, 1, 2, 3, 4] and g1.rows.tolist() == [3, 0, 1, 2, 4]


def test_foreground_first_draws_other_groups_matches_before_unmatched_queries():
    labels = torch.full((200,), 3)  # 3 = no-object
    labels[[5, 50]] = 0  # group 0's positives: 16 "others" to draw
    labels[[7, 90, 150]] = 2  # group 1's positives: the other group's objects
    valid = torch.ones(200, dtype=torch.bool)
    valid[90] = False  # an ignored match is no candidate
    uniform = GroupSoftmaxHead(D, [0, 0, 1], beta=8.0)
    first = GroupSoftmaxHead(D, [0, 0, 1], beta=8.0, others="foreground_first")
    seen_uniform = 0
    for seed in range(20):
        torch.manual_seed(seed)
        g0, g1 = first.sample_groups(labels, valid)
        others = set(g0.rows[2:].tolist())
        assert len(others) == 16 and {7, 150} <= others and 90 not in others and not {5, 50} & others
        assert g1.num_positive == 2 and {5, 50} <= set(g1.rows[2:].tolist())  # 90 ignored: 2 positives
        torch.manual_seed(seed)
        seen_uniform += len({7, 150} & set(uniform.sample_groups(labels, valid)[0].rows[2:].tolist()))
    assert seen_uniform < 20  # uniform: each foreign match drawn with probability 16/197
    with pytest.raises(ValueError, match="others"):
        GroupSoftmaxHead(D, [0, 0, 1], others="foreground")
    cats = categories([3, 15, 150])
    assert build_head(load_config(["head=bags"]).head, D, 3, categories=cats).others == "uniform"
    built = build_head(load_config(["head=hybrid_bags", "head.others=foreground_first"]).head, D, 3, categories=cats)
    assert built.others == "foreground_first"
    old = load_config(["head=bags"]).head  # a config saved before the option existed draws uniformly
    OmegaConf.set_struct(old, False)
    del old["others"]
    OmegaConf.set_struct(old, True)
    assert build_head(old, D, 3, categories=cats).others == "uniform"


# ------------------------------------------------------------------------------------------- losses
# classes 0, 1 in group 0 (cols 2, 3, others 4); class 2 in group 1 (col 5, others 6)
LOGITS = torch.tensor([[[1.0, 0.0, 2.0, 0.0, 1.0, 0.5, -0.5],
                        [-1.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0]]])
MATCHES = [(torch.tensor([0]), torch.tensor([0]))]
TARGETS = [{"labels": torch.tensor([0]), "boxes": torch.zeros(1, 4)}]


def test_loss_by_hand_ce_g0_no_others():
    head = GroupSoftmaxHead(D, [0, 0, 1], beta=0.0, g0_loss="ce", eos_coef=0.5)
    loss = head.loss(LOGITS, MATCHES, TARGETS, num_boxes=1.0)["loss_ce"]
    g0 = (1 * sp(-1.0) + 0.5 * sp(-1.0)) / 1.5  # matched log-odds 1, unmatched -1 (no-object, weight 0.5)
    group0 = -(2.0 - math.log(math.exp(2) + 1 + math.exp(1)))  # class 0 among [class 0, class 1, others]
    assert loss.item() == pytest.approx(g0 + group0, rel=1e-6)


def test_loss_by_hand_focal_g0_with_others():
    head = GroupSoftmaxHead(D, [0, 0, 1], beta=1.0)  # g0_loss focal (alpha 0.25, gamma 2)
    loss = head.loss(LOGITS, MATCHES, TARGETS, num_boxes=2.0)["loss_ce"]
    p1, p2 = sigmoid(1.0), sigmoid(-1.0)
    g0 = (0.25 * (1 - p1) ** 2 * -math.log(p1) + 0.75 * p2 ** 2 * -math.log(1 - p2)) / 2.0
    pos = -(2.0 - math.log(math.exp(2) + 1 + math.exp(1)))
    others = math.log(3)  # q1 is the only candidate: "others" among three equal logits
    assert loss.item() == pytest.approx(g0 + (pos + others) / 2, rel=1e-6)


def test_hybrid_weights_and_focal_inside_bins_by_hand():
    head = GroupSoftmaxHead(D, [0, 0, 1], beta=0.0, g0_loss="ce", eos_coef=0.5, class_weight=[2.0, 0.5, 1.0],
                            focal_gamma=2.0)
    loss = head.loss(LOGITS, MATCHES, TARGETS, num_boxes=1.0)["loss_ce"]
    p = math.exp(2) / (math.exp(2) + 1 + math.exp(1))
    assert loss.item() == pytest.approx(sp(-1.0) + 2.0 * (1 - p) ** 2 * -math.log(p), rel=1e-6)


def test_inactive_groups_give_no_loss_and_no_gradient():
    head = GroupSoftmaxHead(D, [0, 0, 1, 2], beta=8.0)
    logits = torch.randn(2, 5, head.num_outputs, requires_grad=True)
    matches = [(torch.tensor([1, 3]), torch.tensor([0, 1])), (torch.tensor([0]), torch.tensor([0]))]
    targets = [{"labels": torch.tensor([0, 1])}, {"labels": torch.tensor([1])}]  # only group 0 has positives
    head.loss(logits, matches, targets, num_boxes=1.5)["loss_ce"].backward()
    # layout: G0 0-1, group 0: 2, 3, others 4; group 1: 5, others 6; group 2: 7, others 8
    assert logits.grad[..., 5:].abs().sum() == 0
    assert logits.grad[..., 2:5].abs().sum() > 0 and logits.grad[..., 0].abs().sum() > 0

    empty = head.loss(logits, [(torch.empty(0, dtype=torch.long),) * 2] * 2,
                      [{"labels": torch.empty(0, dtype=torch.long)}] * 2, num_boxes=1.0)["loss_ce"]
    assert empty.requires_grad  # G0 alone (everything no-object), still connected


def test_encoder_proposals_train_g0_and_class_0_group_only():
    head = GroupSoftmaxHead(D, [1, 0, 1], beta=8.0)  # class 0 in group 1 (cols 4, 5 others 6)
    logits = torch.randn(1, 12, head.num_outputs, requires_grad=True)
    matches = [(torch.tensor([2, 7]), torch.tensor([0, 1]))]
    head.loss(logits, matches, [{"labels": torch.zeros(2, dtype=torch.long)}], 2.0, layer="enc")["loss_ce"].backward()
    assert logits.grad[..., 2:4].abs().sum() == 0  # group 0 (class 1 and its others): untouched
    assert logits.grad[..., 4:].abs().sum() > 0 and logits.grad[..., 0].abs().sum() > 0


def test_ignored_queries_get_no_loss():
    head = GroupSoftmaxHead(D, [0, 0, 1], beta=100.0)
    logits = torch.randn(1, 6, head.num_outputs, requires_grad=True)
    ignore = torch.tensor([False, False, True, False, False, False])
    targets = [{"labels": torch.tensor([1]), "ignore_queries": ignore}]
    head.loss(logits, [(torch.tensor([0]), torch.tensor([0]))], targets, 1.0)["loss_ce"].backward()
    assert logits.grad[0, 2].abs().sum() == 0 and logits.grad[0, 3].abs().sum() > 0


# ------------------------------------------------------------------------------------------- scores
def test_scores_equal_the_formula_on_random_logits():
    groups = [1, 0, 1, 2, 0]
    head = GroupSoftmaxHead(D, groups, num_groups=3)
    logits = torch.randn(2, 3, head.num_outputs, dtype=torch.float64)
    scores = head.scores(logits)
    columns = {0: [2, 3, 4], 1: [5, 6, 7], 2: [8, 9]}  # each group's columns incl. its "others"
    class_col = [5, 2, 6, 8, 3]
    for b in range(2):
        for q in range(3):
            z = logits[b, q].tolist()
            p_fg = math.exp(z[0]) / (math.exp(z[0]) + math.exp(z[1]))
            for j, g in enumerate(groups):
                expected = p_fg * math.exp(z[class_col[j]]) / sum(math.exp(z[c]) for c in columns[g])
                assert scores[b, q, j].item() == pytest.approx(expected, rel=1e-9)


def test_forward_g0_is_log_odds_and_prior_probability():
    head = GroupSoftmaxHead(D, [0, 1, 1], prior_prob=0.01)
    features = torch.randn(5, D)
    raw = head.linear(features)
    logits = head(features)
    assert torch.allclose(logits[:, 0], raw[:, 0] - raw[:, 1]) and torch.equal(logits[:, 1], torch.zeros(5))
    assert torch.equal(logits[:, 2:], raw[:, 2:])
    at_zero = head(torch.zeros(1, D))  # logits = biases: p_fg = prior, uniform inside each group
    assert torch.sigmoid(at_zero[0, 0]).item() == pytest.approx(0.01, rel=1e-5)
    assert head.scores(at_zero)[0].tolist() == pytest.approx([0.01 / 2, 0.01 / 3, 0.01 / 3], rel=1e-5)


class RecordingMatcher(HungarianMatcher):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, scores, boxes, targets):
        self.seen.append(scores.clone())
        return super().forward(scores, boxes, targets)


def test_matcher_sees_the_scores_post_processing_ranks():
    torch.manual_seed(0)
    head = GroupSoftmaxHead(D, [1, 0, 1, 2, 0], num_groups=3)
    B, Q = 2, 4
    logits = [torch.randn(B, Q, head.num_outputs) for _ in range(2)]
    boxes = [torch.rand(B, Q, 4) * 0.4 + 0.2 for _ in range(2)]
    outputs = DetectorOutput(logits=logits, boxes=boxes, query_features=[torch.zeros(B, Q, D)] * 2)
    targets = [{"labels": torch.tensor([3, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.2, 0.3]])},
               {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    matcher = RecordingMatcher()
    criterion = SetCriterion(matcher, head, {"loss_ce": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0}, aux_loss=False)
    criterion(outputs, targets)
    expected = head.scores(logits[-1])
    assert torch.equal(matcher.seen[0], expected)
    detections = PostProcess(num_top=Q * 5, head=head)(outputs, torch.tensor([[100, 100], [80, 120]]))
    for b, det in enumerate(detections):
        assert torch.equal(det["scores"], expected[b].flatten().sort(descending=True).values)
        query = torch.tensor([int((expected[b] == s).nonzero()[0, 0]) for s in det["scores"]])
        assert torch.equal(expected[b, query, det["labels"]], det["scores"])


# ------------------------------------------------------------------------------- checkpoints, detector
def test_grouping_travels_in_the_state_dict():
    a = GroupSoftmaxHead(D, [0, 1, 1, 0])
    b = GroupSoftmaxHead(D, [1, 0, 0, 1])
    assert {"class_group", "class_output", "others_output", "output_group", "class_weight"} <= set(a.state_dict())
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.class_group, a.class_group) and torch.equal(b.class_output, a.class_output)
    logits = torch.randn(3, a.num_outputs)
    assert torch.equal(b.scores(logits), a.scores(logits))
    clone = copy.deepcopy(a)  # the detector deep-copies the head per layer
    assert torch.equal(clone.scores(logits), a.scores(logits)) and clone.class_group is not a.class_group


def test_tiny_two_stage_detector_trains_with_bags():
    from stepwise.models import build_detector
    from stepwise.models.criterion import build_criterion

    cfg = load_config(["head=bags", "model.num_queries=8", "model.enc_layers=1", "model.dec_layers=2"])
    cats = categories([3, 15, 150, 1500, 8, 20])
    torch.manual_seed(0)
    model = build_detector(cfg.model, cfg.head, cats).model
    head = model.class_embed[1]
    assert model.class_embed[0] is not head and model.state_dict()["class_embed.2.class_group"].tolist() == \
        [0, 1, 2, 3, 0, 1]
    outputs = model(torch.randn(1, 3, 64, 64))
    assert outputs.logits[-1].shape == (1, 8, 12) and outputs.enc_logits.shape[-1] == 12
    criterion = build_criterion(cfg.loss, head, num_layers=2, two_stage=True)
    targets = [{"labels": torch.tensor([0, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])}]
    losses = criterion(outputs, targets)
    assert {"loss_ce", "loss_ce_0", "loss_ce_enc"} <= set(losses)
    criterion.total(losses).backward()
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert all(model.class_embed[i].linear.weight.grad is not None for i in range(3))


# ------------------------------------------------------------------------------------------ duplicates
# 5 queries, 2 GT boxes: GT 0 (class 0, group 0) matched to q0, GT 1 (class 2, group 1) matched to q3;
# q1 covers GT 0 (IoU .7: a duplicate), q2 covers GT 1 (IoU .6: a duplicate), q4 background (IoU .2).
# Layout: G0 0-1 | group 0: class 0 col 2, class 1 col 3, others 4 | group 1: class 2 col 5, others 6.
DUP_LOGITS = torch.tensor([[[1.0, 0.0, 2.0, 0.0, 1.0, 0.5, -0.5],
                            [0.5, 0.0, 1.0, 0.3, 0.2, -1.0, 0.4],
                            [0.2, 0.0, -0.5, 0.1, 0.6, 1.5, 0.0],
                            [1.5, 0.0, 0.0, -1.0, 0.3, 2.0, 0.1],
                            [-2.0, 0.0, 0.1, 0.2, 1.2, 0.0, 0.8]]], dtype=torch.float64)
DUP_MATCHES = [(torch.tensor([0, 3]), torch.tensor([0, 1]))]
DUP_TARGETS = [{"labels": torch.tensor([0, 2]), "boxes": torch.zeros(2, 4),
                "query_gt": torch.tensor([0, 0, 1, 1, 0]), "query_iou": torch.tensor([0.9, 0.7, 0.6, 0.8, 0.2])}]


@pytest.mark.parametrize("rule", ["gt_class", "exclude", "others"])
def test_duplicate_rules_one_matched_two_unmatched_per_group_by_hand(rule):
    """Each duplicate rule against numpy on the formulas (beta large: every candidate is an "others" sample).
    gt_class: a duplicate is a positive of its GT's class in the GT's group (and a foreign object elsewhere);
    exclude: left out of its GT's group; others (default): any unmatched query is an "others" candidate.
    G0 is the same for all three: only the matched queries are foreground."""
    import numpy as np

    head = GroupSoftmaxHead(D, [0, 0, 1], beta=100.0, g0_loss="ce", eos_coef=1.0, duplicates=rule)
    got = head.loss(DUP_LOGITS, DUP_MATCHES, DUP_TARGETS, num_boxes=2.0, layer="0")["loss_ce"].item()

    z = DUP_LOGITS[0].numpy()
    log_odds = z[:, 0] - z[:, 1]
    fg = np.array([1, 0, 0, 1, 0])
    g0 = np.mean(fg * np.log1p(np.exp(-log_odds)) + (1 - fg) * np.log1p(np.exp(log_odds)))  # BCE, weight 1

    def log_softmax(cols):
        x = z[:, cols]
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    g_a, g_b = log_softmax([2, 3, 4]), log_softmax([5, 6])  # group 0: class 0, class 1, others; group 1
    samples = {  # (query, column in its group) per group
        "gt_class": ([(0, 0), (1, 0), (2, 2), (3, 2), (4, 2)], [(3, 0), (2, 0), (0, 1), (1, 1), (4, 1)]),
        "exclude": ([(0, 0), (2, 2), (3, 2), (4, 2)], [(3, 0), (0, 1), (1, 1), (4, 1)]),
        "others": ([(0, 0), (1, 2), (2, 2), (3, 2), (4, 2)], [(3, 0), (0, 1), (1, 1), (2, 1), (4, 1)]),
    }[rule]
    group_a = -np.mean([g_a[q, c] for q, c in samples[0]])
    group_b = -np.mean([g_b[q, c] for q, c in samples[1]])
    assert got == pytest.approx(g0 + group_a + group_b, rel=1e-6)
    assert head.needs_query_overlaps == (rule != "others")


def test_duplicates_below_the_iou_threshold_and_on_the_encoder_are_ordinary_queries():
    base = GroupSoftmaxHead(D, [0, 0, 1], beta=100.0, duplicates="others")
    strict = GroupSoftmaxHead(D, [0, 0, 1], beta=100.0, duplicates="gt_class", duplicate_iou=0.95)
    loose = GroupSoftmaxHead(D, [0, 0, 1], beta=100.0, duplicates="gt_class")
    plain = [{k: v for k, v in DUP_TARGETS[0].items() if not k.startswith("query_")}]
    ref = base.loss(DUP_LOGITS, DUP_MATCHES, DUP_TARGETS, 2.0, layer="0")["loss_ce"]
    assert strict.loss(DUP_LOGITS, DUP_MATCHES, DUP_TARGETS, 2.0, layer="0")["loss_ce"] == ref  # IoU < .95
    assert loose.loss(DUP_LOGITS, DUP_MATCHES, plain, 2.0, layer="0")["loss_ce"] == ref  # no overlaps given
    assert loose.loss(DUP_LOGITS, DUP_MATCHES, DUP_TARGETS, 2.0, layer="enc")["loss_ce"] == ref  # encoder: as before
    assert loose.loss(DUP_LOGITS, DUP_MATCHES, DUP_TARGETS, 2.0, layer="0")["loss_ce"] != ref
    with pytest.raises(ValueError, match="duplicates"):
        GroupSoftmaxHead(D, [0, 0, 1], duplicates="positive")
    cats = categories([3, 15, 150])
    # the default: a duplicate is background to the set loss, so "others" in the groups (measured best at convergence)
    assert build_head(load_config(["head=bags"]).head, D, 3, categories=cats).duplicates == "others"
    assert build_head(load_config(["head=hybrid_bags"]).head, D, 3, categories=cats).duplicates == "others"
    assert GroupSoftmaxHead(D, [0, 0, 1]).duplicates == "others"
    old = load_config(["head=hybrid_bags"]).head  # a config saved before the option existed: the earlier rule
    OmegaConf.set_struct(old, False)
    del old["duplicates"], old["duplicate_iou"]
    assert build_head(old, D, 3, categories=cats).duplicates == "others"


def test_criterion_gives_query_overlaps_to_the_decoder_layers_of_heads_that_need_them():
    from stepwise.models.criterion import with_query_overlaps

    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.6, 0.5, 0.4, 0.4], [0.1, 0.1, 0.1, 0.1]]])  # cxcywh
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    out = with_query_overlaps(boxes, targets)[0]
    # q1 shifted by 0.1 of a 0.4 box: intersection 0.3 x 0.4, union 2 x 0.16 - 0.12
    assert out["query_iou"].tolist() == pytest.approx([1.0, 0.12 / 0.2, 0.0], abs=1e-6)
    assert out["query_gt"].tolist()[:2] == [0, 0] and "query_iou" not in targets[0]
    empty = with_query_overlaps(boxes, [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}])[0]
    assert empty["query_gt"].tolist() == [-1, -1, -1] and empty["query_iou"].tolist() == [0.0, 0.0, 0.0]

    seen = {}

    class Recording(GroupSoftmaxHead):
        def loss(self, logits, matches, targets, num_boxes, features=None, layer=""):
            seen[layer] = "query_iou" in targets[0]
            return super().loss(logits, matches, targets, num_boxes, features=features, layer=layer)

    for rule, expected in (("gt_class", {"": True, "0": True, "enc": False}),
                           ("others", {"": False, "0": False, "enc": False})):
        head = Recording(D, [0, 0, 1], duplicates=rule)
        criterion = SetCriterion(HungarianMatcher(), head, {"loss_ce": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0})
        logits = torch.randn(1, 3, head.num_outputs)
        outputs = DetectorOutput(logits=[logits, logits], boxes=[boxes, boxes], query_features=[None, None],
                                 enc_logits=logits, enc_boxes=boxes)
        seen.clear()
        criterion(outputs, targets)
        assert seen == expected
