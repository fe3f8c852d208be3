"""bench/train_throughput.py: the equal-model check, argument errors, and one tiny run that prints its table."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("train_throughput")
    finally:
        sys.path.remove(str(BENCH))


def test_equal_weights_check_passes_for_two_stage_and_catches_a_difference(bench):
    cfg = bench.load_bench_config("tiny", box_refine=True, two_stage=True)
    cfg["model"].update(d_model=64, nheads=4, dim_feedforward=64, num_queries=10)
    torch.manual_seed(0)
    hf = bench.build_hf(cfg, 3)
    state = hf.state_dict()
    ours = bench.build_ours(cfg, 3, state)
    assert bench.check_same_model(cfg, 3, hf, ours) < 1e-4
    # HF would train the timm stem too; the bench freezes it as ours (and Deformable DETR) does.
    assert not any(p.requires_grad for n, p in hf.model.backbone.named_parameters() if "layer1." in n)
    with torch.no_grad():
        ours.class_embed[-2].linear.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="disagree"):
        bench.check_same_model(cfg, 3, hf, ours)


@pytest.mark.parametrize("argv, message", [
    (["--two-stage", "--no-box-refine"], "only with --box-refine"),
    (["--dtype", "fp8"], "unknown --dtype"),
    (["--impls", "ours,detectron"], "unknown --impls"),
    (["--size", "16", "64"], "--size"),
])
def test_bad_arguments_are_named(bench, capsys, argv, message):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_run_prints_the_table():
    cmd = [sys.executable, str(BENCH / "train_throughput.py"), "--model", "tiny", "--batch", "1", "--size", "96",
           "96", "--iters", "1", "--warmup", "0", "--classes", "5", "--boxes", "2",
           "--device", "cpu", "--dtype", "fp32", "--impls", "ours,hf"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "outputs agree" in out
    assert re.search(r"^dtype\s+implementation\s+img/s\s+vs HF\s+step ms\s+peak MiB\s+vs HF", out, re.M)
    number = r"(\d+\.\d+)"
    ours = re.search(rf"^fp32\s+ours \((?:compiled|reference) op\)\s+{number}\s+{number}x\s+{number}\s+{number}"
                     rf"\s+{number}", out, re.M)
    hf = re.search(rf"^fp32\s+HF \(PyTorch attn\)\s+{number}\s+1\.00x", out, re.M)
    assert "HF deformable attention on cpu: pure PyTorch (grid_sample" in out
    assert ours and hf, out
    assert float(ours.group(1)) > 0 and float(ours.group(2)) > 0
