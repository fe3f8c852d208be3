"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

# The suite compares weights bit for bit between runs in this process, so its thread count must not follow
# the machine's load while it runs (stepwise/utils/cpu_threads.py; tests of the governor reset it). It is
# chosen once, from the load at the start: a suite started beside a training run takes the free cores instead
# of spinning against it. Processes the tests start keep the default (their own governor).
if "STEPWISE_CPU_THREADS" not in os.environ:
    import torch

    from stepwise.utils import cpu_threads

    cpu_threads.keep(cpu_threads.threads_now(torch.get_num_threads()))


def _make_untrained_checkpoint(root: Path) -> tuple[Path, object]:
    """The tiny model (random weights) on the synthetic ``tiny`` preset generated under ``root/data``, saved
    as the final checkpoint of ``root/runs/t/pretrain``; returns (checkpoint path, config)."""
    import torch
    from omegaconf import OmegaConf

    from stepwise.checkpoint import head_state, save_checkpoint
    from stepwise.config import load_config
    from stepwise.data.categories import CategoryMap
    from stepwise.data.synthetic import generate
    from stepwise.models import build_detector
    from stepwise.utils.io import read_json

    generate(root / "data", "tiny", 0, workers=1, verbose=False)
    cfg = load_config(["model=tiny", "data.preset=tiny", f"data.root={root / 'data'}",
                       f"output_root={root / 'runs'}", "exp=t", "model.num_queries=10"])
    categories = CategoryMap.from_annotations(read_json(cfg.data.train_ann))
    torch.manual_seed(0)
    model = build_detector(cfg.model, cfg.head, categories).model
    path = save_checkpoint({"model": model.state_dict(), "head_state": head_state(model),
                            "categories": categories.to_dict(), "config": OmegaConf.to_container(cfg, resolve=True),
                            "global_step": 0}, root / "runs" / "t" / "pretrain" / "checkpoint_final.pt")
    return path, cfg


@pytest.fixture(scope="session")
def make_untrained_checkpoint() -> Callable[[Path], tuple[Path, object]]:
    """``make_untrained_checkpoint(root) -> (checkpoint path, config)``; see ``_make_untrained_checkpoint``."""
    return _make_untrained_checkpoint
