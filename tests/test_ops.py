"""Multi-scale deformable attention on the CPU: compiled kernel against the pure-PyTorch reference,
autograd, opcheck, torch.compile, and the dispatcher's fallback. Tests of the compiled kernel skip when
it is not built (build: `MAX_JOBS=2 pip install --no-build-isolation ./ops`)."""

from __future__ import annotations

import warnings

import pytest
import torch

import stepwise_ops
from stepwise_ops import _library, dispatch, ms_deform_attn, ms_deform_attn_compiled, ms_deform_attn_reference
from stepwise_ops.testing import SHAPE_SETS, forward_and_grads, make_inputs

needs_compiled = pytest.mark.skipif(
    stepwise_ops.compiled_unavailable_reason("cpu") is not None,
    reason=f"compiled stepwise_ops CPU kernel not built: {stepwise_ops.compiled_unavailable_reason('cpu')}",
)


def assert_matches_reference(inputs, rtol, atol_scale):
    """Compiled forward and the three gradients against the reference computed in float64."""
    ref = forward_and_grads(ms_deform_attn_reference, *[t.double() if t.is_floating_point() else t for t in inputs])
    got = forward_and_grads(ms_deform_attn_compiled, *inputs)
    for name, g, r in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, ref):
        assert g.dtype == inputs[0].dtype and g.shape == r.shape, name
        atol = atol_scale * max(r.abs().max().item(), 1.0)
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@needs_compiled
@pytest.mark.parametrize("shape_set", sorted(SHAPE_SETS))
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_float64_forward_and_grads_match_reference(shape_set, batch):
    inputs = make_inputs(SHAPE_SETS[shape_set], n=batch, lq=6, m=2, d=5, p=3, seed=batch)
    assert_matches_reference(inputs, rtol=1e-10, atol_scale=1e-10)


@needs_compiled
@pytest.mark.parametrize("channels", [1, 3, 32, 64, 71, 96, 1024, 1025])
def test_channel_counts(channels):
    inputs = make_inputs(SHAPE_SETS["four_levels"], n=1, lq=3, m=2, d=channels, p=2, seed=channels)
    assert_matches_reference(inputs, rtol=1e-10, atol_scale=1e-10)


@needs_compiled
@pytest.mark.parametrize("shape_set", ["four_levels", "non_square"])
def test_float32_within_1e5_relative(shape_set):
    inputs = make_inputs(SHAPE_SETS[shape_set], n=3, lq=8, m=2, d=32, p=4, dtype=torch.float32)
    assert_matches_reference(inputs, rtol=1e-5, atol_scale=1e-5)


@needs_compiled
def test_gradcheck():
    value, spatial, starts, loc, attn = make_inputs(SHAPE_SETS["original"], n=2, lq=3, m=2, d=3, p=2)
    leaves = [t.requires_grad_() for t in (value, loc, attn)]

    def fn(v, lo, a):
        return ms_deform_attn_compiled(v, spatial, starts, lo, a)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


@needs_compiled
def test_points_wholly_outside_read_zero():
    value, spatial, starts, loc, attn = make_inputs(SHAPE_SETS["non_square"], n=2, lq=4)
    # pixel coords <= -1 or >= size: every corner is outside
    loc = torch.where(torch.rand_like(loc) < 0.5, -1.5 / 10 * torch.ones_like(loc), 1.2 * torch.ones_like(loc))
    out, g_value, g_loc, g_attn = forward_and_grads(ms_deform_attn_compiled, value, spatial, starts, loc, attn)
    ref = forward_and_grads(ms_deform_attn_reference, value, spatial, starts, loc, attn)
    for got, expected in zip((out, g_value, g_loc, g_attn), ref):
        assert torch.count_nonzero(got) == 0
        torch.testing.assert_close(got, expected)


@needs_compiled
@pytest.mark.parametrize("fn", [ms_deform_attn_compiled, ms_deform_attn_reference], ids=["compiled", "reference"])
def test_empty_query_set(fn):
    value, spatial, starts, loc, attn = make_inputs(SHAPE_SETS["four_levels"], n=3, lq=0, m=2, d=4)
    out, g_value, g_loc, g_attn = forward_and_grads(fn, value, spatial, starts, loc, attn)
    assert out.shape == (3, 0, 8) and g_loc.shape == loc.shape and g_attn.shape == attn.shape
    assert torch.count_nonzero(g_value) == 0


@needs_compiled
def test_non_contiguous_inputs():
    value, spatial, starts, loc, attn = make_inputs(SHAPE_SETS["non_square"], n=3, lq=5, m=2, d=6)
    # same values, other memory layouts: transposed storage and a strided slice
    value_nc = value.transpose(0, 3).contiguous().transpose(0, 3)
    loc_nc = torch.stack([loc, torch.zeros_like(loc)], dim=-1)[..., 0]
    attn_nc = attn.transpose(1, 4).contiguous().transpose(1, 4)
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or attn_nc.is_contiguous())
    got = forward_and_grads(ms_deform_attn_compiled, value_nc, spatial, starts, loc_nc, attn_nc)
    expected = forward_and_grads(ms_deform_attn_compiled, value, spatial, starts, loc, attn)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype):
    value, spatial, starts, loc, attn = make_inputs(SHAPE_SETS["original"], n=2, lq=3, m=2, d=3, p=2, dtype=dtype)
    args = (value.requires_grad_(), spatial, starts, loc.requires_grad_(), attn.requires_grad_())
    torch.library.opcheck(torch.ops.stepwise_ops.ms_deform_attn_forward.default, args)
    grad_out = torch.randn(2, 3, 6, dtype=dtype)
    torch.library.opcheck(
        torch.ops.stepwise_ops.ms_deform_attn_backward.default,
        (grad_out, *[a.detach() for a in args]),
    )


