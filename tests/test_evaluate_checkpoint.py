"""``python -m stepwise.evaluate checkpoint=...``: a trained checkpoint predicted and scored on its val set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepwise.evaluate import main
from stepwise.utils.io import atomic_write_json, read_json

METRIC_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AP1", "AP2", "AP3", "AP4"}
N_IMAGES = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_untrained_checkpoint):
    """A tiny model (random weights) on the synthetic ``tiny`` preset, saved as ``checkpoint_final.pt``,
    and a val file cut to its first ``N_IMAGES`` images (keeps the tests quick)."""
    root = tmp_path_factory.mktemp("evalckpt")
    path, cfg = make_untrained_checkpoint(root)
    val = read_json(cfg.data.val_ann)
    keep = {im["id"] for im in val["images"][:N_IMAGES]}
    small = dict(val, images=val["images"][:N_IMAGES], annotations=[a for a in val["annotations"] if a["image_id"] in keep])
    atomic_write_json(root / "val_small.json", small)
    return {"checkpoint": path, "cfg": cfg, "small_gt": root / "val_small.json", "image_ids": sorted(keep)}


def test_writes_predictions_and_all_metrics(trained, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([f"checkpoint={trained['checkpoint']}", f"gt={trained['small_gt']}", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "APr" in printed and "AP1" in printed  # the table

    metrics = read_json(out / "metrics.json")
    assert METRIC_KEYS <= metrics.keys()
    assert all(metrics[k] is None or 0.0 <= metrics[k] <= 1.0 for k in METRIC_KEYS)
    assert (out / "per_class.csv").is_file()
    predictions = read_json(out / "predictions.json")
    assert {p["image_id"] for p in predictions} == set(trained["image_ids"])
    assert all({"image_id", "category_id", "bbox", "score"} <= p.keys() and len(p["bbox"]) == 4 for p in predictions)
    # 10 queries x 10 classes = 100 candidate detections per image, all kept (max_dets 300)
    assert len(predictions) == 100 * N_IMAGES

    # the same predictions scored by the predictions= mode give the same numbers
    again = tmp_path / "again"
    assert main([f"gt={trained['small_gt']}", f"predictions={out / 'predictions.json'}",
                 f"train_gt={trained['cfg'].data.train_ann}", f"out={again}"]) == 0
    rescored = read_json(again / "metrics.json")
    assert {k: v for k, v in rescored.items() if k != "meta"} == {k: v for k, v in metrics.items() if k != "meta"}
    assert (again / "per_class.csv").read_text() == (out / "per_class.csv").read_text()


def test_run_dir_config_val_set_overrides_and_default_out(trained):
    run_dir = trained["checkpoint"].parent
    assert main([f"checkpoint={run_dir}", "stage.max_eval_images=2", "max_dets=20"]) == 0
    out = run_dir / "evaluate" / "checkpoint_final"
    predictions = read_json(out / "predictions.json")
    assert {p["image_id"] for p in predictions} == set(trained["image_ids"][:2])
    assert len(predictions) == 20 * 2
    assert METRIC_KEYS <= read_json(out / "metrics.json").keys()
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["type"] == "eval" and record["num_images"] == 2


def test_bad_checkpoint_and_arguments(trained, tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert main([f"checkpoint={missing}", f"out={tmp_path / 'o'}"]) == 1
    assert f"checkpoint not found: {missing}" in capsys.readouterr().err

    weights_only = tmp_path / "weights_only.pt"
    torch.save({"model": {}}, weights_only)
    assert main([f"checkpoint={weights_only}", f"out={tmp_path / 'o'}"]) == 1
    err = capsys.readouterr().err
    assert "weights_only.pt" in err and "categories" in err and "config" in err

    assert main([f"checkpoint={trained['checkpoint']}", "stage.no_such_option=3", f"out={tmp_path / 'o'}"]) == 2
    assert "stage.no_such_option" in capsys.readouterr().err
    assert main([f"checkpoint={trained['checkpoint']}", "max_dets=0"]) == 2
    assert main([f"checkpoint={trained['checkpoint']}", f"predictions={tmp_path / 'p.json'}"]) == 2
    assert "several mode keys" in capsys.readouterr().err
    # the predictions mode still refuses keys it does not know
    assert main(["gt=a.json", "predictions=b.json", "stage.eval_batch_size=2"]) == 2


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_give_the_same_report(trained, tmp_path):
    """``accelerate launch`` on 2 CPU processes: every image once, same predictions and metrics as 1 process."""
    def launch(processes: int) -> Path:
        out = tmp_path / f"p{processes}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        mode = ["--multi_gpu"] if processes > 1 else []
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(29650 + processes), "-m", "stepwise.evaluate",
               f"checkpoint={trained['checkpoint']}", f"gt={trained['small_gt']}", f"out={out}"]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return out

    one, two = launch(1), launch(2)
    assert read_json(one / "metrics.json") == read_json(two / "metrics.json")
    p1, p2 = read_json(one / "predictions.json"), read_json(two / "predictions.json")
    assert len(p1) == len(p2) == 100 * N_IMAGES
    for a, b in zip(p1, p2):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-4)


def test_gathered_records_are_arrays_holding_the_lvis_results():
    """What the engine gathers per image (arrays) holds exactly the LVIS results the dict path made."""
    import numpy as np

    from stepwise.models.postprocess import to_lvis_results
    from stepwise.predictor import detection_columns, records_to_detections

    gen = torch.Generator().manual_seed(0)
    dets = []
    for k in (5, 0, 7):
        xy = torch.rand(k, 2, generator=gen) * 300
        dets.append({"scores": torch.rand(k, generator=gen), "labels": torch.randint(0, 4, (k,), generator=gen),
                     "boxes": torch.cat([xy, xy + torch.rand(k, 2, generator=gen) * 50], 1)})
    ids, cat_ids = [11, 12, 13], [3, 17, 40, 41]
    records = [detection_columns(d, i, np.array(cat_ids)) for d, i in zip(dets, ids)]
    assert all(isinstance(r["bbox"], np.ndarray) and r["bbox"].dtype == np.float32 for r in records)
    assert records_to_detections(records).to_records() == to_lvis_results(dets, ids, cat_ids)
    with pytest.raises(ValueError, match="image 12: class index 4"):
        detection_columns({**dets[0], "labels": torch.tensor([0, 4, 1, 1, 1])}, 12, np.array(cat_ids))
