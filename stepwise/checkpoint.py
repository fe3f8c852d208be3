"""Checkpoint files: atomic save, validated load, latest/prune, weights-only init and RNG states.

A training checkpoint is one ``torch.save`` file, ``<run_dir>/checkpoints/step_<global_step>.pt``, written
to a temporary name and renamed (a killed run never leaves a broken file). Its dict holds:

    model, optimizer, scheduler, scaler (or None), rng (one entry per process), epoch, step_in_epoch,
    global_step, num_processes, categories, head_state, config, format, version

``epoch``/``step_in_epoch`` are the position to continue from: resume starts epoch ``epoch`` and skips its
first ``step_in_epoch`` batches (per process). The end of a stage also writes ``checkpoint_final.pt`` in
the run directory, which the next stage reads. Files hold only tensors and plain Python containers, so they
load with ``torch.load(weights_only=True)``.

A checkpoint is written only when the file system has room for it (free space checked against the size
of its tensors first); a failed write raises :class:`~stepwise.utils.io.WriteError` naming the path and
the reason ("no space left on device") and leaves the previous file as it was. :func:`first_non_finite`
finds a NaN/inf tensor in a state (the engine never writes such a state), and weights holding one are
refused when loaded for ``init_from``.
"""

from __future__ import annotations

import collections
import errno
import os
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from stepwise.heads.base import ClassifierHead
from stepwise.utils.finite import first_non_finite, named_tensors
from stepwise.utils.io import atomic_path, check_free_space, free_bytes

FORMAT = "stepwise-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
FINAL_NAME = "checkpoint_final.pt"
TRAINING_KEYS = ("model", "optimizer", "scheduler", "rng", "epoch", "step_in_epoch", "global_step")
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or lacks keys; the message names the file."""


def checkpoint_path(run_dir: str | Path, global_step: int) -> Path:
    """``<run_dir>/checkpoints/step_<global_step, 8 digits>.pt``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{global_step:08d}.pt"


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint's weights hold NaN or inf values; the message names the file and the first tensor."""


