"""Records a study reads back are checked against their schema when read (each error names the file and the
field, one line, exit 2; never taken for a missing record); the selection's part files are written
atomically; the one-line data errors of ``stepwise.run``; the divergence message when the norm overflowed."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

STUDY = "seeds: 1\nvariants:\n  a: {steps: [pretrain]}\n  b: {steps: [pretrain], overrides: [stage.pretrain.lr=1e-5]}\n"


def good_record(vr) -> dict:
    from stepwise.study import run_keys

    return {"variant": vr.variant.name, "seed": vr.seed, "runs": run_keys(vr),
            "metrics": {"AP": 0.5, "APr": None, "meta": {"evaluator": "x"}},
            "per_class": [{"id": "1", "name": "c", "train_instances": 3, "ap": 0.25}],
            "wall_seconds": {"pretrain": 12.5}, "optimizer_steps": {"pretrain": 2},
            "curves": {"pretrain": [{"epoch": 1, "metrics": {"AP": 0.5}}]}}


@pytest.fixture
def study(tmp_path):
    from stepwise.study import build_plan, load_study

    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    args = [f"output_root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}"]
    plan = build_plan(load_study(str(path)), [0], args)
    return SimpleNamespace(path=path, args=args, plan=plan, record=plan[0].dir / "result.json")


def broken(record: dict, case: str) -> dict | str:
    record = json.loads(json.dumps(record))
    if case == "no metrics":
        del record["metrics"]
    elif case == "AP not a number":
        record["metrics"]["AP"] = "0.5 (n/a)"
    elif case == "negative wall time":
        record["wall_seconds"]["pretrain"] = -3
    elif case == "unknown step":
        record["runs"]["pretrian"] = "pretrain-0"
    elif case == "curve without epoch":
        del record["curves"]["pretrain"][0]["epoch"]
    elif case == "empty object":
        return "{}"
    elif case == "truncated":
        return json.dumps(record)[:40]
    return json.dumps(record)


CASES = {"no metrics": "field metrics: missing", "AP not a number": "field metrics.AP: expected `float | null`, got `str`",
         "negative wall time": "field wall_seconds.pretrain: expected `float` >= 0.0",
         "unknown step": "field runs.pretrian: unknown key", "curve without epoch": "field curves.pretrain[0].epoch: missing",
         "empty object": "field variant: missing", "truncated": "is not valid JSON"}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_result_record_is_named_with_its_field_in_one_line_and_exit_2(study, case, capsys):
    from stepwise.study import load_result, main

    assert load_result(study.plan[0]) is None
    study.record.parent.mkdir(parents=True)
    study.record.write_text(json.dumps(good_record(study.plan[0])))
    assert load_result(study.plan[0])["metrics"]["AP"] == 0.5  # a good record is the row's result
    study.record.write_text(broken(good_record(study.plan[0]), case))
    for options in (["dry_run=true"], ["report=true"], []):  # the plan listing, the report and a run all read it
        with pytest.raises(SystemExit) as exit_info:
            main([f"study={study.path}", *options, *study.args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"stepwise: study: {study.record}: ")
        assert CASES[case] in err, err
    assert not list(study.plan[0].runs["pretrain"].dir.parent.glob("*/checkpoints"))  # nothing was trained


def test_another_variants_bad_record_is_an_error_not_a_missing_record(study):
    from stepwise.study import load_result
    from stepwise.study.records import RecordError

    other = study.plan[1].dir / "result.json"  # b's record, which a's lookup reads too (same seed directory)
    other.parent.mkdir(parents=True)
    other.write_text("{}")
    with pytest.raises(RecordError, match=f"{other}: study result record: field variant: missing"):
        load_result(study.plan[0])


def test_the_written_record_has_the_schema_read_back(study, tmp_path):
    from stepwise.study import record_result
    from stepwise.study.records import RecordError, read_result

    vr = study.plan[0]
    run = vr.runs["pretrain"].dir
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(json.dumps({"AP": 0.4, "AP50": 0.6, "meta": {}, "warnings": []}))
    (run / "eval" / "per_class.csv").write_text("id,name,frequency,train_instances,bin,ap\n1,c,r,3,1,0.25\n2,d,f,9,1,\n")
    (run / "metrics.jsonl").write_text(
        '{"type": "train", "global_step": 2}\n{"type": "eval", "epoch": 1, "step_in_epoch": 0, "global_step": 2, '
        '"metrics": {"AP": 0.4}}\n{"type": "tr')  # the last line cut by a kill: skipped
    (run / "wall_time.json").write_text('{"seconds": 3.5, "threads": [1]}')
    record = record_result(vr)
    assert read_result(vr.dir / "result.json") == record
    assert record["optimizer_steps"] == {"pretrain": 2} and record["per_class"][1]["ap"] is None
    (run / "eval" / "metrics.json").write_text(json.dumps({"AP": "0.4"}))
    with pytest.raises(RecordError, match=r"eval/metrics.json: evaluation metrics: field AP: expected `float \| null`"):
        record_result(vr)
    (run / "eval" / "metrics.json").write_text(json.dumps({"AP": 0.4}))
    (run / "wall_time.json").write_text('{"secs": 3.5}')
    with pytest.raises(RecordError, match="wall_time.json: wall-time record: field seconds: missing"):
        record_result(vr)
    (run / "wall_time.json").write_text('{"seconds": 3.5}')
    (run / "metrics.jsonl").write_text('{"type": "eval", "epoch": 1}\n')
    with pytest.raises(RecordError, match=r"metrics.jsonl: training log: line 1 \(an evaluation\): field metrics: missing"):
        record_result(vr)
    (run / "metrics.jsonl").write_text('{"type": "tr\n{"type": "train", "global_step": 2}\n')
    with pytest.raises(RecordError, match="metrics.jsonl: training log: line 1 is not valid JSON"):
        record_result(vr)


def test_the_shipped_records_fit_the_schema():
    from stepwise.study.records import read_result

    records = sorted((Path(__file__).resolve().parents[1] / "docs" / "figures" / "study" / "records").rglob("result.json"))
    assert records and all(read_result(path)["runs"] for path in records)


def test_summarize_names_a_value_that_is_not_a_number():
    from stepwise.study.tables import summarize

    with pytest.raises(ValueError, match=r"variant 'a', seed 1: AP is '0.5', not a number"):
        summarize({"a": {"per_seed": {"0": {"AP": 0.4}, "1": {"AP": "0.5"}}}})


# --------------------------------------------------------------------------- selection: atomic part files
def _scoring(monkeypatch, tmp_path, batches):
    """stages.select.score_dataset with its model and data stubbed: ``batches`` (lists of records, or an
    exception to raise) stand for what each process's scoring yields."""
    import stepwise.stages.select as select

    trained = SimpleNamespace(model=None, path="ckpt", categories=SimpleNamespace(ids=(1,)))
    monkeypatch.setattr(select, "load_trained_model", lambda *a, **k: trained)
    monkeypatch.setattr(select, "build_dataset", lambda *a, **k: None)
    monkeypatch.setattr(select, "build_eval_loader", lambda *a, **k: SimpleNamespace(dataset=[0, 1]))
    monkeypatch.setattr(select, "build_matcher", lambda *a, **k: None)

    def shard(*args, **kwargs):
        for batch in batches:
            if isinstance(batch, BaseException):
                raise batch
            yield batch

    monkeypatch.setattr(select, "shard_predictions", shard)
    accelerator = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, device="cpu",
                                  print=lambda *a: None, wait_for_everyone=lambda: None)
    cfg = SimpleNamespace(checkpoint="ckpt", stage=SimpleNamespace(checkpoint=None, batch_size=1, max_images=None),
                          data=None, loss=None)
    return lambda: select.score_dataset(cfg, accelerator, tmp_path / "scores.jsonl")


