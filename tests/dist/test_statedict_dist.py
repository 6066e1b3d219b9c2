"""Distributed state dicts on real multi-process Gloo groups, PyTorch as the oracle
(statedict_oracle.py), plus failure modes. Each test launches its ranks itself."""
import os
import re
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
DSDRUN = os.environ["DSDRUN"]
PY = sys.executable


def env(**extra):
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("DSD_TIMEOUT_S", "60")
    e.update(extra)
    return e


def run(cmd, timeout, **extra):
    start = time.monotonic()
    p = subprocess.run(cmd, env=env(**extra), capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - start


@pytest.mark.parametrize("world", [2, 3, 4])
def test_state_dicts_match_pytorch(world):
    p, _ = run([DSDRUN, "-n", str(world), "--timeout", "800", "--grace", "5", PY,
                os.path.join(HERE, "statedict_oracle.py")], timeout=850)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    passed = re.findall(r"ok (\w+) \(world (\d+)\)", out)
    assert len(passed) == 12 and all(int(w) == world for _, w in passed), out[-3000:]


def test_under_torchrun():
    torchrun = os.path.join(os.path.dirname(PY), "torchrun")
    p, _ = run([torchrun, "--nproc-per-node", "2", "--master-port", "29611",
                os.path.join(HERE, "statedict_oracle.py"), "fsdp_get", "broadcast_from_rank0", "strict"],
               timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    assert out.count("ok ") >= 3, out[-3000:]


def test_dead_peer_is_an_error_not_a_hang():
    p, elapsed = run([DSDRUN, "-n", "3", "--timeout", "200", "--grace", "60", PY,
                      os.path.join(HERE, "dead_peer.py")], timeout=240, DSD_TIMEOUT_S="20")
    out = p.stdout + p.stderr
    survivors = re.findall(r"SURVIVOR (\d) got (\w+)", out)
    assert sorted(r for r, _ in survivors) == ["0", "1"], out[-4000:]
    assert all(code in ("comm", "timeout") for _, code in survivors), survivors
    assert "rank 2" in out and "exited with status 3" in out, out[-2000:]
    assert elapsed < 150, f"survivors took {elapsed:.0f}s"
