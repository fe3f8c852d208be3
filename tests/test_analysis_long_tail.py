"""stepwise.analysis.long_tail: the long-tail criteria read from run directories' evaluations."""

import json

import pytest

from stepwise.analysis import long_tail as L


def _run(tmp_path, name, per_epoch, classes=(("a", "r", 3), ("b", "f", 300))):
    """A run directory with eval/epoch_NNN/{metrics.json, per_class.csv} for each (epoch -> AP, APr, APf)."""
    run = tmp_path / name
    for epoch, (ap, apr, apf) in per_epoch.items():
        d = run / "eval" / f"epoch_{epoch:03d}"
        d.mkdir(parents=True)
        d.joinpath("metrics.json").write_text(json.dumps({"AP": ap, "APr": apr, "APc": ap, "APf": apf}))
        rows = "".join(f"{i},{n},{f},{k},0,{apr if f == 'r' else apf}\n" for i, (n, f, k) in enumerate(classes, 1))
        d.joinpath("per_class.csv").write_text("id,name,frequency,train_instances,bin,ap\n" + rows)
    return run


def test_criteria_pass_and_fail(tmp_path):
    lt = [_run(tmp_path, f"s{s}", {14: (0.30, 0.10, 0.40), 16: (0.305, 0.11, 0.40)}) for s in range(2)]
    ctrl = _run(tmp_path, "bal", {14: (0.35, 0.33, 0.37), 16: (0.35, 0.33, 0.37)})
    runs = [L.read_run(r, 14) for r in lt]
    control = [L.read_run(ctrl, 14)]
    assert runs[0]["AP"] == pytest.approx(30.0) and runs[0]["AP_plus2"] == pytest.approx(30.5)
    assert runs[0]["r_over_f"] == pytest.approx(0.25)
    verdict = {name: ok for name, ok, _ in L.criteria(runs, control)}
    assert verdict == {"APr / APf <= 0.5": True, "20 <= AP <= 50": True, "2 more epochs move AP < 1": True,
                       "control APr / APf >= 0.8": True}
    saturated = [L.read_run(_run(tmp_path, "sat", {3: (0.8, 0.75, 0.8)}), None)]
    verdict = {name: ok for name, ok, _ in L.criteria(saturated, [])}
    assert verdict["APr / APf <= 0.5"] is False and verdict["20 <= AP <= 50"] is False
    assert verdict["2 more epochs move AP < 1"] is None  # not evaluated at epoch + 2


def test_cli_writes_the_plot_and_names_a_missing_evaluation(tmp_path, capsys):
    run = _run(tmp_path, "s0", {2: (0.3, 0.1, 0.4)})
    out = tmp_path / "out"
    assert L.main([f"run={run}", f"control={run}", f"out={out}"]) == 0
    assert (out / "ap_by_class.png").stat().st_size > 0
    assert json.loads((out / "long_tail.json").read_text())["runs"][0]["eval"].endswith("epoch_002")
    assert L.main([f"run={run}", "epoch=5"]) == 1
    assert "epoch_005" in capsys.readouterr().err
    assert L.main(["epoch=5"]) == 2


def test_plus2_runs_give_the_convergence_check(tmp_path, capsys):
    """``plus2=``: a run trained two more epochs (study=stepwise's baseline_plus2) gives each run's AP(+2)."""
    runs = [_run(tmp_path, f"s{k}", {14: (0.30, 0.10, 0.40)}) for k in range(2)]
    more = [_run(tmp_path, f"p{k}", {2: (0.303 + k / 100, 0.10, 0.40)}) for k in range(2)]
    assert L.main([f"run={runs[0]}", f"run={runs[1]}", f"plus2={more[0]}", f"plus2={more[1]}"]) == 0
    assert "FAIL  2 more epochs move AP < 1    +0.30, +1.30" in capsys.readouterr().out
    assert L.main([f"run={runs[0]}", f"plus2={more[0]}"]) == 0
    assert "PASS  2 more epochs move AP < 1    +0.30" in capsys.readouterr().out
    assert L.main([f"run={runs[0]}", f"plus2={more[0]}", f"plus2={more[1]}"]) == 2
