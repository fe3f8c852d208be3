"""Two CPU processes under ``accelerate launch``: training steps the lr once per epoch and evaluating one
checkpoint gathers every image exactly once, with the same predictions and metrics as one process.

The test launches this file itself as the training script (``python tests/test_multiprocess.py OUT CKPT``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

N_VAL = 7  # odd: batches of 2 do not split evenly over two processes


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], torch.tensor(100 + i)


class ToyCriterion:
    weight_dict = {"loss_mse": 1.0}

    def __call__(self, outputs, targets):
        return {"loss_mse": ((outputs - targets) ** 2).mean()}


def toy_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def toy_predict(model, batch):
    return [{"image_id": int(i), "pred": o.tolist()} for i, o in zip(batch[2], model(batch[0]))]


def toy_evaluate(records, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "records.json").write_text(json.dumps(records))
    preds = torch.tensor([r["pred"] for r in records])
    return {"num_images": len(records), "mean": float(preds.mean()), "max": float(preds.max())}


def poisoned_run(out: Path) -> None:
    """Process 1 alone turns a weight NaN in optimizer step 2: the checkpoint of step 2 must be refused on
    both processes (each raises, neither hangs) and never written."""
    from stepwise.engine import Trainer, TrainSettings, make_accelerator
    from stepwise.data.loaders import train_loader

    settings = TrainSettings(epochs=1, lr=1e-2, seed=3, checkpoint_every_steps=1, log_every=0)
    acc = make_accelerator(settings, out)
    trainer = Trainer(acc, toy_model(), ToyCriterion(), train_loader(ToyData(10, 1), 2, seed=3), settings, out,
                      forward_fn=lambda m, b: (m(b[0]), b[1]))
    steps = []

    def poison(opt, args, kwargs):
        steps.append(1)
        if acc.process_index == 1 and len(steps) == 2:
            with torch.no_grad():
                acc.unwrap_model(trainer.model)[2].bias[0] = float("nan")

    trainer.optimizer.optimizer.register_step_post_hook(poison)
    trainer.fit()


def main(out: str, checkpoint: str) -> None:
    from stepwise.checkpoint import load_model_weights
    from stepwise.engine import Trainer, TrainSettings, make_accelerator
    from stepwise.data.loaders import eval_loader, train_loader

    out = Path(out)
    settings = TrainSettings(epochs=2, lr=1e-2, lr_drop=(1,), lr_gamma=0.1, log_every=1, seed=3,
                             checkpoint_every_steps=2, eval_every_epochs=0)
    acc = make_accelerator(settings, out / "run")
    model = toy_model()
    load_model_weights(model, checkpoint)
    trainer = Trainer(acc, model, ToyCriterion(), train_loader(ToyData(10, 1), 2, seed=3), settings, out / "run",
                      val_loader=eval_loader(ToyData(N_VAL, 2), 2), predict_fn=toy_predict,
                      evaluate_fn=toy_evaluate, forward_fn=lambda m, b: (m(b[0]), b[1]))
    metrics = trainer.evaluate(out / "checkpoint_eval")
    gathered = trainer.num_gathered
    trainer.fit()
    group_alive = torch.distributed.is_initialized()  # a next stage in this process (stage=all, stepwise.study)
    acc.wait_for_everyone()                           # still synchronises after fit()
    if acc.is_main_process:
        lines = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        lr = {r["epoch"]: r["lr"] for r in lines if r["type"] == "train"}
        (out / "result.json").write_text(json.dumps({
            "processes": acc.num_processes, "metrics": metrics, "gathered": gathered, "lr_by_epoch": lr,
            "global_step": trainer.progress.global_step, "scheduler_epoch": trainer.scheduler.last_epoch,
            "group_alive_after_fit": group_alive}))


def launch(tmp_path: Path, processes: int, checkpoint: Path) -> dict:
    out = tmp_path / f"p{processes}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU test
    # --multi_gpu selects torchrun; on a machine without CUDA, make_accelerator makes it a gloo CPU group
    # (accelerate's own --cpu launcher starts one process only).
    mode = ["--multi_gpu"] if processes > 1 else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29600 + processes), __file__, str(out), str(checkpoint)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "result.json").read_text()) | {"out": str(out)}


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
    from stepwise.checkpoint import save_checkpoint

    torch.manual_seed(0)
    checkpoint = save_checkpoint({"model": toy_model().state_dict()}, tmp_path / "toy.pt")
    one, two = launch(tmp_path, 1, checkpoint), launch(tmp_path, 2, checkpoint)
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["group_alive_after_fit"]  # fit() leaves the process group to the entry point

    # evaluation of one checkpoint: nothing predicted twice, results identical
    assert one["gathered"] == two["gathered"] == N_VAL
    assert one["metrics"] == two["metrics"] and one["metrics"]["num_images"] == N_VAL
    rec1 = json.loads((Path(one["out"]) / "checkpoint_eval" / "records.json").read_text())
    rec2 = json.loads((Path(two["out"]) / "checkpoint_eval" / "records.json").read_text())
    assert rec1 == rec2 and [r["image_id"] for r in rec1] == list(range(100, 100 + N_VAL))

    # training: the lr drops once after epoch 0 whatever the number of processes
    for res, steps_per_epoch in ((one, 5), (two, 3)):
        assert res["lr_by_epoch"] == pytest.approx({"0": 1e-2, "1": 1e-3})
        assert res["scheduler_epoch"] == 2 and res["global_step"] == 2 * steps_per_epoch
    final = Path(two["out"]) / "run" / "eval" / "records.json"
    assert len(json.loads(final.read_text())) == N_VAL


@pytest.mark.multiprocess
def test_non_finite_state_on_one_process_stops_both(tmp_path):
    out = tmp_path / "poisoned"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29611", __file__, str(out), "poison"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    # both ranks raise the same agreed error (rank 0's own state is finite)
    assert text.count("NonFiniteStateError: non-finite values after optimizer step 2 (epoch 0, batch 2 of the "
                      "epoch): process 1: model.2.bias holds NaN or inf") == 2, text[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001.pt"]


if __name__ == "__main__":
    if sys.argv[2] == "poison":
        poisoned_run(Path(sys.argv[1]))
    else:
        main(*sys.argv[1:3])
