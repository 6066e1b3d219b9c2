"""Peers in one run: dsd against PyTorch DCP, Meta's torch_checkpointing, torch.save and
safetensors at world 1, on the same 1 GiB state dict of 16 float32 tensors, on tmpfs (where the
software is the bottleneck) and on the disk (where every save is made durable), with a memcpy
and a dd of the same bytes as the physical baselines, all in one process.

Figures (speedups, higher is better: the peer's seconds / dsd's seconds for the same state dict):
  peer.shm_save_vs_<peer>   save into a fresh directory under /dev/shm; every system as a user
                            calls it (dsd.save fsyncs its files, dcp.save too, torch.save is
                            followed by an fsync of its file, safetensors and torch_checkpointing
                            do not sync; on tmpfs an fsync costs next to nothing)
  peer.shm_load_vs_<peer>   load of that save from /dev/shm (the page cache: nothing dropped);
                            every system ends with the bytes in the same preallocated state
                            dict: dsd, DCP and torch_checkpointing fill it in place; safetensors'
                            load_file (which only maps the file) and torch.load are followed by
                            a copy_ into it, as model.load_state_dict would do
  peer.disk_save_vs_<peer>  save onto the disk (a scratch directory next to the build
                            directory, or $DSD_BENCH_DIR; refused if it is tmpfs), every system's
                            save followed by os.sync() inside the timed region, so each figure
                            compares durable saves
  ckpt.shm_save_vs_memcpy   (lower is better) dsd's tmpfs save / one memmove of the same bytes
                            into freshly allocated memory (torch.empty_like per tensor, so the
                            copy pays its page faults as tmpfs pays for its new pages)
  ckpt.shm_save_vs_memcpy_warm   (no target) the same against a memmove into memory already
                            mapped: the part of a tmpfs save that is the kernel allocating its
                            pages shows as the difference between the two
  peer.shm_save_vs_write    (no target, lower is better) dsd's tmpfs save / plain write()s of the
                            same bytes into new tmpfs files on two threads: what dsd's save
                            costs above the floor of any file-based save
  peer.disk_save_vs_dd      (no target) dd if=/dev/zero bs=64M conv=fdatasync of the same byte
                            count / dsd's durable disk save
Raw medians in seconds (no targets): peer.shm_save_s.<system>, peer.shm_load_s.<system>,
peer.disk_save_s.<system>, peer.memcpy_s, peer.memcpy_warm_s, peer.shm_write_s, peer.dd_s.

torch_checkpointing (pip torch-checkpointing) runs its synchronous saver with
LocalFileSystemStorageConfig(use_direct_io=False): its default O_DIRECT writer fails at close with
EINVAL on this machine's disk, and tmpfs has no O_DIRECT.

Each step is timed ROUNDS times, interleaved system by system round by round, and the median
kept; the directory of each timed save is removed before the next one (outside the timing), and
before every disk save the page cache's dirty pages are written out (os.sync, not timed).
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

TARGETS = {
    "peer.shm_save_vs_dcp": (4.0, ">=", "tmpfs save: dcp.save time / dsd.save time (world 1, 1 GiB, 16 tensors)"),
    "peer.shm_save_vs_torch_checkpointing": (4.0, ">=", "tmpfs save: torch_checkpointing sync save (no O_DIRECT) / dsd.save"),
    "peer.shm_save_vs_safetensors": (1.5, ">=", "tmpfs save: safetensors save_file / dsd.save"),
    "peer.shm_load_vs_dcp": (8.0, ">=", "tmpfs load: dcp.load in place / dsd.load in place"),
    "peer.shm_load_vs_safetensors": (1.5, ">=", "tmpfs load: safetensors load_file / dsd.load in place"),
    "peer.disk_save_vs_dcp": (1.0, ">=", "disk save + os.sync(): dcp.save / dsd.save"),
    "peer.disk_save_vs_torch_save_fsync": (1.0, ">=", "disk save + os.sync(): torch.save + fsync / dsd.save"),
    "ckpt.shm_save_vs_memcpy": (1.5, "<=", "dsd tmpfs save time / one memcpy of the same bytes into fresh memory"),
}

ROUNDS = 5
DISK_ROUNDS = 3
N_TENSORS = 16
ROWS = 4096
SYSTEMS = ("dsd", "dcp", "torch_checkpointing", "torch_save_fsync", "safetensors")


# ---------------------------------------------------------------------------------------------
# Driver side (./run bench).

def fs_type(path: str) -> str:
    """The file system type of the mount holding `path` (longest mount point prefix)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    with open("/proc/mounts", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1].replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, parts[2]
    return kind


