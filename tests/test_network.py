"""The network, its Jacobian factors and the empirical kernels against explicit torch.func Jacobians."""

import pytest
import torch

import natural_tangents as nat
from _explicit import jacobian, layer_slices
from natural_tangents import activations as A

ACTS = [
    "relu",
    "tanh",
    "erf",
    "identity",
    "gelu",
    "softplus",
    "sigmoid",
    A.ShiftedReLU(0.7),
    A.Elementwise(torch.sin, label="sin"),
]


def _x(n, m0, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m0, generator=g, dtype=torch.float64)


def _explicit_ntk(net, x1, x2, per_layer=False):
    j1, j2 = jacobian(net, x1), jacobian(net, x2)
    c = net.out_features
    if per_layer:
        ks = []
        for layer in layer_slices(net):
            idx = [i for _, ids in layer for i in ids]
            ks.append(j1[:, idx] @ j2[:, idx].T)
        k = torch.stack(ks)
    else:
        k = j1 @ j2.T
    k = k.reshape(*k.shape[:-2], x1.shape[0], c, x2.shape[0], c).movedim(-3, -2)
    return k[..., 0, 0] if c == 1 else k


@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("bias", [0.0, 0.3])
@pytest.mark.parametrize("par", ["ntk", "standard"])
def test_factor_kernels_equal_explicit_jacobian_products(act, c, bias, par):
    net = nat.MLP([5, 7, 6, c], activation=act, sigma_b2=bias, parameterization=par, dtype=torch.float64)
    x1, x2 = _x(4, 5, 1), _x(3, 5, 2)
    want = _explicit_ntk(net, x1, x2)
    got = nat.empirical_ntk(net, x1, x2)
    assert got.shape == want.shape
    assert float((got - want).norm() / want.norm()) <= 1e-10
    want_l = _explicit_ntk(net, x1, x2, per_layer=True)
    got_l = nat.empirical_ntk(net, x1, x2, per_layer=True)
    assert float((got_l - want_l).norm() / want_l.norm()) <= 1e-10


@pytest.mark.parametrize("c", [1, 2])
def test_unit_kernels_equal_explicit_row_jacobians(c):
    net = nat.MLP([5, 7, 6, c], activation="tanh", sigma_b2=0.2, dtype=torch.float64)
    x1, x2 = _x(4, 5, 1), _x(3, 5, 2)
    j1, j2 = jacobian(net, x1), jacobian(net, x2)
    for l, layer in enumerate(layer_slices(net), start=1):
        (_, widx), (_, bidx) = layer
        m_out = len(bidx)
        m_in = len(widx) // m_out
        got = nat.empirical_unit_ntk(net, x1, x2, layer=l)
        assert got.shape[0] == m_out
        for i in range(m_out):
            idx = [*widx[i * m_in : (i + 1) * m_in], bidx[i]]
            k = (j1[:, idx] @ j2[:, idx].T).reshape(4, c, 3, c).movedim(2, 1)
            k = k[..., 0, 0] if c == 1 else k
            assert torch.allclose(got[i], k, rtol=1e-10, atol=1e-12)


def test_factors_shapes_and_signals():
    net = nat.MLP([5, 7, 6, 3], activation="relu", sigma_b2=0.5, dtype=torch.float64)
    x = _x(4, 5, 0)
    fx = net.signals(x)
    assert fx.f.shape == (4, 3)
    assert [a.shape for a in fx.forward] == [(4, 6), (4, 8), (4, 7)]
    assert [d.shape for d in fx.backward] == [(3, 4, 7), (3, 4, 6), (3, 4, 3)]
    assert torch.allclose(fx.f, net(x))
    assert torch.equal(fx.backward[-1][:, 0], torch.eye(3, dtype=torch.float64))
    assert torch.allclose(fx.forward[0][:, -1], torch.full((4,), 0.5**0.5, dtype=torch.float64))


