"""``python -m stepwise.study``: study files, the shared-prefix plan, seeds, skip/resume and the report."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

TINY_STUDY = """
description: two variants that share pretrain and selection
seeds: 2
base:
  - data.preset=tiny
  - model.num_queries=20
  - model.d_model=64
  - model.dim_feedforward=128
  - model.enc_layers=1
  - model.dec_layers=1
  - model.nheads=4
  - data.train_scales=[64]
  - data.crop_resize_scales=[64]
  - data.crop_min=48
  - data.crop_max=64
  - data.max_size=96
  - data.eval_scale=64
  - stage.select.max_images=48
  - stepwise.min_images=8
  - stepwise.d_head.head=20
  - stepwise.d_tail.head=6
{stage_overrides}
plot: [ft, ft_low_lr]
variants:
  ft:
    steps: [pretrain, select, finetune]
  ft_low_lr:
    from: ft
    overrides: [stage.finetune.lr=1e-5]
"""


def write_tiny_study(path: Path) -> Path:
    lines = []
    for step in ("pretrain", "finetune"):
        lines += [f"  - stage.{step}.{kv}" for kv in ("max_steps=2", "max_eval_images=8", "trackers=[]",
                                                        "epochs=1", "checkpoint_every_steps=1")]
    path.write_text(TINY_STUDY.format(stage_overrides="\n".join(lines)))
    return path


def outputs(root: Path) -> dict[Path, float]:
    """mtime of every file a finished run writes last (final checkpoint, metrics, scores)."""
    names = ("checkpoint_final.pt", "metrics.json", "scores.jsonl", "d_head.json")
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.name in names and "shared" in p.parts}


def test_study_end_to_end_shares_skips_resumes_and_reports(tmp_path):
    from stepwise.study import main

    study = write_tiny_study(tmp_path / "tiny.yaml")
    args = [f"study={study}", f"output_root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}"]
    summary = main(args)
    root = tmp_path / "runs" / "tiny"

    # one pretrain and one selection per seed, shared by both variants; a finetune each
    for seed in (0, 1):
        shared = sorted(p.name.split("-")[0] for p in (root / f"seed{seed}" / "shared").iterdir())
        assert shared == ["finetune", "finetune", "pretrain", "select"]
        links = {v: {s: (root / f"seed{seed}" / v / s).resolve() for s in ("pretrain", "select", "finetune")}
                 for v in ("ft", "ft_low_lr")}
        assert links["ft"]["pretrain"] == links["ft_low_lr"]["pretrain"]
        assert links["ft"]["select"] == links["ft_low_lr"]["select"]
        assert links["ft"]["finetune"] != links["ft_low_lr"]["finetune"]
        # the selection scored with this seed's pretrain; the finetune started from it
        select_cfg = (links["ft"]["select"] / "config.yaml").read_text()
        assert f"checkpoint: {links['ft']['pretrain']}" in select_cfg
        finetune_cfg = (links["ft"]["finetune"] / "config.yaml").read_text()
        assert f"init_from: {links['ft']['pretrain']}" in finetune_cfg and f"seed: {seed}" in finetune_cfg
    assert all((run / "wall_time.json").is_file() for run in root.glob("seed*/shared/*"))
    seed_dirs = [(root / f"seed{s}" / "ft" / "pretrain").resolve() for s in (0, 1)]
    assert seed_dirs[0] != seed_dirs[1]

    # the report: per-seed values are the runs' metrics; mean and sample std (ddof=1) are theirs
    report = json.loads((root / "study.json").read_text())
    assert report["seeds"] == [0, 1] and report["pending"] == []
    for variant in ("ft", "ft_low_lr"):
        entry = report["variants"][variant]
        assert set(entry["per_seed"]) == {"0", "1"}
        for seed in ("0", "1"):
            metrics = json.loads((root / f"seed{seed}" / variant / "finetune" / "eval" / "metrics.json").read_text())
            assert entry["per_seed"][seed]["AP"] == metrics["AP"]
            assert entry["per_seed"][seed]["optimizer_steps"] == {"pretrain": 2, "finetune": 2}
        for column in ("AP", "APr", "APc", "APf", "AP1"):
            values = [entry["per_seed"][s][column] for s in ("0", "1")]
            assert entry["mean"][column] == pytest.approx((values[0] + values[1]) / 2)
            assert entry["std"][column] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
        assert entry["mean"]["steps_after_pretrain"] == 2
    assert summary["ft"]["mean"]["AP"] == report["variants"]["ft"]["mean"]["AP"]
    md = (root / "study.md").read_text()
    ap = report["variants"]["ft"]
    assert f"| ft | 2 | {100 * ap['mean']['AP']:.1f} ± {100 * ap['std']['AP']:.1f} |" in md
    assert f"| ft | 1 | {100 * ap['per_seed']['1']['AP']:.1f} |" in md
    assert (root / "study.png").stat().st_size > 10_000
    # the pre-training curve: every evaluation of each seed's pretrain (here one, after its partial epoch)
    for seed in ("0", "1"):
        pretrain_metrics = json.loads((root / f"seed{seed}" / "ft" / "pretrain" / "eval" / "metrics.json").read_text())
        curve = report["pretrain_curves"]["ft"][seed]
        assert [p["epoch"] for p in curve] == [1] and curve[0]["metrics"]["AP"] == pretrain_metrics["AP"]
    assert "## Pre-training: box AP (%) after each epoch" in md and "| epoch | ft AP | ft APr |" in md
    assert (root / "pretrain_curves.png").stat().st_size > 10_000

    # a re-run trains nothing
    before = outputs(root)
    assert len(before) == 2 * (2 + 2 + 2 * 2)  # per seed: pretrain, select, 2 finetunes; 2 files each
    main(args)
    assert outputs(root) == before

    # an interrupted finetune (mid-run checkpoint at step 1, no final outputs) resumes and ends the same way
    run = (root / "seed1" / "ft_low_lr" / "finetune").resolve()
    first = json.loads((run / "eval" / "metrics.json").read_text())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001.pt", "step_00000002.pt"]
    (run / "checkpoints" / "step_00000002.pt").unlink()  # killed after the step-1 checkpoint
    (run / "checkpoint_final.pt").unlink()
    (run / "eval" / "metrics.json").unlink()
    (root / "seed1" / "ft_low_lr" / "result.json").unlink()  # written only when the variant finishes
    from stepwise.study import build_plan, load_study, plan_text
    plan = build_plan(load_study(str(study)), range(2), args[1:])
    text = " ".join(plan_text(load_study(str(study)), plan).split())
    assert f"{run.name} resumes at step 1" in text and "7 of 8 runs done; still to run: 1 finetune (1 epochs)" in text
    assert "measured on finished runs" in text and "estimated for the rest" in text
    seconds = json.loads((run / "wall_time.json").read_text())["seconds"]
    main(args)
    assert json.loads((run / "wall_time.json").read_text())["seconds"] > seconds  # summed over sessions
    starts = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "start"]
    assert [s["global_step"] for s in starts] == [0, 1]
    again = json.loads((run / "eval" / "metrics.json").read_text())
    assert again["AP"] == pytest.approx(first["AP"], abs=1e-12)
    changed = {p for p, t in outputs(root).items() if before.get(p) != t}
    assert changed == {run / "checkpoint_final.pt", run / "eval" / "metrics.json"}

    # another machine with the result.json files alone: nothing trains, the report is the same
    report = json.loads((root / "study.json").read_text())
    other = tmp_path / "other"
    for record in root.glob("seed*/*/result.json"):
        copy = other / "tiny" / record.relative_to(root)
        copy.parent.mkdir(parents=True)
        copy.write_text(record.read_text())
    moved = [f"study={study}", f"output_root={other}", f"data.root={tmp_path / 'data'}"]
    text = " ".join(plan_text(load_study(str(study)), build_plan(load_study(str(study)), range(2), moved[1:])).split())
    assert "8 of 8 runs done; still to run: nothing" in text and text.count(" recorded ") == 8
    main(moved)
    assert not list(other.glob("seed*/shared"))
    carried = json.loads((other / "tiny" / "study.json").read_text())
    assert carried["variants"] == report["variants"] and carried["pretrain_curves"] == report["pretrain_curves"]
    assert carried["wall_seconds"] == pytest.approx(report["wall_seconds"])
    # a record of other configs (here: a changed lr) is not taken for the variant's result
    from stepwise.study import load_result
    changed_plan = build_plan(load_study(str(study)), range(2), [*moved[1:], "stage.finetune.lr=3e-5"])
    assert all(load_result(vr) is None for vr in changed_plan)


def test_mean_std_is_the_sample_std():
    from stepwise.study.tables import mean_std, summarize

    mean, std, n = mean_std([0.1, 0.2, 0.4, None])
    assert n == 3 and mean == pytest.approx(0.7 / 3)
    assert std == pytest.approx(math.sqrt(((0.1 - 0.7 / 3) ** 2 + (0.2 - 0.7 / 3) ** 2 + (0.4 - 0.7 / 3) ** 2) / 2))
    assert mean_std([0.3]) == (0.3, None, 1) and mean_std([None]) == (None, None, 0)
    out = summarize({"v": {"per_seed": {"0": {"AP": 0.2, "optimizer_steps": {"pretrain": 9, "finetune": 4}},
                                        "1": {"AP": 0.3, "optimizer_steps": {"pretrain": 9, "finetune": 6}}}}})
    assert out["v"]["mean"]["AP"] == pytest.approx(0.25)
    assert out["v"]["std"]["AP"] == pytest.approx(statistics.stdev([0.2, 0.3]))
    assert out["v"]["mean"]["steps_after_pretrain"] == 5 and out["v"]["n"]["APr"] == 0


def test_builtin_studies_plan_the_shared_prefix(tmp_path):
    from stepwise.study import build_plan, distinct_runs, load_study

    study = load_study("stepwise")
    plan = build_plan(study, range(2), [f"output_root={tmp_path}"])
    rows = {(vr.variant.name, vr.seed): vr for vr in plan}
    assert len(rows) == 2 * len(study.variants) == 38
    for seed in (0, 1):
        runs = [r for r in distinct_runs(plan) if r.seed == seed]
        count = {step: sum(r.step == step for r in runs) for step in ("pretrain", "select", "finetune", "distill")}
        # uniform + RFS pretrain; selections for M = 30, 10, 100 and after the RFS pretrain; finetunes:
        # baseline_plus2, continue, continue_rfs, crt, crt_long, the step-wise one (shared by ft and the distill
        # ablations), w/o RFS, M = 10, M = 100, after the RFS pretrain; distills: kt, stepwise, 3 Table-4 rows,
        # w/o RFS, M = 10, M = 100, lambda_cls x100 with and without SOQ, after the RFS pretrain
        assert count == {"pretrain": 2, "select": 4, "finetune": 10, "distill": 11}
        assert all(r.dir.parent == tmp_path / "stepwise" / f"seed{seed}" / "shared" for r in runs)
        row = {v: rows[(v, seed)].runs for v in study.variants}
        assert row["baseline"]["pretrain"] is row["stepwise"]["pretrain"] is row["crt"]["pretrain"]
        assert row["baseline_rfs"]["pretrain"] is not row["baseline"]["pretrain"]
        assert row["stepwise_rfs"]["pretrain"] is row["baseline_rfs"]["pretrain"]
        assert row["stepwise_rfs"]["select"] is not row["stepwise"]["select"]
        long, first = row["crt_long"]["finetune"].config.stage, row["baseline"]["pretrain"].config.stage
        assert (long.epochs, list(long.lr_drop), long.lr) == (first.epochs, list(first.lr_drop), first.lr)
        assert list(long.trainable) == ["class_embed"] and long.rfs == "generic"
        assert row["ft"]["finetune"] is row["stepwise"]["finetune"] is row["stepwise_no_fm"]["finetune"]
        assert row["stepwise_no_rfs"]["finetune"] is not row["stepwise"]["finetune"]
        assert row["stepwise_m10"]["select"] is not row["stepwise"]["select"]
        assert row["stepwise_cls_x100"]["finetune"] is row["stepwise"]["finetune"]
        cls100 = row["stepwise_cls_x100_no_shared_queries"]["distill"].config.distill
        assert (cls100.lambda_cls, cls100.shared_queries) == (10.0, False)
        kt = row["kt"]["distill"].config.stage
        assert kt.init_from == kt.teacher == str(row["baseline"]["pretrain"].dir)
        cont = row["continue"]["finetune"].config
        assert cont.stage.train_ann == cont.data.train_ann and cont.stage.rfs is None
        assert (cont.stage.epochs, cont.stage.lr, list(cont.stage.lr_drop)) == (3, 2e-4, [2])
        crt = row["crt"]["finetune"].config.stage
        assert (crt.rfs, list(crt.trainable), list(crt.reinit)) == ("generic", ["class_embed"], ["class_embed"])
        assert row["stepwise"]["finetune"].config.seed == seed
        plus2 = row["baseline_plus2"]["finetune"].config.stage  # the convergence check: 2 epochs at the final lr
        assert plus2.init_from == str(row["baseline"]["pretrain"].dir) and plus2.trainable is None
        pre = row["baseline"]["pretrain"].config.stage
        assert plus2.lr == plus2.lr_backbone == pytest.approx(pre.lr * pre.lr_gamma ** len(pre.lr_drop))
        assert (plus2.epochs, plus2.rfs, plus2.train_ann) == (2, None, row["baseline_plus2"]["finetune"].config.data.train_ann)
    assert plan[0].runs["pretrain"].key != [vr for vr in plan if vr.seed == 1][0].runs["pretrain"].key

    heads = build_plan(load_study("heads"), range(1), [f"output_root={tmp_path}", "data.preset=tiny"])
    runs = {vr.variant.name: vr.runs for vr in heads}
    # pool: stepwise: the heads study's runs live in the stepwise study's shared dir, its links in its own
    assert all(r.dir.parent == tmp_path / "stepwise" / "seed0" / "shared" for v in runs.values() for r in v.values())
    assert heads[0].dir == tmp_path / "heads" / "seed0" / "sigmoid_decoupled"  # the headline rows first
    assert len({r["pretrain"].dir for r in runs.values()}) == 7  # 4 heads + 3 lower-loss.ce end-to-end rows
    for head in ("sigmoid", "bags", "hybrid_bags", "bacl"):
        assert runs[head]["pretrain"] is runs[f"{head}_stepwise"]["pretrain"]
        assert runs[f"{head}_stepwise"]["distill"].config.head.name == head
        # the papers' protocol: the sigmoid pretrain, the classifier re-initialised as `head` and trained alone
        decoupled = runs[f"{head}_decoupled"]
        assert decoupled["pretrain"] is runs["sigmoid"]["pretrain"]
        tune = decoupled["finetune"].config
        pre = decoupled["pretrain"].config.stage
        assert (tune.head.name, list(tune.stage.trainable), list(tune.stage.reinit)) == (head, ["class_embed"],
                                                                                        ["class_embed"])
        assert (tune.stage.epochs, tune.stage.lr, list(tune.stage.lr_drop)) == (pre.epochs, pre.lr, list(pre.lr_drop))
        assert tune.stage.train_ann == tune.data.train_ann and tune.stage.rfs is None
    # the investigation rows: the same re-training with one head option changed
    fg_first, all_negatives = runs["bags_decoupled_fg_first"]["finetune"], runs["bacl_decoupled_all_negatives"]["finetune"]
    assert fg_first is not runs["bags_decoupled"]["finetune"] and fg_first.config.head.others == "foreground_first"
    assert all_negatives is not runs["bacl_decoupled"]["finetune"]
    assert all_negatives.config.head.weight_threshold == 0.0
    # the head options at convergence: BAGS's duplicate rules, BACL as the recorded rows trained it
    assert runs["bags_decoupled"]["finetune"].config.head.duplicates == "others"
    assert runs["hybrid_bags_decoupled"]["finetune"].config.head.duplicates == "others"
    assert runs["bags_decoupled_dup_gt_class"]["finetune"].config.head.duplicates == "gt_class"
    assert runs["hybrid_bags_decoupled_dup_gt_class"]["finetune"].config.head.duplicates == "gt_class"
    assert runs["bags_decoupled_dup_exclude"]["finetune"].config.head.duplicates == "exclude"
    plain = runs["bacl_plain_decoupled"]["finetune"].config.head
    assert (plain.name, plain.bg_gamma, plain.fg_gamma, plain.eps) == ("bacl", 0.0, 0.0, 1e-6)
    assert runs["bacl_decoupled"]["finetune"].config.head.fg_gamma == 2.0
    assert all(runs[v]["pretrain"] is runs["sigmoid"]["pretrain"] for v in runs if "_decoupled" in v)
    # end to end with the classification weight lowered: the only change from the head's own pretrain
    for row, head, ce in (("bags_box_balanced", "bags", 0.67), ("bacl_box_balanced", "bacl", 0.33),
                          ("sigmoid_low_ce", "sigmoid", 0.33)):
        balanced, own = runs[row]["pretrain"].config, runs[head]["pretrain"].config
        assert (balanced.head.name, balanced.loss.ce, own.loss.ce) == (head, ce, 2.0)
        assert balanced.loss.bbox == own.loss.bbox and balanced.stage.epochs == own.stage.epochs


def test_an_option_added_at_its_old_behaviour_keeps_the_run_identity(tmp_path):
    """A config saved before ``head.others`` existed and one with its default plan the same run (recorded
    studies stay valid); another value is another run."""
    from stepwise.config import load_config
    from stepwise.study import ADDED_OPTIONS, Variant, plan_variant

    assert ADDED_OPTIONS["head.others"] == "uniform"
    variant = Variant("v", ("pretrain",), ("head=bags",))

    def key(*overrides, drop_others=False):
        cfg = load_config(["stage=all", "head=bags", f"output_root={tmp_path}", "exp=s/seed0/v", *overrides])
        if drop_others:
            OmegaConf.set_struct(cfg, False)
            del cfg.head["others"]
        return plan_variant(tmp_path / "s", variant, 0, {"pretrain": cfg}, {}).runs["pretrain"].key

    assert key() == key(drop_others=True) == key("head.others=uniform")
    assert key("head.others=foreground_first") != key()


def test_study_file_and_argument_errors(tmp_path):
    from stepwise.config import ConfigError
    from stepwise.study import build_plan, load_study, parse_args, parse_seeds

    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("[2, 1]") == [1, 2] and parse_seeds("[0]") == [0]
    for bad in ("0", "-1", "[]", "[1,1]", "[a]", "1,2", "two"):
        with pytest.raises(ConfigError, match=f"seeds={re.escape(bad)}: expected"):
            parse_seeds(bad)

    def study(text: str) -> Path:
        path = tmp_path / "s.yaml"
        path.write_text(text)
        return path

    with pytest.raises(ConfigError, match="unknown keys \\['varaints'\\]"):
        load_study(str(study("varaints: {a: {}}")))
    with pytest.raises(ConfigError, match="cycle a -> b -> a"):
        load_study(str(study("variants: {a: {from: b}, b: {from: a}}")))
    with pytest.raises(ConfigError, match="unknown: \\['train'\\]"):
        load_study(str(study("variants: {a: {steps: [pretrain, train]}}")))
    with pytest.raises(ConfigError, match="no file"):
        load_study("no_such_study")
    # distill reads the finetune directory, but the variant has no finetune step
    bad = load_study(str(study("variants: {a: {steps: [pretrain, select, distill]}}")))
    with pytest.raises(ConfigError, match="step distill reads .*finetune, but finetune is not an earlier step"):
        build_plan(bad, range(1), [f"output_root={tmp_path}"])
    good = load_study(str(study("variants: {a: {steps: [pretrain]}}")))
    keys = [build_plan(good, range(1), [f"output_root={tmp_path}", *extra])[0].runs["pretrain"].key
            for extra in ([], ["stage.pretrain.log_every=5", "stage.pretrain.trackers=[]"], ["stage.pretrain.lr=1e-4"])]
    assert keys[0] == keys[1] != keys[2]  # bookkeeping keys keep a run, a training setting makes a new one
    with pytest.raises(ConfigError, match="variant 'a'.*stage.pretrain.epoch"):
        build_plan(good, range(1), ["stage.pretrain.epoch=3"])
    with pytest.raises(ConfigError, match="seed= is set by the study"):
        parse_args(["study=x", "seed=3"])
    options, overrides = parse_args(["study=x", "seeds=2", "data.preset=tiny"])
    assert options == {"study": "x", "seeds": "2"} and overrides == ["data.preset=tiny"]


def test_seed_reaches_model_init_and_sampler():
    """The root ``seed`` is what the stages hand to model initialisation and to the training loader."""
    import torch

    from stepwise.config import load_config
    from stepwise.engine import TrainSettings
    from stepwise.data.loaders import train_loader

    orders, weights = [], []
    for seed in (0, 1):
        cfg = load_config([f"seed={seed}"])
        settings = TrainSettings.from_config(cfg)
        assert settings.seed == seed
        from accelerate.utils import set_seed  # what make_accelerator does before the model is built
        set_seed(settings.seed)
        weights.append(torch.nn.Linear(4, 4).weight.detach().clone())
        loader = train_loader(list(range(12)), 12, int(cfg.seed), collate=lambda items: items)
        loader.sampler.set_epoch(0)
        orders.append(next(iter(loader)))
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(12)) and orders[0] != orders[1]
    assert not torch.equal(weights[0], weights[1])


def test_a_failed_run_skips_only_the_rows_that_depend_on_it(tmp_path, monkeypatch):
    import stepwise.study.execute as study_mod
    from stepwise.study import build_plan, collect, load_study, run_plan

    path = tmp_path / "s.yaml"
    path.write_text("variants: {a: {steps: [pretrain]}, b: {steps: [pretrain, select, finetune]},\n"
                    "           c: {from: b, overrides: [stage.finetune.lr=1e-5]}, d: {steps: [pretrain],\n"
                    "           overrides: [data.rfs_threshold=0.001]}}")
    plan = build_plan(load_study(str(path)), range(1), [f"output_root={tmp_path}"])
    ran = []

    class State:
        is_main_process, num_processes = True, 1
        print = staticmethod(lambda *a: None)
        wait_for_everyone = staticmethod(lambda: None)

    def fake_run_step(run, state):
        if run.step == "select":
            raise RuntimeError("scoring broke")
        ran.append(run.key)

    monkeypatch.setattr(study_mod, "run_step", fake_run_step)
    failed = run_plan(plan, State())
    rows = {vr.variant.name: vr.runs for vr in plan}
    select = rows["b"]["select"].dir
    assert list(failed) == [select] and "RuntimeError: scoring broke" in failed[select]
    # the shared pretrain ran once, the other pretrain too; no finetune ran after the failed selection
    assert ran == [rows["a"]["pretrain"].key, rows["d"]["pretrain"].key]
    assert (tmp_path / "s" / "seed0" / "c" / "variant.json").is_file()
    _, _, pending, _ = collect(plan, failed)
    assert any(p.startswith("c seed 0:") and "FAILED (RuntimeError: scoring broke)" in p for p in pending)


def test_an_interrupted_step_still_adds_its_wall_time(tmp_path, monkeypatch):
    import stepwise.stages.pretrain as pretrain
    from stepwise.study import build_plan, load_study, run_step, run_threads, wall_seconds

    path = tmp_path / "s.yaml"
    path.write_text("variants: {a: {steps: [pretrain]}}")
    run = build_plan(load_study(str(path)), range(1), [f"output_root={tmp_path}"])[0].runs["pretrain"]

    class State:
        is_main_process, num_processes = True, 1
        print = staticmethod(lambda *a: None)
        wait_for_everyone = staticmethod(lambda: None)

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_step(run, State())
    first = wall_seconds(run.dir)
    assert first is not None and first > 0
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # a resumed session with another thread count: both are recorded
    try:
        with pytest.raises(KeyboardInterrupt):
            run_step(run, State())
    finally:
        torch.set_num_threads(threads)
    assert wall_seconds(run.dir) > first  # summed over the sessions
    assert run_threads(run.dir) == [threads, threads + 1]


def test_eval_curve_reads_every_evaluation_and_keeps_the_last_of_a_repeated_one(tmp_path):
    from stepwise.study.tables import curve_table
    from stepwise.study import eval_curve

    records = [{"type": "start", "epoch": 0, "step_in_epoch": 0},
               {"type": "eval", "tag": "epoch_1", "epoch": 1, "step_in_epoch": 0, "metrics": {"AP": 0.1, "APr": 0.0}},
               {"type": "train", "epoch": 1, "step_in_epoch": 20},
               {"type": "eval", "tag": "epoch_2", "epoch": 2, "step_in_epoch": 0, "metrics": {"AP": 0.2, "APr": 0.1}},
               {"type": "eval", "tag": "epoch_2", "epoch": 2, "step_in_epoch": 0, "metrics": {"AP": 0.25, "APr": 0.1}},
               {"type": "eval", "tag": "final", "epoch": 3, "step_in_epoch": 0, "metrics": {"AP": 0.3, "APr": None}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curve = eval_curve(tmp_path)
    assert [(p["epoch"], p["metrics"]["AP"]) for p in curve] == [(1, 0.1), (2, 0.25), (3, 0.3)]
    other = [{"epoch": 1, "metrics": {"AP": 0.3, "APr": 0.2}}]
    rows = curve_table({"baseline": {"0": curve, "1": other}})
    assert rows[0] == "| epoch | baseline AP | baseline APr |"
    assert rows[2] == f"| 1 | 20.0 ± {100 * statistics.stdev([0.1, 0.3]):.1f} | 10.0 ± {100 * statistics.stdev([0.0, 0.2]):.1f} |"
    assert rows[4] == "| 3 | 30.0 | - |"


def test_pool_keeps_runs_in_another_studys_shared_dir(tmp_path):
    """``pool: <study>``: equal runs of two studies are one run dir (trained once); links and report stay apart."""
    from stepwise.config import ConfigError
    from stepwise.study import build_plan, load_study

    first = load_study(str(write_tiny_study(tmp_path / "tiny.yaml")))
    text = (tmp_path / "tiny.yaml").read_text().replace("variants:\n", "pool: tiny\nvariants:\n", 1)
    (tmp_path / "other.yaml").write_text(text.replace("ft_low_lr", "ft_high_lr").replace("lr=1e-5", "lr=1e-3"))
    second = load_study(str(tmp_path / "other.yaml"))
    assert second.pool == "tiny" and first.pool is None
    args = [f"output_root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}"]
    plan_a, plan_b = build_plan(first, [0], args), build_plan(second, [0], args)
    runs_a = {vr.variant.name: vr for vr in plan_a}
    runs_b = {vr.variant.name: vr for vr in plan_b}
    for step in ("pretrain", "select", "finetune"):  # the same variant: the same run dirs
        assert runs_b["ft"].runs[step].dir == runs_a["ft"].runs[step].dir
        assert runs_a["ft"].runs[step].dir.parent == tmp_path / "runs" / "tiny" / "seed0" / "shared"
    assert runs_b["ft_high_lr"].runs["finetune"].dir.parent == tmp_path / "runs" / "tiny" / "seed0" / "shared"
    assert runs_b["ft_high_lr"].runs["finetune"].dir != runs_a["ft_low_lr"].runs["finetune"].dir
    assert runs_b["ft"].dir == tmp_path / "runs" / "other" / "seed0" / "ft"  # links and report: its own dir
    # a record of the pool's variant with the same runs is this row's result (run dirs gone or not)
    from stepwise.study import RESULT_NAME, load_result, run_keys
    assert load_result(runs_b["ft"]) is None
    record = {"variant": "ft", "seed": 0, "runs": run_keys(runs_a["ft"]), "metrics": {"AP": 0.5}, "per_class": None,
              "wall_seconds": {}, "optimizer_steps": {}, "curves": {}}
    (runs_a["ft"].dir).mkdir(parents=True)
    (runs_a["ft"].dir / RESULT_NAME).write_text(json.dumps(record))
    assert load_result(runs_b["ft"]) == record and load_result(runs_a["ft"]) == record
    assert load_result(runs_b["ft_high_lr"]) is None  # other runs: no record
    (tmp_path / "bad.yaml").write_text(text.replace("pool: tiny", "pool: ../elsewhere"))
    with pytest.raises(ConfigError, match="pool must be the name of a study directory"):
        load_study(str(tmp_path / "bad.yaml"))


def test_paired_differences_are_per_seed_differences():
    from stepwise.study.tables import paired_differences, paired_table, summarize

    results = {"baseline": {"per_seed": {"0": {"AP": 0.50, "APr": 0.30}, "1": {"AP": 0.60, "APr": 0.40},
                                         "2": {"AP": 0.70, "APr": 0.50}}},
               "method": {"per_seed": {"0": {"AP": 0.52, "APr": 0.35}, "1": {"AP": 0.63, "APr": 0.44},
                                       "2": {"AP": 0.71, "APr": None}}},
               "late": {"per_seed": {"1": {"AP": 0.55, "APr": 0.40}}}}
    summary = summarize(results)
    diffs = paired_differences(summary, "baseline", ("AP", "APr"))
    mean, std, n = diffs["method"]["AP"]
    assert n == 3 and mean == pytest.approx(0.02) and std == pytest.approx(statistics.stdev([0.02, 0.03, 0.01]))
    assert diffs["method"]["APr"][0] == pytest.approx(0.045) and diffs["method"]["APr"][2] == 2  # seed 2 has no APr
    assert diffs["late"]["AP"] == (pytest.approx(-0.05), None, 1)
    rows = paired_table(summary, "baseline", ("AP", "APr"))
    assert rows[2] == "| method | 3 | +2.0 ± 1.0 | +4.5 ± 0.7 |"  # 2.0 = 2 x 1.0: not marked
    assert rows[3] == "| late | 1 | -5.0 | +0.0 |"


def test_study_plot_middle_panel_shows_the_paired_differences(tmp_path, monkeypatch):
    """study.png's middle panel: per variant, bars at the mean same-seed difference to the reference and a dot
    per seed; no such panel without a reference."""
    import stepwise.study.tables as report

    results = {"baseline": {"per_seed": {"0": {"AP": 0.50, "APr": 0.30}, "1": {"AP": 0.60, "APr": 0.40}}},
               "method": {"per_seed": {"0": {"AP": 0.52, "APr": 0.35}, "1": {"AP": 0.63, "APr": 0.44}}}}
    summary = report.summarize(results)
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, out: figures.append(fig) or Path(out))
    report.plot_study(summary, {}, tmp_path / "a.png", metrics=("AP", "APr"), reference="baseline")
    report.plot_study(summary, {}, tmp_path / "b.png", metrics=("AP", "APr"))
    with_reference, without = figures
    assert len(with_reference.axes) == 3 and len(without.axes) == 2
    middle = with_reference.axes[1]
    heights = [patch.get_height() for patch in middle.patches]
    assert heights == pytest.approx([2.5, 4.5])  # AP: (2 + 3) / 2, APr: (5 + 4) / 2 points
    dots = sorted(y for line in middle.lines if line.get_marker() == "o" for y in line.get_ydata())
    assert dots == pytest.approx([2.0, 3.0, 4.0, 5.0])
    assert [t.get_text() for t in middle.get_xticklabels()] == ["method"]


class _State:
    is_main_process, num_processes = True, 1
    print = staticmethod(lambda *a: None)
    wait_for_everyone = staticmethod(lambda: None)


class _FakeProcess:
    """A job process that ends at its first poll: writes the step's outputs (exit 0) or a traceback (exit 1)."""

    def __init__(self, run, log, fail, events):
        self.run, self.log, self.fail, self.events, self.code = run, log, fail, events, None
        self.signals, self.killed = [], False

    def poll(self):
        if self.code is None:
            from stepwise.stages import stage_outputs

            self.events.append(("end", self.run.key))
            if self.fail:
                self.log.write_text("Traceback ...\nRuntimeError: scoring broke\n")
                self.code = 1
            else:
                for name in stage_outputs(self.run.step):
                    (self.run.dir / name).parent.mkdir(parents=True, exist_ok=True)
                    (self.run.dir / name).write_text("{}")
                self.code = 0
        return self.code

    def send_signal(self, sig):
        self.signals.append(sig)

    def wait(self, timeout=None):
        return self.code

    def kill(self):
        self.killed = True


