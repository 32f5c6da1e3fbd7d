package runner

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"
)

// The tests below boot a real kernel in QEMU (about 10-20 s each on a
// 2-core machine without KVM), so they run only when asked.
const bootEnv = "XDERP_VMTEST_BOOT"

func requireBoot(t *testing.T) {
	t.Helper()
	if os.Getenv(bootEnv) != "1" {
		t.Skipf("boots kernels in QEMU: set %s=1 to run (needs qemu-system-x86, busybox-static, kmod, xz-utils and the Debian apt archive)", bootEnv)
	}
	if err := CheckTools("", "/bin/busybox"); err != nil {
		t.Fatalf("%s=1 but: %v", bootEnv, err)
	}
}

// runSelftest runs the self-test package on the named kernels.
func runSelftest(t *testing.T, kernels string, mod func(*Config)) *Report {
	t.Helper()
	m, root := repoMatrix(t)
	ks, err := m.Select(kernels)
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	cfg := Config{
		ModuleRoot: root, Matrix: m, Kernels: ks,
		Packages: []string{"./vmtest/internal/selftest"},
		Timeout:  2 * time.Minute, Out: &out,
	}
	if mod != nil {
		mod(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	rep, err := Run(ctx, cfg)
	t.Logf("runner output:\n%s", out.String())
	if err != nil {
		t.Fatalf("runner failed before the tests ran: %v", err)
	}
	return rep
}

func TestRunPassesOnFloorKernel(t *testing.T) {
	requireBoot(t)
	rep := runSelftest(t, "debian-6.1", nil)
	if !rep.OK() {
		t.Fatalf("the self-test failed on the floor kernel:\n%s", rep.Markdown())
	}
	kr := rep.Results[0]
	if !strings.HasPrefix(kr.Release, "6.1.") {
		t.Errorf("guest release %q, want 6.1.*", kr.Release)
	}
	if p, s, f := kr.Totals(); p == 0 || s != 0 || f != 0 {
		t.Errorf("totals %d/%d/%d, want passes only", p, s, f)
	}
	if !strings.Contains(rep.Markdown(), "| debian-6.1 (floor) | 6.1.") {
		t.Errorf("table lacks the floor row:\n%s", rep.Markdown())
	}
}

// A program the verifier rejects must fail the run.
func TestBrokenProgramFailsRun(t *testing.T) {
	requireBoot(t)
	rep := runSelftest(t, "debian-6.1", func(c *Config) {
		c.Env = []string{"XDERP_SELFTEST_BROKEN=1"}
		c.Run = "TestVerifierRejectsUncheckedPacketRead"
	})
	if rep.OK() {
		t.Fatalf("the run passed with a program the verifier rejects:\n%s", rep.Markdown())
	}
	kr := rep.Results[0]
	if kr.Err != nil {
		t.Fatalf("the guest itself failed (%v); want it to come back with a failing test", kr.Err)
	}
	if len(kr.Binaries) != 1 {
		t.Fatalf("%d binaries reported, want 1", len(kr.Binaries))
	}
	b := kr.Binaries[0]
	if !b.Finished || b.Exit == 0 || b.Failed != 1 {
		t.Errorf("binary finished %v exit %d failed %d, want a finished binary with exit != 0 and one failure", b.Finished, b.Exit, b.Failed)
	}
	if !strings.Contains(b.Output, "load deliberately broken program") {
		t.Errorf("output lacks the verifier failure:\n%s", b.Output)
	}
	if !strings.Contains(rep.Markdown(), "**FAIL**") {
		t.Errorf("table does not show the failure:\n%s", rep.Markdown())
	}
}

// A guest that never finishes must fail the run with a clear message.
func TestHungGuestFailsRun(t *testing.T) {
	requireBoot(t)
	const limit = 60 * time.Second
	rep := runSelftest(t, "debian-6.1", func(c *Config) {
		// Long enough for the floor kernel to boot on a loaded 2-core
		// machine without KVM (15-35 s seen at load 11); the guest idles
		// while it waits.
		c.Env = []string{"XDERP_SELFTEST_HANG=1"}
		c.Timeout = limit
		c.TestTimeout = -1
	})
	if rep.OK() {
		t.Fatal("the run passed with a hung guest")
	}
	kr := rep.Results[0]
	if !errors.Is(kr.Err, ErrGuestTimeout) {
		t.Fatalf("kernel error = %v, want ErrGuestTimeout; console:\n%s", kr.Err, kr.Console)
	}
	msg := kr.Err.Error()
	if !strings.Contains(msg, limit.String()) {
		t.Errorf("message %q should state the limit", msg)
	}
	switch {
	case strings.Contains(msg, "while running selftest"):
	case strings.Contains(msg, "before init reported"):
		// Still a timeout reported as such, but the machine was too
		// loaded to boot in time, so the hang itself went unseen.
		t.Logf("the guest did not boot within the limit on this machine: %s", msg)
	default:
		t.Errorf("message %q should say what the guest was doing", msg)
	}
}

// On the host kernel a failing test fails the run too.
func TestBrokenProgramFailsHostRun(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("runs test binaries on the host kernel, which needs root")
	}
	rep := runSelftest(t, "host", func(c *Config) {
		c.Env = []string{"XDERP_SELFTEST_BROKEN=1"}
		c.Run = "TestVerifierRejectsUncheckedPacketRead"
	})
	if rep.OK() {
		t.Fatalf("the host run passed with a program the verifier rejects:\n%s", rep.Markdown())
	}
	if b := rep.Results[0].Binaries; len(b) != 1 || b[0].Exit == 0 {
		t.Errorf("binaries = %+v, want one failing", b)
	}
}

// A plain skip (not a matrix-declared missing feature) fails the run even
// though the binary exits 0.
func TestUndeclaredSkipFailsHostRun(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("runs test binaries on the host kernel, which needs root")
	}
	rep := runSelftest(t, "host", func(c *Config) {
		c.Env = []string{"XDERP_SELFTEST_BADSKIP=1"}
		c.Run = "TestKernelFeatures"
	})
	if rep.OK() {
		t.Fatalf("the run passed with an undeclared skip:\n%s", rep.Markdown())
	}
	b := rep.Results[0].Binaries
	if len(b) != 1 || b[0].Exit != 0 || len(b[0].BadSkips) != 1 || b[0].BadSkips[0] != "TestKernelFeatures" {
		t.Errorf("binaries = %+v, want one exiting 0 with TestKernelFeatures as a bad skip", b)
	}
}
