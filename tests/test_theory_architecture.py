"""One description of an MLP for the theory (theory/architecture.py): ``net.architecture`` against the
separate keywords."""

import pytest
import torch

import natural_tangents as nat


def test_an_mlps_architecture_drives_every_theory_function():
    net = nat.MLP([7, 32, 32, 1], activation="erf", sigma_w2=1.5, sigma_b2=0.2)
    kw = {"depth": 3, "activation": "erf", "sigma_w2": 1.5, "sigma_b2": 0.2}
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    assert torch.equal(nat.theory.ntk(x, arch=net.architecture), nat.theory.ntk(x, **kw))
    fisher = nat.fisher.BlockTriDiagonal(damping=1e-2)
    assert torch.equal(
        nat.theory.coefficient(fisher, None, x, arch=net.architecture), nat.theory.coefficient(fisher, None, x, **kw)
    )
    unit = nat.fisher.Unitwise()
    want = nat.theory.alpha(unit, widths=net.widths, activation="erf", sigma_w2=1.5, sigma_b2=0.2)
    assert nat.theory.alpha(unit, widths=net.widths, arch=net.architecture) == want
    with pytest.raises(ValueError, match="arch: depth 3 does not match"):
        nat.theory.alpha(unit, widths=[7, 32, 1], arch=net.architecture)
    with pytest.raises(ValueError, match="arch"):
        nat.theory.coefficient(fisher, None, x, arch=net.architecture, depth=3)
