"""Checkpoints: dsd.save, dsd.async_save (dsd.AsyncCheckpointer), dsd.load, dsd.load_full,
dsd.verify and dsd.CheckpointManager over Python dicts of torch tensors (shared with dsd by
DLPack, never copied: load writes into your tensors in place), in dsd's format or PyTorch
DCP's (dsd.save(format="dcp"); dsd.load of a dcp.save directory)."""
from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import _capi, _dist
from ._capi import CData, LoadOptions, SaveOptions
from ._tree import TENSOR, take_python, to_python, tree_of


def _comm_ptr(comm: "_dist.Communicator | None") -> CData | None:
    return None if comm is None else comm.ptr


def save(state_dict: Mapping, path: str, *, overwrite: bool = False, thread_count: int = 0,
         save_to_lowest_rank: bool = False, sync_files: bool = True, block_size: int | None = None,
         format: str = "dsd", comm=None) -> None:
    """Saves `state_dict` (nested dicts/lists of tensors, DTensors and plain values) to the
    directory `path`, as a dsd checkpoint or (format="dcp") in PyTorch DCP's own format, which
    dcp.load reads. With `comm` (a dsd.Communicator) every rank calls it with its shards.
    Raises dsd.Error with code_name "exists" when a checkpoint is there and not `overwrite`,
    "no_space" when the disk is full (the old checkpoint stays intact)."""
    opts = SaveOptions(overwrite, thread_count, save_to_lowest_rank, sync_files, block_size, format)
    with tree_of(state_dict, comm) as sd:
        _capi.checkpoint_save(_comm_ptr(comm), sd, path, opts)


class SaveFuture:
    """An asynchronous save in flight. The state was copied when the save call returned."""

    __slots__ = ("_ptr", "_owner")

    def __init__(self, ptr: CData, owner: object = None):
        """`ptr`: an owned dsd_future* from _capi; `owner`: the checkpointer or manager it came
        from, kept alive while the future is (freeing one waits for its save)."""
        self._ptr = ptr
        self._owner = owner

    def staged(self) -> bool:
        return _capi.future_is_staged(self._ptr)

    def done(self) -> bool:
        return _capi.future_is_done(self._ptr)

    def result(self, timeout: float | None = None) -> None:
        """Waits for the commit; raises the save's error, or dsd.Error "timeout"."""
        _capi.future_wait(self._ptr, -1 if timeout is None else int(timeout * 1000))

    wait = result


_OPEN: "weakref.WeakSet[AsyncCheckpointer]" = weakref.WeakSet()


class AsyncCheckpointer:
    """PyTorch's AsyncCheckpointer: reusable host staging buffers (the same structure saved
    again allocates nothing) and a background thread that writes and commits over its own
    clone of `comm` (a dsd.Communicator; None: a single process). Creating one is collective
    over `comm`. A save waits for the previous one of the same checkpointer; independent
    checkpointers never wait for each other. close() (or leaving a `with` block, or the
    interpreter's exit) waits for the save in flight and frees the buffers."""

    def __init__(self, comm: "_dist.Communicator | None" = None):
        # Our own reference to the C communicator (not to `comm`, which may hold this object).
        self._comm = None if comm is None else _dist.Communicator(_capi.comm_retain(comm.ptr))
        self._ptr = _capi.async_checkpointer_new(_comm_ptr(self._comm))
        _OPEN.add(self)

    def save(self, state_dict: Mapping, path: str, **options) -> SaveFuture:
        """Stages `state_dict` into the host buffers, then saves it in the background; options
        as dsd.save's. The returned future's result() raises the save's error, if any."""
        if self._ptr is None:
            raise ValueError("the AsyncCheckpointer is closed")
        opts = SaveOptions(**options)
        with tree_of(state_dict, self._comm) as sd:
            return SaveFuture(_capi.checkpoint_save_async(self._ptr, sd, path, opts), self)

    def close(self) -> None:
        """Waits for the save in flight, stops the thread and frees the buffers. Idempotent."""
        ptr, self._ptr = self._ptr, None
        _capi.release(ptr)
        self._comm = None
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
    for checkpointer in list(_OPEN):
        checkpointer.close()