def _four_variant_plan(tmp_path):
    from stepwise.study import build_plan, load_study

    path = tmp_path / "s.yaml"
    path.write_text("variants: {a: {steps: [pretrain]}, b: {steps: [pretrain, select, finetune]},\n"
                    "           c: {from: b, overrides: [stage.finetune.lr=1e-5]}, d: {steps: [pretrain],\n"
                    "           overrides: [data.rfs_threshold=0.001]}, e: {steps: [pretrain, finetune],\n"
                    "           overrides: ['stage.finetune.train_ann=${data.train_ann}']}}")
    return build_plan(load_study(str(path)), range(1), [f"output_root={tmp_path}", f"data.root={tmp_path / 'd'}"])


def test_jobs_start_runs_when_their_inputs_finish_and_skip_what_follows_a_failure(tmp_path, monkeypatch):
    import stepwise.study.pool as study_mod
    from stepwise.study import Job, run_plan_jobs

    plan = _four_variant_plan(tmp_path)
    rows = {vr.variant.name: vr.runs for vr in plan}
    events, recorded = [], []
    monkeypatch.setattr(study_mod, "ensure_plan_data", lambda plan: None)
    monkeypatch.setattr(study_mod, "record_result", lambda vr: recorded.append(vr.variant.name))

    def launch(run, slot, threads, devices):
        running = sum(1 for kind, _ in events if kind == "start") - sum(1 for kind, _ in events if kind == "end")
        assert running < 2 and threads == 3 and devices == ()
        events.append(("start", run.key))
        log = tmp_path / f"{run.key}.log"
        return Job(run, _FakeProcess(run, log, run.step == "select", events), log)

    failed = run_plan_jobs(plan, _State(), jobs=2, threads=3, launch=launch, poll_s=0)
    started = [key for kind, key in events if kind == "start"]
    # the two pretrains first, side by side; then the selection and e's finetune; nothing after the selection
    assert started[:2] == [rows["a"]["pretrain"].key, rows["d"]["pretrain"].key]
    assert set(started[2:]) == {rows["b"]["select"].key, rows["e"]["finetune"].key} and len(started) == 4
    assert events.index(("start", rows["e"]["finetune"].key)) > events.index(("end", rows["a"]["pretrain"].key))
    select = rows["b"]["select"].dir
    assert list(failed) == [select] and "RuntimeError: scoring broke" in failed[select]
    assert sorted(recorded) == ["a", "d", "e"]
    # a second call starts only what is not done: the selection again (and, were it to pass, the finetunes)
    events.clear()
    run_plan_jobs(plan, _State(), jobs=2, threads=3, launch=launch, poll_s=0)
    assert [key for kind, key in events if kind == "start"] == [rows["b"]["select"].key]


