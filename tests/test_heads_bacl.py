"""BACL head: margins, weights and FCBL on hand-computed 3-class examples, indicator and FHM updates,
class-drawing probabilities, the encoder objectness loss and the head state round trip."""

from __future__ import annotations

import copy
import io
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from stepwise.heads.bacl import BACLHead, fcbl, fcbl_weights
from stepwise.heads.fhm import FeatureHallucination, sampling_probs
from stepwise.heads.indicators import LongTermIndicators


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def make_head(**kw) -> BACLHead:
    torch.manual_seed(0)
    return BACLHead(4, 3, **kw)


def one_image(labels: list[int], query_idx: list[int]):
    """matches + targets for one image whose target t is matched to query query_idx[t]."""
    matches = [(torch.tensor(query_idx), torch.arange(len(labels)))]
    return matches, [{"labels": torch.tensor(labels), "boxes": torch.rand(len(labels), 4)}]


# ---------------------------------------------------------------------------------------------- margins
def test_confusion_margins_hand_computed():
    ind = LongTermIndicators(3, eps=1e-6, unseen_rows="uniform")  # stepwise's earlier floor and unseen rows
    ind.confusion_sum = torch.tensor([[1.2, 0.6, 0.2], [0.1, 0.8, 0.1], [0.0, 0.0, 0.0]], dtype=torch.float64)
    ind.class_count = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    # M rows: [.6 .3 .1], [.1 .8 .1], class 2 never seen -> uniform 1/3
    got = ind.log_ratio("confusion", torch.tensor([0, 1, 2]))
    third = 1 / 3
    expected = torch.tensor([
        [0.0, math.log(0.3 / 0.1), math.log(0.1 / third)],          # log(M_0j / M_j0)
        [math.log(0.1 / 0.3), 0.0, math.log(0.1 / third)],
        [math.log(third / 0.1), math.log(third / 0.1), 0.0]])
    assert torch.allclose(got, expected.float(), atol=1e-6)
    # class 1 absorbs class 0's samples (M_01 = .3 > M_10 = .1): 1 is the stronger class, so a sample of 0
    # suppresses 1 more (positive margin) and a sample of 1 suppresses 0 less (negative margin)
    assert got[0, 1] > 0 > got[1, 0]
    head = make_head(alpha=0.5, fhm=False)
    head.indicators = ind
    assert torch.allclose(head.margins(torch.tensor([0, 2])), 0.5 * expected[[0, 2]].float(), atol=1e-6)


def test_confusion_margins_public_clamp_and_zero_rows():
    """The public code's FCBL: M = cm_numerator / num_gt.clamp(min=1) (a class never seen has a row of zeros)
    and both M_ij and M_ji clamped at 1e-3 before the log ratio (the defaults)."""
    ind = LongTermIndicators(3)
    assert (ind.eps, ind.unseen_rows) == (1e-3, "zero")
    ind.confusion_sum = torch.tensor([[1.2, 0.6, 0.2], [0.1, 0.8, 0.1], [0.0, 0.0, 0.0]], dtype=torch.float64)
    ind.class_count = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    assert ind.confusion()[2].tolist() == [0.0, 0.0, 0.0] and ind.accuracy()[2].item() == 0.0
    got = ind.log_ratio("confusion", torch.tensor([0, 2]))
    expected = torch.tensor([[0.0, math.log(0.3 / 0.1), math.log(0.1 / 1e-3)],   # M_20 = 0 -> 1e-3
                             [math.log(1e-3 / 0.1), math.log(1e-3 / 0.1), 0.0]])  # M_2j = 0 -> 1e-3, M_j2 = .1 .1
    assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="unseen_rows"):
        LongTermIndicators(3, unseen_rows="ones")


