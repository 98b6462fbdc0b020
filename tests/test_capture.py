"""The loss.backward() loop (capture.py, NGD.step() without arguments) against opt.step(x, y): every
Fisher and Fisher type, gradient accumulation, evaluation between steps, frozen parameters and groups."""

import pytest
import torch
from torch import nn

import natural_tangents as nat
from _explicit import flat
from _nets import FISHERS
from _nets import loop_batch as _batch
from _nets import loop_cnn as _cnn

F64 = torch.float64
CE = nn.functional.cross_entropy


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _params(model):
    return flat([p.detach() for p in model.parameters()])


@pytest.mark.parametrize("fisher_type", ["expectation", "empirical", "mc"])
@pytest.mark.parametrize("cls", FISHERS, ids=lambda c: c.name)
def test_backward_loop_equals_step_on_the_batch(cls, fisher_type):
    fisher = cls(damping=1e-2, loss="cross_entropy", fisher_type=fisher_type, mc_samples=2)
    one, two = _cnn(), _cnn()
    x, y = _batch()
    nat.NGD(one, fisher, lr=0.3, seed=5).step(x, y)
    opt = nat.NGD(two, fisher, lr=0.3, seed=5)
    with torch.no_grad():
        two(x)  # an evaluation without grad is not read
    two(x[:3])  # a forward without backward is dropped at the next one
    CE(two(x), y).backward()
    opt.step()
    start = _params(_cnn())
    assert _rel(_params(two) - start, _params(one) - start) < 1e-9


@pytest.mark.parametrize("fisher_type", ["expectation", "empirical"])
def test_gradient_accumulation_reads_one_batch(fisher_type):
    """Two micro-batches, each loss the micro-batch mean over 2 (the mean over all samples): one step
    equals the step on the whole batch."""
    fisher = nat.fisher.KFAC(damping=1e-2, loss="cross_entropy", fisher_type=fisher_type)
    one, two = _cnn(), _cnn()
    x, y = _batch(12)
    nat.NGD(one, fisher, lr=0.3).step(x, y)
    opt = nat.NGD(two, fisher, lr=0.3)
    for part in (slice(0, 5), slice(5, 12)):
        (CE(two(x[part]), y[part]) * (part.stop - part.start) / 12).backward()
    opt.step()
    start = _params(_cnn())
    assert _rel(_params(two) - start, _params(one) - start) < 1e-9


def test_loop_with_frozen_parameters_and_groups():
    model = _cnn()
    model.fc1.weight.requires_grad_(False)
    x, y = _batch()
    frozen = model.fc1.weight.detach().clone()
    opt = nat.NGD(model, nat.fisher.KFAC(damping=1e-2, loss="cross_entropy"), lr=0.3, param_groups=[
        {"params": [model.conv.weight, model.conv.bias], "lr": 0.1},
        {"params": [model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias]},
    ])  # fmt: skip
    ref = _cnn()
    ref.fc1.weight.requires_grad_(False)
    ng = nat.fisher.KFAC(damping=1e-2, loss="cross_entropy").natural_gradient(ref, x, y)
    CE(model(x), y).backward()
    opt.step()
    assert torch.equal(model.fc1.weight, frozen)
    for (name, p), p0, u in zip(model.named_parameters(), ref.parameters(), ng):
        if u is not None:
            lr = 0.1 if name.startswith("conv") else 0.3
            assert torch.allclose(p0 - p, lr * u, rtol=1e-9, atol=1e-13), name


def test_step_without_a_backward_pass_is_refused():
    model = _cnn()
    opt = nat.NGD(model, nat.fisher.Exact(damping=1e-2, loss="cross_entropy"))
    with pytest.raises(ValueError, match=r"loss\.backward"):
        opt.step()
    with pytest.raises(ValueError, match="y: "):
        opt.step(_batch()[0])


def test_hooks_leave_with_the_optimizer_and_optimizers_do_not_read_each_other():
    """The capture hooks hold the optimizer weakly: once it is collected the model has no hooks left.
    Two live optimizers on one model each read the backward pass once (neither reads the other's
    rows pass)."""
    import gc

    model = _cnn()
    opt = nat.NGD(model, nat.fisher.Exact(damping=1e-2, loss="cross_entropy"))
    assert any(m._forward_hooks for m in model.modules())
    del opt
    gc.collect()
    assert not any(m._forward_hooks for m in model.modules())
    x, y = _batch()
    one, two = (nat.NGD(model, nat.fisher.KFAC(damping=1e-2, loss="cross_entropy"), lr=0.1) for _ in range(2))
    CE(model(x), y).backward()
    assert len(one.capture.batches) == len(two.capture.batches) == 1


def test_non_finite_outputs_in_the_loop_are_skipped_or_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(F64)
    with torch.no_grad():
        model[0].weight.mul_(1e308)
    x, y = torch.randn(5, 4, dtype=F64), torch.randint(0, 3, (5,))
    before = model[0].weight.detach().clone()
    for nonfinite in ("skip", "raise"):
        opt = nat.NGD(model, nat.fisher.KFAC(damping=0.1, loss="cross_entropy", fisher_type="mc"), nonfinite=nonfinite)
        opt.zero_grad()
        CE(model(x * 1e10), y).backward()
        if nonfinite == "skip":
            with pytest.warns(RuntimeWarning, match="skipped"):
                assert not opt.step()
        else:
            with pytest.raises(FloatingPointError, match="NaN or inf"):
                opt.step()
    assert torch.equal(model[0].weight, before)


def test_read_forwards_are_freed_by_the_step():
    """A forward read by the hooks (its records, its output f) is freed once the step has used it, and
    one whose backward pass never ran is dropped at the step: the hook on f must not close a cycle
    through f's autograd node, which the garbage collector cannot see (it leaked every forward)."""
    import gc
    import weakref

    model = _cnn()
    x, y = _batch(12)
    opt = nat.NGD(model, nat.fisher.KFAC(damping=1e-2, loss="cross_entropy", fisher_type="mc"), lr=0.1, seed=0)
    refs = []
    for _ in range(3):
        opt.zero_grad()
        out = model(x)
        refs.append(weakref.ref(out))
        CE(out, y).backward()
        opt.step()
    unused = model(x)  # a forward with grad whose backward never runs
    refs.append(weakref.ref(unused))
    del out, unused
    opt.zero_grad()
    CE(model(x), y).backward()
    opt.step()
    gc.collect()
    assert [r() is None for r in refs] == [True] * 4
    ngd = weakref.ref(opt)
    del opt
    gc.collect()
    assert ngd() is None  # nor does the model keep its optimizer alive