def async_save(state_dict: Mapping, path: str, *, comm=None, **options) -> SaveFuture:
    """Stages `state_dict` into reusable host buffers and saves it in the background, through
    the default AsyncCheckpointer of `comm`. The returned future's result() raises the save's
    error, if any."""
    SaveOptions(**options)  # bad options fail before a checkpointer is made
    return _default_checkpointer(comm).save(state_dict, path, **options)


@dataclass
class LoadReport:
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    skipped_keys: list[str] = field(default_factory=list)


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


def load(state_dict: Mapping, path: str, *, strict: bool = True, thread_count: int = 0,
         verify: bool = True, comm=None, allow_external_files: bool = False) -> LoadReport:
    """Loads the checkpoint at `path` (dsd, or a PyTorch DCP checkpoint from dcp.save at any
    world size) into `state_dict` in place (tensors and DTensor shards receive the saved
    bytes of their region; plain values are replaced). With `comm` every rank calls it.
    A dsd checkpoint's data files that are symbolic links are refused (dsd.Error "corrupt")
    unless `allow_external_files`.
    Raises dsd.NotFoundError for a missing key when `strict`, dsd.ShapeMismatchError /
    dsd.DtypeMismatchError, dsd.Error "corrupt"."""
    opts = LoadOptions(strict, thread_count, verify, allow_external_files)
    with tree_of(state_dict, comm) as sd:
        keys = _capi.checkpoint_load(_comm_ptr(comm), sd, path, opts)
        _merge_values(state_dict, to_python(sd, tensors=False))
    return LoadReport(keys.missing, keys.unexpected, keys.skipped)


def load_full(path: str, keys=None) -> dict:
    """A new dict of full CPU tensors and values from the checkpoint, optionally only `keys`
    (flat keys or dotted prefixes of nested paths)."""
    return take_python(_capi.checkpoint_load_full(path, list(keys or [])))


def verify(path: str) -> None:
    """Checks every checksum of the checkpoint; raises dsd.Error "corrupt" naming the file and
    key of the first damaged chunk."""
    _capi.checkpoint_verify(path)


class CheckpointManager:
    """Step checkpoints under `root` (`root/step_<N>`), keeping the newest `keep_last` (0: all),
    with a `latest` file and resume from the newest complete step. With `comm` (a
    dsd.Communicator) its saves and loads are collective over it, as is creating it."""

    def __init__(self, root: str, keep_last: int = 0, comm=None):
        self._comm = comm
        self._ptr = _capi.checkpoint_manager_new(_comm_ptr(comm), root, keep_last)
        self.root = str(root)

    def save(self, state_dict: Mapping, step: int, **options) -> None:
        opts = SaveOptions(**options)
        with tree_of(state_dict, self._comm) as sd:
            _capi.checkpoint_manager_save(self._ptr, sd, step, opts)

    def async_save(self, state_dict: Mapping, step: int, **options) -> SaveFuture:
        opts = SaveOptions(**options)
        with tree_of(state_dict, self._comm) as sd:
            return SaveFuture(_capi.checkpoint_manager_save_async(self._ptr, sd, step, opts), self)

    def latest_step(self) -> int | None:
        return _capi.checkpoint_manager_latest_step(self._ptr)

    def load_latest(self, state_dict: Mapping, *, strict: bool = True, thread_count: int = 0,
                    verify: bool = True) -> int | None:
        """Loads the newest complete step into `state_dict`; its step, or None if there is none."""
        opts = LoadOptions(strict, thread_count, verify)
        with tree_of(state_dict, self._comm) as sd:
            step = _capi.checkpoint_manager_load_latest(self._ptr, sd, opts)
            if step is not None:
                _merge_values(state_dict, to_python(sd, tensors=False))
        return step
