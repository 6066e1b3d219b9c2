package dsd_test

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"dsd.dev/dsd"
)

// A sharded parameter: this rank's piece of a global tensor whose element at index idx is
// value(idx), in a host buffer, and the distributed tensor handle over it.
type shardedParam struct {
	name        string
	global      []int64
	layout      dsd.Layout
	offs, sizes []int64
	buf         *dsd.HostBuffer
	local, dist dsd.Tensor
	value       func(idx []int64) float32
}

func newShardedParam(t *testing.T, name string, global []int64, layout dsd.Layout, value func([]int64) float32) *shardedParam {
	t.Helper()
	p := &shardedParam{name: name, global: global, layout: layout, value: value}
	var err error
	p.offs, p.sizes, err = layout.LocalChunk()
	must(t, err)
	p.buf, err = dsd.NewHostBuffer(4 * numel(p.sizes))
	must(t, err)
	p.fill(1)
	p.local, err = p.buf.Wrap(0, dsd.DTypeF32, p.sizes, false)
	must(t, err)
	p.dist, err = dsd.NewDistTensor(p.local, layout)
	must(t, err)
	return p
}

// forEach calls f with each local element's global index and its position in the buffer.
func forEach(offs, sizes []int64, f func(global []int64, at int)) {
	n := numel(sizes)
	idx := make([]int64, len(sizes))
	for at := 0; at < n; at++ {
		rem := at
		for d := len(sizes) - 1; d >= 0; d-- {
			idx[d] = offs[d] + int64(rem)%sizes[d]
			rem /= int(sizes[d])
		}
		f(idx, at)
	}
}

func (p *shardedParam) fill(scale float32) {
	data := p.buf.Float32s()
	forEach(p.offs, p.sizes, func(g []int64, at int) { data[at] = scale * p.value(g) })
}

// check compares data, a piece at offs/sizes of the global tensor, with scale * value.
func (p *shardedParam) check(t *testing.T, what string, data []float32, offs, sizes []int64, scale float32) {
	t.Helper()
	bad := 0
	forEach(offs, sizes, func(g []int64, at int) {
		if data[at] != scale*p.value(g) && bad == 0 {
			t.Errorf("%s: %s%v = %v, want %v", what, p.name, g, data[at], scale*p.value(g))
			bad++
		}
	})
}

func (p *shardedParam) close() {
	p.dist.Release()
	p.local.Release()
	p.layout.Release()
	p.buf.Close()
}

