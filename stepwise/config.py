"""Configuration: Hydra's compose API over ``configs/``, validation and run directories.

``load_config(["stage=pretrain", "model=tiny", "stage.epochs=3"])`` returns the composed, struct-mode
``DictConfig``. An override naming a key that no config defines raises :class:`ConfigError` naming that
key (Hydra's ``+key=value`` form, which would add keys silently, is refused for the same reason).

:func:`validate_config` checks the type and range of the values a training stage reads (``stage.epochs``
an integer >= 1, ``stage.lr`` a number > 0, ``data.batch_size`` >= 1, ...) and :func:`check_run_dir`
refuses to start a stage over an earlier run's checkpoints unless ``resume=true`` or ``overwrite=true``;
the entry point runs both before it creates any directory.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stepwise.utils import run_lock
from stepwise.utils.io import atomic_write_text

CONFIG_DIR = Path(os.environ.get("STEPWISE_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))


def _synthetic_val_ann(root: str, negatives: Any) -> str:
    """``${synthetic_val_ann:root,negatives}`` (configs/data/synthetic.yaml): the built-in data's val file
    with that density of verified-absent classes (``<root>/annotations/val.json`` for ``preset``)."""
    from stepwise.data.synthetic import val_file_name

    return f"{root}/annotations/{val_file_name(negatives)}"


OmegaConf.register_new_resolver("synthetic_val_ann", _synthetic_val_ann, replace=True)


class ConfigError(ValueError):
    """A configuration problem the user must fix (unknown key, bad value, missing file)."""


def load_config(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with command-line style ``key=value`` overrides.

    Raises:
        ConfigError: an override names an unknown key or group option, or uses ``+``/``++``.
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
    """Compose the config from ``sys.argv``-style arguments (and with ``validate``, :func:`validate_config`
    and :func:`check_run_dir`); print the error and exit with code 2 on a bad key or value."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = load_config(argv, config_name=config_name)
        if validate:
            validate_config(cfg)
            check_run_dir(cfg)
        return cfg
    except ConfigError as err:
        print(f"stepwise: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except run_lock.DirectoryBusy as err:
        print(f"stepwise: {err}", file=sys.stderr)
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------------------- value checks
def _integer(minimum: int | None = None, optional: bool = False) -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        if v is None:
            return optional
        return isinstance(v, int) and not isinstance(v, bool) and (minimum is None or v >= minimum)
    text = "an integer" + (f" >= {minimum}" if minimum is not None else "")
    return ok, text + (" or null" if optional else "")


def _number(minimum: float = 0.0, strict: bool = True, optional: bool = False) -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        if v is None:
            return optional
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (v > minimum if strict else v >= minimum))
    text = f"a number {'>' if strict else '>='} {minimum:g}"
    return ok, text + (" or null" if optional else "")


def _boolean() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, bool)), "true or false"


def _int_list() -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        return v is None or (isinstance(v, (list, tuple)) and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v))
    return ok, "a list of integers >= 0"


def _negatives() -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        if v in ("preset", "lvis"):
            return True
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
    return ok, "preset, lvis or a share in [0, 1]"


def _choice(*options: str | None) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), "one of " + ", ".join("null" if o is None else o for o in options)


TRAINING_STAGE_CHECKS = {
    "epochs": _integer(1), "lr": _number(0), "lr_backbone": _number(0, strict=False),
    "lr_linear_proj_mult": _number(0, strict=False), "weight_decay": _number(0, strict=False),
    "lr_drop": _int_list(), "lr_gamma": _number(0), "clip_max_norm": _number(0, strict=False),
    "grad_accum": _integer(1), "mixed_precision": _choice("no", "bf16", "fp16"),
    "eval_every_epochs": _integer(0), "checkpoint_every_steps": _integer(0), "keep_last": _integer(0),
    "log_every": _integer(0), "max_steps": _integer(1, optional=True),
    "eval_batch_size": _integer(1, optional=True), "max_eval_images": _integer(1, optional=True),
}
DATA_CHECKS = {
    "batch_size": _integer(1), "num_workers": _integer(0), "rfs_threshold": _number(0, optional=True),
    "rfs_epoch": _choice("dataset", "repeated"),
    "preflight": _boolean(), "preflight_decode_max": _integer(0), "allow_outside_root": _boolean(),
    "negatives": _negatives(),
}
ROOT_CHECKS = {"seed": _integer(0), "resume": _boolean(), "overwrite": _boolean()}
STEPWISE_CHECKS = {"min_images": _integer(1), "score_threshold": _number(0, strict=False),
                   "score": _choice("class", "max")}
RFS_CHECKS = {"mode": _choice("stepwise", "generic", None), "rounding": _choice("ceil", "stochastic"),
              "threshold": _number(0), "epoch": _choice("replay_set", "repeated")}
DISTILL_CHECKS = {"cls_layers": _choice("all", "last"), "fm_normalize": _choice("level_image", "pooled"),
                  "lambda_fm": _number(0, strict=False), "lambda_cls": _number(0, strict=False),
                  "temperature": _number(0)}


def validate_config(cfg: DictConfig) -> None:
    """Check the type and range of every value a stage reads; ConfigError naming the first bad key.

    Training stages' nodes are ``stage`` (or ``stage.<step>`` for each training step of ``stage=all``).
    Values that are still missing (``???``) are left to the code that needs them.
    """
    nodes: list[tuple[str, Any, dict]] = [("", cfg, ROOT_CHECKS), ("data.", cfg.data, DATA_CHECKS),
                                          ("stepwise.", cfg.stepwise, STEPWISE_CHECKS),
                                          ("stepwise.rfs.", cfg.stepwise.rfs, RFS_CHECKS),
                                          ("distill.", cfg.distill, DISTILL_CHECKS)]
    if cfg.stage.get("name") == "all":
        nodes += [(f"stage.{step}.", cfg.stage[step], TRAINING_STAGE_CHECKS) for step in cfg.stage.get("steps", [])
                  if step in cfg.stage and "epochs" in cfg.stage[step]]
    elif "epochs" in cfg.stage:
        nodes.append(("stage.", cfg.stage, TRAINING_STAGE_CHECKS))
    for prefix, node, checks in nodes:
        for key, (ok, expected) in checks.items():
            if key not in node or OmegaConf.is_missing(node, key):
                continue
            try:
                value = node[key]
                if isinstance(value, (DictConfig, ListConfig)):
                    value = OmegaConf.to_container(value, resolve=True)
            except OmegaConfBaseException as err:
                raise ConfigError(f"config key {prefix}{key}: {str(err).splitlines()[0]}") from err
            if not ok(value):
                raise ConfigError(f"config key {prefix}{key} must be {expected}, got {value!r}")


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
    if cfg.stage.get("name") == "all" or cfg.get("resume") or cfg.get("overwrite"):
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
        if cfg.get("overwrite") and not cfg.get("resume") and cfg.stage.get("name") != "all":
            for path in clear_run_dir(run_dir, _declared_clears(cfg.stage.get("name"))):
                print(f"stepwise: overwrite=true: deleted {path}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    return run_dir
