package dsd_test

import (
	"bytes"
	"reflect"
	"strings"
	"testing"

	"dsd.dev/dsd"
)

// A state dict with a value of every kind and a nested tuple and dict.
func everyKind(t *testing.T) *dsd.StateDict {
	t.Helper()
	sd := mustDict(t)
	w, err := dsd.FromFloat32s([]float32{0.5, 1.5, 2.5, 3.5}, []int64{2, 2})
	must(t, err)
	must(t, sd.SetTensor("l.weight", w))
	must(t, w.Release()) // the state dict keeps its own reference
	must(t, sd.SetInt("step", 3))
	must(t, sd.SetDouble("lr", 0.125))
	must(t, sd.SetBool("amsgrad", true))
	must(t, sd.SetString("name", "adam\x00w")) // lengths, not NUL, delimit strings
	must(t, sd.SetBytes("blob", []byte{0, 1, 2}))
	must(t, sd.SetBytes("empty", nil))
	must(t, sd.SetNone("foreach"))
	betas, err := dsd.NewStateDictList(true)
	must(t, err)
	must(t, betas.AppendDouble(0.9))
	must(t, betas.AppendDouble(0.999))
	must(t, sd.SetChild("betas", betas))
	betas.Close()
	inner := mustDict(t)
	must(t, inner.SetInt("depth", 2))
	list, err := dsd.NewStateDictList(false)
	must(t, err)
	for _, add := range []func() error{
		func() error { return list.AppendNone() },
		func() error { return list.AppendBool(false) },
		func() error { return list.AppendInt(-4) },
		func() error { return list.AppendString("s") },
		func() error { return list.AppendBytes([]byte("b")) },
		func() error { return list.AppendChild(inner) },
	} {
		must(t, add())
	}
	must(t, sd.SetChild("nested", list))
	list.Close()
	inner.Close()
	return sd
}

func TestStateDictEveryKind(t *testing.T) {
	sd := everyKind(t)
	defer sd.Close()
	keys, err := sd.Keys()
	must(t, err)
	want := []string{"l.weight", "step", "lr", "amsgrad", "name", "blob", "empty", "foreach", "betas", "nested"}
	if !reflect.DeepEqual(keys, want) {
		t.Fatalf("keys %v", keys)
	}
	kinds := []dsd.Kind{dsd.KindTensor, dsd.KindInt, dsd.KindDouble, dsd.KindBool, dsd.KindString, dsd.KindBytes,
		dsd.KindBytes, dsd.KindNone, dsd.KindList, dsd.KindList}
	for i, k := range kinds {
		got, err := sd.Kind(i)
		must(t, err)
		if got != k {
			t.Errorf("kind of %s is %v, want %v", keys[i], got, k)
		}
	}
	at := func(key string) int {
		i, err := sd.Find(key)
		must(t, err)
		return i
	}
	if v, err := sd.GetInt(at("step")); err != nil || v != 3 {
		t.Errorf("step %v %v", v, err)
	}
	if v, err := sd.GetDouble(at("lr")); err != nil || v != 0.125 {
		t.Errorf("lr %v %v", v, err)
	}
	if v, err := sd.GetBool(at("amsgrad")); err != nil || !v {
		t.Errorf("amsgrad %v %v", v, err)
	}
	if v, err := sd.GetString(at("name")); err != nil || v != "adam\x00w" {
		t.Errorf("name %q %v", v, err)
	}
	if v, err := sd.GetBytes(at("blob")); err != nil || !bytes.Equal(v, []byte{0, 1, 2}) {
		t.Errorf("blob %v %v", v, err)
	}
	if v, err := sd.GetBytes(at("empty")); err != nil || len(v) != 0 {
		t.Errorf("empty %v %v", v, err)
	}
	w, err := sd.GetTensor(at("l.weight"))
	must(t, err)
	data, err := dsd.Float32s(w)
	must(t, err)
	must(t, w.Release())
	if !reflect.DeepEqual(data, []float32{0.5, 1.5, 2.5, 3.5}) {
		t.Errorf("weight %v", data)
	}

	betas, err := sd.GetChild(at("betas"))
	must(t, err)
	kind, isTuple, err := betas.ContainerKind()
	must(t, err)
	if kind != dsd.KindList || !isTuple {
		t.Errorf("betas is %v tuple=%v", kind, isTuple)
	}
	if v, err := betas.GetDouble(1); err != nil || v != 0.999 {
		t.Errorf("betas[1] %v %v", v, err)
	}
	// Containers are shared by reference: a write through the child shows in the parent.
	must(t, betas.AppendDouble(1e-8))
	betas.Close()
	betas, err = sd.GetChild(at("betas"))
	must(t, err)
	if n, err := betas.Size(); err != nil || n != 3 {
		t.Errorf("betas has %d entries after an append through another reference", n)
	}
	betas.Close()

	// The generic reader.
	nested, err := sd.Get("nested")
	must(t, err)
	list := nested.(*dsd.StateDict)
	defer list.Close()
	var got []any
	n, err := list.Size()
	must(t, err)
	for i := 0; i < n; i++ {
		v, err := list.Value(i)
		must(t, err)
		if c, ok := v.(*dsd.StateDict); ok {
			depth, err := c.Get("depth")
			must(t, err)
			c.Close()
			v = depth
		}
		got = append(got, v)
	}
	if !reflect.DeepEqual(got, []any{nil, false, int64(-4), "s", []byte("b"), int64(2)}) {
		t.Errorf("nested list reads %#v", got)
	}

	// Replacing keeps the position; removing shifts the rest.
	must(t, sd.SetInt("step", 4))
	if i := at("step"); i != 1 {
		t.Errorf("step moved to %d", i)
	}
	must(t, sd.Remove(at("foreach")))
	if n, _ := sd.Size(); n != 9 || at("betas") != 7 {
		t.Errorf("after remove: size %d, betas at %d", n, at("betas"))
	}
}

