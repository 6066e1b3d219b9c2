"""PyTorch DTensors through dsd and back, on 4 ranks over Gloo (CPU), under torchrun:

    torchrun --standalone --nproc-per-node 4 dtensor_roundtrip.py

torch.distributed and dsd share torchrun's store. For DTensors from distribute_tensor on 1-d
and 2-d meshes (HSDP, FSDP+TP, [Shard(0), Shard(0)], uneven and empty shards, a sub-mesh) and
from fully_shard: the dsd layout's local chunk equals compute_local_shape_and_global_offset
on the real mesh; the local tensor is shared, not copied; the DTensor that comes back has the
same mesh object, placements, shape and stride, and its full tensor equals the original. The
same through StateDict.from_python / to_python. Exits non-zero on the first failure.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

import dsd


def check_round_trip(dt: DTensor, comm: dsd.Communicator, what: str) -> None:
    local, layout = dsd.from_dtensor(dt, comm)
    want_shape, want_offset = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
    offsets, sizes = layout.local_chunk()
    assert sizes == tuple(want_shape), f"{what}: dsd sizes {sizes}, PyTorch {want_shape}"
    assert offsets == tuple(want_offset), f"{what}: dsd offsets {offsets}, PyTorch {want_offset}"
    assert layout.global_shape == tuple(dt.shape)
    mesh = dt.device_mesh
    assert layout.mesh.ranks == tuple(mesh.mesh.flatten().tolist())
    assert layout.mesh.shape == tuple(mesh.mesh.shape)
    assert layout.mesh.device_type == mesh.device_type
    if dt._local_tensor.numel() > 0:
        assert local.to_torch().data_ptr() == dt._local_tensor.data_ptr(), f"{what}: copied"
    back = dsd.to_dtensor(local, layout)
    assert isinstance(back, DTensor)
    assert back.device_mesh is mesh, f"{what}: another mesh object"
    assert tuple(back.placements) == tuple(dt.placements), f"{what}: {back.placements} != {dt.placements}"
    assert back.shape == dt.shape and back.stride() == dt.stride(), f"{what}: {back.shape} {back.stride()}"
    assert back._local_tensor.shape == dt._local_tensor.shape
    if dt._local_tensor.numel() > 0:
        assert back._local_tensor.data_ptr() == dt._local_tensor.data_ptr(), f"{what}: copied back"
    assert torch.equal(back.full_tensor(), dt.full_tensor()), f"{what}: full tensors differ"


def main() -> int:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 4
    comm = dsd.Communicator.from_env(timeout=60)
    assert (comm.rank, comm.size, comm.backend) == (rank, world, "gloo")
    comm.barrier()

    mesh1 = init_device_mesh("cpu", (4,))
    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)  # the same full tensors on every rank
    cases = [
        (mesh1, (7, 3), [Shard(0)]),            # uneven: 2, 2, 2, 1 rows
        (mesh1, (2, 5), [Shard(0)]),            # empty shards on ranks 2 and 3
        (mesh1, (3, 9), [Shard(1)]),
        (mesh1, (4,), [Replicate()]),
        (mesh2, (7, 4), [Replicate(), Shard(0)]),  # HSDP
        (mesh2, (6, 5), [Shard(0), Shard(1)]),     # FSDP + TP
        (mesh2, (5, 2), [Shard(0), Shard(0)]),
        (mesh2, (3, 3), [Shard(1), Replicate()]),
        (mesh2["tp"], (5, 3), [Shard(0)]),         # a sub-mesh: each rank's own row of mesh2
        (mesh1, (), [Replicate()]),                # 0-d
    ]
    dtensors = []
    for i, (mesh, shape, placements) in enumerate(cases):
        full = torch.randn(shape)
        dt = distribute_tensor(full, mesh, placements)
        check_round_trip(dt, comm, f"case {i}: {shape} {placements} on {mesh}")
        dtensors.append(dt)

    # A placement dsd cannot represent is refused, naming the key.
    partial = DTensor.from_local(torch.ones(2), mesh1, [Partial()], run_check=False)
    try:
        dsd.StateDict.from_python({"p": partial}, comm=comm)
        raise AssertionError("a Partial DTensor was accepted")
    except ValueError as e:
        assert "p: DTensor placement" in str(e) and "Partial" in str(e), e
    # Without comm=, a DTensor uses the process's communicator built from the launcher's
    # environment (as dcp.save needs no argument).
    with dsd.StateDict.from_python({"w": dtensors[0]}) as implicit:
        assert implicit is not None

    # fully_shard: parameters are Shard(0) DTensors, uneven and empty where 4 does not divide.
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    fully_shard(model, mesh=mesh1)
    msd = model.state_dict()
    assert all(isinstance(v, DTensor) for v in msd.values())
    for k, v in msd.items():
        check_round_trip(v, comm, f"fully_shard {k}")

    # The same through state dicts, nested, next to plain values; meshes converted once.
    plain = torch.arange(6.0)
    tree = {"model": dict(msd), "extra": {"dt": dtensors, "plain": plain, "step": 3}}
    sd = dsd.StateDict.from_python(tree, comm=comm)
    out = sd.to_python()
    assert out["extra"]["step"] == 3
    assert out["extra"]["plain"].data_ptr() == plain.data_ptr()
    for k, v in msd.items():
        got = out["model"][k]
        assert isinstance(got, DTensor) and got.device_mesh is mesh1 and got.placements == v.placements
        assert got.shape == v.shape and got._local_tensor.shape == v._local_tensor.shape
        if v._local_tensor.numel() > 0:
            assert got._local_tensor.data_ptr() == v._local_tensor.data_ptr()
        assert torch.equal(got.full_tensor(), v.full_tensor())
    for dt, got in zip(dtensors, out["extra"]["dt"]):
        assert got.device_mesh is dt.device_mesh and got.placements == dt.placements and got.shape == dt.shape
        assert torch.equal(got.full_tensor(), dt.full_tensor())

    comm.barrier()
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: dtensor round trip ok", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
