"""dsd.Communicator, DeviceMesh, Layout and DTensor leaves of StateDict, in one process (a
world of one: the multi-rank cases run under torchrun in dtensor_roundtrip.py)."""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh as TorchMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import dsd

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
               "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture
def no_launcher(monkeypatch):
    for v in LAUNCH_VARS:
        monkeypatch.delenv(v, raising=False)


def test_local_communicator():
    c = dsd.Communicator.local()
    assert (c.rank, c.size, c.backend) == (0, 1, "local")
    c.barrier()
    assert repr(c) == "dsd.Communicator(local, rank 0 of 1)"


def test_file_store_of_one_rank(tmp_path):
    c = dsd.Communicator.file_store(tmp_path / "store", 0, 1, timeout=datetime.timedelta(seconds=5))
    assert (c.rank, c.size, c.backend) == (0, 1, "gloo")
    c.barrier()
    with pytest.raises(dsd.InvalidArgumentError, match="rank 3 is outside a world of 2"):
        dsd.Communicator.file_store(tmp_path / "other", 3, 2)
    with pytest.raises(dsd.InvalidArgumentError, match="timeout_ms must be positive"):
        dsd.Communicator.file_store(tmp_path / "other", 0, 1, timeout=0)


def test_from_env_names_the_missing_variable(no_launcher, monkeypatch):
    with pytest.raises(dsd.InvalidArgumentError, match="RANK and WORLD_SIZE are not set"):
        dsd.Communicator.from_env()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(dsd.InvalidArgumentError, match="MASTER_ADDR is not set"):
        dsd.Communicator.from_env()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "port")
    with pytest.raises(dsd.InvalidArgumentError, match="MASTER_PORT is 'port', not an integer"):
        dsd.Communicator.from_env(timeout=5)


def test_nccl_needs_a_communicator():
    with pytest.raises(dsd.InvalidArgumentError, match="nccl_comm is NULL"):
        dsd.Communicator.from_nccl(0, 0, 0, 1)


def test_mesh_and_layouts_on_one_rank():
    c = dsd.Communicator.local()
    mesh = dsd.DeviceMesh.new(c, (1, 1), device_type="cuda")
    assert (mesh.shape, mesh.ranks, mesh.device_type, mesh.coordinate) == ((1, 1), (0,), "cuda", (0, 0))
    with pytest.raises(ValueError, match="'xpu' has no dsd mesh"):
        dsd.DeviceMesh.new(c, (1,), device_type="xpu")
    layout = dsd.Layout.placements_on(mesh, (5, 2), [("shard", 1), ("replicate",)])
    assert layout.global_shape == (5, 2) and layout.ndim == 2 and not layout.is_chunk
    assert layout.local_chunk() == ((0, 0), (5, 2))
    assert layout.placements == [("shard", 1), ("replicate",)]
    assert layout.mesh.key() == mesh.key()
    chunk = dsd.Layout.chunk_on(mesh, (5, 2), (1, 0), (3, 2))
    assert chunk.is_chunk and chunk.local_chunk() == ((1, 0), (3, 2))
    with pytest.raises(dsd.HandleError, match="no placements"):
        chunk.placements
    layout.release()
    layout.release()  # a no-op once released
    with pytest.raises(dsd.HandleError, match="released"):
        layout.global_shape


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield TorchMesh("cpu", torch.tensor([0]))
    dist.destroy_process_group()


def test_dtensor_leaves_round_trip(world_of_one):
    mesh = world_of_one
    w = distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)])
    b = distribute_tensor(torch.randn(3), mesh, [Replicate()])
    plain = torch.arange(3.0)
    comm = dsd.Communicator.local()
    sd = dsd.StateDict.from_python({"w": w, "nested": [b, plain], "step": 2}, comm=comm)
    out = sd.to_python()
    for got, want in ((out["w"], w), (out["nested"][0], b)):
        assert isinstance(got, DTensor)
        assert got.device_mesh is mesh and got.placements == want.placements and got.shape == want.shape
        assert got._local_tensor.data_ptr() == want._local_tensor.data_ptr()
    assert not isinstance(out["nested"][1], DTensor)
    assert out["nested"][1].data_ptr() == plain.data_ptr()
    assert out["step"] == 2
    # Two state dicts of the same DTensor are equal, and differ from a plain-tensor one.
    same, why = sd.equal(dsd.StateDict.from_python({"w": w, "nested": [b, plain], "step": 2}, comm=comm))
    assert same, why
    plain_sd = dsd.StateDict.from_python({"w": w.to_local(), "nested": [b.to_local(), plain], "step": 2})
    assert not plain_sd.equal(sd)[0]


def test_meshes_are_found_again_or_passed(world_of_one):
    mesh = world_of_one
    comm = dsd.Communicator.local()
    local, layout = dsd.from_dtensor(distribute_tensor(torch.ones(2), mesh, [Shard(0)]), comm)
    assert dsd.to_dtensor(local, layout).device_mesh is mesh
    other = TorchMesh("cpu", torch.tensor([0]))
    assert dsd.to_dtensor(local, layout, torch_mesh=other).device_mesh is other
    sd = dsd.StateDict.from_python({"x": distribute_tensor(torch.ones(2), mesh, [Shard(0)])}, comm=comm)
    assert sd.to_python(meshes=[other])["x"].device_mesh is other
