"""Wheels for the GPU machine: every runtime dependency its image lacks, for CPython 3.12 manylinux x86_64.

    python bench/gpu_wheels.py download [--dest .whl] [--max-mib 32]    # here (bench/gpu_wheels.sh)
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
import shutil
import subprocess
import sys
import tempfile
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

# The evaluator may move to hotcoco: carried when PyPI has a wheel for the GPU machine, else skipped.
OPTIONAL_ROOTS = ("hotcoco",)
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
def read_image_packages(path: Path = IMAGE_LIST) -> set[str]:
    """Canonical names of the distributions on the GPU image (one a line, '#' comments)."""
    names = set()
    for line in path.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.add(canonicalize_name(name))
    if not names:
        raise ValueError(f"{path}: no package names")
    return names


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
    return [d for d in deps if not on_image(Requirement(d).name, image)]


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


def download(dest: Path, max_mib: float, pyproject: Path = REPO / "pyproject.toml") -> int:
    """Resolve and download into a fresh folder next to ``dest``, then replace ``dest`` with it."""
    image = read_image_packages()
    roots = project_roots(pyproject, image)
    dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{dest.name}.partial-", dir=dest.parent))
    try:
        wheels, from_image, skipped = resolve(roots, image, staging)
        manifest = {
            "python": "cp312", "platforms": f"manylinux x86_64, glibc <= 2.{GLIBC_MAX}",
            "roots": [canonicalize_name(Requirement(r).name) for r in roots] + [
                canonicalize_name(r) for r in OPTIONAL_ROOTS if canonicalize_name(r) in wheels],
            "skipped_optional": skipped,
            "from_image": {k: sorted(set(v)) for k, v in sorted(from_image.items())},
            "wheels": [{"name": w.name, "version": w.version, "file": w.path.name, "bytes": w.size,
                        "sha256": sha256(w.path), "required_by": sorted(set(w.required_by))}
                       for w in sorted(wheels.values(), key=lambda w: w.name)],
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
    total = sum(w["bytes"] for w in manifest["wheels"])
    print(f"{'distribution':26} {'version':10} {'KiB':>8}  required by")
    for w in manifest["wheels"]:
        print(f"{w['name']:26} {w['version']:10} {w['bytes'] / 1024:8.0f}  {', '.join(w['required_by'])}")
    print(f"from the image (not carried): {', '.join(manifest['from_image'])}")
    for line in skipped:
        print(f"optional root skipped: {line}")
    print(f"total: {len(manifest['wheels'])} wheels, {total / 2**20:.2f} MiB in {dest} (limit {max_mib:g} MiB)")
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
    for entry in manifest.get("wheels", []):
        path = folder / entry["file"]
        if path.is_file() and entry.get("sha256") and sha256(path) != entry["sha256"]:
            problems.append(f"{entry['file']}: sha256 differs from {MANIFEST}")
    return problems


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
    ck = sub.add_parser("check", help="check a wheel folder, and an install of it with --target")
    ck.add_argument("--wheels", type=Path, default=REPO / ".whl")
    ck.add_argument("--target", type=Path, default=None, help="a `pip install --target` folder of those wheels")
    ck.add_argument("--import", dest="imports", choices=("all", "self-contained", "none"), default="all")
    args = parser.parse_args(argv)
    if args.command == "download":
        return download(args.dest, args.max_mib)
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
