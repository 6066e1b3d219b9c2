"""Checkpoint benchmarks: dsd save, load, async save and reshard-load of a 1 GiB state dict at
world 1 and world 4 (4 local ranks under dsdrun, each with its Shard(0) DTensor shards), each
against the physical limit and the peer a user would pick, measured in the same run on the same
bytes in the same directory.

Figures (each contender timed 5 times, interleaved round by round, median; at world 4 a time
is the wall time of the collective step from a barrier to a barrier, block times the slowest
rank's):
  throughput ratios, higher is better: baseline seconds / dsd seconds for the same bytes
    ckpt.save_vs_dd           dd if=/dev/zero bs=64M conv=fdatasync (world 4: 4 dd at once,
                              one per rank, each of its share)
    ckpt.save_vs_dcp          dcp.save of the same state dict (DTensors at world 4)
    ckpt.save_vs_torch_save_fsync   torch.save followed by an fsync of its file (world 4: each
                              rank saves its local shards), as durable as dsd.save
    ckpt.save_nosync_vs_torch_save   (no target) dsd's sync_files=False / a plain torch.save,
                              neither synced
    ckpt.load_vs_dcp          dcp.load into the same preallocated state dict
    ckpt.load_vs_torch_load   torch.load (world 4: each rank its own file)
    ckpt.load_vs_cat          cat of dsd's data files > /dev/null (world 4: each rank its own)
    ckpt.load_vs_pread        (no target) the same files read with plain 1 MiB preads into
                              preallocated memory: the floor of any in-place load, which must
                              write every byte to memory where cat only reads it
    ckpt.reshard_vs_same      dsd.load of a world-4 checkpoint at world 3 vs dsd.load of a
                              world-3 checkpoint of the same tensors at world 3
  block-time ratios, lower is better: dsd's blocking time / the baseline's
    ckpt.async_block_vs_memcpy   dsd async_save's blocking time (second save, buffers reused)
                                 / one memcpy (ctypes.memmove) of the same bytes into touched
                                 memory
    ckpt.async_block_vs_dcp      / dcp.async_save's blocking time (also its second call)
  cooperative load (group ckpt_replicated, bench_ckpt_replicated below)
    ckpt.replicated_load_bytes_ratio   bytes read from storage by all 4 ranks / data bytes of a
                              fully replicated checkpoint (the baseline, cooperative off, is
                              ckpt.replicated_load_bytes_ratio_alone, ~4)
World-4 figures carry a `_w4` suffix. Loads are warm (every file in the page cache, read once
before timing); figures ending in `_cold` repeat them with the files evicted from the page
cache before every timed run (posix_fadvise DONTNEED after a sync, checked with fincore), so
they read from the disk; they have no targets (the quoted ones are for warm loads).

Scratch files go next to the build directory (the disk a user's checkpoints would go to), or
to $DSD_BENCH_DIR.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

_QUOTED = {
    "save_vs_dd": (1.0, ">=", "save throughput / dd bs=64M conv=fdatasync of the same bytes"),
    "save_vs_dcp": (2.0, ">=", "save throughput / dcp.save of the same state dict"),
    "save_vs_torch_save_fsync": (1.0, ">=", "save throughput / torch.save + fsync of its file"),
    "async_block_vs_memcpy": (1.5, "<=", "async save blocking time / a memcpy of the same bytes"),
    "async_block_vs_dcp": (0.5, "<=", "async save blocking time / dcp.async_save's"),
    "load_vs_dcp": (2.0, ">=", "load throughput / dcp.load into the same preallocated state dict"),
    "load_vs_torch_load": (3.0, ">=", "load throughput / torch.load"),
    "load_vs_cat": (0.7, ">=", "load throughput / cat of the same files from the page cache"),
}
TARGETS = {}
for _name, (_goal, _op, _what) in _QUOTED.items():
    TARGETS[f"ckpt.{_name}"] = (_goal, _op, _what + " (world 1)")
    TARGETS[f"ckpt.{_name}_w4"] = (_goal, _op, _what + " (world 4)")
TARGETS["ckpt.reshard_vs_same"] = (0.8, ">=", "load throughput 4 -> 3 ranks / 3 -> 3 ranks")
TARGETS["ckpt.replicated_load_bytes_ratio"] = (
    1.1, "<=", "bytes read from storage by all ranks / checkpoint data bytes, world 4, fully replicated state")

ROUNDS = 5
N_TENSORS = 16
ROWS = 4096


# ---------------------------------------------------------------------------------------------
# Driver side (./run bench): one process per world size.

def _fincore_works(scratch: str) -> bool:
    """Whether posix_fadvise(DONTNEED) really evicts a file here (checked with fincore)."""
    if shutil.which("fincore") is None:
        return False
    path = os.path.join(scratch, "evict_probe")
    with open(path, "wb") as f:
        f.write(os.urandom(4 << 20))
    try:
        _evict([path])
        out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", path], capture_output=True, text=True).stdout
        return out.strip() == "0"
    finally:
        os.remove(path)


def _launch(args, world: int, phases: str, scratch: str, extra=()) -> dict:
    out = os.path.join(scratch, f"times_w{world}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--phases", phases, "--scratch", scratch,
           "--out", out, "--bytes", str(args.total), *extra]
    if world > 1:
        cmd = [os.path.join(args.build, "tools", "dsdrun"), "-n", str(world), "--timeout", "900", "--grace", "30", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    subprocess.run(cmd, check=True, env=env)
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def bench_ckpt(args) -> dict[str, float]:
    args.total = (64 << 20) if args.quick else (1 << 30)
    base = os.environ.get("DSD_BENCH_DIR") or os.path.dirname(args.build)
    scratch = tempfile.mkdtemp(prefix="dsd_bench_", dir=base)
    try:
        cold = _fincore_works(scratch)
        print(f"  {args.total / (1 << 30):.2f} GiB state dict, scratch {scratch}; cold loads: "
              f"{'yes (fadvise DONTNEED, checked with fincore)' if cold else 'no (cannot evict files here)'}",
              flush=True)
        phases = "save,load,async" + (",cold" if cold else "")
        t1 = _launch(args, 1, phases, os.path.join(scratch, "w1"))
        shutil.rmtree(os.path.join(scratch, "w1"), ignore_errors=True)
        t4 = _launch(args, 4, phases, os.path.join(scratch, "w4"), ["--keep-dsd"])
        t3 = _launch(args, 3, "reshard", os.path.join(scratch, "w3"),
                     ["--from", os.path.join(scratch, "w4", "keep_dsd")])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    runs = {}
    for suffix, times in (("", t1), ("_w4", t4), ("", t3)):
        for name, xs in times.items():
            runs[name + suffix] = xs
    med = {name: statistics.median(xs) for name, xs in runs.items()}
    for name in sorted(runs):
        print(f"  {name:28} median {med[name]:7.3f}s  runs {', '.join(f'{x:.3f}' for x in runs[name])}")

    fig = {}

    def ratio(name, num, den):
        if num in med and den in med and med[den] > 0:
            fig[name] = round(med[num] / med[den], 3)

    for sfx in ("", "_w4"):
        ratio(f"ckpt.save_vs_dd{sfx}", f"dd_save{sfx}", f"dsd_save{sfx}")
        ratio(f"ckpt.save_vs_dcp{sfx}", f"dcp_save{sfx}", f"dsd_save{sfx}")
        ratio(f"ckpt.save_vs_torch_save_fsync{sfx}", f"torch_save{sfx}", f"dsd_save{sfx}")
        ratio(f"ckpt.save_nosync_vs_torch_save{sfx}", f"torch_save_nosync{sfx}", f"dsd_save_nosync{sfx}")
        ratio(f"ckpt.load_vs_dcp{sfx}", f"dcp_load{sfx}", f"dsd_load{sfx}")
        ratio(f"ckpt.load_vs_torch_load{sfx}", f"torch_load{sfx}", f"dsd_load{sfx}")
        ratio(f"ckpt.load_vs_cat{sfx}", f"cat{sfx}", f"dsd_load{sfx}")
        ratio(f"ckpt.load_vs_dcp{sfx}_cold", f"dcp_load_cold{sfx}", f"dsd_load_cold{sfx}")
        ratio(f"ckpt.load_vs_torch_load{sfx}_cold", f"torch_load_cold{sfx}", f"dsd_load_cold{sfx}")
        ratio(f"ckpt.load_vs_cat{sfx}_cold", f"cat_cold{sfx}", f"dsd_load_cold{sfx}")
        ratio(f"ckpt.load_vs_pread{sfx}", f"pread{sfx}", f"dsd_load{sfx}")
        ratio(f"ckpt.async_block_vs_memcpy{sfx}", f"dsd_async_block{sfx}", f"memcpy{sfx}")
        ratio(f"ckpt.async_block_vs_dcp{sfx}", f"dsd_async_block{sfx}", f"dcp_async_block{sfx}")
    ratio("ckpt.reshard_vs_same", "dsd_load_same3", "dsd_load_reshard4to3")
    gib = args.total / (1 << 30)
    for sfx in ("", "_w4"):
        if f"dsd_save{sfx}" in med:
            fig[f"ckpt.save_gibps{sfx}"] = round(gib / med[f"dsd_save{sfx}"], 3)
            fig[f"ckpt.load_gibps{sfx}"] = round(gib / med[f"dsd_load{sfx}"], 3)
    return fig


# ---------------------------------------------------------------------------------------------
# Worker side: one process per rank.

def _evict(paths) -> None:
    """Drops the files' pages from the page cache (clean pages only, hence the sync)."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _files_under(path: str) -> list[str]:
    out = []
    for root, _, names in os.walk(path):
        out.extend(os.path.join(root, n) for n in names)
    return sorted(out)


