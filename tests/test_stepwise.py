"""Step-wise learning: selection rules, replay-set files, feature masks, distillation terms, frozen
parameters after fine-tune/distill, ignore regions, and select on two processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stepwise.data.smooth_tail import (Quotas, ScoreTable, rank_class, select_instances, select_replay_sets,
                                       subset_annotations, write_replay_set)
from stepwise.distill_losses import class_distillation_loss, head_box_masks, masked_feature_loss


def table(rows):
    """rows: (ann_id, image_id, label, score)."""
    return ScoreTable.from_records({"ann_id": a, "image_id": i, "label": c, "score": s, "iou": 0.5}
                                   for a, i, c, s in rows)


# ------------------------------------------------------------------------------------------ selection
def test_rank_prefers_confident_instances_from_new_images():
    t = table([(1, 10, 0, 0.9), (2, 10, 0, 0.8), (3, 11, 0, 0.7), (4, 12, 0, 0.3), (5, 11, 0, 0.6),
               (6, 13, 0, 0.95), (7, 14, 0, 0.4), (8, 14, 0, 0.45)])
    ranked = t.ann_id[rank_class(t, np.arange(len(t)))].tolist()
    # tier 0 (>0.5, first of image): 6 (.95), 1 (.9), 3 (.7); tier 1 (>0.5, repeat image): 2 (.8), 5 (.6);
    # tier 2 (<=0.5, first of image): 8 (.45, image 14), 4 (.3); tier 3: 7
    assert ranked == [6, 1, 3, 2, 5, 8, 4, 7]


def test_rank_ties_broken_by_annotation_id():
    t = table([(9, 1, 0, 0.7), (3, 2, 0, 0.7), (5, 3, 0, 0.7)])
    assert t.ann_id[rank_class(t, np.arange(3))].tolist() == [3, 5, 9]


def test_quotas_per_class_and_tail_all():
    rows = [(100 + k, k, 0, 0.9 - 0.01 * k) for k in range(10)]        # class 0: head, 10 instances
    rows += [(200 + k, 50 + k, 1, 0.2 + 0.01 * k) for k in range(4)]   # class 1: tail, 4 instances
    t = table(rows)
    is_head = np.array([True, False])
    assert select_instances(t, is_head, 3, 2).tolist() == [100, 101, 102, 202, 203]
    assert select_instances(t, is_head, 3, None).tolist() == [100, 101, 102, 200, 201, 202, 203]
    sets = select_replay_sets(t, image_counts=[30, 4], min_images=30,
                              quotas=Quotas(head_in_head=5, tail_in_head=1, head_in_tail=2, tail_in_tail=None))
    assert sets["d_head"].tolist() == [100, 101, 102, 103, 104, 203]
    assert sets["d_tail"].tolist() == [100, 101, 200, 201, 202, 203]


def test_selection_is_independent_of_row_order():
    rng = np.random.default_rng(0)
    rows = [(k, int(rng.integers(0, 20)), int(rng.integers(0, 4)), float(rng.random())) for k in range(200)]
    a = select_replay_sets(table(rows), [40, 40, 3, 3], quotas=Quotas(10, 3, 5, None))
    b = select_replay_sets(table(rows[::-1]), [40, 40, 3, 3], quotas=Quotas(10, 3, 5, None))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_scores_jsonl_roundtrip_and_bad_line(tmp_path):
    path = tmp_path / "scores.jsonl"
    path.write_text('{"ann_id": 1, "image_id": 2, "label": 0, "score": 0.5, "iou": 0.9, "category_id": 7}\n')
    t = ScoreTable.read_jsonl(path)
    assert t.ann_id.tolist() == [1] and t.score.tolist() == [0.5]
    path.write_text(path.read_text() + '{"ann_id": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        ScoreTable.read_jsonl(path)


def test_select_by_class_score_or_by_max_score(tmp_path):
    """stepwise.score=class ranks by the instance's own class probability (default); =max by the matched
    prediction's largest class probability (the public code). Class "a" has 3 instances, quota 1."""
    from stepwise.config import load_config
    from stepwise.stages.select import build_replay_sets

    (tmp_path / "train.json").write_text(json.dumps(lvis_dict()))
    rows = [{"ann_id": 11, "image_id": 1, "label": 0, "score": 0.6, "iou": 0.5, "max_score": 0.6},
            {"ann_id": 12, "image_id": 1, "label": 1, "score": 0.2, "iou": 0.5, "max_score": 0.9},
            {"ann_id": 13, "image_id": 2, "label": 0, "score": 0.3, "iou": 0.5, "max_score": 0.95},
            {"ann_id": 14, "image_id": 3, "label": 0, "score": 0.4, "iou": 0.5, "max_score": 0.4}]
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [f"data.train_ann={tmp_path / 'train.json'}", "stepwise.min_images=2", "stepwise.d_head.head=1",
            "stepwise.d_tail.head=1"]
    chosen = {}
    for score in ("class", "max"):
        out = tmp_path / score
        summary = build_replay_sets(load_config(base + [f"stepwise.score={score}"]), scores, out)
        assert summary["score"] == score
        chosen[score] = sorted(a["id"] for a in json.loads((out / "d_head.json").read_text())["annotations"])
    assert chosen == {"class": [11, 12], "max": [12, 13]}
    scores.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "max_score"}) + "\n" for r in rows))
    with pytest.raises(ValueError, match="max_score"):
        build_replay_sets(load_config(base + ["stepwise.score=max"]), scores, tmp_path / "old")


