"""Communicators, device meshes and layouts, and PyTorch DTensors in and out of dsd.

A DTensor crosses as its local tensor (DLPack, same memory) plus a dsd layout on an
equivalent dsd mesh: same shape, the ranks of `DeviceMesh.mesh`, the same device type. On the
way back, `DTensor.from_local` rebuilds it on the PyTorch mesh it came from, with the same
placements and an explicit global shape and stride (uneven shards need them).
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
import threading
import weakref
from collections.abc import Iterator, Mapping

from . import _capi, _tensor
from ._capi import CData
from ._errors import InvalidArgumentError, StaleHandleError, closed
from ._tensor import Tensor

_DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


def _timeout_ms(timeout) -> int | None:
    if timeout is None:
        return None
    seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else float(timeout)
    return int(round(seconds * 1000))


class Communicator:
    """A dsd communicator (Gloo over c10d, an NCCL communicator, or one local rank).

    Constructors are collective: every rank calls them in the same order. A peer that dies
    or does not come turns into a dsd.Error (code DSD_E_COMM or DSD_E_TIMEOUT) within
    `timeout` (seconds or a timedelta; PyTorch's 30 minutes by default), never a hang.

    dsd.async_save(..., comm=c) saves through one dsd.AsyncCheckpointer per communicator,
    made on its first use and closed with the communicator.

    close() (or leaving a `with` block) drops this reference: objects made over it (meshes,
    managers, checkpointers) keep their own; using the communicator afterwards raises
    dsd.StaleHandleError."""

    __slots__ = ("_ptr", "async_checkpointer", "__weakref__")

    def __init__(self, ptr: CData):
        """`ptr`: an owned dsd_comm* from _capi (this object takes it over)."""
        self._ptr = ptr
        self.async_checkpointer = None  # set by dsd.async_save on first use

    @property
    def ptr(self) -> CData:
        """The dsd_comm*, for C calls through dsd.lib; valid until close()."""
        if self._ptr is None:
            raise closed("Communicator")
        return self._ptr

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._ptr is None

    def close(self) -> None:
        """Waits for this communicator's default async save (dsd.async_save(comm=...)), then
        drops the reference. Idempotent. Not collective."""
        checkpointer, self.async_checkpointer = self.async_checkpointer, None
        if checkpointer is not None:
            checkpointer.close()
        ptr, self._ptr = self._ptr, None
        _capi.release(ptr)

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def from_env(cls, timeout=_DEFAULT_TIMEOUT) -> "Communicator":
        """From the launcher's variables: torchrun/dsdrun (RANK, WORLD_SIZE, MASTER_ADDR,
        MASTER_PORT), mpirun (OMPI_COMM_WORLD_*) or srun (SLURM_*)."""
        return cls(_capi.comm_new_from_env(_timeout_ms(timeout)))

    @classmethod
    def file_store(cls, path: str, rank: int, size: int, timeout=_DEFAULT_TIMEOUT) -> "Communicator":
        """Rendezvous through a file every rank can open (tests, one machine)."""
        return cls(_capi.comm_new_file_store(str(path), rank, size, _timeout_ms(timeout)))

    @classmethod
    def from_nccl(cls, nccl_comm: int, cuda_stream: int, rank: int, size: int,
                  timeout=_DEFAULT_TIMEOUT) -> "Communicator":
        """Over a caller-owned ncclComm_t and cudaStream_t (addresses as ints; 0 is the default
        stream), which must outlive everything that uses this communicator."""
        return cls(_capi.comm_new_nccl(nccl_comm, cuda_stream, rank, size, _timeout_ms(timeout)))

    @classmethod
    def local(cls) -> "Communicator":
        """A world of one rank."""
        return cls(_capi.comm_new_local())

    @property
    def rank(self) -> int:
        """This process's rank."""
        return _capi.comm_rank(self.ptr)

    @property
    def size(self) -> int:
        """The number of ranks."""
        return _capi.comm_size(self.ptr)

    @property
    def backend(self) -> str:
        """"gloo", "nccl" or "local"."""
        return _capi.comm_backend(self.ptr)

    def barrier(self) -> None:
        """Returns once every rank has called it (collective)."""
        _capi.comm_barrier(self.ptr)

    def __repr__(self) -> str:
        if self._ptr is None:
            return "dsd.Communicator(closed)"
        return f"dsd.Communicator({self.backend}, rank {self.rank} of {self.size})"


