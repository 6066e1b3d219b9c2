package dsd

/*
#include <stdlib.h>
#include <dsd/dsd.h>
#include "bridge.h"
*/
import "C"

import (
	"fmt"
	"runtime"
	"runtime/cgo"
	"sync"
	"unsafe"
)

// WrapperKind is a wrapper module's kind (dsd_wrapper_kind).
type WrapperKind int32

// The wrapper kinds.
const (
	WrapperDDP        WrapperKind = C.DSD_WRAPPER_DDP
	WrapperFSDP       WrapperKind = C.DSD_WRAPPER_FSDP
	WrapperCompile    WrapperKind = C.DSD_WRAPPER_COMPILE
	WrapperCheckpoint WrapperKind = C.DSD_WRAPPER_CHECKPOINT
)

// Options are PyTorch's StateDictOptions (dsd_options). Start from DefaultOptions.
type Options struct {
	FullStateDict             bool
	CPUOffload                bool
	IgnoreFrozenParams        bool
	KeepSubmodulePrefixes     bool
	Strict                    bool
	BroadcastFromRank0        bool
	FlattenOptimizerStateDict bool
	FQNModifiers              string // "_fqn_modifiers" by default (meaningful in Python only)
	BucketBytes               uint64 // bytes per gather/broadcast collective; 0: 64 MiB
}

// DefaultOptions are PyTorch's defaults: all false except KeepSubmodulePrefixes and Strict
// (dsd_options_init).
func DefaultOptions() Options {
	var c C.dsd_options
	C.dsd_options_init(&c)
	o := Options{
		FullStateDict:             bool(c.full_state_dict),
		CPUOffload:                bool(c.cpu_offload),
		IgnoreFrozenParams:        bool(c.ignore_frozen_params),
		KeepSubmodulePrefixes:     bool(c.keep_submodule_prefixes),
		Strict:                    bool(c.strict),
		BroadcastFromRank0:        bool(c.broadcast_from_rank0),
		FlattenOptimizerStateDict: bool(c.flatten_optimizer_state_dict),
		BucketBytes:               uint64(c.bucket_bytes),
	}
	if c.dsd_fqn_modifiers != nil {
		o.FQNModifiers = C.GoString(c.dsd_fqn_modifiers)
	}
	return o
}

// c converts o for one call; strings made for it are added to cs. nil stays NULL.
func (o *Options) c(cs *cstrings) *C.dsd_options {
	if o == nil {
		return nil
	}
	var c C.dsd_options
	C.dsd_options_init(&c)
	c.full_state_dict = C.bool(o.FullStateDict)
	c.cpu_offload = C.bool(o.CPUOffload)
	c.ignore_frozen_params = C.bool(o.IgnoreFrozenParams)
	c.keep_submodule_prefixes = C.bool(o.KeepSubmodulePrefixes)
	c.strict = C.bool(o.Strict)
	c.broadcast_from_rank0 = C.bool(o.BroadcastFromRank0)
	c.flatten_optimizer_state_dict = C.bool(o.FlattenOptimizerStateDict)
	if o.FQNModifiers != "" {
		c.dsd_fqn_modifiers = cs.add(o.FQNModifiers)
	}
	c.bucket_bytes = C.uint64_t(o.BucketBytes)
	return &c
}

// Model is a registered model (dsd_model): parameters, buffers and extra state under the
// raw names of the trainer's module tree, in state-dict order.
type Model struct {
	ptr *C.dsd_model
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
	m := &Model{ptr: out}
	runtime.SetFinalizer(m, (*Model).Close)
	return m, nil
}