def bench_peer(args) -> dict[str, float]:
    total = (64 << 20) if args.quick else (1 << 30)
    if not os.path.isdir("/dev/shm") or fs_type("/dev/shm") != "tmpfs":
        raise RuntimeError("/dev/shm is not a tmpfs here: the software-bound half of the peer group needs one")
    base = os.environ.get("DSD_BENCH_DIR") or os.path.dirname(args.build)
    if fs_type(base) in ("tmpfs", "ramfs"):
        raise RuntimeError(f"{base} is on {fs_type(base)}, not a disk: set DSD_BENCH_DIR to a disk directory")
    disk = tempfile.mkdtemp(prefix="dsd_peer_", dir=base)
    shm = tempfile.mkdtemp(prefix="dsd_peer_", dir="/dev/shm")
    out = os.path.join(disk, "times.json")
    print(f"  {total / (1 << 30):.2f} GiB in {N_TENSORS} float32 tensors; tmpfs {shm}, disk {disk} "
          f"({fs_type(disk)})", flush=True)
    try:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--shm", shm, "--disk", disk,
               "--out", out, "--bytes", str(total)]
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        with open(out, encoding="utf-8") as f:
            runs = json.load(f)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)

    med = {name: statistics.median(xs) for name, xs in runs.items()}
    for name in sorted(runs):
        print(f"  {name:34} median {med[name]:7.3f}s  runs {', '.join(f'{x:.3f}' for x in runs[name])}")
    fig: dict[str, float] = {}
    for name, t in med.items():
        fig[f"peer.{name}" if "." in name else f"peer.{name}_s"] = round(t, 4)

    def speedup(name, peer, ours):
        if peer in med and ours in med and med[ours] > 0:
            fig[name] = round(med[peer] / med[ours], 3)

    for s in SYSTEMS[1:]:
        speedup(f"peer.shm_save_vs_{s}", f"shm_save_s.{s}", "shm_save_s.dsd")
        speedup(f"peer.shm_load_vs_{s}", f"shm_load_s.{s}", "shm_load_s.dsd")
        speedup(f"peer.disk_save_vs_{s}", f"disk_save_s.{s}", "disk_save_s.dsd")
    speedup("peer.disk_save_vs_dd", "dd", "disk_save_s.dsd")
    if "memcpy" in med:
        fig["ckpt.shm_save_vs_memcpy"] = round(med["shm_save_s.dsd"] / med["memcpy"], 3)
    if "shm_write" in med:
        fig["peer.shm_save_vs_write"] = round(med["shm_save_s.dsd"] / med["shm_write"], 3)
    if "memcpy_warm" in med:
        fig["ckpt.shm_save_vs_memcpy_warm"] = round(med["shm_save_s.dsd"] / med["memcpy_warm"], 3)
    return fig


# ---------------------------------------------------------------------------------------------
# Worker side: one process, every system.

class Systems:
    """Each system's save and load, as a user calls them."""

    def __init__(self):
        import torch
        import torch.distributed.checkpoint as dcp
        from safetensors import torch as st
        from torch_checkpointing import CheckpointManager
        from torch_checkpointing.config import SyncCheckpointSaverConfig
        from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

        import dsd
        self.torch, self.dcp, self.st, self.dsd = torch, dcp, st, dsd
        # Synchronous saves; O_DIRECT off (see the module docstring).
        self.tc = CheckpointManager(CheckpointManager.Config(
            save=SyncCheckpointSaverConfig(), storage_config=LocalFileSystemStorageConfig(use_direct_io=False)))

    def save(self, system: str, sd: dict, path: str) -> None:
        if system == "dsd":
            self.dsd.save(sd, path)
        elif system == "dcp":
            self.dcp.save(sd, checkpoint_id=path, no_dist=True)
        elif system == "torch_checkpointing":
            self.tc.save(path, {"model": sd})
        elif system == "torch_save_fsync":
            os.makedirs(path)
            with open(os.path.join(path, "model.pt"), "wb") as f:
                self.torch.save(sd, f)
                f.flush()
                os.fsync(f.fileno())
        elif system == "safetensors":
            os.makedirs(path)
            self.st.save_file(sd, os.path.join(path, "model.safetensors"))
        else:
            raise ValueError(system)

    def load(self, system: str, dst: dict, path: str) -> dict:
        """The loaded state dict (`dst` itself for the in-place loaders)."""
        if system == "dsd":
            self.dsd.load(dst, path)
            return dst
        if system == "dcp":
            self.dcp.load(dst, checkpoint_id=path, no_dist=True)
            return dst
        if system == "torch_checkpointing":
            return self.tc.load(path, into={"model": dst})["model"]
        if system == "torch_save_fsync":
            return _copy_into(dst, self.torch.load(os.path.join(path, "model.pt"), weights_only=True))
        if system == "safetensors":
            return _copy_into(dst, self.st.load_file(os.path.join(path, "model.safetensors")))
        raise ValueError(system)


def _copy_into(dst: dict, loaded: dict) -> dict:
    """What model.load_state_dict(loaded) does with the tensors: copies them into the
    preallocated ones. safetensors' load_file maps the file and reads nothing until a tensor
    is touched, so without this its load would time no reading at all."""
    for k, v in loaded.items():
        dst[k].copy_(v)
    return dst


