package dsd_test

import (
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"dsd.dev/dsd"
)

// checkpointTree is {"model": {"w": f32 3x4, "b": f64 2}, "step": 7, "lr": 0.1, "name",
// "blob", "betas": (0.9, 0.999)}, with tensor values from seed (0: zeros) and scalars
// different when seed is 0; bufs are the tensors' memory.
func checkpointTree(t *testing.T, seed float32) (*dsd.StateDict, []*dsd.HostBuffer) {
	t.Helper()
	w, err := dsd.NewHostBuffer(12 * 4)
	must(t, err)
	b, err := dsd.NewHostBuffer(2 * 8)
	must(t, err)
	if seed != 0 {
		for i := range w.Float32s() {
			w.Float32s()[i] = seed * float32(i+1)
		}
		b.Float64s()[0], b.Float64s()[1] = float64(seed)/3, -float64(seed)
	}
	model := mustDict(t)
	defer model.Close()
	for _, e := range []struct {
		key   string
		buf   *dsd.HostBuffer
		dtype dsd.DType
		shape []int64
	}{{"w", w, dsd.DTypeF32, []int64{3, 4}}, {"b", b, dsd.DTypeF64, []int64{2}}} {
		h, err := e.buf.Wrap(0, e.dtype, e.shape, false)
		must(t, err)
		must(t, model.SetTensor(e.key, h))
		must(t, h.Release())
	}
	sd := mustDict(t)
	must(t, sd.SetChild("model", model))
	scalars := seed != 0
	pick := func(a, b int64) int64 {
		if scalars {
			return a
		}
		return b
	}
	must(t, sd.SetInt("step", pick(7, 0)))
	must(t, sd.SetDouble("lr", float64(pick(10, 0))/100))
	must(t, sd.SetString("name", map[bool]string{true: "adam", false: ""}[scalars]))
	must(t, sd.SetBytes("blob", []byte(map[bool]string{true: "\x00\x01", false: ""}[scalars])))
	betas, err := dsd.NewStateDictList(true)
	must(t, err)
	must(t, betas.AppendDouble(0.9))
	must(t, betas.AppendDouble(0.999))
	must(t, sd.SetChild("betas", betas))
	betas.Close()
	return sd, []*dsd.HostBuffer{w, b}
}

func freeAll(bufs []*dsd.HostBuffer) {
	for _, b := range bufs {
		b.Close()
	}
}

func expectEqual(t *testing.T, a, b *dsd.StateDict) {
	t.Helper()
	equal, why, err := dsd.StateDictEqual(a, b)
	must(t, err)
	if !equal {
		t.Fatalf("state dicts differ: %s", why)
	}
}

func TestCheckpointSaveLoad(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ckpt")
	src, srcBufs := checkpointTree(t, 1.5)
	defer src.Close()
	defer freeAll(srcBufs)
	must(t, dsd.Save(nil, src, dir, nil))
	must(t, dsd.CheckpointVerify(dir))
	if _, err := os.Stat(filepath.Join(dir, "checkpoint.json")); err != nil {
		t.Fatalf("no manifest: %v", err)
	}

	dst, dstBufs := checkpointTree(t, 0)
	defer dst.Close()
	defer freeAll(dstBufs)
	report, err := dsd.Load(nil, dst, dir, nil)
	must(t, err)
	for _, list := range []dsd.LoadReportList{dsd.LoadReportMissing, dsd.LoadReportUnexpected} {
		if keys, err := report.Keys(list); err != nil || len(keys) != 0 {
			t.Errorf("report list %d: %v %v", list, keys, err)
		}
	}
	report.Close()
	expectEqual(t, src, dst)
	// In place: the loaded bytes are in the trainer's own memory.
	if dstBufs[0].Float32s()[11] != 18 {
		t.Errorf("w[11] = %v after load", dstBufs[0].Float32s()[11])
	}

	// Refusing to overwrite, naming the path; overwriting when asked.
	expectError(t, dsd.Save(nil, src, dir, nil), dsd.ErrExists, dir)
	opts := dsd.DefaultSaveOptions()
	if !opts.SyncFiles || opts.BlockSize == 0 || opts.Overwrite {
		t.Errorf("save defaults %+v", opts)
	}
	opts.Overwrite = true
	opts.ThreadCount = 2
	must(t, dsd.Save(nil, src, dir, &opts))

	_, err = dsd.Load(nil, dst, filepath.Join(t.TempDir(), "nothing"), nil)
	expectError(t, err, dsd.ErrNotFound, "nothing")

	// A key the checkpoint lacks: an error when strict, reported otherwise.
	must(t, dst.SetInt("epoch", 1))
	_, err = dsd.Load(nil, dst, dir, nil)
	expectError(t, err, dsd.ErrNotFound, "epoch")
	lopts := dsd.DefaultLoadOptions()
	if !lopts.Strict || !lopts.Verify {
		t.Errorf("load defaults %+v", lopts)
	}
	lopts.Strict = false
	report, err = dsd.Load(nil, dst, dir, &lopts)
	must(t, err)
	missing, err := report.Keys(dsd.LoadReportMissing)
	must(t, err)
	_, err = report.Count(dsd.LoadReportList(0)) // 0 is never a list
	expectError(t, err, dsd.ErrInvalidArgument, "")
	_, err = report.Key(dsd.KeysMissing, len(missing))
	expectError(t, err, dsd.ErrInvalidArgument, "")
	report.Close()
	if !reflect.DeepEqual(missing, []string{"epoch"}) {
		t.Errorf("missing keys %v", missing)
	}
	_, err = report.Count(dsd.LoadReportList(9))
	expectError(t, err, dsd.ErrInvalidArgument, "") // closed: NULL

	// A flipped byte in a data file.
	files, err := filepath.Glob(filepath.Join(dir, "*.safetensors"))
	must(t, err)
	if len(files) == 0 {
		t.Fatalf("no data files in %s", dir)
	}
	data, err := os.ReadFile(files[0])
	must(t, err)
	data[len(data)-1] ^= 0xff
	must(t, os.WriteFile(files[0], data, 0o644))
	expectError(t, dsd.CheckpointVerify(dir), dsd.ErrCorrupt, filepath.Base(files[0]))
}

