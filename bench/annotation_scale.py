"""Annotation files of LVIS v1 train size: loading, DataLoader workers, RFS, selection and bad input,
BEFORE (``json.load`` and Python objects, e.g. the ``main`` checkout) and AFTER (this tree's
``stepwise.data.annotation_index``).

    python bench/annotation_scale.py [--before /work/main] [--after .] [--cache /tmp/stepwise_annscale]
                                     [--images 100000 --annotations 1270000] [--workers 4] [--items 800]
                                     [--parts load,select,bad]

The annotation file is synthetic and generated once (streamed to disk, cached under ``--cache``): 100k
images, 1.27M boxes each with one polygon of 24-56 points (mean 40; LVIS averages ~35), 1,203 categories with
LVIS's r/c/f split (337/461/405) and their image/instance counts, LVIS v1's keys (``coco_url``,
``neg_category_ids``, ``not_exhaustive_category_ids``, ...), annotations in random image order. About 1 GB.
No image is rendered: the DataLoader runs over the targets alone (``raw_target`` with the annotated size).

Each measurement runs in a fresh process with ``PYTHONPATH`` set to the tree measured, so BEFORE is the
other checkout's code unchanged. Printed per tree (and as after/before ratios):

* ``load``: seconds to build ``LVISDetection`` (annotation file -> dataset), RSS after it, peak RSS;
* ``loader``: sum over the main process and its workers of RSS / PSS / USS after iterating ``--items``
  targets with 0 and with ``--workers`` workers (PSS counts shared pages once: the fork's real cost);
* ``select``: seconds of the selection-side statistics on all annotations: the category map of the full
  file (``stages.parts.full_categories``), generic RFS factors (``repeat_factors_from_dataset``), step-wise RFS
  (``stages.parts.replay_repeat_factors``), and ``select.build_replay_sets`` (reads a 1.27M-line
  ``scores.jsonl``, selects, writes ``d_head.json`` / ``d_tail.json``);
* ``bad``: the same file with one broken annotation in the middle (``bbox`` with a string): time to the
  error, its message (it must name the file, the annotation id and the image id) and that no replay set
  was written.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NUM_RARE, NUM_COMMON, NUM_FREQUENT = 337, 461, 405  # LVIS v1's 1,203 categories
POLYGON_POOL = 4096


# --------------------------------------------------------------------------------------- generation
def _plan(num_images: int, num_anns: int, seed: int) -> dict[str, np.ndarray]:
    """Per annotation (in file order): image index, category index; per image: width, height."""
    rng = np.random.default_rng(seed)
    rare = rng.integers(1, 11, NUM_RARE)        # LVIS: rare = 1-10 training images
    common = rng.integers(11, 101, NUM_COMMON)  # common = 11-100
    budget = num_anns - int(rare.sum() + common.sum())
    weights = 1.0 / (np.arange(NUM_FREQUENT) + 10.0) ** 1.1
    extra = budget - 150 * NUM_FREQUENT  # frequent classes: at least 150 instances (> 100 images)
    if extra < 0:
        raise ValueError(f"{num_anns} annotations are too few for 1,203 LVIS-like categories")
    frequent = 150 + np.floor(weights / weights.sum() * extra).astype(np.int64)
    frequent[0] += budget - int(frequent.sum())  # exact total
    counts = np.concatenate([rare, common, frequent])
    cats = np.repeat(np.arange(len(counts)), counts)
    images = np.empty(num_anns, dtype=np.int64)
    start = 0
    for c, n in enumerate(counts):  # rare/common: one instance per image (image count = instance count)
        images[start:start + n] = (rng.choice(num_images, int(n), replace=False) if c < NUM_RARE + NUM_COMMON
                                   else rng.integers(0, num_images, int(n)))
        start += n
    order = rng.permutation(num_anns)  # LVIS files are not grouped by image
    return {"image": images[order], "category": cats[order], "width": rng.integers(320, 641, num_images),
            "height": rng.integers(240, 641, num_images), "seed": np.array([seed])}


def _polygons(rng: np.random.Generator) -> list[str]:
    """A pool of polygon texts of 24-56 points (two decimals, as LVIS writes them)."""
    pool = []
    for _ in range(POLYGON_POOL):
        n = int(rng.integers(24, 57))
        xy = rng.uniform(0, 640, 2 * n).round(2)
        pool.append("[[" + ", ".join(f"{v:.2f}" for v in xy) + "]]")
    return pool


def generate(path: Path, num_images: int, num_anns: int, seed: int = 0, broken: int | None = None) -> Path:
    """Write the synthetic LVIS-train-like file to ``path`` streaming (``broken``: the annotation row whose
    bbox gets a string), atomically; returns ``path``."""
    plan = _plan(num_images, num_anns, seed)
    rng = np.random.default_rng(seed + 1)
    pool = _polygons(rng)
    image_ids = np.arange(1, num_images + 1) * 7 + 100  # not contiguous, not 0-based
    cat_ids = np.arange(1, NUM_RARE + NUM_COMMON + NUM_FREQUENT + 1)
    pairs = np.unique(plan["category"] * num_images + plan["image"])
    image_count = np.bincount(pairs // num_images, minlength=len(cat_ids))
    instance_count = np.bincount(plan["category"], minlength=len(cat_ids))
    w, h = plan["width"][plan["image"]], plan["height"][plan["image"]]
    bx = rng.uniform(0, 0.8, num_anns) * w
    by = rng.uniform(0, 0.8, num_anns) * h
    bw = np.maximum(1.0, rng.uniform(0.02, 1.0, num_anns) * (w - bx))
    bh = np.maximum(1.0, rng.uniform(0.02, 1.0, num_anns) * (h - by))
    boxes = np.round(np.stack([bx, by, bw, bh], 1), 2)
    area = np.round(bw * bh * 0.7, 2)
    poly = rng.integers(0, POLYGON_POOL, num_anns)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as f:
        f.write('{"info": {"description": "stepwise bench: LVIS v1 train-size synthetic annotations", '
                '"year": 2026}, "annotations": [')
        step = 50_000
        for s in range(0, num_anns, step):
            rows = []
            for k in range(s, min(s + step, num_anns)):
                x, y, bw_, bh_ = boxes[k]
                box = f"[{x}, {y}, \"{bw_}\", {bh_}]" if k == broken else f"[{x}, {y}, {bw_}, {bh_}]"
                rows.append(f'{{"area": {area[k]}, "id": {k + 1}, "segmentation": {pool[poly[k]]}, '
                            f'"image_id": {image_ids[plan["image"][k]]}, "bbox": {box}, '
                            f'"category_id": {cat_ids[plan["category"][k]]}}}')
            f.write((", " if s else "") + ", ".join(rows))
        f.write('], "images": [')
        rows = []
        for i in range(num_images):
            neg = cat_ids[rng.integers(0, len(cat_ids), int(rng.integers(0, 16)))].tolist()
            nex = cat_ids[rng.integers(0, len(cat_ids), int(rng.integers(0, 3)))].tolist()
            name = f"{image_ids[i]:012d}.jpg"
            rows.append(f'{{"date_captured": "2013-11-14 16:28:13", "neg_category_ids": {neg}, "id": {image_ids[i]}, '
                        f'"license": 1, "height": {plan["height"][i]}, "width": {plan["width"][i]}, '
                        f'"flickr_url": "http://farm4.staticflickr.com/1/{name}", '
                        f'"coco_url": "http://images.cocodataset.org/train2017/{name}", '
                        f'"not_exhaustive_category_ids": {nex}}}')
        f.write(", ".join(rows))
        f.write('], "licenses": [{"id": 1, "name": "bench", "url": ""}], "categories": [')
        rows = []
        for k, cid in enumerate(cat_ids):
            freq = "r" if k < NUM_RARE else "c" if k < NUM_RARE + NUM_COMMON else "f"
            rows.append(json.dumps({"frequency": freq, "synset": f"thing_{cid}.n.01", "synonyms": [f"thing_{cid}"],
                                    "def": "a synthetic category", "id": int(cid), "name": f"thing_{cid}",
                                    "image_count": int(image_count[k]), "instance_count": int(instance_count[k])}))
        f.write(", ".join(rows) + "]}")
    os.replace(tmp, path)
    return path


def ensure_file(cache: Path, num_images: int, num_anns: int, broken: bool = False) -> Path:
    """The cached file of this size (generated on first use)."""
    name = f"lvis_train_synth_{num_images}_{num_anns}{'_broken' if broken else ''}.json"
    path = cache / name
    if not path.is_file():
        t0 = time.perf_counter()
        generate(path, num_images, num_anns, broken=num_anns // 2 if broken else None)
        print(f"generated {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s",
              flush=True)
    return path


def ensure_scores(cache: Path, num_images: int, num_anns: int) -> Path:
    """A ``scores.jsonl`` for every annotation of the cached file (as ``stage=select`` writes it), cached."""
    path = cache / f"scores_{num_images}_{num_anns}.jsonl"
    if path.is_file():
        return path
    plan = _plan(num_images, num_anns, 0)
    rng = np.random.default_rng(7)
    score, iou, top = rng.random(num_anns).round(6), rng.random(num_anns).round(6), rng.random(num_anns).round(6)
    image_ids = np.arange(1, num_images + 1) * 7 + 100
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for s in range(0, num_anns, 100_000):
            f.write("".join(
                f'{{"ann_id": {k + 1}, "image_id": {image_ids[plan["image"][k]]}, "category_id": '
                f'{plan["category"][k] + 1}, "label": {plan["category"][k]}, "score": {score[k]}, "iou": {iou[k]}, '
                f'"max_score": {max(top[k], score[k])}}}\n' for k in range(s, min(s + 100_000, num_anns))))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------- measuring
def _memory() -> dict[str, float]:
    """MiB of this process and its children: rss, pss, uss summed over them, and this process's rss."""
    import psutil

    me = psutil.Process()
    procs = [me] + me.children(recursive=True)
    out = {"processes": len(procs), "rss": 0.0, "pss": 0.0, "uss": 0.0}
    for p in procs:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        out["rss"] += info.rss / 2**20
        out["pss"] += info.pss / 2**20
        out["uss"] += info.uss / 2**20
    out["main_rss"] = me.memory_info().rss / 2**20
    return out


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TargetsOnly:
    """The dataset's targets without images: item i is ``raw_target(i, annotated size)`` (a DataLoader over
    the annotation side alone; no image is rendered or read)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset.raw_target(i, self.dataset.expected_size(i) or (1, 1))


def _dataset(ann: str):
    import warnings

    from stepwise.data.lvis_dataset import LVISDetection

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LVISDetection(ann, "/nonexistent-image-root")


def child_load(args) -> dict:
    import stepwise
    from stepwise.data.lvis_dataset import LVISDetection  # noqa: F401  (imports are not the load)

    start = _memory()["main_rss"]
    t0, c0 = time.perf_counter(), time.process_time()
    ds = _dataset(args.ann)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    mem = _memory()
    return {"stepwise": stepwise.__file__, "images": len(ds), "boxes": ds.num_boxes, "load_s": seconds, "load_cpu_s": cpu,
            "rss_before_mib": start, "rss_mib": mem["main_rss"], "uss_mib": mem["uss"], "peak_mib": _peak_mib()}


def child_loader(args) -> dict:
    import torch
    from torch.utils.data import DataLoader

    ds = _dataset(args.ann)
    out = {"after_load": _memory()}
    checkpoints = sorted(int(v) for v in args.items.split(","))
    for workers in (0, args.workers):
        loader = DataLoader(TargetsOnly(ds), batch_size=8, shuffle=True, num_workers=workers,
                            collate_fn=list, generator=torch.Generator().manual_seed(0))
        seen, marks = 0, list(checkpoints)
        it = iter(loader)
        while marks:
            seen += len(next(it))
            if seen >= marks[0]:
                out[f"workers{workers}_items{marks.pop(0)}"] = _memory()
        del it  # shuts the workers down
    return out


def _cfg(ann: str, out: str):
    from stepwise.config import load_config

    return load_config(["stage=finetune", f"data.train_ann={ann}", f"output_root={out}", "exp=bench"])


class _Timer:
    """``with timer("name"):`` records wall and CPU seconds of the block as ``name_s`` / ``name_cpu_s``."""

    def __init__(self, out: dict) -> None:
        self.out = out

    def __call__(self, name: str) -> "_Timer":
        self.name = name
        return self

    def __enter__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def __exit__(self, *exc) -> None:
        self.out[f"{self.name}_s"] = time.perf_counter() - self.t0
        self.out[f"{self.name}_cpu_s"] = time.process_time() - self.c0


def child_select(args) -> dict:
    import tempfile

    from stepwise.data import repeat_factors_from_dataset
    from stepwise.stages import select
    from stepwise.stages.parts import full_categories, replay_repeat_factors

    out: dict = {}
    timer = _Timer(out)
    work = Path(tempfile.mkdtemp(prefix="annscale_select_", dir=args.cache))
    cfg = _cfg(args.ann, str(work))
    with timer("full_categories"):
        categories = full_categories(cfg)
    with timer("dataset"):
        ds = _dataset(args.ann)
    with timer("generic_rfs"):
        generic = repeat_factors_from_dataset(ds, 0.001)
    with timer("stepwise_rfs"):
        factors, _, report = replay_repeat_factors(cfg, ds, categories)
    out["rfs_sums"] = [float(generic.sum()), float(factors.sum()), report["repeated_length"]]
    with timer("build_replay_sets"):
        summary = select.build_replay_sets(cfg, Path(args.scores), work)
    out["replay_sets"] = {name: summary[name]["annotations"] for name in ("d_head", "d_tail")}
    out["replay_bytes"] = {name: (work / f"{name}.json").stat().st_size for name in ("d_head", "d_tail")}
    out["peak_mib"] = _peak_mib()
    for name in ("d_head.json", "d_tail.json", "summary.json"):
        (work / name).unlink(missing_ok=True)
    work.rmdir()
    return out


def child_bad(args) -> dict:
    import tempfile

    from stepwise.stages import select

    out: dict = {}
    timer = _Timer(out)
    with timer("dataset"):
        try:
            _dataset(args.ann)
            out["dataset_error"] = None
        except (ValueError, KeyError, TypeError) as err:
            out["dataset_error"] = f"{type(err).__name__}: {err}"
    work = Path(tempfile.mkdtemp(prefix="annscale_bad_", dir=args.cache))
    (work / "d_head.json").write_text("previous replay set")
    with timer("select"):
        try:
            select.build_replay_sets(_cfg(args.ann, str(work)), Path(args.scores), work)
            out["select_error"] = None
        except (ValueError, KeyError, TypeError) as err:
            out["select_error"] = f"{type(err).__name__}: {err}"
    out["files_after"] = sorted(p.name for p in work.iterdir())
    out["previous_kept"] = (work / "d_head.json").read_text() == "previous replay set"
    for p in work.iterdir():
        p.unlink()
    work.rmdir()
    out["peak_mib"] = _peak_mib()
    return out


CHILDREN = {"load": child_load, "loader": child_loader, "select": child_select, "bad": child_bad}


def run_child(part: str, tree: Path, ann: Path, args) -> dict:
    """One part in a fresh process whose ``stepwise`` is ``tree``'s."""
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", part, "--ann", str(ann),
           "--scores", str(args.scores), "--cache", str(args.cache), "--items", args.items,
           "--workers", str(args.workers)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"failed": proc.returncode, "stderr": proc.stderr[-2000:], "wall_s": time.perf_counter() - t0}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.3f}" if before else "-"