@pytest.mark.parametrize("name", ["image_freq", "instance_freq"])
def test_frequency_margins(name):
    ind = LongTermIndicators(3, image_counts=[100, 10, 0], instance_counts=[400, 20, 5])
    counts = [100.0, 10.0, 1.0] if name == "image_freq" else [400.0, 20.0, 5.0]  # zero floored at 1
    got = ind.log_ratio(name, torch.tensor([1]))
    expected = [math.log(c / counts[1]) for c in counts]  # log(l_j / l_i), i = 1
    assert torch.allclose(got, torch.tensor([expected]), atol=1e-6)
    assert got[0, 0] > 0 > got[0, 2]  # frequent j: suppressed more; rare j: less
    with pytest.raises(ValueError, match="counts"):
        LongTermIndicators(3).log_ratio(name, torch.tensor([0]))


def test_dynamic_vector_indicators():
    ind = LongTermIndicators(3)
    ind.class_count = torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64)
    ind.tpr_hits = torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64)
    ind.score_ema = torch.tensor([0.8, 0.2, 0.0])
    assert torch.allclose(ind.vector("instance_count"), torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
    # unseen class 2 counts as the mean of the seen ones
    assert torch.allclose(ind.vector("tpr"), torch.tensor([0.75, 0.5, 0.625], dtype=torch.float64))
    assert torch.allclose(ind.vector("score"), torch.tensor([0.8, 0.2, 0.5], dtype=torch.float64))
    ind.eps = 1e-3
    ind.tpr_hits[1] = 0.0  # TPR 0 is floored at eps before the log
    assert ind.log_ratio("tpr", torch.tensor([1]))[0, 0].item() == pytest.approx(math.log(0.75 / 1e-3), abs=1e-5)


# ----------------------------------------------------------------------------------------- weights, FCBL
def test_weights_score_vs_sigmoid():
    z = torch.tensor([[1.0, 2.0, -1.0], [3.0, 1.0, 1.5]])
    bg = torch.tensor([-2.0, 0.0])
    gt = torch.tensor([0, 0])
    # row 0: scores (1 - p_bg) p = .644 .776 .237 -> class 1 beats the GT; class 2 below GT and 0.7
    # row 1: p_bg = .5, scores .476 .366 .409 -> none; raw sigmoids .953 .731 .818 -> both >= 0.7
    assert fcbl_weights(z, bg, gt, 0.7, "score").tolist() == [[0, 1, 0], [0, 0, 0]]
    assert fcbl_weights(z, bg, gt, 0.7, "sigmoid").tolist() == [[0, 1, 0], [0, 1, 1]]
    # the threshold alone: a class below the GT but above 0.7 is kept
    z2, bg2 = torch.tensor([[4.0, 2.0, -3.0]]), torch.tensor([-5.0])  # scores .976 .874 .047
    assert fcbl_weights(z2, bg2, torch.tensor([0]), 0.7, "score").tolist() == [[0, 1, 0]]
    assert fcbl_weights(z2, bg2, torch.tensor([0]), 0.9, "score").tolist() == [[0, 0, 0]]


def test_fcbl_hand_computed():
    z = torch.tensor([[1.0, 2.0, -1.0]])
    bg = torch.tensor([-2.0])
    margins = torch.tensor([[0.0, 0.5, -0.3]])
    weights = torch.tensor([[0.0, 1.0, 1.0]])
    expected = (-math.log(sig(1.0)) - math.log(1 - sig(-2.0)) - math.log(1 - sig(2.0 + 0.5))
                - math.log(1 - sig(-1.0 - 0.3)))
    got = fcbl(z, bg, torch.tensor([0]), margins, weights)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    weights[0, 2] = 0.0
    assert fcbl(z, bg, torch.tensor([0]), margins, weights).item() == pytest.approx(
        expected + math.log(1 - sig(-1.3)), rel=1e-5)


def test_head_loss_updates_indicators_first_then_fcbl():
    """Train mode, layer "": the step's samples enter the indicator before the loss uses it."""
    head = make_head(alpha=0.5, indicator="instance_count", unmatched="background", bg_gamma=2.0, fg_gamma=0.0,
                     fhm=False)
    head.indicators.class_count = torch.tensor([9.0, 3.0, 0.0], dtype=torch.float64)
    logits = torch.tensor([[[1.0, -1.0, 0.5, -2.0],     # query 0 -> class 0
                            [0.0, 0.0, 0.0, 1.0],       # query 1 unmatched
                            [-0.5, 2.0, 0.2, -1.0]]],   # query 2 -> class 2
                          requires_grad=True)
    matches, targets = one_image([0, 2], [0, 2])
    losses = head.loss(logits, matches, targets, num_boxes=2.0, features=None, layer="")
    assert head.indicators.class_count.tolist() == [10.0, 3.0, 1.0]
    counts = [10.0, 3.0, 1.0]
    # query 0 (class 0): p = .731 .269 .622, p_bg = .119; scores all below the GT's -> weights 0
    q0 = -math.log(sig(1.0)) - math.log(1 - sig(-2.0))
    # query 2 (class 2): p = .378 .881 .550 -> class 1 beats the GT (w = 1), class 0 does not
    d21 = 0.5 * math.log(counts[1] / counts[2])
    q2 = -math.log(sig(0.2)) - math.log(1 - sig(-1.0)) - math.log(1 - sig(2.0 + d21))
    q1 = (1 - sig(1.0)) ** 2 * -math.log(sig(1.0))  # unmatched: background channel only, focal-modulated
    assert set(losses) == {"loss_ce"}
    assert losses["loss_ce"].item() == pytest.approx((q0 + q1 + q2) / 2.0, rel=1e-5)
    losses["loss_ce"].backward()
    assert logits.grad[0, 1, :3].abs().sum() == 0  # unmatched queries train only the background channel
    assert logits.grad[0, 0, 1] == 0 and logits.grad[0, 2, 1] != 0  # w_j = 0 / 1


def test_eq2_background_one_matched_two_unmatched_by_hand():
    """Plain BCE (``head=bacl_plain``): an unmatched query gets the paper's Eq. 2 on every channel,
    -log p_bg - sum_j log(1 - p_j); the matched one FCBL. 3 classes, 1 matched + 2 unmatched queries,
    instance-count indicator."""
    head = make_head(alpha=0.5, indicator="instance_count", fhm=False, bg_gamma=0.0, fg_gamma=0.0)
    assert head.unmatched == "eq2"
    head.indicators.class_count = torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64)
    logits = torch.tensor([[[0.3, 1.5, -0.4, -1.0],     # query 0 unmatched
                            [2.0, -1.0, 0.1, -2.0],     # query 1 -> class 0
                            [-0.2, 0.4, 1.0, 0.5]]],    # query 2 unmatched
                          requires_grad=True)
    matches, targets = one_image([0], [1])
    loss = head.loss(logits, matches, targets, num_boxes=1.0, features=None, layer="")["loss_ce"]
    # query 1: p = .881 .269 .525, p_bg = .119 -> scores s_j = (1 - p_bg) p_j: .776 .237 .462; none >= s_gt
    # or >= 0.7 -> all weights 0 (so the margins do not enter): FCBL = -log p_0 - log(1 - p_bg)
    matched = -math.log(sig(2.0)) - math.log(1 - sig(-2.0))
    def eq2(z, z_bg):
        return -math.log(sig(z_bg)) - sum(math.log(1 - sig(v)) for v in z)
    expected = matched + eq2([0.3, 1.5, -0.4], -1.0) + eq2([-0.2, 0.4, 1.0], 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert logits.grad[0, 0, :3].abs().min() > 0  # unmatched queries push every foreground sigmoid down
    # with a focal factor: -(1 - p_bg)^2 log p_bg - sum_j p_j^2 log(1 - p_j)
    focal = make_head(alpha=0.5, indicator="instance_count", fhm=False, bg_gamma=2.0, fg_gamma=0.0)
    focal.indicators.class_count = torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64)
    got = focal.loss(logits.detach(), matches, targets, num_boxes=1.0, layer="")["loss_ce"].item()
    def eq2_focal(z, z_bg):
        return (-(1 - sig(z_bg)) ** 2 * math.log(sig(z_bg))
                - sum(sig(v) ** 2 * math.log(1 - sig(v)) for v in z))
    assert got == pytest.approx(matched + eq2_focal([0.3, 1.5, -0.4], -1.0) + eq2_focal([-0.2, 0.4, 1.0], 0.5),
                                rel=1e-5)
    with pytest.raises(ValueError, match="unmatched"):
        make_head(unmatched="focal")


