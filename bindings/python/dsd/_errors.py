"""dsd.Error and its subclasses, raised for every failing C call (by _capi).

Every dsd exception is a `dsd.Error` (itself a `RuntimeError`, as before), carries `.code`
(the DSD_E_* status), `.code_name` (its short stable name, "not_found", ...), `.context` (the
key or file concerned, "" if none) and `.message`, and `str(e)` is the library's message. Each
status has its own class, which also inherits the builtin exception a Python user would catch
for that failure:

    ======================  ========================  ===========================================
    status                  dsd class                 also a
    ======================  ========================  ===========================================
    DSD_E_INVALID_ARGUMENT  InvalidArgumentError      ValueError
    DSD_E_STALE_HANDLE      StaleHandleError          ValueError (as a closed file); HandleError
    DSD_E_WRONG_KIND        WrongKindError            TypeError; HandleError
    DSD_E_NOT_FOUND         NotFoundError             FileNotFoundError and KeyError (a missing
                                                      file, checkpoint, key or entry: one code)
    DSD_E_UNEXPECTED_KEY    UnexpectedKeyError        KeyError
    DSD_E_DTYPE_MISMATCH    DtypeMismatchError        TypeError and ValueError
    DSD_E_SHAPE_MISMATCH    ShapeMismatchError        ValueError
    DSD_E_DEVICE            DeviceError               ValueError
    DSD_E_IO                IOError                   OSError (errno EIO)
    DSD_E_CORRUPT           CorruptError              OSError (as gzip.BadGzipFile)
    DSD_E_EXISTS            ExistsError               FileExistsError (errno EEXIST)
    DSD_E_COMM              CommError                 RuntimeError (as torch's DistBackendError)
    DSD_E_TIMEOUT           TimeoutError              TimeoutError (errno ETIMEDOUT)
    DSD_E_NO_SPACE          NoSpaceError              OSError (errno ENOSPC)
    DSD_E_UNSUPPORTED       UnsupportedError          NotImplementedError
    DSD_E_OUT_OF_MEMORY     OutOfMemoryError          MemoryError
    DSD_E_INTERNAL          InternalError             RuntimeError
    DSD_E_BUFFER_TOO_SMALL  BufferTooSmallError       ValueError
    DSD_E_ABI_MISMATCH      AbiMismatchError          ImportError
    DSD_E_STATE             StateError                RuntimeError
    DSD_E_CALLBACK          CallbackError             RuntimeError
    DSD_E_READ_ONLY         ReadOnlyError             ValueError (as numpy's read-only arrays)
    ======================  ========================  ===========================================

A status this module does not know raises plain `dsd.Error`. `dsd.IOError` and
`dsd.TimeoutError` are reached as attributes of the package and are not in `dsd.__all__`, so
`from dsd import *` never shadows the builtins of the same names. A dsd object used after
close() raises StaleHandleError.
"""
from __future__ import annotations

import builtins
import errno as _errno

from ._lib import lib  # for the DSD_E_* constants only


class Error(RuntimeError):
    """A dsd call failed. `code` is the DSD_E_* status, `code_name` its short name, `context`
    the key or file concerned ("" if none), `message` the library's message (also `str(e)`)."""

    _errno: int | None = None

    def __init__(self, code: int, message: str, context: str = ""):
        """`code`: a DSD_E_* status; `message`: what failed; `context`: the key or file."""
        from ._capi import status_name  # noqa: PLC0415 - _capi imports this module

        super().__init__(message)  # one argument: OSError subclasses take it as the message only
        self.code = code
        self.code_name = status_name(code)
        self.message = message
        self.context = context
        if isinstance(self, OSError):
            self.errno = self._errno
            self.strerror = message
            self.filename = context or None

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (error_for, (self.code, self.message, self.context))


class HandleError(Error):
    """A stale, released, closed or wrong-kind handle (base of StaleHandleError and
    WrongKindError)."""


class InvalidArgumentError(Error, ValueError):
    """Bad options or arguments (PyTorch raises ValueError for these)."""


class StaleHandleError(HandleError, ValueError):
    """A released, double-released, forged or zeroed handle, or an object used after close()."""


class WrongKindError(HandleError, TypeError):
    """A handle or value of another kind than asked for."""


