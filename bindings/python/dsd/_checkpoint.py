"""Checkpoints: dsd.save, dsd.async_save, dsd.load, dsd.load_full, dsd.verify and
dsd.CheckpointManager over Python dicts of torch tensors (shared with dsd by DLPack, never
copied: load writes into your tensors in place); PyTorch DCP checkpoints both ways
(dsd.save(format="dcp"), dsd.load of a dcp.save directory); conversions between dsd, DCP,
torch.save and Hugging Face safetensors (dsd.convert, dsd.export_torch_save, ...)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from . import _dist
from ._errors import call
from ._lib import ffi, lib
from ._state_dict import TENSOR, to_dsd, to_python

FORMATS = {"dsd": 0, "dcp": 1, "torch": 2, "safetensors": 3}
_FORMAT_NAMES = {v: k for k, v in FORMATS.items()}


def _format_code(name: str) -> int:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; expected one of {sorted(FORMATS)}") from None


def _save_options(overwrite=False, thread_count=0, save_to_lowest_rank=False, sync_files=True,
                  block_size=None, format="dsd"):
    o = ffi.new("dsd_save_options*")
    lib.dsd_save_options_init(o)
    o.overwrite = overwrite
    o.thread_count = thread_count
    o.save_to_lowest_rank = save_to_lowest_rank
    o.sync_files = sync_files
    if block_size is not None:
        o.block_size = block_size
    o.format = _format_code(format)
    return o


def _comm_ptr(comm):
    return ffi.NULL if comm is None else comm.ptr


def _load_options(strict=True, thread_count=0, verify=True):
    o = ffi.new("dsd_load_options*")
    lib.dsd_load_options_init(o)
    o.strict = strict
    o.thread_count = thread_count
    o.verify = verify
    return o


class _Tree:
    """A dsd copy of a Python state dict's structure (tensors shared), freed on exit."""

    def __init__(self, state_dict, comm=None):
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"expected a dict state dict, got {type(state_dict)}")
        self.ptr = to_dsd(state_dict, ctx=_dist.MeshCache(comm))

    def __enter__(self):
        return self.ptr

    def __exit__(self, *exc):
        lib.dsd_state_dict_free(self.ptr)


def save(state_dict: Mapping, path: str, *, overwrite: bool = False, thread_count: int = 0,
         save_to_lowest_rank: bool = False, sync_files: bool = True, block_size: int | None = None,
         format: str = "dsd", comm=None) -> None:
    """Saves `state_dict` (nested dicts/lists of tensors, DTensors and plain values) to the
    directory `path`, as a dsd checkpoint or (format="dcp") in PyTorch DCP's own format, which
    dcp.load reads. With `comm` (a dsd.Communicator) every rank calls it with its shards.
    Raises dsd.Error with code_name "exists" when a checkpoint is there and not `overwrite`,
    "no_space" when the disk is full (the old checkpoint stays intact)."""
    opts = _save_options(overwrite, thread_count, save_to_lowest_rank, sync_files, block_size, format)
    with _Tree(state_dict, comm) as sd:
        call(lib.dsd_save, _comm_ptr(comm), sd, str(path).encode(), opts)


class SaveFuture:
    """An asynchronous save in flight. The state was copied when async_save returned."""

    __slots__ = ("_ptr",)

    def __init__(self, ptr):
        self._ptr = ffi.gc(ptr, lib.dsd_future_free)

    def staged(self) -> bool:
        out = ffi.new("bool*")
        call(lib.dsd_future_is_staged, self._ptr, out)
        return bool(out[0])

    def done(self) -> bool:
        out = ffi.new("bool*")
        call(lib.dsd_future_is_done, self._ptr, out)
        return bool(out[0])

    def result(self, timeout: float | None = None) -> None:
        """Waits for the commit; raises the save's error, or dsd.Error "timeout"."""
        ms = -1 if timeout is None else int(timeout * 1000)
        call(lib.dsd_future_wait, self._ptr, ms)

    wait = result


