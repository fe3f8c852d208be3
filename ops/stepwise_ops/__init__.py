"""Multi-scale deformable attention: one function, dispatched to the compiled kernel or the reference."""

from stepwise_ops.reference import ms_deform_attn_reference

ms_deform_attn = ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference"]
