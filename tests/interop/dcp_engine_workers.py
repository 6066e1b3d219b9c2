"""Worker processes for test_dcp_engine.py: dcp.save / dcp.load by PyTorch and dsd.save /
dsd.load by dsd, at several world sizes over Gloo, on DTensors, plain tensors and values.

Spawned with torch.multiprocessing; each worker joins a file-store torch process group and a
file-store dsd communicator, builds the same global state from a fixed seed (global_state),
keeps its piece of each distributed entry (PLACEMENTS) and saves or loads.
"""
import datetime
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

TIMEOUT = datetime.timedelta(seconds=120)


def global_state():
    """The full state every test compares against: deterministic."""
    g = torch.Generator().manual_seed(7)
    return {
        "model": {
            "w": torch.randn(10, 3, generator=g),  # Shard(0): uneven over 3 and 4 ranks
            "few": torch.randn(3, 2, generator=g),  # Shard(0): an empty shard at world 4
            "col": torch.randn(4, 9, generator=g),  # Shard(1)
            "rep": torch.randn(6, generator=g),  # Replicate
            "bf16": torch.randn(8, generator=g).to(torch.bfloat16),
            "i64": torch.arange(12, dtype=torch.int64).reshape(4, 3),
            "f64": torch.randn(7, 2, generator=g, dtype=torch.float64),
            "plain": torch.randn(5, generator=g),  # a plain tensor on every rank
            "scalar": torch.tensor(3.5),
        },
        "optim": {"step": 7, "lr": 0.25, "betas": (0.9, 0.999), "names": ["a", "b"], "note": "text",
                  "blob": b"\x00\xff", "none": None, "flag": True},
    }


# The entries that are DTensors; the rest are plain tensors or values on every rank.
PLACEMENTS = {"w": Shard(0), "few": Shard(0), "col": Shard(1), "rep": Replicate(), "bf16": Shard(0),
              "i64": Shard(0), "f64": Shard(0)}


def zeroed(state):
    out = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
           "optim": {k: None for k in state["optim"]}}
    return out


def sharded(mesh, state):
    model = {}
    for k, v in state["model"].items():
        model[k] = distribute_tensor(v, mesh, [PLACEMENTS[k]]) if k in PLACEMENTS else v
    return {"model": model, "optim": dict(state["optim"])}


def full(state):
    return {"model": {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in state["model"].items()},
            "optim": state["optim"]}


def _init(rank, world, store):
    warnings.simplefilter("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{store}.torch", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    return init_device_mesh("cpu", (world,))


def _dsd_comm(rank, world, store):
    import dsd
    return dsd.Communicator.file_store(f"{store}.dsd", rank, world, timeout=TIMEOUT)


def dcp_save_worker(rank, world, store, checkpoint, use_collectives=True):
    mesh = _init(rank, world, store)
    try:
        dcp.save(sharded(mesh, global_state()), checkpoint_id=checkpoint, use_collectives=use_collectives)
    finally:
        dist.destroy_process_group()


def dsd_load_worker(rank, world, store, checkpoint, results):
    """dsd.load into a zeroed sharded state; saves the full tensors it got, per rank."""
    import dsd
    mesh = _init(rank, world, store)
    try:
        comm = _dsd_comm(rank, world, store)
        state = sharded(mesh, zeroed(global_state()))
        locals_before = {k: v._local_tensor.data_ptr() for k, v in state["model"].items()
                         if isinstance(v, DTensor) and v._local_tensor.numel() > 0}
        report = dsd.load(state, checkpoint, comm=comm)
        assert report.missing_keys == [] and report.unexpected_keys == [], report
        for k, ptr in locals_before.items():  # in place: the same local tensors were written
            assert state["model"][k]._local_tensor.data_ptr() == ptr, k
        torch.save(full(state), os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def dsd_save_worker(rank, world, store, checkpoint, fmt):
    import dsd
    mesh = _init(rank, world, store)
    try:
        comm = _dsd_comm(rank, world, store)
        dsd.save(sharded(mesh, global_state()), checkpoint, format=fmt, comm=comm)
    finally:
        dist.destroy_process_group()


def dcp_load_worker(rank, world, store, checkpoint, results):
    mesh = _init(rank, world, store)
    try:
        state = sharded(mesh, zeroed(global_state()))
        dcp.load(state, checkpoint_id=checkpoint)
        torch.save(full(state), os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def dsd_error_worker(rank, world, store, checkpoint, results, case):
    """A load that fails on one rank only: every rank must get the same error."""
    import dsd
    mesh = _init(rank, world, store)
    try:
        comm = _dsd_comm(rank, world, store)
        state = sharded(mesh, zeroed(global_state()))
        if case == "missing" and rank == 1:
            state["model"]["extra"] = torch.zeros(2)
        if case == "shape" and rank == world - 1:
            state["model"]["plain"] = torch.zeros(6)
        try:
            dsd.load(state, checkpoint, comm=comm)
            outcome = "ok"
        except dsd.Error as e:
            outcome = f"{type(e).__name__}: {e}"
        with open(os.path.join(results, f"rank{rank}.txt"), "w") as f:
            f.write(outcome)
    finally:
        dist.destroy_process_group()
