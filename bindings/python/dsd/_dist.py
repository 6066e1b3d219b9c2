"""Communicators, device meshes and layouts, and PyTorch DTensors in and out of dsd.

A DTensor crosses as its local tensor (DLPack, same memory) plus a dsd layout on an
equivalent dsd mesh: same shape, the ranks of `DeviceMesh.mesh`, the same device type. On the
way back, `DTensor.from_local` rebuilds it on the PyTorch mesh it came from, with the same
placements and an explicit global shape and stride (uneven shards need them).
"""
from __future__ import annotations

import datetime
import weakref

from . import _tensor
from ._errors import HandleError, call
from ._lib import ffi, lib
from ._tensor import Tensor

_DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


def _options(timeout):
    o = ffi.new("dsd_comm_options*")
    lib.dsd_comm_options_init(o)
    if timeout is not None:
        seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else float(timeout)
        o.timeout_ms = int(round(seconds * 1000))
    return o


class Communicator:
    """A dsd communicator (Gloo over c10d, an NCCL communicator, or one local rank).

    Constructors are collective: every rank calls them in the same order. A peer that dies
    or does not come turns into a dsd.Error (code DSD_E_COMM or DSD_E_TIMEOUT) within
    `timeout` (seconds or a timedelta; PyTorch's 30 minutes by default), never a hang."""

    __slots__ = ("_ptr", "__weakref__")

    def __init__(self, ptr):
        self._ptr = ffi.gc(ptr, lib.dsd_comm_free)

    @property
    def ptr(self):
        return self._ptr

    @classmethod
    def from_env(cls, timeout=_DEFAULT_TIMEOUT) -> "Communicator":
        """From the launcher's variables: torchrun/dsdrun (RANK, WORLD_SIZE, MASTER_ADDR,
        MASTER_PORT), mpirun (OMPI_COMM_WORLD_*) or srun (SLURM_*)."""
        out = ffi.new("dsd_comm**")
        call(lib.dsd_comm_new_from_env, _options(timeout), out)
        return cls(out[0])

    @classmethod
    def file_store(cls, path: str, rank: int, size: int, timeout=_DEFAULT_TIMEOUT) -> "Communicator":
        """Rendezvous through a file every rank can open (tests, one machine)."""
        out = ffi.new("dsd_comm**")
        call(lib.dsd_comm_new_file_store, str(path).encode(), rank, size, _options(timeout), out)
        return cls(out[0])

    @classmethod
    def from_nccl(cls, nccl_comm: int, cuda_stream: int, rank: int, size: int,
                  timeout=_DEFAULT_TIMEOUT) -> "Communicator":
        """Over a caller-owned ncclComm_t and cudaStream_t (addresses as ints; 0 is the default
        stream), which must outlive everything that uses this communicator."""
        out = ffi.new("dsd_comm**")
        call(lib.dsd_comm_new_nccl, ffi.cast("void*", nccl_comm), ffi.cast("void*", cuda_stream),
             rank, size, _options(timeout), out)
        return cls(out[0])

    @classmethod
    def local(cls) -> "Communicator":
        """A world of one rank."""
        out = ffi.new("dsd_comm**")
        call(lib.dsd_comm_new_local, out)
        return cls(out[0])

    @property
    def rank(self) -> int:
        out = ffi.new("int32_t*")
        call(lib.dsd_comm_rank, self._ptr, out)
        return int(out[0])

    @property
    def size(self) -> int:
        out = ffi.new("int32_t*")
        call(lib.dsd_comm_size, self._ptr, out)
        return int(out[0])

    @property
    def backend(self) -> str:
        out = ffi.new("char**")
        call(lib.dsd_comm_backend, self._ptr, out)
        return ffi.string(out[0]).decode()

    def barrier(self) -> None:
        call(lib.dsd_comm_barrier, self._ptr)

    def __repr__(self) -> str:
        return f"dsd.Communicator({self.backend}, rank {self.rank} of {self.size})"


_DEVICE_TYPES = {"cpu": 1, "cuda": 2}
_DEVICE_NAMES = {v: k for k, v in _DEVICE_TYPES.items()}


