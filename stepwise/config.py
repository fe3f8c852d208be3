"""Configuration: Hydra's compose API over ``configs/``, validation and run directories.

``load_config(["stage=pretrain", "model=tiny", "stage.epochs=3"])`` returns the composed, struct-mode
``DictConfig``. An override naming a key that no config defines raises :class:`ConfigError` naming that
key (Hydra's ``+key=value`` form, which would add keys silently, is refused for the same reason).

The composed config is checked once, there, against the schema (:mod:`stepwise.config_schema`: the type
and range of every value a stage reads, ``stage.epochs`` an integer >= 1, ``stage.lr`` a number > 0,
``data.batch_size`` >= 1, ...; :func:`validate_config`). :func:`check_run_dir` refuses to start a stage over
an earlier run's checkpoints unless ``resume=true`` or ``overwrite=true``; the entry point runs it before
it creates any directory.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stepwise import config_schema
from stepwise.config_schema import ConfigError
from stepwise.utils import run_lock
from stepwise.utils.io import atomic_write_text

CONFIG_DIR = Path(os.environ.get("STEPWISE_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))


def _synthetic_val_ann(root: str, negatives: Any) -> str:
    """``${synthetic_val_ann:root,negatives}`` (configs/data/synthetic.yaml): the built-in data's val file
    with that density of verified-absent classes (``<root>/annotations/val.json`` for ``preset``)."""
    from stepwise.data.synthetic import val_file_name

    return f"{root}/annotations/{val_file_name(negatives)}"


OmegaConf.register_new_resolver("synthetic_val_ann", _synthetic_val_ann, replace=True)


def load_config(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with command-line style ``key=value`` overrides and check it
    against the schema once (:func:`validate_config`).

    Raises:
        ConfigError: an override names an unknown key or group option, or uses ``+``/``++``; a value breaks
            its key's rule (type, range, choices; named in the message).
    """
    overrides = list(overrides)
    for item in overrides:
        if item.startswith("+"):
            raise ConfigError(
                f"override {item!r}: adding new keys is not allowed; every key must exist in configs/ "
                f"(check the spelling of {item.lstrip('+').split('=')[0]!r})")
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    if not CONFIG_DIR.is_dir():
        raise ConfigError(f"config directory {CONFIG_DIR} does not exist (set STEPWISE_CONFIG_DIR)")
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err, overrides)) from err
    OmegaConf.set_struct(cfg, True)
    if "stage" in cfg:
        validate_config(cfg)
    return cfg