def test_a_killed_scoring_leaves_no_part_file(tmp_path, monkeypatch):
    records = [{"ann_id": 7, "score": 0.5}, {"ann_id": 3, "score": 0.25}]
    score = _scoring(monkeypatch, tmp_path, [records[:1], KeyboardInterrupt()])
    with pytest.raises(KeyboardInterrupt):
        score()
    assert list(tmp_path.iterdir()) == []  # neither a half-written part nor its temporary file
    _scoring(monkeypatch, tmp_path, [records[:1], records[1:]])()
    assert [json.loads(line)["ann_id"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()] == [3, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.jsonl"]


def test_a_bad_part_file_is_named(tmp_path):
    from stepwise.stages.select import merge_parts

    parts = [tmp_path / "scores.part0.jsonl", tmp_path / "scores.part1.jsonl"]
    parts[0].write_text('{"ann_id": 1}\n')
    with pytest.raises(FileNotFoundError, match=f"score part file {parts[1]} not found"):
        merge_parts(parts, tmp_path / "scores.jsonl")
    parts[1].write_text('{"ann_id": 2}\n{"ann_')
    with pytest.raises(ValueError, match=f"score part file {parts[1]}: line 2 is not a score record"):
        merge_parts(parts, tmp_path / "scores.jsonl")
    assert not (tmp_path / "scores.jsonl").exists()


# ------------------------------------------------------------------------------- one-line errors, messages
def test_data_errors_are_one_line_without_traceback(tmp_path, capsys, monkeypatch):
    from stepwise.run import main

    args = ["data=lvis_v1", f"data.root={tmp_path / 'nowhere'}", f"output_root={tmp_path / 'runs'}", "exp=e"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("stepwise: pretrain: ") and "not found" in err and str(tmp_path / "nowhere") in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    monkeypatch.setenv("STEPWISE_TRACEBACK", "1")  # developers: the exception itself, with its traceback
    with pytest.raises(OSError, match="not found"):
        main(args)


def test_the_divergence_message_names_an_overflowed_norm():
    from stepwise.utils.finite import first_non_finite, norm_overflow

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[1].weight.grad.fill_(1e30)  # finite, but its square is not
    grads = [(n, p.grad) for n, p in model.named_parameters()]
    norm = float(torch.nn.utils.get_total_norm([g for _, g in grads]))
    assert norm == float("inf") and first_non_finite(grads) is None
    text = norm_overflow(norm, grads)
    assert text == ("gradient norm inf: the total norm overflowed, no single gradient holds NaN/inf (largest "
                    "gradient element 1e+30, in parameter '1.weight')")


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_training_stops_naming_the_overflowed_norm(tmp_path, clip):
    """Finite gradients whose total norm overflows float32: the stop says so (it said "first non-finite
    gradient in parameter None")."""
    from test_engine import ToyCriterion, make_trainer

    from stepwise.engine import NonFiniteStateError

    class Huge(ToyCriterion):
        def __call__(self, outputs, targets):
            losses = super().__call__(outputs, targets)
            if self.calls == 8:
                losses["loss_l1"] = losses["loss_l1"] * 1e30  # finite loss and gradients, norm beyond float32
            return losses

    trainer = make_trainer(tmp_path, Huge(), checkpoint_every_steps=2, clip_max_norm=clip)
    with pytest.raises(NonFiniteStateError, match=r"optimizer step 8\): (process 0: )?gradient norm inf: the total norm overflowed, "
                                                  r"no single gradient holds NaN/inf") as err:
        trainer.fit()
    assert "parameter None" not in str(err.value)


def test_jobs_above_the_usable_cpus_warn_once(study, monkeypatch, capsys):
    import stepwise.study.command as study_mod

    monkeypatch.setattr(study_mod, "available_cpus", lambda: 2)
    monkeypatch.setattr(study_mod, "run_plan_jobs", lambda plan, state, jobs, threads, devices: {})

    def report(study, plan, out_dir, command="", failed=None):
        (out_dir / "study.md").write_text("report\n")

    monkeypatch.setattr(study_mod, "write_report", report)
    for jobs, warnings in ((2, 0), (3, 1)):
        study_mod.main([f"study={study.path}", f"jobs={jobs}", *study.args])
        lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert len(lines) == warnings
    assert lines == ["stepwise: study: warning: jobs=3 but 2 CPU(s) usable here: each job gets 1 thread and they "
                     "take turns on the cores, each run slower than with jobs=2"]
