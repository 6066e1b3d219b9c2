package dsd

/*
#include <dsd/dsd.h>
*/
import "C"

import "errors"

// Status is a dsd_status code. The non-OK codes are errors themselves, so that
// errors.Is(err, dsd.ErrNotFound) tells the code of any error this package returns.
type Status int32

// The status codes (DSD_OK, DSD_E_*).
const (
	OK                 Status = C.DSD_OK
	ErrInvalidArgument Status = C.DSD_E_INVALID_ARGUMENT
	ErrStaleHandle     Status = C.DSD_E_STALE_HANDLE
	ErrWrongKind       Status = C.DSD_E_WRONG_KIND
	ErrNotFound        Status = C.DSD_E_NOT_FOUND
	ErrUnexpectedKey   Status = C.DSD_E_UNEXPECTED_KEY
	ErrDTypeMismatch   Status = C.DSD_E_DTYPE_MISMATCH
	ErrShapeMismatch   Status = C.DSD_E_SHAPE_MISMATCH
	ErrDevice          Status = C.DSD_E_DEVICE
	ErrIO              Status = C.DSD_E_IO
	ErrCorrupt         Status = C.DSD_E_CORRUPT
	ErrExists          Status = C.DSD_E_EXISTS
	ErrComm            Status = C.DSD_E_COMM
	ErrTimeout         Status = C.DSD_E_TIMEOUT
	ErrNoSpace         Status = C.DSD_E_NO_SPACE
	ErrUnsupported     Status = C.DSD_E_UNSUPPORTED
	ErrOutOfMemory     Status = C.DSD_E_OUT_OF_MEMORY
	ErrInternal        Status = C.DSD_E_INTERNAL
	ErrBufferTooSmall  Status = C.DSD_E_BUFFER_TOO_SMALL
	ErrABIMismatch     Status = C.DSD_E_ABI_MISMATCH
	ErrState           Status = C.DSD_E_STATE
	ErrCallback        Status = C.DSD_E_CALLBACK
	ErrReadOnly        Status = C.DSD_E_READ_ONLY
)

// Name is the short stable name of the code ("ok", "not_found", ...; "unknown" otherwise),
// as dsd_status_name gives it.
func (s Status) Name() string { return C.GoString(C.dsd_status_name(C.dsd_status(s))) }

// Error makes a Status usable as a sentinel error.
func (s Status) Error() string { return "dsd: " + s.Name() }

// Error is a failed dsd call: the C error object's code, message and context, copied into
// Go (the C object is freed at once).
type Error struct {
	Code    Status // the DSD_E_* code
	Name    string // Code's short name, e.g. "not_found"
	Message string // one sentence naming the key, tensor or file concerned
	Context string // the key or file the error is about, or ""
	// Cause is the error a Go callback returned (or the panic it raised) when Code is
	// ErrCallback, and nil otherwise.
	Cause error
}

func (e *Error) Error() string {
	s := "dsd: " + e.Name + ": " + e.Message
	if e.Cause != nil {
		s += ": " + e.Cause.Error()
	}
	return s
}

// Is reports whether target is the Status of e, so errors.Is(err, dsd.ErrNotFound) works.
func (e *Error) Is(target error) bool {
	s, ok := target.(Status)
	return ok && s == e.Code
}

// Unwrap gives the callback's own error, if any.
func (e *Error) Unwrap() error { return e.Cause }

// CodeOf is the status code of err: OK for nil, the code of a dsd error, ErrInternal for
// any other error.
func CodeOf(err error) Status {
	switch e := err.(type) {
	case nil:
		return OK
	case *Error:
		return e.Code
	case Status:
		return e
	}
	var de *Error
	if errors.As(err, &de) {
		return de.Code
	}
	var st Status
	if errors.As(err, &st) {
		return st
	}
	return ErrInternal
}

// LastErrorMessage is dsd_error_last_message: the message of the last error raised on the
// calling OS thread. Unreliable from Go (goroutines move between threads) unless the
// goroutine called runtime.LockOSThread; use the returned error instead.
func LastErrorMessage() string { return C.GoString(C.dsd_error_last_message()) }

// wrap turns a status and the error object it came with into a Go error, freeing the
// object. Every call into dsd goes through it, with e a fresh `var e *C.dsd_error` of that
// call alone: the ABI refuses a call whose *err is not NULL on entry (DSD_E_INVALID_ARGUMENT,
// doing nothing), so an error variable is never reused for a second call.
func wrap(st C.dsd_status, e *C.dsd_error) error {
	if st == C.DSD_OK {
		return nil
	}
	err := &Error{Code: Status(st)}
	if e != nil {
		err.Code = Status(C.dsd_error_code(e))
		err.Message = C.GoString(C.dsd_error_message(e))
		err.Context = C.GoString(C.dsd_error_context(e))
		C.dsd_error_free(e)
	}
	err.Name = err.Code.Name()
	return err
}

// newGoError is an error found on the Go side before calling into dsd (a bad argument the
// C ABI cannot express, such as a buffer that is too small for a view).
func newGoError(code Status, message string) *Error {
	return &Error{Code: code, Name: code.Name(), Message: message}
}