def _explain(err: Exception, overrides: Sequence[str]) -> str:
    """Turn Hydra's message into one that names the offending key first."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    cause = err.__cause__
    key = getattr(cause, "full_key", None) or getattr(err, "full_key", None)
    if key:
        return f"unknown or invalid config key {key!r}: {text}"
    for item in overrides:
        name = item.split("=", 1)[0]
        if f"'{name}'" in str(err) or f"{name}" in text:
            return f"config override {item!r} was rejected: {text}"
    return text


def cli_config(argv: Sequence[str] | None = None, config_name: str = "config",
               validate: bool = False) -> DictConfig:
    """Compose the config from ``sys.argv``-style arguments (checked by :func:`load_config`; with
    ``validate`` also :func:`check_run_dir`); print the error and exit with code 2 on a bad key or value."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = load_config(argv, config_name=config_name)
        if validate:
            check_run_dir(cfg)
        return cfg
    except ConfigError as err:
        print(f"stepwise: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except run_lock.DirectoryBusy as err:
        print(f"stepwise: {err}", file=sys.stderr)
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------------------- value checks
def validate_config(cfg: DictConfig) -> None:
    """Check the type and range of every value a stage reads against the schema
    (:func:`stepwise.config_schema.validate`); ConfigError naming the first bad key. :func:`load_config` runs
    it on every composed config; training stages' nodes are ``stage`` (or ``stage.<step>`` for each training
    step of ``stage=all``). Values that are still missing (``???``) are left to the code that needs them.
    """
    config_schema.validate(cfg)


# ------------------------------------------------------------------------------ where a stage starts from
ROOT_SOURCES = ("init_from", "checkpoint")  # root keys that win over the stage node's key of the same name


def starting_point(cfg: DictConfig, key: str) -> str | None:
    """Where a stage starts, the one rule (select's ``checkpoint`` to score with, the training stages'
    ``init_from`` weights): the root ``key`` when set (``init_from=`` / ``checkpoint=`` on the command line
    win), else the stage node's ``stage.<key>`` (finetune/distill/select default to the earlier step's run
    directory), else None. In ``stage=all`` the root keys belong to the first step only
    (:func:`step_sources`)."""
    return getattr(cfg, key, None) or getattr(cfg.stage, key, None) or None  # any object with attributes


def step_sources(cfg: DictConfig, step: str) -> None:
    """``stage=all``'s step ``step``: a step that reads earlier steps' run directories (its registry ``inputs``:
    select, finetune, distill) starts from them, so the root :data:`ROOT_SOURCES` are cleared for it; a step
    without inputs (pretrain) keeps them. ``cfg`` is the step's config (struct mode off)."""
    from stepwise.stages.registry import STAGES

    if step in STAGES and STAGES[step].inputs:
        for key in ROOT_SOURCES:
            cfg[key] = None


def run_dir_artifacts(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints an earlier run left in ``run_dir`` (``checkpoints/step_*.pt``, ``checkpoint_final.pt``)."""
    run_dir = Path(run_dir)
    found = sorted((run_dir / "checkpoints").glob("step_*.pt")) if (run_dir / "checkpoints").is_dir() else []
    if (run_dir / "checkpoint_final.pt").is_file():
        found.append(run_dir / "checkpoint_final.pt")
    return found


def check_run_dir(cfg: DictConfig) -> None:
    """ConfigError when ``cfg.run_dir`` holds an earlier run's checkpoints and neither ``resume`` nor
    ``overwrite`` is set (``stage=all`` decides per step, see :mod:`stepwise.stages.all`);
    :class:`~stepwise.utils.run_lock.DirectoryBusy` first when another process owns the directory."""
    run_lock.check_free(cfg.run_dir)
    if cfg.stage.name == "all" or cfg.resume or cfg.overwrite:
        return
    found = run_dir_artifacts(cfg.run_dir)
    if found:
        names = ", ".join(str(p.relative_to(cfg.run_dir)) for p in found[-3:])
        raise ConfigError(
            f"{cfg.run_dir} already holds checkpoints of an earlier run ({names}); pass resume=true to continue "
            f"it, overwrite=true to start it again (its checkpoints, metrics.jsonl and eval/ are deleted), or "
            f"another exp=")


def clear_run_dir(run_dir: str | os.PathLike, names: Sequence[str] | None = None) -> list[Path]:
    """Delete what a run wrote into ``run_dir`` (``overwrite=true``): ``names``, default the files a training
    stage writes (:data:`stepwise.stages.registry.RUN_FILES`; each stage declares its own ``clears``);
    returns what was deleted."""
    from stepwise.stages.registry import RUN_FILES  # import-light: the declarations only

    run_dir = Path(run_dir)
    removed = []
    for name in RUN_FILES if names is None else names:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


def _declared_clears(stage: str | None) -> Sequence[str] | None:
    """What ``overwrite=true`` deletes for ``stage`` (its registry declaration; None: the default)."""
    from stepwise.stages.registry import STAGES

    return STAGES[stage].clears if stage in STAGES else None


def to_yaml(cfg: DictConfig) -> str:
    """The fully resolved config as YAML (interpolations expanded)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def prepare_run_dir(cfg: DictConfig, is_main_process: bool = True) -> Path:
    """Take ownership of ``cfg.run_dir`` and create it (rank 0 only), then save the resolved config there as
    ``config.yaml``.

    Rank 0 holds the directory's lock (:mod:`stepwise.utils.run_lock`) from here until the process ends (or
    the caller releases it): a second process gets
    :class:`~stepwise.utils.run_lock.DirectoryBusy` naming the owner, on every rank, before anything in the
    directory is touched. Raises ConfigError (see :func:`check_run_dir`) when it holds an earlier run's
    checkpoints without ``resume``/``overwrite``; with ``overwrite=true`` (and no ``resume``) rank 0 first
    deletes them.

    Other ranks only compute the path; callers synchronise (``accelerator.wait_for_everyone()``) before
    reading from it.
    """
    run_dir = Path(cfg.run_dir)
    run_lock.hold_on_rank0(run_dir, is_main_process)
    check_run_dir(cfg)
    if is_main_process:
        if cfg.overwrite and not cfg.resume and cfg.stage.name != "all":
            for path in clear_run_dir(run_dir, _declared_clears(cfg.stage.name)):
                print(f"stepwise: overwrite=true: deleted {path}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    return run_dir