def test_aux_layers_and_eval_do_not_update():
    head = make_head(fhm=True)
    logits = torch.randn(1, 3, 4)
    feats = torch.randn(1, 3, 4)
    matches, targets = one_image([1], [0])
    head.loss(logits, matches, targets, 1.0, features=feats, layer="0")
    head.eval()
    out = head.loss(logits, matches, targets, 1.0, features=feats, layer="")
    assert head.indicators.class_count.sum() == 0 and head.fhm.count.sum() == 0
    assert out["loss_fhm"].item() == 0.0
    head.train()
    head.loss(logits, matches, targets, 1.0, features=feats, layer="")
    assert head.fhm.count.tolist() == [0.0, 1.0, 0.0]
    # 1 real sample + c * m synthetic ones (only class 1 has statistics to draw from)
    assert head.indicators.class_count.tolist() == [0.0, 1.0 + 12, 0.0]


def test_nothing_matched_stays_connected():
    head = make_head()
    logits = torch.randn(2, 3, 4, requires_grad=True)
    matches = [(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))] * 2
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    losses = head.loss(logits, matches, targets, 1.0, features=torch.randn(2, 3, 4), layer="")
    assert set(losses) == {"loss_ce", "loss_fhm"} and head.loss_weights == {"loss_fhm": 1.0}
    (losses["loss_ce"] + losses["loss_fhm"]).backward()
    assert logits.grad is not None


