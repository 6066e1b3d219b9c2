"""dsd: PyTorch Distributed Checkpoint state-dict semantics through a stable C ABI.

The Python face of libdsd, loaded with cffi from the C header itself (_lib) and called only
through its typed layer (_capi). Tensors cross by DLPack without copying (_tensor); state
dicts convert to and from Python dicts (_tree); DTensors cross with their layouts (_dist).
The public API: the state-dict functions (_state_dict_api, over the torch nn.Module /
optimizer adapter in _torch_adapter), checkpoints (_checkpoint) and format conversions
(_formats).
"""
from __future__ import annotations

from . import _capi
from ._checkpoint import (AsyncCheckpointer, CheckpointManager, GcReport, LoadReport, SaveFuture,
                          async_save, gc, load, load_full, save, verify)
from ._dist import Communicator, DeviceMesh, Layout, from_dtensor, to_dtensor
from ._cli import main as cli_main
from ._errors import (AbiMismatchError, BufferTooSmallError, CallbackError, CommError,
                      CorruptError, DeviceError, DtypeMismatchError, Error, ExistsError,
                      HandleError, InternalError, InvalidArgumentError, IOError, NoSpaceError,
                      NotFoundError, OutOfMemoryError, ReadOnlyError, ShapeMismatchError,
                      StaleHandleError, StateError, TimeoutError, UnexpectedKeyError,
                      UnsupportedError, WrongKindError)
from ._formats import (convert, detect_format, export_safetensors, export_torch_save,
                       import_safetensors, import_torch_save, inspect)
from ._lib import ffi, lib, library_path
from ._state_dict_api import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                              get_state_dict, optim_state_dict_to_fqn,
                              optim_state_dict_to_positional, set_model_state_dict,
                              set_optimizer_state_dict, set_state_dict, use_communicator)
from ._tensor import Tensor
from ._tree import StateDict


def abi_version() -> tuple[int, int]:
    """(major, minor) of the loaded libdsd's C ABI."""
    return _capi.abi_version()


def version() -> str:
    """libdsd's version, e.g. "0.3.0"."""
    return _capi.version_string()


__version__ = version()

# dsd.IOError and dsd.TimeoutError (subclasses of the builtins OSError and TimeoutError) are
# left out, so `from dsd import *` never shadows the builtins; reach them as dsd.IOError.
__all__ = [
    "AbiMismatchError", "AsyncCheckpointer", "BufferTooSmallError", "CallbackError",
    "CheckpointManager", "CommError", "Communicator", "CorruptError", "DeviceError", "DeviceMesh",
    "DtypeMismatchError", "Error", "ExistsError", "GcReport", "HandleError", "InternalError",
    "InvalidArgumentError", "Layout", "LoadReport", "NoSpaceError", "NotFoundError",
    "OutOfMemoryError", "ReadOnlyError", "SaveFuture", "ShapeMismatchError", "StaleHandleError",
    "StateDict", "StateDictOptions", "StateError", "Tensor", "UnexpectedKeyError",
    "UnsupportedError", "WrongKindError", "abi_version", "async_save", "cli_main", "convert",
    "detect_format", "export_safetensors", "export_torch_save", "ffi", "from_dtensor", "gc",
    "get_model_state_dict", "get_optimizer_state_dict", "get_state_dict", "import_safetensors",
    "import_torch_save", "inspect", "lib", "library_path", "load", "load_full", "optim_state_dict_to_fqn",
    "optim_state_dict_to_positional", "save", "set_model_state_dict", "set_optimizer_state_dict",
    "set_state_dict", "to_dtensor", "use_communicator", "verify", "version",
]
