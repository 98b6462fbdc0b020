"""The independent route: explicit Jacobians from torch.func and explicit P × P Fisher matrices.

Only for tiny networks (P ≤ a few thousand). Nothing here uses the library's factors.
"""

from __future__ import annotations

import functools
import operator

import torch
from torch.func import functional_call, jacrev


def param_dict(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def jacobian(model, x):
    """J of shape (N·C, P), rows sample-major (n, k), columns in ``model.parameters()`` order."""
    params = param_dict(model)

    def fn(p):
        return functional_call(model, p, (x,))

    jac = jacrev(fn)(params)
    n, c = fn(params).shape
    return torch.cat([jac[k].reshape(n * c, -1) for k in params], dim=1)


def layer_slices(model):
    """Per layer, the column indices of its parameters (W_l then b_l) in the flat vector."""
    sizes = [p.numel() for p in model.parameters()]
    names = [k for k, _ in model.named_parameters()]
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    layers, cur = [], []
    for i, name in enumerate(names):
        is_weight = name.endswith("weight") or name.split(".")[-1].startswith("W")
        if is_weight and cur:
            layers.append(cur)
            cur = []
        cur.append((name, list(range(offs[i], offs[i + 1]))))
    layers.append(cur)
    return layers


def unit_indices(model):
    """Per layer, per unit i: indices of row i of W_l and of b_l[i] in the flat vector."""
    out = []
    for layer in layer_slices(model):
        (wname, widx), *rest = layer
        w = dict(model.named_parameters())[wname]
        m_out, m_in = w.shape
        units = []
        for i in range(m_out):
            idx = widx[i * m_in : (i + 1) * m_in]
            if rest:
                idx = [*idx, rest[0][1][i]]
            units.append(idx)
        out.append(units)
    return out


def output_metric(lam, n, c):
    if lam is None:
        return torch.eye(n * c, dtype=torch.float64)
    return torch.block_diag(*lam)


def explicit_fisher(
    kind, model, x, damping, lam=None, sigma=None, kfac_signals=None, kfac_output="paper", kfac_bias="augment"
):
    """The P × P Fisher of ``kind`` built from explicit Jacobians (float64)."""
    j = jacobian(model, x).to(torch.float64)
    n = x.shape[0]
    c = j.shape[0] // n
    lm = output_metric(lam, n, c)
    p = j.shape[1]
    eye = torch.eye(p, dtype=torch.float64)
    if kind == "exact":
        return j.T @ lm @ j / n + damping * eye
    layers = [functools.reduce(operator.iadd, (idx for _, idx in layer), []) for layer in layer_slices(model)]
    if kind == "layerwise":
        g = torch.zeros(p, p, dtype=torch.float64)
        for l, il in enumerate(layers):
            for m, im in enumerate(layers):
                g[il[0] : il[-1] + 1, im[0] : im[-1] + 1] = sigma[l, m] * j[:, il].T @ lm @ j[:, im] / n
        return g + damping * eye
    if kind == "unitwise":
        g = torch.zeros(p, p, dtype=torch.float64)
        for units in unit_indices(model):
            for idx in units:
                ji = j[:, idx]
                t = torch.tensor(idx)
                g[t[:, None], t[None, :]] = ji.T @ lm @ ji / n + damping * torch.eye(len(idx), dtype=torch.float64)
        return g
    if kind == "kfac":
        hs, deltas = kfac_signals
        g = torch.zeros(p, p, dtype=torch.float64)
        for l, units in enumerate(unit_indices(model)):
            a = hs[l]  # (N, p_l): scaled inputs with bias column
            d = deltas[l].permute(1, 0, 2).reshape(n * c, -1)  # (NC, M_l)
            a_fac = a.T @ a / n
            b_fac = d.T @ lm @ d / n
            if l == len(hs) - 1 and kfac_output == "paper":
                b_fac = b_fac / n
            eye_b = torch.eye(b_fac.shape[0], dtype=torch.float64)
            if kfac_bias == "block" and model.has_bias and l < len(hs) - 1:
                # weights: K-FAC without the bias column; biases: B* ⊗ (σ_b²/N) (S.123)
                aw = a[:, :-1]
                a_w = aw.T @ aw / n
                kron_w = torch.kron(b_fac + damping * eye_b, a_w + damping * torch.eye(a_w.shape[0], dtype=a.dtype))
                order_w = torch.tensor([i for u in units for i in u[:-1]])
                g[order_w[:, None], order_w[None, :]] = kron_w
                a_b = (a[:, -1:].T @ a[:, -1:] / n) / n
                order_b = torch.tensor([u[-1] for u in units])
                g[order_b[:, None], order_b[None, :]] = torch.kron(b_fac + damping * eye_b, a_b + damping)
                continue
            kron = torch.kron(b_fac + damping * eye_b, a_fac + damping * torch.eye(a_fac.shape[0], dtype=torch.float64))
            order = torch.tensor([i for u in units for i in u])  # row-major [W | b] → flat indices
            g[order[:, None], order[None, :]] = kron
        return g
    raise ValueError(kind)


def explicit_signals(model, x):
    """Forward signals a_{l-1} = [scale·h, bias_scale] by a plain re-implemented forward pass, and
    backward signals δ_l = ∂f/∂u_l by autograd through additive probes on u_l."""
    layers = model.layers()
    hs, us = [], []
    h = x
    for layer in layers:
        a = h * layer.weight_scale
        if layer.bias is not None:
            a = torch.cat([a, torch.full((a.shape[0], 1), layer.bias_scale, dtype=a.dtype)], 1)
        hs.append(a.detach())
        w = layer.weight.detach()
        u = layer.weight_scale * h @ w.T
        if layer.bias is not None:
            u = u + layer.bias_scale * layer.bias.detach()
        us.append(u)
        h = layer.activation(u) if layer.activation is not None else u

    def f_of(probes):
        h = x
        for layer, e in zip(layers, probes):
            u = layer.weight_scale * h @ layer.weight.detach().T + e
            if layer.bias is not None:
                u = u + layer.bias_scale * layer.bias.detach()
            h = layer.activation(u) if layer.activation is not None else u
        return h

    probes = tuple(torch.zeros_like(u) for u in us)
    jac = jacrev(f_of)(probes)  # per layer: (N, C, N, M_l)
    n = x.shape[0]
    deltas = []
    for jl in jac:
        idx = torch.arange(n)
        deltas.append(jl[idx, :, idx, :].permute(1, 0, 2))  # (C, N, M_l)
    return hs, deltas


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def explicit_sequential_signals(model, x):
    """:func:`explicit_signals` for a ``torch.nn.Sequential`` of ``nn.Linear`` layers, read through
    forward hooks on the model itself (nothing from ``natural_tangents.models``).

    Forward signals: the input each ``nn.Linear`` receives in ``model(x)``, with a column of ones
    appended when it has a bias (standard parameterization), (N, M_in [+1]). Backward signals:
    δ_l = ∂f/∂u_l (C, N, M_l) by jacrev through additive probes on each ``nn.Linear`` output."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {}

    def record(module, args, out):
        inputs[module] = args[0].detach()

    handles = [m.register_forward_hook(record) for m in linears]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    hs = []
    for m in linears:
        a = inputs[m]
        if m.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
        hs.append(a)

    def f_of(probes):
        slot = {m: e for m, e in zip(linears, probes)}
        hooks = [m.register_forward_hook(lambda mod, args, out: out + slot[mod]) for m in linears]
        try:
            return functional_call(model, param_dict(model), (x,))
        finally:
            for h in hooks:
                h.remove()

    probes = tuple(torch.zeros(x.shape[0], m.out_features, dtype=x.dtype) for m in linears)
    jac = jacrev(f_of)(probes)  # per layer: (N, C, N, M_l)
    idx = torch.arange(x.shape[0])
    return hs, [jl[idx, :, idx, :].permute(1, 0, 2) for jl in jac]


_KINDS = {
    "exact": "exact",
    "block_diagonal": "layerwise",
    "block_tridiagonal": "layerwise",
    "layerwise": "layerwise",
    "kfac": "kfac",
    "unitwise": "unitwise",
}


def explicit_fisher_of(fisher, model, x, depth, signals, lam=None):
    """The explicit P × P matrix of a library Fisher object (its damping, Σ and K-FAC options);
    ``signals(model, x)`` gives the K-FAC forward/backward signals by the explicit route."""
    kind = _KINDS[fisher.name]
    return explicit_fisher(
        kind,
        model,
        x,
        fisher.damping,
        lam=lam,
        sigma=fisher.sigma_matrix(depth) if kind == "layerwise" else None,
        kfac_signals=signals(model, x) if kind == "kfac" else None,
        kfac_output=getattr(fisher, "output_factor", "paper"),
        kfac_bias=getattr(fisher, "bias", "augment"),
    )


# ------------------------------------------------------------------ any nn.Module: blocks by owning module


def module_blocks(model):
    """Per parameterized module (in ``model.parameters()`` order): its name and, per parameter, the
    flat column indices of that parameter. Built from ``named_parameters`` alone."""
    offs, out, index = 0, [], {}
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if owner not in index:
            index[owner] = len(out)
            out.append((owner, []))
        out[index[owner]][1].append(list(range(offs, offs + p.numel())))
        offs += p.numel()
    return out


def module_units(model):
    """Unit-wise blocks: per Linear/Conv module, one unit per output feature/channel (its weight row
    or filter with its bias entry); any other module is one unit."""
    mods = dict(model.named_modules())
    units = []
    for owner, params in module_blocks(model):
        m = mods[owner]
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
            w = params[0]
            per = len(w) // m.weight.shape[0]
            for i in range(m.weight.shape[0]):
                idx = w[i * per : (i + 1) * per]
                if len(params) > 1:
                    idx = [*idx, params[1][i]]
                units.append(idx)
        else:
            units.append([i for p in params for i in p])
    return units


def explicit_module_fisher(kind, model, x, damping, lam=None, sigma=None):
    """The P × P exact, layer-wise (blocks = parameterized modules) or unit-wise Fisher (float64)."""
    j = jacobian(model, x).to(torch.float64)
    n = x.shape[0]
    lm = output_metric(lam, n, j.shape[0] // n)
    p = j.shape[1]
    eye = torch.eye(p, dtype=torch.float64)
    if kind == "exact":
        return j.T @ lm @ j / n + damping * eye
    if kind == "layerwise":
        blocks = [torch.tensor([i for prm in params for i in prm]) for _, params in module_blocks(model)]
        g = torch.zeros(p, p, dtype=torch.float64)
        for l, il in enumerate(blocks):
            for m, im in enumerate(blocks):
                g[il[:, None], im[None, :]] = sigma[l, m] * j[:, il].T @ lm @ j[:, im] / n
        return g + damping * eye
    if kind == "unitwise":
        g = damping * eye
        for idx in module_units(model):
            t = torch.tensor(idx)
            g[t[:, None], t[None, :]] += j[:, t].T @ lm @ j[:, t] / n
        return g
    raise ValueError(kind)


# ------------------------------------------------------------------ the cross-entropy metric, written out


def ce_metric(f, output_damping):
    """Λ_n of the softmax cross-entropy, written out: diag p − p p^T + ρ̃ I (C > 1), or σ(1 − σ) + ρ̃
    for one output (the logistic loss); (N, C, C)."""
    f = f.detach()
    if f.shape[1] == 1:
        s = torch.sigmoid(f)
        return (s * (1 - s) + output_damping)[:, :, None]
    p = torch.softmax(f, 1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :] + output_damping * torch.eye(f.shape[1], dtype=f.dtype)


def ce_residual(f, y):
    """p − y (C > 1, one-hot or soft y; class indices become one-hot) or σ − y (one output)."""
    f = f.detach()
    if f.shape[1] == 1:
        return torch.sigmoid(f) - y.reshape(-1, 1).to(f.dtype)
    if y.ndim == 1:
        y = torch.nn.functional.one_hot(y.long(), f.shape[1])
    return torch.softmax(f, 1) - y.to(f.dtype)
