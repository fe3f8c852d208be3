"""bench/eval_speed.py on a tiny case: both evaluators run as processes, agree, and a failure is a table line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "bench" / "eval_speed.py"), "--images", "30", "--categories", "12", "--dets", "20", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_tiny_case_prints_both_evaluators_and_their_agreement(tmp_path):
    result = run_bench("--workdir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "lvis (LVIS API 0.5.3)" in out and "hotcoco (default)" in out
    assert "hotcoco vs LVIS API: max |difference| over 13 metrics and 12 per-class APs = 0.00e+00 (equal to 1e-9)" in out
    assert (tmp_path / "case_30x12x20_b12_p0_s0" / "predictions.json").is_file()  # kept for reuse


def test_an_evaluator_that_runs_out_of_memory_is_a_line_not_a_crash(tmp_path):
    result = run_bench("--workdir", str(tmp_path), "--evaluators", "hotcoco", "--mem-limit-gb", "0.05")
    assert result.returncode == 1
    assert "hotcoco (default)" in result.stdout and "did not finish: out of memory" in result.stdout