def test_ntk_and_standard_parameterizations_compute_the_same_function():
    x = _x(6, 5, 0)
    for act in ("relu", "erf", "gelu"):
        a = nat.MLP([5, 9, 8, 2], activation=act, sigma_b2=0.4, seed=11, dtype=torch.float64)
        b = nat.MLP(
            [5, 9, 8, 2],
            activation=act,
            sigma_b2=0.4,
            seed=11,
            parameterization="standard",
            dtype=torch.float64,
        )
        assert torch.allclose(a(x), b(x), rtol=1e-12, atol=1e-12)
        # matched weights by hand: W' = σ_w/√M W, b' = σ_b b
        for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            scale = (a.sigma_w2 / pa.shape[1]) ** 0.5 if na.startswith("W") else a.sigma_b2**0.5
            assert torch.allclose(pa * scale, pb)


def test_parameter_order_and_shapes():
    net = nat.MLP([5, 7, 2], sigma_b2=0.1)
    assert [n for n, _ in net.named_parameters()] == ["W1", "b1", "W2", "b2"]
    assert [tuple(p.shape) for p in net.parameters()] == [(7, 5), (7,), (2, 7), (2,)]
    assert [n for n, _ in nat.MLP([5, 7, 2]).named_parameters()] == ["W1", "W2"]
    assert nat.MLP([5, 7, 2]).W1.dtype == torch.float32


def test_float32_and_float64_networks_share_weights():
    a = nat.MLP([5, 7, 2], seed=3)
    b = nat.MLP([5, 7, 2], seed=3, dtype=torch.float64)
    assert torch.allclose(a.W1.double(), b.W1, atol=1e-6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda net: net(torch.randn(3, 4)), "x: expected 5 features"),
        (lambda net: net(torch.full((3, 5), float("nan"))), "x: contains 15 NaN or inf"),
        (lambda net: net(torch.tensor([[1.0, 2, 3, 4, float("inf")]])), "NaN or inf"),
        (lambda net: net(torch.zeros(0, 5)), "x: the batch is empty"),
        (lambda net: net(torch.zeros(5)), "x: expected a 2-D batch"),
        (lambda net: nat.empirical_ntk(net, torch.zeros(2, 5), torch.zeros(2, 6)), "x2: expected 5 features"),
        (
            lambda net: nat.empirical_unit_ntk(net, torch.zeros(2, 5), layer=3),
            "layer: expected a layer number",
        ),
    ],
)
def test_bad_input_names_the_argument(call, match):
    net = nat.MLP([5, 7, 2])
    with pytest.raises(ValueError, match=match):
        call(net)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"widths": [5, 0, 1]}, "widths: every width must be a positive integer"),
        ({"widths": [5, -3, 1]}, "widths"),
        ({"widths": [5]}, "widths: need at least"),
        ({"widths": [5, 2.5, 1]}, "widths"),
        ({"widths": [5, 3, 1], "activation": "swishy"}, "activation: unknown name 'swishy'"),
        ({"widths": [5, 3, 1], "sigma_w2": 0.0}, "sigma_w2"),
        ({"widths": [5, 3, 1], "sigma_b2": -1.0}, "sigma_b2"),
        ({"widths": [5, 3, 1], "parameterization": "mup"}, "parameterization"),
    ],
)
def test_bad_construction_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nat.MLP(**kwargs)


@pytest.mark.parametrize("act", ACTS, ids=str)
def test_activation_derivatives_match_autograd(act):
    act = A.get(act)
    u = torch.linspace(-3, 3, 61, dtype=torch.float64) + 0.013  # avoid the kinks exactly
    v = u.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(act(v).sum(), v)
    assert torch.allclose(act.derivative(u), g, atol=1e-12)


def test_composed_activation_uses_the_chain_rule():
    act = A.Composed((A.Tanh(), A.Softplus()))
    u = torch.linspace(-2, 2, 11, dtype=torch.float64).requires_grad_(True)
    (g,) = torch.autograd.grad(act(u).sum(), u)
    assert torch.allclose(act.derivative(u.detach()), g)
