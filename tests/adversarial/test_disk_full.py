"""Disk full (issue 16): on a small tmpfs (mounted here when the test may: root; skipped with
77 otherwise), a save bigger than the space over an existing checkpoint fails with
DSD_E_NO_SPACE, the old checkpoint stays intact, and the space the failed save used is
released. The RLIMIT_FSIZE variant (a file size limit, EFBIG) runs everywhere."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch

import dsd
from adv_util import same, state

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def tmpfs():
    d = tempfile.mkdtemp(prefix="dsd-adv-tmpfs-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", d], capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(d)
        print(f"[disk] cannot mount a tmpfs ({r.stderr.strip()}): skipped")
        pytest.skip("cannot mount a tmpfs")
    yield d
    subprocess.run(["umount", d], check=False)
    os.rmdir(d)


def free(d) -> int:
    s = os.statvfs(d)
    return s.f_bavail * s.f_frsize


def test_save_bigger_than_tmpfs(tmpfs):
    path = os.path.join(tmpfs, "ck")
    a = state("A", n=2, numel=1 << 18)  # 2 MiB
    dsd.save(a, path)
    before = free(tmpfs)
    b = {f"w{i}": torch.full((1 << 18,), float(i)) for i in range(12)}  # 12 MiB > 8 MiB
    with pytest.raises(dsd.Error) as e:
        dsd.save(b, path, overwrite=True)
    after = free(tmpfs)
    print(f"[disk] 12 MiB save over a 2 MiB checkpoint on an 8 MiB tmpfs: {e.value.code_name}; "
          f"free before {before >> 10} KiB, after {after >> 10} KiB")
    assert e.value.code_name == "no_space", e.value
    assert same(dsd.load_full(path), a)
    dsd.verify(path)
    assert after >= before - (64 << 10), "the failed save's files were not removed"
    dsd.save(state("C", n=2, numel=1 << 18), path, overwrite=True)  # room again: it works
    assert same(dsd.load_full(path), state("C", n=2, numel=1 << 18))


FSIZE = r"""
import resource, signal, sys, torch, dsd
sys.path.insert(0, sys.argv[2])
from adv_util import state
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    dsd.save({"w": torch.zeros(4 << 20, dtype=torch.uint8)}, sys.argv[1], overwrite=True)
except dsd.Error as e:
    print("ERROR", e.code_name); sys.exit(0)
print("SAVED")
"""


def test_save_past_rlimit_fsize(tmp_path):
    path = tmp_path / "ck"
    a = state("A")
    dsd.save(a, str(path))
    names = sorted(os.listdir(path))
    p = subprocess.run([sys.executable, "-c", FSIZE, str(path), HERE], capture_output=True, text=True, timeout=120)
    print(f"[disk] 4 MiB save under RLIMIT_FSIZE=1 MiB: {p.stdout.strip()}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "ERROR no_space", p.stdout
    assert same(dsd.load_full(str(path)), a)
    assert sorted(os.listdir(path)) == names, "the failed save left files behind"
