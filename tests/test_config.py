"""Config composition: groups, overrides, unknown keys, resolved config saved with a run."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from stepwise.config import ConfigError, load_config, prepare_run_dir


def test_defaults_and_group_selection():
    cfg = load_config([])
    assert cfg.stage.name == "pretrain" and cfg.data.name == "synthetic" and cfg.head.name == "sigmoid"
    assert cfg.run_dir == f"runs/{cfg.exp}/pretrain"


def test_overrides_reach_nested_keys():
    cfg = load_config(["exp=abc", "loss.ce=3", "data.preset=tiny"])
    assert cfg.run_dir == "runs/abc/pretrain"
    assert cfg.loss.ce == 3
    assert cfg.data.root.endswith("synthetic_tiny_seed0")


@pytest.mark.parametrize("override, named", [
    ("no_such_key=1", "no_such_key"),
    ("loss.no_such_weight=1", "loss.no_such_weight"),
    ("+sneaky=1", "sneaky"),
    ("model=no_such_model", "model"),
])
def test_unknown_keys_are_errors_that_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config([override])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(["exp"])


def test_config_is_struct():
    cfg = load_config([])
    with pytest.raises(ConfigAttributeError):
        cfg.not_a_key = 1


def test_run_dir_and_resolved_config_saved(tmp_path):
    cfg = load_config([f"output_root={tmp_path}", "exp=e1"])
    run_dir = prepare_run_dir(cfg, is_main_process=True)
    assert run_dir == tmp_path / "e1" / "pretrain"
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.run_dir == str(run_dir)  # interpolations are resolved in the saved copy
    assert "${" not in (run_dir / "config.yaml").read_text()


def test_non_main_process_creates_nothing(tmp_path):
    cfg = load_config([f"output_root={tmp_path}"])
    run_dir = prepare_run_dir(cfg, is_main_process=False)
    assert not run_dir.exists()


def test_cli_reports_unknown_key_and_exits_2():
    code = "from stepwise.config import cli_config; cli_config(['bogus_key=1'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "bogus_key" in proc.stderr


def test_recipe_sets_the_papers_lvis_run_and_command_line_still_wins():
    cfg = load_config(["recipe=stepwise_lvis_v1", "data.root=/datasets/coco", "stage=all"])
    assert (cfg.model.name, cfg.data.name, cfg.data.batch_size, cfg.loss.ce) == ("deformable_detr_r50", "lvis_v1", 2, 3.0)
    assert cfg.model.two_stage and cfg.model.with_box_refine and cfg.data.rfs_threshold is None
    assert cfg.model.backbone_name == "resnet50.tv_in1k"
    assert (cfg.stage.pretrain.epochs, list(cfg.stage.pretrain.lr_drop), cfg.stage.pretrain.lr) == (50, [40], 2e-4)
    assert (cfg.stage.finetune.epochs, cfg.stage.finetune.lr) == (1, 2e-5)
    assert (cfg.stage.distill.epochs, cfg.stage.distill.lr, list(cfg.stage.distill.lr_drop)) == (2, 2e-4, [1])
    assert cfg.stage.finetune.rfs == cfg.stage.distill.rfs == "stepwise"
    assert load_config(["recipe=stepwise_lvis_v1", "data.root=/x", "data.batch_size=4"]).data.batch_size == 4
    assert load_config([]).loss.ce == 2.0 and load_config(["data=lvis_v1", "data.root=/x"]).data.rfs_threshold is None


@pytest.mark.parametrize("override, named", [
    ("stage.epochs=abc", r"stage.epochs must be an integer >= 1, got 'abc'"),
    ("stage.lr=-1", r"stage.lr must be a number > 0, got -1"),
    ("data.batch_size=0", r"data.batch_size must be an integer >= 1, got 0"),
    ("stage.max_steps=2.5", r"stage.max_steps must be an integer >= 1 or null"),
    ("stage.lr_drop=[a]", r"stage.lr_drop must be a list of integers"),
    ("resume=maybe", r"resume must be true or false"),
    ("stepwise.rfs.mode=sqrt", r"stepwise.rfs.mode must be one of stepwise, generic, null"),
    ("stepwise.rfs.epoch=all", r"stepwise.rfs.epoch must be one of replay_set, repeated"),
    ("stepwise.score=mean", r"stepwise.score must be one of class, max"),
    ("distill.cls_layers=first", r"distill.cls_layers must be one of all, last"),
    ("stage=finetune stage.rfs=sqrt", r"stage.rfs must be one of stepwise, generic, null, got 'sqrt'"),
    ("stage=all stage.distill.rfs=sqrt", r"stage.distill.rfs must be one of stepwise, generic, null"),
    ("stage=finetune stage.replay_set=d_other", r"stage.replay_set='d_other': no rules stepwise.rfs.d_other"),
    ("stage=all stage.finetune.replay_set=mode", r"stage.finetune.replay_set='mode': no rules stepwise.rfs.mode"),
    ("stage=select stage.max_images=0", r"stage.max_images must be an integer >= 1 or null, got 0"),
])
def test_bad_values_are_errors_that_name_the_key(override, named):
    """Checked once, when the config is composed (stepwise.config_schema), with the key in the message."""
    with pytest.raises(ConfigError, match=named):
        load_config(override.split())


def test_validate_config_is_the_same_check_on_a_changed_config():
    from stepwise.config import validate_config

    cfg = load_config(["stage=all"])
    validate_config(cfg)
    cfg.stage.distill.lr = -1
    with pytest.raises(ConfigError, match=r"config key stage.distill.lr must be a number > 0, got -1"):
        validate_config(cfg)


def test_replay_set_rule_applies_only_to_stepwise_sampling():
    load_config(["stage=finetune", "stage.rfs=generic", "stage.replay_set=d_other"])  # no rules read


def test_training_settings_share_the_schema_rules():
    """TrainSettings (the engine's typed stage settings) checks its fields by the schema load_config uses."""
    from stepwise.config_schema import TrainingStage, rules
    from stepwise.engine import TrainSettings

    shared = {f for f in TrainSettings.__dataclass_fields__} & set(rules(TrainingStage))
    assert {"epochs", "lr", "mixed_precision", "max_steps", "keep_last"} <= shared
    for name in shared:
        bad = "abc" if name != "lr_drop" else ["a"]
        with pytest.raises(ConfigError, match=f"config key stage.{name} must be {rules(TrainingStage)[name].expected}"):
            TrainSettings(**{name: bad}).validate()


def test_stage_all_checks_each_training_step():
    from stepwise.config import validate_config

    validate_config(load_config(["stage=all"]))
    with pytest.raises(ConfigError, match=r"stage.finetune.epochs must be an integer >= 1, got 0"):
        validate_config(load_config(["stage=all", "stage.finetune.epochs=0"]))


@pytest.mark.parametrize("override", ["stage.epochs=abc", "stage.lr=-1", "data.batch_size=0"])
def test_entry_point_rejects_bad_values_before_creating_anything(tmp_path, capsys, override):
    # Before: a traceback that did not name the key, and runs/<exp>/pretrain/ left behind.
    from stepwise.run import main

    with pytest.raises(SystemExit) as exit_info:
        main([f"output_root={tmp_path / 'runs'}", override])
    assert exit_info.value.code == 2
    assert override.split("=")[0] in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_rerun_over_checkpoints_needs_resume_or_overwrite(tmp_path, capsys):
    # Before: the second run silently overwrote the first run's checkpoints and appended to its metrics.
    from stepwise.config import check_run_dir
    from stepwise.run import main

    cfg = load_config([f"output_root={tmp_path}", "exp=e1"])
    run_dir = prepare_run_dir(cfg)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "step_00000004.pt").write_bytes(b"x")
    (run_dir / "metrics.jsonl").write_text('{"type": "start"}\n')
    (run_dir / "eval").mkdir()
    with pytest.raises(ConfigError, match=r"e1/pretrain already holds checkpoints of an earlier run "
                                          r"\(checkpoints/step_00000004.pt\); pass resume=true .*overwrite=true"):
        check_run_dir(cfg)
    with pytest.raises(SystemExit):
        main([f"output_root={tmp_path}", "exp=e1"])
    assert "resume=true" in capsys.readouterr().err
    check_run_dir(load_config([f"output_root={tmp_path}", "exp=e1", "resume=true"]))  # allowed
    prepare_run_dir(load_config([f"output_root={tmp_path}", "exp=e1", "overwrite=true"]))
    assert sorted(p.name for p in run_dir.iterdir()) == [".owner.lock", "config.yaml"]  # the lock file stays
    check_run_dir(cfg)  # nothing left to protect


