"""The training loop (:class:`Trainer`): optimise, log, evaluate, checkpoint; see :mod:`stepwise.engine`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR
from tqdm.auto import tqdm

from stepwise.engine.checkpointing import CheckpointMixin
from stepwise.engine.evaluation import evaluate
from stepwise.engine.finite_guard import FiniteGuardMixin
from stepwise.engine.metrics_log import append_jsonl
from stepwise.engine.settings import (EvaluateFn, ForwardFn, PredictFn, Progress, TrainSettings, detection_forward,
                                      weighted_total)
from stepwise.utils import cpu_threads
from stepwise.utils.finite import NonFiniteCostError


class Trainer(CheckpointMixin, FiniteGuardMixin):
    """Trains ``model`` with ``criterion`` on ``train_loader``; see :mod:`stepwise.engine`.

    Args:
        accelerator: from :func:`make_accelerator` (created before the model so seeding covers its init).
        model: any module; ``forward_fn(model, batch) -> (outputs, targets)`` calls it.
        criterion: ``criterion(outputs, targets) -> dict[str, Tensor]`` of scalar unweighted losses, with a
            ``weight_dict`` attribute.
        train_loader: a plain DataLoader (prepared here). For exact resume its sampler must be
            deterministic per epoch (``set_epoch``), e.g. ``stepwise.data.loaders.train_loader``.
        settings: the training options.
        run_dir: where checkpoints, ``metrics.jsonl``, TensorBoard logs and evaluation reports go.
        param_groups: AdamW parameter groups (dicts with ``params`` and optionally ``lr``); default: one
            group of every parameter with ``requires_grad``.
        val_loader, predict_fn, evaluate_fn: evaluation. ``predict_fn(model, batch)`` returns one dict per
            image with an ``image_id`` key; ``evaluate_fn(records, out_dir)`` runs on rank 0 on the gathered
            records and returns a metrics dict (and writes its report into ``out_dir``).
        categories, config: stored in every checkpoint (the category map as a plain dict, the resolved config).
    """

    def __init__(self, accelerator: Accelerator, model: nn.Module, criterion: Callable[..., dict[str, torch.Tensor]],
                 train_loader: torch.utils.data.DataLoader, settings: TrainSettings, run_dir: str | Path, *,
                 param_groups: list[dict[str, Any]] | None = None, val_loader: torch.utils.data.DataLoader | None = None,
                 predict_fn: PredictFn | None = None, evaluate_fn: EvaluateFn | None = None,
                 forward_fn: ForwardFn = detection_forward, categories: Any = None, config: Any = None) -> None:
        if val_loader is not None and (predict_fn is None or evaluate_fn is None):
            raise ValueError("a val_loader needs both predict_fn and evaluate_fn")
        self.accelerator = accelerator
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.criterion = criterion.to(accelerator.device) if isinstance(criterion, nn.Module) else criterion
        self.weight_dict = dict(criterion.weight_dict)
        self.forward_fn = forward_fn
        self.predict_fn = predict_fn
        self.evaluate_fn = evaluate_fn
        self.categories = categories
        self.config = config
        # Objects whose set_epoch decides the epoch's data (sampler order, per-sample seeds), captured
        # before prepare() wraps them; accelerate's own set_epoch skips the dataset when the sampler has one.
        self._epoch_aware = _epoch_aware(train_loader)
        self._loader_generator = train_loader.generator

        if param_groups is None:
            param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        # fused: one kernel for the whole update, 3x faster than foreach on the CPU (bench/optimizer_step.py)
        optimizer = torch.optim.AdamW(param_groups, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
        # Not prepared: accelerate would step it once per process and per optimizer step.
        self.scheduler = MultiStepLR(optimizer, milestones=list(settings.lr_drop), gamma=settings.lr_gamma)
        self.model, self.optimizer, self.train_loader = accelerator.prepare(model, optimizer, train_loader)
        self.val_loader = val_loader  # sharded by predict(), not by Accelerate: see shard_eval_loader
        self.progress = Progress()
        self._last_step: tuple[int, int] | None = None  # (epoch, batch of the epoch) of the last optimizer step
        self.last_metrics: dict[str, float] | None = None
        if settings.trackers:
            accelerator.init_trackers("tensorboard")

    # ----------------------------------------------------------------------------------------- main loop
    def fit(self) -> dict[str, float] | None:
        """Train ``settings.epochs`` epochs (or up to ``max_steps``), evaluate, write ``checkpoint_final.pt``.

        Returns the last evaluation's metrics (None without a val_loader).
        """
        try:
            if self.settings.resume:
                self.resume()
            self._write_jsonl({"type": "start", **self._position()})
            stopped = False
            while self.progress.epoch < self.settings.epochs and not stopped:
                epoch = self.progress.epoch
                stopped = self.train_one_epoch(epoch, self.progress.step_in_epoch)
                if stopped:
                    break
                self.scheduler.step()
                self.progress.epoch, self.progress.step_in_epoch = epoch + 1, 0
                self.save_checkpoint()
                every = self.settings.eval_every_epochs
                if self.val_loader is not None and every and (epoch + 1) % every == 0 \
                        and epoch + 1 < self.settings.epochs:
                    self.evaluate(self.run_dir / "eval" / f"epoch_{epoch + 1:03d}", tag=f"epoch_{epoch + 1}")
            self.save_final()
            if self.val_loader is not None:
                self.evaluate(self.run_dir / "eval", tag="final")
            return self.last_metrics
        finally:
            # Trackers only: Accelerator.end_training() would also destroy the process group, which the
            # next stage of the same process (stage=all, stepwise.study) still needs; entry points destroy it.
            for tracker in self.accelerator.trackers:
                tracker.finish()

    def train_one_epoch(self, epoch: int, skip: int = 0) -> bool:
        """Run one epoch from batch ``skip``; returns True when ``max_steps`` stopped it early."""
        acc, settings, progress = self.accelerator, self.settings, self.progress
        self._set_epoch(epoch)
        if skip and skip >= len(self.train_loader):
            raise ValueError(f"cannot resume epoch {epoch} at batch {skip}: this loader has only "
                             f"{len(self.train_loader)} batches per epoch (batch size or processes changed?)")
        loader = acc.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
        self.model.train()
        bar = tqdm(total=len(self.train_loader), initial=skip, desc=f"epoch {epoch}", dynamic_ncols=True,
                   disable=not acc.is_main_process)
        sums: dict[str, float] = {}
        count = 0
        done = skip
        try:
            for batch in loader:
                cpu_threads.tick(acc.device)  # fewer threads while other processes hold cores
                with acc.accumulate(self.model):
                    try:
                        outputs, targets = self.forward_fn(self.model, batch)
                        losses = self.criterion(outputs, targets)
                        total, failure = weighted_total(losses, self.weight_dict), None
                    except NonFiniteCostError as err:  # diverged predictions, found by the matcher
                        losses, total, failure = {}, None, f"matcher: {err}"
                    self._check_finite(losses, total, epoch, done, failure)
                    acc.backward(total)
                    if acc.sync_gradients:
                        self._check_gradients(epoch, done)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                done += 1
                bar.update(1)
                for key, value in {"loss": total, **losses}.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                count += 1
                if not acc.sync_gradients:
                    continue
                progress.global_step += 1
                progress.step_in_epoch = done
                self._last_step = (epoch, done)
                if settings.log_every and progress.global_step % settings.log_every == 0:
                    self._log_train(epoch, sums, count, bar)
                    sums, count = {}, 0
                if settings.checkpoint_every_steps and progress.global_step % settings.checkpoint_every_steps == 0 \
                        and done < len(self.train_loader):
                    self.save_checkpoint()
                if settings.max_steps is not None and progress.global_step >= settings.max_steps:
                    acc.print(f"stepwise: stopping at max_steps={settings.max_steps} (epoch {epoch}, batch {done})")
                    return True
        finally:
            bar.close()
        if count:
            self._log_train(epoch, sums, count, bar)
        return False

    # -------------------------------------------------------------------------------------- evaluation
    def evaluate(self, out_dir: str | Path | None = None, tag: str = "eval") -> dict[str, float] | None:
        """:func:`evaluate` on ``val_loader`` into ``out_dir`` (default ``<run_dir>/eval``), logged to
        ``metrics.jsonl`` and the trackers at the current step. Returns the metrics on every process."""
        if self.val_loader is None:
            raise ValueError("evaluate() needs a val_loader")
        out_dir = Path(out_dir) if out_dir is not None else self.run_dir / "eval"
        result = evaluate(self.accelerator, self.model, self.val_loader, self.predict_fn, self.evaluate_fn, out_dir)
        self.num_gathered = result.num_gathered  # before de-duplication (tests check nothing is duplicated)
        self.last_metrics = result.metrics
        self._write_jsonl({"type": "eval", "tag": tag, **self._position(), "num_images": result.num_images,
                           "metrics": result.metrics})
        scalars = {f"eval/{k}": v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        if self.settings.trackers and scalars:
            self.accelerator.log(scalars, step=self.progress.global_step)
        return result.metrics

    def _set_epoch(self, epoch: int) -> None:
        if self._loader_generator is not None:
            self._loader_generator.manual_seed(self.settings.seed * 100003 + epoch)
        self.train_loader.set_epoch(epoch)
        for obj in self._epoch_aware:
            obj.set_epoch(epoch)

    def _log_train(self, epoch: int, sums: dict[str, float], count: int, bar: Any) -> None:
        acc = self.accelerator
        means = torch.tensor([sums[k] / count for k in sums], device=acc.device)
        if acc.num_processes > 1:
            means = acc.reduce(means, reduction="mean")
        values = {k: float(v) for k, v in zip(sums, means.tolist())}
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self._write_jsonl({"type": "train", **self._position(), "lr": max(lrs), "lrs": lrs, **values})
        if self.settings.trackers:
            acc.log({f"train/{k}": v for k, v in values.items()} | {"train/lr": max(lrs)},
                    step=self.progress.global_step)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{max(lrs):.2e}")

    def _write_jsonl(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            append_jsonl(self.run_dir / "metrics.jsonl", record)


def _epoch_aware(loader: torch.utils.data.DataLoader) -> list[Any]:
    """The loader's sampler, batch sampler's sampler and dataset that define ``set_epoch`` (each once)."""
    candidates = [loader.sampler, getattr(loader.batch_sampler, "sampler", None), loader.dataset]
    found: dict[int, Any] = {}
    for obj in candidates:
        if obj is not None and callable(getattr(obj, "set_epoch", None)):
            found.setdefault(id(obj), obj)
    return list(found.values())
