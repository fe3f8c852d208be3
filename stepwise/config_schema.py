"""The config schema: one typed dataclass per config node a stage reads, each field carrying its key's rule
(type and range). :func:`validate` checks a composed config against them, once, when it is composed
(:func:`stepwise.config.load_config`); :class:`stepwise.engine.TrainSettings` (the training stages' typed
settings) applies the same rules (:func:`check`) to values that did not come through ``load_config`` (a
checkpoint's saved config, tests).

Which node gets which schema: the root (:class:`Root`), ``data`` (:class:`Data`), ``stepwise``
(:class:`Stepwise`), its quotas ``stepwise.d_head`` / ``stepwise.d_tail`` (:class:`Quota`), ``stepwise.rfs``
(:class:`StepwiseRfs`), ``distill`` (:class:`Distill`) and the stage
node (``stage``, or ``stage.<step>`` for each step of ``stage=all`` in ``stage.steps``; :func:`stage_schema`):
a node with ``replay_set`` is a replay stage (:class:`ReplayStage`: finetune, distill), one with ``epochs``
a training stage (:class:`TrainingStage`), ``select``'s is :class:`SelectStage`. Values still missing
(``???``) are left to the code that needs them. Then the rules that join two nodes (:func:`cross_checks`):
a replay stage's ``replay_set`` names rules in ``stepwise.rfs``; a replay stage run alone refuses
``data.rfs_*`` (it samples its replay set by ``stage.rfs``; docs/interfaces.md, "Sampling (RFS)").
The stages' typed views of these nodes (:mod:`stepwise.stage_settings`, like
:class:`stepwise.engine.TrainSettings`) apply the same rules, through :func:`check` and :func:`replay_rules`.

The checks are strict, without conversion: Hydra's structured-config merge would turn an override
``stage.clip_max_norm=0`` into ``0.0`` (changing the resolved config, the saved ``config.yaml`` and the
study runs' identities) and its errors do not name the allowed range, so the dataclasses are the schema
and the composed values stay exactly what the YAML and the command line say.

Import-light: no torch (``stepwise.config`` imports it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem the user must fix (unknown key, bad value, missing file)."""


@dataclass(frozen=True)
class Rule:
    """What a key accepts: ``ok(value)`` and the words for the message (``must be <expected>``)."""

    ok: Callable[[Any], bool]
    expected: str


def integer(minimum: int | None = None, optional: bool = False) -> Rule:
    def ok(v: Any) -> bool:
        if v is None:
            return optional
        return isinstance(v, int) and not isinstance(v, bool) and (minimum is None or v >= minimum)
    text = "an integer" + (f" >= {minimum}" if minimum is not None else "")
    return Rule(ok, text + (" or null" if optional else ""))


def number(minimum: float = 0.0, strict: bool = True, optional: bool = False) -> Rule:
    def ok(v: Any) -> bool:
        if v is None:
            return optional
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (v > minimum if strict else v >= minimum))
    text = f"a number {'>' if strict else '>='} {minimum:g}"
    return Rule(ok, text + (" or null" if optional else ""))


def boolean() -> Rule:
    return Rule(lambda v: isinstance(v, bool), "true or false")


def int_list() -> Rule:
    def ok(v: Any) -> bool:
        return v is None or (isinstance(v, (list, tuple)) and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v))
    return Rule(ok, "a list of integers >= 0")


def negatives() -> Rule:
    def ok(v: Any) -> bool:
        if v in ("preset", "lvis"):
            return True
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
    return Rule(ok, "preset, lvis or a share in [0, 1]")


def choice(*options: str | None) -> Rule:
    return Rule(lambda v: v in options, "one of " + ", ".join("null" if o is None else o for o in options))


def key(rule: Rule) -> Any:
    """A schema field: the key's rule rides in the field's metadata (values are read from the config)."""
    return field(default=None, metadata={"rule": rule})


# ------------------------------------------------------------------------------------------------- the nodes
@dataclass
class Root:
    """Root keys every stage reads."""

    seed: int = key(integer(0))
    resume: bool = key(boolean())
    overwrite: bool = key(boolean())


