package dsd

/*
#include <stdlib.h>
#include <dsd/dsd.h>
*/
import "C"

import (
	"io"
	"runtime"
	"unsafe"
)

var _ io.Closer = (*StateDict)(nil)

// StateDict is a reference to a dsd_state_dict container: an ordered dict with string keys,
// or a list (a tuple when made as one). Containers are shared by reference, as in Python:
// GetChild gives a new reference to the same nested container. Close drops this reference.
//
// On a dict the SetX methods write the entry `key` (replaced in place if present, else
// appended); on a list the AppendX methods append (the C functions with a NULL key).
// Readers go by position, in insertion order; Find gives the position of a dict key.
type StateDict struct {
	ptr *C.dsd_state_dict
}

func newStateDict(p *C.dsd_state_dict) *StateDict {
	if p == nil {
		return nil
	}
	sd := &StateDict{ptr: p}
	runtime.SetFinalizer(sd, (*StateDict).Close)
	return sd
}

// sdPtr is the C pointer of sd, NULL for a nil *StateDict.
func sdPtr(sd *StateDict) *C.dsd_state_dict {
	if sd == nil {
		return nil
	}
	return sd.ptr
}

// NewStateDict is a new empty dict (dsd_state_dict_new).
func NewStateDict() (*StateDict, error) {
	var out *C.dsd_state_dict
	var e *C.dsd_error
	if err := wrap(C.dsd_state_dict_new(&out, &e), e); err != nil {
		return nil, err
	}
	return newStateDict(out), nil
}

// NewStateDictList is a new empty list, a tuple if isTuple (dsd_state_dict_new_list).
func NewStateDictList(isTuple bool) (*StateDict, error) {
	var out *C.dsd_state_dict
	var e *C.dsd_error
	if err := wrap(C.dsd_state_dict_new_list(C.bool(isTuple), &out, &e), e); err != nil {
		return nil, err
	}
	return newStateDict(out), nil
}

// Close drops this reference (dsd_state_dict_release). Idempotent; nil is a no-op; the
// error is always nil.
func (sd *StateDict) Close() error {
	if sd == nil || sd.ptr == nil {
		return nil
	}
	C.dsd_state_dict_release(sd.ptr)
	sd.ptr = nil
	runtime.SetFinalizer(sd, nil)
	return nil
}

// ContainerKind is KindDict or KindList, and whether a list is a tuple
// (dsd_state_dict_container_kind).
func (sd *StateDict) ContainerKind() (kind Kind, isTuple bool, err error) {
	var k C.dsd_kind
	var t C.bool
	var e *C.dsd_error
	err = wrap(C.dsd_state_dict_container_kind(sdPtr(sd), &k, &t, &e), e)
	runtime.KeepAlive(sd)
	return Kind(k), bool(t), err
}

// IntKeys tells whether the dict's keys stand for integers (dsd_state_dict_int_keys).
func (sd *StateDict) IntKeys() (bool, error) {
	var out C.bool
	var e *C.dsd_error
	err := wrap(C.dsd_state_dict_int_keys(sdPtr(sd), &out, &e), e)
	runtime.KeepAlive(sd)
	return bool(out), err
}

// SetIntKeys marks the dict's keys as integers, as PyTorch's positional optimizer state
// (dsd_state_dict_set_int_keys). ErrInvalidArgument when a key is not a decimal int64.
func (sd *StateDict) SetIntKeys(intKeys bool) error {
	var e *C.dsd_error
	err := wrap(C.dsd_state_dict_set_int_keys(sdPtr(sd), C.bool(intKeys), &e), e)
	runtime.KeepAlive(sd)
	return err
}

// Size is the number of entries (dsd_state_dict_size).
func (sd *StateDict) Size() (int, error) {
	var out C.size_t
	var e *C.dsd_error
	err := wrap(C.dsd_state_dict_size(sdPtr(sd), &out, &e), e)
	runtime.KeepAlive(sd)
	return int(out), err
}

// Find is the position of key in a dict (dsd_state_dict_find). ErrNotFound if absent (the
// message names the key), ErrWrongKind on a list.
func (sd *StateDict) Find(key string) (int, error) {
	var out C.size_t
	var e *C.dsd_error
	err := wrap(C.dsd_state_dict_find(sdPtr(sd), cstr(key), &out, &e), e)
	runtime.KeepAlive(sd)
	return int(out), err
}

