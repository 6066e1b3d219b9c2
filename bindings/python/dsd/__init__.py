"""dsd: PyTorch Distributed Checkpoint state-dict semantics through a stable C ABI.

The Python face of libdsd, loaded with cffi from the C header itself. Tensors cross by
DLPack without copying; state dicts convert to and from Python dicts.
"""
from __future__ import annotations

from ._checkpoint import (CheckpointManager, LoadReport, SaveFuture, async_save, load, load_full,
                          save, verify)
from ._errors import (DtypeMismatchError, Error, HandleError, InvalidArgumentError,
                      NotFoundError, ShapeMismatchError)
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
    "CheckpointManager", "LoadReport", "SaveFuture", "async_save", "load", "load_full", "save",
    "verify",
    "DtypeMismatchError", "Error", "HandleError", "InvalidArgumentError", "NotFoundError",
    "ShapeMismatchError", "StateDict", "Tensor", "abi_version", "ffi", "lib", "library_path",
    "version",
]
