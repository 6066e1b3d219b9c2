"""GPU checks: CUDA tensors through DLPack, state dicts of a CUDA model, checkpoints of CUDA
tensors (staged through host memory), and the NCCL communicator over a caller-owned ncclComm_t.
Exits 77 (a skip for Meson) where no GPU is visible or libdsd was built without CUDA."""
import os
import sys
import tempfile

import torch

if not torch.cuda.is_available():
    print("no CUDA device visible: skipping the GPU suite")
    sys.exit(77)

import dsd  # noqa: E402

failures = []


def check(name, fn):
    try:
        fn()
        print(f"ok {name}")
    except Exception as exc:  # noqa: BLE001 - report every check
        failures.append(name)
        print(f"FAILED {name}: {exc!r}")


def dlpack_zero_copy():
    for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int64, torch.bool):
        t = torch.ones(64, 32, device="cuda").to(dtype)
        for versioned in (True, False):
            h = dsd.Tensor.from_torch(t, versioned=versioned)
            back = h.to_torch()
            assert back.is_cuda and back.data_ptr() == t.data_ptr() and back.dtype == dtype
            assert h.info().device.type == dsd.lib.DSD_DEVICE_CUDA


def cuda_model_state_dict():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).cuda()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, 32, device="cuda")).sum().backward()
    optim.step()
    msd, osd = dsd.get_state_dict(model, optim)
    assert all(v.is_cuda and v.data_ptr() == p.data_ptr() for v, p in zip(msd.values(), model.parameters()))
    cpu = dsd.get_model_state_dict(model, options=dsd.StateDictOptions(full_state_dict=True, cpu_offload=True))
    assert all(not v.is_cuda for v in cpu.values())
    fresh = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).cuda()
    dsd.set_model_state_dict(fresh, cpu)  # host tensors copied into device parameters
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def cuda_checkpoint():
    sd = {"w": torch.randn(1024, 256, device="cuda"), "b": torch.arange(10, device="cuda")}
    with tempfile.TemporaryDirectory() as d:
        dsd.save(sd, os.path.join(d, "ck"))
        target = {"w": torch.empty(1024, 256, device="cuda"), "b": torch.empty(10, dtype=torch.int64, device="cuda")}
        dsd.load(target, os.path.join(d, "ck"))
        assert torch.equal(target["w"], sd["w"]) and torch.equal(target["b"], sd["b"])
        fut = dsd.async_save(sd, os.path.join(d, "async"))
        fut.wait()


def nccl_one_rank():
    try:
        from cupy.cuda import nccl
    except ImportError:
        print("cupy is not installed: the NCCL check needs it to create an ncclComm_t")
        return
    uid = nccl.get_unique_id()
    comm = nccl.NcclCommunicator(1, uid, 0)
    stream = torch.cuda.current_stream().cuda_stream
    c = dsd.Communicator.from_nccl(comm.comm, stream, 0, 1)
    assert c.size == 1 and c.backend == "nccl"


check("dlpack_zero_copy", dlpack_zero_copy)
check("cuda_model_state_dict", cuda_model_state_dict)
check("cuda_checkpoint", cuda_checkpoint)
check("nccl_one_rank", nccl_one_rank)
sys.exit(1 if failures else 0)
