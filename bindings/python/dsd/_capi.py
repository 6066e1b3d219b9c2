"""The C ABI of libdsd as typed Python functions: the one module that calls `lib.dsd_*`.

One function per C function the package uses, named after it without the `dsd_` prefix. Each
allocates the out-parameters, passes a fresh `dsd_error*` (the ABI wants NULL on entry), turns
a failing status into the mapped dsd.Error subclass (freeing the error object), and returns
Python values:

- strings the library lends (`const char*`) are copied into `str` before returning;
- roots come back owned: cdata pointers under `ffi.gc` with their release function
  (dsd_state_dict_release, dsd_comm_release, dsd_mesh_release; dsd_model_free, ...), dropped
  when collected or at once with release();
- tensor and layout handles are their `bits` (ints); the caller releases them with
  tensor_release() / layout_release();
- dsd_incompatible_keys results become a KeyLists and are freed here;
- option structs are built here from the dataclasses below (or, for the state-dict options,
  from any object with the fields of dsd_state_dict_options), so no other module touches ffi.

Optional pointers are `None` on this side (NULL on the C side). Everything above this module
(state-dict trees, DTensors, the torch adapter, the public API) calls these functions.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, NoReturn, Protocol

from ._errors import error_for
from ._lib import ffi, lib, library_path

CData = Any  # a cffi pointer or struct
StrPath = str | os.PathLike  # a file system path

# ---------------------------------------------------------------------------------------------
# Versions (checked once, when the package is imported)

ABI_VERSION_MAJOR: int = lib.DSD_ABI_VERSION_MAJOR
ABI_VERSION_MINOR: int = lib.DSD_ABI_VERSION_MINOR


def abi_version() -> tuple[int, int]:
    """(major, minor) of the loaded library."""
    v = lib.dsd_abi_version()
    return (v >> 16, v & 0xFFFF)


def version_string() -> str:
    return ffi.string(lib.dsd_version_string()).decode()


if abi_version()[0] != ABI_VERSION_MAJOR:
    raise ImportError(f"dsd: {library_path} has ABI {abi_version()[0]}.x, these bindings need "
                      f"{ABI_VERSION_MAJOR}.x")

# ---------------------------------------------------------------------------------------------
# Errors

OK: int = lib.DSD_OK
E_NOT_FOUND: int = lib.DSD_E_NOT_FOUND
E_STALE_HANDLE: int = lib.DSD_E_STALE_HANDLE


def status_name(status: int) -> str:
    """The short stable name of a status code ("ok", "not_found", ...)."""
    return ffi.string(lib.dsd_status_name(status)).decode()


def _raise(status: int, err: CData) -> NoReturn:
    error = err[0]
    if error == ffi.NULL:
        raise error_for(status, f"dsd call failed with status {status_name(status)}", "")
    try:
        message = ffi.string(lib.dsd_error_message(error)).decode("utf-8", "replace")
        context = ffi.string(lib.dsd_error_context(error)).decode("utf-8", "replace")
    finally:
        lib.dsd_error_free(error)
        err[0] = ffi.NULL
    raise error_for(status, message, context)


def _call(fn: Callable[..., int], *args: Any) -> None:
    """Calls a fallible C function with a fresh (NULL) error slot appended; raises on failure."""
    err = ffi.new("dsd_error**")
    status = fn(*args, err)
    if status != lib.DSD_OK:
        _raise(status, err)


def release(owned: CData | None) -> None:
    """Drops an owned root (from this module) now instead of when it is collected. Idempotent;
    the pointer must not be used afterwards."""
    if owned is not None:
        ffi.release(owned)


def _opt(ptr: CData | None) -> CData:
    return ffi.NULL if ptr is None else ptr


def _path(path: StrPath) -> bytes:
    return os.fsencode(path)


def _key(key: str | None) -> CData | bytes:
    return ffi.NULL if key is None else key.encode("utf-8")


class _Strings:
    """A `const char* const*` array (and the storage it points into) for one call."""

    def __init__(self, items: Sequence[str]):
        self.keep = [ffi.new("char[]", s.encode("utf-8")) for s in items]
        self.array = ffi.new("char*[]", self.keep) if self.keep else ffi.NULL
        self.count = len(self.keep)


def _int64s(values: Sequence[int]) -> CData:
    """An int64_t array of `values` (never of length 0, so never NULL)."""
    return ffi.new("int64_t[]", [int(v) for v in values] or [0])


def _string_out() -> CData:
    return ffi.new("const char**")


def _borrowed(out: CData) -> str:
    return ffi.string(out[0]).decode("utf-8")


# ---------------------------------------------------------------------------------------------
# Tensors (handles are their bits)

def _tensor(bits: int) -> CData:
    return ffi.new("dsd_tensor*", {"bits": bits})[0]


def _tensors(bits: Sequence[int]) -> CData:
    return ffi.new("dsd_tensor[]", [{"bits": b} for b in bits] or [{"bits": 0}])


def tensor_from_dlpack(managed: int) -> int:
    """Imports a `DLManagedTensor*` (an address), taking ownership of it in every case."""
    out = ffi.new("dsd_tensor*")
    _call(lib.dsd_tensor_from_dlpack, ffi.cast("struct DLManagedTensor*", managed), out)
    return int(out[0].bits)


def tensor_from_dlpack_versioned(managed: int) -> int:
    """Imports a `DLManagedTensorVersioned*` (an address), taking ownership of it."""
    out = ffi.new("dsd_tensor*")
    _call(lib.dsd_tensor_from_dlpack_versioned, ffi.cast("struct DLManagedTensorVersioned*", managed),
          out)
    return int(out[0].bits)


def tensor_to_dlpack(bits: int) -> int:
    """A new `DLManagedTensor*` (as an address) of the tensor; free with dlpack_free()."""
    out = ffi.new("struct DLManagedTensor**")
    _call(lib.dsd_tensor_to_dlpack, _tensor(bits), out)
    return int(ffi.cast("uintptr_t", out[0]))


def tensor_to_dlpack_versioned(bits: int) -> int:
    """A new `DLManagedTensorVersioned*` (address); free with dlpack_versioned_free()."""
    out = ffi.new("struct DLManagedTensorVersioned**")
    _call(lib.dsd_tensor_to_dlpack_versioned, _tensor(bits), out)
    return int(ffi.cast("uintptr_t", out[0]))


def dlpack_free(managed: int) -> None:
    lib.dsd_dlpack_free(ffi.cast("struct DLManagedTensor*", managed))


def dlpack_versioned_free(managed: int) -> None:
    lib.dsd_dlpack_versioned_free(ffi.cast("struct DLManagedTensorVersioned*", managed))


def tensor_release(bits: int) -> None:
    _call(lib.dsd_tensor_release, _tensor(bits))


class Device(NamedTuple):
    type: int  # DLPack's device type (kDLCPU 1, kDLCUDA 2)
    index: int


class TensorInfo(NamedTuple):
    dtype: int
    device: Device
    ndim: int
    data: int
    numel: int
    nbytes: int
    read_only: bool
    contiguous: bool


def tensor_info_get(bits: int) -> TensorInfo:
    out = ffi.new("dsd_tensor_info*")
    _call(lib.dsd_tensor_info_get, _tensor(bits), out)
    i = out[0]
    return TensorInfo(int(i.dtype), Device(int(i.device.type), int(i.device.index)), int(i.ndim),
                      int(ffi.cast("uintptr_t", i.data)), int(i.numel), int(i.nbytes),
                      bool(i.read_only), bool(i.contiguous))


def tensor_new_dist(local: int, layout: int) -> int:
    out = ffi.new("dsd_tensor*")
    _call(lib.dsd_tensor_new_dist, _tensor(local), _layout(layout), out)
    return int(out[0].bits)


# ---------------------------------------------------------------------------------------------
# State dicts (owned dsd_state_dict* under ffi.gc)

KIND_NONE: int = lib.DSD_KIND_NONE
KIND_BOOL: int = lib.DSD_KIND_BOOL
KIND_INT: int = lib.DSD_KIND_INT
KIND_DOUBLE: int = lib.DSD_KIND_DOUBLE
KIND_STRING: int = lib.DSD_KIND_STRING
KIND_BYTES: int = lib.DSD_KIND_BYTES
KIND_TENSOR: int = lib.DSD_KIND_TENSOR
KIND_LIST: int = lib.DSD_KIND_LIST
KIND_DICT: int = lib.DSD_KIND_DICT


def _owned_state_dict(out: CData) -> CData:
    return ffi.gc(out[0], lib.dsd_state_dict_release)


def state_dict_new() -> CData:
    out = ffi.new("dsd_state_dict**")
    _call(lib.dsd_state_dict_new, out)
    return _owned_state_dict(out)


def state_dict_new_list(is_tuple: bool) -> CData:
    out = ffi.new("dsd_state_dict**")
    _call(lib.dsd_state_dict_new_list, is_tuple, out)
    return _owned_state_dict(out)


def state_dict_container_kind(sd: CData) -> tuple[int, bool]:
    """(KIND_DICT or KIND_LIST, whether the list is a tuple)."""
    kind = ffi.new("dsd_kind*")
    is_tuple = ffi.new("bool*")
    _call(lib.dsd_state_dict_container_kind, sd, kind, is_tuple)
    return int(kind[0]), bool(is_tuple[0])


def state_dict_int_keys(sd: CData) -> bool:
    out = ffi.new("bool*")
    _call(lib.dsd_state_dict_int_keys, sd, out)
    return bool(out[0])


def state_dict_set_int_keys(sd: CData, int_keys: bool) -> None:
    _call(lib.dsd_state_dict_set_int_keys, sd, int_keys)


def state_dict_size(sd: CData) -> int:
    out = ffi.new("size_t*")
    _call(lib.dsd_state_dict_size, sd, out)
    return int(out[0])


def state_dict_key(sd: CData, index: int) -> str:
    out = _string_out()
    _call(lib.dsd_state_dict_key, sd, index, out)
    return _borrowed(out)


def state_dict_kind(sd: CData, index: int) -> int:
    out = ffi.new("dsd_kind*")
    _call(lib.dsd_state_dict_kind, sd, index, out)
    return int(out[0])


def state_dict_get_bool(sd: CData, index: int) -> bool:
    out = ffi.new("bool*")
    _call(lib.dsd_state_dict_get_bool, sd, index, out)
    return bool(out[0])


def state_dict_get_int(sd: CData, index: int) -> int:
    out = ffi.new("int64_t*")
    _call(lib.dsd_state_dict_get_int, sd, index, out)
    return int(out[0])


def state_dict_get_double(sd: CData, index: int) -> float:
    out = ffi.new("double*")
    _call(lib.dsd_state_dict_get_double, sd, index, out)
    return float(out[0])


def state_dict_get_string(sd: CData, index: int) -> str:
    data = ffi.new("const char**")
    n = ffi.new("size_t*")
    _call(lib.dsd_state_dict_get_string, sd, index, data, n)
    return ffi.unpack(data[0], n[0]).decode("utf-8")


def state_dict_get_bytes(sd: CData, index: int) -> bytes:
    data = ffi.new("const void**")
    n = ffi.new("size_t*")
    _call(lib.dsd_state_dict_get_bytes, sd, index, data, n)
    return ffi.unpack(ffi.cast("const char*", data[0]), n[0])


def state_dict_get_tensor(sd: CData, index: int) -> int:
    """A new tensor handle (bits), which the caller releases."""
    out = ffi.new("dsd_tensor*")
    _call(lib.dsd_state_dict_get_tensor, sd, index, out)
    return int(out[0].bits)


def state_dict_get_child(sd: CData, index: int) -> CData:
    out = ffi.new("dsd_state_dict**")
    _call(lib.dsd_state_dict_get_child, sd, index, out)
    return _owned_state_dict(out)


def state_dict_is_dist_tensor(sd: CData, index: int) -> bool:
    out = ffi.new("bool*")
    _call(lib.dsd_state_dict_is_dist_tensor, sd, index, out)
    return bool(out[0])


def state_dict_get_layout(sd: CData, index: int) -> int:
    """A new layout handle (bits), which the caller releases."""
    out = ffi.new("dsd_layout*")
    _call(lib.dsd_state_dict_get_layout, sd, index, out)
    return int(out[0].bits)


# Writers: `key` names a dict entry; None appends to a list.

def state_dict_set_none(sd: CData, key: str | None) -> None:
    _call(lib.dsd_state_dict_set_none, sd, _key(key))


def state_dict_set_bool(sd: CData, key: str | None, value: bool) -> None:
    _call(lib.dsd_state_dict_set_bool, sd, _key(key), value)


def state_dict_set_int(sd: CData, key: str | None, value: int) -> None:
    _call(lib.dsd_state_dict_set_int, sd, _key(key), value)


def state_dict_set_double(sd: CData, key: str | None, value: float) -> None:
    _call(lib.dsd_state_dict_set_double, sd, _key(key), value)


def state_dict_set_string(sd: CData, key: str | None, value: str) -> None:
    data = value.encode("utf-8")
    _call(lib.dsd_state_dict_set_string, sd, _key(key), data, len(data))


def state_dict_set_bytes(sd: CData, key: str | None, value: bytes) -> None:
    _call(lib.dsd_state_dict_set_bytes, sd, _key(key), value, len(value))


def state_dict_set_tensor(sd: CData, key: str | None, tensor: int) -> None:
    """Stores a tensor; the state dict keeps its own reference (the caller still releases)."""
    _call(lib.dsd_state_dict_set_tensor, sd, _key(key), _tensor(tensor))


def state_dict_set_dist_tensor(sd: CData, key: str | None, local: int, layout: int) -> None:
    _call(lib.dsd_state_dict_set_dist_tensor, sd, _key(key), _tensor(local), _layout(layout))


def state_dict_set_child(sd: CData, key: str | None, child: CData) -> None:
    """Stores a reference to `child` (the caller keeps its own)."""
    _call(lib.dsd_state_dict_set_child, sd, _key(key), child)


def state_dict_equal(a: CData, b: CData) -> tuple[bool, str]:
    """(equal, a description of the first difference or "")."""
    equal = ffi.new("bool*")
    why = _string_out()
    _call(lib.dsd_state_dict_equal, a, b, equal, why)
    return bool(equal[0]), ("" if why[0] == ffi.NULL else _borrowed(why))


# ---------------------------------------------------------------------------------------------
# Communicators, meshes and layouts

def _comm_options(timeout_ms: int | None) -> CData:
    o = ffi.new("dsd_comm_options*")
    lib.dsd_comm_options_init(o)
    if timeout_ms is not None:
        o.timeout_ms = timeout_ms
    return o


def _owned_comm(out: CData) -> CData:
    return ffi.gc(out[0], lib.dsd_comm_release)


def comm_new_from_env(timeout_ms: int | None = None) -> CData:
    out = ffi.new("dsd_comm**")
    _call(lib.dsd_comm_new_from_env, _comm_options(timeout_ms), out)
    return _owned_comm(out)


def comm_new_file_store(path: StrPath, rank: int, size: int, timeout_ms: int | None = None) -> CData:
    out = ffi.new("dsd_comm**")
    _call(lib.dsd_comm_new_file_store, _path(path), rank, size, _comm_options(timeout_ms), out)
    return _owned_comm(out)


def comm_new_nccl(nccl_comm: int, cuda_stream: int, rank: int, size: int,
                  timeout_ms: int | None = None) -> CData:
    """Over a caller-owned ncclComm_t and cudaStream_t, given as addresses (0: NULL)."""
    out = ffi.new("dsd_comm**")
    _call(lib.dsd_comm_new_nccl, ffi.cast("void*", nccl_comm), ffi.cast("void*", cuda_stream), rank,
          size, _comm_options(timeout_ms), out)
    return _owned_comm(out)


def comm_new_local() -> CData:
    out = ffi.new("dsd_comm**")
    _call(lib.dsd_comm_new_local, out)
    return _owned_comm(out)


def comm_retain(comm: CData) -> CData:
    """Another owned reference to the same communicator."""
    return ffi.gc(lib.dsd_comm_retain(comm), lib.dsd_comm_release)


def comm_rank(comm: CData) -> int:
    out = ffi.new("int32_t*")
    _call(lib.dsd_comm_rank, comm, out)
    return int(out[0])


def comm_size(comm: CData) -> int:
    out = ffi.new("int32_t*")
    _call(lib.dsd_comm_size, comm, out)
    return int(out[0])


def comm_backend(comm: CData) -> str:
    out = _string_out()
    _call(lib.dsd_comm_backend, comm, out)
    return _borrowed(out)


def comm_barrier(comm: CData) -> None:
    _call(lib.dsd_comm_barrier, comm)


DEVICE_TYPES: dict[str, int] = {"cpu": lib.DSD_DEVICE_CPU, "cuda": lib.DSD_DEVICE_CUDA}
_DEVICE_NAMES = {v: k for k, v in DEVICE_TYPES.items()}


def mesh_new(comm: CData, shape: Sequence[int], ranks: Sequence[int] | None, device_type: str) -> CData:
    """A mesh of `shape` over `ranks` (row-major; None: 0, 1, 2, ...) of "cpu" or "cuda"."""
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device type {device_type!r} has no dsd mesh (cpu or cuda)")
    c_ranks = ffi.NULL if ranks is None else ffi.new("int32_t[]", [int(r) for r in ranks])
    count = 0 if ranks is None else len(ranks)
    out = ffi.new("dsd_mesh**")
    _call(lib.dsd_mesh_new, comm, _int64s(shape), len(shape), c_ranks, count, DEVICE_TYPES[device_type],
          out)
    return ffi.gc(out[0], lib.dsd_mesh_release)


def mesh_ndim(mesh: CData) -> int:
    out = ffi.new("size_t*")
    _call(lib.dsd_mesh_ndim, mesh, out)
    return int(out[0])


def mesh_shape(mesh: CData) -> tuple[int, ...]:
    n = mesh_ndim(mesh)
    out = ffi.new("int64_t[]", max(n, 1))
    _call(lib.dsd_mesh_shape, mesh, out, n)
    return tuple(out[0:n])


def mesh_ranks(mesh: CData) -> tuple[int, ...]:
    count = 1
    for s in mesh_shape(mesh):
        count *= s
    out = ffi.new("int32_t[]", max(count, 1))
    _call(lib.dsd_mesh_ranks, mesh, out, count)
    return tuple(out[0:count])


def mesh_device_type(mesh: CData) -> str:
    out = ffi.new("dsd_device_type*")
    _call(lib.dsd_mesh_device_type, mesh, out)
    return _DEVICE_NAMES[out[0]]


def mesh_coordinate(mesh: CData) -> tuple[int, ...] | None:
    """This rank's coordinate, or None when it is not part of the mesh."""
    n = mesh_ndim(mesh)
    inside = ffi.new("bool*")
    out = ffi.new("int64_t[]", max(n, 1))
    _call(lib.dsd_mesh_coordinate, mesh, inside, out, n)
    return tuple(out[0:n]) if inside[0] else None


