"""PyTorch DCP storage plugins: dcp.save / dcp.async_save / dcp.load over dsd's engine.

    import torch.distributed.checkpoint as dcp
    import dsd.dcp

    dcp.save(state_dict, storage_writer=dsd.dcp.StorageWriter("ckpt"))
    dcp.load(state_dict, storage_reader=dsd.dcp.StorageReader("ckpt"))

DCP's own planners decide what each rank writes and reads; dsd stores it: the writer turns
this rank's write items into one collective dsd save (a dsd checkpoint: checksummed, committed
atomically, `dsd verify` passes, dsd.load reads it), and the reader answers DCP's read items
from any checkpoint dsd reads (dsd, DCP, torch.save, safetensors), at any world size.

Keys: a dsd checkpoint written here is nested as the state dict was (DCP's flatten mapping),
so its flat keys are DCP's FQNs. Non-tensor values are stored as dsd values when they are
plain (None, bool, int, float, str, and lists/tuples of those), which dsd.load gives back as
they were; any other object is stored as the torch.save bytes DCP made of it, handed back to
DCP as they are.
"""
from __future__ import annotations

import io
import os
import threading
import uuid
from collections.abc import Mapping
from typing import Any

import torch
from torch.futures import Future
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata,
                                                   Metadata, StorageMeta,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlan, LoadPlanner, SavePlan,
                                                  SavePlanner, WriteItem, WriteItemType)
from torch.distributed.checkpoint.storage import (StorageReader as _DcpStorageReader,
                                                  StorageWriter as _DcpStorageWriter, WriteResult)

from . import _capi, _dist, _tensor
from ._capi import CData, SaveOptions
from ._checkpoint import load_full
from ._formats import inspect

__all__ = ["StorageReader", "StorageWriter"]

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: what DCP stores for a non-tensor object


def _plain(value: Any) -> bool:
    """Whether dsd stores `value` as a value that comes back equal and of the same type."""
    t = type(value)  # exact types: a subclass (torch.Size, an IntEnum) would come back as its base
    if value is None or t in (bool, str, float):
        return True
    if t is int:
        return -(2**63) <= value < 2**63
    if t in (list, tuple):
        return all(_plain(v) for v in value)
    return False


def _validate_path(checkpoint_id: str | os.PathLike) -> bool:
    return "://" not in str(checkpoint_id)


# ---------------------------------------------------------------------------------------------
# The dsd tree of one rank's write items

class _Tree:
    """A nested dsd state dict built leaf by leaf from paths (DCP's OBJ_PATH tuples): str keys
    make dicts, int segments lists (filled in index order)."""

    def __init__(self):
        self.root: dict = {}

    def put(self, path: tuple, leaf: Any, fqn: str) -> None:
        node: Any = self.root
        for i, seg in enumerate(path):
            last = i == len(path) - 1
            nxt = None if last else ([] if isinstance(path[i + 1], int) else {})
            if isinstance(node, list):
                if not isinstance(seg, int) or seg > len(node):
                    raise ValueError(f"{fqn}: list index {seg!r} at position {i} of {path} is out "
                                     "of order (DCP's write items skip an element of a list)")
                if seg == len(node):
                    node.append(leaf if last else nxt)
                elif last:
                    node[seg] = leaf
            else:
                key = str(seg)
                if last:
                    node[key] = leaf
                elif key not in node:
                    node[key] = nxt
            if not last:
                node = node[seg] if isinstance(node, list) else node[str(seg)]


class _Chunk:
    """One rank's box of a tensor sharded by DCP's planner: a dsd dist tensor with an explicit
    chunk layout."""

    __slots__ = ("tensor", "global_shape", "offsets")

    def __init__(self, tensor: torch.Tensor, global_shape, offsets):
        self.tensor = tensor
        self.global_shape = tuple(int(s) for s in global_shape)
        self.offsets = tuple(int(o) for o in offsets)


def _to_dsd(obj: Any, mesh: "_dist.DeviceMesh | None", fqn: str) -> CData:
    """A new owned dsd container of a _Tree's nested dicts and lists."""
    sd = _capi.state_dict_new() if isinstance(obj, dict) else _capi.state_dict_new_list(False)
    try:
        items = obj.items() if isinstance(obj, dict) else ((None, v) for v in obj)
        for key, v in items:
            _put(sd, key, v, mesh, fqn if key is None else (f"{fqn}.{key}" if fqn else key))
    except BaseException:
        _capi.release(sd)
        raise
    return sd


