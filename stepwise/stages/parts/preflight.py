"""Before any loader is built, :func:`preflight` checks what the stage will read (``data.preflight``): the
validation file as the evaluator will load it, and every train/val image (header, size; full decode for
small sets), so a bad file stops the stage at minute one instead of after training.
``python -m stepwise.check`` prints the same report (:func:`preflight_report`) for any data set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import broadcast_object_list


class PreflightError(ValueError):
    """What the stage would read is broken; the message lists every problem found, naming files and images."""


def preflight(cfg: Any, train_ds: Any, val_ds: Any, val_indices: Any = None, decode: bool | None = None,
              workers: int | None = None) -> None:
    """Check, before training, what the stage will read; raise :class:`PreflightError` on every process.

    The main process checks (others wait): the validation file as the evaluator will load it (LVIS
    schema, ``frequency`` per category, federated lists; ``data.train_ann``, which gives the AP1..AP4
    counts, must exist) and
    every image of ``train_ds`` and ``val_ds`` (``val_indices``: only those) with
    :func:`stepwise.data.preflight.check_images`: headers, or a full decode when ``decode`` is True or
    (``decode=None``) the two sets hold at most ``data.preflight_decode_max`` images.
    """
    state = PartialState()
    message = None
    if state.is_main_process:
        message = preflight_report(cfg, train_ds, val_ds, val_indices, decode, workers)
        if message:
            message = f"preflight found problems before training (data.preflight=false skips these checks):\n{message}"
    if state.num_processes > 1:
        message = broadcast_object_list([message])[0]
    if message:
        raise PreflightError(message)


def preflight_report(cfg: Any, train_ds: Any, val_ds: Any, val_indices: Any = None, decode: bool | None = None,
                     workers: int | None = None, progress: bool = True) -> str | None:
    """The problems :func:`preflight` raises about, one ``- `` item each, or None when everything is fine."""
    from stepwise.data.preflight import check_images, format_problems
    from stepwise.evaluation.inputs import load_gt

    sections = []
    val_ann = cfg.data.val_ann
    try:
        load_gt(val_ann)
        train_ann = Path(cfg.data.train_ann)
        if not train_ann.is_file():
            raise FileNotFoundError(f"training annotation file {train_ann} (AP1..AP4 counts) not found")
        # not read again here (LVIS: 1 GB): the stage has parsed it already (dataset or category map)
    except (OSError, ValueError, KeyError, TypeError) as err:
        hint = ""
        categories = getattr(train_ds, "categories", None)
        if "frequency" in str(err) and categories is not None and categories.has_frequency:
            hint = (f" (the training file {getattr(train_ds, 'ann_file', cfg.data.train_ann)} gives every category "
                    f"a frequency; the validation file needs them too)")
        sections.append(f"validation annotation file {val_ann} cannot be evaluated: {err}{hint}")
    val_indices = range(len(val_ds)) if val_indices is None else val_indices
    total = len(train_ds) + len(val_indices)
    if decode is None:
        decode = total <= int(cfg.data.get("preflight_decode_max", 0) or 0)
    problems = []
    for name, dataset, indices in (("train", train_ds, None), ("val", val_ds, val_indices)):
        found = check_images(dataset, indices, decode=decode, workers=workers, progress=progress, desc=name)
        if found:
            problems.append(f"{len(found)} bad {name} image(s) ({dataset.ann_file}, image root {dataset.image_root}):\n"
                            f"{format_problems(found)}")
    sections.extend(problems)
    if not sections:
        print(f"stepwise: preflight: {total} images ({'decoded' if decode else 'headers'}) and {val_ann} are fine",
              flush=True)
        return None
    return "- " + "\n- ".join(sections)
