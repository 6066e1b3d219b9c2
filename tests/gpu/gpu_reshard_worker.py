"""Ranks of the world-2 GPU resharding test (test_gpu_reshard.py), two processes on the one
GPU (cuda:0 for both), torch.distributed and dsd over Gloo with CUDA tensors:

    python gpu_reshard_worker.py save1 DIR          world 1: full CUDA tensors -> DIR/w1
    dsdrun -n 2 python gpu_reshard_worker.py w2 DIR  load DIR/w1 into Shard(1) CUDA DTensors
                                                     (1 -> 2), save Shard(0) ones -> DIR/w2,
                                                     gather a full state dict of CUDA DTensors
    python gpu_reshard_worker.py load1 DIR          world 1: DIR/w2 into full CUDA tensors

Prints "rank R: SCENARIO ok"; exits non-zero on the first failure (an assertion)."""
from __future__ import annotations

import datetime
import os
import sys

import torch

import dsd

# DSD_GPU_REHEARSAL=1: the same logic on CPU tensors (see gpu_util.py).
DEVICE = "cpu" if os.environ.get("DSD_GPU_REHEARSAL") else "cuda"

SHAPES = {
    "model.tok.weight": ((1000, 64), torch.bfloat16),  # 500 rows a rank
    "model.wqkv.weight": ((192, 63), torch.float32),   # 32 + 31 columns under Shard(1)
    "model.norm.weight": ((64,), torch.float16),
    "model.tiny": ((1, 3), torch.int64),                # rank 1 holds no rows under Shard(0)
}


def full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: (torch.randn(shape, generator=g) * 100).to(dtype).to(DEVICE) for k, (shape, dtype) in SHAPES.items()}


def nest(flat: dict) -> dict:
    out: dict = {}
    for k, v in flat.items():
        d = out
        *parts, last = k.split(".")
        for p in parts:
            d = d.setdefault(p, {})
        d[last] = v
    return out


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.contiguous().view(-1), b.contiguous().view(-1).to(a.device)
    return a.dtype == b.dtype and a.numel() == b.numel() and (
        a.numel() == 0 or torch.equal(a.view(torch.uint8), b.view(torch.uint8)))


def world_of_two(path: str):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if DEVICE == "cuda":
        torch.cuda.set_device(0)  # one GPU: both ranks on it
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    comm = dsd.Communicator.from_env(timeout=120)
    # DeviceMesh picks the GPU of LOCAL_RANK when it is set: there is only cuda:0.
    os.environ["LOCAL_RANK"] = "0"
    mesh = DeviceMesh(DEVICE, torch.arange(dist.get_world_size()))
    return dist.get_rank(), dist.get_world_size(), mesh, comm


def main(scenario: str, root: str) -> int:
    full = full_tensors()
    if scenario == "save1":
        dsd.save(nest(full) | {"step": 7}, os.path.join(root, "w1"))
        print("rank 0: save1 ok", flush=True)
        return 0
    if scenario == "load1":
        dst = nest({k: torch.empty_like(v) for k, v in full.items()}) | {"step": 0}
        dsd.load(dst, os.path.join(root, "w2"))
        for k, v in flat(dst).items():
            if k != "step":
                assert v.device.type == DEVICE and bitwise(v, full[k]), f"{k}: world-2 checkpoint loaded at world 1 differs"
        assert dst["step"] == 7
        print("rank 0: load1 ok", flush=True)
        return 0

    assert scenario == "w2", scenario
    from torch.distributed.tensor import DTensor, Shard

    rank, world, mesh, comm = world_of_two(root)
    assert world == 2

    def shard(t, dim):
        pieces = list(t.chunk(world, dim=dim)) if t.ndim > dim else [t]
        pieces += [t.narrow(dim, 0, 0)] * (world - len(pieces))
        local = pieces[rank].contiguous()
        return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=t.shape, stride=t.stride())

    # 1 -> 2: the world-1 checkpoint into Shard(1) (Shard(0) for 1-d) CUDA DTensors.
    dst = {k: shard(torch.zeros_like(v), 1 if v.ndim > 1 else 0) for k, v in full.items()}
    ptrs = {k: v._local_tensor.data_ptr() for k, v in dst.items()}
    tree = nest(dst) | {"step": 0}
    dsd.load(tree, os.path.join(root, "w1"), comm=comm)
    for k, v in dst.items():
        ref = shard(full[k], 1 if full[k].ndim > 1 else 0)._local_tensor
        assert v._local_tensor.device.type == DEVICE and v._local_tensor.data_ptr() == ptrs[k], f"{k}: shard replaced"
        assert bitwise(v._local_tensor, ref), f"rank {rank}: {k} loaded 1 -> 2 differs"
    assert tree["step"] == 7
    print(f"rank {rank}: load 1 -> 2 ok", flush=True)

    # Save at world 2 with Shard(0) CUDA DTensors (for load1 to read back at world 1).
    src = {k: shard(v, 0) for k, v in full.items()}
    dsd.save(nest(src) | {"step": 7}, os.path.join(root, "w2"), comm=comm)
    print(f"rank {rank}: save at world 2 ok", flush=True)

    # 2 -> 2 with another layout: the Shard(0) checkpoint into Shard(1) targets.
    again = {k: shard(torch.zeros_like(v), 1 if v.ndim > 1 else 0) for k, v in full.items()}
    dsd.load(nest(again) | {"step": 0}, os.path.join(root, "w2"), comm=comm)
    for k, v in again.items():
        ref = shard(full[k], 1 if full[k].ndim > 1 else 0)._local_tensor
        assert bitwise(v._local_tensor, ref), f"rank {rank}: {k} loaded Shard(0) -> Shard(1) differs"
    print(f"rank {rank}: reshard Shard(0) -> Shard(1) ok", flush=True)

    # A full state dict of a model whose parameters are CUDA DTensors, gathered through Gloo.
    model = torch.nn.Module()
    for k, v in full.items():
        if v.is_floating_point():
            model.register_parameter(k.replace(".", "_"), torch.nn.Parameter(shard(v, 0), requires_grad=False))
    got = dsd.get_model_state_dict(model, options=dsd.StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        for k, v in full.items():
            if v.is_floating_point():
                g = got[k.replace(".", "_")]
                assert not isinstance(g, DTensor) and g.device.type == "cpu", f"{k}: {type(g)} on {g.device}"
                assert bitwise(g, v.cpu()), f"{k}: gathered full tensor differs"
    else:
        assert got == {} or all(not isinstance(v, DTensor) for v in got.values())
    print(f"rank {rank}: full state dict gather ok", flush=True)
    import torch.distributed as dist
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # PyTorch's Gloo teardown at exit can abort (see tests/interop)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