func TestCheckpointAsyncAndLoadFull(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "async")
	src, srcBufs := checkpointTree(t, 2)
	defer src.Close()
	defer freeAll(srcBufs)
	saved := append([]float32(nil), srcBufs[0].Float32s()...)

	future, err := dsd.SaveAsync(nil, src, dir, nil)
	must(t, err)
	staged, err := future.IsStaged()
	must(t, err)
	if !staged {
		t.Errorf("not staged when SaveAsync returned")
	}
	// Staged: the trainer may write again at once.
	for i := range srcBufs[0].Float32s() {
		srcBufs[0].Float32s()[i] = -1
	}
	must(t, future.Wait(-1))
	done, err := future.IsDone()
	must(t, err)
	if !done {
		t.Errorf("not done after Wait")
	}
	must(t, future.Wait(0))
	future.Close()
	future.Close()

	full, err := dsd.LoadFull(dir, nil)
	must(t, err)
	defer full.Close()
	modelAny, err := full.Get("model")
	must(t, err)
	model := modelAny.(*dsd.StateDict)
	defer model.Close()
	wAny, err := model.Get("w")
	must(t, err)
	got, err := dsd.Float32s(wAny.(dsd.Tensor))
	must(t, err)
	must(t, wAny.(dsd.Tensor).Release())
	if !reflect.DeepEqual(got, saved) {
		t.Errorf("the async save has %v, not the values at save time %v", got, saved)
	}
	step, err := full.Get("step")
	must(t, err)
	if step != int64(7) {
		t.Errorf("step %v", step)
	}

	sub, err := dsd.LoadFull(dir, []string{"model"})
	must(t, err)
	keys, err := sub.Keys()
	must(t, err)
	sub.Close()
	if !reflect.DeepEqual(keys, []string{"model"}) {
		t.Errorf("LoadFull(model) has keys %v", keys)
	}
	_, err = dsd.LoadFull(dir, []string{"nope"})
	expectError(t, err, dsd.ErrNotFound, "nope")

	// An async save that fails reports through Wait.
	future, err = dsd.SaveAsync(nil, src, dir, nil)
	if err == nil {
		err = future.Wait(time.Minute)
		future.Close()
	}
	expectError(t, err, dsd.ErrExists, dir)
}

