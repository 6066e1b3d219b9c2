"""GPU checkpoint benchmark: dsd against the physical limit (a raw device-to-host copy into
preallocated pinned memory) and against PyTorch DCP on the same CUDA state dict, in one process.
tools/device-check runs it on a GPU machine; the figures go to bench/gpu_results.json with the
date and the device's description:

    python bench/bench_gpu.py [--build DIR] [--out FILE] [--gib 8] [--budget SECONDS]
    python bench/bench_gpu.py --device cpu --gib 0.05 --out /tmp/x.json   (smoke run, no GPU)

The state dict is Llama-shaped (Llama-3-8B layers: bf16 weights, one fp32 optimizer moment per
weight, fp32 norms) with as many layers as make --gib GiB.

Figures (each contender timed --rounds times after a warm-up, interleaved round by round;
blocking times take the minimum, save/load times the median):
  gpu.async_block_vs_d2h   training-stream blocking time of dsd.async_save (from the call until
                           a marker queued on the current stream right after it has run) / the
                           same for a raw copy_(non_blocking) of the same bytes into preallocated
                           pinned memory                                         target <= 1.2
  gpu.async_block_vs_dcp   / dcp.async_save's blocking time, DefaultStager (pinned, shared
                           memory off, async staging, reused), until its staging completes
                                                                                 target <= 0.5
  gpu.save_vs_dcp          dcp.save time / dsd.save time (CUDA tensors, files synced)  >= 2
  gpu.load_vs_dcp          dcp.load time / dsd.load time, into preallocated CUDA tensors, files
                           in the page cache                                          >= 2
  gpu.save_vs_torch_checkpointing, gpu.load_vs_torch_checkpointing   the same against the
                           torch_checkpointing package when it is importable          >= 2
  gpu.d2h_gbps             the raw copy's GB/s (no target: the ceiling the ratios refer to)
  gpu.load_gbps            dsd.load's GB/s into CUDA tensors (no target)

Without a CUDA device (and without --device cpu) it measures nothing and exits 77.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

TARGETS = {
    "gpu.async_block_vs_d2h": (1.2, "<=", "async save blocking time / raw D2H copy_ into pinned memory"),
    "gpu.async_block_vs_dcp": (0.5, "<=", "async save blocking time / dcp.async_save (DefaultStager, pinned)"),
    "gpu.save_vs_dcp": (2.0, ">=", "dcp.save time / dsd.save time (CUDA tensors)"),
    "gpu.load_vs_dcp": (2.0, ">=", "dcp.load time / dsd.load time (into CUDA tensors)"),
    "gpu.save_vs_torch_checkpointing": (2.0, ">=", "torch_checkpointing save time / dsd.save time"),
    "gpu.load_vs_torch_checkpointing": (2.0, ">=", "torch_checkpointing load time / dsd.load time"),
}

# Llama-3-8B layer shapes: (name, rows, cols).
LAYER = [("attention.wq", 4096, 4096), ("attention.wk", 1024, 4096), ("attention.wv", 1024, 4096),
         ("attention.wo", 4096, 4096), ("feed_forward.w1", 14336, 4096), ("feed_forward.w2", 4096, 14336),
         ("feed_forward.w3", 14336, 4096)]


def say(msg: str) -> None:
    print(f"  {msg}", flush=True)


def llama_state(torch, total: int, device: str) -> dict:
    """Model weights (bf16) + one fp32 moment per weight + fp32 norms, nested as a trainer's
    {"model": ..., "optim": ...}, with layers added until `total` bytes."""
    scale = 1 if total >= (2 << 30) else 8  # small runs: 1/8 of each dimension
    shapes = [(n, r // scale, c // scale) for n, r, c in LAYER]
    dim = 4096 // scale
    per_layer = sum(r * c for _, r, c in shapes) * (2 + 4) + 2 * dim * 4
    layers = max(1, round(total / per_layer))
    g = torch.Generator(device=device).manual_seed(0)
    model, state = {}, {}
    for i in range(layers):
        for name, r, c in shapes:
            key = f"layers.{i}.{name}.weight"
            model[key] = torch.randn(r, c, device=device, generator=g, dtype=torch.bfloat16)
            state[key] = {"exp_avg": torch.randn(r, c, device=device, generator=g) * 1e-3}
        for norm in ("attention_norm", "ffn_norm"):
            model[f"layers.{i}.{norm}.weight"] = torch.ones(dim, device=device)
    return {"model": model, "optim": {"state": state, "param_groups": [{"lr": 3e-4, "step": 100}]}}


def leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from leaves(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from leaves(v)
    else:
        yield tree


def map_tensors(torch, tree, fn):
    if isinstance(tree, dict):
        return {k: map_tensors(torch, v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [map_tensors(torch, v, fn) for v in tree]
    return fn(tree) if isinstance(tree, torch.Tensor) else tree


def tensors(torch, tree):
    return [t for t in leaves(tree) if isinstance(t, torch.Tensor)]


def device_description(torch, cuda: bool) -> str:
    cores = os.cpu_count()
    base = f"PyTorch {torch.__version__}, {cores} cores, {platform.machine()}"
    if not cuda:
        return "CPU smoke run (no GPU): " + base
    p = torch.cuda.get_device_properties(0)
    driver = ""
    try:
        import subprocess
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - the description is best effort
        pass
    return (f"{p.name} ({p.total_memory / (1 << 30):.0f} GiB, {p.multi_processor_count} SMs, "
            f"compute {p.major}.{p.minor}{', driver ' + driver if driver else ''}), CUDA {torch.version.cuda}, "
            + base)


class Bench:
    def __init__(self, args, torch):
        self.args, self.torch = args, torch
        self.cuda = args.device == "cuda"
        self.times: dict[str, list[float]] = {}
        self.notes: list[str] = []
        base = os.environ.get("DSD_BENCH_DIR") or tempfile.gettempdir()
        self.scratch = tempfile.mkdtemp(prefix="dsd_bench_gpu_", dir=base)
        atexit.register(shutil.rmtree, self.scratch, True)  # also when a contender fails

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def stream_done(self):
        """Waits until everything queued on the current stream so far has run: the moment the
        training loop's next kernel could start."""
        if self.cuda:
            self.torch.cuda.current_stream().synchronize()

    def path(self, name: str) -> str:
        return os.path.join(self.scratch, name)

    def drop(self, name: str) -> None:
        shutil.rmtree(self.path(name), ignore_errors=True)
        os.sync()

    def record(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)


