"""Time and peak memory of the LVIS evaluators, end to end from files, side by side.

    python bench/eval_speed.py [--images 1000 5000] [--categories 300] [--dets 300] [--lvis-scale]
                               [--evaluators lvis hotcoco] [--mem-limit-gb 16] [--workdir DIR] [--seed 0]

For each case, ``stepwise.evaluation.random_cases.write_eval_case`` writes an LVIS-format GT file
(long-tailed categories with frequency, instance counts and federated lists) and a results file
(``--dets`` detections per image: noisy copies of GT plus random boxes, tied scores). Each evaluator then
runs as its own process, exactly as a user runs it: ``python -m stepwise.evaluate gt=... predictions=...
evaluator=NAME``. The table shows wall time (process start to exit), CPU time (user + system: steadier
than wall time on a shared machine), the part spent reading the results file and the part spent
evaluating (wall, from the CLI's progress lines), peak resident memory of that process (``wait4``), and
ratios against the LVIS API: end to end ("speed-up", wall) and of the evaluation alone ("eval speed-up",
the same inputs in memory). Every metric and per-class AP of each evaluator is compared with the LVIS
API's (exit code 1 if any differs by more than 1e-9).

``--lvis-scale`` adds LVIS v1 val's size (19,809 images, 1,203 categories, ~247k GT boxes with polygons in a
190 MB file, 300 detections per image = 5.9M detections), run with the evaluators other than the LVIS API only: the LVIS API (and the former
default, faster-coco-eval) need more than 20 GB there. Each child runs under an address-space limit
(``--mem-limit-gb``) so that an evaluator that runs out of memory is reported as such instead of waking
the OOM killer on a shared machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stepwise.evaluation.random_cases import write_eval_case

LVIS_SCALE = (19809, 1203)
# 1-24 GT boxes per image (~247k, LVIS v1 val has 244,707) with 40-vertex polygons: a 190 MB GT file like LVIS's
LVIS_SCALE_BOXES, LVIS_SCALE_POLYGON = 24, 40
LABELS = {"lvis": "lvis (LVIS API 0.5.3)", "hotcoco": "hotcoco (default)"}


def run_measured(gt: Path, preds: Path, evaluator: str, out: Path, mem_limit_gb: float) -> dict:
    """One ``stepwise.evaluate`` process: wall seconds, its own peak RSS (GB, from ``os.wait4``), the read
    and evaluate seconds from its progress lines, and ``failure`` when it did not finish."""
    limit = int(mem_limit_gb * 2**30)
    cmd = [sys.executable, "-m", "stepwise.evaluate", f"gt={gt}", f"predictions={preds}", f"evaluator={evaluator}", f"out={out}"]
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f,
                                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err_f.seek(0)
        stderr = err_f.read()
    times = {m.group(2): float(m.group(1)) for m in re.finditer(r"\[\s*([\d.]+) s\] (read|evaluating|done)", stderr)}
    result = {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rc": proc.returncode,
              "peak_gb": usage.ru_maxrss / 2**20, "stderr": stderr,
              "read": times.get("read"), "eval": (times["done"] - times["evaluating"]) if {"done", "evaluating"} <= times.keys() else None}
    if proc.returncode != 0:
        signs = ("memoryerror", "memory allocation", "out of memory", "cannot allocate memory", "failed to map segment")
        oom = any(sign in stderr.lower() for sign in signs) or proc.returncode in (-9, 137)
        result["failure"] = (f"out of memory (address-space limit {mem_limit_gb:g} GB)" if oom
                             else f"failed (exit code {proc.returncode}): {stderr.strip().splitlines()[-1] if stderr.strip() else ''}")
    return result


def read_report(out: Path) -> tuple[dict, dict]:
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("meta"), metrics.pop("warnings")
    with open(out / "per_class.csv") as f:
        per_class = {row["id"]: (float(row["ap"]) if row["ap"] else None) for row in csv.DictReader(f)}
    return metrics, per_class


def max_difference(a: tuple[dict, dict], b: tuple[dict, dict]) -> float:
    """Largest |difference| over metrics and per-class AP; inf when one is undefined and the other not."""
    pairs = [(a[0][k], b[0].get(k)) for k in a[0]] + [(a[1][k], b[1].get(k)) for k in a[1]]
    diffs = [abs(x - y) if x is not None and y is not None else (0.0 if x is None and y is None else math.inf) for x, y in pairs]
    return max(diffs, default=0.0)


def bench_case(images: int, categories: int, dets: int, evaluators: list[str], args: argparse.Namespace, root: Path,
               max_boxes: int = 12, polygon_points: int = 0) -> bool:
    case = root / f"case_{images}x{categories}x{dets}_b{max_boxes}_p{polygon_points}_s{args.seed}"
    gt, preds = case / "gt.json", case / "predictions.json"
    if not (gt.is_file() and preds.is_file()):
        t0 = time.perf_counter()
        write_eval_case(case, images, categories, dets, seed=args.seed, max_boxes=max_boxes, polygon_points=polygon_points)
        made = f"written in {time.perf_counter() - t0:.1f} s"
    else:
        made = "reused"
    polygons = f", {polygon_points}-vertex polygons" if polygon_points else ""
    print(f"\ncase: {images:,} images (1-{max_boxes} GT boxes each{polygons}), {categories:,} categories, {dets} detections/image"
          f" = {images * dets:,} detections; GT {gt.stat().st_size / 2**20:.0f} MiB, results {preds.stat().st_size / 2**20:.0f} MiB"
          f" ({made})", flush=True)
    results, reports = {}, {}
    for name in evaluators:
        out = case / f"out_{name}"
        results[name] = run_measured(gt, preds, name, out, args.mem_limit_gb)
        if "failure" not in results[name]:
            reports[name] = read_report(out)

    ref = results.get("lvis")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"{'evaluator':<24}{'wall s':>9}{'CPU s':>9}{'read s':>9}{'eval s':>9}{'peak RSS GB':>13}"
          f"{'speed-up':>10}{'eval speed-up':>15}{'memory':>9}")
    ok = True
    for name, r in results.items():
        if "failure" in r:
            print(f"{LABELS.get(name, name):<24}{r['wall']:>9.1f}   did not finish: {r['failure']}")
            ok = False
            continue
        usable_ref = ref is not None and "failure" not in ref
        speed = f"{ref['wall'] / r['wall']:.1f}x" if usable_ref else "-"
        eval_speed = f"{ref['eval'] / r['eval']:.1f}x" if usable_ref and ref["eval"] and r["eval"] else "-"
        mem = f"{r['peak_gb'] / ref['peak_gb']:.2f}" if usable_ref else "-"
        print(f"{LABELS.get(name, name):<24}{r['wall']:>9.1f}{r['cpu']:>9.1f}{fmt(r['read'], '9.1f')}{fmt(r['eval'], '9.1f')}"
              f"{r['peak_gb']:>13.2f}{speed:>10}{eval_speed:>15}{mem:>9}")
    if "lvis" in reports:
        for name, rep in reports.items():
            if name != "lvis":
                diff = max_difference(reports["lvis"], rep)
                same = diff <= 1e-9
                ok &= same
                print(f"{name} vs LVIS API: max |difference| over {len(rep[0])} metrics and {len(rep[1])} per-class APs "
                      f"= {diff:.2e} ({'equal to 1e-9' if same else 'DIFFERENT'})")
        print(f"AP = {reports['lvis'][0]['AP']:.6f}")
    elif reports:
        name, rep = next(iter(reports.items()))
        print(f"AP ({name}) = {rep[0]['AP']:.6f}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="*", default=[1000, 5000])
    parser.add_argument("--categories", type=int, default=300)
    parser.add_argument("--dets", type=int, default=300, help="detections per image")
    parser.add_argument("--evaluators", nargs="+", default=["lvis", "hotcoco"], choices=["lvis", "hotcoco"])
    parser.add_argument("--lvis-scale", action="store_true",
                        help="also 19,809 images x 1,203 categories (every evaluator but the LVIS API)")
    parser.add_argument("--mem-limit-gb", type=float, default=16.0, help="address-space limit of each evaluator process")
    parser.add_argument("--workdir", type=Path, default=None, help="keep (and reuse) the generated files here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="eval_speed_") as tmp:
        root = args.workdir or Path(tmp)
        ok = all([bench_case(n, args.categories, args.dets, args.evaluators, args, root) for n in args.images])
        if args.lvis_scale:
            print("\nLVIS API: not run at LVIS v1 val size (over 20 GB resident after 8 CPU-minutes, issue 13)")
            ok &= bench_case(*LVIS_SCALE, args.dets, [e for e in args.evaluators if e != "lvis"], args, root,
                             max_boxes=LVIS_SCALE_BOXES, polygon_points=LVIS_SCALE_POLYGON)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
