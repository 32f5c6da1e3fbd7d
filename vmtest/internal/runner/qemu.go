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
	"sync"
	"time"
)

// ErrGuestTimeout says the guest did not come back in time.
var ErrGuestTimeout = errors.New("guest did not come back in time")

// QEMUConfig is how guests are booted.
type QEMUConfig struct {
	Binary  string        // default qemu-system-x86_64
	MemMB   int           // default 1024
	CPUs    int           // default 2
	Timeout time.Duration // per boot, from start to power-off
	Console io.Writer     // if set, receives the guest console live
}

// BootResult is the raw outcome of one boot.
type BootResult struct {
	Console string // kernel and init messages (ttyS0)
	Results string // the result stream (ttyS1)
	Elapsed time.Duration
}

// lockedBuffer is a bytes.Buffer safe for QEMU's writer and our reader.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Boot boots vmlinuz with initrd under TCG (KVM does not run stock kernels
// on the build machine), no network, the console on the first serial port
// and the result stream on the second. It returns when QEMU exits or the
// timeout passes (then with ErrGuestTimeout).
func Boot(ctx context.Context, cfg QEMUConfig, vmlinuz, initrd, workDir string) (BootResult, error) {
	bin := cfg.Binary
	if bin == "" {
		bin = "qemu-system-x86_64"
	}
	mem, cpus := cfg.MemMB, cfg.CPUs
	if mem == 0 {
		mem = 1024
	}
	if cpus == 0 {
		cpus = 2
	}
	resultsPath := filepath.Join(workDir, "results.txt")
	_ = os.Remove(resultsPath)
	args := []string{
		"-nodefaults", "-no-user-config",
		"-machine", "q35", "-accel", "tcg", "-cpu", "max",
		"-smp", strconv.Itoa(cpus), "-m", strconv.Itoa(mem),
		"-display", "none", "-no-reboot", "-nic", "none",
		"-kernel", vmlinuz, "-initrd", initrd,
		// No mitigations=off: it would speed TCG up, but it also changes
		// what the verifier allows without CAP_PERFMON (bpf_bypass_spec_*),
		// and the unprivileged tests must see what production kernels do.
		"-append", "console=ttyS0 panic=-1 oops=panic quiet loglevel=4 rdinit=/init",
		"-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
		"-chardev", "file,id=res,path=" + resultsPath, "-serial", "chardev:res",
	}
	bootCtx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	cmd := exec.CommandContext(bootCtx, bin, args...)
	cmd.WaitDelay = 5 * time.Second
	var console lockedBuffer
	var w io.Writer = &console
	if cfg.Console != nil {
		w = io.MultiWriter(&console, cfg.Console)
	}
	cmd.Stdout = w
	cmd.Stderr = w
	start := time.Now()
	err := cmd.Run()
	res := BootResult{Console: console.String(), Elapsed: time.Since(start)}
	if b, rerr := os.ReadFile(resultsPath); rerr == nil {
		res.Results = string(b)
	}
	switch {
	case bootCtx.Err() == context.DeadlineExceeded && ctx.Err() == nil:
		return res, fmt.Errorf("%w: no power-off within %s", ErrGuestTimeout, cfg.Timeout)
	case ctx.Err() != nil:
		return res, ctx.Err()
	case err != nil:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return res, fmt.Errorf("qemu exited with status %d", ee.ExitCode())
		}
		return res, fmt.Errorf("run %s: %w", bin, err)
	}
	return res, nil
}
