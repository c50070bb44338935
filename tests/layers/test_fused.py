"""convzoo.layers.fused: the fused Linear + GELU of CPU inference against the plain two-op form."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.profiler import profile

from convzoo.layers.fused import has_forward_hooks, linear_add, linear_gelu, linear_then_activation

FUSED_OP = "mkldnn::_linear_pointwise"


def _ops_run(fn) -> set:
    with profile() as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def _naive_linear_gelu(x, weight, bias):
    """Independent loop over outputs (float64): GELU(sum_k x_k w_jk + b_j), GELU = v * Phi(v)."""
    rows = x.reshape(-1, x.shape[-1]).double().tolist()
    out = []
    for row in rows:
        values = []
        for j in range(weight.shape[0]):
            v = sum(a * w for a, w in zip(row, weight[j].double().tolist())) + (float(bias[j]) if bias is not None else 0.0)
            values.append(0.5 * v * (1 + math.erf(v / math.sqrt(2))))
        out.append(values)
    return torch.tensor(out, dtype=torch.float64).reshape(*x.shape[:-1], weight.shape[0])


@given(
    rows=st.integers(0, 40),
    in_features=st.integers(1, 70),
    out_features=st.integers(1, 90),
    with_bias=st.booleans(),
    leading=st.sampled_from([(), (2,), (1, 3)]),
)
def test_inference_matches_the_plain_form(rows, in_features, out_features, with_bias, leading):
    x = torch.randn(*leading, rows, in_features)
    weight = torch.randn(out_features, in_features) / in_features**0.5
    bias = torch.randn(out_features) if with_bias else None
    with torch.no_grad():
        got = linear_gelu(x, weight, bias)
        expected = F.gelu(F.linear(x, weight, bias))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_inference_is_one_fused_call_and_matches_a_naive_loop():
    x, weight, bias = torch.randn(5, 7), torch.randn(6, 7), torch.randn(6)
    with torch.no_grad():
        assert FUSED_OP in _ops_run(lambda: linear_gelu(x, weight, bias))
        got = linear_gelu(x, weight, bias)
    torch.testing.assert_close(got.double(), _naive_linear_gelu(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_non_contiguous_input():
    x = torch.randn(3, 8, 5).transpose(0, 1)  # (8, 3, 5), not contiguous
    weight, bias = torch.randn(4, 5), torch.randn(4)
    with torch.no_grad():
        torch.testing.assert_close(linear_gelu(x, weight, bias), F.gelu(F.linear(x, weight, bias)), rtol=1e-5, atol=1e-5)


def test_autograd_takes_the_plain_path_with_the_same_gradients():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_gelu, (x, weight, bias))
    x32, w32, b32 = (t.detach().float().requires_grad_() for t in (x, weight, bias))
    assert FUSED_OP not in _ops_run(lambda: linear_gelu(x32, w32, b32))
    grads = torch.autograd.grad(linear_gelu(x32, w32, b32).square().sum(), (x32, w32, b32))
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x32, w32, b32))
    expected = torch.autograd.grad(F.gelu(F.linear(x2, w2, b2)).square().sum(), (x2, w2, b2))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_float64_runs_the_plain_form():
    x, weight, bias = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64), None
    with torch.no_grad():
        assert FUSED_OP not in _ops_run(lambda: linear_gelu(x, weight, bias))
        assert torch.equal(linear_gelu(x, weight, bias), F.gelu(F.linear(x, weight, bias)))


@pytest.mark.parametrize("act", [nn.GELU(approximate="tanh"), nn.ReLU(), nn.Identity()], ids=["gelu-tanh", "relu", "identity"])
def test_a_swapped_activation_runs_as_it_is(act):
    linear = nn.Linear(6, 3)
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert FUSED_OP not in _ops_run(lambda: linear_then_activation(linear, act, x))
        assert torch.equal(linear_then_activation(linear, act, x), act(linear(x)))


def test_exact_gelu_after_a_plain_linear_is_fused():
    linear, act = nn.Linear(6, 3), nn.GELU()
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert FUSED_OP in _ops_run(lambda: linear_then_activation(linear, act, x))
        torch.testing.assert_close(linear_then_activation(linear, act, x), act(linear(x)))


@given(rows=st.integers(0, 30), in_features=st.integers(1, 50), out_features=st.integers(1, 60),
       with_bias=st.booleans(), leading=st.sampled_from([(), (2,), (1, 3)]))
def test_linear_add_inference_matches_the_plain_form(rows, in_features, out_features, with_bias, leading):
    x = torch.randn(*leading, rows, in_features)
    weight = torch.randn(out_features, in_features) / in_features**0.5
    bias = torch.randn(out_features) if with_bias else None
    residual = torch.randn(*leading, rows, out_features)
    with torch.no_grad():
        got = linear_add(x, weight, bias, residual)
    torch.testing.assert_close(got, residual + F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_linear_add_is_one_fused_call_only_for_a_contiguous_residual():
    x, weight, bias = torch.randn(6, 5), torch.randn(4, 5), torch.randn(4)
    residual = torch.randn(6, 4)
    strided = torch.randn(4, 6).t()
    with torch.no_grad():
        assert FUSED_OP in _ops_run(lambda: linear_add(x, weight, bias, residual))
        assert FUSED_OP not in _ops_run(lambda: linear_add(x, weight, bias, strided))
        torch.testing.assert_close(linear_add(x, weight, bias, strided), strided + F.linear(x, weight, bias))
    expected = residual.double() + torch.tensor(
        [[sum(a * w for a, w in zip(row, col)) + float(b) for col, b in zip(weight.tolist(), bias)] for row in x.tolist()],
        dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(linear_add(x, weight, bias, residual).double(), expected, rtol=1e-5, atol=1e-5)


def test_linear_add_gradients():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_add, (x, weight, bias, residual))


def test_modules_with_forward_hooks_run_as_themselves():
    """Tools that watch modules by hooks (segmentation's pruning of unused modules) see the calls."""
    linear, act = nn.Linear(6, 3), nn.GELU()
    seen = []
    linear.register_forward_pre_hook(lambda module, args: seen.append(module))
    with torch.no_grad():
        assert FUSED_OP not in _ops_run(lambda: linear_then_activation(linear, act, torch.randn(2, 6)))
    assert seen == [linear]
    assert has_forward_hooks(linear) and not has_forward_hooks(act)
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        assert has_forward_hooks(act)
    finally:
        handle.remove()
    assert not has_forward_hooks(act)