def test_ignored_queries_get_no_loss():
    head = make_head(fhm=False)
    logits = torch.randn(1, 3, 4, requires_grad=True)
    matches, targets = one_image([0], [0])
    targets[0]["ignore_queries"] = torch.tensor([False, True, False])
    head.loss(logits, matches, targets, 1.0, layer="0")["loss_ce"].backward()
    assert logits.grad[0, 1].abs().sum() == 0 and logits.grad[0, 2, 3] != 0


def test_encoder_objectness_hand_computed():
    head = make_head()
    logits = torch.tensor([[[2.0, 5.0, 5.0, -1.0], [-1.0, 5.0, 5.0, 0.5]]], requires_grad=True)
    matches, targets = one_image([0], [0])
    loss = head.loss(logits, matches, targets, 2.0, layer="enc")["loss_ce"]

    def focal(x: float, t: int) -> float:
        p = sig(x)
        pt, at = (p, 0.25) if t else (1 - p, 0.75)
        return -at * (1 - pt) ** 2 * math.log(pt)

    # channel 0 and -z_bg both learn "object"; the other class channels are untouched
    expected = (focal(2.0, 1) + focal(1.0, 1) + focal(-1.0, 0) + focal(-0.5, 0)) / 2.0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert logits.grad[..., 1:3].abs().sum() == 0
    assert head.indicators.class_count.sum() == 0


# --------------------------------------------------------------------------------------- indicator update
def test_indicator_update_hand_computed():
    ind = LongTermIndicators(3, momentum=0.5, unseen_rows="uniform")
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    ind.update(z, torch.tensor([0, 0, 2]))
    e = math.exp
    soft = [[e(2) / (e(2) + 2), 1 / (e(2) + 2), 1 / (e(2) + 2)],
            [1 / (e(1) + 2), e(1) / (e(1) + 2), 1 / (e(1) + 2)],
            [1 / (e(3) + 2), 1 / (e(3) + 2), e(3) / (e(3) + 2)]]
    row0 = [(a + b) / 2 for a, b in zip(soft[0], soft[1])]
    expected = torch.tensor([row0, [1 / 3] * 3, soft[2]], dtype=torch.float64)
    assert torch.allclose(ind.confusion(), expected, atol=1e-6)
    assert ind.class_count.tolist() == [2.0, 0.0, 1.0]
    assert ind.tpr_hits.tolist() == [1.0, 0.0, 1.0]  # sample 2 of class 0 predicts class 1
    s0 = (sig(2.0) + sig(0.0)) / 2  # first observation copied
    assert ind.score_ema.tolist() == pytest.approx([s0, 0.0, sig(3.0)], rel=1e-6)
    ind.update(torch.tensor([[-1.0, 0.0, 0.0]]), torch.tensor([0]))
    assert ind.score_ema[0].item() == pytest.approx(0.5 * s0 + 0.5 * sig(-1.0), rel=1e-6)
    assert ind.score_ema[2].item() == pytest.approx(sig(3.0), rel=1e-6)  # absent classes keep theirs
    assert ind.accuracy()[0].item() == pytest.approx(
        (soft[0][0] + soft[1][0] + e(-1) / (e(-1) + 2)) / 3, rel=1e-6)


