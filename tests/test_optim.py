"""nat.NGD (optim.py): the step against the natural gradient (one forward pass and one factorization,
also for the first lr="optimal" step); non-finite models, outputs and updates are never applied;
learning rates in units of 1/α̂, parameter groups and torch's schedulers; NGD as a torch optimizer
(state_dict, ``precondition`` with torch's SGD and Adam) on a user's model and, in a DataLoader loop,
on a LeNet-style CNN with MNIST images (as in benchmarks/train_mnist.py)."""

import copy
import io

import pytest
import torch
from torch import nn

import natural_tangents as nat
from _explicit import flat
from _nets import cnn_data, lenet, sequential_data, small_cnn, user_model

F64 = torch.float64


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(F64)


def _data(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def _small(seed=0, n=12, m0=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m0, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _loss(model, x, y):
    with torch.no_grad():
        return float(((model(x) - y) ** 2).sum() / (2 * x.shape[0]))


# ------------------------------------------------------------------ the step


def test_ngd_step_moves_parameters_by_minus_lr_times_the_natural_gradient():
    x, y = _small()
    net = nat.MLP([6, 32, 32, 1], activation="tanh", sigma_b2=0.1, dtype=torch.float64)
    before = [p.detach().clone() for p in net.parameters()]
    fisher = nat.fisher.BlockDiagonal(damping=1e-3)
    ng = fisher.natural_gradient(net, x, y)
    nat.NGD(net, fisher, lr=0.3).step(x, y)
    for p0, p1, g in zip(before, net.parameters(), ng):
        assert torch.allclose(p1, p0 - 0.3 * g, atol=1e-12)


def test_optimal_lr_is_one_over_alpha():
    x, y = _small(n=5)
    net = nat.MLP([6, 64, 64, 1], activation="relu", dtype=torch.float64)
    opt = nat.NGD(net, nat.fisher.BlockDiagonal(), lr="optimal")
    opt.step(x, y)
    assert opt.param_groups[0]["alpha"] == pytest.approx(3.0, rel=1e-9)
    assert nat.optimal_lr("kfac", net, x) == pytest.approx(1 / (5 * 3), rel=1e-9)


def test_ngd_on_the_cnn_computes_signals_once_per_step():
    """One forward pass (the signals' hooks) and one factorization per step, also for the first
    lr="optimal" step, which measures α̂ and takes the update from the same factorization."""
    model = small_cnn(2)
    x, y = cnn_data(8, 2)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    for fisher in (
        nat.fisher.Exact(damping=1e-3),
        nat.fisher.BlockDiagonal(damping=1e-3),
        nat.fisher.KFAC(damping=1e-3),
    ):
        calls.clear()
        opt = nat.NGD(model, fisher, lr="optimal")
        opt.step(x, y)  # α̂ and the update from one binding
        assert len(calls) == 1 and opt.param_groups[0]["alpha"] > 0
        factorizations = sum(v for k, v in opt.last_routes.items() if k in ("cholesky", "eigh", "lu"))
        assert factorizations == opt.last_routes.total(), opt.last_routes
        first = dict(opt.last_routes)
        opt.step(x, y)
        assert len(calls) == 2 and dict(opt.last_routes) == first  # α̂ measured once: the same work
    bound = nat.fisher.Exact(damping=1e-3).at(model, x)
    bound.natural_gradient(y)
    bound.alpha_hat()
    assert dict(bound.routes) == {"cholesky": 1}  # update first, then α̂: one factorization
    bound = nat.fisher.Exact(damping=1e-3).at(model, x)
    bound.alpha_hat()
    bound.natural_gradient(y)
    assert dict(bound.routes) == {"cholesky": 1}  # α̂ first, then the update


# ------------------------------------------------------------------ non-finite values


@pytest.mark.parametrize("cls", [nat.fisher.Exact, nat.fisher.KFAC, nat.fisher.Unitwise])
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
        nat.fisher.Exact(damping=1e-3).natural_gradient(net, x, torch.zeros(10, 1, dtype=F64))


def test_overflowing_outputs_of_finite_parameters_are_reported():
    model = _model()
    with torch.no_grad():
        model[2].weight.mul_(1e300)
    x, y = _data()
    with pytest.raises(FloatingPointError, match="finite inputs and parameters"):
        nat.NGD(model, nat.fisher.Exact(damping=1e-3, loss="cross_entropy")).step(x * 1e10, y)


def test_a_diverging_run_stops_with_finite_parameters_or_skips_steps():
    """η far too large: the outputs overflow after a few steps. The step that would apply a non-finite
    update refuses (or, with nonfinite='skip', leaves the parameters as they are and warns)."""
    x, y = _data(30)
    model = _model(3)
    opt = nat.NGD(model, nat.fisher.BlockDiagonal(damping=1e-6, loss="mse"), lr=1e300)
    yy = nn.functional.one_hot(y, 3).to(F64)
    with pytest.raises(FloatingPointError):
        for _ in range(20):
            opt.step(x, yy)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    model = _model(3)
    opt = nat.NGD(model, nat.fisher.BlockDiagonal(damping=1e-6, loss="mse"), lr=1e300, nonfinite="skip")
    applied = []
    with pytest.warns(RuntimeWarning, match="step skipped") as record:
        for _ in range(20):
            applied.append(opt.step(x, yy))
    assert applied[0] and not applied[-1]
    assert record[0].filename == __file__  # attributed to the caller's line
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    with pytest.raises(ValueError, match="nonfinite"):
        nat.NGD(model, "exact", nonfinite="ignore")


# ------------------------------------------------------------------ learning rates and parameter groups


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
    fisher = nat.fisher.BlockDiagonal(damping=1e-2, loss="cross_entropy")
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
    fisher = nat.fisher.KFAC(damping=1e-2, loss="cross_entropy", warn=False)
    opt = nat.NGD(model, fisher, lr=0.3, lr_unit="alpha")
    assert opt.learning_rates(x)[0] == pytest.approx(0.3 / fisher.alpha_hat(model, x), rel=1e-12)
    with pytest.raises(ValueError, match="lr_unit"):
        nat.NGD(model, fisher, lr=0.3, lr_unit="relative")
    with pytest.raises(ValueError, match="lr"):
        nat.NGD(model, fisher, lr=-1.0)


def test_negative_lr_names_the_argument():
    net = nat.MLP([6, 16, 16, 1], dtype=torch.float64)
    with pytest.raises(ValueError, match="lr: expected a positive number"):
        nat.NGD(net, "exact", lr=-1)


def test_lr_scheduler_drives_ngd():
    model = user_model()
    x, y = sequential_data(20, (10,), 3)
    fisher = nat.fisher.Exact(damping=1e-2)
    opt = nat.NGD(model, fisher, lr=0.4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(x, y)
    sched.step()
    ng = fisher.natural_gradient(model, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(x, y)
    for p, p0, g in zip(model.parameters(), before, ng, strict=True):
        assert torch.allclose(p0 - p, 0.2 * g, rtol=1e-12, atol=1e-15)


def test_parameter_groups_scale_with_their_own_lr_and_others_stay():
    model = user_model()
    x, y = sequential_data(20, (10,), 3)
    fisher = nat.fisher.BlockDiagonal(damping=1e-2)
    first, second, last = (list(model[i].parameters()) for i in (0, 2, 4))
    ng = fisher.natural_gradient(model, x, y)  # aligned with model.parameters()
    before = [p.detach().clone() for p in model.parameters()]
    opt = nat.NGD(model, fisher, lr=1.0, param_groups=[{"params": first, "lr": 0.1}, {"params": second}])
    opt.step(x, y)
    lrs = [0.1, 0.1, 1.0, 1.0, 0.0, 0.0]
    for p, p0, g, lr in zip(model.parameters(), before, ng, lrs, strict=True):
        assert torch.allclose(p0 - p, lr * g, rtol=1e-12, atol=1e-15)
    assert all(torch.equal(p, p0) for p, p0 in zip(last, before[4:], strict=True))
    with pytest.raises(ValueError, match="belong to `model`"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": last, "lr": -1.0})


# ------------------------------------------------------------------ NGD as a torch optimizer


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize(
    ("fisher", "lr", "factor"),
    [(nat.fisher.Exact(damping=1e-3), 1.0, 1e6), (nat.fisher.BlockDiagonal(damping=1e-3), "optimal", 1e5)],
)
def test_ngd_trains_a_user_model(dtype, fisher, lr, factor):
    """Five full-batch NGD steps on N = 20, C = 3 shrink the MSE loss by at least ``factor``."""
    model = user_model(dtype)
    x, y = sequential_data(20, (10,), 3, dtype=dtype)
    opt = nat.NGD(model, fisher, lr=lr)
    start = _loss(model, x, y)
    for _ in range(5):
        opt.step(x, y)
    assert all(p.dtype == dtype for p in model.parameters())
    assert _loss(model, x, y) < start / factor


def test_optimizer_state_round_trip_gives_the_identical_next_step():
    x, y = sequential_data(20, (10,), 3)
    x2, y2 = sequential_data(20, (10,), 3, seed=9)
    fisher = nat.fisher.KFAC(damping=1e-2)
    model = user_model()
    opt = nat.NGD(model, fisher, lr="optimal")
    opt.step(x, y)  # measures α̂ at the initial parameters
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored = user_model(seed=1)
    restored.load_state_dict(saved["model"])
    opt2 = nat.NGD(restored, fisher, lr="optimal")
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["alpha"] == opt.param_groups[0]["alpha"]
    fresh = copy.deepcopy(model)  # same parameters, no saved state: measures α̂ anew
    opt3 = nat.NGD(fresh, fisher, lr="optimal")
    for o in (opt, opt2, opt3):
        o.step(x2, y2)
    for p, q in zip(model.parameters(), restored.parameters(), strict=True):
        assert torch.equal(p, q)
    assert _rel(flat(fresh.parameters()), flat(model.parameters())) > 1e-6  # the state mattered


def test_precondition_then_torch_sgd_momentum_and_adam():
    x, y = sequential_data(20, (10,), 3)
    fisher = nat.fisher.KFAC(damping=1e-2)
    model = user_model()
    ngd = nat.NGD(model, fisher)
    sgd = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    p0 = [p.detach().clone() for p in model.parameters()]
    g0 = fisher.natural_gradient(model, x, y)
    ngd.precondition(x, y)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), g0, strict=True))
    sgd.step()
    ngd.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    p1 = [p0_ - 0.3 * g for p0_, g in zip(p0, g0)]
    g1 = fisher.natural_gradient(model, x, y)
    ngd.precondition(x, y)
    sgd.step()
    for p, a, b, c in zip(model.parameters(), p1, g0, g1, strict=True):
        assert torch.allclose(p, a - 0.3 * (0.9 * b + c), rtol=1e-12, atol=1e-14)
    # Adam's first step is θ − lr · g / (|g| + eps) (bias-corrected moments m̂ = g, v̂ = g²)
    model2 = user_model(seed=4)
    adam = torch.optim.Adam(model2.parameters(), lr=1e-2, eps=1e-8)
    q0 = [p.detach().clone() for p in model2.parameters()]
    g = fisher.natural_gradient(model2, x, y)
    nat.NGD(model2, fisher).precondition(x, y)
    adam.step()
    for p, a, b in zip(model2.parameters(), q0, g, strict=True):
        assert torch.allclose(p, a - 1e-2 * b / (b.abs() + 1e-8), rtol=1e-10, atol=1e-14)


def test_exact_ngd_lowers_the_training_loss_in_a_dataloader_loop(mnist_300):
    x, y = mnist_300
    model = lenet()
    opt = nat.NGD(model, nat.fisher.Exact(damping=0.1, loss="cross_entropy"), lr=0.3)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        before = float(nn.functional.cross_entropy(model(x), y))
    for xb, yb in loader:  # one epoch: 6 steps
        opt.step(xb, yb)
    with torch.no_grad():
        f = model(x)
        after = float(nn.functional.cross_entropy(f, y))
        acc = float((f.argmax(1) == y).float().mean())
    assert before > 2.0  # ≈ log 10 at initialization
    assert after < 0.6 * before  # 2.30 -> 0.95 when written
    assert acc > 0.5


@pytest.mark.parametrize("fisher", [nat.fisher.Exact, nat.fisher.KFAC])
def test_precondition_then_torch_sgd_equals_ngd_step(mnist_300, fisher):
    x, y = mnist_300[0][:40], mnist_300[1][:40]
    a = lenet()
    b = copy.deepcopy(a)
    lr = 0.3
    nat.NGD(a, fisher(damping=1e-2, loss="cross_entropy"), lr=lr).step(x, y)
    ngd = nat.NGD(b, fisher(damping=1e-2, loss="cross_entropy"))
    sgd = torch.optim.SGD(b.parameters(), lr=lr)
    ngd.precondition(x, y)
    sgd.step()
    moved = 0.0
    for p0, pa, pb in zip(lenet().parameters(), a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
        moved += float((pa - p0).norm())
    assert moved > 1e-3  # the step did something


# ------------------------------------------------------------------ the recommended settings


def test_recommended_settings_are_kfac_mc_amortized_with_a_trust_region_and_train():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 1, 7, 7, generator=g), torch.randint(0, 3, (32,), generator=g)
    opt = nat.NGD.recommended(model, seed=0)
    fisher = opt.fisher
    assert isinstance(fisher, nat.fisher.KFAC) and fisher.fisher_type == "mc" and fisher.output_factor == "fisher"
    assert (opt.curvature_every, opt.inverse_every, opt.curvature.ema, opt.kl_clip) == (10, 10, 0.95, 1e-3)
    assert opt.param_groups[0]["lr_unit"] == "alpha" and opt.param_groups[0]["lr"] == 0.1
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        first = float(loss) if first is None else first
    assert float(loss) < 0.5 * first  # the trust region keeps the bold default lr stable
    # any keyword of NGD overrides the recipe
    again = nat.NGD.recommended(model, lr=0.3, damping=0.1, kl_clip=None, curvature_every=5)
    assert again.kl_clip is None and again.curvature_every == 5 and again.inverse_every == 10
    assert again.fisher.damping == 0.1 and again.param_groups[0]["lr"] == 0.3


def test_recommended_settings_hold_batchnorm_statistics_constant():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    assert nat.NGD.recommended(model).fisher.batch_statistics == "constant"
    assert nat.NGD.recommended(model.eval()).fisher.batch_statistics == "refuse"
    with pytest.raises(NotImplementedError, match="BatchNorm"):
        nat.NGD.recommended(model.train(), batch_statistics="refuse")
