"""Time-to-accuracy benchmark: wall-clock seconds (and steps) each optimizer needs to reach a target
test accuracy, natural-tangents NGD against tuned SGD and Adam and, when installed, the K-FAC and
preconditioner libraries users compare with.

Tasks (``_tta_tasks.py``): MNIST-1D with its authors' reference CNN and MLP (4,000 / 1,000 split),
the CNN on a larger generated MNIST-1D (40,000 / 10,000), a LeNet-style CNN on the MNIST subset
(4,000 / 1,000; full MNIST with ``--data-dir``), and, opt-in, a small ResNet with BatchNorm.
Optimizers (``_tta_optimizers.py``): SGD with momentum, Adam, natural-tangents NGD with K-FAC, the
exact, unit-wise and block-diagonal Fishers of each Fisher type, every step and with curvature kept
across mini-batches, and ASDL K-FAC, HeavyBall SOAP and Muon when importable.

Protocol (docs/time_to_accuracy.md):

1. Tuning, on a validation split (10% of the training set held out; never the test set): for
   every task and optimizer, one short run (``--tune-fraction`` of the task's budget, seed 0) per
   point of the optimizer's grid, trained on the other 90%; the setting with the best validation
   accuracy at the end is kept. Choices are cached in ``tuned.json`` (``--tuned``) and reused;
   ``--tune`` re-tunes.
2. Timed runs: each optimizer with its chosen setting, on the whole training set, for ``--seeds``
   seeds (1, 2, 3, … : the initial weights, the batch order and the Monte-Carlo labels), until the
   task's training-time budget (seconds of training steps: forward, loss, backward, step; the
   evaluations are not timed) or ``--max-steps``. Test accuracy is evaluated at steps 1, 2, 3, 5, 8,
   … and every 1/``--evals`` of the budget.
3. Report: the target of a task is ``--target-fraction`` (0.9) of the best median final test accuracy
   of its optimizers (or ``--target TASK=ACC``); per optimizer the median over seeds of the seconds
   and of the steps to the first evaluation at or above it (not reached: more than half the seeds
   never got there), the test accuracy at a quarter, half and all of the budget, the median step
   time; figures of test accuracy against seconds and against steps; and the step-cost table
   (``_tta_steps.py``).

Writes results.md, results.json, results.csv and tta_<task>.png under ``--out``.

    python benchmarks/time_to_accuracy.py [--tasks ...] [--optimizers ...] [--tune] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tta_optimizers import SPECS, OptSpec
from _tta_report import summarize, write_report
from _tta_steps import COST_ROWS, step_costs
from _tta_tasks import DEFAULT_TASKS, TASKS, Data, Task, missing_requirement

QUICK_OPTIMIZERS = ["sgd", "kfac-mc-10"]
QUICK_TASK = "lenet-mnist"
QUICK_COST_ROWS = ["SGD (momentum 0.9)", "K-FAC mc, curvature and inverse every 10"]
DEFAULT_OPTIMIZERS = list(SPECS)
# a rough allowance for what a run costs beyond its timed training (evaluations, set-up, first step)
OVERHEAD = 0.25


# ----------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------


def _evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 2000) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            correct += int((model(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum())
    model.train(was_training)
    return correct / x.shape[0]


def _early_steps(limit: int) -> set[int]:
    """Steps 1, 2, 3, 5, 8, 11, 17, … (×1.5): the evaluations that catch an optimizer's first steps."""
    out, s = set(), 1.0
    while s <= limit:
        out.add(round(s))
        s = max(s * 1.5, s + 1)
    return out