def _layout(bits: int) -> CData:
    return ffi.new("dsd_layout*", {"bits": bits})[0]


Placement = tuple  # ("shard", dim) or ("replicate",)


def layout_new_placements(mesh: CData, global_shape: Sequence[int],
                          placements: Sequence[Placement]) -> int:
    ps = ffi.new("dsd_placement[]", max(len(placements), 1))
    for i, p in enumerate(placements):
        if p[0] == "shard":
            ps[i].kind, ps[i].dim = lib.DSD_PLACEMENT_SHARD, int(p[1])
        elif p[0] == "replicate":
            ps[i].kind, ps[i].dim = lib.DSD_PLACEMENT_REPLICATE, 0
        else:
            raise ValueError(f"unknown placement {p!r}")
    out = ffi.new("dsd_layout*")
    _call(lib.dsd_layout_new_placements, mesh, _int64s(global_shape), len(global_shape), ps,
          len(placements), out)
    return int(out[0].bits)


def layout_new_chunk(mesh: CData, global_shape: Sequence[int], offsets: Sequence[int],
                     sizes: Sequence[int]) -> int:
    out = ffi.new("dsd_layout*")
    _call(lib.dsd_layout_new_chunk, mesh, _int64s(global_shape), len(global_shape), _int64s(offsets),
          _int64s(sizes), out)
    return int(out[0].bits)


