"""Build the compiled multi-scale deformable attention kernels (the `stepwise_ops_C` library).

    pip install --no-build-isolation ./ops                  # installs only the compiled library
    python ops/setup.py build_ext --inplace                 # or: next to the Python package, in ops/stepwise_ops/

The CPU kernel is always built. The CUDA kernel is built when `torch.cuda.is_available()` or
FORCE_CUDA=1, and nvcc is found (CUDA_HOME); architectures come from TORCH_CUDA_ARCH_LIST (e.g. "9.0"
or "8.0;8.6;9.0"). FORCE_CUDA=0 forces a CPU-only build. MAX_JOBS limits parallel compile jobs (ninja).

The Python package `stepwise_ops` itself is part of the main `stepwise` distribution; this setup
installs only the extension, as the top-level module `stepwise_ops_C`, so it never shadows an
editable install of the package. A build outside the source tree (a wheel, `build_ext --build-lib DIR`)
also writes `stepwise_ops_C.build.json` next to the library, and the version's local tag names the
CUDA architectures, torch and CUDA (ops/build_info.py); the wheel requires exactly the torch it was
built against.
"""

import json
import os
import sys
from pathlib import Path

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - build-time message
    sys.exit("stepwise_ops: building the kernels needs torch installed; use pip install --no-build-isolation ./ops")

HERE = Path(__file__).resolve().parent
os.chdir(HERE)  # relative source paths and the in-place target must not depend on the caller's cwd
sys.path.insert(0, str(HERE))
from build_info import INFO_FILE, build_info, public_version  # noqa: E402  (ops/build_info.py)


def cuda_problem() -> str | None:
    """Why the CUDA kernel cannot be built here, or None."""
    if torch.version.cuda is None:
        return "this torch is not a CUDA build"
    if CUDA_HOME is None:
        return "nvcc not found (set CUDA_HOME to the CUDA toolkit root)"
    if not any((Path(CUDA_HOME) / lib / "libcudart.so").exists() for lib in ("lib64", "lib")):
        # e.g. CUDA_HOME guessed as /usr/local from a wrapper script /usr/local/bin/nvcc
        return (
            f"no libcudart.so under CUDA_HOME={CUDA_HOME}; "
            "set CUDA_HOME to the toolkit root (e.g. /usr/local/cuda-13.0)"
        )
    return None


def want_cuda() -> bool:
    """FORCE_CUDA=1 builds CUDA (an error if it cannot), FORCE_CUDA=0 never; otherwise when a GPU is visible."""
    force = os.environ.get("FORCE_CUDA")
    wanted = force == "1" if force in ("0", "1") else torch.cuda.is_available()
    problem = cuda_problem() if wanted else None
    if problem and force == "1":
        sys.exit(f"stepwise_ops: FORCE_CUDA=1 but the CUDA kernel cannot be built: {problem}")
    if problem:
        print(f"stepwise_ops: building the CPU kernel only: {problem}", file=sys.stderr)
    return wanted and problem is None


WITH_CUDA = want_cuda()
INFO = build_info(torch.__version__, torch.version.cuda, WITH_CUDA, os.environ.get("TORCH_CUDA_ARCH_LIST"))


class BuildExt(BuildExtension.with_options(no_python_abi_suffix=False)):
    """torch's build_ext, plus the build record next to the library when building outside the source tree."""

    def run(self):
        super().run()
        if not self.inplace:
            Path(self.build_lib).mkdir(parents=True, exist_ok=True)
            (Path(self.build_lib) / INFO_FILE).write_text(json.dumps(INFO, indent=1) + "\n")


def extension():
    sources = ["csrc/ms_deform_attn.cpp", "csrc/ms_deform_attn_cpu.cpp"]
    cxx = ["-O3"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
    if not WITH_CUDA:
        return CppExtension("stepwise_ops_C", sources, extra_compile_args={"cxx": cxx})
    nvcc = ["-O3", "-DSTEPWISE_WITH_CUDA"]
    return CUDAExtension(
        "stepwise_ops_C",
        sources + ["csrc/ms_deform_attn_cuda.cu"],
        extra_compile_args={"cxx": cxx + ["-DSTEPWISE_WITH_CUDA"], "nvcc": nvcc},
    )


setup(
    name="stepwise-ops-kernels",
    version=INFO["version"],
    description="Compiled multi-scale deformable attention kernels for stepwise_ops (CPU and CUDA)",
    # No Python packages: the extension is a top-level module. Its in-place build lands in
    # stepwise_ops/, where the editable `stepwise` install maps the package.
    packages=[],
    package_dir={"": "stepwise_ops"},
    ext_modules=[extension()],
    install_requires=[f"torch=={public_version(torch.__version__)}"],  # the library is tied to torch's ABI
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
