"""Planning at scale: dsd's coordinator work for N simulated ranks against PyTorch DCP's on the
same inputs, in the same run (issue 13).

Inputs: the local save plans of N ranks holding a Llama-3-70B-shaped model (vocab 128256,
hidden 8192, 80 layers, FFN 28672, 8 KV heads) + AdamW state (exp_avg, exp_avg_sq fp32 and a
replicated scalar step per parameter): 2892 tensors per rank, metadata only, as FSDP (Shard(0)
over N; torch.chunk pieces, empty shards included) and HSDP (mesh (8 replicate) x (N/8 shard)).

dsd (build/bench/bench_scale, each N in its own process): GlobalPlanner (dedup, byte balance,
validation, files), the manifest (merging every rank's write results + serialising
checkpoint.json), and the load plan of a reshard to N/2 ranks (the ReadItems of all N/2
ranks). DCP (each N in its own Python process): the plans are built as
create_default_local_save_plan builds them (WriteItem/MetadataIndex/TensorWriteData/
ChunkStorageMetadata/TensorProperties, one planner_data mapping per plan), then
DefaultSavePlanner().create_global_plan(plans) is timed: dedup_save_plans,
create_default_global_save_plan (the Metadata) and _validate_global_plan, what dcp.save's
coordinator runs. Then, as FileSystemWriter.finish does, the write results are merged into
metadata.storage_data and the Metadata is pickled (.metadata bytes).

Figures:
  scale.global_plan_vs_dcp_4k       DCP create_global_plan seconds / dsd global plan seconds,
                                    FSDP at 4096 ranks (>= 10)
  scale.global_plan_growth_4k_16k   dsd global plan seconds at 16384 / at 4096, FSDP (<= 4.5:
                                    linear in ranks is 4)
  scale.manifest_bytes_per_rank_16k checkpoint.json bytes / ranks, FSDP at 16384
  scale.load_plan_16k_to_8k_s       seconds to plan the reads of all 8192 ranks loading the
                                    16384-rank FSDP checkpoint (one process, one thread)
  scale.cached_plan_speedup_4k      dsd global plan seconds / seconds of the next save's cache
                                    hit (enable_plan_caching: rank 0's fingerprint of its plan +
                                    the coordinator decoding 4096 summaries and reusing the
                                    plan), FSDP at 4096 (--quick: _1k at 1024), same process; the
                                    full side leaves out parsing the gathered plans (>= 100)
  raw, per N and mesh: scale.dsd_global_plan_s.N, scale.dcp_global_plan_s.N (FSDP; the HSDP ones
  carry .hsdp), scale.dsd_peak_mb.N, scale.dcp_peak_mb.N, scale.dsd_manifest_s.N,
  scale.dcp_metadata_bytes_per_rank.N ...
DCP runs up to 4096 ranks (--quick: 1024): at 4096 it holds 11.8M WriteItems (~11 GB of Python
objects); at 16384 it would need ~4x that, beyond this 24 GiB machine. DCP's create_global_plan
is stopped after --dcp-cap-s (1200 s): its _validate_global_plan sweeps along each tensor's
largest dimension, so for the [8192, 28672] w2 and [1024, 8192] wk/wv weights sharded on dim 0
every chunk stays in the sweep's active list and the check is quadratic in the ranks. A capped
time is a lower bound (scale.dcp_global_plan_capped.N = 1, and the ratio then carries
_is_lower_bound = 1).
"""
from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import time

TARGETS = {
    "scale.global_plan_vs_dcp_4k": (10, ">=", "DCP create_global_plan s / dsd global plan s, FSDP 4096 ranks, Llama-3-70B + AdamW"),
    "scale.global_plan_growth_4k_16k": (4.5, "<=", "dsd global plan s at 16384 ranks / at 4096 (linear = 4)"),
    "scale.manifest_bytes_per_rank_16k": (1 << 20, "<=", "checkpoint.json bytes per rank, FSDP 16384 ranks"),
    "scale.load_plan_16k_to_8k_s": (60, "<=", "s to plan the reads of all 8192 ranks of a 16384 -> 8192 reshard"),
    "scale.cached_plan_speedup_4k": (100, ">=", "dsd global plan s / plan-cache hit s (fingerprint + reuse), FSDP 4096 ranks"),
}

