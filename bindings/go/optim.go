package dsd

// The optimizer registry (dsd_optim): param groups, per-parameter state, and the
// materialize callback that creates missing state.

/*
#include <stdlib.h>
#include <dsd/dsd.h>
#include "bridge.h"
*/
import "C"

import (
	"fmt"
	"io"
	"runtime"
	"runtime/cgo"
	"sync"
	"unsafe"
)

var _ io.Closer = (*Optim)(nil)

// MaterializeFunc creates the optimizer state of parameters that have none yet, leaving no
// numerical trace (no step), by calling optim.SetParamState for each. It gets the handles
// of those parameters (valid during the call only; do not release them) and their
// positions across the optimizer's groups (PyTorch's parameter ids). It runs on the
// goroutine that called the get/set. An error (or a panic) fails that get/set with
// ErrCallback, whose Cause is the error.
type MaterializeFunc func(optim *Optim, params []Tensor, pids []int) error

// materializer is what the C callback's user data (a cgo.Handle) refers to.
type materializer struct {
	fn  MaterializeFunc
	mu  sync.Mutex
	err error // the last failure of fn, until a get/set picks it up
}

// Optim is a registered optimizer (dsd_optim): param groups and per-parameter state.
type Optim struct {
	ptr      *C.dsd_optim
	borrowed bool // handed to a materialize callback: Close does nothing
	handle   cgo.Handle
	mat      *materializer
}

func optimPtr(o *Optim) *C.dsd_optim {
	if o == nil {
		return nil
	}
	return o.ptr
}

// NewOptim is a new empty optimizer registry (dsd_optim_new).
func NewOptim() (*Optim, error) {
	var out *C.dsd_optim
	var e *C.dsd_error
	if err := wrap(C.dsd_optim_new(&out, &e), e); err != nil {
		return nil, err
	}
	o := &Optim{ptr: out}
	runtime.SetFinalizer(o, (*Optim).Close)
	return o, nil
}

// Close frees the optimizer and forgets its materialize function (dsd_optim_free).
// Idempotent; the error is always nil, and Close of the Optim a materialize callback is
// given does nothing. The finalizer cannot run while the materialize function refers to the
// optimizer (through the trainer it captures), so Close optimizers with one explicitly.
func (o *Optim) Close() error {
	if o == nil || o.ptr == nil || o.borrowed {
		return nil
	}
	C.dsd_optim_free(o.ptr)
	o.ptr = nil
	if o.handle != 0 {
		o.handle.Delete()
		o.handle = 0
	}
	runtime.SetFinalizer(o, nil)
	return nil
}

// AddParamGroup adds a param group: options is its hyperparameter dict (nil: none), kept
// by reference, so loads update it in place; params are the group's parameters, the same
// tensors the model registered (dsd_optim_add_param_group).
func (o *Optim) AddParamGroup(options *StateDict, params []Tensor) error {
	var e *C.dsd_error
	err := wrap(C.dsd_optim_add_param_group(optimPtr(o), sdPtr(options), tensorsPtr(params), C.size_t(len(params)), &e), e)
	runtime.KeepAlive(o)
	runtime.KeepAlive(options)
	return err
}

// SetParamState sets a parameter's state dict, kept by reference (a load copies tensors
// into it in place); nil clears it (dsd_optim_set_param_state). ErrNotFound if param is in
// no group.
func (o *Optim) SetParamState(param Tensor, state *StateDict) error {
	var e *C.dsd_error
	err := wrap(C.dsd_optim_set_param_state(optimPtr(o), param.c(), sdPtr(state), &e), e)
	runtime.KeepAlive(o)
	runtime.KeepAlive(state)
	return err
}

// GetParamState gives a new reference to a parameter's state dict; ErrNotFound when it has
// none (dsd_optim_get_param_state).
func (o *Optim) GetParamState(param Tensor) (*StateDict, error) {
	var out *C.dsd_state_dict
	var e *C.dsd_error
	err := wrap(C.dsd_optim_get_param_state(optimPtr(o), param.c(), &out, &e), e)
	runtime.KeepAlive(o)
	if err != nil {
		return nil, err
	}
	return newStateDict(out), nil
}