@needs_compiled
def test_torch_compile_fullgraph():
    value, spatial, starts, loc, attn = make_inputs(
        SHAPE_SETS["original"], n=1, lq=4, m=2, d=4, p=2, dtype=torch.float32
    )

    def fn(v, lo, a):
        return (ms_deform_attn(v, spatial, starts, lo, a) * 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    try:
        out = compiled(*leaves)
    except torch._dynamo.exc.BackendCompilerFailed as exc:  # e.g. no working C++ compiler for inductor
        pytest.skip(f"inductor cannot compile on this machine: {exc}")
    expected = fn(value, loc, attn)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out, leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref_grads = torch.autograd.grad(fn(*ref_leaves), ref_leaves)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@needs_compiled
def test_bad_level_table_names_the_problem():
    value, spatial, starts, loc, attn = make_inputs(SHAPE_SETS["original"], n=1, lq=2)
    with pytest.raises(RuntimeError, match="level_start_index\\[1\\]"):
        ms_deform_attn_compiled(value, spatial, starts + torch.tensor([0, 1]), loc, attn)
    with pytest.raises(RuntimeError, match="value has S"):
        ms_deform_attn_compiled(value[:, :-1], spatial, starts, loc, attn)


def test_shape_mismatch_is_a_clear_error():
    value, spatial, starts, loc, attn = make_inputs(SHAPE_SETS["original"], n=2, lq=2)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, spatial, starts, loc, attn[:, :, :, :, :1])
    with pytest.raises(ValueError, match="sampling_locations"):
        ms_deform_attn(value, spatial, starts, loc[:1], attn[:1])


def test_mixed_dtypes_are_promoted():
    value, spatial, starts, loc, attn = make_inputs(SHAPE_SETS["original"], n=1, lq=3, dtype=torch.float32)
    out = ms_deform_attn(value.to(torch.bfloat16), spatial, starts, loc, attn)
    assert out.dtype == torch.float32


@pytest.fixture
def library_missing(monkeypatch):
    """Makes the dispatcher believe the compiled library failed to load."""
    monkeypatch.setattr(_library, "_loaded", False)
    monkeypatch.setattr(_library, "_error", "FileNotFoundError: simulated missing build")
    monkeypatch.setattr(dispatch, "_warned", set())
    yield


def test_fallback_warns_once_and_uses_reference(library_missing):
    inputs = make_inputs(SHAPE_SETS["four_levels"], n=2, lq=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ms_deform_attn(*inputs)
        second = ms_deform_attn(*inputs)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "simulated missing build" in messages[0] and "pip install --no-build-isolation ./ops" in messages[0]
    expected = ms_deform_attn_reference(*inputs)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)


def test_backend_compiled_raises_when_missing(library_missing, monkeypatch):
    monkeypatch.setattr(dispatch, "_backend", "compiled")
    with pytest.raises(RuntimeError, match="not available"):
        ms_deform_attn(*make_inputs(SHAPE_SETS["one_level"], n=1, lq=1))


def test_backend_reference_is_silent(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(_library, "_loaded", False)
    monkeypatch.setattr(_library, "_error", "FileNotFoundError: simulated missing build")
    previous = stepwise_ops.get_backend()
    stepwise_ops.set_backend("reference")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ms_deform_attn(*make_inputs(SHAPE_SETS["one_level"], n=1, lq=2))
    finally:
        stepwise_ops.set_backend(previous)


def test_backend_names_and_env(monkeypatch):
    previous = stepwise_ops.get_backend()
    try:
        with pytest.raises(ValueError, match="STEPWISE_MSDA_BACKEND"):
            stepwise_ops.set_backend("fast")
        monkeypatch.setenv("STEPWISE_MSDA_BACKEND", "reference")
        stepwise_ops.set_backend(None)
        assert stepwise_ops.get_backend() == "reference"
    finally:
        stepwise_ops.set_backend(previous)


@needs_compiled
def test_dispatch_uses_compiled_kernel_on_cpu(monkeypatch):
    def reference_must_not_run(*args):
        raise AssertionError("the dispatcher fell back to the reference although the CPU kernel is built")

    monkeypatch.setattr(dispatch, "ms_deform_attn_reference", reference_must_not_run)
    monkeypatch.setattr(dispatch, "_backend", "auto")
    value, spatial, starts, loc, attn = make_inputs(SHAPE_SETS["original"], n=1, lq=2)
    out = ms_deform_attn(value, spatial, starts, loc, attn)
    torch.testing.assert_close(out, ms_deform_attn_reference(value, spatial, starts, loc, attn))
