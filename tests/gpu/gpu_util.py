"""What the gpu suite's modules share: a bitwise comparison that also checks devices, a world
of one Gloo rank (PyTorch's state-dict functions and DeviceMesh need a process group), and a
small Llama-shaped model on the GPU.

DSD_GPU_REHEARSAL=1 runs the suite's logic on CPU tensors where it has a CPU meaning (DEVICE is
then "cpu"; tests marked cuda_only skip): a rehearsal of the test code before device time is
spent on it, not a GPU check."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

REHEARSAL = bool(os.environ.get("DSD_GPU_REHEARSAL"))
DEVICE = "cpu" if REHEARSAL else "cuda"
cuda_only = pytest.mark.skipif(REHEARSAL, reason="CPU rehearsal: this check needs a GPU")


def on_device(t) -> bool:
    """Whether `t` is on the suite's device (the GPU; the CPU in a rehearsal)."""
    return t.device.type == DEVICE


def assert_same(a, b, path="<root>", devices=True):
    """Equal key for key in the same order, types equal, tensors bitwise (and on the same
    device when `devices`)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        if devices:
            assert a.device == b.device, f"{path}: on {a.device} vs {b.device}"
        x, y = a.detach(), b.detach().to(a.device)
        if x.numel():
            x, y = x.reshape(-1).contiguous().view(torch.uint8), y.reshape(-1).contiguous().view(torch.uint8)
        assert torch.equal(x, y), f"{path}: bytes differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: dict vs {type(b)}"
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a.keys())} vs {list(b.keys())}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}", devices)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}.{i}", devices)
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} vs {b!r}"


def world_of_one(backend: str = "gloo") -> None:
    """A torch.distributed world of one rank (file store), once per process."""
    if not dist.is_initialized():
        path = os.path.join(tempfile.mkdtemp(prefix="dsd_gpu_"), "store")
        dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1)


class Block(torch.nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.attn_norm = torch.nn.RMSNorm(dim) if hasattr(torch.nn, "RMSNorm") else torch.nn.LayerNorm(dim)
        self.wqkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.wo = torch.nn.Linear(dim, dim, bias=False)
        self.ffn_norm = torch.nn.LayerNorm(dim)
        self.w1 = torch.nn.Linear(dim, hidden, bias=False)
        self.w2 = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        q, k, v = self.wqkv(self.attn_norm(x)).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        x = x + self.wo(a)
        return x + self.w2(torch.nn.functional.silu(self.w1(self.ffn_norm(x))))


class TinyLlama(torch.nn.Module):
    def __init__(self, vocab=256, dim=64, hidden=172, layers=2):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList(Block(dim, hidden) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(dim)
        self.out = torch.nn.Linear(dim, vocab, bias=False)
        self.register_buffer("rope", torch.arange(dim, dtype=torch.float32))

    def forward(self, ids):
        x = self.tok(ids)
        for layer in self.layers:
            x = layer(x)
        return self.out(self.norm(x))


def make_model(seed=0, device=DEVICE, dtype=torch.float32):
    torch.manual_seed(seed)
    return TinyLlama().to(device=device, dtype=dtype)


def train(model, optim, steps=2, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 256, (4, 16), generator=g).to(next(model.parameters()).device)
        model(ids).float().mean().backward()
        optim.step()
        optim.zero_grad()