@dataclass
class Data:
    """``data`` (configs/data/*.yaml): loading and pre-training's sampling (``rfs_*``)."""

    batch_size: int = key(integer(1))
    num_workers: int = key(integer(0))
    rfs_threshold: float | None = key(number(0, optional=True))
    rfs_epoch: str = key(choice("dataset", "repeated"))
    preflight: bool = key(boolean())
    preflight_decode_max: int = key(integer(0))
    allow_outside_root: bool = key(boolean())
    negatives: Any = key(negatives())


@dataclass
class Stepwise:
    """``stepwise``: division and selection (stage=select), head classes (distill)."""

    min_images: int = key(integer(1))
    score_threshold: float = key(number(0, strict=False))
    score: str = key(choice("class", "max"))
    keep_others_as_ignore: bool = key(boolean())


@dataclass
class Quota:
    """``stepwise.d_head`` / ``stepwise.d_tail``: instances per head / tail class in the replay set (null: all)."""

    head: int | None = key(integer(0, optional=True))
    tail: int | None = key(integer(0, optional=True))


@dataclass
class StepwiseRfs:
    """``stepwise.rfs``: sampling inside a replay set (the rule lists ``d_head``/``d_tail`` are parsed by
    :class:`stepwise.data.samplers.GroupRule`)."""

    mode: str | None = key(choice("stepwise", "generic", None))
    rounding: str = key(choice("ceil", "stochastic"))
    threshold: float = key(number(0))
    epoch: str = key(choice("replay_set", "repeated"))


@dataclass
class Distill:
    """``distill``: stage=distill's terms and weights."""

    feature: bool = key(boolean())
    cls: bool = key(boolean())
    shared_queries: bool = key(boolean())
    cls_layers: str = key(choice("all", "last"))
    fm_normalize: str = key(choice("level_image", "pooled"))
    lambda_fm: float = key(number(0, strict=False))
    lambda_cls: float = key(number(0, strict=False))
    temperature: float = key(number(0))


@dataclass
class TrainingStage:
    """A training stage's node (configs/stage/pretrain.yaml; finetune and distill inherit it). The fields
    :class:`stepwise.engine.TrainSettings` shares are checked by the same rules there."""

    epochs: int = key(integer(1))
    lr: float = key(number(0))
    lr_backbone: float = key(number(0, strict=False))
    lr_linear_proj_mult: float = key(number(0, strict=False))
    weight_decay: float = key(number(0, strict=False))
    lr_drop: list = key(int_list())
    lr_gamma: float = key(number(0))
    clip_max_norm: float = key(number(0, strict=False))
    grad_accum: int = key(integer(1))
    mixed_precision: str = key(choice("no", "bf16", "fp16"))
    eval_every_epochs: int = key(integer(0))
    checkpoint_every_steps: int = key(integer(0))
    keep_last: int = key(integer(0))
    log_every: int = key(integer(0))
    max_steps: int | None = key(integer(1, optional=True))
    eval_batch_size: int | None = key(integer(1, optional=True))
    max_eval_images: int | None = key(integer(1, optional=True))


@dataclass
class ReplayStage(TrainingStage):
    """A replay stage's node (configs/stage/finetune.yaml, distill.yaml): a training stage on a replay set."""

    rfs: str | None = key(choice("stepwise", "generic", None))


@dataclass
class SelectStage:
    """stage=select's node (configs/stage/select.yaml)."""

    batch_size: int | None = key(integer(1, optional=True))
    max_images: int | None = key(integer(1, optional=True))


ROOT_NODES = (("", Root), ("data.", Data), ("stepwise.", Stepwise), ("stepwise.d_head.", Quota),
              ("stepwise.d_tail.", Quota), ("stepwise.rfs.", StepwiseRfs), ("distill.", Distill))


def rules(schema: type) -> dict[str, Rule]:
    """``{key: rule}`` of a schema dataclass."""
    return {f.name: f.metadata["rule"] for f in fields(schema) if "rule" in f.metadata}


def stage_schema(node: Any) -> type | None:
    """The schema of a stage node (see the module docstring); None for a stage without checked keys."""
    if "replay_set" in node:
        return ReplayStage
    if "epochs" in node:
        return TrainingStage
    return SelectStage if node.get("name") == "select" else None


