"""Concurrent writers and readers (issue 16): two processes saving to the same path at once
(with and without overwrite), a save while another process loads the same directory, a
manager's retention deleting the step another process is loading, two managers on one root.
Never a complete-looking mixed checkpoint: the loser of two saves gets DSD_E_EXISTS (the
directory's writer lock, dsd_checkpoint_save's header comment), a reader gets the whole old
or the whole new checkpoint or an error."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest

import dsd
from adv_util import rng, same, state

HERE = os.path.dirname(os.path.abspath(__file__))
N, NUMEL = 6, 1 << 19
ROUNDS = 3
EXITS = {0: "ok", 11: "exists", 10: "MIXED", 3: "error"}


def spawn(**cmd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(HERE, "adv_worker.py"),
                             json.dumps({"n": N, "numel": NUMEL, **cmd})],
                            stderr=subprocess.PIPE, text=True, cwd=HERE)


def wait_all(ps) -> list[int]:
    out = []
    for p in ps:
        _, err = p.communicate(timeout=120)
        if p.returncode not in (0, 11):
            print(err[-1500:])
        out.append(p.returncode)
    return out


def whole(path, whiches):
    got = dsd.load_full(str(path))
    for w in whiches:
        if same(got, state(w, N, NUMEL)):
            dsd.verify(str(path))
            return w
    raise AssertionError(f"{path}: a complete-looking mixed checkpoint")


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_saves_to_one_path(tmp_path, overwrite):
    outcomes = collections.Counter()
    for r in range(ROUNDS):
        path = tmp_path / f"ck{r}"
        if overwrite:
            dsd.save(state("A", N, NUMEL), str(path))
        codes = wait_all([spawn(op="save", which=w, path=str(path), overwrite=overwrite) for w in ("B", "C")])
        outcomes[tuple(sorted(EXITS.get(c, str(c)) for c in codes))] += 1
        assert all(c in (0, 11) for c in codes), codes
        assert 0 in codes or overwrite, codes
        if not overwrite:
            assert codes.count(0) == 1, f"both saves without overwrite succeeded: {codes}"
        whole(path, ["A", "B", "C"])
    print(f"[concurrency] two saves to one path, overwrite={overwrite}: {ROUNDS} rounds: {dict(outcomes)}")


def test_load_while_saving(tmp_path):
    path = tmp_path / "ck"
    dsd.save(state("A", N, NUMEL), str(path))
    reader = spawn(op="load", path=str(path), whiches=["A", "B"], times=15)
    writers = 0
    while reader.poll() is None and writers < 30:
        assert wait_all([spawn(op="save", which="B" if writers % 2 == 0 else "A", path=str(path))]) == [0]
        writers += 1
    _, err = reader.communicate(timeout=120)
    print(f"[concurrency] 15 loads during {writers} overwriting saves: reader exit {reader.returncode} "
          f"({EXITS.get(reader.returncode)})")
    assert reader.returncode == 0, err[-2000:]


def test_retention_while_loading_and_two_managers(tmp_path):
    root = tmp_path / "run"
    assert wait_all([spawn(op="manager_save", path=str(root), steps=[1], keep_last=1)]) == [0]
    # a reader keeps loading step_1 while a manager saves steps 2..6 (retention removes step_1)
    reader = spawn(op="load", path=str(root / "step_1"), whiches=["step1"], times=30)
    w1 = spawn(op="manager_save", path=str(root), steps=[2, 3, 4, 5, 6], keep_last=1)
    # and a second manager on the same root saves the same and other steps at once
    w2 = spawn(op="manager_save", path=str(root), steps=[4, 5, 7], keep_last=1)
    codes = wait_all([reader, w1, w2])
    print(f"[concurrency] retention vs a reader, two managers on one root: exits {codes}")
    assert codes[0] == 0, "the reader saw a mixed step"
    assert all(c in (0, 11) for c in codes[1:]), codes
    m = dsd.CheckpointManager(str(root), keep_last=1)
    latest = m.latest_step()
    assert latest is not None
    whole(root / f"step_{latest}", [f"step{latest}"])
