package dsd

// The convenience layer: nothing here is in the C header; everything is built from the
// one-to-one functions of the other files (and, for HostBuffer, a few lines of C in
// bridge.c).

/*
#include <dsd/dsd.h>
#include "bridge.h"
*/
import "C"

import (
	"fmt"
	"io"
	"sync"
	"unsafe"
)

var _ io.Closer = (*HostBuffer)(nil)

// HostBuffer is zeroed, 64-byte aligned C memory for tensors a Go trainer owns. Go code
// reads and writes it through slices (Float32s, Float64s, Int64s, Bytes); dsd refers to it
// through tensors made by Wrap. The memory is reference-counted between the HostBuffer and
// those tensors: it is freed when Close has been called and dsd has let go of every tensor
// over it, in either order.
//
// HostBuffer has no finalizer, on purpose: slices over its memory are invisible to the
// garbage collector, so a finalizer could free memory a live slice still points to. Call
// Close when done; keep the *HostBuffer reachable (next to its slices) until then.
type HostBuffer struct {
	mu     sync.Mutex
	buf    *C.dsdgo_buffer
	nbytes int
}

// NewHostBuffer allocates nbytes of zeroed C memory.
func NewHostBuffer(nbytes int) (*HostBuffer, error) {
	if nbytes < 0 {
		return nil, newGoError(ErrInvalidArgument, fmt.Sprintf("a host buffer of %d bytes was asked for.", nbytes))
	}
	b := C.dsdgo_buffer_new(C.size_t(nbytes))
	if b == nil {
		return nil, newGoError(ErrOutOfMemory, fmt.Sprintf("could not allocate a host buffer of %d bytes.", nbytes))
	}
	return &HostBuffer{buf: b, nbytes: nbytes}, nil
}

// Len is the buffer's size in bytes.
func (h *HostBuffer) Len() int { return h.nbytes }

// Pointer is the address of the first byte; nil after Close.
func (h *HostBuffer) Pointer() unsafe.Pointer {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.buf == nil {
		return nil
	}
	return C.dsdgo_buffer_data(h.buf)
}

// Bytes views the buffer as bytes (nil after Close). The slice is valid until Close.
func (h *HostBuffer) Bytes() []byte {
	p := h.Pointer()
	if p == nil {
		return nil
	}
	return unsafe.Slice((*byte)(p), h.nbytes)
}

// Float32s views the buffer as float32s (nil after Close). The slice is valid until Close.
func (h *HostBuffer) Float32s() []float32 {
	p := h.Pointer()
	if p == nil {
		return nil
	}
	return unsafe.Slice((*float32)(p), h.nbytes/4)
}

// Float64s views the buffer as float64s (nil after Close). The slice is valid until Close.
func (h *HostBuffer) Float64s() []float64 {
	p := h.Pointer()
	if p == nil {
		return nil
	}
	return unsafe.Slice((*float64)(p), h.nbytes/8)
}

// Int64s views the buffer as int64s (nil after Close). The slice is valid until Close.
func (h *HostBuffer) Int64s() []int64 {
	p := h.Pointer()
	if p == nil {
		return nil
	}
	return unsafe.Slice((*int64)(p), h.nbytes/8)
}

// Wrap makes a contiguous CPU tensor of dtype and shape over the buffer from byte offset
// (a 0-dim tensor for an empty shape). The tensor keeps the memory alive; release the
// handle as any other.
func (h *HostBuffer) Wrap(offset int, dtype DType, shape []int64, readOnly bool) (Tensor, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.buf == nil {
		return Tensor{}, newGoError(ErrStaleHandle, "the host buffer was freed.")
	}
	numel := int64(1)
	for _, s := range shape {
		if s < 0 {
			return Tensor{}, newGoError(ErrInvalidArgument, fmt.Sprintf("shape %v has a negative size.", shape))
		}
		numel *= s
	}
	size := dtype.Size()
	if size == 0 {
		return Tensor{}, newGoError(ErrDTypeMismatch, fmt.Sprintf("unknown dtype code %d.", int32(dtype)))
	}
	if offset < 0 || offset%size != 0 || int64(offset)+numel*int64(size) > int64(h.nbytes) {
		return Tensor{}, newGoError(ErrShapeMismatch, fmt.Sprintf(
			"a %s tensor of shape %v at byte %d does not fit a host buffer of %d bytes (or is misaligned).",
			dtype, shape, offset, h.nbytes))
	}
	var out C.dsd_tensor
	var e *C.dsd_error
	st := C.dsdgo_buffer_wrap(h.buf, C.size_t(offset), C.dsd_dtype(dtype), i64ptr(shape), C.size_t(len(shape)),
		C.bool(readOnly), &out, &e)
	return goTensor(out), wrap(st, e)
}