class DeviceMesh:
    """A dsd device mesh: ranks in an N-d array, as PyTorch's DeviceMesh."""

    __slots__ = ("_ptr",)

    def __init__(self, ptr: CData):
        """`ptr`: an owned dsd_mesh* from _capi (this object takes it over)."""
        self._ptr = ptr

    @property
    def ptr(self) -> CData:
        """The dsd_mesh*, for C calls through dsd.lib; valid until close()."""
        if self._ptr is None:
            raise closed("DeviceMesh")
        return self._ptr

    def close(self) -> None:
        """Drops this reference (layouts on the mesh keep theirs). Idempotent."""
        ptr, self._ptr = self._ptr, None
        _capi.release(ptr)

    def __enter__(self) -> "DeviceMesh":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def new(cls, comm: Communicator, shape, ranks=None, device_type: str = "cpu") -> "DeviceMesh":
        """A mesh of `shape` over `ranks` (row-major; None: 0, 1, 2, ...) of "cpu" or "cuda"
        devices, over `comm`."""
        return cls(_capi.mesh_new(comm.ptr, shape, ranks, device_type))

    @classmethod
    def from_torch(cls, mesh, comm: Communicator) -> "DeviceMesh":
        """The dsd mesh equivalent to a torch.distributed DeviceMesh: same shape, the global
        ranks of `mesh.mesh`, same device type."""
        return cls.new(comm, tuple(mesh.mesh.shape), mesh.mesh.flatten().tolist(), mesh.device_type)

    @property
    def shape(self) -> tuple[int, ...]:
        """The mesh's shape."""
        return _capi.mesh_shape(self.ptr)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The global ranks, row-major."""
        return _capi.mesh_ranks(self.ptr)

    @property
    def device_type(self) -> str:
        """"cpu" or "cuda"."""
        return _capi.mesh_device_type(self.ptr)

    @property
    def coordinate(self) -> tuple[int, ...] | None:
        """This rank's coordinate in the mesh, or None when it is not part of it."""
        return _capi.mesh_coordinate(self.ptr)

    def key(self) -> tuple:
        """What identifies the mesh: (device type, shape, ranks)."""
        return (self.device_type, self.shape, self.ranks)


