package dsd_test

import (
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"dsd.dev/dsd"
)

func TestCommLocalMeshLayouts(t *testing.T) {
	comm, err := dsd.NewCommLocal()
	must(t, err)
	defer comm.Close()
	rank, size := comm.Rank(), comm.Size()
	backend, err := comm.Backend()
	must(t, err)
	if rank != 0 || size != 1 || backend != "local" {
		t.Fatalf("local comm: rank %d size %d backend %q", rank, size, backend)
	}
	must(t, comm.Barrier())

	mesh, err := dsd.NewMesh(comm, []int64{1, 1}, nil, dsd.DeviceCPU)
	must(t, err)
	comm.Close() // the mesh keeps the communicator alive
	defer mesh.Close()
	shape, err := mesh.Shape()
	must(t, err)
	ranks, err := mesh.Ranks()
	must(t, err)
	dt, err := mesh.DeviceType()
	must(t, err)
	coord, in, err := mesh.Coordinate()
	must(t, err)
	if !reflect.DeepEqual(shape, []int64{1, 1}) || !reflect.DeepEqual(ranks, []int32{0}) || dt != dsd.DeviceCPU ||
		!in || !reflect.DeepEqual(coord, []int64{0, 0}) {
		t.Fatalf("mesh: shape %v ranks %v device %v coord %v in %v", shape, ranks, dt, coord, in)
	}
	_, err = dsd.NewMesh(nil, []int64{1}, nil, dsd.DeviceCPU)
	expectError(t, err, dsd.ErrInvalidArgument, "comm is NULL")
	// Explicit ranks: as many as the shape's product, each in the world.
	listed, err := dsd.NewMesh(mesh0Comm(t), []int64{1}, []int32{0}, dsd.DeviceCPU)
	must(t, err)
	listedRanks, err := listed.Ranks()
	must(t, err)
	listed.Close()
	if !reflect.DeepEqual(listedRanks, []int32{0}) {
		t.Errorf("a mesh over ranks [0] has ranks %v", listedRanks)
	}
	_, err = dsd.NewMesh(mesh0Comm(t), []int64{1}, []int32{0, 0}, dsd.DeviceCPU)
	expectError(t, err, dsd.ErrInvalidArgument, "")
	_, err = dsd.NewMesh(mesh0Comm(t), []int64{1}, []int32{1}, dsd.DeviceCPU)
	expectError(t, err, dsd.ErrInvalidArgument, "")

	layout, err := dsd.NewLayoutPlacements(mesh, []int64{5, 3}, []dsd.Placement{dsd.Shard(0), dsd.Replicate()})
	must(t, err)
	global, err := layout.GlobalShape()
	must(t, err)
	offs, sizes, err := layout.LocalChunk()
	must(t, err)
	places, err := layout.Placements()
	must(t, err)
	isChunk, err := layout.IsChunk()
	must(t, err)
	if !reflect.DeepEqual(global, []int64{5, 3}) || !reflect.DeepEqual(offs, []int64{0, 0}) ||
		!reflect.DeepEqual(sizes, []int64{5, 3}) || isChunk ||
		!reflect.DeepEqual(places, []dsd.Placement{dsd.Shard(0), dsd.Replicate()}) {
		t.Fatalf("layout: global %v chunk %v %v placements %v chunk %v", global, offs, sizes, places, isChunk)
	}
	_, err = dsd.NewLayoutPlacements(mesh, []int64{5, 3}, []dsd.Placement{dsd.Shard(2), dsd.Replicate()})
	expectError(t, err, dsd.ErrInvalidArgument, "")
	_, err = dsd.NewLayoutPlacements(mesh, []int64{5, 3}, []dsd.Placement{dsd.Shard(0)})
	expectError(t, err, dsd.ErrInvalidArgument, "")

	chunk, err := dsd.NewLayoutChunk(mesh, []int64{5, 3}, []int64{1, 0}, []int64{2, 3})
	must(t, err)
	isChunk, err = chunk.IsChunk()
	must(t, err)
	_, err = chunk.Placements()
	if !isChunk {
		t.Errorf("an explicit chunk is not a chunk layout")
	}
	expectError(t, err, dsd.ErrWrongKind, "")
	_, err = dsd.NewLayoutChunk(mesh, []int64{5, 3}, []int64{4, 0}, []int64{2, 3})
	expectError(t, err, dsd.ErrShapeMismatch, "")

	// Distributed tensors, in handles and state dicts.
	local, err := dsd.FromFloat32s(make([]float32, 15), []int64{5, 3})
	must(t, err)
	defer local.Release()
	dist, err := dsd.NewDistTensor(local, layout)
	must(t, err)
	back, err := dist.Layout()
	must(t, err)
	backShape, err := back.GlobalShape()
	must(t, err)
	if !reflect.DeepEqual(backShape, []int64{5, 3}) {
		t.Errorf("layout of a dist tensor: %v", backShape)
	}
	must(t, back.Release())
	must(t, dist.Release())
	_, err = local.Layout()
	expectError(t, err, dsd.ErrWrongKind, "")

	sd := mustDict(t)
	defer sd.Close()
	must(t, sd.SetDistTensor("w", local, layout))
	must(t, sd.SetTensor("plain", local))
	expectError(t, sd.SetDistTensor("bad", local, chunk), dsd.ErrShapeMismatch, "local tensor of 'bad'")
	isDist, err := sd.IsDistTensor(0)
	must(t, err)
	isPlain, err := sd.IsDistTensor(1)
	must(t, err)
	if !isDist || isPlain {
		t.Errorf("is dist tensor: %v %v", isDist, isPlain)
	}
	got, err := sd.GetLayout(0)
	must(t, err)
	m, err := got.Mesh()
	must(t, err)
	if n, _ := m.NDim(); n != 2 {
		t.Errorf("the layout's mesh has %d dims", n)
	}
	m.Close()
	must(t, got.Release())
	_, err = sd.GetLayout(1)
	expectError(t, err, dsd.ErrWrongKind, "")

	retained, err := layout.Retain()
	must(t, err)
	must(t, layout.Release())
	expectError(t, layout.Release(), dsd.ErrStaleHandle, "")
	expectError(t, dsd.Layout{}.Release(), dsd.ErrStaleHandle, "")
	must(t, retained.Release())
	must(t, chunk.Release())
}

