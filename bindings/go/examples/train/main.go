// A two-layer MLP trained with Adam, written in Go: the trainer owns every buffer (weights,
// moments, step counters, in C memory it reads and writes as Go slices) and registers them
// with dsd. dsd produces PyTorch-style state dicts (canonical FQNs, optimizer state keyed by
// FQN), loads them into a second, differently initialised trainer, and both then train one
// more step to bitwise the same weights. Adam's state is created lazily, through dsd's
// materialize callback. The Go twin of examples/c/mlp_adam.c.
//
//	go run ./examples/train    (with CGO_CFLAGS/CGO_LDFLAGS pointing at dsd.h and libdsd)
package main

import (
	"fmt"
	"math"
	"math/rand"
	"os"
	"strings"

	"dsd.dev/dsd"
)

var (
	names  = []string{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
	shapes = [][]int64{{8, 4}, {8, 1}, {2, 8}, {2, 1}}
)

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func numel(i int) int { return int(shapes[i][0] * shapes[i][1]) }

type param struct {
	w, m, v *dsd.HostBuffer // m (exp_avg) and v (exp_avg_sq) are allocated lazily
	step    *dsd.HostBuffer // Adam's step counter, a 0-dim float32 tensor as in PyTorch
	handle  dsd.Tensor
}

type trainer struct {
	params                []*param
	lr, beta1, beta2, eps float64
	model                 *dsd.Model
	optim                 *dsd.Optim
	hyper                 *dsd.StateDict
}

func wrap(buf *dsd.HostBuffer, i int, scalar bool) dsd.Tensor {
	shape := shapes[i]
	if scalar {
		shape = nil
	}
	t, err := buf.Wrap(0, dsd.DTypeF32, shape, false)
	check(err)
	return t
}

// materialize creates the state of parameters that have none: called by dsd before a get or
// set when parameters lack optimizer state, and by the first step.
func (tr *trainer) materialize(optim *dsd.Optim, params []dsd.Tensor, _ []int) error {
	for _, h := range params {
		info, err := h.Info()
		if err != nil {
			return err
		}
		for i, p := range tr.params { // our parameters are told apart by their memory
			if info.Data != p.w.Pointer() || p.m != nil {
				continue
			}
			p.m, _ = dsd.NewHostBuffer(4 * numel(i))
			p.v, _ = dsd.NewHostBuffer(4 * numel(i))
			p.step, _ = dsd.NewHostBuffer(4) // zeroed: a fresh optimizer's state, nothing stepped
			st, err := dsd.NewStateDict()
			check(err)
			step, m, v := wrap(p.step, i, true), wrap(p.m, i, false), wrap(p.v, i, false)
			check(st.SetTensor("step", step))
			check(st.SetTensor("exp_avg", m))
			check(st.SetTensor("exp_avg_sq", v))
			check(optim.SetParamState(p.handle, st))
			st.Close()
			step.Release()
			m.Release()
			v.Release()
		}
	}
	return nil
}

func newTrainer(seed int64) *trainer {
	rng := rand.New(rand.NewSource(seed))
	tr := &trainer{lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8}
	var err error
	tr.model, err = dsd.NewModel(nil, "MLP")
	check(err)
	tr.optim, err = dsd.NewOptim()
	check(err)
	handles := make([]dsd.Tensor, len(names))
	for i, name := range names {
		p := &param{}
		p.w, err = dsd.NewHostBuffer(4 * numel(i))
		check(err)
		for j := range p.w.Float32s() {
			p.w.Float32s()[j] = rng.Float32() - 0.5
		}
		p.handle = wrap(p.w, i, false)
		check(tr.model.AddParameter(name, p.handle, true))
		handles[i] = p.handle
		tr.params = append(tr.params, p)
	}
	tr.hyper, err = dsd.NewStateDict()
	check(err)
	betas, err := dsd.NewStateDictList(true)
	check(err)
	check(betas.AppendDouble(tr.beta1))
	check(betas.AppendDouble(tr.beta2))
	check(tr.hyper.SetDouble("lr", tr.lr))
	check(tr.hyper.SetChild("betas", betas))
	check(tr.hyper.SetDouble("eps", tr.eps))
	check(tr.hyper.SetDouble("weight_decay", 0))
	betas.Close()
	check(tr.optim.AddParamGroup(tr.hyper, handles))
	check(tr.optim.SetMaterialize(tr.materialize))
	return tr
}

// trainStep is one Adam step on the loss 0.5 * sum((w - target)^2), whose gradient is
// w - target.
func (tr *trainer) trainStep(target float32) {
	for i, p := range tr.params {
		if p.m == nil { // first step: create state, as a lazy optimizer does
			check(tr.materialize(tr.optim, []dsd.Tensor{p.handle}, []int{i}))
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

// syncHyper reads lr back from the (shared) hyperparameter dict after a load.
func (tr *trainer) syncHyper() {
	at, err := tr.hyper.Find("lr")
	check(err)
	tr.lr, err = tr.hyper.GetDouble(at)
	check(err)
}

func (tr *trainer) close() {
	tr.model.Close()
	tr.optim.Close()
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

func steps(tr *trainer) []float32 {
	var s []float32
	for _, p := range tr.params {
		s = append(s, p.step.Float32s()[0])
	}
	return s
}

func main() {
	a, b := newTrainer(1), newTrainer(2)
	defer a.close()
	defer b.close()
	b.lr = 0.5 // b has other weights and another learning rate until it loads a's state
	check(b.hyper.SetDouble("lr", b.lr))

	// b's optimizer has no state yet: dsd materializes it, no step is taken.
	lazyM, lazyO, err := dsd.GetStateDict(b.model, []*dsd.Optim{b.optim}, nil)
	check(err)
	fmt.Printf("fresh optimizer: step counters %v (no dummy step)\n", steps(b))
	lazyM.Close()
	lazyO.Close()

	for s := 0; s < 5; s++ {
		a.trainStep(0.25)
	}

	opts := dsd.DefaultOptions()
	opts.FlattenOptimizerStateDict = true
	msd, osd, err := dsd.GetStateDict(a.model, []*dsd.Optim{a.optim}, &opts)
	check(err)
	defer msd.Close()
	defer osd.Close()
	keys, err := osd.Keys()
	check(err)
	fmt.Printf("flattened optimizer state dict of trainer a (%d keys):\n", len(keys))
	for _, k := range keys {
		if strings.Contains(k, "fc1.weight") {
			fmt.Printf("  %s\n", k)
		}
	}

	// Load a's state into b: copied into b's own buffers, hyperparameters into b's dict.
	incompatible, err := dsd.SetStateDict(b.model, []*dsd.Optim{b.optim}, msd, osd, nil)
	check(err)
	missing, err := incompatible.Count(dsd.KeysMissing)
	check(err)
	unexpected, err := incompatible.Count(dsd.KeysUnexpected)
	check(err)
	incompatible.Close()
	b.syncHyper()
	fmt.Printf("loaded into trainer b: %d missing, %d unexpected keys; lr %g, step %g\n", missing, unexpected,
		b.lr, b.params[0].step.Float32s()[0])

	a.trainStep(0.25)
	b.trainStep(0.25)
	same := true
	for i := range names {
		wa, wb := a.params[i].w.Float32s(), b.params[i].w.Float32s()
		for j := range wa {
			same = same && math.Float32bits(wa[j]) == math.Float32bits(wb[j])
		}
	}
	if !same {
		fmt.Println("after one more step, trainers a and b have DIFFERENT weights")
		os.Exit(1)
	}
	fmt.Println("after one more step, trainers a and b have bitwise identical weights")
}
