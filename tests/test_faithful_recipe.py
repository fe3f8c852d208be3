"""The step-wise method's own sampling and losses, checked against numbers worked out by hand:
step-wise RFS (the public samplers' per-group rules), L_fm per (level, image), shared-query KL on every
decoder layer."""

from __future__ import annotations

import math

import pytest
import torch

from stepwise.data.samplers import (GroupRule, class_groups, group_names, image_repeat_factors,
                                    repeat_factor_report, stepwise_class_factors)
from stepwise.distill_losses import DistillCriterion, class_distillation_loss, masked_feature_loss

D_HEAD = GroupRule.parse([{"max_images": 29, "threshold": 0.003, "power": 0.5},
                          {"max_images": 100, "threshold": 0.003, "power": 0.3}])
D_TAIL = GroupRule.parse([{"max_images": 29, "threshold": 0.0015, "power": 1.0}])

# Image counts of 8 classes in the full training file: both sides of every boundary (10, 30, 100 images).
FULL_COUNTS = [9, 10, 29, 30, 100, 101, 5000, 3]
IN_REPLAY = {0: 1, 1: 2, 2: 3, 3: 1, 4: 6, 5: 1}  # images of each class in the replay set (class 7: none)


def replay_set() -> list[set[int]]:
    """2,000 images: classes 0..5 in disjoint images 0..13 (IN_REPLAY), class 6 in images 0..1499."""
    images: list[set[int]] = [set() for _ in range(2000)]
    start = 0
    for c, n in IN_REPLAY.items():
        for i in range(start, start + n):
            images[i].add(c)
        start += n
    for i in range(1500):
        images[i].add(6)
    return images


def test_groups_follow_full_file_counts_at_every_boundary():
    assert class_groups(FULL_COUNTS, D_HEAD).tolist() == [0, 0, 0, 1, 1, 2, 2, 0]
    assert class_groups(FULL_COUNTS, D_TAIL).tolist() == [0, 0, 0, 1, 1, 1, 1, 0]
    assert group_names(D_HEAD) == ["<=29 images", "30-100 images", ">100 images"]
    assert group_names(D_TAIL) == ["<=29 images", ">29 images"]
    with pytest.raises(ValueError, match="ascend"):
        GroupRule.parse([{"max_images": 100, "threshold": 0.003, "power": 0.3},
                         {"max_images": 29, "threshold": 0.003, "power": 0.5}])
    with pytest.raises(ValueError, match="missing"):
        GroupRule.parse([{"max_images": 29, "power": 0.5}], where="stepwise.rfs.d_head")


