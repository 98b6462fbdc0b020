"""The layer kinds (layers/: linear, conv, generic) on any nn.Module: a CNN with strided and padded
convolutions, a skip connection and pooling, and modules read by the generic kind, against the
explicit parameter-space route (torch.func Jacobians, P × P Fishers built from them), float64,
relative error ≤ 1e-8; K-FAC's convolution factors (KFC) against the stated formula built
explicitly."""

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

import natural_tangents as nat
from _explicit import ce_metric, ce_residual, explicit_module_fisher, flat, jacobian, module_blocks, output_metric
from _nets import cnn_data, small_cnn

TOL = 1e-8
F64 = torch.float64


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


SIGMA4 = torch.tensor([[2.0, 0.5, 0.0, 0.0], [0.5, 1.0, 0.3, 0.0], [0.0, 0.3, 1.5, 0.2], [0.0, 0.0, 0.2, 1.0]])
CASES = {
    "exact": (nat.fisher.Exact, "exact", None),
    "block_diagonal": (nat.fisher.BlockDiagonal, "layerwise", torch.eye(4, dtype=F64)),
    "block_tridiagonal": (nat.fisher.BlockTriDiagonal, "layerwise", nat.fisher.tridiagonal_sigma(4)),
    "layerwise": (lambda **kw: nat.fisher.Layerwise(sigma=SIGMA4, **kw), "layerwise", SIGMA4),
    "unitwise": (nat.fisher.Unitwise, "unitwise", None),
}


def _check(fisher, kind, sigma, model, x, y, x_test, lam=None, residual=None):
    n = x.shape[0]
    j = jacobian(model, x)
    g = explicit_module_fisher(kind, model, x, fisher.damping, lam=lam, sigma=sigma)
    r = (model(x) - y) if residual is None else residual
    want = torch.linalg.solve(g, j.T @ r.detach().reshape(-1) / n)
    bound = fisher.at(model, x)
    assert _rel(flat(bound.natural_gradient(y)), want) < TOL
    jt = jacobian(model, x_test)
    want_tb = jt @ torch.linalg.solve(g, j.T) / n
    got_tb = nat.fisher.flatten_coefficient(bound.coefficient(x_test))
    assert _rel(got_tb, want_tb) < TOL
    want_train = j @ torch.linalg.solve(g, j.T) / n
    assert _rel(nat.fisher.flatten_coefficient(bound.coefficient()), want_train) < TOL
    lm = output_metric(lam, n, want_train.shape[0] // n)
    assert bound.alpha_hat() == pytest.approx(float(torch.diagonal(want_train @ lm).mean()), rel=1e-8)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("damping", [1e-3, 0.7])
def test_cnn_update_and_coefficient_match_explicit(name, c, damping):
    make, kind, sigma = CASES[name]
    model = small_cnn(c)
    x, y = cnn_data(5, c)
    x_test, _ = cnn_data(3, c, seed=7)
    _check(make(damping=damping), kind, sigma, model, x, y, x_test)


def test_cnn_exact_cross_entropy_matches_explicit():
    model = small_cnn(3)
    x, _ = cnn_data(6, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    fisher = nat.fisher.Exact(damping=1e-2, loss="cross_entropy")
    with torch.no_grad():
        f = model(x)
    lam = ce_metric(f, 1e-3)  # the default output damping
    y = Fn.one_hot(labels, 3).to(F64)
    _check(fisher, "exact", None, model, x, labels, cnn_data(2, 3, seed=9)[0], lam=lam, residual=ce_residual(f, y))


def _patches(conv, h):
    cols = Fn.unfold(h, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    a = cols.transpose(1, 2)  # (N, T, C_in k²)
    return torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], 2)


def _probe_deltas(model, x, modules):
    """∂f/∂(module output) per sample, by jacrev through additive probes (C, N, *out)."""
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, a, o: outs.__setitem__(mod, o)) for m in modules]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()

    def f_of(probes):
        slot = dict(zip(modules, probes))
        hs = [m.register_forward_hook(lambda mod, a, o: o + slot[mod]) for m in modules]
        try:
            return model(x)
        finally:
            for h in hs:
                h.remove()

    probes = tuple(torch.zeros_like(outs[m]) for m in modules)
    jac = torch.func.jacrev(f_of)(probes)
    idx = torch.arange(x.shape[0])
    return [jl[idx, :, idx].transpose(0, 1) for jl in jac], outs


