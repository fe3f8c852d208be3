"""Entry point: ``accelerate launch -m stepwise.run stage=pretrain data=synthetic model=tiny [key=value ...]``
(or ``python -m stepwise.run ...`` for one process). Several CPU processes on one machine:
``accelerate launch --config_file launch/accelerate_cpu2.yaml -m stepwise.run ...`` (accelerate's
``--cpu --num_processes 2`` starts a single process unless mpirun is configured).

Composes the config (unknown keys, values of the wrong type or range, and a run directory holding an earlier
run's checkpoints without ``resume=true``/``overwrite=true`` are errors naming the key or directory, before
anything is created), lets rank 0 take ownership of ``runs/<exp>/<stage>/`` (a lock held until the process
ends: a second command on the same directory is refused in one line naming the owner's PID and host, exit
code 2; :mod:`stepwise.utils.run_lock`), create it and save the resolved config while the other ranks wait,
then runs ``stepwise.stages.<stage.name>.run(cfg)``
(:func:`stepwise.stages.run_stage`, the one sequence ``stage=all`` and ``stepwise.study`` use too).

A data or training error the stage raises (a missing file, a bad validation file, an empty training set, a
model setting that cannot be built, a diverged run) is printed as one line, ``stepwise: <stage>: <message>``,
with exit code 1; ``STEPWISE_TRACEBACK=1`` prints the traceback as well (for developers).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import PartialState

from stepwise.config import ConfigError, cli_config
from stepwise.stages import run_stage, stage_module
from stepwise.utils import run_lock


def show_traceback() -> bool:
    """``STEPWISE_TRACEBACK=1`` (or true/yes): entry points print the traceback of a data error too."""
    return os.environ.get("STEPWISE_TRACEBACK", "").strip().lower() in ("1", "true", "yes")


def data_errors() -> tuple[type[BaseException], ...]:
    """The errors an entry point reports in one line: bad inputs or settings the message names (missing or
    invalid files, an empty training set, a model that cannot be built, a diverged run), not bugs."""
    from stepwise.engine import NonFiniteLossError

    return ValueError, OSError, NonFiniteLossError


def main(argv: Sequence[str] | None = None) -> Any:
    """Compose the config from ``argv`` (default ``sys.argv[1:]``) and run its stage
    (:func:`stepwise.stages.run_stage`); returns its result."""
    cfg = cli_config(argv, validate=True)  # bad keys, values or an earlier run's checkpoints: exit 2, no directory
    try:
        stage_module(cfg.stage.name)
    except ConfigError as err:
        print(f"stepwise: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    state = PartialState(cpu=not torch.cuda.is_available())  # as make_accelerator: gloo group on CPUs
    try:
        return run_stage(cfg, state)  # rank 0 owns the run directory from here to the end
    except run_lock.DirectoryBusy as err:  # this directory, or (stage=all) a step's, is another process's
        print(f"stepwise: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except ConfigError as err:  # a setting found wrong once the stage reads it
        if show_traceback():
            raise
        print(f"stepwise: {cfg.stage.name}: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except data_errors() as err:
        if show_traceback():
            raise
        print(f"stepwise: {cfg.stage.name}: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        state.destroy_process_group()
        run_lock.release_all()

if __name__ == "__main__":
    main()
