"""Multi-scale deformable attention on CUDA: the CUDA kernel against the reference (float64, float32),
gradcheck, float16/bfloat16 against float32, non-default device index, current stream, opcheck.
Marked `gpu`; skipped without a CUDA device or without the CUDA kernel built
(`FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=<arch> MAX_JOBS=2 pip install --no-build-isolation ./ops`)."""

from __future__ import annotations

import pytest
import torch

import stepwise_ops
from stepwise_ops import ms_deform_attn, ms_deform_attn_compiled, ms_deform_attn_reference
from stepwise_ops.testing import SHAPE_SETS, forward_and_grads, make_inputs


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    return stepwise_ops.compiled_unavailable_reason("cuda")


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_skip_reason() is not None, reason=f"{_skip_reason()}")]


def compare(got, expected, rtol, atol_scale):
    for name, g, e in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, expected):
        assert g.shape == e.shape, name
        atol = atol_scale * max(e.abs().max().item(), 1.0)
        torch.testing.assert_close(
            g.double().cpu(), e.double().cpu(), rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("shape_set", sorted(SHAPE_SETS))
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_float64_matches_reference(shape_set, batch):
    inputs = make_inputs(SHAPE_SETS[shape_set], n=batch, lq=6, m=2, d=5, p=3, device="cuda", seed=batch)
    compare(forward_and_grads(ms_deform_attn_compiled, *inputs), forward_and_grads(ms_deform_attn_reference, *inputs),
            rtol=1e-10, atol_scale=1e-10)


@pytest.mark.parametrize("channels", [1, 3, 32, 64, 71, 96, 1024, 1025])
def test_channel_counts_float32(channels):
    inputs = make_inputs(SHAPE_SETS["four_levels"], n=2, lq=3, m=2, d=channels, p=2, device="cuda", seed=channels)
    ref = forward_and_grads(ms_deform_attn_reference, *[t.double() if t.is_floating_point() else t for t in inputs])
    got = forward_and_grads(ms_deform_attn_compiled, *[t.float() if t.is_floating_point() else t for t in inputs])
    compare(got, ref, rtol=1e-5, atol_scale=1e-5)


def test_gradcheck():
    value, spatial, starts, loc, attn = make_inputs(SHAPE_SETS["original"], n=2, lq=3, m=2, d=3, p=2, device="cuda")
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(
        lambda v, lo, a: ms_deform_attn_compiled(v, spatial, starts, lo, a), leaves, eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("shape_set", ["four_levels", "non_square"])
def test_half_precision_against_float32(dtype, tol, shape_set):
    inputs = make_inputs(SHAPE_SETS[shape_set], n=3, lq=16, m=4, d=32, p=4, device="cuda")
    low = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    # the float32 result on the same rounded inputs, so only the kernel's precision is measured
    ref = forward_and_grads(ms_deform_attn_compiled, *[t.float() if t.is_floating_point() else t for t in low])
    got = forward_and_grads(ms_deform_attn_compiled, *low)
    assert all(g.dtype == dtype for g in got)
    compare(got, ref, rtol=tol, atol_scale=tol)


def test_non_default_device():
    count = torch.cuda.device_count()
    if count < 2:
        pytest.skip(f"needs 2 CUDA devices, found {count}")
    inputs = make_inputs(SHAPE_SETS["four_levels"], n=3, lq=7, m=2, d=32, p=4, device="cuda:1")
    expected = forward_and_grads(ms_deform_attn_reference, *inputs)
    with torch.cuda.device(0):  # the current device is not the inputs' device: the kernel's guard must switch
        got = forward_and_grads(ms_deform_attn_compiled, *inputs)
    torch.cuda.synchronize(1)
    assert all(g.device == torch.device("cuda:1") for g in got)
    compare(got, expected, rtol=1e-10, atol_scale=1e-10)


def test_side_stream():
    inputs = make_inputs(SHAPE_SETS["non_square"], n=2, lq=9, m=2, d=32, p=4, device="cuda")
    expected = forward_and_grads(ms_deform_attn_compiled, *inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = forward_and_grads(ms_deform_attn_compiled, *inputs)
    torch.cuda.current_stream().wait_stream(stream)
    compare(got, expected, rtol=0, atol_scale=1e-12)


def test_empty_queries_and_non_contiguous():
    value, spatial, starts, loc, attn = make_inputs(SHAPE_SETS["four_levels"], n=2, lq=0, device="cuda")
    out, g_value, _, _ = forward_and_grads(ms_deform_attn_compiled, value, spatial, starts, loc, attn)
    assert out.shape == (2, 0, 8) and torch.count_nonzero(g_value) == 0
    value, spatial, starts, loc, attn = make_inputs(SHAPE_SETS["non_square"], n=3, lq=5, device="cuda")
    strided = (value.transpose(0, 3).contiguous().transpose(0, 3), spatial, starts,
               torch.stack([loc, loc], -1)[..., 0], attn.transpose(1, 4).contiguous().transpose(1, 4))
    compare(forward_and_grads(ms_deform_attn_compiled, *strided),
            forward_and_grads(ms_deform_attn_compiled, value, spatial, starts, loc, attn), rtol=0, atol_scale=1e-12)


def test_spatial_tables_on_cpu_are_accepted():
    value, spatial, starts, loc, attn = make_inputs(SHAPE_SETS["original"], n=2, lq=4, device="cuda")
    torch.testing.assert_close(
        ms_deform_attn_compiled(value, spatial.cpu(), starts.cpu(), loc, attn),
        ms_deform_attn_reference(value, spatial, starts, loc, attn),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_opcheck(dtype):
    value, spatial, starts, loc, attn = make_inputs(SHAPE_SETS["original"], n=2, lq=3, m=2, d=3, p=2,
                                                    dtype=dtype, device="cuda")
    args = (value.requires_grad_(), spatial, starts, loc.requires_grad_(), attn.requires_grad_())
    # gradients of the atomics-based kernel are not bitwise deterministic in the last bits
    torch.library.opcheck(torch.ops.stepwise_ops.ms_deform_attn_forward.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_dispatch_uses_cuda_kernel():
    value, spatial, starts, loc, attn = make_inputs(SHAPE_SETS["original"], n=1, lq=2, device="cuda")
    out = ms_deform_attn(value.requires_grad_(), spatial, starts, loc, attn)
    assert out.is_cuda
    torch.testing.assert_close(out, ms_deform_attn_reference(value, spatial, starts, loc, attn))
