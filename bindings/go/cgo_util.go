package dsd

/*
#include <stdlib.h>
#include <dsd/dsd.h>
*/
import "C"

import (
	"strconv"
	"unsafe"
)

func itoa(v int64) string { return strconv.FormatInt(v, 10) }

// cstr is s NUL-terminated in Go memory, for a C parameter that is only read during the
// call (cgo allows passing Go memory that holds no Go pointers): cheaper than C.CString's
// malloc and free. Never for strings C keeps, nor inside arrays passed to C.
func cstr(s string) *C.char {
	b := make([]byte, len(s)+1)
	copy(b, s)
	return (*C.char)(unsafe.Pointer(&b[0]))
}

// cstrings is a set of C strings made for one call and freed after it.
type cstrings []*C.char

func (cs *cstrings) add(s string) *C.char {
	p := C.CString(s)
	*cs = append(*cs, p)
	return p
}

func (cs cstrings) free() {
	for _, p := range cs {
		C.free(unsafe.Pointer(p))
	}
}

// cstringArray copies names into C strings and returns the array's first element (nil
// for none). The array itself is Go memory holding C pointers, which cgo allows.
func (cs *cstrings) array(names []string) **C.char {
	if len(names) == 0 {
		return nil
	}
	arr := make([]*C.char, len(names))
	for i, n := range names {
		arr[i] = cs.add(n)
	}
	return &arr[0]
}

// i64ptr is the address of a slice's first element, or nil for an empty slice.
func i64ptr(s []int64) *C.int64_t {
	if len(s) == 0 {
		return nil
	}
	return (*C.int64_t)(unsafe.Pointer(&s[0]))
}
