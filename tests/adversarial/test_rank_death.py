"""A rank dying mid-save (issue 16), at world 2 and 4: one rank is killed (SIGKILL, at a
DSD_CHECKPOINT_CRASH_AT crash point: core/checkpoint/crash_point.h) during the data write
and during the commit agreement of a save over a checkpoint. Every survivor returns
DSD_E_COMM within the communicator's timeout (DSD_TEST_TIMEOUT_MS, short here), none is
left for dsdrun to terminate, and the previous checkpoint is intact (loads bitwise, verifies)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

import dsd
from adv_util import same

DSDRUN = os.environ["DSDRUN"]
RANKS = os.environ["CKPT_RANKS"]
TIMEOUT_S = int(os.environ.get("DSD_TEST_TIMEOUT_MS", "4000")) / 1000

# (crash point, which rank dies): during the write, and during the commit agreement (a rank
# that wrote its files dies before agreeing; the coordinator dies with the results merged).
POINTS = [("save.mid_write", "last"), ("save.mid_write", 0), ("save.after_write", "last"),
          ("save.before_commit", 0)]


def job(world, path, which, crash_at=None):
    env = dict(os.environ)
    env.pop("DSD_CHECKPOINT_CRASH_AT", None)
    env.pop("CKPT_CONTROL_DIR", None)
    if crash_at:
        env["DSD_CHECKPOINT_CRASH_AT"] = crash_at
    cmd = [DSDRUN, "-n", str(world), "--grace", str(int(3 * TIMEOUT_S) + 5), "--timeout",
           str(int(6 * TIMEOUT_S) + 60), RANKS, "crash_save", str(path), which]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=int(8 * TIMEOUT_S) + 120)
    return p, time.monotonic() - t0


@pytest.mark.parametrize("world", [2, 4])
def test_rank_dies_mid_save(tmp_path, world):
    path = tmp_path / "ck"
    p, clean_s = job(world, path, "A")
    assert p.returncode == 0 and p.stdout.count("save ok") == world, p.stdout + p.stderr
    a = dsd.load_full(str(path))
    tally = []
    for point, who in POINTS:
        rank = world - 1 if who == "last" else who
        p, dt = job(world, path, "B", f"{point}@{rank}")
        out, err = p.stdout, p.stderr
        assert f"crash point {point} reached" in err, err[-2000:]
        assert "terminating ranks" not in err, f"a survivor hung until dsdrun ended it:\n{err[-3000:]}"
        failed = re.findall(r"rank (\d+): save failed: (\S+)", out)
        survivors = {r for r in range(world) if r != rank}
        codes = {int(r): c.rstrip(":") for r, c in failed}
        assert set(codes) == survivors, f"{point}@{rank}: survivors {sorted(survivors)}, failures {codes}\n{out}"
        assert all("comm" in c.lower() for c in codes.values()), codes
        assert dt < clean_s + 2 * TIMEOUT_S + 10, f"{dt:.1f}s: survivors did not fail within the timeout"
        got = dsd.load_full(str(path))
        assert same(got, a), "the previous checkpoint was damaged"
        dsd.verify(str(path))
        tally.append(f"{point}@{rank}: {len(survivors)} survivors -> {sorted(set(codes.values()))} in {dt:.1f}s")
    print(f"[rank-death] world {world} (comm timeout {TIMEOUT_S:.0f}s, a clean save {clean_s:.1f}s): "
          + "; ".join(tally) + "; previous checkpoint intact 4/4")
