package dsd

/*
#include <stdlib.h>
#include <dsd/dsd.h>
*/
import "C"

import (
	"context"
	"io"
	"runtime"
	"sync"
	"time"
	"unsafe"
)

var (
	_ io.Closer = (*Comm)(nil)
	_ io.Closer = (*Mesh)(nil)
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
// or a single local rank. Reference-counted inside: meshes, layouts, models, checkpointers
// and managers keep it alive, so Close as soon as you are done with it. Its rank and size
// are read once, when it is made. A nil *Comm means a single process (rank 0 of 1).
//
// The collectives made through a Comm (Barrier, Save, Load, SaveAsync given this Comm) take
// turns: one at a time, in the order they were called, whichever goroutine calls them, as
// the C communicator requires. A barrier abandoned by BarrierContext keeps its turn until it
// completes.
type Comm struct {
	ptr        *C.dsd_comm
	rank, size int
	turn       chan struct{} // holds a token while a collective runs on the communicator

	mu    sync.Mutex
	async *AsyncCheckpointer // the package-level SaveAsync's, made on its first use
}

func newComm(p *C.dsd_comm) (*Comm, error) {
	var rank, size C.int32_t
	var e *C.dsd_error
	err := wrap(C.dsd_comm_rank(p, &rank, &e), e)
	if err == nil {
		var e2 *C.dsd_error
		err = wrap(C.dsd_comm_size(p, &size, &e2), e2)
	}
	if err != nil {
		C.dsd_comm_release(p)
		return nil, err
	}
	c := &Comm{ptr: p, rank: int(rank), size: int(size), turn: make(chan struct{}, 1)}
	runtime.SetFinalizer(c, (*Comm).Close)
	return c, nil
}

func commPtr(c *Comm) *C.dsd_comm {
	if c == nil {
		return nil
	}
	return c.ptr
}

// acquire waits for the communicator's turn, or for ctx to end (then ctx.Err()). A nil
// Comm has no turns: its collectives are local. Pair with release.
func (c *Comm) acquire(ctx context.Context) error {
	if c == nil {
		return ctx.Err()
	}
	select {
	case c.turn <- struct{}{}:
		return nil
	default:
	}
	select {
	case c.turn <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c *Comm) release() {
	if c != nil {
		<-c.turn
	}
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
	return newComm(out)
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
	return newComm(out)
}

// NewCommNCCL wraps a caller-owned ncclComm_t and cudaStream_t (nil: the default stream),
// which must outlive the communicator and everything referring to it (dsd_comm_new_nccl).
func NewCommNCCL(ncclComm, cudaStream unsafe.Pointer, rank, size int, opts *CommOptions) (*Comm, error) {
	var out *C.dsd_comm
	var e *C.dsd_error
	if err := wrap(C.dsd_comm_new_nccl(ncclComm, cudaStream, C.int32_t(rank), C.int32_t(size), opts.c(), &out, &e), e); err != nil {
		return nil, err
	}
	return newComm(out)
}

// NewCommLocal is a communicator of a single rank (dsd_comm_new_local).
func NewCommLocal() (*Comm, error) {
	var out *C.dsd_comm
	var e *C.dsd_error
	if err := wrap(C.dsd_comm_new_local(&out, &e), e); err != nil {
		return nil, err
	}
	return newComm(out)
}

// Close drops this reference (dsd_comm_release). It first closes the asynchronous
// checkpointer the package-level SaveAsync and SaveContext made for this communicator, if
// any, which waits for its save in flight. A barrier abandoned by BarrierContext holds its
// own reference until it completes, so Close does not wait for it. Idempotent; the error
// is always nil (Close makes Comm an io.Closer).
func (c *Comm) Close() error {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ptr == nil {
		return nil
	}
	if c.async != nil {
		c.async.Close()
		c.async = nil
	}
	C.dsd_comm_release(c.ptr)
	c.ptr = nil
	runtime.SetFinalizer(c, nil)
	return nil
}

// asyncCheckpointer is the checkpointer of the package-level SaveAsync over c: c's own, made
// on first use (collective, as the SaveAsync that asks for it) and closed with c, or for a
// nil c the process-wide single-process one, made on first use and never closed.
func (c *Comm) asyncCheckpointer() (*AsyncCheckpointer, error) {
	if c == nil {
		localAsync.mu.Lock()
		defer localAsync.mu.Unlock()
		if localAsync.ac == nil {
			ac, err := NewAsyncCheckpointer(nil)
			if err != nil {
				return nil, err
			}
			localAsync.ac = ac
		}
		return localAsync.ac, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ptr == nil {
		return nil, errClosedComm()
	}
	if c.async == nil {
		ac, err := NewAsyncCheckpointer(c)
		if err != nil {
			return nil, err
		}
		c.async = ac
	}
	return c.async, nil
}

// localAsync is the single-process checkpointer of SaveAsync(nil, ...).
var localAsync struct {
	mu sync.Mutex
	ac *AsyncCheckpointer
}

func errClosedComm() error {
	return newGoError(ErrInvalidArgument, "comm was closed (a nil *Comm means a single process).")
}

// Rank is this process's rank (dsd_comm_rank, read when the communicator was made); 0 for
// a nil Comm.
func (c *Comm) Rank() int {
	if c == nil {
		return 0
	}
	return c.rank
}

// Size is the number of ranks (dsd_comm_size, read when the communicator was made); 1 for
// a nil Comm.
func (c *Comm) Size() int {
	if c == nil {
		return 1
	}
	return c.size
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

// Barrier returns once every rank has called it (dsd_comm_barrier); at once for a nil Comm
// (a single process). Collective. It is BarrierContext with a context that never ends.
func (c *Comm) Barrier() error { return c.BarrierContext(context.Background()) }

// BarrierContext is Barrier bounded by ctx. A barrier cannot be interrupted inside C, so:
//   - ctx is checked before starting: an ended ctx returns ctx.Err() and enters no barrier
//     (nor waits for the communicator's turn past ctx's end);
//   - when ctx ends while the peers have not all arrived, BarrierContext returns ctx.Err()
//     at once and abandons the barrier, which stays in flight in the background and
//     completes when the peers reach it (or fails within the communicator's timeout). It
//     keeps the communicator's turn until then: the next collective through this Comm
//     (Barrier, Save, Load, SaveAsync) waits for it, so the collectives stay matched on
//     every rank. Collectives made through a Model or a CheckpointManager over the same
//     communicator do not take turns: start none of them until a call through the Comm
//     has succeeded after the abandoned barrier.
//
// The communicator's own timeout (CommOptions.Timeout) still applies; ctx only shortens how
// long this goroutine waits.
func (c *Comm) BarrierContext(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if c == nil {
		return nil // a single process
	}
	if c.ptr == nil {
		return errClosedComm()
	}
	if err := c.acquire(ctx); err != nil {
		return err
	}
	if ctx.Done() == nil { // a context that never ends: no goroutine needed
		defer c.release()
		var e *C.dsd_error
		err := wrap(C.dsd_comm_barrier(c.ptr, &e), e)
		runtime.KeepAlive(c)
		return err
	}
	// The barrier runs on its own goroutine with its own reference to the communicator, so
	// that it may outlive this call (and a Close).
	p := C.dsd_comm_retain(c.ptr)
	done := make(chan error, 1)
	go func() {
		defer c.release()
		defer C.dsd_comm_release(p)
		var e *C.dsd_error
		done <- wrap(C.dsd_comm_barrier(p, &e), e)
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
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
// each position in row-major order, as many as the product of the sizes (nil: 0, 1, 2, ...)
// (dsd_mesh_new). Not collective.
func NewMesh(comm *Comm, shape []int64, ranks []int32, deviceType DeviceType) (*Mesh, error) {
	var rp *C.int32_t
	if len(ranks) > 0 {
		rp = (*C.int32_t)(unsafe.Pointer(&ranks[0]))
	}
	var out *C.dsd_mesh
	var e *C.dsd_error
	err := wrap(C.dsd_mesh_new(commPtr(comm), i64ptr(shape), C.size_t(len(shape)), rp, C.size_t(len(ranks)),
		C.dsd_device_type(deviceType), &out, &e), e)
	runtime.KeepAlive(comm)
	if err != nil {
		return nil, err
	}
	return newMesh(out), nil
}

// Close drops this reference (dsd_mesh_release). Idempotent; the error is always nil.
func (m *Mesh) Close() error {
	if m == nil || m.ptr == nil {
		return nil
	}
	C.dsd_mesh_release(m.ptr)
	m.ptr = nil
	runtime.SetFinalizer(m, nil)
	return nil
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
func (m *Mesh) Ranks() ([]int32, error) {
	shape, err := m.Shape()
	if err != nil {
		return nil, err
	}
	n := int64(1)
	for _, s := range shape {
		n *= s
	}
	out := make([]int32, n, n+1) // never empty storage: cgo needs an address
	var e *C.dsd_error
	err = wrap(C.dsd_mesh_ranks(meshPtr(m), (*C.int32_t)(unsafe.Pointer(&out[:1][0])), C.size_t(n), &e), e)
	runtime.KeepAlive(m)
	if err != nil {
		return nil, err
	}
	return out, nil
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
	var out C.dsd_device_type
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
	err = wrap(C.dsd_mesh_coordinate(meshPtr(m), &in, (*C.int64_t)(unsafe.Pointer(&out[:1][0])), C.size_t(n), &e), e)
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
