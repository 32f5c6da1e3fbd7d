package runner

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Config is one vmtest run.
type Config struct {
	ModuleRoot string   // directory of the main module's go.mod
	Matrix     *Matrix  // the kernel matrix
	Kernels    []Kernel // the kernels to run, from Matrix.Select
	Packages   []string // go list patterns, relative to ModuleRoot
	Run        string   // -test.run regex; empty runs every test
	// Env is extra environment for the test binaries (KEY=VALUE), on top
	// of XDERP_VMTEST=1 and XDERP_VMTEST_MISSING.
	Env []string
	// Timeout bounds one kernel: boot, every binary, power-off. Default 4m.
	Timeout time.Duration
	// TestTimeout is passed to each binary as -test.timeout so a hung test
	// prints its goroutines; default Timeout minus 30 s, negative for none.
	TestTimeout time.Duration
	Busybox     string     // static busybox; default /bin/busybox
	QEMU        QEMUConfig // Timeout is taken from Timeout above
	CacheDir    string     // default CacheDir()
	WorkDir     string     // scratch space; default a temp dir, removed afterwards
	Out         io.Writer  // progress and test output; writes are serialised
	// Parallel is how many kernels run at once (default 1). Under TCG each
	// guest CPU is a host thread, so on 2 cores two one-CPU guests finish
	// CPU-bound tests sooner than one two-CPU guest after another.
	Parallel int
	Verbose  bool // stream every test's output (not only failures)
}

// KernelResult is the outcome on one kernel.
type KernelResult struct {
	Kernel   Kernel
	Release  string
	Elapsed  time.Duration
	Binaries []BinaryResult
	// Err says why the kernel failed outside the tests themselves
	// (download, boot, timeout, crash); nil if the guest came back.
	Err error
	// Console holds the tail of the guest console, for failures.
	Console string
	// Retried, if not empty, says why the guest was booted a second
	// time (see textPatchPanic); the result is the second boot's.
	Retried string
}

// OK reports whether every binary passed on this kernel.
func (r *KernelResult) OK() bool {
	if r.Err != nil || len(r.Binaries) == 0 {
		return false
	}
	for i := range r.Binaries {
		if !r.Binaries[i].OK() {
			return false
		}
	}
	return true
}

// Totals sums the test counts of all binaries.
func (r *KernelResult) Totals() (passed, skipped, failed int) {
	for _, b := range r.Binaries {
		passed += b.Passed
		skipped += b.Skipped
		failed += b.Failed + len(b.BadSkips)
		if !b.Finished || (b.Exit != 0 && b.Failed == 0) {
			failed++ // crashed or exited badly without a --- FAIL line
		}
	}
	return passed, skipped, failed
}

// Report is a whole run.
type Report struct {
	Results  []KernelResult
	Packages []string // import paths that ran
	Elapsed  time.Duration
}

// OK reports whether every kernel passed.
func (r *Report) OK() bool {
	if len(r.Results) == 0 {
		return false
	}
	for i := range r.Results {
		if !r.Results[i].OK() {
			return false
		}
	}
	return true
}

