"""Curvature kept across mini-batches (curvature.py; NGD's curvature_every, inverse_every, ema) against
running averages computed explicitly; refusals; state_dict round trips; KL clipping, warm-up and the
damping retried after a failed factorization (optim.py)."""

import copy
import io

import pytest
import torch
from torch import nn

import natural_tangents as nat
from _explicit import explicit_sequential_signals, flat
from _nets import loop_batch as _batch
from _nets import loop_cnn as _cnn

F64 = torch.float64
CE = nn.functional.cross_entropy


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _params(model):
    return flat([p.detach() for p in model.parameters()])


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)


def _kfac_factors(model, x):
    """K-FAC factors of the expectation (cross-entropy) from hooks and probes: A = a^T a / N,
    B = Σ_n δ_n^T Λ_n δ_n / N, the paper's output factor / N on the output layer."""
    hs, deltas = explicit_sequential_signals(model, x)
    n = x.shape[0]
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :] + 1e-3 * torch.eye(3, dtype=F64)
    out = []
    for l, (a, d) in enumerate(zip(hs, deltas)):
        b = torch.einsum("knm,nkj,jno->mo", d, lam, d) / n
        out.append((a.T @ a / n, b / n if l == len(hs) - 1 else b))
    return out


def test_running_kfac_factors_equal_the_explicit_running_average():
    """ema = 0.6, curvature and inverse every step: the update of step t is
    (B_t + ρ)^{-1} G_t (A_t + ρ)^{-1} with A_t = 0.6 A_{t−1} + 0.4 Â_t (the first batch's Â_1)."""
    rho, beta, lr = 1e-2, 0.6, 0.2
    model = _mlp()
    opt = nat.NGD(model, nat.fisher.KFAC(damping=rho, loss="cross_entropy"), lr=lr, ema=beta)
    running = None
    for t in range(3):
        x, y = _batch(11, seed=t)
        x = x.reshape(11, -1)[:, :6]
        fac = _kfac_factors(model, x)
        running = fac if running is None else [
            (beta * a + (1 - beta) * a2, beta * b + (1 - beta) * b2) for (a, b), (a2, b2) in zip(running, fac)
        ]  # fmt: skip
        model.zero_grad()
        CE(model(x), y).backward()
        grads = [torch.cat([m.weight.grad, m.bias.grad[:, None]], 1) for m in (model[0], model[2], model[4])]
        before = [torch.cat([m.weight, m.bias[:, None]], 1).detach().clone() for m in (model[0], model[2], model[4])]
        opt.step()
        for m, g, (a, b), w0 in zip((model[0], model[2], model[4]), grads, running, before):
            eye_a, eye_b = torch.eye(len(a), dtype=F64), torch.eye(len(b), dtype=F64)
            want = torch.linalg.solve(b + rho * eye_b, g) @ torch.linalg.inv(a + rho * eye_a)
            got = (w0 - torch.cat([m.weight, m.bias[:, None]], 1).detach()) / lr
            assert _rel(got, want) < 1e-9


def test_curvature_every_keeps_the_inverses_between_refreshes():
    """curvature_every = 3: the steps in between precondition with the first batch's factors."""
    rho, lr = 1e-2, 0.2
    model = _mlp()
    opt = nat.NGD(model, nat.fisher.KFAC(damping=rho, loss="cross_entropy"), lr=lr, curvature_every=3)
    x0, y0 = _batch(11, seed=0)
    x0 = x0.reshape(11, -1)[:, :6]
    fac = _kfac_factors(model, x0)
    for t in range(3):
        x, y = (x0, y0) if t == 0 else _batch(11, seed=10 + t)
        x = x.reshape(11, -1)[:, :6]
        model.zero_grad()
        CE(model(x), y).backward()
        grads = [torch.cat([m.weight.grad, m.bias.grad[:, None]], 1) for m in (model[0], model[2], model[4])]
        before = [torch.cat([m.weight, m.bias[:, None]], 1).detach().clone() for m in (model[0], model[2], model[4])]
        with torch.no_grad() if t else torch.enable_grad():
            pass
        opt.step()
        for m, g, (a, b), w0 in zip((model[0], model[2], model[4]), grads, fac, before):
            want = torch.linalg.solve(b + rho * torch.eye(len(b), dtype=F64), g) @ torch.linalg.inv(
                a + rho * torch.eye(len(a), dtype=F64)
            )
            got = (w0 - torch.cat([m.weight, m.bias[:, None]], 1).detach()) / lr
            assert _rel(got, want) < 1e-9
    assert opt.steps == 3


