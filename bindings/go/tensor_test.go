package dsd_test

import (
	"reflect"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"dsd.dev/dsd"
)

func TestTensorWrapInfoShape(t *testing.T) {
	buf, err := dsd.NewHostBuffer(6 * 4)
	must(t, err)
	defer buf.Close()
	tensor, err := buf.Wrap(0, dsd.DTypeF32, []int64{2, 3}, false)
	must(t, err)
	defer tensor.Release()

	info, err := tensor.Info()
	must(t, err)
	want := dsd.TensorInfo{DType: dsd.DTypeF32, NDim: 2, Device: dsd.CPU, Data: buf.Pointer(), Numel: 6, NBytes: 24,
		Contiguous: true}
	if info != want {
		t.Fatalf("info %+v, want %+v", info, want)
	}
	shape, err := tensor.Shape()
	must(t, err)
	strides, err := tensor.Strides()
	must(t, err)
	if !reflect.DeepEqual(shape, []int64{2, 3}) || !reflect.DeepEqual(strides, []int64{3, 1}) {
		t.Fatalf("shape %v strides %v", shape, strides)
	}

	// dsd and Go see the same memory, no copy.
	buf.Float32s()[4] = 2.5
	view, err := dsd.Float32View(tensor)
	must(t, err)
	if view[4] != 2.5 || &view[0] != &buf.Float32s()[0] {
		t.Fatalf("the tensor does not alias the host buffer")
	}

	// A 0-dim tensor at an offset.
	scalar, err := buf.Wrap(16, dsd.DTypeF32, nil, true)
	must(t, err)
	info, err = scalar.Info()
	must(t, err)
	shape, err = scalar.Shape()
	must(t, err)
	if info.NDim != 0 || info.Numel != 1 || !info.ReadOnly || len(shape) != 0 || *(*float32)(info.Data) != 2.5 {
		t.Fatalf("scalar info %+v shape %v", info, shape)
	}
	must(t, scalar.Release())

	// Views that do not fit are refused before dsd sees them.
	_, err = buf.Wrap(8, dsd.DTypeF32, []int64{2, 3}, false)
	expectError(t, err, dsd.ErrShapeMismatch, "does not fit")
}

func TestTensorReleaseErrors(t *testing.T) {
	tensor, err := dsd.FromFloat32s([]float32{1, 2, 3}, nil)
	must(t, err)
	again, err := tensor.Retain()
	must(t, err)
	must(t, tensor.Release())

	// The second handle lives on; the first is stale, released twice or not.
	got, err := dsd.Float32s(again)
	must(t, err)
	if !reflect.DeepEqual(got, []float32{1, 2, 3}) {
		t.Fatalf("retained tensor holds %v", got)
	}
	expectError(t, tensor.Release(), dsd.ErrStaleHandle, "")
	_, err = tensor.Info()
	expectError(t, err, dsd.ErrStaleHandle, "")
	expectError(t, dsd.Tensor{}.Release(), dsd.ErrStaleHandle, "")
	_, err = dsd.Tensor{}.Shape()
	expectError(t, err, dsd.ErrStaleHandle, "")
	must(t, again.Release())
	expectError(t, again.Release(), dsd.ErrStaleHandle, "")
}

// Memory lent with a Go release function: called exactly once, when the last dsd reference
// goes (here a state dict's), also when the wrap itself fails.
func TestTensorFromBlobRelease(t *testing.T) {
	buf, err := dsd.NewHostBuffer(6 * 8)
	must(t, err)
	defer buf.Close()
	for i := range buf.Float64s() {
		buf.Float64s()[i] = float64(i)
	}
	var released int32
	// A transposed 3 x 2 view of a 2 x 3 matrix.
	tensor, err := dsd.TensorFromBlob(buf.Pointer(), dsd.DTypeF64, []int64{3, 2}, []int64{1, 3}, dsd.CPU, false,
		func() { atomic.AddInt32(&released, 1) })
	must(t, err)
	info, err := tensor.Info()
	must(t, err)
	strides, err := tensor.Strides()
	must(t, err)
	if info.Contiguous || !reflect.DeepEqual(strides, []int64{1, 3}) || info.DType != dsd.DTypeF64 {
		t.Fatalf("info %+v strides %v", info, strides)
	}
	sd := mustDict(t)
	must(t, sd.SetTensor("w", tensor))
	must(t, tensor.Release())
	if atomic.LoadInt32(&released) != 0 {
		t.Fatalf("released while a state dict still holds the tensor")
	}
	sd.Close()
	sd.Close() // idempotent
	if n := atomic.LoadInt32(&released); n != 1 {
		t.Fatalf("release called %d times", n)
	}

	released = 0
	_, err = dsd.TensorFromBlob(buf.Pointer(), dsd.DType(99), []int64{2}, nil, dsd.CPU, false,
		func() { atomic.AddInt32(&released, 1) })
	expectError(t, err, dsd.ErrDTypeMismatch, "99")
	if released != 1 {
		t.Fatalf("a failed wrap called release %d times", released)
	}
	_, err = dsd.TensorFromBlob(buf.Pointer(), dsd.DTypeF32, []int64{2}, nil, dsd.Device{Type: 77}, false, nil)
	expectError(t, err, dsd.ErrDevice, "77")
	_, err = dsd.TensorFromBlob(nil, dsd.DTypeF32, []int64{2}, nil, dsd.CPU, false, nil)
	expectError(t, err, dsd.ErrInvalidArgument, "")
	_, err = dsd.TensorFromBlob(buf.Pointer(), dsd.DTypeF32, []int64{2, 1}, []int64{1}, dsd.CPU, false, nil)
	expectError(t, err, dsd.ErrInvalidArgument, "strides has 1 entries")
}

