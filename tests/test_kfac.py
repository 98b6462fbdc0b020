"""K-FAC (fisher/kfac.py) beyond the explicit-Fisher checks of test_fisher_explicit.py: the precision
of a float32 network's factors, and modules without Kronecker structure (their exact block)."""

import pytest
import torch
from torch import nn

import natural_tangents as nat
from _explicit import flat, jacobian
from natural_tangents import fisher as F

F64 = torch.float64


def _pair(widths, seed=0):
    """The same MLP in float64 and float32 (float64 weights rounded to float32, both ways)."""
    m32 = nat.MLP(widths, sigma_b2=0.5, dtype=torch.float32, seed=seed)
    m64 = nat.MLP(widths, sigma_b2=0.5, dtype=F64, seed=seed)
    m64.load_state_dict({k: v.double() for k, v in m32.state_dict().items()})
    return m32, m64


@pytest.mark.parametrize("damping", [0.0, 1e-12, 1e-8, 1e-3])
def test_float32_network_matches_the_float64_network_at_any_damping(unit_inputs, damping):
    """Small damping makes the N × N factors ill-conditioned (one is singular here): they are then
    formed, factored and applied in float64, so a float32 network's update is as accurate as the
    float32 signals allow, as for the exact Fisher (was 1.6, 6.6e3, 1.6 relative)."""
    x = unit_inputs(60, 100)
    y = torch.randn(60, 1, generator=torch.Generator().manual_seed(1), dtype=F64)
    m32, m64 = _pair([100, 128, 128, 1])
    fisher = F.KFAC(damping=damping)
    got = flat(fisher.natural_gradient(m32, x.float(), y.float())).double()
    want = flat(fisher.natural_gradient(m64, x, y))
    exact = flat(F.Exact(damping=damping).natural_gradient(m32, x.float(), y.float())).double()
    exact_err = float((exact - flat(F.Exact(damping=damping).natural_gradient(m64, x, y))).norm())
    assert float((got - want).norm() / want.norm()) < 1e-4
    assert exact_err / float(want.norm()) < 1e-3  # the reference level: the exact Fisher in float32
    iso = fisher.isotropy(m32, x.float())  # was "not positive definite" at ρ = 1e-12
    assert iso.alpha == pytest.approx(fisher.isotropy(m64, x).alpha, rel=1e-4)


class _WithGeneric(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 3)
        self.fc = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.out = nn.Linear(5, 2)
        self.scale = nn.Parameter(torch.tensor([1.2, 0.8]))

    def forward(self, tokens):
        return self.out(torch.tanh(self.norm(self.fc(self.embed(tokens).flatten(1))))) * self.scale


def test_generic_modules_keep_their_exact_block():
    """K-FAC gives a module without Kronecker structure (Embedding, LayerNorm, a bare parameter) its
    exact block J_l^T J_l / N + ρ I: its update equals that block's solve with the explicit Jacobian,
    the same as the block-diagonal Fisher's."""
    torch.manual_seed(2)
    model = _WithGeneric().to(F64)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 6, (7, 2), generator=g)
    y = torch.randn(7, 2, generator=g, dtype=F64)
    rho, n = 1e-3, 7
    j = jacobian(model, x)
    r = (model(x) - y).detach().reshape(-1)
    names = [k for k, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offs = torch.tensor([0, *sizes]).cumsum(0).tolist()
    kfac = F.KFAC(damping=rho, warn=False).natural_gradient(model, x, y)
    bd = F.BlockDiagonal(damping=rho).natural_gradient(model, x, y)
    for owner in ("embed", "norm", "scale"):
        ks = [k for k, nm in enumerate(names) if nm == owner or nm.startswith(owner + ".")]
        cols = [i for k in ks for i in range(offs[k], offs[k + 1])]
        jl = j[:, cols]
        want = torch.linalg.solve(jl.T @ jl / n + rho * torch.eye(len(cols), dtype=F64), jl.T @ r / n)
        got = flat([kfac[k] for k in ks])
        assert float((got - want).norm() / want.norm()) < 1e-9, owner
        assert torch.allclose(got, flat([bd[k] for k in ks]), rtol=1e-9, atol=1e-14)
