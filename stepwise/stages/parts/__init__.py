"""What the training stages build, one module per job (a package, not a stage: ``stage=`` names the
modules of :mod:`stepwise.stages`):

- :mod:`.data`: ``ensure_data`` / ``ensure_builtin_data`` (built-in data generated on first use),
  ``build_datasets``, ``build_loaders`` (``check_not_empty``, then :mod:`.preflight`);
- :mod:`.preflight`: ``preflight``, ``preflight_report``, ``PreflightError``;
- :mod:`.model`: ``build_model`` -> ``stepwise.models.Detector`` (network, criterion, post-processing) with
  the stage's starting weights and trainable prefixes;
- :mod:`.trainer`: ``StageParts``, ``make_trainer(parts, criterion=None, forward_fn=...)``;
- :mod:`.replay`: ``build_replay_stage`` (the body of ``stage=finetune`` and ``stage=distill``),
  ``replay_repeat_factors``, ``full_categories``.

A training stage: ``parts = StageParts(cfg, settings, accelerator, categories, build_model(...), *loaders)``,
then ``make_trainer(parts).fit()``.
"""

from stepwise.stages.parts.data import build_datasets, build_loaders, check_not_empty, ensure_builtin_data, ensure_data
from stepwise.stages.parts.model import build_model
from stepwise.stages.parts.preflight import PreflightError, preflight, preflight_report
from stepwise.stages.parts.replay import build_replay_stage, full_categories, replay_repeat_factors
from stepwise.stages.parts.trainer import StageParts, make_trainer

__all__ = ["PreflightError", "StageParts", "build_datasets", "build_loaders", "build_model", "build_replay_stage",
           "check_not_empty", "ensure_builtin_data", "ensure_data", "full_categories", "make_trainer", "preflight",
           "preflight_report", "replay_repeat_factors"]
