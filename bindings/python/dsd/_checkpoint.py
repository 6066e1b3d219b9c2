"""Checkpoints: dsd.save, dsd.async_save (dsd.AsyncCheckpointer), dsd.load, dsd.load_full,
dsd.verify and dsd.CheckpointManager over Python dicts of torch tensors (shared with dsd by
DLPack, never copied: load writes into your tensors in place), in dsd's format or PyTorch
DCP's (dsd.save(format="dcp"); dsd.load of a dcp.save directory)."""
from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from . import _capi, _dist
from ._capi import CData, LoadOptions, SaveOptions, StrPath
from ._errors import closed
from ._tree import TENSOR, take_python, to_python, tree_of


def _comm_ptr(comm: "_dist.Communicator | None") -> CData | None:
    return None if comm is None else comm.ptr


# Options shared by every save (keyword arguments with the C library's defaults):
#   overwrite           replace an existing checkpoint (after the new one commits)
#   thread_count        writer threads (= data files) per rank; 0: min(4, cores per local rank)
#   save_to_lowest_rank replicated chunks written by the lowest rank instead of balanced
#   sync_files          fsync the data files before the commit
#   block_size          bytes per checksummed block, a power of two >= 4096 (None: 4 MiB)
#   format              "dsd", or "dcp" (PyTorch DCP's own format, which dcp.load reads)
#   enable_plan_caching as DCP's: a save with the structure fingerprint of an earlier save
#                       over the same communicator reuses its global plan (no plan exchange)
#   max_staging_bytes   async saves: the most host memory staging holds (0: no cap); a larger
#                       state is staged in waves, so the call returns later

def save(state_dict: Mapping, path: StrPath, *, overwrite: bool = False, thread_count: int = 0,
         save_to_lowest_rank: bool = False, sync_files: bool = True, block_size: int | None = None,
         format: str = "dsd", enable_plan_caching: bool = False, base: StrPath | None = None,
         comm: "_dist.Communicator | None" = None) -> None:
    """Saves `state_dict` (nested dicts/lists of tensors, DTensors and plain values) to the
    directory `path`, as a dsd checkpoint or (format="dcp") in PyTorch DCP's own format, which
    dcp.load reads.

    Like dcp.save, it needs no communicator: with `comm` (a dsd.Communicator) it runs over
    it; otherwise, when `state_dict` holds DTensors or torch.distributed is initialised with
    several ranks, over the process communicator (built once from the launcher's environment,
    shared by every dsd call); else in this process alone. Every rank calls it with its
    shards. Raises dsd.ExistsError (a FileExistsError) when a checkpoint is there and not
    `overwrite`, dsd.NoSpaceError (an OSError) when the disk is full (the old checkpoint stays
    intact).

    `base`: an incremental save. The path of a dsd checkpoint in the same parent directory
    (the previous step) whose unchanged chunks are referenced instead of written again (same
    key, dtype, offsets and sizes, equal checksums confirmed by a byte compare); the new
    checkpoint then needs the base's files to load."""
    opts = SaveOptions(overwrite, thread_count, save_to_lowest_rank, sync_files, block_size, format,
                       enable_plan_caching=enable_plan_caching, base=_fspath(base))
    comm = _dist.communicator_for(comm, state_dict)
    with tree_of(state_dict, comm) as sd:
        _capi.checkpoint_save(_comm_ptr(comm), sd, path, opts)


class SaveFuture:
    """An asynchronous save in flight. The state was copied when the save call returned.
    close() (or leaving a `with` block, which first waits for the save) frees it; the save
    goes on to completion either way."""

    __slots__ = ("_ptr", "_owner")

    def __init__(self, ptr: CData, owner: object = None):
        """`ptr`: an owned dsd_future* from _capi; `owner`: the checkpointer or manager it came
        from, kept alive while the future is (freeing one waits for its save)."""
        self._ptr = ptr
        self._owner = owner

    def _future(self) -> CData:
        if self._ptr is None:
            raise closed("SaveFuture")
        return self._ptr

    def staged(self) -> bool:
        """Whether the state was copied out (always True once the save call returned)."""
        return _capi.future_is_staged(self._future())

    def done(self) -> bool:
        """Whether the save has finished: committed or failed."""
        return _capi.future_is_done(self._future())

    def result(self, timeout: float | None = None) -> None:
        """Waits for the commit (at most `timeout` seconds; None: no limit); raises the save's
        error, or dsd.TimeoutError (a TimeoutError) while it still runs."""
        _capi.future_wait(self._future(), -1 if timeout is None else int(timeout * 1000))

    wait = result

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._ptr is None

    def close(self) -> None:
        """Frees the future (the save goes on to completion). Idempotent."""
        ptr, self._ptr = self._ptr, None
        self._owner = None
        _capi.release(ptr)

    def __enter__(self) -> "SaveFuture":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None and self._ptr is not None:
                self.result()
        finally:
            self.close()


