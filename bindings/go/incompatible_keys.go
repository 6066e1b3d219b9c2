package dsd

// The keys a load did not match (dsd_incompatible_keys), returned by model loads and
// checkpoint loads.

/*
#include <dsd/dsd.h>
*/
import "C"

import (
	"runtime"
)

// KeyList names one list of an IncompatibleKeys (dsd_key_list, DSD_KEYS_*).
type KeyList int32

// The lists of an IncompatibleKeys.
const (
	KeysMissing    KeyList = C.DSD_KEYS_MISSING    // expected by the target, absent from what was loaded
	KeysUnexpected KeyList = C.DSD_KEYS_UNEXPECTED // in what was loaded, not in the target
	KeysSkipped    KeyList = C.DSD_KEYS_SKIPPED    // left untouched (checkpoint loads: keys not read)
)

// IncompatibleKeys are the keys a load did not match, as PyTorch's _IncompatibleKeys
// (dsd_incompatible_keys): the result of model loads (SetModelStateDict, SetStateDict) and
// of checkpoint loads (Load, CheckpointManager.LoadLatest, where it is also named
// LoadReport).
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

// Close frees the keys (dsd_incompatible_keys_free). Idempotent; the error is always nil.
func (k *IncompatibleKeys) Close() error {
	if k == nil || k.ptr == nil {
		return nil
	}
	C.dsd_incompatible_keys_free(k.ptr)
	k.ptr = nil
	runtime.SetFinalizer(k, nil)
	return nil
}

// Count is the number of keys in one list (dsd_incompatible_keys_count). ErrInvalidArgument
// for an unknown list.
func (k *IncompatibleKeys) Count(list KeyList) (int, error) {
	var out C.size_t
	var e *C.dsd_error
	err := wrap(C.dsd_incompatible_keys_count(keysPtr(k), C.dsd_key_list(list), &out, &e), e)
	runtime.KeepAlive(k)
	return int(out), err
}

// Key is the key at a position of one list, copied (dsd_incompatible_keys_key).
func (k *IncompatibleKeys) Key(list KeyList, index int) (string, error) {
	var out *C.char
	var e *C.dsd_error
	if err := wrap(C.dsd_incompatible_keys_key(keysPtr(k), C.dsd_key_list(list), C.size_t(index), &out, &e), e); err != nil {
		runtime.KeepAlive(k)
		return "", err
	}
	s := C.GoString(out)
	runtime.KeepAlive(k)
	return s, nil
}

// Missing is the missing key at index (Key(KeysMissing, index)).
func (k *IncompatibleKeys) Missing(index int) (string, error) { return k.Key(KeysMissing, index) }

// Unexpected is the unexpected key at index (Key(KeysUnexpected, index)).
func (k *IncompatibleKeys) Unexpected(index int) (string, error) {
	return k.Key(KeysUnexpected, index)
}
