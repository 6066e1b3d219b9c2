"""Runs every benchmark and writes bench/results.json as {"figure": value, ...}.

Each figure is measured against its baseline in the same run (a plain call, memcpy, dd,
PyTorch DCP, torch.save...) and printed as a table with its target. Run with ./run bench;
`--only NAME` runs one group, `--quick` shrinks sizes for a smoke run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# figure -> (target, "<=" or ">=", what it means)
TARGETS = {
    "abi.call_ns": (50, "<=", "trivial C ABI call with a handle lookup, ns"),
    "abi.call_vs_plain": (10, "<=", "handle call (dsd_tensor_info_get) / plain exported fallible call (dsd_comm_rank), same run"),
    "statedict.get_vs_map": (3, "<=", "get_model_state_dict of 10k tensors / building a std::map"),
    "dist.gather_vs_allgather": (0.9, ">=", "full gather at world 4 / raw all-gather of the bytes"),
    "dist.bcast_peak_ratio": (1.3, "<=", "broadcast_from_rank0 peak RSS / (shard + bucket + RSS before)"),
    "dist.sharded_get_us_per_entry": (2, "<=", "sharded get at world 4, us per entry (10k entries)"),
}


def gbench(build: str, exe: str) -> dict[str, float]:
    """Runs a Google Benchmark binary; real time per iteration in ns, by benchmark name."""
    out = subprocess.run([os.path.join(build, "bench", exe), "--benchmark_format=json",
                          "--benchmark_min_time=0.2"], check=True, capture_output=True, text=True).stdout
    data = json.loads(out)
    scale = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}
    return {b["name"]: b["real_time"] * scale[b["time_unit"]] for b in data["benchmarks"]}


def bench_abi(args) -> dict[str, float]:
    t = gbench(args.build, "bench_abi")
    return {
        "abi.call_ns": round(t["BM_TensorInfo"], 2),
        "abi.plain_call_ns": round(t["BM_PlainCall"], 2),
        "abi.plain_exported_call_ns": round(t["BM_PlainExportedCall"], 2),
        "abi.guarded_call_ns": round(t["BM_GuardedCall"], 2),
        "abi.call_vs_plain": round(t["BM_TensorInfo"] / t["BM_GuardedCall"], 2),
        # Informational: against a call that does nothing (no guard, no output).
        "abi.call_vs_abi_version": round(t["BM_TensorInfo"] / t["BM_AbiVersion"], 2),
        "abi.abi_version_ns": round(t["BM_AbiVersion"], 2),
        "abi.stale_handle_ns": round(t["BM_StaleHandle"], 2),
    }


def bench_statedict(args) -> dict[str, float]:
    t = gbench(args.build, "bench_statedict")
    return {
        "statedict.get_vs_map": round(t["BM_GetModelStateDict"] / t["BM_StdMap"], 3),
        "statedict.get_10k_us": round(t["BM_GetModelStateDict"] / 1e3, 1),
    }


def bench_dist(args) -> dict[str, float]:
    """bench_dist on 4 local ranks (tools/dsdrun); rank 0 prints the figures as JSON."""
    out = subprocess.run([os.path.join(args.build, "tools", "dsdrun"), "-n", "4", "--timeout", "900",
                          os.path.join(args.build, "bench", "bench_dist")],
                         check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    for line in out.splitlines():
        line = line.split("] ", 1)[-1]
        if line.startswith("{"):
            return {k: v for k, v in json.loads(line).items() if k != "dist.world"}
    raise RuntimeError(f"bench_dist printed no figures:\n{out[-2000:]}")


GROUPS = {"abi": bench_abi, "statedict": bench_statedict, "dist": bench_dist}


def load_groups():
    """Benchmark groups defined in bench/bench_*.py modules (each exports GROUPS, TARGETS)."""
    sys.path.insert(0, HERE)
    for name in sorted(os.listdir(HERE)):
        if name.startswith("bench_") and name.endswith(".py"):
            mod = importlib.import_module(name[:-3])
            GROUPS.update(getattr(mod, "GROUPS", {}))
            TARGETS.update(getattr(mod, "TARGETS", {}))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", default=os.path.join(REPO, "build"))
    parser.add_argument("--only", action="append", help="run only these groups")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", default=os.path.join(HERE, "results.json"))
    args = parser.parse_args()
    args.build = os.path.abspath(args.build)
    os.environ.setdefault("DSD_LIBRARY", os.path.join(args.build, "capi", "libdsd.so"))
    sys.path.insert(0, os.path.join(REPO, "bindings", "python"))
    load_groups()

    results: dict[str, float] = {}
    if os.path.exists(args.out) and args.only:
        with open(args.out, encoding="utf-8") as f:
            results.update(json.load(f))
    for name, fn in GROUPS.items():
        if args.only and name not in args.only:
            continue
        start = time.time()
        print(f"[bench] {name} ...", flush=True)
        try:
            figures = fn(args)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other groups
            print(f"[bench] {name} failed: {exc!r}", flush=True)
            continue
        results.update(figures)
        print(f"[bench] {name} done in {time.time() - start:.1f}s", flush=True)

    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")

    print(f"\n{'figure':40} {'value':>12} {'target':>10}  meets")
    for fig in sorted(results):
        value = results[fig]
        target = TARGETS.get(fig)
        if target:
            goal, op, _ = target
            ok = value <= goal if op == "<=" else value >= goal
            print(f"{fig:40} {value:12.3f} {op + str(goal):>10}  {'yes' if ok else 'NO'}")
        else:
            print(f"{fig:40} {value:12.3f} {'':>10}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
