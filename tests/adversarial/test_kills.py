"""SIGKILL at random moments of every save path (issue 16), >= 20 seeded trials each: a
synchronous save over an existing checkpoint, an async save's background write, and a
checkpoint manager's save + retention. Afterwards the directory loads as the old or the new
checkpoint entirely and verify passes; leftovers of killed saves never make the next save
fail, and the next save removes them (checked at the end of each series)."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import dsd
from adv_util import rng, same, state

TRIALS = 20
N, NUMEL = 6, 1 << 19  # 6 tensors of 2 MiB: a save long enough to be hit in the middle
HERE = os.path.dirname(os.path.abspath(__file__))


class ForkServer:
    def __init__(self):
        self.p = subprocess.Popen([sys.executable, os.path.join(HERE, "adv_worker.py"), "forkserver"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE)

    def start(self, **cmd) -> int:
        self.p.stdin.write(json.dumps({"n": N, "numel": NUMEL, **cmd}) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline().split()
        assert line[0] == "pid", line
        return int(line[1])

    def wait(self, pid: int, limit: float = 60) -> int:
        line = self.p.stdout.readline().split()
        assert line[:2] == ["exit", str(pid)], line
        return int(line[2])

    def run(self, **cmd) -> tuple[int, float]:
        t0 = time.monotonic()
        pid = self.start(**cmd)
        st = self.wait(pid)
        return st, time.monotonic() - t0

    def close(self):
        self.p.stdin.close()
        self.p.wait(30)


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


def killed_run(server, r, duration, **cmd) -> str:
    pid = server.start(**cmd)
    time.sleep(r.uniform(0, duration))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    st = server.wait(pid)
    if os.WIFSIGNALED(st):
        return "killed"
    return "finished" if os.WEXITSTATUS(st) == 0 else f"failed({os.WEXITSTATUS(st)})"


def expect_one_of(path, candidates: dict) -> str:
    got = dsd.load_full(str(path))
    for name, sd in candidates.items():
        if same(got, sd):
            dsd.verify(str(path))
            return name
    raise AssertionError(f"{path} loads as neither of {sorted(candidates)}: a mixed checkpoint")


def referenced_only(path) -> None:
    """After a clean save: the manifest, the data files it names, nothing else."""
    m = json.loads((path / "checkpoint.json").read_text())
    files = {f["name"] for f in m["files"]}
    left = set(os.listdir(path)) - files - {"checkpoint.json"}
    assert not left, f"leftovers of killed saves remain after a clean save: {sorted(left)}"


@pytest.mark.parametrize("op", ["save", "async_save"])
def test_kill_save_over_existing(tmp_path, server, op):
    r = rng(f"kill-{op}")
    path = tmp_path / "ck"
    st, _ = server.run(op="save", which="A", path=str(path))
    assert st == 0
    durations = [server.run(op=op, which=w, path=str(path))[1] for w in ("B", "A")]
    duration = max(durations)
    print(f"[kills] {op}: an uninterrupted save takes {duration:.2f}s (with the fork)")
    outcomes, states = collections.Counter(), collections.Counter()
    old = "A"
    for t in range(TRIALS):
        new = "B" if old == "A" else "A"
        outcomes[killed_run(server, r, duration, op=op, which=new, path=str(path))] += 1
        got = expect_one_of(path, {w: state(w, N, NUMEL) for w in (old, new)})
        states["old" if got == old else "new"] += 1
        old = got
    print(f"[kills] {op}: {TRIALS} SIGKILL trials: processes {dict(outcomes)}; "
          f"directory afterwards {dict(states)}; verify passed {TRIALS}/{TRIALS}")
    st, _ = server.run(op=op, which="C", path=str(path))
    assert st == 0, "a save after the killed ones failed"
    assert same(dsd.load_full(str(path)), state("C", N, NUMEL))
    referenced_only(path)


def test_kill_manager_retention(tmp_path, server):
    r = rng("kill-manager")
    root = tmp_path / "run"
    st, _ = server.run(op="manager_save", path=str(root), steps=[1])
    assert st == 0
    _, duration = server.run(op="manager_save", path=str(root), steps=[2])
    print(f"[kills] manager: an uninterrupted save + retention takes {duration:.2f}s")
    step = 2
    outcomes, states = collections.Counter(), collections.Counter()
    for t in range(TRIALS):
        outcomes[killed_run(server, r, duration, op="manager_save", path=str(root), steps=[step + 1])] += 1
        m = dsd.CheckpointManager(str(root), keep_last=1)
        latest = m.latest_step()
        assert latest in (step, step + 1), (latest, step, sorted(os.listdir(root)))
        assert same(dsd.load_full(str(root / f"step_{latest}")), state(f"step{latest}", N, NUMEL))
        dsd.verify(str(root / f"step_{latest}"))
        states["old" if latest == step else "new"] += 1
        step = latest
    print(f"[kills] manager: {TRIALS} SIGKILL trials: processes {dict(outcomes)}; "
          f"latest afterwards {dict(states)}; verify passed {TRIALS}/{TRIALS}")
    st, _ = server.run(op="manager_save", path=str(root), steps=[step + 1])
    assert st == 0
    names = sorted(os.listdir(root))
    assert names == ["latest", f"step_{step + 1}"], f"retention left {names}"
    referenced_only(root / f"step_{step + 1}")