_OPEN: "weakref.WeakSet[AsyncCheckpointer]" = weakref.WeakSet()


class AsyncCheckpointer:
    """PyTorch's AsyncCheckpointer: reusable host staging buffers (the same structure saved
    again allocates nothing) and a background thread that writes and commits over its own
    clone of `comm` (a dsd.Communicator; without one, the process communicator when
    torch.distributed runs with several ranks, as dsd.save; else a single process). A save waits for the previous one of the same checkpointer; independent
    checkpointers never wait for each other. close() (or leaving a `with` block, or the
    interpreter's exit) waits for the save in flight and frees the buffers."""

    def __init__(self, comm: "_dist.Communicator | None" = None):
        """`comm`: the communicator its saves are collective over (see the class)."""
        comm = _dist.communicator_for(comm)
        # Our own reference to the C communicator (not to `comm`, which may hold this object).
        self._comm = None if comm is None else _dist.Communicator(_capi.comm_retain(comm.ptr))
        self._ptr = _capi.async_checkpointer_new(_comm_ptr(self._comm))
        _OPEN.add(self)

    def save(self, state_dict: Mapping, path: StrPath, *, overwrite: bool = False,
             thread_count: int = 0, save_to_lowest_rank: bool = False, sync_files: bool = True,
             block_size: int | None = None, format: str = "dsd", enable_plan_caching: bool = False,
             max_staging_bytes: int = 0, base: StrPath | None = None) -> SaveFuture:
        """Stages `state_dict` into the host buffers, then saves it in the background; options
        as dsd.save's. The returned future's result() raises the save's error, if any."""
        if self._ptr is None:
            raise closed("AsyncCheckpointer")
        opts = SaveOptions(overwrite, thread_count, save_to_lowest_rank, sync_files, block_size, format,
                           enable_plan_caching=enable_plan_caching,
                           max_staging_bytes=max_staging_bytes, base=_fspath(base))
        with tree_of(state_dict, self._comm) as sd:
            return SaveFuture(_capi.checkpoint_save_async(self._ptr, sd, path, opts), self)

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._ptr is None

    def close(self) -> None:
        """Waits for the save in flight, stops the thread and frees the buffers. Idempotent."""
        ptr, self._ptr = self._ptr, None
        _capi.release(ptr)
        comm, self._comm = self._comm, None
        if comm is not None:
            comm.close()
        _OPEN.discard(self)

    def __enter__(self) -> "AsyncCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_LOCAL_CHECKPOINTER: AsyncCheckpointer | None = None  # dsd.async_save without a communicator
_DEFAULT_LOCK = threading.Lock()


def _default_checkpointer(comm: "_dist.Communicator | None") -> AsyncCheckpointer:
    """The checkpointer dsd.async_save uses: one per communicator object (made on first use,
    closed with it), one for the single-process case (closed at exit)."""
    global _LOCAL_CHECKPOINTER
    with _DEFAULT_LOCK:
        if comm is None:
            if _LOCAL_CHECKPOINTER is None or _LOCAL_CHECKPOINTER._ptr is None:
                _LOCAL_CHECKPOINTER = AsyncCheckpointer()
            return _LOCAL_CHECKPOINTER
        if comm.async_checkpointer is None or comm.async_checkpointer._ptr is None:
            comm.async_checkpointer = AsyncCheckpointer(comm)
        return comm.async_checkpointer


@atexit.register
def _close_all() -> None:
    """At exit: waits for every async save in flight (closing the checkpointers), then closes
    the process communicator."""
    for checkpointer in list(_OPEN):
        checkpointer.close()
    _dist.close_process_communicator()


def async_save(state_dict: Mapping, path: StrPath, *, overwrite: bool = False,
               thread_count: int = 0, save_to_lowest_rank: bool = False, sync_files: bool = True,
               block_size: int | None = None, format: str = "dsd", enable_plan_caching: bool = False,
               max_staging_bytes: int = 0, base: StrPath | None = None,
               comm: "_dist.Communicator | None" = None) -> SaveFuture:
    """Stages `state_dict` into reusable host buffers and saves it in the background, through
    the default AsyncCheckpointer of the communicator (chosen as dsd.save chooses it); options
    as dsd.save's. The returned future's result() raises the save's error, if any."""
    opts = dict(overwrite=overwrite, thread_count=thread_count, save_to_lowest_rank=save_to_lowest_rank,
                sync_files=sync_files, block_size=block_size, format=format,
                enable_plan_caching=enable_plan_caching, max_staging_bytes=max_staging_bytes, base=base)
    SaveOptions(**{**opts, "base": _fspath(base)})  # bad options fail before a checkpointer is made
    comm = _dist.communicator_for(comm, state_dict)
    return _default_checkpointer(comm).save(state_dict, path, **opts)


