"""Entry point: how much gradient each loss term sends to the trunk, so a head's imbalance shows in one command.

    python -m stepwise.analysis.grad_balance checkpoint=RUN_OR_FILE [batches=4] [out=FILE.json] [device=cpu]
        [config overrides of the saved config, e.g. head.bg_gamma=0]
    python -m stepwise.analysis.grad_balance [batches=4] [out=FILE.json] [config overrides, e.g. head=bacl
        data.preset=tiny]        (no checkpoint: the model of the config at its initialisation, seed ``seed``)

The trunk is every parameter outside the heads, i.e. all but ``class_embed.*`` and ``bbox_embed.*``: the
backbone, ``input_proj``, the transformer (two-stage proposal layers included) and the query embeddings.
On ``batches`` training batches (the config's training data, training transforms, loader seeded by
``seed``; the model in training mode, as a training step sees it) the criterion is evaluated once per batch,
and for every weighted loss term of every layer (``loss_ce``, ``loss_ce_0``, ``loss_ce_enc``, ``loss_bbox``,
..., each times its weight in ``criterion.weight_dict``) the gradient it alone sends to the trunk is taken.
Reported, as the mean (and std) over batches:

* per term, summed over its layers (``loss_ce`` = final + earlier decoder layers + encoder proposals): the
  L2 norm of its trunk gradient and its weighted loss;
* the groups ``classification`` (``loss_ce``, ``loss_fhm``, ``loss_center``), ``boxes`` (``loss_bbox``,
  ``loss_giou``) and ``total``, the norm of their summed gradient; ``ratio`` = classification / boxes norm
  and ``cosine`` = the cosine between those two gradients;
* per layer, every term's norm (``layers`` in the JSON; the table with ``per_layer=true``).

With ``checkpoint=`` the model is rebuilt from the checkpoint's saved config with the overrides applied
(``head.*`` loss options may change: the same weights probed under another loss form) and its weights and
head statistics are loaded. The table goes to stdout, the numbers to ``out=`` (JSON). Nothing is trained or
written elsewhere. Exit codes: 0 success, 1 bad input (checkpoint, data), 2 bad arguments.
"""

from __future__ import annotations

import math
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from stepwise import cli
from stepwise.checkpoint import CheckpointError
from stepwise.cli import UsageError, parse_args, parse_bool, parse_int
from stepwise.config import ConfigError, load_config
from stepwise.data.loaders import build_dataset, build_train_loader
from stepwise.models import Detector, build_detector
from stepwise.stages.parts.data import ensure_builtin_data
from stepwise.trained import load_trained_model
from stepwise.utils.io import atomic_write_json

USAGE = ("usage: python -m stepwise.analysis.grad_balance [checkpoint=RUN_OR_FILE] [batches=4] [out=FILE.json] "
         "[device=cpu] [per_layer=false] [config overrides ...]")
OPTIONS = ("checkpoint", "batches", "out", "device", "per_layer")
HEAD_PREFIXES = ("class_embed.", "bbox_embed.")
GROUPS = {"loss_ce": "classification", "loss_fhm": "classification", "loss_center": "classification",
          "loss_bbox": "boxes", "loss_giou": "boxes"}
_LAYER = re.compile(r"^(loss_[a-z]+?)(?:_(\d+|enc))?$")


def split_term(name: str) -> tuple[str, str]:
    """``loss_ce_0`` -> (``loss_ce``, ``0``); ``loss_bbox`` -> (``loss_bbox``, ``""``); ``loss_ce_enc`` ->
    (``loss_ce``, ``enc``). The layer suffix is what the criterion appends (decoder index or ``enc``)."""
    match = _LAYER.match(name)
    if not match:
        return name, ""
    return match.group(1), match.group(2) or ""


