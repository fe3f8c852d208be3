"""Find the CUDA toolkit root to build the op with (CUDA_HOME), even where `nvcc` on the PATH is a wrapper.

    python3 bench/cuda_home.py            # prints the root; exit 1 (reasons on stderr) when none is usable
    python3 bench/cuda_home.py --verbose  # also every candidate and why it was taken or refused

torch guesses CUDA_HOME as the parent of the folder holding the first `nvcc` on the PATH; where that is a
wrapper script (/usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc on the project's machines) the
guess is /usr/local, which has no toolkit. Candidates, in order: $CUDA_HOME, $CUDA_PATH; the real file
behind `nvcc` on the PATH (through symbolic links), or every absolute path to an nvcc that the wrapper
script names; /usr/local/cuda, /usr/local/cuda-X.Y (newest first), /opt/cuda; the toolkit inside
Python's nvidia/cu* packages. A root is usable when it has bin/nvcc that is a compiled program (not a
script), include/cuda_runtime.h and libcudart.so under lib64/, lib/ or targets/x86_64-linux/lib/. Among
usable roots the first whose nvcc release matches torch.version.cuda (major) wins, else the first.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

LIB_DIRS = ("lib64", "lib", "targets/x86_64-linux/lib")
NVCC_IN_SCRIPT = re.compile(r"(/[\w.+/-]*/bin/nvcc)\b")


def is_program(path: Path) -> bool:
    """Whether ``path`` is a compiled (ELF) executable rather than a script."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def problem(root: Path) -> str | None:
    """None when ``root`` is a usable toolkit root, else what it lacks."""
    nvcc = root / "bin" / "nvcc"
    if not nvcc.exists():
        return "no bin/nvcc"
    if not is_program(nvcc.resolve()):
        return "bin/nvcc is not a compiled program (a wrapper script?)"
    if not (root / "include" / "cuda_runtime.h").is_file():
        return "no include/cuda_runtime.h"
    if not any((root / d / "libcudart.so").exists() for d in LIB_DIRS):
        return f"no libcudart.so under {', '.join(LIB_DIRS)}"
    return None


def roots_from_nvcc(nvcc: Path) -> list[Path]:
    """Toolkit roots behind one `nvcc`: its real file's grandparent, or the nvcc paths its script names."""
    real = nvcc.resolve()
    if is_program(real):
        return [real.parent.parent]
    try:
        text = real.read_text(errors="replace")[:65536]
    except OSError:
        return []
    return [Path(m).parent.parent for m in NVCC_IN_SCRIPT.findall(text)]


def _version_key(path: Path) -> tuple:
    return tuple(int(x) if x.isdigit() else -1 for x in re.split(r"[.-]", path.name.removeprefix("cuda-")))


def candidates(env: dict[str, str] | None = None, search_path: str | None = None,
               prefixes: tuple[str, ...] = ("/usr/local", "/opt")) -> list[tuple[Path, str]]:
    """(root, where it came from) in the order they are tried, without duplicates (by real path)."""
    env = os.environ if env is None else env
    found: list[tuple[Path, str]] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            found.append((Path(env[var]), f"${var}"))
    nvcc = shutil.which("nvcc", path=search_path if search_path is not None else env.get("PATH", ""))
    if nvcc:
        found += [(root, f"nvcc on the PATH ({nvcc})") for root in roots_from_nvcc(Path(nvcc))]
    for prefix in prefixes:
        base = Path(prefix)
        found.append((base / "cuda", "default location"))
        versions = sorted(base.glob("cuda-*"), key=_version_key, reverse=True) if base.is_dir() else []
        found += [(p, "default location") for p in versions]
    try:
        import nvidia  # the pip-installed CUDA components (e.g. nvidia/cu13)

        for base in getattr(nvidia, "__path__", []):
            found += [(p, "Python nvidia package") for p in sorted(Path(base).glob("cu[0-9]*"), reverse=True)]
    except ImportError:
        pass
    unique, seen = [], set()
    for root, origin in found:
        key = root.resolve() if root.exists() else root
        if key not in seen:
            seen.add(key)
            unique.append((root, origin))
    return unique


def nvcc_release(root: Path) -> str | None:
    """The 'release X.Y' of root/bin/nvcc --version, or None."""
    try:
        out = subprocess.run([str(root / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def torch_cuda() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def find_cuda_home(env: dict[str, str] | None = None, search_path: str | None = None,
                   prefixes: tuple[str, ...] = ("/usr/local", "/opt"), want: str | None = None,
                   log=None) -> Path | None:
    """The toolkit root to build with (module docstring), or None. ``want``: the CUDA version torch was
    built with (default torch.version.cuda); ``log(line)`` receives one line per candidate."""
    want = torch_cuda() if want is None else want
    usable: list[tuple[Path, str | None]] = []
    for root, origin in candidates(env, search_path, prefixes):
        why = problem(root)
        release = nvcc_release(root) if why is None else None
        if log:
            log(f"{root} ({origin}): " + (f"usable, nvcc release {release}" if why is None else f"refused: {why}"))
        if why is None:
            usable.append((root, release))
    if not usable:
        return None
    if want:
        for root, release in usable:
            if release and release.split(".")[0] == want.split(".")[0]:
                return root
    return usable[0][0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="print every candidate to stderr")
    args = parser.parse_args(argv)
    lines: list[str] = []
    root = find_cuda_home(log=lines.append)
    if args.verbose or root is None:
        print("\n".join(lines) or "no candidates", file=sys.stderr)
    if root is None:
        print("cuda_home: no usable CUDA toolkit (bin/nvcc program, include/cuda_runtime.h, libcudart.so)",
              file=sys.stderr)
        return 1
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
