"""Targets as the losses (losses.py) read them: class indices of every integer dtype give the same
natural gradient as int64, float class indices are refused with a hint."""

import pytest
import torch
from torch import nn

import natural_tangents as nat

F64 = torch.float64


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(F64)


def _data(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_class_indices_of_every_integer_dtype(dtype):
    x, y = _data()
    model = _model()
    fisher = nat.fisher.Exact(damping=1e-2, loss="cross_entropy")
    want = fisher.natural_gradient(model, x, y)
    got = fisher.natural_gradient(model, x, y.to(dtype))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_float_class_indices_get_a_hint():
    x, y = _data()
    with pytest.raises(ValueError, match=r"integer tensor \(e.g. y.long\(\)\)"):
        nat.fisher.Exact(damping=1e-2, loss="cross_entropy").natural_gradient(_model(), x, y.to(F64))
