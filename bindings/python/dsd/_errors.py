"""dsd.Error and its subclasses, raised for every failing C call (by _capi)."""
from __future__ import annotations

from ._lib import lib  # for the DSD_E_* constants only


class Error(RuntimeError):
    """A dsd call failed. `code` is the DSD_E_* status, `code_name` its short name, `context`
    the key or file concerned ("" if none)."""

    def __init__(self, code: int, message: str, context: str = ""):
        from ._capi import status_name  # noqa: PLC0415 - _capi imports this module

        super().__init__(message)
        self.code = code
        self.code_name = status_name(code)
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


def error_for(code: int, message: str, context: str = "") -> Error:
    """The exception for a failing status: the subclass its code maps to, else Error."""
    return _BY_CODE.get(code, Error)(code, message, context)
