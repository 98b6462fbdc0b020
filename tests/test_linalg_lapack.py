"""Batched Cholesky factorizations through SciPy's LAPACK (linalg/lapack.py) against torch's."""

import pytest
import torch

from natural_tangents.linalg import lapack
from natural_tangents.linalg.lapack import Scratch


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_through_lapack_matches_torch(dtype):
    """The in-place LAPACK factorization (lower triangle of the returned view) against torch's, in
    a batch with one matrix that is not positive definite (info > 0 there only), from a scratch
    buffer and in place; an empty batch."""
    if not lapack.has_lapack():
        pytest.skip("SciPy's LAPACK is not available to worker threads here")
    g = torch.Generator().manual_seed(11)
    a = torch.randn(4, 30, 40, generator=g, dtype=dtype)
    a = a @ a.mT
    a[2, 5, 5] = -1.0
    chol, info = lapack.cholesky(a, Scratch())
    want, want_info = torch.linalg.cholesky_ex(a)
    assert info.tolist() == want_info.tolist() and info[2] > 0
    ok = info == 0
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    assert _rel(chol[ok].tril(), want[ok]) < tol
    b = torch.randn(4, 30, 1, generator=g, dtype=dtype)
    assert _rel(lapack.cholesky_solve(chol[ok], b[ok]), torch.linalg.solve(a[ok], b[ok])) < 100 * tol
    inplace = a[ok].contiguous()
    chol2, _ = lapack.cholesky(inplace, overwrite=True)
    assert chol2.data_ptr() == inplace.data_ptr() and torch.equal(chol2.tril(), chol[ok].tril())
    assert lapack.cholesky(a[:0])[0].shape == (0, 30, 30)
