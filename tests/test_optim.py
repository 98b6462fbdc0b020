"""nat.NGD and nat.GD (optim.py): non-finite models, outputs and updates are never applied; learning
rates in units of 1/α̂ work with torch's schedulers; targets in every integer dtype."""

import pytest
import torch
from torch import nn

import natural_tangents as nat
from natural_tangents import fisher as F

F64 = torch.float64


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(F64)


def _data(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("cls", [F.Exact, F.KFAC, F.Unitwise])
def test_a_nan_parameter_is_named_before_any_solve(cls):
    model = _model()
    with torch.no_grad():
        model[2].weight[1, 3] = float("nan")
    x, y = _data()
    with pytest.raises(FloatingPointError, match=r"parameter '2.weight' has 1 NaN"):
        cls(damping=1e-3, loss="cross_entropy").natural_gradient(model, x, y)
    net = nat.MLP([4, 16, 1], dtype=F64)
    with torch.no_grad():
        net.W1[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="'W1'"):
        F.Exact(damping=1e-3).natural_gradient(net, x, torch.zeros(10, 1, dtype=F64))


def test_overflowing_outputs_of_finite_parameters_are_reported():
    model = _model()
    with torch.no_grad():
        model[2].weight.mul_(1e300)
    x, y = _data()
    with pytest.raises(FloatingPointError, match="finite inputs and parameters"):
        nat.NGD(model, F.Exact(damping=1e-3, loss="cross_entropy")).step(x * 1e10, y)


def test_a_diverging_run_stops_with_finite_parameters_or_skips_steps():
    """η far too large: the outputs overflow after a few steps. The step that would apply a non-finite
    update refuses (or, with nonfinite='skip', leaves the parameters as they are and warns)."""
    x, y = _data(30)
    model = _model(3)
    opt = nat.NGD(model, F.BlockDiagonal(damping=1e-6, loss="mse"), lr=1e300)
    yy = nn.functional.one_hot(y, 3).to(F64)
    with pytest.raises(FloatingPointError):
        for _ in range(20):
            opt.step(x, yy)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    model = _model(3)
    opt = nat.NGD(model, F.BlockDiagonal(damping=1e-6, loss="mse"), lr=1e300, nonfinite="skip")
    applied = []
    with pytest.warns(RuntimeWarning, match="step skipped") as record:
        for _ in range(20):
            applied.append(opt.step(x, yy))
    assert applied[0] and not applied[-1]
    assert record[0].filename == __file__  # attributed to the caller's line
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    with pytest.raises(ValueError, match="nonfinite"):
        nat.NGD(model, "exact", nonfinite="ignore")


def test_gd_refuses_a_non_finite_gradient():
    model = _model()
    x, y = _data()
    with torch.no_grad():
        model[2].weight.mul_(1e200)
    gd = nat.GD(model, lr=1.0, loss="mse")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError):
        gd.step(x, nn.functional.one_hot(y, 3).to(F64) * 1e200)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t)),
    ],
    ids=["step", "cosine", "lambda"],
)
def test_schedulers_scale_an_optimal_learning_rate(make):
    """lr='optimal' is lr = 1 in units of 1/α̂, a number the scheduler scales: each step moves the
    parameters by (scheduled factor) / α̂ times the natural gradient."""
    x, y = _data()
    model = _model()
    fisher = F.BlockDiagonal(damping=1e-2, loss="cross_entropy")
    opt = nat.NGD(model, fisher, lr="optimal")
    sched = make(opt)
    for _ in range(3):
        factor = opt.param_groups[0]["lr"]
        ng = fisher.natural_gradient(model, x, y)
        alpha = opt.param_groups[0].get("alpha") or fisher.alpha_hat(model, x)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(x, y)
        sched.step()
        for p, p0, g in zip(model.parameters(), before, ng):
            assert torch.allclose(p0 - p, factor / alpha * g, rtol=1e-10, atol=1e-14)
    assert opt.param_groups[0]["lr_unit"] == "alpha" and isinstance(opt.param_groups[0]["lr"], float)


def test_relative_learning_rate_and_its_errors():
    x, _ = _data()
    model = _model()
    fisher = F.KFAC(damping=1e-2, loss="cross_entropy", warn=False)
    opt = nat.NGD(model, fisher, lr=0.3, lr_unit="alpha")
    assert opt.learning_rates(x)[0] == pytest.approx(0.3 / fisher.alpha_hat(model, x), rel=1e-12)
    with pytest.raises(ValueError, match="lr_unit"):
        nat.NGD(model, fisher, lr=0.3, lr_unit="relative")
    with pytest.raises(ValueError, match="lr"):
        nat.NGD(model, fisher, lr=-1.0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_class_indices_of_every_integer_dtype(dtype):
    x, y = _data()
    model = _model()
    fisher = F.Exact(damping=1e-2, loss="cross_entropy")
    want = fisher.natural_gradient(model, x, y)
    got = fisher.natural_gradient(model, x, y.to(dtype))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_float_class_indices_get_a_hint():
    x, y = _data()
    with pytest.raises(ValueError, match=r"integer tensor \(e.g. y.long\(\)\)"):
        F.Exact(damping=1e-2, loss="cross_entropy").natural_gradient(_model(), x, y.to(F64))


def test_kfac_warning_points_at_the_callers_line(unit_inputs):
    net = nat.MLP([5, 32, 1], dtype=F64)
    x = unit_inputs(12, 5)  # M_0 + 1 = 6 < N = 12: Θ̄ is not isotropic (S.109)
    with pytest.warns(RuntimeWarning, match="not isotropic") as record:
        F.KFAC().coefficient(net, x)
    assert record[0].filename == __file__