def layout_release(bits: int) -> None:
    _call(lib.dsd_layout_release, _layout(bits))


def layout_ndim(bits: int) -> int:
    out = ffi.new("size_t*")
    _call(lib.dsd_layout_ndim, _layout(bits), out)
    return int(out[0])


def layout_global_shape(bits: int) -> tuple[int, ...]:
    n = layout_ndim(bits)
    out = ffi.new("int64_t[]", max(n, 1))
    _call(lib.dsd_layout_global_shape, _layout(bits), out, n)
    return tuple(out[0:n])


def layout_local_chunk(bits: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of the box this rank holds."""
    n = layout_ndim(bits)
    offsets = ffi.new("int64_t[]", max(n, 1))
    sizes = ffi.new("int64_t[]", max(n, 1))
    _call(lib.dsd_layout_local_chunk, _layout(bits), offsets, sizes, n)
    return tuple(offsets[0:n]), tuple(sizes[0:n])


def layout_is_chunk(bits: int) -> bool:
    out = ffi.new("bool*")
    _call(lib.dsd_layout_is_chunk, _layout(bits), out)
    return bool(out[0])


def layout_mesh(bits: int) -> CData:
    out = ffi.new("dsd_mesh**")
    _call(lib.dsd_layout_mesh, _layout(bits), out)
    return ffi.gc(out[0], lib.dsd_mesh_release)


def layout_placements(bits: int) -> list[Placement]:
    mesh = layout_mesh(bits)
    try:
        n = mesh_ndim(mesh)
    finally:
        release(mesh)
    out = ffi.new("dsd_placement[]", max(n, 1))
    _call(lib.dsd_layout_placements, _layout(bits), out, n)
    return [("shard", int(out[i].dim)) if out[i].kind == lib.DSD_PLACEMENT_SHARD else ("replicate",)
            for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Models and optimizers

class KeyLists(NamedTuple):
    """A dsd_incompatible_keys result."""

    missing: list[str]
    unexpected: list[str]
    skipped: list[str]


def _take_keys(out: CData) -> KeyLists:
    """Reads and frees the dsd_incompatible_keys* in `out` (written on success)."""
    keys = out[0]
    lists = KeyLists([], [], [])
    if keys == ffi.NULL:
        return lists
    try:
        n = ffi.new("size_t*")
        s = _string_out()
        for which, names in ((lib.DSD_KEYS_MISSING, lists.missing),
                             (lib.DSD_KEYS_UNEXPECTED, lists.unexpected),
                             (lib.DSD_KEYS_SKIPPED, lists.skipped)):
            _call(lib.dsd_incompatible_keys_count, keys, which, n)
            for i in range(n[0]):
                _call(lib.dsd_incompatible_keys_key, keys, which, i, s)
                names.append(_borrowed(s))
    finally:
        lib.dsd_incompatible_keys_free(keys)
    return lists


WRAPPER_KINDS: dict[str, int] = {"ddp": lib.DSD_WRAPPER_DDP, "fsdp": lib.DSD_WRAPPER_FSDP,
                                 "compile": lib.DSD_WRAPPER_COMPILE,
                                 "checkpoint": lib.DSD_WRAPPER_CHECKPOINT}


def model_new(comm: CData | None, class_name: str | None) -> CData:
    out = ffi.new("dsd_model**")
    _call(lib.dsd_model_new, _opt(comm), _key(class_name), out)
    return ffi.gc(out[0], lib.dsd_model_free)


def model_add_parameter(model: CData, name: str, tensor: int, requires_grad: bool) -> None:
    _call(lib.dsd_model_add_parameter, model, name.encode(), _tensor(tensor), requires_grad)


def model_add_buffer(model: CData, name: str, tensor: int, persistent: bool) -> None:
    _call(lib.dsd_model_add_buffer, model, name.encode(), _tensor(tensor), persistent)


def model_add_extra_state(model: CData, name: str, holder: CData, index: int) -> None:
    _call(lib.dsd_model_add_extra_state, model, name.encode(), holder, index)


def model_declare_wrapper(model: CData, module_path: str, kind: str) -> None:
    """`kind`: "ddp", "fsdp", "compile" or "checkpoint"."""
    _call(lib.dsd_model_declare_wrapper, model, module_path.encode(), WRAPPER_KINDS[kind])


def model_add_fqn_modifier(model: CData, module_path: str, segment: str, child: str) -> None:
    _call(lib.dsd_model_add_fqn_modifier, model, module_path.encode(), segment.encode(),
          child.encode())


def model_canonical_fqn(model: CData, raw_name: str) -> str:
    out = _string_out()
    _call(lib.dsd_model_canonical_fqn, model, raw_name.encode(), out)
    return _borrowed(out)


def model_entries(model: CData) -> CData:
    out = ffi.new("dsd_state_dict**")
    _call(lib.dsd_model_entries, model, out)
    return _owned_state_dict(out)


def optim_new() -> CData:
    out = ffi.new("dsd_optim**")
    _call(lib.dsd_optim_new, out)
    return ffi.gc(out[0], lib.dsd_optim_free)


def optim_add_param_group(optim: CData, options: CData | None, params: Sequence[int]) -> None:
    _call(lib.dsd_optim_add_param_group, optim, _opt(options), _tensors(params), len(params))


def optim_set_param_state(optim: CData, param: int, state: CData | None) -> None:
    _call(lib.dsd_optim_set_param_state, optim, _tensor(param), _opt(state))


def optim_get_param_state(optim: CData, param: int) -> CData | None:
    """The parameter's state dict, or None when it has none (or is in no group)."""
    out = ffi.new("dsd_state_dict**")
    err = ffi.new("dsd_error**")
    status = lib.dsd_optim_get_param_state(optim, _tensor(param), out, err)
    if status == lib.DSD_E_NOT_FOUND:
        lib.dsd_error_free(err[0])
        return None
    if status != lib.DSD_OK:
        _raise(status, err)
    return _owned_state_dict(out)


def optim_param_group_count(optim: CData) -> int:
    out = ffi.new("size_t*")
    _call(lib.dsd_optim_param_group_count, optim, out)
    return int(out[0])


def optim_get_param_group(optim: CData, index: int) -> CData:
    out = ffi.new("dsd_state_dict**")
    _call(lib.dsd_optim_get_param_group, optim, index, out)
    return _owned_state_dict(out)


def optim_set_materialize(optim: CData, materialize: Callable[[list[int]], bool]) -> CData:
    """Installs `materialize(pids)` (returns True when it registered the state) as the
    optimizer's materialize callback. Returns the C callback, which the caller keeps alive as
    long as `optim`. An exception escaping `materialize` fails the get/set (DSD_E_CALLBACK)."""

    def trampoline(user_data, optim_ptr, params, pids, count):
        del user_data, optim_ptr, params
        ok = materialize([int(pids[i]) for i in range(count)])
        return lib.DSD_OK if ok else lib.DSD_E_CALLBACK

    callback = ffi.callback("dsd_materialize_fn", trampoline, error=lib.DSD_E_CALLBACK)
    _call(lib.dsd_optim_set_materialize, optim, callback, ffi.NULL)
    return callback


class StateDictOptionsLike(Protocol):
    """What the state-dict functions read: the fields of dsd_state_dict_options."""

    full_state_dict: bool
    cpu_offload: bool
    ignore_frozen_params: bool
    keep_submodule_prefixes: bool
    strict: bool
    broadcast_from_rank0: bool
    flatten_optimizer_state_dict: bool
    dsd_fqn_modifiers: str
    bucket_bytes: int


_STATE_DICT_FLAGS = ("full_state_dict", "cpu_offload", "ignore_frozen_params", "keep_submodule_prefixes",
                     "strict", "broadcast_from_rank0", "flatten_optimizer_state_dict", "bucket_bytes")


class _StateDictOptions:
    """A dsd_state_dict_options for one call (it borrows the dsd_fqn_modifiers string)."""

    def __init__(self, options: StateDictOptionsLike | None):
        self.struct = ffi.new("dsd_state_dict_options*")
        lib.dsd_state_dict_options_init(self.struct)
        self.keep = None
        if options is not None:
            for f in _STATE_DICT_FLAGS:
                setattr(self.struct, f, getattr(options, f))
            self.keep = ffi.new("char[]", options.dsd_fqn_modifiers.encode())
            self.struct.dsd_fqn_modifiers = self.keep


def _optims(optims: Sequence[CData]) -> CData:
    return ffi.new("dsd_optim*[]", list(optims) or [ffi.NULL])


def get_model_state_dict(model: CData, submodules: Sequence[str],
                         options: StateDictOptionsLike | None) -> CData:
    """With `submodules` (raw module paths), only the entries under them."""
    o = _StateDictOptions(options)
    out = ffi.new("dsd_state_dict**")
    if submodules:
        subs = _Strings(submodules)
        _call(lib.dsd_get_model_state_dict_submodules, model, subs.array, subs.count, o.struct, out)
    else:
        _call(lib.dsd_get_model_state_dict, model, o.struct, out)
    return _owned_state_dict(out)


def set_model_state_dict(model: CData, state_dict: CData,
                         options: StateDictOptionsLike | None) -> KeyLists:
    o = _StateDictOptions(options)
    out = ffi.new("dsd_incompatible_keys**")
    _call(lib.dsd_set_model_state_dict, model, state_dict, o.struct, out)
    return _take_keys(out)


def get_optimizer_state_dict(model: CData, optims: Sequence[CData],
                             options: StateDictOptionsLike | None) -> CData:
    o = _StateDictOptions(options)
    out = ffi.new("dsd_state_dict**")
    _call(lib.dsd_get_optimizer_state_dict, model, _optims(optims), len(optims), o.struct, out)
    return _owned_state_dict(out)


def set_optimizer_state_dict(model: CData, optims: Sequence[CData], optim_state_dict: CData,
                             options: StateDictOptionsLike | None) -> None:
    o = _StateDictOptions(options)
    _call(lib.dsd_set_optimizer_state_dict, model, _optims(optims), len(optims), optim_state_dict,
          o.struct)


def get_state_dict(model: CData, optims: Sequence[CData],
                   options: StateDictOptionsLike | None) -> tuple[CData, CData]:
    o = _StateDictOptions(options)
    msd = ffi.new("dsd_state_dict**")
    osd = ffi.new("dsd_state_dict**")
    _call(lib.dsd_get_state_dict, model, _optims(optims), len(optims), o.struct, msd, osd)
    return _owned_state_dict(msd), _owned_state_dict(osd)


def set_state_dict(model: CData, optims: Sequence[CData], model_state_dict: CData,
                   optim_state_dict: CData, options: StateDictOptionsLike | None) -> KeyLists:
    o = _StateDictOptions(options)
    out = ffi.new("dsd_incompatible_keys**")
    _call(lib.dsd_set_state_dict, model, _optims(optims), len(optims), model_state_dict,
          optim_state_dict, o.struct, out)
    return _take_keys(out)


def optim_state_dict_to_fqn(positional: CData, names: Sequence[str]) -> CData:
    n = _Strings(names)
    out = ffi.new("dsd_state_dict**")
    _call(lib.dsd_optim_state_dict_to_fqn, positional, n.array, n.count, out)
    return _owned_state_dict(out)


def optim_state_dict_to_positional(fqn_form: CData, names: Sequence[str]) -> CData:
    n = _Strings(names)
    out = ffi.new("dsd_state_dict**")
    _call(lib.dsd_optim_state_dict_to_positional, fqn_form, n.array, n.count, out)
    return _owned_state_dict(out)


# ---------------------------------------------------------------------------------------------
# Checkpoints

FORMATS: dict[str, int] = {"dsd": lib.DSD_FORMAT_DSD, "dcp": lib.DSD_FORMAT_DCP,
                           "torch": lib.DSD_FORMAT_TORCH, "safetensors": lib.DSD_FORMAT_SAFETENSORS}
_FORMAT_NAMES = {v: k for k, v in FORMATS.items()}


def _format_code(name: str) -> int:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; expected one of {sorted(FORMATS)}") from None


@dataclasses.dataclass(frozen=True)
class SaveOptions:
    """dsd_checkpoint_save_options; None keeps the library's default."""

    overwrite: bool = False
    thread_count: int = 0
    save_to_lowest_rank: bool = False
    sync_files: bool = True
    block_size: int | None = None
    format: str = "dsd"
    enable_plan_caching: bool = False
    max_staging_bytes: int = 0
    base: str | None = None
    incremental: bool = False

    def __post_init__(self):
        _format_code(self.format)
        if self.max_staging_bytes < 0:
            raise ValueError(f"max_staging_bytes {self.max_staging_bytes} is negative")  # an unknown name fails before any work starts


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """dsd_checkpoint_load_options."""

    strict: bool = True
    thread_count: int = 0
    verify: bool = True
    allow_external_files: bool = False
    cooperative_load: str = "across_hosts"

    def __post_init__(self):
        if self.cooperative_load not in _COOPERATIVE:
            raise ValueError(f"unknown cooperative_load {self.cooperative_load!r}; expected one of {list(_COOPERATIVE)}")


# LoadOptions.cooperative_load -> (dsd_checkpoint_load_options.cooperative_load,
# .cooperative_load_on_one_host)
_COOPERATIVE = {"across_hosts": (True, False), "always": (True, True), "never": (False, False)}


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """dsd_format_convert_options; None keeps the library's default. `dtype` is a PyTorch
    dtype name without "torch." ("bfloat16")."""

    overwrite: bool = False
    thread_count: int = 0
    max_shard_size: int | None = None
    select: str | None = None
    strip_prefix: bool = False
    dtype: str | None = None
    dequantize: bool = False
    materialize: bool = False

    def __post_init__(self):
        if self.dtype is not None:
            dtype_code(self.dtype)  # an unknown name fails before any work starts


_DTYPE_CODES: dict[str, int] = {}


def dtype_code(name: str) -> int:
    """The DSD_DTYPE_* of a PyTorch dtype name ("bfloat16" or "torch.bfloat16")."""
    if not _DTYPE_CODES:
        code = 1
        while (n := lib.dsd_dtype_name(code)) != ffi.NULL:
            _DTYPE_CODES[ffi.string(n).decode("ascii")] = code
            code += 1
    key = name.removeprefix("torch.")
    try:
        return _DTYPE_CODES[key]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPE_CODES)}") from None