def make_sync(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def train_run(
    task: Task, data: Data, spec: OptSpec, settings: dict, seed: int, budget_s: float, max_steps: int,
    evals: int, device: torch.device, tuning: bool = False,
) -> dict:  # fmt: skip
    """One run: ``spec`` with ``settings`` from seed ``seed`` until ``budget_s`` seconds of training steps
    or ``max_steps`` steps. ``tuning``: train on the training set minus the validation split and
    evaluate on the validation split (at the end only, and every 1/``evals`` of the budget); else
    train on the whole training set and evaluate on the test set.

    Returns {"step", "seconds", "acc", "loss"} (lists, one entry per evaluation, the first at step 0),
    "diverged" (bool: a non-finite loss, an update NGD refused as non-finite, or a step that raised;
    the run stops there and its accuracy counts as 0) and "error" (the exception's message or None)."""
    sync = make_sync(device)
    x_tr, y_tr = (data.x_fit, data.y_fit) if tuning else (data.x_train, data.y_train)
    x_ev, y_ev = (data.x_val, data.y_val) if tuning else (data.x_test, data.y_test)
    torch.manual_seed(seed)
    model = task.model().to(device)
    rec = {"step": [0], "seconds": [0.0], "acc": [_evaluate(model, x_ev, y_ev)], "loss": [float("nan")],
           "diverged": False, "error": None}  # fmt: skip
    step = spec.build(model, settings, seed)  # an unsupported model raises here (the caller skips)
    order = torch.Generator().manual_seed(seed)
    n, batch = x_tr.shape[0], task.batch
    per_epoch = max(1, n // batch)
    early = set() if tuning else _early_steps(max_steps)
    every = budget_s / evals
    spent, last_eval, steps, perm = 0.0, 0.0, 0, None
    loss = torch.tensor(float("nan"))
    while spent < budget_s and steps < max_steps:
        if steps % per_epoch == 0:
            perm = torch.randperm(n, generator=order).to(device)
        idx = perm[(steps % per_epoch) * batch : (steps % per_epoch + 1) * batch]
        xb, yb = x_tr[idx], y_tr[idx]
        sync()
        t0 = time.perf_counter()
        try:
            loss = step(xb, yb)
            sync()
        except NotImplementedError:  # an unsupported model: the caller skips the optimizer on this task
            raise
        except Exception as err:  # FloatingPointError: NGD refused a non-finite update; else a failed step
            rec["diverged"], rec["error"] = True, f"{type(err).__name__}: {str(err)[:200]}"
            if not isinstance(err, FloatingPointError):
                print(f"  {task.name} / {spec.name} {settings}: step {steps + 1} failed, the run stops "
                      f"({rec['error']})", flush=True)  # fmt: skip
        spent += time.perf_counter() - t0
        steps += 1
        if not rec["diverged"] and not math.isfinite(float(loss)):
            rec["diverged"] = True
        done = rec["diverged"] or spent >= budget_s or steps >= max_steps
        if done or steps in early or spent - last_eval >= every:
            last_eval = spent
            rec["step"].append(steps)
            rec["seconds"].append(spent)
            rec["acc"].append(_evaluate(model, x_ev, y_ev) if not rec["diverged"] else 0.0)
            rec["loss"].append(float(loss) if not rec["diverged"] else float("nan"))
        if rec["diverged"]:
            break
    return rec


# ----------------------------------------------------------------------------------------------
# tuning
# ----------------------------------------------------------------------------------------------


def tune(task: Task, data: Data, spec: OptSpec, args: argparse.Namespace, device: torch.device) -> dict:
    """Every point of ``spec.grid``: one run of ``--tune-fraction`` of the budget on the training set
    minus the validation split, scored by its final validation accuracy (0 if it diverged)."""
    budget = args.tune_fraction * _budget(task, args)
    trials = []
    for settings in spec.grid[: args.grid_limit]:
        rec = train_run(task, data, spec, settings, 0, budget, args.max_steps, 4, device, tuning=True)
        score = 0.0 if rec["diverged"] else rec["acc"][-1]
        trials.append({"settings": settings, "val_acc": score, "steps": rec["step"][-1], "diverged": rec["diverged"]})
        print(f"  tune {task.name} / {spec.name} {settings}: validation {100 * score:.1f}% "
              f"after {rec['step'][-1]} steps{' (diverged)' if rec['diverged'] else ''}", flush=True)  # fmt: skip
    best = max(trials, key=lambda t: t["val_acc"])  # the first of equals: grids go from cautious to bold
    return {"settings": best["settings"], "val_acc": best["val_acc"], "trials": trials,
            "signature": tuning_signature(task, data, spec, args)}  # fmt: skip


def tuning_signature(task: Task, data: Data, spec: OptSpec, args: argparse.Namespace) -> dict:
    """What a tuned choice depends on: the task's batch and training-set size, the tuning budget and
    the grid (a cached choice made under other values is re-tuned)."""
    return {**task.signature(data), "tune_budget_s": args.tune_fraction * _budget(task, args),
            "max_steps": args.max_steps, "grid": spec.grid[: args.grid_limit]}  # fmt: skip


def load_tuned(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def _budget(task: Task, args: argparse.Namespace) -> float:
    return task.budget_s * args.budget_scale


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/time_to_accuracy"), help="output folder")
    ap.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        choices=list(TASKS),
        help=f"tasks to run (default: {' '.join(DEFAULT_TASKS)}; resnet-bn-mnist is opt-in)",
    )
    ap.add_argument(
        "--optimizers",
        nargs="+",
        default=None,
        choices=list(SPECS),
        metavar="KEY",
        help=f"optimizers to run (default: all importable): {', '.join(SPECS)}",
    )
    ap.add_argument("--seeds", type=int, default=3, help="timed runs per optimizer (seeds 1..S; default 3)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every task's time budget")
    ap.add_argument("--max-steps", type=int, default=20000, help="at most this many steps per run")
    ap.add_argument("--evals", type=int, default=100, help="test evaluations per budget (besides the first steps)")
    ap.add_argument("--tune", action="store_true", help="re-tune every optimizer (else reuse --tuned)")
    ap.add_argument("--tuned", type=Path, default=None, help="the cache of tuned settings (default: OUT/tuned.json)")
    ap.add_argument("--tune-fraction", type=float, default=0.2, help="a tuning run's share of the budget")
    ap.add_argument(
        "--target-fraction",
        type=float,
        default=0.9,
        help="target = this fraction of the best median final test accuracy of the task",
    )
    ap.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="TASK=ACC",
        help="a fixed target test accuracy (0-1) for a task instead",
    )
    ap.add_argument("--data-dir", type=Path, default=None, help="a full MNIST (IDX files or mnist.npz) for lenet-mnist")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where the generated MNIST-1D is cached (OUT/data)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--cost-rounds", type=int, default=15, help="rounds of the step-cost table (0: skip it)")
    ap.add_argument("--cost-k", type=int, default=10, help="steps per block in the step-cost table")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: lenet-mnist on 500 / 200 images, SGD and K-FAC mc every 10, a few steps",
    )
    ap.add_argument("--estimate", action="store_true", help="print the estimated total time and exit")
    args = ap.parse_args(argv)
    for item in args.target:
        name, _, value = item.partition("=")
        if name not in TASKS or not value:
            ap.error(f"--target: expected TASK=ACC with TASK one of {', '.join(TASKS)}, got {item!r}")
        try:
            acc = float(value)
        except ValueError:
            ap.error(f"--target: the accuracy must be a number in (0, 1], got {value!r}")
        if not 0 < acc <= 1:
            ap.error(f"--target: the accuracy must be in (0, 1], got {value!r}")
    if args.quick:
        args.tasks, args.optimizers = args.tasks or [QUICK_TASK], args.optimizers or QUICK_OPTIMIZERS
        args.seeds, args.max_steps, args.evals = min(args.seeds, 3), min(args.max_steps, 6), min(args.evals, 10)
        args.budget_scale, args.cost_rounds, args.cost_k = min(args.budget_scale, 0.1), min(args.cost_rounds, 1), 2
        args.grid_limit = 2
    else:
        args.grid_limit = None
    for name in ("seeds", "max_steps", "evals", "cost_k"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected a positive integer")
    if not 0 < args.tune_fraction <= 1 or not 0 < args.target_fraction <= 1 or not args.budget_scale > 0:
        ap.error("--tune-fraction and --target-fraction must be in (0, 1], --budget-scale positive")
    return args


def plan(args: argparse.Namespace) -> tuple[list[Task], list[OptSpec], list[str]]:
    """The tasks and optimizers that can run here, and a message for each left out."""
    skipped, tasks, specs = [], [], []
    for name in args.tasks or DEFAULT_TASKS:
        why = missing_requirement(TASKS[name])
        if why:
            skipped.append(why)
        else:
            tasks.append(TASKS[name])
    for key in args.optimizers or DEFAULT_OPTIMIZERS:
        spec = SPECS[key]
        if spec.available():
            specs.append(spec)
        else:
            skipped.append(f"{spec.name}: skipped, the {spec.needs} package is not installed")
    return tasks, specs, skipped


def estimate_seconds(args: argparse.Namespace, tasks: list[Task], specs: list[OptSpec], tuned: dict) -> dict:
    """An upper estimate of the run's wall time: the budgets plus OVERHEAD, tuning only where not cached."""
    tune_s = run_s = 0.0
    for task in tasks:
        budget = _budget(task, args)
        for spec in specs:
            if args.tune or spec.key not in tuned.get(task.name, {}):
                tune_s += len(spec.grid[: args.grid_limit]) * args.tune_fraction * budget * (1 + OVERHEAD)
            run_s += args.seeds * budget * (1 + OVERHEAD)
    data_s = 0.0
    cache = args.cache_dir or args.out / "data"
    for task in tasks:
        if task.generate_s and task.cache_file and not (cache / task.cache_file).exists():
            data_s += task.generate_s
    cost_s = 0.0
    if args.cost_rounds:  # ~2k steps per row and round; NGD rows ~5 SGD steps of ~5 ms on average
        cost_s = (2 if args.quick else len(COST_ROWS)) * args.cost_rounds * 2 * args.cost_k * 0.015 + 30
    return {"data": data_s, "tuning": tune_s, "timed runs": run_s, "step cost": cost_s,
            "total": data_s + tune_s + run_s + cost_s}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (``argv``: the command line's arguments) and return its results; torch's
    thread count is restored on return, so that it can run in-process."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    tuned_path = args.tuned or args.out / ("tuned_quick.json" if args.quick else "tuned.json")
    tuned = load_tuned(tuned_path)
    tasks, specs, skipped = plan(args)
    for msg in skipped:
        print(msg, flush=True)
    est = estimate_seconds(args, tasks, specs, tuned)
    print("estimated time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in est.items()), flush=True)
    if args.estimate:
        return {"estimate_s": est}
    targets = {name: float(acc) for name, _, acc in (t.partition("=") for t in args.target)}
    results: dict = {"tasks": {}, "skipped": skipped, "estimate_s": est}
    started = time.perf_counter()
    for task in tasks:
        data = load_task_data(task, args).to(device)
        budget = _budget(task, args)
        print(f"{task.name}: {task.description}; {data.sizes()}; budget {budget:g} s", flush=True)
        entry = {"description": task.description, "reference": task.reference, "budget_s": budget,
                 "data": data.sizes(), "batch": task.batch, "optimizers": {}}  # fmt: skip
        for spec in specs:
            try:
                choice = tuned.get(task.name, {}).get(spec.key)
                if args.tune or choice is None or choice.get("signature") != tuning_signature(task, data, spec, args):
                    choice = tune(task, data, spec, args, device)
                    tuned.setdefault(task.name, {})[spec.key] = choice
                    tuned_path.parent.mkdir(parents=True, exist_ok=True)
                    tuned_path.write_text(json.dumps(tuned, indent=1))
                runs = []
                for seed in range(1, args.seeds + 1):
                    runs.append(train_run(task, data, spec, choice["settings"], seed, budget, args.max_steps,
                                          args.evals, device))  # fmt: skip
            except NotImplementedError as err:  # the library refuses the model (e.g. BatchNorm in training mode)
                msg = f"{task.name} / {spec.name}: skipped, the model is not supported ({err})"
                print(msg, flush=True)
                skipped.append(msg)
                continue
            entry["optimizers"][spec.key] = {"name": spec.name, "family": spec.family, "settings": choice["settings"],
                                             "val_acc": choice["val_acc"], "runs": runs}  # fmt: skip
            finals = ", ".join(f"{100 * r['acc'][-1]:.1f}%" for r in runs)
            print(f"{task.name} / {spec.name} {choice['settings']}: final test accuracy {finals} "
                  f"after {[r['step'][-1] for r in runs]} steps", flush=True)  # fmt: skip
        summarize(entry, targets.get(task.name), args.target_fraction)
        results["tasks"][task.name] = entry
    if args.cost_rounds:
        print("step cost (LeNet-style CNN, batch 100, paired with SGD) ...", flush=True)
        rows = [r for r in COST_ROWS if r.name in QUICK_COST_ROWS] if args.quick else COST_ROWS
        cost = step_costs(args.cost_rounds, args.cost_k, 1 if args.quick else 10, device, make_sync(device), rows)
        skipped.extend(cost.pop("skipped"))
        results["step_cost"] = cost
    else:
        results["step_cost"] = {"rows": {}}
    results["settings"] = {
        "quick": args.quick, "seeds": args.seeds, "max_steps": args.max_steps, "evals": args.evals,
        "tune_fraction": args.tune_fraction, "target_fraction": args.target_fraction, "targets": targets,
        "budget_scale": args.budget_scale, "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": sys.executable, "tuned_file": str(tuned_path),
        "wall_s": time.perf_counter() - started,
    }  # fmt: skip
    print(write_report(args.out, results), flush=True)
    return results


def load_task_data(task: Task, args: argparse.Namespace) -> Data:
    cache = args.cache_dir or args.out / "data"
    if args.quick and task.name == QUICK_TASK:
        from _tta_tasks import mnist_data

        return mnist_data(500, 200, None)
    return task.load(args.data_dir, cache)


if __name__ == "__main__":
    main()
