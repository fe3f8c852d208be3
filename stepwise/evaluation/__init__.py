"""LVIS evaluation on prediction files: official metrics, AP by training-instance bin, per-class AP.

``lvis`` is always imported through ``stepwise.evaluation.lvis_compat`` (numpy >= 1.24 fix), and only when the
reference evaluator runs (its import takes seconds: matplotlib, pycocotools).
"""

from stepwise.evaluation.lvis_eval import choose_evaluator, evaluate_lvis
from stepwise.evaluation.metrics import INSTANCE_BIN_EDGES, LVIS_METRICS, instance_bin
from stepwise.evaluation.report import ClassRow, EvalReport

__all__ = ["evaluate_lvis", "choose_evaluator", "EvalReport", "ClassRow", "INSTANCE_BIN_EDGES", "LVIS_METRICS", "instance_bin"]
