"""Frozen parameters (``requires_grad=False``, read by models.py) are not coordinates of the Fisher:
every Fisher's natural gradient equals the explicit P_trainable × P_trainable solve built from
torch.func Jacobians, frozen parameters never move, and a module whose parameters are all frozen is
not read."""

import pytest
import torch
from torch import nn

import natural_tangents as nat
from _explicit import explicit_sequential_signals, flat, jacobian, module_units
from _nets import FISHERS

F64 = torch.float64


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)


def _data(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=F64), torch.randn(n, 3, generator=g, dtype=F64)


FREEZES = {
    "first": ["0.weight", "0.bias"],
    "middle": ["2.weight", "2.bias"],
    "last": ["4.weight", "4.bias"],
    "middle bias": ["2.bias"],
    "middle weight": ["2.weight"],
    "first and last": ["0.weight", "0.bias", "4.weight", "4.bias"],
}


def _frozen(names):
    model = _net()
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)
    return model


def _explicit(fisher, model, x):
    """The explicit Fisher over the trainable coordinates (float64), built on J over all parameters
    and restricted; block structure: modules with a trainable parameter (in order), units = output
    features restricted to trainable entries, K-FAC = (B* + ρ) ⊗ (A* + ρ) of the trainable columns."""
    names = [k for k, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offs = torch.tensor([0, *sizes]).cumsum(0).tolist()
    trainable = [p.requires_grad for p in model.parameters()]
    keep = [i for k, t in enumerate(trainable) if t for i in range(offs[k], offs[k + 1])]
    j = jacobian(model, x)[:, keep]
    n, p = x.shape[0], len(keep)
    where = {g: i for i, g in enumerate(keep)}  # full flat index → trainable index
    owners = []  # per module with a trainable parameter: its trainable indices
    for m in ("0", "2", "4"):
        idx = [
            where[i]
            for k, nm in enumerate(names)
            if nm.startswith(m + ".")
            for i in range(offs[k], offs[k + 1])
            if i in where
        ]
        if idx:
            owners.append((m, idx))
    rho, eye = fisher.damping, torch.eye(p, dtype=F64)
    if fisher.name == "exact":
        return j, j.T @ j / n + rho * eye
    if fisher.name in ("block_diagonal", "block_tridiagonal"):
        sigma = fisher.sigma_matrix(len(owners))
        g = torch.zeros(p, p, dtype=F64)
        for a, (_, ia) in enumerate(owners):
            for b, (_, ib) in enumerate(owners):
                g[torch.tensor(ia)[:, None], torch.tensor(ib)[None, :]] = sigma[a, b] * j[:, ia].T @ j[:, ib] / n
        return j, g + rho * eye
    if fisher.name == "unitwise":
        g = rho * eye
        for unit in module_units(model):
            t = torch.tensor([where[i] for i in unit if i in where], dtype=torch.long)
            if len(t):
                g[t[:, None], t[None, :]] += j[:, t].T @ j[:, t] / n
        return j, g
    # K-FAC: factors from hooks and probes (nothing from the library), columns restricted to trainable
    hs, deltas = explicit_sequential_signals(model, x)
    linears = [model[0], model[2], model[4]]
    g = torch.zeros(p, p, dtype=F64)
    for l, (lin, a, d) in enumerate(zip(linears, hs, deltas)):
        cols = [c for c, on in enumerate([lin.weight.requires_grad] * lin.in_features + [lin.bias.requires_grad]) if on]
        if not cols:
            continue
        a = a[:, cols]
        b_fac = d.permute(1, 0, 2).reshape(n * 3, -1)
        b_fac = b_fac.T @ b_fac / n / (n if l == 2 else 1)  # the paper's output factor on the output layer
        kron = torch.kron(
            b_fac + rho * torch.eye(b_fac.shape[0], dtype=F64), a.T @ a / n + rho * torch.eye(len(cols), dtype=F64)
        )
        # row-major [W | b] restricted to the trainable columns → flat trainable indices
        m_name = str(2 * l)
        w_idx = [
            where[i]
            for k, nm in enumerate(names)
            if nm == f"{m_name}.weight"
            for i in range(offs[k], offs[k + 1])
            if i in where
        ]
        b_idx = [
            where[i]
            for k, nm in enumerate(names)
            if nm == f"{m_name}.bias"
            for i in range(offs[k], offs[k + 1])
            if i in where
        ]
        order = []
        for row in range(lin.out_features):
            if w_idx:
                order += w_idx[row * lin.in_features : (row + 1) * lin.in_features]
            if b_idx:
                order.append(b_idx[row])
        t = torch.tensor(order)
        g[t[:, None], t[None, :]] = kron
    return j, g


@pytest.mark.parametrize("freeze", list(FREEZES))
@pytest.mark.parametrize("cls", FISHERS, ids=lambda c: c.name)
def test_natural_gradient_is_the_trainable_fisher_solve(cls, freeze):
    model = _frozen(FREEZES[freeze])
    x, y = _data()
    fisher = cls(damping=1e-3)
    j, g = _explicit(fisher, model, x)
    want = torch.linalg.solve(g, j.T @ (model(x) - y).detach().reshape(-1) / x.shape[0])
    got = fisher.natural_gradient(model, x, y)
    for p, u in zip(model.parameters(), got, strict=True):
        assert (u is None) == (not p.requires_grad)
    got_flat = flat([u for u in got if u is not None])
    assert float((got_flat - want).norm() / want.norm()) < 1e-9
    theta_bar = nat.fisher.flatten_coefficient(fisher.coefficient(model, x))
    assert float((theta_bar - j @ torch.linalg.solve(g, j.T) / x.shape[0]).norm() / theta_bar.norm()) < 1e-9


@pytest.mark.parametrize("cls", FISHERS, ids=lambda c: c.name)
def test_frozen_parameters_never_move_and_precondition_leaves_their_grad(cls):
    model = _frozen(FREEZES["middle"])
    x, y = _data()
    before = [p.detach().clone() for p in model.parameters()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = nat.NGD(model, cls(damping=1e-3), lr=0.5, param_groups=[{"params": trainable}])
    opt.step(x, y)
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, p0) != p.requires_grad
    opt_all = nat.NGD(model, cls(damping=1e-3), lr=0.5)  # groups listing frozen parameters: still frozen
    opt_all.step(x, y)
    assert torch.equal(model[2].weight, before[2]) and torch.equal(model[2].bias, before[3])
    opt_all.precondition(x, y)
    assert model[2].weight.grad is None and model[0].weight.grad is not None


def test_a_wholly_frozen_module_is_not_read():
    model = _frozen(FREEZES["first"])
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    bound = nat.fisher.Exact(damping=1e-3).at(model, _data()[0])
    assert len(bound.signals.layers) == 2 and len(calls) == 1  # the ordinary forward pass only
    assert [p is model[2].weight for p in bound.signals.layers[0].params] == [True, False]


def test_frozen_mlp_layer_matches_the_trainable_fisher(unit_inputs):
    x = unit_inputs(6, 5)
    y = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    net = nat.MLP([5, 12, 9, 2], sigma_b2=0.5, dtype=F64)
    net.W2.requires_grad_(False)
    j = jacobian(net, x)
    keep = torch.cat([torch.full((p.numel(),), p.requires_grad) for p in net.parameters()])
    jt = j[:, keep]
    g = jt.T @ jt / 6 + 1e-4 * torch.eye(jt.shape[1], dtype=F64)
    want = torch.linalg.solve(g, jt.T @ (net(x) - y).detach().reshape(-1) / 6)
    got = nat.fisher.Exact(damping=1e-4).natural_gradient(net, x, y)
    assert got[2] is None
    assert float((flat([u for u in got if u is not None]) - want).norm() / want.norm()) < 1e-9
    with pytest.raises(ValueError, match="requires_grad_"):
        for p in net.parameters():
            p.requires_grad_(False)
        nat.fisher.Exact().natural_gradient(net, x, y)


def test_convolution_and_generic_modules_with_frozen_parts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.LayerNorm(18), nn.Linear(18, 2)).to(F64)
    model[0].bias.requires_grad_(False)
    model[3].weight.requires_grad_(False)  # the generic kind keeps only the LayerNorm's bias
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 2, 8, generator=g, dtype=F64), torch.randn(5, 2, generator=g, dtype=F64)
    keep = torch.cat([torch.full((p.numel(),), p.requires_grad) for p in model.parameters()])
    jt = jacobian(model, x)[:, keep]
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]  # conv.weight, ln.bias, fc.weight, fc.bias
    blocks = [list(range(0, sizes[0])), list(range(sizes[0], sizes[0] + sizes[1]))]
    blocks.append(list(range(blocks[-1][-1] + 1, jt.shape[1])))
    rhs = jt.T @ (model(x) - y).detach().reshape(-1) / 5
    for fisher in (nat.fisher.Exact(damping=1e-3), nat.fisher.BlockDiagonal(damping=1e-3)):
        g_full = jt.T @ jt / 5
        if fisher.name == "block_diagonal":
            mask = torch.zeros_like(g_full, dtype=torch.bool)
            for b in blocks:
                mask[torch.tensor(b)[:, None], torch.tensor(b)[None, :]] = True
            g_full = torch.where(mask, g_full, 0.0)
        want = torch.linalg.solve(g_full + 1e-3 * torch.eye(jt.shape[1], dtype=F64), rhs)
        got = fisher.natural_gradient(model, x, y)
        assert [u is None for u in got] == [not p.requires_grad for p in model.parameters()]
        assert float((flat([u for u in got if u is not None]) - want).norm() / want.norm()) < 1e-9
