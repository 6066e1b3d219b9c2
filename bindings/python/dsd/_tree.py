"""Python dicts and lists <-> dsd state-dict trees (dsd_state_dict containers), and
dsd.StateDict, a Python-owned reference to one.

DTensor leaves cross as distributed tensors (local tensor + layout, see _dist.py); the
meshes they use are converted once per call."""
from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping

from . import _capi, _dist, _tensor
from ._capi import CData
from ._errors import closed


class StateDict:
    """Owns one reference to a dsd container (dict or list), dropped when collected or by
    close() (also when leaving a `with` block); using it afterwards raises
    dsd.StaleHandleError."""

    __slots__ = ("_ptr",)

    def __init__(self, ptr: CData):
        """`ptr`: an owned dsd_state_dict* from _capi (this object takes it over)."""
        self._ptr = ptr

    @property
    def ptr(self) -> CData:
        """The dsd_state_dict*, for C calls through dsd.lib; valid until close()."""
        if self._ptr is None:
            raise closed("StateDict")
        return self._ptr

    @classmethod
    def new(cls) -> "StateDict":
        """An empty dict container."""
        return cls(_capi.state_dict_new())

    @classmethod
    def from_python(cls, obj: Mapping, comm: "_dist.Communicator | None" = None) -> "StateDict":
        """A state dict with the structure of `obj`, sharing its tensors. DTensor leaves become
        distributed tensors on dsd meshes over `comm` (default: the process communicator, see
        dsd.save; needed only when there are DTensors)."""
        return cls(to_dsd(obj, ctx=_dist.MeshCache(_dist.communicator_for(comm, obj))))

    def to_python(self, meshes=()):
        """Python containers; distributed tensors come back as DTensors on the torch meshes
        they came from (or on one of `meshes`, torch DeviceMeshes matched by device type,
        shape and ranks)."""
        return to_python(self.ptr, _dist.MeshCache(None, meshes))

    def __len__(self) -> int:
        return _capi.state_dict_size(self.ptr)

    def equal(self, other: "StateDict") -> tuple[bool, str]:
        """(whether both trees are equal, a description of the first difference)."""
        return _capi.state_dict_equal(self.ptr, other.ptr)

    @property
    def closed(self) -> bool:
        """Whether close() (or release()) was called."""
        return self._ptr is None

    def close(self) -> None:
        """Drops the reference now (also the tensors it keeps alive). Idempotent."""
        ptr, self._ptr = self._ptr, None
        _capi.release(ptr)

    release = close

    def __enter__(self) -> "StateDict":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_tensor(v) -> bool:
    return hasattr(v, "__dlpack__") and hasattr(v, "__dlpack_device__")


def _put(sd: CData, key: str | None, value, path: str, ctx: "_dist.MeshCache") -> None:
    if value is None:
        _capi.state_dict_set_none(sd, key)
    elif isinstance(value, bool):
        _capi.state_dict_set_bool(sd, key, value)
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise OverflowError(f"{path}: int {value} does not fit in int64")
        _capi.state_dict_set_int(sd, key, value)
    elif isinstance(value, float):
        _capi.state_dict_set_double(sd, key, value)
    elif isinstance(value, str):
        _capi.state_dict_set_string(sd, key, value)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        _capi.state_dict_set_bytes(sd, key, bytes(value))
    elif isinstance(value, io.BytesIO):
        _capi.state_dict_set_bytes(sd, key, value.getvalue())
    elif _dist.is_dtensor(value):
        local, layout = _dist.from_dtensor(value, cache=ctx, path=path)
        try:
            _capi.state_dict_set_dist_tensor(sd, key, local.bits, layout.bits)
        finally:
            local.release()
            layout.release()
    elif _is_tensor(value):
        bits = _tensor.handle_from_tensor(value)
        try:
            _capi.state_dict_set_tensor(sd, key, bits)
        finally:
            _tensor.release(bits)
    elif isinstance(value, (Mapping, list, tuple)):
        child = to_dsd(value, path, ctx)
        try:
            _capi.state_dict_set_child(sd, key, child)
        finally:
            _capi.release(child)
    else:
        raise ValueError(f"Unexpected value type {type(value)} at {path or '<root>'}")