def trunk_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every parameter outside the class and box heads (``class_embed.*``, ``bbox_embed.*``), by name; a
    parameter shared by several modules appears once."""
    return [(n, p) for n, p in model.named_parameters() if not n.startswith(HEAD_PREFIXES)]


def _flat_grad(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, p in zip(grads, params)])


def batch_balance(losses: dict[str, torch.Tensor], weights: dict[str, float],
                  params: Sequence[torch.Tensor]) -> dict[str, dict[str, float]]:
    """One batch: for every weighted ``loss_*`` term (per layer), per base term and per group, the L2 norm of
    the trunk gradient of (weight x loss) and the weighted loss; plus the classification/boxes cosine.

    Returns ``{"layers": {name: {"norm", "loss"}}, "terms": {...}, "groups": {...}, "cosine": float}``.
    """
    layers: dict[str, dict[str, float]] = {}
    sums: dict[str, torch.Tensor] = {}
    loss_sums: dict[str, float] = defaultdict(float)

    def add(key: str, grad: torch.Tensor, value: float) -> None:
        sums[key] = sums[key] + grad if key in sums else grad.clone()
        loss_sums[key] += value

    for name in sorted(losses):
        if not name.startswith("loss_") or name not in weights:
            continue
        weighted = losses[name] * float(weights[name])
        if not weighted.requires_grad:  # e.g. a term that is a constant on this batch
            grad = torch.zeros(sum(p.numel() for p in params))
        else:
            grad = _flat_grad(weighted, params)
        value = float(weighted.detach())
        layers[name] = {"norm": float(grad.norm()), "loss": value}
        base, _ = split_term(name)
        add(f"term:{base}", grad, value)
        add(f"group:{GROUPS.get(base, 'other')}", grad, value)
        add("group:total", grad, value)
    terms = {k[5:]: {"norm": float(v.norm()), "loss": loss_sums[k]} for k, v in sums.items() if k.startswith("term:")}
    groups = {k[6:]: {"norm": float(v.norm()), "loss": loss_sums[k]} for k, v in sums.items() if k.startswith("group:")}
    cosine = float("nan")
    cls, box = sums.get("group:classification"), sums.get("group:boxes")
    if cls is not None and box is not None and float(cls.norm()) > 0 and float(box.norm()) > 0:
        cosine = float(torch.dot(cls, box) / (cls.norm() * box.norm()))
    return {"layers": layers, "terms": terms, "groups": groups, "cosine": cosine}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def summarize(per_batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over batches of every norm and loss, the ratio classification / boxes of the mean
    norms, and the mean cosine."""
    out: dict[str, Any] = {"batches": len(per_batch)}
    for section in ("layers", "terms", "groups"):
        names = sorted({n for b in per_batch for n in b[section]})
        out[section] = {}
        for name in names:
            norms = [b[section][name]["norm"] for b in per_batch if name in b[section]]
            loss = [b[section][name]["loss"] for b in per_batch if name in b[section]]
            norm_mean, norm_std = _mean_std(norms)
            out[section][name] = {"norm": norm_mean, "norm_std": norm_std, "loss": _mean_std(loss)[0]}
    groups = out["groups"]
    cls, box = groups.get("classification", {}).get("norm"), groups.get("boxes", {}).get("norm")
    out["ratio"] = cls / box if cls is not None and box else float("nan")
    out["cosine"], out["cosine_std"] = _mean_std([b["cosine"] for b in per_batch])
    return out


def probe(model: nn.Module, criterion: Any, batches: Iterable[Any], device: str | torch.device = "cpu",
          num_batches: int = 4) -> dict[str, Any]:
    """Per-term trunk gradient norms of ``criterion`` on the first ``num_batches`` of ``batches``
    (``ImageBatch`` objects); ``model`` in training mode on ``device``. See :func:`summarize`."""
    model.to(device).train()
    params = [p for _, p in trunk_parameters(model)]
    for p in params:
        p.requires_grad_(True)
    per_batch = []
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        batch = batch.to(device)
        outputs = model(batch.images, batch.masks)
        losses = criterion(outputs, batch.targets)
        per_batch.append(batch_balance(losses, criterion.weight_dict, params))
        model.zero_grad(set_to_none=True)
    if not per_batch:
        raise ValueError("no training batch to probe (empty training set?)")
    return summarize(per_batch)


# ---------------------------------------------------------------------------------------------- report
def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


