package dsd

// The model registry (dsd_model): what a trainer's module tree holds, under raw names.

/*
#include <stdlib.h>
#include <dsd/dsd.h>
*/
import "C"

import (
	"context"
	"io"
	"runtime"
	"unsafe"
)

var _ io.Closer = (*Model)(nil)

// WrapperKind is a wrapper module's kind (dsd_wrapper_kind).
type WrapperKind int32

// The wrapper kinds.
const (
	WrapperDDP        WrapperKind = C.DSD_WRAPPER_DDP
	WrapperFSDP       WrapperKind = C.DSD_WRAPPER_FSDP
	WrapperCompile    WrapperKind = C.DSD_WRAPPER_COMPILE
	WrapperCheckpoint WrapperKind = C.DSD_WRAPPER_CHECKPOINT
)

// Model is a registered model (dsd_model): parameters, buffers and extra state under the
// raw names of the trainer's module tree, in state-dict order.
type Model struct {
	ptr  *C.dsd_model
	comm *Comm // whose turns the state-dict functions take (see Comm)
}

func modelPtr(m *Model) *C.dsd_model {
	if m == nil {
		return nil
	}
	return m.ptr
}

// NewModel is a new empty model over comm (nil: a single process); className ("" for the
// default "Model") names it in load errors (dsd_model_new).
func NewModel(comm *Comm, className string) (*Model, error) {
	var cname *C.char
	if className != "" {
		cname = C.CString(className)
		defer C.free(unsafe.Pointer(cname))
	}
	var out *C.dsd_model
	var e *C.dsd_error
	err := wrap(C.dsd_model_new(commPtr(comm), cname, &out, &e), e)
	runtime.KeepAlive(comm)
	if err != nil {
		return nil, err
	}
	m := &Model{ptr: out, comm: comm}
	runtime.SetFinalizer(m, (*Model).Close)
	return m, nil
}

// Close frees the model (dsd_model_free). Idempotent; the error is always nil.
func (m *Model) Close() error {
	if m == nil || m.ptr == nil {
		return nil
	}
	C.dsd_model_free(m.ptr)
	m.ptr = nil
	runtime.SetFinalizer(m, nil)
	return nil
}

// turn waits for the turn of the model's communicator, for a state-dict function, whose
// collectives go over it; pair with release.
func (m *Model) turn() *Comm {
	var c *Comm
	if m != nil {
		c = m.comm
	}
	c.acquire(context.Background())
	return c
}

func (m *Model) call(strs []string, f func(p *C.dsd_model, s []*C.char, e **C.dsd_error) C.dsd_status) error {
	var cs cstrings
	defer cs.free()
	args := make([]*C.char, len(strs))
	for i, s := range strs {
		args[i] = cs.add(s)
	}
	var e *C.dsd_error
	err := wrap(f(modelPtr(m), args, &e), e)
	runtime.KeepAlive(m)
	return err
}

// AddParameter registers a parameter under its raw name; the model keeps its own reference
// to t (dsd_model_add_parameter).
func (m *Model) AddParameter(name string, t Tensor, requiresGrad bool) error {
	return m.call([]string{name}, func(p *C.dsd_model, s []*C.char, e **C.dsd_error) C.dsd_status {
		return C.dsd_model_add_parameter(p, s[0], t.c(), C.bool(requiresGrad), e)
	})
}

// AddBuffer registers a persistent or non-persistent buffer (dsd_model_add_buffer).
func (m *Model) AddBuffer(name string, t Tensor, persistent bool) error {
	return m.call([]string{name}, func(p *C.dsd_model, s []*C.char, e **C.dsd_error) C.dsd_status {
		return C.dsd_model_add_buffer(p, s[0], t.c(), C.bool(persistent), e)
	})
}

// AddExtraState registers "<module path>._extra_state" as the value at position index of
// holder (containers are shared) (dsd_model_add_extra_state).
func (m *Model) AddExtraState(name string, holder *StateDict, index int) error {
	err := m.call([]string{name}, func(p *C.dsd_model, s []*C.char, e **C.dsd_error) C.dsd_status {
		return C.dsd_model_add_extra_state(p, s[0], sdPtr(holder), C.size_t(index), e)
	})
	runtime.KeepAlive(holder)
	return err
}

// AddExtraStateBytes registers extra state as raw bytes, copied
// (dsd_model_add_extra_state_bytes).
func (m *Model) AddExtraStateBytes(name string, data []byte) error {
	return m.call([]string{name}, func(p *C.dsd_model, s []*C.char, e **C.dsd_error) C.dsd_status {
		var d unsafe.Pointer
		if len(data) > 0 {
			d = unsafe.Pointer(&data[0])
		}
		return C.dsd_model_add_extra_state_bytes(p, s[0], d, C.size_t(len(data)), e)
	})
}

// DeclareWrapper declares a wrapper module at a raw module path ("" for the root)
// (dsd_model_declare_wrapper).
func (m *Model) DeclareWrapper(modulePath string, kind WrapperKind) error {
	return m.call([]string{modulePath}, func(p *C.dsd_model, s []*C.char, e **C.dsd_error) C.dsd_status {
		return C.dsd_model_declare_wrapper(p, s[0], C.dsd_wrapper_kind(kind), e)
	})
}

// AddFQNModifier declares PyTorch's _fqn_modifiers: the module at modulePath maps
// state-dict segment `segment` to its child attribute `child` (dsd_model_add_fqn_modifier).
func (m *Model) AddFQNModifier(modulePath, segment, child string) error {
	return m.call([]string{modulePath, segment, child}, func(p *C.dsd_model, s []*C.char, e **C.dsd_error) C.dsd_status {
		return C.dsd_model_add_fqn_modifier(p, s[0], s[1], s[2], e)
	})
}

// CanonicalFQN is the canonical FQN of a raw name under the model's declarations
// (dsd_model_canonical_fqn; the string, borrowed from the model, is copied).
func (m *Model) CanonicalFQN(rawName string) (string, error) {
	var out *C.char
	var e *C.dsd_error
	if err := wrap(C.dsd_model_canonical_fqn(modelPtr(m), cstr(rawName), &out, &e), e); err != nil {
		runtime.KeepAlive(m)
		return "", err
	}
	s := C.GoString(out)
	runtime.KeepAlive(m)
	return s, nil
}

// Entries is a new dict of every registered entry by raw name with its current value
// (dsd_model_entries).
func (m *Model) Entries() (*StateDict, error) {
	var out *C.dsd_state_dict
	var e *C.dsd_error
	err := wrap(C.dsd_model_entries(modelPtr(m), &out, &e), e)
	runtime.KeepAlive(m)
	if err != nil {
		return nil, err
	}
	return newStateDict(out), nil
}
