"""Configuration: Hydra's compose API over ``configs/``, validation and run directories.

``load_config(["stage=pretrain", "model=tiny", "stage.epochs=3"])`` returns the composed, struct-mode
``DictConfig``. An override naming a key that no config defines raises :class:`ConfigError` naming that
key (Hydra's ``+key=value`` form, which would add keys silently, is refused for the same reason).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stepwise.utils.io import atomic_write_text

CONFIG_DIR = Path(os.environ.get("STEPWISE_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))


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


def cli_config(argv: Sequence[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose the config from ``sys.argv``-style arguments; print the error and exit on a bad key."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return load_config(argv, config_name=config_name)
    except ConfigError as err:
        print(f"stepwise: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def to_yaml(cfg: DictConfig) -> str:
    """The fully resolved config as YAML (interpolations expanded)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def prepare_run_dir(cfg: DictConfig, is_main_process: bool = True) -> Path:
    """Create ``cfg.run_dir`` (rank 0 only) and save the resolved config there as ``config.yaml``.

    Other ranks only compute the path; callers synchronise (``accelerator.wait_for_everyone()``) before
    reading from it.
    """
    run_dir = Path(cfg.run_dir)
    if is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    return run_dir
