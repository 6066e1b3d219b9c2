"""Random corruption (issue 16): 200 single-byte flips at random offsets over every file of
a saved dsd checkpoint, and truncations (dsd and DCP formats) at random lengths. Each load
either fails with a dsd.Error or returns exactly the saved state dict (a flip in padding or
in bytes nothing reads); never different data without an error. Outcomes are counted."""
from __future__ import annotations

import collections
import os
import shutil

import pytest

import dsd
from adv_util import rng, same, state

FLIPS = 200
TRUNCATIONS = 60


def attack(tmp_path, fmt: str, mutate, trials: int, tag: str):
    r = rng(f"{tag}-{fmt}")
    good = tmp_path / "good"
    sd = state("corrupt-" + fmt, n=3, numel=3000)
    dsd.save(sd, str(good), format=fmt)
    names = sorted(os.listdir(good))
    outcomes = collections.Counter()
    per_file = collections.Counter()
    for t in range(trials):
        work = tmp_path / f"t{t}"
        shutil.copytree(good, work)
        name = names[t % len(names)] if t < len(names) else r.choice(names)
        f = work / name
        data = bytearray(f.read_bytes())
        desc = mutate(r, data)
        f.write_bytes(bytes(data))
        per_file[name] += 1
        try:
            got = dsd.load_full(str(work))
        except dsd.Error as e:
            outcomes[f"error {e.code_name}"] += 1
        else:
            assert same(got, sd), f"trial {t}: {name} {desc}: load returned different data without an error"
            outcomes["loaded exactly"] += 1
        shutil.rmtree(work)
    print(f"[corruption] {fmt} {tag}: {trials} trials over {len(names)} files "
          f"({dict(per_file)}): {dict(outcomes)}")
    assert sum(outcomes.values()) == trials


def flip(r, data: bytearray) -> str:
    if not data:
        return "empty file"
    off = r.randrange(len(data))
    bit = 1 << r.randrange(8)
    data[off] ^= bit
    return f"byte {off} ^= {bit:#x}"


def truncate(r, data: bytearray) -> str:
    n = r.randrange(len(data)) if data else 0
    del data[n:]
    return f"truncated to {n} bytes"


def test_single_byte_flips(tmp_path):
    # dsd's format only: PyTorch DCP's .distcp files carry no checksum, so a flipped tensor
    # byte there is undetectable by design (its .metadata is covered by the truncations).
    attack(tmp_path, "dsd", flip, FLIPS, "flips")


@pytest.mark.parametrize("fmt", ["dsd", "dcp"])
def test_truncations(tmp_path, fmt):
    attack(tmp_path, fmt, truncate, TRUNCATIONS, "truncations")