def run(args) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu: no CUDA device visible to PyTorch {torch.__version__}: nothing measured "
              "(the figures need a GPU; --device cpu runs a smoke pass)")
        return 77
    warnings.simplefilter("ignore")
    os.environ.setdefault("DSD_LIBRARY", os.path.join(os.path.abspath(args.build), "capi", "libdsd.so"))
    sys.path.insert(0, os.path.join(REPO, "bindings", "python"))
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import dsd

    if not dist.is_initialized():
        store_dir = tempfile.mkdtemp(prefix="dsd_bench_pg_")
        atexit.register(shutil.rmtree, store_dir, True)
        store = os.path.join(store_dir, "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)

    budget = args.budget
    gib = args.gib
    rounds = args.rounds
    if budget is not None:  # a device call is short: less data; rounds stop at each phase's deadline
        for least, most in ((100, 8.0), (60, 4.0), (40, 2.0), (0, 1.0)):
            if budget >= least:
                gib = min(gib, most)
                break
    b = Bench(args, torch)
    device = "cuda" if b.cuda else "cpu"
    t_start = time.perf_counter()

    def late(fraction: float, last_round: float) -> bool:
        """Whether another round (as long as the last one) would end past `fraction` of the
        budget: the async phase may use 45% of it, the saves until 80%, the loads until 97%."""
        return budget is not None and time.perf_counter() + last_round > t_start + fraction * budget
    sd = llama_state(torch, int(gib * (1 << 30)), device)
    ts = tensors(torch, sd)
    nbytes = sum(t.numel() * t.element_size() for t in ts)
    b.sync()
    say(f"{len(ts)} tensors, {nbytes / (1 << 30):.2f} GiB on {device}, {rounds} rounds, scratch {b.scratch}")

    # --- raw D2H copy into preallocated pinned memory -----------------------------------------
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=b.cuda) for t in ts]
    for p in pinned:
        p.view(-1).view(torch.uint8)[::4096].zero_()  # touched
    for r in range(rounds + 1):
        b.sync()
        t0 = time.perf_counter()
        for p, t in zip(pinned, ts):
            p.copy_(t, non_blocking=True)
        b.stream_done()
        if r:
            b.record("d2h_block", time.perf_counter() - t0)
    del pinned

    # --- async saves -----------------------------------------------------------------------------
    stager = None
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        stager = DefaultStager(StagingOptions(use_pinned_memory=b.cuda, use_shared_memory=False,
                                              use_async_staging=True, use_non_blocking_copy=b.cuda))
        dcp_how = "DefaultStager(pinned, shared memory off, async staging)"
    except ImportError:
        dcp_how = "dcp.async_save's default stager (no DefaultStager in this PyTorch)"
    b.notes.append(f"dcp.async_save: {dcp_how}, one stager reused across saves")

    def dsd_async(name):
        b.sync()
        t0 = time.perf_counter()
        fut = dsd.async_save(sd, b.path(name))
        b.stream_done()
        block = time.perf_counter() - t0
        fut.result()
        return block

    def dcp_async(name):
        b.sync()
        t0 = time.perf_counter()
        kw = {"async_stager": stager} if stager is not None else {}
        resp = dcp.async_save(sd, checkpoint_id=b.path(name), **kw)
        staging = getattr(resp, "staging_completion", None)
        if staging is not None:
            staging.result()
        b.stream_done()
        block = time.perf_counter() - t0
        (getattr(resp, "upload_completion", None) or resp).result()
        return block

    for r in range(rounds + 1):  # round 0 warms up (buffers, threads)
        t_round = time.perf_counter()
        for name, fn in (("dsd_async_block", dsd_async), ("dcp_async_block", dcp_async)):
            block = fn(f"{name}{r}")
            b.drop(f"{name}{r}")
            if r:
                b.record(name, block)
        if r >= 1 and r < rounds and late(0.45, time.perf_counter() - t_round):
            b.notes.append(f"async saves: {r} timed rounds (time budget)")
            break
    if stager is not None and hasattr(stager, "close"):
        stager.close()

    # --- saves and loads into CUDA tensors ----------------------------------------------------
    dst = map_tensors(torch, sd, torch.empty_like)
    tc = None
    try:
        import torch_checkpointing as tc  # noqa: F401 - optional peer
        if not (hasattr(tc, "save") and hasattr(tc, "load")):
            b.notes.append("torch_checkpointing is importable but has no save/load: not compared")
            tc = None
    except ImportError:
        b.notes.append("torch_checkpointing is not installed: its figures are absent")
    savers = {
        "dsd_save": lambda p: dsd.save(sd, p),
        "dcp_save": lambda p: dcp.save(sd, checkpoint_id=p),
    }
    loaders = {
        "dsd_load": lambda p: dsd.load(dst, p),
        "dcp_load": lambda p: dcp.load(dst, checkpoint_id=p),
    }
    if tc is not None:
        savers["tc_save"] = lambda p: tc.save(sd, p)
        loaders["tc_load"] = lambda p: tc.load(dst, p)
    kept = {}
    for r in range(rounds):
        t_round = time.perf_counter()
        for name, fn in savers.items():
            os.sync()
            b.sync()
            t0 = time.perf_counter()
            fn(b.path(f"{name}{r}"))
            b.sync()
            b.record(name, time.perf_counter() - t0)
            load_name = name.replace("_save", "_load")
            if load_name in kept:
                b.drop(os.path.basename(kept[load_name]))
            kept[load_name] = b.path(f"{name}{r}")  # the latest is what the loads read
        if r + 1 < rounds and late(0.80, time.perf_counter() - t_round):
            b.notes.append(f"saves: {r + 1} rounds (time budget)")
            break
    for name, path in kept.items():  # warm: every file read once before timing
        for root, _, files in os.walk(path):
            for f in files:
                with open(os.path.join(root, f), "rb") as fh:
                    while fh.read(1 << 24):
                        pass
    for r in range(rounds):
        t_round = time.perf_counter()
        for name, fn in loaders.items():
            b.sync()
            t0 = time.perf_counter()
            fn(kept[name])
            b.sync()
            b.record(name, time.perf_counter() - t0)
        if r + 1 < rounds and late(0.97, time.perf_counter() - t_round):
            b.notes.append(f"loads: {r + 1} rounds (time budget)")
            break
    ok = all(torch.equal(a.view(-1).view(torch.uint8), c.view(-1).view(torch.uint8))
             for a, c in zip(tensors(torch, sd), tensors(torch, dst)))
    if not ok:
        b.notes.append("WARNING: the last load did not restore the saved tensors bitwise")
    shutil.rmtree(b.scratch, ignore_errors=True)

    # --- figures ----------------------------------------------------------------------------------
    best = {k: min(v) for k, v in b.times.items() if k.endswith("_block")}
    med = {k: statistics.median(v) for k, v in b.times.items()}
    fig: dict[str, float] = {}

    def ratio(name, num, den, table):
        if num in table and den in table and table[den] > 0:
            fig[name] = round(table[num] / table[den], 3)

    ratio("gpu.async_block_vs_d2h", "dsd_async_block", "d2h_block", best)
    ratio("gpu.async_block_vs_dcp", "dsd_async_block", "dcp_async_block", best)
    ratio("gpu.save_vs_dcp", "dcp_save", "dsd_save", med)
    ratio("gpu.load_vs_dcp", "dcp_load", "dsd_load", med)
    ratio("gpu.save_vs_torch_checkpointing", "tc_save", "dsd_save", med)
    ratio("gpu.load_vs_torch_checkpointing", "tc_load", "dsd_load", med)
    fig["gpu.d2h_gbps"] = round(nbytes / best["d2h_block"] / 1e9, 2)
    fig["gpu.load_gbps"] = round(nbytes / med["dsd_load"] / 1e9, 2)

    for name in sorted(b.times):
        xs = b.times[name]
        say(f"{name:18} {'min' if name.endswith('_block') else 'median'} "
            f"{(best if name.endswith('_block') else med)[name]:8.3f}s   runs {', '.join(f'{x:.3f}' for x in xs)}")
    met = 0
    targeted = 0
    print(f"\n  {'figure':34} {'value':>9}   target")
    for name in sorted(fig):
        goal = TARGETS.get(name)
        if goal:
            targeted += 1
            meets = fig[name] <= goal[0] if goal[1] == "<=" else fig[name] >= goal[0]
            met += meets
            print(f"  {name:34} {fig[name]:9.3f}   {goal[1]} {goal[0]:<5} {'meets' if meets else 'MISSES'}")
        else:
            print(f"  {name:34} {fig[name]:9.3f}   (no target)")
    for n in b.notes:
        print(f"  note: {n}")

    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_description(torch, b.cuda),
        "state_dict": f"{len(ts)} tensors, {nbytes} bytes (Llama-3-8B layers: bf16 weights, fp32 moments)",
        "rounds": rounds,
        "budget_s": budget,
        "smoke": not b.cuda,
        "figures": fig,
        "targets": {k: f"{v[1]} {v[0]}" for k, v in TARGETS.items()},
        "times_s": {k: [round(x, 4) for x in v] for k, v in b.times.items()},
        "notes": b.notes,
        "restored_bitwise": ok,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(f"bench_gpu: {len(fig)} figures, {met} of {targeted} targets met, {nbytes / (1 << 30):.2f} GiB, "
          f"{time.perf_counter() - t_start:.0f}s -> {args.out}")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", default=os.path.join(REPO, "build"))
    p.add_argument("--out", default=os.path.join(HERE, "gpu_results.json"))
    p.add_argument("--gib", type=float, default=8.0, help="state dict size in GiB (default 8)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget", type=float, help="seconds available: fewer rounds, then less data")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a smoke pass of the same code on host tensors (figures meaningless)")
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
