"""Throughput of independent training runs on a small CPU machine: one run with all cores' threads vs several
runs side by side with fewer threads each (what ``python -m stepwise.study ... jobs=N`` does).

    python bench/parallel_runs.py                         # study proxy: 1 x 2 threads vs 2 x 1 thread
    python bench/parallel_runs.py --layouts 1x2 2x1 --steps 60 --rounds 2
    python bench/parallel_runs.py --data synthetic        # the README demo's data (128-160 px images)

Each worker process builds the tiny model on the given data preset and trains it as the engine does (forward +
loss + backward + gradient clipping + fused AdamW, data loaded in the process), timing ``--steps`` steps after
``--warmup``. A layout ``PxT`` starts P such workers at once with T threads each; its throughput is the sum of
the workers' images/s over their timed steps. Layouts alternate for ``--rounds`` rounds so that a drifting
machine load hits all alike; the script prints the median per layout and its ratio to the first layout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(data: str, threads: int, steps: int, warmup: int, seed: int) -> None:
    """Train ``warmup + steps`` steps; print one JSON line: images/s over the timed steps."""
    import torch

    torch.set_num_threads(threads)
    from stepwise.config import load_config
    from stepwise.engine import TrainSettings, detection_forward, make_accelerator, weighted_total
    from stepwise.models import param_groups
    from stepwise.stages.parts import build_datasets, build_loaders, build_model

    workdir = f"/tmp/bench_parallel_runs/{os.getpid()}"
    cfg = load_config(["stage=pretrain", f"data={data}", "data.preflight=false", "stage.trackers=[]",
                       f"seed={seed}", "exp=bench_parallel_runs"])
    accelerator = make_accelerator(TrainSettings.from_config(cfg), workdir)
    train_ds, val_ds = build_datasets(cfg)
    loader, _ = build_loaders(cfg, train_ds, val_ds)
    model, criterion, _ = build_model(cfg, train_ds.categories, accelerator)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.stage), lr=float(cfg.stage.lr),
                                  weight_decay=float(cfg.stage.weight_decay), fused=True)
    model.train()
    batches = iter(loader)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        outputs, targets = detection_forward(model, batch)
        weighted_total(criterion(outputs, targets), criterion.weight_dict).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.stage.clip_max_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    print(json.dumps({"images_per_s": steps * int(cfg.data.batch_size) / seconds, "seconds": seconds,
                      "threads": torch.get_num_threads()}))


def run_layout(processes: int, threads: int, args: argparse.Namespace) -> list[dict]:
    """Start ``processes`` workers with ``threads`` threads each at once; their JSON results."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", "--data", args.data, "--threads", str(threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    procs = [subprocess.Popen(cmd + ["--seed", str(k)], env=env, stdout=subprocess.PIPE, text=True)
             for k in range(processes)]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"worker failed (exit {proc.returncode}): {' '.join(cmd)}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def ensure_data(data: str) -> None:
    """Render the synthetic preset once, before any timing (workers only read it)."""
    from stepwise.config import load_config
    from stepwise.engine import TrainSettings, make_accelerator
    from stepwise.stages.parts import ensure_data

    cfg = load_config(["stage=pretrain", f"data={data}", "data.preflight=false", "stage.trackers=[]",
                       "exp=bench_parallel_runs"])
    ensure_data(cfg, make_accelerator(TrainSettings.from_config(cfg), "/tmp/bench_parallel_runs/setup"))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="synthetic_study")
    parser.add_argument("--layouts", nargs="+", default=["1x2", "2x1"], help="PROCESSESxTHREADS, first = reference")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.data, args.threads, args.steps, args.warmup, args.seed)
        return
    ensure_data(args.data)
    layouts = [tuple(int(n) for n in layout.split("x")) for layout in args.layouts]
    totals: dict[tuple, list[float]] = {layout: [] for layout in layouts}
    for r in range(args.rounds):
        for layout in (layouts if r % 2 == 0 else layouts[::-1]):
            results = run_layout(*layout, args)
            totals[layout].append(sum(x["images_per_s"] for x in results))
            each = ", ".join(f"{x['images_per_s']:.1f}" for x in results)
            print(f"round {r} {layout[0]}x{layout[1]}: {totals[layout][-1]:.1f} images/s ({each})", flush=True)
    ref = statistics.median(totals[layouts[0]])
    print(f"\ndata={args.data}, {args.steps} timed steps per worker after {args.warmup}, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs")
    print("| processes x threads | images/s (sum over processes, median of rounds) | vs first |")
    print("|---|---|---|")
    for layout, values in totals.items():
        print(f"| {layout[0]} x {layout[1]} | {statistics.median(values):.1f} | {statistics.median(values) / ref:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1:])