class _SaveOptionsArg:
    """dsd_checkpoint_save_options for one call (`ptr`), and the base path it points to."""

    def __init__(self, o: SaveOptions | None):
        self.ptr = ffi.NULL
        self._base = ffi.NULL
        if o is None:
            return
        c = ffi.new("dsd_checkpoint_save_options*")
        lib.dsd_checkpoint_save_options_init(c)
        c.overwrite = o.overwrite
        c.thread_count = o.thread_count
        c.save_to_lowest_rank = o.save_to_lowest_rank
        c.sync_files = o.sync_files
        if o.block_size is not None:
            c.block_size = o.block_size
        c.format = _format_code(o.format)
        c.enable_plan_caching = o.enable_plan_caching
        c.max_staging_bytes = o.max_staging_bytes
        if o.base is not None:
            self._base = ffi.new("char[]", os.fsencode(o.base))
            c.base = self._base
        c.incremental = o.incremental
        self.ptr = c


def _load_options(o: LoadOptions | None) -> CData:
    if o is None:
        return ffi.NULL
    c = ffi.new("dsd_checkpoint_load_options*")
    lib.dsd_checkpoint_load_options_init(c)
    c.strict = o.strict
    c.thread_count = o.thread_count
    c.verify = o.verify
    c.allow_external_files = o.allow_external_files
    c.cooperative_load, c.cooperative_load_on_one_host = _COOPERATIVE[o.cooperative_load]
    return c


