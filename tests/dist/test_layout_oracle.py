"""dsd layouts against PyTorch: on every rank, the local chunk of a dsd layout equals what
PyTorch's `_compute_local_shape_and_global_offset` (plain data: no process group) gives that
rank's coordinate, over many shapes (uneven, empty, 0-d), placements and meshes: 1-d, 2-d
(HSDP [Replicate, Shard(0)], FSDP+TP [Shard(0), Shard(1)], [Shard(0), Shard(0)], ...), 3-d,
and sub-meshes this rank is not part of.

Run on 4 ranks: `dsdrun -n 4 python -m pytest test_layout_oracle.py`. Every rank runs the same
tests in the same order; only the communicator's construction is collective."""
from __future__ import annotations

import itertools
import os

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

import dsd

DIMS = (0, 1, 2, 3, 5, 7, 8)


@pytest.fixture(scope="module")
def comm():
    if "WORLD_SIZE" not in os.environ:
        pytest.skip("run under a launcher: dsdrun -n 4 python -m pytest test_layout_oracle.py")
    c = dsd.Communicator.from_env(timeout=60)
    assert c.size == 4 and c.rank == int(os.environ["RANK"])
    return c


def _torch_placements(ps):
    return [Shard(p[1]) if p[0] == "shard" else Replicate() for p in ps]


def _coordinate(mesh_shape, ranks, rank):
    if rank not in ranks:
        return None
    flat = ranks.index(rank)
    coord = []
    for s in reversed(mesh_shape):
        coord.append(flat % s)
        flat //= s
    return list(reversed(coord))


def _check_all(comm, mesh_shape, ranks, ndims):
    mesh = dsd.DeviceMesh.new(comm, mesh_shape, ranks)
    coord = _coordinate(list(mesh_shape), list(ranks), comm.rank)
    assert mesh.coordinate == (tuple(coord) if coord is not None else None)
    choices = [("replicate",)] + [("shard", d) for d in range(max(ndims))]
    checked = 0
    for ndim in ndims:
        for shape in itertools.product(DIMS, repeat=ndim):
            for ps in itertools.product(choices, repeat=len(mesh_shape)):
                if any(p[0] == "shard" and p[1] >= ndim for p in ps):
                    continue
                layout = dsd.Layout.placements_on(mesh, shape, list(ps))
                offsets, sizes = layout.local_chunk()
                layout.release()
                if coord is None:
                    # PyTorch: ((0,), ()) off the mesh; dsd: nothing, all zeros.
                    assert sizes == (0,) * ndim and offsets == (0,) * ndim
                    continue
                want_sizes, want_offsets = _compute_local_shape_and_global_offset(
                    shape, mesh_shape, coord, _torch_placements(ps))
                assert (sizes, offsets) == (tuple(want_sizes), tuple(want_offsets)), (
                    f"rank {comm.rank} at {coord} of mesh {mesh_shape}, shape {shape}, "
                    f"placements {ps}: dsd {sizes} at {offsets}, PyTorch {want_sizes} at {want_offsets}")
                checked += 1
    return checked


def test_one_dim_mesh_of_four(comm):
    # FSDP Shard(0), uneven (7 over 4) and empty (2 over 4) shards, every tensor dim.
    assert _check_all(comm, (4,), [0, 1, 2, 3], ndims=(1, 2, 3)) > 100


def test_two_by_two_mesh(comm):
    # HSDP [Replicate, Shard(0)], FSDP+TP [Shard(0), Shard(1)], [Shard(0), Shard(0)], ...
    assert _check_all(comm, (2, 2), [0, 1, 2, 3], ndims=(1, 2)) > 100


def test_permuted_ranks_and_three_dims(comm):
    assert _check_all(comm, (2, 1, 2), [3, 1, 0, 2], ndims=(2,)) > 100


def test_sub_meshes_this_rank_may_not_be_part_of(comm):
    _check_all(comm, (2,), [3, 1], ndims=(1, 2))
    _check_all(comm, (1, 2), [0, 2], ndims=(2,))


def test_zero_dim_tensor_is_whole_everywhere(comm):
    mesh = dsd.DeviceMesh.new(comm, (2, 2))
    layout = dsd.Layout.placements_on(mesh, (), [("replicate",), ("replicate",)])
    assert layout.local_chunk() == ((), ())
    assert layout.global_shape == ()


def test_named_cases(comm):
    """The cases the design names, spelled out."""
    mesh = dsd.DeviceMesh.new(comm, (2, 2))
    r, c = divmod(comm.rank, 2)
    hsdp = dsd.Layout.placements_on(mesh, (7, 3), [("replicate",), ("shard", 0)])
    assert hsdp.local_chunk() == (((0, 0), (4, 3)) if c == 0 else ((4, 0), (3, 3)))
    tp = dsd.Layout.placements_on(mesh, (4, 6), [("shard", 0), ("shard", 1)])
    assert tp.local_chunk() == ((2 * r, 3 * c), (2, 3))
    assert tp.placements == [("shard", 0), ("shard", 1)]
    fsdp = dsd.Layout.placements_on(dsd.DeviceMesh.new(comm, (4,)), (2, 5), [("shard", 0)])
    # 2 rows over 4 ranks: one row each on ranks 0 and 1, nothing on 2 and 3 (offset 2).
    assert fsdp.local_chunk() == (((comm.rank, 0), (1, 5)) if comm.rank < 2 else ((2, 0), (0, 5)))
    uneven = dsd.Layout.placements_on(dsd.DeviceMesh.new(comm, (4,)), (7,), [("shard", 0)])
    assert uneven.local_chunk() == ([(0,), (2,), (4,), (6,)][comm.rank], [(2,), (2,), (2,), (1,)][comm.rank])


def test_bad_layouts_are_errors(comm):
    mesh = dsd.DeviceMesh.new(comm, (2, 2))
    with pytest.raises(dsd.InvalidArgumentError, match=r"Shard\(2\) is outside a 2-d tensor"):
        dsd.Layout.placements_on(mesh, (4, 4), [("shard", 2), ("replicate",)])
    with pytest.raises(dsd.InvalidArgumentError, match="1 placements given for a 2-d mesh"):
        dsd.Layout.placements_on(mesh, (4, 4), [("shard", 0)])
    with pytest.raises(dsd.InvalidArgumentError, match="mesh rank 4 is outside a world of 4"):
        dsd.DeviceMesh.new(comm, (2,), [0, 4])
    with pytest.raises(dsd.InvalidArgumentError, match="mesh lists rank 1 twice"):
        dsd.DeviceMesh.new(comm, (2,), [1, 1])