// TestTwoRanks runs under `dsdrun -n 2` (tests/go/meson.build launches this test binary
// twice): a model sharded over a mesh of two ranks (Shard(0) with uneven shards, Replicate,
// an explicit chunk), its sharded and full state dicts, and checkpoints saved at world 2 and
// loaded back, also into another sharding.
func TestTwoRanks(t *testing.T) {
	if os.Getenv("WORLD_SIZE") != "2" {
		t.Skip("needs two ranks: run this binary under dsdrun -n 2 with -test.run TestTwoRanks")
	}
	copts := dsd.DefaultCommOptions()
	copts.Timeout = 60 * time.Second
	comm, err := dsd.NewCommFromEnv(&copts)
	must(t, err)
	defer comm.Close()
	rank, size := comm.Rank(), comm.Size()
	backend, err := comm.Backend()
	must(t, err)
	if size != 2 || backend != "gloo" {
		t.Fatalf("world %d over %q", size, backend)
	}
	dir := filepath.Join(os.TempDir(), "dsd-go-two-ranks-"+os.Getenv("MASTER_PORT"))
	if rank == 0 {
		os.RemoveAll(dir)
		must(t, os.MkdirAll(dir, 0o755))
	}
	must(t, comm.Barrier())

	mesh, err := dsd.NewMesh(comm, []int64{2}, nil, dsd.DeviceCPU)
	must(t, err)
	defer mesh.Close()
	placements := func(global []int64, ps ...dsd.Placement) dsd.Layout {
		l, err := dsd.NewLayoutPlacements(mesh, global, ps)
		must(t, err)
		return l
	}
	// emb.weight: rank 0 holds row 0, rank 1 rows 1..4.
	embOffs, embSizes := []int64{0, 0}, []int64{1, 2}
	if rank == 1 {
		embOffs, embSizes = []int64{1, 0}, []int64{3, 2}
	}
	embLayout, err := dsd.NewLayoutChunk(mesh, []int64{4, 2}, embOffs, embSizes)
	must(t, err)
	params := []*shardedParam{
		newShardedParam(t, "fc.weight", []int64{5, 3}, placements([]int64{5, 3}, dsd.Shard(0)),
			func(g []int64) float32 { return float32(g[0]*10 + g[1]) }),
		newShardedParam(t, "fc.bias", []int64{4}, placements([]int64{4}, dsd.Replicate()),
			func(g []int64) float32 { return float32(100 + g[0]) }),
		newShardedParam(t, "emb.weight", []int64{4, 2}, embLayout,
			func(g []int64) float32 { return float32(1000 + g[0]*10 + g[1]) }),
	}
	defer func() {
		for _, p := range params {
			p.close()
		}
	}()
	// torch.chunk's uneven split: 3 rows, then 2.
	if want := [][]int64{{3, 3}, {2, 3}}[rank]; !reflect.DeepEqual(params[0].sizes, want) {
		t.Fatalf("rank %d holds %v of fc.weight, want %v", rank, params[0].sizes, want)
	}

	model, err := dsd.NewModel(comm, "Sharded")
	must(t, err)
	defer model.Close()
	must(t, model.AddParameter("fc.weight", params[0].dist, true))
	must(t, model.AddParameter("fc.bias", params[1].dist, true))
	must(t, model.AddBuffer("emb.weight", params[2].dist, true))

	// Adam-like state: exp_avg sharded as its parameter (2 * the parameter), a step scalar.
	optim, err := dsd.NewOptim()
	must(t, err)
	defer optim.Close()
	hyper := mustDict(t)
	defer hyper.Close()
	must(t, hyper.SetDouble("lr", 0.1))
	must(t, optim.AddParamGroup(hyper, []dsd.Tensor{params[0].dist, params[1].dist}))
	moments := []*shardedParam{
		newShardedParam(t, "exp_avg(fc.weight)", params[0].global, placements(params[0].global, dsd.Shard(0)),
			func(g []int64) float32 { return 2 * params[0].value(g) }),
		newShardedParam(t, "exp_avg(fc.bias)", params[1].global, placements(params[1].global, dsd.Replicate()),
			func(g []int64) float32 { return 2 * params[1].value(g) }),
	}
	stepBuf, err := dsd.NewHostBuffer(8)
	must(t, err)
	defer stepBuf.Close()
	stepBuf.Float32s()[0] = 3
	for i, m := range moments {
		defer m.close()
		st := mustDict(t)
		step, err := stepBuf.Wrap(4*i, dsd.DTypeF32, nil, false)
		must(t, err)
		stepBuf.Float32s()[i] = 3
		must(t, st.SetTensor("step", step))
		must(t, step.Release())
		must(t, st.SetTensor("exp_avg", m.dist))
		must(t, optim.SetParamState(params[i].dist, st))
		st.Close()
	}
	optims := []*dsd.Optim{optim}

	// Sharded: each rank's own pieces, aliasing its memory, with their layouts.
	msd, osd, err := dsd.GetStateDict(model, optims, nil)
	must(t, err)
	defer msd.Close()
	defer osd.Close()
	for _, p := range params {
		i, err := msd.Find(p.name)
		must(t, err)
		isDist, err := msd.IsDistTensor(i)
		must(t, err)
		local, err := msd.GetTensor(i)
		must(t, err)
		info, err := local.Info()
		must(t, err)
		must(t, local.Release())
		layout, err := msd.GetLayout(i)
		must(t, err)
		offs, sizes, err := layout.LocalChunk()
		must(t, err)
		must(t, layout.Release())
		if !isDist || info.Data != p.buf.Pointer() || !reflect.DeepEqual(offs, p.offs) || !reflect.DeepEqual(sizes, p.sizes) {
			t.Errorf("sharded %s: dist %v, aliases %v, chunk %v %v", p.name, isDist, info.Data == p.buf.Pointer(), offs, sizes)
		}
	}

	// Full, offloaded to the CPU: rank 0 gets the whole tensors, rank 1 an empty dict.
	full := dsd.DefaultOptions()
	full.FullStateDict = true
	full.CPUOffload = true
	fmsd, fosd, err := dsd.GetStateDict(model, optims, &full)
	must(t, err)
	n, err := fmsd.Size()
	must(t, err)
	on, err := fosd.Size()
	must(t, err)
	if rank == 1 {
		if n != 0 || on != 0 {
			t.Errorf("rank 1 got %d model and %d optimizer entries of the full state dict", n, on)
		}
	} else {
		if n != 3 || on != 2 {
			t.Errorf("rank 0 got %d model and %d optimizer entries of the full state dict", n, on)
		}
		for _, p := range params {
			v, err := fmsd.Get(p.name)
			must(t, err)
			tensor := v.(dsd.Tensor)
			shape, err := tensor.Shape()
			must(t, err)
			data, err := dsd.Float32s(tensor)
			must(t, err)
			must(t, tensor.Release())
			if !reflect.DeepEqual(shape, p.global) {
				t.Fatalf("full %s has shape %v", p.name, shape)
			}
			p.check(t, "full state dict", data, make([]int64, len(shape)), shape, 1)
		}
		state, err := fosd.Get("state")
		must(t, err)
		weightState, err := state.(*dsd.StateDict).Get("fc.weight")
		must(t, err)
		avg, err := weightState.(*dsd.StateDict).Get("exp_avg")
		must(t, err)
		data, err := dsd.Float32s(avg.(dsd.Tensor))
		must(t, err)
		params[0].check(t, "full optimizer state", data, []int64{0, 0}, params[0].global, 2)
		avg.(dsd.Tensor).Release()
		weightState.(*dsd.StateDict).Close()
		state.(*dsd.StateDict).Close()
	}
	fmsd.Close()
	fosd.Close()

	// A checkpoint saved at world 2 (sharded, written by both ranks), loaded back in place.
	sd := mustDict(t)
	defer sd.Close()
	must(t, sd.SetChild("model", msd))
	must(t, sd.SetChild("optim", osd))
	ckpt := filepath.Join(dir, "ckpt")
	must(t, dsd.Save(comm, sd, ckpt, nil))
	for _, p := range append(params, moments...) {
		p.fill(0)
	}
	stepBuf.Float32s()[0], stepBuf.Float32s()[1] = 0, 0
	report, err := dsd.Load(comm, sd, ckpt, nil)
	must(t, err)
	report.Close()
	for _, p := range append(params, moments...) {
		p.check(t, "loaded", p.buf.Float32s(), p.offs, p.sizes, 1)
	}
	if stepBuf.Float32s()[0] != 3 || stepBuf.Float32s()[1] != 3 {
		t.Errorf("loaded steps %v", stepBuf.Float32s()[:2])
	}

	// Asynchronously too, then read back into another sharding (Shard(1): columns).
	async := filepath.Join(dir, "async")
	future, err := dsd.SaveAsync(comm, sd, async, nil)
	must(t, err)
	must(t, future.Wait(-1))
	future.Close()
	cols := newShardedParam(t, "fc.weight", []int64{5, 3}, placements([]int64{5, 3}, dsd.Shard(1)),
		func(g []int64) float32 { return float32(g[0]*10 + g[1]) })
	defer cols.close()
	cols.fill(0)
	target := mustDict(t)
	defer target.Close()
	inner := mustDict(t)
	must(t, inner.SetDistTensor("fc.weight", cols.local, cols.layout))
	must(t, target.SetChild("model", inner))
	inner.Close()
	report, err = dsd.Load(comm, target, async, nil)
	must(t, err)
	unexpected, err := report.Keys(dsd.LoadReportUnexpected)
	must(t, err)
	report.Close()
	cols.check(t, "resharded load", cols.buf.Float32s(), cols.offs, cols.sizes, 1)
	if len(unexpected) == 0 {
		t.Errorf("the load into a partial state dict reported no unexpected keys")
	}

	// A checkpoint manager over the communicator (collective), synchronous and asynchronous
	// saves, and an explicit asynchronous checkpointer of its own.
	mgr, err := dsd.NewCheckpointManager(comm, filepath.Join(dir, "managed"), 1)
	must(t, err)
	must(t, mgr.Save(sd, 1, nil))
	future, err = mgr.SaveAsync(sd, 2, nil)
	must(t, err)
	must(t, future.Wait(-1))
	future.Close()
	for _, p := range append(params, moments...) {
		p.fill(0)
	}
	step, found, err := mgr.LoadLatest(sd, nil)
	must(t, err)
	if !found || step != 2 {
		t.Errorf("manager: latest step %d (found %v)", step, found)
	}
	mgr.Close()
	for _, p := range append(params, moments...) {
		p.check(t, "loaded from the manager", p.buf.Float32s(), p.offs, p.sizes, 1)
	}
	ac, err := dsd.NewAsyncCheckpointer(comm)
	must(t, err)
	future, err = ac.SaveAsync(sd, filepath.Join(dir, "explicit"), nil)
	must(t, err)
	must(t, future.Wait(-1))
	future.Close()
	ac.Close()
	must(t, dsd.CheckpointVerify(filepath.Join(dir, "explicit")))

	// Any rank can read the whole checkpoint without a communicator.
	whole, err := dsd.LoadFull(ckpt, []string{"model.fc.weight"})
	must(t, err)
	m, err := whole.Get("model")
	must(t, err)
	w, err := m.(*dsd.StateDict).Get("fc.weight")
	must(t, err)
	data, err := dsd.Float32s(w.(dsd.Tensor))
	must(t, err)
	params[0].check(t, "load_full", data, []int64{0, 0}, params[0].global, 1)
	w.(dsd.Tensor).Release()
	m.(*dsd.StateDict).Close()
	whole.Close()

	must(t, comm.Barrier())
	if rank == 0 {
		os.RemoveAll(dir)
	}
}
