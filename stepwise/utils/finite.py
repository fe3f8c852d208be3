"""Finite-state checks: find the first tensor holding NaN/inf, name it, and the error the matcher raises.

Kept free of model and data imports so the engine, the checkpoint code and the matcher can all use it.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch


class NonFiniteCostError(ValueError):
    """The Hungarian matching cost holds NaN/inf; the message says whether the predictions or a target are
    at fault (raised by :mod:`stepwise.models.matcher`, turned into a stop naming the step by the engine)."""


def named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts/lists/tuples, with a dotted path (``model.layer.weight``)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for k, value in enumerate(obj):
            yield from named_tensors(value, f"{prefix}.{k}" if prefix else str(k))


def first_non_finite(named: Iterable[tuple[str, torch.Tensor | None]]) -> str | None:
    """Name of the first floating-point tensor holding a NaN or inf, or None.

    Non-tensors and integer tensors are skipped. One host-device synchronisation per device, however many
    tensors.
    """
    names: list[str] = []
    order: list[tuple[torch.device, int]] = []
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor) or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        device_flags = flags.setdefault(tensor.device, [])
        order.append((tensor.device, len(device_flags)))
        device_flags.append(torch.isfinite(tensor.detach()).all())
        names.append(name)
    finite = {device: torch.stack(fl).cpu().tolist() for device, fl in flags.items()}
    for name, (device, k) in zip(names, order):
        if not finite[device][k]:
            return name
    return None


def norm_overflow(norm: float, named: Iterable[tuple[str, torch.Tensor | None]]) -> str:
    """What to say when a total norm is NaN/inf although every tensor in ``named`` is finite: the norm itself
    overflowed (its sum of squares passed the float range), naming the parameter with the largest element
    (unless clipping has already scaled the gradients to zero)."""
    largest, where = 0.0, None
    for name, tensor in named:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
            value = float(tensor.detach().abs().max())
            if value > largest:
                largest, where = value, name
    return (f"gradient norm {norm}: the total norm overflowed, no single gradient holds NaN/inf"
            + (f" (largest gradient element {largest:.3g}, in parameter {where!r})" if where is not None else ""))