def test_stage_all_restarts_a_step_it_cannot_resume(tmp_path):
    from stepwise.stages.all import step_config

    cfg = load_config(["stage=all", f"output_root={tmp_path}", "exp=e"])
    fresh = step_config(cfg, "pretrain")
    assert not fresh.resume
    run_dir = Path(fresh.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint_final.pt").write_bytes(b"x")  # trained, evaluation never finished
    again = step_config(cfg, "pretrain")
    assert not again.resume and again.overwrite
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "step_00000002.pt").write_bytes(b"x")
    interrupted = step_config(cfg, "pretrain")
    assert interrupted.resume and not interrupted.overwrite


def test_study_proxy_scales_rfs_so_a_class_gets_its_lvis_repeat_factor():
    """recipe=study_proxy: the proxy data and RFS thresholds such that a class in n training images gets the
    repeat factor it would get on LVIS v1 (100,170 images, t = 0.001) with the same n."""
    from stepwise.data.samplers import repeat_factors_from_image_classes
    from stepwise.data.synthetic import plan_dataset

    cfg = load_config(["recipe=study_proxy", "stage=all"])
    assert (cfg.data.preset, cfg.data.epochs, cfg.data.rfs_threshold) == ("study", 14, None)
    lvis = load_config(["stage=all"]).stepwise.rfs
    scale = cfg.stepwise.rfs.threshold / lvis.threshold
    train_images = plan_dataset("study", 0).summary()["train"]["images"]
    assert scale == pytest.approx(100_170 / train_images, rel=0.01)
    for proxy_rules, lvis_rules in ((cfg.stepwise.rfs.d_head, lvis.d_head), (cfg.stepwise.rfs.d_tail, lvis.d_tail)):
        assert [r.threshold / q.threshold for r, q in zip(proxy_rules, lvis_rules)] == pytest.approx([scale] * len(lvis_rules), rel=0.01)
    def factor(n: int, num_images: int, t: float) -> float:  # class 0 in n images of the set, class 1 in the others
        return float(repeat_factors_from_image_classes([[0]] * n + [[1]] * (num_images - n), t)[0])

    for n in (3, 30, 100):
        assert factor(n, train_images, cfg.stepwise.rfs.threshold) == pytest.approx(factor(n, 100_170, 0.001), rel=0.02)
    assert load_config(["recipe=study_proxy", "data=lvis_v1", "data.root=/x"]).data.name == "lvis_v1"


