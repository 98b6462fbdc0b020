"""The time-to-accuracy benchmark's summaries, tables, CSV, JSON and figures (for ``time_to_accuracy.py``).

Per task: the target test accuracy (a fixed one, or a fraction of the best median final accuracy of
the task's optimizers), and per optimizer the median over seeds of the seconds and steps to the
first evaluation at or above the target (``inf`` when the seed never got there; the median is
``inf``, "not reached", when more than half the seeds did not), the test accuracy at a quarter, half
and all of the budget (the last evaluation at or before that training time), the final accuracy and
the mean step time.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

from _harness import table

FRACTIONS = (0.25, 0.5, 1.0)


def first_reach(rec: dict, target: float) -> tuple[float, float]:
    """(seconds, steps) of the first evaluation with accuracy ≥ target, or (inf, inf)."""
    for step, sec, acc in zip(rec["step"], rec["seconds"], rec["acc"]):
        if acc >= target:
            return sec, float(step)
    return math.inf, math.inf


def acc_at(rec: dict, seconds: float) -> float:
    """Test accuracy of the last evaluation at or before ``seconds`` of training."""
    out = rec["acc"][0]
    for sec, acc in zip(rec["seconds"], rec["acc"]):
        if sec <= seconds + 1e-9:
            out = acc
    return out


def summarize(entry: dict, fixed_target: float | None, fraction: float) -> None:
    """Add "target", "target_rule" to the task's ``entry`` and a "summary" to each optimizer's."""
    opts = entry["optimizers"]
    finals = {k: statistics.median(r["acc"][-1] for r in o["runs"]) for k, o in opts.items()}
    if fixed_target is not None:
        target, rule = fixed_target, "fixed (--target)"
    else:
        best = max(finals.values(), default=float("nan"))
        target, rule = fraction * best, f"{fraction:g} × the best median final test accuracy ({100 * best:.1f}%)"
    entry["target"], entry["target_rule"] = target, rule
    budget = entry["budget_s"]
    for key, o in opts.items():
        reach = [first_reach(r, target) for r in o["runs"]]
        steps = [r["step"][-1] for r in o["runs"]]
        secs = [r["seconds"][-1] for r in o["runs"]]
        o["summary"] = {
            "seconds_to_target": statistics.median(s for s, _ in reach),
            "steps_to_target": statistics.median(n for _, n in reach),
            "reached": sum(math.isfinite(s) for s, _ in reach),
            "seeds": len(o["runs"]),
            "acc_at": {f"{f:g}": statistics.median(acc_at(r, f * budget) for r in o["runs"]) for f in FRACTIONS},
            "final_acc": finals[key],
            "steps": statistics.median(steps),
            "step_ms": statistics.median(1e3 * s / max(n, 1) for s, n in zip(secs, steps)),
            "diverged": sum(bool(r["diverged"]) for r in o["runs"]),
        }


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------


def _fmt_settings(s: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in s.items())


def _fmt_time(v: float) -> str:
    return "not reached" if not math.isfinite(v) else f"{v:.2f}"


def task_table(entry: dict) -> str:
    budget = entry["budget_s"]
    header = ["optimizer", "tuned setting", "val acc", "s to target", "steps to target", "reached",
              *[f"acc @{f * budget:g} s" for f in FRACTIONS], "steps", "step ms", "diverged"]  # fmt: skip
    order = sorted(entry["optimizers"].items(), key=lambda kv: (kv[1]["summary"]["seconds_to_target"], kv[0]))
    rows = []
    for _, o in order:
        s = o["summary"]
        steps = "—" if not math.isfinite(s["steps_to_target"]) else f"{s['steps_to_target']:.0f}"
        rows.append([
            o["name"], _fmt_settings(o["settings"]), f"{100 * o['val_acc']:.1f}%", _fmt_time(s["seconds_to_target"]),
            steps, f"{s['reached']}/{s['seeds']}", *[f"{100 * s['acc_at'][f'{f:g}']:.1f}%" for f in FRACTIONS],
            f"{s['steps']:.0f}", f"{s['step_ms']:.1f}", str(s["diverged"]),
        ])  # fmt: skip
    return table(rows, header)


def headline(entry: dict) -> str:
    """The best NGD configuration against the better of tuned SGD and Adam, in seconds to target."""
    opts = entry["optimizers"]
    t = lambda fam: min(  # noqa: E731
        ((o["summary"]["seconds_to_target"], o["name"]) for o in opts.values() if o["family"] == fam),
        default=(math.inf, "none"),
    )
    ngd, base = t("ngd"), t("baseline")
    if "none" in (ngd[1], base[1]):
        return "(no comparison: this run has no NGD optimizer or neither SGD nor Adam)"
    if not (math.isfinite(ngd[0]) and math.isfinite(base[0])):
        fmt = lambda v: "none reached the target" if not math.isfinite(v[0]) else f"{v[1]}, {v[0]:.2f} s"  # noqa: E731
        return f"best NGD: {fmt(ngd)}; best of SGD/Adam: {fmt(base)}"
    return (f"best NGD: {ngd[1]}, {ngd[0]:.2f} s; best of SGD/Adam: {base[1]}, {base[0]:.2f} s; "
            f"ratio NGD / baseline = {ngd[0] / base[0]:.2f}")  # fmt: skip


def cost_table(cost: dict) -> str:
    header = ["optimizer", "step ms (median)", "step / SGD step (median over rounds)", "quartiles"]
    rows = []
    for name, r in cost.get("rows", {}).items():
        if "error" in r:
            rows.append([name, "failed", r["error"][:80], ""])
        else:
            rows.append([name, f"{r['step_ms']:.2f}", f"{r['ratio']:.2f}", f"{r['q1']:.2f}–{r['q3']:.2f}"])
    return table(rows, header) if rows else "(not measured)"


def markdown(results: dict) -> str:
    st = results["settings"]
    lines = ["# Time to accuracy", "",
             f"torch {st['torch']}, device {st['device']}, torch threads {st['threads']}; "
             f"{st['seeds']} seeds per optimizer; "
             f"budgets × {st['budget_scale']:g}; tuning runs {st['tune_fraction']:g} of the budget on the validation "
             f"split; quick: {st['quick']}; wall time {st['wall_s'] / 60:.1f} min.", ""]  # fmt: skip
    for name, entry in results["tasks"].items():
        lines += [f"## {name}: {entry['description']}", "",
                  f"Data {entry['data']}; batch {entry['batch']}; budget {entry['budget_s']:g} s of training. "
                  f"Target test accuracy {100 * entry['target']:.1f}%: {entry['target_rule']}."
                  + (f" ({entry['reference']})" if entry["reference"] else ""), "",
                  task_table(entry), "", headline(entry), "", f"![{name}](tta_{name}.png)", ""]  # fmt: skip
    cost = results.get("step_cost", {})
    k = cost.get("k", 0)
    lines += ["## Step cost (LeNet-style CNN, batch 100, paired with SGD in one process)", ""]
    if cost.get("rows"):
        lines += [f"{cost['rounds']} rounds of {k} SGD steps then {k} steps of the optimizer, after "
                  f"{cost['warmup']} warm-up steps each.", "", cost_table(cost), ""]  # fmt: skip
    else:
        lines += ["(not measured: --cost-rounds 0)", ""]
    if results["skipped"]:
        lines += ["## Left out", "", *[f"- {m}" for m in results["skipped"]], ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------


def write_csv(path: Path, results: dict) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "optimizer", "key", "seed", "settings", "target", "seconds_to_target", "steps_to_target",
                    "final_acc", "steps", "train_seconds", "diverged"])  # fmt: skip
        for task, entry in results["tasks"].items():
            for key, o in entry["optimizers"].items():
                for seed, r in enumerate(o["runs"], start=1):
                    s, n = first_reach(r, entry["target"])
                    w.writerow([task, o["name"], key, seed, json.dumps(o["settings"]), f"{entry['target']:.4f}",
                                f"{s:.4f}", f"{n:.0f}", f"{r['acc'][-1]:.4f}", r["step"][-1],
                                f"{r['seconds'][-1]:.4f}", int(r["diverged"])])  # fmt: skip


def _median_curve(runs: list[dict], axis: str, grid: list[float]) -> list[float]:
    """The median over runs of the accuracy of the last evaluation at or before each grid point."""
    out = []
    for g in grid:
        vals = []
        for r in runs:
            acc = r["acc"][0]
            for v, a in zip(r[axis], r["acc"]):
                if v <= g + 1e-9:
                    acc = a
            vals.append(acc)
        out.append(statistics.median(vals))
    return out


def plot_task(path: Path, name: str, entry: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(13, 5))
    cmap = plt.get_cmap("tab20")
    style = {"baseline": "-", "ngd": "--", "peer": ":"}
    for i, (_, o) in enumerate(entry["optimizers"].items()):
        runs = o["runs"]  # each curve ends where its shortest seed ended (in seconds, in steps)
        end = min(r["seconds"][-1] for r in runs)
        t_grid = [end * j / 200 for j in range(201)]
        last = min(r["step"][-1] for r in runs)
        s_grid = sorted({1, *[round(last ** (j / 100)) for j in range(101)]})
        kw = {"color": cmap(i % 20), "linestyle": style.get(o["family"], "-"), "label": o["name"],
              "linewidth": 2 if o["family"] == "baseline" else 1.4}  # fmt: skip
        ax_t.plot(t_grid, [100 * a for a in _median_curve(runs, "seconds", t_grid)], **kw)
        ax_s.plot(s_grid, [100 * a for a in _median_curve(runs, "step", s_grid)], **kw)
    for ax in (ax_t, ax_s):
        ax.axhline(100 * entry["target"], color="black", linewidth=0.8, alpha=0.6)
        ax.set_ylabel("test accuracy (%), median over seeds")
        ax.grid(alpha=0.3)
    ax_t.set_xlabel("training time (s; evaluation excluded)")
    ax_s.set_xlabel("steps")
    ax_s.set_xscale("log")
    ax_t.set_title(f"{name}: accuracy against wall-clock time")
    ax_s.set_title(f"{name}: accuracy against steps")
    ax_s.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(obj):
    """``obj`` with every infinite or NaN float replaced by None (strict JSON: "not reached" is null)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_report(out: Path, results: dict) -> str:
    """Write results.md, results.json, results.csv and one figure per task; return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(_finite(results), indent=1, default=str))
    write_csv(out / "results.csv", results)
    for name, entry in results["tasks"].items():
        if entry["optimizers"]:
            plot_task(out / f"tta_{name}.png", name, entry)
    return text
