package dsd

/*
#include <stdlib.h>
#include <dsd/dsd.h>
*/
import "C"

import (
	"context"
	"errors"
	"io"
	"runtime"
	"sync"
	"time"
	"unsafe"
)

var (
	_ io.Closer = (*AsyncCheckpointer)(nil)
	_ io.Closer = (*Future)(nil)
	_ io.Closer = (*CheckpointManager)(nil)
	_ io.Closer = (*IncompatibleKeys)(nil)
)

// SaveOptions are dsd_checkpoint_save_options. Start from DefaultSaveOptions.
type SaveOptions struct {
	Overwrite        bool   // replace an existing checkpoint (after the new one commits)
	ThreadCount      int32  // writer threads (= data files) per rank; 0: min(4, cores)
	SaveToLowestRank bool   // replicated chunks written by the lowest rank, not balanced
	SyncFiles        bool   // fsync data files before the commit (default true)
	BlockSize        uint64 // bytes per checksummed block, a power of two >= 4096 (4 MiB)
	// As DCP's enable_plan_caching: a save whose structure fingerprint (every rank's keys,
	// dtypes, shapes, chunks, options, world) equals an earlier save's over the same
	// communicator reuses its global plan (default false).
	EnablePlanCaching bool
	// Async saves: the most bytes host staging holds; a larger state is staged in waves, each
	// written before the next is copied, so SaveAsync returns later (0: no cap).
	MaxStagingBytes uint64
	// An incremental save (since ABI 1.2): the path of a dsd checkpoint in the same parent
	// directory (the previous step) whose unchanged chunks (same key, dtype, offsets and
	// sizes, equal bytes) the new checkpoint references instead of writing them again; it
	// then needs the base's files to load (ErrNotFound naming a missing one). "": none.
	// ErrInvalidArgument for a base that is the destination or not its sibling.
	Base string
	// CheckpointManager saves: the base is the newest complete step before this one (none
	// for the first), and retention keeps the files kept steps reference. A plain Save with
	// it and no Base is ErrInvalidArgument.
	Incremental bool
}

// DefaultSaveOptions are the defaults (dsd_checkpoint_save_options_init).
func DefaultSaveOptions() SaveOptions {
	var c C.dsd_checkpoint_save_options
	C.dsd_checkpoint_save_options_init(&c)
	return SaveOptions{
		Overwrite:         bool(c.overwrite),
		ThreadCount:       int32(c.thread_count),
		SaveToLowestRank:  bool(c.save_to_lowest_rank),
		SyncFiles:         bool(c.sync_files),
		BlockSize:         uint64(c.block_size),
		EnablePlanCaching: bool(c.enable_plan_caching),
		MaxStagingBytes:   uint64(c.max_staging_bytes),
		Incremental:       bool(c.incremental),
	}
}

// c converts o, from the C defaults, so that the fields SaveOptions does not have (the
// format: always DSD_FORMAT_DSD) keep them. nil stays NULL. The Base string is made in cs,
// which the caller frees after the call (C only borrows it; an async save copies it).
func (o *SaveOptions) c(cs *cstrings) *C.dsd_checkpoint_save_options {
	if o == nil {
		return nil
	}
	var c C.dsd_checkpoint_save_options
	C.dsd_checkpoint_save_options_init(&c)
	c.overwrite = C.bool(o.Overwrite)
	c.thread_count = C.int32_t(o.ThreadCount)
	c.save_to_lowest_rank = C.bool(o.SaveToLowestRank)
	c.sync_files = C.bool(o.SyncFiles)
	c.block_size = C.uint64_t(o.BlockSize)
	c.enable_plan_caching = C.bool(o.EnablePlanCaching)
	c.max_staging_bytes = C.uint64_t(o.MaxStagingBytes)
	if o.Base != "" {
		c.base = cs.add(o.Base)
	}
	c.incremental = C.bool(o.Incremental)
	return &c
}

