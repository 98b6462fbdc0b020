"""Users' own models read by models.py (``torch.nn.Sequential`` here; convolutions and the generic kind
in test_layers.py, frozen parameters in test_models_frozen_parameters.py): every Fisher against the
explicit parameter-space route (torch.func Jacobians, P × P Fishers), against the equivalent
``nat.MLP``, a float32 model against float64, and the errors for what the library cannot read. NGD
as a torch optimizer on such a model is in test_optim.py.
"""

import pytest
import torch
from torch import nn

import natural_tangents as nat
from _explicit import explicit_fisher_of, explicit_sequential_signals, flat, jacobian
from _nets import build, sequential_data, user_model
from natural_tangents import models

TOL = 1e-8
F64 = torch.float64
SIGMA = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]])

FISHERS = {
    "exact": nat.fisher.Exact,
    "block_diagonal": nat.fisher.BlockDiagonal,
    "block_tridiagonal": nat.fisher.BlockTriDiagonal,
    "kfac": nat.fisher.KFAC,
    "unitwise": nat.fisher.Unitwise,
    "layerwise_custom_sigma": lambda **kw: nat.fisher.Layerwise(sigma=SIGMA, **kw),
}


def _mixed(c, bias, seed=0, dtype=F64):
    """Linear, Tanh, Linear, ReLU, GELU, Linear: widths 5 → 9 → 4 → C (hidden widths around N, so
    K-FAC goes through both its dual and its primal factor inverses)."""
    return build(
        lambda: nn.Sequential(
            nn.Linear(5, 9, bias=bias),
            nn.Tanh(),
            nn.Linear(9, 4, bias=bias),
            nn.ReLU(),
            nn.GELU(),
            nn.Linear(4, c, bias=bias),
        ),
        seed,
        dtype,
    )


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _explicit_g(fisher, model, x):
    depth = sum(isinstance(m, nn.Linear) for m in model.modules())
    return explicit_fisher_of(fisher, model, x, depth, explicit_sequential_signals)


def _explicit_update(fisher, model, x, y):
    """(G + ρI)^{-1} J^T (f − y) / N from explicit Jacobians, flat in ``model.parameters()`` order."""
    j = jacobian(model, x)
    g = _explicit_g(fisher, model, x)
    grad = j.T @ (model(x) - y).detach().reshape(-1) / x.shape[0]
    return torch.linalg.solve(g, grad), j, g


# ------------------------------------------------------------------ explicit parameter-space route


@pytest.mark.parametrize("name", list(FISHERS))
@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_sequential_update_and_coefficient_match_explicit(name, c, bias, damping):
    fisher = FISHERS[name](damping=damping)
    model = _mixed(c, bias)
    x, y = sequential_data(7, (5,), c)
    x_test, _ = sequential_data(3, (5,), c, seed=5)
    want, j, g = _explicit_update(fisher, model, x, y)
    got = fisher.natural_gradient(model, x, y)
    assert [t.shape for t in got] == [p.shape for p in model.parameters()]
    assert _rel(flat(got), want) < TOL
    want_tb = jacobian(model, x_test) @ torch.linalg.solve(g, j.T) / x.shape[0]
    assert _rel(nat.fisher.flatten_coefficient(fisher.coefficient(model, x, x_test)), want_tb) < TOL


def _every_activation_model():
    """Preprocessing before the first Linear, composed activations, a trailing output activation."""
    return nn.Sequential(
        nn.Softsign(),  # input preprocessing
        nn.Linear(5, 8),
        nn.LeakyReLU(0.1),
        nn.ELU(alpha=0.7),
        nn.Linear(8, 7),
        nn.Softplus(beta=2.0, threshold=1.0),
        nn.SiLU(),
        nn.Dropout(p=0.0),
        nn.Linear(7, 6, bias=False),
        nn.GELU(approximate="tanh"),
        nn.Mish(),
        nn.Identity(),
        nn.Linear(6, 6),
        nn.SELU(),
        nn.CELU(alpha=0.5),
        nn.Hardtanh(-2.0, 2.0),
        nn.Linear(6, 2),
        nn.Sigmoid(),  # output activation: f = sigmoid(u_L)
    )


@pytest.mark.parametrize("name", ["exact", "block_diagonal", "kfac", "unitwise"])
def test_preprocessing_composed_and_output_activations_match_explicit(name):
    fisher = FISHERS[name](damping=1e-3)
    model = build(_every_activation_model)
    x, y = sequential_data(6, (5,), 2)
    x = 3.0 * x  # reach the Softplus threshold region and the Hardtanh clamps
    want, j, _ = _explicit_update(fisher, model, x, y)
    assert _rel(flat(fisher.natural_gradient(model, x, y)), want) < TOL
    if name == "exact":  # the kernel too: J J^T, no 1/N, (N, N, C, C)
        ntk = nat.empirical_ntk(model, x)
        assert _rel(nat.fisher.flatten_coefficient(ntk), j @ j.T) < TOL