# ----------------------------------------------------------------------------------------------------- FHM
def test_fhm_statistics_known_features():
    fhm = FeatureHallucination(3, 2, momentum=0.5)
    fhm.update(torch.tensor([[1.0, 2.0], [3.0, 4.0], [7.0, 7.0]]), torch.tensor([0, 0, 2]))
    assert fhm.mean.tolist() == [[2.0, 3.0], [0.0, 0.0], [7.0, 7.0]]  # first observation copied
    assert fhm.var.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]   # population variance
    fhm.update(torch.tensor([[4.0, 3.0]]), torch.tensor([0]))
    # mean .5 [2 3] + .5 [4 3]; var .5 [1 1] + .5 * 0 + .25 ([4 3] - [2 3])^2
    assert fhm.mean.tolist() == [[3.0, 3.0], [0.0, 0.0], [7.0, 7.0]]
    assert fhm.var.tolist() == [[1.5, 0.5], [0.0, 0.0], [0.0, 0.0]]
    assert fhm.count.tolist() == [3.0, 0.0, 1.0]


def test_head_feeds_fhm_from_matched_final_features_only():
    head = make_head(fhm_momentum=0.5)
    feats = torch.arange(12.0).view(1, 3, 4)
    matches, targets = one_image([2], [1])
    head.loss(torch.randn(1, 3, 4), matches, targets, 1.0, features=feats, layer="")
    assert head.fhm.mean[2].tolist() == [4.0, 5.0, 6.0, 7.0] and head.fhm.count.tolist() == [0.0, 0.0, 1.0]


def test_sampling_probabilities():
    acc = torch.tensor([0.9, 0.5, 0.2, 1.0])
    avail = torch.tensor([True, True, False, True])
    assert sampling_probs(acc, avail).tolist() == pytest.approx([1 / 6, 5 / 6, 0.0, 0.0])
    assert sampling_probs(torch.tensor([1.0, 1.0, 0.3]), torch.tensor([True, True, False])).tolist() == [0.5, 0.5, 0]
    assert sampling_probs(acc, torch.zeros(4, dtype=torch.bool)).sum() == 0


