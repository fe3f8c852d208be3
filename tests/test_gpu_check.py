"""The GPU check's parts that need no GPU (issue 16): wheel resolution and checks, the CUDA toolkit
finder, the bandwidth floor's byte count, the verdicts and results table, and the script's arguments.

The CUDA build of the dry run takes minutes on a 2-core machine and CI already compiles the CUDA kernel
(.ci/run), so it is not run here; the full dry run is `bench/gpu_check.sh --dry-run OUTDIR` (ops/README.md).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        yield {name: importlib.import_module(name) for name in ("gpu_wheels", "gpu_results", "cuda_home", "msda")}
    finally:
        sys.path.remove(str(BENCH))


# ------------------------------------------------------------------------------------------ wheels
def make_wheel(folder: Path, name: str, version: str, requires=(), tag="py3-none-any") -> Path:
    """A minimal wheel file: METADATA with Requires-Dist, and one module."""
    dist = name.replace("-", "_")
    path = folder / f"{dist}-{version}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}-{version}.dist-info/METADATA", meta)
        zf.writestr(f"{dist}/__init__.py", "")
    return path


def test_markers_are_those_of_cpython_312_on_linux(bench_modules):
    w = bench_modules["gpu_wheels"]
    reqs = ['a; python_version < "3.9"', 'b; python_version >= "3.12"', 'c; sys_platform == "win32"',
            'd; extra == "plot"', "e"]
    assert [r.name for r in w.active_requirements(reqs)] == ["b", "e"]
    assert [r.name for r in w.active_requirements(reqs, {"plot"})] == ["b", "d", "e"]


def test_resolve_follows_only_what_the_image_lacks(bench_modules, tmp_path):
    w = bench_modules["gpu_wheels"]
    catalogue = {  # name -> (version, requires)
        "hydra-core": ("1.3.8", ["omegaconf<2.4,>=2.2", "antlr4-python3-runtime==4.9.*", "packaging",
                                 'importlib-resources; python_version < "3.9"']),
        "omegaconf": ("2.3.1", ["antlr4-python3-runtime==4.9.*", "PyYAML>=5.1.0"]),
        "antlr4-python3-runtime": ("4.9.3", []),
        "lvis": ("0.5.3", ["numpy", "opencv-python>=4.1"]),
    }
    fetched = []

    def fake_fetch(spec, into):
        name = w.Requirement(spec).name
        if name not in catalogue:
            raise RuntimeError(f"{spec}: no wheel")
        fetched.append(spec)
        version, requires = catalogue[name]
        return make_wheel(into, name, version, requires)

    image = {"numpy", "pyyaml", "packaging", "opencv-python-headless"}
    wheels, from_image, skipped = w.resolve(["hydra-core>=1.3,<1.4", "lvis==0.5.3"], image, tmp_path,
                                            optional=("hotcoco",), fetch_fn=fake_fetch, prefer=str)
    assert sorted(wheels) == ["antlr4-python3-runtime", "hydra-core", "lvis", "omegaconf"]
    assert sorted(wheels["antlr4-python3-runtime"].required_by) == ["hydra-core", "omegaconf"]
    assert fetched.count("antlr4-python3-runtime==4.9.*") == 1  # downloaded once
    assert sorted(from_image) == ["numpy", "opencv-python (as opencv-python-headless)", "packaging", "pyyaml"]
    assert len(skipped) == 1 and skipped[0].startswith("hotcoco")


def test_resolve_refuses_two_incompatible_versions(bench_modules, tmp_path):
    w = bench_modules["gpu_wheels"]
    versions = {"a": ("1.0", ["c==1.0"]), "b": ("1.0", ["c>=2"]), "c": ("1.0", [])}

    def fake_fetch(spec, into):
        name = w.Requirement(spec).name
        return make_wheel(into, name, *versions[name])

    with pytest.raises(RuntimeError, match="needs c>=2"):
        w.resolve(["a", "b"], set(), tmp_path, optional=(), fetch_fn=fake_fetch, prefer=str)


def test_check_wheels_finds_each_kind_of_problem(bench_modules, tmp_path):
    w = bench_modules["gpu_wheels"]
    image = {"numpy"}
    good = tmp_path / "good"
    good.mkdir()
    make_wheel(good, "lvis", "0.5.3", ["numpy", "pycocotools"])
    make_wheel(good, "pycocotools", "2.0.11", ["numpy"], tag="cp312-abi3-manylinux_2_17_x86_64")
    (good / "manifest.json").write_text(json.dumps({"roots": ["lvis", "pycocotools"], "wheels": []}))
    assert w.check_wheels(good, image) == []

    bad = tmp_path / "bad"
    bad.mkdir()
    make_wheel(bad, "lvis", "0.5.3", ["numpy", "pycocotools>=2.1", "missing-dep"])
    make_wheel(bad, "pycocotools", "2.0.11", tag="cp311-cp311-manylinux_2_17_x86_64")  # wrong Python
    make_wheel(bad, "omegaconf", "2.3.1")
    make_wheel(bad, "omegaconf", "2.3.0")
    (bad / "manifest.json").write_text(json.dumps({"roots": ["hydra-core"], "wheels": []}))
    problems = "\n".join(w.check_wheels(bad, image))
    assert "two versions of omegaconf" in problems
    assert "pycocotools-2.0.11-cp311-cp311-manylinux_2_17_x86_64.whl: no tag" in problems
    assert "lvis needs missing-dep" in problems
    assert "lvis needs pycocotools>=2.1, the wheel here is 2.0.11" in problems
    assert "hydra-core is a root" in problems
    assert w.check_wheels(tmp_path / "empty", image)[0].endswith("no wheels (run bench/gpu_wheels.sh here first)")


def test_image_list_has_the_image_packages_and_not_the_carried_ones(bench_modules):
    image = bench_modules["gpu_wheels"].read_image_packages()
    assert {"torch", "torchvision", "transformers", "timm", "accelerate", "scipy", "matplotlib", "numpy",
            "tensorboard", "pyyaml", "opencv-python-headless"} <= image
    assert not image & {"hydra-core", "omegaconf", "antlr4-python3-runtime", "lvis", "pycocotools",
                        "faster-coco-eval", "hotcoco"}


# ------------------------------------------------------------------------------------------ CUDA_HOME
def fake_toolkit(root: Path, cudart: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_bytes(b"\x7fELF" + b"\0" * 60)  # a compiled program, as far as the check goes
    (root / "include" / "cuda_runtime.h").write_text("")
    if cudart:
        (root / "lib64").mkdir()
        (root / "lib64" / "libcudart.so").write_text("")
    return root


def test_cuda_home_sees_through_a_wrapper_script(bench_modules, tmp_path):
    c = bench_modules["cuda_home"]
    toolkit = fake_toolkit(tmp_path / "cuda-13.0")
    wrapper_dir = tmp_path / "usr_local" / "bin"
    wrapper_dir.mkdir(parents=True)
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    found = c.find_cuda_home(env={"PATH": str(wrapper_dir)}, prefixes=(), want="")
    assert found == toolkit
    # torch's own guess (the folder above the wrapper's bin/) is refused, and says why
    assert c.problem(wrapper_dir.parent) == "bin/nvcc is not a compiled program (a wrapper script?)"


def test_cuda_home_order_and_refusals(bench_modules, tmp_path):
    c = bench_modules["cuda_home"]
    no_cudart = fake_toolkit(tmp_path / "opt" / "cuda-12.9", cudart=False)
    usable = fake_toolkit(tmp_path / "opt" / "cuda-12.4")
    lines = []
    found = c.find_cuda_home(env={"CUDA_HOME": str(no_cudart), "PATH": ""}, prefixes=(str(tmp_path / "opt"),),
                             want="", log=lines.append)
    assert found == usable
    assert any(str(no_cudart) in line and "no libcudart.so" in line for line in lines)
    script_root = tmp_path / "scripted"
    (script_root / "bin").mkdir(parents=True)
    (script_root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    assert c.problem(script_root) == "bin/nvcc is not a compiled program (a wrapper script?)"


# ------------------------------------------------------------------------------------------ msda floor
def test_touched_rows_and_bytes_moved(bench_modules):
    m = bench_modules["msda"]
    spatial = torch.tensor([[2, 4]])
    starts = torch.tensor([0])
    # x = 0.375 * 4 - 0.5 = 1.0, y = 0.25 * 2 - 0.5 = 0.0: corners (1,0) (2,0) (1,1) (2,1), all inside
    # second point at the top-left corner pixel centre's outside: x = -0.5, y = -0.5 -> only (0, 0) inside
    loc = torch.tensor([[0.375, 0.25], [0.0, 0.0]]).view(1, 1, 1, 1, 2, 2)
    assert m.touched_value_rows(loc, spatial, starts) == 5
    two_heads = loc.expand(1, 1, 2, 1, 2, 2)
    assert m.touched_value_rows(two_heads, spatial, starts) == 10
    # decoder shape, float32: hand count from the module docstring with 1000 touched rows
    b, q, h, c, lv, p = m.BATCH, 300, m.HEADS, m.CHANNELS, len(m.LEVELS), m.POINTS
    samples = b * q * h * lv * p
    value = b * sum(hh * ww for hh, ww in m.LEVELS) * h * c
    forward = 1000 * c + 3 * samples + b * q * h * c
    backward = b * q * h * c + 1000 * c + 3 * samples + value + 3 * samples
    assert m.bytes_moved("decoder", torch.float32, 1000) == (4 * forward, 4 * (forward + backward))
    assert m.bytes_moved("decoder", torch.bfloat16, 1000) == (2 * forward, 2 * (forward + backward))


# ------------------------------------------------------------------------------------------ verdicts
def cuda_row(shape, impl, dtype, fwd_s, fwdbwd_s, mem=1.0):
    return {"shape": shape, "implementation": impl, "dtype": dtype, "fwd_s": fwd_s, "fwdbwd_s": fwdbwd_s,
            "fwd_speed": 1.0 / fwd_s, "fwdbwd_speed": 1.0 / fwdbwd_s, "fwd_mem_ratio": mem, "fwdbwd_mem_ratio": mem,
            "fwd_floor": 0.5, "fwdbwd_floor": 0.4}


def test_msda_verdict_targets(bench_modules, tmp_path):
    r = bench_modules["gpu_results"]
    rows = []
    for shape in ("encoder", "decoder"):
        rows += [cuda_row(shape, "reference fp32", "float32", 1.0, 1.0),
                 cuda_row(shape, "CUDA fp32", "float32", 0.05, 0.08, mem=0.3),
                 cuda_row(shape, "CUDA bf16", "bfloat16", 0.04, 0.06, mem=0.2)]
    (tmp_path / "msda.json").write_text(json.dumps({"device": "cuda", "rows": rows}))
    verdict = r.verdict_msda(tmp_path, "", dry_run=False)
    assert verdict.status == "PASS", verdict.summary
    assert "encoder fp32 20.0x/12.5x (fwd/f+b)" in verdict.summary
    rows[4] = cuda_row("decoder", "CUDA fp32", "float32", 0.2, 0.05, mem=1.5)  # 5x forward, more memory
    (tmp_path / "msda.json").write_text(json.dumps({"device": "cuda", "rows": rows}))
    verdict = r.verdict_msda(tmp_path, "", dry_run=False)
    assert verdict.status == "MISS"
    assert "decoder fp32 fwd_speed 5.0x < 10x" in verdict.summary
    assert "decoder fp32 fwd_mem_ratio 1.50 > 1" in verdict.summary
    assert "decoder bf16 f+b not faster than fp32" in verdict.summary


def write_metrics(path: Path, losses):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"type": "start"}] + [{"type": "train", "global_step": 20 * (i + 1), "loss": x}
                                   for i, x in enumerate(losses)] + [{"type": "eval", "metrics": {}}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_smoke_verdict(bench_modules, tmp_path):
    r = bench_modules["gpu_results"]

    def run(variants):
        for name, losses in variants.items():
            write_metrics(tmp_path / "runs" / f"smoke_{name}" / "pretrain" / "metrics.jsonl", losses)
        return r.verdict_smoke(tmp_path, dry_run=False)

    falling = [10, 9, 8, 7, 6, 5]  # start mean 9, end mean 6
    verdict = run({"fp32": falling, "bf16": [x * 1.02 for x in falling], "bf16_lowp": [x * 0.95 for x in falling]})
    assert verdict.status == "PASS", verdict.summary
    assert "fp32 9.000->6.000" in verdict.summary and "bf16_lowp final 5.0% from fp32" in verdict.summary
    verdict = run({"bf16_lowp": [x * 1.2 for x in falling]})
    assert verdict.status == "MISS" and "bf16_lowp final loss 20.0% from fp32" in verdict.summary
    verdict = run({"bf16": [10, 9, math.nan, 7, 6, 5]})
    assert verdict.status == "FAIL" and "bf16: non-finite loss" in verdict.summary
    verdict = run({"bf16": [5, 6, 7, 8, 9, 10]})
    assert verdict.status == "FAIL" and "bf16: loss did not fall" in verdict.summary


def test_pytest_counts_and_test_verdicts(bench_modules):
    r = bench_modules["gpu_results"]
    assert r.pytest_counts("..\n34 passed, 2 skipped, 1 warning in 10.0s\n") == {"passed": 34, "skipped": 2,
                                                                                  "warnings": 1}
    assert r.pytest_counts("34 tests collected in 1.2s") == {"collected": 34}
    assert r.verdict_tests("1 failed, 3 passed in 2s", 1, False, "t").status == "FAIL"
    assert r.verdict_tests("34 skipped in 2s", 0, False, "t").status == "FAIL"  # nothing ran: not a pass
    assert r.verdict_tests("34 passed in 2s", 0, False, "t").status == "PASS"
    assert r.verdict_tests("34 tests collected in 1s", 0, True, "t").status == "PASS"


def test_records_table_and_markdown(bench_modules, tmp_path):
    r = bench_modules["gpu_results"]
    (tmp_path / "build.log").write_text("compiling\nsummary: built in 61s, sm_90\n")
    (tmp_path / "msda.log").write_text("partial output\n")
    r.record_verdict(tmp_path, "build", 0, 61.04, 300, dry_run=False)
    r.record_verdict(tmp_path, "msda", 124, 120.0, 120, dry_run=False)
    r.record_verdict(tmp_path, "throughput", None, 0.0, None, dry_run=False, skip_reason="no time left")
    records = r.read_records(tmp_path)
    assert [(x["step"], x["status"]) for x in records] == [("build", "PASS"), ("msda", "FAIL"),
                                                          ("throughput", "SKIP")]
    assert records[0]["summary"] == "built in 61s, sm_90"
    assert records[1]["summary"].startswith("timed out after 120 s")
    table = r.format_table(records).splitlines()
    assert table[0].split() == ["step", "verdict", "seconds", "summary"]
    assert table[1].split()[:3] == ["build", "PASS", "61.0"]
    assert table[-1] == "1 PASS, 1 FAIL, 1 SKIP"
    md = r.format_markdown(records, {"GPU": "NVIDIA H200"})
    assert "- GPU: NVIDIA H200" in md and "| msda | FAIL | 120.0 | timed out after 120 s" in md


# ------------------------------------------------------------------------------------------ the script
def run_script(*args, env=None, timeout=300):
    return subprocess.run(["bash", str(BENCH / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_script_arguments(tmp_path):
    assert run_script("--help").returncode == 0
    bad = run_script("--steps", "env,warp", str(tmp_path))
    assert bad.returncode == 64 and "unknown step warp" in bad.stderr
    assert run_script("--frobnicate", str(tmp_path)).returncode == 64
    no_out = run_script(env={"OUT": ""})
    assert no_out.returncode == 64 and "give an output folder" in no_out.stderr


@pytest.mark.slow
def test_dry_run_of_the_fast_steps(tmp_path):
    """env, wheels (skipped: no wheels in the folder given) and args, through the real script."""
    root = Path(__file__).resolve().parents[1]
    env = {"GPU_CHECK_WHEELS": str(tmp_path / "no_wheels"), "PYTHON": sys.executable,
           "PYTHONPATH": f"{root}:{root / 'ops'}"}
    run = run_script("--dry-run", "--steps", "env,wheels,args", str(tmp_path / "out"), env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PASS env:" in run.stdout and "SKIP wheels: no wheels in" in run.stdout and "PASS args:" in run.stdout
    md = (tmp_path / "out" / "gpu_results.md").read_text()
    assert "| args | PASS |" in md and "- mode: dry run (no GPU)" in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.log", "gpu_results.md", "logs.tar.gz"]
