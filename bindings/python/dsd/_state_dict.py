"""Python dicts and lists <-> dsd state dicts (dsd_state_dict trees).

DTensor leaves cross as distributed tensors (local tensor + layout, see _dist.py); the
meshes they use are converted once per call."""
from __future__ import annotations

import io
from collections.abc import Mapping

from . import _dist, _tensor
from ._errors import call
from ._lib import ffi, lib


class StateDict:
    """Owns one reference to a dsd container (dict or list). Frees it when collected."""

    __slots__ = ("_ptr",)

    def __init__(self, ptr):
        self._ptr = ffi.gc(ptr, lib.dsd_state_dict_free)

    @property
    def ptr(self):
        return self._ptr

    @classmethod
    def new(cls) -> "StateDict":
        out = ffi.new("dsd_state_dict**")
        call(lib.dsd_state_dict_new, out)
        return cls(out[0])

    @classmethod
    def from_python(cls, obj: Mapping, comm: "_dist.Communicator | None" = None) -> "StateDict":
        """A state dict with the structure of `obj`, sharing its tensors. DTensor leaves become
        distributed tensors on dsd meshes over `comm` (needed only when there are DTensors)."""
        return cls(to_dsd(obj, ctx=_dist.MeshCache(comm)))

    def to_python(self, meshes=()):
        """Python containers; distributed tensors come back as DTensors on the torch meshes
        they came from (or on one of `meshes`, torch DeviceMeshes matched by device type,
        shape and ranks)."""
        return to_python(self._ptr, _dist.MeshCache(None, meshes))

    def __len__(self) -> int:
        out = ffi.new("size_t*")
        call(lib.dsd_state_dict_size, self._ptr, out)
        return out[0]

    def equal(self, other: "StateDict") -> tuple[bool, str]:
        out = ffi.new("bool*")
        why = ffi.new("char[]", 512)
        call(lib.dsd_state_dict_equal, self._ptr, other._ptr, out, why, 512)
        return bool(out[0]), ffi.string(why).decode()


def _is_tensor(v) -> bool:
    return hasattr(v, "__dlpack__") and hasattr(v, "__dlpack_device__")


def _put(sd, key, value, path: str, ctx) -> None:
    k = ffi.NULL if key is None else key
    if value is None:
        call(lib.dsd_state_dict_set_none, sd, k)
    elif isinstance(value, bool):
        call(lib.dsd_state_dict_set_bool, sd, k, value)
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise OverflowError(f"{path}: int {value} does not fit in int64")
        call(lib.dsd_state_dict_set_int, sd, k, value)
    elif isinstance(value, float):
        call(lib.dsd_state_dict_set_double, sd, k, value)
    elif isinstance(value, str):
        data = value.encode("utf-8")
        call(lib.dsd_state_dict_set_string, sd, k, data, len(data))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        call(lib.dsd_state_dict_set_bytes, sd, k, data, len(data))
    elif isinstance(value, io.BytesIO):
        data = value.getvalue()
        call(lib.dsd_state_dict_set_bytes, sd, k, data, len(data))
    elif _dist.is_dtensor(value):
        local, layout = _dist.from_dtensor(value, cache=ctx, path=path)
        try:
            call(lib.dsd_state_dict_set_dist_tensor, sd, k, ffi.new("dsd_tensor*", {"bits": local.bits})[0],
                 layout.handle)
        finally:
            local.release()
            layout.release()
    elif _is_tensor(value):
        bits = _tensor.handle_from_tensor(value)
        try:
            call(lib.dsd_state_dict_set_tensor, sd, k, ffi.new("dsd_tensor*", {"bits": bits})[0])
        finally:
            _tensor.release(bits)
    elif isinstance(value, (Mapping, list, tuple)):
        child = to_dsd(value, path, ctx)
        try:
            call(lib.dsd_state_dict_set_child, sd, k, child)
        finally:
            lib.dsd_state_dict_free(child)
    else:
        raise ValueError(f"Unexpected value type {type(value)} at {path or '<root>'}")


