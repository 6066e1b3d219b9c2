package dsd

/*
#include <stdlib.h>
#include <dsd/dsd.h>
*/
import "C"

import (
	"runtime"
	"time"
	"unsafe"
)

// CommOptions are a communicator's options (dsd_comm_options).
type CommOptions struct {
	// How long a rendezvous or a collective may wait for its peers before failing with
	// ErrTimeout; sent in whole milliseconds. Default 30 minutes, as PyTorch's Gloo.
	Timeout time.Duration
}

// DefaultCommOptions are the defaults (dsd_comm_options_init).
func DefaultCommOptions() CommOptions {
	var o C.dsd_comm_options
	C.dsd_comm_options_init(&o)
	return CommOptions{Timeout: time.Duration(o.timeout_ms) * time.Millisecond}
}

func (o *CommOptions) c() *C.dsd_comm_options {
	if o == nil {
		return nil
	}
	var c C.dsd_comm_options
	C.dsd_comm_options_init(&c)
	c.timeout_ms = C.int64_t(o.Timeout.Milliseconds())
	return &c
}

// Comm is a communicator (dsd_comm): Gloo process groups, a caller-owned NCCL communicator,
// or a single local rank. Reference-counted inside: meshes, layouts and state dicts keep it
// alive, so Close as soon as you are done with it. Used by one goroutine at a time.
type Comm struct {
	ptr *C.dsd_comm
}

func newComm(p *C.dsd_comm) *Comm {
	c := &Comm{ptr: p}
	runtime.SetFinalizer(c, (*Comm).Close)
	return c
}

func commPtr(c *Comm) *C.dsd_comm {
	if c == nil {
		return nil
	}
	return c.ptr
}

// NewCommFromEnv builds a Gloo communicator from the launcher's environment (torchrun,
// dsdrun, mpirun, srun). Collective over the launch. opts may be nil (defaults)
// (dsd_comm_new_from_env).
func NewCommFromEnv(opts *CommOptions) (*Comm, error) {
	var out *C.dsd_comm
	var e *C.dsd_error
	if err := wrap(C.dsd_comm_new_from_env(opts.c(), &out, &e), e); err != nil {
		return nil, err
	}
	return newComm(out), nil
}

// NewCommFileStore builds a Gloo communicator whose rendezvous goes through the file path,
// shared by every rank (dsd_comm_new_file_store). Collective.
func NewCommFileStore(path string, rank, size int, opts *CommOptions) (*Comm, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var out *C.dsd_comm
	var e *C.dsd_error
	if err := wrap(C.dsd_comm_new_file_store(cpath, C.int32_t(rank), C.int32_t(size), opts.c(), &out, &e), e); err != nil {
		return nil, err
	}
	return newComm(out), nil
}

// NewCommNCCL wraps a caller-owned ncclComm_t and cudaStream_t (nil: the default stream),
// which must outlive the communicator and everything referring to it (dsd_comm_new_nccl).
func NewCommNCCL(ncclComm, cudaStream unsafe.Pointer, rank, size int, opts *CommOptions) (*Comm, error) {
	var out *C.dsd_comm
	var e *C.dsd_error
	if err := wrap(C.dsd_comm_new_nccl(ncclComm, cudaStream, C.int32_t(rank), C.int32_t(size), opts.c(), &out, &e), e); err != nil {
		return nil, err
	}
	return newComm(out), nil
}

// NewCommLocal is a communicator of a single rank (dsd_comm_new_local).
func NewCommLocal() (*Comm, error) {
	var out *C.dsd_comm
	var e *C.dsd_error
	if err := wrap(C.dsd_comm_new_local(&out, &e), e); err != nil {
		return nil, err
	}
	return newComm(out), nil
}

// Close drops this reference (dsd_comm_free); it waits for an asynchronous save in flight
// over the communicator. Idempotent.
func (c *Comm) Close() {
	if c == nil || c.ptr == nil {
		return
	}
	C.dsd_comm_free(c.ptr)
	c.ptr = nil
	runtime.SetFinalizer(c, nil)
}

// Rank is this process's rank (dsd_comm_rank).
func (c *Comm) Rank() (int, error) {
	var out C.int32_t
	var e *C.dsd_error
	err := wrap(C.dsd_comm_rank(commPtr(c), &out, &e), e)
	runtime.KeepAlive(c)
	return int(out), err
}

