"""Moved (issue 29): what every training stage builds now lives in :mod:`stepwise.stages.parts`, one module
per job (data, preflight, model, trainer, replay), and the prediction formatting and LVIS evaluator in
:mod:`stepwise.predictor`. This module only re-exports the data bootstrap for callers not yet moved
(the study runner); import from :mod:`stepwise.stages.parts` instead. Not a stage."""

from stepwise.stages.parts.data import ensure_builtin_data, ensure_data

__all__ = ["ensure_builtin_data", "ensure_data"]
