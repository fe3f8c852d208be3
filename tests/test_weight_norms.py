"""``python -m stepwise.analysis.weight_norms``: final-layer class weight norms vs instance counts, per head."""

from __future__ import annotations

import csv

import pytest
import torch
from omegaconf import OmegaConf

from stepwise.analysis.weight_norms import main, parse_args, running_median
from stepwise.checkpoint import head_state, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, make_untrained_checkpoint):
    """(sigmoid checkpoint, bags checkpoint) of the tiny model on the synthetic ``tiny`` preset."""
    from stepwise.config import load_config
    from stepwise.data.categories import CategoryMap
    from stepwise.models import build_detector

    root = tmp_path_factory.mktemp("wnorm")
    sigmoid, cfg = make_untrained_checkpoint(root)
    state = load_checkpoint(sigmoid, required=("categories",))
    categories = CategoryMap.from_dict(state["categories"])
    cfg = load_config(["head=bags", f"data.root={cfg.data.root}", "data.preset=tiny", "exp=b",
                       "model.num_queries=10"])
    torch.manual_seed(1)
    model = build_detector(cfg.model, cfg.head, categories).model
    with torch.no_grad():  # make the norms differ per class in a known way: row k of class k scaled by k + 1
        for head in model.class_embed:
            head.linear.weight[head.class_output] *= torch.arange(1, len(categories) + 1).unsqueeze(1)
    bags = save_checkpoint({"model": model.state_dict(), "head_state": head_state(model),
                            "categories": categories.to_dict(), "config": OmegaConf.to_container(cfg, resolve=True)},
                           root / "runs" / "b" / "pretrain" / "checkpoint_final.pt")
    return sigmoid, bags, model, state


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_plot_and_csv_for_sigmoid_and_bags(checkpoints, tmp_path, capsys):
    sigmoid, bags, bags_model, sigmoid_state = checkpoints
    out = tmp_path / "plots" / "norms.png"
    assert main([f"checkpoint={sigmoid}", f"checkpoint={bags}", f"out={out}"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    rows = read_rows(out.with_suffix(".csv"))
    printed = capsys.readouterr().out
    assert "sigmoid t/pretrain" in printed and "bags b/pretrain" in printed

    categories = sigmoid_state["categories"]
    num = len(categories["ids"])
    sig = [r for r in rows if r["label"] == "sigmoid t/pretrain"]
    bag = [r for r in rows if r["label"] == "bags b/pretrain"]
    assert len(sig) == len(bag) == num == len(rows) // 2
    final = sigmoid_state["model"]["class_embed.1.linear.weight"]  # tiny: 2 decoder layers, final = 1
    assert [float(r["weight_norm"]) for r in sig] == pytest.approx(final.norm(dim=1).tolist(), rel=1e-5)
    assert [int(r["instance_count"]) for r in sig] == categories["instance_counts"]
    assert [int(r["category_id"]) for r in bag] == categories["ids"] and bag[0]["name"] == categories["names"][0]
    head = bags_model.class_embed[1]
    rows_expected = head.linear.weight[head.class_output].norm(dim=1)
    assert [float(r["weight_norm"]) for r in bag] == pytest.approx(rows_expected.tolist(), rel=1e-5)


def test_labels_and_duplicate_names(checkpoints, tmp_path, capsys):
    sigmoid, bags, _, _ = checkpoints
    out = tmp_path / "n.png"
    assert main([f"checkpoint={sigmoid}", f"checkpoint={bags}", "label=A", "label=B", f"out={out}"]) == 0
    assert {r["label"] for r in read_rows(tmp_path / "n.csv")} == {"A", "B"}
    assert main([f"checkpoint={sigmoid}", f"checkpoint={sigmoid}", f"out={out}"]) == 0
    labels = {r["label"] for r in read_rows(tmp_path / "n.csv")}
    assert len(labels) == 1 and "pretrain/checkpoint_final.pt" in labels.pop()  # same run twice: one file


def test_bad_arguments_and_inputs(tmp_path, capsys):
    assert main([f"checkpoint={tmp_path / 'missing.pt'}", f"out={tmp_path / 'x.png'}"]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["checkpoint=a.pt"]) == 2
    assert main(["checkpoint=a.pt", "label=x", "label=y", "out=p.png"]) == 2
    assert main(["checkpoint=a.pt", "out=p.png", "tau=1"]) == 2
    assert parse_args(["checkpoint=a", "checkpoint=b", "out=o.png"]) == (["a", "b"], [], "o.png")


def test_running_median_by_hand():
    x, y = running_median([100, 1, 10, 0], [4.0, 1.0, 3.0, 2.0])
    assert x.tolist() == [1.0, 1.0, 10.0, 100.0]  # sorted by count, 0 drawn at 1
    assert y.tolist() == [1.5, 2.0, 3.0, 3.5]  # medians over a window of one class each side