def check(prefix: str, values: Any, schema: type) -> None:
    """ConfigError ``config key <prefix><key> must be <expected>, got <value>`` for the first value of
    ``values`` (a config node or a mapping) that breaks its rule in ``schema``; absent and missing keys pass."""
    for name, rule in rules(schema).items():
        if name not in values or (isinstance(values, DictConfig) and OmegaConf.is_missing(values, name)):
            continue
        try:
            value = values[name]
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"config key {prefix}{name}: {str(err).splitlines()[0]}") from err
        if not rule.ok(value):
            raise ConfigError(f"config key {prefix}{name} must be {rule.expected}, got {value!r}")


def stage_nodes(cfg: DictConfig) -> Iterator[tuple[str, Any]]:
    """``(prefix, node)`` of the stage node, or of each step of ``stage=all`` in ``stage.steps``."""
    if cfg.stage.get("name") == "all":
        for step in cfg.stage.get("steps", []):
            if step in cfg.stage and isinstance(cfg.stage[step], DictConfig):
                yield f"stage.{step}.", cfg.stage[step]
    else:
        yield "stage.", cfg.stage


def validate(cfg: DictConfig) -> None:
    """Check a composed config against the schema (see the module docstring); ConfigError naming the first
    bad key."""
    for prefix, schema in ROOT_NODES:
        node = OmegaConf.select(cfg, prefix.rstrip(".")) if prefix else cfg
        if node is not None:
            check(prefix, node, schema)
    for prefix, node in stage_nodes(cfg):
        schema = stage_schema(node)
        if schema is not None:
            check(prefix, node, schema)
    cross_checks(cfg)


def cross_checks(cfg: DictConfig) -> None:
    """The rules that join two nodes (see the module docstring)."""
    if cfg.stage.get("name") != "all" and stage_schema(cfg.stage) is ReplayStage:
        check_replay_sampling(cfg)
    for prefix, node in stage_nodes(cfg):
        if stage_schema(node) is not ReplayStage or OmegaConf.is_missing(node, "rfs") or node.rfs != "stepwise":
            continue
        replay_rules(prefix, node.replay_set, cfg.stepwise.rfs)


def replay_rules(prefix: str, replay_set: Any, rfs: Any) -> Any:
    """The rule list ``stepwise.rfs.<replay_set>`` of a replay stage with ``rfs=stepwise`` (``rfs``: the
    ``stepwise.rfs`` node); ConfigError naming ``<prefix>replay_set`` when there is none."""
    rules_of = rfs.get(replay_set) if isinstance(replay_set, str) else None
    if replay_set in rules(StepwiseRfs) or not isinstance(rules_of, (ListConfig, list)):
        raise ConfigError(f"config key {prefix}replay_set={replay_set!r}: no rules stepwise.rfs.{replay_set} "
                          f"(stage.rfs=stepwise samples by the rule list it names: d_head or d_tail)")
    return rules_of


# What a replay stage would otherwise ignore: data.rfs_* -> (its default, the key the replay stage reads instead).
PRETRAIN_SAMPLING = {"rfs_threshold": (None, "stage.rfs=generic with stepwise.rfs.threshold"),
                     "rfs_epoch": ("dataset", "stepwise.rfs.epoch")}


def check_replay_sampling(cfg: DictConfig) -> None:
    """A replay stage run alone (``stage=finetune``/``distill``) samples its replay set by ``stage.rfs`` and
    ``stepwise.rfs``, never by ``data.rfs_*`` (pre-training's sampling of ``data.train_ann``): one of them set
    away from its default would be ignored, so it is an error naming the key. In ``stage=all`` (and a study)
    the ``data`` block is shared by the steps: there ``data.rfs_*`` is pretrain's and is accepted."""
    for name, (default, instead) in PRETRAIN_SAMPLING.items():
        if name in cfg.data and not OmegaConf.is_missing(cfg.data, name) and cfg.data[name] != default:
            raise ConfigError(
                f"config key data.{name}={cfg.data[name]!r}: stage={cfg.stage.name} samples its replay set by "
                f"stage.rfs and stepwise.rfs, not by data.rfs_* (pre-training's sampling of data.train_ann); leave "
                f"data.{name}={'null' if default is None else default} and use {instead} "
                f"(docs/interfaces.md, \"Sampling (RFS)\")")
