"""A study's report: ``study.md``, ``study.json``, ``study.png`` and ``pretrain_curves.png`` over the rows that
have finished (:func:`write_report`), from the variants' records (:mod:`stepwise.study.records`); the tables
and plots themselves are :mod:`stepwise.study.tables`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from stepwise.analysis.steps import COLUMNS
from stepwise.stages import registry
from stepwise.study.plan import VariantRun, distinct_runs
from stepwise.study.records import RESULT_NAME, WALL_TIME_NAME, eval_curve, variant_result, wall_seconds
from stepwise.study.spec import Study
from stepwise.study.tables import average_per_class, plot_curves, plot_study, study_markdown, summarize
from stepwise.utils.io import atomic_write_json, atomic_write_text


def collect(plan: Sequence[VariantRun], failed: Mapping[Path, str] | None = None
            ) -> tuple[dict[str, Any], dict[str, list[list[dict]]], list[str], dict[str, dict[str, Any]]]:
    """(results for :func:`stepwise.study.tables.summarize`, per-class tables per variant, pending rows,
    ``{"<seed>/<run key>": {"seconds", "curve"}}`` of every run a record or run directory tells of;
    ``failed``: errors of runs that failed in this invocation, named in the pending rows)."""
    results: dict[str, Any] = {}
    per_class: dict[str, list[list[dict]]] = {}
    pending = []
    runs: dict[str, dict[str, Any]] = {}
    for vr in plan:
        v = vr.variant
        entry = results.setdefault(v.name, {"steps": list(v.steps), "overrides": list(v.overrides),
                                            "step_overrides": {s: list(o) for s, o in v.step_overrides.items()},
                                            "description": v.description, "per_seed": {}, "runs": {}})
        record = variant_result(vr)
        if record is None:
            failed = failed or {}
            pending.append(f"{v.name} seed {vr.seed}: " + ", ".join(
                f"{r.key} " + (f"FAILED ({failed[r.dir]})" if r.dir in failed else r.status())
                for r in vr.runs.values() if not registry.get(r.step).done(r.dir)))
            continue
        row = {c: record["metrics"].get(c) for c in COLUMNS}
        row["optimizer_steps"] = record["optimizer_steps"]
        row["wall_seconds"] = record["wall_seconds"]
        entry["per_seed"][str(vr.seed)] = row
        entry["runs"][str(vr.seed)] = record["runs"]
        if record["per_class"] is not None:
            per_class.setdefault(v.name, []).append(record["per_class"])
        for step, key in record["runs"].items():
            runs[f"{vr.seed}/{key}"] = {"seconds": record["wall_seconds"].get(step),
                                        "curve": record["curves"].get(step, [])}
    return results, per_class, pending, runs


def pretrain_curves(plan: Sequence[VariantRun], recorded: Mapping[str, Mapping[str, Any]] | None = None
                    ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{label: {seed: eval_curve}}`` of every pre-training run of the plan (from its directory, else from
    ``recorded``, :func:`collect`'s runs); a run's label is the first variant (in study order) that uses it,
    e.g. ``baseline`` and ``baseline_rfs``."""
    curves: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for run in distinct_runs(plan):
        if run.step == "pretrain":
            curve = eval_curve(run.dir) or (recorded or {}).get(f"{run.seed}/{run.key}", {}).get("curve", [])
            if curve:
                curves.setdefault(run.variants[0], {})[str(run.seed)] = curve
    return curves


def write_report(study: Study, plan: Sequence[VariantRun], out_dir: Path, command: str = "",
                 failed: Mapping[Path, str] | None = None) -> dict[str, Any]:
    """``study.md``, ``study.json`` and ``study.png`` in ``out_dir`` over the finished rows; returns the summary."""
    results, tables, pending, recorded = collect(plan, failed)
    summary = summarize(results)
    curves = pretrain_curves(plan, recorded)
    seeds = sorted({vr.seed for vr in plan})
    notes = [f"Study file `{study.path}`; seeds {seeds}; each row's model is the final training step of its "
             "variant's steps.",
             "Values are box AP in % on val; mean ± sample standard deviation (ddof=1) over the seeds that "
             "finished (no ± with one seed). 'steps after pretrain' is the optimizer steps the row trained "
             "after its pre-training (mean over seeds)."]
    times = [wall_seconds(run.dir) or recorded.get(f"{run.seed}/{run.key}", {}).get("seconds")
             for run in distinct_runs(plan)]
    wall = sum(t for t in times if t is not None)
    notes.append(f"Wall time of the runs, each counted once (as recorded in their `{WALL_TIME_NAME}` or the "
                 f"variants' `{RESULT_NAME}`): {wall / 3600:.2f} h over {sum(t is not None for t in times)} of "
                 f"{len(times)} runs.")
    if study.description:
        notes.insert(0, study.description)
    if command:
        notes.append(f"Command: `{command}`")
    atomic_write_text(out_dir / "study.md", study_markdown(summary, f"Study: {study.name}", notes, pending=pending,
                                                           curves=curves, compare=study.compare))
    atomic_write_json(out_dir / "study.json", {
        "study": study.name, "file": str(study.path), "seeds": seeds, "units": "fraction of 1 (AP 0.315 = 31.5 %)",
        "std": "sample standard deviation over seeds (ddof=1); null with fewer than 2 seeds",
        "wall_seconds": wall, "variants": summary, "pretrain_curves": curves, "pending": pending}, indent=1)
    per_class = {v: average_per_class(tables[v]) for v in study.plot if v in tables}
    if any(entry["per_seed"] for entry in summary.values()):
        plot_study(summary, per_class, out_dir / "study.png",
                   reference=next((r for r in study.compare if summary.get(r, {}).get("per_seed")), None))
    if curves:
        plot_curves(curves, out_dir / "pretrain_curves.png")
    return summary