def test_jobs_are_stopped_when_the_study_is_interrupted(tmp_path, monkeypatch):
    import signal

    import stepwise.study.pool as study_mod
    from stepwise.study import Job, run_plan_jobs

    plan = _four_variant_plan(tmp_path)
    processes = []
    monkeypatch.setattr(study_mod, "ensure_plan_data", lambda plan: None)

    class Endless(_FakeProcess):
        def poll(self):
            return None

    def launch(run, slot, threads, devices):
        processes.append(Endless(run, tmp_path / "log", False, []))
        return Job(run, processes[-1], tmp_path / "log")

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(study_mod.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_plan_jobs(plan, _State(), jobs=2, threads=1, launch=launch)
    assert len(processes) == 2 and all(p.signals == [signal.SIGTERM] and p.killed for p in processes)


def test_job_env_gives_each_slot_its_threads_and_gpu(monkeypatch):
    from stepwise.config import ConfigError
    from stepwise.study import job_env, parse_jobs

    env = job_env(1, 3, ["4", "7"])
    assert env["OMP_NUM_THREADS"] == "3" and env["MKL_NUM_THREADS"] == "3" and env["CUDA_VISIBLE_DEVICES"] == "7"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert "CUDA_VISIBLE_DEVICES" not in job_env(0, 1, [])
    assert parse_jobs("2") == 2
    for bad in ("0", "-1", "two"):
        with pytest.raises(ConfigError, match="jobs="):
            parse_jobs(bad)


def test_study_with_two_jobs_runs_each_step_in_its_own_process(tmp_path):
    from stepwise.study import main

    study = write_tiny_study(tmp_path / "tiny.yaml")
    args = [f"study={study}", "seeds=[1]", "jobs=2", f"output_root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}"]
    summary = main(args)
    seed = tmp_path / "runs" / "tiny" / "seed1"
    shared = sorted(p.name for p in (seed / "shared").iterdir())
    assert [name.split("-")[0] for name in shared] == ["finetune", "finetune", "pretrain", "select"]
    assert sorted(p.name for p in (seed / "logs").glob("*.log")) == [f"{name}.log" for name in shared]
    pretrain_log = (seed / "logs" / f"{shared[2]}.log").read_text()
    assert "stepwise: study: pretrain-" in pretrain_log  # the step ran in the job's process, output in its log
    for variant in ("ft", "ft_low_lr"):
        record = json.loads((seed / variant / "result.json").read_text())
        metrics = json.loads((seed / variant / "finetune" / "eval" / "metrics.json").read_text())
        assert record["metrics"] == metrics and summary[variant]["per_seed"]["1"]["AP"] == metrics["AP"]
        assert all(v is not None for v in record["wall_seconds"].values())
    config = (seed / "ft" / "finetune" / "config.yaml").read_text()
    assert f"init_from: {(seed / 'ft' / 'pretrain').resolve()}" in config
    before = outputs(tmp_path / "runs")
    main(args)  # a re-run trains nothing
    assert outputs(tmp_path / "runs") == before


def test_a_terminated_study_stops_its_jobs_and_keeps_their_wall_time(tmp_path):
    """SIGTERM to a jobs=2 study started the nohup way (SIGINT ignored): its job processes end, having written
    their wall time, and the step resumes from its checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    study = write_tiny_study(tmp_path / "tiny.yaml")
    cmd = [sys.executable, "-m", "stepwise.study", f"study={study}", "seeds=[0]", "jobs=2",
           f"output_root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", "stage.pretrain.max_steps=100000",
           "stage.pretrain.epochs=1000"]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    shared = tmp_path / "runs" / "tiny" / "seed0" / "shared"
    deadline = time.monotonic() + 240
    while not list(shared.glob("pretrain-*/checkpoints/step_*.pt")):
        assert parent.poll() is None and time.monotonic() < deadline, "the pretrain job never checkpointed"
        time.sleep(0.5)
    spec = next((shared.parent / "logs").glob("pretrain-*.yaml"))
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=120) != 0

    def alive() -> list[str]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if str(spec).encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                    found.append(pid)
            except OSError:
                pass
        return found

    assert alive() == []
    run = next(shared.glob("pretrain-*"))
    assert json.loads((run / "wall_time.json").read_text())["seconds"] > 0
    from stepwise.study import build_plan, load_study, plan_text
    overrides = cmd[6:]
    text = plan_text(load_study(str(study)), build_plan(load_study(str(study)), [0], overrides))
    assert re.search(rf"{run.name}\s+resumes at step \d+", text)


def test_step_overrides_retrain_a_new_head_type_on_a_shared_sigmoid_pretrain(tmp_path):
    """``step_overrides``: the heads study's decoupled rows (sigmoid pretrain shared, finetune with another
    head): the pretrain is one run, the finetune builds a BAGS classifier, loads everything else from the
    sigmoid checkpoint, trains only the classifier, and the row is recorded."""
    import torch

    from stepwise.config import ConfigError
    from stepwise.study import build_plan, load_study, main

    text = write_tiny_study(tmp_path / "tiny.yaml").read_text()
    variants = """variants:
  sig:
    steps: [pretrain]
  sig_decoupled:
    steps: [pretrain, finetune]
    overrides:
      - stage.finetune.train_ann=${data.train_ann}
      - stage.finetune.rfs=null
      - "stage.finetune.trainable=[class_embed]"
      - "stage.finetune.reinit=[class_embed]"
  bags_decoupled:
    from: sig_decoupled
    step_overrides: {finetune: [head=bags, head.beta=4]}