def test_d_head_factors_by_hand():
    images = replay_set()
    f, r, _ = stepwise_class_factors(images, FULL_COUNTS, D_HEAD)
    assert f.tolist() == pytest.approx([1 / 2000, 2 / 2000, 3 / 2000, 1 / 2000, 6 / 2000, 1 / 2000, 0.75, 0.0])
    # t / f = 0.003 * 2000 / n = 6 / n
    assert r.tolist() == pytest.approx([math.sqrt(6), math.sqrt(3), math.sqrt(2),  # <= 29 images: power 0.5
                                        6 ** 0.3, 1.0,                              # 30-100 images: power 0.3
                                        1.0, 1.0,                                   # > 100 images: r = 1
                                        1.0])                                       # absent
    factors = image_repeat_factors(images, r, "ceil")
    # image 0: classes 0 and 6 -> ceil(2.449) = 3; 1-2: ceil(1.732) = 2; 3-5: ceil(1.414) = 2;
    # 6: ceil(6 ** 0.3 = 1.71) = 2; 7-12: class 4 at exactly r = 1 -> 1; the rest 1
    assert factors[:14].tolist() == [3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    assert factors[14:].eq(1).all() and factors.sum().item() == 2000 + 2 + 2 + 3 + 1
    stochastic = image_repeat_factors(images, r, "stochastic")
    assert stochastic[0].item() == pytest.approx(math.sqrt(6)) and stochastic[6].item() == pytest.approx(6 ** 0.3)


def test_d_tail_factors_by_hand():
    images = replay_set()
    f, r, _ = stepwise_class_factors(images, FULL_COUNTS, D_TAIL)
    # t / f = 0.0015 * 2000 / n = 3 / n for classes with <= 29 full-file images, power 1; the rest r = 1
    assert r.tolist() == pytest.approx([3.0, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    factors = image_repeat_factors(images, r, "ceil")
    assert factors[:6].tolist() == [3, 2, 2, 1, 1, 1] and factors.sum().item() == 2000 + 2 + 1 + 1


def test_repeat_factor_report_counts_what_each_group_gained():
    images = replay_set()
    f, r, group = stepwise_class_factors(images, FULL_COUNTS, D_HEAD)
    factors = image_repeat_factors(images, r, "ceil")
    ids = [101, 102, 103, 104, 105, 106, 107, 108]
    report = repeat_factor_report(images, factors, f, r, group, group_names(D_HEAD), ids, FULL_COUNTS,
                                  epoch_length=2000)
    assert (report["num_images"], report["repeated_length"], report["epoch_length"]) == (2000, 2008, 2000)
    # images go to the group of their class with the largest r: 0-5 (classes 0-2) -> <=29, factors 3+2*5 = 13;
    # 6 (class 3) and 7-12 (class 4 at r = 1, beating class 6 on the lower index) -> 30-100, 2 + 6 = 8;
    # 13 (class 5) and 14-1499 (class 6) -> >100, 1487; 1500-1999 hold no class. An epoch keeps 2000 of 2008.
    scale = 2000 / 2008
    assert report["groups"] == [
        {"group": "<=29 images", "classes": 4, "images": 6, "repeated_images": 6,
         "samples_per_epoch": round(13 * scale, 3), "uniform_samples_per_epoch": 6.0},
        {"group": "30-100 images", "classes": 2, "images": 7, "repeated_images": 1,
         "samples_per_epoch": round(8 * scale, 3), "uniform_samples_per_epoch": 7.0},
        {"group": ">100 images", "classes": 2, "images": 1487, "repeated_images": 0,
         "samples_per_epoch": round(1487 * scale, 3), "uniform_samples_per_epoch": 1487.0}]
    assert report["categories"]["101"] == {"group": "<=29 images", "full_image_count": 9, "f": 0.0005,
                                           "r": pytest.approx(math.sqrt(6))}
    assert report["categories"]["108"]["f"] == 0.0 and report["categories"]["108"]["r"] == 1.0
    whole = repeat_factor_report(images, factors, f, r, group, group_names(D_HEAD), ids, FULL_COUNTS)
    assert whole["epoch_length"] == 2008 and whole["groups"][0]["samples_per_epoch"] == 13.0


def test_sampler_epoch_of_replay_set_length_draws_from_the_repeated_list():
    from stepwise.data.samplers import RepeatFactorSampler

    factors = torch.tensor([3.0, 1.0, 1.0, 1.0])  # repeated list: 0, 0, 0, 1, 2, 3
    sampler = RepeatFactorSampler(factors, seed=1, epoch_length=4)
    seen = torch.zeros(4)
    for epoch in range(400):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert len(indices) == len(sampler) == 4
        seen += torch.bincount(torch.tensor(indices), minlength=4)
    # each of the 6 list entries is kept with probability 4/6: image 0 gets 3 x 4/6 = 2 samples per epoch
    assert (seen / 400).tolist() == pytest.approx([2.0, 2 / 3, 2 / 3, 2 / 3], abs=0.06)
    assert RepeatFactorSampler(factors, epoch_length=4).expected_length == 4
    with pytest.raises(ValueError, match="epoch_length"):
        RepeatFactorSampler(factors, epoch_length=0)


# ------------------------------------------------------------------------------------------------ L_fm
def test_feature_loss_per_level_and_image_by_hand():
    """2 levels x 2 images; image 1 has no head box on level 1 (that pair counts 0)."""
    s0, s1 = torch.zeros(2, 1, 2, 2, requires_grad=True), torch.zeros(2, 1, 1, 2, requires_grad=True)
    t0 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    t1 = torch.tensor([[[[5.0, 1.0]]], [[[7.0, 7.0]]]])
    m0 = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    m1 = torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]]])
    loss = masked_feature_loss([s0, s1], [t0, t1], [m0, m1])
    # (level 0, image 0): (1 + 4) / (2 * 2); (0, 1): 4 / (2 * 1); (1, 0): 1 / (2 * 1); (1, 1): 0
    expected = (5 / 4 + 4 / 2 + 1 / 2 + 0) / 4
    assert loss.item() == pytest.approx(expected)
    pooled = masked_feature_loss([s0, s1], [t0, t1], [m0, m1], normalize="pooled")
    assert pooled.item() == pytest.approx((5 + 4 + 1) / (2 * 4))
    loss.backward()
    assert s0.grad is not None and s1.grad is not None
    zero = masked_feature_loss([s0], [t0], [torch.zeros(2, 2, 2)])
    assert zero.item() == 0 and zero.requires_grad