// mesh0Comm is a local communicator, closed when the test ends (meshes keep their own
// reference).
func mesh0Comm(t *testing.T) *dsd.Comm {
	t.Helper()
	comm, err := dsd.NewCommLocal()
	must(t, err)
	t.Cleanup(func() { comm.Close() })
	return comm
}

func TestCommFileStoreSingleRank(t *testing.T) {
	opts := dsd.DefaultCommOptions()
	if opts.Timeout != 30*time.Minute {
		t.Errorf("default timeout %v", opts.Timeout)
	}
	opts.Timeout = 20 * time.Second
	comm, err := dsd.NewCommFileStore(filepath.Join(t.TempDir(), "store"), 0, 1, &opts)
	must(t, err)
	defer comm.Close()
	backend, err := comm.Backend()
	must(t, err)
	if backend != "gloo" {
		t.Errorf("file store backend %q", backend)
	}
	must(t, comm.Barrier())
	_, err = dsd.NewCommFileStore(filepath.Join(t.TempDir(), "store"), 3, 2, &opts)
	expectError(t, err, dsd.ErrInvalidArgument, "")
	_, err = dsd.NewCommNCCL(nil, nil, 0, 1, nil)
	if dsd.CodeOf(err) != dsd.ErrUnsupported && dsd.CodeOf(err) != dsd.ErrInvalidArgument {
		t.Errorf("an NCCL communicator over NULL gave %v", err)
	}
}
