"""Checkpoints of CUDA tensors: save, load in place into CUDA tensors (bitwise, same memory),
DCP's format both ways from and into CUDA tensors, and async save: staged before it returns
(the training stream then free: nothing of dsd's left queued on it), the pinned staging pool
reused by the next save, and writes queued on the caller's stream before the call included."""
import os
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dsd
from gpu_util import DEVICE, assert_same, cuda_only, world_of_one


def state(seed=0, scale=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    sd = {
        "model": {
            "tok.weight": torch.randn(512 * scale, 256, generator=g).to(torch.bfloat16),
            "layers.0.wqkv.weight": torch.randn(768, 256 * scale, generator=g),
            "layers.0.norm.weight": torch.rand(256, generator=g).half(),
            "fp8": torch.randn(64, 64, generator=g).to(torch.float8_e4m3fn),
            "counts": torch.randint(0, 1 << 40, (1000,), generator=g),
            "mask": torch.rand(77, generator=g) > 0.5,
        },
        "optim": {"step": 12, "lr": 3e-4, "name": "adamw"},
    }
    return {"model": {k: v.to(DEVICE) for k, v in sd["model"].items()}, "optim": sd["optim"]}


def empty_like(sd):
    return {"model": {k: torch.empty_like(v) for k, v in sd["model"].items()},
            "optim": {"step": 0, "lr": 0.0, "name": ""}}


def test_save_then_load_in_place_into_cuda_tensors(tmp_path):
    sd = state()
    dsd.save(sd, str(tmp_path / "ck"))
    dsd.verify(str(tmp_path / "ck"))
    dst = empty_like(sd)
    ptrs = {k: v.data_ptr() for k, v in dst["model"].items()}
    report = dsd.load(dst, str(tmp_path / "ck"))
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert {k: v.data_ptr() for k, v in dst["model"].items()} == ptrs, "load replaced CUDA tensors"
    assert_same(dst, sd)
    # And the bytes on disk are the GPU's: read back to the host without dsd's GPU path.
    full = dsd.load_full(str(tmp_path / "ck"))
    assert_same(full["model"], {k: v.cpu() for k, v in sd["model"].items()})


def test_load_into_a_view_and_a_non_contiguous_target(tmp_path):
    src = {"w": torch.randn(128, 96, device=DEVICE)}
    dsd.save(src, str(tmp_path / "ck"))
    big = torch.zeros(96, 256, device=DEVICE)
    dst = {"w": big[:, 7:135].t()}  # a transposed window of a bigger tensor
    dsd.load(dst, str(tmp_path / "ck"))
    assert torch.equal(dst["w"], src["w"])
    assert not big[:, :7].any() and not big[:, 135:].any(), "load wrote outside the target view"


def test_dcp_format_from_and_into_cuda_tensors(tmp_path):
    world_of_one()
    sd = {"model": state()["model"]}
    dsd.save(sd, str(tmp_path / "as_dcp"), format="dcp")
    theirs = {"model": {k: torch.empty_like(v) for k, v in sd["model"].items()}}
    dcp.load(theirs, checkpoint_id=str(tmp_path / "as_dcp"))
    assert_same(theirs, sd)
    dcp.save(sd, checkpoint_id=str(tmp_path / "by_dcp"))
    ours = {"model": {k: torch.empty_like(v) for k, v in sd["model"].items()}}
    dsd.load(ours, str(tmp_path / "by_dcp"))
    assert_same(ours, sd)


def test_async_save_stages_before_it_returns(tmp_path):
    sd = state(scale=8)  # ~ 70 MiB
    expected = {k: v.cpu().clone() for k, v in sd["model"].items()}
    fut = dsd.async_save(sd, str(tmp_path / "a"))
    assert fut.staged(), "async_save returned before the state was copied"
    # The training stream is free: dsd left nothing queued on it that waits for the write.
    if DEVICE == "cuda":
        assert torch.cuda.current_stream().query(), "the caller's stream still has dsd work queued"
    for v in sd["model"].values():  # the next training step overwrites the tensors at once
        v.zero_() if v.dtype != torch.float8_e4m3fn else v.view(torch.uint8).zero_()
    fut.result(timeout=120)
    assert fut.done()
    assert_same(dsd.load_full(str(tmp_path / "a"))["model"], expected)


@cuda_only
def test_async_save_sees_writes_queued_on_the_callers_stream(tmp_path):
    side = torch.cuda.Stream()
    t = torch.zeros(1 << 22, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        t.fill_(4.0)
        fut = dsd.async_save({"t": t}, str(tmp_path / "a"))
    fut.result(timeout=120)
    assert torch.equal(dsd.load_full(str(tmp_path / "a"))["t"], torch.full((1 << 22,), 4.0))


@cuda_only
def test_a_load_is_ordered_before_the_callers_next_kernels(tmp_path):
    """Loaded bytes are there for the next kernel the caller queues on its current stream (a
    non-blocking side stream here), without a synchronize in between. The default stream is
    kept busy meanwhile: a load that copied on it, not on the caller's stream, and returned
    without waiting would leave the side stream's next kernel reading zeros."""
    src = {"w": torch.randn(8192, 8192, device="cuda")}  # 256 MiB
    dsd.save(src, str(tmp_path / "ck"))
    side = torch.cuda.Stream()
    dst = {"w": torch.zeros(8192, 8192, device="cuda")}
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~100 ms on the default stream
    with torch.cuda.stream(side):
        dsd.load(dst, str(tmp_path / "ck"))
        copy = dst["w"].clone()  # queued right after the load, on the same stream
    torch.cuda.synchronize()
    assert torch.equal(copy, src["w"]), "a kernel queued after dsd.load saw the tensor before the load"


def _host_allocations():
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        return None
    s = stats()
    for key in ("num_host_alloc", "allocations.allocated", "allocation.allocated"):
        if key in s:
            return s[key]
    return None


@cuda_only
def test_async_save_reuses_its_pinned_pool_and_blocks_about_one_copy(tmp_path):
    sd = {f"layer{i}": torch.randn(1024, 1024 * 8, device="cuda") for i in range(8)}  # 256 MiB
    nbytes = sum(v.numel() * v.element_size() for v in sd.values())
    dsd.async_save(sd, str(tmp_path / "warm")).result(timeout=300)  # the pool is sized here
    allocs = _host_allocations()
    blocks = []
    for i in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fut = dsd.async_save(sd, str(tmp_path / f"s{i}"))
        blocks.append(time.perf_counter() - t0)
        fut.result(timeout=300)
    if allocs is not None:
        assert _host_allocations() == allocs, "a later async_save allocated new pinned memory"
    # The raw device-to-host copy of the same bytes into preallocated pinned memory.
    pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in sd.items()}
    copies = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k, v in sd.items():
            pinned[k].copy_(v, non_blocking=True)
        torch.cuda.synchronize()
        copies.append(time.perf_counter() - t0)
    block, copy = min(blocks), min(copies)
    print(f"async_save blocked {block * 1e3:.1f} ms for {nbytes >> 20} MiB; raw D2H copy "
          f"{copy * 1e3:.1f} ms ({nbytes / copy / 1e9:.1f} GB/s); ratio {block / copy:.2f}")
    # Loose here (the benchmark holds the 1.2 target on 8 GiB): the block is a copy, not a write.
    assert block <= 4 * copy + 0.05, f"async_save blocked {block:.3f}s, a raw copy takes {copy:.3f}s"
    if allocs is None:
        pytest.skip(f"PyTorch {torch.__version__} reports no pinned-allocation count: reuse unchecked "
                    "(timing checked)")


@cuda_only
def test_gpu_memory_is_not_held_after_a_save(tmp_path):
    sd = {"w": torch.randn(4096, 4096, device="cuda")}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    dsd.save(sd, str(tmp_path / "ck"))
    dst = {"w": torch.empty_like(sd["w"])}
    dsd.load(dst, str(tmp_path / "ck"))
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before + dst["w"].numel() * 4, "dsd keeps GPU memory after the call"
    assert os.path.exists(tmp_path / "ck" / "checkpoint.json")
