package dsd_test

import (
	"errors"
	"math"
	"math/rand"
	"reflect"
	"strings"
	"testing"

	"dsd.dev/dsd"
)

// A two-layer MLP trained with Adam, as examples/c/mlp_adam.c: the trainer owns every buffer
// (host buffers it reads and writes as Go slices) and registers them with dsd; Adam's state
// is created lazily, by the trainer's first step or by dsd's materialize callback.

var mlpNames = []string{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
var mlpShapes = [][]int64{{8, 4}, {8}, {2, 8}, {2}}

type adamParam struct {
	w, m, v, step *dsd.HostBuffer // step: Adam's counter, a 0-dim float32 tensor as in PyTorch
	handle        dsd.Tensor
}

type trainer struct {
	params                  []*adamParam
	lr, beta1, beta2, eps   float64
	model                   *dsd.Model
	optim                   *dsd.Optim
	hyper                   *dsd.StateDict
	materializeCalls        [][]int // pids of each materialize call
	materializeOutsideSteps int
}

func numel(shape []int64) int {
	n := 1
	for _, s := range shape {
		n *= int(s)
	}
	return n
}

func newTrainer(t testing.TB, seed int64) *trainer {
	t.Helper()
	rng := rand.New(rand.NewSource(seed))
	tr := &trainer{lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8}
	var err error
	tr.model, err = dsd.NewModel(nil, "MLP")
	must(t, err)
	tr.optim, err = dsd.NewOptim()
	must(t, err)
	handles := make([]dsd.Tensor, len(mlpNames))
	for i, name := range mlpNames {
		p := &adamParam{}
		p.w, err = dsd.NewHostBuffer(4 * numel(mlpShapes[i]))
		must(t, err)
		for j := range p.w.Float32s() {
			p.w.Float32s()[j] = rng.Float32() - 0.5
		}
		p.handle, err = p.w.Wrap(0, dsd.DTypeF32, mlpShapes[i], false)
		must(t, err)
		must(t, tr.model.AddParameter(name, p.handle, true))
		handles[i] = p.handle
		tr.params = append(tr.params, p)
	}
	tr.hyper = mustDict(t)
	betas, err := dsd.NewStateDictList(true)
	must(t, err)
	must(t, betas.AppendDouble(tr.beta1))
	must(t, betas.AppendDouble(tr.beta2))
	must(t, tr.hyper.SetDouble("lr", tr.lr))
	must(t, tr.hyper.SetChild("betas", betas))
	must(t, tr.hyper.SetDouble("eps", tr.eps))
	must(t, tr.hyper.SetDouble("weight_decay", 0))
	betas.Close()
	must(t, tr.optim.AddParamGroup(tr.hyper, handles))
	must(t, tr.optim.SetMaterialize(func(o *dsd.Optim, params []dsd.Tensor, pids []int) error {
		tr.materializeCalls = append(tr.materializeCalls, append([]int(nil), pids...))
		for _, param := range params {
			if err := tr.materialize(o, param); err != nil {
				return err
			}
		}
		return nil
	}))
	return tr
}

// materialize creates a fresh optimizer's state for param (told apart by its memory).
func (tr *trainer) materialize(o *dsd.Optim, param dsd.Tensor) error {
	info, err := param.Info()
	if err != nil {
		return err
	}
	for i, p := range tr.params {
		if info.Data != p.w.Pointer() || p.m != nil {
			continue
		}
		n := 4 * numel(mlpShapes[i])
		if p.m, err = dsd.NewHostBuffer(n); err != nil {
			return err
		}
		if p.v, err = dsd.NewHostBuffer(n); err != nil {
			return err
		}
		if p.step, err = dsd.NewHostBuffer(4); err != nil { // zeroed: nothing stepped
			return err
		}
		st, err := dsd.NewStateDict()
		if err != nil {
			return err
		}
		defer st.Close()
		for _, e := range []struct {
			key   string
			buf   *dsd.HostBuffer
			shape []int64
		}{{"step", p.step, nil}, {"exp_avg", p.m, mlpShapes[i]}, {"exp_avg_sq", p.v, mlpShapes[i]}} {
			h, err := e.buf.Wrap(0, dsd.DTypeF32, e.shape, false)
			if err != nil {
				return err
			}
			err = st.SetTensor(e.key, h)
			h.Release()
			if err != nil {
				return err
			}
		}
		if err := o.SetParamState(p.handle, st); err != nil {
			return err
		}
	}
	return nil
}

// step is one Adam step on the loss 0.5 * sum((w - target)^2), whose gradient is w - target.
func (tr *trainer) step(t testing.TB, target float32) {
	t.Helper()
	for _, p := range tr.params {
		if p.m == nil { // first step: create state, as a lazy optimizer does
			must(t, tr.materialize(tr.optim, p.handle))
		}
		step := p.step.Float32s()
		step[0]++
		bc1 := 1 - math.Pow(tr.beta1, float64(step[0]))
		bc2 := 1 - math.Pow(tr.beta2, float64(step[0]))
		w, m, v := p.w.Float32s(), p.m.Float32s(), p.v.Float32s()
		for j := range w {
			g := w[j] - target
			m[j] = float32(tr.beta1*float64(m[j]) + (1-tr.beta1)*float64(g))
			v[j] = float32(tr.beta2*float64(v[j]) + (1-tr.beta2)*float64(g)*float64(g))
			w[j] -= float32(tr.lr * (float64(m[j]) / bc1) / (math.Sqrt(float64(v[j])/bc2) + tr.eps))
		}
	}
}

// syncHyper reads lr back from the shared hyperparameter dict after a load.
func (tr *trainer) syncHyper(t testing.TB) {
	t.Helper()
	i, err := tr.hyper.Find("lr")
	must(t, err)
	tr.lr, err = tr.hyper.GetDouble(i)
	must(t, err)
}

func (tr *trainer) close() {
	tr.optim.Close()
	tr.model.Close()
	tr.hyper.Close()
	for _, p := range tr.params {
		p.handle.Release()
		for _, b := range []*dsd.HostBuffer{p.w, p.m, p.v, p.step} {
			if b != nil {
				b.Close()
			}
		}
	}
}

func bitwiseEqual(a, b []float32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			return false
		}
	}
	return true
}

