"""The stages' typed settings: a frozen dataclass per thing a stage reads from the config, each built by
``from_config(cfg)`` here and nowhere else, as the training loop reads :class:`stepwise.engine.TrainSettings`:

- :class:`SelectSettings` (stage=select's node: what to score with, batch size, image limit) and
  :class:`DivisionSettings` (the root ``stepwise:`` block: head/tail division, selection and quotas);
- :class:`ReplaySettings` (a replay stage, finetune or distill: its replay set, starting point and step-wise
  RFS inside the replay set, ``stage.rfs`` with ``stepwise.rfs``);
- :class:`DistillSettings` (stage=distill: the teacher and the root ``distill:`` block).

``from_config`` reads the values (a composed config, a checkpoint's saved one, or any object with the same
attributes), checks them by the schema's rules (:mod:`stepwise.config_schema`: :func:`~stepwise.config_schema.check`
with the node's schema dataclass, :func:`~stepwise.config_schema.replay_rules`; a bad value is the schema's
``ConfigError`` naming the key), then converts them exactly as the stages did when they read the keys
themselves. Values already checked by ``load_config`` pass again unchanged; nothing here changes the config.

A module of its own rather than :mod:`stepwise.config_schema`: the schema stays import-light (no torch) and
holds only the rules, while these views need the code that reads a config (:func:`stepwise.config.starting_point`)
and parsed types (:class:`stepwise.data.samplers.GroupRule`, :class:`stepwise.data.smooth_tail.Quotas`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from stepwise.config import starting_point
from stepwise.config_schema import Distill, Quota, ReplayStage, SelectStage, Stepwise, StepwiseRfs, check, replay_rules
from stepwise.data.samplers import GroupRule
from stepwise.data.smooth_tail import Quotas


def read(node: Any, names: Iterable[str], prefix: str, schema: type) -> dict[str, Any]:
    """``{name: value}`` of ``names`` in ``node`` (a config node or an object with attributes; config lists
    as plain lists), checked by ``schema``'s rules (ConfigError ``config key <prefix><name> must be ...``)."""
    values = {}
    for name in names:
        value = getattr(node, name)
        values[name] = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) \
            else value
    check(prefix, values, schema)
    return values


@dataclass(frozen=True)
class SelectSettings:
    """stage=select's node (configs/stage/select.yaml).

    Fields: ``checkpoint``: the pretrained model to score with, root ``checkpoint=`` else ``stage.checkpoint``
    (:func:`stepwise.config.starting_point`; None when neither is set); ``batch_size``: images per scoring
    batch (``stage.batch_size``; None: ``data.batch_size``); ``max_images``: score only the first N training
    images (``stage.max_images``; None: all).
    """

    checkpoint: str | None
    batch_size: int | None
    max_images: int | None

    @classmethod
    def from_config(cls, cfg: Any) -> "SelectSettings":
        """Read ``cfg.stage`` (rules of :class:`~stepwise.config_schema.SelectStage`) and root ``checkpoint``."""
        values = read(cfg.stage, ("batch_size", "max_images"), "stage.", SelectStage)
        source = starting_point(cfg, "checkpoint")
        return cls(checkpoint=str(source) if source else None, **values)

    def source(self) -> str:
        """``checkpoint``; ValueError when there is none (scoring needs a model)."""
        if not self.checkpoint:
            raise ValueError("stage=select needs a pretrained model: set checkpoint=<file or run dir>")
        return self.checkpoint


@dataclass(frozen=True)
class DivisionSettings:
    """The root ``stepwise:`` block as stage=select reads it (configs/config.yaml).

    Fields: ``min_images``: M, head classes appear in >= M training images (``stepwise.min_images``);
    ``score_threshold``: exemplars scoring above it come first (``stepwise.score_threshold``); ``score``:
    ``class`` (the matched prediction's probability of the instance's class) or ``max`` (its largest class
    probability) (``stepwise.score``); ``quotas``: instances per class of each replay set
    (``stepwise.d_head.head`` / ``.tail``, ``stepwise.d_tail.head`` / ``.tail``; None: all);
    ``keep_others_as_ignore``: keep the unselected boxes of selected images as ignore regions
    (``stepwise.keep_others_as_ignore``).
    """

    min_images: int
    score_threshold: float
    score: str
    quotas: Quotas
    keep_others_as_ignore: bool

    @classmethod
    def from_config(cls, cfg: Any) -> "DivisionSettings":
        """Read ``cfg.stepwise`` (rules of :class:`~stepwise.config_schema.Stepwise` and ``Quota``)."""
        node = cfg.stepwise
        values = read(node, ("min_images", "score_threshold", "score", "keep_others_as_ignore"), "stepwise.",
                      Stepwise)
        head = read(node.d_head, ("head", "tail"), "stepwise.d_head.", Quota)
        tail = read(node.d_tail, ("head", "tail"), "stepwise.d_tail.", Quota)
        return cls(min_images=int(values["min_images"]), score_threshold=float(values["score_threshold"]),
                   score=str(values["score"]), keep_others_as_ignore=bool(values["keep_others_as_ignore"]),
                   quotas=Quotas(head_in_head=head["head"], tail_in_head=head["tail"],
                                 head_in_tail=tail["head"], tail_in_tail=tail["tail"]))


