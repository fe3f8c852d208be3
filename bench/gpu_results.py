"""Verdicts and the results table of bench/gpu_check.sh (standard library only: it must work even when
the wheel install of a check failed).

    python3 bench/gpu_results.py verdict --work W --step NAME --rc RC --seconds S [--timeout T] [--planned P]
    python3 bench/gpu_results.py report --work W --out OUTDIR [--header K=V ...] [--order a,b]

`verdict` reads one step's log (W/NAME.log) and artifacts (W/op.json, W/msda.json, W/throughput.json,
W/runs/smoke_*/pretrain/metrics.jsonl), prints one line `VERDICT step: summary`, and appends the
record to W/results.jsonl. `report` prints the table of all steps so far and writes OUTDIR/gpu_results.md
(bench/gpu_check.sh calls it after every step, so a cut run still leaves the finished steps' results).

Verdicts: PASS (ran, every target met), MISS (ran, a target missed: the figures are still real), FAIL
(exit status not 0, timed out, or its output is missing or broken), SKIP (not run, with the reason).
Targets (the project's GPU scorecard): the carried op wheel loads (a build on the device is a MISS,
however its figures come out) and matches the float64 reference in float32/float16/bfloat16 forward
and backward; GPU tests pass; CUDA fp32 >= 10x the grid_sample reference
(forward and forward+backward, encoder and decoder shapes); bf16 faster than fp32; CUDA fp32 peak
memory no more than the reference's; the training step faster with the compiled op than with the
reference op; the smoke runs' losses finite and falling, and the bf16 runs' final loss within
SMOKE_TOLERANCE of fp32's (the evidence to turn model.msda_low_precision on).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

SPEED_TARGET = 10.0          # CUDA fp32 vs the grid_sample reference
SMOKE_TOLERANCE = 0.10       # |final loss (bf16) - final loss (fp32)| / final loss (fp32)
SMOKE_VARIANTS = ("fp32", "bf16", "bf16_lowp")   # the last: model.msda_low_precision=true
SMOKE_WINDOW = 3             # logged losses averaged at the start and at the end of a run
STATUSES = ("PASS", "MISS", "FAIL", "SKIP")


class Verdict:
    """One step's outcome: status, a one-line summary, and markdown detail lines for gpu_results.md."""

    def __init__(self, status: str, summary: str, details: list[str] | None = None):
        if status not in STATUSES:
            raise ValueError(f"unknown verdict {status!r}")
        self.status, self.summary, self.details = status, summary, details or []


# ------------------------------------------------------------------------------------------ parsing
def pytest_counts(log: str) -> dict[str, int]:
    """Counts from pytest's last summary line ('3 passed, 1 skipped in 2.0s', '5 tests collected')."""
    counts: dict[str, int] = {}
    for line in reversed(log.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?|"
                           r"tests? collected)", line)
        if found:
            for number, word in found:
                key = {"error": "errors", "warning": "warnings", "test collected": "collected",
                       "tests collected": "collected"}.get(word, word)
                counts[key] = counts.get(key, 0) + int(number)
            return counts
    return counts


def table_lines(log: str, first: str) -> list[str]:
    """The block of a log from the line starting with ``first`` to the next blank line or the end."""
    lines, inside = [], False
    for line in log.splitlines():
        if line.startswith(first):
            inside = True
        if inside:
            if not line.strip():
                break
            lines.append(line)
    return lines


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_losses(metrics: Path) -> list[float]:
    """The logged training losses of a run's metrics.jsonl, in order (NaN for a non-number)."""
    losses = []
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("type") == "train" and "loss" in record:
            value = record["loss"]
            losses.append(float(value) if isinstance(value, (int, float)) else math.nan)
    return losses


# ------------------------------------------------------------------------------------------ verdicts
def verdict_tests(log: str, rc: int, dry_run: bool, what: str) -> Verdict:
    counts = pytest_counts(log)
    shown = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "warnings") or "no pytest summary"
    if rc != 0 or counts.get("failed") or counts.get("errors"):
        failed = [line for line in log.splitlines() if line.startswith(("FAILED", "ERROR"))][:10]
        return Verdict("FAIL", f"{what}: {shown}", failed)
    if dry_run and counts.get("collected"):
        return Verdict("PASS", f"{what}: {shown} (dry run: collected, not run)")
    if not counts.get("passed"):
        return Verdict("FAIL", f"{what}: {shown}: nothing passed (skipped: no GPU or no CUDA kernel?)",
                       [line for line in log.splitlines() if "SKIPPED" in line][:5])
    return Verdict("PASS", f"{what}: {shown}")