// Close frees the model (dsd_model_free). Idempotent.
func (m *Model) Close() {
	if m == nil || m.ptr == nil {
		return
	}
	C.dsd_model_free(m.ptr)
	m.ptr = nil
	runtime.SetFinalizer(m, nil)
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
// (dsd_model_canonical_fqn; the buffer is sized for you).
func (m *Model) CanonicalFQN(rawName string) (string, error) {
	buf := make([]C.char, 256)
	for {
		var n C.size_t
		err := m.call([]string{rawName}, func(p *C.dsd_model, s []*C.char, e **C.dsd_error) C.dsd_status {
			return C.dsd_model_canonical_fqn(p, s[0], &buf[0], C.size_t(len(buf)), &n, e)
		})
		if CodeOf(err) == ErrBufferTooSmall && int(n) >= len(buf) {
			buf = make([]C.char, int(n)+1)
			continue
		}
		if err != nil {
			return "", err
		}
		return C.GoStringN(&buf[0], C.int(n)), nil
	}
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
// Idempotent. The finalizer cannot run while the materialize function refers to the
// optimizer (through the trainer it captures), so Close optimizers with one explicitly.
func (o *Optim) Close() {
	if o == nil || o.ptr == nil || o.borrowed {
		return
	}
	C.dsd_optim_free(o.ptr)
	o.ptr = nil
	if o.handle != 0 {
		o.handle.Delete()
		o.handle = 0
	}
	runtime.SetFinalizer(o, nil)
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

// NumParamGroups is the number of param groups (dsd_optim_num_param_groups).
func (o *Optim) NumParamGroups() (int, error) {
	var out C.size_t
	var e *C.dsd_error
	err := wrap(C.dsd_optim_num_param_groups(optimPtr(o), &out, &e), e)
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

// IncompatibleKeys is the result of a non-strict model load (dsd_incompatible_keys).
type IncompatibleKeys struct {
	ptr *C.dsd_incompatible_keys
}

func newIncompatibleKeys(p *C.dsd_incompatible_keys) *IncompatibleKeys {
	if p == nil {
		return nil
	}
	k := &IncompatibleKeys{ptr: p}
	runtime.SetFinalizer(k, (*IncompatibleKeys).Close)
	return k
}

func keysPtr(k *IncompatibleKeys) *C.dsd_incompatible_keys {
	if k == nil {
		return nil
	}
	return k.ptr
}

// Close frees the keys (dsd_incompatible_keys_free). Idempotent.
func (k *IncompatibleKeys) Close() {
	if k == nil || k.ptr == nil {
		return
	}
	C.dsd_incompatible_keys_free(k.ptr)
	k.ptr = nil
	runtime.SetFinalizer(k, nil)
}

// Count is the number of missing and unexpected keys (dsd_incompatible_keys_count).
func (k *IncompatibleKeys) Count() (missing, unexpected int, err error) {
	var m, u C.size_t
	var e *C.dsd_error
	err = wrap(C.dsd_incompatible_keys_count(keysPtr(k), &m, &u, &e), e)
	runtime.KeepAlive(k)
	return int(m), int(u), err
}

// Missing is the missing key at index (dsd_incompatible_keys_missing).
func (k *IncompatibleKeys) Missing(index int) (string, error) {
	var out *C.char
	var e *C.dsd_error
	if err := wrap(C.dsd_incompatible_keys_missing(keysPtr(k), C.size_t(index), &out, &e), e); err != nil {
		return "", err
	}
	s := C.GoString(out)
	runtime.KeepAlive(k)
	return s, nil
}

// Unexpected is the unexpected key at index (dsd_incompatible_keys_unexpected).
func (k *IncompatibleKeys) Unexpected(index int) (string, error) {
	var out *C.char
	var e *C.dsd_error
	if err := wrap(C.dsd_incompatible_keys_unexpected(keysPtr(k), C.size_t(index), &out, &e), e); err != nil {
		return "", err
	}
	s := C.GoString(out)
	runtime.KeepAlive(k)
	return s, nil
}

// GetModelStateDict is a new dict keyed by canonical FQN, tensors aliasing the model's
// unless opts ask for CPU or full tensors; opts nil means defaults
// (dsd_get_model_state_dict).
func GetModelStateDict(model *Model, opts *Options) (*StateDict, error) {
	var cs cstrings
	defer cs.free()
	var out *C.dsd_state_dict
	var e *C.dsd_error
	err := wrap(C.dsd_get_model_state_dict(modelPtr(model), opts.c(&cs), &out, &e), e)
	runtime.KeepAlive(model)
	if err != nil {
		return nil, err
	}
	return newStateDict(out), nil
}

// GetModelStateDictSubmodules keeps only the entries under the given raw module paths
// (deprecated, as in PyTorch) (dsd_get_model_state_dict_submodules).
func GetModelStateDictSubmodules(model *Model, submodules []string, opts *Options) (*StateDict, error) {
	var cs cstrings
	defer cs.free()
	var out *C.dsd_state_dict
	var e *C.dsd_error
	err := wrap(C.dsd_get_model_state_dict_submodules(modelPtr(model), cs.array(submodules), C.size_t(len(submodules)),
		opts.c(&cs), &out, &e), e)
	runtime.KeepAlive(model)
	if err != nil {
		return nil, err
	}
	return newStateDict(out), nil
}

// SetModelStateDict copies sd into the model's tensors in place; nothing is written when
// it fails. The keys are the missing and unexpected keys of a non-strict load
// (dsd_set_model_state_dict).
func SetModelStateDict(model *Model, sd *StateDict, opts *Options) (*IncompatibleKeys, error) {
	var cs cstrings
	defer cs.free()
	var keys *C.dsd_incompatible_keys
	var e *C.dsd_error
	err := wrap(C.dsd_set_model_state_dict(modelPtr(model), sdPtr(sd), opts.c(&cs), &keys, &e), e)
	runtime.KeepAlive(model)
	runtime.KeepAlive(sd)
	if err != nil {
		return nil, err
	}
	return newIncompatibleKeys(keys), nil
}

// GetOptimizerStateDict is the optimizers' state dict merged:
// {"state": {fqn: {...}}, "param_groups": [...]}, or the flattened form
// (dsd_get_optimizer_state_dict).
func GetOptimizerStateDict(model *Model, optims []*Optim, opts *Options) (*StateDict, error) {
	var cs cstrings
	defer cs.free()
	ps := optimPtrs(optims)
	var out *C.dsd_state_dict
	var e *C.dsd_error
	err := wrap(C.dsd_get_optimizer_state_dict(modelPtr(model), optimArray(ps), C.size_t(len(ps)), opts.c(&cs), &out, &e), e)
	runtime.KeepAlive(model)
	runtime.KeepAlive(optims)
	if err != nil {
		return nil, withCallbackCause(err, optims)
	}
	return newStateDict(out), nil
}

// SetOptimizerStateDict loads an optimizer state dict (nested FQN, flattened or PyTorch's
// positional form, detected) (dsd_set_optimizer_state_dict).
func SetOptimizerStateDict(model *Model, optims []*Optim, osd *StateDict, opts *Options) error {
	var cs cstrings
	defer cs.free()
	ps := optimPtrs(optims)
	var e *C.dsd_error
	err := wrap(C.dsd_set_optimizer_state_dict(modelPtr(model), optimArray(ps), C.size_t(len(ps)), sdPtr(osd), opts.c(&cs), &e), e)
	runtime.KeepAlive(model)
	runtime.KeepAlive(optims)
	runtime.KeepAlive(osd)
	return withCallbackCause(err, optims)
}

// GetStateDict is GetModelStateDict and GetOptimizerStateDict at once (dsd_get_state_dict).
func GetStateDict(model *Model, optims []*Optim, opts *Options) (modelSD, optimSD *StateDict, err error) {
	var cs cstrings
	defer cs.free()
	ps := optimPtrs(optims)
	var m, o *C.dsd_state_dict
	var e *C.dsd_error
	err = wrap(C.dsd_get_state_dict(modelPtr(model), optimArray(ps), C.size_t(len(ps)), opts.c(&cs), &m, &o, &e), e)
	runtime.KeepAlive(model)
	runtime.KeepAlive(optims)
	if err != nil {
		return nil, nil, withCallbackCause(err, optims)
	}
	return newStateDict(m), newStateDict(o), nil
}

// SetStateDict loads both, the optimizers first; an empty model state dict means optimizer
// only (dsd_set_state_dict).
func SetStateDict(model *Model, optims []*Optim, modelSD, optimSD *StateDict, opts *Options) (*IncompatibleKeys, error) {
	var cs cstrings
	defer cs.free()
	ps := optimPtrs(optims)
	var keys *C.dsd_incompatible_keys
	var e *C.dsd_error
	err := wrap(C.dsd_set_state_dict(modelPtr(model), optimArray(ps), C.size_t(len(ps)), sdPtr(modelSD), sdPtr(optimSD),
		opts.c(&cs), &keys, &e), e)
	runtime.KeepAlive(model)
	runtime.KeepAlive(optims)
	runtime.KeepAlive(modelSD)
	runtime.KeepAlive(optimSD)
	if err != nil {
		return nil, withCallbackCause(err, optims)
	}
	return newIncompatibleKeys(keys), nil
}

// OptimStateDictToFQN remaps PyTorch's positional optimizer state dict to the FQN form,
// given the FQN of each parameter id in order (dsd_optim_state_dict_to_fqn).
func OptimStateDictToFQN(positional *StateDict, names []string) (*StateDict, error) {
	return remapOptim(positional, names, true)
}

// OptimStateDictToPositional is the inverse (dsd_optim_state_dict_to_positional).
func OptimStateDictToPositional(fqnForm *StateDict, names []string) (*StateDict, error) {
	return remapOptim(fqnForm, names, false)
}

func remapOptim(sd *StateDict, names []string, toFQN bool) (*StateDict, error) {
	var cs cstrings
	defer cs.free()
	arr := cs.array(names)
	var out *C.dsd_state_dict
	var e *C.dsd_error
	var st C.dsd_status
	if toFQN {
		st = C.dsd_optim_state_dict_to_fqn(sdPtr(sd), arr, C.size_t(len(names)), &out, &e)
	} else {
		st = C.dsd_optim_state_dict_to_positional(sdPtr(sd), arr, C.size_t(len(names)), &out, &e)
	}
	runtime.KeepAlive(sd)
	if err := wrap(st, e); err != nil {
		return nil, err
	}
	return newStateDict(out), nil
}
