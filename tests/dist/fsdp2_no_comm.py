"""The FSDP2 flow of a PyTorch user, with no communicator argument anywhere (issue 12), on 2
ranks over Gloo (CPU), under torchrun:

    torchrun --standalone --nproc-per-node 2 fsdp2_no_comm.py OUT_DIR

fully_shard on a small MLP, one Adam step; dsd.get_state_dict(model, optim);
dsd.save({"model": msd, "optim": osd}, path) and dsd.load back into zeroed copies, bitwise;
dsd.async_save; dsd.CheckpointManager(root, keep_last=2) save and load_latest. Every call
runs over one process communicator, built from torchrun's environment by the first call that
needs it and reused by all the others; the atexit hook closes it after the async saves.
Exits non-zero on the first failure; prints "fsdp2 no-comm flow ok" per rank.
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import dsd
from dsd import _checkpoint, _dist


def zeros_like_tree(obj):
    """The same structure with every tensor (DTensor: its local shard) zeroed, other values
    replaced by a sentinel of their type, so a load must bring everything back."""
    if isinstance(obj, dict):
        return {k: zeros_like_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(zeros_like_tree(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        return torch.zeros_like(obj)
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, (int, float)):
        return type(obj)(-1)
    return obj


def leaves(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{path}.{i}")
    else:
        yield path, obj


def assert_bitwise(got, want, what: str) -> None:
    g, w = dict(leaves(got)), dict(leaves(want))
    assert g.keys() == w.keys(), f"{what}: keys {sorted(g.keys() ^ w.keys())}"
    for key, a in w.items():
        b = g[key]
        if isinstance(a, torch.Tensor):
            assert isinstance(b, DTensor) == isinstance(a, DTensor), f"{what}: {key} lost its DTensor form"
            if isinstance(a, DTensor):
                assert b.placements == a.placements and b.device_mesh == a.device_mesh, key
                a, b = a.to_local(), b.to_local()
            assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {key}"
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), \
                f"{what}: {key} differs"
        else:
            assert a == b and type(a) is type(b), f"{what}: {key}: {b!r} != {a!r}"


def main() -> int:
    out = sys.argv[1]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    optim.step()

    assert _dist._PROCESS_COMM is None
    msd, osd = dsd.get_state_dict(model, optim)
    comm = _dist._PROCESS_COMM  # made from torchrun's environment by the first call
    assert comm is not None and (comm.rank, comm.size) == (rank, world), comm
    assert any(isinstance(v, DTensor) for _, v in leaves(msd)), "FSDP2 gave no DTensors"
    state = {"model": msd, "optim": osd}

    path = os.path.join(out, "ck")
    dsd.save(state, path)  # no comm=
    assert _dist._PROCESS_COMM is comm, "save made another communicator"
    dsd.verify(path)
    back = zeros_like_tree(state)
    report = dsd.load(back, path)
    assert not report.missing_keys and not report.unexpected_keys, report
    assert_bitwise(back, state, "save/load")
    assert _dist._PROCESS_COMM is comm

    apath = os.path.join(out, "async")
    future = dsd.async_save(state, apath)
    future.result(timeout=120)
    future.close()
    back = zeros_like_tree(state)
    dsd.load(back, apath)
    assert_bitwise(back, state, "async_save/load")
    assert comm.async_checkpointer is not None, "async_save did not use the process communicator"

    root = os.path.join(out, "steps")
    with dsd.CheckpointManager(root, keep_last=2) as manager:
        assert manager.comm is comm, manager.comm
        for step in (10, 20, 30):
            manager.save(state, step)
        assert manager.latest_step() == 30
        back = zeros_like_tree(state)
        assert manager.load_latest(back) == 30
        assert_bitwise(back, state, "manager")
        manager.async_save(state, 40).result(timeout=120)
        assert manager.latest_step() == 40
    dist.barrier()
    assert sorted(os.listdir(root)) == ["latest", "step_30", "step_40"], os.listdir(root)

    # The state dict functions reuse it too; a load through them brings the state back.
    msd2, osd2 = dsd.get_state_dict(model, optim)
    assert_bitwise(msd2, msd, "get_state_dict again")
    assert _dist._PROCESS_COMM is comm

    # What runs at exit: the async saves are waited for, then the communicator is closed.
    dsd.async_save(state, os.path.join(out, "at_exit"))
    _checkpoint._close_all()
    assert comm.closed and _dist._PROCESS_COMM is None
    dist.barrier()
    dsd.verify(os.path.join(out, "at_exit"))
    print(f"rank {rank}: fsdp2 no-comm flow ok", flush=True)
    dist.barrier()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # PyTorch 2.13's Gloo teardown aborts some exits; the work is done and checked.
    os._exit(code)
