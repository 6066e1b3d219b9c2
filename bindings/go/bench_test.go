package dsd_test

import (
	"fmt"
	"testing"

	"dsd.dev/dsd"
)

// The binding's cost per call, to be read against BenchmarkCgoBaseline (a bare cgo call,
// dsd_abi_version): `go test -bench . -run '^$'`.

func BenchmarkCgoBaseline(b *testing.B) {
	for i := 0; i < b.N; i++ {
		dsd.ABIVersion()
	}
}

func BenchmarkStateDictSetInt(b *testing.B) {
	sd := mustDict(b)
	defer sd.Close()
	for i := 0; i < b.N; i++ {
		if err := sd.SetInt("step", int64(i)); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkStateDictGetDouble(b *testing.B) {
	sd := mustDict(b)
	defer sd.Close()
	must(b, sd.SetDouble("lr", 0.1))
	for i := 0; i < b.N; i++ {
		if _, err := sd.GetDouble(0); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkTensorWrapRelease(b *testing.B) {
	buf, err := dsd.NewHostBuffer(4 * 1024)
	must(b, err)
	defer buf.Close()
	shape := []int64{32, 32}
	for i := 0; i < b.N; i++ {
		t, err := buf.Wrap(0, dsd.DTypeF32, shape, false)
		if err != nil {
			b.Fatal(err)
		}
		t.Release()
	}
}

// get_model_state_dict of a model of n parameters, per call.
func BenchmarkGetModelStateDict(b *testing.B) {
	for _, n := range []int{16, 1024} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			model, err := dsd.NewModel(nil, "")
			must(b, err)
			defer model.Close()
			buf, err := dsd.NewHostBuffer(4 * n)
			must(b, err)
			defer buf.Close()
			for i := 0; i < n; i++ {
				t, err := buf.Wrap(4*i, dsd.DTypeF32, []int64{1}, false)
				must(b, err)
				must(b, model.AddParameter(fmt.Sprintf("layers.%d.weight", i), t, true))
				t.Release()
			}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				sd, err := dsd.GetModelStateDict(model, nil)
				if err != nil {
					b.Fatal(err)
				}
				sd.Close()
			}
		})
	}
}