// NumParamGroups is the number of param groups (dsd_optim_param_group_count).
func (o *Optim) NumParamGroups() (int, error) {
	var out C.size_t
	var e *C.dsd_error
	err := wrap(C.dsd_optim_param_group_count(optimPtr(o), &out, &e), e)
	runtime.KeepAlive(o)
	return int(out), err
}

// GetParamGroup gives a new reference to group index's hyperparameter dict
// (dsd_optim_get_param_group).
func (o *Optim) GetParamGroup(index int) (*StateDict, error) {
	var out *C.dsd_state_dict
	var e *C.dsd_error
	err := wrap(C.dsd_optim_get_param_group(optimPtr(o), C.size_t(index), &out, &e), e)
	runtime.KeepAlive(o)
	if err != nil {
		return nil, err
	}
	return newStateDict(out), nil
}

// SetMaterialize installs fn as the optimizer's materialize callback; nil removes it
// (dsd_optim_set_materialize).
func (o *Optim) SetMaterialize(fn MaterializeFunc) error {
	if o == nil || o.borrowed {
		return newGoError(ErrInvalidArgument, "optim is NULL or borrowed by a materialize callback.")
	}
	var h cgo.Handle
	var mat *materializer
	if fn != nil {
		mat = &materializer{fn: fn}
		h = cgo.NewHandle(mat)
	}
	var e *C.dsd_error
	err := wrap(C.dsdgo_optim_set_materialize(optimPtr(o), C.uintptr_t(h), &e), e)
	runtime.KeepAlive(o)
	if err != nil {
		if h != 0 {
			h.Delete()
		}
		return err
	}
	if o.handle != 0 {
		o.handle.Delete()
	}
	o.handle, o.mat = h, mat
	return nil
}

//export dsdgoMaterialize
func dsdgoMaterialize(h C.uintptr_t, optim *C.dsd_optim, params *C.dsd_tensor, pids *C.size_t, n C.size_t) (st C.dsd_status) {
	mat := cgo.Handle(h).Value().(*materializer)
	// A panic must not unwind through dsd's C++ frames: it becomes the get/set's error.
	defer func() {
		if r := recover(); r != nil {
			mat.fail(fmt.Errorf("the materialize callback panicked: %v", r))
			st = C.DSD_E_CALLBACK
		}
	}()
	ps := make([]Tensor, int(n))
	ids := make([]int, int(n))
	if n > 0 {
		for i, t := range unsafe.Slice(params, int(n)) {
			ps[i] = goTensor(t)
		}
		for i, id := range unsafe.Slice(pids, int(n)) {
			ids[i] = int(id)
		}
	}
	if err := mat.fn(&Optim{ptr: optim, borrowed: true}, ps, ids); err != nil {
		mat.fail(err)
		return C.DSD_E_CALLBACK
	}
	return C.DSD_OK
}

func (m *materializer) fail(err error) {
	m.mu.Lock()
	m.err = err
	m.mu.Unlock()
}

func (m *materializer) take() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	err := m.err
	m.err = nil
	return err
}

// withCallbackCause attaches a materialize function's own error to a get/set's
// ErrCallback.
func withCallbackCause(err error, optims []*Optim) error {
	de, ok := err.(*Error)
	for _, o := range optims {
		if o == nil || o.mat == nil {
			continue
		}
		if cause := o.mat.take(); cause != nil && ok && de.Code == ErrCallback && de.Cause == nil {
			de.Cause = cause
		}
	}
	return err
}

func optimPtrs(optims []*Optim) []*C.dsd_optim {
	ps := make([]*C.dsd_optim, len(optims), len(optims)+1)
	for i, o := range optims {
		ps[i] = optimPtr(o)
	}
	return ps
}

func optimArray(ps []*C.dsd_optim) **C.dsd_optim {
	if len(ps) == 0 {
		return nil
	}
	return &ps[0]
}
