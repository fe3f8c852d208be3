"""What a build of the `stepwise_ops_C` library is for: its version's local tag and `stepwise_ops_C.build.json`.

Used by ops/setup.py (no side effects on import, so tests and bench/gpu_wheels.py import it too). A
built wheel says what it was built for in two places: the version's local tag
(`0.1.0+sm90.torch2.11.0.cu130`, `0.1.0+cpu.torch2.14.1`) and the file `stepwise_ops_C.build.json`
next to the library (torch and CUDA versions, Python tag, CUDA architectures), which bench/gpu_check.sh
reads on the GPU machine before it uses a carried wheel.
"""

from __future__ import annotations

import re
import sys

BASE_VERSION = "0.1.0"
INFO_FILE = "stepwise_ops_C.build.json"


def cuda_archs(arch_list: str | None) -> list[str]:
    """TORCH_CUDA_ARCH_LIST ("9.0", "8.0;8.6;9.0+PTX", "8.6 9.0") as ["sm_80", "sm_86", "sm_90"] (PTX dropped,
    order kept, no duplicates). Raises ValueError on an entry that is not a compute capability."""
    archs: list[str] = []
    for entry in re.split(r"[;\s,]+", (arch_list or "").strip()):
        if not entry:
            continue
        match = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", entry)
        if match is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not a compute capability such as 9.0")
        arch = f"sm_{match.group(1)}{match.group(2)}{match.group(3)}"
        if arch not in archs:
            archs.append(arch)
    return archs


def public_version(torch_version: str) -> str:
    """'2.11.0+cu130' -> '2.11.0'."""
    return torch_version.split("+", 1)[0]


def build_info(torch_version: str, torch_cuda: str | None, with_cuda: bool, arch_list: str | None,
               python: tuple[int, int] | None = None) -> dict:
    """The record written next to the library. ``arch_list``: TORCH_CUDA_ARCH_LIST (None or empty: the
    architectures torch picks for the visible GPUs, recorded as unknown)."""
    major, minor = python or sys.version_info[:2]
    return {
        "library": "stepwise_ops_C",
        "version": wheel_version(torch_version, torch_cuda, with_cuda, arch_list),
        "python": f"cp{major}{minor}",
        "torch": torch_version,
        "torch_requirement": f"torch=={public_version(torch_version)}",
        "cuda": torch_cuda if with_cuda else None,
        "cuda_archs": cuda_archs(arch_list) if with_cuda else [],
        "arch_list": arch_list if with_cuda else None,
    }


def wheel_version(torch_version: str, torch_cuda: str | None, with_cuda: bool, arch_list: str | None) -> str:
    """BASE_VERSION with a local tag naming the architectures, torch and CUDA (PEP 440: letters, digits, dots)."""
    parts = ([a.replace("_", "") for a in cuda_archs(arch_list)] or ["cudaauto"]) if with_cuda else ["cpu"]
    parts.append("torch" + public_version(torch_version))
    if with_cuda and torch_cuda:
        parts.append("cu" + torch_cuda.replace(".", ""))
    local = ".".join(re.sub(r"[^A-Za-z0-9.]", "", p) for p in parts)
    return f"{BASE_VERSION}+{local}"
