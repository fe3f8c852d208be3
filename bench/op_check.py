"""The deformable attention op on the GPU machine: which library to use (the carried wheel; a build there
only as a fallback), then its correctness against the float64 reference.

    python3 bench/op_check.py prepare --site SITE --wheels .whl --build-dir BUILD --work WORK [--device-arch auto]
    python3 bench/op_check.py correct --json WORK/op.json [--device auto]

`prepare` finds the op library installed from the carried wheel (SITE/stepwise_ops_C*.so, installed from
WHEELS when the install step did not), loads it in a fresh process and decides (`decide`): the carried
library is used when it loads, has its CUDA kernel and was built for the device's architecture (its
stepwise_ops_C.build.json); only otherwise is the op compiled there (`ops/setup.py build_ext` into
BUILD/lib, FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST of the device), and the record says so. With --dry-run it
never compiles. GPU_CHECK_OP_BUILD_CMD replaces the build command (tests use a stub). It writes
WORK/op_source.json: source (carried | built), reason, library, build seconds.

`correct` runs every dtype the device has a kernel for (CUDA: float32, float16, bfloat16; CPU: float32)
against the pure-PyTorch reference in float64 on the same rounded inputs, forward and backward (output,
grad_value, grad_locations, grad_weights; error = max |difference| / max(max |reference|, 1)), on the
default device and, where there are two CUDA devices, on cuda:1 while cuda:0 is current. Tolerances:
float32 1e-4, float16 1e-2, bfloat16 5e-2. Exit status 1 when any row fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
INFO_FILE = "stepwise_ops_C.build.json"  # ops/build_info.py
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
SHAPES = ("four_levels", "non_square")

PROBE = """
import json, sys
import torch
import stepwise_ops
from stepwise_ops import _library
found = _library.find_library()
print(json.dumps({"loaded": _library.load(), "error": _library.load_error(), "built_with_cuda": _library.built_with_cuda(),
                  "library": str(found) if found else None, "torch": torch.__version__}))
"""


@dataclass
class Probe:
    """What loading one library in a fresh process showed."""

    loaded: bool
    error: str | None = None
    built_with_cuda: bool = False
    library: str | None = None
    torch: str | None = None


@dataclass
class Decision:
    action: str  # "use" (the carried library) or "build" (compile on the device)
    reason: str


def decide(carried: Probe | None, info: dict | None, device_arch: str | None) -> Decision:
    """Use the carried library unless it is absent, does not load, lacks the CUDA kernel on a CUDA device, or
    was built for other architectures than ``device_arch`` (e.g. "sm_90"; None: no CUDA device, the dry run)."""
    if carried is None or carried.library is None:
        return Decision("build", "no carried op library (no stepwise-ops-kernels wheel installed)")
    if not carried.loaded:
        return Decision("build", f"the carried library does not load: {carried.error}")
    if device_arch is not None:
        if not carried.built_with_cuda:
            return Decision("build", "the carried library has no CUDA kernel")
        archs = (info or {}).get("cuda_archs") or []
        if archs and device_arch not in archs:
            return Decision("build", f"the carried library is built for {', '.join(archs)}, the device is {device_arch}")
    built_for = ", ".join((info or {}).get("cuda_archs") or []) or "unrecorded architectures"
    return Decision("use", f"the carried library loads into torch {carried.torch} ({built_for}); no compile")


def probe(paths: list[Path], python: str = sys.executable) -> Probe:
    """Load stepwise_ops with ``paths`` first on PYTHONPATH, in a fresh ``python``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [REPO / "ops", *paths]))}
    run = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        return Probe(False, f"the probe failed: {run.stderr.strip().splitlines()[-1:] or run.returncode}")
    return Probe(**json.loads(run.stdout.strip().splitlines()[-1]))