def report(results: dict) -> None:
    """Print the figures of each part, BEFORE and AFTER, and after/before ratios."""
    b, a = results.get("before", {}), results.get("after", {})
    if "load" in a:
        print("\n## load (LVISDetection of the whole file)")
        print("| tree | load wall s | load CPU s | RSS before MiB | RSS after MiB | USS MiB | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|")
        for name, r in (("before", b.get("load")), ("after", a.get("load"))):
            if r and "failed" not in r:
                print(f"| {name} | {r['load_s']:.1f} | {r['load_cpu_s']:.1f} | {r['rss_before_mib']:.0f} | "
                      f"{r['rss_mib']:.0f} | {r['uss_mib']:.0f} | {r['peak_mib']:.0f} |")
        if b.get("load") and "failed" not in b["load"]:
            rb, ra = b["load"], a["load"]
            print(f"after/before: load wall {_ratio(ra['load_s'], rb['load_s'])}, CPU "
                  f"{_ratio(ra['load_cpu_s'], rb['load_cpu_s'])}, RSS added by the load "
                  f"{_ratio(ra['rss_mib'] - ra['rss_before_mib'], rb['rss_mib'] - rb['rss_before_mib'])}, "
                  f"peak RSS {_ratio(ra['peak_mib'], rb['peak_mib'])}")
    if "loader" in a:
        print("\n## DataLoader over the targets (sums over the main process and its workers, MiB)")
        print("| tree | point | processes | RSS | PSS | USS |")
        print("|---|---|---|---|---|---|")
        for name, r in (("before", b.get("loader")), ("after", a.get("loader"))):
            if r and "failed" not in r:
                for point, m in r.items():
                    if isinstance(m, dict):
                        print(f"| {name} | {point} | {m['processes']} | {m['rss']:.0f} | {m['pss']:.0f} | "
                              f"{m['uss']:.0f} |")
        if b.get("loader") and "failed" not in b["loader"]:
            for point in a["loader"]:
                if isinstance(a["loader"][point], dict) and point in b["loader"]:
                    print(f"after/before {point}: PSS {_ratio(a['loader'][point]['pss'], b['loader'][point]['pss'])}, "
                          f"USS {_ratio(a['loader'][point]['uss'], b['loader'][point]['uss'])}")
    if "select" in a:
        print("\n## selection side on every annotation (seconds: wall / CPU)")
        keys = ("full_categories", "dataset", "generic_rfs", "stepwise_rfs", "build_replay_sets")
        print("| tree | " + " | ".join(keys) + " | peak RSS MiB |")
        print("|---" * (len(keys) + 2) + "|")
        for name, r in (("before", b.get("select")), ("after", a.get("select"))):
            if r and "failed" not in r:
                print(f"| {name} | " + " | ".join(f"{r[k + '_s']:.2f} / {r[k + '_cpu_s']:.2f}" for k in keys)
                      + f" | {r['peak_mib']:.0f} |")
        if b.get("select") and "failed" not in b["select"]:
            print("after/before (CPU): " + ", ".join(
                f"{k} {_ratio(a['select'][k + '_cpu_s'], b['select'][k + '_cpu_s'])}" for k in keys)
                  + f", peak RSS {_ratio(a['select']['peak_mib'], b['select']['peak_mib'])}")
            print(f"same results: RFS sums {b['select']['rfs_sums'] == a['select']['rfs_sums']}, replay-set sizes "
                  f"{b['select']['replay_sets'] == a['select']['replay_sets']}")
    if "bad" in a:
        print("\n## one broken annotation in the middle (bbox with a string)")
        for name, r in (("before", b.get("bad")), ("after", a.get("bad"))):
            if r and "failed" not in r:
                print(f"- {name}: dataset {r['dataset_s']:.1f} s ({r['dataset_cpu_s']:.1f} s CPU) -> "
                      f"{r['dataset_error']!r:.400}")
                print(f"  select {r['select_s']:.1f} s ({r['select_cpu_s']:.1f} s CPU) -> {r['select_error']!r:.400}; "
                      f"files in the run dir after: "
                      f"{r['files_after']}, previous d_head.json kept: {r['previous_kept']}; peak RSS {r['peak_mib']:.0f} MiB")
    for name, res in results.items():
        for part, r in res.items():
            if "failed" in r:
                print(f"\n{name} {part} FAILED (exit {r['failed']}): {r['stderr']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, default=Path("/work/main"), help="checkout measured as BEFORE")
    parser.add_argument("--after", type=Path, default=ROOT, help="checkout measured as AFTER (this one)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/stepwise_annscale"))
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--annotations", type=int, default=1_270_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--items", default="800", help="targets iterated before measuring (comma list: several points)")
    parser.add_argument("--parts", default="load,loader,select,bad")
    parser.add_argument("--trees", default="before,after")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ann", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scores", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return 0
    ann = ensure_file(args.cache, args.images, args.annotations)
    args.scores = ensure_scores(args.cache, args.images, args.annotations)
    parts = args.parts.split(",")
    broken = ensure_file(args.cache, args.images, args.annotations, broken=True) if "bad" in parts else None
    print(f"file {ann}: {ann.stat().st_size / 2**30:.2f} GiB; load average {os.getloadavg()}", flush=True)
    results: dict[str, dict] = {}
    for part in parts:
        for name in args.trees.split(","):
            tree = args.before if name == "before" else args.after
            t0 = time.perf_counter()
            results.setdefault(name, {})[part] = run_child(part, tree, broken if part == "bad" else ann, args)
            print(f"{name} {part}: {time.perf_counter() - t0:.0f} s (load average {os.getloadavg()[0]:.1f})",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