class _ConvertOptionsArg:
    """dsd_format_convert_options for one call (`ptr`), and the select string it points to."""

    def __init__(self, o: ConvertOptions | None):
        self.ptr = ffi.NULL
        self._select = ffi.NULL
        if o is None:
            return
        c = ffi.new("dsd_format_convert_options*")
        lib.dsd_format_convert_options_init(c)
        c.overwrite = o.overwrite
        c.thread_count = o.thread_count
        if o.max_shard_size is not None:
            c.max_shard_size = o.max_shard_size
        if o.select is not None:
            self._select = ffi.new("char[]", o.select.encode("utf-8"))
            c.select = self._select
        c.strip_prefix = o.strip_prefix
        if o.dtype is not None:
            c.dtype = dtype_code(o.dtype)
        c.dequantize = o.dequantize
        c.materialize = o.materialize
        self.ptr = c


def checkpoint_save(comm: CData | None, sd: CData, path: StrPath, options: SaveOptions | None = None) -> None:
    o = _SaveOptionsArg(options)
    _call(lib.dsd_checkpoint_save, _opt(comm), sd, _path(path), o.ptr)


def async_checkpointer_new(comm: CData | None) -> CData:
    out = ffi.new("dsd_async_checkpointer**")
    _call(lib.dsd_async_checkpointer_new, _opt(comm), out)
    return ffi.gc(out[0], lib.dsd_async_checkpointer_free)