def async_save(state_dict: Mapping, path: str, *, comm=None, **options) -> SaveFuture:
    """Stages `state_dict` into reusable host buffers and saves it in the background. The
    returned future's result() raises the save's error, if any."""
    opts = _save_options(**options)
    out = ffi.new("dsd_future**")
    with _Tree(state_dict, comm) as sd:
        call(lib.dsd_save_async, _comm_ptr(comm), sd, str(path).encode(), opts, out)
    return SaveFuture(out[0])


@dataclass
class LoadReport:
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    skipped_keys: list[str] = field(default_factory=list)


def _report(ptr) -> LoadReport:
    r = LoadReport()
    n = ffi.new("size_t*")
    key = ffi.new("char**")
    for which, keys in ((lib.DSD_LOAD_REPORT_MISSING, r.missing_keys),
                        (lib.DSD_LOAD_REPORT_UNEXPECTED, r.unexpected_keys),
                        (lib.DSD_LOAD_REPORT_SKIPPED, r.skipped_keys)):
        call(lib.dsd_load_report_count, ptr, which, n)
        for i in range(n[0]):
            call(lib.dsd_load_report_key, ptr, which, i, key)
            keys.append(ffi.string(key[0]).decode("utf-8"))
    return r


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


def _load_into(fn, state_dict, *args, comm=None):
    """Runs a dsd load into `state_dict`; returns the report."""
    out = ffi.new("dsd_load_report**")
    with _Tree(state_dict, comm) as sd:
        fn(sd, *args, out)
        try:
            report = _report(out[0])
        finally:
            lib.dsd_load_report_free(out[0])
        _merge_values(state_dict, to_python(sd, tensors=False))
    return report


def load(state_dict: Mapping, path: str, *, strict: bool = True, thread_count: int = 0,
         verify: bool = True, comm=None) -> LoadReport:
    """Loads the checkpoint at `path` (dsd, or a PyTorch DCP checkpoint from dcp.save at any
    world size) into `state_dict` in place (tensors and DTensor shards receive the saved
    bytes of their region; plain values are replaced). With `comm` every rank calls it.
    Raises dsd.NotFoundError for a missing key when `strict`, dsd.ShapeMismatchError /
    dsd.DtypeMismatchError, dsd.Error "corrupt"."""
    opts = _load_options(strict, thread_count, verify)
    c = _comm_ptr(comm)
    return _load_into(lambda sd, out: call(lib.dsd_load, c, sd, str(path).encode(), opts, out),
                      state_dict, comm=comm)


def load_full(path: str, keys=None) -> dict:
    """A new dict of full CPU tensors and values from the checkpoint, optionally only `keys`
    (flat keys or dotted prefixes of nested paths)."""
    keys = list(keys or [])
    encoded = [ffi.new("char[]", k.encode()) for k in keys]
    arr = ffi.new("char*[]", encoded) if encoded else ffi.NULL
    out = ffi.new("dsd_state_dict**")
    call(lib.dsd_load_full, str(path).encode(), arr, len(keys), out)
    try:
        return to_python(out[0])
    finally:
        lib.dsd_state_dict_free(out[0])


def verify(path: str) -> None:
    """Checks every checksum of the checkpoint; raises dsd.Error "corrupt" naming the file and
    key of the first damaged chunk."""
    call(lib.dsd_checkpoint_verify, str(path).encode())


def _convert_options(overwrite=False, thread_count=0, max_shard_size=None):
    o = ffi.new("dsd_convert_options*")
    lib.dsd_convert_options_init(o)
    o.overwrite = overwrite
    o.thread_count = thread_count
    if max_shard_size is not None:
        o.max_shard_size = max_shard_size
    return o


def detect_format(path: str) -> str:
    """"dsd", "dcp", "torch" or "safetensors": what is at `path`."""
    out = ffi.new("dsd_format*")
    call(lib.dsd_detect_format, str(path).encode(), out)
    return _FORMAT_NAMES[out[0]]


