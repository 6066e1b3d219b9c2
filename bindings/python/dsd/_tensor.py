"""Tensors in and out of dsd by DLPack, without copying."""
from __future__ import annotations

import ctypes

from . import _capi
from ._errors import StaleHandleError

# Capsule names must outlive every capsule: module-level bytes objects.
_NAME_V0 = b"dltensor"
_NAME_V1 = b"dltensor_versioned"
_USED_V0 = b"used_dltensor"
_USED_V1 = b"used_dltensor_versioned"

_api = ctypes.pythonapi
_capsule_new = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_New", _api))
_capsule_get = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", _api))
_capsule_set_name = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_SetName", _api))
_capsule_is_valid = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_IsValid", _api))
# Inside a capsule destructor the capsule is already dying: touch it by address only.
_capsule_is_valid_raw = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_IsValid", _api))
_capsule_get_raw = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", _api))

_Destructor = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@_Destructor
def _free_unused_v1(capsule):
    # Called when a capsule we made is collected; if no consumer took it, its tensor is ours.
    if _capsule_is_valid_raw(capsule, _NAME_V1):
        _capi.dlpack_versioned_free(_capsule_get_raw(capsule, _NAME_V1))


@_Destructor
def _free_unused_v0(capsule):
    if _capsule_is_valid_raw(capsule, _NAME_V0):
        _capi.dlpack_free(_capsule_get_raw(capsule, _NAME_V0))


_free_v1_ptr = ctypes.cast(_free_unused_v1, ctypes.c_void_p)
_free_v0_ptr = ctypes.cast(_free_unused_v0, ctypes.c_void_p)


def handle_from_capsule(capsule) -> int:
    """Takes a DLPack capsule (v1 "dltensor_versioned" or v0 "dltensor"), marks it used, and
    returns a new tensor handle's bits. dsd owns the tensor from then on."""
    if _capsule_is_valid(capsule, _NAME_V1):
        ptr = _capsule_get(capsule, _NAME_V1)
        _capsule_set_name(capsule, _USED_V1)
        return _capi.tensor_from_dlpack_versioned(ptr)
    if _capsule_is_valid(capsule, _NAME_V0):
        ptr = _capsule_get(capsule, _NAME_V0)
        _capsule_set_name(capsule, _USED_V0)
        return _capi.tensor_from_dlpack(ptr)
    raise TypeError("expected an unused DLPack capsule ('dltensor_versioned' or 'dltensor')")


def handle_from_tensor(tensor, versioned: bool = True) -> int:
    """A new handle to a torch tensor (or anything with __dlpack__), sharing its memory."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach()  # DLPack refuses tensors that require grad; storage is shared
    if versioned:
        capsule = tensor.__dlpack__(max_version=(1, 0))
    else:
        capsule = tensor.__dlpack__()
    return handle_from_capsule(capsule)


def capsule_from_handle(bits: int, versioned: bool = True):
    """A new DLPack capsule of a handle's tensor (the handle stays valid)."""
    if versioned:
        return _capsule_new(_capi.tensor_to_dlpack_versioned(bits), _NAME_V1, _free_v1_ptr)
    return _capsule_new(_capi.tensor_to_dlpack(bits), _NAME_V0, _free_v0_ptr)


class _Carrier:
    """What torch.from_dlpack() consumes: hands out one capsule of a handle's tensor."""

    def __init__(self, bits: int, device):
        self._bits = bits
        self._device = device

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        del stream, dl_device, copy  # same device, never a copy
        versioned = max_version is not None and tuple(max_version) >= (1, 0)
        return capsule_from_handle(self._bits, versioned)

    def __dlpack_device__(self):
        return self._device


def info(bits: int) -> _capi.TensorInfo:
    return _capi.tensor_info_get(bits)


def tensor_from_handle(bits: int):
    """The torch tensor behind a handle, sharing its memory (the handle stays valid)."""
    import torch

    i = info(bits)
    return torch.from_dlpack(_Carrier(bits, (i.device.type, i.device.index)))


def release(bits: int) -> None:
    _capi.tensor_release(bits)


class Tensor:
    """A dsd tensor handle owned by Python: released when collected (or by release())."""

    __slots__ = ("_bits",)

    def __init__(self, bits: int):
        """`bits`: an owned tensor handle from _capi (this object takes it over)."""
        self._bits = bits

    @classmethod
    def from_torch(cls, tensor, versioned: bool = True) -> "Tensor":
        """A handle sharing `tensor`'s memory (through DLPack, versioned unless told not to)."""
        return cls(handle_from_tensor(tensor, versioned))

    @classmethod
    def from_capsule(cls, capsule) -> "Tensor":
        """A handle over a DLPack capsule ("dltensor" or "dltensor_versioned"), consumed."""
        return cls(handle_from_capsule(capsule))

    @property
    def bits(self) -> int:
        """The handle's bits, for C calls through dsd.lib; valid until release()."""
        if self._bits == 0:
            raise StaleHandleError(_capi.E_STALE_HANDLE, "tensor handle was released")
        return self._bits

    def to_torch(self):
        """A torch.Tensor sharing the handle's memory."""
        return tensor_from_handle(self.bits)

    def to_capsule(self, versioned: bool = True):
        """A new DLPack capsule of the tensor (versioned unless told not to)."""
        return capsule_from_handle(self.bits, versioned)

    def info(self) -> _capi.TensorInfo:
        """dtype, device, ndim, data pointer, numel, nbytes and flags of the tensor."""
        return info(self.bits)

    def release(self) -> None:
        """Releases the handle now (idempotent)."""
        if self._bits:
            bits, self._bits = self._bits, 0
            release(bits)

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        i = self.info()
        return _Carrier(self.bits, (i.device.type, i.device.index)).__dlpack__(
            stream=stream, max_version=max_version, dl_device=dl_device, copy=copy)

    def __dlpack_device__(self):
        i = self.info()
        return (i.device.type, i.device.index)