@pytest.mark.parametrize("cls", [nat.fisher.Unitwise, nat.fisher.BlockDiagonal])
def test_running_blocks_equal_the_batch_fisher_at_zero_decay(cls):
    """ema = 0 with inverses every other step: a refreshing step equals the parameter-space solve of
    the batch's own blocks, i.e. the per-batch natural gradient of the same Fisher."""
    model, ref = _mlp(), _mlp()
    x, y = _batch(11, seed=3)
    x = x.reshape(11, -1)[:, :6]
    want = cls(damping=1e-2, loss="cross_entropy").natural_gradient(ref, x, y)
    opt = nat.NGD(model, cls(damping=1e-2, loss="cross_entropy"), lr=0.5, inverse_every=2)
    CE(model(x), y).backward()
    opt.step()
    got = [(p0 - p) / 0.5 for p0, p in zip(ref.parameters(), model.parameters())]
    assert _rel(flat(got), flat(want)) < 1e-9


def test_amortizing_a_dual_form_fisher_is_refused():
    for fisher in (nat.fisher.Exact(damping=1e-2), nat.fisher.BlockTriDiagonal(damping=1e-2)):
        with pytest.raises(ValueError, match="per-batch"):
            nat.NGD(_mlp(), fisher, ema=0.9)
    with pytest.raises(ValueError, match="ema"):
        nat.NGD(_mlp(), nat.fisher.KFAC(damping=1e-2), ema=1.0)


def test_state_dict_round_trip_resumes_bit_for_bit():
    """K-FAC, Monte-Carlo rows, running curvature (refreshed every 2 steps), α̂ units: three steps,
    save, restore into a fresh model and optimizer, then two more steps on both: identical."""
    kw = {"lr": 0.5, "lr_unit": "alpha", "ema": 0.9, "curvature_every": 2, "seed": 3}
    fisher = nat.fisher.KFAC(damping=1e-2, loss="cross_entropy", fisher_type="mc")
    model = _cnn()
    opt = nat.NGD(model, fisher, **kw)
    batches = [_batch(10, seed=s) for s in range(5)]
    for x, y in batches[:3]:
        opt.step(x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    other = _cnn(seed=9)
    other.load_state_dict(saved["model"])
    opt2 = nat.NGD(other, fisher, **{**kw, "seed": 77})
    opt2.load_state_dict(saved["opt"])
    for x, y in batches[3:]:
        opt.step(x, y)
        opt2.step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    fresh = copy.deepcopy(_cnn())  # a copy of a model carries no capture hooks that act
    fresh(batches[0][0])


def test_kl_clip_and_warmup_scale_the_step():
    x, y = _batch()
    fisher = nat.fisher.Exact(damping=1e-2, loss="cross_entropy")
    ref = _cnn()
    u = flat(fisher.natural_gradient(ref, x, y))
    CE(ref(x), y).backward()
    g = flat([p.grad for p in ref.parameters()])
    vg = float(u @ g)
    for kl_clip, warmup, lr in ((vg * 0.01, 0, 1.0), (None, 4, 1.0), (vg * 100, 0, 1.0)):
        model = _cnn()
        nat.NGD(model, fisher, lr=lr, kl_clip=kl_clip, warmup=warmup).step(x, y)
        scale = 0.1 if kl_clip == vg * 0.01 else (0.25 if warmup else 1.0)
        assert _rel(_params(_cnn()) - _params(model), scale * u) < 1e-9


def test_a_failed_factorization_is_retried_with_more_damping():
    """Duplicated samples make K-FAC's float32 factors singular below the damping's rounding: the step
    retries with ten times the damping and says so; the run goes on."""
    model = _mlp().float()
    x = torch.randn(4, 6).repeat(8, 1)
    y = torch.arange(32) % 3
    opt = nat.NGD(model, nat.fisher.Exact(damping=1e-12, loss="cross_entropy", solve_dtype=torch.float32), lr=0.1)
    with pytest.warns(RuntimeWarning, match="retrying with damping"):
        assert opt.step(x, y)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
