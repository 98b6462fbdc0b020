"""Recurrent and attention layers (nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention,
nn.TransformerEncoderLayer), read by the generic kind with tuple outputs, keyword inputs, per-module
batch axes and the folding rule (a never-called module's parameters belong to the nearest module
above it that is called), against the explicit route: torch.func Jacobians over all trainable
parameters and explicit P × P Fishers, float64, relative error ≤ 1e-8."""

import pytest
import torch
from torch import nn

import natural_tangents as nat
from _explicit import flat, jacobian, module_blocks
from natural_tangents import models

TOL = 1e-8
F64 = torch.float64
N, T, C = 4, 3, 2

# torch.func's Jacobian of the explicit route (not the library) warns about scaled-dot-product attention
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


class _Recurrent(nn.Module):
    """A recurrent layer over (N, T, 3) inputs; the head reads the last output and the final hidden
    state (for an LSTM the final cell state), so that two of its output tensors reach f."""

    def __init__(self, cls, batch_first, **kw):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cls(3, 4, batch_first=batch_first, **kw)
        self.head = nn.Linear(4, C)

    def forward(self, x):
        out, h = self.rnn(x if self.batch_first else x.transpose(0, 1))
        last = out[:, -1] if self.batch_first else out[-1]
        state = h[1] if isinstance(h, tuple) else h  # (layers, N, 4): batch on axis 1
        return self.head(torch.tanh(last + state[-1]))


class _Attention(nn.Module):
    """Self-attention; batch-first reads the attention weights too, sequence-first passes a key padding
    mask and a 2-D causal mask as keyword arguments."""

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.head = nn.Linear(4 + T, C)

    def forward(self, x):
        if self.batch_first:
            out, w = self.attn(x, x, x)  # w (N, T, T), averaged over the heads
            return self.head(torch.cat([out.mean(1), w.mean(1)], 1))
        xs = x.transpose(0, 1)
        pad = torch.zeros(x.shape[0], T, dtype=torch.bool)
        pad[::2, -1] = True
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        out, _ = self.attn(xs, xs, xs, key_padding_mask=pad, attn_mask=causal, need_weights=False)
        return self.head(torch.cat([out.mean(0), x[..., 0]], 1))


class _Encoder(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.enc = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(4, C)

    def forward(self, x):
        h = self.enc(x if self.batch_first else x.transpose(0, 1))
        return self.head(h.mean(1 if self.batch_first else 0))


class _Mixer(nn.Module):
    """A custom module: calls ``a``, uses ``b``'s weight and bias directly (``b`` is never called), and has
    a parameter of its own."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor([0.8, 1.2, -0.5]))
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x):
        return torch.tanh(self.a(x)) * self.gain + nn.functional.linear(x, self.b.weight, self.b.bias)


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = _Mixer()
        self.head = nn.Linear(3, C)

    def forward(self, x):
        return self.head(self.mix(x).mean(1))


MODELS = {
    "lstm_batch_first": lambda: _Recurrent(nn.LSTM, True),
    "lstm_sequence_first": lambda: _Recurrent(nn.LSTM, False),
    "gru_two_layers": lambda: _Recurrent(nn.GRU, False, num_layers=2),
    "rnn": lambda: _Recurrent(nn.RNN, True),
    "attention_batch_first": lambda: _Attention(True),
    "attention_sequence_first": lambda: _Attention(False),
    "encoder_batch_first": lambda: _Encoder(True),
    "encoder_sequence_first": lambda: _Encoder(False),
    "custom_folding": _Mixed,
}
# the layers the library reads: every parameterized module, a never-called one merged into its parent
FOLDED = {"attn.out_proj": "attn", "enc.self_attn.out_proj": "enc.self_attn", "mix.b": "mix"}


def _model(name):
    torch.manual_seed(0)
    return MODELS[name]().to(F64)


def _data(name, seed=1):
    g = torch.Generator().manual_seed(seed)
    width = 3 if name.split("_")[0] in ("lstm", "gru", "rnn", "custom") else 4
    return torch.randn(N, T, width, generator=g, dtype=F64), torch.randn(N, C, generator=g, dtype=F64)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _blocks(model):
    """Column indices of each layer: module_blocks (by owning module) with the folded modules merged."""
    merged = {}
    for owner, params in module_blocks(model):
        merged.setdefault(FOLDED.get(owner, owner), []).extend(i for p in params for i in p)
    return [torch.tensor(v) for v in merged.values()]


@pytest.mark.parametrize("name", list(MODELS))
def test_natural_gradients_and_ntk_match_explicit(name):
    model = _model(name)
    x, y = _data(name)
    j = jacobian(model, x)  # (N·C, P) over every trainable parameter
    r = (model(x) - y).detach().reshape(-1)
    eye = torch.eye(j.shape[1], dtype=F64)
    rho = 1e-2
    exact = j.T @ j / N + rho * eye
    assert (
        _rel(flat(nat.fisher.Exact(damping=rho).natural_gradient(model, x, y)), torch.linalg.solve(exact, j.T @ r / N))
        < TOL
    )
    blocks = torch.zeros_like(exact)
    for idx in _blocks(model):
        blocks[idx[:, None], idx[None, :]] = j[:, idx].T @ j[:, idx] / N
    want = torch.linalg.solve(blocks + rho * eye, j.T @ r / N)
    bound = nat.fisher.BlockDiagonal(damping=rho).at(model, x)
    assert len(bound.signals.layers) == len(_blocks(model))
    assert _rel(flat(bound.natural_gradient(y)), want) < TOL
    ntk = (j @ j.T).reshape(N, C, N, C).permute(0, 2, 1, 3)  # entry [n, m, k, l]
    assert _rel(nat.empirical_ntk(model, x), ntk) < TOL


@pytest.mark.parametrize("name", ["lstm_sequence_first", "attention_batch_first"])
def test_the_backward_loop_reads_the_same_layers(name):
    """loss.backward(); opt.step() (capture.py) moves the parameters by the explicit natural gradient."""
    model = _model(name)
    x, y = _data(name)
    j = jacobian(model, x)
    r = (model(x) - y).detach().reshape(-1)
    rho, lr = 1e-2, 0.5
    want = torch.linalg.solve(j.T @ j / N + rho * torch.eye(j.shape[1], dtype=F64), j.T @ r / N)
    start = flat([p.detach().clone() for p in model.parameters()])
    opt = nat.NGD(model, nat.fisher.Exact(damping=rho), lr=lr)
    (0.5 * ((model(x) - y) ** 2).sum(1).mean()).backward()
    opt.step()
    assert _rel(start - flat([p.detach() for p in model.parameters()]), lr * want) < TOL


class _Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, C)

    def forward(self, x):
        packed = nn.utils.rnn.pack_padded_sequence(x, [T] * x.shape[0], batch_first=True)
        _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


class _Unbatched(_Packed):
    def forward(self, x):
        out, _ = self.rnn(x.flatten(0, 1))  # one long sequence (N·T, 3): no batch axis
        return self.head(out[: x.shape[0]])


class _HeadMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, C)

    def forward(self, x):
        mask = torch.zeros(x.shape[0] * 2, T, T, dtype=torch.bool)
        return self.head(self.attn(x, x, x, attn_mask=mask)[0].mean(1))


class _SharedOutput(nn.Module):
    """A module returning, besides its per-sample output, a tensor of its weights alone (no sample axis)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, C)
        self.w = nn.Parameter(torch.ones(C))

    def forward(self, x):
        return self.fc(x.mean(1)), self.w * 2


