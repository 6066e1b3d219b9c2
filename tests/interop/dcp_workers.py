"""Worker processes for test_formats.py: DCP saves and loads at world size 4 over Gloo.

Spawned with torch.multiprocessing; each worker joins a file-store process group, builds the
same global state from a fixed seed (global_state), keeps its Shard(0) piece of each
distributed entry, and runs dcp.save or dcp.load.
"""
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

WORLD = 4


def global_state():
    """The full (unsharded) state every test compares against: deterministic."""
    g = torch.Generator().manual_seed(1234)
    return {
        "model": {
            "w": torch.randn(10, 3, generator=g),  # 10 rows over 4 ranks: 3, 3, 3, 1
            "few": torch.randn(3, 2, generator=g),  # 3 rows over 4 ranks: one rank holds none
            "bf16": torch.randn(8, generator=g).to(torch.bfloat16),
            "i64": torch.arange(12, dtype=torch.int64).reshape(4, 3),
            "plain": torch.randn(5, generator=g),  # a replicated plain tensor on every rank
        },
        "optim": {"step": 7, "lr": 0.25, "betas": (0.9, 0.999), "names": ["a", "b"], "note": "text"},
    }


# The entries sharded with Shard(0); the rest are plain tensors or values on every rank.
SHARDED = ("w", "few", "bf16", "i64")


def _init(rank, store_path):
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    return init_device_mesh("cpu", (WORLD,))


def _sharded_state(mesh, state):
    model = {}
    for k, v in state["model"].items():
        model[k] = distribute_tensor(v, mesh, [Shard(0)]) if k in SHARDED else v
    return {"model": model, "optim": dict(state["optim"])}


def save_worker(rank, store_path, checkpoint):
    mesh = _init(rank, store_path)
    try:
        dcp.save(_sharded_state(mesh, global_state()), checkpoint_id=checkpoint)
    finally:
        dist.destroy_process_group()


def load_worker(rank, store_path, checkpoint, result_dir):
    """Loads `checkpoint` into a zeroed sharded state and saves what it got, per rank."""
    mesh = _init(rank, store_path)
    try:
        zero = global_state()
        zero["model"] = {k: torch.zeros_like(v) for k, v in zero["model"].items()}
        zero["optim"] = {k: None for k in zero["optim"]}
        state = _sharded_state(mesh, zero)
        dcp.load(state, checkpoint_id=checkpoint)
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in state["model"].items()}
        torch.save({"model": full, "optim": state["optim"]}, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
