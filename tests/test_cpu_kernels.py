"""The compiled decode matmul kernel: same numbers as F.linear, and a clean fallback."""

import pytest
import torch

from reference_engine import cpu_kernels
from reference_engine.model import PackedWeight, linear


@pytest.fixture(scope="module")
def skinny():
    kernel = cpu_kernels.skinny_matmul_kernel(build=True)  # CI's set-up has built it already
    assert kernel is not None, cpu_kernels.status()
    return kernel


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n_out,n_in", [(48, 32), (7, 37), (576, 1536), (1, 16)])
def test_kernel_equals_f_linear(skinny, rows, n_out, n_in):
    torch.manual_seed(rows)
    x, w = torch.randn(rows, n_in), torch.randn(n_out, n_in)
    torch.testing.assert_close(skinny(x, w), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-4)


def test_kernel_rejects_what_it_was_not_written_for(skinny):
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        skinny(torch.randn(5, 16), torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="float32"):
        skinny(torch.randn(1, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64))


def test_linear_sends_decode_rows_through_the_kernel(skinny, monkeypatch):
    w, b = torch.randn(24, 16), torch.randn(24)
    packed = PackedWeight(w)
    calls = []
    packed.skinny = lambda x, weight: calls.append(x.shape) or skinny(x, weight)
    x = torch.randn(2, 1, 16)  # two sequences, one new token each
    torch.testing.assert_close(linear(x, w, b, packed), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert calls == [(2, 16)]
    linear(torch.randn(8, 16), w, b, packed)  # 8 rows: oneDNN, not the kernel
    assert len(calls) == 1


def test_turned_off_kernel_reports_why(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.setenv("DOJO_KERNELS", "0")
    assert cpu_kernels.skinny_matmul_kernel() is None
    assert "DOJO_KERNELS=0" in cpu_kernels.status()