// Run builds the test binaries once and runs them on every selected kernel,
// one boot per kernel. The error is for failures of the runner itself; test
// failures are in the report (see Report.OK).
func Run(ctx context.Context, cfg Config) (*Report, error) {
	start := time.Now()
	if cfg.Out == nil {
		cfg.Out = io.Discard
	}
	cfg.Out = &syncWriter{w: cfg.Out}
	if cfg.Timeout == 0 {
		cfg.Timeout = 4 * time.Minute
	}
	if cfg.TestTimeout == 0 {
		cfg.TestTimeout = cfg.Timeout - 30*time.Second
		if cfg.TestTimeout <= 0 {
			cfg.TestTimeout = cfg.Timeout / 2
		}
	}
	if cfg.Busybox == "" {
		cfg.Busybox = "/bin/busybox"
	}
	if cfg.CacheDir == "" {
		d, err := CacheDir()
		if err != nil {
			return nil, err
		}
		cfg.CacheDir = d
	}
	logf := func(format string, args ...any) { fmt.Fprintf(cfg.Out, format+"\n", args...) }

	needVM := false
	for _, k := range cfg.Kernels {
		if k.Source.Type != SourceHost {
			needVM = true
		}
	}
	if needVM {
		if err := CheckTools(cfg.QEMU.Binary, cfg.Busybox); err != nil {
			return nil, err
		}
	}

	work := cfg.WorkDir
	if work == "" {
		d, err := os.MkdirTemp("", "xderp-vmtest-")
		if err != nil {
			return nil, fmt.Errorf("make work dir: %w", err)
		}
		defer os.RemoveAll(d)
		work = d
	}
	binDir := filepath.Join(work, "bin")
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return nil, fmt.Errorf("make work dir: %w", err)
	}

	// Fetch first, so a missing kernel fails before minutes of building.
	fetcher := &Fetcher{Cache: cfg.CacheDir, Log: cfg.Out}
	prepared := make([]*Prepared, len(cfg.Kernels))
	for i, k := range cfg.Kernels {
		p, err := fetcher.Prepare(ctx, k)
		if err != nil {
			return nil, err
		}
		prepared[i] = p
	}

	buildStart := time.Now()
	bins, err := BuildTests(ctx, cfg.ModuleRoot, binDir, cfg.Packages, logf)
	if err != nil {
		return nil, err
	}
	srcDirs, err := SourceDirs(ctx, cfg.ModuleRoot, bins)
	if err != nil {
		return nil, err
	}
	rep := &Report{}
	for _, b := range bins {
		rep.Packages = append(rep.Packages, b.ImportPath)
	}
	logf("vmtest: built %d test binaries in %s", len(bins), time.Since(buildStart).Round(100*time.Millisecond))

	var testArgs []string
	if cfg.Run != "" {
		testArgs = append(testArgs, "-test.run="+cfg.Run)
	}
	if cfg.TestTimeout > 0 {
		testArgs = append(testArgs, "-test.timeout="+cfg.TestTimeout.String())
	}

	var applets []string
	if needVM {
		if applets, err = busyboxApplets(ctx, cfg.Busybox); err != nil {
			return nil, err
		}
	}
	// Kernels run Parallel at a time; each one's summary and failures are
	// printed in one piece when it finishes.
	results := make([]KernelResult, len(prepared))
	sem := make(chan struct{}, max(cfg.Parallel, 1))
	var wg sync.WaitGroup
	for i, p := range prepared {
		wg.Add(1)
		sem <- struct{}{} // taken here, so kernels start in matrix order
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if ctx.Err() != nil {
				results[i] = KernelResult{Kernel: p.Kernel, Err: ctx.Err()}
				return
			}
			var kr KernelResult
			if p.Source.Type == SourceHost {
				kr = runHost(ctx, cfg, p, bins, testArgs)
			} else {
				kr = runGuest(ctx, cfg, p, bins, srcDirs, testArgs, applets, work)
				if why := textPatchPanic(kr); why != "" && ctx.Err() == nil {
					fmt.Fprintf(cfg.Out, "vmtest: %s: the guest kernel panicked %s, a race of kernel text patching that QEMU without KVM does not make safe across vCPUs; booting it once more\n", p.Name, why)
					kr = runGuest(ctx, cfg, p, bins, srcDirs, testArgs, applets, work)
					kr.Retried = "guest kernel panicked " + why
				}
			}
			status := "PASS"
			if !kr.OK() {
				status = "FAIL"
			}
			pa, sk, fa := kr.Totals()
			var b bytes.Buffer
			if kr.Retried != "" {
				status += " on a second boot"
			}
			fmt.Fprintf(&b, "vmtest: %s (%s): %s in %s (%d passed, %d skipped as expected, %d failed)\n",
				kr.Kernel.Name, kr.Release, status, kr.Elapsed.Round(100*time.Millisecond), pa, sk, fa)
			printFailures(&b, &kr, cfg.Verbose)
			cfg.Out.Write(b.Bytes())
			results[i] = kr
		}()
	}
	wg.Wait()
	rep.Results = results
	if ctx.Err() != nil {
		return rep, ctx.Err()
	}
	rep.Elapsed = time.Since(start)
	return rep, nil
}

func guestEnv(cfg Config, k Kernel) (map[string]string, error) {
	env := map[string]string{
		"XDERP_VMTEST":         "1",
		"XDERP_VMTEST_MISSING": strings.Join(k.Missing, ","),
		"XDERP_VMTEST_KERNEL":  k.Name,
	}
	for _, kv := range cfg.Env {
		key, val, ok := strings.Cut(kv, "=")
		if !ok || key == "" {
			return nil, fmt.Errorf("environment entry %q: want KEY=VALUE", kv)
		}
		env[key] = val
	}
	return env, nil
}