// Key is the key at a position of a dict (dsd_state_dict_key), copied.
func (sd *StateDict) Key(index int) (string, error) {
	var out *C.char
	var e *C.dsd_error
	if err := wrap(C.dsd_state_dict_key(sdPtr(sd), C.size_t(index), &out, &e), e); err != nil {
		return "", err
	}
	s := C.GoString(out)
	runtime.KeepAlive(sd)
	return s, nil
}

// Kind is the kind of the value at a position (dsd_state_dict_kind).
func (sd *StateDict) Kind(index int) (Kind, error) {
	var out C.dsd_kind
	var e *C.dsd_error
	err := wrap(C.dsd_state_dict_kind(sdPtr(sd), C.size_t(index), &out, &e), e)
	runtime.KeepAlive(sd)
	return Kind(out), err
}

// GetBool reads a bool (dsd_state_dict_get_bool). ErrWrongKind for another kind,
// ErrInvalidArgument for an index out of range; the same for every reader.
func (sd *StateDict) GetBool(index int) (bool, error) {
	var out C.bool
	var e *C.dsd_error
	err := wrap(C.dsd_state_dict_get_bool(sdPtr(sd), C.size_t(index), &out, &e), e)
	runtime.KeepAlive(sd)
	return bool(out), err
}

// GetInt reads an int64 (dsd_state_dict_get_int).
func (sd *StateDict) GetInt(index int) (int64, error) {
	var out C.int64_t
	var e *C.dsd_error
	err := wrap(C.dsd_state_dict_get_int(sdPtr(sd), C.size_t(index), &out, &e), e)
	runtime.KeepAlive(sd)
	return int64(out), err
}

// GetDouble reads a double; an int is not read as a double (dsd_state_dict_get_double).
func (sd *StateDict) GetDouble(index int) (float64, error) {
	var out C.double
	var e *C.dsd_error
	err := wrap(C.dsd_state_dict_get_double(sdPtr(sd), C.size_t(index), &out, &e), e)
	runtime.KeepAlive(sd)
	return float64(out), err
}

// GetString reads a string, copied (dsd_state_dict_get_string).
func (sd *StateDict) GetString(index int) (string, error) {
	var data *C.char
	var n C.size_t
	var e *C.dsd_error
	if err := wrap(C.dsd_state_dict_get_string(sdPtr(sd), C.size_t(index), &data, &n, &e), e); err != nil {
		return "", err
	}
	s := C.GoStringN(data, C.int(n))
	runtime.KeepAlive(sd)
	return s, nil
}

// GetBytes reads bytes, copied (dsd_state_dict_get_bytes).
func (sd *StateDict) GetBytes(index int) ([]byte, error) {
	var data unsafe.Pointer
	var n C.size_t
	var e *C.dsd_error
	if err := wrap(C.dsd_state_dict_get_bytes(sdPtr(sd), C.size_t(index), &data, &n, &e), e); err != nil {
		return nil, err
	}
	b := make([]byte, int(n))
	if n > 0 {
		copy(b, unsafe.Slice((*byte)(data), int(n)))
	}
	runtime.KeepAlive(sd)
	return b, nil
}

// GetTensor gives a new handle to a tensor value, which the caller releases
// (dsd_state_dict_get_tensor). For a distributed tensor it is this rank's local tensor.
func (sd *StateDict) GetTensor(index int) (Tensor, error) {
	var out C.dsd_tensor
	var e *C.dsd_error
	err := wrap(C.dsd_state_dict_get_tensor(sdPtr(sd), C.size_t(index), &out, &e), e)
	runtime.KeepAlive(sd)
	return goTensor(out), err
}

// GetChild gives a new reference to a nested container, which the caller closes
// (dsd_state_dict_get_child).
func (sd *StateDict) GetChild(index int) (*StateDict, error) {
	var out *C.dsd_state_dict
	var e *C.dsd_error
	err := wrap(C.dsd_state_dict_get_child(sdPtr(sd), C.size_t(index), &out, &e), e)
	runtime.KeepAlive(sd)
	if err != nil {
		return nil, err
	}
	return newStateDict(out), nil
}

// set runs one writer with key as a C string, or NULL when append is true.
func (sd *StateDict) set(key string, appendToList bool,
	call func(p *C.dsd_state_dict, key *C.char, e **C.dsd_error) C.dsd_status) error {
	var ckey *C.char
	if !appendToList {
		ckey = cstr(key)
	}
	var e *C.dsd_error
	err := wrap(call(sdPtr(sd), ckey, &e), e)
	runtime.KeepAlive(sd)
	return err
}

// SetNone writes None under key (dsd_state_dict_set_none).
func (sd *StateDict) SetNone(key string) error { return sd.setNone(key, false) }

