// Package guest is imported by kernel-facing tests only. It decides whether a
// test that lacks a privilege or kernel feature skips (on a developer's host)
// or fails (inside a vmtest guest, where every such test must run).
//
// The vmtest runner sets XDERP_VMTEST=1 in the guest, and
// XDERP_VMTEST_MISSING to a comma-separated list of kernel features the kernel
// matrix file says that kernel is expected to lack (for example "btf,jit").
package guest

import (
	"os"
	"strings"
	"testing"
)

// InVM reports whether the test binary runs inside a vmtest guest.
func InVM() bool { return os.Getenv("XDERP_VMTEST") == "1" }

// ExpectedMissing reports whether the kernel under test is declared, in the
// kernel matrix, to lack feature.
func ExpectedMissing(feature string) bool {
	for _, f := range strings.Split(os.Getenv("XDERP_VMTEST_MISSING"), ",") {
		if f != "" && strings.EqualFold(strings.TrimSpace(f), feature) {
			return true
		}
	}
	return false
}

// Skip skips the test on a host with the stated reason, and fails it inside a
// vmtest guest: there, every kernel-facing test must run.
func Skip(t testing.TB, reason string) {
	t.Helper()
	if InVM() {
		t.Fatalf("would skip inside vmtest (a skip is a failure here): %s", reason)
	}
	t.Skip(reason)
}

// SkipMissingFeature skips because the kernel lacks feature. Inside a vmtest
// guest this is a failure unless the kernel matrix declares the feature
// missing for this kernel.
func SkipMissingFeature(t testing.TB, feature, detail string) {
	t.Helper()
	if InVM() && !ExpectedMissing(feature) {
		t.Fatalf("kernel lacks %s (%s), but the kernel matrix does not expect that", feature, detail)
	}
	t.Skipf("kernel lacks %s: %s", feature, detail)
}

// RequireRoot skips (or fails in a guest) unless the process runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skip(t, "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN for netns)")
	}
}
