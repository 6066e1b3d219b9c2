"""Allocation failure is an error (issue 16): the CLI and a Python load run under an address
space limit (RLIMIT_AS, as `ulimit -v`) a little above what they need to start; the failing
allocation must come back as the out-of-memory exit code (9) / DSD_E_OUT_OF_MEMORY naming the
input, never as SIGABRT (std::bad_alloc escaping, std::terminate)."""
from __future__ import annotations

import os
import re
import resource
import struct
import subprocess
import sys

import pytest
import torch

import dsd
from adv_util import CLI, EXIT_OOM, run_measured

HEADROOM = 48 << 20


def limit_as(nbytes):
    def pre():
        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))
    return pre


def cli_baseline_vm(path) -> int:
    # The address space `dsd inspect` needs for a small file: run it, read VmPeak at exit
    # through a wrapper that waits on /proc before reaping (approximated with a loop of
    # smaller limits instead: the smallest limit at which the CLI still starts and succeeds).
    lo, hi = 64 << 20, 16 << 30
    while hi - lo > (16 << 20):
        mid = (lo + hi) // 2
        rc = subprocess.run([CLI, "inspect", "-q", str(path)], preexec_fn=limit_as(mid),
                            capture_output=True).returncode
        if rc == 0:
            hi = mid
        else:
            lo = mid
    return hi


def test_cli_under_ulimit(tmp_path):
    small = tmp_path / "small.safetensors"
    hdr = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    small.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 8)
    need = cli_baseline_vm(small)
    # A valid file whose header alone needs more memory than the limit leaves.
    big = tmp_path / "big.safetensors"
    pad = 80 << 20  # under the 100 MB header limit, above the headroom
    hdr = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}' + b" " * pad + b"}"
    big.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 8)
    rc, out, err, dt, _ = run_measured([CLI, "inspect", "-q", str(big)], preexec=limit_as(need + HEADROOM))
    print(f"[oom] dsd inspect under RLIMIT_AS={(need + HEADROOM) >> 20} MiB "
          f"(starts in {need >> 20} MiB): exit {rc}: {err.strip()[:200]}")
    assert rc >= 0, f"killed by signal {-rc}: {err[-2000:]}"
    assert rc == EXIT_OOM, err
    assert "big.safetensors" in err, err


LOAD = r"""
import resource, sys, dsd, torch
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    dsd.load_full(sys.argv[1])
except dsd.Error as e:
    print("ERROR", e.code_name, str(e)[:300]); sys.exit(0)
except MemoryError as e:
    print("MemoryError", e); sys.exit(0)
print("LOADED"); sys.exit(0)
"""

VM = r"""
import sys, dsd, torch
for l in open("/proc/self/status"):
    if l.startswith("VmSize"): print(int(l.split()[1]) * 1024)
"""


def test_python_load_under_ulimit(tmp_path):
    path = tmp_path / "ck"
    dsd.save({"big": torch.zeros(64 << 20, dtype=torch.uint8), "small": torch.ones(4)}, str(path))
    env = dict(os.environ)
    vm = int(subprocess.run([sys.executable, "-c", VM], capture_output=True, text=True, env=env,
                            check=True).stdout.split()[-1])
    limit = vm + (32 << 20)
    p = subprocess.run([sys.executable, "-c", LOAD, str(path), str(limit)], capture_output=True, text=True,
                       env=env, timeout=120)
    print(f"[oom] python load of a 64 MiB tensor under RLIMIT_AS={limit >> 20} MiB: "
          f"status {p.returncode}: {p.stdout.strip()[:300]}")
    assert p.returncode == 0, f"died with {p.returncode}:\n{p.stderr[-3000:]}"
    assert p.stdout.startswith("ERROR out_of_memory") or p.stdout.startswith("MemoryError"), p.stdout
