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

// SaveOptions are dsd_save_options. Start from DefaultSaveOptions.
type SaveOptions struct {
	Overwrite        bool   // replace an existing checkpoint (after the new one commits)
	ThreadCount      int32  // writer threads (= data files) per rank; 0: min(4, cores)
	SaveToLowestRank bool   // replicated chunks written by the lowest rank, not balanced
	SyncFiles        bool   // fsync data files before the commit (default true)
	BlockSize        uint64 // bytes per checksummed block, a power of two >= 4096 (4 MiB)
}

// DefaultSaveOptions are the defaults (dsd_save_options_init).
func DefaultSaveOptions() SaveOptions {
	var c C.dsd_save_options
	C.dsd_save_options_init(&c)
	return SaveOptions{
		Overwrite:        bool(c.overwrite),
		ThreadCount:      int32(c.thread_count),
		SaveToLowestRank: bool(c.save_to_lowest_rank),
		SyncFiles:        bool(c.sync_files),
		BlockSize:        uint64(c.block_size),
	}
}

func (o *SaveOptions) c() *C.dsd_save_options {
	if o == nil {
		return nil
	}
	var c C.dsd_save_options
	C.dsd_save_options_init(&c)
	c.overwrite = C.bool(o.Overwrite)
	c.thread_count = C.int32_t(o.ThreadCount)
	c.save_to_lowest_rank = C.bool(o.SaveToLowestRank)
	c.sync_files = C.bool(o.SyncFiles)
	c.block_size = C.uint64_t(o.BlockSize)
	return &c
}

// LoadOptions are dsd_load_options. Start from DefaultLoadOptions.
type LoadOptions struct {
	Strict      bool  // a key missing from the checkpoint is an error (default true)
	ThreadCount int32 // reader threads; 0: min(8, cores)
	Verify      bool  // check the checksum of every byte read (default true)
}

// DefaultLoadOptions are the defaults (dsd_load_options_init).
func DefaultLoadOptions() LoadOptions {
	var c C.dsd_load_options
	C.dsd_load_options_init(&c)
	return LoadOptions{Strict: bool(c.strict), ThreadCount: int32(c.thread_count), Verify: bool(c.verify)}
}

func (o *LoadOptions) c() *C.dsd_load_options {
	if o == nil {
		return nil
	}
	var c C.dsd_load_options
	C.dsd_load_options_init(&c)
	c.strict = C.bool(o.Strict)
	c.thread_count = C.int32_t(o.ThreadCount)
	c.verify = C.bool(o.Verify)
	return &c
}

// Save saves sd to the directory path (dsd_save); comm nil means a single process, opts nil
// the defaults. Tensors must not be written to until it returns. ErrExists when a
// checkpoint is there and !Overwrite.
func Save(comm *Comm, sd *StateDict, path string, opts *SaveOptions) error {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var e *C.dsd_error
	err := wrap(C.dsd_save(commPtr(comm), sdPtr(sd), cpath, opts.c(), &e), e)
	runtime.KeepAlive(comm)
	runtime.KeepAlive(sd)
	return err
}

// Future is an asynchronous save in flight (dsd_future).
type Future struct {
	ptr *C.dsd_future
}

func newFuture(p *C.dsd_future) *Future {
	f := &Future{ptr: p}
	runtime.SetFinalizer(f, (*Future).Close)
	return f
}

func futurePtr(f *Future) *C.dsd_future {
	if f == nil {
		return nil
	}
	return f.ptr
}

// SaveAsync stages sd into reusable host buffers, then writes and commits on a background
// thread (dsd_save_async). When it returns the tensors may be modified again; the save's
// own errors come from Future.Wait.
func SaveAsync(comm *Comm, sd *StateDict, path string, opts *SaveOptions) (*Future, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var out *C.dsd_future
	var e *C.dsd_error
	err := wrap(C.dsd_save_async(commPtr(comm), sdPtr(sd), cpath, opts.c(), &out, &e), e)
	runtime.KeepAlive(comm)
	runtime.KeepAlive(sd)
	if err != nil {
		return nil, err
	}
	return newFuture(out), nil
}

// Wait waits for the save up to timeout (negative: forever), in whole milliseconds
// (dsd_future_wait). nil once committed, ErrTimeout while still running, otherwise the
// save's error.
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
func (f *Future) Close() {
	if f == nil || f.ptr == nil {
		return
	}
	C.dsd_future_free(f.ptr)
	f.ptr = nil
	runtime.SetFinalizer(f, nil)
}

// LoadReportList names one list of a LoadReport (dsd_load_report_list).
type LoadReportList int32

// The lists of a load report.
const (
	LoadReportMissing    LoadReportList = C.DSD_LOAD_REPORT_MISSING    // in the state dict, not in the checkpoint
	LoadReportUnexpected LoadReportList = C.DSD_LOAD_REPORT_UNEXPECTED // in the checkpoint, not in the state dict
	LoadReportSkipped    LoadReportList = C.DSD_LOAD_REPORT_SKIPPED    // left untouched
)

// LoadReport lists the missing, unexpected and skipped keys of a load (dsd_load_report).
type LoadReport struct {
	ptr *C.dsd_load_report
}

func reportPtr(r *LoadReport) *C.dsd_load_report {
	if r == nil {
		return nil
	}
	return r.ptr
}

