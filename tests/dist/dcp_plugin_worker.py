"""dsd.dcp's StorageWriter / StorageReader under PyTorch DCP on 2 ranks over Gloo (CPU), under
torchrun:

    torchrun --standalone --nproc-per-node 2 dcp_plugin_worker.py OUT_DIR

fully_shard (FSDP2) on a small MLP, one Adam step, torch's get_state_dict (DTensors) plus
plain values. dcp.save with dsd.dcp.StorageWriter writes a dsd checkpoint (verify passes);
plain dcp.save writes the reference; dcp.load with dsd.dcp.StorageReader must give what
plain dcp.load gives, bitwise, values included; dcp.async_save with the writer (while the
training thread runs collectives, dsd's included) likewise; the reader also reads the plain DCP checkpoint
and one written by dsd.save. Rank 0 leaves the full model in OUT_DIR/full.pt for the
world-1 reshard check of test_dcp_plugin.py. Prints "dcp plugin ok" per rank.
"""
from __future__ import annotations

import datetime
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import dsd
import dsd.dcp
from dsd import _dist

warnings.filterwarnings("ignore")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))  # 5: uneven shards


def zeros_like_tree(obj):
    """The same structure, tensors (DTensors: their shards) zeroed and numbers changed, so a
    load must bring everything back."""
    if isinstance(obj, dict):
        return {k: zeros_like_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [zeros_like_tree(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return torch.zeros_like(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, tuple)):
        return obj
    if isinstance(obj, (int, float)):
        return type(obj)(-1)
    return obj


def leaves(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{path}.{i}")
    else:
        yield path, obj


def assert_bitwise(got, want, what: str) -> int:
    g, w = dict(leaves(got)), dict(leaves(want))
    assert g.keys() == w.keys(), f"{what}: keys {sorted(g.keys() ^ w.keys())}"
    tensors = 0
    for key, a in w.items():
        b = g[key]
        if isinstance(a, torch.Tensor):
            assert isinstance(b, DTensor) == isinstance(a, DTensor), f"{what}: {key} lost its DTensor form"
            if isinstance(a, DTensor):
                a, b = a.to_local(), b.to_local()
            assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {key}"
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), \
                f"{what}: {key} differs"
            tensors += 1
        else:
            assert a == b and type(a) is type(b), f"{what}: {key}: {b!r} != {a!r}"
    return tensors


def main() -> int:
    out = sys.argv[1]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    optim.step()
    msd, osd = get_state_dict(model, optim)
    assert any(isinstance(v, DTensor) for _, v in leaves(msd)), "FSDP2 gave no DTensors"
    state = {"model": msd, "optim": osd, "extra": {"step": 3, "tag": "run-1", "scale": 0.25}}

    # (1) dcp.save through the writer: a dsd checkpoint that verifies.
    path = os.path.join(out, "dsd")
    dcp.save(state, storage_writer=dsd.dcp.StorageWriter(path))
    dist.barrier()
    assert dsd.detect_format(path) == "dsd", dsd.detect_format(path)
    dsd.verify(path)
    assert dsd.inspect(path)["world_size"] == 2

    # (2) what plain dcp.save / dcp.load round-trip gives is what the reader gives.
    ref = os.path.join(out, "ref")
    dcp.save(state, checkpoint_id=ref)
    want = zeros_like_tree(state)
    dcp.load(want, checkpoint_id=ref)
    got = zeros_like_tree(state)
    dcp.load(got, storage_reader=dsd.dcp.StorageReader(path))
    n = assert_bitwise(got, want, "reader vs plain dcp")
    assert_bitwise(got, state, "reader vs saved state")
    # (5) values, in param_groups and outside.
    assert got["optim"]["param_groups"][0]["lr"] == 1e-2 and got["extra"]["step"] == 3
    # The reader over the plain DCP checkpoint, and over a dsd.save one.
    got = zeros_like_tree(state)
    dcp.load(got, storage_reader=dsd.dcp.StorageReader(ref))
    assert_bitwise(got, want, "reader over a DCP checkpoint")
    native = os.path.join(out, "native")
    dsd.save(state, native)
    got = zeros_like_tree(state)
    dcp.load(got, storage_reader=dsd.dcp.StorageReader(native))
    assert_bitwise(got, want, "reader over a dsd.save checkpoint")

    # (4) dcp.async_save through the writer while the training thread runs collectives.
    apath = os.path.join(out, "async")
    writer = dsd.dcp.StorageWriter(apath)
    # DCP's own planning collectives in its background thread need a group of their own (as
    # PyTorch documents for async_save); the writer's dsd save has its own communicator.
    ckpt_group = dist.new_group(backend="gloo")
    future = dcp.async_save(state, storage_writer=writer, process_group=ckpt_group)
    t = torch.ones(64)
    for _ in range(20):
        dist.all_reduce(t)
    assert t[0].item() == 2.0 ** 20
    # A dsd collective on this thread meanwhile (over the process communicator): the write
    # runs over the writer's own communicator, so the two never interleave.
    assert writer._async_comm is not None and writer._async_comm is not _dist._PROCESS_COMM
    dsd.save(state, os.path.join(out, "during_async"))
    future.result(timeout=120)
    dist.barrier()
    dsd.verify(apath)
    got = zeros_like_tree(state)
    dcp.load(got, storage_reader=dsd.dcp.StorageReader(apath))
    assert_bitwise(got, want, "async_save")
    future = dcp.async_save(state, storage_writer=writer, checkpoint_id=os.path.join(out, "async2"),
                            process_group=ckpt_group)
    future.result(timeout=120)
    writer.close()
    dist.barrier()
    dsd.verify(os.path.join(out, "async2"))

    # (3) the full model, for the world-1 reshard check.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, os.path.join(out, "full.pt"))
    dist.barrier()
    print(f"rank {rank}: dcp plugin ok ({n} tensors)", flush=True)
    dist.barrier()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # PyTorch 2.13's Gloo teardown aborts some exits; the work is done and checked.
    os._exit(code)
