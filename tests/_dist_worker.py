"""One rank of a multi-process test (run as a script by tests/test_distributed.py; gloo on 127.0.0.1).

usage: python _dist_worker.py CASE RANK WORLD PORT OUT [KERNEL_FILE]
Writes what the rank computed (or the error it raised) to OUT with torch.save.
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import natural_tangents as nat

FISHERS = {
    "exact": lambda: nat.fisher.Exact(damping=1e-3),
    "exact_rho0": lambda: nat.fisher.Exact(),
    "block_diagonal": lambda: nat.fisher.BlockDiagonal(damping=1e-3),
    "block_tridiagonal": lambda: nat.fisher.BlockTriDiagonal(damping=1e-3),
    "kfac": lambda: nat.fisher.KFAC(damping=1e-3),
    "unitwise": lambda: nat.fisher.Unitwise(damping=1e-3),
    "exact_ce": lambda: nat.fisher.Exact(damping=1e-2, loss="cross_entropy"),
}
SPLITS = {2: [4, 7], 3: [2, 5, 4]}  # uneven shards of N = 11
TEST_SPLITS = {2: [5, 2], 3: [1, 4, 2]}  # uneven shards of N′ = 7 test samples


def problem():
    """The whole batch and the model every rank (and the single-process reference) uses."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(11, 6, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    y = torch.randn(11, 2, generator=g, dtype=torch.float64)
    labels = torch.arange(11) % 2
    net = nat.MLP([6, 16, 16, 2], activation="tanh", sigma_b2=0.3, seed=1, dtype=torch.float64)
    return net, x, y, labels


def results(net, x, y, labels, group):
    out = {}
    for name, make in FISHERS.items():
        fisher = make()
        bound = fisher.at(net, x, process_group=group)
        targets = labels if name.endswith("_ce") else y
        out[name] = {
            "ng": [t.detach().clone() for t in bound.natural_gradient(targets)],
            "coef": bound.coefficient(),
            "alpha": bound.alpha_hat(),
        }
    gd_net = problem()[0]  # a fresh replica: two GD steps at η = 1/λ_max, then one at η = 0.3 with cross-entropy
    start = [p.detach().clone() for p in gd_net.parameters()]
    gd = nat.GD(gd_net, lr="optimal", process_group=group)
    gd.step(x, y)
    gd.step(x, y)
    nat.GD(gd_net, lr=0.3, loss="cross_entropy", process_group=group).step(x, labels)
    out["gd_delta"] = [p.detach() - p0 for p, p0 in zip(gd_net.parameters(), start)]
    opt = nat.NGD(net, nat.fisher.BlockDiagonal(damping=1e-3), lr="optimal", process_group=group)
    opt.step(x, y)
    out["after_step"] = [p.detach().clone() for p in net.parameters()]
    return out


def test_batch():
    """The test inputs, MSE targets and class labels of :func:`trained` (N′ = 7)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(7, 6, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    return x, torch.randn(7, 2, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0, 0])


def trained(x, y, labels, x_test, y_test, labels_test, group):
    """nat.train on fresh replicas: NGD (block-diagonal Fisher, lr="optimal", MSE) and GD
    (lr="optimal", cross-entropy), three steps each with a test set; their Histories."""
    ngd = nat.train(
        problem()[0],
        x,
        y,
        nat.fisher.BlockDiagonal(damping=1e-3),
        steps=3,
        x_test=x_test,
        y_test=y_test,
        process_group=group,
    )
    gd = nat.train(
        problem()[0], x, labels, "gd", steps=3, x_test=x_test, y_test=labels_test, loss="cross_entropy",
        process_group=group,
    )  # fmt: skip
    return {"ngd": ngd, "gd": gd}


def shard(t, rank, world, splits=SPLITS):
    sizes = splits[world]
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def main() -> None:
    case, rank, world, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    group = dist.group.WORLD
    net, x, y, labels = problem()
    xs, ys, ls = shard(x, rank, world), shard(y, rank, world), shard(labels, rank, world)
    try:
        if case == "fishers":  # the Fishers, the optimizers and nat.train on this rank's shards
            tests = [shard(t, rank, world, TEST_SPLITS) for t in test_batch()]
            result = {**results(net, xs, ys, ls, group), "train": trained(xs, ys, ls, *tests, group)}
        elif case == "empirical_kernel":  # every rank holds all inputs; the tiles are shared
            out_file = sys.argv[6]
            result = {
                "memory": nat.empirical_ntk(net, x, batch_size=3, process_group=group),
                "file": nat.empirical_ntk(net, x, batch_size=4, process_group=group, out=out_file).clone(),
            }
        elif case == "mismatched_parameters":
            if rank == world - 1:
                with torch.no_grad():
                    net.W1[0, 0] += 1e-6
            result = nat.fisher.Exact().natural_gradient(net, xs, ys, process_group=group)
        elif case == "mismatched_width":
            if rank == 1:
                xs = torch.randn(len(xs), 5, dtype=torch.float64)
            result = nat.fisher.Exact().natural_gradient(net, xs, ys, process_group=group)
        elif case == "mismatched_outputs":
            if rank == 1:
                net = nat.MLP([6, 16, 16, 3], activation="tanh", sigma_b2=0.3, seed=1, dtype=torch.float64)
            result = nat.fisher.Exact().natural_gradient(net, xs, ys, process_group=group)
        else:
            raise SystemExit(f"unknown case {case}")
        torch.save({"ok": result}, out)
    except (ValueError, RuntimeError, TypeError, NotImplementedError) as err:
        torch.save({"error": f"{type(err).__name__}: {err}"}, out)
    # leave together and without tearing gloo down: a rank that exits while another still talks to
    # the store it hosts can abort in gloo's threads ("terminate called without an active exception")
    try:
        dist.barrier()
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