func TestStateDictErrors(t *testing.T) {
	sd := everyKind(t)
	defer sd.Close()
	step, err := sd.Find("step")
	must(t, err)
	_, err = sd.GetDouble(step)
	expectError(t, err, dsd.ErrWrongKind, "'step' is a int, not a double")
	_, err = sd.GetTensor(step)
	expectError(t, err, dsd.ErrWrongKind, "'step'")
	_, err = sd.GetChild(step)
	expectError(t, err, dsd.ErrWrongKind, "not a dict or list")
	_, err = sd.GetInt(99)
	expectError(t, err, dsd.ErrInvalidArgument, "out of range")
	_, err = sd.Find("missing")
	expectError(t, err, dsd.ErrNotFound, "'missing'")
	expectError(t, sd.AppendInt(1), dsd.ErrInvalidArgument, "needs a key")
	expectError(t, sd.SetChild("self", sd), dsd.ErrInvalidArgument, "inside itself")

	list, err := dsd.NewStateDictList(false)
	must(t, err)
	defer list.Close()
	expectError(t, list.SetInt("k", 1), dsd.ErrInvalidArgument, "for a list")
	_, err = list.Find("k")
	expectError(t, err, dsd.ErrWrongKind, "not a dict")
	expectError(t, list.Remove(0), dsd.ErrInvalidArgument, "out of range")

	// Int-keyed dicts.
	state := mustDict(t)
	defer state.Close()
	must(t, state.SetIntKeys(true))
	must(t, state.SetInt("0", 1))
	must(t, state.SetInt("-12", 1))
	expectError(t, state.SetInt("01", 1), dsd.ErrInvalidArgument, "not an integer")
	if ik, err := state.IntKeys(); err != nil || !ik {
		t.Errorf("int keys %v %v", ik, err)
	}
	must(t, state.SetIntKeys(false))
	must(t, state.SetInt("w", 1))
	expectError(t, state.SetIntKeys(true), dsd.ErrInvalidArgument, "'w'")

	// A closed state dict is NULL to dsd.
	closed := mustDict(t)
	closed.Close()
	_, err = closed.Size()
	expectError(t, err, dsd.ErrInvalidArgument, "sd is NULL")
}

func TestStateDictFlattenUnflatten(t *testing.T) {
	sd := everyKind(t)
	outer := mustDict(t)
	defer outer.Close()
	must(t, outer.SetChild("optim", sd))
	sd.Close()

	flat, mapping, err := outer.Flatten()
	must(t, err)
	defer flat.Close()
	defer mapping.Close()
	keys, err := flat.Keys()
	must(t, err)
	joined := strings.Join(keys, " ")
	// Dotted keys, list indices as numbers; a tuple stays whole (as PyTorch's
	// flatten_state_dict gives them).
	for _, k := range []string{"optim.l.weight", "optim.step", "optim.betas", "optim.nested.0", "optim.nested.5.depth"} {
		if !strings.Contains(" "+joined+" ", " "+k+" ") {
			t.Errorf("flat keys %v lack %s", keys, k)
		}
	}
	path, err := mapping.Get("optim.l.weight")
	must(t, err)
	p := path.(*dsd.StateDict)
	if n, _ := p.Size(); n != 2 {
		t.Errorf("the path of optim.l.weight has %d parts", n)
	}
	p.Close()

	nested, err := dsd.Unflatten(flat, mapping)
	must(t, err)
	defer nested.Close()
	equal, why, err := dsd.StateDictEqual(outer, nested)
	must(t, err)
	if !equal {
		t.Fatalf("unflatten(flatten(x)) != x: %s", why)
	}
	must(t, nested.SetInt("extra", 1))
	equal, why, err = dsd.StateDictEqual(outer, nested)
	must(t, err)
	if equal || !strings.Contains(why, "keys") {
		t.Fatalf("an extra key compares %v (%q)", equal, why)
	}

	// Two paths joining to one key.
	dup := mustDict(t)
	defer dup.Close()
	child := mustDict(t)
	must(t, child.SetInt("b", 1))
	must(t, dup.SetChild("a", child))
	child.Close()
	must(t, dup.SetInt("a.b", 2))
	_, _, err = dup.Flatten()
	expectError(t, err, dsd.ErrInvalidArgument, "duplicated flatten key")
}