def test_fhm_sample_draws_by_probability():
    fhm = FeatureHallucination(4, 2, num_sampled=1, per_class=3)
    fhm.mean = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [0.0, 0.0]])
    fhm.count = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)  # class 3: no statistics
    acc = torch.tensor([0.9, 0.6, 0.0, 0.0])  # weights .1 .4 1 -> probabilities 1/15, 4/15, 10/15
    torch.manual_seed(0)
    draws = torch.stack([fhm.sample(acc)[1][0] for _ in range(3000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq.tolist() == pytest.approx([1 / 15, 4 / 15, 10 / 15, 0.0], abs=0.03)
    feats, labels = fhm.sample(acc)
    assert feats.shape == (3, 2) and (labels == labels[0]).all()
    assert torch.equal(feats, fhm.mean[labels])  # zero variance: exactly the mean

    fhm.num_sampled, fhm.var = 8, torch.full((4, 2), 4.0)
    torch.manual_seed(1)
    feats, labels = fhm.sample(acc)
    assert sorted(labels.unique().tolist()) == [0, 1, 2] and len(labels) == 9  # k = min(c, available)
    torch.manual_seed(1)
    again = fhm.sample(acc)
    assert torch.equal(feats, again[0]) and torch.equal(labels, again[1])  # deterministic given the seed
    torch.manual_seed(2)
    big = FeatureHallucination(1, 1, num_sampled=1, per_class=20000)
    big.mean, big.var, big.count = torch.tensor([[5.0]]), torch.tensor([[4.0]]), torch.ones(1, dtype=torch.float64)
    x = big.sample(torch.zeros(1))[0]
    assert x.mean().item() == pytest.approx(5.0, abs=0.05) and x.std().item() == pytest.approx(2.0, abs=0.05)


# ------------------------------------------------------------------------------------ init, build, state
def test_prior_init_and_scores():
    head = make_head()  # p_fg 0.01 (Deformable DETR's), p_bg 0.99 (the background's share of the queries)
    logits = head(torch.zeros(2, 4))
    assert torch.allclose(head.scores(logits), torch.full((2, 3), 0.01 * 0.01), rtol=1e-4)
    public = make_head(prior_prob=0.001, bg_prior_prob=0.001)  # the public code: every channel at 0.001
    z = public(torch.zeros(2, 4))
    assert torch.allclose(z.sigmoid(), torch.full((2, 4), 0.001), rtol=1e-4)
    assert torch.allclose(public.scores(z), torch.full((2, 3), 0.999 * 0.001), rtol=1e-4)
    assert head.num_outputs == 4 and head.class_weight_rows().shape == (3, 4)
    assert torch.equal(head.class_weight_rows(), head.linear.weight[:3])
    assert torch.equal(head.class_logits(logits), logits[:, :3])  # background column dropped


def test_build_from_config_with_categories():
    from stepwise.config import load_config
    from stepwise.heads import build_head

    cfg = load_config(["head=bacl", "head.indicator=instance_freq", "head.fhm=false"])
    cats = SimpleNamespace(image_counts=(5, 2, 1), instance_counts=(50, 4, 1))
    head = build_head(cfg.head, 4, 3, categories=cats)
    assert isinstance(head, BACLHead) and head.fhm is None and head.loss_weights == {}
    assert head.indicators.instance_counts.tolist() == [50.0, 4.0, 1.0]
    assert head.alpha == 0.85 and head.weight_threshold == 0.7
    with pytest.raises(ValueError, match="indicator"):
        BACLHead(4, 3, indicator="bogus")


def test_state_round_trip_and_validation():
    head = make_head()
    assert head.state == {}  # nothing recorded yet: the fresh statistics, nothing to carry
    head.indicators.update(torch.randn(5, 3), torch.tensor([0, 1, 1, 2, 0]))
    head.fhm.update(torch.randn(5, 4), torch.tensor([0, 1, 1, 2, 0]))
    buf = io.BytesIO()
    torch.save(head.state, buf)  # checkpoints load with weights_only=True
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    fresh = BACLHead(4, 3)
    fresh.load_state(state)
    for key, value in head.state.items():
        assert torch.equal(fresh.state[key], value), key
    assert torch.equal(copy.deepcopy(fresh).state["fhm.mean"], head.fhm.mean)  # deep-copyable

    before = fresh.state
    fresh.load_state({})  # weights of another head: statistics kept
    assert all(torch.equal(before[k], fresh.state[k]) for k in before)
    with pytest.raises(ValueError, match="indicators.confusion_sum"):
        BACLHead(4, 5).load_state(state)
    with pytest.raises(ValueError, match="fhm.mean"):
        BACLHead(6, 3).load_state(state)
    with pytest.raises(ValueError, match="lacks 'fhm.var'"):
        BACLHead(4, 3).load_state({k: v for k, v in state.items() if k != "fhm.var"})
    with pytest.raises(ValueError, match="unknown keys"):
        BACLHead(4, 3).load_state({**state, "bogus": torch.zeros(1)})
    no_fhm = BACLHead(4, 3, fhm=False)
    no_fhm.load_state(state)  # FHM statistics are ignored when FHM is off
    assert "fhm.mean" not in no_fhm.state

    head.reset_parameters()
    assert head.indicators.class_count.sum() == 0 and head.fhm.count.sum() == 0


def test_detector_checkpoint_carries_owner_state():
    from stepwise.checkpoint import head_state, restore_head_state
    from stepwise.config import load_config
    from stepwise.models import build_detector
    from stepwise.models.criterion import build_criterion

    cfg = load_config(["head=bacl", "model.enc_layers=1", "model.dec_layers=2", "model.num_queries=10"])
    torch.manual_seed(0)
    model = build_detector(cfg.model, cfg.head, 5).model
    owner = model.class_embed[1]
    criterion = build_criterion(cfg.loss, owner, num_layers=2, two_stage=bool(cfg.model.two_stage))
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[.3, .3, .2, .2], [.6, .6, .3, .3]])}]
    losses = criterion(model(torch.randn(1, 3, 64, 64)), targets)
    assert {"loss_ce", "loss_fhm", "loss_ce_0", "loss_ce_enc"} <= set(losses)
    criterion.total(losses).backward()
    assert owner.indicators.class_count[[1, 3]].tolist() == [13.0, 13.0]  # 1 real + 12 synthetic each
    assert model.class_embed[0].indicators.class_count.sum() == 0       # copies stay untouched
    states = head_state(model)
    assert states["class_embed.0"] == {} and states["class_embed.2"] == {}  # copies: fresh statistics
    other = build_detector(cfg.model, cfg.head, 5).model
    restore_head_state(other, states)
    assert torch.equal(other.class_embed[1].indicators.confusion_sum, owner.indicators.confusion_sum.cpu())


