"""LTI SSM ops: HiPPO values, discretisations, and the recurrent and convolutional modes agreeing."""
from __future__ import annotations

import math

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.ops.lti import (
    DISCRETIZATIONS, S4D_INITS, causal_fft_conv, discretize, discretize_dense, hippo_legs, lti_recurrent, s4d_init,
    ssm_kernel, ssm_kernel_dense,
)
from tests.conftest import rel_err


def test_hippo_legs_values():
    A, B = hippo_legs(4)
    for n in range(4):
        assert B[n] == pytest.approx(math.sqrt(2 * n + 1))
        for k in range(4):
            expected = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1) if n > k else (-(n + 1) if n == k else 0.0)
            assert A[n, k] == pytest.approx(expected)


def test_s4d_inits():
    A, _ = s4d_init(6, "lin")
    assert torch.allclose(A, torch.complex(torch.full((6,), -0.5, dtype=torch.float64),
                                           math.pi * torch.arange(6.0, dtype=torch.float64)))
    A, _ = s4d_init(6, "real")
    assert torch.allclose(A.real, -torch.arange(1, 7.0, dtype=torch.float64))
    A, _ = s4d_init(6, "legs")  # normal part of HiPPO-LegS: real parts -1/2, conjugate pairs
    assert torch.allclose(A.real, torch.full((6,), -0.5, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(torch.sort(A.imag).values, torch.sort(-A.imag).values, atol=1e-10)
    with pytest.raises(MambaKitError, match="init"):
        s4d_init(4, "chebyshev")


@pytest.mark.parametrize("kind", S4D_INITS)
@pytest.mark.parametrize("method", DISCRETIZATIONS)
def test_conv_mode_equals_recurrent_mode_diagonal(kind, method):
    g = torch.Generator().manual_seed(0)
    H, N, L = 3, 16, 257
    A, B = s4d_init(N, kind)
    A, B = A.expand(H, N), B.expand(H, N)
    C = torch.randn(H, N, dtype=torch.complex128, generator=g)
    dt = torch.tensor([0.003, 0.05, 0.5], dtype=torch.float64)[:, None]
    A_bar, B_bar = discretize(A, B, dt, method)
    u = torch.randn(2, H, L, dtype=torch.float64, generator=g)
    y_conv = causal_fft_conv(u, ssm_kernel(A_bar, B_bar, C, L))
    y_rec, _ = lti_recurrent(u, A_bar, B_bar, C)
    assert rel_err(y_conv, y_rec) <= 1e-8


@pytest.mark.parametrize("method", DISCRETIZATIONS)
def test_conv_mode_equals_recurrent_mode_dense_hippo(method):
    A, B = hippo_legs(8)
    C = torch.randn(8, dtype=torch.float64)
    A_bar, B_bar = discretize_dense(A, B, 0.05, method)
    u = torch.randn(2, 1, 60, dtype=torch.float64)
    y_conv = causal_fft_conv(u, ssm_kernel_dense(A_bar, B_bar, C, 60)[None])
    x, ys = torch.zeros(2, 8, dtype=torch.float64), []
    for t in range(60):
        x = x @ A_bar.T + B_bar * u[:, 0, t, None]
        ys.append(x @ C)
    assert rel_err(y_conv[:, 0], torch.stack(ys, -1)) <= 1e-8


def test_zoh_matches_matrix_exponential():
    A, B = s4d_init(5, "lin")
    A_bar, B_bar = discretize(A, B, torch.tensor(0.1, dtype=torch.float64), "zoh")
    Ad, Bd = discretize_dense(torch.diag(A), B, 0.1, "zoh")
    assert rel_err(torch.view_as_real(A_bar), torch.view_as_real(torch.diagonal(Ad))) < 1e-12
    assert rel_err(torch.view_as_real(B_bar), torch.view_as_real(Bd)) < 1e-12
