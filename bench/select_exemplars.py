"""Exemplar selection (``stage=select``) throughput and peak memory on a built-in preset.

    python bench/select_exemplars.py [--preset large] [--sizes 500,2000,all] [--batch 8] [--model tiny]

Generates the preset if needed, saves an untrained detector of the preset's classes (scoring cost does not
depend on the weights), then for each number of training images runs ``stage=select`` in a fresh process
and prints: images scored, scoring images/s, selection time, and the process's peak resident memory.
Scoring streams its records to disk, so the peak memory should stay flat as the number of images grows;
the last column is each run's peak memory as a ratio to the smallest run's (the peer in the same run).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(out: str, checkpoint: str, data_root: str, preset: str, images: str, batch: int) -> None:
    """One measured run (in its own process): score, select, report."""
    import torch

    from stepwise.config import load_config
    from stepwise.stages import select

    torch.set_num_threads(max(1, torch.get_num_threads()))
    overrides = [f"checkpoint={checkpoint}", f"data.preset={preset}", f"data.root={data_root}",
                 f"output_root={out}", "exp=bench", "stage=select", f"stage.batch_size={batch}"]
    if images != "all":
        overrides.append(f"stage.max_images={int(images)}")
    cfg = load_config(overrides)
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scored = select.score_dataset(cfg, accelerator, run_dir / select.SCORES_NAME)
    t1 = time.perf_counter()
    summary = select.build_replay_sets(cfg, run_dir / select.SCORES_NAME, run_dir)
    t2 = time.perf_counter()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": scored, "instances": summary["scored_instances"], "score_s": t1 - t0,
                      "select_s": t2 - t1, "peak_mib": peak_mib}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="large")
    parser.add_argument("--sizes", default="500,2000,all", help="numbers of training images to score")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--data-root", default=None, help="default data_cache/synthetic_<preset>_seed0")
    args = parser.parse_args(argv)

    import torch
    from omegaconf import OmegaConf

    from stepwise.checkpoint import head_state, save_checkpoint
    from stepwise.config import load_config
    from stepwise.data.annotation_index import AnnotationIndex
    from stepwise.data.categories import CategoryMap
    from stepwise.data.synthetic import ensure_synthetic
    from stepwise.models import build_detector

    data_root = args.data_root or str(ROOT / "data_cache" / f"synthetic_{args.preset}_seed0")
    t0 = time.perf_counter()
    ensure_synthetic(data_root, args.preset, 0)
    cfg = load_config([f"model={args.model}", f"data.preset={args.preset}", f"data.root={data_root}"])
    train = AnnotationIndex.read(cfg.data.train_ann, "training annotation file")
    categories = CategoryMap.from_index(train)
    print(f"preset {args.preset}: {train.num_images} training images, {train.num_annotations} instances, "
          f"{len(categories)} classes (ready in {time.perf_counter() - t0:.0f}s); model {args.model}, "
          f"batch {args.batch}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = build_detector(cfg.model, cfg.head, categories).model
        checkpoint = save_checkpoint({"model": model.state_dict(), "head_state": head_state(model),
                                      "categories": categories.to_dict(),
                                      "config": OmegaConf.to_container(cfg, resolve=True)}, Path(tmp) / "model.pt")
        rows = []
        for size in args.sizes.split(","):
            cmd = [sys.executable, __file__, "--child", str(Path(tmp) / f"run_{size}"), str(checkpoint), data_root,
                   args.preset, size, str(args.batch)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                print(result.stdout[-2000:] + result.stderr[-4000:], file=sys.stderr)
                return 1
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_mib"]
    print(f"\n{'images':>7} {'instances':>9} {'score s':>8} {'images/s':>8} {'select s':>8} {'peak MiB':>9} "
          f"{'vs first':>8}")
    for r in rows:
        print(f"{r['images']:>7} {r['instances']:>9} {r['score_s']:>8.1f} {r['images'] / r['score_s']:>8.1f} "
              f"{r['select_s']:>8.2f} {r['peak_mib']:>9.0f} {r['peak_mib'] / base:>8.2f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:7], int(sys.argv[7]))
    else:
        sys.exit(main())