// Size is the number of ranks (dsd_comm_size).
func (c *Comm) Size() (int, error) {
	var out C.int32_t
	var e *C.dsd_error
	err := wrap(C.dsd_comm_size(commPtr(c), &out, &e), e)
	runtime.KeepAlive(c)
	return int(out), err
}

// Backend is "gloo", "nccl" or "local" (dsd_comm_backend).
func (c *Comm) Backend() (string, error) {
	var out *C.char
	var e *C.dsd_error
	if err := wrap(C.dsd_comm_backend(commPtr(c), &out, &e), e); err != nil {
		return "", err
	}
	s := C.GoString(out)
	runtime.KeepAlive(c)
	return s, nil
}

// Barrier returns once every rank has called it (dsd_comm_barrier). Collective.
func (c *Comm) Barrier() error {
	var e *C.dsd_error
	err := wrap(C.dsd_comm_barrier(commPtr(c), &e), e)
	runtime.KeepAlive(c)
	return err
}

// Mesh is a device mesh over the ranks of a communicator (dsd_mesh), as PyTorch's
// DeviceMesh. It keeps its communicator alive.
type Mesh struct {
	ptr *C.dsd_mesh
}

func newMesh(p *C.dsd_mesh) *Mesh {
	m := &Mesh{ptr: p}
	runtime.SetFinalizer(m, (*Mesh).Close)
	return m
}

func meshPtr(m *Mesh) *C.dsd_mesh {
	if m == nil {
		return nil
	}
	return m.ptr
}

// NewMesh is a mesh of the given shape over comm's ranks; ranks lists the global rank at
// each position in row-major order (nil: 0, 1, 2, ...) (dsd_mesh_new). Not collective.
func NewMesh(comm *Comm, shape []int64, ranks []int64, deviceType DeviceType) (*Mesh, error) {
	var out *C.dsd_mesh
	var e *C.dsd_error
	err := wrap(C.dsd_mesh_new(commPtr(comm), i64ptr(shape), C.size_t(len(shape)), i64ptr(ranks),
		C.int32_t(deviceType), &out, &e), e)
	runtime.KeepAlive(comm)
	if err != nil {
		return nil, err
	}
	return newMesh(out), nil
}

// Close drops this reference (dsd_mesh_free). Idempotent.
func (m *Mesh) Close() {
	if m == nil || m.ptr == nil {
		return
	}
	C.dsd_mesh_free(m.ptr)
	m.ptr = nil
	runtime.SetFinalizer(m, nil)
}

// NDim is the number of mesh dimensions (dsd_mesh_ndim).
func (m *Mesh) NDim() (int, error) {
	var out C.size_t
	var e *C.dsd_error
	err := wrap(C.dsd_mesh_ndim(meshPtr(m), &out, &e), e)
	runtime.KeepAlive(m)
	return int(out), err
}

// Shape is the mesh's sizes (dsd_mesh_shape).
func (m *Mesh) Shape() ([]int64, error) {
	n, err := m.NDim()
	if err != nil {
		return nil, err
	}
	return m.fill(n, func(p *C.int64_t, capacity C.size_t, e **C.dsd_error) C.dsd_status {
		return C.dsd_mesh_shape(meshPtr(m), p, capacity, e)
	})
}

// Ranks are the global ranks in row-major order (dsd_mesh_ranks).
func (m *Mesh) Ranks() ([]int64, error) {
	shape, err := m.Shape()
	if err != nil {
		return nil, err
	}
	n := int64(1)
	for _, s := range shape {
		n *= s
	}
	return m.fill(int(n), func(p *C.int64_t, capacity C.size_t, e **C.dsd_error) C.dsd_status {
		return C.dsd_mesh_ranks(meshPtr(m), p, capacity, e)
	})
}

func (m *Mesh) fill(n int, call func(p *C.int64_t, capacity C.size_t, e **C.dsd_error) C.dsd_status) ([]int64, error) {
	out := make([]int64, n, n+1)
	var e *C.dsd_error
	err := wrap(call((*C.int64_t)(unsafe.Pointer(&out[:1][0])), C.size_t(n), &e), e)
	runtime.KeepAlive(m)
	if err != nil {
		return nil, err
	}
	return out, nil
}

