"""mp.spawn for the interop tests' process groups, with a clean exit.

A process that used a Gloo process group sometimes aborts during interpreter shutdown
("terminate called without an active exception", SIGABRT) after its work is done and its
group destroyed: 3 of 25 runs of a plain `dcp.load` worker at world 3 with PyTorch 2.13 alone,
no dsd involved. Workers that returned normally therefore leave with os._exit(0) once their
output is flushed; a worker that raised still goes through mp.spawn's error reporting.
"""
from __future__ import annotations

import os
import sys

import torch.multiprocessing as mp


def _run_then_exit(rank, fn, *args):
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, nprocs: int, *args) -> None:
    """mp.spawn(fn, args=args, nprocs=nprocs, join=True), each rank calling fn(rank, *args)."""
    mp.spawn(_run_then_exit, args=(fn, *args), nprocs=nprocs, join=True)