"""
    path = tmp_path / "heads.yaml"
    path.write_text(text[:text.index("plot:")] + "plot: [sig]\n" + variants)
    study = load_study(str(path))
    assert study.variants["bags_decoupled"].step_overrides == {"finetune": ("head=bags", "head.beta=4")}
    assert study.variants["sig_decoupled"].step_overrides == {}
    args = [f"output_root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}"]
    rows = {vr.variant.name: vr.runs for vr in build_plan(study, [0], args)}
    assert rows["sig"]["pretrain"] is rows["sig_decoupled"]["pretrain"] is rows["bags_decoupled"]["pretrain"]
    assert rows["bags_decoupled"]["pretrain"].config.head.name == "sigmoid"
    finetune = rows["bags_decoupled"]["finetune"].config
    assert (finetune.head.name, finetune.head.beta) == ("bags", 4)
    assert rows["sig_decoupled"]["finetune"] is not rows["bags_decoupled"]["finetune"]
    assert rows["sig_decoupled"]["finetune"].config.head.name == "sigmoid"

    main([f"study={path}", "seeds=1", *args])
    pre = torch.load(rows["sig"]["pretrain"].dir / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    post = torch.load(rows["bags_decoupled"]["finetune"].dir / "checkpoint_final.pt", map_location="cpu",
                      weights_only=False)
    weights = [k for k in pre["model"] if k.startswith("class_embed.") and k.endswith("weight")]
    num_classes = pre["model"][weights[0]].shape[0]  # sigmoid: C rows; BAGS: C + 4 groups' "others" + G0's 2
    assert weights and all(post["model"][k].shape[0] == num_classes + 4 + 2 for k in weights)
    rest = [k for k in pre["model"] if not k.startswith("class_embed.") and k in post["model"]]  # frozen BN
    assert len(rest) > 0.9 * len([k for k in pre["model"] if not k.startswith("class_embed.")])  # keeps no counter
    assert rest and all(torch.equal(pre["model"][k], post["model"][k]) for k in rest)  # only the classifier trained
    report = json.loads((tmp_path / "runs" / "heads" / "study.json").read_text())
    assert report["pending"] == [] and set(report["variants"]) == {"sig", "sig_decoupled", "bags_decoupled"}
    assert report["variants"]["bags_decoupled"]["step_overrides"] == {"finetune": ["head=bags", "head.beta=4"]}

    path.write_text(path.read_text().replace("step_overrides: {finetune:", "step_overrides: {tune:"))
    with pytest.raises(ConfigError, match="step_overrides: expected a mapping from steps"):
        load_study(str(path))


def test_committed_records_keep_their_identities(tmp_path):
    """Every record committed under docs/figures/study/records is still the run the study plans: options added
    since (study.ADDED_OPTIONS) stay out of the identity at their old behaviour. Rows whose head now defaults to
    another behaviour plan new runs; their recorded configs are planned by the rows that pin the old one
    (bacl_plain_decoupled: head=bacl_plain). BAGS's duplicate rule went gt_class -> others, the earlier rule
    again: the shape proxy's BAGS records are the default rows' runs, and the emoji benchmark's gt_class
    records are the `*_dup_gt_class` rows'."""
    from stepwise.study import build_plan, load_study

    records = Path(__file__).resolve().parents[1] / "docs" / "figures" / "study" / "records"
    # rows whose head options changed defaults (BACL's loss form and public-code settings)
    changed = {"bacl", "bacl_stepwise", "bacl_decoupled", "bacl_decoupled_all_negatives"}
    pinned = {"bacl_decoupled": "bacl_plain_decoupled"}
    checked = 0
    # (records directory, study, command-line overrides): the shape proxy's and the emoji benchmark's studies
    studies = [("stepwise", "stepwise", []), ("heads", "heads", []),
               ("stepwise_emoji", "stepwise", ["recipe=emoji_study"]), ("heads_emoji", "heads", ["recipe=emoji_study"])]
    for name, study, overrides in studies:
        plan = build_plan(load_study(study), [0, 1, 2], [f"output_root={tmp_path}", *overrides])
        keys = {(vr.seed, vr.variant.name): {step: run.key for step, run in vr.runs.items()} for vr in plan}
        for path in sorted((records / name).glob("seed*/*/result.json")):
            record = json.loads(path.read_text())
            row = (record["seed"], record["variant"])
            if name == "heads" and record["variant"] in changed:
                assert record["runs"] != keys[row], path
                if record["variant"] in pinned:
                    assert record["runs"] == keys[(record["seed"], pinned[record["variant"]])], path
            else:
                assert record["runs"] == keys[row], path
            checked += 1
    assert checked >= 51 + 30 + 17 * 3 + 7 * 3  # shape proxy; emoji study=stepwise, study=heads


