"""The stage registry (``stepwise/stages/registry.py``): it agrees with the configs; a stage added with a module,
a registry entry and its config runs as a step of ``stage=all`` and of a study; a config key added at its default
changes no run's identity."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from test_study import write_tiny_study


def test_the_registry_agrees_with_the_configs():
    from stepwise.config import load_config
    from stepwise.stages import registry
    from stepwise.stages.all import step_config
    from stepwise.stages.select import OUTPUTS

    cfg = load_config(["stage=all", "output_root=/r", "exp=e"])
    assert tuple(cfg.stage.steps) == registry.PIPELINE
    assert set(registry.stage_names()) == {k for k in cfg.stage if k not in ("name", "steps")}
    assert registry.get("select").outputs == OUTPUTS
    for name, stage in registry.STAGES.items():
        assert stage.trains == ("epochs" in cfg.stage[name]), name
        sub = step_config(cfg, name)
        for key, source in stage.inputs.items():  # the config's default path reads the declared stage
            assert str(sub.stage[key]).startswith(f"/r/e/{source}"), (name, key)


TOY_CONFIG = """# A toy training stage for the test: a short continuation of pretrain on all training data.
defaults:
  - finetune
  - _self_

name: toy
init_from: ${output_root}/${exp}/pretrain
train_ann: ${data.train_ann}
rfs: null
trainable: null
epochs: 1
"""
TOY_MODULE = '''"""stage=toy: a continuation of pretrain (its stage node says from where and on what)."""
from stepwise.stages import finetune


def run(cfg):
    return finetune.run(cfg)
'''


@pytest.fixture
def config_copy(tmp_path, monkeypatch):
    """A copy of configs/ that the config loader reads (the test adds files to it)."""
    import stepwise.config

    configs = tmp_path / "configs"
    shutil.copytree(stepwise.config.CONFIG_DIR, configs)
    monkeypatch.setattr(stepwise.config, "CONFIG_DIR", configs)
    return configs


def test_a_registered_training_stage_runs_in_stage_all_and_in_a_study(tmp_path, config_copy, monkeypatch):
    """Adding a stage: its module (toy_stage.py), one registry entry, configs/stage/toy.yaml and its default in
    configs/stage/all.yaml. It is then a step of a study (shared pretrain, its own run, a record, the report)."""
    from stepwise.stages import registry
    from stepwise.study import main

    (tmp_path / "toy_stage.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    (config_copy / "stage" / "toy.yaml").write_text(TOY_CONFIG)
    all_yaml = config_copy / "stage" / "all.yaml"
    all_yaml.write_text(all_yaml.read_text().replace("  - distill@distill\n", "  - distill@distill\n  - toy@toy\n"))
    registry.register(registry.Stage("toy", module="toy_stage", inputs={"init_from": "pretrain"}))
    try:
        study = write_tiny_study(tmp_path / "toy.yaml")
        text = study.read_text().replace("seeds: 2", "seeds: 1")
        text = text[:text.index("plot:")] + "".join(f"  - stage.toy.{kv}\n" for kv in (
            "max_steps=2", "max_eval_images=8", "trackers=[]", "checkpoint_every_steps=1"))
        study.write_text(text + "variants:\n  base: {steps: [pretrain]}\n  longer: {steps: [pretrain, toy]}\n")
        summary = main([f"study={study}", f"output_root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}"])
    finally:
        registry.unregister("toy")
        sys.modules.pop("toy_stage", None)
    seed = tmp_path / "runs" / "toy" / "seed0"
    assert sorted(p.name.split("-")[0] for p in (seed / "shared").iterdir()) == ["pretrain", "toy"]
    toy_run = (seed / "longer" / "toy").resolve()
    assert f"init_from: {(seed / 'base' / 'pretrain').resolve()}" in (toy_run / "config.yaml").read_text()
    record = json.loads((seed / "longer" / "result.json").read_text())
    assert set(record["runs"]) == {"pretrain", "toy"} and record["optimizer_steps"] == {"pretrain": 2, "toy": 2}
    assert summary["longer"]["per_seed"]["0"]["AP"] == record["metrics"]["AP"]


def plan_keys(tmp_path, *overrides):
    from stepwise.study import build_plan, load_study

    plan = build_plan(load_study("stepwise"), [0], [f"output_root={tmp_path}", *overrides])
    return {(vr.variant.name, step): run.key for vr in plan for step, run in vr.runs.items()}


def test_a_key_added_at_its_default_changes_no_identity(tmp_path, config_copy):
    """A new key of one stage's config (and a new root block no stage declares it reads) keeps every run; a
    value other than its default makes new runs of the steps that read it, and only those."""
    from stepwise.stages.all import step_config

    before = plan_keys(tmp_path)
    finetune = config_copy / "stage" / "finetune.yaml"
    finetune.write_text(finetune.read_text() + "new_option: 3\n")
    (config_copy / "config.yaml").write_text((config_copy / "config.yaml").read_text() + "\nnew_block: {x: 1}\n")
    assert plan_keys(tmp_path) == before
    changed = plan_keys(tmp_path, "stage.finetune.new_option=4", "new_block.x=2")
    reads_finetune = {k for k in before if k[1] == "finetune" or (k[1] == "distill" and (k[0], "finetune") in before)}
    assert {k for k in before if before[k] != changed[k]} == reads_finetune  # (kt's distill reads the pretrain)
    from stepwise.config import load_config

    assert step_config(load_config(["stage=all"]), "finetune").stage.new_option == 3