@pytest.mark.parametrize("recipe, preset", [("emoji_study", "study"), ("emoji_demo", "demo")])
def test_emoji_recipes_scale_every_rfs_threshold_to_their_training_images(recipe, preset):
    """recipe=emoji_study / emoji_demo: the emoji preset, and every RFS threshold x 100,170 / its training images
    (LVIS v1's repeat factor for a class in the same number of images)."""
    from stepwise.data.generate.emoji_plan import plan_dataset

    cfg = load_config([f"recipe={recipe}", "stage=all"])
    assert (cfg.data.name, cfg.data.preset, cfg.data.rfs_threshold) == ("emoji_lvis", preset, None)
    lvis = load_config(["stage=all"]).stepwise.rfs
    scale = 100_170 / len(plan_dataset(preset, 0).splits["train"])
    assert cfg.stepwise.rfs.threshold / lvis.threshold == pytest.approx(scale, rel=0.01)
    for ours, theirs in ((cfg.stepwise.rfs.d_head, lvis.d_head), (cfg.stepwise.rfs.d_tail, lvis.d_tail)):
        assert [(r.max_images, r.power) for r in ours] == [(q.max_images, q.power) for q in theirs]
        assert [r.threshold / q.threshold for r, q in zip(ours, theirs)] == pytest.approx([scale] * len(theirs), rel=0.01)