@dataclass(frozen=True)
class ReplaySettings:
    """A replay stage (finetune, distill: configs/stage/finetune.yaml, distill.yaml) and its sampling.

    Fields: ``name``: the stage (``stage.name``); ``train_ann``: the replay set's annotation file
    (``stage.train_ann``); ``init_from``: the weights to start from, root ``init_from=`` else
    ``stage.init_from`` (:func:`stepwise.config.starting_point`; None when neither is set); ``reinit``:
    parameter prefixes re-initialised instead of loaded (``stage.reinit``); ``replay_set``: whose step-wise
    RFS rules apply (``stage.replay_set``: d_head or d_tail); ``rfs``: sampling inside the replay set,
    ``stepwise`` | ``generic`` | None for uniform (``stage.rfs``, default ``stepwise.rfs.mode``); ``rules``: the
    step-wise rules ``stepwise.rfs.<replay_set>`` parsed (:class:`~stepwise.data.samplers.GroupRule`; empty
    unless ``rfs`` is ``stepwise``); ``rounding``: image factor rounding, ``ceil`` | ``stochastic``
    (``stepwise.rfs.rounding``); ``threshold``: t of ``rfs=generic`` (``stepwise.rfs.threshold``); ``epoch``:
    samples per epoch, ``replay_set`` | ``repeated`` (``stepwise.rfs.epoch``).
    """

    name: str
    train_ann: str
    init_from: str | None
    reinit: tuple[str, ...]
    replay_set: str | None
    rfs: str | None
    rules: tuple[GroupRule, ...]
    rounding: str
    threshold: float
    epoch: str

    @classmethod
    def from_config(cls, cfg: Any) -> "ReplaySettings":
        """Read ``cfg.stage`` (rules of :class:`~stepwise.config_schema.ReplayStage`) and ``cfg.stepwise.rfs``
        (:class:`~stepwise.config_schema.StepwiseRfs`; with ``rfs=stepwise`` the rule list
        :func:`~stepwise.config_schema.replay_rules` names, parsed by ``GroupRule.parse``)."""
        stage, rfs = cfg.stage, cfg.stepwise.rfs
        mode = read(stage, ("rfs",), "stage.", ReplayStage)["rfs"]
        sampling = read(rfs, ("rounding", "threshold", "epoch"), "stepwise.rfs.", StepwiseRfs)
        replay_set = stage.replay_set
        rules: tuple[GroupRule, ...] = ()
        if mode == "stepwise":
            listed = replay_rules("stage.", replay_set, rfs)
            rules = GroupRule.parse(listed, where=f"stepwise.rfs.{replay_set}")
        init_from = starting_point(cfg, "init_from")
        return cls(name=str(stage.name), train_ann=str(stage.train_ann),
                   init_from=None if init_from is None else str(init_from),
                   reinit=tuple(stage.reinit or ()), replay_set=None if replay_set is None else str(replay_set),
                   rfs=mode, rules=rules, rounding=str(sampling["rounding"]),
                   threshold=float(sampling["threshold"]), epoch=str(sampling["epoch"]))


@dataclass(frozen=True)
class DistillSettings:
    """stage=distill's teacher and the root ``distill:`` block (configs/config.yaml), the options of
    :class:`stepwise.distill_losses.DistillCriterion`.

    Fields: ``teacher``: the frozen head-class expert, file or run dir (``stage.teacher``); ``min_images``:
    head classes (whose knowledge is distilled) have at least this many training images
    (``stepwise.min_images``); ``feature``: masked feature distillation on the ``input_proj`` outputs
    (``distill.feature``); ``cls``: KL distillation of the class distribution over head classes
    (``distill.cls``); ``shared_queries``: the student's class heads read the teacher's query features
    (``distill.shared_queries``); ``lambda_fm`` / ``lambda_cls``: the terms' weights; ``temperature``: T of
    the KL term; ``fm_normalize``: ``level_image`` | ``pooled``; ``cls_layers``: ``all`` | ``last``
    (``distill.<field>``).
    """

    teacher: str
    min_images: int
    feature: bool
    cls: bool
    shared_queries: bool
    lambda_fm: float
    lambda_cls: float
    temperature: float
    fm_normalize: str
    cls_layers: str

    @classmethod
    def from_config(cls, cfg: Any) -> "DistillSettings":
        """Read ``cfg.stage.teacher``, ``cfg.stepwise.min_images`` (rule of
        :class:`~stepwise.config_schema.Stepwise`) and ``cfg.distill`` (:class:`~stepwise.config_schema.Distill`)."""
        min_images = read(cfg.stepwise, ("min_images",), "stepwise.", Stepwise)["min_images"]
        d = read(cfg.distill, cls.criterion_fields(), "distill.", Distill)
        return cls(teacher=str(cfg.stage.teacher), min_images=int(min_images),
                   feature=bool(d["feature"]), cls=bool(d["cls"]), shared_queries=bool(d["shared_queries"]),
                   lambda_fm=float(d["lambda_fm"]), lambda_cls=float(d["lambda_cls"]),
                   temperature=float(d["temperature"]), fm_normalize=str(d["fm_normalize"]),
                   cls_layers=str(d["cls_layers"]))

    @staticmethod
    def criterion_fields() -> tuple[str, ...]:
        """The fields that are ``DistillCriterion``'s keyword options (the ``distill:`` keys)."""
        return ("feature", "cls", "shared_queries", "lambda_fm", "lambda_cls", "temperature", "fm_normalize",
                "cls_layers")

    def criterion_options(self) -> dict[str, Any]:
        """``DistillCriterion``'s keyword options: ``{field: value}`` of :meth:`criterion_fields`."""
        return {name: getattr(self, name) for name in self.criterion_fields()}