// DeviceType is the device type of the mesh's tensors (dsd_mesh_device_type).
func (m *Mesh) DeviceType() (DeviceType, error) {
	var out C.int32_t
	var e *C.dsd_error
	err := wrap(C.dsd_mesh_device_type(meshPtr(m), &out, &e), e)
	runtime.KeepAlive(m)
	return DeviceType(out), err
}

// Coordinate is this process's coordinate in the mesh, and whether it is part of it
// (dsd_mesh_coordinate); nil when it is not.
func (m *Mesh) Coordinate() (coord []int64, inMesh bool, err error) {
	n, err := m.NDim()
	if err != nil {
		return nil, false, err
	}
	out := make([]int64, n, n+1)
	var in C.bool
	var e *C.dsd_error
	err = wrap(C.dsd_mesh_coordinate(meshPtr(m), (*C.int64_t)(unsafe.Pointer(&out[:1][0])), C.size_t(n), &in, &e), e)
	runtime.KeepAlive(m)
	if err != nil || !bool(in) {
		return nil, false, err
	}
	return out, true, nil
}

// PlacementKind is Replicate or Shard (dsd_placement_kind).
type PlacementKind int32

// The placement kinds.
const (
	PlacementReplicate PlacementKind = C.DSD_PLACEMENT_REPLICATE
	PlacementShard     PlacementKind = C.DSD_PLACEMENT_SHARD
)

// Placement is one mesh dimension's placement (dsd_placement): Replicate(), or Shard(Dim).
type Placement struct {
	Kind PlacementKind
	Dim  int32 // the tensor dimension split, for Shard
}

// Shard is PyTorch's Shard(dim).
func Shard(dim int) Placement { return Placement{Kind: PlacementShard, Dim: int32(dim)} }

// Replicate is PyTorch's Replicate().
func Replicate() Placement { return Placement{Kind: PlacementReplicate} }

// Layout is a dsd_layout: a value handle, like Tensor, describing how a distributed tensor
// is split. Release each handle returned to you exactly once.
type Layout struct {
	bits uint64
}

// Bits is the handle's raw value.
func (l Layout) Bits() uint64 { return l.bits }

func (l Layout) c() C.dsd_layout { return C.dsd_layout{bits: C.uint64_t(l.bits)} }

func goLayout(l C.dsd_layout) Layout { return Layout{bits: uint64(l.bits)} }

// NewLayoutPlacements is a layout of a tensor of globalShape with one placement per mesh
// dimension, applied left to right as PyTorch does (dsd_layout_new_placements).
func NewLayoutPlacements(mesh *Mesh, globalShape []int64, placements []Placement) (Layout, error) {
	cp := make([]C.dsd_placement, len(placements), len(placements)+1)
	for i, p := range placements {
		cp[i] = C.dsd_placement{kind: C.dsd_placement_kind(p.Kind), dim: C.int32_t(p.Dim)}
	}
	var pp *C.dsd_placement
	if len(cp) > 0 {
		pp = &cp[0]
	}
	var out C.dsd_layout
	var e *C.dsd_error
	err := wrap(C.dsd_layout_new_placements(meshPtr(mesh), i64ptr(globalShape), C.size_t(len(globalShape)),
		pp, C.size_t(len(cp)), &out, &e), e)
	runtime.KeepAlive(mesh)
	return goLayout(out), err
}

// NewLayoutChunk is a layout for custom sharding: this rank holds the box offsets, sizes of
// the global tensor (dsd_layout_new_chunk).
func NewLayoutChunk(mesh *Mesh, globalShape, offsets, sizes []int64) (Layout, error) {
	if len(offsets) != len(globalShape) || len(sizes) != len(globalShape) {
		return Layout{}, newGoError(ErrInvalidArgument, "offsets and sizes need one entry per dimension of the global shape.")
	}
	var out C.dsd_layout
	var e *C.dsd_error
	err := wrap(C.dsd_layout_new_chunk(meshPtr(mesh), i64ptr(globalShape), C.size_t(len(globalShape)),
		i64ptr(offsets), i64ptr(sizes), &out, &e), e)
	runtime.KeepAlive(mesh)
	return goLayout(out), err
}

// Release releases the handle (dsd_layout_release). ErrStaleHandle for a released or zero
// handle, ErrWrongKind for a handle that is not a layout's.
func (l Layout) Release() error {
	var e *C.dsd_error
	return wrap(C.dsd_layout_release(l.c(), &e), e)
}