# ---------------------------------------------------------------------------------------- replay files
def lvis_dict():
    cats = [{"id": 1, "name": "a", "frequency": "f", "synset": "a.n.01", "image_count": 2, "instance_count": 3},
            {"id": 2, "name": "b", "frequency": "r", "synset": "b.n.01", "image_count": 1, "instance_count": 1}]
    images = [{"id": i, "width": 64, "height": 48, "file_name": f"{i}.png", "coco_url": f"x/train2017/{i}.png",
               "neg_category_ids": [], "not_exhaustive_category_ids": []} for i in (1, 2, 3)]
    anns = [{"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100},
            {"id": 12, "image_id": 1, "category_id": 2, "bbox": [20, 5, 8, 8], "area": 64},
            {"id": 13, "image_id": 2, "category_id": 1, "bbox": [3, 3, 5, 5], "area": 25},
            {"id": 14, "image_id": 3, "category_id": 1, "bbox": [4, 4, 6, 6], "area": 36}]
    return {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}


def test_replay_file_loads_with_lvis_and_holds_exactly_the_selection(tmp_path):
    from lvis import LVIS

    counts = write_replay_set(lvis_dict(), [12, 13], tmp_path / "d.json")
    assert counts == {"images": 2, "annotations": 2, "ignored": 0}
    api = LVIS(str(tmp_path / "d.json"))
    assert sorted(api.anns) == [12, 13] and sorted(api.imgs) == [1, 2]
    assert sorted(api.cats) == [1, 2]  # every category kept (frequencies describe the full data)


def test_replay_file_with_ignore_regions(tmp_path):
    subset = subset_annotations(lvis_dict(), [12], keep_others_as_ignore=True)
    assert [(a["id"], a.get("ignore", 0)) for a in subset["annotations"]] == [(11, 1), (12, 0)]
    with pytest.raises(ValueError, match="not in the training file"):
        subset_annotations(lvis_dict(), [99])


def test_dataset_and_criterion_leave_ignored_boxes_out(tmp_path):
    """An ignore box: matched like a box, but its query gets no classification or box loss."""
    from stepwise.heads.sigmoid import SigmoidFocalHead
    from stepwise.models.criterion import SetCriterion
    from stepwise.models.matcher import HungarianMatcher

    head = SigmoidFocalHead(8, 3)
    criterion = SetCriterion(HungarianMatcher(), head, {"loss_ce": 1, "loss_bbox": 1, "loss_giou": 1}, aux_loss=False)
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 3)
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3], [0.1, 0.9, 0.1, 0.1]]])
    from stepwise.models.outputs import DetectorOutput
    out = DetectorOutput(logits=[logits], boxes=[boxes], query_features=[torch.zeros(1, 4, 8)])
    real = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1]])}
    with_ignore = {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]]),
                   "ignore": torch.tensor([False, True])}
    plain, ignored = criterion(out, [real]), criterion(out, [with_ignore])
    assert ignored["loss_bbox"] == pytest.approx(plain["loss_bbox"].item())
    # query 1 (on the ignored box) contributes nothing: the loss equals the plain loss minus its background term
    from torchvision.ops import sigmoid_focal_loss
    q1 = sigmoid_focal_loss(logits[0, 1], torch.zeros(3), reduction="sum")
    assert ignored["loss_ce"].item() == pytest.approx(plain["loss_ce"].item() - q1.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------ distillation
def test_head_box_masks_on_given_levels():
    pad = [torch.zeros(1, 4, 8, dtype=torch.bool), torch.zeros(1, 2, 4, dtype=torch.bool)]
    pad[0][0, :, 6:] = True  # the image covers 6 of 8 columns on level 0 (3 of 4 on level 1 -> set below)
    pad[1][0, :, 3:] = True
    box = torch.tensor([[0.5, 0.5, 1 / 3, 0.5]])  # x 1/3..2/3, y 0.25..0.75 of the unpadded image
    m0, m1 = head_box_masks([box], pad)
    expected0 = torch.zeros(4, 8)
    expected0[1:3, 2:4] = 1  # x: 2..4 of 6 columns; y: 1..3 of 4 rows
    expected1 = torch.zeros(2, 4)
    expected1[0:2, 1:2] = 1  # x: 1..2 of 3 columns; y: floor(0.5)=0 .. ceil(1.5)=2
    assert torch.equal(m0[0], expected0) and torch.equal(m1[0], expected1)
    empty = head_box_masks([torch.zeros(0, 4)], pad)
    assert all(float(m.sum()) == 0 for m in empty)


def test_masked_feature_loss_by_hand():
    s = [torch.zeros(1, 2, 2, 2, requires_grad=True)]
    t = [torch.tensor([[[[1.0, 2.0], [0.0, 0.0]], [[3.0, 0.0], [0.0, 5.0]]]])]
    m = [torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])]
    loss = masked_feature_loss(s, t, m)
    # masked cells (0,0),(0,1): channel 0: 1 + 4, channel 1: 9 + 0 -> 14 / (2 * 2 cells)
    assert loss.item() == pytest.approx(14 / 4)
    loss.backward()
    assert s[0].grad is not None and t[0].grad is None
    zero = masked_feature_loss(s, t, [torch.zeros(1, 2, 2)])
    assert zero.item() == 0 and zero.requires_grad


