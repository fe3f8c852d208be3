"""``metrics.jsonl``: one JSON line per log step and per evaluation, cut back on resume; and the
checkpoint-safe form of the categories and config."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from stepwise.utils.io import atomic_write_text, write_error


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (tensors as numbers/lists, NaN/inf as strings)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record, default=json_default) + "\n")
    except OSError as err:
        raise write_error(path, err, "metrics file") from err



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



def plain(obj: Any) -> Any:
    """A checkpoint-safe form: ``to_dict()`` when defined, OmegaConf containers resolved, else as is."""
    if obj is None:
        return None
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)