def _owned_future(out: CData) -> CData:
    return ffi.gc(out[0], lib.dsd_future_free)


def checkpoint_save_async(checkpointer: CData, sd: CData, path: StrPath,
                          options: SaveOptions | None = None) -> CData:
    out = ffi.new("dsd_future**")
    o = _SaveOptionsArg(options)
    _call(lib.dsd_checkpoint_save_async, checkpointer, sd, _path(path), o.ptr, out)
    return _owned_future(out)


def future_wait(future: CData, timeout_ms: int) -> None:
    """Raises the save's error, or a "timeout" dsd.Error while it still runs."""
    _call(lib.dsd_future_wait, future, timeout_ms)


def future_is_staged(future: CData) -> bool:
    out = ffi.new("bool*")
    _call(lib.dsd_future_is_staged, future, out)
    return bool(out[0])


def future_is_done(future: CData) -> bool:
    out = ffi.new("bool*")
    _call(lib.dsd_future_is_done, future, out)
    return bool(out[0])


def checkpoint_load(comm: CData | None, sd: CData, path: StrPath,
                    options: LoadOptions | None = None) -> KeyLists:
    out = ffi.new("dsd_incompatible_keys**")
    _call(lib.dsd_checkpoint_load, _opt(comm), sd, _path(path), _load_options(options), out)
    return _take_keys(out)