func TestTrainerStateDictRoundTrip(t *testing.T) {
	a, b := newTrainer(t, 1), newTrainer(t, 2)
	defer a.close()
	defer b.close()
	b.lr = 0.5 // b has other weights and another learning rate until it loads a's state
	must(t, b.hyper.SetDouble("lr", b.lr))

	// b's optimizer has no state yet: dsd asks the trainer to create it, no step is taken.
	msd, osd, err := dsd.GetStateDict(b.model, []*dsd.Optim{b.optim}, nil)
	must(t, err)
	if !reflect.DeepEqual(b.materializeCalls, [][]int{{0, 1, 2, 3}}) {
		t.Fatalf("materialize calls %v, want one with pids 0..3", b.materializeCalls)
	}
	for i, p := range b.params {
		if p.step.Float32s()[0] != 0 {
			t.Errorf("materialize bumped the step of %s", mlpNames[i])
		}
	}
	stateAny, err := osd.Get("state")
	must(t, err)
	state := stateAny.(*dsd.StateDict)
	stateKeys, err := state.Keys()
	must(t, err)
	if !reflect.DeepEqual(stateKeys, mlpNames) {
		t.Errorf("optimizer state keys %v", stateKeys)
	}
	state.Close()
	msd.Close()
	osd.Close()
	// State exists now: no second call.
	_, err = dsd.GetOptimizerStateDict(b.model, []*dsd.Optim{b.optim}, nil)
	must(t, err)
	if len(b.materializeCalls) != 1 {
		t.Errorf("materialize called again: %v", b.materializeCalls)
	}

	for s := 0; s < 5; s++ {
		a.step(t, 0.25)
	}
	if len(a.materializeCalls) != 0 {
		t.Errorf("a's state came from its first step, yet materialize was called")
	}

	opts := dsd.DefaultOptions()
	opts.FlattenOptimizerStateDict = true
	msd, osd, err = dsd.GetStateDict(a.model, []*dsd.Optim{a.optim}, &opts)
	must(t, err)
	defer msd.Close()
	defer osd.Close()
	keys, err := msd.Keys()
	must(t, err)
	if !reflect.DeepEqual(keys, mlpNames) {
		t.Errorf("model state dict keys %v", keys)
	}
	// The model state dict aliases a's memory.
	w0, err := msd.Get("fc1.weight")
	must(t, err)
	info, err := w0.(dsd.Tensor).Info()
	must(t, err)
	if info.Data != a.params[0].w.Pointer() {
		t.Errorf("the model state dict copied fc1.weight")
	}
	w0.(dsd.Tensor).Release()
	for _, k := range []string{"state.fc1.weight.exp_avg", "state.fc2.bias.step", "param_groups.fc1.weight.lr"} {
		if _, err := osd.Find(k); err != nil {
			t.Errorf("flattened optimizer state dict: %v", err)
		}
	}

	if bitwiseEqual(a.params[0].w.Float32s(), b.params[0].w.Float32s()) {
		t.Fatal("a and b start with the same weights: the test would prove nothing")
	}
	keysOut, err := dsd.SetStateDict(b.model, []*dsd.Optim{b.optim}, msd, osd, nil)
	must(t, err)
	missing, unexpected, err := keysOut.Lists()
	must(t, err)
	keysOut.Close()
	if len(missing) != 0 || len(unexpected) != 0 {
		t.Errorf("missing %v unexpected %v", missing, unexpected)
	}
	b.syncHyper(t)
	if b.lr != a.lr || b.params[0].step.Float32s()[0] != 5 {
		t.Errorf("after the load b has lr %g, step %g", b.lr, b.params[0].step.Float32s()[0])
	}

	a.step(t, 0.25)
	b.step(t, 0.25)
	for i, name := range mlpNames {
		pa, pb := a.params[i], b.params[i]
		if !bitwiseEqual(pa.w.Float32s(), pb.w.Float32s()) || !bitwiseEqual(pa.m.Float32s(), pb.m.Float32s()) ||
			!bitwiseEqual(pa.v.Float32s(), pb.v.Float32s()) {
			t.Errorf("%s differs between a and b after one more step", name)
		}
	}
}

