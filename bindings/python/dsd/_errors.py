"""dsd.Error and its subclasses, raised for every failing C call."""
from __future__ import annotations

from ._lib import ffi, lib


class Error(RuntimeError):
    """A dsd call failed. `code` is the DSD_E_* status, `code_name` its short name, `context`
    the key or file concerned ("" if none)."""

    def __init__(self, code: int, message: str, context: str = ""):
        super().__init__(message)
        self.code = code
        self.code_name = ffi.string(lib.dsd_status_name(code)).decode()
        self.context = context


class InvalidArgumentError(Error, ValueError):
    """Bad options or arguments (PyTorch raises ValueError for these)."""


class ShapeMismatchError(Error, ValueError):
    """A shape or size does not match."""


class DtypeMismatchError(Error, ValueError):
    """A dtype does not match or is unknown."""


class NotFoundError(Error):
    """A missing key, file or entry."""


class HandleError(Error):
    """A stale, released or wrong-kind handle."""


class UnsupportedError(Error, NotImplementedError):
    """A valid request this build or this form of state dict cannot serve."""


_BY_CODE = {
    lib.DSD_E_INVALID_ARGUMENT: InvalidArgumentError,
    lib.DSD_E_SHAPE_MISMATCH: ShapeMismatchError,
    lib.DSD_E_DTYPE_MISMATCH: DtypeMismatchError,
    lib.DSD_E_NOT_FOUND: NotFoundError,
    lib.DSD_E_STALE_HANDLE: HandleError,
    lib.DSD_E_WRONG_KIND: HandleError,
    lib.DSD_E_UNSUPPORTED: UnsupportedError,
}


class _ErrorSlot:
    """A `dsd_error**` for one call; raises and frees the error when the call failed."""

    __slots__ = ("ptr",)

    def __init__(self):
        self.ptr = ffi.new("dsd_error**")

    def check(self, status: int) -> None:
        if status == lib.DSD_OK:
            return
        err = self.ptr[0]
        if err == ffi.NULL:
            raise Error(status, f"dsd call failed with status {status}")
        try:
            message = ffi.string(lib.dsd_error_message(err)).decode("utf-8", "replace")
            context = ffi.string(lib.dsd_error_context(err)).decode("utf-8", "replace")
        finally:
            lib.dsd_error_free(err)
            self.ptr[0] = ffi.NULL
        raise _BY_CODE.get(status, Error)(status, message, context)


def call(fn, *args):
    """Calls a fallible C function with a fresh error slot appended; raises on failure."""
    slot = _ErrorSlot()
    slot.check(fn(*args, slot.ptr))
