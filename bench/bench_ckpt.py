"""Checkpoint benchmarks at world size 1: dsd save/load/async save against dd, PyTorch DCP,
torch.save/torch.load, cat and memcpy, on the same bytes in the same run.

Every figure is dsd's time divided by the baseline's (lower is better; < 1 means dsd is
faster). Files are written to a scratch directory next to the build (one disk); loads read
files just written (page cache warm for every contender alike).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import time
import warnings

TARGETS = {
    "ckpt.save_vs_dd": (1.5, "<=", "dsd.save / dd conv=fdatasync of the same bytes"),
    "ckpt.save_vs_dcp": (1.0, "<=", "dsd.save / dcp.save"),
    "ckpt.save_vs_torch_save": (1.0, "<=", "dsd.save (fsync'd) / torch.save (not fsync'd)"),
    "ckpt.load_vs_dcp": (1.0, "<=", "dsd.load / dcp.load into the same preallocated state dict"),
    "ckpt.load_vs_torch_load": (1.0, "<=", "dsd.load / torch.load"),
    "ckpt.load_vs_cat": (2.0, "<=", "dsd.load (checksummed) / cat files > /dev/null"),
    "ckpt.async_block_vs_memcpy": (1.5, "<=", "dsd.async_save blocking time / memcpy of the bytes"),
    "ckpt.async_block_vs_dcp": (1.0, "<=", "dsd.async_save blocking time / dcp.async_save's"),
}


def _timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_ckpt(args) -> dict[str, float]:
    import torch
    import torch.distributed.checkpoint as dcp

    import dsd

    warnings.simplefilter("ignore")
    total = (64 << 20) if args.quick else (1 << 30)
    n = 16
    per = total // n // 4
    torch.manual_seed(0)
    sd = {f"layer{i}.weight": torch.randn(per) for i in range(n)}
    scratch = tempfile.mkdtemp(prefix="dsd_bench_", dir=os.path.dirname(args.build))
    try:
        j = lambda *p: os.path.join(scratch, *p)  # noqa: E731
        count = total // (16 << 20)

        t_dd = _timed(lambda: subprocess.run(
            ["dd", "if=/dev/zero", f"of={j('dd.bin')}", "bs=16M", f"count={count}", "conv=fdatasync"],
            check=True, capture_output=True))
        os.remove(j("dd.bin"))
        t_dsd_save = _timed(lambda: dsd.save(sd, j("dsd"), overwrite=True))
        t_dcp_save = _timed(lambda: dcp.save(sd, checkpoint_id=j("dcp"), no_dist=True))
        t_torch_save = _timed(lambda: torch.save(sd, j("torch.pt")))

        dst = {k: torch.empty_like(v) for k, v in sd.items()}
        t_dsd_load = _timed(lambda: dsd.load(dst, j("dsd")), repeat=2)
        assert all(torch.equal(dst[k], sd[k]) for k in sd)
        t_dcp_load = _timed(lambda: dcp.load(dst, checkpoint_id=j("dcp"), no_dist=True), repeat=2)
        t_torch_load = _timed(lambda: torch.load(j("torch.pt")), repeat=2)
        files = [j("dsd", f) for f in os.listdir(j("dsd")) if f.endswith(".safetensors")]
        t_cat = _timed(lambda: subprocess.run(f"cat {' '.join(files)} > /dev/null", shell=True, check=True),
                       repeat=2)

        # Async: the second save of the same structure (buffers cached) against a memcpy of
        # the same bytes into preallocated memory and against DCP's async_save.
        shutil.rmtree(j("dsd"))
        dsd.async_save(sd, j("a0")).result()
        holder = {}
        t_async = _timed(lambda: holder.setdefault("f", dsd.async_save(sd, j("a1"))))
        holder["f"].result()
        copies = {k: torch.zeros_like(v) for k, v in sd.items()}  # touched: no page faults

        def memcpy():
            for k, v in sd.items():
                ctypes.memmove(copies[k].data_ptr(), v.data_ptr(), v.numel() * v.element_size())
        t_memcpy = _timed(memcpy, repeat=3)
        dcp.async_save(sd, checkpoint_id=j("d0"), no_dist=True).result()
        dholder = {}
        t_dcp_async = _timed(lambda: dholder.setdefault("f", dcp.async_save(sd, checkpoint_id=j("d1"), no_dist=True)))
        dholder["f"].result()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    r = lambda a, b: round(a / b, 3)  # noqa: E731
    gib = total / (1 << 30)
    print(f"  {gib:.2f} GiB: dd {t_dd:.2f}s, dsd.save {t_dsd_save:.2f}s, dcp.save {t_dcp_save:.2f}s, "
          f"torch.save {t_torch_save:.2f}s; dsd.load {t_dsd_load:.2f}s, dcp.load {t_dcp_load:.2f}s, "
          f"torch.load {t_torch_load:.2f}s, cat {t_cat:.2f}s; async block dsd {t_async:.3f}s, "
          f"memcpy {t_memcpy:.3f}s, dcp {t_dcp_async:.3f}s")
    return {
        "ckpt.save_vs_dd": r(t_dsd_save, t_dd),
        "ckpt.save_vs_dcp": r(t_dsd_save, t_dcp_save),
        "ckpt.save_vs_torch_save": r(t_dsd_save, t_torch_save),
        "ckpt.load_vs_dcp": r(t_dsd_load, t_dcp_load),
        "ckpt.load_vs_torch_load": r(t_dsd_load, t_torch_load),
        "ckpt.load_vs_cat": r(t_dsd_load, t_cat),
        "ckpt.async_block_vs_memcpy": r(t_async, t_memcpy),
        "ckpt.async_block_vs_dcp": r(t_async, t_dcp_async),
    }


GROUPS = {"ckpt": bench_ckpt}