// LoadOptions are dsd_checkpoint_load_options. Start from DefaultLoadOptions.
type LoadOptions struct {
	Strict      bool  // a key missing from the checkpoint is an error (default true)
	ThreadCount int32 // reader threads; 0: min(8, cores)
	Verify      bool  // check the checksum of every byte read (default true)
	// At world > 1, a tensor every rank loads whole is read by one rank and broadcast to the
	// others when the ranks span several hosts (default true); with CooperativeLoadOnOneHost
	// also when they share one. Every rank must ask the same.
	CooperativeLoad          bool
	CooperativeLoadOnOneHost bool
}

// DefaultLoadOptions are the defaults (dsd_checkpoint_load_options_init).
func DefaultLoadOptions() LoadOptions {
	var c C.dsd_checkpoint_load_options
	C.dsd_checkpoint_load_options_init(&c)
	return LoadOptions{Strict: bool(c.strict), ThreadCount: int32(c.thread_count), Verify: bool(c.verify),
		CooperativeLoad: bool(c.cooperative_load), CooperativeLoadOnOneHost: bool(c.cooperative_load_on_one_host)}
}

func (o *LoadOptions) c() *C.dsd_checkpoint_load_options {
	if o == nil {
		return nil
	}
	var c C.dsd_checkpoint_load_options
	C.dsd_checkpoint_load_options_init(&c)
	c.strict = C.bool(o.Strict)
	c.thread_count = C.int32_t(o.ThreadCount)
	c.verify = C.bool(o.Verify)
	c.cooperative_load = C.bool(o.CooperativeLoad)
	c.cooperative_load_on_one_host = C.bool(o.CooperativeLoadOnOneHost)
	return &c
}

// Save saves sd to the directory path (dsd_checkpoint_save); comm nil means a single
// process, opts nil the defaults. Tensors must not be written to until it returns.
// ErrExists when a checkpoint is there and !Overwrite. Collective over comm.
func Save(comm *Comm, sd *StateDict, path string, opts *SaveOptions) error {
	return SaveContext(context.Background(), comm, sd, path, opts)
}

// SaveContext is Save bounded by ctx. A save cannot be interrupted inside C, so:
//   - ctx is checked before starting: an ended ctx returns ctx.Err() and writes nothing;
//   - with a ctx that can end (ctx.Done() != nil), the save goes through comm's
//     asynchronous checkpointer, as SaveAsync: sd is first staged into its host buffers
//     (collective, not interruptible, a copy of sd's tensors), then written and committed
//     in the background while SaveContext waits, as Future.WaitContext. When ctx ends during
//     that wait, SaveContext returns ctx.Err() at once and abandons the save: it goes on to
//     completion in the background, may still commit, and its own error is lost; the next
//     save through that checkpointer (and comm.Close) waits for it.
//   - with a ctx that never ends (context.Background()), it is the plain synchronous save,
//     with no staging copy.
//
// Either way sd's tensors may be written again as soon as SaveContext returns.
func SaveContext(ctx context.Context, comm *Comm, sd *StateDict, path string, opts *SaveOptions) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if ctx.Done() != nil {
		ac, err := comm.asyncCheckpointer()
		if err != nil {
			return err
		}
		f, err := ac.saveAsync(ctx, sd, path, opts)
		if err != nil {
			return err
		}
		defer f.Close()
		return f.WaitContext(ctx)
	}
	if err := comm.acquire(ctx); err != nil {
		return err
	}
	defer comm.release()
	var cs cstrings
	defer cs.free()
	cpath := cs.add(path)
	var e *C.dsd_error
	err := wrap(C.dsd_checkpoint_save(commPtr(comm), sdPtr(sd), cpath, opts.c(&cs), &e), e)
	runtime.KeepAlive(comm)
	runtime.KeepAlive(sd)
	return err
}