# ------------------------------------------------------------------------ loss forms, 1 matched + 2 unmatched
def _forms_example():
    """One image, 3 classes, 3 queries: q0 matched to class 1, q1 and q2 unmatched. Confusion indicator with
    class 2 never seen; logits (C + 1, background last)."""
    logits = torch.tensor([[[1.5, 0.5, 0.8, -1.0],     # q0 -> class 1
                            [0.3, -2.0, 1.0, 0.5],      # q1 unmatched
                            [-1.0, 0.2, -0.3, 2.0]]],   # q2 unmatched
                          dtype=torch.float64)
    matches, targets = one_image([1], [0])
    return logits, matches, targets


def _forms_indicators(head: BACLHead) -> None:
    head.indicators.confusion_sum = torch.tensor([[1.2, 0.6, 0.2], [0.8, 2.8, 0.4], [0.0, 0.0, 0.0]],
                                                 dtype=torch.float64)
    head.indicators.class_count = torch.tensor([2.0, 4.0, 0.0], dtype=torch.float64)


def _numpy_forms(gamma_fg: float, gamma_bg: float, eps: float, unseen: float) -> tuple[float, float]:
    """(numerator, number of queries) of the BACL loss of :func:`_forms_example`, in numpy from the formulas."""
    import numpy as np

    z = np.array([[1.5, 0.5, 0.8, -1.0], [0.3, -2.0, 1.0, 0.5], [-1.0, 0.2, -0.3, 2.0]])
    sp = lambda x: np.log1p(np.exp(x))  # noqa: E731  softplus: -log(1 - sigmoid(x)) = sp(x), -log sigmoid(x) = sp(-x)
    sg = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    M = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [unseen] * 3])  # rows: sums / counts
    alpha, gt = 0.85, 1
    # matched q0: scores (1 - p_bg) p_j = .598 .455 .504 -> w_0 = w_2 = 1 (>= the GT's .455), w_1 = 0
    p, p_bg = sg(z[0, :3]), sg(z[0, 3])
    s = (1 - p_bg) * p
    w = ((s >= s[gt]) | (s >= 0.7)).astype(float)
    w[gt] = 0.0
    assert w.tolist() == [1.0, 0.0, 1.0]
    delta = alpha * np.log(np.maximum(M[gt], eps) / np.maximum(M[:, gt], eps))
    shifted = z[0, :3] + delta
    matched = ((1 - p[gt]) ** gamma_fg * sp(-z[0, gt]) + p_bg ** gamma_fg * sp(z[0, 3])
               + np.sum(w * sg(shifted) ** gamma_fg * sp(shifted)))
    unmatched = sum((1 - sg(q[3])) ** gamma_bg * sp(-q[3]) + np.sum(sg(q[:3]) ** gamma_bg * sp(q[:3])) for q in z[1:])
    return float(matched + unmatched), 3.0