def test_nested_sequential_flatten_and_eval_dropout_match_explicit():
    """Nested nn.Sequential are flattened, a leading nn.Flatten() takes (N, 2, 3) inputs, dropout in
    eval mode is the identity."""
    model = build(
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5)),
            nn.Sequential(nn.Sequential(nn.Linear(8, 5)), nn.ReLU(), nn.Flatten()),
            nn.Linear(5, 2),
        )
    )
    model.eval()
    fisher = nat.fisher.KFAC(damping=1e-2)
    x, y = sequential_data(7, (2, 3), 2)
    want, _, _ = _explicit_update(fisher, model, x, y)  # jacobian of model(x) on the (N, 2, 3) batch
    assert _rel(flat(fisher.natural_gradient(model, x, y)), want) < TOL
    model.train()  # now the dropout is random: refused
    with pytest.raises(NotImplementedError, match=r"model\[1\]\[2\].*Dropout.*model\.eval\(\)"):
        fisher.natural_gradient(model, x, y)


ACTIVATION_MODULES = [
    nn.ReLU(inplace=True),
    nn.Tanh(),
    nn.Sigmoid(),
    nn.GELU(),
    nn.GELU(approximate="tanh"),
    nn.Softplus(),
    nn.Softplus(beta=0.5, threshold=3.0),
    nn.LeakyReLU(0.2, inplace=True),
    nn.ELU(alpha=1.3),
    nn.CELU(alpha=0.4),
    nn.SELU(),
    nn.SiLU(),
    nn.Mish(),
    nn.Hardtanh(-0.7, 1.2),
    nn.ReLU6(),
    nn.Softsign(),
    nn.Tanhshrink(),
    nn.Hardsigmoid(),
    nn.Hardswish(inplace=True),
    nn.LogSigmoid(),
    nn.Hardshrink(0.3),
    nn.Softshrink(0.4),
    nn.Threshold(0.1, -2.0, inplace=True),
]


# ------------------------------------------------------------------ the equivalent nat.MLP


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu", "sigmoid"])
@pytest.mark.parametrize("bias", [False, True])
def test_sequential_equals_the_standard_parameterized_mlp(activation, bias):
    mlp = nat.MLP(
        [5, 9, 8, 2],
        activation=activation,
        sigma_w2=1.7,
        sigma_b2=0.4 if bias else 0.0,
        parameterization="standard",
        seed=2,
        dtype=F64,
    )
    module = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}[activation]
    seq = nn.Sequential(
        nn.Linear(5, 9, bias=bias), module(), nn.Linear(9, 8, bias=bias), module(), nn.Linear(8, 2, bias=bias)
    ).to(F64)
    with torch.no_grad():
        for p, q in zip(seq.parameters(), mlp.parameters(), strict=True):
            p.copy_(q)
    x, y = sequential_data(6, (5,), 2)
    assert _rel(seq(x), mlp(x)) < 1e-14
    fishers = [make(damping=1e-2) for make in FISHERS.values()]
    fishers += [nat.fisher.KFAC(bias="block", damping=1e-2), nat.fisher.KFAC(output_factor="fisher", damping=0.1)]
    for fisher in fishers:
        want = fisher.natural_gradient(mlp, x, y)
        got = fisher.natural_gradient(seq, x, y)
        assert [t.shape for t in got] == [t.shape for t in want]
        assert _rel(flat(got), flat(want)) < 1e-10, fisher
        assert _rel(fisher.coefficient(seq, x), fisher.coefficient(mlp, x)) < 1e-10, fisher
    assert _rel(nat.empirical_ntk(seq, x), nat.empirical_ntk(mlp, x)) < 1e-12


# ------------------------------------------------------------------ float32 models


def test_float32_update_agrees_with_float64():
    m32, m64 = user_model(torch.float32), user_model(F64)
    x, y = sequential_data(20, (10,), 3)
    for fisher in (nat.fisher.Exact(damping=1e-2), nat.fisher.KFAC(damping=1e-2), nat.fisher.Unitwise(damping=1e-2)):
        got = fisher.natural_gradient(m32, x, y)  # float64 inputs are converted to the model's dtype
        assert all(t.dtype == torch.float32 for t in got)
        assert _rel(flat(got).double(), flat(fisher.natural_gradient(m64, x, y))) < 1e-4, fisher


# ------------------------------------------------------------------ what the library cannot read


class _CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


def _shared():
    lin = nn.Linear(4, 4)
    return nn.Sequential(lin, nn.Tanh(), lin)


def _tied():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    return nn.Sequential(a, nn.Tanh(), b)


def _weight_norm():
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 2))


def _active_dropout():
    return nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2))