func TestTrainerMaterializeErrors(t *testing.T) {
	tr := newTrainer(t, 3)
	defer tr.close()
	sentinel := errors.New("no memory for Adam's moments")
	must(t, tr.optim.SetMaterialize(func(*dsd.Optim, []dsd.Tensor, []int) error { return sentinel }))
	_, err := dsd.GetOptimizerStateDict(tr.model, []*dsd.Optim{tr.optim}, nil)
	expectError(t, err, dsd.ErrCallback, "")
	if !errors.Is(err, sentinel) || !errors.Is(err, dsd.ErrCallback) {
		t.Errorf("the callback's error is not the cause: %v", err)
	}

	must(t, tr.optim.SetMaterialize(func(*dsd.Optim, []dsd.Tensor, []int) error { panic("boom") }))
	_, _, err = dsd.GetStateDict(tr.model, []*dsd.Optim{tr.optim}, nil)
	expectError(t, err, dsd.ErrCallback, "")
	if err == nil || !strings.Contains(err.Error(), "panicked: boom") {
		t.Errorf("a panicking callback gave %v", err)
	}

	// Without a callback the state is simply empty.
	must(t, tr.optim.SetMaterialize(nil))
	osd, err := dsd.GetOptimizerStateDict(tr.model, []*dsd.Optim{tr.optim}, nil)
	must(t, err)
	osd.Close()
}