class NotFoundError(Error, FileNotFoundError, KeyError):
    """A missing key, file, checkpoint or entry (catch it as FileNotFoundError or KeyError)."""

    _errno = _errno.ENOENT


class UnexpectedKeyError(Error, KeyError):
    """A key the target does not have."""


class DtypeMismatchError(Error, TypeError, ValueError):
    """A dtype does not match or is unknown."""


class ShapeMismatchError(Error, ValueError):
    """A shape or size does not match."""


class DeviceError(Error, ValueError):
    """An unsupported device, or tensors on mixed devices."""


class IOError(Error, OSError):  # noqa: A001 - dsd.IOError, not exported by `import *`
    """The file system failed."""

    _errno = _errno.EIO


class CorruptError(Error, OSError):
    """A checksum, header or bound in a file is wrong (the file names it in `context`)."""


class ExistsError(Error, FileExistsError):
    """Refusing to overwrite an existing checkpoint or file (pass overwrite=True)."""

    _errno = _errno.EEXIST


class CommError(Error):
    """A collective failed or a peer rank died."""


class TimeoutError(Error, builtins.TimeoutError):  # noqa: A001 - not exported by `import *`
    """A wait (a collective, a future) ran past its limit."""

    _errno = _errno.ETIMEDOUT


class NoSpaceError(Error, OSError):
    """The disk is full or a file size limit was reached (the old checkpoint stays intact)."""

    _errno = _errno.ENOSPC


class UnsupportedError(Error, NotImplementedError):
    """A valid request this build or this form of state dict cannot serve."""


class OutOfMemoryError(Error, MemoryError):
    """An allocation failed."""


class InternalError(Error):
    """A bug in dsd or an unexpected library failure."""


class BufferTooSmallError(Error, ValueError):
    """The caller's buffer is too small."""


class AbiMismatchError(Error, ImportError):
    """The bindings and the library disagree on the ABI."""


class StateError(Error):
    """The object is not in a state that allows the call."""


class CallbackError(Error):
    """A callback supplied by the caller reported failure (or raised)."""


class ReadOnlyError(Error, ValueError):
    """Writing into a tensor imported as read-only."""


BY_CODE: dict[int, type[Error]] = {
    lib.DSD_E_INVALID_ARGUMENT: InvalidArgumentError,
    lib.DSD_E_STALE_HANDLE: StaleHandleError,
    lib.DSD_E_WRONG_KIND: WrongKindError,
    lib.DSD_E_NOT_FOUND: NotFoundError,
    lib.DSD_E_UNEXPECTED_KEY: UnexpectedKeyError,
    lib.DSD_E_DTYPE_MISMATCH: DtypeMismatchError,
    lib.DSD_E_SHAPE_MISMATCH: ShapeMismatchError,
    lib.DSD_E_DEVICE: DeviceError,
    lib.DSD_E_IO: IOError,
    lib.DSD_E_CORRUPT: CorruptError,
    lib.DSD_E_EXISTS: ExistsError,
    lib.DSD_E_COMM: CommError,
    lib.DSD_E_TIMEOUT: TimeoutError,
    lib.DSD_E_NO_SPACE: NoSpaceError,
    lib.DSD_E_UNSUPPORTED: UnsupportedError,
    lib.DSD_E_OUT_OF_MEMORY: OutOfMemoryError,
    lib.DSD_E_INTERNAL: InternalError,
    lib.DSD_E_BUFFER_TOO_SMALL: BufferTooSmallError,
    lib.DSD_E_ABI_MISMATCH: AbiMismatchError,
    lib.DSD_E_STATE: StateError,
    lib.DSD_E_CALLBACK: CallbackError,
    lib.DSD_E_READ_ONLY: ReadOnlyError,
}

ERROR_CLASSES: tuple[type[Error], ...] = (Error, HandleError, *BY_CODE.values())


def error_for(code: int, message: str, context: str = "") -> Error:
    """The exception for a failing status: the subclass its code maps to, else Error."""
    return BY_CODE.get(code, Error)(code, message, context)


def closed(what: str) -> StaleHandleError:
    """The error for a dsd object used after close()."""
    return StaleHandleError(lib.DSD_E_STALE_HANDLE, f"the {what} is closed")
