"""Time the reference LVIS API against stepwise's default evaluator on the same synthetic inputs.

    python bench/eval_speed.py [--images 5000] [--categories 300] [--dets 300] [--seed 0]

Builds an LVIS-format GT (long-tailed categories with frequency, instance counts and federated lists)
and ``--dets`` detections per image (noisy copies of GT plus random boxes), runs both evaluators through
``evaluate_lvis`` (same loading, checking and top-k), prints a table of times and the ratio, and checks
that every metric and per-class AP agrees to 1e-6 (exit code 1 if not).
"""

from __future__ import annotations

import argparse
import sys
import time

from stepwise.evaluation import choose_evaluator, evaluate_lvis
from stepwise.evaluation.synthetic import make_eval_case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--categories", type=int, default=300)
    parser.add_argument("--dets", type=int, default=300, help="detections per image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    gt, dets = make_eval_case(args.images, args.categories, args.dets, seed=args.seed)
    print(f"synthetic set: {len(gt['images'])} images, {len(gt['categories'])} categories, "
          f"{len(gt['annotations'])} GT boxes, {len(dets)} detections (built in {time.perf_counter() - t0:.1f}s)")

    default = choose_evaluator(gt)
    reports, times = {}, {}
    for name in ("lvis", default):
        t0 = time.perf_counter()
        reports[name] = evaluate_lvis(gt, dets, evaluator=name)  # dets are not modified
        times[name] = time.perf_counter() - t0

    ref, new = reports["lvis"], reports[default]
    diffs = [abs(a - b) for k in ref.metrics if (a := ref.metrics[k]) is not None and (b := new.metrics[k]) is not None]
    diffs += [abs(a.ap - b.ap) for a, b in zip(ref.per_class, new.per_class) if a.ap is not None and b.ap is not None]
    same_none = all((ref.metrics[k] is None) == (new.metrics[k] is None) for k in ref.metrics) and all(
        (a.ap is None) == (b.ap is None) for a, b in zip(ref.per_class, new.per_class)
    )
    max_diff = max(diffs, default=0.0)

    print(f"{'evaluator':<28}{'seconds':>10}{'ratio':>10}")
    print(f"{'lvis (LVIS API 0.5.3)':<28}{times['lvis']:>10.2f}{1.0:>10.2f}")
    print(f"{default + ' (default)':<28}{times[default]:>10.2f}{times['lvis'] / times[default]:>9.2f}x")
    print(f"AP lvis {ref.metrics['AP']:.6f} | {default} {new.metrics['AP']:.6f}; "
          f"max |difference| over all metrics and per-class AP: {max_diff:.2e}")
    ok = same_none and max_diff <= 1e-6
    print("metrics agree to 1e-6" if ok else "METRICS DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