class Layout:
    """A dsd layout handle owned by Python: released when collected (or by release())."""

    __slots__ = ("_bits",)

    def __init__(self, bits: int):
        """`bits`: an owned layout handle from _capi (this object takes it over)."""
        self._bits = bits

    @classmethod
    def placements_on(cls, mesh: DeviceMesh, global_shape, placements) -> "Layout":
        """`placements`: one per mesh dimension, ("shard", dim) or ("replicate",)."""
        return cls(_capi.layout_new_placements(mesh.ptr, global_shape, placements))

    @classmethod
    def chunk_on(cls, mesh: DeviceMesh, global_shape, offsets, sizes) -> "Layout":
        """Custom sharding: this rank holds the box (offsets, sizes)."""
        return cls(_capi.layout_new_chunk(mesh.ptr, global_shape, offsets, sizes))

    @property
    def bits(self) -> int:
        """The handle's bits, for C calls through dsd.lib; valid until release()."""
        if self._bits == 0:
            raise StaleHandleError(_capi.E_STALE_HANDLE, "layout handle was released")
        return self._bits

    @property
    def ndim(self) -> int:
        """The number of dimensions of the global tensor."""
        return _capi.layout_ndim(self.bits)

    @property
    def global_shape(self) -> tuple[int, ...]:
        """The shape of the global tensor."""
        return _capi.layout_global_shape(self.bits)

    def local_chunk(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(offsets, sizes) of the box this rank holds; all zeros outside the mesh."""
        return _capi.layout_local_chunk(self.bits)

    @property
    def is_chunk(self) -> bool:
        """Whether the layout is an explicit chunk (custom sharding) rather than placements."""
        return _capi.layout_is_chunk(self.bits)

    @property
    def mesh(self) -> DeviceMesh:
        """The dsd mesh the layout is on."""
        return DeviceMesh(_capi.layout_mesh(self.bits))

    @property
    def placements(self) -> list[tuple]:
        """One per mesh dimension: ("shard", dim) or ("replicate",)."""
        return _capi.layout_placements(self.bits)

    def release(self) -> None:
        """Releases the handle now (idempotent)."""
        if self._bits:
            bits, self._bits = self._bits, 0
            _capi.layout_release(bits)

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass


# ---------------------------------------------------------------------------------------------
# The communicator a call runs over when none is passed

_USING: list = []  # communicators of enclosing use_communicator() blocks, innermost last
_PROCESS_COMM: Communicator | None = None  # built from the launcher's environment, once
_PROCESS_LOCK = threading.Lock()
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID",
                "SLURM_NTASKS")


@contextlib.contextmanager
def use_communicator(comm: Communicator) -> Iterator[Communicator]:
    """Within the block, the state-dict functions, saves and loads run over `comm` (a
    dsd.Communicator, e.g. one over a caller-owned NCCL communicator from
    Communicator.from_nccl) when they are not given one, instead of the one they would build
    from the launcher's environment; also at world 1, so DTensors on a mesh of one rank gather
    and broadcast through it."""
    _USING.append(comm)
    try:
        yield comm
    finally:
        _USING.pop()


def _torch_world() -> int | None:
    """torch.distributed's world size when it is initialised (never imports torch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_world_size()


def process_communicator() -> Communicator:
    """The communicator of this process, made on first use and reused by every later call:
    from the launcher's environment (torchrun, dsdrun, mpirun, srun; collective, like
    torch.distributed.init_process_group) in a world of several ranks, a local one in a world
    of one. $DSD_TIMEOUT_S sets its collective timeout (default 30 minutes, as PyTorch's).
    Closed at exit, after the async saves in flight (dsd waits for them)."""
    global _PROCESS_COMM
    with _PROCESS_LOCK:
        if _PROCESS_COMM is None or _PROCESS_COMM.closed:
            world = _torch_world()
            launched = any(os.environ.get(v) for v in _LAUNCH_VARS)
            if world == 1 or (world is None and not launched):
                _PROCESS_COMM = Communicator.local()
            else:
                timeout = os.environ.get("DSD_TIMEOUT_S")
                seconds = datetime.timedelta(seconds=float(timeout)) if timeout else _DEFAULT_TIMEOUT
                try:
                    _PROCESS_COMM = Communicator.from_env(timeout=seconds)
                except InvalidArgumentError as e:
                    raise InvalidArgumentError(
                        e.code, f"{e.message} (dsd builds the communicator of a distributed "
                        "program from the launcher's environment; without a launcher, pass "
                        "comm=dsd.Communicator.file_store(...) or use dsd.use_communicator)",
                        e.context) from None
        return _PROCESS_COMM


@atexit.register
def close_process_communicator() -> None:
    """Closes the process communicator (waiting for its default async save), if one was made.
    Runs at exit; a later call that needs one makes a new one."""
    global _PROCESS_COMM
    with _PROCESS_LOCK:
        comm, _PROCESS_COMM = _PROCESS_COMM, None
    if comm is not None:
        comm.close()


def has_dtensor(obj) -> bool:
    """Whether a (nested) state dict holds a DTensor (False at once if torch.distributed.tensor
    was never imported)."""
    if sys.modules.get("torch.distributed.tensor") is None:
        return False
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, Mapping):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif is_dtensor(o):
            return True
    return False


def communicator_for(comm: Communicator | None = None, state_dict=None) -> Communicator | None:
    """The communicator a call runs over: `comm` when given; else the innermost
    use_communicator()'s; else the process communicator when torch.distributed runs with more
    than one rank or `state_dict` holds DTensors; else None (a single process: no collective,
    no communicator made)."""
    if comm is not None:
        return comm
    if _USING:
        return _USING[-1]
    world = _torch_world()
    if (world is not None and world > 1) or (state_dict is not None and has_dtensor(state_dict)):
        return process_communicator()
    return None


# ---------------------------------------------------------------------------------------------
# DTensor <-> dsd

# Torch meshes seen on the way in, so the way back finds the very same object; weak, so dsd
# never keeps a mesh (and its process groups) alive.
_torch_meshes: "weakref.WeakValueDictionary[tuple, object]" = weakref.WeakValueDictionary()


def _mesh_key(torch_mesh) -> tuple:
    return (torch_mesh.device_type, tuple(torch_mesh.mesh.shape), tuple(torch_mesh.mesh.flatten().tolist()))