_REPR_KEYS = 3  # keys a LoadReport's repr names per list


@dataclass
class LoadReport:
    """What a load did not match: `missing_keys` (in the state dict, not in the checkpoint;
    only with strict=False), `unexpected_keys` (in the checkpoint, not in the state dict),
    `skipped_keys`. Its repr gives counts and the first few keys of each list."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    skipped_keys: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        parts = []
        for name in ("missing_keys", "unexpected_keys", "skipped_keys"):
            keys = getattr(self, name)
            shown = ", ".join(repr(k) for k in keys[:_REPR_KEYS])
            more = f", ... {len(keys) - _REPR_KEYS} more" if len(keys) > _REPR_KEYS else ""
            parts.append(f"{name}={len(keys)}" + (f" [{shown}{more}]" if keys else ""))
        return f"LoadReport({', '.join(parts)})"


def _is_tensor(v) -> bool:
    return hasattr(v, "__dlpack__") and hasattr(v, "__dlpack_device__")


def _merge_values(target, loaded) -> None:
    """Copies the loaded non-tensor leaves into `target` (tensors were loaded in place)."""
    items = loaded.items() if isinstance(loaded, Mapping) else enumerate(loaded)
    for k, v in items:
        cur = target[k]
        if _is_tensor(cur) or v is TENSOR:
            continue
        if isinstance(cur, Mapping) and isinstance(v, Mapping):
            _merge_values(cur, v)
        elif isinstance(cur, list) and isinstance(v, list) and len(cur) == len(v):
            _merge_values(cur, v)
        else:
            target[k] = v


def load(state_dict: Mapping, path: StrPath, *, strict: bool = True, thread_count: int = 0,
         verify: bool = True, comm: "_dist.Communicator | None" = None,
         allow_external_files: bool = False, cooperative_load: str = "across_hosts") -> LoadReport:
    """Loads the checkpoint at `path` (dsd, or a PyTorch DCP checkpoint from dcp.save at any
    world size) into `state_dict` in place (tensors and DTensor shards receive the saved
    bytes of their region; plain values are replaced). The communicator is chosen as
    dsd.save chooses it (`comm`, else the process communicator when there are DTensors or
    several ranks); every rank calls it. `thread_count`: reader threads (0: min(8, cores per
    local rank)); `verify`: check the checksum of every byte read. A dsd checkpoint's data
    files that are symbolic links are refused (dsd.CorruptError) unless `allow_external_files`.
    `cooperative_load`: a tensor every rank loads whole is read by one rank and broadcast to
    the others when the ranks span several hosts ("across_hosts", the default), also on one
    host ("always"), or never ("never"); every rank must pass the same.
    Raises dsd.NotFoundError (a FileNotFoundError and KeyError) for a missing checkpoint, or a
    missing key when `strict`; dsd.ShapeMismatchError / dsd.DtypeMismatchError; dsd.CorruptError."""
    opts = LoadOptions(strict, thread_count, verify, allow_external_files, cooperative_load)
    comm = _dist.communicator_for(comm, state_dict)
    with tree_of(state_dict, comm) as sd:
        keys = _capi.checkpoint_load(_comm_ptr(comm), sd, path, opts)
        _merge_values(state_dict, to_python(sd, tensors=False))
    return LoadReport(keys.missing, keys.unexpected, keys.skipped)


def load_full(path: StrPath, keys=None) -> dict:
    """A new dict of full CPU tensors and values from the checkpoint, optionally only `keys`
    (flat keys or dotted prefixes of nested paths)."""
    return take_python(_capi.checkpoint_load_full(path, list(keys or [])))


def _fspath(p: StrPath | None) -> str | None:
    return None if p is None else os.fspath(p)


class GcReport(NamedTuple):
    """What dsd.gc removed: retired checkpoint directories removed whole, unreferenced data
    files removed from retired ones still referenced, and the bytes of all of it."""

    retired_removed: int
    files_removed: int
    bytes_removed: int


def gc(root: StrPath) -> GcReport:
    """Removes what the retired checkpoints under `root` hold that no live checkpoint there
    references (the rule a CheckpointManager's retention follows; `dsd gc` on the command
    line also retires by hand). The references are counted before anything is removed, so an
    interrupted gc leaves every live checkpoint loadable. Raises dsd.NotFoundError (no
    `root`), dsd.IOError (a live manifest that cannot be read: nothing is removed)."""
    return GcReport(*_capi.checkpoint_gc(root))


def verify(path: StrPath) -> None:
    """Checks every checksum of the checkpoint; raises dsd.CorruptError naming the file and
    key of the first damaged chunk."""
    _capi.checkpoint_verify(path)


class CheckpointManager:
    """Step checkpoints under `root` (`root/step_<N>`), keeping the newest `keep_last` (0: all),
    with a `latest` file and resume from the newest complete step. Its saves and loads are
    collective over `comm` (a dsd.Communicator); without one, over the process communicator
    when torch.distributed runs with several ranks (as dsd.save), else a single process.
    close() (or leaving a `with` block) waits for its async save in flight and frees it."""

    def __init__(self, root: StrPath, keep_last: int = 0, comm: "_dist.Communicator | None" = None, *,
                 incremental: bool = False):
        """`root`: the directory of the step checkpoints; `keep_last`: how many complete ones to
        keep (0: all); `comm`: see the class; `incremental`: each save references the
        unchanged chunks of the newest complete step before it (dsd.save's `base`), and
        retention keeps what kept steps reference (retired steps lose their files once no
        kept step references them; dsd.gc)."""
        self.incremental = incremental
        comm = _dist.communicator_for(comm)
        self._comm = comm
        self._ptr = _capi.checkpoint_manager_new(_comm_ptr(comm), root, keep_last)
        self.root = str(root)
        self.keep_last = keep_last

    @property
    def comm(self) -> "_dist.Communicator | None":
        """The communicator its saves and loads run over (None: a single process)."""
        return self._comm

    def _manager(self) -> CData:
        if self._ptr is None:
            raise closed("CheckpointManager")
        return self._ptr

    def save(self, state_dict: Mapping, step: int, *, overwrite: bool = False,
             thread_count: int = 0, save_to_lowest_rank: bool = False, sync_files: bool = True,
             block_size: int | None = None, format: str = "dsd",
             enable_plan_caching: bool = False) -> None:
        """Saves `state_dict` as step `step`, moves `latest`, then deletes the steps beyond
        `keep_last`; options as dsd.save's."""
        opts = SaveOptions(overwrite, thread_count, save_to_lowest_rank, sync_files, block_size, format,
                           enable_plan_caching=enable_plan_caching, incremental=self.incremental)
        manager = self._manager()
        with tree_of(state_dict, self._tree_comm(state_dict)) as sd:
            _capi.checkpoint_manager_save(manager, sd, step, opts)

    def async_save(self, state_dict: Mapping, step: int, *, overwrite: bool = False,
                   thread_count: int = 0, save_to_lowest_rank: bool = False, sync_files: bool = True,
                   block_size: int | None = None, format: str = "dsd",
                   enable_plan_caching: bool = False, max_staging_bytes: int = 0) -> SaveFuture:
        """save() in the background (the state is copied when it returns); the future's
        result() raises the save's error, if any."""
        opts = SaveOptions(overwrite, thread_count, save_to_lowest_rank, sync_files, block_size, format,
                           enable_plan_caching=enable_plan_caching,
                           max_staging_bytes=max_staging_bytes, incremental=self.incremental)
        manager = self._manager()
        with tree_of(state_dict, self._tree_comm(state_dict)) as sd:
            return SaveFuture(_capi.checkpoint_manager_save_async(manager, sd, step, opts), self)

    def latest_step(self) -> int | None:
        """The newest complete step, or None when there is none."""
        return _capi.checkpoint_manager_latest_step(self._manager())

    def load_latest(self, state_dict: Mapping, *, strict: bool = True, thread_count: int = 0,
                    verify: bool = True, allow_external_files: bool = False,
                    cooperative_load: str = "across_hosts") -> int | None:
        """Loads the newest complete step into `state_dict`; its step, or None if there is none
        (options as dsd.load's)."""
        opts = LoadOptions(strict, thread_count, verify, allow_external_files, cooperative_load)
        manager = self._manager()
        with tree_of(state_dict, self._tree_comm(state_dict)) as sd:
            step = _capi.checkpoint_manager_load_latest(manager, sd, opts)
            if step is not None:
                _merge_values(state_dict, to_python(sd, tensors=False))
        return step

    def _tree_comm(self, state_dict: Mapping) -> "_dist.Communicator | None":
        """The communicator DTensor meshes are made over: the manager's, else (a manager of
        one process given DTensors on a mesh of one rank) the process communicator."""
        return self._comm if self._comm is not None else _dist.communicator_for(None, state_dict)

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._ptr is None

    def close(self) -> None:
        """Waits for the async save in flight, then frees the manager. Idempotent."""
        ptr, self._ptr = self._ptr, None
        _capi.release(ptr)
        self._comm = None

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        incremental = ", incremental=True" if self.incremental else ""
        return f"dsd.CheckpointManager({self.root!r}, keep_last={self.keep_last}{incremental})"