VOCAB, DIM, LAYERS, FFN, KV = 128256, 8192, 80, 28672, 1024
MEM_LIMIT_GB = 16


def llama3_70b() -> list[tuple[str, tuple[int, ...]]]:
    p = [("tok_embeddings.weight", (VOCAB, DIM))]
    for i in range(LAYERS):
        l = f"layers.{i}."
        p += [(l + "attention.wq.weight", (DIM, DIM)), (l + "attention.wk.weight", (KV, DIM)),
              (l + "attention.wv.weight", (KV, DIM)), (l + "attention.wo.weight", (DIM, DIM)),
              (l + "feed_forward.w1.weight", (FFN, DIM)), (l + "feed_forward.w2.weight", (DIM, FFN)),
              (l + "feed_forward.w3.weight", (FFN, DIM)), (l + "attention_norm.weight", (DIM,)),
              (l + "ffn_norm.weight", (DIM,))]
    return p + [("norm.weight", (DIM,)), ("output.weight", (VOCAB, DIM))]


def state_dict_tensors() -> list[tuple[str, tuple, tuple[int, ...], bool]]:
    """(flat key, path, global shape, sharded) in the order bench_scale.cpp uses."""
    params = llama3_70b()
    out = [("model." + fqn, ("model", fqn), shape, True) for fqn, shape in params]
    for fqn, shape in params:
        for s in ("exp_avg", "exp_avg_sq"):
            out.append((f"optim.state.{fqn}.{s}", ("optim", "state", fqn, s), shape, True))
        out.append((f"optim.state.{fqn}.step", ("optim", "state", fqn, "step"), (), False))
    return out


def chunk_span(size: int, pieces: int, index: int) -> tuple[int, int]:
    """torch.chunk's piece `index` of `pieces` along a dim of `size`: (length, offset); an
    empty piece sits at offset `size`, as compute_local_shape_and_global_offset reports it."""
    full = -(-size // pieces)
    start = full * index
    if start >= size:
        return 0, size
    return min(full, size - start), start


def dcp_one(n: int, kind: str, cap_s: int = 1200) -> dict:
    """One DCP case, in this (fresh) process."""
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult

    tensors = state_dict_tensors()
    shard = n if kind == "fsdp" else n // 8
    props = {key: TensorProperties(dtype=torch.float32) for key, *_ in tensors}
    sizes = {key: torch.Size(shape) for key, _, shape, _ in tensors}
    mapping = {key: path for key, path, *_ in tensors}
    t0 = time.perf_counter()
    plans = []
    for r in range(n):
        s = r % shard
        items = []
        for key, _, shape, sharded in tensors:
            if sharded:
                length, off = chunk_span(shape[0], shard, s)
                offsets = torch.Size((off,) + (0,) * (len(shape) - 1))
                chunk_sizes = torch.Size((length,) + shape[1:])
                kind_ = WriteItemType.SHARD
            else:
                offsets = torch.Size((0,) * len(shape))
                chunk_sizes = sizes[key]
                kind_ = WriteItemType.TENSOR
            items.append(WriteItem(index=MetadataIndex(key, offsets), type=kind_,
                                   tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offsets, sizes=chunk_sizes),
                                                               properties=props[key], size=sizes[key])))
        plans.append(SavePlan(items, planner_data=mapping))
    build_s = time.perf_counter() - t0
    out = {"n": n, "mesh": kind, "local_items": n * len(tensors), "local_plans_build_s": build_s}
    planner = DefaultSavePlanner()

    class Capped(Exception):
        pass

    def stop(*_):
        raise Capped

    signal.signal(signal.SIGALRM, stop)
    signal.alarm(cap_s)
    t0 = time.perf_counter()
    try:
        global_plan, metadata = planner.create_global_plan(plans)
    except Capped:
        # _validate_global_plan sweeps along the largest dimension: for [8192, 28672] and
        # [1024, 8192] weights sharded on dim 0 every chunk stays open, O(chunks^2) each.
        out["global_plan_s_at_least"] = time.perf_counter() - t0
        out["capped_after_s"] = cap_s
        return out
    finally:
        signal.alarm(0)
    out["global_plan_s"] = time.perf_counter() - t0
    out["written_items"] = sum(len(p.items) for p in global_plan)
    del plans
    # FileSystemWriter.finish: every rank's WriteResults into metadata.storage_data, pickled.
    try:
        results = []
        for r, p in enumerate(global_plan):
            pos, rel = 0, f"__{r}_0.distcp"
            res = []
            for item in p.items:
                length = item.tensor_storage_size()
                res.append(WriteResult(index=item.index, size_in_bytes=length,
                                       storage_data=_StorageInfo(rel, pos, length)))
                pos += length
            results.append(res)
        t0 = time.perf_counter()
        storage_md = {}
        for wr_list in results:
            storage_md.update({wr.index: wr.storage_data for wr in wr_list})
        metadata.storage_data = storage_md
        blob = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
        out["metadata_s"] = time.perf_counter() - t0
        out["metadata_bytes"] = len(blob)
    except MemoryError:
        out["metadata_error"] = f"out of memory under {MEM_LIMIT_GB} GiB"
    return out