def is_dtensor(value) -> bool:
    import sys
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(value, mod.DTensor)


def _placements_of(dt, path: str) -> list[tuple]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor import placement_types as pt
    strided = getattr(pt, "_StridedShard", ())
    out = []
    for p in dt.placements:
        if strided and isinstance(p, strided):
            raise ValueError(f"{path}: DTensor placement {p} (strided sharding, from FSDP over "
                             "TP) has no dsd layout yet")
        if isinstance(p, Shard):
            out.append(("shard", p.dim % dt.ndim if dt.ndim else p.dim))
        elif isinstance(p, Replicate):
            out.append(("replicate",))
        else:
            raise ValueError(f"{path}: DTensor placement {p} has no dsd layout (only Shard and "
                             "Replicate; reduce Partial placements first)")
    return out


class MeshCache:
    """Meshes converted during one call: each torch mesh becomes one dsd mesh, and each dsd
    mesh maps back to one torch mesh, however many tensors use it."""

    def __init__(self, comm: Communicator | None = None, torch_meshes=()):
        self.comm = comm
        self._to_dsd: dict[int, tuple[object, DeviceMesh]] = {}
        self._to_torch: dict[tuple, object] = {}
        for m in torch_meshes:
            self._to_torch[_mesh_key(m)] = m

    def dsd_mesh(self, torch_mesh, path: str = "") -> DeviceMesh:
        hit = self._to_dsd.get(id(torch_mesh))
        if hit is not None:
            return hit[1]
        if self.comm is None:
            raise ValueError(f"{path or '<root>'}: a DTensor needs a dsd communicator: pass "
                             "comm=dsd.Communicator.from_env()")
        mesh = DeviceMesh.from_torch(torch_mesh, self.comm)
        self._to_dsd[id(torch_mesh)] = (torch_mesh, mesh)  # holds torch_mesh so the id stays valid
        key = _mesh_key(torch_mesh)
        self._to_torch.setdefault(key, torch_mesh)
        _torch_meshes[key] = torch_mesh
        return mesh

    def torch_mesh(self, mesh: DeviceMesh):
        key = mesh.key()
        found = self._to_torch.get(key) or _torch_meshes.get(key)
        if found is None:
            # Never seen here: build one. Like any DeviceMesh construction this is collective
            # over the default process group (it creates the per-dimension groups).
            import torch
            from torch.distributed.device_mesh import DeviceMesh as TorchMesh
            device_type, shape, ranks = key
            found = TorchMesh(device_type, torch.tensor(ranks, dtype=torch.int64).view(shape))
            _torch_meshes[key] = found
        self._to_torch[key] = found
        return found


def from_dtensor(dt, comm: Communicator | None = None, cache: MeshCache | None = None,
                 path: str = "") -> tuple[Tensor, Layout]:
    """(local tensor handle, layout) of a DTensor. The local tensor shares the DTensor's
    memory; the layout is on the dsd mesh equivalent to `dt.device_mesh`."""
    cache = cache or MeshCache(comm)
    placements = _placements_of(dt, path or "DTensor")
    mesh = cache.dsd_mesh(dt.device_mesh, path)
    layout = Layout.placements_on(mesh, tuple(dt.shape), placements)
    local = getattr(dt, "_local_tensor", None)
    if local is None:
        local = dt.to_local()
    return Tensor.from_torch(local), layout


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for s in reversed(shape):
        strides.append(step)
        step *= max(s, 1)
    return tuple(reversed(strides))


def to_dtensor(tensor: Tensor | int, layout: Layout, cache: MeshCache | None = None, torch_mesh=None):
    """The DTensor of a local tensor handle (or its bits) and a layout: `DTensor.from_local` on
    the torch mesh the layout's mesh came from (or `torch_mesh`), no copy, no collective."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    if layout.is_chunk:
        raise ValueError("a layout of an explicit chunk (custom sharding) has no DTensor form")
    cache = cache or MeshCache()
    mesh = torch_mesh if torch_mesh is not None else cache.torch_mesh(layout.mesh)
    placements = [Shard(p[1]) if p[0] == "shard" else Replicate() for p in layout.placements]
    bits = tensor if isinstance(tensor, int) else tensor.bits
    local = _tensor.tensor_from_handle(bits)
    shape = layout.global_shape
    import torch
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_strides(shape))
