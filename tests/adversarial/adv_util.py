"""Shared helpers of the adversarial suite: the seed, the CLI, checkpoints to attack and an
exact comparison of loaded state dicts."""
from __future__ import annotations

import os
import random
import resource
import subprocess
import time

import torch

CLI = os.environ.get("DSD_CLI", "dsd")
SEED = int(os.environ.get("DSD_ADVERSARIAL_SEED", "16"))

# dsd's CLI exit codes (tools/dsd.cpp).
EXIT_NOT_FOUND, EXIT_CORRUPT, EXIT_IO, EXIT_EXISTS, EXIT_UNSUPPORTED, EXIT_INTERNAL, EXIT_OOM = 3, 4, 5, 6, 7, 8, 9


def rng(tag: str) -> random.Random:
    """A generator per test, seeded from SEED and the test's tag, printed for a rerun."""
    seed = f"{SEED}:{tag}"
    print(f"[seed] {tag}: DSD_ADVERSARIAL_SEED={SEED} ({seed!r})")
    return random.Random(seed)


def state(which: str, n: int = 4, numel: int = 4096) -> dict:
    """A state dict whose every byte depends on `which` (so two never look alike)."""
    base = sum(map(ord, which)) * 1000
    sd = {f"w{i}": torch.arange(numel, dtype=torch.float32) * 0.5 + base + i for i in range(n)}
    sd["nested"] = {"b": torch.arange(37, dtype=torch.int64) + base, "step": len(which) + base}
    sd["which"] = which
    return sd


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def same(a: dict, b: dict) -> bool:
    """Exactly equal: the same keys, dtypes, shapes and bytes, and equal values."""
    fa, fb = flat(a), flat(b)
    if fa.keys() != fb.keys():
        return False
    for k, x in fa.items():
        y = fb[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and
                    torch.equal(x.contiguous().reshape(-1).view(torch.uint8),
                                y.contiguous().reshape(-1).view(torch.uint8))):
                return False
        elif x != y:
            return False
    return True


def run_measured(cmd, timeout=30, preexec=None, env=None):
    """Runs `cmd`; (returncode, stdout, stderr, seconds, max RSS in MiB)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=preexec, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"{cmd} ran past {timeout}s: {err[-2000:]}")
    dt = time.monotonic() - t0
    # the child is reaped; its usage is in RUSAGE_CHILDREN only as a maximum over all
    # children, so use /proc-free accounting: the resource module's wait4 is not reachable
    # through Popen, hence the peak of all children so far (an upper bound).
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return p.returncode, out, err, dt, rss