@pytest.mark.parametrize("form", ["plain", "focal", "plain_queries", "focal_queries", "plain_earlier"])
def test_loss_forms_one_matched_two_unmatched_by_hand(form):
    """Each loss form against numpy on the formulas: plain BCE (the paper's Eq. 2 + FCBL), focal factors on
    both (the default, gamma 2), normalised by num_boxes or by the queries considered; ``plain_earlier`` is
    head=bacl_plain's indicator floor 1e-6 with uniform unseen rows."""
    gamma = 2.0 if form.startswith("focal") else 0.0
    normalize = "queries" if form.endswith("queries") else "num_boxes"
    earlier = form == "plain_earlier"
    head = make_head(fhm=False, bg_gamma=gamma, fg_gamma=gamma, normalize=normalize,
                     **({"eps": 1e-6, "unseen_rows": "uniform"} if earlier else {}))
    _forms_indicators(head)
    logits, matches, targets = _forms_example()
    got = head.loss(logits, matches, targets, num_boxes=2.0, layer="0")["loss_ce"].item()  # layer 0: no update
    numerator, queries = _numpy_forms(gamma, gamma, 1e-6 if earlier else 1e-3, 1 / 3 if earlier else 0.0)
    assert got == pytest.approx(numerator / (queries if normalize == "queries" else 2.0), rel=1e-6)  # float32 loss


def test_default_form_is_focal_with_the_public_codes_clamp_and_rows():
    from stepwise.config import load_config
    from stepwise.heads import build_head

    head = build_head(load_config(["head=bacl"]).head, 4, 3)
    assert (head.bg_gamma, head.fg_gamma, head.normalize, head.unmatched) == (2.0, 2.0, "num_boxes", "eq2")
    assert (head.indicators.eps, head.indicators.unseen_rows, head.prior_prob, head.bg_prior_prob) == (
        1e-3, "zero", 0.01, 0.99)
    plain = build_head(load_config(["head=bacl_plain"]).head, 4, 3)  # one key away: the recorded rows' head
    assert (plain.bg_gamma, plain.fg_gamma, plain.normalize) == (0.0, 0.0, "num_boxes")
    assert (plain.indicators.eps, plain.indicators.unseen_rows, plain.prior_prob, plain.bg_prior_prob) == (
        1e-6, "uniform", 0.01, 0.99)
    old = load_config(["head=bacl_plain"]).head  # a config saved before the new keys existed: the old behaviour
    OmegaConf.set_struct(old, False)
    for key in ("fg_gamma", "normalize", "unseen_rows"):
        del old[key]
    rebuilt = build_head(old, 4, 3)
    assert (rebuilt.fg_gamma, rebuilt.normalize, rebuilt.indicators.unseen_rows) == (0.0, "num_boxes", "uniform")
    with pytest.raises(ValueError, match="normalize"):
        make_head(normalize="rois")
    with pytest.raises(ValueError, match="focal"):
        make_head(fg_gamma=-1.0)


def test_focal_factors_take_the_easy_unmatched_queries_out():
    """The reason for the focal form: with ~97 % unmatched queries, plain Eq. 2 on confident background
    queries still sends gradient to every channel; the focal factors shrink it by p^2 (and (1 - p_bg)^2)."""
    logits = torch.full((1, 20, 4), -4.0, dtype=torch.float64)  # confident background: p_j = .018, p_bg = .982
    logits[..., -1] = 4.0
    logits[0, 0] = torch.tensor([3.0, -3.0, -3.0, -3.0], dtype=torch.float64)  # one confident match, class 0
    logits.requires_grad_(True)
    matches, targets = one_image([0], [0])
    grads = {}
    for gamma in (0.0, 2.0):
        head = make_head(fhm=False, bg_gamma=gamma, fg_gamma=gamma)
        logits.grad = None
        head.loss(logits, matches, targets, num_boxes=1.0, layer="0")["loss_ce"].backward()
        grads[gamma] = logits.grad[0, 1:].abs().sum().item()
    assert grads[2.0] < 0.01 * grads[0.0]