def verdict_op(work: Path, dry_run: bool) -> Verdict:
    data = read_json(work / "op.json")
    if data is None or not data.get("rows"):
        return Verdict("FAIL", "no op.json rows")
    rows = data["rows"]
    failed = [r for r in rows if not r["ok"]]
    worst = {}
    for r in rows:
        err = max(r["output"], r["grad_value"], r["grad_locations"], r["grad_weights"])
        worst[(r["device"], r["dtype"])] = max(worst.get((r["device"], r["dtype"]), 0.0), err)
    parts = [f"{dev} {dt} {err:.1e}" for (dev, dt), err in worst.items()]
    source = {"carried": "carried wheel, no compile",
              "built": f"BUILT ON THE DEVICE as a fallback in {data.get('build_seconds')} s "
                       f"({data.get('source_reason')})"}.get(data.get("source"), f"source {data.get('source')}")
    summary = f"{source}; worst relative error vs float64 (fwd+bwd): {', '.join(parts)}"
    if len(data.get("devices", [])) == 1 and data["devices"][0].startswith("cuda"):
        summary += "; one CUDA device (non-default index not checked)"
    if dry_run:
        summary += " (dry run: CPU kernel, the carried wheel under the image's torch)"
    details = [f"- library: {data.get('library')} (torch {data.get('torch')}, GPU {data.get('gpu')})", "",
               "| device | dtype | shape | output | grad_value | grad_loc | grad_weights | tolerance | ok |",
               "|---|---|---|---|---|---|---|---|---|"]
    details += [f"| {r['device']} | {r['dtype']} | {r['shape']} | {r['output']:.1e} | {r['grad_value']:.1e} | "
                f"{r['grad_locations']:.1e} | {r['grad_weights']:.1e} | {r['tolerance']:.0e} | {r['ok']} |" for r in rows]
    if failed:
        return Verdict("FAIL", f"{len(failed)} of {len(rows)} rows over tolerance; {summary}", details)
    if data.get("source") == "built":
        return Verdict("MISS", summary + "; missed: the carried wheel did not serve", details)
    return Verdict("PASS", summary, details)


def verdict_msda(work: Path, log: str, dry_run: bool) -> Verdict:
    data = read_json(work / "msda.json")
    if data is None or not data.get("rows"):
        return Verdict("FAIL", "no msda.json rows")
    details = ["```", *table_lines(log, "shape "), "```"]
    rows = data["rows"]
    name = data.get("device_name") or data.get("gpu") or data["device"]
    bandwidth = (f"{name}: copy {data['bandwidth'] / 1e12:.3g} TB/s ({data.get('bandwidth_source', 'given')})"
                 if data.get("bandwidth") else name)
    details.insert(0, f"- {bandwidth}")
    if not data["device"].startswith("cuda"):
        best = max(rows, key=lambda r: r["fwdbwd_speed"])
        return Verdict("PASS", f"{bandwidth}; {len(rows)} rows, best forward+backward speed "
                               f"{best['fwdbwd_speed']:.1f}x ({best['implementation']}, {best['shape']})"
                               + (" (dry run: CPU rehearsal)" if dry_run else ""), details)
    missed, parts = [], [bandwidth]
    for shape in sorted({r["shape"] for r in rows}, reverse=True):
        by = {r["implementation"]: r for r in rows if r["shape"] == shape}
        fp32, bf16, fp16 = by.get("CUDA fp32"), by.get("CUDA bf16"), by.get("CUDA fp16")
        if fp32 is None:
            missed.append(f"{shape}: no CUDA fp32 row")
            continue
        parts.append(f"{shape} fp32 {fp32['fwd_speed']:.1f}x/{fp32['fwdbwd_speed']:.1f}x (fwd/f+b), "
                     f"mem {fp32['fwd_mem_ratio']:.2f}/{fp32['fwdbwd_mem_ratio']:.2f}, "
                     f"floor {fp32['fwd_floor']:.2f}/{fp32['fwdbwd_floor']:.2f}")
        for key in ("fwd_speed", "fwdbwd_speed"):
            if fp32[key] < SPEED_TARGET:
                missed.append(f"{shape} fp32 {key} {fp32[key]:.1f}x < {SPEED_TARGET:g}x")
        for key in ("fwd_mem_ratio", "fwdbwd_mem_ratio"):
            if fp32[key] > 1.0:
                missed.append(f"{shape} fp32 {key} {fp32[key]:.2f} > 1")
        for half in (bf16, fp16):
            if half is not None:
                name = half["dtype"]
                parts.append(f"{name} f+b {fp32['fwdbwd_s'] / half['fwdbwd_s']:.2f}x fp32")
                if name == "bfloat16" and half["fwdbwd_s"] >= fp32["fwdbwd_s"]:
                    missed.append(f"{shape} bf16 f+b not faster than fp32")
        if bf16 is None:
            missed.append(f"{shape}: no CUDA bf16 row")
    summary = "; ".join(parts)
    if missed:
        return Verdict("MISS", f"{summary}; missed: {'; '.join(missed)}", details)
    return Verdict("PASS", summary, details)


