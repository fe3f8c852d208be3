"""The Trainer's checkpoints: a training checkpoint (every N steps and each epoch end, last K kept), the final
weights file later stages read, and resume from the latest checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate.utils import gather_object, set_seed

from stepwise.checkpoint import (FINAL_NAME, TRAINING_KEYS, check_finite_weights, checkpoint_path, find_latest,
                                 head_state, load_checkpoint, prune_checkpoints, restore_head_state, rng_state,
                                 save_checkpoint, set_rng_state)
from stepwise.engine.metrics_log import plain, truncate_metrics
from stepwise.engine.settings import Progress


class CheckpointMixin:
    """:class:`~stepwise.engine.trainer.Trainer`'s checkpoint methods (they use its accelerator, model,
    optimizer, scheduler, settings, run_dir, progress and the finite guard's ``_refuse_non_finite``)."""

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
            "categories": plain(self.categories),
            "config": plain(self.config),
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
