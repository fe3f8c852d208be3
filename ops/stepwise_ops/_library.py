"""Loads the compiled `stepwise_ops_C` library and registers its fake kernels and autograd.

The library defines `torch.ops.stepwise_ops.ms_deform_attn_forward` / `ms_deform_attn_backward`
(CPU and, when built with CUDA, CUDA kernels). It is looked up, never built: first next to this
package (`python ops/setup.py build_ext --inplace`), then as the installed top-level module
(`pip install --no-build-isolation ./ops`).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import torch

EXTENSION = "stepwise_ops_C"
BUILD_HINT = (
    "build it with `MAX_JOBS=2 pip install --no-build-isolation ./ops` from the repository root "
    "(or `python ops/setup.py build_ext --inplace`); see ops/README.md"
)

_loaded = False
_error: str | None = None
_built_with_cuda = False


def find_library() -> Path | None:
    """Path of the compiled library: the in-place build first, then the installed module; None if absent."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"{EXTENSION}{suffix}"
        if candidate.is_file():
            return candidate
    spec = importlib.util.find_spec(EXTENSION)
    return Path(spec.origin) if spec is not None and spec.origin else None


def _ops_registered() -> bool:
    return hasattr(torch.ops.stepwise_ops, "ms_deform_attn_forward")


def load() -> bool:
    """Loads the library once (safe to call again); returns whether the compiled op is usable."""
    global _loaded, _error, _built_with_cuda
    if _loaded or _error is not None:
        return _loaded
    try:
        if not _ops_registered():
            path = find_library()
            if path is None:
                raise FileNotFoundError(f"no {EXTENSION} library next to {Path(__file__).parent} or installed")
            torch.ops.load_library(str(path))
        _register_python_parts()
        _built_with_cuda = bool(torch.ops.stepwise_ops.built_with_cuda())
        _loaded = True
    except (OSError, RuntimeError, AttributeError) as exc:  # missing file, ABI mismatch with this torch, ...
        _error = f"{type(exc).__name__}: {exc}"
    return _loaded


def load_error() -> str | None:
    """Why the library is not usable (None when it is, or before `load()`)."""
    return _error


def built_with_cuda() -> bool:
    """Whether the loaded library has the CUDA kernel."""
    return _loaded and _built_with_cuda


def _fake_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


def _fake_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    # The kernels return contiguous gradients in value's dtype.
    return (
        value.new_empty(value.shape),
        value.new_empty(sampling_locations.shape),
        value.new_empty(attention_weights.shape),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = torch.ops.stepwise_ops.ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grad_value, None, None, grad_loc, grad_attn


def _register_python_parts() -> None:
    torch.library.register_fake("stepwise_ops::ms_deform_attn_forward")(_fake_forward)
    torch.library.register_fake("stepwise_ops::ms_deform_attn_backward")(_fake_backward)
    torch.library.register_autograd(
        "stepwise_ops::ms_deform_attn_forward", _backward, setup_context=_setup_context
    )
