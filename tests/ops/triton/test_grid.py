"""The host-side launch arithmetic equals Triton's constexpr functions (which it replaces in the ops' host code)."""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from mambakit.ops.triton.grid import cdiv, next_power_of_2  # noqa: E402


def test_next_power_of_2_matches_triton() -> None:
    values = list(range(0, 4200)) + [2 ** k + d for k in range(12, 40) for d in (-1, 0, 1)]
    for n in values:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


@pytest.mark.parametrize("y", [1, 2, 3, 7, 16, 64, 100, 128, 4096])
def test_cdiv_matches_triton(y: int) -> None:
    for x in list(range(0, 1000)) + [2 ** 31 - 1, 2 ** 31, 10 ** 12 + 3]:
        assert cdiv(x, y) == triton.cdiv(x, y), (x, y)
