"""modules/onednn_linear.py: fp32 CPU linears through oneDNN where nothing is differentiated,
equal to aten's linear to fp32 rounding; every other call untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tunewright.modules.onednn_linear as onednn
from tunewright.modules.onednn_linear import onednn_linears

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The shapes of every call that reached oneDNN."""
    seen: list[tuple] = []
    real = onednn._linear

    def spy(x, weight, bias):
        seen.append((tuple(x.shape), tuple(weight.shape)))
        return real(x, weight, bias)

    monkeypatch.setattr(onednn, "_linear", spy)
    return seen


@pytest.mark.parametrize("shape", [(32, 576), (2, 7, 576), (1, 1, 1, 576)])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_atens_linear_to_fp32_rounding(calls, shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    layer = torch.nn.Linear(576, 1536, bias=bias)
    with torch.no_grad():
        expected = layer(x)
        with onednn_linears(CPU, torch.float32):
            got = layer(x)
    assert calls == [((x.numel() // 576, 576), (1536, 576))]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gradients_half_precision_autocast_and_other_weight_types_pass_through(calls):
    from tunewright.modules.peft.nf4 import nf4_module

    nf4 = nf4_module().to_nf4(torch.randn(256, 64), 64, 64)
    x, w = torch.randn(4, 64), torch.randn(32, 64, requires_grad=True)  # nf4: 256 x 64, blocks of 64
    with onednn_linears(CPU, torch.float32):
        F.linear(x, w).sum().backward()  # gradients on: aten's linear, and they flow
        assert w.grad is not None and w.grad.shape == w.shape
        with torch.no_grad():
            F.linear(x.bfloat16(), w.detach().bfloat16())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert F.linear(x, w).dtype == torch.bfloat16  # autocast still casts
            quantized = F.linear(x, nf4)  # torchao's NF4 tensor handles its own linear
    assert calls == []
    with torch.no_grad():
        torch.testing.assert_close(quantized, F.linear(x, nf4), rtol=0, atol=0)


def test_nothing_changes_off_the_cpu_or_in_half_precision(calls):
    with onednn_linears(torch.device("meta"), torch.float32), torch.no_grad():
        F.linear(torch.randn(2, 8), torch.randn(4, 8))
    with onednn_linears(CPU, torch.bfloat16), torch.no_grad():
        F.linear(torch.randn(2, 8), torch.randn(4, 8))
    assert calls == []


def test_a_compiled_function_traces_it_and_gives_the_eager_numbers():
    torch._dynamo.reset()
    layer = torch.nn.Linear(64, 128)
    compiled = torch.compile(lambda x: F.silu(layer(x)), dynamic=True)
    with torch.no_grad(), onednn_linears(CPU, torch.float32):
        for rows in (3, 5):
            x = torch.randn(2, rows, 64)
            torch.testing.assert_close(compiled(x), F.silu(layer(x)), rtol=1e-5, atol=1e-5)
