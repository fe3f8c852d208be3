"""Entry point: LVIS metrics of a prediction file or of a trained checkpoint.

    python -m stepwise.evaluate gt=FILE predictions=FILE [train_gt=FILE] [out=DIR] [evaluator=auto|hotcoco|lvis] [max_dets=300]
    python -m stepwise.evaluate checkpoint=PATH [gt=VAL_ANN] [image_root=DIR] [train_gt=TRAIN_ANN] [out=DIR]
        [max_dets=300] [tau=0,0.5,1] [knn=true] [config overrides, e.g. stage.eval_batch_size=4]
    accelerate launch [--config_file launch/...] -m stepwise.evaluate checkpoint=PATH ...   (several processes)

``predictions=`` prints the metric table and, with ``out=DIR``, writes ``DIR/metrics.json`` and
``DIR/per_class.csv``; timed progress lines go to stderr. The results file is read piece by piece into
arrays and evaluated by hotcoco (``evaluator=auto``; ``lvis`` = the reference LVIS API): LVIS v1 val with
300 detections per image (5.9M) takes about half a minute and 2.4 GB on 2 CPU cores. ``checkpoint=``
rebuilds the model from the checkpoint's saved config, predicts the val set of that config (or ``gt=``
with images under ``image_root=``) on every process exactly as the training-time evaluation does, and
writes ``predictions.json``, ``metrics.json`` and ``per_class.csv`` into ``out`` (default ``<run dir of
the checkpoint>/evaluate/<checkpoint name>``).
Inference-time variants of one checkpoint (see :func:`model_variants`): ``tau=`` (comma-separated) scores
one tau-normalised model per value into ``out/tau_<value>``; ``knn=true`` adds ``out/knn`` (k-NN over the
class centres of a metric-learning head). With variants, a table of AP/APr/APc/APf/AP1..AP4 per variant is
printed and saved as ``out/variants.csv`` and ``out/variants.json``.
Arguments are ``key=value``; the mode is chosen by the keys present, one entry of ``MODES`` each.
Exit codes: 0 success, 1 bad input (missing/invalid file, unknown image or category), 2 bad arguments or an
``out`` folder another ``checkpoint=`` evaluation is writing (its lock, :mod:`stepwise.utils.run_lock`).
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepwise import cli
from stepwise.cli import UsageError, parse_args, parse_bool, parse_int
from stepwise.evaluation import evaluate_lvis
from stepwise.utils import run_lock
from stepwise.utils.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:  # torch, hydra and the model load only when the checkpoint mode runs
    from torch import nn


@dataclass(frozen=True)
class Mode:
    """A way to run the evaluation: chosen when ``key`` is given; ``run(args)`` does it and returns an exit code."""

    key: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    run: Callable[[dict[str, str]], int]
    usage: str
    overrides: bool = False  # other keys are config overrides (checked by the mode, which names a bad one)


def _run_predictions(args: dict[str, str]) -> int:
    max_dets = parse_int("max_dets", args.get("max_dets", "300"))
    evaluator = args.get("evaluator", "auto")
    if evaluator not in ("auto", "hotcoco", "lvis"):
        raise UsageError(f"evaluator must be auto, hotcoco or lvis, got {evaluator!r}")
    report = evaluate_lvis(args["gt"], args["predictions"], train_gt=args.get("train_gt"), max_dets=max_dets,
                           evaluator=evaluator, progress=True)
    print(report.table(), end="")
    if "out" in args:
        metrics_path, csv_path = report.save(args["out"])
        print(f"wrote {metrics_path} and {csv_path}")
    return 0


CHECKPOINT_KEYS = ("gt", "image_root", "train_gt", "out", "max_dets", "tau", "knn")
# Shorthands of the checkpoint mode for keys of the saved config's data group.
_DATA_KEYS = {"gt": "data.val_ann", "image_root": "data.val_image_root", "train_gt": "data.train_ann"}


def _run_checkpoint(args: dict[str, str]) -> int:
    """``checkpoint=`` mode: see :func:`evaluate_checkpoint`; the keys outside the mode's are overrides."""
    max_dets = parse_int("max_dets", args.get("max_dets", "300"), minimum=1)
    taus, knn = parse_taus(args.get("tau")), parse_bool("knn", args.get("knn", "false"))
    from stepwise.config import ConfigError

    overrides = [f"{k}={v}" for k, v in args.items() if k != "checkpoint" and k not in CHECKPOINT_KEYS]
    try:
        evaluate_checkpoint(args["checkpoint"], out=args.get("out"), gt=args.get("gt"),
                            image_root=args.get("image_root"), train_gt=args.get("train_gt"), max_dets=max_dets,
                            overrides=overrides, taus=taus, knn=knn)
    except ConfigError as err:  # a bad override: an argument error, named by the config
        raise UsageError(str(err)) from err
    return 0