// Close drops the Go side's reference: the memory goes when dsd has let go of it too.
// Slices from the buffer must not be used afterwards. Idempotent; the error is always nil.
func (h *HostBuffer) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.buf != nil {
		C.dsdgo_buffer_unref(unsafe.Pointer(h.buf))
		h.buf = nil
	}
	return nil
}

// Free is Close without its result.
//
// Deprecated: use Close.
func (h *HostBuffer) Free() { h.Close() }

// FromFloat32s copies data into new C memory owned by the returned tensor of the given
// shape (nil: 1-d of len(data)); the memory is freed when dsd lets go of it.
func FromFloat32s(data []float32, shape []int64) (Tensor, error) {
	if shape == nil {
		shape = []int64{int64(len(data))}
	}
	buf, err := NewHostBuffer(4 * len(data))
	if err != nil {
		return Tensor{}, err
	}
	defer buf.Close()
	copy(buf.Float32s(), data)
	return buf.Wrap(0, DTypeF32, shape, false)
}

// Float32View is a slice aliasing a contiguous float32 CPU tensor's memory. It is valid
// only while dsd refers to the tensor (the handle t, or a state dict or model holding it):
// copy it (Float32s) if it must outlive them.
func Float32View(t Tensor) ([]float32, error) {
	info, err := t.Info()
	if err != nil {
		return nil, err
	}
	if info.DType != DTypeF32 {
		return nil, newGoError(ErrDTypeMismatch, fmt.Sprintf("the tensor is %s, not float32.", info.DType))
	}
	if info.Device.Type != DeviceCPU || !info.Contiguous {
		return nil, newGoError(ErrDevice, "the tensor is not a contiguous CPU tensor.")
	}
	if info.Numel == 0 {
		return []float32{}, nil
	}
	return unsafe.Slice((*float32)(info.Data), int(info.Numel)), nil
}

// Float32s copies a contiguous float32 CPU tensor's elements into a new Go slice.
func Float32s(t Tensor) ([]float32, error) {
	v, err := Float32View(t)
	if err != nil {
		return nil, err
	}
	return append([]float32(nil), v...), nil
}

// Value reads the value at index whatever its kind, as nil, bool, int64, float64, string,
// []byte, Tensor (a new handle: release it) or *StateDict (a new reference: close it).
func (sd *StateDict) Value(index int) (any, error) {
	kind, err := sd.Kind(index)
	if err != nil {
		return nil, err
	}
	switch kind {
	case KindNone:
		return nil, nil
	case KindBool:
		return sd.GetBool(index)
	case KindInt:
		return sd.GetInt(index)
	case KindDouble:
		return sd.GetDouble(index)
	case KindString:
		return sd.GetString(index)
	case KindBytes:
		return sd.GetBytes(index)
	case KindTensor:
		return sd.GetTensor(index)
	default:
		return sd.GetChild(index)
	}
}

// Get reads the value under a dict key, as Value does.
func (sd *StateDict) Get(key string) (any, error) {
	i, err := sd.Find(key)
	if err != nil {
		return nil, err
	}
	return sd.Value(i)
}

// Keys are a dict's keys in order.
func (sd *StateDict) Keys() ([]string, error) {
	n, err := sd.Size()
	if err != nil {
		return nil, err
	}
	keys := make([]string, n)
	for i := range keys {
		if keys[i], err = sd.Key(i); err != nil {
			return nil, err
		}
	}
	return keys, nil
}

// Keys are the keys of one list, in order.
func (k *IncompatibleKeys) Keys(list KeyList) ([]string, error) {
	n, err := k.Count(list)
	if err != nil {
		return nil, err
	}
	keys := make([]string, n)
	for i := range keys {
		if keys[i], err = k.Key(list, i); err != nil {
			return nil, err
		}
	}
	return keys, nil
}

// Lists are the missing and unexpected keys as slices.
func (k *IncompatibleKeys) Lists() (missing, unexpected []string, err error) {
	if missing, err = k.Keys(KeysMissing); err != nil {
		return nil, nil, err
	}
	if unexpected, err = k.Keys(KeysUnexpected); err != nil {
		return nil, nil, err
	}
	return missing, unexpected, nil
}