BAD_MODELS = {
    "batchnorm_training": (
        lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
        NotImplementedError,
        r"model\[1\] \(BatchNorm1d.*training mode.*couples the samples.*model\.eval\(\)",
    ),
    "shared_linear": (_shared, NotImplementedError, r"model\[2\] \(Linear.*same module as model\[0\].*own module"),
    "called_twice": (lambda: _CalledTwice(), NotImplementedError, r"model\.fc \(Linear.*called 2 times.*own module"),
    "tied_weight": (_tied, NotImplementedError, r"model\[2\]\.weight is the same parameter as model\[0\]\.weight"),
    "active_dropout": (_active_dropout, NotImplementedError, r"model\[1\] \(Dropout.*model\.eval\(\)"),
    "weight_norm": (_weight_norm, NotImplementedError, r"model\[0\] .*parametrized weights"),
    "not_a_module": (lambda: lambda x: x, TypeError, r"model: expected a torch\.nn\.Module"),
    "no_parameters": (lambda: nn.Sequential(nn.Tanh()), ValueError, "no parameters"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_unsupported_models_are_refused_before_anything_is_computed(case):
    make, error, pattern = BAD_MODELS[case]
    model = make()
    x_bad = torch.full((3, 4), float("nan"))  # the model error must come before the input is looked at
    if case != "called_twice":
        with pytest.raises(error, match=pattern):
            models.check_model(model)
    if case != "called_twice":  # a second call is only seen in the forward pass
        with pytest.raises(error, match=pattern):
            nat.NGD(model, nat.fisher.Exact())
    with pytest.raises(error, match=pattern):
        nat.fisher.KFAC().natural_gradient(
            model, x_bad if case != "called_twice" else torch.randn(3, 4), torch.zeros(3, 4)
        )
    with pytest.raises(error, match=pattern):
        nat.empirical_ntk(model, x_bad if case != "called_twice" else torch.randn(3, 4))


class _TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x).reshape(-1, 1, 2)


def test_outputs_and_unused_modules_are_refused_naming_the_problem():
    model = _TwoOutputs().double()
    with pytest.raises(NotImplementedError, match=r"output has shape \(3, 1, 2\).*flatten"):
        nat.fisher.Exact().natural_gradient(model, torch.randn(3, 4, dtype=F64), torch.zeros(3, 2))
    model.forward = lambda x: model.fc(x)
    with pytest.raises(NotImplementedError, match=r"model\.unused \(Linear.*never called"):
        nat.fisher.Exact().natural_gradient(model, torch.randn(3, 4, dtype=F64), torch.zeros(3, 2))


def test_supported_models_pass_the_check():
    for model in (
        _mixed(2, True),
        build(_every_activation_model),
        nat.MLP([3, 4, 1]),
        _active_dropout().eval(),
        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval(),
    ):
        models.check_model(model)  # raises for an unsupported model


@pytest.mark.parametrize(
    ("x", "pattern"),
    [
        (torch.randn(4, 6), r"x: the model's forward pass failed on an input of shape \(4, 6\)"),
        (torch.full((4, 5), float("nan")), r"x: contains 20 NaN"),
        (torch.randn(0, 5), r"x: expected a non-empty batch"),
    ],
)
def test_bad_inputs_are_value_errors_naming_the_argument(x, pattern):
    model = _mixed(2, True)
    with pytest.raises(ValueError, match=pattern):
        nat.fisher.Exact().natural_gradient(model, x, torch.zeros(len(x), 2))
    opt = nat.NGD(model, nat.fisher.Exact())
    with pytest.raises(ValueError, match=pattern):
        opt.step(x, torch.zeros(len(x), 2))


def test_modules_before_the_first_linear_transform_its_forward_signal():
    """The modules before the first Linear transform x: the signals of layer 1 hold the transformed
    input, and f is model(x)."""
    model = build(lambda: nn.Sequential(nn.Flatten(), nn.Tanh(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2)))
    x, _ = sequential_data(4, (2, 3), 2)
    fx = nat.models.signals(model, x)
    assert torch.equal(fx.forward[0][:, :-1], torch.tanh(x.reshape(4, 6)))
    assert torch.allclose(fx.f, model(x), rtol=1e-14, atol=1e-15)


class _Cube(nn.Module):
    def forward(self, u):
        return u**3


def test_any_parameter_free_module_between_layers_matches_explicit():
    model = build(lambda: nn.Sequential(nn.Linear(5, 8), _Cube(), nn.Softmax(dim=1), nn.Linear(8, 2)))
    x, y = sequential_data(6, (5,), 2)
    fisher = nat.fisher.Unitwise(damping=1e-3)
    want, _, _ = _explicit_update(fisher, model, x, y)
    assert _rel(flat(fisher.natural_gradient(model, x, y)), want) < TOL
