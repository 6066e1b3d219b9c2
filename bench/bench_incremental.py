"""Incremental checkpoints (issue 14): the second save of a state whose bytes are 90%
unchanged, a frozen base model plus trained adapters and their Adam moments, against a full
save of the same state, in the same run, on the disk (durable: fsync, as every dsd save) and on
tmpfs.

- ckpt.incremental_bytes_ratio: bytes the incremental save writes (its own data files and
  manifest) / bytes of the full save.
- ckpt.incremental_save_speedup: full save time / incremental save time, on the disk, the
  base's pages in the page cache (it was saved one step before, as in training).
- ckpt.incremental_save_speedup_cold (informational): the same with the base's pages evicted
  first (fadvise DONTNEED), so the byte compare reads the base from the disk.
- ckpt.incremental_save_speedup_shm (informational): on tmpfs, where only software counts.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

TARGETS = {
    "ckpt.incremental_bytes_ratio": (0.12, "<=", "bytes written by an incremental save of a 90%-unchanged state / "
                                                  "a full save"),
    "ckpt.incremental_save_speedup": (5.0, ">=", "full save time / incremental save time, durable, on the disk"),
}

ROUNDS = 3


def _state(total: int, step: int):
    import torch
    # 90%: a frozen base of 9 tensors; 10%: an adapter and its two Adam moments.
    n = total // 4
    frozen = {f"layers.{i}.weight": torch.full((n * 9 // 10 // 9,), float(i + 1)) for i in range(9)}
    k = (n - 9 * (n * 9 // 10 // 9)) // 3
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"base": frozen, "lora_A": torch.randn(k, generator=g)},
        "optim": {"exp_avg": torch.randn(k, generator=g), "exp_avg_sq": torch.rand(k, generator=g)},
        "step": step,
    }


def _bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def _evict(path: str) -> None:
    os.sync()
    for n in os.listdir(path):
        fd = os.open(os.path.join(path, n), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _run(scratch: str, total: int, cold: bool) -> dict:
    import dsd
    s1, s2 = _state(total, 1), _state(total, 2)
    full_t, inc_t, ratios = [], [], []
    for r in range(ROUNDS):
        root = os.path.join(scratch, f"r{r}")
        os.makedirs(root)
        a, b, c = (os.path.join(root, n) for n in ("step_1", "step_2", "full_2"))
        dsd.save(s1, a)
        if cold:
            _evict(a)
        t = time.perf_counter()
        dsd.save(s2, b, base=a)
        inc_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        dsd.save(s2, c)
        full_t.append(time.perf_counter() - t)
        ratios.append(_bytes(b) / _bytes(c))
        # The incremental checkpoint holds the state.
        got = dsd.load_full(b)
        assert got["step"] == 2 and bool((got["optim"]["exp_avg"] == s2["optim"]["exp_avg"]).all())
        shutil.rmtree(root)
    return {"full": statistics.median(full_t), "inc": statistics.median(inc_t), "ratio": max(ratios)}


def bench_incremental(args) -> dict[str, float]:
    total = (64 << 20) if args.quick else (1 << 30)
    disk = tempfile.mkdtemp(prefix="dsd_bench_inc_", dir=os.environ.get("DSD_BENCH_DIR") or os.path.dirname(args.build))
    shm = tempfile.mkdtemp(prefix="dsd_bench_inc_", dir="/dev/shm") if os.path.isdir("/dev/shm") else None
    try:
        warm = _run(disk, total, cold=False)
        cold = _run(disk, total, cold=True)
        mem = _run(shm, total, cold=False) if shm else None
    finally:
        shutil.rmtree(disk, ignore_errors=True)
        if shm:
            shutil.rmtree(shm, ignore_errors=True)
    print(f"  {total / (1 << 30):.2f} GiB, 90% unchanged; disk: full {warm['full']:.3f} s, incremental "
          f"{warm['inc']:.3f} s (base evicted: {cold['inc']:.3f} s)"
          + (f"; tmpfs: full {mem['full']:.3f} s, incremental {mem['inc']:.3f} s" if mem else ""), flush=True)
    out = {
        "ckpt.incremental_bytes_ratio": round(warm["ratio"], 4),
        "ckpt.incremental_save_speedup": round(warm["full"] / warm["inc"], 2),
        "ckpt.incremental_save_speedup_cold": round(cold["full"] / cold["inc"], 2),
        "ckpt.incremental_full_save_s": round(warm["full"], 3),
        "ckpt.incremental_save_s": round(warm["inc"], 3),
    }
    if mem:
        out["ckpt.incremental_save_speedup_shm"] = round(mem["full"] / mem["inc"], 2)
    return out


GROUPS = {"incremental": bench_incremental}
