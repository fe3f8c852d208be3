"""CPU training throughput on a busy machine: the old thread setting (torch's fixed count) against the new one
(``STEPWISE_CPU_THREADS=auto``, stepwise/utils/cpu_threads.py), idle and beside competing processes, in one run.

    python bench/cpu_contention.py                       # tiny model, batch 4, 128x128, 20 s per cell
    python bench/cpu_contention.py --seconds 40 --repeats 2 --json contention.json

Each cell is a fresh process that trains the tiny Deformable DETR (stepwise's model, criterion and fused AdamW on
a fixed random batch, as bench/train_throughput.py) for ``--warmup`` seconds, then counts the images it trains in
``--seconds`` more, calling ``cpu_threads.tick`` between steps as the engine's training loop does. Competitors,
started before the cell and stopped after it by this script:

- ``busy x1`` / ``busy x2``: one / two ``while True: pass`` Python processes (a 1-core busy process each);
- ``train (old)``: another training process with its own threads and the old setting (``stepwise.study jobs=2``
  without the fix, an evaluation, a second experiment);
- ``train (new)``: the same with the new setting (two stepwise runs side by side);
- ``render``: ``stepwise.make_synthetic``'s data generation (one rendering process per CPU) over and over.

``--settings`` adds the other candidates: ``passive`` (``OMP_WAIT_POLICY=PASSIVE``: sleeping waits), ``spin1k``
(``GOMP_SPINCOUNT=1000``), ``1-thread`` (``OMP_NUM_THREADS=1``), each with the count fixed.

CPU s / image: the trainer's own CPU time per image; where it grows beside a competitor while images/s falls,
the threads are spinning at barriers instead of computing.

Ratios: a cell's images/s over the idle figure of the old setting measured in the same run. The machine should be
otherwise idle: the script prints the other processes' CPU load measured during each idle cell.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # old = torch's fixed count with libgomp's defaults, as before; the rest are the candidates measured
    "old": {"STEPWISE_CPU_THREADS": "fixed"}, "new": {"STEPWISE_CPU_THREADS": "auto"},
    "passive": {"STEPWISE_CPU_THREADS": "fixed", "OMP_WAIT_POLICY": "PASSIVE"},
    "spin1k": {"STEPWISE_CPU_THREADS": "fixed", "GOMP_SPINCOUNT": "1000"},
    "1-thread": {"STEPWISE_CPU_THREADS": "fixed", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}
COMPETITORS = ("idle", "busy x1", "busy x2", "train (old)", "train (new)", "render")
BUSY = [sys.executable, "-c", "while True: pass"]
# make_synthetic's renders (a process per CPU), again and again into a temporary directory
RENDER = [sys.executable, "-c", "import itertools, shutil, sys, tempfile\n"
          "from stepwise.data.synthetic import generate\n"
          "with tempfile.TemporaryDirectory() as tmp:\n"
          "    for seed in itertools.count():\n"
          "        generate(f'{tmp}/d', 'large', seed, verbose=False); shutil.rmtree(f'{tmp}/d')"]


# --------------------------------------------------------------------------------------------- the cell
def train_worker(warmup_s: float, seconds: float, batch: int, size: tuple[int, int]) -> dict:
    """Train the tiny model for ``warmup_s`` + ``seconds`` (``seconds`` <= 0: until killed); returns images/s over
    the measured part, the thread counts used and the other processes' load (CPUs) over it."""
    import torch
    from omegaconf import OmegaConf

    from stepwise.config import load_config
    from stepwise.models import build_detector, param_groups
    from stepwise.utils import cpu_threads

    cfg = load_config(["model=tiny", "model.backbone_weights=null", "head=sigmoid"])
    torch.manual_seed(0)
    classes = 80
    model, criterion, _ = build_detector(cfg.model, cfg.head, classes, cfg.loss)
    model.train()
    stage = OmegaConf.to_container(cfg.stage, resolve=True)
    optimizer = torch.optim.AdamW(param_groups(model, stage), fused=True)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *size, generator=g)
    targets = [{"labels": torch.randint(classes, (6,), generator=g),
                "boxes": torch.cat([0.2 + 0.6 * torch.rand(6, 2, generator=g), 0.05 + 0.3 * torch.rand(6, 2, generator=g)], 1)}
               for _ in range(batch)]

    def step() -> None:
        cpu_threads.tick("cpu")
        loss = criterion.total(criterion(model(images), targets))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cpus = cpu_threads.usable_cpus()
    start = time.monotonic()
    while time.monotonic() - start < warmup_s or seconds <= 0:
        step()
    before, count = cpu_threads.read_sample(cpus), 0
    while time.monotonic() - before.wall < seconds:
        step()
        count += 1
    after = cpu_threads.read_sample(cpus)
    return {"img_s": count * batch / (after.wall - before.wall), "threads": sorted(cpu_threads.used_counts()),
            "other_load": cpu_threads.other_load(before, after),
            "cpu_s_per_img": (after.own - before.own) / max(1, count * batch)}


