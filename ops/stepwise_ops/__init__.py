"""Multi-scale deformable attention: one function, dispatched to the compiled kernel or the reference.

`ms_deform_attn` uses the compiled CPU/CUDA op when it is built for the inputs' device, else the
pure-PyTorch reference with one warning. Build: see ops/README.md.
"""

from stepwise_ops import _library
from stepwise_ops.dispatch import (
    compiled_unavailable_reason,
    get_backend,
    ms_deform_attn,
    ms_deform_attn_compiled,
    set_backend,
)
from stepwise_ops.reference import ms_deform_attn_reference

_library.load()

__all__ = [
    "compiled_unavailable_reason",
    "get_backend",
    "ms_deform_attn",
    "ms_deform_attn_compiled",
    "ms_deform_attn_reference",
    "set_backend",
]
