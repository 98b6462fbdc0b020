"""The empirical NTK tile by tile (``batch_size=``, ``out=``) against the untiled kernel, for an MLP
and a CNN, one and several outputs, symmetric and two-batch kernels."""

import numpy as np
import pytest
import torch
from torch import nn

import natural_tangents as nat

F64 = torch.float64


def _cnn(c):
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 5), nn.Tanh(), nn.Linear(5, c)
    ).to(F64)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("batch_size", [4, 7, 13])  # divides N = 28 or not; one tile per side
@pytest.mark.parametrize("two_batches", [False, True])
@pytest.mark.parametrize("per_layer", [False, True])
def test_tiled_mlp_kernel_equals_untiled(c, batch_size, two_batches, per_layer):
    net = nat.MLP([6, 12, 12, c], activation="erf", sigma_b2=0.2, dtype=F64)
    g = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(28, 6, generator=g, dtype=F64), torch.randn(9, 6, generator=g, dtype=F64)
    other = x2 if two_batches else None
    want = nat.empirical_ntk(net, x, other, per_layer=per_layer)
    got = nat.empirical_ntk(net, x, other, per_layer=per_layer, batch_size=batch_size)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())


@pytest.mark.parametrize("c", [1, 2])
def test_tiled_cnn_kernel_into_a_file_equals_the_in_memory_kernel(c, tmp_path):
    model = _cnn(c)
    x = torch.randn(11, 1, 7, 7, generator=torch.Generator().manual_seed(1), dtype=F64)
    want = nat.empirical_ntk(model, x)
    path = tmp_path / "k.npy"
    got = nat.empirical_ntk(model, x, batch_size=4, out=path)
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())
    stored = torch.from_numpy(np.load(path))
    # the file holds (N, N) for one output and the (C, C, N, N) layout for several
    stored = stored if c == 1 else stored.permute(2, 3, 0, 1)
    assert torch.equal(stored, got)
