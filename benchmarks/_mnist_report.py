"""The MNIST training benchmark's report: tables, the exact-NGD summary, CSV, JSON and figures (for
``train_mnist.py``; ``--combine`` merges runs made separately)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from _harness import table

PROFILE_HEADER = ["model", "signals", "kernels Θ_l", "solve", "J^T v + update", "SGD step"]


def fmt_lr(lr: float | str) -> str:
    return lr if isinstance(lr, str) else f"{lr:g}"


def accuracy_at(rec: dict, step: int) -> float:
    return rec["test_acc"][rec["step"].index(step)] if step in rec["step"] else float("nan")


def results_table(runs: dict, ratios: dict, steps: int, per_epoch: int) -> tuple[list[str], list[list[str]]]:
    marks = sorted({per_epoch * e for e in range(1, steps // per_epoch + 1)} | {steps})
    header = ["model", "optimizer", *[f"test acc @{m}" for m in marks], "train s", "median step ms", "step / SGD step"]
    rows = []
    for (model_name, opt_name), rec in runs.items():
        ratio = ratios[model_name].get(opt_name, {"ratio": 1.0})["ratio"]
        step_ms = statistics.median(rec["step_seconds"]) * 1e3 if rec["step_seconds"] else float("nan")
        accs = [f"{100 * accuracy_at(rec, m):.1f}%" for m in marks]
        diverged = " (diverged)" if rec.get("diverged") else ""
        rows.append(
            [model_name, opt_name + diverged, *accs, f"{rec['seconds'][-1]:.1f}", f"{step_ms:.0f}", f"{ratio:.2f}"]
        )
    return header, rows


def exact_ngd_summary(runs: dict, ratios: dict, steps: int) -> list[str]:
    """Exact NGD on the CNN against the better of SGD and Adam, as measured in this run."""
    if ("CNN", "NGD exact") not in runs:
        return []
    ngd = accuracy_at(runs[("CNN", "NGD exact")], steps)
    best = max(accuracy_at(runs[("CNN", k)], steps) for k in ("SGD", "Adam"))
    ratio = ratios["CNN"]["NGD exact"]["ratio"]
    return [
        f"- test accuracy after {steps} steps: exact NGD {100 * ngd:.1f}%, best of SGD and Adam {100 * best:.1f}%",
        f"- one exact-NGD step costs {ratio:.2f} SGD steps",
    ]


def write_csv(path: Path, runs: dict) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "optimizer", "step", "epoch", "seconds", "test_acc", "test_loss"])
        for (model_name, opt_name), rec in runs.items():
            for i in range(len(rec["step"])):
                w.writerow([model_name, opt_name, rec["step"][i], f"{rec['epoch'][i]:.3f}", f"{rec['seconds'][i]:.4f}",
                            f"{rec['test_acc'][i]:.4f}", f"{rec['test_loss'][i]:.5f}"])  # fmt: skip


def plot(path: Path, runs: dict, models: list[str], dpi: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False)
    names = sorted({o for _, o in runs}, key=lambda o: (not o.startswith("NGD"), o))
    colors = {o: plt.cm.tab10(i) for i, o in enumerate(names)}
    for row, model_name in enumerate(models):
        for (m, opt_name), rec in runs.items():
            if m != model_name:
                continue
            acc = [100 * a for a in rec["test_acc"]]
            style = {"color": colors[opt_name], "label": opt_name, "marker": ".", "lw": 1.4}
            axes[row, 0].plot(rec["step"], acc, **style)
            axes[row, 1].plot(rec["seconds"], acc, **style)
        for col, xlabel in enumerate(("steps (batches of 100)", "optimizer wall time (s)")):
            ax = axes[row, col]
            ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title=f"{model_name}, MNIST 4000/1000")
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
        axes[row, 1].set_xscale("symlog", linthresh=1.0)
        axes[row, 1].set_xlim(left=0)
    axes[0, 1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def combine(dirs: list[Path]) -> dict:
    """Merge the results.json of several runs (e.g. one per model, run side by side)."""
    parts = [json.loads((d / "results.json").read_text()) for d in dirs]
    out = parts[0]
    for p in parts[1:]:
        for key in ("ratios", "profile_exact_ms", "runs"):
            out[key].update(p[key])
        out["sweep"] = out["sweep"] or p["sweep"]
        out["settings"]["notes"] += [n for n in p["settings"]["notes"] if n not in out["settings"]["notes"]]
    return out


def write_report(out: Path, payload: dict, *, batch: int, per_epoch: int, sweep_steps: int) -> None:
    """results.md (printed too), results.csv, results.json and the figures (``per_epoch`` batches of
    ``batch`` images an epoch; the sweep ran ``sweep_steps`` steps)."""
    st, ratios, profiles = payload["settings"], payload["ratios"], payload["profile_exact_ms"]
    runs = {tuple(k.split("|")): v for k, v in payload["runs"].items()}
    steps = st["steps"]
    lines = [f"# MNIST training benchmark ({'quick' if st['quick'] else 'full'} run)", "",
             f"4000 train / 1000 test images (400 / 100 per digit), pixels / 255 then standardized by the training "
             f"mean {st['mean']:.4f} and std {st['std']:.4f}; batches of {batch}, {steps} steps; float32 models; "
             f"torch threads = {st['threads']}. SGD lr {st['sgd'][0]:g} momentum {st['sgd'][1]:g}; Adam lr "
             f"{st['adam_lr']:g}. NGD (loss, lr, damping): "
             + "; ".join(f"{k}: {v[0]}, {fmt_lr(v[1])}, {v[2]:g}" for k, v in st["chosen"].items()) + ".",
             "", *st["notes"], ""]  # fmt: skip
    if payload["sweep"]:
        lines += [f"## Sweep (CNN; error and cross-entropy on the 4000 training images after {sweep_steps} steps)",
                  "", table(payload["sweep"], ["Fisher", "loss", "lr", "damping", "train error", "train CE"]),
                  ""]  # fmt: skip
    header, rows = results_table(runs, ratios, steps, per_epoch)
    prof_rows = [
        [m, *(f"{p[k]:.0f}" for k in p), f"{ratios[m]['NGD exact']['sgd_ms']:.0f}"] for m, p in profiles.items()
    ]
    lines += ["## Test accuracy and step cost", "", table(rows, header), "",
              "## Exact NGD on the CNN", "", *exact_ngd_summary(runs, ratios, steps), "",
              "## Where one exact-NGD step spends its time (median ms)", "",
              table(prof_rows, PROFILE_HEADER), ""]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    write_csv(out / "results.csv", runs)
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    models = list(dict.fromkeys(m for m, _ in runs))
    plot(out / "train_mnist.png", runs, models, dpi=110)
    plot(out / "train_mnist_small.png", runs, models, dpi=60)
    print(f"wrote {out}/results.md, results.csv, results.json, train_mnist.png")
