"""Retention of an incremental chain killed at any moment (core/checkpoint/retention.h).

A checkpoint manager with incremental saves writes steps 1..6 of a LoRA-like state (a
frozen base that never changes, an adapter and its moment that change every step), so every
later step references the frozen bytes of step 1. Then, for each named moment of retention
(DSD_CHECKPOINT_CRASH_AT: a manifest just retired, the references just counted, one file or
directory just removed) and for a kill of `dsd gc` half-way, a copy of that root is given
to a process that saves step 7 with keep_last=2 (retiring steps 1..5), which is killed
there with SIGKILL. After each kill:

- every step that still has a live manifest loads bitwise as saved and verifies;
- steps 6 and 7 (the ones retention keeps) are among them;
- a retired step never loads (it is no checkpoint any more);

and an uninterrupted save of step 8 finishes the job: steps 7 and 8 alone are live, what
they reference is all that is left of the retired ones, and the root holds little more than
one full checkpoint.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsd

BUILD = Path(os.environ["DSD_BUILD_DIR"])
DSD_TOOL = BUILD / "tools" / "dsd"

POINTS = ["retention.after_retire", "retention.after_count", "retention.after_remove_one"]


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(1234)
    frozen = {f"w{i}": torch.randn(256, 256, generator=g) for i in range(8)}
    return {
        "frozen": frozen,
        "adapter": torch.full((32, 64), float(step)),
        "exp_avg": torch.full((32, 64), 0.5 * step),
        "step": step,
    }


# Saves steps given on the command line through an incremental manager (keep_last from argv).
SAVER = r"""
import sys
sys.path.insert(0, {here!r})
import dsd
from test_retention_crash import state
root, keep_last = sys.argv[1], int(sys.argv[2])
mgr = dsd.CheckpointManager(root, keep_last=keep_last, incremental=True)
for step in map(int, sys.argv[3:]):
    mgr.save(state(step), step)
mgr.close()
"""


def run_saver(root: Path, keep_last: int, steps: list[int], crash_at: str | None = None) -> int:
    env = dict(os.environ)
    env.pop("DSD_CHECKPOINT_CRASH_AT", None)
    if crash_at:
        env["DSD_CHECKPOINT_CRASH_AT"] = crash_at
    code = SAVER.format(here=str(Path(__file__).parent))
    p = subprocess.run([sys.executable, "-c", code, str(root), str(keep_last), *map(str, steps)], env=env,
                       capture_output=True, text=True, timeout=300)
    if crash_at is None:
        assert p.returncode == 0, p.stderr
    return p.returncode


def equal(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def live_steps(root: Path) -> list[int]:
    return sorted(int(d.name[5:]) for d in root.iterdir() if (d / "checkpoint.json").exists())


def check_root(root: Path, must_have: list[int]) -> None:
    live = live_steps(root)
    for step in must_have:
        assert step in live, f"step {step} is not live after the kill: {live}"
    for step in live:
        got = dsd.load_full(str(root / f"step_{step}"))
        assert equal(state(step), got), f"step_{step} does not hold what was saved"
        dsd.verify(str(root / f"step_{step}"))
    for d in root.iterdir():
        if (d / "checkpoint.retired.json").exists() and not (d / "checkpoint.json").exists():
            with pytest.raises(dsd.NotFoundError):
                dsd.load_full(str(d))


def tree_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chain") / "root"
    run_saver(root, 0, [1, 2, 3, 4, 5, 6])
    # The chain is incremental: every later step owns only its adapter and moment.
    full = tree_bytes(root / "step_1")
    for step in range(2, 7):
        assert tree_bytes(root / f"step_{step}") < full / 10
    return root


def finish_and_check(root: Path, full_bytes: int) -> None:
    run_saver(root, 2, [8])
    assert live_steps(root) == [7, 8]
    check_root(root, [7, 8])
    assert tree_bytes(root) < 1.3 * full_bytes, "retired steps left more than what steps 7 and 8 reference"
    # step_1 is retired but kept: it owns the frozen bytes steps 7 and 8 reference.
    assert (root / "step_1" / "checkpoint.retired.json").exists()
    for step in range(2, 7):
        assert not (root / f"step_{step}").exists(), f"step_{step} was not collected"


@pytest.mark.parametrize("point", POINTS)
def test_manager_killed_during_retention_loses_nothing_kept(chain, tmp_path, point):
    root = tmp_path / "root"
    shutil.copytree(chain, root)
    full = tree_bytes(chain / "step_1")
    rc = run_saver(root, 2, [7], crash_at=point)
    assert rc == -signal.SIGKILL, f"the saver was not killed at {point} (exit {rc})"
    check_root(root, [6, 7])
    finish_and_check(root, full)


def test_dsd_gc_killed_half_way_loses_nothing_kept(chain, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(chain, root)
    full = tree_bytes(chain / "step_1")
    env = dict(os.environ, DSD_CHECKPOINT_CRASH_AT="retention.after_remove_one")
    p = subprocess.run([str(DSD_TOOL), "gc", str(root), "--keep-last", "1"], env=env, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    check_root(root, [6])
    p = subprocess.run([str(DSD_TOOL), "gc", str(root), "--keep-last", "1"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "removed" in p.stdout
    assert live_steps(root) == [6]
    check_root(root, [6])
    assert tree_bytes(root) < 1.2 * full
    # Made standalone, step 6 needs nothing else: the next gc removes step_1 too.
    p = subprocess.run([str(DSD_TOOL), "convert", str(root / "step_6"), str(root / "step_6"), "--to", "dsd",
                        "--materialize"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([str(DSD_TOOL), "gc", str(root)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert sorted(d.name for d in root.iterdir() if d.is_dir()) == ["step_6"]
    check_root(root, [6])