class _UsesShared(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _SharedOutput()

    def forward(self, x):
        out, shared = self.block(x)
        return out + shared


class _UsedOutside(nn.Module):
    """``mix.b`` is never called; its weight is used in ``mix`` and again in the model's own forward."""

    def __init__(self):
        super().__init__()
        self.mix = _Mixer()
        self.head = nn.Linear(3, C)

    def forward(self, x):
        return self.head(self.mix(x).mean(1)) + self.mix.b.weight[:C, 0]


REFUSED = {
    "packed": (_Packed, r"model\.rnn \(LSTM.*PackedSequence.*pad_sequence"),
    "unbatched": (_Unbatched, r"model\.rnn \(LSTM.*input of shape \(12, 3\) without a batch axis"),
    "head_mask": (_HeadMask, r"model\.attn \(MultiheadAttention.*3-D attn_mask.*key_padding_mask"),
    "attention_dropout": (
        lambda: _Attention(True).apply(lambda m: setattr(m, "dropout", 0.1) if hasattr(m, "in_proj_weight") else None),
        r"model\.attn \(MultiheadAttention.*dropout \(p = 0\.1\) in training mode.*model\.eval\(\)",
    ),
    "recurrent_dropout": (
        lambda: _Recurrent(nn.LSTM, True, num_layers=2, dropout=0.2),
        r"model\.rnn \(LSTM.*dropout \(p = 0\.2\) in training mode.*model\.eval\(\)",
    ),
    "encoder_dropout": (
        lambda: nn.Sequential(nn.TransformerEncoderLayer(4, 2, 6, dropout=0.1, batch_first=True), nn.Flatten()),
        r"model\[0\]\.\w+ \((Dropout|MultiheadAttention).*model\.eval\(\)",
    ),
    "output_without_samples": (_UsesShared, r"model\.block \(_SharedOutput.*output tensor 1 of shape \(2,\).*no axis"),
    "used_outside": (_UsedOutside, r"model\.mix\.b \(Linear.*never called.*model\.mix \(_Mixer.*outside"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_uses_are_refused_naming_the_module(case):
    make, pattern = REFUSED[case]
    torch.manual_seed(0)
    model = make().to(F64)
    x = torch.randn(N, T, 3 if case in ("packed", "unbatched", "recurrent_dropout", "used_outside") else 4, dtype=F64)
    with pytest.raises(NotImplementedError, match=pattern):
        nat.fisher.Exact(damping=1e-2).natural_gradient(model, x, torch.zeros(N, C, dtype=F64))
    if "dropout" in case:  # refused before anything is computed; eval mode reads it
        with pytest.raises(NotImplementedError, match=pattern):
            models.check_model(model)
        models.check_model(model.eval())