def test_cnn_kfac_matches_the_stated_kfc_formula_built_explicitly():
    """K-FAC on the CNN: for each convolution (B* + ρ) ⊗ (A* + ρ) with A* = Σ_{n,t} a a^T / (N T) and
    B* = Σ_{n,t} δ δ^T / N, for each Linear the paper's factors (output layer B*_L / N), P × P."""
    c, n, rho = 2, 5, 1e-2
    model = small_cnn(c)
    x, y = cnn_data(n, c)
    mods = [model.conv1, model.conv2, model.fc1, model.fc2]
    deltas, _ = _probe_deltas(model, x, mods)
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, a, o: inputs.__setitem__(mod, a[0])) for m in mods]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    p_total = sum(p.numel() for p in model.parameters())
    g = torch.zeros(p_total, p_total, dtype=F64)
    for (_owner, params), m, d in zip(module_blocks(model), mods, deltas):
        if isinstance(m, nn.Conv2d):
            a = _patches(m, inputs[m])  # (N, T, p)
            t = a.shape[1]
            dd = d.reshape(c, n, m.out_channels, -1).transpose(2, 3)  # (C, N, T, M)
            a_star = torch.einsum("ntp,ntq->pq", a, a) / (n * t)
            b_star = torch.einsum("kntm,knto->mo", dd, dd) / n
        else:
            a = torch.cat([inputs[m], torch.ones(n, 1, dtype=F64)], 1)
            a_star = a.T @ a / n
            b_star = torch.einsum("knm,kno->mo", d, d) / n
            if m is model.fc2:
                b_star = b_star / n  # the paper's output factor
        kron = torch.kron(
            b_star + rho * torch.eye(len(b_star), dtype=F64), a_star + rho * torch.eye(len(a_star), dtype=F64)
        )
        w, b = params
        per = len(w) // len(b)
        order = torch.tensor([i for u in range(len(b)) for i in (*w[u * per : (u + 1) * per], b[u])])
        g[order[:, None], order[None, :]] = kron
    j = jacobian(model, x)
    want = torch.linalg.solve(g, j.T @ (model(x) - y).detach().reshape(-1) / n)
    fisher = nat.fisher.KFAC(damping=rho)
    bound = fisher.at(model, x)
    assert _rel(flat(bound.natural_gradient(y)), want) < TOL
    x_test, _ = cnn_data(3, c, seed=7)
    want_tb = jacobian(model, x_test) @ torch.linalg.solve(g, j.T) / n
    assert _rel(nat.fisher.flatten_coefficient(bound.coefficient(x_test)), want_tb) < TOL


class _Generic(nn.Module):
    """Embedding, LayerNorm, PReLU, eval-mode BatchNorm and a parameter of the model itself."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 3)
        self.fc = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.act = nn.PReLU()
        self.bn = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 2)
        self.scale = nn.Parameter(torch.tensor([1.3, 0.7]))

    def forward(self, tokens):
        h = self.embed(tokens).flatten(1)  # (N, 6) from (N, 2) integer tokens
        h = self.bn(self.act(self.norm(self.fc(h))))
        return self.out(h) * self.scale


@pytest.mark.parametrize("name", ["exact", "block_diagonal", "unitwise"])
def test_generic_modules_match_explicit(name):
    torch.manual_seed(3)
    model = _Generic().to(F64)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 7, (6, 2), generator=g)
    y = torch.randn(6, 2, generator=g, dtype=F64)
    x_test = torch.randint(0, 7, (3, 2), generator=g)
    depth = len(module_blocks(model))
    make, kind, _ = CASES[name]
    sigma = torch.eye(depth, dtype=F64) if kind == "layerwise" else None
    _check(make(damping=1e-2), kind, sigma, model, x, y, x_test)