def run_dcp(n: int, kind: str, cap_s: int = 1200) -> dict:
    """dcp_one in a fresh Python process (its own peak RSS), under an address-space limit."""
    code = (f"import resource,sys,json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r});"
            f"resource.setrlimit(resource.RLIMIT_AS, ({MEM_LIMIT_GB} << 30, {MEM_LIMIT_GB} << 30));"
            f"import bench_scale as b\n"
            f"try:\n  out = b.dcp_one({n}, {kind!r}, {cap_s})\n"
            f"except MemoryError:\n  out = {{'n': {n}, 'mesh': {kind!r}, 'error': 'out of memory under {MEM_LIMIT_GB} GiB'}}\n"
            f"print(json.dumps(out))")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=cap_s + 3600)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    try:
        out = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        out = {"n": n, "mesh": kind, "error": f"exit {p.returncode}: {p.stderr[-300:]}"}
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: exact when this one is larger.
    out["peak_rss_mb"] = peak / 1024 if peak > before else None
    return out


def run_dsd(args, ns: list[int], cached_ns: list[int]) -> tuple[list[dict], list[dict]]:
    """build/bench/bench_scale: every N, FSDP and HSDP, each in its own process; then the plan
    cache hit against the full plan at each of `cached_ns` (FSDP)."""
    exe = os.path.join(args.build, "bench", "bench_scale")
    p = subprocess.run([exe, "--n", ",".join(map(str, ns)), "--mesh", "fsdp,hsdp",
                        "--mem-limit-gb", str(MEM_LIMIT_GB), "--cached-n", ",".join(map(str, cached_ns))],
                       check=True, capture_output=True, text=True)
    out = json.loads(p.stdout)
    return out["cases"], out["cached"]


