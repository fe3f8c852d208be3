"""The GPU check's parts that need no GPU: wheel resolution and checks, the op wheel's build record
(sm_90), the choice between the carried op and a build on the device, the CUDA toolkit finder, the
bandwidth floor (byte count, copy bandwidth), HF's attention path, the verdicts and results table, the
script's arguments and its plan (<= 300 s).

The op wheel's CUDA build takes minutes on a 2-core machine and CI already compiles the CUDA kernel
(.ci/run), so it is not built here; `bench/gpu_wheels.sh && bench/gpu_check.sh --dry-run OUTDIR` is the
full rehearsal (ops/README.md), and test_carried_op_wheel_names_sm_90 checks the wheel it leaves in .whl/.
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

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        yield {name: importlib.import_module(name)
               for name in ("gpu_wheels", "gpu_results", "cuda_home", "msda", "op_check", "train_throughput")}
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
    assert table[0].split() == ["step", "verdict", "seconds", "planned", "summary"]
    assert table[1].split()[:3] == ["build", "PASS", "61.0"]
    assert table[-1] == "1 PASS, 1 FAIL, 1 SKIP"
    md = r.format_markdown(records, {"GPU": "NVIDIA H200"})
    assert "- GPU: NVIDIA H200" in md and "| msda | FAIL | 120.0 | - | timed out after 120 s" in md
    r.record_verdict(tmp_path, "op", None, 0.0, None, dry_run=False, skip_reason="no op wheel", planned=30)
    assert "| op | SKIP | 0.0 | 30 | no op wheel |" in r.format_markdown(r.read_records(tmp_path), {})


# ------------------------------------------------------------------------------------------ the script
def run_script(*args, env=None, timeout=300):
    return subprocess.run(["bash", str(BENCH / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_script_arguments(tmp_path):
    assert run_script("--help").returncode == 0
    bad = run_script("--steps", "op,warp", str(tmp_path))
    assert bad.returncode == 64 and "unknown step warp" in bad.stderr
    assert run_script("--frobnicate", str(tmp_path)).returncode == 64
    no_out = run_script(env={"OUT": ""})
    assert no_out.returncode == 64 and "give an output folder" in no_out.stderr


@pytest.mark.slow
def test_dry_run_of_the_cheap_steps(tmp_path):
    """install and op through the real script, with no wheels: both skipped with the reason, the plan
    printed, the results written as each step ends."""
    env = {"GPU_CHECK_WHEELS": str(tmp_path / "no_wheels"), "PYTHON": sys.executable,
           "PYTHONPATH": f"{ROOT}:{ROOT / 'ops'}"}
    run = run_script("--dry-run", "--steps", "install,op", str(tmp_path / "out"), env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SKIP install: no wheels in" in run.stdout
    assert "SKIP op: no op wheel in" in run.stdout and "never compiles" in run.stdout
    assert "planned total after install: 30 s" in run.stdout
    md = (tmp_path / "out" / "gpu_results.md").read_text()
    assert "| install | SKIP | 0.0 | 30 |" in md and "- mode: dry run (no GPU)" in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.log", "gpu_results.md", "logs.tar.gz"]


def test_plan_fits_five_minutes_most_important_first():
    run = run_script("--plan")
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith("  ")]
    steps = [r[0] for r in rows]
    assert steps == ["install", "op", "msda", "throughput", "gpu-tests", "smoke"]
    planned = {r[0]: int(r[1]) for r in rows}
    assert sum(v for k, v in planned.items() if k != "install") <= 300
    assert planned["install"] <= 60
    assert f"planned total after install: {sum(planned.values()) - planned['install']} s (budget 300 s)" in run.stdout
    boxes = {r[0]: int(r[5]) for r in rows}  # "name N s time box B s"
    assert all(boxes[k] == 2 * planned[k] for k in ("msda", "throughput", "gpu-tests", "smoke"))


# ------------------------------------------------------------------------------------------ the op wheel
def test_op_build_record_names_sm_90():
    sys.path.insert(0, str(ROOT / "ops"))
    try:
        build_info = importlib.import_module("build_info")
    finally:
        sys.path.remove(str(ROOT / "ops"))
    info = build_info.build_info("2.11.0+cu130", "13.0", True, "9.0", python=(3, 12))
    assert info["cuda_archs"] == ["sm_90"] and info["python"] == "cp312" and info["cuda"] == "13.0"
    assert info["version"] == "0.1.0+sm90.torch2.11.0.cu130" and info["torch_requirement"] == "torch==2.11.0"
    assert build_info.cuda_archs("8.0;8.6 9.0+PTX;9.0") == ["sm_80", "sm_86", "sm_90"]
    assert build_info.build_info("2.14.1", None, False, "9.0")["version"] == "0.1.0+cpu.torch2.14.1"
    with pytest.raises(ValueError, match="not a compute capability"):
        build_info.cuda_archs("hopper")


def make_op_wheel(folder: Path, info: dict, version: str, tag: str = "cp312-cp312-linux_x86_64") -> Path:
    path = folder / f"stepwise_ops_kernels-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"stepwise_ops_kernels-{version}.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: stepwise-ops-kernels\nVersion: {version}\n"
                    "Requires-Dist: torch==2.11.0\n")
        zf.writestr("stepwise_ops_C.build.json", json.dumps(info))
        zf.writestr("stepwise_ops_C.cpython-312-x86_64-linux-gnu.so", b"\x7fELF")
    return path


def test_op_wheel_problems(bench_modules, tmp_path):
    w = bench_modules["gpu_wheels"]
    good = {"cuda_archs": ["sm_90"], "cuda": "13.0", "torch": "2.11.0+cu130", "python": "cp312"}
    path = make_op_wheel(tmp_path, good, "0.1.0+sm90.torch2.11.0.cu130")
    assert w.op_wheel_problems(path, "2.11.0") == []
    assert w.op_wheel_info(path)["cuda_archs"] == ["sm_90"]
    other = tmp_path / "other"
    other.mkdir()
    bad = make_op_wheel(other, {**good, "cuda_archs": ["sm_80"], "torch": "2.14.1"}, "0.1.0+sm80.torch2.14.1",
                        tag="cp311-cp311-linux_x86_64")
    problems = "\n".join(w.op_wheel_problems(bad, "2.11.0"))
    assert "built for ['sm_80'], not sm_90" in problems and "does not name sm_90" in problems
    assert "not a CPython 3.12 wheel" in problems and "built against torch 2.14.1, the image has 2.11.0" in problems
    # check_wheels sees it among the other wheels, and a manifest that expects an op wheel needs one
    (other / "manifest.json").write_text(json.dumps({"roots": [], "wheels": [], "op": None}))
    found = "\n".join(w.check_wheels(other, {"torch"}))
    assert "not sm_90" in found and "no op wheel recorded" in found


def test_carried_op_wheel_names_sm_90(bench_modules):
    """The op wheel bench/gpu_wheels.sh left in .whl/ (skipped where it has not run: it compiles for minutes)."""
    w = bench_modules["gpu_wheels"]
    wheels = sorted((ROOT / ".whl").glob("stepwise_ops_kernels-*.whl"))
    if not wheels:
        pytest.skip("no op wheel in .whl/ (bench/gpu_wheels.sh builds it)")
    assert len(wheels) == 1
    assert w.op_wheel_problems(wheels[0], w.image_versions()["torch"]) == []
    assert "sm90" in wheels[0].name and "sm_90" in w.op_wheel_info(wheels[0])["cuda_archs"]


def test_decide_uses_the_carried_op_whenever_it_serves(bench_modules):
    o = bench_modules["op_check"]
    loads = o.Probe(True, None, True, "/site/stepwise_ops_C.so", "2.11.0+cu130")
    sm90 = {"cuda_archs": ["sm_90"]}
    assert o.decide(loads, sm90, "sm_90").action == "use"
    assert "no compile" in o.decide(loads, sm90, "sm_90").reason
    assert o.decide(loads, None, "sm_90").action == "use"  # no record: loading with CUDA decides
    assert o.decide(o.Probe(True, None, False, "/x.so", "2.11.0"), sm90, None).action == "use"  # dry run: CPU
    broken = o.Probe(False, "OSError: undefined symbol: _ZN3c10", False, "/x.so")
    assert o.decide(broken, sm90, "sm_90") == o.Decision(
        "build", "the carried library does not load: OSError: undefined symbol: _ZN3c10")
    assert "no CUDA kernel" in o.decide(o.Probe(True, None, False, "/x.so"), sm90, "sm_90").reason
    assert "built for sm_80, the device is sm_90" in o.decide(loads, {"cuda_archs": ["sm_80"]}, "sm_90").reason
    assert o.decide(None, None, "sm_90").action == "build"


def test_prepare_refuses_to_compile_when_the_carried_op_loads(tmp_path):
    """The script's op step through bench/op_check.py prepare: with a carried library that loads, the build
    command (a stub here) never runs; with none, it runs and the record says the op was built there."""
    import stepwise_ops  # noqa: F401 - loads the library CI built
    from stepwise_ops import _library

    lib = _library.find_library()
    if lib is None:
        pytest.skip("stepwise_ops_C is not built here")
    site = tmp_path / "site"
    site.mkdir()
    (site / lib.name).write_bytes(lib.read_bytes())
    (site / "stepwise_ops_C.build.json").write_text(json.dumps({"cuda_archs": ["sm_90"]}))
    marker = tmp_path / "compiled"
    env = {**os.environ, "GPU_CHECK_OP_BUILD_CMD": f"touch {marker}"}

    def prepare(site_dir, arch, work):
        return subprocess.run([sys.executable, str(BENCH / "op_check.py"), "prepare", "--site", str(site_dir),
                               "--wheels", str(tmp_path / "no_wheels"), "--build-dir", str(tmp_path / "build"),
                               "--work", str(work), "--device-arch", arch], capture_output=True, text=True, env=env,
                              timeout=120)

    run = prepare(site, "none", tmp_path / "w1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "carried wheel used, compile refused" in run.stdout and not marker.exists()
    record = json.loads((tmp_path / "w1" / "op_source.json").read_text())
    assert record["source"] == "carried" and Path(record["library"]).parent == site

    empty = tmp_path / "empty_site"
    empty.mkdir()
    run = prepare(empty, "sm_90", tmp_path / "w2")
    assert "FALLBACK, building on the device: no carried op library" in run.stdout
    assert marker.exists()  # the (stub) build ran
    record = json.loads((tmp_path / "w2" / "op_source.json").read_text())
    assert record["source"] in ("built", "none") and record["source"] != "carried"


# ------------------------------------------------------------------------------------------ bandwidth, HF path
def test_copy_bandwidth_is_measured(bench_modules):
    m = bench_modules["msda"]
    bandwidth = m.measure_copy_bandwidth("cpu", nbytes=1 << 20, repeats=3)
    assert 1e6 < bandwidth < 1e14  # bytes/s, read + written
    assert "CPU" in m.device_name("cpu")


def test_hf_attention_path_is_detected(bench_modules):
    t = bench_modules["train_throughput"]
    from transformers.models.deformable_detr import modeling_deformable_detr as hf

    holder = torch.nn.Sequential(hf.MultiScaleDeformableAttention())
    path = t.hf_attention_path(holder, "cpu")
    assert path.startswith("pure PyTorch (grid_sample") and t.hf_label(path) == "HF (PyTorch attn)"

    class MultiScaleDeformableAttention(torch.nn.Module):  # a kernel stand-in: no grid_sample
        def forward(self, value, shapes, shapes_list, starts, loc, weights, step):
            return value.new_zeros(loc.shape[0], loc.shape[1], value.shape[2] * value.shape[3])

    path = t.hf_attention_path(torch.nn.Sequential(MultiScaleDeformableAttention()), "cpu")
    assert path.startswith("custom kernel") and t.hf_label(path) == "HF (kernel attn)"
    assert t.hf_attention_path(torch.nn.Linear(2, 2), "cpu").startswith("unknown")


def test_op_verdict(bench_modules, tmp_path):
    r = bench_modules["gpu_results"]
    row = {"device": "cuda:0", "dtype": "bfloat16", "shape": "four_levels", "output": 1e-3, "grad_value": 2e-3,
           "grad_locations": 3e-3, "grad_weights": 1e-3, "tolerance": 5e-2, "ok": True}
    data = {"devices": ["cuda:0"], "gpu": "NVIDIA H100", "torch": "2.11.0", "library": "/s/x.so",
            "source": "carried", "rows": [row]}
    (tmp_path / "op.json").write_text(json.dumps(data))
    verdict = r.verdict_op(tmp_path, dry_run=False)
    assert verdict.status == "PASS" and "carried wheel, no compile" in verdict.summary
    assert "cuda:0 bfloat16 3.0e-03" in verdict.summary and "non-default index not checked" in verdict.summary
    (tmp_path / "op.json").write_text(json.dumps({**data, "source": "built", "build_seconds": 80.0,
                                                  "source_reason": "the carried library does not load"}))
    verdict = r.verdict_op(tmp_path, dry_run=False)
    assert verdict.status == "MISS" and "BUILT ON THE DEVICE as a fallback in 80.0 s" in verdict.summary
    (tmp_path / "op.json").write_text(json.dumps({**data, "rows": [{**row, "ok": False}]}))
    assert r.verdict_op(tmp_path, dry_run=False).status == "FAIL"