def convert(src: str, dst: str, to: str, *, overwrite: bool = False, thread_count: int = 0,
            max_shard_size: int | None = None) -> None:
    """Converts `src` (any of dsd, dcp, torch, safetensors; detected) to `dst` in format `to`,
    tensor by tensor."""
    opts = _convert_options(overwrite, thread_count, max_shard_size)
    call(lib.dsd_convert, str(src).encode(), str(dst).encode(), _format_code(to), opts)


def export_torch_save(state_dict: Mapping, path: str, *, overwrite: bool = False) -> None:
    """Writes `state_dict` (full tensors) as a torch.save file that torch.load reads with
    weights_only=True."""
    opts = _convert_options(overwrite)
    with _Tree(state_dict) as sd:
        call(lib.dsd_export_torch_save, sd, str(path).encode(), opts)


def import_torch_save(path: str) -> dict:
    """The state dict of a torch.save file, read without executing any pickle."""
    out = ffi.new("dsd_state_dict**")
    call(lib.dsd_import_torch_save, str(path).encode(), out)
    try:
        return to_python(out[0])
    finally:
        lib.dsd_state_dict_free(out[0])


def export_safetensors(state_dict: Mapping, path: str, *, overwrite: bool = False,
                       max_shard_size: int | None = None, thread_count: int = 0) -> None:
    """Writes `state_dict` (full tensors) as a Hugging Face safetensors directory:
    model-0000i-of-0000N.safetensors + model.safetensors.index.json, flat keys."""
    opts = _convert_options(overwrite, thread_count, max_shard_size)
    with _Tree(state_dict) as sd:
        call(lib.dsd_export_safetensors, sd, str(path).encode(), opts)


def import_safetensors(path: str) -> dict:
    """The state dict of a safetensors directory or file (nested again when dsd wrote it)."""
    out = ffi.new("dsd_state_dict**")
    call(lib.dsd_import_safetensors, str(path).encode(), out)
    try:
        return to_python(out[0])
    finally:
        lib.dsd_state_dict_free(out[0])


class CheckpointManager:
    """Step checkpoints under `root` (`root/step_<N>`), keeping the newest `keep_last` (0: all),
    with a `latest` file and resume from the newest complete step."""

    def __init__(self, root: str, keep_last: int = 0):
        out = ffi.new("dsd_checkpoint_manager**")
        call(lib.dsd_checkpoint_manager_new, str(root).encode(), keep_last, out)
        self._ptr = ffi.gc(out[0], lib.dsd_checkpoint_manager_free)
        self.root = str(root)

    def save(self, state_dict: Mapping, step: int, **options) -> None:
        opts = _save_options(**options)
        with _Tree(state_dict) as sd:
            call(lib.dsd_checkpoint_manager_save, self._ptr, ffi.NULL, sd, step, opts)

    def async_save(self, state_dict: Mapping, step: int, **options) -> SaveFuture:
        opts = _save_options(**options)
        out = ffi.new("dsd_future**")
        with _Tree(state_dict) as sd:
            call(lib.dsd_checkpoint_manager_save_async, self._ptr, ffi.NULL, sd, step, opts, out)
        return SaveFuture(out[0])

    def latest_step(self) -> int | None:
        found = ffi.new("bool*")
        step = ffi.new("int64_t*")
        call(lib.dsd_checkpoint_manager_latest_step, self._ptr, found, step)
        return int(step[0]) if found[0] else None

    def load_latest(self, state_dict: Mapping, *, strict: bool = True, thread_count: int = 0,
                    verify: bool = True) -> int | None:
        """Loads the newest complete step into `state_dict`; its step, or None if there is none."""
        opts = _load_options(strict, thread_count, verify)
        found = ffi.new("bool*")
        step = ffi.new("int64_t*")
        with _Tree(state_dict) as sd:
            call(lib.dsd_checkpoint_manager_load_latest, self._ptr, ffi.NULL, sd, opts, found, step)
            if found[0]:
                _merge_values(state_dict, to_python(sd, tensors=False))
        return int(step[0]) if found[0] else None
