package dsd

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// The init-time check refuses a library of another major version, and only that.
func TestABICheck(t *testing.T) {
	if got := ABIVersion() >> 16; got != ABIVersionMajor {
		t.Fatalf("loaded libdsd has major version %d, header %d", got, ABIVersionMajor)
	}
	if err := checkABI(ABIVersionMajor<<16 | 7); err != nil {
		t.Fatalf("a newer minor version was refused: %v", err)
	}
	err := checkABI((ABIVersionMajor + 1) << 16)
	if !errors.Is(err, ErrABIMismatch) || !strings.Contains(err.Error(), "ABI version 2.0") {
		t.Fatalf("a library of another major version gave %v", err)
	}
}

// A handle of one kind passed as the other is ErrWrongKind, not undefined behaviour.
// (Handles are opaque outside the package, so this needs the raw bits.)
func TestTensorHandleKinds(t *testing.T) {
	comm, err := NewCommLocal()
	if err != nil {
		t.Fatal(err)
	}
	defer comm.Close()
	mesh, err := NewMesh(comm, []int64{1}, nil, DeviceCPU)
	if err != nil {
		t.Fatal(err)
	}
	defer mesh.Close()
	layout, err := NewLayoutPlacements(mesh, []int64{4}, []Placement{Shard(0)})
	if err != nil {
		t.Fatal(err)
	}
	tensor, err := FromFloat32s([]float32{1, 2, 3, 4}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := (Tensor{bits: layout.bits}).Release(); !errors.Is(err, ErrWrongKind) {
		t.Errorf("releasing a layout handle as a tensor gave %v", err)
	}
	if _, err := (Layout{bits: tensor.bits}).GlobalShape(); !errors.Is(err, ErrWrongKind) {
		t.Errorf("reading a tensor handle as a layout gave %v", err)
	}
	if err := tensor.Release(); err != nil {
		t.Error(err)
	}
	if err := layout.Release(); err != nil {
		t.Error(err)
	}
}

// A collective waits for the communicator's turn, bounded by its context: here the turn is
// held as an abandoned barrier would hold it.
func TestContextCommTurn(t *testing.T) {
	comm, err := NewCommLocal()
	if err != nil {
		t.Fatal(err)
	}
	defer comm.Close()
	comm.turn <- struct{}{} // busy
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if err := comm.BarrierContext(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a barrier waiting for a busy communicator gave %v", err)
	}
	if _, err := LoadContext(ctx, comm, nil, "/nonexistent", nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a load past its deadline gave %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- comm.Barrier() }()
	select {
	case err := <-done:
		t.Fatalf("a barrier ran while the communicator was busy: %v", err)
	case <-time.After(30 * time.Millisecond):
	}
	comm.release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
