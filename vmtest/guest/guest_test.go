package guest

import (
	"fmt"
	"testing"
)

// recorder stands in for a test so the helpers' decisions can be observed.
type recorder struct {
	testing.TB
	fatal, skip string
}

func (r *recorder) Helper()                           {}
func (r *recorder) Fatalf(format string, args ...any) { r.fatal = fmt.Sprintf(format, args...) }
func (r *recorder) Skip(args ...any)                  { r.skip = fmt.Sprint(args...) }
func (r *recorder) Skipf(format string, args ...any)  { r.skip = fmt.Sprintf(format, args...) }

func TestExpectedMissing(t *testing.T) {
	t.Setenv("XDERP_VMTEST_MISSING", "btf, JIT,,")
	for feature, want := range map[string]bool{"btf": true, "jit": true, "BTF": true, "xdp": false, "": false} {
		if got := ExpectedMissing(feature); got != want {
			t.Errorf("ExpectedMissing(%q) = %v, want %v", feature, got, want)
		}
	}
}

func TestSkipFailsInsideVM(t *testing.T) {
	t.Setenv("XDERP_VMTEST", "")
	r := &recorder{}
	Skip(r, "needs root")
	if r.fatal != "" || r.skip != "needs root" {
		t.Errorf("on a host: fatal %q skip %q, want a skip", r.fatal, r.skip)
	}
	t.Setenv("XDERP_VMTEST", "1")
	r = &recorder{}
	Skip(r, "needs root")
	if r.fatal == "" {
		t.Error("inside vmtest a skip did not fail the test")
	}
}

func TestSkipMissingFeature(t *testing.T) {
	t.Setenv("XDERP_VMTEST", "1")
	t.Setenv("XDERP_VMTEST_MISSING", "jit")
	r := &recorder{}
	SkipMissingFeature(r, "jit", "no sysctl")
	if r.fatal != "" || r.skip != "kernel lacks jit: no sysctl" {
		t.Errorf("declared feature: fatal %q skip %q, want the skip the runner recognises", r.fatal, r.skip)
	}
	r = &recorder{}
	SkipMissingFeature(r, "btf", "no vmlinux")
	if r.fatal == "" {
		t.Error("an undeclared missing feature did not fail inside vmtest")
	}
}
