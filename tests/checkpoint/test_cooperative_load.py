"""Cooperative load (core/checkpoint/cooperative_load.h): tests/checkpoint/coop_ranks.cpp
scenarios launched with dsdrun.

A fully replicated state saved at world 4 (and one in PyTorch DCP's format at world 3) loads
at world 4 and 3 bitwise equal to a non-cooperative load, with the bytes read from storage over all ranks 1 x the data bytes
(world x without); a corrupt shared chunk read by one rank fails every rank with that rank's
error naming file and key; a mixed state (sharded and replicated tensors, each loaded into
another layout) reshards 2 -> 3 and 3 -> 2 with only the tensors every rank loads whole read
once. Each scenario checks its own results on every rank and prints "rank R: SCENARIO ok".
"""
from __future__ import annotations

import os
import subprocess
import sys

DSDRUN = os.environ["DSDRUN"]
RANKS = os.environ["COOP_RANKS"]


def run(n: int, *args, timeout: float = 150) -> str:
    """Runs `coop_ranks args...` on n ranks and checks every rank said ok."""
    cmd = [DSDRUN, "-n", str(n), "--timeout", str(int(timeout) - 10), "--grace", "10", RANKS, *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    sys.stdout.write(p.stdout)
    sys.stderr.write(p.stderr)
    assert p.returncode == 0, p.stderr[-4000:]
    for r in range(n):
        assert f"[rank {r}] rank {r}: {args[0]} ok" in p.stdout, p.stdout[-4000:]
    return p.stdout


def test_replicated_state_is_read_once_at_world4_and_3(tmp_path):
    path = tmp_path / "ck"
    run(4, "save", path, "replicated")
    out = run(4, "load", path, "replicated")
    assert "ratio 4.000 vs 1.000" in out, out
    out = run(3, "load", path, "replicated")
    assert "ratio 3.000 vs 1.000" in out, out


def test_replicated_dcp_checkpoint_is_read_once_at_world3(tmp_path):
    path = tmp_path / "dcp"
    run(3, "save", path, "replicated", "dcp")
    assert os.path.exists(path / ".metadata")
    out = run(3, "load", path, "replicated")
    assert "ratio 3.000 vs 1.000" in out, out


def test_corrupt_shared_chunk_fails_every_rank_with_its_readers_error(tmp_path):
    path = tmp_path / "ck"
    run(3, "save", path, "replicated")
    run(3, "corrupt", path)


def test_mixed_state_reshards_2_to_3_and_3_to_2(tmp_path):
    for saved, loaded in ((2, 3), (3, 2)):
        path = tmp_path / f"ck{saved}"
        run(saved, "save", path, "mixed")
        run(loaded, "load", path, "mixed")