def run_cell(setting: str, competitor: str, args: argparse.Namespace) -> dict:
    """One measurement: start the competitors, train in a fresh process with ``setting``, stop them."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(SETTINGS[setting])
    worker = [sys.executable, __file__, "--worker", "--warmup", str(args.warmup), "--batch", str(args.batch),
              "--size", *map(str, args.size)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    others = []
    if competitor.startswith("busy"):
        others = [subprocess.Popen(BUSY, **quiet) for _ in range(int(competitor[-1]))]
    elif competitor.startswith("train"):
        mode = "old" if "old" in competitor else "new"
        others = [subprocess.Popen([*worker, "--seconds", "0"], env={**os.environ, **SETTINGS[mode]}, **quiet)]
    elif competitor == "render":
        others = [subprocess.Popen(RENDER, **quiet)]
    try:
        time.sleep(2.0 if others else 0.0)  # a competing trainer is past its imports
        out = subprocess.run([*worker, "--seconds", str(args.seconds)], env=env, check=True, capture_output=True,
                             text=True, cwd=ROOT)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for process in others:  # each in its own session: its pool workers go too
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# --------------------------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=4.0, help="warm-up seconds per cell (not measured)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=1, help="measure every cell this many times (median)")
    parser.add_argument("--competitors", default=",".join(COMPETITORS),
                        help=f"comma-separated subset of: {', '.join(COMPETITORS)}")
    parser.add_argument("--settings", default="old,new", help=f"comma-separated subset of: {', '.join(SETTINGS)}")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.competitor_list = [c.strip() for c in args.competitors.split(",") if c.strip()]
    unknown = sorted(set(args.competitor_list) - set(COMPETITORS))
    if unknown:
        parser.error(f"unknown competitors {unknown}; choose from {', '.join(COMPETITORS)}")
    args.setting_list = [c.strip() for c in args.settings.split(",") if c.strip()]
    if sorted(set(args.setting_list) - set(SETTINGS)) or "old" not in args.setting_list:
        parser.error(f"--settings: a subset of {', '.join(SETTINGS)} that includes old (the ratios' base)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(train_worker(args.warmup, args.seconds, args.batch, tuple(args.size))), flush=True)
        return 0
    import statistics

    import torch

    print(f"tiny model, batch {args.batch}, {args.size[0]}x{args.size[1]}, {args.warmup:g} s warm-up + "
          f"{args.seconds:g} s measured per cell, median of {args.repeats}; {len(os.sched_getaffinity(0))} usable "
          f"CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads by default)")
    rows = []
    for competitor in args.competitor_list:
        for setting in args.setting_list:
            cells = [run_cell(setting, competitor, args) for _ in range(args.repeats)]
            img_s = statistics.median(c["img_s"] for c in cells)
            cpu = statistics.median(c["cpu_s_per_img"] for c in cells)
            rows.append({"beside": competitor, "setting": setting, "img_s": img_s, "cpu_s_per_img": cpu, "cells": cells,
                         "threads": sorted({t for c in cells for t in c["threads"]})})
            extra = f", other load {cells[0]['other_load']:.2f} CPUs" if competitor == "idle" else ""
            print(f"  measured {competitor:12s} {setting}: {img_s:6.2f} img/s{extra}", flush=True)
    idle = {r["setting"]: r["img_s"] for r in rows if r["beside"] == "idle"}
    base = idle.get("old")
    print("\n| beside | setting | img/s | vs old idle | vs same setting idle | threads used | CPU s / image |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vs_old = f"{r['img_s'] / base:.2f}" if base else "-"
        vs_same = f"{r['img_s'] / idle[r['setting']]:.2f}" if r["setting"] in idle else "-"
        print(f"| {r['beside']} | {r['setting']} | {r['img_s']:.2f} | {vs_old} | {vs_same} | "
              f"{','.join(map(str, r['threads']))} | {r['cpu_s_per_img']:.3f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
