"""The training engine on a toy regression problem (CPU, seconds): resume equals an uninterrupted run,
the lr schedule steps once per epoch, checkpoints are kept/pruned, a NaN loss stops the run, evaluation
sees every image once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from stepwise.checkpoint import list_checkpoints, load_checkpoint
from stepwise.engine import NonFiniteLossError, NonFiniteStateError, Trainer, TrainSettings, make_accelerator
from stepwise.data.loaders import eval_loader, train_loader


class ToyData(torch.utils.data.Dataset):
    """n items: features (4,) with random augmentation noise drawn at load time, target (2,), image id."""

    def __init__(self, n: int = 10) -> None:
        g = torch.Generator().manual_seed(123)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(4), self.y[i], torch.tensor(100 + i)


class ToyCriterion:
    """Two named unweighted losses; optionally NaN on call ``nan_at``, a simulated kill on ``kill_at``, a
    finite loss with NaN gradients on ``nan_grad_at`` (d sqrt(x)/dx at 0 is inf, times 0) or the matcher's
    non-finite-cost error on ``bad_match_at``."""

    weight_dict = {"loss_mse": 1.0, "loss_l1": 0.5}

    def __init__(self, kill_at: int | None = None, nan_at: int | None = None, nan_grad_at: int | None = None,
                 bad_match_at: int | None = None) -> None:
        self.calls, self.kill_at, self.nan_at = 0, kill_at, nan_at
        self.nan_grad_at, self.bad_match_at = nan_grad_at, bad_match_at

    def __call__(self, outputs, targets):
        self.calls += 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt("simulated kill")
        if self.calls == self.bad_match_at:
            from stepwise.utils.finite import NonFiniteCostError
            raise NonFiniteCostError("image 104: non-finite matching cost: the model's predictions are non-finite")
        l1 = (outputs - targets).abs().mean()
        if self.calls == self.nan_at:
            l1 = l1 * float("nan")
        if self.calls == self.nan_grad_at:
            l1 = l1 + torch.sqrt((outputs * 0).sum())
        return {"loss_mse": ((outputs - targets) ** 2).mean(), "loss_l1": l1}


def toy_forward(model, batch):
    return model(batch[0]), batch[1]


def toy_predict(model, batch):
    out = model(batch[0])
    return [{"image_id": int(i), "pred": o.tolist()} for i, o in zip(batch[2], out)]


def toy_evaluate(records, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ids.json").write_text(json.dumps([r["image_id"] for r in records]))
    return {"num": len(records), "mean_pred": sum(sum(r["pred"]) for r in records) / len(records)}


def make_trainer(run_dir: Path, criterion=None, val: bool = False, **overrides) -> Trainer:
    values = dict(epochs=3, lr=1e-2, lr_drop=(1, 2), lr_gamma=0.5, clip_max_norm=1.0, checkpoint_every_steps=3,
                  keep_last=10, log_every=1, seed=7, eval_every_epochs=1)
    values.update(overrides)
    settings = TrainSettings(**values)
    accelerator = make_accelerator(settings, run_dir)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    data = ToyData(10)
    kwargs = {}
    if val:
        kwargs = dict(val_loader=eval_loader(ToyData(7), 2), predict_fn=toy_predict, evaluate_fn=toy_evaluate)
    return Trainer(accelerator, model, criterion or ToyCriterion(), train_loader(data, 2, seed=settings.seed),
                   settings, run_dir, forward_fn=toy_forward, categories={"ids": [1, 2]}, config={"toy": 1},
                   **kwargs)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


@pytest.mark.parametrize("grad_accum,kill_at", [(1, 8), (1, 11), (2, 9)])
def test_resume_equals_uninterrupted_run(tmp_path, grad_accum, kill_at):
    # 10 items, batch 2: 5 batches/epoch, 3 epochs, checkpoint every 3 optimizer steps, random augmentation
    # and dropout. kill_at=8 dies mid-epoch 1 (last checkpoint mid-epoch), 11 right after an epoch end.
    full = make_trainer(tmp_path / "full", grad_accum=grad_accum)
    full.fit()
    expected = weights(full)

    killed = make_trainer(tmp_path / "killed", ToyCriterion(kill_at=kill_at), grad_accum=grad_accum)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert list_checkpoints(tmp_path / "killed"), "the killed run wrote no checkpoint"
    assert max_diff(weights(killed), expected) > 1e-4  # it really stopped early

    resumed = make_trainer(tmp_path / "killed", resume=True, grad_accum=grad_accum)
    resumed.fit()
    assert resumed.progress.global_step == full.progress.global_step
    assert max_diff(weights(resumed), expected) <= 1e-6
    assert not list(tmp_path.rglob("*.tmp")), "a temporary checkpoint file was left behind"


def test_resume_does_not_repeat_metrics_lines(tmp_path):
    # Killed at step 8 with the last checkpoint at step 6: the killed run had logged step 7; before, the
    # resumed run logged 7 again (and a kill mid-write could leave a torn last line).
    full = make_trainer(tmp_path / "full")
    full.fit()
    killed = make_trainer(tmp_path / "killed", ToyCriterion(kill_at=8))
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "global_st')  # a line torn by the kill
    make_trainer(tmp_path / "killed", resume=True).fit()
    logged = [(r["global_step"], r["loss"]) for r in records(tmp_path / "killed", "train")]
    assert logged == [(r["global_step"], r["loss"]) for r in records(tmp_path / "full", "train")]
    assert [r["global_step"] for r in records(tmp_path / "killed", "start")] == [0, 6]


def test_scheduler_steps_once_per_epoch(tmp_path):
    trainer = make_trainer(tmp_path, grad_accum=2, checkpoint_every_steps=0)
    trainer.fit()
    lr_by_epoch = {r["epoch"]: r["lr"] for r in records(tmp_path, "train")}
    assert lr_by_epoch == pytest.approx({0: 1e-2, 1: 5e-3, 2: 2.5e-3})
    assert trainer.scheduler.last_epoch == 3
    # 5 batches with accumulation 2 -> 3 optimizer steps per epoch (the last one at the epoch's end)
    assert trainer.progress.global_step == 9


def test_checkpoints_keep_last_and_contents(tmp_path):
    trainer = make_trainer(tmp_path, checkpoint_every_steps=1, keep_last=2)
    trainer.fit()
    steps = [s for s, _ in list_checkpoints(tmp_path)]
    assert steps == [14, 15]
    state = load_checkpoint(list_checkpoints(tmp_path)[-1][1], required=("model", "optimizer", "scheduler", "rng"))
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (3, 0, 15)
    assert state["categories"] == {"ids": [1, 2]} and state["config"] == {"toy": 1}
    assert len(state["rng"]) == 1 and state["scheduler"]["last_epoch"] == 3
    final = load_checkpoint(tmp_path / "checkpoint_final.pt")
    assert "optimizer" not in final and final["global_step"] == 15
    assert max_diff(final["model"], weights(trainer)) == 0
    assert not list(tmp_path.rglob("*.tmp"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, ToyCriterion(nan_at=8), checkpoint_every_steps=2)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, batch 3 .*optimizer step 8.*loss_l1") as err:
        trainer.fit()
    assert "step_00000006.pt" in str(err.value)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5, 6]
    # the bad step was never applied: the weights equal the last good checkpoint's only if nothing ran after
    # it but step 7; they are finite in every case, and no final checkpoint claims success
    assert all(torch.isfinite(v).all() for v in weights(trainer).values())
    assert not (tmp_path / "checkpoint_final.pt").exists()
    last = load_checkpoint(list_checkpoints(tmp_path)[-1][1])
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_nan_gradients_with_finite_loss_stop_before_the_update(tmp_path, clip):
    # call 8 = epoch 1, batch 3: the loss is finite but every gradient is NaN. Without the guard the update
    # made the weights NaN and step_00000008.pt was written with them.
    trainer = make_trainer(tmp_path, ToyCriterion(nan_grad_at=8), checkpoint_every_steps=2, clip_max_norm=clip)
    with pytest.raises(NonFiniteStateError, match=r"non-finite gradients at epoch 1, batch 3 of the epoch "
                                                  r"\(optimizer step 8\).*first non-finite gradient in "
                                                  r"parameter '0.weight'.*step_00000006.pt"):
        trainer.fit()
    assert all_finite(weights(trainer))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5, 6]
    assert all(all_finite(load_checkpoint(p)["model"]) for _, p in list_checkpoints(tmp_path))
    assert not (tmp_path / "checkpoint_final.pt").exists()


def test_nan_parameter_from_an_optimizer_step_is_never_written(tmp_path):
    # A hooked optimizer step turns a weight NaN at step 4 (finite loss and gradients throughout): the
    # checkpoint of step 4 is refused on every process, naming the step and the parameter.
    trainer = make_trainer(tmp_path, checkpoint_every_steps=2)
    optimizer = trainer.optimizer.optimizer
    steps = []

    def poison(opt, args, kwargs):
        steps.append(1)
        if len(steps) == 4:
            with torch.no_grad():
                trainer.accelerator.unwrap_model(trainer.model)[3].bias[1] = float("nan")

    optimizer.register_step_post_hook(poison)
    with pytest.raises(NonFiniteStateError, match=r"after optimizer step 4 \(epoch 0, batch 4 of the epoch\): "
                                                  r"process 0: model.3.bias holds NaN or inf.*step_00000004.pt was not "
                                                  r"written.*last good checkpoint: .*step_00000002.pt"):
        trainer.fit()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert all_finite(load_checkpoint(list_checkpoints(tmp_path)[-1][1])["model"])
    assert not list(tmp_path.rglob("*.tmp"))


def test_non_finite_optimizer_state_is_named(tmp_path):
    trainer = make_trainer(tmp_path, checkpoint_every_steps=0, epochs=1)
    optimizer = trainer.optimizer.optimizer

    def poison(opt, args, kwargs):
        first = opt.param_groups[0]["params"][2]  # "3.weight" of the Sequential
        opt.state[first]["exp_avg_sq"].fill_(float("inf"))

    optimizer.register_step_post_hook(poison)
    with pytest.raises(NonFiniteStateError, match=r"process 0: optimizer.state.3.weight.exp_avg_sq holds NaN or inf"):
        trainer.fit()
    assert list_checkpoints(tmp_path) == []


def test_non_finite_predictions_in_the_matcher_name_the_step(tmp_path):
    trainer = make_trainer(tmp_path, ToyCriterion(bad_match_at=7), checkpoint_every_steps=2)
    with pytest.raises(NonFiniteStateError, match=r"non-finite predictions at epoch 1, batch 2 of the epoch "
                                                  r"\(optimizer step 7\): process 0: matcher: image 104: .*"
                                                  r"predictions are non-finite.*step_00000006.pt"):
        trainer.fit()


def test_resume_refuses_a_non_finite_checkpoint(tmp_path):
    from stepwise.checkpoint import NonFiniteCheckpointError, save_checkpoint

    trainer = make_trainer(tmp_path, max_steps=2, checkpoint_every_steps=2)
    trainer.fit()
    path = list_checkpoints(tmp_path)[-1][1]
    state = load_checkpoint(path)
    state["model"]["0.weight"][0, 0] = float("nan")
    save_checkpoint(state, path)  # as an older version of stepwise could have written it
    with pytest.raises(NonFiniteCheckpointError, match=r"step_00000002.pt: tensor '0.weight' holds NaN"):
        make_trainer(tmp_path, resume=True).fit()


def test_evaluation_sees_each_image_once_and_logs(tmp_path):
    trainer = make_trainer(tmp_path, val=True, epochs=2, checkpoint_every_steps=0, trackers=("tensorboard",))
    metrics = trainer.fit()
    assert metrics["num"] == 7
    assert json.loads((tmp_path / "eval" / "ids.json").read_text()) == list(range(100, 107))
    evals = records(tmp_path, "eval")
    assert [e["tag"] for e in evals] == ["epoch_1", "final"]
    assert (tmp_path / "eval" / "epoch_001" / "ids.json").is_file()
    assert any((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    train = records(tmp_path, "train")
    assert len(train) == 10 and {"loss", "loss_mse", "loss_l1", "lr"} <= train[0].keys()


def test_evaluation_does_not_change_training(tmp_path):
    with_eval = make_trainer(tmp_path / "a", val=True)
    with_eval.fit()
    without = make_trainer(tmp_path / "b")
    without.fit()
    assert max_diff(weights(with_eval), weights(without)) == 0


def test_max_steps_stops_early_and_writes_final(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, checkpoint_every_steps=0)
    trainer.fit()
    assert trainer.progress.global_step == 4
    assert load_checkpoint(tmp_path / "checkpoint_final.pt")["global_step"] == 4


def test_settings_from_config_and_validation():
    from stepwise.config import load_config

    cfg = load_config(["stage.lr_drop=[3,5]", "stage.mixed_precision=bf16", "resume=true"])
    settings = TrainSettings.from_config(cfg)
    assert settings.lr_drop == (3, 5) and settings.mixed_precision == "bf16" and settings.resume
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainSettings(mixed_precision="fp8").validate()
    with pytest.raises(ValueError, match=r"stage.epochs must be an integer >= 1, got 'abc'"):
        TrainSettings(epochs="abc").validate()
    with pytest.raises(ValueError, match=r"stage.lr must be a number > 0, got -1"):
        TrainSettings(lr=-1).validate()


@pytest.mark.slow
def test_pretrain_stage_smoke(tmp_path):
    """``stepwise.run stage=pretrain`` on the synthetic tiny preset with the tiny model: a few steps, then
    evaluation, the final checkpoint and the run-directory files the next stage reads (~30 s on 2 cores)."""
    from stepwise.checkpoint import load_checkpoint
    from stepwise.run import main

    metrics = main(["stage=pretrain", "model=tiny", "data=synthetic", "data.preset=tiny",
                    f"data.root={tmp_path / 'data'}", f"output_root={tmp_path / 'runs'}", "exp=smoke",
                    "stage.max_steps=2", "stage.max_eval_images=2", "stage.trackers=[]", "stage.log_every=1"])
    run_dir = tmp_path / "runs" / "smoke" / "pretrain"
    assert {"AP", "APr", "APc", "APf", "AP1"} <= metrics.keys()
    for name in ("config.yaml", "metrics.jsonl", "checkpoint_final.pt", "eval/metrics.json",
                 "eval/per_class.csv", "eval/predictions.json"):
        assert (run_dir / name).is_file(), name
    final = load_checkpoint(run_dir / "checkpoint_final.pt", required=("model", "categories", "config"))
    assert final["global_step"] == 2 and final["config"]["stage"]["name"] == "pretrain"
    assert len(final["categories"]["ids"]) == 10
    assert len(records(run_dir, "train")) == 2


@pytest.mark.slow
def test_pretrain_resume_real_detector_equals_uninterrupted(tmp_path):
    """The acceptance check on the real tiny detector and synthetic data: a run that dies after step 3
    (its last checkpoint is at step 2) and is resumed ends with the same weights as a run that was never
    interrupted (max abs difference <= 1e-6)."""
    from stepwise.checkpoint import load_checkpoint
    from stepwise.run import main

    common = ["stage=pretrain", "model=tiny", "model.num_queries=30", "data.preset=tiny",
              f"data.root={tmp_path / 'data'}", f"output_root={tmp_path / 'runs'}", "stage.max_eval_images=2",
              "stage.trackers=[]", "stage.checkpoint_every_steps=2", "stage.eval_every_epochs=0"]
    main([*common, "exp=straight", "stage.max_steps=5"])
    main([*common, "exp=killed", "stage.max_steps=3"])  # steps 1-3; checkpoint at step 2 only
    main([*common, "exp=killed", "stage.max_steps=5", "resume=true"])  # continues from step 2
    runs = tmp_path / "runs"
    straight = load_checkpoint(runs / "straight" / "pretrain" / "checkpoint_final.pt")
    resumed = load_checkpoint(runs / "killed" / "pretrain" / "checkpoint_final.pt")
    assert resumed["global_step"] == straight["global_step"] == 5
    diff = max((straight["model"][k].float() - resumed["model"][k].float()).abs().max().item()
               for k in straight["model"])
    assert diff <= 1e-6


@pytest.mark.slow
def test_pretrain_bf16_with_gradient_accumulation(tmp_path):
    """Accelerate's bf16 autocast (on the CPU here) with gradient accumulation 2 trains the real detector:
    two optimizer steps logged, finite losses, the final checkpoint records the precision."""
    from accelerate.state import AcceleratorState

    from stepwise.checkpoint import load_checkpoint
    from stepwise.run import main

    # Accelerate keeps one process-wide state; earlier tests in this process made it with precision "no".
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        main(["stage=pretrain", "model=tiny", "model.num_queries=30", "data.preset=tiny",
              f"data.root={tmp_path / 'data'}", f"output_root={tmp_path / 'runs'}", "exp=bf16",
              "stage.mixed_precision=bf16", "stage.grad_accum=2", "stage.max_steps=2", "stage.log_every=1",
              "stage.max_eval_images=2", "stage.trackers=[]"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    run_dir = tmp_path / "runs" / "bf16" / "pretrain"
    lines = records(run_dir, "train")
    assert [r["global_step"] for r in lines] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in lines)
    final = load_checkpoint(run_dir / "checkpoint_final.pt")
    assert final["global_step"] == 2 and final["config"]["stage"]["mixed_precision"] == "bf16"