def verdict_throughput(work: Path, log: str, dry_run: bool) -> Verdict:
    data = read_json(work / "throughput.json")
    if data is None or not data.get("rows"):
        return Verdict("FAIL", "no throughput.json rows")
    details = [f"model {data['model']}, batch {data['batch']}, size {data['size'][0]}x{data['size'][1]}, "
               f"{data['iters']} steps, torch {data['torch']}, transformers {data['transformers']}; equal weights: "
               f"max |difference| {data['equal_weights_max_diff']:.1e}",
               f"HF's deformable attention on {data['device']}: {data.get('hf_attention', 'not recorded')}",
               "", "```", *table_lines(log, "dtype "), "```"]
    parts, missed = [f"HF attention: {data.get('hf_attention', 'not recorded').split(' (')[0]}"], []
    for dtype in dict.fromkeys(r["dtype"] for r in data["rows"]):
        by = {r["impl"]: r for r in data["rows"] if r["dtype"] == dtype}
        text = []
        for impl in ("ours", "ours-lowp", "ours-reference"):
            if impl in by and by[impl]["speed_vs_hf"] is not None:
                text.append(f"{impl} {by[impl]['speed_vs_hf']:.2f}x HF")
        if "ours" in by and "ours-reference" in by:
            ratio = by["ours"]["images_per_s"] / by["ours-reference"]["images_per_s"]
            text.append(f"compiled/reference {ratio:.2f}x")
            if ratio < 1.0:
                missed.append(f"{dtype}: compiled op slower than the reference op")
        elif not dry_run and data["device"].startswith("cuda"):
            missed.append(f"{dtype}: no compiled-op row")
        parts.append(f"{dtype}: {', '.join(text)}")
    summary = "; ".join(parts) + (" (dry run: CPU rehearsal)" if dry_run else "")
    return Verdict("MISS" if missed else "PASS", summary + (f"; missed: {'; '.join(missed)}" if missed else ""),
                   details)


def verdict_smoke(work: Path, dry_run: bool) -> Verdict:
    finals, parts, problems, details = {}, [], [], []
    for variant in SMOKE_VARIANTS:
        metrics = work / "runs" / f"smoke_{variant}" / "pretrain" / "metrics.jsonl"
        if not metrics.is_file():
            problems.append(f"{variant}: no metrics.jsonl")
            continue
        losses = train_losses(metrics)
        details.append(f"- {variant}: logged losses " + ", ".join(f"{x:.3f}" for x in losses))
        if len(losses) < 2 * SMOKE_WINDOW:
            problems.append(f"{variant}: {len(losses)} logged losses, need {2 * SMOKE_WINDOW}")
            continue
        if not all(math.isfinite(x) for x in losses):
            problems.append(f"{variant}: non-finite loss")
            continue
        start = sum(losses[:SMOKE_WINDOW]) / SMOKE_WINDOW
        end = sum(losses[-SMOKE_WINDOW:]) / SMOKE_WINDOW
        finals[variant] = end
        parts.append(f"{variant} {start:.3f}->{end:.3f}")
        if not end < start:
            problems.append(f"{variant}: loss did not fall")
    missed = []
    if "fp32" in finals:
        for variant in SMOKE_VARIANTS[1:]:
            if variant in finals:
                gap = abs(finals[variant] - finals["fp32"]) / finals["fp32"]
                parts.append(f"{variant} final {gap * 100:.1f}% from fp32")
                if gap > SMOKE_TOLERANCE:
                    missed.append(f"{variant} final loss {gap * 100:.1f}% from fp32 (> {SMOKE_TOLERANCE:.0%})")
    summary = "; ".join(parts) + (" (dry run: tiny model on the CPU)" if dry_run else "")
    if problems:
        return Verdict("FAIL", "; ".join(problems + parts), details)
    if missed:
        return Verdict("MISS", f"{summary}; missed: {'; '.join(missed)}", details)
    return Verdict("PASS", summary, details)


def last_lines(log: str, count: int = 3) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return " | ".join(lines[-count:])


