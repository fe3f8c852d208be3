"""Entry point: ``accelerate launch -m stepwise.run stage=pretrain data=synthetic model=tiny [key=value ...]``
(or ``python -m stepwise.run ...`` for one process). Several CPU processes on one machine:
``accelerate launch --config_file launch/accelerate_cpu2.yaml -m stepwise.run ...`` (accelerate's
``--cpu --num_processes 2`` starts a single process unless mpirun is configured).

Composes the config (unknown keys, values of the wrong type or range, and a run directory holding an earlier
run's checkpoints without ``resume=true``/``overwrite=true`` are errors naming the key or directory, before
anything is created), lets rank 0 create ``runs/<exp>/<stage>/`` and save the resolved config while the other
ranks wait, then runs ``stepwise.stages.<stage.name>.run(cfg)``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import PartialState

from stepwise.config import ConfigError, cli_config, prepare_run_dir
from stepwise.stages import stage_module


def main(argv: Sequence[str] | None = None) -> Any:
    """Compose the config from ``argv`` (default ``sys.argv[1:]``) and run its stage; returns its result."""
    cfg = cli_config(argv, validate=True)  # bad keys, values or an earlier run's checkpoints: exit 2, no directory
    try:
        module = stage_module(cfg.stage.name)
    except ConfigError as err:
        print(f"stepwise: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    state = PartialState(cpu=not torch.cuda.is_available())  # as make_accelerator: gloo group on CPUs
    prepare_run_dir(cfg, state.is_main_process)
    state.wait_for_everyone()
    try:
        result = module.run(cfg)
        state.wait_for_everyone()  # no process tears the group down while another is still in a collective
        return result
    finally:
        state.destroy_process_group()


if __name__ == "__main__":
    main()