def evaluate_checkpoint(checkpoint: str | Path, out: str | Path | None = None, gt: str | Path | None = None,
                        image_root: str | Path | None = None, train_gt: str | Path | None = None,
                        max_dets: int = 300, overrides: Sequence[str] = (), taus: Sequence[float] = (),
                        knn: bool = False) -> dict[str, Any] | None:
    """Predict the val set with a trained checkpoint and score it with the LVIS metrics.

    Works the same in one process and under ``accelerate launch`` on several, through
    :func:`stepwise.engine.evaluate` (the training-time evaluation, without a Trainer): every process predicts its share of the batches, every image is
    gathered once, and rank 0 writes ``predictions.json`` (LVIS results format), ``metrics.json``,
    ``per_class.csv`` and a ``metrics.jsonl`` line into ``out``.

    Args:
        checkpoint: checkpoint file or run directory (its ``checkpoint_final.pt``, else the latest).
        out: report folder; default ``<run dir>/evaluate/<checkpoint file stem>``.
        gt, image_root: val annotation file and its image folder instead of the config's
            ``data.val_ann`` / ``data.val_image_root`` (the synthetic data is generated when the config's
            own val set is used and missing).
        train_gt: training annotation file for AP1..AP4 (default ``data.train_ann`` when that file exists,
            else the ``instance_count`` field of the val file's categories).
        max_dets: detections per image (top-k over queries x classes).
        overrides: ``key=value`` changes to the saved config (``stage.eval_batch_size``,
            ``stage.max_eval_images``, ``data.eval_scale``, ...).
        taus: tau-normalisation values, one model variant each (``out/tau_<value>``); empty: the model as is.
        knn: also score the model with k-NN over its class centres (``out/knn``; metric-learning heads).

    Returns:
        The metrics (AP, APr, APc, APf, AP1..AP4, ...) on every process; with several model variants (tau,
        knn) those of the first.
    """
    # Here, not at the top: the predictions= mode runs without loading torch, the model or hydra.
    from stepwise.predictor import Predictor, lvis_evaluator
    from stepwise.trained import load_trained_model, run_dir_of

    given = {"gt": gt, "image_root": image_root, "train_gt": train_gt}
    data_overrides = [f"{_DATA_KEYS[k]}={v}" for k, v in given.items() if v is not None]
    trained = load_trained_model(checkpoint, [*overrides, *data_overrides])
    out = Path(out) if out is not None else run_dir_of(trained.path) / "evaluate" / trained.path.stem
    accelerator, loader, train_ann = _prepare_evaluation(trained, out, ensure=gt is None,
                                                         given_train=train_gt is not None)
    evaluate_fn = lvis_evaluator(trained.config.data.val_ann, train_ann, max_dets=max_dets)
    predictor = Predictor.from_trained(trained, max_dets=max_dets)
    table = {}
    for name, model in model_variants(trained.model, taus=taus, knn=knn):
        tag = f"checkpoint:{name or trained.path.name}"
        table[name] = _evaluate_variant(accelerator, predictor.variant(model), model, loader, evaluate_fn,
                                        out / name if name else out, tag, trained.global_step)
    if accelerator.is_main_process and any(table):
        print(variant_table(table, out), end="")
    accelerator.wait_for_everyone()  # no process leaves while another is still in a collective (gloo aborts)
    return next((metrics for metrics in table.values() if metrics is not None), None)