def verdict_for(step: str, work: Path, log: str, rc: int, dry_run: bool) -> Verdict:
    """The verdict of one finished step from its exit status, log and artifacts."""
    if step == "gpu-tests":
        return verdict_tests(log, rc, dry_run, "pytest -m gpu")
    if step == "op" and (work / "op.json").is_file():
        return verdict_op(work, dry_run)
    if rc != 0:
        return Verdict("FAIL", f"exit status {rc}: {last_lines(log)}")
    if step == "msda":
        return verdict_msda(work, log, dry_run)
    if step == "throughput":
        return verdict_throughput(work, log, dry_run)
    if step == "smoke":
        return verdict_smoke(work, dry_run)
    # install: its log ends with a line 'summary: ...'
    summaries = [line[len("summary: "):] for line in log.splitlines() if line.startswith("summary: ")]
    return Verdict("PASS", summaries[-1] if summaries else last_lines(log, 1))


# ------------------------------------------------------------------------------------------ records
def record_verdict(work: Path, step: str, rc: int | None, seconds: float, timeout: float | None,
                   dry_run: bool, skip_reason: str | None = None, planned: float | None = None) -> dict:
    """Compute, append to W/results.jsonl and return one step's record."""
    if skip_reason is not None:
        verdict = Verdict("SKIP", skip_reason)
    else:
        log_path = work / f"{step}.log"
        log = log_path.read_text(errors="replace") if log_path.is_file() else ""
        if rc in (124, 137) and timeout is not None:
            verdict = Verdict("FAIL", f"timed out after {timeout:g} s: {last_lines(log)}")
        else:
            verdict = verdict_for(step, work, log, rc, dry_run)
    record = {"step": step, "status": verdict.status, "summary": verdict.summary, "rc": rc,
              "seconds": round(seconds, 1), "timeout": timeout, "planned": planned, "details": verdict.details}
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def read_records(work: Path) -> list[dict]:
    path = work / "results.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def planned(record: dict) -> str:
    """The planned device seconds of a record ('-' where none was given)."""
    value = record.get("planned")
    return "-" if value is None else f"{value:g}"


def format_table(records: list[dict]) -> str:
    """The plain-text table printed at the end of the check."""
    width = max([len(r["step"]) for r in records] + [4])
    lines = [f"{'step':{width}}  {'verdict':7}  {'seconds':>7}  {'planned':>7}  summary"]
    for r in records:
        lines.append(f"{r['step']:{width}}  {r['status']:7}  {r['seconds']:7.1f}  {planned(r):>7}  {r['summary']}")
    counts = {s: sum(r["status"] == s for r in records) for s in STATUSES}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no steps")
    return "\n".join(lines)


def format_markdown(records: list[dict], header: dict) -> str:
    """gpu_results.md: what ran where, the verdict table, and each step's details."""
    out = ["# GPU check results", ""]
    out += [f"- {k}: {v}" for k, v in header.items()]
    out += ["", "| step | verdict | seconds | planned device s | summary |", "|---|---|---|---|---|"]
    for r in records:
        out.append(f"| {r['step']} | {r['status']} | {r['seconds']:.1f} | {planned(r)} | "
                   f"{r['summary'].replace('|', '/')} |")
    for r in records:
        if r["details"]:
            out += ["", f"## {r['step']}", "", *r["details"]]
    out += ["", "Targets and verdicts: bench/gpu_results.py; full logs: gpu_check.log and logs.tar.gz beside this "
                "file. Copy the figures into bench/RESULTS.md with the date, the GPU and the command.", ""]
    return "\n".join(out)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verdict", help="judge one finished (or skipped) step")
    v.add_argument("--work", type=Path, required=True)
    v.add_argument("--step", required=True)
    v.add_argument("--rc", type=int, default=None)
    v.add_argument("--seconds", type=float, default=0.0)
    v.add_argument("--timeout", type=float, default=None)
    v.add_argument("--dry-run", action="store_true")
    v.add_argument("--skip", default=None, help="record the step as skipped, with this reason")
    v.add_argument("--planned", type=float, default=None, help="the step's planned device seconds")
    r = sub.add_parser("report", help="print the table and write OUT/gpu_results.md")
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--header", action="append", default=[], help="KEY=VALUE lines for the top of the report")
    r.add_argument("--order", default="", help="comma-separated step names: the table's order")
    args = parser.parse_args(argv)
    if args.command == "verdict":
        if args.skip is None and args.rc is None:
            parser.error("verdict needs --rc (or --skip REASON)")
        rec = record_verdict(args.work, args.step, args.rc, args.seconds, args.timeout, args.dry_run, args.skip,
                             args.planned)
        print(f"{rec['status']} {rec['step']}: {rec['summary']}", flush=True)
        return 0
    records = read_records(args.work)
    order = [s for s in args.order.split(",") if s]
    records.sort(key=lambda r: order.index(r["step"]) if r["step"] in order else len(order))
    header = dict(item.split("=", 1) for item in args.header if "=" in item)
    header.setdefault("written", time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    print(format_table(records))
    write_text_atomic(args.out / "gpu_results.md", format_markdown(records, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
