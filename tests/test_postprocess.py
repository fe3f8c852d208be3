"""PostProcess (top-k over queries x classes, box scaling) and the LVIS results converter."""

import pytest
import torch

from stepwise.heads import SigmoidFocalHead
from stepwise.models.outputs import DetectorOutput
from stepwise.models.postprocess import PostProcess, to_lvis_results


class IdentityHead(SigmoidFocalHead):
    """Scores are the logits themselves, so tests can write probabilities directly."""

    def scores(self, logits):
        return logits


def outputs_of(scores, boxes):
    return DetectorOutput(logits=[torch.zeros_like(scores), scores], boxes=[torch.zeros_like(boxes), boxes],
                          query_features=[])


SCORES = torch.tensor([[[0.1, 0.9], [0.8, 0.3], [0.2, 0.05]]])  # 1 image, 3 queries, 2 classes
BOXES = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5], [0.9, 0.1, 0.4, 0.4]]])


def test_topk_over_queries_and_classes_with_box_scaling():
    (det,) = PostProcess(num_top=4)(outputs_of(SCORES, BOXES), torch.tensor([[100, 200]]), IdentityHead(1, 2))
    assert det["scores"].tolist() == pytest.approx([0.9, 0.8, 0.3, 0.2])
    assert det["labels"].tolist() == [1, 0, 1, 0]
    # query 0 (cx .5, cy .5, w .2, h .4) in a 200 x 100 (w x h) image -> x 80..120, y 30..70
    assert det["boxes"][0].tolist() == pytest.approx([80, 30, 120, 70])
    assert det["boxes"][1].tolist() == pytest.approx([0, 0, 100, 50])
    assert det["boxes"][2].tolist() == pytest.approx(det["boxes"][1].tolist())
    # query 2 sticks out of the image at the right and top: clipped to it
    assert det["boxes"][3].tolist() == pytest.approx([140, 0, 200, 30])


def test_num_top_capped_and_per_image_sizes():
    scores, boxes = SCORES.expand(2, -1, -1), BOXES.expand(2, -1, -1)
    post = PostProcess(num_top=300, head=IdentityHead(1, 2))
    dets = post(outputs_of(scores, boxes), torch.tensor([[100, 200], [10, 20]]))
    assert [len(d["scores"]) for d in dets] == [6, 6]
    assert dets[1]["boxes"][0].tolist() == pytest.approx([8, 3, 12, 7])


def test_uses_head_scores_not_raw_logits():
    logits = torch.tensor([[[0.0, 3.0], [-2.0, 1.0]]])
    boxes = BOXES[:, :2]
    (det,) = PostProcess(num_top=2)(outputs_of(logits, boxes), torch.tensor([[10, 10]]), SigmoidFocalHead(1, 2))
    assert det["scores"].tolist() == pytest.approx(torch.tensor([3.0, 1.0]).sigmoid().tolist())


def test_bad_calls_are_explained():
    with pytest.raises(ValueError, match="head"):
        PostProcess()(outputs_of(SCORES, BOXES), torch.tensor([[100, 200]]))
    with pytest.raises(ValueError, match="orig_sizes"):
        PostProcess(head=IdentityHead(1, 2))(outputs_of(SCORES, BOXES), torch.tensor([100, 200]))


def test_to_lvis_results_xywh_and_category_ids():
    dets = [{"scores": torch.tensor([0.9, 0.4]), "labels": torch.tensor([1, 0]),
             "boxes": torch.tensor([[10.0, 20.0, 40.0, 80.0], [0.0, 0.0, 5.0, 5.0]])},
            {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    results = to_lvis_results(dets, [7, 8], [3, 17])
    assert results == [
        {"image_id": 7, "category_id": 17, "bbox": pytest.approx([10, 20, 30, 60]), "score": pytest.approx(0.9)},
        {"image_id": 7, "category_id": 3, "bbox": pytest.approx([0, 0, 5, 5]), "score": pytest.approx(0.4)},
    ]
    assert to_lvis_results(dets, [torch.tensor(7), 8], {0: 3, 1: 17})[0]["category_id"] == 17
    assert isinstance(results[0]["image_id"], int) and isinstance(results[0]["bbox"][0], float)


def test_to_lvis_results_errors_name_the_image():
    dets = [{"scores": torch.tensor([0.5]), "labels": torch.tensor([5]), "boxes": torch.zeros(1, 4)}]
    with pytest.raises(ValueError, match="image 9"):
        to_lvis_results(dets, [9], [1, 2])
    with pytest.raises(ValueError, match="image ids"):
        to_lvis_results(dets, [9, 10], [1, 2])