// AppendNone appends None to a list (dsd_state_dict_set_none with a NULL key).
func (sd *StateDict) AppendNone() error { return sd.setNone("", true) }

func (sd *StateDict) setNone(key string, app bool) error {
	return sd.set(key, app, func(p *C.dsd_state_dict, k *C.char, e **C.dsd_error) C.dsd_status {
		return C.dsd_state_dict_set_none(p, k, e)
	})
}

// SetBool writes a bool (dsd_state_dict_set_bool).
func (sd *StateDict) SetBool(key string, v bool) error { return sd.setBool(key, false, v) }

// AppendBool appends a bool to a list.
func (sd *StateDict) AppendBool(v bool) error { return sd.setBool("", true, v) }

func (sd *StateDict) setBool(key string, app bool, v bool) error {
	return sd.set(key, app, func(p *C.dsd_state_dict, k *C.char, e **C.dsd_error) C.dsd_status {
		return C.dsd_state_dict_set_bool(p, k, C.bool(v), e)
	})
}

// SetInt writes an int64 (dsd_state_dict_set_int).
func (sd *StateDict) SetInt(key string, v int64) error { return sd.setInt(key, false, v) }

// AppendInt appends an int64 to a list.
func (sd *StateDict) AppendInt(v int64) error { return sd.setInt("", true, v) }

func (sd *StateDict) setInt(key string, app bool, v int64) error {
	return sd.set(key, app, func(p *C.dsd_state_dict, k *C.char, e **C.dsd_error) C.dsd_status {
		return C.dsd_state_dict_set_int(p, k, C.int64_t(v), e)
	})
}

// SetDouble writes a double (dsd_state_dict_set_double).
func (sd *StateDict) SetDouble(key string, v float64) error { return sd.setDouble(key, false, v) }

// AppendDouble appends a double to a list.
func (sd *StateDict) AppendDouble(v float64) error { return sd.setDouble("", true, v) }

func (sd *StateDict) setDouble(key string, app bool, v float64) error {
	return sd.set(key, app, func(p *C.dsd_state_dict, k *C.char, e **C.dsd_error) C.dsd_status {
		return C.dsd_state_dict_set_double(p, k, C.double(v), e)
	})
}

// SetString writes a string, copied (dsd_state_dict_set_string).
func (sd *StateDict) SetString(key string, v string) error { return sd.setString(key, false, v) }

// AppendString appends a string to a list.
func (sd *StateDict) AppendString(v string) error { return sd.setString("", true, v) }

func (sd *StateDict) setString(key string, app bool, v string) error {
	cv := cstr(v) // copied by the C function
	return sd.set(key, app, func(p *C.dsd_state_dict, k *C.char, e **C.dsd_error) C.dsd_status {
		return C.dsd_state_dict_set_string(p, k, cv, C.size_t(len(v)), e)
	})
}

// SetBytes writes bytes, copied (dsd_state_dict_set_bytes).
func (sd *StateDict) SetBytes(key string, v []byte) error { return sd.setBytes(key, false, v) }

// AppendBytes appends bytes to a list.
func (sd *StateDict) AppendBytes(v []byte) error { return sd.setBytes("", true, v) }

func (sd *StateDict) setBytes(key string, app bool, v []byte) error {
	return sd.set(key, app, func(p *C.dsd_state_dict, k *C.char, e **C.dsd_error) C.dsd_status {
		var data unsafe.Pointer
		if len(v) > 0 {
			data = unsafe.Pointer(&v[0]) // copied during the call
		}
		return C.dsd_state_dict_set_bytes(p, k, data, C.size_t(len(v)), e)
	})
}

// SetTensor stores a tensor; the state dict keeps its own reference, the caller still
// releases t (dsd_state_dict_set_tensor).
func (sd *StateDict) SetTensor(key string, t Tensor) error { return sd.setTensor(key, false, t) }

// AppendTensor appends a tensor to a list.
func (sd *StateDict) AppendTensor(t Tensor) error { return sd.setTensor("", true, t) }

func (sd *StateDict) setTensor(key string, app bool, t Tensor) error {
	return sd.set(key, app, func(p *C.dsd_state_dict, k *C.char, e **C.dsd_error) C.dsd_status {
		return C.dsd_state_dict_set_tensor(p, k, t.c(), e)
	})
}

// SetChild stores a reference to child; the caller still closes its own
// (dsd_state_dict_set_child). A container cannot be stored inside itself.
func (sd *StateDict) SetChild(key string, child *StateDict) error {
	return sd.setChild(key, false, child)
}