def _put(sd: CData, key: str | None, v: Any, mesh: "_dist.DeviceMesh | None", fqn: str) -> None:
    if isinstance(v, _Chunk):
        if mesh is None:
            raise ValueError(f"{fqn}: a sharded chunk needs a communicator (torch.distributed "
                             "is not initialised and no comm= was given)")
        local = v.tensor.detach().contiguous()
        layout = _dist.Layout.chunk_on(mesh, v.global_shape, v.offsets, tuple(local.shape))
        bits = _tensor.handle_from_tensor(local)
        try:
            _capi.state_dict_set_dist_tensor(sd, key, bits, layout.bits)
        finally:
            _tensor.release(bits)
            layout.release()
    elif isinstance(v, torch.Tensor):
        bits = _tensor.handle_from_tensor(v.detach().contiguous())
        try:
            _capi.state_dict_set_tensor(sd, key, bits)
        finally:
            _tensor.release(bits)
    elif isinstance(v, (dict, list)) and not isinstance(v, _Value):
        child = _to_dsd(v, mesh, fqn)
        try:
            _capi.state_dict_set_child(sd, key, child)
        finally:
            _capi.release(child)
    else:
        _put_value(sd, key, v.value if isinstance(v, _Value) else v, fqn)


class _Value:
    """A non-tensor leaf (kept apart from the tree's own dicts and lists)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


def _put_value(sd: CData, key: str | None, value: Any, fqn: str) -> None:
    if value is None:
        _capi.state_dict_set_none(sd, key)
    elif isinstance(value, bool):
        _capi.state_dict_set_bool(sd, key, value)
    elif isinstance(value, int):
        _capi.state_dict_set_int(sd, key, value)
    elif isinstance(value, float):
        _capi.state_dict_set_double(sd, key, value)
    elif isinstance(value, str):
        _capi.state_dict_set_string(sd, key, value)
    elif isinstance(value, bytes):
        _capi.state_dict_set_bytes(sd, key, value)
    elif isinstance(value, (list, tuple)):
        child = _capi.state_dict_new_list(isinstance(value, tuple))
        try:
            for i, v in enumerate(value):
                _put_value(child, None, v, f"{fqn}.{i}")
            _capi.state_dict_set_child(sd, key, child)
        finally:
            _capi.release(child)
    else:
        raise TypeError(f"{fqn}: cannot store a {type(value).__name__}")


def _clone_to_cpu(obj: Any) -> Any:
    """A copy of a state dict whose tensors (DTensor shards included) are new CPU tensors."""
    if isinstance(obj, torch.Tensor):
        if _dist.is_dtensor(obj):
            from torch.distributed.tensor import DTensor
            local = obj.to_local().detach().to("cpu", copy=True)
            return DTensor.from_local(local, obj.device_mesh, obj.placements, run_check=False,
                                      shape=obj.shape, stride=obj.stride())
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: _clone_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_to_cpu(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------
# Writer

class StorageWriter(_DcpStorageWriter):
    """A DCP StorageWriter that writes a dsd checkpoint directory at `path`.

    `comm`: the dsd.Communicator the save is collective over; None: as dsd.save chooses it
    (the process communicator when torch.distributed is initialised with several ranks, else
    a single process). `overwrite` (True, as DCP's FileSystemWriter): replace a checkpoint
    that is there (after the new one commits); False raises dsd.ExistsError. `thread_count`,
    `sync_files`, `block_size`: as dsd.save's.

    dcp.async_save stages the state through this writer (stage(): CPU copies, on the calling
    thread) and writes in DCP's background thread over a communicator of its own, made
    collectively on the first async save, so it never shares one with the training thread's
    collectives. With an explicit `comm`, pass `async_comm` (another dsd.Communicator over
    the same ranks) for async saves.
    """

    def __init__(self, path: str | os.PathLike, *, comm: "_dist.Communicator | None" = None,
                 async_comm: "_dist.Communicator | None" = None, overwrite: bool = True,
                 thread_count: int = 0, sync_files: bool = True, block_size: int | None = None):
        super().__init__()
        self.path = os.fspath(path)
        self._comm = comm
        self._async_comm = async_comm
        self._own_async_comm = False
        self._options = SaveOptions(overwrite, thread_count, False, sync_files, block_size, "dsd")
        self._local_items: list[WriteItem] = []
        self._async_pending = False
        self._lock = threading.Lock()
        self.save_id = uuid.uuid4().hex

    # --- StorageWriter -----------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        """Starts a new save (to `checkpoint_id` when given)."""
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.save_id = uuid.uuid4().hex
        self._local_items = []

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Nothing to set up: dsd's save plans among the ranks itself."""
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Keeps this rank's items before DCP's dedup: dsd dedups replicated entries itself."""
        self._local_items = list(plan.items)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """The plans unchanged."""
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """One collective dsd save of this rank's items; one WriteResult per item of `plan`."""
        items = self._local_items or list(plan.items)
        tree, sizes = _Tree(), {}
        mappings = getattr(planner, "mappings", None) or {}
        values = getattr(planner, "state_dict", None) or {}
        for item in items:
            fqn = item.index.fqn
            path = tuple(mappings.get(fqn, (fqn,)))
            if item.type == WriteItemType.BYTE_IO:
                obj = values.get(fqn, _Missing) if isinstance(values, Mapping) else _Missing
                if obj is not _Missing and _plain(obj):
                    leaf = _Value(obj)
                else:
                    data = planner.resolve_data(item)
                    leaf = _Value(data.getvalue() if isinstance(data, io.BytesIO) else bytes(data))
                sizes[fqn] = 0
            else:
                tensor = planner.resolve_data(item)
                td = item.tensor_data
                global_shape = tuple(td.size)
                sizes_ = tuple(td.chunk.sizes)
                if sizes_ == global_shape and not any(td.chunk.offsets):
                    leaf = tensor
                else:
                    leaf = _Chunk(tensor, global_shape, td.chunk.offsets)
                sizes[fqn] = tensor.numel() * tensor.element_size()
            tree.put(path, leaf, fqn)
        comm = self._communicator()
        mesh = None
        if comm is not None:
            device = next((v.tensor.device.type for v in _leaves(tree.root) if isinstance(v, _Chunk)),
                          "cpu")
            mesh = _dist.DeviceMesh.new(comm, (comm.size,), None, device)
        try:
            sd = _to_dsd(tree.root, mesh, "")
            try:
                _capi.checkpoint_save(None if comm is None else comm.ptr, sd, self.path, self._options)
            finally:
                _capi.release(sd)
        finally:
            if mesh is not None:
                mesh.close()
        results = [WriteResult(index=item.index, size_in_bytes=sizes.get(item.index.fqn, 0),
                               storage_data=None) for item in plan.items]
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Nothing: dsd's manifest is the metadata, and dsd's save has committed it."""

    def storage_meta(self) -> StorageMeta | None:
        """The checkpoint id (the path) and this save's id."""
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    @property
    def checkpoint_id(self) -> str:
        """The directory written."""
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        """A local path (no URL scheme)."""
        return _validate_path(checkpoint_id)

    # --- AsyncStager (dcp.async_save) --------------------------------------------------------

    _synchronize_after_execute = False

    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def stage(self, state_dict: dict) -> dict:
        """dcp.async_save: CPU copies of the state (the caller may change its tensors once this
        returns), and the communicator the background write runs over. Collective when the
        save is (every rank calls dcp.async_save)."""
        with self._lock:
            self._async_pending = True
            if self._async_comm is None and self._base_comm() is not None:
                if self._comm is not None:
                    raise ValueError("dsd.dcp.StorageWriter: an async save over an explicit comm= "
                                     "needs async_comm= (a second communicator over the same ranks)")
                self._async_comm = _dist.Communicator.from_env()
                self._own_async_comm = True
        return _clone_to_cpu(state_dict)

    def synchronize_staging(self) -> None:
        """Staging is synchronous: nothing to wait for."""

    def close(self) -> None:
        """Closes the async communicator this writer made, if any."""
        comm, self._async_comm = self._async_comm, None
        if comm is not None and self._own_async_comm:
            comm.close()

    # --- helpers -----------------------------------------------------------------------------

    def _base_comm(self) -> "_dist.Communicator | None":
        return _dist.communicator_for(self._comm)

    def _communicator(self) -> "_dist.Communicator | None":
        if threading.current_thread() is not threading.main_thread() and self._async_pending:
            self._async_pending = False
            return self._async_comm if self._async_comm is not None else self._base_comm()
        return self._base_comm()


class _MissingType:
    pass


_Missing = _MissingType()


def _leaves(obj):
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
        else:
            yield o


# ---------------------------------------------------------------------------------------------
# Reader

class StorageReader(_DcpStorageReader):
    """A DCP StorageReader over any checkpoint dsd reads at `path`: a dsd checkpoint (from
    dsd.save or StorageWriter), a DCP checkpoint, a torch.save file or safetensors, saved at
    any world size. Each rank reads the saved tensors its read items need (whole, once per
    read_data call) and copies the requested regions.

    `comm` is accepted for symmetry with StorageWriter; reads need no collective.
    `allow_external_files`: a dsd checkpoint's data files may be symbolic links (as dsd.load).
    Errors (dsd.NotFoundError, dsd.CorruptError...) come from read_metadata and read_data on
    the rank that meets them; DCP's load gathers and raises them on every rank.
    """

    def __init__(self, path: str | os.PathLike, *, comm: "_dist.Communicator | None" = None,
                 allow_external_files: bool = False):
        super().__init__()
        self.path = os.fspath(path)
        self._comm = comm
        self._allow_external_files = allow_external_files
        self._entries: dict[str, dict] = {}
        self.load_id = uuid.uuid4().hex

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        """Starts a new load (from `checkpoint_id` when given)."""
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self._entries = {}
        self.load_id = uuid.uuid4().hex

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """DCP's Metadata of the checkpoint, from dsd.inspect (no tensor data is read)."""
        info = inspect(self.path, allow_external_files=self._allow_external_files)
        self._entries = info["entries"]
        md: dict[str, Any] = {}
        planner_data: dict[str, tuple] = {}
        for fqn, e in self._entries.items():
            planner_data[fqn] = tuple(e["path"])
            if e["kind"] == "tensor":
                dtype = getattr(torch, e["dtype"])
                chunks = [ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"]))
                          for c in e["chunks"]]
                md[fqn] = TensorStorageMetadata(properties=TensorProperties(dtype=dtype),
                                                size=torch.Size(e["shape"]), chunks=chunks)
            else:
                md[fqn] = BytesStorageMetadata()
        return Metadata(state_dict_metadata=md, planner_data=planner_data,
                        storage_meta=StorageMeta(checkpoint_id=self.path, load_id=self.load_id))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        """Reads the entries when this rank did not read the metadata itself."""
        self.is_coordinator = is_coordinator
        if not self._entries:
            self._entries = inspect(self.path, allow_external_files=self._allow_external_files)["entries"]

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """The plan unchanged."""
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """The plans unchanged."""
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Reads the saved entries the plan's items name (whole, once), then copies each item's
        region into the planner's tensor, and hands values to the planner as torch.save bytes."""
        keys = sorted({item.storage_index.fqn for item in plan.items})
        for k in keys:
            if k not in self._entries:
                raise KeyError(f"{k!r} is not in the checkpoint {self.path!r}")
        loaded = load_full(self.path, keys) if keys else {}
        for item in plan.items:
            fqn = item.storage_index.fqn
            value = _at(loaded, self._entries[fqn]["path"], fqn, self.path)
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(_as_torch_save(value)))
                continue
            src = value
            base = item.storage_index.offset or (0,) * src.dim()
            for d, (off, start, length) in enumerate(zip(base, item.storage_offsets, item.lengths)):
                src = src.narrow(d, int(off) + int(start), int(length))
            # The planner's region of the destination (already narrowed by dest_offsets/lengths).
            target = planner.resolve_tensor(item).detach()
            if target.shape != src.shape:
                raise ValueError(f"{fqn}: read item of size {tuple(target.shape)} does not match "
                                 f"the saved region {tuple(src.shape)} in {self.path!r}")
            target.copy_(src)
            planner.commit_tensor(item, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @property
    def checkpoint_id(self) -> str:
        """The directory (or file) read."""
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        """A local path (no URL scheme)."""
        return _validate_path(checkpoint_id)


def _at(tree: Any, path: list, fqn: str, where: str) -> Any:
    node = tree
    for seg in path:
        try:
            if isinstance(node, (list, tuple)):
                node = node[int(seg)]
            elif seg in node:
                node = node[seg]
            elif str(seg) in node:
                node = node[str(seg)]
            else:
                node = node[int(seg)]
        except (KeyError, IndexError, TypeError, ValueError):
            raise KeyError(f"{fqn!r}: not found in what {where!r} holds") from None
    return node


def _as_torch_save(value: Any) -> bytes:
    """The bytes DCP's planner loads (torch.load) for a stored value: the torch.save bytes the
    writer kept for an object dsd has no value for, else torch.save of the value."""
    if isinstance(value, bytes) and value.startswith(_ZIP_MAGIC):
        return value
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()
