package dsd

// The state-dict functions, PyTorch's torch.distributed.checkpoint.state_dict: get and set
// the state dicts of a model and its optimizers, with StateDictOptions.

/*
#include <stdlib.h>
#include <dsd/dsd.h>
*/
import "C"

import (
	"runtime"
)

// Options are PyTorch's StateDictOptions (dsd_state_dict_options). Start from
// DefaultOptions.
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
// (dsd_state_dict_options_init).
func DefaultOptions() Options {
	var c C.dsd_state_dict_options
	C.dsd_state_dict_options_init(&c)
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
func (o *Options) c(cs *cstrings) *C.dsd_state_dict_options {
	if o == nil {
		return nil
	}
	var c C.dsd_state_dict_options
	C.dsd_state_dict_options_init(&c)
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

// GetModelStateDict is a new dict keyed by canonical FQN, tensors aliasing the model's
// unless opts ask for CPU or full tensors; opts nil means defaults
// (dsd_get_model_state_dict).
func GetModelStateDict(model *Model, opts *Options) (*StateDict, error) {
	defer model.turn().release()
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
	defer model.turn().release()
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
	defer model.turn().release()
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
	defer model.turn().release()
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
	defer model.turn().release()
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
	defer model.turn().release()
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
	defer model.turn().release()
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
