"""The stages' typed settings (stepwise.stage_settings): read from composed configs, checked by the schema's
rules with the key in the message (issue 29)."""

import dataclasses
import inspect
from types import SimpleNamespace

import pytest

from stepwise.config import ConfigError, load_config
from stepwise.data.samplers import GroupRule
from stepwise.data.smooth_tail import Quotas
from stepwise.stage_settings import DistillSettings, DivisionSettings, ReplaySettings, SelectSettings


def test_select_settings_from_a_composed_config():
    cfg = load_config(["stage=select", "exp=e", "output_root=out", "stage.batch_size=3"])
    settings = SelectSettings.from_config(cfg)
    assert settings == SelectSettings(checkpoint="out/e/pretrain", batch_size=3, max_images=None)
    assert SelectSettings.from_config(load_config(["stage=select", "checkpoint=a.pt"])).source() == "a.pt"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.batch_size = 4  # type: ignore[misc]


def test_select_settings_without_a_model_refuse_to_score():
    cfg = SimpleNamespace(checkpoint=None, stage=SimpleNamespace(checkpoint=None, batch_size=None, max_images=2))
    settings = SelectSettings.from_config(cfg)  # any object with the config's attributes
    assert settings.max_images == 2 and settings.checkpoint is None
    with pytest.raises(ValueError, match="stage=select needs a pretrained model"):
        settings.source()


def test_division_settings_from_a_composed_config():
    cfg = load_config(["stage=select", "stepwise.min_images=10", "stepwise.d_tail.tail=7", "stepwise.score=max"])
    settings = DivisionSettings.from_config(cfg)
    assert settings == DivisionSettings(min_images=10, score_threshold=0.5, score="max",
                                        quotas=Quotas(200, 30, 50, 7), keep_others_as_ignore=False)


@pytest.mark.parametrize("stage, replay_set, groups", [("finetune", "d_head", 2), ("distill", "d_tail", 1)])
def test_replay_settings_from_a_composed_config(stage, replay_set, groups):
    cfg = load_config([f"stage={stage}", "exp=e", "output_root=out"])
    settings = ReplaySettings.from_config(cfg)
    assert (settings.name, settings.replay_set, settings.rfs) == (stage, replay_set, "stepwise")
    assert settings.train_ann == f"out/e/select/{replay_set}.json" and settings.reinit == ()
    assert len(settings.rules) == groups and all(isinstance(r, GroupRule) for r in settings.rules)
    assert (settings.rounding, settings.threshold, settings.epoch) == ("ceil", 0.001, "replay_set")
    generic = ReplaySettings.from_config(load_config([f"stage={stage}", "stage.rfs=generic", "init_from=w.pt",
                                                      "stage.reinit=[class_embed]"]))
    assert (generic.rfs, generic.rules, generic.init_from, generic.reinit) == ("generic", (), "w.pt", ("class_embed",))
    assert ReplaySettings.from_config(load_config([f"stage={stage}", "stepwise.rfs.mode=null"])).rfs is None


def test_replay_settings_of_a_stage_all_step():
    from stepwise.stages.all import step_config

    cfg = load_config(["stage=all", "stage.distill.rfs=generic", "stepwise.rfs.epoch=repeated"])
    finetune, distill = (ReplaySettings.from_config(step_config(cfg, s)) for s in ("finetune", "distill"))
    assert (finetune.rfs, distill.rfs, distill.epoch) == ("stepwise", "generic", "repeated")


def test_distill_settings_from_a_composed_config():
    from stepwise.distill_losses import DistillCriterion

    cfg = load_config(["stage=distill", "exp=e", "output_root=out", "distill.cls=false", "distill.lambda_fm=2"])
    settings = DistillSettings.from_config(cfg)
    assert settings.teacher == "out/e/finetune" and settings.min_images == 30
    assert settings.criterion_options() == {
        "feature": True, "cls": False, "shared_queries": True, "lambda_fm": 2.0, "lambda_cls": 0.1,
        "temperature": 1.0, "fm_normalize": "level_image", "cls_layers": "all"}
    assert set(settings.criterion_fields()) <= set(inspect.signature(DistillCriterion).parameters)


@pytest.mark.parametrize("settings, stage, key, value, named", [
    (SelectSettings, "select", "stage.max_images", 0, r"config key stage.max_images must be an integer >= 1 or null"),
    (DivisionSettings, "select", "stepwise.score", "best", r"config key stepwise.score must be one of class, max"),
    (DivisionSettings, "select", "stepwise.d_head.tail", -1, r"config key stepwise.d_head.tail must be an integer >= 0"),
    (DivisionSettings, "select", "stepwise.keep_others_as_ignore", 1,
     r"config key stepwise.keep_others_as_ignore must be true or false, got 1"),
    (ReplaySettings, "finetune", "stage.rfs", "sqrt", r"config key stage.rfs must be one of stepwise, generic, null"),
    (ReplaySettings, "distill", "stepwise.rfs.epoch", "all", r"config key stepwise.rfs.epoch must be one of replay_set"),
    (ReplaySettings, "finetune", "stage.replay_set", "d_other", r"stage.replay_set='d_other': no rules stepwise.rfs"),
    (DistillSettings, "distill", "distill.lambda_cls", -1, r"config key distill.lambda_cls must be a number >= 0"),
    (DistillSettings, "distill", "distill.feature", "yes", r"config key distill.feature must be true or false"),
    (DistillSettings, "distill", "stepwise.min_images", 0, r"config key stepwise.min_images must be an integer >= 1"),
])
def test_a_bad_value_is_the_schemas_error_naming_the_key(settings, stage, key, value, named):
    """Settings read from a config changed after composing (or never composed) are checked by the same rules."""
    from omegaconf import OmegaConf

    cfg = load_config([f"stage={stage}"])
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError, match=named):
        settings.from_config(cfg)


@pytest.mark.parametrize("override, named", [
    ("distill.shared_queries=1", r"config key distill.shared_queries must be true or false, got 1"),
    ("stepwise.d_tail.head=-2", r"config key stepwise.d_tail.head must be an integer >= 0 or null, got -2"),
    ("stepwise.keep_others_as_ignore=yes", r"config key stepwise.keep_others_as_ignore must be true or false"),
])
def test_schema_checks_the_keys_the_settings_read(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(["stage=distill", override])