func TestTrainerModelLoadErrors(t *testing.T) {
	a, b := newTrainer(t, 4), newTrainer(t, 5)
	defer a.close()
	defer b.close()
	msd, err := dsd.GetModelStateDict(a.model, nil)
	must(t, err)
	defer msd.Close()
	i, err := msd.Find("fc2.bias")
	must(t, err)
	must(t, msd.Remove(i))
	must(t, msd.SetDouble("extra", 1))
	before := append([]float32(nil), b.params[0].w.Float32s()...)

	_, err = dsd.SetModelStateDict(b.model, msd, nil)
	expectError(t, err, dsd.ErrNotFound, "Error(s) in loading state_dict for MLP")
	expectError(t, err, dsd.ErrNotFound, "fc2.bias")
	if !bitwiseEqual(before, b.params[0].w.Float32s()) {
		t.Errorf("a failed strict load wrote into the model")
	}

	opts := dsd.DefaultOptions()
	opts.Strict = false
	keys, err := dsd.SetModelStateDict(b.model, msd, &opts)
	must(t, err)
	missing, unexpected, err := keys.Lists()
	must(t, err)
	keys.Close()
	if !reflect.DeepEqual(missing, []string{"fc2.bias"}) || !reflect.DeepEqual(unexpected, []string{"extra"}) {
		t.Errorf("non-strict load: missing %v unexpected %v", missing, unexpected)
	}
	if !bitwiseEqual(a.params[0].w.Float32s(), b.params[0].w.Float32s()) {
		t.Errorf("the non-strict load did not copy fc1.weight")
	}

	// Shape mismatches fail whatever strict says.
	bad, err := dsd.FromFloat32s(make([]float32, 3), nil)
	must(t, err)
	i, err = msd.Find("fc1.bias")
	must(t, err)
	_ = i
	must(t, msd.SetTensor("fc1.bias", bad))
	bad.Release()
	_, err = dsd.SetModelStateDict(b.model, msd, &opts)
	expectError(t, err, dsd.ErrShapeMismatch, "fc1.bias")
}

