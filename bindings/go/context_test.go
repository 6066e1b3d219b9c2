package dsd_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"dsd.dev/dsd"
)

// bigStateDict is a state dict of n float32 tensors of mib MiB each, filled with a ramp
// (zeros when zero is set), in host buffers closed when the test ends.
func bigStateDict(t *testing.T, n, mib int, zero bool) (*dsd.StateDict, []*dsd.HostBuffer) {
	t.Helper()
	sd := mustDict(t)
	t.Cleanup(func() { sd.Close() })
	var bufs []*dsd.HostBuffer
	for i := 0; i < n; i++ {
		buf, err := dsd.NewHostBuffer(mib << 20)
		must(t, err)
		t.Cleanup(func() { buf.Close() })
		data := buf.Float32s()
		if !zero {
			for j := range data {
				data[j] = float32(i*7 + j%1000)
			}
		}
		h, err := buf.Wrap(0, dsd.DTypeF32, []int64{int64(len(data))}, false)
		must(t, err)
		must(t, sd.SetTensor(string(rune('a'+i)), h))
		must(t, h.Release())
		bufs = append(bufs, buf)
	}
	return sd, bufs
}

// slowSaveOptions make a save slow on purpose: one writer thread, fsync, small blocks.
func slowSaveOptions() *dsd.SaveOptions {
	o := dsd.DefaultSaveOptions()
	o.ThreadCount = 1
	o.SyncFiles = true
	o.BlockSize = 4096
	return &o
}

func cancelled() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

func expectCtxErr(t *testing.T, what string, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("%s: got %v, want %v", what, err, want)
	}
}

// SaveContext: an ended context writes nothing; a deadline shorter than the save returns
// context.DeadlineExceeded before the save has committed, which it still does in the
// background (the context abandons the wait, not the save).
func TestContextSave(t *testing.T) {
	sd, _ := bigStateDict(t, 4, 64, false) // 256 MiB
	dir := t.TempDir()

	path := filepath.Join(dir, "cancelled")
	expectCtxErr(t, "SaveContext with a cancelled context", dsd.SaveContext(cancelled(), nil, sd, path, nil), context.Canceled)
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("a save with a cancelled context left something at %s: %v", path, err)
	}

	comm, err := dsd.NewCommLocal()
	must(t, err)
	defer comm.Close()
	// Warm the communicator's asynchronous checkpointer (SaveContext's), so that staging
	// into its buffers allocates nothing and takes a fraction of the write.
	f, err := dsd.SaveAsync(comm, sd, filepath.Join(dir, "warm"), slowSaveOptions())
	must(t, err)
	must(t, f.Wait(-1))
	must(t, f.Close())

	path = filepath.Join(dir, "deadline")
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = dsd.SaveContext(ctx, comm, sd, path, slowSaveOptions())
	elapsed := time.Since(start)
	expectCtxErr(t, "SaveContext past its deadline", err, context.DeadlineExceeded)
	if verr := dsd.CheckpointVerify(path); verr == nil {
		t.Fatalf("SaveContext returned after %v, once the save had committed: not promptly", elapsed)
	}
	if elapsed > 10*time.Second {
		t.Errorf("SaveContext returned %v after a 150 ms deadline", elapsed)
	}
	t.Logf("SaveContext returned %v after starting, before the commit", elapsed)
	// The tensors may be written at once; the abandoned save, staged, still commits the
	// values it had. comm.Close waits for it.
	must(t, comm.Close())
	must(t, dsd.CheckpointVerify(path))
	back, err := dsd.LoadFull(path, []string{"b"})
	must(t, err)
	defer back.Close()
	v, err := back.Get("b")
	must(t, err)
	if got, _ := dsd.Float32s(v.(dsd.Tensor)); len(got) != 16<<20 || got[1001] != 8 {
		t.Fatalf("the abandoned save committed other values")
	}

	// A context that never ends is the plain synchronous save.
	must(t, dsd.SaveContext(context.Background(), nil, sd, filepath.Join(dir, "background"), nil))
	must(t, dsd.CheckpointVerify(filepath.Join(dir, "background")))
}

