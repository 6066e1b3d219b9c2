package dsd

/*
#include <dsd/dsd.h>
#include "bridge.h"
*/
import "C"

import (
	"runtime/cgo"
	"unsafe"
)

// Tensor is a dsd_tensor: a value handle naming a tensor dsd refers to without copying it.
// Copy it freely; release each handle returned to you exactly once with Release. The zero
// Tensor is never valid. State dicts, models and optimizers keep their own references.
type Tensor struct {
	bits uint64
}

// Bits is the handle's raw value (slot, generation and kind), e.g. for logging.
func (t Tensor) Bits() uint64 { return t.bits }

func (t Tensor) c() C.dsd_tensor { return C.dsd_tensor{bits: C.uint64_t(t.bits)} }

func goTensor(t C.dsd_tensor) Tensor { return Tensor{bits: uint64(t.bits)} }

// tensorsPtr views a []Tensor as the C array it is laid out as (one uint64 each).
func tensorsPtr(ts []Tensor) *C.dsd_tensor {
	if len(ts) == 0 {
		return nil
	}
	return (*C.dsd_tensor)(unsafe.Pointer(&ts[0]))
}

// TensorFromDLPack imports a DLPack v0 tensor (a *DLManagedTensor), taking ownership of
// it in every case: on failure its deleter has already been called
// (dsd_tensor_from_dlpack).
func TensorFromDLPack(src unsafe.Pointer) (Tensor, error) {
	var out C.dsd_tensor
	var e *C.dsd_error
	st := C.dsd_tensor_from_dlpack((*C.struct_DLManagedTensor)(src), &out, &e)
	return goTensor(out), wrap(st, e)
}

// TensorFromDLPackVersioned imports a DLPack v1 tensor (a *DLManagedTensorVersioned), as
// TensorFromDLPack (dsd_tensor_from_dlpack_versioned).
func TensorFromDLPackVersioned(src unsafe.Pointer) (Tensor, error) {
	var out C.dsd_tensor
	var e *C.dsd_error
	st := C.dsd_tensor_from_dlpack_versioned((*C.struct_DLManagedTensorVersioned)(src), &out, &e)
	return goTensor(out), wrap(st, e)
}

// TensorFromBlob wraps memory the caller owns (dsd_tensor_from_blob): shape, strides in
// elements (nil: contiguous row-major), dtype, device. data must not be Go memory: cgo
// forbids C from keeping Go pointers, and Go 1.19 cannot pin them. Use C memory (C.malloc,
// HostBuffer, CUDA memory). release (may be nil) is called once when dsd lets go of the
// memory, also if this call fails, on whatever thread drops the last reference; it must not
// panic. Without release the caller keeps the memory alive while dsd refers to it.
func TensorFromBlob(data unsafe.Pointer, dtype DType, shape, strides []int64, device Device,
	readOnly bool, release func()) (Tensor, error) {
	var h C.uintptr_t
	if release != nil {
		h = C.uintptr_t(cgo.NewHandle(release))
	}
	var stridesPtr *C.int64_t
	if strides != nil {
		if len(strides) != len(shape) {
			if release != nil {
				cgo.Handle(h).Delete()
				release()
			}
			return Tensor{}, newGoError(ErrInvalidArgument,
				"strides has "+itoa(int64(len(strides)))+" entries for a shape of "+itoa(int64(len(shape)))+" dimensions.")
		}
		stridesPtr = i64ptr(strides)
	}
	var out C.dsd_tensor
	var e *C.dsd_error
	st := C.dsdgo_tensor_from_blob(data, C.dsd_dtype(dtype), i64ptr(shape), C.size_t(len(shape)), stridesPtr,
		device.c(), C.bool(readOnly), h, &out, &e)
	return goTensor(out), wrap(st, e)
}

//export dsdgoRelease
func dsdgoRelease(h C.uintptr_t) {
	handle := cgo.Handle(h)
	release := handle.Value().(func())
	handle.Delete()
	release()
}

