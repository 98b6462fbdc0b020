"""Infinite-width kernels (the paper's Appendix E) against independent routes: the other integration
methods, scipy, the paper's printed ReLU formulas, tiled against untiled, and wide networks (the ground truth)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

import natural_tangents as nat
from natural_tangents import activations as A
from natural_tangents import theory
from natural_tangents.theory import gaussian

F64 = torch.float64


def _pairs(n: int, qmax: float, seed: int = 0):
    """Per-pair variances in [qmax/10, qmax] and correlations covering (−1, 1), ±1 and 1 − 10^-k."""
    g = torch.Generator().manual_seed(seed)
    q1 = qmax * (0.1 + 0.9 * torch.rand(n, generator=g, dtype=F64))
    q2 = qmax * (0.1 + 0.9 * torch.rand(n, generator=g, dtype=F64))
    rho = 2 * torch.rand(n, generator=g, dtype=F64) - 1
    rho[:8] = 1 - 10 ** -torch.linspace(1, 12, 8, dtype=F64)
    rho[8:16] = -rho[:8]
    rho[16:18] = torch.tensor([1.0, -1.0], dtype=F64)
    q2[18:20] = q1[18:20]  # equal variances on the diagonal-like pairs
    rho[18:20] = 1.0
    return q1, q2, rho * torch.sqrt(q1 * q2)


def _unit(n: int, m: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


# ------------------------------------------------------------------ Gaussian expectations
def test_bivariate_normal_cdf_matches_one_dimensional_integral():
    rng = np.random.default_rng(1)
    h = rng.normal(size=40) * 1.5
    k = np.where(np.arange(40) % 3 == 0, h + 10.0 ** rng.uniform(-8, -1, 40), rng.normal(size=40) * 1.5)
    r = np.concatenate(
        [rng.uniform(-1, 1, 20), 1 - 10.0 ** rng.uniform(-12, -1, 10), -1 + 10.0 ** rng.uniform(-12, -1, 10)]
    )
    got = theory.bivariate_normal_cdf(torch.tensor(h), torch.tensor(k), torch.tensor(r)).numpy()
    for hi, ki, ri, gi in zip(h, k, r, got):
        s = math.sqrt(1 - ri * ri)
        f = lambda t, hi=hi, ki=ki, ri=ri, s=s: stats.norm.pdf(t) * stats.norm.cdf((ki - ri * t) / s)  # noqa: E731
        # the integrand steps from 1 to 0 across t = k/ρ over a width s: split there
        step = [ki / ri + c * s for c in (-12, -1, 0, 1, 12)] if ri != 0 else []
        edges = [-40.0, *sorted(t for t in step if -40 < t < hi), hi]
        ref = sum(
            integrate.quad(f, a, b, epsabs=1e-15, epsrel=1e-13, limit=200)[0] for a, b in itertools.pairwise(edges)
        )
        assert abs(gi - ref) < 1e-11, (hi, ki, ri)
    # ρ = ±1 exactly: the degenerate limits
    hh, kk = torch.tensor([0.3, -1.2], dtype=F64), torch.tensor([-0.4, 0.5], dtype=F64)
    up = theory.bivariate_normal_cdf(hh, kk, torch.tensor(1.0))
    down = theory.bivariate_normal_cdf(hh, kk, torch.tensor(-1.0))
    hn, kn = hh.numpy(), kk.numpy()
    assert np.allclose(up.numpy(), stats.norm.cdf(np.minimum(hn, kn)), atol=1e-13)
    assert np.allclose(down.numpy(), np.maximum(0, stats.norm.cdf(hn) - stats.norm.cdf(-kn)), atol=1e-13)


@pytest.mark.parametrize(
    "act, qmax, tol",
    [
        (A.ReLU(), 3.0, 1e-11),
        (A.ShiftedReLU(1.0), 3.0, 1e-11),
        (A.ShiftedReLU(-0.5), 3.0, 1e-11),
        (A.Erf(), 1.5, 1e-6),
        (A.Identity(), 3.0, 1e-12),
    ],
)
def test_closed_forms_match_quadrature(act, qmax, tol):
    q1, q2, cov = _pairs(60, qmax)
    closed = theory.gaussian_expectations(act, q1, q2, cov, method="closed_form")
    quad = theory.gaussian_expectations(act, q1, q2, cov, method="quadrature")
    for c, q in zip(closed, quad):
        assert float((c - q).abs().max()) < tol


def test_smooth_rules_agree_with_each_other():
    """Gauss–Hermite (high order), the trapezoidal rule and the Hermite series are three different
    discretizations; at moderate variance they must agree to ~1e-10."""
    q1, q2, cov = _pairs(40, 1.0, seed=3)
    for act in (A.Tanh(), A.GELU(), A.Softplus()):
        gh = theory.gaussian_expectations(act, q1, q2, cov, method="quadrature", order=120)
        tr = theory.gaussian_expectations(act, q1, q2, cov, method="trapezoid", order=96)
        se = theory.gaussian_expectations(act, q1, q2, cov, method="series")
        for a, b, c in zip(gh, tr, se):
            assert float((a - b).abs().max()) < 1e-9
            assert float((c - b).abs().max()) < 1e-10


def test_series_kernels_with_per_sample_variances():
    """Whole recursion with inputs of different norms (one Hermite coefficient vector per variance,
    gathered per pair) against the 2-D trapezoidal rule."""
    x = _unit(7, 9, 11) * torch.linspace(0.5, 1.6, 7, dtype=F64)[:, None]
    x2 = _unit(4, 9, 12) * 1.3
    opts = {"depth": 3, "activation": "tanh", "sigma_w2": 2.0, "sigma_b2": 0.1}
    series = theory.kernels(x, x2, method="series", **opts)
    trap = theory.kernels(x, x2, method="trapezoid", order=96, **opts)
    assert float((series.per_layer - trap.per_layer).abs().max()) < 1e-9
    assert torch.allclose(series.q1, trap.q1, atol=1e-12) and torch.allclose(series.q2, trap.q2, atol=1e-12)


def test_erf_series_matches_closed_form_at_large_variance():
    q1, q2, cov = _pairs(40, 4.0, seed=4)
    closed = theory.gaussian_expectations("erf", q1, q2, cov)
    series = theory.gaussian_expectations("erf", q1, q2, cov, method="series")
    for c, s in zip(closed, series):
        assert float((c - s).abs().max()) < 1e-12


def test_piecewise_quadrature_handles_declared_kinks_of_an_elementwise_activation():
    """max(u, −1) through autograd and kink_points must give the shifted ReLU closed form."""
    hard = A.Elementwise(lambda u: torch.clamp(u, min=-1.0), label="clamp", kink_points=(-1.0,))
    q1, q2, cov = _pairs(24, 2.0, seed=5)
    got = theory.gaussian_expectations(hard, q1, q2, cov, order=32)
    ref = theory.gaussian_expectations(A.ShiftedReLU(1.0), q1, q2, cov)
    for g, r in zip(got, ref):
        assert float((g - r).abs().max()) < 1e-6


def test_series_refuses_kinked_activations():
    with pytest.raises(ValueError, match="method"):
        theory.gaussian_expectations("relu", 1.0, 1.0, 0.5, method="series")


# ---------------------------------------------------------------------------- kernels
def test_relu_kernels_match_the_paper_formulas():
    """(S.176)–(S.178) transcribed for unit-norm inputs (one q_l per layer)."""
    x = _unit(10, 30, 0)
    sw2, sb2, depth = 2.0, 0.5, 4
    k = theory.kernels(x, depth=depth, activation="relu", sigma_w2=sw2, sigma_b2=sb2)
    a_prev = x @ x.T / 30
    q = sw2 / 30 + sb2  # q_1 (S.178)
    b = [None] * depth
    xis = []
    for l in range(1, depth):
        qbar = (sw2 * a_prev + sb2) / q
        qbar = qbar.clamp(-1, 1)
        a_l = q / (2 * math.pi) * (torch.sqrt(1 - qbar**2) + math.pi / 2 * qbar + qbar * torch.asin(qbar))
        xis.append((torch.asin(qbar) + math.pi / 2) / (2 * math.pi))
        assert torch.allclose(k.A[l], a_l, atol=1e-13)
        assert torch.allclose(k.q1[l], torch.full((10,), q, dtype=F64), atol=1e-13)
        a_prev, q = a_l, sw2 / 2 * q + sb2
    b[depth - 1] = torch.ones(10, 10, dtype=F64)
    for l in range(depth - 1, 0, -1):
        b[l - 1] = sw2 * xis[l - 1] * b[l]
    theta = sum(sw2 * b[l] * k.A[l] + sb2 * b[l] for l in range(depth))
    assert torch.allclose(k.ntk, theta, atol=1e-12)


def test_closed_form_and_quadrature_kernels_agree():
    """Whole recursions, depth 3, inputs of different norms: closed form vs quadrature to 1e-6."""
    x = _unit(8, 12, 1) * torch.linspace(0.5, 1.5, 8, dtype=F64)[:, None]
    x2 = _unit(5, 12, 2)
    for act in ("relu", "erf", A.ShiftedReLU(0.5)):
        opts = {"depth": 3, "activation": act, "sigma_w2": 2.0, "sigma_b2": 0.3}
        c = theory.kernels(x, x2, method="closed_form", **opts)
        q = theory.kernels(x, x2, method="quadrature", **opts)
        assert float((c.per_layer - q.per_layer).abs().max()) < 1e-6
        assert float((c.ntk - q.ntk).abs().max()) < 1e-6


@pytest.mark.parametrize("batch_size", [None, 4, 3])  # one tile, ragged tiles, tiles that divide N = 9
def test_symmetric_path_equals_two_batch_path_and_ntk(batch_size):
    """The symmetric path computes the tiles on and above the diagonal and mirrors them; with small
    tiles (several, ragged or not) it must agree with the plain two-batch path."""
    x = _unit(9, 7, 3) * torch.linspace(0.7, 1.3, 9, dtype=F64)[:, None]
    for act in ("relu", "tanh", A.ShiftedReLU(0.4)):
        opts = {"depth": 4, "activation": act, "sigma_w2": 1.5, "sigma_b2": 0.2, "batch_size": batch_size}
        sym = theory.kernels(x, **opts)
        two = theory.kernels(x, x.clone(), **opts)
        assert torch.allclose(sym.per_layer, two.per_layer, atol=1e-12)
        assert torch.allclose(sym.q1, two.q2, atol=1e-13)
        assert torch.allclose(theory.ntk(x, **opts), sym.ntk, atol=1e-12)  # forward recursion
        assert torch.equal(sym.ntk, sym.ntk.T)  # exactly symmetric
        assert torch.allclose(sym.ntk, sym.per_layer.sum(0))


@pytest.mark.parametrize("act", ["relu", "erf", "tanh", A.ShiftedReLU(0.3)])
def test_tiled_kernels_equal_untiled(act):
    """Tile sides that do and do not divide N (symmetric and x1 ≠ x2) against one whole tile, to 1e-12;
    the fused ReLU/erf tiles also against the generic per-layer route (method='closed_form' vs
    kernels(), which always takes the generic route)."""
    x = _unit(24, 6, 11) * torch.linspace(0.6, 1.4, 24, dtype=F64)[:, None]
    x2 = _unit(10, 6, 12)
    opts = {"depth": 3, "activation": act, "sigma_w2": 1.8, "sigma_b2": 0.15}
    whole_sym, whole_pair = theory.ntk(x, batch_size=100, **opts), theory.ntk(x, x2, batch_size=100, **opts)
    generic = theory.kernels(x, batch_size=100, **opts).ntk
    assert torch.allclose(whole_sym, generic, rtol=0, atol=1e-12 * float(generic.abs().max()))
    for b in (5, 6, 8, 7):
        assert torch.allclose(theory.ntk(x, batch_size=b, **opts), whole_sym, rtol=0, atol=1e-12)
        assert torch.allclose(theory.ntk(x, x2, batch_size=b, **opts), whole_pair, rtol=0, atol=1e-12)
    k = theory.kernels(x, x2, batch_size=7, **opts)
    assert torch.allclose(k.ntk, whole_pair, rtol=0, atol=1e-12)


def test_out_files_equal_in_memory_kernels(tmp_path):
    x = _unit(17, 5, 13)
    opts = {"depth": 3, "activation": "erf", "sigma_w2": 1.3, "sigma_b2": 0.2, "batch_size": 6}
    mem = theory.ntk(x, **opts)
    disk = theory.ntk(x, out=tmp_path / "ntk.npy", **opts)
    assert np.array_equal(np.load(tmp_path / "ntk.npy"), mem.numpy()) and torch.equal(disk, mem)
    single = theory.ntk(x, out=tmp_path / "ntk32.npy", dtype=torch.float32, **opts)
    assert single.dtype == torch.float32 and torch.allclose(single.double(), mem, rtol=1e-6)
    k_mem = theory.kernels(x, x[:4], **opts)
    k_disk = theory.kernels(x, x[:4], out=tmp_path / "stack.npy", **opts)
    stack = np.load(tmp_path / "stack.npy")
    assert stack.shape == (15, 17, 4)  # 5L signals
    for field in ("A", "Q", "Xi", "B", "per_layer"):
        assert torch.equal(getattr(k_disk, field), getattr(k_mem, field))
    assert torch.equal(k_disk.ntk, k_mem.ntk) and np.array_equal(stack[-1], k_mem.ntk.numpy())


def _diagonal_recursion(q0: float, act: str, depth: int, sw2: float, sb2: float) -> float:
    """Θ_ana(x, x) from scalar closed forms at ρ = 1, in plain Python floats:
    ReLU E[φ²] = q/2, E[φ′²] = 1/2; erf E[φ²] = (2/π) asin(2q/(1+2q)), E[φ′²] = (4/π)/√(1+4q)."""
    q = sw2 * q0 + sb2
    theta = q
    for _ in range(depth - 1):
        if act == "relu":
            a, xi = q / 2.0, 0.5
        else:
            a, xi = (2.0 / math.pi) * math.asin(2.0 * q / (1.0 + 2.0 * q)), (4.0 / math.pi) / math.sqrt(1.0 + 4.0 * q)
        q = sw2 * a + sb2
        theta = sw2 * xi * theta + q
    return theta


@pytest.mark.parametrize("act", ["relu", "erf"])
def test_the_diagonal_is_exact(act):
    """On the diagonal ρ = 1: the limit is used, not √(1 − ρ²) at a rounded ρ (which loses ~1e-8)."""
    x = _unit(40, 784, 14) * torch.linspace(0.5, 2.0, 40, dtype=F64)[:, None]
    for sb2 in (0.0, 0.3):
        opts = {"depth": 4, "activation": act, "sigma_w2": 2.0, "sigma_b2": sb2}
        diag = torch.diagonal(theory.ntk(x, batch_size=16, **opts))
        q0 = (x * x).sum(1) / x.shape[1]
        ref = torch.tensor([_diagonal_recursion(float(q), act, 4, 2.0, sb2) for q in q0], dtype=F64)
        assert float(((diag - ref) / ref).abs().max()) < 2e-15


def test_architecture_is_an_alternative_to_the_keywords():
    x, x2 = _unit(8, 5, 15), _unit(3, 5, 16)
    arch = theory.Architecture(depth=3, activation="erf", sigma_w2=1.5, sigma_b2=0.1)
    keywords = {"depth": 3, "activation": "erf", "sigma_w2": 1.5, "sigma_b2": 0.1}
    assert torch.equal(theory.ntk(x, x2, arch=arch), theory.ntk(x, x2, **keywords))
    assert torch.equal(theory.kernels(x, arch=arch).per_layer, theory.kernels(x, **keywords).per_layer)
    with pytest.raises(ValueError, match="arch: given together with depth"):
        theory.ntk(x, arch=arch, depth=3)
    with pytest.raises(ValueError, match="sigma_b2: missing"):
        theory.ntk(x, depth=3, activation="erf", sigma_w2=1.5)
    with pytest.raises(ValueError, match="depth"):
        theory.Architecture(depth=0, activation="relu", sigma_w2=2.0, sigma_b2=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.depth = 4


def test_depth_one_is_the_linear_model_exactly():
    """L = 1: J J^T = σ_w² x x′^T / M_0 + σ_b² for every draw of the weights."""
    x, xt = _unit(6, 5, 4) * 2.0, _unit(3, 5, 5)
    net = nat.MLP([5, 1], activation="tanh", sigma_w2=1.7, sigma_b2=0.4, seed=0, dtype=F64)
    ana = theory.ntk(xt, x, depth=1, activation="tanh", sigma_w2=1.7, sigma_b2=0.4)
    assert torch.allclose(ana, nat.empirical_ntk(net, xt, x), atol=1e-13)


def test_identity_activation_is_a_deep_linear_network():
    x = _unit(6, 9, 6)
    k = theory.kernels(x, depth=3, activation="identity", sigma_w2=1.3, sigma_b2=0.2)
    assert torch.allclose(k.A[1], k.Q[0]) and torch.allclose(k.A[2], k.Q[1])
    assert torch.allclose(k.Xi, torch.ones_like(k.Xi))


def test_shifted_relu_with_zero_shift_is_relu():
    x = _unit(7, 4, 7)
    opts = {"depth": 3, "sigma_w2": 2.0, "sigma_b2": 0.1}
    a = theory.kernels(x, activation=A.ShiftedReLU(0.0), **opts)
    b = theory.kernels(x, activation="relu", **opts)
    assert torch.allclose(a.ntk, b.ntk, atol=1e-13)


def _empirical_layer_kernels(act, width: int, seeds, x) -> torch.Tensor:
    """J_l J_l^T of MLP([M_0, M, M, 1]) for each seed, shape (seeds, L, N, N)."""
    out = []
    for s in seeds:
        net = nat.MLP([x.shape[1], width, width, 1], activation=act, sigma_w2=2.0, sigma_b2=0.5, seed=s, dtype=F64)
        out.append(nat.empirical_ntk(net, x, per_layer=True))
    return torch.stack(out)


@pytest.mark.slow
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_per_layer_kernels_match_wide_networks(act):
    """Θ_l = σ_w² B_l ⊙ A_{l−1} + σ_b² B_l is the limit of J_l J_l^T (no 1/N) with fluctuations
    O(1/√M). Stated bound: every seed and layer has relative Frobenius error ≤ 8/√M (measured
    √M · error ≈ 0.5–3.5 over many seeds); the RMS error drops by ≈ √8 from M = 512 to 4096, and the
    mean over S seeds is within 8/√(S M)."""
    x = _unit(12, 20, 8) * torch.linspace(0.6, 1.6, 12, dtype=F64)[:, None]  # per-sample norms
    ana = theory.kernels(x, depth=3, activation=act, sigma_w2=2.0, sigma_b2=0.5).per_layer
    rms, emp = {}, {}
    for width, seeds in ((512, range(8)), (4096, range(4))):
        emp[width] = _empirical_layer_kernels(act, width, seeds, x)
        err = torch.linalg.matrix_norm(emp[width] - ana) / torch.linalg.matrix_norm(ana)  # (seeds, L)
        assert float(err.max()) <= 8.0 / math.sqrt(width)
        rms[width] = float(err.pow(2).mean().sqrt())
    ratio = rms[512] / rms[4096]
    assert math.sqrt(8) / 1.6 < ratio < math.sqrt(8) * 1.6, ratio
    mean_err = torch.linalg.matrix_norm(emp[4096].mean(0) - ana) / torch.linalg.matrix_norm(ana)
    assert float(mean_err.max()) <= 8.0 / math.sqrt(4 * 4096)


def test_analytic_kernels_are_float64_and_frozen():
    x = _unit(4, 3, 9)
    k = theory.kernels(x, depth=2, activation="erf", sigma_w2=1.0, sigma_b2=0.1)
    assert k.ntk.dtype == F64 and k.per_layer.shape == (2, 4, 4) and k.Xi.shape == (1, 4, 4)
    assert k.q1.shape == (3, 4) and k.shape == (4, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        k.ntk = k.ntk * 2  # type: ignore[misc]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"activation": "swish"}, "activation"),
        ({"depth": 0}, "depth"),
        ({"depth": 2.5}, "depth"),
        ({"sigma_w2": -1.0}, "sigma_w2"),
        ({"sigma_b2": float("nan")}, "sigma_b2"),
        ({"method": "magic"}, "method"),
        ({"method": "closed_form", "activation": "tanh"}, "closed form"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    opts = {"depth": 2, "activation": "relu", "sigma_w2": 2.0, "sigma_b2": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        theory.kernels(_unit(3, 4, 0), **opts)


def test_bad_inputs_raise_value_error_naming_them():
    opts = {"depth": 2, "activation": "relu", "sigma_w2": 2.0, "sigma_b2": 0.0}
    x = _unit(3, 4, 0)
    with pytest.raises(ValueError, match="x2: has 5 features"):
        theory.ntk(x, _unit(2, 5, 1), **opts)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x1: contains 1 NaN"):
        theory.ntk(bad, **opts)
    with pytest.raises(ValueError, match="x2: contains"):
        theory.kernels(x, torch.full((2, 4), float("inf")), **opts)
    zero = torch.zeros(2, 4, dtype=F64)
    with pytest.raises(ValueError, match="x1: sample 0 is the zero vector"):
        theory.ntk(zero, **opts)


def test_order_is_validated():
    with pytest.raises(ValueError, match="order"):
        gaussian.gaussian_expectations("tanh", 1.0, 1.0, 0.5, method="quadrature", order=1)
