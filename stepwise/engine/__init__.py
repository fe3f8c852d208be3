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

The parts: :mod:`.settings` (the options, the accelerator, the loss total, errors), :mod:`.trainer` (the loop),
:mod:`.checkpointing` (save, final, resume), :mod:`.finite_guard` (the finite-state checks), :mod:`.evaluation`
(the free :func:`evaluate` and sharded prediction), :mod:`.metrics_log` (``metrics.jsonl``); every name is
importable from ``stepwise.engine``.
"""

from stepwise.engine.evaluation import (
    Evaluation,
    ShardedBatches,
    evaluate,
    gather_predictions,
    shard_eval_loader,
    shard_predictions,
)
from stepwise.engine.metrics_log import append_jsonl, truncate_metrics
from stepwise.engine.settings import (
    EvaluateFn,
    ForwardFn,
    NonFiniteLossError,
    NonFiniteStateError,
    PredictFn,
    Progress,
    TrainSettings,
    detection_forward,
    make_accelerator,
    weighted_total,
)
from stepwise.engine.trainer import Trainer

__all__ = [
    "EvaluateFn", "Evaluation", "ForwardFn", "NonFiniteLossError", "NonFiniteStateError", "PredictFn", "Progress",
    "ShardedBatches", "TrainSettings", "Trainer", "append_jsonl", "detection_forward", "evaluate",
    "gather_predictions", "make_accelerator", "shard_eval_loader", "shard_predictions", "truncate_metrics",
    "weighted_total",
]
