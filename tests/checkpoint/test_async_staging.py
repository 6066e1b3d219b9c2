"""Capped async staging through the C ABI (max_staging_bytes): the peak resident memory of a
fresh process saving a 512 MiB state with a 64 MiB cap rises by far less than the state,
while the same save uncapped raises it by at least the state, measured in the same process
so the test cannot pass without the cap doing its work; and what was saved is bitwise the
state even though the trainer overwrote every tensor as soon as save returned."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

MIB = 1 << 20

# Runs in a fresh process: VmHWM (the peak resident set, /proc/self/status) before and after
# each save. The capped save runs first, since the mark only ever rises.
CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import dsd

    MIB = 1 << 20
    root = sys.argv[1]

    def hwm():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    def state():
        return {f"layer{i}.w": torch.arange(MIB, dtype=torch.float32).remainder_(977).add_(1000 * i)
                for i in range(128)}  # 128 x 4 MiB = 512 MiB, every page written

    sd = state()
    ckpt = dsd.AsyncCheckpointer()
    # Warm up the library, its threads and allocator with a small save, not counted.
    ckpt.save({"x": torch.ones(4)}, root + "/warm").result(timeout=120)
    base = hwm()
    f = ckpt.save(sd, root + "/capped", max_staging_bytes=64 * MIB, thread_count=2, sync_files=False)
    for t in sd.values():
        t.fill_(-1.0)  # the trainer goes on at once
    f.result(timeout=300)
    capped = hwm() - base
    sd = state()
    f = ckpt.save(sd, root + "/uncapped", thread_count=2, sync_files=False)
    f.result(timeout=300)
    uncapped = hwm() - base
    ckpt.close()
    expected = state()
    back = dsd.load_full(root + "/capped")
    same = all(torch.equal(back[k], expected[k]) for k in expected)
    print(json.dumps({"capped": capped, "uncapped": uncapped, "bitwise": same}))
""")


def test_capped_async_save_bounds_peak_rss(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"[rss] peak RSS rise saving 512 MiB async: capped at 64 MiB {r['capped'] / MIB:.0f} MiB, "
          f"uncapped {r['uncapped'] / MIB:.0f} MiB")
    assert r["bitwise"], "the capped save does not hold the state as it was when save was called"
    assert r["uncapped"] >= 512 * MIB, r
    assert r["capped"] < 256 * MIB, r
