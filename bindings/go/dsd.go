// Package dsd is the Go binding of dsd, distributed state dicts and checkpoints with the
// semantics of PyTorch's torch.distributed.checkpoint, over the C ABI of <dsd/dsd.h>.
//
// The binding follows the header one to one: each C function is one Go function or method
// (dsd_state_dict_get_int is (*StateDict).GetInt, dsd_get_model_state_dict is
// GetModelStateDict), and the header's doc comments are the contract. What the header does
// not have (HostBuffer, FromFloat32s, Float32s, the Value/Get readers) lives in
// convenience.go and is built only from the functions here.
//
// # Building
//
// cgo needs the header and the library; the package itself only asks for -ldsd:
//
//	CGO_CFLAGS="-I<dsd>/capi/include" \
//	CGO_LDFLAGS="-L<build>/capi -Wl,-rpath,<build>/capi" go test .
//
// tests/go/meson.build does exactly this (offline, caches inside the build directory).
//
// # Errors
//
// A failing call returns an *Error carrying the status code, its short name, the message
// and the context (key or file). Status implements error too, so
// errors.Is(err, dsd.ErrNotFound) tests the code.
//
// # Lifetimes
//
// Root objects (*StateDict, *Model, *Optim, *Comm, *Mesh, *Future, *IncompatibleKeys
// (alias *LoadReport), *AsyncCheckpointer, *CheckpointManager, and the Go-side *HostBuffer)
// have a Close() error method, so they are io.Closers, idempotent, and a finalizer that closes them if they are dropped unclosed; a method
// called after Close fails with ErrInvalidArgument (the C function sees NULL). Close is
// the C _release of the reference-counted roots (state dicts, communicators, meshes: each
// Go object holds one reference) and the C _free of the others. Tensor and Layout are value handles, as
// in C: copy them freely and release each one you were given exactly once; a released or
// zero handle is an error (ErrStaleHandle), never undefined behaviour. They have no
// finalizer, since a finalizer on a copyable value would release the handle while copies
// are still in use.
//
// # Contexts
//
// The blocking calls have a context.Context form: SaveContext, LoadContext,
// Future.WaitContext, Comm.BarrierContext. A call given an ended context starts nothing and
// returns ctx.Err(). Work inside C cannot be interrupted, so a context that ends while a
// call runs abandons the wait where that is safe (Future.WaitContext, SaveContext after its
// staging copy, BarrierContext), returning ctx.Err() at once while the work goes on in the
// background, and is only checked before starting where it is not (LoadContext, which
// writes into the caller's tensors). Each function's comment says which.
//
// # Memory lent to dsd
//
// cgo forbids C from keeping a pointer to Go memory after a call returns, and Go 1.19 has
// no way to pin Go memory. So tensors never wrap Go-allocated slices: TensorFromBlob takes
// an unsafe.Pointer that must be C (or otherwise non-Go) memory, and HostBuffer allocates
// zeroed C memory, reference-counted between Go and dsd, that Go code reads and writes
// through slices (HostBuffer.Float32s). FromFloat32s copies a Go slice into such memory.
//
// # Threads
//
// Functions may be called from any goroutine. A callback (the materialize function, a
// TensorFromBlob release function) runs on whatever thread dsd calls it from, as the
// header states. dsd's per-thread last error (LastErrorMessage) is unreliable in Go, since
// goroutines move between threads; the returned error always carries the message.
package dsd

/*
#cgo LDFLAGS: -ldsd
#include <stdlib.h>
#include <dsd/dsd.h>
*/
import "C"

import (
	"fmt"
)

// The ABI version this binding was written against (DSD_ABI_VERSION_MAJOR/MINOR).
const (
	ABIVersionMajor = C.DSD_ABI_VERSION_MAJOR
	ABIVersionMinor = C.DSD_ABI_VERSION_MINOR
)

func init() {
	if err := checkABI(ABIVersion()); err != nil {
		panic(err)
	}
}

// checkABI refuses a library of another major version than the header's.
func checkABI(lib uint32) error {
	if lib>>16 != ABIVersionMajor {
		return newGoError(ErrABIMismatch, fmt.Sprintf(
			"the loaded libdsd has ABI version %d.%d, but this Go binding was written for major version %d",
			lib>>16, lib&0xffff, ABIVersionMajor))
	}
	return nil
}

// ABIVersion is (major << 16) | minor of the loaded library (dsd_abi_version).
func ABIVersion() uint32 { return uint32(C.dsd_abi_version()) }

// VersionString is the library's semantic version, e.g. "0.3.0" (dsd_version_string).
func VersionString() string { return C.GoString(C.dsd_version_string()) }