# ------------------------------------------------------------------------------------------------- KL
class _Base(torch.nn.Module):
    """A stand-in set criterion: no losses, a weight dict (the distillation terms are what is tested)."""

    weight_dict = {"loss_ce": 2.0}

    def forward(self, outputs, targets):
        return {}


def test_shared_query_kl_on_every_decoder_layer_by_hand():
    from stepwise.distill_losses import TeacherStudentOutput
    from stepwise.models.outputs import DetectorOutput

    from stepwise.heads import SigmoidFocalHead

    torch.manual_seed(0)
    student_heads = [SigmoidFocalHead(4, 3), SigmoidFocalHead(4, 3)]
    teacher_heads = [SigmoidFocalHead(4, 3), SigmoidFocalHead(4, 3)]
    q_teacher = [torch.randn(1, 2, 4), torch.randn(1, 2, 4)]
    teacher = DetectorOutput(logits=[teacher_heads[i](q_teacher[i]) for i in range(2)],
                             boxes=[torch.rand(1, 2, 4)] * 2, query_features=q_teacher)
    student = DetectorOutput(logits=[torch.randn(1, 2, 3)] * 2, boxes=[torch.rand(1, 2, 4)] * 2,
                             query_features=[torch.randn(1, 2, 4)] * 2)
    head_classes = torch.tensor([True, False, True])
    criterion = DistillCriterion(_Base(), student_heads, teacher_heads, head_classes, feature=False,
                                 lambda_cls=0.1)
    losses = criterion(TeacherStudentOutput(student, teacher), [])
    assert set(losses) == {"loss_cls_dis", "loss_cls_dis_0"}
    assert criterion.weight_dict == {"loss_ce": 2.0, "loss_cls_dis": 0.1, "loss_cls_dis_0": 0.1}
    for layer, name in ((0, "loss_cls_dis_0"), (1, "loss_cls_dis")):
        # by hand: per query, KL(p_t || p_s) over head classes {0, 2}, the student's head of that layer on the
        # teacher's query features of that layer; batchmean over the 2 queries
        zs = student_heads[layer](q_teacher[layer])[0][:, [0, 2]]
        zt = teacher.logits[layer][0][:, [0, 2]]
        p_t, p_s = zt.softmax(-1), zs.softmax(-1)
        expected = float((p_t * (p_t.log() - p_s.log())).sum(-1).mean().detach())
        assert losses[name].item() == pytest.approx(expected, rel=1e-5)
        assert losses[name].item() == pytest.approx(
            class_distillation_loss(student_heads[layer](q_teacher[layer]), teacher.logits[layer],
                                    torch.tensor([0, 2])).item(), rel=1e-6)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    assert total.item() == pytest.approx(0.1 * (losses["loss_cls_dis"].item() + losses["loss_cls_dis_0"].item()))
    last = DistillCriterion(_Base(), student_heads, teacher_heads, head_classes, feature=False, cls_layers="last")
    assert set(last(TeacherStudentOutput(student, teacher), [])) == {"loss_cls_dis"}