def _prepare_evaluation(trained: Any, out: Path, ensure: bool, given_train: bool) -> tuple[Any, Any, str | None]:
    """The accelerator (``out`` held by this evaluation), the val loader of the checkpoint's config and the
    training file for AP1..AP4 (``data.train_ann`` when given or present, else None: the val file's counts)."""
    from stepwise.data.loaders import build_dataset, build_eval_loader
    from stepwise.engine import TrainSettings, make_accelerator
    from stepwise.stages.parts.data import ensure_data

    cfg = trained.config
    # Inference only: no trackers; no resume; the model's own precision setting is kept.
    settings = replace(TrainSettings.from_config(cfg), trackers=(), resume=False)
    accelerator = make_accelerator(settings, out)
    run_lock.hold_on_rank0(out, accelerator.is_main_process, what="evaluation directory",
                           hint="wait for that evaluation to end, or write elsewhere with out=")
    if ensure:
        ensure_data(cfg, accelerator)
    val_ds = build_dataset(cfg.data, "val", categories=trained.categories)
    # .get: the saved config of a stage without these keys evaluates everything, data.batch_size at a time
    loader = build_eval_loader(val_ds, cfg.data, cfg.stage.get("eval_batch_size"), cfg.stage.get("max_eval_images"))
    train_ann = cfg.data.train_ann if given_train or Path(cfg.data.train_ann).is_file() else None
    accelerator.print(f"stepwise: evaluating {trained.path} (step {trained.global_step}) on {cfg.data.val_ann} "
                      f"({len(loader.dataset)} images, {accelerator.num_processes} process(es)); training counts "
                      f"for AP1..AP4 from {train_ann or 'the val file categories'}")
    return accelerator, loader, train_ann


def _evaluate_variant(accelerator: Any, predictor: Any, model: nn.Module, loader: Any, evaluate_fn: Any,
                      target: Path, tag: str, global_step: int | None) -> dict[str, Any] | None:
    """Predict with ``predictor`` (around ``model``) and score into ``target``; the metrics (and a
    ``metrics.jsonl`` line tagged ``tag``)."""
    from stepwise.engine import append_jsonl, evaluate

    # on the device, under the run's mixed precision, as the training-time evaluation ran it
    prepared = accelerator.prepare_model(model, evaluation_mode=True)
    result = evaluate(accelerator, prepared, loader, predictor.predict_batch, evaluate_fn, target)
    if accelerator.is_main_process:
        append_jsonl(target / "metrics.jsonl", {"type": "eval", "tag": tag, "global_step": global_step,
                                                "num_images": result.num_images, "metrics": result.metrics})
        print(f"wrote {target / 'predictions.json'}, {target / 'metrics.json'} and {target / 'per_class.csv'}")
    return result.metrics