def test_pool_on_the_command_line_replaces_the_files(tmp_path, capsys, monkeypatch):
    """``pool=<study>`` (e.g. study=heads on another data set's study=stepwise runs) acts as the file's ``pool:``:
    the runs live in that study's shared directory."""
    import stepwise.study.command as command

    planned = []

    def build_plan(study, *args, **kwargs):
        planned.append(command.build_plan.__wrapped__(study, *args, **kwargs))
        return planned[-1]

    build_plan.__wrapped__ = command.build_plan
    monkeypatch.setattr(command, "build_plan", build_plan)
    write_tiny_study(tmp_path / "tiny.yaml")
    args = [f"study={tmp_path / 'tiny.yaml'}", "seeds=1", f"output_root={tmp_path / 'runs'}",
            f"data.root={tmp_path / 'data'}", "dry_run=true", "name=other"]
    assert command.main([*args, "pool=tiny"]) is None
    shared = tmp_path / "runs" / "tiny" / "seed0" / "shared"
    assert planned and all(run.dir.parent == shared for vr in planned[0] for run in vr.runs.values())
    assert command.main(args) is None  # without pool=: its own directory
    assert all(run.dir.parent == tmp_path / "runs" / "other" / "seed0" / "shared"
               for vr in planned[1] for run in vr.runs.values())
    with pytest.raises(SystemExit) as exit_info:
        command.main([*args, "pool=../elsewhere"])
    assert exit_info.value.code == 2
    assert "pool= must be the name of a study directory" in capsys.readouterr().err
