"""CUDA tensors in and out of dsd by DLPack (v0 "dltensor" and v1 "dltensor_versioned"): the
same memory (no copy) for every dtype dsd knows, the device index kept both ways, and the
stream rule of `__dlpack__(stream=...)`: what the caller queued on its current stream before
handing a tensor over is what dsd reads."""
import os

import pytest
import torch

import dsd
from dsd import ffi, lib
from gpu_util import REHEARSAL, cuda_only

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
          torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2]
DTYPES += [d for d in (getattr(torch, n, None) for n in ("uint16", "uint32", "uint64")) if d is not None]
DEVICES = list(range(torch.cuda.device_count())) or [0]
DL_TYPE = lib.DSD_DEVICE_CPU if REHEARSAL else lib.DSD_DEVICE_CUDA


def _device(index: int) -> str:
    return "cpu" if REHEARSAL else f"cuda:{index}"


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _random(shape, dtype, device):
    """Random bytes of `dtype` (0/1 for bool), made without arithmetic on the dtype itself."""
    g = torch.Generator(device="cpu").manual_seed(DTYPES.index(dtype))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g, dtype=torch.uint8).bool().to(device)
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * size), generator=g, dtype=torch.uint8)
    return raw.to(device).view(dtype)


def _bytes(t):
    return t.contiguous().view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)


def _address(info) -> int:
    return int(ffi.cast("uintptr_t", info.data))


def _export_or_skip(t, versioned):
    """Whether this PyTorch can export `t` by DLPack at all (older ones refuse fp8 or uint16+)."""
    try:
        t.__dlpack__(max_version=(1, 0)) if versioned else t.__dlpack__()
    except (BufferError, RuntimeError, TypeError) as exc:
        pytest.skip(f"PyTorch {torch.__version__} does not export {t.dtype} by DLPack "
                    f"{'v1' if versioned else 'v0'}: {exc}")


@pytest.mark.parametrize("versioned", [True, False], ids=["v1", "v0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("index", DEVICES, ids=lambda i: f"cuda{i}")
def test_zero_copy_both_ways(dtype, versioned, index):
    t = _random((64, 48), dtype, _device(index))
    _export_or_skip(t, versioned)
    h = dsd.Tensor.from_torch(t, versioned=versioned)
    info = h.info()
    assert info.device.type == DL_TYPE and info.device.index == (0 if REHEARSAL else index)
    assert _address(info) == t.data_ptr(), "dsd copied the tensor on import"
    assert ffi.string(lib.dsd_dtype_name(info.dtype)).decode() == _name(dtype)
    assert info.numel == t.numel() and info.nbytes == t.numel() * t.element_size()
    assert not info.read_only and info.contiguous

    # Back to PyTorch: same memory, same device, from whichever device is current.
    if REHEARSAL:
        back = h.to_torch()
    else:
        with torch.cuda.device(DEVICES[-1 - index]):
            back = h.to_torch()
    assert back.device == t.device and back.dtype == dtype
    assert back.data_ptr() == t.data_ptr() and back.shape == t.shape and back.stride() == t.stride()
    # A write through one is seen through the other.
    _bytes(back).zero_() if dtype != torch.bool else back.fill_(False)
    if not REHEARSAL:
        torch.cuda.synchronize()
    assert not _bytes(t).any()

    # The capsule dsd exports is a DLPack tensor of either version that PyTorch consumes.
    for v in (True, False):
        other = torch.from_dlpack(h.to_capsule(versioned=v))
        assert other.data_ptr() == t.data_ptr() and other.device == t.device and other.dtype == dtype
    h.release()


@pytest.mark.parametrize("versioned", [True, False], ids=["v1", "v0"])
def test_views_keep_offset_and_strides(versioned):
    base = torch.arange(4096, dtype=torch.float32, device=_device(0)).view(64, 64)
    view = base[3:40:2, 5:].t()  # offset into the storage, non-contiguous
    h = dsd.Tensor.from_torch(view, versioned=versioned)
    assert _address(h.info()) == view.data_ptr() and not h.info().contiguous
    back = h.to_torch()
    assert back.data_ptr() == view.data_ptr() and back.stride() == view.stride()
    assert torch.equal(back, view)


def test_the_device_index_survives_a_state_dict_round_trip():
    sd = {f"t{i}": torch.full((8,), float(i), device=_device(i)) for i in DEVICES}
    out = dsd.StateDict.from_python(sd).to_python()
    for i in DEVICES:
        assert out[f"t{i}"].device == torch.device(_device(i))
        assert out[f"t{i}"].data_ptr() == sd[f"t{i}"].data_ptr()


@cuda_only
@pytest.mark.parametrize("stream", [None, -1, 1, 2, "side"])
def test_dsd_exports_accept_every_stream_value(stream):
    """A consumer names the stream it will use (1: legacy default, 2: per-thread default,
    else a cudaStream_t; -1: no synchronization); dsd queues no work of its own on a tensor,
    so each is valid and the data is ready on it."""
    t = torch.arange(1 << 16, dtype=torch.int32, device="cuda")
    h = dsd.Tensor.from_torch(t)
    side = torch.cuda.Stream()
    value = side.cuda_stream if stream == "side" else stream
    capsule = h.__dlpack__(stream=value, max_version=(1, 0))
    with torch.cuda.stream(side):
        back = torch.from_dlpack(capsule)
        assert int(back[-1].item()) == (1 << 16) - 1
    # torch.from_dlpack passes its current stream to dsd's __dlpack__ itself.
    with torch.cuda.stream(side):
        again = torch.from_dlpack(h)
    assert again.data_ptr() == t.data_ptr()


def _slow_fill(t, value, stream):
    """Queues a long kernel, then a fill, on `stream`: the fill lands ~50 ms later."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)
        t.fill_(value)


@cuda_only
def test_writes_pending_on_the_current_stream_are_what_dsd_saves(tmp_path):
    """The caller's current stream (here a non-blocking side stream) still has a fill queued
    when it hands the tensor over: dsd must order its reads after it (the stream rule: the
    producer's work on the consumer's stream comes first)."""
    side = torch.cuda.Stream()
    t = torch.zeros(1 << 20, dtype=torch.float32, device="cuda")
    torch.cuda.synchronize()
    _slow_fill(t, 3.0, side)
    with torch.cuda.stream(side):
        dsd.save({"t": t}, str(tmp_path / "ck"))
    loaded = dsd.load_full(str(tmp_path / "ck"))
    assert torch.equal(loaded["t"], torch.full((1 << 20,), 3.0)), "dsd read the tensor before the queued fill"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([os.path.abspath(__file__), "-q"]))
