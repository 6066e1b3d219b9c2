package dsd_test

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"

	"dsd.dev/dsd"
)

func TestErrorsCarryCodeNameMessage(t *testing.T) {
	if dsd.ErrNotFound.Name() != "not_found" || dsd.OK.Name() != "ok" || dsd.Status(999).Name() != "unknown" {
		t.Fatalf("status names: %q %q %q", dsd.ErrNotFound.Name(), dsd.OK.Name(), dsd.Status(999).Name())
	}
	sd := mustDict(t)
	defer sd.Close()
	_, err := sd.Find("nope")
	var de *dsd.Error
	if !errors.As(err, &de) {
		t.Fatalf("Find of a missing key gave %T %v", err, err)
	}
	if de.Code != dsd.ErrNotFound || de.Name != "not_found" || !strings.Contains(de.Message, "'nope'") {
		t.Fatalf("error fields: %+v", de)
	}
	if !errors.Is(err, dsd.ErrNotFound) || errors.Is(err, dsd.ErrWrongKind) {
		t.Fatalf("errors.Is does not follow the code")
	}
	if dsd.CodeOf(err) != dsd.ErrNotFound || dsd.CodeOf(nil) != dsd.OK || dsd.CodeOf(fmt.Errorf("x: %w", err)) != dsd.ErrNotFound ||
		dsd.CodeOf(fmt.Errorf("x: %w", dsd.ErrExists)) != dsd.ErrExists || dsd.CodeOf(errors.New("x")) != dsd.ErrInternal {
		t.Fatalf("CodeOf")
	}
	if !strings.HasPrefix(err.Error(), "dsd: not_found: ") {
		t.Fatalf("Error() = %q", err.Error())
	}
}

// The per-thread message is only meaningful on a locked OS thread.
func TestErrorsLastMessage(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	sd := mustDict(t)
	defer sd.Close()
	_, err := sd.Find("lost")
	if msg := dsd.LastErrorMessage(); err == nil || msg != err.(*dsd.Error).Message {
		t.Fatalf("last error message %q, returned error %v", msg, err)
	}
}

func TestVersions(t *testing.T) {
	if dsd.ABIVersion()>>16 != dsd.ABIVersionMajor {
		t.Fatalf("ABI %x", dsd.ABIVersion())
	}
	if v := dsd.VersionString(); strings.Count(v, ".") != 2 {
		t.Fatalf("version string %q", v)
	}
	if dsd.DTypeF32.Size() != 4 || dsd.DTypeBF16.Name() != "bfloat16" || dsd.DType(99).Name() != "" || dsd.DType(99).Size() != 0 {
		t.Fatalf("dtype helpers")
	}
}

// Helpers shared by the tests.

func mustDict(t testing.TB) *dsd.StateDict {
	t.Helper()
	sd, err := dsd.NewStateDict()
	if err != nil {
		t.Fatal(err)
	}
	return sd
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// expectError checks a dsd error's code and that its message contains needle.
func expectError(t testing.TB, err error, code dsd.Status, needle string) {
	t.Helper()
	var de *dsd.Error
	if !errors.As(err, &de) {
		t.Errorf("expected %s error containing %q, got %v", code.Name(), needle, err)
		return
	}
	if de.Code != code || de.Message == "" || !strings.Contains(de.Message, needle) {
		t.Errorf("expected %s error containing %q, got %s: %q", code.Name(), needle, de.Name, de.Message)
	}
}
