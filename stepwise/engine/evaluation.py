"""Evaluation without a Trainer: fixed batches dealt out to the processes, predictions gathered (each image
once), scored on rank 0 (:func:`evaluate`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, send_to_device
from torch import nn
from tqdm.auto import tqdm

from stepwise.checkpoint import preserved_rng
from stepwise.engine.settings import EvaluateFn, PredictFn
from stepwise.utils import cpu_threads


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