def checkpoint_load_full(path: StrPath, keys: Sequence[str]) -> CData:
    k = _Strings(keys)
    out = ffi.new("dsd_state_dict**")
    _call(lib.dsd_checkpoint_load_full, _path(path), k.array, k.count, out)
    return _owned_state_dict(out)


def checkpoint_verify(path: StrPath) -> None:
    _call(lib.dsd_checkpoint_verify, _path(path))


def checkpoint_gc(root: StrPath) -> tuple[int, int, int]:
    """dsd_checkpoint_gc: (retired directories removed, files removed, bytes removed)."""
    out = ffi.new("dsd_checkpoint_gc_report*")
    _call(lib.dsd_checkpoint_gc, _path(root), out)
    return int(out.retired_removed), int(out.files_removed), int(out.bytes_removed)


def checkpoint_manager_new(comm: CData | None, root: StrPath, keep_last: int) -> CData:
    out = ffi.new("dsd_checkpoint_manager**")
    _call(lib.dsd_checkpoint_manager_new, _opt(comm), _path(root), keep_last, out)
    return ffi.gc(out[0], lib.dsd_checkpoint_manager_free)


def checkpoint_manager_save(manager: CData, sd: CData, step: int,
                            options: SaveOptions | None = None) -> None:
    o = _SaveOptionsArg(options)
    _call(lib.dsd_checkpoint_manager_save, manager, sd, step, o.ptr)