class DeviceMesh:
    """A dsd device mesh: ranks in an N-d array, as PyTorch's DeviceMesh."""

    __slots__ = ("_ptr",)

    def __init__(self, ptr):
        self._ptr = ffi.gc(ptr, lib.dsd_mesh_free)

    @property
    def ptr(self):
        return self._ptr

    @classmethod
    def new(cls, comm: Communicator, shape, ranks=None, device_type: str = "cpu") -> "DeviceMesh":
        if device_type not in _DEVICE_TYPES:
            raise ValueError(f"device type {device_type!r} has no dsd mesh (cpu or cuda)")
        shape = [int(s) for s in shape]
        c_ranks = ffi.NULL if ranks is None else ffi.new("int64_t[]", [int(r) for r in ranks])
        out = ffi.new("dsd_mesh**")
        call(lib.dsd_mesh_new, comm.ptr, ffi.new("int64_t[]", shape), len(shape), c_ranks,
             _DEVICE_TYPES[device_type], out)
        return cls(out[0])

    @classmethod
    def from_torch(cls, mesh, comm: Communicator) -> "DeviceMesh":
        """The dsd mesh equivalent to a torch.distributed DeviceMesh: same shape, the global
        ranks of `mesh.mesh`, same device type."""
        return cls.new(comm, tuple(mesh.mesh.shape), mesh.mesh.flatten().tolist(), mesh.device_type)

    @property
    def shape(self) -> tuple[int, ...]:
        n = ffi.new("size_t*")
        call(lib.dsd_mesh_ndim, self._ptr, n)
        out = ffi.new("int64_t[]", n[0])
        call(lib.dsd_mesh_shape, self._ptr, out, n[0])
        return tuple(out)

    @property
    def ranks(self) -> tuple[int, ...]:
        count = 1
        for s in self.shape:
            count *= s
        out = ffi.new("int64_t[]", count)
        call(lib.dsd_mesh_ranks, self._ptr, out, count)
        return tuple(out)

    @property
    def device_type(self) -> str:
        out = ffi.new("int32_t*")
        call(lib.dsd_mesh_device_type, self._ptr, out)
        return _DEVICE_NAMES[out[0]]

    @property
    def coordinate(self) -> tuple[int, ...] | None:
        """This rank's coordinate in the mesh, or None when it is not part of it."""
        n = len(self.shape)
        out = ffi.new("int64_t[]", n)
        inside = ffi.new("bool*")
        call(lib.dsd_mesh_coordinate, self._ptr, out, n, inside)
        return tuple(out) if inside[0] else None

    def key(self) -> tuple:
        """What identifies the mesh: (device type, shape, ranks)."""
        return (self.device_type, self.shape, self.ranks)


class Layout:
    """A dsd layout handle owned by Python: released when collected (or by release())."""

    __slots__ = ("_bits",)

    def __init__(self, bits: int):
        self._bits = bits

    @classmethod
    def placements_on(cls, mesh: DeviceMesh, global_shape, placements) -> "Layout":
        """`placements`: one per mesh dimension, ("shard", dim) or ("replicate",)."""
        shape = [int(s) for s in global_shape]
        ps = ffi.new("dsd_placement[]", len(placements) or 1)
        for i, p in enumerate(placements):
            if p[0] == "shard":
                ps[i].kind, ps[i].dim = lib.DSD_PLACEMENT_SHARD, int(p[1])
            elif p[0] == "replicate":
                ps[i].kind, ps[i].dim = lib.DSD_PLACEMENT_REPLICATE, 0
            else:
                raise ValueError(f"unknown placement {p!r}")
        out = ffi.new("dsd_layout*")
        call(lib.dsd_layout_new_placements, mesh.ptr, ffi.new("int64_t[]", shape or [0]), len(shape),
             ps, len(placements), out)
        return cls(out[0].bits)

    @classmethod
    def chunk_on(cls, mesh: DeviceMesh, global_shape, offsets, sizes) -> "Layout":
        """Custom sharding: this rank holds the box (offsets, sizes)."""
        n = len(global_shape)
        out = ffi.new("dsd_layout*")
        call(lib.dsd_layout_new_chunk, mesh.ptr, ffi.new("int64_t[]", list(global_shape) or [0]), n,
             ffi.new("int64_t[]", list(offsets) or [0]), ffi.new("int64_t[]", list(sizes) or [0]), out)
        return cls(out[0].bits)

    @property
    def bits(self) -> int:
        if self._bits == 0:
            raise HandleError(lib.DSD_E_STALE_HANDLE, "layout handle was released")
        return self._bits

    @property
    def handle(self):
        return ffi.new("dsd_layout*", {"bits": self.bits})[0]

    @property
    def ndim(self) -> int:
        out = ffi.new("size_t*")
        call(lib.dsd_layout_ndim, self.handle, out)
        return int(out[0])

    @property
    def global_shape(self) -> tuple[int, ...]:
        n = self.ndim
        out = ffi.new("int64_t[]", max(n, 1))
        call(lib.dsd_layout_global_shape, self.handle, out, n)
        return tuple(out[0:n])

    def local_chunk(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(offsets, sizes) of the box this rank holds; all zeros outside the mesh."""
        n = self.ndim
        offs = ffi.new("int64_t[]", max(n, 1))
        sizes = ffi.new("int64_t[]", max(n, 1))
        call(lib.dsd_layout_local_chunk, self.handle, offs, sizes, n)
        return tuple(offs[0:n]), tuple(sizes[0:n])

    @property
    def is_chunk(self) -> bool:
        out = ffi.new("bool*")
        call(lib.dsd_layout_is_chunk, self.handle, out)
        return bool(out[0])

    @property
    def mesh(self) -> DeviceMesh:
        out = ffi.new("dsd_mesh**")
        call(lib.dsd_layout_mesh, self.handle, out)
        return DeviceMesh(out[0])

    @property
    def placements(self) -> list[tuple]:
        n = len(self.mesh.shape)
        out = ffi.new("dsd_placement[]", n)
        call(lib.dsd_layout_placements, self.handle, out, n)
        return [("shard", out[i].dim) if out[i].kind == lib.DSD_PLACEMENT_SHARD else ("replicate",)
                for i in range(n)]

    def release(self) -> None:
        if self._bits:
            bits, self._bits = self._bits, 0
            call(lib.dsd_layout_release, ffi.new("dsd_layout*", {"bits": bits})[0])

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass


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