func runGuest(ctx context.Context, cfg Config, p *Prepared, bins []TestBinary, srcDirs, testArgs, applets []string, work string) (kr KernelResult) {
	kr = KernelResult{Kernel: p.Kernel, Release: p.Release}
	start := time.Now()
	defer func() { kr.Elapsed = time.Since(start) }()
	env, err := guestEnv(cfg, p.Kernel)
	if err != nil {
		kr.Err = err
		return kr
	}
	mods, err := ResolveModules(ctx, p, cfg.Matrix.Modules)
	if err != nil {
		kr.Err = err
		return kr
	}
	tools, err := ResolveTools(ctx, cfg.Matrix.Tools)
	if err != nil {
		kr.Err = err
		return kr
	}
	dir := filepath.Join(work, p.Name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		kr.Err = err
		return kr
	}
	initrd := filepath.Join(dir, "initramfs.cpio")
	img := Image{
		Busybox: cfg.Busybox, Applets: applets, Modules: mods, Tools: tools,
		ModuleRoot: cfg.ModuleRoot, SourceDirs: srcDirs,
		Plan: GuestPlan{Env: env, Binaries: bins, TestArgs: testArgs, FullOutput: cfg.Verbose},
	}
	if err := WriteInitramfs(ctx, initrd, img); err != nil {
		kr.Err = fmt.Errorf("kernel %s: %w", p.Name, err)
		return kr
	}
	qc := cfg.QEMU
	qc.Timeout = cfg.Timeout
	fmt.Fprintf(cfg.Out, "vmtest: %s: booting %s (%d modules, %d test binaries)\n", p.Name, filepath.Base(p.Vmlinuz), len(mods), len(bins))
	boot, err := Boot(ctx, qc, p.Vmlinuz, initrd, dir)
	gr := ParseGuest(boot.Results, p.Missing)
	kr.Binaries = gr.Binaries
	if gr.Release != "" {
		kr.Release = gr.Release
	}
	kr.Console = tail(boot.Console, 40)
	switch {
	case errors.Is(err, ErrGuestTimeout):
		where := "before init reported: the kernel did not get to userspace (see the console)"
		if gr.Booted {
			where = "after it booted"
			if n := len(gr.Binaries); n > 0 {
				last := gr.Binaries[n-1]
				if !last.Finished {
					where = "while running " + last.Name
				}
			}
		}
		kr.Err = fmt.Errorf("kernel %s: %w (%s)", p.Name, err, where)
	case err != nil:
		kr.Err = fmt.Errorf("kernel %s: %w", p.Name, err)
	case !gr.Booted:
		kr.Err = fmt.Errorf("kernel %s: the guest stopped before init reported (kernel panic? see console)", p.Name)
	case !gr.Done:
		kr.Err = fmt.Errorf("kernel %s: the guest stopped before running every test binary (crash or panic? see console)", p.Name)
	case len(gr.ModuleErrors) > 0:
		kr.Err = fmt.Errorf("kernel %s: insmod failed for %s", p.Name, strings.Join(gr.ModuleErrors, ", "))
	case len(gr.Binaries) != len(bins):
		kr.Err = fmt.Errorf("kernel %s: %d of %d test binaries reported", p.Name, len(gr.Binaries), len(bins))
	}
	return kr
}

// runHost runs the binaries directly on the running kernel, as root, each in
// its package directory as go test would.
func runHost(ctx context.Context, cfg Config, p *Prepared, bins []TestBinary, testArgs []string) (kr KernelResult) {
	kr = KernelResult{Kernel: p.Kernel, Release: hostRelease()}
	start := time.Now()
	defer func() { kr.Elapsed = time.Since(start) }()
	if os.Geteuid() != 0 {
		kr.Err = fmt.Errorf("kernel host: the tests must run as root on the host (run as root, or pick VM kernels with -kernel)")
		return kr
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		kr.Err = fmt.Errorf("kernel host: needs unshare (package util-linux) to give the tests a private bpffs: %w", err)
		return kr
	}
	env, err := guestEnv(cfg, p.Kernel)
	if err != nil {
		kr.Err = err
		return kr
	}
	environ := os.Environ()
	for k, v := range env {
		environ = append(environ, k+"="+v)
	}
	for _, b := range bins {
		hctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
		// Each binary gets a private mount namespace with a fresh bpffs on
		// /sys/fs/bpf, as in a guest: pins never leak onto the host, and
		// the host need not have bpffs mounted.
		args := append([]string{"--mount", "--propagation", "private", "--", "/bin/sh", "-c",
			`mount -t bpf bpf /sys/fs/bpf && exec "$0" "$@"`, b.Path, "-test.v"}, testArgs...)
		cmd := exec.CommandContext(hctx, "unshare", args...)
		cmd.Dir = b.Dir
		cmd.Env = environ
		cmd.WaitDelay = 5 * time.Second
		var out lockedBuffer
		cmd.Stdout = &out
		cmd.Stderr = &out
		err := cmd.Run()
		timedOut := hctx.Err() == context.DeadlineExceeded
		cancel()
		br := BinaryResult{Name: b.Name, Output: out.String(), Finished: true}
		var ee *exec.ExitError
		switch {
		case timedOut:
			br.Finished = false
			kr.Err = fmt.Errorf("kernel host: %s did not finish within %s", b.Name, cfg.Timeout)
		case errors.As(err, &ee):
			br.Exit = ee.ExitCode()
		case err != nil:
			br.Finished = false
			kr.Err = fmt.Errorf("kernel host: run %s: %w", b.Name, err)
		}
		ScoreTestOutput(&br, p.Missing)
		kr.Binaries = append(kr.Binaries, br)
		if ctx.Err() != nil {
			break
		}
	}
	return kr
}