// ToDLPack exports the tensor as a DLPack v0 *DLManagedTensor without copying; the caller
// calls its deleter (DLPackFree) when done (dsd_tensor_to_dlpack).
func (t Tensor) ToDLPack() (unsafe.Pointer, error) {
	var out *C.struct_DLManagedTensor
	var e *C.dsd_error
	st := C.dsd_tensor_to_dlpack(t.c(), &out, &e)
	return unsafe.Pointer(out), wrap(st, e)
}

// ToDLPackVersioned exports the tensor as a DLPack v1 *DLManagedTensorVersioned, carrying
// the read-only flag (dsd_tensor_to_dlpack_versioned).
func (t Tensor) ToDLPackVersioned() (unsafe.Pointer, error) {
	var out *C.struct_DLManagedTensorVersioned
	var e *C.dsd_error
	st := C.dsd_tensor_to_dlpack_versioned(t.c(), &out, &e)
	return unsafe.Pointer(out), wrap(st, e)
}

// DLPackFree calls a DLPack v0 tensor's deleter; nil is a no-op (dsd_dlpack_free).
func DLPackFree(p unsafe.Pointer) { C.dsd_dlpack_free((*C.struct_DLManagedTensor)(p)) }

// DLPackVersionedFree calls a DLPack v1 tensor's deleter; nil is a no-op
// (dsd_dlpack_versioned_free).
func DLPackVersionedFree(p unsafe.Pointer) {
	C.dsd_dlpack_versioned_free((*C.struct_DLManagedTensorVersioned)(p))
}

// Release releases the handle (dsd_tensor_release). The tensor lives on while a state
// dict, model or DLPack export refers to it. ErrStaleHandle for a released or zero handle,
// ErrWrongKind for a handle that is not a tensor's.
func (t Tensor) Release() error {
	var e *C.dsd_error
	return wrap(C.dsd_tensor_release(t.c(), &e), e)
}

// Retain gives a new handle to the same tensor, released separately (dsd_tensor_retain).
func (t Tensor) Retain() (Tensor, error) {
	var out C.dsd_tensor
	var e *C.dsd_error
	st := C.dsd_tensor_retain(t.c(), &out, &e)
	return goTensor(out), wrap(st, e)
}

// TensorInfo describes a tensor (dsd_tensor_info).
type TensorInfo struct {
	DType      DType
	NDim       int
	Device     Device
	Data       unsafe.Pointer // the first element (nil for an empty tensor); not Go memory
	Numel      int64
	NBytes     int
	ReadOnly   bool
	Contiguous bool
}

// Info describes the tensor (dsd_tensor_info_get).
func (t Tensor) Info() (TensorInfo, error) {
	var out C.dsd_tensor_info
	var e *C.dsd_error
	if err := wrap(C.dsd_tensor_info_get(t.c(), &out, &e), e); err != nil {
		return TensorInfo{}, err
	}
	return TensorInfo{
		DType:      DType(out.dtype),
		NDim:       int(out.ndim),
		Device:     goDevice(out.device),
		Data:       out.data,
		Numel:      int64(out.numel),
		NBytes:     int(out.nbytes),
		ReadOnly:   bool(out.read_only),
		Contiguous: bool(out.contiguous),
	}, nil
}

// Shape is the tensor's shape (dsd_tensor_shape).
func (t Tensor) Shape() ([]int64, error) { return t.dims(false) }

// Strides are the tensor's strides in elements (dsd_tensor_strides).
func (t Tensor) Strides() ([]int64, error) { return t.dims(true) }

func (t Tensor) dims(strides bool) ([]int64, error) {
	info, err := t.Info()
	if err != nil {
		return nil, err
	}
	out := make([]int64, info.NDim, info.NDim+1) // never empty storage: cgo needs an address
	p := (*C.int64_t)(unsafe.Pointer(&out[:1][0]))
	var e *C.dsd_error
	var st C.dsd_status
	if strides {
		st = C.dsd_tensor_strides(t.c(), p, C.size_t(info.NDim), &e)
	} else {
		st = C.dsd_tensor_shape(t.c(), p, C.size_t(info.NDim), &e)
	}
	if err := wrap(st, e); err != nil {
		return nil, err
	}
	return out, nil
}
