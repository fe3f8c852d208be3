"""Config composition: groups, overrides, unknown keys, resolved config saved with a run."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

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
    with pytest.raises(Exception):
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