// A host buffer outlives Free while dsd refers to it, and the other way round.
func TestTensorHostBufferLifetime(t *testing.T) {
	buf, err := dsd.NewHostBuffer(4 * 4)
	must(t, err)
	copy(buf.Float32s(), []float32{1, 2, 3, 4})
	tensor, err := buf.Wrap(0, dsd.DTypeF32, []int64{4}, false)
	must(t, err)
	buf.Close()
	buf.Close()
	if buf.Float32s() != nil {
		t.Fatal("a freed buffer still hands out slices")
	}
	_, err = buf.Wrap(0, dsd.DTypeF32, []int64{1}, false)
	expectError(t, err, dsd.ErrStaleHandle, "freed")
	got, err := dsd.Float32s(tensor) // still dsd's memory
	must(t, err)
	if !reflect.DeepEqual(got, []float32{1, 2, 3, 4}) {
		t.Fatalf("tensor holds %v after the buffer's Free", got)
	}
	must(t, tensor.Release())
}

// The finalizer of a dropped state dict frees it, which lets go of the tensors it held.
func TestTensorFinalizerSafetyNet(t *testing.T) {
	buf, err := dsd.NewHostBuffer(4)
	must(t, err)
	defer buf.Close()
	var released int32
	func() {
		tensor, err := dsd.TensorFromBlob(buf.Pointer(), dsd.DTypeF32, []int64{1}, nil, dsd.CPU, false,
			func() { atomic.AddInt32(&released, 1) })
		must(t, err)
		sd := mustDict(t)
		must(t, sd.SetTensor("w", tensor))
		must(t, tensor.Release())
		// sd is dropped without Close.
	}()
	deadline := time.Now().Add(5 * time.Second)
	for atomic.LoadInt32(&released) == 0 && time.Now().Before(deadline) {
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	if atomic.LoadInt32(&released) != 1 {
		t.Fatalf("the finalizer did not free the dropped state dict")
	}
}

func TestTensorDLPackRoundTrip(t *testing.T) {
	tensor, err := dsd.FromFloat32s([]float32{1, 2, 3, 4, 5, 6}, []int64{2, 3})
	must(t, err)
	info, err := tensor.Info()
	must(t, err)

	v0, err := tensor.ToDLPack()
	must(t, err)
	back, err := dsd.TensorFromDLPack(v0) // takes ownership of v0
	must(t, err)
	backInfo, err := back.Info()
	must(t, err)
	shape, err := back.Shape()
	must(t, err)
	if backInfo.Data != info.Data || !reflect.DeepEqual(shape, []int64{2, 3}) {
		t.Fatalf("DLPack v0 round trip: %+v %v", backInfo, shape)
	}
	must(t, back.Release())

	v1, err := tensor.ToDLPackVersioned()
	must(t, err)
	back, err = dsd.TensorFromDLPackVersioned(v1)
	must(t, err)
	backInfo, err = back.Info()
	must(t, err)
	if backInfo.Data != info.Data {
		t.Fatalf("DLPack v1 round trip moved the data")
	}
	must(t, back.Release())

	// An export keeps the data alive after the handle is gone, until its deleter runs.
	v0, err = tensor.ToDLPack()
	must(t, err)
	v1, err = tensor.ToDLPackVersioned()
	must(t, err)
	must(t, tensor.Release())
	dsd.DLPackFree(v0)
	dsd.DLPackVersionedFree(v1)
	dsd.DLPackFree(nil)
	_, err = dsd.TensorFromDLPack(nil)
	expectError(t, err, dsd.ErrInvalidArgument, "NULL")
}
