"""Torch tensors of every dtype in and out of dsd by DLPack, both versions, zero copy."""
import gc

import pytest
import torch

import dsd

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
          torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32,
          torch.uint64]


def sample(dtype):
    base = torch.arange(24, dtype=torch.float64).view(4, 6) - 7
    if dtype == torch.bool:
        return base > 0
    if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        return base.abs().to(dtype)
    if dtype.is_complex:
        return torch.complex(base, -base).to(dtype)
    return base.to(dtype)


@pytest.mark.parametrize("versioned", [True, False], ids=["v1", "v0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_shares_memory(dtype, versioned):
    t = sample(dtype)
    h = dsd.Tensor.from_torch(t, versioned=versioned)
    back = h.to_torch()
    assert back.dtype == dtype
    assert back.data_ptr() == t.data_ptr()
    assert back.shape == t.shape and back.stride() == t.stride()
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))
    info = h.info()
    assert info.numel == t.numel() and info.nbytes == t.numel() * t.element_size()


def test_views_keep_strides_and_offset():
    base = torch.arange(30.0).view(5, 6)
    view = base[1:, 2:].t()
    back = dsd.Tensor.from_torch(view).to_torch()
    assert back.data_ptr() == view.data_ptr()
    assert back.stride() == view.stride()
    assert torch.equal(back, view)
    # Writes through dsd's view land in the original.
    back.fill_(-1)
    assert (base[1:, 2:] == -1).all()


def test_memory_outlives_python_reference():
    t = torch.arange(1000.0)
    ptr = t.data_ptr()
    h = dsd.Tensor.from_torch(t)
    del t
    gc.collect()
    back = h.to_torch()
    assert back.data_ptr() == ptr and back[999] == 999


def test_grad_tensors_and_parameters_are_detached():
    p = torch.nn.Parameter(torch.ones(3))
    back = dsd.Tensor.from_torch(p).to_torch()
    assert back.data_ptr() == p.data_ptr() and not back.requires_grad


def test_released_handle_raises():
    h = dsd.Tensor.from_torch(torch.ones(2))
    bits = h.bits
    h.release()
    with pytest.raises(dsd.HandleError) as e:
        dsd._tensor.tensor_from_handle(bits)
    assert e.value.code == dsd.lib.DSD_E_STALE_HANDLE


def test_numpy_arrays_cross_too():
    np = pytest.importorskip("numpy")
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    back = dsd.Tensor.from_torch(a).to_torch()
    assert back.data_ptr() == a.ctypes.data
    assert back.tolist() == a.tolist()