// Retain gives a new handle to the same layout (dsd_layout_retain).
func (l Layout) Retain() (Layout, error) {
	var out C.dsd_layout
	var e *C.dsd_error
	err := wrap(C.dsd_layout_retain(l.c(), &out, &e), e)
	return goLayout(out), err
}

// NDim is the tensor's number of dimensions (dsd_layout_ndim).
func (l Layout) NDim() (int, error) {
	var out C.size_t
	var e *C.dsd_error
	err := wrap(C.dsd_layout_ndim(l.c(), &out, &e), e)
	return int(out), err
}

// GlobalShape is the tensor's global shape (dsd_layout_global_shape).
func (l Layout) GlobalShape() ([]int64, error) {
	n, err := l.NDim()
	if err != nil {
		return nil, err
	}
	out := make([]int64, n, n+1)
	var e *C.dsd_error
	if err := wrap(C.dsd_layout_global_shape(l.c(), (*C.int64_t)(unsafe.Pointer(&out[:1][0])), C.size_t(n), &e), e); err != nil {
		return nil, err
	}
	return out, nil
}

// LocalChunk is the box this rank holds (dsd_layout_local_chunk); all zeros for a rank
// outside the mesh.
func (l Layout) LocalChunk() (offsets, sizes []int64, err error) {
	n, err := l.NDim()
	if err != nil {
		return nil, nil, err
	}
	offsets, sizes = make([]int64, n, n+1), make([]int64, n, n+1)
	var e *C.dsd_error
	err = wrap(C.dsd_layout_local_chunk(l.c(), (*C.int64_t)(unsafe.Pointer(&offsets[:1][0])),
		(*C.int64_t)(unsafe.Pointer(&sizes[:1][0])), C.size_t(n), &e), e)
	if err != nil {
		return nil, nil, err
	}
	return offsets, sizes, nil
}

// IsChunk tells whether the layout is an explicit chunk rather than placements
// (dsd_layout_is_chunk).
func (l Layout) IsChunk() (bool, error) {
	var out C.bool
	var e *C.dsd_error
	err := wrap(C.dsd_layout_is_chunk(l.c(), &out, &e), e)
	return bool(out), err
}

// Placements are the placements, one per mesh dimension (dsd_layout_placements).
// ErrWrongKind for an explicit-chunk layout.
func (l Layout) Placements() ([]Placement, error) {
	mesh, err := l.Mesh()
	if err != nil {
		return nil, err
	}
	n, err := mesh.NDim()
	mesh.Close()
	if err != nil {
		return nil, err
	}
	cp := make([]C.dsd_placement, n, n+1)
	var e *C.dsd_error
	if err := wrap(C.dsd_layout_placements(l.c(), &cp[:1][0], C.size_t(n), &e), e); err != nil {
		return nil, err
	}
	out := make([]Placement, n)
	for i, p := range cp {
		out[i] = Placement{Kind: PlacementKind(p.kind), Dim: int32(p.dim)}
	}
	return out, nil
}

// Mesh gives a new reference to the layout's mesh (dsd_layout_mesh).
func (l Layout) Mesh() (*Mesh, error) {
	var out *C.dsd_mesh
	var e *C.dsd_error
	if err := wrap(C.dsd_layout_mesh(l.c(), &out, &e), e); err != nil {
		return nil, err
	}
	return newMesh(out), nil
}

// NewDistTensor is a distributed tensor handle: this rank's local tensor with its layout
// (dsd_tensor_new_dist). Release the new handle; the caller still releases local and
// layout.
func NewDistTensor(local Tensor, layout Layout) (Tensor, error) {
	var out C.dsd_tensor
	var e *C.dsd_error
	err := wrap(C.dsd_tensor_new_dist(local.c(), layout.c(), &out, &e), e)
	return goTensor(out), err
}

// Layout gives a new handle to the layout of a distributed tensor handle
// (dsd_tensor_layout). ErrWrongKind for a plain tensor.
func (t Tensor) Layout() (Layout, error) {
	var out C.dsd_layout
	var e *C.dsd_error
	err := wrap(C.dsd_tensor_layout(t.c(), &out, &e), e)
	return goLayout(out), err
}
