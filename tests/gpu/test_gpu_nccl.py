"""dsd communicators over NCCL at world 1 (one GPU allows no more): over a caller-owned
ncclComm_t made by CuPy (`cupy.cuda.nccl`), and over the ncclComm_t of PyTorch's own
ProcessGroupNCCL; through each, a full-state-dict gather of CUDA DTensors and a
broadcast_from_rank0 set, against PyTorch's results."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import state_dict as ptd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import dsd
from gpu_util import DEVICE, REHEARSAL, assert_same, cuda_only, make_model


@pytest.fixture(scope="module")
def world():
    """A world of one rank with Gloo for CPU tensors and NCCL for CUDA tensors."""
    assert not dist.is_initialized()
    path = os.path.join(tempfile.mkdtemp(prefix="dsd_nccl_"), "store")
    if REHEARSAL:
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    else:
        torch.cuda.set_device(0)
        dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"file://{path}", rank=0, world_size=1,
                                device_id=torch.device("cuda:0"))
    yield DeviceMesh(DEVICE, torch.arange(1))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def cupy_comm():
    nccl = pytest.importorskip("cupy.cuda.nccl", reason="CuPy creates the caller-owned ncclComm_t")
    comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    yield comm
    comm.destroy()


def _cupy_ptr(comm) -> int:
    for attr in ("comm", "ptr", "_comm"):
        value = getattr(comm, attr, None)
        if isinstance(value, int) and value:
            return value
    raise AssertionError(f"cannot find the ncclComm_t address of {comm!r}")


def _pg_nccl_ptr() -> int:
    """The ncclComm_t of the default group's NCCL backend (created eagerly by device_id, and
    used once here to be sure)."""
    x = torch.ones(4, device="cuda")
    dist.all_reduce(x)
    backend = dist.group.WORLD._get_backend(torch.device("cuda"))
    get = getattr(backend, "_comm_ptr", None)
    if get is None:
        pytest.skip(f"PyTorch {torch.__version__}'s ProcessGroupNCCL does not expose its ncclComm_t")
    ptr = int(get())
    assert ptr != 0
    return ptr


# A dedicated stream: the caller runs nothing else on it while dsd uses it.
_STREAM = None


def _stream() -> int:
    global _STREAM
    if _STREAM is None:
        _STREAM = torch.cuda.Stream()
    return _STREAM.cuda_stream


@pytest.fixture(params=["local"] if REHEARSAL else ["cupy", "process_group"])
def nccl(request, world):
    if request.param == "local":  # CPU rehearsal: the same calls through a local communicator
        return dsd.Communicator.local()
    if request.param == "cupy":
        ptr = _cupy_ptr(request.getfixturevalue("cupy_comm"))
    else:
        ptr = _pg_nccl_ptr()
    comm = dsd.Communicator.from_nccl(ptr, _stream(), 0, 1, timeout=60)
    assert (comm.rank, comm.size, comm.backend) == (0, 1, "nccl")
    comm.barrier()
    return comm


def sharded_model(mesh, seed=0):
    """The tiny Llama with every parameter a Shard(0) DTensor on the CUDA mesh of one."""
    model = make_model(seed)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
    return model


@cuda_only
def test_communicator_from_nccl_refuses_a_wrong_rank(world, cupy_comm):
    with pytest.raises(dsd.InvalidArgumentError):
        dsd.Communicator.from_nccl(_cupy_ptr(cupy_comm), _stream(), 1, 2)


@pytest.mark.parametrize("offload", [False, True], ids=["on_gpu", "cpu_offload"])
def test_full_state_dict_gather(nccl, world, offload):
    model = sharded_model(world)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opts = dict(full_state_dict=True, cpu_offload=offload)
    with dsd.use_communicator(nccl):
        ours = dsd.get_state_dict(model, optim, options=dsd.StateDictOptions(**opts))
    theirs = ptd.get_state_dict(model, optim, options=ptd.StateDictOptions(**opts))
    assert_same(ours[0], theirs[0], "model")
    assert_same(ours[1], theirs[1], "optim")
    for k, v in ours[0].items():
        assert not isinstance(v, DTensor), f"{k} is still a DTensor"
        assert v.device.type == ("cpu" if offload else DEVICE), f"{k} on {v.device}"


def test_broadcast_from_rank0(nccl, world):
    src = make_model(seed=0)
    full = {k: v.detach().cpu() for k, v in src.state_dict().items()}
    ours = sharded_model(world, seed=4)
    theirs = sharded_model(world, seed=4)
    opts = dict(full_state_dict=True, broadcast_from_rank0=True)
    with dsd.use_communicator(nccl):
        dsd.set_model_state_dict(ours, dict(full), options=dsd.StateDictOptions(**opts))
    ptd.set_model_state_dict(theirs, dict(full), options=ptd.StateDictOptions(**opts))
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        la = a.to_local() if isinstance(a, DTensor) else a
        lb = b.to_local() if isinstance(b, DTensor) else b
        assert la.device.type == DEVICE, f"{k} left the GPU"
        assert_same(la, lb, k)
        assert_same(la.cpu(), full[k], k)


def test_plain_cuda_model_through_nccl(nccl):
    model = make_model(seed=2)
    with dsd.use_communicator(nccl):
        msd = dsd.get_model_state_dict(model, options=dsd.StateDictOptions(full_state_dict=True))
        fresh = make_model(seed=3)
        dsd.set_model_state_dict(fresh, msd, options=dsd.StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=True))
    assert_same(dict(fresh.state_dict()), dict(model.state_dict()))


def test_checkpoint_through_nccl(nccl, world, tmp_path):
    model = sharded_model(world, seed=6)
    sd = {k: v for k, v in model.state_dict().items()}
    dsd.save(sd, str(tmp_path / "ck"), comm=nccl)
    dst = {k: distribute_tensor(torch.zeros_like(v.full_tensor()), world, [Shard(0)]) if isinstance(v, DTensor)
           else torch.zeros_like(v) for k, v in sd.items()}
    dsd.load(dst, str(tmp_path / "ck"), comm=nccl)
    for k in sd:
        a = sd[k].to_local() if isinstance(sd[k], DTensor) else sd[k]
        b = dst[k].to_local() if isinstance(dst[k], DTensor) else dst[k]
        assert_same(a, b, k)