// AsyncCheckpointer is an asynchronous checkpointer (dsd_async_checkpointer), as PyTorch's
// AsyncCheckpointer: reusable host staging buffers and one background thread that writes
// and commits over its own clone of the communicator, so its collectives never interleave
// with the trainer's. It keeps a reference to the communicator. Close it when done.
type AsyncCheckpointer struct {
	mu   sync.Mutex
	ptr  *C.dsd_async_checkpointer
	comm *Comm // whose turns its saves take (nil: a single process)
}

func checkpointerPtr(a *AsyncCheckpointer) *C.dsd_async_checkpointer {
	if a == nil {
		return nil
	}
	return a.ptr
}

// NewAsyncCheckpointer is a new asynchronous checkpointer over comm (nil: a single process)
// (dsd_async_checkpointer_new). Collective over comm.
func NewAsyncCheckpointer(comm *Comm) (*AsyncCheckpointer, error) {
	if comm != nil && comm.ptr == nil {
		return nil, errClosedComm()
	}
	var out *C.dsd_async_checkpointer
	var e *C.dsd_error
	err := wrap(C.dsd_async_checkpointer_new(commPtr(comm), &out, &e), e)
	runtime.KeepAlive(comm)
	if err != nil {
		return nil, err
	}
	a := &AsyncCheckpointer{ptr: out, comm: comm}
	runtime.SetFinalizer(a, (*AsyncCheckpointer).Close)
	return a, nil
}