def to_dsd(obj, path: str = "", ctx=None):
    """A new dsd container (caller frees) holding a copy of the structure of `obj`; tensors
    are shared, not copied. `ctx` (a _dist.MeshCache) converts the meshes of DTensors."""
    if ctx is None:
        ctx = _dist.MeshCache()
    out = ffi.new("dsd_state_dict**")
    if isinstance(obj, Mapping):
        call(lib.dsd_state_dict_new, out)
        sd = out[0]
        try:
            keys = list(obj.keys())
            int_keyed = bool(keys) and all(isinstance(k, int) and not isinstance(k, bool) for k in keys)
            if int_keyed:
                call(lib.dsd_state_dict_set_int_keys, sd, True)
            for k, v in obj.items():
                if int_keyed:
                    key = str(k)
                elif isinstance(k, str):
                    key = k
                else:
                    raise TypeError(f"{path or '<root>'}: key {k!r} is not a str (or all ints)")
                _put(sd, key.encode("utf-8"), v, f"{path}.{key}" if path else key, ctx)
        except BaseException:
            lib.dsd_state_dict_free(sd)
            raise
        return sd
    if isinstance(obj, (list, tuple)):
        call(lib.dsd_state_dict_new_list, isinstance(obj, tuple), out)
        sd = out[0]
        try:
            for i, v in enumerate(obj):
                _put(sd, None, v, f"{path}.{i}" if path else str(i), ctx)
        except BaseException:
            lib.dsd_state_dict_free(sd)
            raise
        return sd
    raise TypeError(f"expected a dict, list or tuple, got {type(obj)}")


def _get(sd, i: int, kind: int, ctx, tensors: bool = True):
    if kind == lib.DSD_KIND_NONE:
        return None
    if kind == lib.DSD_KIND_BOOL:
        out = ffi.new("bool*")
        call(lib.dsd_state_dict_get_bool, sd, i, out)
        return bool(out[0])
    if kind == lib.DSD_KIND_INT:
        out = ffi.new("int64_t*")
        call(lib.dsd_state_dict_get_int, sd, i, out)
        return int(out[0])
    if kind == lib.DSD_KIND_DOUBLE:
        out = ffi.new("double*")
        call(lib.dsd_state_dict_get_double, sd, i, out)
        return float(out[0])
    if kind in (lib.DSD_KIND_STRING, lib.DSD_KIND_BYTES):
        data = ffi.new("void**") if kind == lib.DSD_KIND_BYTES else ffi.new("char**")
        n = ffi.new("size_t*")
        if kind == lib.DSD_KIND_STRING:
            call(lib.dsd_state_dict_get_string, sd, i, data, n)
            return ffi.unpack(data[0], n[0]).decode("utf-8")
        call(lib.dsd_state_dict_get_bytes, sd, i, data, n)
        return ffi.unpack(ffi.cast("char*", data[0]), n[0])
    if kind == lib.DSD_KIND_TENSOR and not tensors:
        return TENSOR
    if kind == lib.DSD_KIND_TENSOR:
        out = ffi.new("dsd_tensor*")
        call(lib.dsd_state_dict_get_tensor, sd, i, out)
        try:
            dist = ffi.new("bool*")
            call(lib.dsd_state_dict_is_dist_tensor, sd, i, dist)
            if not dist[0]:
                return _tensor.tensor_from_handle(out[0].bits)
            got = ffi.new("dsd_layout*")
            call(lib.dsd_state_dict_get_layout, sd, i, got)
            layout = _dist.Layout(got[0].bits)
            try:
                return _dist.to_dtensor(out[0].bits, layout, ctx)
            finally:
                layout.release()
        finally:
            _tensor.release(out[0].bits)
    out = ffi.new("dsd_state_dict**")
    call(lib.dsd_state_dict_get_child, sd, i, out)
    try:
        return to_python(out[0], ctx, tensors)
    finally:
        lib.dsd_state_dict_free(out[0])


# Stands for a tensor leaf in to_python(..., tensors=False).
TENSOR = object()


def to_python(sd, ctx=None, tensors: bool = True):
    """A Python dict or list (or tuple) with the structure of a dsd container. With
    tensors=False every tensor leaf is TENSOR instead (what a load that filled the tensors in
    place needs back: only the values, without building a tensor or DTensor per leaf)."""
    if ctx is None:
        ctx = _dist.MeshCache()
    kind = ffi.new("dsd_kind*")
    is_tuple = ffi.new("bool*")
    call(lib.dsd_state_dict_container_kind, sd, kind, is_tuple)
    n = ffi.new("size_t*")
    call(lib.dsd_state_dict_size, sd, n)
    k = ffi.new("dsd_kind*")
    if kind[0] == lib.DSD_KIND_LIST:
        items = []
        for i in range(n[0]):
            call(lib.dsd_state_dict_kind, sd, i, k)
            items.append(_get(sd, i, k[0], ctx, tensors))
        return tuple(items) if is_tuple[0] else items
    int_keyed = ffi.new("bool*")
    call(lib.dsd_state_dict_int_keys, sd, int_keyed)
    key = ffi.new("char**")
    result = {}
    for i in range(n[0]):
        call(lib.dsd_state_dict_key, sd, i, key)
        name = ffi.string(key[0]).decode("utf-8")
        call(lib.dsd_state_dict_kind, sd, i, k)
        result[int(name) if int_keyed[0] else name] = _get(sd, i, k[0], ctx, tensors)
    return result

