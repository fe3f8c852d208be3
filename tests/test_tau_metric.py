"""Tau-normalisation and metric learning (stepwise/heads/inference.py) and evaluate's tau=/knn= options."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from stepwise.checkpoint import (
    head_state,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from stepwise.config import load_config
from stepwise.data.categories import CategoryMap
from stepwise.evaluate import UsageError, main, model_variants, parse_bool, parse_taus
from stepwise.heads import MetricLearningHead, SigmoidFocalHead, build_head
from stepwise.heads.bags import GroupSoftmaxHead
from stepwise.heads.base import ClassifierHead
from stepwise.heads.inference import (
    class_weight_norms,
    classifier_heads,
    tau_normalize_,
    tau_normalized,
    with_knn,
)
from stepwise.models import build_detector
from stepwise.utils.io import atomic_write_json, read_json

D = 2


def sigmoid_head(rows, bias=(0.5, -1.0)):
    head = SigmoidFocalHead(D, len(rows))
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor(rows))
        head.linear.bias.copy_(torch.tensor(bias))
    return head


# -------------------------------------------------------------------------------------------- tau
def test_tau_zero_leaves_the_scores_unchanged():
    torch.manual_seed(0)
    features = torch.randn(3, 5, 8)
    for head in (SigmoidFocalHead(8, 6), GroupSoftmaxHead(8, [0, 1, 1, 2, 0, 2]),
                 GroupSoftmaxHead(8, [0, 1, 1, 0, 0, 1], class_weight=[1, 2, 3, 4, 5, 6], focal_gamma=2.0)):
        head.linear.weight.data.mul_(3.0)  # norms far from 1
        before = head.scores(head(features))
        tau_normalize_(head, 0.0)
        assert torch.equal(head.scores(head(features)), before)


def test_tau_divides_rows_by_norm_power_bias_untouched():
    head = sigmoid_head([[3.0, 4.0], [0.0, 0.5]])
    tau_normalize_(head, 0.5)
    expected = [3 / math.sqrt(5), 4 / math.sqrt(5), 0.0, 0.5 / math.sqrt(0.5)]
    assert head.linear.weight.flatten().tolist() == pytest.approx(expected)
    assert head.linear.bias.tolist() == [0.5, -1.0]
    unit = sigmoid_head([[3.0, 4.0], [0.0, 0.5]])
    tau_normalize_(unit, 1.0)
    assert class_weight_norms(unit).tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="tau"):
        tau_normalize_(unit, -1.0)


def test_bags_tau_normalises_class_rows_only():
    head = GroupSoftmaxHead(D, [0, 1, 0])  # cols: G0 0-1; group 0: 2, 3, others 4; group 1: 5, others 6
    with torch.no_grad():
        head.linear.weight.copy_(torch.arange(14, dtype=torch.float32).view(7, 2) + 1)
    before = head.linear.weight.clone()
    bias = head.linear.bias.clone()
    assert torch.equal(head.class_weight_rows(), before[[2, 5, 3]])
    tau_normalize_(head, 1.0)
    after = head.linear.weight
    for col in (0, 1, 4, 6):  # G0 and "others" rows untouched
        assert torch.equal(after[col], before[col])
    for col in (2, 3, 5):
        assert after[col].tolist() == pytest.approx((before[col] / before[col].norm()).tolist())
    assert torch.equal(head.linear.bias, bias)


class RowsCopy(ClassifierHead):
    """A head whose class rows are not a view of a parameter and which has no tau_normalize_."""

    num_classes = num_outputs = 2

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2, D))

    @classmethod
    def from_config(cls, cfg_head, in_dim, num_classes, **context):
        return cls()

    def forward(self, x):
        return x @ self.w.t()

    def scores(self, logits):
        return logits.sigmoid()

    def loss(self, logits, matches, targets, num_boxes, features=None, layer=""):
        return {"loss_ce": logits.sum()}

    def class_weight_rows(self):
        return self.w * 1.0


class NoRows(RowsCopy):
    class_weight_rows = ClassifierHead.class_weight_rows


def test_heads_without_usable_rows_raise_clear_errors():
    with pytest.raises(TypeError, match="tau_normalize_"):
        tau_normalize_(RowsCopy(), 0.5)
    with pytest.raises(NotImplementedError, match="NoRows.*class_weight_rows"):
        NoRows().class_weight_rows()


def test_tau_normalized_model_copy_every_head_once():
    model = nn.Module()
    model.class_embed = nn.ModuleList([sigmoid_head([[3.0, 4.0], [0.0, 2.0]]),
                                       MetricLearningHead(sigmoid_head([[3.0, 4.0], [0.0, 2.0]]), D)])
    assert [name for name, _ in classifier_heads(model)] == ["class_embed.0", "class_embed.1"]
    normed = tau_normalized(model, 0.5)
    for head in (normed.class_embed[0], normed.class_embed[1]):  # the wrapped head normalised once
        assert class_weight_norms(head).tolist() == pytest.approx([math.sqrt(5), math.sqrt(2)])
    assert class_weight_norms(model.class_embed[1]).tolist() == pytest.approx([5.0, 2.0])  # original kept
    with pytest.raises(ValueError, match="no classifier head"):
        tau_normalized(nn.Linear(2, 2), 0.5)


# -------------------------------------------------------------------------------- metric learning
def test_center_loss_and_centre_updates_by_hand():
    head = MetricLearningHead(sigmoid_head([[1.0, 0.0], [0.0, 1.0]]), D, center_weight=0.3, momentum=0.5)
    assert head.loss_weights == {"loss_center": 0.3}
    features = torch.tensor([[[1.0, 1.0], [3.0, 1.0], [9.0, 9.0]]], requires_grad=True)
    logits = head(features)
    matches = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    targets = [{"labels": torch.tensor([0, 0])}]
    losses = head.loss(logits, matches, targets, num_boxes=2.0, features=features, layer="")
    assert head.centers[0].tolist() == [2.0, 1.0] and head.center_count.tolist() == [2, 0]
    # each matched feature is 1 away from the centre in one of 2 dims: mean 0.5; sum 1.0 / num_boxes 2
    assert losses["loss_center"].item() == pytest.approx(0.5)
    assert "loss_ce" in losses
    losses["loss_center"].backward()
    assert features.grad[0, 2].abs().sum() == 0 and features.grad[0, 0].tolist() == pytest.approx([-0.5, 0.0])

    step = [{"labels": torch.tensor([0])}]
    head.loss(logits, [(torch.tensor([2]), torch.tensor([0]))], step, 1.0, features=features.detach(), layer="")
    assert head.centers[0].tolist() == [5.5, 5.0]  # EMA: 2 + 0.5 (9 - 2), 1 + 0.5 (9 - 1)
    before = head.centers.clone()
    other = head.loss(logits, [(torch.tensor([1]), torch.tensor([0]))], step, 1.0, features=features.detach(),
                      layer="0")
    assert "loss_center" not in other and torch.equal(head.centers, before)  # only the final layer


def test_knn_scores_by_hand():
    inner = sigmoid_head([[0.0, 0.0], [0.0, 0.0]], bias=(0.0, math.log(3)))  # scores 0.5, 0.75
    head = MetricLearningHead(inner, D, knn=True, knn_k=1)
    x = torch.tensor([[0.0, 0.0]])
    assert head.scores(head(x)).tolist() == [[0.0, 0.0]]  # no centre yet: 0, not NaN
    head.centers.copy_(torch.tensor([[1.0, 1.0], [2.0, 0.0]]))
    head.center_count.copy_(torch.tensor([4, 1]))
    assert head(x).shape == (1, 4) and head.num_outputs == 4
    assert head.scores(head(x)).tolist() == [[pytest.approx(0.75), 0.0]]  # nearest: class 0 (distance 1)
    head.knn_k, head.knn_temperature = 2, 0.5
    share0 = math.exp(-1 / 0.5) / (math.exp(-1 / 0.5) + math.exp(-2 / 0.5))  # distances 1 and 2 (mean per dim)
    assert head.scores(head(x))[0].tolist() == pytest.approx([0.75 * share0, 0.75 * (1 - share0)])
    head.center_count[1] = 0  # class 1 never matched: no centre
    assert head.scores(head(x))[0].tolist() == pytest.approx([0.75, 0.0])
    head.knn = False
    assert head(x).shape == (1, 2) and torch.equal(head.scores(head(x)), inner.scores(inner(x)))


def test_metric_learning_from_config_and_plain_weights_load():
    cfg = load_config(["head=sigmoid", "head.metric_learning.enabled=true", "head.metric_learning.knn_k=3"]).head
    head = build_head(cfg, D, 2)
    assert isinstance(head, MetricLearningHead) and head.knn_k == 3 and not head.knn
    assert not isinstance(build_head(load_config(["head=sigmoid"]).head, D, 2), MetricLearningHead)
    plain = sigmoid_head([[1.0, 2.0], [3.0, 4.0]])
    report = head.load_state_dict(plain.state_dict(), strict=False)  # a checkpoint of the unwrapped head
    assert set(report.missing_keys) == {"centers", "center_count"} and not report.unexpected_keys
    assert torch.equal(head.head.linear.weight, plain.linear.weight)
    assert torch.equal(head.class_weight_rows(), plain.linear.weight)
    wrong = {"linear.weight": torch.zeros(5, D), "linear.bias": torch.zeros(5)}  # another head's shape
    assert set(head.load_state_dict(wrong, strict=False).missing_keys) >= {"head.linear.weight"}


def test_with_knn_needs_trained_centres():
    model = nn.Module()
    model.head = MetricLearningHead(sigmoid_head([[1.0, 0.0], [0.0, 1.0]]), D)
    with pytest.raises(ValueError, match="no class centre"):
        with_knn(model)
    model.head.center_count[0] = 1
    assert with_knn(model).head.knn and not model.head.knn
    with pytest.raises(ValueError, match="metric_learning.enabled"):
        with_knn(nn.Sequential(sigmoid_head([[1.0, 0.0], [0.0, 1.0]])))


# ----------------------------------------------------------------------------------------- evaluate
def test_evaluate_option_parsing_and_variant_names():
    assert parse_taus(None) == [] and parse_taus("0,0.25,1") == [0.0, 0.25, 1.0]
    for bad in ("a", "-1", "0,0", "nan"):
        with pytest.raises(UsageError, match="tau"):
            parse_taus(bad)
    assert parse_bool("knn", "true") and not parse_bool("knn", "False")
    with pytest.raises(UsageError, match="knn"):
        parse_bool("knn", "maybe")
    model = nn.Sequential(sigmoid_head([[3.0, 4.0], [0.0, 2.0]]))
    assert [name for name, m in model_variants(model)] == [""]
    names = [name for name, _ in model_variants(model, taus=[0.0, 0.5])]
    assert names == ["tau_0", "tau_0.5"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, make_untrained_checkpoint):
    root = tmp_path_factory.mktemp("taueval")
    path, cfg = make_untrained_checkpoint(root)
    val = read_json(cfg.data.val_ann)
    keep = {im["id"] for im in val["images"][:2]}
    atomic_write_json(root / "val_small.json", dict(val, images=val["images"][:2],
                                                    annotations=[a for a in val["annotations"] if a["image_id"] in keep]))
    return path, root / "val_small.json"


def test_evaluate_tau_variants_table_and_tau_zero_equals_the_model(checkpoint, tmp_path, capsys):
    path, gt = checkpoint
    assert main([f"checkpoint={path}", f"gt={gt}", f"out={tmp_path / 'plain'}"]) == 0
    assert main([f"checkpoint={path}", f"gt={gt}", f"out={tmp_path / 'tau'}", "tau=0,1"]) == 0
    printed = capsys.readouterr().out
    assert "variant" in printed and "tau_0 " in printed and "tau_1 " in printed and "APr" in printed
    plain = read_json(tmp_path / "plain" / "predictions.json")
    assert read_json(tmp_path / "tau" / "tau_0" / "predictions.json") == plain
    assert read_json(tmp_path / "tau" / "tau_1" / "predictions.json") != plain
    table = (tmp_path / "tau" / "variants.csv").read_text().splitlines()
    assert table[0] == "variant,AP,APr,APc,APf,AP1,AP2,AP3,AP4" and [r.split(",")[0] for r in table[1:]] == \
        ["tau_0", "tau_1"]
    assert set(read_json(tmp_path / "tau" / "variants.json")) == {"tau_0", "tau_1"}
    # knn on a checkpoint without metric learning: a clear error, exit code 1
    assert main([f"checkpoint={path}", f"gt={gt}", f"out={tmp_path / 'knn'}", "knn=true"]) == 1
    assert "metric_learning.enabled" in capsys.readouterr().err
    assert main([f"checkpoint={path}", "tau=x"]) == 2


def test_evaluate_knn_on_a_metric_learning_checkpoint(checkpoint, tmp_path, capsys):
    path, gt = checkpoint
    state = load_checkpoint(path, required=("config", "categories"))
    cfg = OmegaConf.create(state["config"])
    cfg.head.metric_learning.enabled = True
    categories = CategoryMap.from_dict(state["categories"])
    model = build_detector(cfg.model, cfg.head, categories).model
    report = load_model_weights(model, state)  # plain head weights go into the wrapped heads
    assert all(k.endswith(("centers", "center_count")) for k in report.missing) and not report.mismatched
    final = model.class_embed[1]
    torch.manual_seed(0)
    final.centers.copy_(torch.randn_like(final.centers))
    final.center_count.fill_(1)
    ml = save_checkpoint({"model": model.state_dict(), "head_state": head_state(model),
                          "categories": state["categories"], "config": OmegaConf.to_container(cfg)},
                         tmp_path / "ml" / "checkpoint_final.pt")
    assert main([f"checkpoint={ml}", f"gt={gt}", f"out={tmp_path / 'out'}", "knn=true"]) == 0
    assert "knn " in capsys.readouterr().out
    plain, knn = (read_json(tmp_path / "out" / p / "predictions.json") for p in ("", "knn"))
    assert main([f"checkpoint={path}", f"gt={gt}", f"out={tmp_path / 'orig'}"]) == 0
    assert plain == read_json(tmp_path / "orig" / "predictions.json")  # the wrapper alone changes nothing
    assert knn != plain and [r.split(",")[0] for r in (tmp_path / "out" / "variants.csv").read_text().split()[1:]] == \
        ["model", "knn"]
