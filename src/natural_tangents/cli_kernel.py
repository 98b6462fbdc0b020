"""``natural-tangents kernel``: the NTK of a dataset into a ``.npy`` file, tile by tile.

    natural-tangents kernel --out ntk.npy                                # analytic, MNIST subset, N = 5000
    natural-tangents kernel --digits 0 7 --samples 2000 --activation erf --out ntk.npy
    natural-tangents kernel --data mnist.npz --split train --samples 20000 --batch-size 1024 --out ntk.npy
    natural-tangents kernel --empirical --width 4096 --samples 1000 --out entk.npy
    torchrun --nproc-per-node 2 --no-python natural-tangents kernel --samples 5000 --out ntk.npy

Inputs are scaled to unit norm (the paper's Assumption 2). Under ``torchrun`` (``WORLD_SIZE`` > 1 in
the environment) a process group is initialized (:func:`~natural_tangents.distributed.launched_group`:
NCCL with GPUs, gloo otherwise), the ranks share the tiles and write them into the one file. An
existing ``--out`` file is refused unless ``--force`` is given; an interrupted run (killed, Ctrl-C) is
resumed by running the same command again. The command logic lives here; ``cli.py`` registers it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from contextlib import contextmanager

import torch

from .distributed import launched_group

__all__ = ["add_parser", "run"]

_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, OSError, RuntimeError)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``kernel`` sub-command on an ``add_subparsers()`` object; returns its parser."""
    from .activations import NAMES

    k = subparsers.add_parser(
        "kernel",
        help="the analytic (or empirical) NTK of a dataset into a .npy file, tile by tile",
        description="Compute the NTK Θ(x, x) (J J^T, no 1/N) of a dataset into a .npy file.",
    )
    k.add_argument(
        "--out",
        required=True,
        help="the .npy file to write (N × N); an existing file is refused unless --force is given. The file "
        "appears when complete; an interrupted run is resumed by the same command",
    )
    k.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out file, and discard an interrupted run into it that had other arguments",
    )
    k.add_argument(
        "--data",
        default="mnist-subset",
        help="'mnist-subset' (default: the 5,000 packaged MNIST digits), an .npz file or a folder of IDX files",
    )
    k.add_argument("--split", default="train", choices=["train", "test"], help="split of --data files (default train)")
    k.add_argument("--digits", type=int, nargs="*", default=None, help="keep only these digits (default: all)")
    k.add_argument("--samples", type=int, default=None, help="use the first N images (after --digits; default: all)")
    k.add_argument("--depth", type=int, default=3, help="L, the number of weight layers (default 3)")
    k.add_argument("--activation", default="relu", choices=list(NAMES), help="activation (default relu)")
    k.add_argument("--sigma-w2", type=float, default=2.0, help="σ_w² (default 2)")
    k.add_argument("--sigma-b2", type=float, default=0.0, help="σ_b² (default 0: no bias)")
    k.add_argument("--batch-size", type=int, default=None, help="tile side (default 512)")
    k.add_argument("--dtype", default="float64", choices=["float32", "float64"], help="stored dtype (default float64)")
    k.add_argument("--empirical", action="store_true", help="the empirical NTK of a fresh nat.MLP instead")
    k.add_argument("--width", type=int, default=None, help="hidden width M of the --empirical network")
    k.add_argument("--seed", type=int, default=0, help="seed of the --empirical network (default 0)")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")
    return k


def _fail(message: str) -> int:
    print(f"natural-tangents kernel: {message}", file=sys.stderr)
    return 2


@contextmanager
def _notes():
    """The library's warnings (a stale lock taken over) as one-line notes on stderr."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"natural-tangents kernel: note: {_for_the_command(str(message))}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = show
        yield


def _for_the_command(message: str) -> str:
    """A library message in the command's words (``out`` is ``--out``, ``overwrite=True`` is ``--force``)."""
    message = message.replace("pass overwrite=True", "pass --force")
    return "--out:" + message[len("out:") :] if message.startswith("out:") else message


def _inputs(args) -> torch.Tensor:
    from . import data

    if args.data == "mnist-subset":
        images, labels = data.load_mnist_subset(dtype=torch.float64)
    else:
        images, labels = data.load_mnist(args.data, args.split, dtype=torch.float64)
    if args.digits:
        bad = [d for d in args.digits if not 0 <= d <= 9]
        if bad:
            raise ValueError(f"--digits: {bad[0]} is not a digit 0–9")
        images = images[torch.isin(labels, torch.tensor(args.digits))]
    if args.samples is not None:
        if args.samples < 1 or args.samples > len(images):
            raise ValueError(f"--samples: expected 1 … {len(images)} (the images available), got {args.samples}")
        images = images[: args.samples]
    return data.normalize(images)


def _empirical(args, x, common):
    from . import MLP, empirical_ntk

    if args.width is None or args.width < 1:
        raise ValueError("--width: the --empirical network needs a positive hidden width M, e.g. --width 4096")
    widths = [x.shape[1], *([args.width] * (args.depth - 1)), 1]
    net = MLP(widths, args.activation, args.sigma_w2, args.sigma_b2, seed=args.seed, dtype=torch.float64)
    return empirical_ntk(net, x, **common)


def run(args) -> int:
    """Run the ``kernel`` command for parsed ``args``; returns the exit status (0, or 2 on a user error)."""
    from . import theory

    if not str(args.out).endswith(".npy"):
        return _fail(f"--out: expected a path ending in .npy, got {args.out!r}")
    if args.batch_size is not None and args.batch_size < 1:
        return _fail(f"--batch-size: expected a positive tile side, got {args.batch_size}")
    if os.path.lexists(args.out) and not args.force:
        return _fail(f"--out: {args.out} exists; pass --force to replace it, or choose another path")
    try:
        x = _inputs(args)
        with launched_group() as group:
            common = {
                "batch_size": args.batch_size,
                "out": args.out,
                "overwrite": args.force,
                "process_group": group,
                "progress": False if args.no_progress else None,
            }
            start = time.perf_counter()
            with _notes():
                if args.empirical:
                    k = _empirical(args, x, common)
                    what = f"empirical NTK of an MLP of width {args.width}"
                else:
                    arch = theory.Architecture(args.depth, args.activation, args.sigma_w2, args.sigma_b2)
                    k = theory.ntk(x, arch=arch, dtype=getattr(torch, args.dtype), **common)
                    what = "analytic NTK"
            seconds = time.perf_counter() - start
    except _USER_ERRORS as err:
        return _fail(_for_the_command(str(err)))
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(
            f"wrote {args.out}: {tuple(k.shape)} {str(k.dtype).removeprefix('torch.')} {what} "
            f"(L = {args.depth}, {args.activation}, σ_w² = {args.sigma_w2:g}, σ_b² = {args.sigma_b2:g}), "
            f"{seconds:.1f} s"
        )
    return 0