// Future.WaitContext: returns ctx.Err() promptly while the save runs, and the save's own
// result once it is done.
func TestContextFutureWait(t *testing.T) {
	sd, _ := bigStateDict(t, 4, 64, false)
	dir := t.TempDir()
	ac, err := dsd.NewAsyncCheckpointer(nil)
	must(t, err)
	defer ac.Close()
	f, err := ac.SaveAsync(sd, filepath.Join(dir, "a"), slowSaveOptions())
	must(t, err)
	defer f.Close()

	start := time.Now()
	expectCtxErr(t, "WaitContext with a cancelled context", f.WaitContext(cancelled()), context.Canceled)
	if e := time.Since(start); e > 50*time.Millisecond {
		t.Errorf("WaitContext with a cancelled context took %v", e)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	start = time.Now()
	err = f.WaitContext(ctx)
	elapsed := time.Since(start)
	expectCtxErr(t, "WaitContext past its deadline", err, context.DeadlineExceeded)
	if done, _ := f.IsDone(); done {
		t.Fatalf("the save finished within %v: the test's save is not slow enough", elapsed)
	}
	if elapsed > 500*time.Millisecond {
		t.Errorf("WaitContext returned %v after a 30 ms deadline", elapsed)
	}

	ctx2, cancel2 := context.WithCancel(context.Background())
	time.AfterFunc(20*time.Millisecond, cancel2)
	expectCtxErr(t, "WaitContext cancelled while waiting", f.WaitContext(ctx2), context.Canceled)

	ctx3, cancel3 := context.WithTimeout(context.Background(), time.Minute)
	defer cancel3()
	must(t, f.WaitContext(ctx3))
	must(t, f.WaitContext(context.Background()))
	must(t, dsd.CheckpointVerify(filepath.Join(dir, "a")))

	// A failed save's error comes from WaitContext, not a timeout.
	f2, err := ac.SaveAsync(sd, filepath.Join(dir, "a"), nil) // exists, no overwrite
	must(t, err)
	defer f2.Close()
	expectError(t, f2.WaitContext(ctx3), dsd.ErrExists, "")
}

// LoadContext: an ended context loads nothing; once started, a load runs to completion and
// returns its own result, even past the deadline (it writes into the tensors in place).
func TestContextLoad(t *testing.T) {
	src, _ := bigStateDict(t, 2, 64, false)
	path := filepath.Join(t.TempDir(), "ckpt")
	must(t, dsd.Save(nil, src, path, nil))
	dst, bufs := bigStateDict(t, 2, 64, true)

	report, err := dsd.LoadContext(cancelled(), nil, dst, path, nil)
	expectCtxErr(t, "LoadContext with a cancelled context", err, context.Canceled)
	if report != nil || bufs[1].Float32s()[1001] != 0 {
		t.Fatalf("a load with a cancelled context loaded something")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	report, err = dsd.LoadContext(ctx, nil, dst, path, nil)
	must(t, err)
	defer report.Close()
	if got := bufs[1].Float32s()[1001]; got != 8 {
		t.Fatalf("LoadContext loaded %v, want 8", got)
	}
}

// BarrierContext on a single rank, and the communicator's turns.
func TestContextBarrier(t *testing.T) {
	comm, err := dsd.NewCommLocal()
	must(t, err)
	defer comm.Close()
	expectCtxErr(t, "BarrierContext with a cancelled context", comm.BarrierContext(cancelled()), context.Canceled)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	must(t, comm.BarrierContext(ctx))
	must(t, comm.Barrier())
	var none *dsd.Comm // a single process
	must(t, none.BarrierContext(ctx))
	expectCtxErr(t, "BarrierContext of a nil Comm with a cancelled context", none.BarrierContext(cancelled()), context.Canceled)
	must(t, comm.Close())
	expectError(t, comm.BarrierContext(ctx), dsd.ErrInvalidArgument, "")
}

// TestTwoRanksContext runs under `dsdrun -n 2`: rank 1 comes to a barrier late; rank 0's
// BarrierContext returns context.DeadlineExceeded promptly, and its next Barrier waits for
// the abandoned one, so both ranks' barriers stay matched.
func TestTwoRanksContext(t *testing.T) {
	if os.Getenv("WORLD_SIZE") != "2" {
		t.Skip("needs two ranks: run this binary under dsdrun -n 2 with -test.run TestTwoRanksContext")
	}
	copts := dsd.DefaultCommOptions()
	copts.Timeout = 60 * time.Second
	comm, err := dsd.NewCommFromEnv(&copts)
	must(t, err)
	defer comm.Close()
	must(t, comm.Barrier())
	if comm.Rank() == 1 {
		time.Sleep(time.Second)
		must(t, comm.Barrier()) // rank 0's abandoned barrier
		must(t, comm.Barrier()) // rank 0's second
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	expectCtxErr(t, "BarrierContext while the peer sleeps", comm.BarrierContext(ctx), context.DeadlineExceeded)
	if e := time.Since(start); e > 700*time.Millisecond {
		t.Errorf("BarrierContext returned %v after a 100 ms deadline", e)
	}
	must(t, comm.Barrier())
}
