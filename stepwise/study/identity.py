"""A study run's identity: ``<step>-<sha256[:10]>`` of what the step reads.

:func:`identity_tree` takes the step's resolved config (paths to earlier steps already replaced by their
identities), keeps the root blocks its registry declaration ``reads`` (opt-in: a block or key elsewhere never
changes the run), and drops

* ``BOOKKEEPING``: keys that never change what a step computes (logging, checkpoint cadence, loader workers:
  samples are seeded per item, evaluations and checkpoints leave the RNG streams alone) and the stage's
  declared ``ignores``;
* ``ADDED_OPTIONS`` at the value at which a run computes what it computed before the option existed;
* any key that did not exist when the identities were frozen (not in ``KNOWN_KEYS``) while it has its
  default, the value the same config groups give it without overrides: a key added at a default that keeps
  the old behaviour changes no recorded run, any other value makes a new run. (A key added with a default
  that changes results goes into ``ADDED_OPTIONS`` with its old value instead.)

``KNOWN_KEYS`` is frozen: never add to it (every key the configs had when it was taken, over every option of
every config group); the identities of ``docs/figures/study/records`` depend on it
(``tests/test_study.py::test_committed_records_keep_their_identities``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Callable, Iterator

from stepwise.stages.registry import Stage

BOOKKEEPING = ("run_dir", "exp", "output_root", "resume", "overwrite", "data.num_workers", "data.preflight",
               "data.preflight_decode_max", "stage.trackers", "stage.log_every", "stage.keep_last",
               "stage.checkpoint_every_steps", "stage.eval_every_epochs")
ADDED_OPTIONS = {"head.others": "uniform",
                 # BACL's loss form (the focal adaptation: heads/bacl.py) and the public code's confusion rows
                 "head.fg_gamma": 0.0, "head.normalize": "num_boxes", "head.unseen_rows": "uniform",
                 # BAGS's rule for a duplicate query of an object (heads/bags.py)
                 "head.duplicates": "others", "head.duplicate_iou": 0.5,
                 # the built-in val split's density of verified-absent classes (data/synthetic.py)
                 "data.negatives": "preset"}
_KNOWN = {  # root key -> its dotted sub-keys, frozen (see the module docstring)
    "checkpoint": (),
    "data": ("allow_outside_root", "batch_size", "crop_max", "crop_min", "crop_resize_scales", "epochs",
        "eval_scale", "image_root", "lr_drop", "max_size", "name", "negatives", "num_workers", "preflight",
        "preflight_decode_max", "preset", "rfs_epoch", "rfs_threshold", "root", "size_divisibility",
        "synthetic_seed", "train_ann", "train_image_root", "train_scales", "val_ann", "val_image_root"),
    "distill": ("cls", "cls_layers", "feature", "fm_normalize", "lambda_cls", "lambda_fm", "shared_queries",
        "temperature"),
    "exp": (),
    "head": ("alpha", "beta", "bg_gamma", "bg_prior_prob", "class_weight_power", "class_weights", "duplicate_iou",
        "duplicates", "edges", "eos_coef", "eps", "fg_gamma", "fhm", "fhm_classes", "fhm_momentum", "fhm_per_class",
        "fhm_weight", "focal_gamma", "g0_alpha", "g0_gamma", "g0_loss", "gamma", "indicator", "metric_learning",
        "metric_learning.center_weight", "metric_learning.enabled", "metric_learning.knn", "metric_learning.knn_k",
        "metric_learning.knn_temperature", "metric_learning.momentum", "name", "normalize", "num_bins", "others",
        "prior_prob", "score_momentum", "unmatched", "unseen_rows", "weight_prob", "weight_threshold"),
    "init_from": (),
    "loss": ("aux_loss", "bbox", "ce", "cost_alpha", "cost_bbox", "cost_class", "cost_gamma", "cost_giou", "giou"),
    "model": ("activation", "backbone_freeze_bn", "backbone_frozen_prefixes", "backbone_name", "backbone_weights",
        "d_model", "dec_layers", "dec_n_points", "dim_feedforward", "dropout", "enc_layers", "enc_n_points", "lr",
        "lr_backbone", "msda_low_precision", "name", "nheads", "num_feature_levels", "num_queries", "two_stage",
        "with_box_refine"),
    "output_root": (),
    "overwrite": (),
    "resume": (),
    "run_dir": (),
    "seed": (),
    "stage": ("batch_size", "checkpoint", "checkpoint_every_steps", "clip_max_norm", "epochs", "eval_batch_size",
        "eval_every_epochs", "grad_accum", "init_from", "keep_last", "log_every", "lr", "lr_backbone", "lr_drop",
        "lr_gamma", "lr_linear_proj_mult", "max_eval_images", "max_images", "max_steps", "mixed_precision", "name",
        "reinit", "replay_set", "rfs", "teacher", "trackers", "train_ann", "trainable", "weight_decay"),
    "stepwise": ("d_head", "d_head.head", "d_head.tail", "d_tail", "d_tail.head", "d_tail.tail",
        "keep_others_as_ignore", "min_images", "rfs", "rfs.d_head", "rfs.d_tail", "rfs.epoch", "rfs.mode",
        "rfs.rounding", "rfs.threshold", "score", "score_threshold"),
}
KNOWN_KEYS = frozenset({*_KNOWN, *(f"{root}.{sub}" for root, subs in _KNOWN.items() for sub in subs)})


def _select(tree: dict, dotted: str) -> Any:
    """The value at ``dotted`` in a nested dict, None where a part is missing."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _has(tree: dict, dotted: str) -> bool:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return isinstance(tree, dict) and last in tree


def _drop(tree: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.get(part, {})
    tree.pop(last, None)


def new_keys(tree: dict, prefix: str = "") -> Iterator[str]:
    """The outermost dotted keys of ``tree`` that are not in ``KNOWN_KEYS``."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted not in KNOWN_KEYS:
            yield dotted
        elif isinstance(value, dict):
            yield from new_keys(value, dotted + ".")


def identity_tree(stage: Stage, tree: dict, default: Callable[[], dict] | None = None) -> dict:
    """What of ``tree`` (a step's resolved config) identifies its run (see the module docstring);
    ``default()``: the step's resolved config of the same groups without overrides (asked only when a new key
    is there; None: new keys stay)."""
    identity = {key: copy.deepcopy(tree[key]) for key in stage.reads if key in tree}
    for key in (*BOOKKEEPING, *stage.ignores):
        _drop(identity, key)
    for key, old_behaviour in ADDED_OPTIONS.items():
        if _select(identity, key) == old_behaviour:
            _drop(identity, key)
    added = list(new_keys(identity))
    if added and default is not None:
        defaults = default()
        for key in added:
            if _has(defaults, key) and _select(defaults, key) == _select(identity, key):
                _drop(identity, key)
    return identity


def run_key(step: str, identity: dict) -> str:
    """``<step>-<sha256[:10]>`` of the identity tree."""
    return f"{step}-{hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]}"


def map_paths(obj: Any, prefix: str, steps: Any, fn: Any) -> Any:
    """Replace every string ``<prefix><step>[/rest]`` (``step`` in ``steps``) in a nested container by
    ``fn(step, rest)``."""
    if isinstance(obj, dict):
        return {k: map_paths(v, prefix, steps, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_paths(v, prefix, steps, fn) for v in obj]
    if isinstance(obj, str) and obj.startswith(prefix):
        step, _, rest = obj[len(prefix):].partition("/")
        if step in steps:
            return fn(step, rest)
    return obj
