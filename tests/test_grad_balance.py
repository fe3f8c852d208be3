"""``python -m stepwise.analysis.grad_balance``: the trunk gradient each loss term sends, on a toy by hand and on
the tiny preset (a checkpoint, the config's fresh model, and loss options changed on the same weights)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stepwise.analysis.grad_balance import batch_balance, main, split_term, summarize, trunk_parameters
from stepwise.checkpoint import load_checkpoint, save_checkpoint


def test_split_term():
    assert split_term("loss_ce") == ("loss_ce", "")
    assert split_term("loss_ce_0") == ("loss_ce", "0")
    assert split_term("loss_bbox_enc") == ("loss_bbox", "enc")
    assert split_term("loss_fhm") == ("loss_fhm", "")
    assert split_term("loss_giou_12") == ("loss_giou", "12")


def test_batch_balance_on_a_toy_by_hand():
    """Linear losses in a trunk vector w (gradient = the coefficient): per layer, per term (summed over
    layers), per group and the cosine, each weighted by the criterion's weight; head-only terms send 0."""
    a, b, c, d = (np.array(v, dtype=np.float64) for v in ([1.0, 2.0, 0.0], [0.5, -1.0, 2.0], [0.0, 1.0, 1.0],
                                                           [3.0, 0.0, -1.0]))
    w = torch.tensor([0.3, -0.2, 0.7], dtype=torch.float64, requires_grad=True)
    h = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)  # a head parameter: not in the trunk
    t = lambda v: torch.as_tensor(v)  # noqa: E731
    losses = {"loss_ce": w @ t(a), "loss_ce_0": w @ t(b), "loss_bbox": w @ t(c) + h, "loss_giou_0": w @ t(d),
              "loss_fhm": h * 2.0, "class_error": torch.tensor(5.0)}
    weights = {"loss_ce": 2.0, "loss_ce_0": 2.0, "loss_bbox": 5.0, "loss_giou_0": 1.0, "loss_fhm": 1.0}
    out = batch_balance(losses, weights, [w])
    n = np.linalg.norm
    assert out["layers"]["loss_ce_0"]["norm"] == pytest.approx(n(2 * b))
    assert out["layers"]["loss_fhm"]["norm"] == 0.0
    assert out["terms"]["loss_ce"]["norm"] == pytest.approx(n(2 * a + 2 * b))
    assert out["terms"]["loss_ce"]["loss"] == pytest.approx(2 * (w.detach().numpy() @ (a + b)))
    cls, box = 2 * a + 2 * b, 5 * c + d
    assert out["groups"]["classification"]["norm"] == pytest.approx(n(cls))
    assert out["groups"]["boxes"]["norm"] == pytest.approx(n(box))
    assert out["groups"]["total"]["norm"] == pytest.approx(n(cls + box))
    assert out["cosine"] == pytest.approx(cls @ box / (n(cls) * n(box)))
    assert "class_error" not in out["layers"]
    summary = summarize([out, out])
    assert summary["ratio"] == pytest.approx(n(cls) / n(box)) and summary["terms"]["loss_ce"]["norm_std"] == 0.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, make_untrained_checkpoint):
    """The tiny model on the tiny preset, its box heads' last layers perturbed (they start at zero, which
    sends no box gradient to the trunk), saved as a checkpoint."""
    root = tmp_path_factory.mktemp("gradbal")
    path, cfg = make_untrained_checkpoint(root)
    state = load_checkpoint(path)
    torch.manual_seed(3)
    for key in list(state["model"]):
        if key.startswith("bbox_embed.") and ".layers.2." in key:
            state["model"][key] = state["model"][key] + 0.05 * torch.randn_like(state["model"][key])
    path = save_checkpoint(state, root / "runs" / "t" / "pretrain" / "checkpoint_final.pt")
    return path, cfg


def test_trunk_is_everything_but_the_heads(checkpoint):
    from stepwise.trained import load_trained_model

    model = load_trained_model(checkpoint[0]).model
    names = [n for n, _ in trunk_parameters(model)]
    assert names and not any(n.startswith(("class_embed.", "bbox_embed.")) for n in names)
    assert any(n.startswith("backbone.") for n in names) and any(n.startswith("transformer.") for n in names)
    heads = [n for n, _ in model.named_parameters() if n.startswith(("class_embed.", "bbox_embed."))]
    assert len(names) + len(heads) == len(list(model.named_parameters()))


def test_probe_on_the_tiny_preset(checkpoint, tmp_path, capsys):
    path, cfg = checkpoint
    out = tmp_path / "gb.json"
    assert main([f"checkpoint={path}", "batches=2", f"out={out}", "per_layer=true"]) == 0
    printed = capsys.readouterr().out
    assert "| loss_ce |" in printed and "| **boxes** |" in printed and "| loss_bbox_enc |" in printed
    result = json.loads(out.read_text())
    assert result["batches"] == 2 and set(result["terms"]) == {"loss_ce", "loss_bbox", "loss_giou"}
    assert {"loss_ce", "loss_ce_0", "loss_ce_enc", "loss_bbox_0"} <= set(result["layers"])
    groups = result["groups"]
    assert groups["classification"]["norm"] > 0 and groups["boxes"]["norm"] > 0
    assert result["ratio"] == pytest.approx(groups["classification"]["norm"] / groups["boxes"]["norm"])
    assert groups["total"]["norm"] <= groups["classification"]["norm"] + groups["boxes"]["norm"] + 1e-6
    assert -1 <= result["cosine"] <= 1 and result["head"]["name"] == "sigmoid"

    # the same weights and batches under another loss weight: the classification gradient scales exactly
    doubled = tmp_path / "gb2.json"
    assert main([f"checkpoint={path}", "batches=2", f"out={doubled}", "loss.ce=4.0"]) == 0
    again = json.loads(doubled.read_text())
    assert again["groups"]["classification"]["norm"] == pytest.approx(2 * groups["classification"]["norm"], rel=1e-4)
    assert again["groups"]["boxes"]["norm"] == pytest.approx(groups["boxes"]["norm"], rel=1e-4)


def test_probe_of_a_config_at_initialisation_and_head_options(checkpoint, tmp_path, capsys):
    """Without a checkpoint: the config's fresh model (here BACL); a loss option is one override away."""
    _, cfg = checkpoint
    data = [f"data.root={cfg.data.root}", "data.preset=tiny", "model.num_queries=10"]
    results = {}
    for gamma in ("0.0", "2.0"):
        out = tmp_path / f"bacl{gamma}.json"
        assert main(["head=bacl", f"head.bg_gamma={gamma}", f"head.fg_gamma={gamma}", "batches=1", f"out={out}",
                     *data]) == 0
        results[gamma] = json.loads(out.read_text())
    assert "initialisation" in capsys.readouterr().out
    assert set(results["2.0"]["terms"]) == {"loss_ce", "loss_fhm", "loss_bbox", "loss_giou"}
    assert results["2.0"]["head"]["bg_gamma"] == 2.0 and results["0.0"]["head"]["fg_gamma"] == 0.0
    ce = {g: r["terms"]["loss_ce"]["norm"] for g, r in results.items()}
    assert all(math.isfinite(v) and v > 0 for v in ce.values())


def test_bad_arguments(capsys):
    assert main(["batches=0"]) == 2
    assert main(["checkpoint="]) == 2
    assert main(["+head.x=1"]) == 2
    assert main(["checkpoint=/nonexistent/run"]) == 1
    assert "usage" in capsys.readouterr().err