def test_kl_term_by_hand():
    student = torch.tensor([[[1.0, 0.0, 5.0]]])
    teacher = torch.tensor([[[0.0, 1.0, -3.0]]])
    index = torch.tensor([0, 1])  # classes 0 and 1 are head classes; class 2 is left out
    p = torch.tensor([math.exp(0), math.exp(1)]) / (1 + math.e)
    q = torch.tensor([math.exp(1), math.exp(0)]) / (1 + math.e)
    expected = float((p * (p / q).log()).sum())
    assert class_distillation_loss(student, teacher, index).item() == pytest.approx(expected, rel=1e-6)
    # temperature 2: logits halved, times T^2
    p2 = torch.softmax(torch.tensor([0.0, 0.5]), 0)
    q2 = torch.softmax(torch.tensor([0.5, 0.0]), 0)
    expected2 = 4 * float((p2 * (p2 / q2).log()).sum())
    assert class_distillation_loss(student, teacher, index, 2.0).item() == pytest.approx(expected2, rel=1e-6)


def test_teacher_gets_no_gradient_and_frozen_student_parts_none(tmp_path):
    from stepwise.config import load_config
    from stepwise.distill_losses import DistillCriterion, teacher_student_forward
    from stepwise.models import build_detector, trainable_only
    from stepwise.models.criterion import build_criterion
    from stepwise.data.collate import ImageBatch

    cfg = load_config(["model.num_queries=6", "model.enc_layers=1", "model.dec_layers=1"])
    torch.manual_seed(0)
    student, teacher = build_detector(cfg.model, cfg.head, 5).model, build_detector(cfg.model, cfg.head, 5).model
    teacher.eval().requires_grad_(False)
    trainable_only(student, ["input_proj", "class_embed"])
    head = student.class_embed[0]
    criterion = DistillCriterion(build_criterion(cfg.loss, head, 1, two_stage=True), [head],
                                 [teacher.class_embed[0]], torch.tensor([True, True, False, False, True]))
    batch = ImageBatch(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool),
                       [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2],
                                                                                 [0.6, 0.6, 0.3, 0.3]])}])
    outputs, targets = teacher_student_forward(teacher)(student, batch)
    losses = criterion(outputs, targets)
    assert losses["loss_fm_dis"].item() > 0 and losses["loss_cls_dis"].item() > 0
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all((p.grad is not None) == p.requires_grad for p in student.parameters())


# -------------------------------------------------------------------------------------------- end to end
def run_all(root: Path, extra: list[str]) -> dict:
    from stepwise.run import main

    args = ["stage=all", "data.preset=tiny", f"data.root={root / 'data'}", f"output_root={root / 'runs'}",
            "exp=e2e", "model.num_queries=20", "stepwise.min_images=8", "stepwise.d_head.head=20",
            "stepwise.d_tail.head=6"]
    for step in ("pretrain", "finetune", "distill"):
        args += [f"stage.{step}.max_steps=3", f"stage.{step}.max_eval_images=8", f"stage.{step}.trackers=[]",
                 f"stage.{step}.epochs=1"]
    return main(args + extra)


