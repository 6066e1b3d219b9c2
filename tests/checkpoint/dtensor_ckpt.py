"""PyTorch DTensors saved through dsd at one world size and loaded into other DTensor
layouts at another, under dsdrun (torch.distributed over Gloo and a dsd communicator share
the launcher's store):

    dsdrun -n 4 python dtensor_ckpt.py save DIR     (also DIR.async, by dsd.async_save)
    dsdrun -n 2 python dtensor_ckpt.py load DIR     (any world size; both)

The full tensors are the same on every rank (seeded); every loaded DTensor's full_tensor()
must equal its full tensor bitwise, and the plain values come back. Prints
"rank R: dtensor SCENARIO ok"; exits non-zero on the first failure.
"""
from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import dsd
from dsd import _capi

# key -> (shape, dtype, placements at save time on a 4-rank world: "1d" mesh or "2d" 2x2)
CASES = {
    "model.w0": ((10, 6), torch.float32, "1d", [Shard(0)]),                  # 3,3,3,1 rows
    "model.hsdp": ((7, 5), torch.bfloat16, "2d", [Replicate(), Shard(0)]),
    "model.cols": ((4, 9), torch.float64, "1d", [Shard(1)]),                 # empty shard on rank 3
    "model.tiny": ((2, 3), torch.int32, "1d", [Shard(0)]),                   # ranks 2, 3 empty
    "model.fsdp_tp": ((6, 5), torch.float16, "2d", [Shard(0), Shard(1)]),
    "model.rep": ((5,), torch.float32, "1d", [Replicate()]),
}
VALUES = {"step": 1234, "lr": 0.01, "name": "adam"}


def full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for key, (shape, dtype, _, _) in CASES.items():
        x = torch.randn(shape, generator=g) * 100
        out[key] = x.to(dtype)
    return out


def nest(flat: dict) -> dict:
    out: dict = {}
    for k, v in flat.items():
        d = out
        parts = k.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def main(scenario: str, path: str) -> int:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = dsd.Communicator.from_env(timeout=60)
    full = full_tensors()
    line = init_device_mesh("cpu", (world,))
    if scenario == "save":
        assert world == 4
        square = init_device_mesh("cpu", (2, 2))
        sd = {k: distribute_tensor(full[k], line if mesh == "1d" else square, pl)
              for k, (_, _, mesh, pl) in CASES.items()}
        sd["plain"] = torch.arange(12.0)
        tree = nest(sd) | dict(VALUES)
        h = dsd.StateDict.from_python(tree, comm)
        _capi.checkpoint_save(comm.ptr, h.ptr, path, _capi.SaveOptions())
        # The same through the communicator's asynchronous checkpointer.
        dsd.async_save(tree, path + ".async", comm=comm).result(timeout=60)
    else:
        # Other layouts at this world size: alternately Shard(1)/Shard(0) and Replicate.
        for source in (path, path + ".async"):
            sd = {}
            for i, (k, (shape, dtype, _, _)) in enumerate(CASES.items()):
                pl = [Replicate()] if i % 3 == 2 else [Shard(1 if len(shape) > 1 and i % 2 == 0 else 0)]
                sd[k] = distribute_tensor(torch.zeros(shape, dtype=dtype), line, pl)
            sd["plain"] = torch.zeros(12)
            tree = nest(sd) | {k: None for k in VALUES}
            if source == path:
                h = dsd.StateDict.from_python(tree, comm)
                _capi.checkpoint_load(comm.ptr, h.ptr, source, _capi.LoadOptions())
                back = h.to_python()
            else:
                dsd.load(tree, source, comm=comm)
                back = tree
            for k in CASES:
                got = sd[k].full_tensor()  # loaded in place into the local shards
                assert torch.equal(got.view(-1).view(torch.uint8) if got.numel() else got,
                                   full[k].view(-1).view(torch.uint8) if got.numel() else full[k]), \
                    f"rank {rank}: {k} ({sd[k].placements}) of {source} differs after the load at world {world}"
            assert torch.equal(sd["plain"], torch.arange(12.0))
            for k, v in VALUES.items():
                assert back[k] == v, f"rank {rank}: value {k} of {source} is {back[k]!r}"
    comm.barrier()
    print(f"rank {rank}: dtensor {scenario} ok", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
