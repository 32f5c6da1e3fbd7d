// Command vmtest runs xderp's kernel-facing test binaries on a matrix of real
// kernels: it builds each package's tests as a static binary, packs them with
// busybox and the kernel's modules into an initramfs, boots every kernel of
// vmtest/kernels.json in QEMU (TCG, no network) and runs all binaries as root
// in one boot per kernel; "host" runs them directly on the running kernel.
//
//	go run ./vmtest [-kernel NAME[,NAME]] [-pkgs ./bpf/...,./loader/...] [-run REGEX]
//
// It exits non-zero if any test fails or skips without a matrix-declared
// reason, or if a guest does not come back in time, and prints the time per
// kernel and a markdown result table.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/xderp/xderp/vmtest/internal/runner"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

func main() {
	os.Exit(run())
}

func run() int {
	var (
		kernel   = flag.String("kernel", "all", "kernels to run, comma separated names from the matrix, or all")
		pkgs     = flag.String("pkgs", "./bpf/...,./loader/...,./vmtest/internal/selftest", "comma-separated package patterns whose tests run in the guests")
		runRE    = flag.String("run", "", "run only tests matching this regular expression (-test.run)")
		matrixF  = flag.String("matrix", "", "kernel matrix file (default vmtest/kernels.json in the module)")
		timeout  = flag.Duration("timeout", 4*time.Minute, "per-kernel limit: boot, all tests, power-off")
		tableF   = flag.String("table", "", "also write the markdown result table to this file")
		readmeF  = flag.String("readme", "", "replace the table between the vmtest-table markers in this markdown file")
		busybox  = flag.String("busybox", "/bin/busybox", "static busybox for the initramfs (Debian busybox-static)")
		qemu     = flag.String("qemu", "qemu-system-x86_64", "QEMU binary")
		memMB    = flag.Int("mem", 1024, "guest memory in MiB")
		cpus     = flag.Int("smp", 2, "guest CPUs")
		parallel = flag.Int("parallel", 1, "kernels to run at once")
		verbose  = flag.Bool("v", false, "print every test binary's output and the guest console")
		keepWork = flag.String("work", "", "keep build products and initramfs in this directory (default: a temp dir, removed)")
		env      listFlag
	)
	flag.Var(&env, "env", "extra KEY=VALUE for the test binaries (repeatable)")
	flag.Parse()

	root, err := moduleRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmtest:", err)
		return 2
	}
	if *matrixF == "" {
		*matrixF = filepath.Join(root, "vmtest", "kernels.json")
	}
	m, err := runner.LoadMatrix(*matrixF)
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmtest:", err)
		return 2
	}
	kernels, err := m.Select(*kernel)
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmtest:", err)
		return 2
	}
	var patterns []string
	for _, p := range strings.Split(*pkgs, ",") {
		if p = strings.TrimSpace(p); p != "" {
			patterns = append(patterns, p)
		}
	}
	if *keepWork != "" {
		if err := os.MkdirAll(*keepWork, 0o755); err != nil {
			fmt.Fprintln(os.Stderr, "vmtest:", err)
			return 2
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg := runner.Config{
		ModuleRoot: root, Matrix: m, Kernels: kernels, Packages: patterns, Run: *runRE,
		Env: env, Timeout: *timeout, Busybox: *busybox, WorkDir: *keepWork,
		QEMU: runner.QEMUConfig{Binary: *qemu, MemMB: *memMB, CPUs: *cpus},
		Out:  os.Stdout, Verbose: *verbose, Parallel: *parallel,
	}
	if *verbose {
		cfg.QEMU.Console = os.Stdout
	}
	rep, err := runner.Run(ctx, cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmtest:", err)
		return 1
	}
	table := rep.Markdown()
	fmt.Println()
	fmt.Print(table)
	if *tableF != "" {
		if err := os.WriteFile(*tableF, []byte(table), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "vmtest:", err)
			return 1
		}
	}
	if *readmeF != "" {
		doc, err := os.ReadFile(*readmeF)
		if err == nil {
			var updated string
			if updated, err = runner.ReplaceTable(string(doc), table); err == nil {
				err = os.WriteFile(*readmeF, []byte(updated), 0o644)
			}
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "vmtest: update %s: %v\n", *readmeF, err)
			return 1
		}
	}
	if !rep.OK() {
		fmt.Fprintln(os.Stderr, "vmtest: FAIL")
		return 1
	}
	fmt.Println("vmtest: PASS")
	return 0
}

// moduleRoot finds the directory of the main module's go.mod.
func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("run vmtest from inside the xderp module")
	}
	return filepath.Dir(gomod), nil
}
