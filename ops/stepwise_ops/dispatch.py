"""`ms_deform_attn`: the compiled kernel where the device has one, else the pure-PyTorch reference.

Backend selection: `set_backend("auto" | "reference" | "compiled")`, or the environment variable
STEPWISE_MSDA_BACKEND read at import. "auto" (default) falls back to the reference with one warning
per reason; "compiled" raises instead; "reference" always uses the reference, silently.
"""

from __future__ import annotations

import os
import warnings

import torch

from stepwise_ops import _library
from stepwise_ops.reference import ms_deform_attn_reference

BACKENDS = ("auto", "reference", "compiled")
ENV_VAR = "STEPWISE_MSDA_BACKEND"

_backend = "auto"
_warned: set[str] = set()


def set_backend(name: str | None) -> None:
    """Chooses the implementation: "auto", "reference" or "compiled"; None re-reads STEPWISE_MSDA_BACKEND."""
    global _backend
    if name is None:
        name = os.environ.get(ENV_VAR, "auto") or "auto"
    if name not in BACKENDS:
        raise ValueError(
            f"stepwise_ops: unknown backend {name!r} (from set_backend or {ENV_VAR}); use one of {BACKENDS}"
        )
    _backend = name


def get_backend() -> str:
    return _backend


def compiled_unavailable_reason(device: torch.device | str) -> str | None:
    """None when the compiled op has a kernel for `device`, else a message saying why and how to fix it."""
    device = torch.device(device)
    if not _library.load():
        return (
            f"the compiled deformable attention library is not available ({_library.load_error()}); "
            f"{_library.BUILD_HINT}"
        )
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if _library.built_with_cuda():
            return None
        return (
            "the compiled deformable attention library was built without its CUDA kernel; rebuild it with "
            '`FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="<your arch, e.g. 9.0>" MAX_JOBS=2 '
            "pip install --no-build-isolation ./ops` (see ops/README.md)"
        )
    return f"the compiled deformable attention op has no kernel for device type {device.type!r}"


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, M, D), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got shape "
            f"{tuple(sampling_locations.shape)}"
        )
    n, _, m, _ = value.shape
    if sampling_locations.shape[0] != n or sampling_locations.shape[2] != m:
        raise ValueError(
            f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"(N, S, M, D) = {tuple(value.shape)}"
        )
    if attention_weights.shape != sampling_locations.shape[:5]:
        raise ValueError(
            f"ms_deform_attn: attention_weights {tuple(attention_weights.shape)} does not match "
            f"sampling_locations {tuple(sampling_locations.shape)}"
        )
    levels = sampling_locations.shape[3]
    if spatial_shapes.shape != (levels, 2) or level_start_index.shape != (levels,):
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be ({levels}, 2) and level_start_index ({levels},), got "
            f"{tuple(spatial_shapes.shape)} and {tuple(level_start_index.shape)}"
        )


def ms_deform_attn_compiled(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The compiled op (differentiable); raises if it is not available. Shapes as `ms_deform_attn`."""
    reason = compiled_unavailable_reason(value.device)
    if reason is not None:
        raise RuntimeError(f"stepwise_ops: {reason}")
    return torch.ops.stepwise_ops.ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention (align_corners=False sampling, zero outside the maps).

    Args:
        value: (N, S, M, D), S = sum over levels of H_l * W_l.
        spatial_shapes: (L, 2) integer, (H_l, W_l) per level.
        level_start_index: (L,) integer, offset of each level in S.
        sampling_locations: (N, Lq, M, L, P, 2) in [0, 1], x first.
        attention_weights: (N, Lq, M, L, P).
    Returns:
        (N, Lq, M * D), in the common dtype of value, sampling_locations and attention_weights
        (mixed dtypes, e.g. bfloat16 values with float32 locations under autocast, are promoted).
    """
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    dtype = torch.promote_types(value.dtype, torch.promote_types(sampling_locations.dtype, attention_weights.dtype))
    value, sampling_locations, attention_weights = (
        t.to(dtype) for t in (value, sampling_locations, attention_weights)
    )
    if _backend != "reference":
        reason = compiled_unavailable_reason(value.device)
        if reason is None:
            return torch.ops.stepwise_ops.ms_deform_attn_forward(
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights
            )
        if _backend == "compiled":
            raise RuntimeError(f"stepwise_ops: {reason}")
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"stepwise_ops: using the slow pure-PyTorch reference: {reason}", stacklevel=2)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


set_backend(None)