def checkpoint_manager_save_async(manager: CData, sd: CData, step: int,
                                  options: SaveOptions | None = None) -> CData:
    out = ffi.new("dsd_future**")
    o = _SaveOptionsArg(options)
    _call(lib.dsd_checkpoint_manager_save_async, manager, sd, step, o.ptr, out)
    return _owned_future(out)


def checkpoint_manager_latest_step(manager: CData) -> int | None:
    found = ffi.new("bool*")
    step = ffi.new("int64_t*")
    _call(lib.dsd_checkpoint_manager_latest_step, manager, found, step)
    return int(step[0]) if found[0] else None


def checkpoint_manager_load_latest(manager: CData, sd: CData,
                                   options: LoadOptions | None = None) -> int | None:
    """The step loaded, or None when there is no complete checkpoint (`sd` untouched)."""
    found = ffi.new("bool*")
    step = ffi.new("int64_t*")
    _call(lib.dsd_checkpoint_manager_load_latest, manager, sd, _load_options(options), found, step)
    return int(step[0]) if found[0] else None


# ---------------------------------------------------------------------------------------------
# Formats and conversions

def format_detect(path: StrPath) -> str:
    """"dsd", "dcp", "torch" or "safetensors"."""
    out = ffi.new("dsd_format*")
    _call(lib.dsd_format_detect, _path(path), out)
    return _FORMAT_NAMES[out[0]]


def format_inspect(path: StrPath, options: LoadOptions | None = None) -> CData:
    """dsd_format_inspect: a state dict of plain values describing what is at `path`."""
    out = ffi.new("dsd_state_dict**")
    _call(lib.dsd_format_inspect, _path(path), _load_options(options), out)
    return _owned_state_dict(out)


def format_convert(src: StrPath, dst: StrPath, to: str, options: ConvertOptions | None = None) -> None:
    o = _ConvertOptionsArg(options)
    _call(lib.dsd_format_convert, _path(src), _path(dst), _format_code(to), o.ptr)


def torch_save_export(sd: CData, path: StrPath, options: ConvertOptions | None = None) -> None:
    o = _ConvertOptionsArg(options)
    _call(lib.dsd_torch_save_export, sd, _path(path), o.ptr)


def torch_save_import(path: StrPath) -> CData:
    out = ffi.new("dsd_state_dict**")
    _call(lib.dsd_torch_save_import, _path(path), out)
    return _owned_state_dict(out)


def safetensors_export(sd: CData, path: StrPath, options: ConvertOptions | None = None) -> None:
    o = _ConvertOptionsArg(options)
    _call(lib.dsd_safetensors_export, sd, _path(path), o.ptr)


def safetensors_import(path: StrPath) -> CData:
    out = ffi.new("dsd_state_dict**")
    _call(lib.dsd_safetensors_import, _path(path), out)
    return _owned_state_dict(out)