def to_dsd(obj, path: str = "", ctx: "_dist.MeshCache | None" = None) -> CData:
    """A new owned dsd container (see _capi.release) holding a copy of the structure of
    `obj`; tensors are shared, not copied. `ctx` converts the meshes of DTensors."""
    if ctx is None:
        ctx = _dist.MeshCache()
    if isinstance(obj, Mapping):
        sd = _capi.state_dict_new()
        try:
            keys = list(obj.keys())
            int_keyed = bool(keys) and all(isinstance(k, int) and not isinstance(k, bool) for k in keys)
            if int_keyed:
                _capi.state_dict_set_int_keys(sd, True)
            for k, v in obj.items():
                if int_keyed:
                    key = str(k)
                elif isinstance(k, str):
                    key = k
                else:
                    raise TypeError(f"{path or '<root>'}: key {k!r} is not a str (or all ints)")
                _put(sd, key, v, f"{path}.{key}" if path else key, ctx)
        except BaseException:
            _capi.release(sd)
            raise
        return sd
    if isinstance(obj, (list, tuple)):
        sd = _capi.state_dict_new_list(isinstance(obj, tuple))
        try:
            for i, v in enumerate(obj):
                _put(sd, None, v, f"{path}.{i}" if path else str(i), ctx)
        except BaseException:
            _capi.release(sd)
            raise
        return sd
    raise TypeError(f"expected a dict, list or tuple, got {type(obj)}")


# Stands for a tensor leaf in to_python(..., tensors=False).
TENSOR = object()


def _get(sd: CData, i: int, kind: int, ctx: "_dist.MeshCache", tensors: bool = True):
    if kind == _capi.KIND_NONE:
        return None
    if kind == _capi.KIND_BOOL:
        return _capi.state_dict_get_bool(sd, i)
    if kind == _capi.KIND_INT:
        return _capi.state_dict_get_int(sd, i)
    if kind == _capi.KIND_DOUBLE:
        return _capi.state_dict_get_double(sd, i)
    if kind == _capi.KIND_STRING:
        return _capi.state_dict_get_string(sd, i)
    if kind == _capi.KIND_BYTES:
        return _capi.state_dict_get_bytes(sd, i)
    if kind == _capi.KIND_TENSOR and not tensors:
        return TENSOR
    if kind == _capi.KIND_TENSOR:
        bits = _capi.state_dict_get_tensor(sd, i)
        try:
            if not _capi.state_dict_is_dist_tensor(sd, i):
                return _tensor.tensor_from_handle(bits)
            layout = _dist.Layout(_capi.state_dict_get_layout(sd, i))
            try:
                return _dist.to_dtensor(bits, layout, ctx)
            finally:
                layout.release()
        finally:
            _tensor.release(bits)
    child = _capi.state_dict_get_child(sd, i)
    try:
        return to_python(child, ctx, tensors)
    finally:
        _capi.release(child)


def to_python(sd: CData, ctx: "_dist.MeshCache | None" = None, tensors: bool = True):
    """A Python dict or list (or tuple) with the structure of a dsd container. With
    tensors=False every tensor leaf is TENSOR instead (what a load that filled the tensors in
    place needs back: only the values, without building a tensor or DTensor per leaf)."""
    if ctx is None:
        ctx = _dist.MeshCache()
    kind, is_tuple = _capi.state_dict_container_kind(sd)
    n = _capi.state_dict_size(sd)
    if kind == _capi.KIND_LIST:
        items = [_get(sd, i, _capi.state_dict_kind(sd, i), ctx, tensors) for i in range(n)]
        return tuple(items) if is_tuple else items
    int_keyed = _capi.state_dict_int_keys(sd)
    result = {}
    for i in range(n):
        name = _capi.state_dict_key(sd, i)
        result[int(name) if int_keyed else name] = _get(sd, i, _capi.state_dict_kind(sd, i), ctx, tensors)
    return result


def take_python(sd: CData, ctx: "_dist.MeshCache | None" = None):
    """to_python(sd), then releases `sd`."""
    try:
        return to_python(sd, ctx)
    finally:
        _capi.release(sd)


@contextlib.contextmanager
def tree_of(state_dict: Mapping, comm: "_dist.Communicator | None" = None) -> Iterator[CData]:
    """A dsd copy of a Python state dict's structure (tensors shared; DTensors on meshes over
    `comm`) for the duration of the block, released on exit."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a dict state dict, got {type(state_dict)}")
    sd = to_dsd(state_dict, ctx=_dist.MeshCache(comm))
    try:
        yield sd
    finally:
        _capi.release(sd)