// Wrappers, buffers, extra state, FQNs and the positional optimizer form.
func TestTrainerModelRegistry(t *testing.T) {
	model, err := dsd.NewModel(nil, "")
	must(t, err)
	defer model.Close()
	long := "_orig_mod.module." + strings.Repeat("block.", 60) + "weight"
	w, err := dsd.FromFloat32s([]float32{1, 2}, nil)
	must(t, err)
	defer w.Release()
	rm, err := dsd.FromFloat32s([]float32{0, 0}, nil)
	must(t, err)
	defer rm.Release()
	must(t, model.DeclareWrapper("_orig_mod", dsd.WrapperDDP))
	must(t, model.AddParameter(long, w, true))
	must(t, model.AddBuffer("_orig_mod.module.running_mean", rm, true))
	must(t, model.AddBuffer("_orig_mod.module.scratch", rm, false))
	must(t, model.AddExtraStateBytes("_orig_mod.module._extra_state", []byte("xs")))
	expectError(t, model.AddParameter(long, w, true), dsd.ErrInvalidArgument, "")
	// An FQN modifier, and extra state shared with a holder the trainer keeps.
	emb, err := dsd.FromFloat32s([]float32{3}, nil)
	must(t, err)
	defer emb.Release()
	must(t, model.AddFQNModifier("emb", "weight", "embedding"))
	must(t, model.AddParameter("emb.embedding.weight", emb, false))
	holder := mustDict(t)
	defer holder.Close()
	config := mustDict(t)
	must(t, config.SetString("activation", "gelu"))
	must(t, holder.SetChild("config", config))
	config.Close()
	must(t, model.AddExtraState("head._extra_state", holder, 0))

	fqn, err := model.CanonicalFQN(long)
	must(t, err)
	if fqn != strings.Repeat("block.", 60)+"weight" {
		t.Errorf("canonical FQN %q", fqn)
	}
	msd, err := dsd.GetModelStateDict(model, nil)
	must(t, err)
	keys, err := msd.Keys()
	must(t, err)
	msd.Close()
	if !reflect.DeepEqual(keys, []string{fqn, "running_mean", "_extra_state", "emb.weight", "head._extra_state"}) {
		t.Errorf("model state dict keys %v", keys)
	}
	entries, err := model.Entries()
	must(t, err)
	xs, err := entries.Get("_orig_mod.module._extra_state")
	must(t, err)
	entries.Close()
	if !reflect.DeepEqual(xs, []byte("xs")) {
		t.Errorf("extra state reads back as %#v", xs)
	}
	// A load replaces extra state; the trainer reads it back from the model's entries.
	loaded := mustDict(t)
	defer loaded.Close()
	newConfig := mustDict(t)
	must(t, newConfig.SetString("activation", "relu"))
	must(t, loaded.SetChild("head._extra_state", newConfig))
	newConfig.Close()
	opts := dsd.DefaultOptions()
	opts.Strict = false
	keysOut, err := dsd.SetModelStateDict(model, loaded, &opts)
	must(t, err)
	keysOut.Close()
	entries, err = model.Entries()
	must(t, err)
	cfg, err := entries.Get("head._extra_state")
	must(t, err)
	entries.Close()
	act, err := cfg.(*dsd.StateDict).Get("activation")
	must(t, err)
	cfg.(*dsd.StateDict).Close()
	if act != "relu" {
		t.Errorf("extra state after a load: activation %v", act)
	}

	sub, err := dsd.GetModelStateDictSubmodules(model, []string{"_orig_mod.module.block"}, nil)
	must(t, err)
	if n, _ := sub.Size(); n != 1 {
		keys, _ := sub.Keys()
		t.Errorf("submodule state dict %v", keys)
	}
	sub.Close()

	// Positional <-> FQN optimizer state dicts.
	optim, err := dsd.NewOptim()
	must(t, err)
	defer optim.Close()
	must(t, optim.AddParamGroup(nil, []dsd.Tensor{w}))
	st := mustDict(t)
	must(t, st.SetInt("step", 2))
	must(t, optim.SetParamState(w, st))
	st.Close()
	if n, err := optim.NumParamGroups(); err != nil || n != 1 {
		t.Errorf("%d groups, %v", n, err)
	}
	got, err := optim.GetParamState(w)
	must(t, err)
	got.Close()
	_, err = optim.GetParamState(rm)
	expectError(t, err, dsd.ErrNotFound, "")
	expectError(t, optim.SetParamState(rm, nil), dsd.ErrNotFound, "")
	group, err := optim.GetParamGroup(0)
	must(t, err)
	group.Close()

	osd, err := dsd.GetOptimizerStateDict(model, []*dsd.Optim{optim}, nil)
	must(t, err)
	defer osd.Close()
	pos, err := dsd.OptimStateDictToPositional(osd, []string{fqn})
	must(t, err)
	defer pos.Close()
	stateAny, err := pos.Get("state")
	must(t, err)
	state := stateAny.(*dsd.StateDict)
	ik, err := state.IntKeys()
	must(t, err)
	skeys, err := state.Keys()
	must(t, err)
	state.Close()
	if !ik || !reflect.DeepEqual(skeys, []string{"0"}) {
		t.Errorf("positional state keys %v (int keys %v)", skeys, ik)
	}
	back, err := dsd.OptimStateDictToFQN(pos, []string{fqn})
	must(t, err)
	defer back.Close()
	equal, why, err := dsd.StateDictEqual(osd, back)
	must(t, err)
	if !equal {
		t.Errorf("positional round trip: %s", why)
	}
	must(t, dsd.SetOptimizerStateDict(model, []*dsd.Optim{optim}, pos, nil))
}
