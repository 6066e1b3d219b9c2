"""dsd: PyTorch Distributed Checkpoint state-dict semantics through a stable C ABI.

The Python face of libdsd, loaded with cffi from the C header itself. Tensors cross by
DLPack without copying; state dicts convert to and from Python dicts.
"""
from __future__ import annotations

from ._checkpoint import (CheckpointManager, LoadReport, SaveFuture, async_save, load, load_full,
                          save, verify)
from ._checkpoint import (convert, detect_format, export_safetensors, export_torch_save,
                          import_safetensors, import_torch_save)
from ._errors import (DtypeMismatchError, Error, HandleError, InvalidArgumentError,
                      NotFoundError, ShapeMismatchError, UnsupportedError)
from ._dist import Communicator, DeviceMesh, Layout, from_dtensor, to_dtensor
from ._lib import ffi, lib, library_path
from ._state_dict import StateDict
from ._statedict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                         get_state_dict, optim_state_dict_to_fqn, optim_state_dict_to_positional,
                         set_model_state_dict, set_optimizer_state_dict, set_state_dict)
from ._tensor import Tensor


def abi_version() -> tuple[int, int]:
    v = lib.dsd_abi_version()
    return (v >> 16, v & 0xFFFF)


def version() -> str:
    return ffi.string(lib.dsd_version_string()).decode()


__version__ = version()

__all__ = [
    "CheckpointManager", "Communicator", "DeviceMesh", "DtypeMismatchError", "Error",
    "HandleError", "InvalidArgumentError", "Layout", "LoadReport", "NotFoundError", "SaveFuture",
    "ShapeMismatchError", "StateDict", "StateDictOptions", "Tensor", "UnsupportedError",
    "abi_version", "async_save", "ffi", "from_dtensor", "get_model_state_dict",
    "get_optimizer_state_dict", "get_state_dict", "lib", "library_path", "load", "load_full",
    "optim_state_dict_to_fqn", "optim_state_dict_to_positional", "save", "set_model_state_dict",
    "set_optimizer_state_dict", "set_state_dict", "to_dtensor", "verify", "version",
    "convert", "detect_format", "export_safetensors", "export_torch_save", "import_safetensors",
    "import_torch_save",
]
