package dsd

/*
#include <dsd/dsd.h>
*/
import "C"

// DType is an element type (dsd_dtype, DSD_DTYPE_*).
type DType int32

// The element types.
const (
	DTypeBool     DType = C.DSD_DTYPE_BOOL
	DTypeU8       DType = C.DSD_DTYPE_U8
	DTypeI8       DType = C.DSD_DTYPE_I8
	DTypeI16      DType = C.DSD_DTYPE_I16
	DTypeI32      DType = C.DSD_DTYPE_I32
	DTypeI64      DType = C.DSD_DTYPE_I64
	DTypeF16      DType = C.DSD_DTYPE_F16
	DTypeBF16     DType = C.DSD_DTYPE_BF16
	DTypeF32      DType = C.DSD_DTYPE_F32
	DTypeF64      DType = C.DSD_DTYPE_F64
	DTypeC64      DType = C.DSD_DTYPE_C64
	DTypeC128     DType = C.DSD_DTYPE_C128
	DTypeF8E4M3FN DType = C.DSD_DTYPE_F8_E4M3FN
	DTypeF8E5M2   DType = C.DSD_DTYPE_F8_E5M2
	DTypeU16      DType = C.DSD_DTYPE_U16
	DTypeU32      DType = C.DSD_DTYPE_U32
	DTypeU64      DType = C.DSD_DTYPE_U64
)

// Size is the number of bytes per element; 0 for an unknown code (dsd_dtype_size).
func (d DType) Size() int { return int(C.dsd_dtype_size(C.dsd_dtype(d))) }

// Name is PyTorch's name of the dtype without "torch." ("float32"), or "" for an unknown
// code (dsd_dtype_name).
func (d DType) Name() string {
	s := C.dsd_dtype_name(C.dsd_dtype(d))
	if s == nil {
		return ""
	}
	return C.GoString(s)
}

func (d DType) String() string {
	if n := d.Name(); n != "" {
		return n
	}
	return "dtype(" + itoa(int64(d)) + ")"
}

// DeviceType is DLPack's device type number (DSD_DEVICE_*).
type DeviceType int32

// The device types.
const (
	DeviceCPU  DeviceType = C.DSD_DEVICE_CPU
	DeviceCUDA DeviceType = C.DSD_DEVICE_CUDA
)

// Device is a dsd_device: a device type and its ordinal (0 for the CPU).
type Device struct {
	Type  DeviceType
	Index int32
}

// CPU is the host device.
var CPU = Device{Type: DeviceCPU}

func (d Device) c() C.dsd_device {
	return C.dsd_device{_type: C.dsd_device_type(d.Type), index: C.int32_t(d.Index)}
}

func goDevice(d C.dsd_device) Device { return Device{Type: DeviceType(d._type), Index: int32(d.index)} }

// Kind is the kind of a value in a state dict (dsd_kind, DSD_KIND_*).
type Kind int32

// The value kinds.
const (
	KindNone   Kind = C.DSD_KIND_NONE
	KindBool   Kind = C.DSD_KIND_BOOL
	KindInt    Kind = C.DSD_KIND_INT
	KindDouble Kind = C.DSD_KIND_DOUBLE
	KindString Kind = C.DSD_KIND_STRING
	KindBytes  Kind = C.DSD_KIND_BYTES
	KindTensor Kind = C.DSD_KIND_TENSOR
	KindList   Kind = C.DSD_KIND_LIST
	KindDict   Kind = C.DSD_KIND_DICT
)

func (k Kind) String() string {
	switch k {
	case KindNone:
		return "none"
	case KindBool:
		return "bool"
	case KindInt:
		return "int"
	case KindDouble:
		return "double"
	case KindString:
		return "string"
	case KindBytes:
		return "bytes"
	case KindTensor:
		return "tensor"
	case KindList:
		return "list"
	case KindDict:
		return "dict"
	}
	return "kind(" + itoa(int64(k)) + ")"
}