func hostRelease() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}

// CheckTools says clearly which host tool is missing for VM runs.
func CheckTools(qemu, busybox string) error {
	if qemu == "" {
		qemu = "qemu-system-x86_64"
	}
	need := []struct{ tool, pkg string }{
		{qemu, "qemu-system-x86"},
		{"modprobe", "kmod"},
		{"depmod", "kmod"},
		{"dpkg", "dpkg"},
		{"apt-get", "apt"},
		{"xz", "xz-utils"},
		{"go", "the Go toolchain"},
	}
	var missing []string
	for _, n := range need {
		if _, err := exec.LookPath(n.tool); err != nil {
			missing = append(missing, fmt.Sprintf("%s (%s)", n.tool, n.pkg))
		}
	}
	if _, err := os.Stat(busybox); err != nil {
		missing = append(missing, busybox+" (busybox-static)")
	}
	if len(missing) > 0 {
		return fmt.Errorf("vmtest needs %s: apt-get install --no-install-recommends qemu-system-x86 busybox-static kmod cpio xz-utils", strings.Join(missing, ", "))
	}
	return nil
}

// textPatchSites are kernel functions whose code the kernel rewrites while
// other CPUs may run it (static calls, static branches): the XDP
// dispatcher on every XDP attach or replace, the UDP hash's static key on
// first use. Linux makes that safe with an int3 breakpoint and IPIs; under
// QEMU without KVM a vCPU can still execute a stale translation holding
// the breakpoint after the patch is done, and the kernel dies on an int3
// it no longer expects.
var textPatchSites = []string{"bpf_dispatcher_xdp_func", "udp_ehashfn"}

// textPatchPanic returns, for a guest that died in a kernel panic while
// executing a text-patching site, a phrase naming it; otherwise "". Only
// that failure earns a second boot: anything else, including any other
// panic, fails the kernel at once.
func textPatchPanic(kr KernelResult) string {
	if kr.Err == nil || !strings.Contains(kr.Console, "Kernel panic") {
		return ""
	}
	for _, line := range strings.Split(kr.Console, "\n") {
		_, rip, ok := strings.Cut(line, "RIP: 0010:")
		if !ok {
			continue
		}
		for _, site := range textPatchSites {
			if strings.HasPrefix(rip, site+"+") {
				return "in " + strings.TrimSpace(rip)
			}
		}
	}
	return ""
}

func tail(s string, lines int) string {
	parts := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return strings.Join(parts, "\n")
}

// printFailures shows what went wrong on a kernel: the error, the output
// of failing binaries, the console tail when the guest itself failed.
func printFailures(w io.Writer, kr *KernelResult, verbose bool) {
	for i := range kr.Binaries {
		b := &kr.Binaries[i]
		if verbose || !b.OK() {
			fmt.Fprintf(w, "----- %s on %s: exit %s -----\n%s", b.Name, kr.Kernel.Name, exitText(b), b.Output)
			if len(b.BadSkips) > 0 {
				fmt.Fprintf(w, "vmtest: %s: skipped without a matrix-declared missing feature (a failure here): %s\n",
					b.Name, strings.Join(b.BadSkips, ", "))
			}
		}
	}
	if kr.Err != nil {
		fmt.Fprintf(w, "vmtest: %v\n", kr.Err)
		if kr.Console != "" {
			fmt.Fprintf(w, "----- console tail (%s) -----\n%s\n-----\n", kr.Kernel.Name, kr.Console)
		}
	}
}

func exitText(b *BinaryResult) string {
	if !b.Finished {
		return "none (did not finish)"
	}
	return strconv.Itoa(b.Exit)
}

// syncWriter serialises writes from kernels running in parallel.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}
