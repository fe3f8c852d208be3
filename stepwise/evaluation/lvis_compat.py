"""The one place that imports PyPI's ``lvis`` (0.5.3) and makes it run on current numpy and Python.

Why: ``lvis.eval.LVISEval.accumulate`` calls ``np.float``, an alias numpy 1.24 removed, and
``lvis.results.LVISResults`` calls ``Logger.warn``, which Python 3.13 removed. lvis 0.5.3 is the last
release, so instead of forking it we hand lvis's own modules a numpy namespace that still has the old
aliases (the global ``numpy`` module is left untouched) and a logger that still has ``warn``.
Everything in stepwise imports ``LVIS``, ``LVISResults`` and ``LVISEval`` from here, never from ``lvis``.
"""

from __future__ import annotations

import logging
import types

import numpy as np

import lvis.eval as _lvis_eval
import lvis.results as _lvis_results
from lvis.eval import LVISEval, Params
from lvis.lvis import LVIS
from lvis.results import LVISResults

# The aliases numpy 1.20 deprecated and 1.24 removed; each meant the Python builtin.
_REMOVED_NUMPY_ALIASES = {"float": float, "int": int, "bool": bool, "object": object, "str": str, "complex": complex}


class _NumpyWithAliases(types.ModuleType):
    """numpy's namespace plus the removed aliases; lazily resolved numpy attributes fall through."""

    def __getattr__(self, name: str):
        return getattr(np, name)


def _numpy_for_lvis() -> types.ModuleType:
    shim = _NumpyWithAliases("numpy")
    shim.__dict__.update(np.__dict__)
    for name, value in _REMOVED_NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(shim, name, value)
    return shim


class _LoggerWithWarn(logging.LoggerAdapter):
    """A logger that still answers ``warn`` (removed from ``logging.Logger`` in Python 3.13)."""

    def warn(self, msg, *args, **kwargs):
        self.warning(msg, *args, **kwargs)


class _LoggingForLvis(types.ModuleType):
    def __getattr__(self, name: str):
        return getattr(logging, name)

    @staticmethod
    def getLogger(name: str | None = None) -> _LoggerWithWarn:
        return _LoggerWithWarn(logging.getLogger(name), {})


_lvis_eval.np = _numpy_for_lvis()
_lvis_results.logging = _LoggingForLvis("logging")
_lvis_eval.logging = _lvis_results.logging
# LVISResults warns "Assuming user provided the results in correct format" on every list it gets;
# stepwise checks the results itself (stepwise.evaluation.inputs), so only errors from it are shown.
logging.getLogger("lvis.results").setLevel(logging.ERROR)

__all__ = ["LVIS", "LVISEval", "LVISResults", "Params", "lvis_from_dict"]


def lvis_from_dict(dataset: dict) -> LVIS:
    """An ``LVIS`` object over an already loaded annotation dict (lvis 0.5.3 only accepts a path)."""
    api = LVIS.__new__(LVIS)
    api.logger = logging.getLogger("lvis.lvis")
    api.dataset = dataset
    api._create_index()
    return api
