"""One training loop on Hugging Face Accelerate: optimise, log, evaluate, checkpoint, resume.

The loop is generic: it takes a model, a criterion returning named **unweighted** losses plus a
``weight_dict``, data loaders and two evaluation callables, so stages (pretrain, finetune, distill) and the
tests' toy models share it. What it guarantees:

* AdamW over the given parameter groups, gradient clipping, a ``MultiStepLR`` stepped exactly once per
  epoch whatever the number of processes (the scheduler is *not* passed through ``accelerator.prepare``);
* mixed precision and gradient accumulation through Accelerate; a progress bar on rank 0 only;
  ``metrics.jsonl`` (one JSON line per log step and per evaluation) and Accelerate's trackers (TensorBoard);
* checkpoints every N optimizer steps and at each epoch end, written atomically by rank 0, last K kept;
* ``resume``: continue mid-epoch from the latest checkpoint (consumed batches skipped, sampler epoch and
  every process's RNG restored) so the result equals an uninterrupted run (exactly, when data loading does
  not draw from the global RNG: see ``stepwise.data.loaders.SeededDataset``);
* a finite-state guard: a NaN/inf loss (before the backward pass), a NaN/inf gradient norm (the one
  clipping computes, before the optimizer step), non-finite predictions found by the matcher, or a NaN/inf
  parameter, buffer or optimizer state at checkpoint time stops every process together (a flag reduced
  across processes), naming the epoch, step and the first offending loss/parameter; that state is never
  written, so the newest checkpoint on disk is always finite;
* evaluation (:func:`evaluate`, a free function: the ``checkpoint=`` evaluation and selection run it without
  a Trainer): fixed batches are dealt out to the processes (no padding, no duplicates, the same batches
  whatever the number of processes, so the metrics do not depend on it); rank 0 scores the gathered
  predictions and writes the report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, send_to_device, set_seed
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR
from tqdm.auto import tqdm

from stepwise.checkpoint import (FINAL_NAME, TRAINING_KEYS, check_finite_weights, checkpoint_path, find_latest,
                                 head_state, load_checkpoint, optimizer_state_names, preserved_rng,
                                 prune_checkpoints, restore_head_state, rng_state, save_checkpoint, set_rng_state)
from stepwise.utils import cpu_threads
from stepwise.utils.finite import NonFiniteCostError, first_non_finite, named_tensors, norm_overflow
from stepwise.utils.io import atomic_write_text, write_error

ForwardFn = Callable[[nn.Module, Any], tuple[Any, Any]]
PredictFn = Callable[[nn.Module, Any], list[dict[str, Any]]]
EvaluateFn = Callable[[list[dict[str, Any]], Path], dict[str, float]]


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class NonFiniteStateError(NonFiniteLossError):
    """Gradients, predictions, parameters or optimizer state became NaN/inf; nothing of it is written."""


@dataclass
class TrainSettings:
    """The training options a stage config (``configs/stage/*.yaml``) carries, plus ``seed``/``resume``."""

    epochs: int = 1
    lr: float = 2e-4
    weight_decay: float = 1e-4
    lr_drop: Sequence[int] = ()
    lr_gamma: float = 0.1
    clip_max_norm: float = 0.1
    grad_accum: int = 1
    mixed_precision: str = "no"
    eval_every_epochs: int = 1
    checkpoint_every_steps: int = 0
    keep_last: int = 3
    log_every: int = 20
    max_steps: int | None = None
    trackers: Sequence[str] = ()
    seed: int = 42
    resume: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "TrainSettings":
        """Read ``cfg.stage.<field>`` (fields the stage config lacks keep their defaults), ``cfg.seed``, ``cfg.resume``."""
        stage = cfg.stage
        names = {f.name for f in fields(cls)} - {"seed", "resume"}
        values = {name: stage[name] for name in names if name in stage}
        for name in ("lr_drop", "trackers"):
            if name in values:
                values[name] = tuple(values[name] or ())
        settings = cls(**values, seed=int(cfg.seed), resume=bool(cfg.resume))
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ValueError naming the bad option."""
        for name in ("epochs", "grad_accum", "eval_every_epochs", "checkpoint_every_steps", "keep_last", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"stage.{name} must be an integer, got {value!r}")
        for name in ("lr", "weight_decay", "lr_gamma", "clip_max_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (name in ("lr", "lr_gamma") and value == 0):
                raise ValueError(f"stage.{name} must be a number {'> 0' if name in ('lr', 'lr_gamma') else '>= 0'}, "
                                 f"got {value!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"stage.mixed_precision must be no, bf16 or fp16, not {self.mixed_precision!r}")
        for name in ("epochs", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"stage.max_steps must be null or >= 1, got {self.max_steps}")


def make_accelerator(settings: TrainSettings, run_dir: str | Path) -> Accelerator:
    """The Accelerator for one stage (precision, accumulation, trackers under ``run_dir``), seeded."""
    accelerator = Accelerator(
        # Without CUDA, say cpu=True: under torchrun (``accelerate launch --multi_gpu``) Accelerate otherwise
        # treats every CPU process as a lone single process instead of a gloo MULTI_CPU group.
        cpu=not torch.cuda.is_available(),
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_steps=settings.grad_accum,
        log_with=list(settings.trackers) or None,
        project_dir=str(run_dir),
        step_scheduler_with_optimizer=False,
    )
    set_seed(settings.seed)
    return accelerator


def detection_forward(model: nn.Module, batch: Any) -> tuple[Any, Any]:
    """Default forward: an ``ImageBatch`` (images (B,3,H,W), masks (B,H,W)) -> (DetectorOutput, targets)."""
    return model(batch.images, batch.masks), batch.targets


def weighted_total(losses: dict[str, torch.Tensor], weight_dict: dict[str, float]) -> torch.Tensor:
    """Sum of ``weight_dict[k] * losses[k]`` over the losses that have a weight (DETR's convention)."""
    terms = [losses[k] * weight_dict[k] for k in losses if k in weight_dict]
    if not terms:
        raise KeyError(f"no loss has a weight: losses {sorted(losses)}, weight_dict {sorted(weight_dict)}")
    return torch.stack([t.float() for t in terms]).sum()


@dataclass
class Progress:
    """Where training stands: the next epoch to run, batches of it already done, optimizer steps so far."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Trains ``model`` with ``criterion`` on ``train_loader``; see the module docstring.

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

    # ------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write a training checkpoint at the current position (rank 0 writes; all ranks must call).

        Raises NonFiniteStateError on every process, writing nothing, when a parameter, buffer, head
        statistic or optimizer state holds NaN/inf.
        """
        acc = self.accelerator
        rngs = gather_object([rng_state()])
        path = checkpoint_path(self.run_dir, self.progress.global_step)
        state = self._state(full=True) if acc.is_main_process else None
        self._refuse_non_finite(state, path, full=True)
        if acc.is_main_process:
            state["rng"] = rngs
            save_checkpoint(state, path)
            prune_checkpoints(self.run_dir, self.settings.keep_last)
        acc.wait_for_everyone()
        return path

    def save_final(self) -> Path:
        """``<run_dir>/checkpoint_final.pt``: weights, head state, categories, config (what later stages read)."""
        path = self.run_dir / FINAL_NAME
        state = self._state(full=False) if self.accelerator.is_main_process else None
        self._refuse_non_finite(state, path, full=False)
        if self.accelerator.is_main_process:
            save_checkpoint(state, path)
        self.accelerator.wait_for_everyone()
        return path

    def resume(self) -> bool:
        """Restore everything from the latest checkpoint of ``run_dir``; False (and a message) if there is none.

        ``metrics.jsonl`` is cut back to the checkpoint's step (the interrupted run's later lines would
        otherwise appear twice).
        """
        acc = self.accelerator
        path = find_latest(self.run_dir)
        if path is None:
            acc.print(f"stepwise: resume=true but {self.run_dir} has no checkpoint; starting from scratch")
            return False
        state = load_checkpoint(path, required=TRAINING_KEYS)
        check_finite_weights(state, path)
        acc.unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if acc.scaler is not None and state.get("scaler") is not None:
            acc.scaler.load_state_dict(state["scaler"])
        if state.get("head_state"):
            restore_head_state(acc.unwrap_model(self.model), state["head_state"])
        rngs = state["rng"]
        if len(rngs) == acc.num_processes:
            set_rng_state(rngs[acc.process_index])
        else:
            acc.print(f"stepwise: {path} was written by {len(rngs)} processes, this run has "
                      f"{acc.num_processes}: RNG streams reseeded, so the run will not repeat exactly")
            set_seed(self.settings.seed + state["global_step"], device_specific=True)
        self.progress = Progress(int(state["epoch"]), int(state["step_in_epoch"]), int(state["global_step"]))
        if acc.is_main_process:
            dropped = truncate_metrics(self.run_dir / "metrics.jsonl", self.progress.global_step)
            if dropped:
                print(f"stepwise: metrics.jsonl: dropped {dropped} line(s) logged after step "
                      f"{self.progress.global_step} by the interrupted run (they are logged again)", flush=True)
        acc.print(f"stepwise: resumed from {path} at epoch {self.progress.epoch}, "
                  f"batch {self.progress.step_in_epoch}, global step {self.progress.global_step}")
        return True

    # --------------------------------------------------------------------------------------- internals
    def _state(self, full: bool) -> dict[str, Any]:
        acc = self.accelerator
        model = acc.unwrap_model(self.model)
        state: dict[str, Any] = {
            "model": model.state_dict(),
            "head_state": head_state(model),
            "categories": _plain(self.categories),
            "config": _plain(self.config),
            "num_processes": acc.num_processes,
            **self._position(),
        }
        if full:
            state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                         scaler=acc.scaler.state_dict() if acc.scaler is not None else None)
        return state

    def _position(self) -> dict[str, int]:
        p = self.progress
        return {"epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "global_step": p.global_step}

    def _set_epoch(self, epoch: int) -> None:
        if self._loader_generator is not None:
            self._loader_generator.manual_seed(self.settings.seed * 100003 + epoch)
        self.train_loader.set_epoch(epoch)
        for obj in self._epoch_aware:
            obj.set_epoch(epoch)

    def _check_finite(self, losses: dict[str, torch.Tensor], total: torch.Tensor | None, epoch: int, done: int,
                      failure: str | None = None) -> None:
        """Stop every process together when any process sees a NaN/inf loss, or ``failure`` (the matcher
        found non-finite predictions), before the backward pass."""
        bad = [k for k, v in losses.items()
               if k in self.weight_dict and not bool(torch.isfinite(v.detach()).all())]
        if failure is not None:
            bad.append(failure)
        elif not bad and not bool(torch.isfinite(total.detach())):
            bad = ["weighted total"]
        names = self._agree(bad)
        if names is None:
            return
        kind = NonFiniteStateError if "matcher: " in names else NonFiniteLossError
        what = "non-finite predictions" if kind is NonFiniteStateError else "non-finite loss"
        raise kind(f"{what} at epoch {epoch}, batch {done + 1} of the epoch (optimizer step "
                   f"{self.progress.global_step + 1}): {names}. Training stopped before the update; "
                   f"{self._last_good()}")

    def _check_gradients(self, epoch: int, done: int) -> None:
        """Clip (when ``clip_max_norm`` > 0) and stop every process when the gradient norm is NaN/inf.

        The norm is the one clipping computes (without clipping, ``get_total_norm`` of the gradients). Under
        fp16 loss scaling a non-finite norm is expected now and then (the scaler skips that step), so only
        the parameters are checked there, at checkpoint time.
        """
        acc, settings = self.accelerator, self.settings
        if settings.clip_max_norm > 0:
            norm = acc.clip_grad_norm_(self.model.parameters(), settings.clip_max_norm)
        else:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads and acc.scaler is None else None
        if acc.scaler is not None:
            return
        bad = []
        if norm is not None and not bool(torch.isfinite(torch.as_tensor(norm))):
            model = acc.unwrap_model(self.model)
            first = first_non_finite((n, p.grad) for n, p in model.named_parameters() if p.grad is not None)
            bad = [f"gradient norm {float(norm)}, first non-finite gradient in parameter {first!r}" if first else
                   norm_overflow(float(norm), ((n, p.grad) for n, p in model.named_parameters()))]
        names = self._agree(bad)
        if names is not None:
            raise NonFiniteStateError(
                f"non-finite gradients at epoch {epoch}, batch {done + 1} of the epoch (optimizer step "
                f"{self.progress.global_step + 1}): {names}. Training stopped before the update; "
                f"{self._last_good()}")

    def _refuse_non_finite(self, state: dict[str, Any] | None, path: Path, full: bool) -> None:
        """Raise NonFiniteStateError on every process when any process's model or optimizer state (rank 0:
        the ``state`` it is about to write) holds NaN/inf; nothing is written then."""
        acc = self.accelerator
        if state is None:  # other ranks check their own copy (DDP keeps them equal unless something broke)
            model = acc.unwrap_model(self.model)
            state = {"model": model.state_dict(), "head_state": head_state(model)}
            if full:
                state["optimizer"] = self.optimizer.state_dict()
        named = {"model": state["model"], "head_state": state.get("head_state")}
        if "optimizer" in state:
            named["optimizer"] = optimizer_state_names(state["optimizer"], self._param_names())
        bad = first_non_finite(named_tensors(named))
        names = self._agree([f"{bad} holds NaN or inf"] if bad is not None else [])
        if names is None:
            return
        where = (f"after optimizer step {self.progress.global_step} (epoch {self._last_step[0]}, batch "
                 f"{self._last_step[1]} of the epoch)" if self._last_step else
                 f"at optimizer step {self.progress.global_step} (epoch {self.progress.epoch})")
        raise NonFiniteStateError(f"non-finite values {where}: {names}. {path} was not written; "
                                  f"{self._last_good()}")

    def _param_names(self) -> list[str]:
        """Name of each optimizer parameter, in ``optimizer.state_dict()`` index order."""
        model = self.accelerator.unwrap_model(self.model)
        name_of = {id(p): n for n, p in model.named_parameters()}
        groups = getattr(self.optimizer, "optimizer", self.optimizer).param_groups
        return [name_of.get(id(p), f"#{k}") for k, p in enumerate(p for g in groups for p in g["params"])]

    def _agree(self, bad: list[str]) -> str | None:
        """Reduce "this process found a problem" over all processes; None when none did, else every
        process's findings (``process r: ...``)."""
        acc = self.accelerator
        flag = torch.tensor([float(bool(bad))], device=acc.device)
        if acc.num_processes > 1:
            flag = acc.reduce(flag, reduction="sum")
        if flag.item() == 0:
            return None
        per_rank = gather_object([(acc.process_index, bad)]) if acc.num_processes > 1 else [(0, bad)]
        return "; ".join(f"process {r}: {', '.join(b)}" for r, b in per_rank if b)

    def _last_good(self) -> str:
        last = find_latest(self.run_dir)
        return f"last good checkpoint: {last if last is not None else 'none written yet'}"

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


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (tensors as numbers/lists, NaN/inf as strings)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
    except OSError as err:
        raise write_error(path, err, "metrics file") from err


# ------------------------------------------------------------------------------------------- evaluation
@dataclass
class Evaluation:
    """What :func:`evaluate` returns: the metrics (every process), the images scored and the records
    gathered before de-duplication (equal to ``num_images`` when no image was predicted twice)."""

    metrics: dict[str, Any] | None
    num_images: int
    num_gathered: int


@torch.no_grad()  # torch enters/leaves no_grad around each step of a generator, not across its yields
def shard_predictions(accelerator: Accelerator, model: nn.Module, loader: torch.utils.data.DataLoader,
                      predict_fn: PredictFn, desc: str = "eval") -> Iterator[Any]:
    """``predict_fn(model, batch)`` for each batch of this process's share of a plain sequential ``loader``
    (:func:`shard_eval_loader`), on the accelerator's device, without gradients, with a progress bar on
    rank 0. Runs the unwrapped model (DDP would sync BatchNorm buffers in forward, and processes get unequal
    numbers of batches) in eval mode, and leaves every RNG stream as it was."""
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    shard = shard_eval_loader(loader, accelerator.num_processes, accelerator.process_index)
    try:
        with preserved_rng():
            for batch in tqdm(shard, desc=desc, dynamic_ncols=True, disable=not accelerator.is_main_process):
                cpu_threads.tick(accelerator.device)
                yield predict_fn(model, send_to_device(batch, accelerator.device))
    finally:
        model.train(was_training)


def gather_predictions(accelerator: Accelerator, model: nn.Module, loader: torch.utils.data.DataLoader,
                       predict_fn: PredictFn) -> tuple[list[dict[str, Any]], int]:
    """Every process predicts its shard (:func:`shard_predictions`); returns, on every process, the records
    (one dict per image, with ``image_id``) of all processes, each image once, ordered by image id, and
    the number of records gathered before de-duplication."""
    records = [record for batch in shard_predictions(accelerator, model, loader, predict_fn) for record in batch]
    gathered = gather_object(records) if accelerator.num_processes > 1 else records
    unique: dict[Any, dict[str, Any]] = {}
    for record in gathered:
        unique.setdefault(record["image_id"], record)
    return [unique[k] for k in sorted(unique)], len(gathered)


def evaluate(accelerator: Accelerator, model: nn.Module, loader: torch.utils.data.DataLoader,
             predict_fn: PredictFn, evaluate_fn: EvaluateFn, out_dir: str | Path) -> Evaluation:
    """Predict ``loader`` on every process's shard, gather every image once, score on rank 0 with
    ``evaluate_fn(records, out_dir)`` (which writes its report there). Training and the ``checkpoint=``
    evaluation both run this; it needs no optimizer or training loader and disturbs no RNG stream."""
    records, gathered = gather_predictions(accelerator, model, loader, predict_fn)
    metrics = evaluate_fn(records, Path(out_dir)) if accelerator.is_main_process else None
    metrics = broadcast_object_list([metrics])[0]
    return Evaluation(metrics, len(records), gathered)


def truncate_metrics(path: Path, global_step: int) -> int:
    """Drop the lines of a ``metrics.jsonl`` logged after optimizer step ``global_step``; returns how many.

    Lines without a ``global_step`` and lines that are not JSON (a line cut by a kill) are dropped only
    after the first line past ``global_step``. The file is rewritten atomically.
    """
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            step = json.loads(line).get("global_step")
        except (json.JSONDecodeError, AttributeError):
            step = None
            if not line.endswith("\n"):  # the last line, half written when the run was killed
                break
        if step is not None and step > global_step:
            break
        keep.append(line)
    if len(keep) < len(lines):
        atomic_write_text(path, "".join(keep), "metrics file")
    return len(lines) - len(keep)


class ShardedBatches(torch.utils.data.Sampler):
    """Consecutive batches of ``range(num_items)``; batch ``k`` goes to process ``k % num_replicas``.

    The batches are formed before sharding and never padded, so every image is batched (hence padded)
    with the same companions whatever the number of processes: evaluation gives identical predictions
    with 1 or N processes, and no image is predicted twice.
    """

    def __init__(self, num_items: int, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.num_items, self.batch_size, self.num_replicas, self.rank = num_items, batch_size, num_replicas, rank

    def __iter__(self):
        starts = range(self.rank * self.batch_size, self.num_items, self.num_replicas * self.batch_size)
        for start in starts:
            yield list(range(start, min(start + self.batch_size, self.num_items)))

    def __len__(self) -> int:
        num_batches = -(-self.num_items // self.batch_size)
        return len(range(self.rank, num_batches, self.num_replicas))


def shard_eval_loader(loader: torch.utils.data.DataLoader, num_processes: int,
                      process_index: int) -> torch.utils.data.DataLoader:
    """This process's share of a sequential evaluation loader (same dataset, collate and workers)."""
    batches = ShardedBatches(len(loader.dataset), loader.batch_size or 1, num_processes, process_index)
    return torch.utils.data.DataLoader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn,
                                       num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def _epoch_aware(loader: torch.utils.data.DataLoader) -> list[Any]:
    """The loader's sampler, batch sampler's sampler and dataset that define ``set_epoch`` (each once)."""
    candidates = [loader.sampler, getattr(loader.batch_sampler, "sampler", None), loader.dataset]
    found: dict[int, Any] = {}
    for obj in candidates:
        if obj is not None and callable(getattr(obj, "set_epoch", None)):
            found.setdefault(id(obj), obj)
    return list(found.values())


def _plain(obj: Any) -> Any:
    """A checkpoint-safe form: ``to_dict()`` when defined, OmegaConf containers resolved, else as is."""
    if obj is None:
        return None
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)