_SPACE_MARGIN = 1 << 20  # bytes beyond the tensors' own: pickled containers, zip records


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` (plus format/version tags) to ``path`` atomically; returns ``path``.

    Raises:
        WriteError: (an ``OSError``) the file system lacks the room (checked before writing) or the write
            failed; the message names ``path`` and says "no space left on device" when that is the cause.
    """
    path = Path(path)
    state = {"format": FORMAT, "version": VERSION, **state}
    needed = sum(t.numel() * t.element_size() for _, t in named_tensors(state)) + _SPACE_MARGIN
    check_free_space(path, needed, "checkpoint")
    with atomic_path(path, "checkpoint") as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as err:  # torch's C++ writer reports a failed write as "unexpected pos ..."
            free = free_bytes(path.parent)
            if free is not None and free < needed:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from err
            raise OSError(errno.EIO, f"torch.save failed: {err}") from err
    return path


def optimizer_state_names(state: dict[str, Any], param_names: Sequence[str] | None) -> dict[str, Any]:
    """``optimizer.state_dict()`` with its integer parameter indices replaced by parameter names (for messages)."""
    if not param_names:
        return state
    named = {}
    for index, value in state.get("state", {}).items():
        name = param_names[index] if isinstance(index, int) and 0 <= index < len(param_names) else index
        named[str(name)] = value
    return {"state": named}


def check_finite_weights(state: dict[str, Any], source: str | Path) -> None:
    """Raise :class:`NonFiniteCheckpointError` when ``state["model"]`` (or a bare state dict) holds NaN/inf."""
    weights = state.get("model", state) if isinstance(state, dict) else state
    bad = first_non_finite(named_tensors(weights))
    if bad is not None:
        raise NonFiniteCheckpointError(
            f"checkpoint {source}: tensor {bad!r} holds NaN or inf values (the run that wrote it diverged); "
            f"refusing to start from it")


def load_checkpoint(path: str | Path, required: Iterable[str] = ("model",),
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, or the final/latest checkpoint of a run directory.

    Raises:
        CheckpointError: the file does not exist, cannot be read, or lacks any of ``required`` (all the
            missing keys are named).
    """
    path = resolve_checkpoint(path)
    try:
        with torch.serialization.safe_globals([collections.Counter]):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the keys {missing} (it has {sorted(state)})")
    return state


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or for a run directory its ``checkpoint_final.pt`` else its latest one."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / FINAL_NAME).is_file():
            return path / FINAL_NAME
        latest = find_latest(path)
        if latest is not None:
            return latest
        raise CheckpointError(f"run directory {path} holds no {FINAL_NAME} and no {CHECKPOINT_DIR}/step_*.pt")
    raise CheckpointError(f"checkpoint not found: {path}")


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(global_step, path)`` of every training checkpoint of a run directory, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_RE.match(p.name))]
    return sorted(found)


def find_latest(run_dir: str | Path) -> Path | None:
    """The training checkpoint with the highest global step in ``run_dir``, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` training checkpoints (0 or less keeps all); returns the deleted."""
    if keep_last <= 0:
        return []
    old = [p for _, p in list_checkpoints(run_dir)[:-keep_last]]
    for p in old:
        p.unlink(missing_ok=True)
    return old


@dataclass
class WeightsReport:
    """What ``load_model_weights`` did: keys the model expected but the file lacked, and the reverse."""

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        lines = [f"loaded {self.loaded} tensors from {self.source}"]
        for label, keys in (("missing (kept at init)", self.missing), ("unexpected (ignored)", self.unexpected),
                            ("shape mismatch (kept at init)", self.mismatched)):
            if keys:
                lines.append(f"  {label}: {names(keys)}")
        return "\n".join(lines)


def load_model_weights(model: nn.Module, source: str | Path | dict[str, Any]) -> WeightsReport:
    """Load model weights only (``init_from``): from a checkpoint file/run dir or a state dict.

    Tensors whose shape differs from the model's are skipped and reported, like missing/unexpected keys.
    Head statistics (``head_state``) in the checkpoint are restored too. Optimizer, scheduler and progress
    are ignored. Weights holding NaN/inf raise :class:`NonFiniteCheckpointError`.
    """
    if isinstance(source, dict):
        state, name = source, str(source.get("__source__", "<state dict>"))
    else:
        name = str(resolve_checkpoint(source))
        state = load_checkpoint(name)
    check_finite_weights(state, name)
    weights = state.get("model", state)
    own = model.state_dict()
    usable, mismatched = {}, {}
    for key, value in weights.items():
        if key in own and isinstance(value, torch.Tensor) and value.shape != own[key].shape:
            mismatched[key] = f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}"
        else:
            usable[key] = value
    result = model.load_state_dict(usable, strict=False)
    if state.get("head_state"):
        restore_head_state(model, state["head_state"])
    missing = [k for k in result.missing_keys if k not in mismatched]
    return WeightsReport(name, len(usable) - len(result.unexpected_keys), missing,
                         list(result.unexpected_keys), list(mismatched.values()))


def head_state(model: nn.Module) -> dict[str, Any]:
    """``{module name: head.state}`` for every classifier head in ``model`` (statistics outside parameters)."""
    return {name: module.state for name, module in model.named_modules() if isinstance(module, ClassifierHead)}


def restore_head_state(model: nn.Module, states: dict[str, Any]) -> None:
    """Inverse of :func:`head_state`; a stored name the model lacks raises KeyError naming it."""
    modules = dict(model.named_modules())
    for name, state in states.items():
        if name not in modules:
            raise KeyError(f"checkpoint has head state for {name!r}, which this model does not have")
        modules[name].load_state(state)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, CUDA) as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """Nested lists back to tuples (``random.setstate`` needs tuples)."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (e.g. evaluation) without changing any RNG stream the training loop sees afterwards."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