def model_variants(model: nn.Module, taus: Sequence[float] = (),
                   knn: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """The models the ``checkpoint=`` mode evaluates, as ``(name, model)``; each gets ``out/<name>``
    (``out`` itself for the name ``""``).

    Without options the checkpoint's model as it is. ``taus``: one ``("tau_<value>", copy)`` per value, every
    class head's weight rows divided by their L2 norm ** tau (biases untouched; see
    ``stepwise.heads.inference.tau_normalize_``). ``knn``: then ``("knn", copy)`` whose metric-learning
    heads score by k-NN over the class centres (checked before anything is yielded: a model without class
    centres raises ValueError at once). Tau copies are made one at a time, as the caller iterates.
    """
    from stepwise.heads.inference import tau_normalized, with_knn

    knn_model = with_knn(model) if knn else None
    if not taus:
        yield "", model
    for tau in taus:
        yield f"tau_{tau:g}", tau_normalized(model, tau)
    if knn_model is not None:
        yield "knn", knn_model


VARIANT_KEYS = ("AP", "APr", "APc", "APf", "AP1", "AP2", "AP3", "AP4")


def variant_table(table: dict[str, dict[str, Any] | None], out: str | Path) -> str:
    """Write ``out/variants.csv`` and ``out/variants.json`` (metrics per variant); return the printed table
    of ``VARIANT_KEYS`` in percent ('-' where undefined)."""
    rows = [{"variant": name or "model", **{k: (m or {}).get(k) for k in VARIANT_KEYS}} for name, m in table.items()]
    out = Path(out)
    atomic_write_json(out / "variants.json", {name or "model": m for name, m in table.items()})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["variant", *VARIANT_KEYS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "variants.csv", buf.getvalue())
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    width = max(len(r["variant"]) for r in rows + [{"variant": "variant"}])
    lines = [" ".join(["variant".ljust(width), *(k.rjust(5) for k in VARIANT_KEYS)])]
    lines += [" ".join([r["variant"].ljust(width), *(fmt(r[k]).rjust(5) for k in VARIANT_KEYS)]) for r in rows]
    return "\n".join(lines) + f"\nwrote {out / 'variants.csv'} and {out / 'variants.json'}\n"


def parse_taus(text: str | None) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]`` (None or "" -> []); a bad or negative value is a UsageError."""
    if not text:
        return []
    try:
        taus = [float(t) for t in text.split(",")]
    except ValueError:
        raise UsageError(f"tau must be a comma-separated list of numbers, got {text!r}") from None
    if any(not math.isfinite(t) or t < 0 for t in taus) or len(set(taus)) != len(taus):
        raise UsageError(f"tau values must be distinct numbers >= 0, got {text!r}")
    return taus


MODES: dict[str, Mode] = {
    "predictions": Mode(
        key="predictions",
        required=("gt", "predictions"),
        optional=("train_gt", "out", "evaluator", "max_dets"),
        run=_run_predictions,
        usage="gt=FILE predictions=FILE [train_gt=FILE] [out=DIR] [evaluator=auto|hotcoco|lvis] [max_dets=300]",
    ),
    "checkpoint": Mode(
        key="checkpoint",
        required=("checkpoint",),
        optional=CHECKPOINT_KEYS,
        run=_run_checkpoint,
        usage="checkpoint=PATH [gt=VAL_ANN] [image_root=DIR] [train_gt=TRAIN_ANN] [out=DIR] [max_dets=300] "
              "[tau=0,0.5,1] [knn=true] [config overrides, e.g. stage.eval_batch_size=4]",
        overrides=True,
    ),
}


def _usage() -> str:
    return "usage:\n" + "\n".join(f"  python -m stepwise.evaluate {m.usage}" for m in MODES.values())


def select_mode(args: dict[str, str]) -> Mode:
    """The mode whose key is present; checks required and unknown keys (a mode with ``overrides`` takes
    the keys it does not know as config overrides)."""
    present = [m for m in MODES.values() if m.key in args]
    open_mode = len(present) == 1 and present[0].overrides
    known = {k for m in MODES.values() for k in m.required + m.optional}
    unknown = sorted(set(args) - known)
    if unknown and not open_mode:
        raise UsageError(f"unknown key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if len(present) != 1:
        what = "no mode key" if not present else "several mode keys (" + ", ".join(m.key for m in present) + ")"
        raise UsageError(f"{what}: give exactly one of {', '.join(k + '=' for k in MODES)}")
    mode = present[0]
    unknown = sorted(set(args) - set(mode.required) - set(mode.optional))
    if unknown and not mode.overrides:
        raise UsageError(f"unknown key(s) for {mode.key}= mode: {', '.join(unknown)}; allowed: {', '.join(mode.required + mode.optional)}")
    missing = [k for k in mode.required if k not in args]
    if missing:
        raise UsageError(f"missing key(s): {', '.join(missing)}")
    return mode


def _run(argv: list[str]) -> int:
    args = parse_args(argv)
    return select_mode(args).run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:  # DirectoryBusy: another evaluation writes into the same out=
        return cli.main(argv, _usage(), _run, refused=(run_lock.DirectoryBusy,))
    finally:
        run_lock.release_all()


def _exit(code: int) -> None:
    """Tear a process group down (``checkpoint=`` under ``accelerate launch``) before exiting with ``code``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