def test_root_init_from_and_checkpoint_win_and_stage_all_keeps_them_for_pretrain_only(tmp_path):
    """One rule (stepwise.config.starting_point) for finetune, distill, select and each step of stage=all."""
    from stepwise.config import starting_point
    from stepwise.stages.all import step_config

    root = f"output_root={tmp_path}"
    assert starting_point(load_config([root, "stage=finetune", "init_from=/w.pt"]), "init_from") == "/w.pt"
    assert starting_point(load_config([root, "stage=distill"]), "init_from") == f"{tmp_path}/default/finetune"
    assert starting_point(load_config([root, "stage=select", "checkpoint=/c.pt"]), "checkpoint") == "/c.pt"
    assert starting_point(load_config([root]), "init_from") is None
    cfg = load_config([root, "stage=all", "init_from=/w.pt", "checkpoint=/c.pt"])
    assert starting_point(step_config(cfg, "pretrain"), "init_from") == "/w.pt"
    for step in ("select", "finetune", "distill"):
        sub = step_config(cfg, step)
        assert sub.init_from is None and sub.checkpoint is None
    assert starting_point(step_config(cfg, "select"), "checkpoint") == f"{tmp_path}/default/pretrain"
    assert starting_point(step_config(cfg, "finetune"), "init_from") == f"{tmp_path}/default/pretrain"


@pytest.mark.parametrize("head", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "head").glob("*.yaml")))
def test_every_head_composes_the_one_metric_learning_block(head):
    """head.metric_learning comes from configs/head/metric_learning/default.yaml (a defaults entry), not a copy."""
    configs = Path(__file__).resolve().parents[1] / "configs" / "head"
    block = OmegaConf.load(configs / "metric_learning" / "default.yaml")
    assert "metric_learning" not in OmegaConf.load(configs / f"{head}.yaml")
    cfg = load_config([f"head={head}"])
    assert cfg.head.metric_learning == block and list(cfg.head)[-1] == "metric_learning"
    assert load_config([f"head={head}", "head.metric_learning.knn_k=7"]).head.metric_learning.knn_k == 7


@pytest.mark.parametrize("stage", ["finetune", "distill"])
@pytest.mark.parametrize("override, named", [
    ("data.rfs_threshold=0.001", r"config key data.rfs_threshold=0.001: stage=\w+ samples its replay set by stage.rfs"),
    ("data.rfs_epoch=repeated", r"config key data.rfs_epoch='repeated': .* use stepwise.rfs.epoch"),
])
def test_replay_stage_alone_refuses_pretrainings_sampling_keys(stage, override, named):
    """Before: data.rfs_* was silently ignored by stage=finetune/distill (they sample by stage.rfs)."""
    with pytest.raises(ConfigError, match=named):
        load_config([f"stage={stage}", override])
    load_config([f"stage={stage}", "stage.rfs=generic", "stepwise.rfs.threshold=0.01"])  # the replay stage's keys
    load_config(["stage=pretrain", override])  # pre-training reads them
    cfg = load_config(["stage=all", override])  # shared by the steps: pretrain's
    assert cfg.stage[stage].rfs == "stepwise"
