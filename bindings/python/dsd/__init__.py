"""dsd: PyTorch Distributed Checkpoint state-dict semantics through a stable C ABI.

The Python face of libdsd, loaded with cffi from the C header itself. Tensors cross by
DLPack without copying; state dicts convert to and from Python dicts.
"""
from __future__ import annotations

from ._errors import (DtypeMismatchError, Error, HandleError, InvalidArgumentError,
                      NotFoundError, ShapeMismatchError)
from ._dist import Communicator, DeviceMesh, Layout, from_dtensor, to_dtensor
from ._lib import ffi, lib, library_path
from ._state_dict import StateDict
from ._tensor import Tensor


def abi_version() -> tuple[int, int]:
    v = lib.dsd_abi_version()
    return (v >> 16, v & 0xFFFF)


def version() -> str:
    return ffi.string(lib.dsd_version_string()).decode()


__version__ = version()

__all__ = [
    "Communicator", "DeviceMesh", "DtypeMismatchError", "Error", "HandleError",
    "InvalidArgumentError", "Layout", "NotFoundError", "ShapeMismatchError", "StateDict", "Tensor",
    "abi_version", "ffi", "lib", "library_path", "from_dtensor", "to_dtensor", "version",
]