class Rank:
    """This process's place in the run: world size, rank, the torch.distributed group and the
    dsd communicator (world > 1)."""

    def __init__(self, scratch: str):
        import torch
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.scratch = scratch
        self.comm = None
        self.mesh = None
        if self.world > 1:
            import datetime

            import torch.distributed as dist
            from torch.distributed.device_mesh import init_device_mesh

            import dsd
            dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
            self.comm = dsd.Communicator.from_env(timeout=600)
            self.mesh = init_device_mesh("cpu", (self.world,))
        os.makedirs(scratch, exist_ok=True)
        self.torch = torch

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def max(self, x: float) -> float:
        if self.world == 1:
            return x
        import torch.distributed as dist
        t = self.torch.tensor([x], dtype=self.torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def timed(self, fn) -> float:
        """Wall time of a step every rank takes part in, barrier to barrier."""
        self.barrier()
        t0 = time.perf_counter()
        fn()
        self.barrier()
        return time.perf_counter() - t0

    def on_zero(self, fn) -> None:
        """fn() on rank 0 while the others wait."""
        self.barrier()
        if self.rank == 0:
            fn()
        self.barrier()


def _state(r: Rank, total: int, seed: int) -> dict:
    """16 float32 tensors of total/16 bytes: plain at world 1, Shard(0) DTensors of [4096, cols]
    otherwise (each rank generates only its shard)."""
    torch = r.torch
    cols = total // N_TENSORS // 4 // ROWS
    g = torch.Generator().manual_seed(seed * 1000 + r.rank)
    sd = {}
    for i in range(N_TENSORS):
        if r.world == 1:
            sd[f"layers.{i}.weight"] = torch.randn(ROWS, cols, generator=g)
            continue
        from torch.distributed.tensor import DTensor, Shard
        rows = [len(c) for c in torch.arange(ROWS).chunk(r.world)]
        rows += [0] * (r.world - len(rows))
        local = torch.randn(rows[r.rank], cols, generator=g)
        sd[f"layers.{i}.weight"] = DTensor.from_local(local, r.mesh, [Shard(0)], run_check=False,
                                                      shape=torch.Size([ROWS, cols]), stride=(cols, 1))
    return sd


def _zeros_like(r: Rank, sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if r.world == 1:
            out[k] = r.torch.zeros_like(v)
        else:
            from torch.distributed.tensor import DTensor
            out[k] = DTensor.from_local(r.torch.zeros_like(v._local_tensor), v.device_mesh, v.placements,
                                        run_check=False, shape=v.shape, stride=v.stride())
    return out


def _local(v):
    return getattr(v, "_local_tensor", v)


def _same(r: Rank, a: dict, b: dict) -> bool:
    return all(r.torch.equal(_local(a[k]), _local(b[k])) for k in a)


class Contenders:
    """Each way of saving and loading, at this world size."""

    def __init__(self, r: Rank, total: int):
        import dsd
        self.r, self.total, self.dsd = r, total, dsd

    # dsd: the public Python API, with the rank's communicator at world > 1.
    def dsd_save(self, sd, path, sync=True):
        self.dsd.save(sd, path, sync_files=sync, comm=self.r.comm)

    def dsd_async_save(self, sd, path):
        return self.dsd.async_save(sd, path, comm=self.r.comm)

    def dsd_load(self, sd, path):
        self.dsd.load(sd, path, comm=self.r.comm)

    def dcp_save(self, sd, path):
        import torch.distributed.checkpoint as dcp
        dcp.save(sd, checkpoint_id=path, no_dist=self.r.world == 1)

    def dcp_async_save(self, sd, path):
        import torch.distributed.checkpoint as dcp
        return dcp.async_save(sd, checkpoint_id=path, no_dist=self.r.world == 1)

    def dcp_load(self, sd, path):
        import torch.distributed.checkpoint as dcp
        dcp.load(sd, checkpoint_id=path, no_dist=self.r.world == 1)

    def torch_file(self, path):
        return os.path.join(path, f"rank{self.r.rank}.pt")

    def torch_save(self, sd, path, sync=True):
        """torch.save of the local tensors; with `sync`, followed by an fsync of the file, as
        durable as dsd.save and dcp.save."""
        os.makedirs(path, exist_ok=True)
        with open(self.torch_file(path), "wb") as f:
            self.r.torch.save({k: _local(v) for k, v in sd.items()}, f)
            if sync:
                f.flush()
                os.fsync(f.fileno())

    def torch_load(self, path):
        self.r.torch.load(self.torch_file(path))

    def dd(self, path):
        os.makedirs(path, exist_ok=True)
        share = self.total // self.r.world
        bs = min(64 << 20, share)  # 64 MiB blocks (the quick run's shares are smaller)
        subprocess.run(["dd", "if=/dev/zero", f"of={os.path.join(path, f'dd{self.r.rank}.bin')}", f"bs={bs}",
                        f"count={share // bs}", "conv=fdatasync"], check=True, capture_output=True)

    def my_dsd_files(self, path):
        """The data files this rank wrote (all of them at world 1), from the manifest."""
        with open(os.path.join(path, "checkpoint.json"), encoding="utf-8") as f:
            files = json.load(f)["files"]
        return [os.path.join(path, x["name"]) for x in files if self.r.world == 1 or x["rank"] == self.r.rank]

    def cat(self, files):
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)

    def pread_into(self, files, buffers):
        """The floor of any in-place load: the data files' bytes read into preallocated,
        touched memory with plain preads of 1 MiB, no planning, no checksums."""
        step = 1 << 20
        for path, buf in zip(files, buffers):
            view = memoryview(buf.numpy()).cast("B")
            fd = os.open(path, os.O_RDONLY)
            try:
                for off in range(0, len(view), step):
                    os.preadv(fd, [view[off:off + step]], off)
            finally:
                os.close(fd)


def _phase_save(r: Rank, c: Contenders, sd: dict, times: dict, keep: dict) -> None:
    steps = {
        "dd_save": lambda p: c.dd(p),
        "dsd_save": lambda p: c.dsd_save(sd, p),
        "dsd_save_nosync": lambda p: c.dsd_save(sd, p, sync=False),
        "dcp_save": lambda p: c.dcp_save(sd, p),
        "torch_save": lambda p: c.torch_save(sd, p),
        "torch_save_nosync": lambda p: c.torch_save(sd, p, sync=False),
    }
    for rnd in range(ROUNDS):
        for name, fn in steps.items():
            path = os.path.join(r.scratch, f"{name}{rnd}")
            r.on_zero(os.sync)  # the previous contender's dirty pages are not this one's cost
            times.setdefault(name, []).append(r.timed(lambda: fn(path)))
            if rnd < ROUNDS - 1 or name in ("dd_save", "dsd_save_nosync", "torch_save_nosync"):
                r.on_zero(lambda: shutil.rmtree(path))
            else:
                keep[name] = path
    r.on_zero(os.sync)


def _phase_load(r: Rank, c: Contenders, sd: dict, times: dict, keep: dict, cold: bool) -> None:
    dst = _zeros_like(r, sd)
    c.dsd_load(dst, keep["dsd_save"])
    assert _same(r, dst, sd), "dsd.load did not restore the saved tensors"
    c.dcp_load(dst, keep["dcp_save"])
    assert _same(r, dst, sd), "dcp.load did not restore the saved tensors"
    cat_files = c.my_dsd_files(keep["dsd_save"])
    buffers = [r.torch.ones(os.path.getsize(f), dtype=r.torch.uint8) for f in cat_files]
    steps = {
        "dsd_load": (lambda: c.dsd_load(dst, keep["dsd_save"]), keep["dsd_save"]),
        "dcp_load": (lambda: c.dcp_load(dst, keep["dcp_save"]), keep["dcp_save"]),
        "torch_load": (lambda: c.torch_load(keep["torch_save"]), keep["torch_save"]),
        "cat": (lambda: c.cat(cat_files), keep["dsd_save"]),
        "pread": (lambda: c.pread_into(cat_files, buffers), keep["dsd_save"]),
    }
    suffix = "_cold" if cold else ""
    if not cold:  # every file in the page cache before the first timed read
        for _, path in steps.values():
            r.on_zero(lambda p=path: c.cat(_files_under(p)))
    for _ in range(ROUNDS):
        for name, (fn, path) in steps.items():
            if cold:
                r.on_zero(lambda p=path: _evict(_files_under(p)))
            times.setdefault(name + suffix, []).append(r.timed(fn))
    assert _same(r, dst, sd)


def _phase_async(r: Rank, c: Contenders, sd: dict, times: dict) -> None:
    torch = r.torch
    copies = {k: torch.ones_like(_local(v)) for k, v in sd.items()}  # touched: no page faults

    def memcpy():
        for k, v in sd.items():
            src = _local(v)
            ctypes.memmove(copies[k].data_ptr(), src.data_ptr(), src.numel() * src.element_size())

    def blocked(start, name, rnd):
        path = os.path.join(r.scratch, f"{name}{rnd}")
        r.barrier()
        t0 = time.perf_counter()
        fut = start(path)
        t = time.perf_counter() - t0
        fut.result()
        r.on_zero(os.sync)
        r.on_zero(lambda: shutil.rmtree(path))
        return r.max(t)

    # The first call of each pays for its buffers (dsd: once; DCP: every call) and threads.
    blocked(lambda p: c.dsd_async_save(sd, p), "dsd_async_warmup", 0)
    blocked(lambda p: c.dcp_async_save(sd, p), "dcp_async_warmup", 0)
    for rnd in range(ROUNDS):
        times.setdefault("dsd_async_block", []).append(blocked(lambda p: c.dsd_async_save(sd, p), "dsd_async", rnd))
        r.barrier()
        t0 = time.perf_counter()
        memcpy()
        times.setdefault("memcpy", []).append(r.max(time.perf_counter() - t0))
        times.setdefault("dcp_async_block", []).append(blocked(lambda p: c.dcp_async_save(sd, p), "dcp_async", rnd))


def _phase_reshard(r: Rank, c: Contenders, total: int, times: dict, from_path: str) -> None:
    sd = _state(r, total, seed=3)
    same = os.path.join(r.scratch, "same3")
    c.dsd_save(sd, same)
    dst = _zeros_like(r, sd)
    c.dsd_load(dst, same)
    assert _same(r, dst, sd)
    c.dsd_load(dst, from_path)  # warm-up: both checkpoints' files in the page cache
    for _ in range(ROUNDS):
        times.setdefault("dsd_load_reshard4to3", []).append(r.timed(lambda: c.dsd_load(dst, from_path)))
        times.setdefault("dsd_load_same3", []).append(r.timed(lambda: c.dsd_load(dst, same)))


def worker(a) -> int:
    warnings.simplefilter("ignore")
    r = Rank(a.scratch)
    c = Contenders(r, a.bytes)
    times: dict[str, list[float]] = {}
    phases = a.phases.split(",")
    if "reshard" in phases:
        _phase_reshard(r, c, a.bytes, times, a.from_path)
    else:
        sd = _state(r, a.bytes, seed=1)
        keep: dict[str, str] = {}
        _phase_save(r, c, sd, times, keep)
        _phase_load(r, c, sd, times, keep, cold=False)
        if "cold" in phases:
            _phase_load(r, c, sd, times, keep, cold=True)
        _phase_async(r, c, sd, times)
        if a.keep_dsd:
            r.on_zero(lambda: os.rename(keep["dsd_save"], os.path.join(r.scratch, "keep_dsd")))
    if r.rank == 0:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(times, f)
    r.barrier()
    if r.world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


def bench_ckpt_replicated(args) -> dict[str, float]:
    """Cooperative load (group ckpt_replicated): build/bench/bench_replicated_load on 4 ranks,
    a fully replicated state of 256 MiB (--quick: 32 MiB) on tmpfs ($DSD_BENCH_DIR, else
    /dev/shm); rank 0 prints ckpt.replicated_load_bytes_ratio (cooperative), its
    non-cooperative baseline (_alone) and the load time cooperative / alone (information: on
    tmpfs a broadcast over loopback Gloo costs more than a read from memory)."""
    total = (32 << 20) if args.quick else (256 << 20)
    base = os.environ.get("DSD_BENCH_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else os.path.dirname(args.build))
    scratch = tempfile.mkdtemp(prefix="dsd_bench_replicated_", dir=base)
    try:
        cmd = [os.path.join(args.build, "tools", "dsdrun"), "-n", "4", "--timeout", "900",
               os.path.join(args.build, "bench", "bench_replicated_load"), scratch, str(total)]
        p = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for line in p.stderr.splitlines():
        if "replicated load" in line:
            print("  " + line.split("] ", 1)[-1], flush=True)
    for line in p.stdout.splitlines():
        line = line.split("] ", 1)[-1]
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"bench_replicated_load printed no figures:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")


GROUPS = {"ckpt": bench_ckpt, "ckpt_replicated": bench_ckpt_replicated}

if __name__ == "__main__":
    p = argparse.ArgumentParser(description="a rank of the checkpoint benchmark (run by ./run bench)")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--phases", required=True)
    p.add_argument("--scratch", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--from", dest="from_path")
    p.add_argument("--keep-dsd", action="store_true")
    sys.path.insert(0, os.path.join(REPO, "bindings", "python"))
    sys.exit(worker(p.parse_args()))