// AppendChild appends a reference to child to a list.
func (sd *StateDict) AppendChild(child *StateDict) error { return sd.setChild("", true, child) }

func (sd *StateDict) setChild(key string, app bool, child *StateDict) error {
	err := sd.set(key, app, func(p *C.dsd_state_dict, k *C.char, e **C.dsd_error) C.dsd_status {
		return C.dsd_state_dict_set_child(p, k, sdPtr(child), e)
	})
	runtime.KeepAlive(child)
	return err
}

// SetDistTensor stores this rank's local tensor with its layout; the state dict keeps its
// own references, the caller still releases both (dsd_state_dict_set_dist_tensor).
// ErrShapeMismatch when local's shape is not the layout's local chunk.
func (sd *StateDict) SetDistTensor(key string, local Tensor, layout Layout) error {
	return sd.setDistTensor(key, false, local, layout)
}

// AppendDistTensor appends a distributed tensor to a list.
func (sd *StateDict) AppendDistTensor(local Tensor, layout Layout) error {
	return sd.setDistTensor("", true, local, layout)
}

func (sd *StateDict) setDistTensor(key string, app bool, local Tensor, layout Layout) error {
	return sd.set(key, app, func(p *C.dsd_state_dict, k *C.char, e **C.dsd_error) C.dsd_status {
		return C.dsd_state_dict_set_dist_tensor(p, k, local.c(), layout.c(), e)
	})
}

// GetLayout gives a new handle to the layout of the distributed tensor at index, which the
// caller releases (dsd_state_dict_get_layout). ErrWrongKind for a plain tensor or a
// non-tensor.
func (sd *StateDict) GetLayout(index int) (Layout, error) {
	var out C.dsd_layout
	var e *C.dsd_error
	err := wrap(C.dsd_state_dict_get_layout(sdPtr(sd), C.size_t(index), &out, &e), e)
	runtime.KeepAlive(sd)
	return goLayout(out), err
}

// IsDistTensor tells whether the value at index is a distributed tensor
// (dsd_state_dict_is_dist_tensor).
func (sd *StateDict) IsDistTensor(index int) (bool, error) {
	var out C.bool
	var e *C.dsd_error
	err := wrap(C.dsd_state_dict_is_dist_tensor(sdPtr(sd), C.size_t(index), &out, &e), e)
	runtime.KeepAlive(sd)
	return bool(out), err
}

// Remove removes the entry at a position (dsd_state_dict_remove).
func (sd *StateDict) Remove(index int) error {
	var e *C.dsd_error
	err := wrap(C.dsd_state_dict_remove(sdPtr(sd), C.size_t(index), &e), e)
	runtime.KeepAlive(sd)
	return err
}

// Flatten flattens nested containers to dot-joined keys as PyTorch DCP does: a new dict of
// leaves, and a new dict from each flat key to its path (dsd_state_dict_flatten).
func (sd *StateDict) Flatten() (flat, mapping *StateDict, err error) {
	var f, m *C.dsd_state_dict
	var e *C.dsd_error
	err = wrap(C.dsd_state_dict_flatten(sdPtr(sd), &f, &m, &e), e)
	runtime.KeepAlive(sd)
	if err != nil {
		return nil, nil, err
	}
	return newStateDict(f), newStateDict(m), nil
}

// Unflatten nests flat along the paths in mapping, the inverse of Flatten
// (dsd_state_dict_unflatten).
func Unflatten(flat, mapping *StateDict) (*StateDict, error) {
	var out *C.dsd_state_dict
	var e *C.dsd_error
	err := wrap(C.dsd_state_dict_unflatten(sdPtr(flat), sdPtr(mapping), &out, &e), e)
	runtime.KeepAlive(flat)
	runtime.KeepAlive(mapping)
	if err != nil {
		return nil, err
	}
	return newStateDict(out), nil
}

// StateDictEqual tells whether two trees are equal (same keys in the same order, equal
// scalars, tensors of equal dtype, shape and bytes) and, when they are not, describes the
// first difference (dsd_state_dict_equal; the description, borrowed from a, is copied).
func StateDictEqual(a, b *StateDict) (equal bool, why string, err error) {
	var out C.bool
	var cwhy *C.char
	var e *C.dsd_error
	err = wrap(C.dsd_state_dict_equal(sdPtr(a), sdPtr(b), &out, &cwhy, &e), e)
	if err == nil && !bool(out) && cwhy != nil {
		why = C.GoString(cwhy)
	}
	runtime.KeepAlive(a)
	runtime.KeepAlive(b)
	if err != nil {
		return false, "", err
	}
	return bool(out), why, nil
}
