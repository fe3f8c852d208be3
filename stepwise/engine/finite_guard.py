"""The Trainer's finite-state guard: a NaN/inf loss (before the backward pass), gradient norm (before the
optimizer step), prediction (found by the matcher) or parameter / buffer / optimizer state (at checkpoint
time) stops every process together, naming where; such a state is never written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from stepwise.checkpoint import find_latest, head_state, optimizer_state_names
from stepwise.engine.settings import NonFiniteLossError, NonFiniteStateError
from stepwise.utils.finite import first_non_finite, named_tensors, norm_overflow


class FiniteGuardMixin:
    """:class:`~stepwise.engine.trainer.Trainer`'s finite-state checks (they use its accelerator, model,
    optimizer, weight_dict, settings, run_dir and progress)."""

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
