"""K-FAC (fisher/kfac.py): the update in every product order and at zero damping against the explicit
P × P Fisher, the precision of a float32 network's factors, modules without Kronecker structure
(their exact block), and the warning for inputs narrower than N. The checks every Fisher shares are
in test_fisher.py."""

import pytest
import torch
from torch import nn

import natural_tangents as nat
from _explicit import explicit_fisher_of, explicit_signals, flat, jacobian
from _nets import SHAPES, tiny_data, tiny_mlp

TOL = 1e-8


def _explicit(fisher, net, x, lam):
    return explicit_fisher_of(fisher, net, x, net.depth, explicit_signals, lam=lam)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("route", ["input_first", "output_first", "middle"])
@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_kfac_update_is_the_same_in_every_product_order(route, c, shape):
    """The damped K-FAC update multiplies (B* + ρ)^{-1} Δ^T, R and a (A* + ρ)^{-1} in the cheapest
    order; every order (input side first, output side first, the N·C × N middle first) must give the
    explicit (G + ρI)^{-1} ∇L."""
    widths, n = shape
    fisher = nat.fisher.KFAC(damping=1e-3, product_order=route)
    net = tiny_mlp(widths, c, True)
    x, y = tiny_data(n, widths[0], c)
    g = _explicit(fisher, net, x, None)
    grad = jacobian(net, x).T @ (net(x) - y).reshape(-1) / n
    assert _rel(flat(fisher.natural_gradient(net, x, y)), torch.linalg.solve(g, grad)) < TOL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("c", [1, 2])
def test_kfac_zero_damping_update_by_factors_matches_the_pseudo_inverses(shape, c):
    """At ρ = 0 the K-FAC update through Cholesky factors (taken only when the factors are far from
    singular, the eigendecomposition's pseudo-inverse otherwise) equals the explicit pseudo-inverse of
    B* ⊗ A*, in every product order."""
    widths, n = shape
    net = tiny_mlp(widths, c, True)
    x, y = tiny_data(n, widths[0], c)
    fisher = nat.fisher.KFAC(damping=0.0, warn=False)
    want = torch.linalg.pinv(_explicit(fisher, net, x, None), hermitian=True) @ (
        jacobian(net, x).T @ (net(x) - y).reshape(-1) / n
    )
    for order in ("auto", "input_first", "output_first"):
        got = flat(nat.fisher.KFAC(damping=0.0, warn=False, product_order=order).natural_gradient(net, x, y))
        assert _rel(got, want.detach()) < 1e-8, order


def test_kfac_float32_network_factors_in_float32_with_a_float64_fallback():
    """A float32 network's N × N K-FAC factors are factored in float32 (they are applied in float32),
    and the update agrees with the float64 network's to float32 accuracy; a kernel too singular for a
    float32 Cholesky (duplicated samples, ρ = 1e-10), or a float32 Gram with an overflowed entry, is
    formed and factored in float64 instead."""
    net64 = nat.MLP([6, 40, 40, 1], activation="relu", sigma_b2=0.5, seed=2, dtype=torch.float64)
    net32 = nat.MLP([6, 40, 40, 1], activation="relu", sigma_b2=0.5, seed=2, dtype=torch.float32)
    x, y = tiny_data(20, 6, 1)
    fisher = nat.fisher.KFAC(damping=1e-3)
    want = flat(fisher.natural_gradient(net64, x, y))
    got = flat(fisher.natural_gradient(net32, x.float(), y.float())).double()
    assert _rel(got, want) < 1e-4
    a = torch.randn(12, 30, generator=torch.Generator().manual_seed(0))
    batch = fisher.at(net32, x.float())
    assert batch.factor_side(a, 1 / 12).dual.chol.dtype == torch.float32
    dup = torch.cat([a, a])  # a singular kernel
    chol = nat.fisher.KFAC(damping=1e-10).at(net32, x.float()).factor_side(dup, 1 / 24).dual.chol
    assert chol.dtype == torch.float64
    k = (dup.double() @ dup.double().T) / 24 + 1e-10 * torch.eye(24, dtype=torch.float64)
    assert _rel(chol @ chol.T, k) < 1e-12
    big = a.clone()
    big[-1] *= 1e19  # only the last diagonal entry of the float32 Gram overflows: info = 0, L_NN = inf
    chol = batch.factor_side(big, 1 / 12).dual.chol
    assert chol.dtype == torch.float64 and bool(torch.isfinite(chol).all())


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
    fisher = nat.fisher.KFAC(damping=damping)
    got = flat(fisher.natural_gradient(m32, x.float(), y.float())).double()
    want = flat(fisher.natural_gradient(m64, x, y))
    exact = flat(nat.fisher.Exact(damping=damping).natural_gradient(m32, x.float(), y.float())).double()
    exact_err = float((exact - flat(nat.fisher.Exact(damping=damping).natural_gradient(m64, x, y))).norm())
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
    kfac = nat.fisher.KFAC(damping=rho, warn=False).natural_gradient(model, x, y)
    bd = nat.fisher.BlockDiagonal(damping=rho).natural_gradient(model, x, y)
    for owner in ("embed", "norm", "scale"):
        ks = [k for k, nm in enumerate(names) if nm == owner or nm.startswith(owner + ".")]
        cols = [i for k in ks for i in range(offs[k], offs[k + 1])]
        jl = j[:, cols]
        want = torch.linalg.solve(jl.T @ jl / n + rho * torch.eye(len(cols), dtype=F64), jl.T @ r / n)
        got = flat([kfac[k] for k in ks])
        assert float((got - want).norm() / want.norm()) < 1e-9, owner
        assert torch.allclose(got, flat([bd[k] for k in ks]), rtol=1e-9, atol=1e-14)


def test_kfac_warning_points_at_the_callers_line(unit_inputs):
    net = nat.MLP([5, 32, 1], dtype=F64)
    x = unit_inputs(12, 5)  # M_0 + 1 = 6 < N = 12: Θ̄ is not isotropic (S.109)
    with pytest.warns(RuntimeWarning, match="not isotropic") as record:
        nat.fisher.KFAC().coefficient(net, x)
    assert record[0].filename == __file__