func TestCheckpointManager(t *testing.T) {
	root := t.TempDir()
	src, srcBufs := checkpointTree(t, 3)
	defer src.Close()
	defer freeAll(srcBufs)
	mgr, err := dsd.NewCheckpointManager(nil, root, 2)
	must(t, err)
	defer mgr.Close()
	if _, found, err := mgr.LatestStep(); err != nil || found {
		t.Fatalf("an empty root has a latest step (%v)", err)
	}
	dst, dstBufs := checkpointTree(t, 0)
	defer dst.Close()
	defer freeAll(dstBufs)
	if _, found, err := mgr.LoadLatest(dst, nil); err != nil || found {
		t.Fatalf("loaded from an empty root (%v)", err)
	}

	must(t, mgr.Save(src, 10, nil))
	must(t, mgr.Save(src, 20, nil))
	srcBufs[0].Float32s()[0] = 42
	future, err := mgr.SaveAsync(src, 30, nil)
	must(t, err)
	must(t, future.Wait(-1))
	future.Close()

	step, found, err := mgr.LatestStep()
	must(t, err)
	if !found || step != 30 {
		t.Fatalf("latest step %d (found %v)", step, found)
	}
	entries, err := os.ReadDir(root)
	must(t, err)
	var steps []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "step_") {
			steps = append(steps, e.Name())
		}
	}
	sort.Strings(steps)
	if !reflect.DeepEqual(steps, []string{"step_20", "step_30"}) {
		t.Errorf("kept %v, want the newest two", steps)
	}
	step, found, err = mgr.LoadLatest(dst, nil)
	must(t, err)
	if !found || step != 30 {
		t.Fatalf("load latest: step %d found %v", step, found)
	}
	expectEqual(t, src, dst)

	// A manager over a communicator keeps it: closing the caller's reference first is safe.
	comm, err := dsd.NewCommLocal()
	must(t, err)
	overComm, err := dsd.NewCheckpointManager(comm, filepath.Join(t.TempDir(), "comm"), 0)
	comm.Close()
	must(t, err)
	defer overComm.Close()
	must(t, overComm.Save(src, 1, nil))
	future, err = overComm.SaveAsync(src, 2, nil)
	must(t, err)
	must(t, future.Wait(-1))
	future.Close()
	if step, found, err := overComm.LatestStep(); err != nil || !found || step != 2 {
		t.Fatalf("latest step over a communicator: %d %v %v", step, found, err)
	}
	_, err = dsd.NewCheckpointManager(comm, root, 0)
	expectError(t, err, dsd.ErrInvalidArgument, "closed")
	overComm.Close()
	expectError(t, overComm.Save(src, 3, nil), dsd.ErrInvalidArgument, "")
}

// An explicit asynchronous checkpointer over a communicator, and the package-level SaveAsync
// through the one a communicator makes on first use and closes with itself.
func TestCheckpointAsyncCheckpointer(t *testing.T) {
	src, srcBufs := checkpointTree(t, 4)
	defer src.Close()
	defer freeAll(srcBufs)
	comm, err := dsd.NewCommLocal()
	must(t, err)
	defer comm.Close()
	ac, err := dsd.NewAsyncCheckpointer(comm)
	must(t, err)
	defer ac.Close()
	root := t.TempDir()
	var futures []*dsd.Future
	for i, name := range []string{"a", "b"} {
		srcBufs[0].Float32s()[0] = float32(i + 100)
		// The second save waits for the first: both complete, with the values of their time.
		f, err := ac.SaveAsync(src, filepath.Join(root, name), nil)
		must(t, err)
		futures = append(futures, f)
	}
	for i, f := range futures {
		must(t, f.Wait(-1))
		f.Close()
		full, err := dsd.LoadFull(filepath.Join(root, []string{"a", "b"}[i]), []string{"model.w"})
		must(t, err)
		m, err := full.Get("model")
		must(t, err)
		w, err := m.(*dsd.StateDict).Get("w")
		must(t, err)
		got, err := dsd.Float32s(w.(dsd.Tensor))
		must(t, err)
		must(t, w.(dsd.Tensor).Release())
		m.(*dsd.StateDict).Close()
		full.Close()
		if got[0] != float32(i+100) {
			t.Errorf("save %d has w[0] = %v", i, got[0])
		}
	}
	// A future outlives its checkpointer.
	last, err := ac.SaveAsync(src, filepath.Join(root, "c"), nil)
	must(t, err)
	ac.Close()
	ac.Close()
	must(t, last.Wait(time.Minute))
	last.Close()
	must(t, dsd.CheckpointVerify(filepath.Join(root, "c")))
	_, err = ac.SaveAsync(src, filepath.Join(root, "d"), nil)
	expectError(t, err, dsd.ErrInvalidArgument, "")

	// The package-level SaveAsync over comm, twice through the same checkpointer.
	for _, name := range []string{"e", "f"} {
		f, err := dsd.SaveAsync(comm, src, filepath.Join(root, name), nil)
		must(t, err)
		must(t, f.Wait(-1))
		f.Close()
	}
	f, err := dsd.SaveAsync(comm, src, filepath.Join(root, "g"), nil)
	must(t, err)
	comm.Close() // closes the checkpointer, waiting for the save in flight
	must(t, f.Wait(0))
	f.Close()
	must(t, dsd.CheckpointVerify(filepath.Join(root, "g")))
	_, err = dsd.SaveAsync(comm, src, filepath.Join(root, "h"), nil)
	expectError(t, err, dsd.ErrInvalidArgument, "closed")
	_, err = dsd.NewAsyncCheckpointer(comm)
	expectError(t, err, dsd.ErrInvalidArgument, "closed")
}