def bench_scale(args) -> dict[str, float]:
    cap_s = getattr(args, "dcp_cap_s", 1200)
    ns = [256, 1024] if args.quick else [256, 1024, 4096, 16384]
    dcp_ns = [n for n in ns if n <= 4096]
    cached_n = 1024 if args.quick else 4096
    dsd, cached = run_dsd(args, ns, [cached_n])
    dcp = []
    for kind in ("fsdp", "hsdp"):
        for n in dcp_ns:
            c = run_dcp(n, kind, cap_s)
            print("  dcp", json.dumps(c), flush=True)
            dcp.append(c)
    fig: dict[str, float] = {}
    by = {}
    for side, cases in (("dsd", dsd), ("dcp", dcp)):
        for c in cases:
            print(f"  {side} {c['mesh']} n={c['n']}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(c.items())
                if k not in ("n", "mesh")), flush=True)
            if "error" in c:
                continue
            if "global_plan_s_at_least" in c:  # DCP stopped at the cap: its time is a lower bound
                c["global_plan_s"] = c["global_plan_s_at_least"]
            by[(side, c["mesh"], c["n"])] = c
            sfx = f"{c['n']}" + ("" if c["mesh"] == "fsdp" else ".hsdp")
            fig[f"scale.{side}_global_plan_s.{sfx}"] = round(c["global_plan_s"], 4)
            if "capped_after_s" in c:
                fig[f"scale.{side}_global_plan_capped.{sfx}"] = 1
            if c.get("peak_rss_mb"):
                fig[f"scale.{side}_peak_mb.{sfx}"] = round(c["peak_rss_mb"], 1)
            if side == "dsd":
                fig[f"scale.dsd_manifest_s.{sfx}"] = round(c["manifest_s"], 4)
                fig[f"scale.dsd_manifest_bytes_per_rank.{sfx}"] = round(c["manifest_bytes_per_rank"])
                fig[f"scale.dsd_load_plan_s.{sfx}"] = round(c["load_plan_s"], 4)
            elif "metadata_bytes" in c:
                fig[f"scale.dcp_metadata_s.{sfx}"] = round(c["metadata_s"], 4)
                fig[f"scale.dcp_metadata_bytes_per_rank.{sfx}"] = round(c["metadata_bytes"] / c["n"])
    for c in cached:
        print("  dsd plan cache: " + json.dumps(c), flush=True)
        if "error" not in c:
            sfx = "4k" if c["n"] == 4096 else f"{c['n'] // 1024}k"
            fig[f"scale.cached_plan_speedup_{sfx}"] = round(c["cached_plan_speedup"], 1)
            fig[f"scale.dsd_cached_plan_s.{c['n']}"] = round(c["cached_plan_s"] + c["fingerprint_rank0_s"], 5)
    top = max(dcp_ns)
    for kind, sfx in (("fsdp", ""), ("hsdp", ".hsdp")):
        a, b = by.get(("dcp", kind, top)), by.get(("dsd", kind, top))
        if a and b:
            name = "scale.global_plan_vs_dcp_4k" if top == 4096 else f"scale.global_plan_vs_dcp_{top}"
            fig[name + sfx] = round(a["global_plan_s"] / b["global_plan_s"], 2)
            if "capped_after_s" in a:
                fig[name + sfx + "_is_lower_bound"] = 1
        lo, hi = by.get(("dsd", kind, 4096)), by.get(("dsd", kind, 16384))
        if lo and hi:
            fig["scale.global_plan_growth_4k_16k" + sfx] = round(hi["global_plan_s"] / lo["global_plan_s"], 3)
        if hi:
            fig["scale.manifest_bytes_per_rank_16k" + sfx] = round(hi["manifest_bytes_per_rank"])
            fig["scale.load_plan_16k_to_8k_s" + sfx] = round(hi["load_plan_s"], 3)
    return fig


GROUPS = {"scale": bench_scale}

if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dcp-one", nargs=2, metavar=("N", "MESH"), help="run one DCP case here and print it")
    ap.add_argument("--dcp-cap-s", type=int, default=1200, help="stop DCP's create_global_plan after this long")
    a = ap.parse_args()
    if a.dcp_one:
        print(json.dumps(run_dcp(int(a.dcp_one[0]), a.dcp_one[1], a.dcp_cap_s)))
    else:
        print(json.dumps(bench_scale(a), indent=1))