// Close waits for the save in flight, stops the thread and frees the staging buffers
// (dsd_async_checkpointer_free). Idempotent; the error is always nil. Futures it gave stay
// usable.
func (a *AsyncCheckpointer) Close() error {
	if a == nil {
		return nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.ptr == nil {
		return nil
	}
	C.dsd_async_checkpointer_free(a.ptr)
	a.ptr = nil
	runtime.SetFinalizer(a, nil)
	return nil
}

// SaveAsync stages sd into the checkpointer's host buffers, then writes and commits on its
// background thread (dsd_checkpoint_save_async); a save still in flight on this
// checkpointer is waited for first. When it returns the tensors may be modified again; the
// save's own errors come from Future.Wait. Collective.
func (a *AsyncCheckpointer) SaveAsync(sd *StateDict, path string, opts *SaveOptions) (*Future, error) {
	return a.saveAsync(context.Background(), sd, path, opts)
}

// saveAsync is SaveAsync waiting for the communicator's turn no longer than ctx.
func (a *AsyncCheckpointer) saveAsync(ctx context.Context, sd *StateDict, path string, opts *SaveOptions) (*Future, error) {
	var cs cstrings
	defer cs.free()
	cpath := cs.add(path)
	if a != nil {
		if err := a.comm.acquire(ctx); err != nil {
			return nil, err
		}
		defer a.comm.release()
		a.mu.Lock()
		defer a.mu.Unlock()
	}
	var out *C.dsd_future
	var e *C.dsd_error
	err := wrap(C.dsd_checkpoint_save_async(checkpointerPtr(a), sdPtr(sd), cpath, opts.c(&cs), &out, &e), e)
	runtime.KeepAlive(sd)
	if err != nil {
		return nil, err
	}
	return newFuture(out, a), nil
}

// Future is an asynchronous save in flight (dsd_future).
type Future struct {
	ptr   *C.dsd_future
	owner any // what made it (an *AsyncCheckpointer or *CheckpointManager), kept reachable
}

func newFuture(p *C.dsd_future, owner any) *Future {
	f := &Future{ptr: p, owner: owner}
	runtime.SetFinalizer(f, (*Future).Close)
	return f
}

func futurePtr(f *Future) *C.dsd_future {
	if f == nil {
		return nil
	}
	return f.ptr
}

// SaveAsync is AsyncCheckpointer.SaveAsync through the checkpointer of comm, which it makes
// on first use (collectively, by every rank) and which comm.Close closes; for a nil comm
// (a single process) a process-wide one, made on first use.
func SaveAsync(comm *Comm, sd *StateDict, path string, opts *SaveOptions) (*Future, error) {
	ac, err := comm.asyncCheckpointer()
	if err != nil {
		return nil, err
	}
	return ac.SaveAsync(sd, path, opts)
}

// Wait waits for the save up to timeout (negative: forever), in whole milliseconds
// (dsd_future_wait). nil once committed, ErrTimeout while still running, otherwise the
// save's error (which may be ErrTimeout too, from the communicator: IsDone tells them
// apart; WaitContext does).
func (f *Future) Wait(timeout time.Duration) error {
	ms := int64(-1)
	if timeout >= 0 {
		ms = timeout.Milliseconds()
	}
	var e *C.dsd_error
	err := wrap(C.dsd_future_wait(futurePtr(f), C.int64_t(ms), &e), e)
	runtime.KeepAlive(f)
	return err
}

// futurePoll is how long WaitContext blocks in dsd_future_wait between two looks at ctx.
const futurePoll = 10 * time.Millisecond

// WaitContext waits for the save until it finishes or ctx ends: nil once committed, the
// save's error if it failed, ctx.Err() when ctx ended first (checked before waiting, then
// at least every 10 ms). An ended ctx abandons the wait, not the save, which goes on in the
// background: wait again, or Close the future. Unlike Wait, it never returns ErrTimeout
// for a save still running.
func (f *Future) WaitContext(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if ctx.Done() == nil {
		return f.Wait(-1)
	}
	for {
		err := f.Wait(futurePoll)
		if !errors.Is(err, ErrTimeout) {
			return err
		}
		// ErrTimeout is also a save's own error (a peer that did not come): tell them apart.
		if done, derr := f.IsDone(); derr != nil {
			return derr
		} else if done {
			return f.Wait(0)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
	}
}

// IsStaged tells whether the state has been staged (dsd_future_is_staged).
func (f *Future) IsStaged() (bool, error) {
	var out C.bool
	var e *C.dsd_error
	err := wrap(C.dsd_future_is_staged(futurePtr(f), &out, &e), e)
	runtime.KeepAlive(f)
	return bool(out), err
}

// IsDone tells whether the save has finished, committed or failed (dsd_future_is_done).
func (f *Future) IsDone() (bool, error) {
	var out C.bool
	var e *C.dsd_error
	err := wrap(C.dsd_future_is_done(futurePtr(f), &out, &e), e)
	runtime.KeepAlive(f)
	return bool(out), err
}

// Close frees the future; a save in flight goes on to completion (dsd_future_free).
// Idempotent; the error is always nil.
func (f *Future) Close() error {
	if f == nil || f.ptr == nil {
		return nil
	}
	C.dsd_future_free(f.ptr)
	f.ptr = nil
	runtime.SetFinalizer(f, nil)
	return nil
}

// LoadReportList names one list of a LoadReport: the KeyList of IncompatibleKeys.
type LoadReportList = KeyList

// The lists of a load report (KeysMissing, KeysUnexpected, KeysSkipped).
const (
	LoadReportMissing    = KeysMissing    // in the state dict, not in the checkpoint
	LoadReportUnexpected = KeysUnexpected // in the checkpoint, not in the state dict
	LoadReportSkipped    = KeysSkipped    // left untouched
)

// LoadReport lists the missing, unexpected and skipped keys of a checkpoint load: the
// IncompatibleKeys a load returns (dsd_incompatible_keys).
type LoadReport = IncompatibleKeys

// Load loads the checkpoint at path into sd in place, resharding as needed
// (dsd_checkpoint_load). The report is always requested; Close it (or leave it to the
// finalizer). Collective over comm.
func Load(comm *Comm, sd *StateDict, path string, opts *LoadOptions) (*LoadReport, error) {
	return LoadContext(context.Background(), comm, sd, path, opts)
}

// LoadContext is Load bounded by ctx, as far as a load can be: ctx is checked before
// starting (an ended ctx returns ctx.Err() and leaves sd untouched), and bounds the wait for
// the communicator's turn (see Comm). Once started, the load runs to completion and its own
// result is returned even if ctx ends meanwhile: it writes into sd's tensors in place, so it
// cannot be abandoned while running. A collective: when one rank's ctx ends before it
// starts, its peers wait for it up to the communicator's timeout.
func LoadContext(ctx context.Context, comm *Comm, sd *StateDict, path string, opts *LoadOptions) (*LoadReport, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := comm.acquire(ctx); err != nil {
		return nil, err
	}
	defer comm.release()
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var out *C.dsd_incompatible_keys
	var e *C.dsd_error
	err := wrap(C.dsd_checkpoint_load(commPtr(comm), sdPtr(sd), cpath, opts.c(), &out, &e), e)
	runtime.KeepAlive(comm)
	runtime.KeepAlive(sd)
	if err != nil {
		return nil, err
	}
	return newIncompatibleKeys(out), nil
}

// LoadFull reads a new state dict of full CPU tensors and values from the checkpoint at
// path, without a communicator; keys selects flat keys or dotted prefixes (none: all)
// (dsd_checkpoint_load_full).
func LoadFull(path string, keys []string) (*StateDict, error) {
	var cs cstrings
	defer cs.free()
	cpath := cs.add(path)
	var out *C.dsd_state_dict
	var e *C.dsd_error
	if err := wrap(C.dsd_checkpoint_load_full(cpath, cs.array(keys), C.size_t(len(keys)), &out, &e), e); err != nil {
		return nil, err
	}
	return newStateDict(out), nil
}

// CheckpointVerify reads every chunk of the checkpoint at path and checks its checksums
// (dsd_checkpoint_verify). ErrCorrupt names the first damaged file and key.
func CheckpointVerify(path string) error {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var e *C.dsd_error
	return wrap(C.dsd_checkpoint_verify(cpath, &e), e)
}

// GCReport is what CheckpointGC removed (dsd_checkpoint_gc_report).
type GCReport struct {
	RetiredRemoved int64  // retired checkpoint directories removed whole
	FilesRemoved   int64  // unreferenced data files removed from retired ones kept
	BytesRemoved   uint64 // bytes of everything removed
}

// CheckpointGC collects the incremental checkpoints under root as a manager's retention
// does (dsd_checkpoint_gc): a retired checkpoint (its checkpoint.json renamed to
// checkpoint.retired.json) loses the data files no live checkpoint of root references, and
// is removed whole once none is referenced. The references are counted before anything is
// removed, so a kill at any moment leaves every live checkpoint loadable. Not collective:
// one process runs it, while no save takes a retired checkpoint as its base. ErrNotFound
// when there is no root, ErrIO (also for a live manifest that cannot be read: nothing is
// removed then).
func CheckpointGC(root string) (GCReport, error) {
	croot := C.CString(root)
	defer C.free(unsafe.Pointer(croot))
	var out C.dsd_checkpoint_gc_report
	var e *C.dsd_error
	if err := wrap(C.dsd_checkpoint_gc(croot, &out, &e), e); err != nil {
		return GCReport{}, err
	}
	return GCReport{RetiredRemoved: int64(out.retired_removed), FilesRemoved: int64(out.files_removed),
		BytesRemoved: uint64(out.bytes_removed)}, nil
}

// CheckpointManager saves to root/step_<N>, moves a `latest` file after each commit and
// keeps the newest keepLast complete checkpoints (dsd_checkpoint_manager). Its saves and
// loads are collective over the communicator it was made with, which it keeps; its
// asynchronous saves go through its own asynchronous checkpointer.
type CheckpointManager struct {
	ptr  *C.dsd_checkpoint_manager
	comm *Comm // whose turns its collectives take
}

func managerPtr(m *CheckpointManager) *C.dsd_checkpoint_manager {
	if m == nil {
		return nil
	}
	return m.ptr
}

// NewCheckpointManager manages the directory root over comm (nil: a single process);
// keepLast <= 0 keeps all (dsd_checkpoint_manager_new). Collective over comm.
func NewCheckpointManager(comm *Comm, root string, keepLast int) (*CheckpointManager, error) {
	if comm != nil && comm.ptr == nil {
		return nil, errClosedComm()
	}
	croot := C.CString(root)
	defer C.free(unsafe.Pointer(croot))
	var out *C.dsd_checkpoint_manager
	var e *C.dsd_error
	err := wrap(C.dsd_checkpoint_manager_new(commPtr(comm), croot, C.int32_t(keepLast), &out, &e), e)
	runtime.KeepAlive(comm)
	if err != nil {
		return nil, err
	}
	m := &CheckpointManager{ptr: out, comm: comm}
	runtime.SetFinalizer(m, (*CheckpointManager).Close)
	return m, nil
}

// Close frees the manager, waiting for its asynchronous save in flight
// (dsd_checkpoint_manager_free). Idempotent; the error is always nil.
func (m *CheckpointManager) Close() error {
	if m == nil || m.ptr == nil {
		return nil
	}
	C.dsd_checkpoint_manager_free(m.ptr)
	m.ptr = nil
	runtime.SetFinalizer(m, nil)
	return nil
}

// turn waits for the turn of the manager's communicator (see Comm); pair with done.
func (m *CheckpointManager) turn() *Comm {
	var c *Comm
	if m != nil {
		c = m.comm
	}
	c.acquire(context.Background())
	return c
}

// Save saves step `step` as Save does, then moves `latest` and applies retention
// (dsd_checkpoint_manager_save). Collective.
func (m *CheckpointManager) Save(sd *StateDict, step int64, opts *SaveOptions) error {
	defer m.turn().release()
	var cs cstrings
	defer cs.free()
	var e *C.dsd_error
	err := wrap(C.dsd_checkpoint_manager_save(managerPtr(m), sdPtr(sd), C.int64_t(step), opts.c(&cs), &e), e)
	runtime.KeepAlive(m)
	runtime.KeepAlive(sd)
	return err
}

// SaveAsync is Save asynchronously, as AsyncCheckpointer.SaveAsync; `latest` and retention
// follow the commit (dsd_checkpoint_manager_save_async). Collective.
func (m *CheckpointManager) SaveAsync(sd *StateDict, step int64, opts *SaveOptions) (*Future, error) {
	defer m.turn().release()
	var cs cstrings
	defer cs.free()
	var out *C.dsd_future
	var e *C.dsd_error
	err := wrap(C.dsd_checkpoint_manager_save_async(managerPtr(m), sdPtr(sd), C.int64_t(step), opts.c(&cs), &out, &e), e)
	runtime.KeepAlive(m)
	runtime.KeepAlive(sd)
	if err != nil {
		return nil, err
	}
	return newFuture(out, m), nil
}

// LatestStep is the newest complete step, and whether there is one
// (dsd_checkpoint_manager_latest_step). Not collective.
func (m *CheckpointManager) LatestStep() (step int64, found bool, err error) {
	var f C.bool
	var out C.int64_t
	var e *C.dsd_error
	err = wrap(C.dsd_checkpoint_manager_latest_step(managerPtr(m), &f, &out, &e), e)
	runtime.KeepAlive(m)
	if err != nil || !bool(f) {
		return 0, false, err
	}
	return int64(out), true, nil
}

// LoadLatest loads the newest complete step into sd as Load does; found is false (and sd
// untouched) when there is none (dsd_checkpoint_manager_load_latest). Collective.
func (m *CheckpointManager) LoadLatest(sd *StateDict, opts *LoadOptions) (step int64, found bool, err error) {
	defer m.turn().release()
	var f C.bool
	var out C.int64_t
	var e *C.dsd_error
	err = wrap(C.dsd_checkpoint_manager_load_latest(managerPtr(m), sdPtr(sd), opts.c(), &f, &out, &e), e)
	runtime.KeepAlive(m)
	runtime.KeepAlive(sd)
	if err != nil || !bool(f) {
		return 0, false, err
	}
	return int64(out), true, nil
}