def test_stage_all_end_to_end_and_frozen_parameters(tmp_path):
    from stepwise.checkpoint import load_checkpoint

    results = run_all(tmp_path, [])
    runs = tmp_path / "runs" / "e2e"
    assert set(results) == {"pretrain", "finetune", "distill"}
    table = (runs / "all" / "steps.md").read_text()
    assert all(step in table for step in results) and "APr" in table and "AP4" in table
    assert (runs / "all" / "ap_by_frequency.png").stat().st_size > 10_000
    summary = json.loads((runs / "select" / "summary.json").read_text())
    assert summary["d_head"]["annotations"] > 0 and summary["d_tail"]["tail_instances"] > 0
    scored = (runs / "select" / "scores.jsonl").read_text().splitlines()
    assert len(scored) == summary["scored_instances"] > 0
    assert all(r["max_score"] >= r["score"] for r in map(json.loads, scored))

    # each replay stage wrote the step-wise RFS factors it used: recomputed here from its replay file
    from stepwise.data import build_dataset
    from stepwise.data.categories import CategoryMap
    from stepwise.data.samplers import GroupRule, image_repeat_factors, stepwise_class_factors
    from stepwise.config import load_config

    cfg = load_config(["data.preset=tiny", f"data.root={tmp_path / 'data'}"])
    full = CategoryMap.from_annotations(json.loads(Path(cfg.data.train_ann).read_text()))
    for stage, replay, rules in (("finetune", "d_head", cfg.stepwise.rfs.d_head),
                                 ("distill", "d_tail", cfg.stepwise.rfs.d_tail)):
        report = json.loads((runs / stage / "repeat_factors.json").read_text())
        ds = build_dataset(cfg.data, "train", ann_file=str(runs / "select" / f"{replay}.json"), categories=full)
        classes = [ds.image_classes(i) for i in range(len(ds))]
        _, r, _ = stepwise_class_factors(classes, full.image_counts, GroupRule.parse(rules))
        assert report["mode"] == "stepwise" and report["replay_set"] == replay and report["rounding"] == "ceil"
        assert report["num_images"] == report["epoch_length"] == len(ds) and report["epoch"] == "replay_set"
        assert report["repeated_length"] == float(image_repeat_factors(classes, r).sum())
        assert [report["categories"][str(cid)]["r"] for cid in full.ids] == pytest.approx(r.tolist())

    weights = {s: load_checkpoint(runs / s / "checkpoint_final.pt")["model"] for s in results}
    trainable = ("input_proj.", "class_embed.")
    for before, after in (("pretrain", "finetune"), ("finetune", "distill")):
        changed = [k for k, v in weights[after].items() if k in weights[before]
                   and v.dtype.is_floating_point and not torch.equal(v, weights[before][k])]
        assert changed, f"{after} changed nothing"
        assert all(k.startswith(trainable) for k in changed), [k for k in changed if not k.startswith(trainable)]
    # BatchNorm statistics of the frozen backbone too (frozen BN keeps the pretrained running stats)
    stats = [k for k in weights["pretrain"] if k.endswith("running_mean")]
    assert stats and all(torch.equal(weights["pretrain"][k], weights["distill"][k]) for k in stats)

    # a second run skips every finished step and prints the same table
    again = run_all(tmp_path, [])
    assert {k: v["AP"] for k, v in again.items()} == {k: v["AP"] for k, v in results.items()}


def _select(tmp_path: Path, checkpoint: Path, root: Path, processes: int) -> Path:
    out = tmp_path / f"sel{processes}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    mode = ["--multi_gpu"] if processes > 1 else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29700 + processes), "-m", "stepwise.select_exemplars",
           f"checkpoint={checkpoint}", "data.preset=tiny", f"data.root={root / 'data'}", f"output_root={out}",
           "exp=s", "data.batch_size=3", "stepwise.min_images=8"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "s" / "select"


@pytest.mark.multiprocess
def test_select_two_processes_give_the_same_files(tmp_path, make_untrained_checkpoint):
    checkpoint, _ = make_untrained_checkpoint(tmp_path)
    one, two = _select(tmp_path, checkpoint, tmp_path, 1), _select(tmp_path, checkpoint, tmp_path, 2)
    for name in ("scores.jsonl", "d_head.json", "d_tail.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert not list(two.glob("scores.part*"))