// Load loads the checkpoint at path into sd in place, resharding as needed (dsd_load). The
// report is always requested; Close it (or leave it to the finalizer).
func Load(comm *Comm, sd *StateDict, path string, opts *LoadOptions) (*LoadReport, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var out *C.dsd_load_report
	var e *C.dsd_error
	err := wrap(C.dsd_load(commPtr(comm), sdPtr(sd), cpath, opts.c(), &out, &e), e)
	runtime.KeepAlive(comm)
	runtime.KeepAlive(sd)
	if err != nil {
		return nil, err
	}
	r := &LoadReport{ptr: out}
	runtime.SetFinalizer(r, (*LoadReport).Close)
	return r, nil
}

// Count is the number of keys in one list (dsd_load_report_count).
func (r *LoadReport) Count(list LoadReportList) (int, error) {
	var out C.size_t
	var e *C.dsd_error
	err := wrap(C.dsd_load_report_count(reportPtr(r), C.dsd_load_report_list(list), &out, &e), e)
	runtime.KeepAlive(r)
	return int(out), err
}

// Key is the key at a position of one list (dsd_load_report_key).
func (r *LoadReport) Key(list LoadReportList, index int) (string, error) {
	var out *C.char
	var e *C.dsd_error
	if err := wrap(C.dsd_load_report_key(reportPtr(r), C.dsd_load_report_list(list), C.size_t(index), &out, &e), e); err != nil {
		return "", err
	}
	s := C.GoString(out)
	runtime.KeepAlive(r)
	return s, nil
}

// Close frees the report (dsd_load_report_free). Idempotent.
func (r *LoadReport) Close() {
	if r == nil || r.ptr == nil {
		return
	}
	C.dsd_load_report_free(r.ptr)
	r.ptr = nil
	runtime.SetFinalizer(r, nil)
}

// LoadFull reads a new state dict of full CPU tensors and values from the checkpoint at
// path, without a communicator; keys selects flat keys or dotted prefixes (none: all)
// (dsd_load_full).
func LoadFull(path string, keys []string) (*StateDict, error) {
	var cs cstrings
	defer cs.free()
	cpath := cs.add(path)
	var out *C.dsd_state_dict
	var e *C.dsd_error
	if err := wrap(C.dsd_load_full(cpath, cs.array(keys), C.size_t(len(keys)), &out, &e), e); err != nil {
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

// CheckpointManager saves to root/step_<N>, moves a `latest` file after each commit and
// keeps the newest keepLast complete checkpoints (dsd_checkpoint_manager).
type CheckpointManager struct {
	ptr *C.dsd_checkpoint_manager
}

func managerPtr(m *CheckpointManager) *C.dsd_checkpoint_manager {
	if m == nil {
		return nil
	}
	return m.ptr
}

// NewCheckpointManager manages the directory root; keepLast <= 0 keeps all
// (dsd_checkpoint_manager_new).
func NewCheckpointManager(root string, keepLast int) (*CheckpointManager, error) {
	croot := C.CString(root)
	defer C.free(unsafe.Pointer(croot))
	var out *C.dsd_checkpoint_manager
	var e *C.dsd_error
	if err := wrap(C.dsd_checkpoint_manager_new(croot, C.int32_t(keepLast), &out, &e), e); err != nil {
		return nil, err
	}
	m := &CheckpointManager{ptr: out}
	runtime.SetFinalizer(m, (*CheckpointManager).Close)
	return m, nil
}

// Close frees the manager, waiting for its asynchronous save in flight
// (dsd_checkpoint_manager_free). Idempotent.
func (m *CheckpointManager) Close() {
	if m == nil || m.ptr == nil {
		return
	}
	C.dsd_checkpoint_manager_free(m.ptr)
	m.ptr = nil
	runtime.SetFinalizer(m, nil)
}

// Save saves step `step` as Save does, then moves `latest` and applies retention
// (dsd_checkpoint_manager_save).
func (m *CheckpointManager) Save(comm *Comm, sd *StateDict, step int64, opts *SaveOptions) error {
	var e *C.dsd_error
	err := wrap(C.dsd_checkpoint_manager_save(managerPtr(m), commPtr(comm), sdPtr(sd), C.int64_t(step), opts.c(), &e), e)
	runtime.KeepAlive(m)
	runtime.KeepAlive(comm)
	runtime.KeepAlive(sd)
	return err
}

// SaveAsync is Save asynchronously, as SaveAsync; `latest` and retention follow the commit
// (dsd_checkpoint_manager_save_async).
func (m *CheckpointManager) SaveAsync(comm *Comm, sd *StateDict, step int64, opts *SaveOptions) (*Future, error) {
	var out *C.dsd_future
	var e *C.dsd_error
	err := wrap(C.dsd_checkpoint_manager_save_async(managerPtr(m), commPtr(comm), sdPtr(sd), C.int64_t(step), opts.c(), &out, &e), e)
	runtime.KeepAlive(m)
	runtime.KeepAlive(comm)
	runtime.KeepAlive(sd)
	if err != nil {
		return nil, err
	}
	return newFuture(out), nil
}

// LatestStep is the newest complete step, and whether there is one
// (dsd_checkpoint_manager_latest_step).
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
// untouched) when there is none (dsd_checkpoint_manager_load_latest).
func (m *CheckpointManager) LoadLatest(comm *Comm, sd *StateDict, opts *LoadOptions) (step int64, found bool, err error) {
	var f C.bool
	var out C.int64_t
	var e *C.dsd_error
	err = wrap(C.dsd_checkpoint_manager_load_latest(managerPtr(m), commPtr(comm), sdPtr(sd), opts.c(), &f, &out, &e), e)
	runtime.KeepAlive(m)
	runtime.KeepAlive(comm)
	runtime.KeepAlive(sd)
	if err != nil || !bool(f) {
		return 0, false, err
	}
	return int64(out), true, nil
}
