#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels of every runtime dependency the GPU machine's image lacks,
# for its CPython 3.12 on manylinux x86_64, and prints their total size. Run here (PyPI is reachable),
# then carry them: run(command="bench/gpu_check.sh", carry=[".whl"]). See bench/gpu_wheels.py for the
# resolution rules; extra arguments go to it (e.g. --max-mib 24, --dest DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_wheels.py download "$@"