def table(result: dict[str, Any], per_layer: bool = False) -> str:
    """The Markdown table of :func:`summarize`'s result (and the per-layer one with ``per_layer``)."""
    lines = ["| term | trunk grad norm | std | weighted loss |", "|---|---|---|---|"]
    for name, row in result["terms"].items():
        lines.append(f"| {name} | {_fmt(row['norm'])} | {_fmt(row['norm_std'], 2)} | {_fmt(row['loss'])} |")
    for name in ("classification", "boxes", "other", "total"):
        if name in result["groups"]:
            row = result["groups"][name]
            lines.append(f"| **{name}** | {_fmt(row['norm'])} | {_fmt(row['norm_std'], 2)} | {_fmt(row['loss'])} |")
    lines.append("")
    lines.append(f"classification / boxes trunk gradient: {_fmt(result['ratio'])}; cosine between them "
                 f"{_fmt(result['cosine'], 2)} (std {_fmt(result['cosine_std'], 2)}); {result['batches']} batches")
    if per_layer:
        lines += ["", "| layer term | trunk grad norm | weighted loss |", "|---|---|---|"]
        for name, row in result["layers"].items():
            lines.append(f"| {name} | {_fmt(row['norm'])} | {_fmt(row['loss'])} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- CLI
def ensure_data(cfg: DictConfig) -> None:
    """Generate the built-in data of ``cfg`` on first use (other data sets must exist)."""
    ensure_builtin_data(cfg.data)


def _json_safe(obj: Any) -> Any:
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def build_from_config(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """(detector at initialisation with its criterion, training dataset, category map) of a composed config
    (synthetic data is generated on first use)."""
    ensure_data(cfg)
    train = build_dataset(cfg.data, "train")
    torch.manual_seed(int(cfg.seed))
    detector = build_detector(cfg.model, cfg.head, train.categories, cfg.loss)
    return detector, train, train.categories


def run(checkpoint: str | None, overrides: Sequence[str], batches: int = 4,
        device: str = "cpu") -> tuple[dict[str, Any], DictConfig]:
    """Probe a checkpoint (with ``overrides`` on its saved config) or, without one, the config's fresh model.
    Returns (result, the config used)."""
    if checkpoint:
        trained = load_trained_model(checkpoint, overrides, device="cpu")
        cfg, categories = trained.config, trained.categories
        detector = Detector.of(trained.model, cfg.loss)  # the checkpoint's network with its criterion
        ensure_data(cfg)
        train = build_dataset(cfg.data, "train", categories=categories)
    else:
        cfg = load_config(list(overrides))
        detector, train, categories = build_from_config(cfg)
    model, criterion, _ = detector
    loader = build_train_loader(train, cfg.data, int(cfg.seed))
    result = probe(model, criterion, loader, device=device, num_batches=batches)
    result["checkpoint"] = str(checkpoint) if checkpoint else None
    result["overrides"] = list(overrides)
    result["head"] = OmegaConf.to_container(cfg.head, resolve=True)
    result["loss_weights"] = {k: v for k, v in criterion.weight_dict.items() if "_" not in k[5:]}
    result["trunk_parameters"] = sum(p.numel() for _, p in trunk_parameters(model))
    return result, cfg


def parse(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """(options, config overrides) from ``key=value`` arguments."""
    options: dict[str, Any] = {"checkpoint": None, "batches": 4, "out": None, "device": "cpu", "per_layer": False}
    overrides = []
    for arg in argv:
        key = arg.partition("=")[0]
        if key in OPTIONS:
            value = parse_args([arg])[key]
            if key == "batches":
                value = parse_int("batches", value, minimum=1)
            elif key == "per_layer":
                value = parse_bool("per_layer", value)
            elif not value:
                raise UsageError(f"{key}= needs a value")
            options[key] = value
        else:
            parse_args([arg])  # key=value, no '+'
            overrides.append(arg)
    return options, overrides


def _run(argv: list[str]) -> tuple[dict, list[str], dict]:
    """The options, the overrides and the measurement (``main``'s work before any output)."""
    options, overrides = parse(argv)
    result, _ = run(options["checkpoint"], overrides, options["batches"], options["device"])
    return options, overrides, result


def _finish(done: tuple[dict, list[str], dict]) -> int:
    options, overrides, result = done
    label = options["checkpoint"] or "initialisation"
    print(f"trunk gradient per loss term: {label}, head={result['head']['name']}"
          f"{' (' + ' '.join(overrides) + ')' if overrides else ''}")
    print(table(result, options["per_layer"]), end="")
    if options["out"]:
        atomic_write_json(Path(options["out"]), _json_safe(result), indent=1)
        print(f"wrote {options['out']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stepwise.analysis.grad_balance`` on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    return cli.main(argv, USAGE, _run, _finish, help=__doc__, usage_errors=(ConfigError,),
                    failures=(CheckpointError,))


if __name__ == "__main__":
    sys.exit(main())
