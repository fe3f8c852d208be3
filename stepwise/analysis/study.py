"""Moved: the study report's tables and plots are :mod:`stepwise.study.tables` (this name stays importable)."""

from stepwise.study.tables import (average_per_class, curve_table, mean_std, paired_differences,  # noqa: F401
                                   paired_table, per_seed_differences, plot_curves, plot_study,
                                   steps_after_pretrain, study_markdown, summarize)