def carried_library(site: Path, wheels: Path) -> Path | None:
    """SITE/stepwise_ops_C*.so, installing the op wheel from ``wheels`` into SITE first where it is missing."""
    libs = sorted(site.glob("stepwise_ops_C*.so"))
    op_wheels = sorted(wheels.glob("stepwise_ops_kernels-*.whl")) if wheels.is_dir() else []
    if not libs and op_wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--target", str(site), str(op_wheels[-1])], check=False)
        libs = sorted(site.glob("stepwise_ops_C*.so"))
    return libs[0] if libs else None


def device_arch_of(spec: str) -> str | None:
    """"auto": sm_XY of cuda:0 when torch sees a GPU, else None; "none": None; else the value itself."""
    if spec == "none":
        return None
    if spec != "auto":
        return spec
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"sm_{major}{minor}"


def default_build_cmd(build_dir: Path) -> list[str]:
    return [sys.executable, str(REPO / "ops" / "setup.py"), "build_ext", "--build-lib", str(build_dir / "lib"),
            "--build-temp", str(build_dir / "tmp")]


def build_on_device(build_dir: Path, device_arch: str | None) -> float:
    """Compile the op into BUILD/lib (the fallback); returns the seconds it took. Raises RuntimeError."""
    env = dict(os.environ)
    if device_arch:
        digits = device_arch.removeprefix("sm_")
        env.update(FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=f"{digits[:-1]}.{digits[-1]}")
    home = subprocess.run([sys.executable, str(HERE / "cuda_home.py")], capture_output=True, text=True)
    if home.returncode == 0:
        env["CUDA_HOME"] = home.stdout.strip()
    custom = os.environ.get("GPU_CHECK_OP_BUILD_CMD")
    cmd = shlex.split(custom) if custom else default_build_cmd(build_dir)
    print(f"op: compiling on this machine (fallback): {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    run = subprocess.run(cmd, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"the fallback build failed (exit status {run.returncode})")
    return time.monotonic() - t0


def prepare(site: Path, wheels: Path, build_dir: Path, work: Path, device_spec: str, dry_run: bool) -> int:
    device_arch = device_arch_of(device_spec)
    lib = carried_library(site, wheels)
    carried = probe([site]) if lib is not None else None
    if carried is not None:
        carried.library = carried.library or str(lib)
    info_path = site / INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else None
    decision = decide(carried, info, device_arch)
    record = {"source": "carried" if decision.action == "use" else "built", "reason": decision.reason,
              "device_arch": device_arch, "carried": asdict(carried) if carried else None, "carried_info": info,
              "library": carried.library if decision.action == "use" else None, "build_seconds": None}
    if decision.action == "use":
        print(f"op: carried wheel used, compile refused: {decision.reason}")
        print(f"op library: {record['library']}")
    elif dry_run:
        record["source"] = "none"
        print(f"op: the GPU machine would compile the op (fallback): {decision.reason}")
    else:
        print(f"op: FALLBACK, building on the device: {decision.reason}", flush=True)
        try:
            record["build_seconds"] = round(build_on_device(build_dir, device_arch), 1)
            built = probe([build_dir / "lib", site])
            if not built.loaded or (device_arch and not built.built_with_cuda):
                raise RuntimeError(f"the library built here does not load with its CUDA kernel: {built.error}")
            record["library"] = built.library
            print(f"op: built on the device in {record['build_seconds']} s (fallback): {built.library}")
        except RuntimeError as err:
            record["source"] = "none"
            record["reason"] += f"; {err}"
            print(f"op: {err}")
    work.mkdir(parents=True, exist_ok=True)
    (work / "op_source.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0 if record["library"] else 1


# ------------------------------------------------------------------------------------------ correctness
def relative_errors(got, expected) -> list[float]:
    return [float((g.double() - e.double()).abs().max()) / max(float(e.double().abs().max()), 1.0) if e.numel() else 0.0
            for g, e in zip(got, expected)]


def correctness_rows(devices: list[str]) -> list[dict]:
    import torch

    from stepwise_ops import ms_deform_attn_compiled, ms_deform_attn_reference
    from stepwise_ops.testing import SHAPE_SETS, forward_and_grads, make_inputs

    rows = []
    for device in devices:
        cuda = device.startswith("cuda")
        dtypes = ("float32", "float16", "bfloat16") if cuda else ("float32",)
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for i, shape in enumerate(SHAPES):
                inputs = make_inputs(SHAPE_SETS[shape], n=2, lq=33, m=8, d=32, p=4, device=device, seed=i)
                low = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
                expected = forward_and_grads(ms_deform_attn_reference,
                                             *[t.double() if t.is_floating_point() else t for t in low])
                current = torch.cuda.device(0) if cuda and device != "cuda:0" and device != "cuda" else None
                if current is not None:
                    with current:  # inputs on cuda:1 while cuda:0 is current: the kernel's guard must switch
                        got = forward_and_grads(ms_deform_attn_compiled, *low)
                else:
                    got = forward_and_grads(ms_deform_attn_compiled, *low)
                errors = relative_errors(got, expected)
                ok = all(e <= TOLERANCE[dtype_name] for e in errors) and all(g.dtype == dtype for g in got)
                ok = ok and all(g.device == low[0].device for g in got)
                rows.append({"device": device, "dtype": dtype_name, "shape": shape, "output": errors[0],
                             "grad_value": errors[1], "grad_locations": errors[2], "grad_weights": errors[3],
                             "tolerance": TOLERANCE[dtype_name], "ok": ok})
    return rows


def correct(json_path: Path | None, device_spec: str, source: Path | None) -> int:
    import torch

    from stepwise_ops import _library

    if device_spec == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = ["cpu"] if count == 0 else ["cuda:0"] + (["cuda:1"] if count > 1 else [])
    else:
        devices = device_spec.split(",")
    if not _library.load():
        print(f"op: the library does not load: {_library.load_error()}")
        return 1
    lib = str(_library.find_library())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print(f"op library {lib} (torch {torch.__version__}, CUDA kernel {_library.built_with_cuda()}); devices "
          f"{', '.join(devices)}{f' ({gpu})' if gpu else ''}")
    if devices[0].startswith("cuda") and len(devices) == 1:
        print("one CUDA device: the non-default device index is not checked")
    rows = correctness_rows(devices)
    print(f"{'device':7} {'dtype':9} {'shape':12} {'output':>9} {'grad_val':>9} {'grad_loc':>9} {'grad_w':>9} "
          f"{'tol':>7}  verdict")
    for r in rows:
        print(f"{r['device']:7} {r['dtype']:9} {r['shape']:12} {r['output']:9.1e} {r['grad_value']:9.1e} "
              f"{r['grad_locations']:9.1e} {r['grad_weights']:9.1e} {r['tolerance']:7.0e}  {'ok' if r['ok'] else 'FAIL'}")
    if not devices[0].startswith("cuda"):
        print("float16, bfloat16: CUDA kernels only (the CPU kernel is float32/float64)")
    record = json.loads(source.read_text()) if source is not None and source.is_file() else {}
    result = {"devices": devices, "gpu": gpu, "torch": torch.__version__, "library": lib,
              "source": record.get("source", "unknown"), "source_reason": record.get("reason"),
              "build_seconds": record.get("build_seconds"), "rows": rows}
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="choose the op library: the carried wheel, or a build as the fallback")
    p.add_argument("--site", type=Path, required=True, help="where the carried wheels are installed")
    p.add_argument("--wheels", type=Path, default=REPO / ".whl")
    p.add_argument("--build-dir", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--device-arch", default="auto", help="auto (from torch), none (no CUDA device), or sm_XY")
    p.add_argument("--dry-run", action="store_true", help="never compile")
    c = sub.add_parser("correct", help="the op against the float64 reference")
    c.add_argument("--json", type=Path, default=None)
    c.add_argument("--device", default="auto", help="auto, or comma-separated devices")
    c.add_argument("--source", type=Path, default=None, help="op_source.json of `prepare`")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.site, args.wheels, args.build_dir, args.work, args.device_arch, args.dry_run)
    return correct(args.json, args.device, args.source)


if __name__ == "__main__":
    sys.exit(main())