def _state(torch, total: int) -> dict:
    cols = total // N_TENSORS // 4 // ROWS
    g = torch.Generator().manual_seed(1)
    return {f"layers.{i}.weight": torch.randn(ROWS, cols, generator=g) for i in range(N_TENSORS)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _memcpy(torch, sd: dict) -> dict:
    """The same bytes copied once into fresh memory, one memmove per tensor."""
    out = {}
    for k, v in sd.items():
        d = torch.empty_like(v)
        ctypes.memmove(d.data_ptr(), v.data_ptr(), v.numel() * v.element_size())
        out[k] = d
    return out


def _memcpy_into(dst: dict, sd: dict) -> None:
    """The same bytes copied once into memory that is already mapped (no page faults)."""
    for k, v in sd.items():
        ctypes.memmove(dst[k].data_ptr(), v.data_ptr(), v.numel() * v.element_size())


def _write_floor(sd: dict, path: str, threads: int = 2) -> None:
    """The floor of any save into files: the tensors' bytes written with plain 64 MiB
    write()s into new files, no header, no checksum, no sync, on `threads` threads (dsd's
    writer threads on this machine), each its share of the tensors."""
    import threading
    os.makedirs(path)
    keys = list(sd)

    def write(part: int) -> None:
        fd = os.open(os.path.join(path, f"part{part}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for k in keys[part::threads]:
                view = memoryview(sd[k].numpy()).cast("B")
                for off in range(0, len(view), 64 << 20):
                    chunk = view[off:off + (64 << 20)]
                    while chunk:
                        chunk = chunk[os.write(fd, chunk):]
        finally:
            os.close(fd)
    pool = [threading.Thread(target=write, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def _dd(path: str, total: int) -> None:
    os.makedirs(path)
    bs = min(64 << 20, total)
    subprocess.run(["dd", "if=/dev/zero", f"of={os.path.join(path, 'dd.bin')}", f"bs={bs}", f"count={total // bs}",
                    "conv=fdatasync"], check=True, capture_output=True)


def worker(a) -> int:
    warnings.simplefilter("ignore")
    s = Systems()
    torch = s.torch
    sd = _state(torch, a.bytes)
    times: dict[str, list[float]] = {}
    kept: dict[str, str] = {}

    # tmpfs saves, with the memcpy baselines in the same rounds.
    touched = {k: torch.ones_like(v) for k, v in sd.items()}
    for rnd in range(ROUNDS):
        for system in SYSTEMS:
            path = os.path.join(a.shm, f"{system}{rnd}")
            times.setdefault(f"shm_save_s.{system}", []).append(_timed(lambda: s.save(system, sd, path)))
            if rnd < ROUNDS - 1:
                shutil.rmtree(path)
            else:
                kept[system] = path
        copies = None
        t0 = time.perf_counter()
        copies = _memcpy(torch, sd)
        times.setdefault("memcpy", []).append(time.perf_counter() - t0)
        assert all(torch.equal(copies[k], sd[k]) for k in sd), "memcpy baseline copied wrong bytes"
        del copies
        times.setdefault("memcpy_warm", []).append(_timed(lambda: _memcpy_into(touched, sd)))
        floor = os.path.join(a.shm, f"write{rnd}")
        times.setdefault("shm_write", []).append(_timed(lambda: _write_floor(sd, floor)))
        shutil.rmtree(floor)

    # tmpfs loads of the kept saves (warm: they are the page cache); each checked once.
    dst = {k: torch.zeros_like(v) for k, v in sd.items()}
    for system in SYSTEMS:
        for v in dst.values():
            v.zero_()
        got = s.load(system, dst, kept[system])
        if set(got) != set(sd) or not all(torch.equal(got[k], sd[k]) for k in sd):
            raise RuntimeError(f"{system} did not load back the tensors it saved")
        del got
    for _ in range(ROUNDS):
        for system in SYSTEMS:
            holder = []
            times.setdefault(f"shm_load_s.{system}", []).append(
                _timed(lambda: holder.append(s.load(system, dst, kept[system]))))
            del holder  # returned tensors are freed outside the timing
    for p in kept.values():
        shutil.rmtree(p)

    # Disk saves, each made durable (os.sync) inside the timed region; dd of the same bytes.
    steps = {f"disk_save_s.{system}": (lambda p, sy=system: s.save(sy, sd, p)) for system in SYSTEMS}
    steps["dd"] = lambda p: _dd(p, a.bytes)
    for rnd in range(DISK_ROUNDS):
        for name, fn in steps.items():
            path = os.path.join(a.disk, f"{name}{rnd}")
            os.sync()  # the previous step's dirty pages are not this one's cost

            def durable():
                fn(path)
                os.sync()
            times.setdefault(name, []).append(_timed(durable))
            shutil.rmtree(path)
    os.sync()

    s.tc.close()
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(times, f)
    return 0


GROUPS = {"peer": bench_peer}

if __name__ == "__main__":
    p = argparse.ArgumentParser(description="the peer benchmark's worker (run by ./run bench)")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--shm", required=True)
    p.add_argument("--disk", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--bytes", type=int, required=True)
    sys.path.insert(0, os.path.join(REPO, "bindings", "python"))
    sys.exit(worker(p.parse_args()))
