"""Crash consistency: a writer rank killed with SIGKILL in the middle of a save over an
existing checkpoint never costs the existing checkpoint, and never leaves a partial one that
counts as complete.

Checkpoint A is saved at world 2 (dsdrun, tests/checkpoint/ckpt_ranks.cpp `crash_save`), then
20 times a save of B over the same directory (overwrite) is started and one rank is killed:
10 times at a named crash point of the engine (DSD_CHECKPOINT_CRASH_AT, core/checkpoint/
crash_point.h: before, during and after the data writes, before the manifest, between the
temporary manifest and its rename, after the commit, during the cleanup of A's files), 10
times after a random delay drawn over the measured duration of a save of B. After each:

- no rank hangs: the job ends by itself within the communicator's timeout (the survivor gets
  an error or, after the commit, finishes), never terminated by dsdrun;
- the directory loads (dsd.load_full) bitwise as A, or as B only when the commit happened
  (for the named points: exactly those after the rename); dsd.verify passes;
- a temporary manifest left behind does not count as a checkpoint: the directory stripped of
  checkpoint.json is no checkpoint for load_full nor for the CheckpointManager.

Finally an uninterrupted save of B commits and removes every orphan of the crashed saves.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import torch

import dsd

DSDRUN = os.environ["DSDRUN"]
RANKS = os.environ["CKPT_RANKS"]
COMM_TIMEOUT_S = int(os.environ.get("DSD_TEST_TIMEOUT_MS", "20000")) / 1000

# (point, rank, whether B is committed when the rank dies there)
NAMED = [
    ("save.before_write", 0, False),
    ("save.before_write", 1, False),
    ("save.mid_write", 0, False),
    ("save.mid_write", 1, False),
    ("save.after_write", 1, False),
    ("save.after_write", 0, False),
    ("save.before_commit", 0, False),
    ("atomic_write.before_rename", 0, False),
    ("save.after_commit", 0, True),
    ("save.after_cleanup_one", 0, True),
]
RANDOM_KILLS = 10


def start(path, which, control=None, crash_at=None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("DSD_CHECKPOINT_CRASH_AT", None)
    if control:
        env["CKPT_CONTROL_DIR"] = str(control)
    if crash_at:
        env["DSD_CHECKPOINT_CRASH_AT"] = crash_at
    # A long grace: a survivor must end on its own (an error from its communicator), not be
    # terminated by dsdrun.
    cmd = [DSDRUN, "-n", "2", "--grace", str(int(3 * COMM_TIMEOUT_S)), "--timeout", str(int(5 * COMM_TIMEOUT_S)),
           RANKS, "crash_save", str(path), which]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(p: subprocess.Popen, limit: float) -> tuple[str, str]:
    try:
        out, err = p.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"the job did not end within {limit:.0f}s (a rank hangs):\n{out}\n{err}")
    sys.stdout.write(out)
    sys.stderr.write(err)
    assert "terminating ranks" not in err, f"dsdrun had to terminate a rank that hung:\n{err}"
    return out, err


def save_clean(path, which) -> float:
    """A save that must succeed; how long rank 0 spent in it (between its markers)."""
    control = f"{path}.control"
    shutil.rmtree(control, ignore_errors=True)
    os.makedirs(control)
    p = start(path, which, control)
    times = {}
    while p.poll() is None and len(times) < 2:
        for name in ("started0", "done0"):
            if name not in times and os.path.exists(os.path.join(control, name)):
                times[name] = time.monotonic()
        time.sleep(0.001)
    out, err = finish(p, 120)
    assert p.returncode == 0, err
    assert out.count("save ok") == 2, out
    shutil.rmtree(control)
    return times.get("done0", 0.0) - times.get("started0", 0.0)


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
    fa, fb = flat(a), flat(b)
    if fa.keys() != fb.keys():
        return False
    for k, x in fa.items():
        y = fb[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and
                    torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))):
                return False
        elif x != y:
            return False
    return True


def temp_manifest_is_no_checkpoint(path, scratch) -> None:
    """The directory as it is, minus checkpoint.json: only data files and a temporary
    manifest, which must not be taken for a checkpoint."""
    root = os.path.join(scratch, "root")
    shutil.rmtree(root, ignore_errors=True)
    step = os.path.join(root, "step_1")
    shutil.copytree(path, step)
    os.remove(os.path.join(step, "checkpoint.json"))
    try:
        dsd.load_full(step)
        raise AssertionError("a directory with only a temporary manifest loaded as a checkpoint")
    except dsd.NotFoundError:
        pass
    assert dsd.CheckpointManager(root).latest_step() is None
    shutil.rmtree(root)


def test_kill_a_writer_rank_at_20_points_of_a_save_over_a_checkpoint(tmp_path):
    seed = int(os.environ.get("CKPT_CRASH_SEED", "0")) or random.randrange(1, 1 << 30)
    print(f"random seed {seed} (CKPT_CRASH_SEED to repeat)")
    rng = random.Random(seed)
    ref_a, ref_b = tmp_path / "ref_a", tmp_path / "ref_b"
    save_clean(ref_a, "A")
    save_clean(ref_b, "B")
    a, b = dsd.load_full(ref_a), dsd.load_full(ref_b)
    assert a["which"] == "A" and b["which"] == "B" and not same(a, b)

    target = tmp_path / "ck"
    save_clean(target, "A")
    # How long a save of B over A takes, for the random delays.
    durations = []
    for _ in range(3):
        durations.append(save_clean(target, "B"))
        save_clean(target, "A")
    duration = sorted(durations)[1]
    print(f"a save of B over A takes {duration:.3f}s")

    plan = [("point", p, r, committed) for p, r, committed in NAMED]
    plan += [("delay", rng.uniform(0.0, 1.1 * duration), rng.randrange(2), None) for _ in range(RANDOM_KILLS)]
    outcomes = []
    landed = 0
    tmp_manifests_seen = 0
    for i, (kind, where, rank, committed_expected) in enumerate(plan):
        control = tmp_path / f"control{i}"
        control.mkdir()
        t0 = time.monotonic()
        if kind == "point":
            p = start(target, "B", control, crash_at=f"{where}@{rank}")
        else:
            p = start(target, "B", control)
            marker = control / f"started{rank}"
            while not marker.exists() and p.poll() is None:
                time.sleep(0.001)
            if p.poll() is None:
                pid = int((control / f"pid{rank}").read_text())
                time.sleep(where)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        out, err = finish(p, 3 * COMM_TIMEOUT_S)
        elapsed = time.monotonic() - t0
        killed = f"rank {rank} (pid" in err and "killed by signal 9" in err
        if kind == "point":
            assert killed, f"rank {rank} did not die at {where}:\n{err}"
            assert f"crash point {where} reached" in out + err
        landed += killed
        # The survivor ended by itself: with an error, or with success once the commit was
        # agreed (then B must be what the directory holds).
        survivor = 1 - rank
        survivor_ok = f"rank {survivor}: save ok" in out
        if killed:
            assert survivor_ok or f"rank {survivor}: save failed" in out, out
        if killed and committed_expected is False:
            assert not survivor_ok, out

        back = dsd.load_full(target)
        is_a, is_b = same(back, a), same(back, b)
        assert is_a or is_b, f"kill {i} ({kind} {where} rank {rank}): the directory loads as neither A nor B"
        dsd.verify(target)
        if committed_expected is not None:
            assert is_b == committed_expected, f"{where}: committed {is_b}, expected {committed_expected}"
        if survivor_ok:
            assert is_b, "a rank reported success but B is not what the directory holds"
        if any(n.startswith("checkpoint.json.tmp-") for n in os.listdir(target)):
            tmp_manifests_seen += 1
            temp_manifest_is_no_checkpoint(target, tmp_path)
        label = where if kind == "point" else f"after {where:.3f}s"
        outcomes.append(f"{label} rank {rank}: {'B committed' if is_b else 'A intact'}"
                        f"{'' if killed else ' (the save ended before the kill)'}, {elapsed:.1f}s")
        if is_b:
            save_clean(target, "A")  # the next kill again interrupts a save of B over A
        shutil.rmtree(control)

    print("\n".join(outcomes))
    assert landed >= len(NAMED) + RANDOM_KILLS // 2, f"only {landed} kills hit a running save"
    assert tmp_manifests_seen >= 1  # atomic_write.before_rename leaves one

    # A save that completes removes every orphan of the crashed ones.
    save_clean(target, "B")
    assert same(dsd.load_full(target), b)
    import json
    with open(target / "checkpoint.json", encoding="utf-8") as f:
        files = {x["name"] for x in json.load(f)["files"]}
    assert set(os.listdir(target)) == files | {"checkpoint.json"}, sorted(os.listdir(target))
